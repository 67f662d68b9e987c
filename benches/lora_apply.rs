//! Load-time LoRA on a full-size model directory: the wall time of [`tcd_ort::pipeline::apply_loras`],
//! the work the engine does before it builds its ONNX Runtime sessions (parse the LoRA, check
//! every target against the model's weights, read each base weight, add the delta).
//!
//! `benches/lora_apply.py` builds the model directory and the LoRA, runs this binary under
//! `/usr/bin/time -v` for its peak RSS and prints it beside diffusers' `load_lora_adapter` +
//! `fuse_lora`. By hand:
//!
//! ```text
//! cargo bench --bench lora_apply -- MODEL_DIR LORA.safetensors [REPEATS]
//! cargo bench --bench lora_apply -- --phases MODEL_DIR LORA.safetensors
//! ```
//!
//! On a model exported with LoRA slots (`benches/lora_apply.py --mode slots`) the same call
//! fills the slots instead of fusing; `patched` then counts the slot replacements (two per
//! module) and `slotted` the modules.
//!
//! `--phases` times the steps of that work one by one (one weight at a time, so the sum is a
//! little above the real run, which overlaps them across threads): parsing the LoRA, reading
//! the base weights, computing the deltas, adding them; on a slot model, parsing the LoRA and
//! filling the slots.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use tcd_ort::lora::{LoraSet, LoraSource, UnetLayout};
use tcd_ort::model::ModelDir;
use tcd_ort::pipeline::{apply_loras, LoraSpec};
use tcd_ort::runtime::InitializerTable;

/// Seconds per phase of the load-time LoRA step, weight by weight.
fn phases(model: &Path, lora: &Path) -> tcd_ort::Result<()> {
    let t = Instant::now();
    let dir = ModelDir::open(model)?;
    let layout = UnetLayout {
        layers_per_block: dir.unet.layers_per_block.unwrap_or(2),
    };
    let set = LoraSet::load(
        &[LoraSource {
            path: lora.to_path_buf(),
            weight: 1.0,
        }],
        &layout,
    )?;
    let pending = set.pending()?;
    let parse = t.elapsed().as_secs_f64();
    if let Some(slots) = dir.manifest().and_then(|m| m.lora_slots.get("unet")) {
        // Slot mode: no base weight is read; the phase after parsing is filling the slots.
        let t = Instant::now();
        let mut numel = 0usize;
        for p in &pending {
            let (a, b) = p.slot_values(slots.rank, 1.0)?;
            numel += a.len() + b.len();
        }
        println!(
            "phases weights={} numel={numel} parse_s={parse:.3} fill_slots_s={:.3}",
            pending.len(),
            t.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let t = Instant::now();
    let table = InitializerTable::read(&dir.graph_path("unet"))?;
    let index = t.elapsed().as_secs_f64();
    let (mut read, mut delta, mut add, mut fused, mut numel) = (0.0, 0.0, 0.0, 0.0, 0usize);
    for p in &pending {
        let init = table
            .get(&p.param)
            .ok_or_else(|| tcd_ort::Error::invalid(format!("{} is not in the model", p.param)))?;
        let t = Instant::now();
        let mut base = table.read_f32(init)?;
        read += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let d = p.values();
        delta += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for (w, x) in base.iter_mut().zip(&d) {
            *w += x;
        }
        add += t.elapsed().as_secs_f64();
        // The engine's path: the delta computed block by block into the weight.
        let t = Instant::now();
        p.add_to(&mut base)?;
        fused += t.elapsed().as_secs_f64();
        numel += base.len();
    }
    println!(
        "phases weights={} numel={numel} parse_s={parse:.3} index_s={index:.3} read_s={read:.3} \
         delta_s={delta:.3} add_s={add:.3} delta_and_add_in_place_s={fused:.3}",
        pending.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let by_phase = std::env::args().any(|a| a == "--phases");
    // `cargo bench` passes `--bench` (and libtest-style flags) to harness-less benches.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (model, lora) = match (args.first(), args.get(1)) {
        (Some(m), Some(l)) => (PathBuf::from(m), l.clone()),
        _ => {
            eprintln!(
                "usage: cargo bench --bench lora_apply -- [--phases] MODEL_DIR LORA.safetensors [REPEATS]\n\
                 (benches/lora_apply.py builds both and compares with diffusers)"
            );
            return ExitCode::from(2);
        }
    };
    if by_phase {
        return match phases(&model, Path::new(&lora)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let repeats: usize = match args.get(2).map(|r| r.parse()) {
        None => 1,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("REPEATS must be a positive integer");
            return ExitCode::from(2);
        }
    };
    let specs = [LoraSpec {
        source: lora,
        weight: 1.0,
        weight_name: None,
    }];
    for run in 0..repeats {
        let start = Instant::now();
        match apply_loras(&model, &specs, None, false) {
            Ok((patched, report)) => {
                // One line per run, `key=value`, for the Python driver to parse.
                println!(
                    "run={run} wall_s={:.3} patched={patched} modules={} threads={} slotted={}",
                    start.elapsed().as_secs_f64(),
                    report.modules,
                    rayon::current_num_threads(),
                    report.slotted.values().sum::<usize>()
                );
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
