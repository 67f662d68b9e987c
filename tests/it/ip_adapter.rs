//! IP-Adapter parity with diffusers on tiny random-weight models: plain and plus adapters on
//! SD1.5-like and SDXL-like pipelines, scales 0, 0.5 and 1, guidance 0 and 3 (with a negative
//! prompt and several images per prompt), with a TCD-style LoRA, image-to-image, inpainting and
//! (SD1.5) a ControlNet; reference images of odd sizes and aspect ratios, so CLIP's resize and
//! centre crop matter.
//!
//! The references come from diffusers' pipelines after `load_ip_adapter` +
//! `set_ip_adapter_scale` with `TCDScheduler`, through `tests/golden/make_ip_adapter.py` (run by
//! `make fixtures`); nothing here is hand-written. Final latents must agree within 1e-4 of their
//! largest magnitude, pixels within 2/255. One engine per adapter and LoRA set runs every scale:
//! the scale is a request field, changed between generations without reloading.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tcd_ort::image_io::load_image;
use tcd_ort::pipeline::{
    ControlImage, Engine, EngineOptions, Field, GenerateRequest, InpaintMode, IpAdapterImage,
    LoraSpec, Task,
};
use tcd_ort::Error;

use crate::common::{check_cases, copy_dir, fixtures_dir, read_cases, scratch_dir, LoraRef};

#[derive(Debug, Deserialize)]
struct Adapter {
    /// The export, relative to the family's directory.
    onnx: String,
}

#[derive(Debug, Deserialize)]
struct Net {
    onnx: String,
    scale: f32,
}

/// An IP-Adapter case's inputs, beside its request.
#[derive(Debug, Deserialize)]
struct Extra {
    ip_adapter: Adapter,
    /// Relative to [`root`].
    ip_adapter_image: String,
    ip_adapter_scale: f32,
    #[serde(default)]
    loras: Vec<LoraRef>,
    /// Image-to-image and inpainting inputs, relative to [`root`].
    image: Option<String>,
    mask: Option<String>,
    strength: Option<f64>,
    #[serde(default)]
    controlnets: Vec<Net>,
    #[serde(default)]
    control_images: Vec<String>,
}

type Case = crate::common::Case<Extra>;

fn root() -> PathBuf {
    fixtures_dir().join("ip_adapter")
}

fn model_dir(family: &str) -> PathBuf {
    root().join(family).join("onnx")
}

/// What an engine loads for a case: the adapter, the LoRAs and the ControlNets.
fn engine_options(case: &Case, dir: &Path) -> EngineOptions {
    let c = &case.extra;
    let path = |p: &str| dir.join(p).to_string_lossy().into_owned();
    EngineOptions {
        ip_adapter: Some(path(&c.ip_adapter.onnx)),
        loras: c
            .loras
            .iter()
            .map(|l| LoraSpec {
                source: path(&l.file),
                weight: l.weight,
                weight_name: None,
            })
            .collect(),
        controlnets: c.controlnets.iter().map(|n| path(&n.onnx)).collect(),
        ..EngineOptions::default()
    }
}

fn load(family: &str, options: &EngineOptions) -> Engine {
    let model = model_dir(family);
    Engine::load(model.to_string_lossy(), options)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", model.display()))
}

fn reference_image(name: &str) -> IpAdapterImage {
    IpAdapterImage::new(load_image(&root().join(name)).expect("reference image"))
}

fn request_and_task(case: &Case) -> (GenerateRequest, Task) {
    let c = &case.extra;
    let read = |p: &String| load_image(&root().join(p)).expect("input image");
    let control = c
        .controlnets
        .iter()
        .zip(&c.control_images)
        .map(|(net, image)| ControlImage {
            scale: net.scale,
            ..ControlImage::new(read(image))
        })
        .collect();
    let request = GenerateRequest {
        ip_adapter: Some(IpAdapterImage {
            scale: c.ip_adapter_scale,
            ..reference_image(&c.ip_adapter_image)
        }),
        control,
        ..case.request()
    };
    let task = match (&c.image, &c.mask) {
        (None, _) => Task::TextToImage,
        (Some(image), None) => Task::ImageToImage {
            image: read(image),
            strength: c
                .strength
                .expect("an image-to-image case gives its strength"),
        },
        (Some(image), Some(mask)) => Task::Inpaint {
            image: read(image),
            mask: read(mask),
            strength: c.strength.unwrap_or(1.0),
            mode: InpaintMode::Auto,
        },
    };
    (request, task)
}

