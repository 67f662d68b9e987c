//! The session cache's size limit: least recently used entries go first.
//!
//! An entry's last use is its key file's modification time: written when the entry is stored
//! and touched at every hit. After a store, entries are deleted oldest first until the whole
//! cache fits the limit again; the entry just stored is never one of them. A graph whose source
//! alone exceeds the limit is not stored at all (see [`super::CacheKey::source_bytes`]).
//!
//! Deleting an entry another process has open is safe where files can be unlinked while open
//! (Linux, macOS); elsewhere the deletion fails and the entry stays until a later store.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{EntryRecord, KEY_FILE};

/// The limit when none is given: a few SD1.5 models (about 4 GB each) or one float32 SDXL.
pub const DEFAULT_LIMIT: u64 = 20 << 30;

/// One stored entry: its directory, its size and its last use.
#[derive(Debug)]
struct Stored {
    dir: PathBuf,
    bytes: u64,
    used: SystemTime,
}

/// Every complete entry under `root` (directories with a readable key file).
fn stored(root: &Path) -> Vec<Stored> {
    let Ok(dirs) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for dir in dirs.flatten().map(|e| e.path()) {
        let key = dir.join(KEY_FILE);
        let (Ok(text), Ok(meta)) = (std::fs::read_to_string(&key), std::fs::metadata(&key)) else {
            continue;
        };
        let Ok(record) = serde_json::from_str::<EntryRecord>(&text) else {
            continue;
        };
        let bytes = record.files.iter().map(|f| f.size).sum::<u64>() + meta.len();
        let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        out.push(Stored { dir, bytes, used });
    }
    out
}

/// Marks the entry in `dir` as used now (best effort: a read-only cache still serves hits).
pub(super) fn touch(dir: &Path) {
    if let Ok(file) = std::fs::File::options()
        .write(true)
        .open(dir.join(KEY_FILE))
    {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Deletes the least recently used entries under `root` until the cache holds at most `limit`
/// bytes, keeping `keep`; returns how many bytes it freed.
pub(super) fn evict(root: &Path, keep: &Path, limit: u64) -> u64 {
    let mut entries = stored(root);
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    entries.sort_by_key(|e| e.used);
    let mut freed = 0;
    for entry in entries.iter().filter(|e| e.dir != keep) {
        if total <= limit {
            break;
        }
        if std::fs::remove_dir_all(&entry.dir).is_ok() {
            total -= entry.bytes;
            freed += entry.bytes;
        }
    }
    freed
}
