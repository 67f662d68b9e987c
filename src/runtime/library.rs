//! Finding and loading the ONNX Runtime shared library.
//!
//! tcd-ort links ONNX Runtime dynamically so one binary can run on whichever build the user
//! installed (CPU, CUDA/TensorRT, DirectML, CoreML). The search order is:
//!
//! 1. an explicit path (`--ort-lib`), a file or a directory holding the library;
//! 2. the `ORT_DYLIB_PATH` environment variable;
//! 3. a project-local install made by `make setup` (`.ort/lib/` in the working directory, one of
//!    its parents, or beside the executable);
//! 4. the `onnxruntime` package of the active Python (`$VIRTUAL_ENV`, then `python3`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::{Error, Result};

/// The platform's file name prefix of the ONNX Runtime library.
#[cfg(target_os = "windows")]
const LIB_PREFIX: &str = "onnxruntime";
#[cfg(not(target_os = "windows"))]
const LIB_PREFIX: &str = "libonnxruntime";

#[cfg(target_os = "windows")]
const LIB_SUFFIX: &str = ".dll";
#[cfg(target_os = "macos")]
const LIB_SUFFIX: &str = ".dylib";
#[cfg(not(any(target_os = "windows", target_os = "macos")))]
const LIB_SUFFIX: &str = ".so";

/// How to get ONNX Runtime, printed whenever it cannot be found.
pub const INSTALL_HINT: &str = "install ONNX Runtime 1.31 with `make setup` (or `pip install \
onnxruntime==1.31.1`; `onnxruntime-gpu` for CUDA/TensorRT, `onnxruntime-directml` on Windows) \
or point --ort-lib / ORT_DYLIB_PATH at libonnxruntime";

/// The environment variable ONNX Runtime reads to leave its telemetry client out.
pub const TELEMETRY_ENV: &str = "ORT_DISABLE_TELEMETRY";

/// The library this process loaded, once it has: ONNX Runtime can be loaded only once per process.
static LOADED: Mutex<Option<(PathBuf, ort::environment::Environment)>> = Mutex::new(None);

/// Whether `name` is an ONNX Runtime core library file name (not a provider plugin).
fn is_ort_library_name(name: &str) -> bool {
    if !name.starts_with(LIB_PREFIX) {
        return false;
    }
    let rest = &name[LIB_PREFIX.len()..];
    // `libonnxruntime.so`, `libonnxruntime.so.1.31.1`, `libonnxruntime.1.31.1.dylib`
    rest.starts_with(LIB_SUFFIX)
        || (rest.starts_with('.') && rest.ends_with(LIB_SUFFIX) && !rest.contains('_'))
}

/// Finds the library file inside `dir`, preferring the unversioned name.
fn library_in_dir(dir: &Path) -> Option<PathBuf> {
    let exact = dir.join(format!("{LIB_PREFIX}{LIB_SUFFIX}"));
    if exact.is_file() {
        return Some(exact);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_ort_library_name)
        })
        .collect();
    found.sort();
    found.pop()
}

/// Resolves a user-supplied path: a library file, or a directory that holds one.
fn resolve_explicit(path: &Path, origin: &str) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return library_in_dir(path).ok_or_else(|| {
            Error::Runtime(format!(
                "{origin} {} holds no {LIB_PREFIX}{LIB_SUFFIX}; {INSTALL_HINT}",
                path.display()
            ))
        });
    }
    Err(Error::Runtime(format!(
        "{origin} {} does not exist; {INSTALL_HINT}",
        path.display()
    )))
}

/// `.ort/lib` in `start` or any of its ancestors.
fn project_local(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|dir| dir.join(".ort").join("lib"))
        .find_map(|dir| library_in_dir(&dir))
}

/// The `onnxruntime/capi` directory of a Python environment rooted at `venv`.
fn venv_library(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let entries = std::fs::read_dir(&lib).ok()?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python"))
        })
        .find_map(|py| library_in_dir(&py.join("site-packages").join("onnxruntime").join("capi")))
        .or_else(|| {
            library_in_dir(
                &venv
                    .join("Lib")
                    .join("site-packages")
                    .join("onnxruntime")
                    .join("capi"),
            )
        })
}

