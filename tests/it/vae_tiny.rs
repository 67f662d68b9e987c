//! The tiny autoencoder (issue #23, `EngineOptions::tiny_vae`): diffusers' `AutoencoderTiny`
//! exported with `python -m export vae-tiny`, decoding and encoding in place of the model's
//! VAE, must give what diffusers gives with `pipe.vae = AutoencoderTiny(...)`: text-to-image,
//! image-to-image and inpainting with a 4-channel UNet (its encoder draws no noise, so the
//! generator's first draw is the latents' noise). References from
//! `tests/golden/make_vae_tiny.py` on the tiny SD1.5 parity pipeline with a random-weight
//! AutoencoderTiny of the same latent shape.

use std::path::PathBuf;

use serde::Deserialize;
use tcd_ort::image_io::load_image;
use tcd_ort::pipeline::{Engine, EngineOptions, InpaintMode, Task};

use crate::common::{check_cases, fixtures_dir, parity_model, read_cases, suite_model};

#[derive(Debug, Deserialize)]
struct Input {
    image: Option<String>,
    mask: Option<String>,
    strength: Option<f64>,
}

type Case = crate::common::Case<Input>;

fn root() -> PathBuf {
    fixtures_dir().join("vae_tiny")
}

fn options() -> EngineOptions {
    EngineOptions {
        tiny_vae: Some(root().join("onnx").to_string_lossy().into_owned()),
        ..EngineOptions::default()
    }
}

fn task(case: &Case) -> Task {
    let load = |p: &String| load_image(&root().join(p)).expect("fixture image");
    match (&case.extra.image, &case.extra.mask) {
        (Some(image), Some(mask)) => Task::Inpaint {
            image: load(image),
            mask: load(mask),
            strength: case.extra.strength.unwrap_or(1.0),
            mode: InpaintMode::Auto,
        },
        (Some(image), None) => Task::ImageToImage {
            image: load(image),
            strength: case.extra.strength.unwrap_or(0.8),
        },
        _ => Task::TextToImage,
    }
}

#[test]
fn tiny_vae_matches_diffusers_autoencoder_tiny() {
    let dir = root().join("sd15");
    let cases: Vec<Case> = read_cases(&dir, "tiny VAE");
    assert!(
        cases.iter().any(|c| c.extra.mask.is_some()),
        "an inpainting case"
    );
    let model = suite_model(&root(), "sd15");
    let mut engine = Engine::load(model.to_string_lossy(), &options())
        .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", model.display()));
    assert!(
        engine
            .notes()
            .iter()
            .any(|n| n.contains("tiny autoencoder")),
        "{:?}",
        engine.notes()
    );
    check_cases("tiny VAE", &cases, &dir.join("reference"), |case, _| {
        engine.run(&case.request(), &task(case), &mut |_| true)
    });
}

/// What does not fit is refused at load with one line: the model's own directory (not a
/// tiny VAE export), a missing directory.
#[test]
fn a_tiny_vae_that_does_not_fit_is_refused() {
    let model = parity_model("sd15");
    for (source, needle) in [
        (model.to_string_lossy().into_owned(), "not a tiny VAE"),
        ("/nonexistent/taesd".to_string(), "no such tiny VAE"),
    ] {
        let err = Engine::load(
            model.to_string_lossy(),
            &EngineOptions {
                tiny_vae: Some(source.clone()),
                ..EngineOptions::default()
            },
        )
        .expect_err(&source);
        assert!(err.to_string().contains(needle), "{source}: {err}");
    }
}
