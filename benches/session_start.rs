//! Engine start-up with and without the optimised-model session cache, each start in a fresh
//! process (as a CLI run would be), printed as a table.
//!
//! ```sh
//! cargo bench --bench session_start -- [MODEL_DIR] [--repeats N] [--threads N]
//! ```
//!
//! For each repeat: a start without cache, a start with an empty cache (it optimises and
//! stores) and a start with the stored entry (a hit). The table shows the fastest of each.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tcd_ort::pipeline::{Engine, EngineOptions};
use tcd_ort::runtime::{CacheStatus, SessionCache};

fn child(model: &str, cache: Option<&str>, threads: Option<usize>) -> Result<(), String> {
    let options = EngineOptions {
        intra_threads: threads,
        session_cache: match cache {
            Some(dir) => SessionCache::Dir(PathBuf::from(dir)),
            None => SessionCache::Off,
        },
        ..EngineOptions::default()
    };
    // ONNX Runtime's library load is not part of a session start: do it first.
    tcd_ort::runtime::ensure_loaded(None).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let engine = Engine::load(model, &options).map_err(|e| e.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    let statuses: Vec<String> = engine
        .sessions()
        .iter()
        .map(|s| match &s.cache {
            CacheStatus::Off => "off".to_string(),
            CacheStatus::Hit => "hit".to_string(),
            CacheStatus::Stored => "stored".to_string(),
            other => format!("{other}"),
        })
        .collect();
    println!("{seconds:.4} {}", statuses.join(","));
    Ok(())
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        dir_size(&p)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn start(
    model: &str,
    cache: Option<&Path>,
    threads: Option<usize>,
) -> Result<(f64, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(["--child", model]);
    if let Some(c) = cache {
        cmd.args(["--cache", &c.to_string_lossy()]);
    }
    if let Some(t) = threads {
        cmd.args(["--threads", &t.to_string()]);
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().last().unwrap_or_default().to_string();
    let (secs, statuses) = line.split_once(' ').unwrap_or((line.as_str(), ""));
    let secs: f64 = secs
        .parse()
        .map_err(|_| format!("unexpected child output: {text}"))?;
    Ok((secs, statuses.to_string()))
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let threads = value("--threads").and_then(|t| t.parse().ok());
    if args.first().map(String::as_str) == Some("--child") {
        let model = args.get(1).ok_or("--child needs a model")?;
        return child(model, value("--cache").as_deref(), threads);
    }
    let repeats: usize = value("--repeats").and_then(|r| r.parse().ok()).unwrap_or(3);
    // The first argument that is neither a flag nor a flag's value (cargo adds `--bench`).
    let model = args
        .iter()
        .enumerate()
        .find(|(i, a)| {
            !a.starts_with("--")
                && (*i == 0 || !matches!(args[i - 1].as_str(), "--repeats" | "--threads"))
        })
        .map(|(_, a)| a.clone())
        .unwrap_or_else(|| "models/tiny-sd15".to_string());
    let scratch = std::env::temp_dir().join(format!("tcd-ort-bench-cache-{}", std::process::id()));
    let (mut plain, mut store, mut hit) = (f64::MAX, f64::MAX, f64::MAX);
    let mut size = 0;
    for _ in 0..repeats {
        let _ = std::fs::remove_dir_all(&scratch);
        plain = plain.min(start(&model, None, threads)?.0);
        let (s, statuses) = start(&model, Some(&scratch), threads)?;
        if statuses.split(',').any(|s| s != "stored") {
            return Err(format!("the first cached start did not store: {statuses}"));
        }
        store = store.min(s);
        let (h, statuses) = start(&model, Some(&scratch), threads)?;
        if statuses.split(',').any(|s| s != "hit") {
            return Err(format!("the second cached start missed: {statuses}"));
        }
        hit = hit.min(h);
        size = dir_size(&scratch);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!("| model | no cache | first start (stores) | second start (hit) | hit / no cache | cache size |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {model} | {plain:.3} s | {store:.3} s | {hit:.3} s | {:.2} | {:.1} MiB |",
        hit / plain,
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
