//! ControlNet parity with diffusers on tiny random-weight models: SD1.5-like and SDXL-like
//! pipelines with one and two ControlNets (`ControlNetModel.from_unet`, zero convolutions
//! re-initialised so the residuals matter), scales 0.5 and 1, guidance 0 and 2, guidance
//! windows, Canny preprocessing and control images of another size than the output.
//!
//! The references come from diffusers' `StableDiffusionControlNetPipeline` and
//! `StableDiffusionXLControlNetPipeline` with `TCDScheduler`, through
//! `tests/golden/make_controlnet.py` (run by `make fixtures`); nothing here is hand-written.
//! Final latents must agree within 1e-4 of their largest magnitude, pixels within 2/255.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tcd_ort::image_io::load_image;
use tcd_ort::pipeline::{
    ControlImage, ControlPreprocess, Engine, EngineOptions, GenerateRequest, Task,
};

use crate::common::{check_cases, fixtures_dir, read_cases, read_png_rgb, suite_model};

#[derive(Debug, Deserialize)]
struct Net {
    onnx: String,
    scale: f32,
}

/// A ControlNet case's nets and control inputs, beside its request.
#[derive(Debug, Deserialize)]
struct Control {
    controlnets: Vec<Net>,
    control_images: Vec<String>,
    control_start: Option<Vec<f32>>,
    control_end: Option<Vec<f32>>,
    control_preprocess: Option<String>,
    canny_low: Option<f32>,
    canny_high: Option<f32>,
}

type Case = crate::common::Case<Control>;

fn root() -> PathBuf {
    fixtures_dir().join("controlnet")
}

fn model_dir(family: &str) -> PathBuf {
    suite_model(&root(), family)
}

fn load_engine(family: &str, nets: &[PathBuf]) -> Engine {
    let options = EngineOptions {
        controlnets: nets
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
        ..EngineOptions::default()
    };
    let model = model_dir(family);
    Engine::load(model.to_string_lossy(), &options)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", model.display()))
}

fn request(case: &Case, base: &Path) -> GenerateRequest {
    let c = &case.extra;
    let preprocess = match c.control_preprocess.as_deref() {
        None | Some("none") => ControlPreprocess::None,
        Some("canny") => ControlPreprocess::Canny {
            low: c.canny_low.unwrap_or(100.0),
            high: c.canny_high.unwrap_or(200.0),
        },
        Some(other) => panic!("{}: unknown control_preprocess {other}", case.name),
    };
    let control = c
        .controlnets
        .iter()
        .zip(&c.control_images)
        .enumerate()
        .map(|(k, (net, image))| ControlImage {
            image: load_image(&base.join(image)).expect("control image"),
            scale: net.scale,
            start: c.control_start.as_ref().map_or(0.0, |s| s[k]),
            end: c.control_end.as_ref().map_or(1.0, |e| e[k]),
            preprocess,
        })
        .collect();
    GenerateRequest {
        control,
        ..case.request()
    }
}

fn cases(family: &str) -> Vec<Case> {
    read_cases(&root().join(family), "ControlNet")
}

/// The reference saved its cv2.Canny edge images: ours must be the same bytes (before the
/// resize to the output size, which the latents cover). Returns how many were compared.
fn check_canny_edges(case: &Case, dir: &Path) -> usize {
    let c = &case.extra;
    if !matches!(c.control_preprocess.as_deref(), Some("canny")) {
        return 0;
    }
    for (k, path) in c.control_images.iter().enumerate() {
        let photo = load_image(&root().join(path)).expect("photo");
        let ours = tcd_ort::control::canny(
            &photo,
            c.canny_low.unwrap_or(100.0),
            c.canny_high.unwrap_or(200.0),
        )
        .expect("canny");
        let reference = dir
            .join("reference")
            .join(format!("{}_control_{k}.png", case.name));
        let (w, h, pixels) = read_png_rgb(&reference);
        assert_eq!((w, h), (ours.width, ours.height), "{}", case.name);
        assert!(pixels == ours.pixels, "{}: Canny edges differ", case.name);
    }
    c.control_images.len()
}

