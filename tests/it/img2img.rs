//! Image-to-image and inpainting parity with diffusers on tiny random-weight models: SD1.5-like
//! and SDXL-like image-to-image, and inpainting with 9-channel inpainting UNets and with regular
//! 4-channel UNets (latent blending).
//!
//! The references come from diffusers' `StableDiffusion(XL)Img2ImgPipeline` and
//! `StableDiffusion(XL)InpaintPipeline` with `TCDScheduler`, through
//! `tests/golden/make_img2img.py` (run by `make fixtures`); nothing here is hand-written.
//! As for text-to-image, the final latents are the real check (within 1e-4 of their largest
//! magnitude) and pixels must agree within 2/255.

use std::path::PathBuf;

use serde::Deserialize;
use tcd_ort::image_io::load_image;
use tcd_ort::pipeline::{Engine, EngineOptions, GenerateRequest, InpaintMode, Task};

use crate::common::{check_cases, fixtures_dir, parity_model, read_cases, suite_model};

/// What an image-to-image or inpainting case starts from, beside its request.
#[derive(Debug, Deserialize)]
struct Input {
    /// Relative to [`root`].
    image: String,
    /// Relative to [`root`]; inpainting when present.
    mask: Option<String>,
    /// The pipeline's default when absent ([`default_strength`]).
    strength: Option<f64>,
}

type Case = crate::common::Case<Input>;

fn root() -> PathBuf {
    fixtures_dir().join("img2img")
}

/// The model a family's cases run on: the family's own export when the generator wrote one,
/// else the text-to-image parity export (the same tiny SD1.5/SDXL weights).
fn model_dir(family: &str) -> PathBuf {
    suite_model(&root(), family)
}

/// diffusers' default strength of each pipeline, for cases that leave it out.
fn default_strength(family: &str) -> f64 {
    match family {
        "sd15" => 0.8,
        "sdxl" => 0.3,
        "sd15-inpaint" => 1.0,
        _ => 0.9999,
    }
}

/// The task a case asks for: its image (and mask) read from the fixtures, at its strength.
fn task(case: &Case, family: &str) -> Task {
    let input = &case.extra;
    let image = load_image(&root().join(&input.image)).expect("input image");
    let strength = input.strength.unwrap_or_else(|| default_strength(family));
    match &input.mask {
        Some(mask) => Task::Inpaint {
            image,
            mask: load_image(&root().join(mask)).expect("mask image"),
            strength,
            mode: InpaintMode::Auto,
        },
        None => Task::ImageToImage { image, strength },
    }
}

/// Runs every case of a family and reports all failures at once.
fn check_family(family: &str) {
    let dir = root().join(family);
    let cases: Vec<Case> = read_cases(&dir, "image-to-image");
    assert!(!cases.is_empty());
    let model = model_dir(family);
    let mut engine = Engine::load(model.to_string_lossy(), &EngineOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", model.display()));
    check_cases(family, &cases, &dir.join("reference"), |case, _| {
        engine.run(&case.request(), &task(case, family), &mut |_| true)
    });
}

#[test]
fn sd15_image_to_image_matches_diffusers() {
    check_family("sd15");
}

#[test]
fn sdxl_image_to_image_matches_diffusers() {
    check_family("sdxl");
}

#[test]
fn sd21v_image_to_image_and_inpainting_match_diffusers() {
    check_family("sd21v");
}

#[test]
fn sd15_inpainting_matches_diffusers() {
    check_family("sd15-inpaint");
}

#[test]
fn sdxl_inpainting_matches_diffusers() {
    check_family("sdxl-inpaint");
}

/// A strength that leaves no step is refused with a message that says what to change.
#[test]
fn strength_leaving_no_step_is_refused() {
    let model = parity_model("sd15");
    let mut engine = Engine::load(model.to_string_lossy(), &EngineOptions::default())
        .expect("the exported tiny model loads");
    let request = GenerateRequest {
        prompt: "a cat".into(),
        steps: 2,
        width: Some(64),
        height: Some(64),
        ..GenerateRequest::default()
    };
    let image = tcd_ort::image_io::RgbImage::new(64, 64, vec![128; 64 * 64 * 3]).expect("image");
    let task = Task::ImageToImage {
        image,
        strength: 0.3,
    };
    let err = engine
        .run(&request, &task, &mut |_| true)
        .expect_err("0.3 x 2 steps rounds down to 0");
    assert!(err.to_string().starts_with("strength "), "{err}");
}

/// A 9-channel inpainting UNet cannot blend latents: asking for that is an error naming the fix.
#[test]
fn blending_with_an_inpainting_unet_is_refused() {
    let mut engine = Engine::load(
        model_dir("sd15-inpaint").to_string_lossy(),
        &EngineOptions::default(),
    )
    .expect("the inpainting model loads");
    let image = load_image(&root().join("images").join("scene_64x64.png")).expect("image");
    let mask = load_image(&root().join("images").join("mask_rect_64x64.png")).expect("mask");
    let request = GenerateRequest {
        prompt: "a cat".into(),
        ..GenerateRequest::default()
    };
    let task = Task::Inpaint {
        image,
        mask,
        strength: 1.0,
        mode: InpaintMode::Blend,
    };
    let err = engine
        .run(&request, &task, &mut |_| true)
        .expect_err("blend on a 9-channel UNet");
    assert!(
        err.to_string().contains("inpaint_mode blend") && err.to_string().contains("use unet"),
        "{err}"
    );
}