/// Asks the active `python3` where its `onnxruntime` package lives.
fn python_library() -> Option<PathBuf> {
    let python = if cfg!(windows) { "python" } else { "python3" };
    let out = Command::new(python)
        .args([
            "-c",
            "import os, onnxruntime; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    library_in_dir(Path::new(dir.trim()))
}

/// Finds the ONNX Runtime library without loading it.
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return resolve_explicit(path, "--ort-lib");
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return resolve_explicit(Path::new(&path), "ORT_DYLIB_PATH");
    }
    let cwd = std::env::current_dir().ok();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    if let Some(found) = cwd
        .iter()
        .chain(exe_dir.iter())
        .find_map(|dir| project_local(dir))
    {
        return Ok(found);
    }
    if let Some(found) = std::env::var_os("VIRTUAL_ENV").and_then(|v| venv_library(Path::new(&v))) {
        return Ok(found);
    }
    python_library().ok_or_else(|| {
        Error::Runtime(format!(
            "the ONNX Runtime library was not found; {INSTALL_HINT}"
        ))
    })
}

/// Loads ONNX Runtime (once per process) and returns the path it was loaded from.
///
/// A second call with a different explicit path is an error, since a process can hold only
/// one ONNX Runtime.
pub fn ensure_loaded(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut loaded = LOADED
        .lock()
        .map_err(|_| Error::Runtime("the runtime loader was poisoned by a panic".into()))?;
    if let Some((path, _)) = loaded.as_ref() {
        if let Some(wanted) = explicit {
            let wanted = resolve_explicit(wanted, "--ort-lib")?;
            if !same_file(&wanted, path) {
                return Err(Error::Runtime(format!(
                    "ONNX Runtime was already loaded from {} in this process; cannot switch to {}",
                    path.display(),
                    wanted.display()
                )));
            }
        }
        return Ok(path.clone());
    }
    let path = find_library(explicit)?;
    check_library_file(&path)?;
    keep_telemetry_client_out();
    let env = ort::init_from(&path)
        .map_err(|e| {
            Error::Runtime(format!(
                "could not load {}: {e}; {INSTALL_HINT}",
                path.display()
            ))
        })?
        .with_name("tcd-ort")
        .with_telemetry(false)
        // The library writes nothing to stderr: every ONNX Runtime failure it acts on comes back
        // as a status, which becomes the error's message; its log (coloured lines repeating
        // that message, or warnings about the graph) would go straight to the host's stderr.
        .with_logger(std::sync::Arc::new(|_, _, _, _, _| {}))
        .build()
        .map_err(|e| Error::Runtime(format!("could not create the environment: {e}")))?;
    env.set_log_level(ort::logging::LogLevel::Fatal);
    *loaded = Some((path.clone(), env));
    Ok(path)
}

/// Refuses a library file that is cut short before the dynamic loader maps it: the loader maps
/// each segment the ELF headers declare, and touching a page past the end of the file kills
/// the process with SIGBUS, long after any error could be returned. Checks that the headers
/// are there and every loadable segment and the section table lie inside the file. Files that
/// are not ELF (macOS, Windows) are left to the loader.
fn check_library_file(path: &Path) -> Result<()> {
    let damaged = |why: String| {
        Error::Runtime(format!(
            "{} is truncated or damaged ({why}); {INSTALL_HINT}",
            path.display()
        ))
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    match elf_extent(&bytes) {
        Ok(Some(needed)) if needed > bytes.len() as u64 => Err(damaged(format!(
            "{} bytes, but its ELF headers describe {needed}",
            bytes.len()
        ))),
        Ok(_) => Ok(()),
        Err(why) => Err(damaged(why.to_string())),
    }
}

/// How many bytes a 64-bit little-endian ELF file's headers say it spans (the furthest end of
/// a loadable segment or of the section header table), or `None` for a file that is not one.
fn elf_extent(bytes: &[u8]) -> std::result::Result<Option<u64>, &'static str> {
    if !bytes.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    // e_ident: class 2 = 64-bit, data 1 = little-endian; the only ELF ONNX Runtime ships.
    if bytes.get(4..6) != Some(&[2, 1]) {
        return Ok(None);
    }
    let u16_at = |at: usize| -> std::result::Result<u64, &'static str> {
        let b = bytes.get(at..at + 2).ok_or("its ELF header is cut short")?;
        Ok(u64::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u64_at = |at: usize| -> std::result::Result<u64, &'static str> {
        let b = bytes
            .get(at..at + 8)
            .ok_or("its ELF headers are cut short")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    };
    let (phoff, shoff) = (u64_at(0x20)?, u64_at(0x28)?);
    let (phentsize, phnum) = (u16_at(0x36)?, u16_at(0x38)?);
    let (shentsize, shnum) = (u16_at(0x3a)?, u16_at(0x3c)?);
    let mut extent = shoff.saturating_add(shentsize * shnum);
    for k in 0..phnum {
        let at = phoff.saturating_add(k * phentsize);
        let at = usize::try_from(at).map_err(|_| "its program headers lie past its end")?;
        // p_type 1 = PT_LOAD; p_offset at +8, p_filesz at +32.
        let kind = bytes
            .get(at..at + 4)
            .ok_or("its program headers lie past its end")?;
        if kind == [1, 0, 0, 0] {
            extent = extent.max(u64_at(at + 8)?.saturating_add(u64_at(at + 32)?));
        }
    }
    Ok(Some(extent))
}

