//! What `tcd-ort run` shows and writes: the progress bar, the `--timings` JSON, the PNG's
//! `parameters` text, and the checks that every output can be written before any work starts.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use tcd_ort::image_io::{check_output_path, commit_all, PendingFile};
use tcd_ort::pipeline::Progress;
use tcd_ort::runtime::RunStats;

use super::interrupt;

/// Seconds since the generation started at each progress event, for `--timings`.
#[derive(Debug, Default)]
pub struct Timeline {
    encoding: Option<f64>,
    denoising: Option<f64>,
    steps: Vec<f64>,
    decoding: Option<f64>,
}

impl Timeline {
    pub fn record(&mut self, event: Progress, at: f64) {
        match event {
            Progress::EncodingPrompt => self.encoding = Some(at),
            Progress::Denoising { .. } => self.denoising = Some(at),
            Progress::Step { .. } => self.steps.push(at),
            Progress::Decoding => self.decoding = Some(at),
            Progress::Decoded { .. } => {}
        }
    }

    /// `{"load_s", "encode_s", "steps_s": [...], "decode_s", "generate_s", "total_s",
    /// "ort_run_s", "ort_runs": {component: {"calls", "seconds"}}}`: each phase runs from the
    /// event that starts it to the next one; `ort_runs` are the generation's calls into ONNX
    /// Runtime's Run per graph and `ort_run_s` their summed time, so `total_s - load_s -
    /// ort_run_s` is what the engine spends outside ONNX Runtime (PNG writing included).
    pub fn to_json(
        &self,
        load: f64,
        generate: f64,
        total: f64,
        runs: &[(String, RunStats)],
    ) -> serde_json::Value {
        let mut steps = Vec::with_capacity(self.steps.len());
        let mut previous = self.denoising;
        for &t in &self.steps {
            if let Some(p) = previous {
                steps.push(t - p);
            }
            previous = Some(t);
        }
        let mut by_graph = serde_json::Map::new();
        for (name, r) in runs {
            // Several ControlNets share a component name: number the later ones.
            let mut key = name.clone();
            let mut n = 1;
            while by_graph.contains_key(&key) {
                n += 1;
                key = format!("{name}_{n}");
            }
            let value = serde_json::json!({"calls": r.calls, "seconds": r.total.as_secs_f64()});
            by_graph.insert(key, value);
        }
        serde_json::json!({
            "load_s": load,
            "encode_s": self.encoding.zip(self.denoising).map(|(a, b)| b - a),
            "steps_s": steps,
            "decode_s": self.decoding.map(|d| generate - d),
            "generate_s": generate,
            "total_s": total,
            "ort_run_s": runs.iter().map(|(_, r)| r.total.as_secs_f64()).sum::<f64>(),
            "ort_runs": by_graph,
        })
    }
}

/// Each graph's `Run` calls and time after `before` was taken (same graphs, same order).
pub fn run_stats_since(
    before: &[(String, RunStats)],
    after: Vec<(String, RunStats)>,
) -> Vec<(String, RunStats)> {
    after
        .into_iter()
        .enumerate()
        .map(|(i, (name, now))| {
            let earlier = before
                .get(i)
                .filter(|(n, _)| *n == name)
                .map(|(_, r)| *r)
                .unwrap_or_default();
            let since = RunStats {
                calls: now.calls.saturating_sub(earlier.calls),
                total: now.total.saturating_sub(earlier.total),
            };
            (name, since)
        })
        .collect()
}

/// Refuses to start when an output cannot be written, before the model is loaded: each
/// `(flag, path)` must be a file of its own, not a directory, absent unless `overwrite`, in a
/// directory that exists and takes a new file. Messages name the flag.
pub fn check_outputs(outputs: &[(&str, PathBuf)], overwrite: bool) -> Result<()> {
    for (i, (flag, path)) in outputs.iter().enumerate() {
        if let Some((other, _)) = outputs[..i].iter().find(|(_, p)| p == path) {
            bail!(
                "{flag} {} is also the path of {other}: give each output a file of its own",
                path.display()
            );
        }
        check_output_path(path, overwrite).map_err(|e| anyhow!("{flag}: {e}"))?;
    }
    Ok(())
}

/// Moves the run's staged outputs into place together, unless a signal asked to stop while
/// they were written: then they go with their temporaries and nothing reaches its place.
pub fn commit_outputs(staged: Vec<PendingFile>, quiet: bool) -> Result<()> {
    if let Some(stopped) = interrupt::stopped() {
        return Err(stopped.into());
    }
    let written: Vec<PathBuf> = staged.iter().map(|f| f.destination().to_owned()).collect();
    commit_all(staged)?;
    if !quiet {
        for path in written {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// The progress shown on stderr: indicatif's bar on a terminal, one line per step otherwise
/// (logs, CI), nothing with `--quiet`.
pub struct ProgressBar {
    enabled: bool,
    /// Whether the VAE decodes in several chunks (frames of a video).
    chunked: bool,
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
}

impl ProgressBar {
    /// A bar that shows nothing when `enabled` is false.
    pub fn new(enabled: bool) -> Self {
        ProgressBar {
            enabled,
            chunked: false,
            bar: None,
            started: Instant::now(),
        }
    }

    /// Shows `event`; always goes on (the command line cancels with Ctrl-C).
    pub fn update(&mut self, event: Progress) -> bool {
        if !self.enabled {
            return true;
        }
        match event {
            Progress::EncodingPrompt => eprintln!("encoding prompt"),
            Progress::Denoising { total } => {
                let bar = indicatif::ProgressBar::new(total as u64);
                // A hidden target (stderr is not a terminal) draws nothing: lines instead.
                if !bar.is_hidden() {
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "[{bar:30}] {pos}/{len} steps, {elapsed_precise}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                        .progress_chars("#>-"),
                    );
                    self.bar = Some(bar);
                }
            }
            Progress::Step { step, total, .. } => match &self.bar {
                Some(bar) => {
                    bar.set_position(step as u64);
                    if step == total {
                        bar.finish();
                    }
                }
                None => {
                    let mut err = std::io::stderr().lock();
                    let _ = writeln!(
                        err,
                        "{step}/{total} steps, {:.1}s",
                        self.started.elapsed().as_secs_f32()
                    );
                }
            },
            Progress::Decoding => eprintln!("decoding"),
            // One chunk is the whole batch for still images: nothing more to say.
            Progress::Decoded { done, total } if done < total || self.chunked => {
                self.chunked = true;
                eprintln!("decoded {done}/{total}");
            }
            Progress::Decoded { .. } => {}
        }
        true
    }
}
