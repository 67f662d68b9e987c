//! Issue #7/#8: `EngineOptions::fixed_shape` (`--fixed-shape`) builds the UNet and ControlNet
//! sessions with ONNX Runtime's free-dimension overrides for one size and batch, so the graphs'
//! shape arithmetic folds away. The maths is unchanged: the latents must match the dynamic
//! engine's to float rounding, and a request of another size or batch is refused, not run.

use tcd_ort::image_io::load_image;
use tcd_ort::pipeline::{ControlImage, Engine, EngineOptions, GenerateRequest};
use tcd_ort::runtime::ShapeDims;

use crate::common::repo_root;

fn engine(fixed_shape: Option<ShapeDims>, controlnet: bool) -> Engine {
    let root = repo_root().join("models");
    let options = EngineOptions {
        intra_threads: Some(1),
        fixed_shape,
        controlnets: if controlnet {
            vec![root
                .join("tiny-sd15-controlnet")
                .to_string_lossy()
                .into_owned()]
        } else {
            Vec::new()
        },
        ..EngineOptions::default()
    };
    Engine::load(root.join("tiny-sd15").to_string_lossy(), &options)
        .expect("the committed tiny model loads")
}

fn request(guidance: f32) -> GenerateRequest {
    GenerateRequest {
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        steps: 2,
        eta: 0.3,
        guidance,
        seed: 3,
        ..GenerateRequest::default()
    }
}

#[test]
fn a_fixed_shape_unet_gives_the_dynamic_latents_and_refuses_other_sizes() {
    let mut dynamic = engine(None, false);
    // The size a request without width/height gets: the UNet's sample size in pixels.
    let size =
        dynamic.model().unet.sample_size.expect("sample_size") * dynamic.model().vae.scale_factor();
    let fixed_dims = ShapeDims {
        width: size,
        height: size,
        batch: 2,
    };
    let mut fixed = engine(Some(fixed_dims), false);
    // Guidance 2 doubles the batch to the fixed 2.
    let want = dynamic
        .generate(&request(2.0), &mut |_| true)
        .expect("runs");
    let got = fixed.generate(&request(2.0), &mut |_| true).expect("runs");
    assert_eq!(got.latents.shape(), want.latents.shape());
    let scale = want.latents.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .latents
        .iter()
        .zip(want.latents.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-5 * scale, "max diff {worst} of {scale}");

    // Guidance 0 runs the UNet at batch 1, which the fixed session was not built for.
    let err = fixed
        .generate(&request(0.0), &mut |_| true)
        .expect_err("batch 1 on a batch-2 UNet");
    let msg = err.to_string();
    assert!(
        msg.contains("--fixed-shape") && msg.contains("batch 2"),
        "{msg}"
    );
    let other_size = GenerateRequest {
        width: Some(size + 64),
        height: Some(size),
        ..request(2.0)
    };
    let err = fixed
        .generate(&other_size, &mut |_| true)
        .expect_err("another size");
    assert!(err.to_string().contains("--fixed-shape"), "{err}");
}

#[test]
fn a_fixed_shape_controlnet_engine_runs() {
    let mut fixed = engine(
        Some(ShapeDims {
            width: 64,
            height: 64,
            batch: 1,
        }),
        true,
    );
    let control = load_image(&repo_root().join("models/control-edges-64x64.png"))
        .expect("the committed control image");
    let mut request = GenerateRequest {
        width: Some(64),
        height: Some(64),
        ..request(0.0)
    };
    request.control = vec![ControlImage {
        scale: 0.5,
        ..ControlImage::new(control)
    }];
    let out = fixed.generate(&request, &mut |_| true).expect("runs");
    let factor = fixed.model().vae.scale_factor();
    assert_eq!(out.latents.shape(), &[1, 4, 64 / factor, 64 / factor]);
    assert!(out.latents.iter().all(|v| v.is_finite()));
}
