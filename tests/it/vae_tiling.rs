//! VAE tiling (issue #23): `GenerateRequest::vae_tiling` must decode and encode exactly as
//! diffusers' `pipe.vae.enable_tiling()` (tiles of the VAE's `sample_size`, a quarter overlap,
//! linear blends). References from `tests/golden/make_vae_tiling.py` on the tiny SD1.5 parity
//! pipeline (sample size 64, so images past 64 px are tiled): text-to-image square and
//! non-square with two images (partial edge tiles), image-to-image (tiled encode too), and a
//! 64x64 case that must not tile. Tiling moves the decoded values by up to 0.16 here, so the
//! pixel check (2/255) tells a tiled decode from an untiled one.

use std::path::PathBuf;

use serde::Deserialize;
use tcd_ort::image_io::load_image;
use tcd_ort::pipeline::{Engine, EngineOptions, GenerateRequest, Task};

use crate::common::{check_cases, fixtures_dir, read_cases, suite_model};

#[derive(Debug, Deserialize)]
struct Tiling {
    image: Option<String>,
    strength: Option<f64>,
    decode_tiled: bool,
}

type Case = crate::common::Case<Tiling>;

fn root() -> PathBuf {
    fixtures_dir().join("vae_tiling")
}

fn task(case: &Case) -> Task {
    match &case.extra.image {
        Some(image) => Task::ImageToImage {
            image: load_image(&root().join(image)).expect("input image"),
            strength: case.extra.strength.unwrap_or(0.8),
        },
        None => Task::TextToImage,
    }
}

fn tiled(case: &Case) -> GenerateRequest {
    GenerateRequest {
        vae_tiling: true,
        ..case.request()
    }
}

#[test]
fn vae_tiling_matches_diffusers_enable_tiling() {
    let dir = root().join("sd15");
    let cases: Vec<Case> = read_cases(&dir, "VAE tiling");
    assert!(
        cases.iter().any(|c| c.extra.image.is_some()),
        "an encode case"
    );
    assert!(
        cases.iter().any(|c| !c.extra.decode_tiled),
        "an untiled size"
    );
    let model = suite_model(&root(), "sd15");
    let mut engine = Engine::load(model.to_string_lossy(), &EngineOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", model.display()));
    check_cases(
        "VAE tiling",
        &cases,
        &dir.join("reference"),
        |case, report| {
            let out = engine.run(&tiled(case), &task(case), &mut |_| true)?;
            // The same request untiled: different pixels exactly where diffusers tiles.
            let plain = engine.run(&case.request(), &task(case), &mut |_| true)?;
            let differs = out.images != plain.images;
            if differs != case.extra.decode_tiled {
                report.fail(format!(
                    "{}: tiling {} the pixels, diffusers {} this size",
                    case.name,
                    if differs { "changed" } else { "did not change" },
                    if case.extra.decode_tiled {
                        "tiles"
                    } else {
                        "does not tile"
                    }
                ));
            }
            Ok(out)
        },
    );
}

/// A tiny autoencoder has no tiling here: a clear refusal naming the field.
#[test]
fn vae_tiling_with_a_tiny_vae_is_refused() {
    let tiny = fixtures_dir().join("vae_tiny").join("onnx");
    let model = suite_model(&root(), "sd15");
    let mut engine = Engine::load(
        model.to_string_lossy(),
        &EngineOptions {
            tiny_vae: Some(tiny.to_string_lossy().into_owned()),
            ..EngineOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", tiny.display()));
    let request = GenerateRequest {
        prompt: "a cat".into(),
        vae_tiling: true,
        ..GenerateRequest::default()
    };
    let err = engine
        .generate(&request, &mut |_| true)
        .expect_err("refused");
    assert!(err.to_string().starts_with("vae_tiling "), "{err}");
}

/// With ONNX Runtime's CPU arena on (as `tcd-ort run` has it), each tile hands the arena's
/// memory back after its run: same pixels as without the arena.
#[test]
fn vae_tiling_with_the_cpu_arena_gives_the_same_pixels() {
    use tcd_ort::runtime::ProviderOptions;

    let dir = root().join("sd15");
    let cases: Vec<Case> = read_cases(&dir, "VAE tiling");
    let case = cases
        .iter()
        .find(|c| c.extra.image.is_some())
        .expect("an image-to-image case (tiled encode and decode)");
    let model = suite_model(&root(), "sd15");
    let run = |cpu_arena: bool| {
        let options = EngineOptions {
            provider_options: ProviderOptions {
                cpu_arena: Some(cpu_arena),
                ..ProviderOptions::default()
            },
            ..EngineOptions::default()
        };
        let mut engine = Engine::load(model.to_string_lossy(), &options).expect("load");
        engine
            .run(&tiled(case), &task(case), &mut |_| true)
            .expect("tiled run")
    };
    let (with, without) = (run(true), run(false));
    assert_eq!(with.images, without.images);
    assert_eq!(with.latents, without.latents);
}