/// Runs every case of a family (one engine per set of ControlNets) and reports all failures
/// at once.
fn check_family(family: &str) {
    let dir = root().join(family);
    let cases = cases(family);
    assert!(!cases.is_empty());
    let mut engines: HashMap<Vec<PathBuf>, Engine> = HashMap::new();
    let mut canny_checked = 0;
    check_cases(
        &format!("{family} ControlNet"),
        &cases,
        &dir.join("reference"),
        |case, _| {
            let nets: Vec<PathBuf> = case
                .extra
                .controlnets
                .iter()
                .map(|n| dir.join(&n.onnx))
                .collect();
            let engine = engines
                .entry(nets.clone())
                .or_insert_with(|| load_engine(family, &nets));
            let out = engine.run(&request(case, &root()), &Task::TextToImage, &mut |_| true)?;
            assert_eq!(out.control_images.len(), case.extra.controlnets.len());
            canny_checked += check_canny_edges(case, &dir);
            Ok(out)
        },
    );
    assert!(canny_checked > 0, "no Canny case in {family}");
}

#[test]
fn sd15_controlnet_matches_diffusers() {
    check_family("sd15");
}

#[test]
fn sdxl_controlnet_matches_diffusers() {
    check_family("sdxl");
}

/// Without control images a UNet that takes residuals gets zeros: the output is the same, bit
/// for bit, with or without ControlNets loaded (and the text-to-image parity tests run on the
/// same residual-taking exports).
#[test]
fn zero_residuals_leave_text_to_image_unchanged() {
    let dir = root().join("sd15");
    let net = dir.join("controlnet_0").join("onnx");
    let request = GenerateRequest {
        prompt: "a red house".into(),
        width: Some(64),
        height: Some(64),
        ..GenerateRequest::default()
    };
    let mut plain = load_engine("sd15", &[]);
    assert!(plain.accepts_controlnet());
    let a = plain.generate(&request, &mut |_| true).expect("plain");
    let mut with_net = load_engine("sd15", &[net]);
    let b = with_net
        .generate(&request, &mut |_| true)
        .expect("with a ControlNet loaded");
    assert_eq!(a.latents, b.latents);
    assert_eq!(a.images, b.images);
}

fn control_for(image: &str) -> ControlImage {
    ControlImage {
        scale: 0.5,
        ..ControlImage::new(load_image(&root().join(image)).expect("control image"))
    }
}

fn first_control_image(family: &str) -> String {
    cases(family)
        .into_iter()
        .find(|c| c.extra.control_preprocess.is_none())
        .and_then(|c| c.extra.control_images.into_iter().next())
        .expect("a case with a plain control image")
}

/// Bad inputs: a ControlNet for another base, a missing directory, a pipeline given as a
/// ControlNet, image counts that do not match, a request with control images but no
/// ControlNet, ControlNet with image-to-image.
#[test]
fn bad_controlnet_inputs_are_refused() {
    let dir = root().join("sd15");
    let options = |nets: Vec<PathBuf>| EngineOptions {
        controlnets: nets
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
        ..EngineOptions::default()
    };
    let model = model_dir("sd15");
    let model = model.to_string_lossy();
    let err = Engine::load(
        &model,
        &options(vec![dir.join("controlnet_other").join("onnx")]),
    )
    .expect_err("an SDXL ControlNet on an SD1.5 model");
    assert!(err.to_string().contains("another base model"), "{err}");
    let err = Engine::load(&model, &options(vec![dir.join("no-such-controlnet")]))
        .expect_err("missing dir");
    assert!(err.to_string().contains("no such ControlNet"), "{err}");
    let err = Engine::load(&model, &options(vec![model_dir("sd15")]))
        .expect_err("a pipeline is not a ControlNet");
    assert!(err.to_string().contains("not a ControlNet"), "{err}");

    let image = first_control_image("sd15");
    let mut engine = load_engine("sd15", &[dir.join("controlnet_0").join("onnx")]);
    let mut request = GenerateRequest {
        prompt: "a cat".into(),
        width: Some(64),
        height: Some(64),
        control: vec![control_for(&image), control_for(&image)],
        ..GenerateRequest::default()
    };
    let err = engine
        .generate(&request, &mut |_| true)
        .expect_err("two images, one ControlNet");
    assert!(
        err.to_string().contains("2 control image(s) given for 1"),
        "{err}"
    );
    request.control.truncate(1);
    let task = Task::ImageToImage {
        image: load_image(&root().join(&image)).expect("image"),
        strength: 0.5,
    };
    let err = engine
        .run(&request, &task, &mut |_| true)
        .expect_err("ControlNet with image-to-image");
    assert!(err.to_string().contains("text-to-image only"), "{err}");
    request.control[0].preprocess = ControlPreprocess::Depth;
    let err = engine
        .generate(&request, &mut |_| true)
        .expect_err("depth without an estimator");
    assert!(err.to_string().contains("--depth-model"), "{err}");

    let mut plain = load_engine("sd15", &[]);
    request.control[0].preprocess = ControlPreprocess::None;
    let err = plain
        .generate(&request, &mut |_| true)
        .expect_err("control image without ControlNet");
    assert!(err.to_string().contains("no ControlNet is loaded"), "{err}");
}