/// Runs every case of a family (one engine per adapter, LoRA set and ControlNet set) and
/// reports all failures at once.
fn check_family(family: &str) {
    let dir = root().join(family);
    let cases: Vec<Case> = read_cases(&dir, "IP-Adapter");
    assert!(cases
        .iter()
        .any(|c| c.extra.ip_adapter.onnx.contains("plus")));
    assert!(cases.iter().any(|c| c.extra.ip_adapter_scale == 0.0));
    let mut engines: HashMap<String, Engine> = HashMap::new();
    check_cases(
        &format!("{family} IP-Adapter"),
        &cases,
        &dir.join("reference"),
        |case, _| {
            let options = engine_options(case, &dir);
            let key = format!(
                "{:?} {:?} {:?}",
                options.ip_adapter,
                options.loras.iter().map(|l| &l.source).collect::<Vec<_>>(),
                options.controlnets
            );
            let engine = engines.entry(key).or_insert_with(|| load(family, &options));
            let (request, task) = request_and_task(case);
            engine.run(&request, &task, &mut |_| true)
        },
    );
    // Scales 0, 0.5 and 1 ran on the same engines.
    assert!(engines.len() < cases.len());
}

#[test]
fn sd15_ip_adapter_matches_diffusers() {
    check_family("sd15");
}

#[test]
fn sdxl_ip_adapter_matches_diffusers() {
    check_family("sdxl");
}

/// The LoRA case on the rank-8 LoRA-slot export of the same pipeline
/// (`tests/golden/make_lora_slots.py`): the LoRA goes into the UNet's slots, the adapter into
/// its IP branch, and the result is diffusers' (unfused LoRA + IP-Adapter) all the same.
fn check_with_lora_slots(family: &str) {
    let dir = root().join(family);
    let cases: Vec<Case> = read_cases(&dir, "IP-Adapter")
        .into_iter()
        .filter(|c: &Case| !c.extra.loras.is_empty())
        .collect();
    assert!(!cases.is_empty(), "a LoRA case");
    let slots = fixtures_dir()
        .join("lora_slots")
        .join(family)
        .join("slots_r8");
    check_cases(
        &format!("{family} IP-Adapter with LoRA slots"),
        &cases,
        &dir.join("reference"),
        |case, report| {
            let options = engine_options(case, &dir);
            let mut engine = Engine::load(slots.to_string_lossy(), &options)
                .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", slots.display()));
            if engine
                .lora_report()
                .slotted
                .get("unet")
                .copied()
                .unwrap_or(0)
                == 0
            {
                report.fail(format!("{}: no UNet module went into a slot", case.name));
            }
            let (request, task) = request_and_task(case);
            engine.run(&request, &task, &mut |_| true)
        },
    );
}

#[test]
fn sd15_ip_adapter_with_lora_slots_matches_diffusers() {
    check_with_lora_slots("sd15");
}

#[test]
fn sdxl_ip_adapter_with_lora_slots_matches_diffusers() {
    check_with_lora_slots("sdxl");
}

fn adapter(family: &str, variant: &str) -> PathBuf {
    root()
        .join(family)
        .join(format!("ip_{variant}"))
        .join("onnx")
}

fn small_request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a red house".into(),
        steps: 2,
        width: Some(64),
        height: Some(64),
        ..GenerateRequest::default()
    }
}

