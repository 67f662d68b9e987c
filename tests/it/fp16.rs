//! Float16 exports (`python -m export convert --dtype fp16`) against diffusers run in float16.
//!
//! References come from `tests/golden/make_fp16.py` (run by `make fixtures`): the same tiny
//! random-weight pipelines and TCD requests, once with the text encoder(s) and UNet in float16
//! and the VAE in float32 (exactly what the export holds), once all in float32.
//!
//! Exact agreement is not possible: PyTorch runs float16 kernels on the CPU and keeps the
//! latents (and the scheduler's arithmetic) in float16 between steps, while ONNX Runtime's CPU
//! provider casts float16 tensors to float32 around kernels it lacks in float16 and the engine
//! keeps the latents in float32, rounding them only at the graph boundary. diffusers' own
//! float16 and float32 runs of these cases differ by 1.3e-3 to 4.1e-3 of the latents' largest
//! magnitude (printed by the script). Measured on SD1.5-like: the engine's float16 run is within
//! 4.2e-3 of diffusers' float16 run and 5.3e-4 of its float32 run (closer to float32, since its
//! latents and most of ONNX Runtime's CPU arithmetic are float32), pixels within 1/255.
//! The bound, 2e-2 of the largest magnitude against either reference, leaves room for
//! platform-dependent rounding while a real bug fails it by orders of magnitude: float16 bits
//! read as anything else, values fed unconverted or a graph input left out give differences of
//! order one or NaNs.

use std::path::PathBuf;

use ndarray::ArrayD;
use tcd_ort::image_io::read_npy;
use tcd_ort::pipeline::{Engine, EngineOptions, LoraSpec};

use crate::common::{fixtures_dir, max_pixel_diff, read_cases, read_png_rgb, Case};

/// Largest latent difference against a reference, relative to its largest magnitude.
const LATENT_TOL: f32 = 2e-2;
/// Largest per-channel pixel difference against the float16 reference's image.
const PIXEL_TOL: u8 = 2;

fn family_dir(family: &str) -> PathBuf {
    fixtures_dir().join("fp16").join(family)
}

/// [`crate::common::relative_diff`], but NaN when `a` holds a NaN or an infinity, which the
/// maximum would pass over.
fn relative_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    let diff = crate::common::relative_diff(a, b);
    if a.iter().any(|v| !v.is_finite()) {
        return f32::NAN;
    }
    diff
}

fn cases(family: &str) -> Vec<Case> {
    read_cases(&family_dir(family), "fp16")
}

fn load(family: &str, options: &EngineOptions) -> Engine {
    let onnx = family_dir(family).join("onnx");
    Engine::load(onnx.to_string_lossy(), options).expect("the float16 export loads")
}

/// The manifest says what the graphs are: float16 text encoders and UNet with float16 float
/// inputs/outputs (but a float32 timestep), a float32 VAE.
fn check_manifest(engine: &Engine, family: &str) {
    let manifest = engine.model().manifest().expect("tcd_ort.json");
    assert_eq!(manifest.dtype.as_deref(), Some("float16"));
    let mut encoders = vec!["text_encoder"];
    if family == "sdxl" {
        encoders.push("text_encoder_2");
    }
    for name in encoders.iter().chain(&["unet"]) {
        let c = &manifest.components[*name];
        assert_eq!(c.weights_dtype.as_deref(), Some("float16"), "{name}");
        for (io, t) in c.outputs.iter() {
            assert_eq!(t.dtype, "float16", "{name} output {io}");
        }
    }
    let unet = &manifest.components["unet"];
    assert_eq!(unet.inputs["sample"].dtype, "float16");
    assert_eq!(unet.inputs["timestep"].dtype, "float32");
    assert_eq!(
        unet.inputs["mid_block_additional_residual"].dtype,
        "float16"
    );
    assert_eq!(
        manifest.components["text_encoder"].inputs["input_ids"].dtype,
        "int32"
    );
    for name in ["vae_decoder", "vae_encoder"] {
        assert_eq!(
            manifest.components[name].weights_dtype.as_deref(),
            Some("float32"),
            "{name}"
        );
    }
}

