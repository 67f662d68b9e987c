//! Criterion benches of the TCD sampler's per-step CPU work on an SDXL-sized latent
//! (1 x 4 x 128 x 128): drawing the noise and one scheduler step.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use tcd_ort::rng::TorchGenerator;
use tcd_ort::sampler::tcd::{TcdConfig, TcdScheduler};

const SHAPE: [usize; 4] = [1, 4, 128, 128];

fn randn(c: &mut Criterion) {
    let mut g = TorchGenerator::new(0);
    c.bench_function("randn 1x4x128x128", |b| {
        b.iter(|| black_box(g.randn(black_box(&SHAPE))))
    });
}

fn step(c: &mut Criterion) {
    let mut g = TorchGenerator::new(0);
    let sample = g.randn(&SHAPE);
    let model_output = g.randn(&SHAPE);
    let mut scheduler = match TcdScheduler::new(TcdConfig::sdxl()) {
        Ok(s) => s,
        Err(e) => panic!("scheduler: {e}"),
    };
    for (name, eta) in [
        ("step eta=0 1x4x128x128", 0.0f32),
        ("step eta=0.3 1x4x128x128", 0.3),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                // A fresh 4-step schedule each time keeps the step on the first (noisy) timestep.
                if let Err(e) = scheduler.set_timesteps(Some(4), None, None, 1.0) {
                    panic!("set_timesteps: {e}");
                }
                let t = scheduler.timesteps()[0];
                match scheduler.step(&model_output, t, &sample, eta, &mut g) {
                    Ok(out) => black_box(out),
                    Err(e) => panic!("step: {e}"),
                }
            })
        });
    }
}

criterion_group!(benches, randn, step);
criterion_main!(benches);
