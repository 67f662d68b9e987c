//! The optimised-model cache: ONNX Runtime's optimised graph, written on the first start and
//! loaded (with optimisation off) on later ones.
//!
//! An entry is only as good as its key, and a wrong hit gives wrong images silently, so the
//! key holds everything the optimised graph depends on:
//!
//! - the model: its canonical path and the name, size and modification time of every file in
//!   its directory (the `.onnx` file and its external data);
//! - ONNX Runtime: the build string (version and commit) and the library file's size and time;
//! - the execution providers, the optimisation level and the device id;
//! - the CPU's instruction-set extensions: at level `all` ONNX Runtime rewrites convolutions
//!   into layouts blocked for this CPU's vector width (NCHWc), which another CPU may run
//!   differently or not at all.
//!
//! What is never cached:
//!
//! - graphs with weight overrides (load-time LoRA): ONNX Runtime would fold the patched weights
//!   into the saved graph, and a later start with other LoRAs (or none) could not replace them,
//!   since the names it replaces by may no longer exist after fusion;
//! - TensorRT, DirectML and CoreML sessions: they compile subgraphs into nodes that ONNX Runtime
//!   cannot save (TensorRT keeps its own engine cache instead);
//! - level `disable`, which has nothing to save.
//!
//! An entry is written to a temporary directory and renamed into place with its key last, so a
//! crash leaves no half entry that looks complete. On load the key is compared in full (the
//! directory name is only a hash of it) and the recorded file sizes are checked; an entry that
//! fails either check, or that ONNX Runtime cannot load, is deleted and the model is loaded
//! from its source as if there were no cache. Content corruption that keeps sizes intact (a
//! flipped bit in the weights) is not detected: hashing gigabytes would cost what the cache
//! saves.

mod evict;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::options::OptLevel;
use super::provider::ExecutionProvider;
use crate::{Error, Result};

pub use evict::DEFAULT_LIMIT;

/// Bump when the entry layout or key meaning changes.
const FORMAT: u32 = 1;
const MODEL_FILE: &str = "model.onnx";
/// The external data file of the optimised model, relative to [`MODEL_FILE`].
pub(crate) const DATA_FILE: &str = "model.onnx.data";
const KEY_FILE: &str = "key.json";

/// What the cache did for one graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// No cache configured.
    Off,
    /// A cache is configured but this graph cannot use it (the reason says why).
    Bypassed(String),
    /// Loaded from the cache.
    Hit,
    /// Optimised from source and stored for the next start.
    Stored,
    /// Optimised from source; storing it failed (the reason says why), the session is fine.
    NotStored(String),
    /// A cache entry existed but was unusable (the reason says why); it was deleted and the
    /// graph loaded from source (and stored again when possible).
    Rejected(String),
}

impl fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheStatus::Off => f.write_str("off"),
            CacheStatus::Bypassed(why) => write!(f, "bypassed ({why})"),
            CacheStatus::Hit => f.write_str("hit"),
            CacheStatus::Stored => f.write_str("stored"),
            CacheStatus::NotStored(why) => write!(f, "not stored ({why})"),
            CacheStatus::Rejected(why) => write!(f, "stale entry replaced ({why})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    name: String,
    size: u64,
    modified_ns: u128,
}

/// Everything an optimised graph depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CacheKey {
    format: u32,
    model: PathBuf,
    model_files: Vec<FileStamp>,
    ort_build: String,
    ort_library: Option<FileStamp>,
    providers: Vec<ExecutionProvider>,
    opt_level: OptLevel,
    device_id: i32,
    cpu_features: String,
}

/// What `key.json` holds: the key and the sizes of the entry's own files.
#[derive(Debug, Serialize, Deserialize)]
struct EntryRecord {
    key: CacheKey,
    files: Vec<FileStamp>,
}

fn stamp(path: &Path) -> Result<FileStamp> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let modified_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(FileStamp {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        size: meta.len(),
        modified_ns,
    })
}