/// An export whose UNet takes no residuals (optimum's) refuses ControlNets at load.
#[test]
fn unet_without_residual_inputs_refuses_controlnets() {
    let optimum = fixtures_dir().join("optimum").join("sd15");
    let options = EngineOptions {
        controlnets: vec![root()
            .join("sd15")
            .join("controlnet_0")
            .join("onnx")
            .to_string_lossy()
            .into_owned()],
        ..EngineOptions::default()
    };
    let err = Engine::load(optimum.to_string_lossy(), &options)
        .expect_err("optimum UNet has no residual inputs");
    assert!(err.to_string().contains("re-export"), "{err}");
}

/// `ControlPreprocess::Depth` runs the engine's depth estimator (the guide's recipe, checked
/// against transformers in `depth.rs`) at the output size, and the ControlNet sees that map.
#[test]
fn depth_preprocessing_feeds_the_estimators_map() {
    let depth_dir = fixtures_dir().join("depth");
    let photo = load_image(&depth_dir.join("images").join("photo200x150.png"))
        .unwrap_or_else(|e| panic!("{e}; run `make fixtures`"));
    let net = root().join("sd15").join("controlnet_0").join("onnx");
    let options = EngineOptions {
        controlnets: vec![net.to_string_lossy().into_owned()],
        depth_estimator: Some(depth_dir.join("model").to_string_lossy().into_owned()),
        ..EngineOptions::default()
    };
    let model = model_dir("sd15");
    let mut engine = Engine::load(model.to_string_lossy(), &options).expect("loads with depth");
    let request = GenerateRequest {
        prompt: "a red house".into(),
        steps: 2,
        width: Some(64),
        height: Some(48),
        control: vec![ControlImage {
            scale: 0.5,
            preprocess: ControlPreprocess::Depth,
            ..ControlImage::new(photo.clone())
        }],
        ..GenerateRequest::default()
    };
    let out = engine
        .generate(&request, &mut |_| true)
        .expect("depth ControlNet run");
    let mut estimator = tcd_ort::control::DepthEstimator::load(
        &depth_dir.join("model"),
        &tcd_ort::runtime::SessionOptions::default(),
    )
    .expect("estimator");
    let map = estimator.estimate(&photo, 64, 48).expect("depth map");
    assert_eq!(out.control_images, vec![map.clone()]);
    assert!(
        map.pixels.iter().any(|&v| v != map.pixels[0]),
        "a flat map checks nothing"
    );
    // The same map given as a plain control image gives the same latents.
    let plain = GenerateRequest {
        control: vec![ControlImage {
            scale: 0.5,
            ..ControlImage::new(map)
        }],
        ..request
    };
    let again = engine
        .generate(&plain, &mut |_| true)
        .expect("plain control image");
    assert_eq!(out.latents, again.latents);
}