/// Scale 0 adds nothing: the same latents, bit for bit, as the same engine without a reference
/// image and as an engine without an adapter.
#[test]
fn scale_zero_is_the_plain_unet() {
    let options = EngineOptions {
        ip_adapter: Some(adapter("sd15", "plain").to_string_lossy().into_owned()),
        ..EngineOptions::default()
    };
    let mut engine = load("sd15", &options);
    let with_zero = GenerateRequest {
        ip_adapter: Some(IpAdapterImage {
            scale: 0.0,
            ..reference_image("images/ref_scene_100x70.png")
        }),
        ..small_request()
    };
    let a = engine.generate(&with_zero, &mut |_| true).expect("scale 0");
    let b = engine
        .generate(&small_request(), &mut |_| true)
        .expect("no image");
    let mut plain = load("sd15", &EngineOptions::default());
    let c = plain
        .generate(&small_request(), &mut |_| true)
        .expect("plain");
    assert_eq!(a.latents, b.latents);
    assert_eq!(b.latents, c.latents);
    let full = GenerateRequest {
        ip_adapter: Some(reference_image("images/ref_scene_100x70.png")),
        ..small_request()
    };
    let d = engine.generate(&full, &mut |_| true).expect("scale 1");
    assert_ne!(a.latents, d.latents, "the adapter must move the latents");
}

