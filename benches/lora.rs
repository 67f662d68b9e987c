//! Criterion benches of LoRA delta computation at SDXL size: one transformer block's attention
//! projections (4 × 1280×1280 linear, rank 64) and one resnet conv (640×640 3×3, rank 64),
//! alone and as two stacked adapters.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use tcd_ort::lora::{LoraSet, LoraSource, UnetLayout};

const RANK: usize = 64;

/// (module, down shape, up shape) of the benchmarked module set.
fn modules() -> Vec<(String, Vec<usize>, Vec<usize>)> {
    let attn = "down_blocks.2.attentions.0.transformer_blocks.0.attn1";
    let mut m: Vec<_> = ["to_q", "to_k", "to_v", "to_out.0"]
        .iter()
        .map(|p| (format!("{attn}.{p}"), vec![RANK, 1280], vec![1280, RANK]))
        .collect();
    m.push((
        "down_blocks.1.resnets.0.conv2".to_string(),
        vec![RANK, 640, 3, 3],
        vec![640, RANK, 1, 1],
    ));
    m
}

/// Writes a diffusers-format LoRA with deterministic pseudo-random values.
fn write_lora(path: &Path, seed: u32) {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    let mut next = move || {
        // xorshift32: cheap and reproducible; the values only need to be non-trivial.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state as f32 / u32::MAX as f32 - 0.5) * 0.1
    };
    let mut owned = Vec::new();
    for (module, down, up) in modules() {
        for (suffix, shape) in [("lora_A", down), ("lora_B", up)] {
            let n: usize = shape.iter().product();
            let bytes: Vec<u8> = (0..n).flat_map(|_| next().to_le_bytes()).collect();
            owned.push((format!("unet.{module}.{suffix}.weight"), shape, bytes));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(
            |(k, s, d)| match TensorView::new(Dtype::F32, s.clone(), d) {
                Ok(v) => (k.clone(), v),
                Err(e) => panic!("{k}: {e}"),
            },
        )
        .collect();
    let bytes = match safetensors::serialize(views, None) {
        Ok(b) => b,
        Err(e) => panic!("serialize: {e}"),
    };
    if let Err(e) = std::fs::write(path, bytes) {
        panic!("{}: {e}", path.display());
    }
}

fn load(paths: &[PathBuf]) -> LoraSet {
    let sources: Vec<LoraSource> = paths
        .iter()
        .zip([1.0, 0.7])
        .map(|(p, w)| LoraSource {
            path: p.clone(),
            weight: w,
        })
        .collect();
    match LoraSet::load(&sources, &UnetLayout::default()) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

fn deltas(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("tcd-ort-lora-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("{}: {e}", dir.display());
    }
    let paths: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = dir.join(format!("a{i}.safetensors"));
            write_lora(&p, i + 1);
            p
        })
        .collect();
    let one = load(&paths[..1]);
    let two = load(&paths);
    let mut group = c.benchmark_group("lora deltas");
    group.sample_size(20);
    group.bench_function("4x1280x1280 + 640x640x3x3, rank 64, 1 adapter", |b| {
        b.iter(|| black_box(one.deltas()))
    });
    group.bench_function("4x1280x1280 + 640x640x3x3, rank 64, 2 adapters", |b| {
        b.iter(|| black_box(two.deltas()))
    });
    group.bench_function("load 1 adapter (read + convert + validate)", |b| {
        b.iter(|| black_box(load(&paths[..1])))
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, deltas);
criterion_main!(benches);