/// The instruction-set extensions ONNX Runtime's CPU kernels and layouts choose between.
pub(crate) fn cpu_features() -> String {
    let mut found: Vec<&str> = vec![std::env::consts::ARCH];
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        macro_rules! probe {
            ($($f:tt),*) => {
                $(if std::arch::is_x86_feature_detected!($f) { found.push($f); })*
            };
        }
        probe!(
            "sse4.1",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avx512fp16",
            "avxvnni"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {
                $(if std::arch::is_aarch64_feature_detected!($f) { found.push($f); })*
            };
        }
        probe!("neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2");
    }
    found.join(",")
}

/// A byte count for messages: KiB below a MiB, MiB below a GiB, GiB above.
pub(crate) fn size_text(bytes: u64) -> String {
    let kib = bytes as f64 / 1024.0;
    if kib < 1024.0 {
        format!("{kib:.1} KiB")
    } else if kib < 1024.0 * 1024.0 {
        format!("{:.1} MiB", kib / 1024.0)
    } else {
        format!("{:.2} GiB", kib / (1024.0 * 1024.0))
    }
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl CacheKey {
    /// The key of `model` loaded with these settings.
    pub(crate) fn new(
        model: &Path,
        providers: &[ExecutionProvider],
        opt_level: OptLevel,
        device_id: i32,
        ort_library: Option<&Path>,
    ) -> Result<Self> {
        let model = model.canonicalize().map_err(|e| Error::io(model, e))?;
        let dir = model.parent().unwrap_or(Path::new("."));
        let mut model_files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            if path.is_file() {
                model_files.push(stamp(&path)?);
            }
        }
        model_files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(CacheKey {
            format: FORMAT,
            model,
            model_files,
            ort_build: ort::info().to_string(),
            ort_library: ort_library.and_then(|p| stamp(p).ok()),
            providers: providers.to_vec(),
            opt_level,
            device_id,
            cpu_features: cpu_features(),
        })
    }

    /// The size of the graph's source files: about what its entry will take.
    pub(crate) fn source_bytes(&self) -> u64 {
        self.model_files.iter().map(|f| f.size).sum()
    }

    fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// One graph's place in the cache.
#[derive(Debug)]
pub(crate) struct CacheEntry {
    dir: PathBuf,
    root: PathBuf,
    key: CacheKey,
    /// The whole cache's size limit in bytes, kept by [`CacheEntry::finish_store`].
    limit: u64,
}

/// Where a store in progress writes.
#[derive(Debug)]
pub(crate) struct PendingStore {
    tmp: PathBuf,
}

impl PendingStore {
    /// The path handed to ONNX Runtime as the optimised model file.
    pub(crate) fn model_path(&self) -> PathBuf {
        self.tmp.join(MODEL_FILE)
    }
}

impl Drop for PendingStore {
    fn drop(&mut self) {
        // Only reached with the directory still in place when the store was abandoned.
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

impl CacheEntry {
    /// The entry for `component` under `root`, in a cache of at most `limit` bytes.
    pub(crate) fn new(root: &Path, component: &str, key: CacheKey, limit: u64) -> Self {
        let hash = fnv1a(&key.json());
        CacheEntry {
            dir: root.join(format!("{component}-{hash:016x}")),
            root: root.to_path_buf(),
            key,
            limit,
        }
    }

    /// The entry's directory.
    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cached model when the entry exists; `Err` with a reason when it exists but is
    /// unusable (the caller deletes it).
    pub(crate) fn lookup(&self) -> std::result::Result<Option<PathBuf>, String> {
        let key_path = self.dir.join(KEY_FILE);
        if !self.dir.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&key_path)
            .map_err(|e| format!("cannot read {}: {e}", key_path.display()))?;
        let record: EntryRecord = serde_json::from_str(&text)
            .map_err(|e| format!("unreadable {}: {e}", key_path.display()))?;
        if record.key != self.key {
            return Err("its key does not match (hash collision or older format)".into());
        }
        for recorded in &record.files {
            let actual = stamp(&self.dir.join(&recorded.name))
                .map_err(|e| format!("{e}"))?
                .size;
            if actual != recorded.size {
                return Err(format!(
                    "{} is {actual} bytes, {} when stored",
                    recorded.name, recorded.size
                ));
            }
        }
        evict::touch(&self.dir);
        Ok(Some(self.dir.join(MODEL_FILE)))
    }

    /// Deletes the entry.
    pub(crate) fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Starts a store: a fresh temporary directory beside the entry.
    pub(crate) fn begin_store(&self) -> Result<PendingStore> {
        std::fs::create_dir_all(&self.root).map_err(|e| Error::io(&self.root, e))?;
        let mut name = self.dir.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp-{}", std::process::id()));
        let tmp = self.root.join(name);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(PendingStore { tmp })
    }

    /// Completes a store after ONNX Runtime wrote the model: records the key and file sizes and
    /// moves the directory into place, then deletes entries of the same model that other keys
    /// (an older file, another ONNX Runtime) left behind, and the least recently used entries
    /// while the cache is over its limit.
    pub(crate) fn finish_store(&self, pending: PendingStore) -> Result<()> {
        let mut files = Vec::new();
        for name in [MODEL_FILE, DATA_FILE] {
            let path = pending.tmp.join(name);
            if path.is_file() {
                files.push(stamp(&path)?);
            } else if name == MODEL_FILE {
                return Err(Error::Runtime(format!(
                    "ONNX Runtime wrote no optimised model to {}",
                    path.display()
                )));
            }
        }
        let record = EntryRecord {
            key: self.key.clone(),
            files,
        };
        let text = serde_json::to_string_pretty(&record)
            .map_err(|e| Error::Runtime(format!("cannot encode the cache key: {e}")))?;
        let key_path = pending.tmp.join(KEY_FILE);
        std::fs::write(&key_path, text).map_err(|e| Error::io(&key_path, e))?;
        self.remove();
        std::fs::rename(&pending.tmp, &self.dir).map_err(|e| Error::io(&self.dir, e))?;
        self.prune_siblings();
        evict::evict(&self.root, &self.dir, self.limit);
        Ok(())
    }

    fn prune_siblings(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path == self.dir {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(path.join(KEY_FILE)) else {
                continue;
            };
            let Ok(record) = serde_json::from_str::<EntryRecord>(&text) else {
                continue;
            };
            if record.key.model == self.key.model
                && record.key.providers == self.key.providers
                && record.key.opt_level == self.key.opt_level
            {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tcd-ort-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn key(model: &Path, level: OptLevel) -> CacheKey {
        CacheKey {
            format: FORMAT,
            model: model.to_path_buf(),
            model_files: vec![stamp(model).expect("stamp")],
            ort_build: "test".into(),
            ort_library: None,
            providers: vec![ExecutionProvider::Cpu],
            opt_level: level,
            device_id: 0,
            cpu_features: cpu_features(),
        }
    }

    fn store(entry: &CacheEntry, bytes: &[u8]) {
        let pending = entry.begin_store().expect("begin");
        std::fs::write(pending.model_path(), bytes).expect("write model");
        entry.finish_store(pending).expect("finish");
    }

    #[test]
    fn stores_finds_and_rejects_entries() {
        let dir = scratch("entries");
        let model = dir.join("source.onnx");
        std::fs::write(&model, b"model").expect("write");
        let root = dir.join("cache");
        let entry = CacheEntry::new(&root, "unet", key(&model, OptLevel::All), DEFAULT_LIMIT);
        assert_eq!(entry.lookup(), Ok(None));
        store(&entry, b"optimised");
        let found = entry.lookup().expect("valid").expect("present");
        assert_eq!(std::fs::read(&found).ok(), Some(b"optimised".to_vec()));
        // No temporary directory is left behind.
        let names: Vec<_> = std::fs::read_dir(&root)
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");

        // A truncated model is caught by its recorded size.
        std::fs::write(&found, b"opt").expect("truncate");
        let err = entry.lookup().expect_err("truncated");
        assert!(err.contains("bytes"), "{err}");

        // A missing key file (an interrupted store) is unusable, not a hit.
        store(&entry, b"optimised");
        std::fs::remove_file(entry.dir().join(KEY_FILE)).expect("remove key");
        assert!(entry.lookup().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn any_key_change_moves_to_another_entry_and_prunes_the_old_one() {
        let dir = scratch("keys");
        let model = dir.join("source.onnx");
        std::fs::write(&model, b"model").expect("write");
        let root = dir.join("cache");
        let base = key(&model, OptLevel::All);
        let first = CacheEntry::new(&root, "unet", base.clone(), DEFAULT_LIMIT);
        store(&first, b"v1");

        let mut other_cpu = base.clone();
        other_cpu.cpu_features.push_str(",imaginary");
        let mut other_level = base.clone();
        other_level.opt_level = OptLevel::Basic;
        let mut other_ort = base.clone();
        other_ort.ort_build = "another build".into();
        for changed in [other_cpu, other_level, other_ort.clone()] {
            let e = CacheEntry::new(&root, "unet", changed, DEFAULT_LIMIT);
            assert_ne!(e.dir(), first.dir());
            assert_eq!(e.lookup(), Ok(None));
        }

        // The model file changes (new size): a new key; storing it deletes the stale entry.
        std::fs::write(&model, b"model, retrained").expect("rewrite");
        let newer = CacheEntry::new(&root, "unet", key(&model, OptLevel::All), DEFAULT_LIMIT);
        assert_ne!(newer.dir(), first.dir());
        store(&newer, b"v2");
        assert!(!first.dir().exists(), "the stale entry is pruned");
        assert!(newer.dir().exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn over_the_limit_the_least_recently_used_entries_go_first() {
        let dir = scratch("limit");
        let root = dir.join("cache");
        let entry = |name: &str, limit: u64| {
            let model = dir.join(format!("{name}.onnx"));
            std::fs::write(&model, name).expect("write");
            CacheEntry::new(&root, name, key(&model, OptLevel::All), limit)
        };
        let age = |e: &CacheEntry, secs: u64| {
            let file = std::fs::File::options()
                .write(true)
                .open(e.dir().join(KEY_FILE))
                .expect("key file");
            let when = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
            file.set_modified(when).expect("set time");
        };
        let size = |e: &CacheEntry| -> u64 {
            std::fs::read_dir(e.dir())
                .expect("list")
                .flatten()
                .map(|f| f.metadata().expect("meta").len())
                .sum()
        };
        // Three entries of 1000 bytes of model each, used 300, 200 and 100 s ago.
        let (a, b, c) = (
            entry("a", u64::MAX),
            entry("b", u64::MAX),
            entry("c", u64::MAX),
        );
        for (e, secs) in [(&a, 300), (&b, 200), (&c, 100)] {
            store(e, &[0u8; 1000]);
            age(e, secs);
        }
        // A hit on the oldest makes it the most recently used.
        assert!(a.lookup().expect("valid").is_some());
        // A fourth entry in a cache that holds three: the least recently used (b) goes.
        let limit = size(&a) + size(&b) + size(&c);
        let d = entry("d", limit);
        store(&d, &[0u8; 1000]);
        assert!(a.dir().exists() && c.dir().exists() && d.dir().exists());
        assert!(
            !b.dir().exists(),
            "the least recently used entry is evicted"
        );
        // An entry larger than the whole limit is kept once stored; everything else goes.
        let e = entry("e", 10);
        store(&e, &[0u8; 1000]);
        let left: Vec<_> = std::fs::read_dir(&root).expect("list").flatten().collect();
        assert_eq!(left.len(), 1);
        assert!(e.dir().exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn abandoned_stores_leave_nothing() {
        let dir = scratch("abandon");
        let model = dir.join("source.onnx");
        std::fs::write(&model, b"model").expect("write");
        let root = dir.join("cache");
        let entry = CacheEntry::new(
            &root,
            "vae_decoder",
            key(&model, OptLevel::All),
            DEFAULT_LIMIT,
        );
        let pending = entry.begin_store().expect("begin");
        std::fs::write(pending.model_path(), b"partial").expect("write");
        drop(pending);
        assert_eq!(std::fs::read_dir(&root).expect("list").count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