fn load_error(family: &str, adapter: &Path) -> String {
    let options = EngineOptions {
        ip_adapter: Some(adapter.to_string_lossy().into_owned()),
        ..EngineOptions::default()
    };
    match Engine::load(model_dir(family).to_string_lossy(), &options) {
        Ok(_) => panic!("{} loaded on {family}", adapter.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_adapter_for_another_base_is_refused_at_load() {
    let message = load_error("sdxl", &adapter("sd15", "plain"));
    assert!(message.contains("was made for a UNet with"), "{message}");
    assert!(message.contains("this model's UNet has"), "{message}");
}

#[test]
fn a_missing_image_encoder_is_refused_at_load() {
    let dir = scratch_dir("ip-adapter-no-encoder");
    copy_dir(&adapter("sd15", "plus"), &dir);
    std::fs::remove_file(dir.join("image_encoder").join("model.onnx")).expect("rm");
    let message = load_error("sd15", &dir);
    assert!(message.contains("image encoder is missing"), "{message}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reference_image_without_an_adapter_is_refused() {
    let mut engine = load("sd15", &EngineOptions::default());
    let request = GenerateRequest {
        ip_adapter: Some(reference_image("images/ref_scene_100x70.png")),
        ..small_request()
    };
    match engine.generate(&request, &mut |_| true) {
        Err(Error::InvalidField { field, message }) => {
            assert_eq!(field, Field::IpAdapterImage);
            assert!(message.contains("no IP-Adapter"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn scales_that_are_not_numbers_from_0_to_10_are_refused() {
    for scale in [f32::NAN, f32::INFINITY, -0.5, 10.5] {
        let request = GenerateRequest {
            ip_adapter: Some(IpAdapterImage {
                scale,
                ..reference_image("images/ref_scene_100x70.png")
            }),
            ..small_request()
        };
        match request.validate() {
            Err(Error::InvalidField { field, .. }) => assert_eq!(field, Field::IpAdapterScale),
            other => panic!("scale {scale}: expected a refusal, got {other:?}"),
        }
    }
}

/// The C ABI: the same pixels as the Rust API for a request with a reference image, a scale
/// changed between generations of one engine, and bad scales refused when set.
#[test]
fn c_abi_matches_the_rust_api() {
    use std::ffi::CString;
    use std::ptr::null_mut;
    use tcd_ort::ffi::*;

    use crate::ffi::check;

    let model = model_dir("sd15").to_string_lossy().into_owned();
    let ip = adapter("sd15", "plus").to_string_lossy().into_owned();
    let reference = reference_image("images/ref_pattern_53x91.png").image;
    let rgba: Vec<u8> = reference
        .pixels
        .chunks(3)
        .flat_map(|p| [p[0], p[1], p[2], 255])
        .collect();
    let (model_c, ip_c) = (
        CString::new(model.clone()).expect("no NUL"),
        CString::new(ip.clone()).expect("no NUL"),
    );
    let mut c_images = Vec::new();
    // SAFETY: live handles, NUL-terminated strings, an RGBA buffer of width * height * 4 bytes.
    unsafe {
        let options = tcd_engine_options_new();
        check(
            tcd_engine_options_set_model(options, model_c.as_ptr()),
            tcd_status::TCD_OK,
        );
        check(
            tcd_engine_options_set_ip_adapter(options, ip_c.as_ptr()),
            tcd_status::TCD_OK,
        );
        let mut engine = null_mut();
        check(tcd_engine_new(options, &mut engine), tcd_status::TCD_OK);
        tcd_engine_options_free(options);
        let request = tcd_request_new();
        check(
            tcd_request_set_prompt(request, c"a red house".as_ptr()),
            tcd_status::TCD_OK,
        );
        check(tcd_request_set_steps(request, 2), tcd_status::TCD_OK);
        check(tcd_request_set_guidance(request, 2.0), tcd_status::TCD_OK);
        let (w, h) = (reference.width, reference.height);
        check(
            tcd_request_set_ip_adapter_image(request, rgba.as_ptr(), w, h, w as usize * 4),
            tcd_status::TCD_OK,
        );
        for bad in [f32::NAN, -1.0, 11.0] {
            check(
                tcd_request_set_ip_adapter_scale(request, bad),
                tcd_status::TCD_ERR_INVALID_ARGUMENT,
            );
        }
        for scale in [0.5, 1.0] {
            check(
                tcd_request_set_ip_adapter_scale(request, scale),
                tcd_status::TCD_OK,
            );
            let mut result = null_mut();
            check(
                tcd_engine_generate(engine, request, None, null_mut(), &mut result),
                tcd_status::TCD_OK,
            );
            let (mut iw, mut ih, mut stride, mut pixels) = (0u32, 0u32, 0usize, std::ptr::null());
            check(
                tcd_result_image(result, 0, &mut iw, &mut ih, &mut stride, &mut pixels),
                tcd_status::TCD_OK,
            );
            c_images.push(std::slice::from_raw_parts(pixels, stride * ih as usize).to_vec());
            tcd_result_free(result);
        }
        check(
            tcd_request_clear_ip_adapter_image(request),
            tcd_status::TCD_OK,
        );
        tcd_request_free(request);
        tcd_engine_free(engine);
    }
    let mut rust = load(
        "sd15",
        &EngineOptions {
            ip_adapter: Some(ip),
            ..EngineOptions::default()
        },
    );
    for (scale, c_pixels) in [0.5, 1.0].into_iter().zip(&c_images) {
        let request = GenerateRequest {
            prompt: "a red house".into(),
            steps: 2,
            guidance: 2.0,
            ip_adapter: Some(IpAdapterImage {
                scale,
                ..reference_image("images/ref_pattern_53x91.png")
            }),
            ..GenerateRequest::default()
        };
        let out = rust.generate(&request, &mut |_| true).expect("generate");
        assert_eq!(&out.images[0].pixels, c_pixels, "scale {scale}");
    }
    assert_ne!(c_images[0], c_images[1]);
}

/// An engine with fixed UNet shapes cannot take an IP-Adapter (its image tokens are UNet
/// inputs): refused before anything loads.
#[test]
fn an_ip_adapter_with_fixed_shapes_is_refused() {
    let options = EngineOptions {
        ip_adapter: Some(adapter("sd15", "plain").to_string_lossy().into_owned()),
        fixed_shape: Some(tcd_ort::runtime::ShapeDims {
            width: 64,
            height: 64,
            batch: 1,
        }),
        ..EngineOptions::default()
    };
    let message = options.validate().expect_err("refused").to_string();
    assert!(message.contains("without a fixed shape"), "{message}");
}
