//! `GET /metrics`: the server's counters in Prometheus' text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::queue::{Done, Failed};
use crate::pipeline::Engine;
use crate::runtime::RunStats;

/// Upper bounds of the generation-time histogram, in seconds.
const BUCKETS: [f64; 10] = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, count) in BUCKETS.iter().zip(&mut self.counts) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Default)]
struct Counters {
    requests: BTreeMap<(String, u16), u64>,
    generation: Histogram,
    lora_switch: Histogram,
    jobs: BTreeMap<&'static str, u64>,
    /// ONNX Runtime's time per component, per worker (each engine counts its own).
    ort: BTreeMap<String, BTreeMap<String, RunStats>>,
}

/// Counters shared by the handlers and the workers.
#[derive(Default)]
pub struct Metrics {
    queue_depth: AtomicUsize,
    counters: Mutex<Counters>,
}

impl Metrics {
    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Jobs waiting.
    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth.store(depth, Ordering::Relaxed);
    }

    /// A request answered on `route` with `status`.
    pub fn record_request(&self, route: &str, status: u16) {
        *self
            .counters()
            .requests
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    /// A job ended after `elapsed` on `engine`.
    pub fn record_job(&self, answer: &Result<Done, Failed>, elapsed: Duration, engine: &Engine) {
        let worker = std::thread::current()
            .name()
            .unwrap_or("worker")
            .to_string();
        let mut counters = self.counters();
        let outcome = match answer {
            Ok(done) => {
                counters.generation.observe(elapsed.as_secs_f64());
                if !done.lora_switch.unchanged {
                    counters
                        .lora_switch
                        .observe(done.lora_switch.elapsed.as_secs_f64());
                }
                "ok"
            }
            Err(Failed::Engine(_)) => "error",
            Err(Failed::Stopped(_)) => "stopped",
        };
        *counters.jobs.entry(outcome).or_default() += 1;
        counters
            .ort
            .insert(worker, engine.run_stats().into_iter().collect());
    }

    /// The text `GET /metrics` answers.
    pub fn render(&self) -> String {
        let counters = self.counters();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP tcd_queue_depth Generation jobs waiting for a worker.\n\
             # TYPE tcd_queue_depth gauge\ntcd_queue_depth {}",
            self.queue_depth.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tcd_requests_total HTTP requests answered, by route and status.\n\
             # TYPE tcd_requests_total counter"
        );
        for ((route, status), n) in &counters.requests {
            let _ = writeln!(
                out,
                "tcd_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP tcd_jobs_total Generation jobs ended, by outcome (ok, error, stopped).\n\
             # TYPE tcd_jobs_total counter"
        );
        for (outcome, n) in &counters.jobs {
            let _ = writeln!(out, "tcd_jobs_total{{outcome=\"{outcome}\"}} {n}");
        }
        counters.generation.write(
            &mut out,
            "tcd_generation_seconds",
            "Seconds from a job's start on a worker to its answer.",
        );
        counters.lora_switch.write(
            &mut out,
            "tcd_lora_switch_seconds",
            "Seconds spent changing the LoRAs of a loaded engine between requests.",
        );
        let mut ort: BTreeMap<&str, RunStats> = BTreeMap::new();
        for stats in counters.ort.values() {
            for (component, s) in stats {
                let total = ort.entry(component).or_default();
                total.calls += s.calls;
                total.total += s.total;
            }
        }
        let _ = writeln!(
            out,
            "# HELP tcd_ort_run_seconds_total Seconds inside ONNX Runtime's Run, by component.\n\
             # TYPE tcd_ort_run_seconds_total counter"
        );
        for (component, s) in &ort {
            let _ = writeln!(
                out,
                "tcd_ort_run_seconds_total{{component=\"{component}\"}} {}",
                s.total.as_secs_f64()
            );
        }
        let _ = writeln!(
            out,
            "# HELP tcd_ort_runs_total Runs of each component's graph.\n\
             # TYPE tcd_ort_runs_total counter"
        );
        for (component, s) in &ort {
            let _ = writeln!(
                out,
                "tcd_ort_runs_total{{component=\"{component}\"}} {}",
                s.calls
            );
        }
        out
    }
}