fn check_family(family: &str) {
    let dir = family_dir(family);
    let cases = cases(family);
    assert!(!cases.is_empty());
    let mut engine = load(family, &EngineOptions::default());
    check_manifest(&engine, family);
    let (mut worst16, mut worst32, mut worst_pixel) = (0f32, 0f32, 0u8);
    let mut failures = Vec::new();
    for case in &cases {
        let out = engine
            .generate(&case.request(), &mut |_| true)
            .unwrap_or_else(|e| panic!("{family}/{}: {e}", case.name));
        let npy = format!("{}.npy", case.name);
        let ref16 = read_npy(&dir.join("reference").join(&npy)).expect("float16 reference");
        let ref32 = read_npy(&dir.join("reference_fp32").join(&npy)).expect("float32 reference");
        let d16 = relative_diff(&out.latents, &ref16);
        let d32 = relative_diff(&out.latents, &ref32);
        let dref = relative_diff(&ref16, &ref32);
        eprintln!(
            "{family}/{}: engine fp16 vs diffusers fp16 {d16:.3e}, vs diffusers fp32 {d32:.3e} \
             (diffusers fp16 vs fp32 {dref:.3e})",
            case.name
        );
        worst16 = worst16.max(d16);
        worst32 = worst32.max(d32);
        if d16.is_nan() || d16 > LATENT_TOL || d32.is_nan() || d32 > LATENT_TOL {
            failures.push(format!("{}: latents {d16:e} / {d32:e} of max", case.name));
        }
        let (w, h, pixels) =
            read_png_rgb(&dir.join("reference").join(format!("{}.png", case.name)));
        let image = &out.images[0];
        assert_eq!((w, h), (image.width, image.height), "{}", case.name);
        let max = max_pixel_diff(&pixels, &image.pixels);
        worst_pixel = worst_pixel.max(max);
        if max > PIXEL_TOL {
            failures.push(format!("{}: pixels differ by {max}/255", case.name));
        }
    }
    eprintln!(
        "{family} fp16: worst latent diff {worst16:.3e} (vs fp16 reference), {worst32:.3e} (vs \
         fp32 reference), worst pixel diff {worst_pixel}/255"
    );
    assert!(
        failures.is_empty(),
        "{family} fp16 differs from diffusers:\n{}",
        failures.join("\n")
    );
}

#[test]
fn fp16_sd15_matches_diffusers_fp16() {
    check_family("sd15");
}

#[test]
fn fp16_sdxl_matches_diffusers_fp16() {
    check_family("sdxl");
}

/// Load-time LoRA on float16 weights: the replacements are written as float16 (ONNX Runtime
/// rejects or ignores others), and the result follows diffusers' float32 run with the same
/// adapter (`tests/golden/make_lora.py`, same tiny SD1.5 pipeline) as closely as the plain
/// float16 export follows the float32 one, while the adapter moves the latents much further.
#[test]
fn fp16_sd15_applies_loras_at_load_time() {
    let lora_dir = fixtures_dir().join("lora").join("sd15");
    let case = Case {
        name: "single_g0.0".into(),
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        negative_prompt: None,
        steps: 4,
        eta: 0.3,
        guidance: 0.0,
        seed: 1238,
        width: 64,
        height: 64,
        num_images: 1,
        extra: (),
    };
    let reference = read_npy(&lora_dir.join("reference").join("single_g0.0.npy"))
        .expect("LoRA reference; run `make fixtures`");
    let options = EngineOptions {
        loras: vec![LoraSpec {
            source: lora_dir
                .join("diffusers.safetensors")
                .to_string_lossy()
                .into_owned(),
            weight: 1.0,
            weight_name: None,
        }],
        ..EngineOptions::default()
    };
    let mut engine = load("sd15", &options);
    assert!(engine.lora_report().patched.values().sum::<usize>() > 0);
    let with = engine
        .generate(&case.request(), &mut |_| true)
        .expect("runs");
    let without = load("sd15", &EngineOptions::default())
        .generate(&case.request(), &mut |_| true)
        .expect("runs");
    let d = relative_diff(&with.latents, &reference);
    let moved = relative_diff(&without.latents, &reference);
    eprintln!("sd15 fp16 + LoRA vs diffusers fp32 + LoRA: {d:.3e}; without the LoRA: {moved:.3e}");
    assert!(d <= LATENT_TOL, "{d:e}");
    assert!(
        moved > 5.0 * LATENT_TOL,
        "the LoRA barely moves the latents: {moved:e}"
    );
}