/// Sets `ORT_DISABLE_TELEMETRY=1` unless the process environment already sets it.
///
/// The Linux builds of ONNX Runtime 1.31 start Microsoft's 1DS telemetry client when the first
/// environment is created: a worker thread that lives until the process exits and a cache under
/// `$XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime` (a device id and an event database).
/// `DisableTelemetryEvents`, which the environment is built with, stops the events but not the
/// client, and releasing the environment does not stop the thread either. At exit that thread
/// kept running while static destructors freed what it reads (intermittent invalid reads under
/// valgrind in a C++ host, issue 28). With the variable set, ONNX Runtime creates no client at
/// all: no thread, no files. It is read when the environment is created, so it is set before, in
/// the process environment, and left set (ONNX Runtime may read it again).
///
/// A host that sets the variable itself keeps its value (and, with telemetry on, that thread);
/// a host that reads the environment from other threads while the first engine loads should
/// set it before starting them, as `setenv` is not safe beside a concurrent `getenv`.
fn keep_telemetry_client_out() {
    if std::env::var_os(TELEMETRY_ENV).is_none() {
        std::env::set_var(TELEMETRY_ENV, "1");
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The library file loaded by [`ensure_loaded`], if it has run.
pub(crate) fn loaded_library() -> Option<PathBuf> {
    let loaded = LOADED.lock().ok()?;
    loaded.as_ref().map(|(path, _)| path.clone())
}

/// The environment created by [`ensure_loaded`].
pub(crate) fn environment() -> Result<ort::environment::Environment> {
    let loaded = LOADED
        .lock()
        .map_err(|_| Error::Runtime("the runtime loader was poisoned by a panic".into()))?;
    loaded.as_ref().map(|(_, env)| env.clone()).ok_or_else(|| {
        Error::Runtime("ONNX Runtime is not loaded yet; call runtime::ensure_loaded first".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_library_is_refused_before_loading() {
        // #19: the dynamic loader would map its missing pages and die of SIGBUS.
        let path = find_library(None).expect("ONNX Runtime installed (make setup-ort)");
        let bytes = std::fs::read(&path).expect("the library");
        assert!(elf_extent(&bytes)
            .expect("parses")
            .is_some_and(|n| n <= bytes.len() as u64));
        let dir = std::env::temp_dir().join(format!("tcd-ort-truncated-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for cut in [100, 100_000, bytes.len() / 2] {
            let short = dir.join("libonnxruntime.so");
            std::fs::write(&short, &bytes[..cut]).expect("write");
            let e = check_library_file(&short).expect_err("refused").to_string();
            assert!(e.contains("is truncated or damaged"), "{cut}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn recognises_library_names() {
        #[cfg(target_os = "linux")]
        {
            assert!(is_ort_library_name("libonnxruntime.so"));
            assert!(is_ort_library_name("libonnxruntime.so.1.31.1"));
            assert!(!is_ort_library_name("libonnxruntime_providers_shared.so"));
            assert!(!is_ort_library_name("libonnxruntime_providers_cuda.so"));
            assert!(!is_ort_library_name("libother.so"));
        }
    }

    #[test]
    fn explicit_missing_path_is_an_error_with_a_hint() {
        let err = find_library(Some(Path::new("/nonexistent/libonnxruntime.so")))
            .expect_err("a missing file must not resolve");
        let msg = err.to_string();
        assert!(msg.contains("does not exist"), "{msg}");
        assert!(msg.contains("pip install onnxruntime"), "{msg}");
    }

    #[test]
    fn directory_without_library_is_an_error() {
        let dir = std::env::temp_dir();
        let empty = dir.join(format!("tcd-ort-empty-{}", std::process::id()));
        std::fs::create_dir_all(&empty).expect("temp dir");
        let err = find_library(Some(&empty)).expect_err("an empty dir must not resolve");
        assert!(err.to_string().contains("holds no"), "{err}");
        let _ = std::fs::remove_dir(&empty);
    }
}
