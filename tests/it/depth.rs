//! Depth control images against diffusers' ControlNet-depth guide: `tcd_ort::control::depth`
//! must reproduce, on a tiny random-weight hybrid DPT (dpt-hybrid-midas-shaped):
//!
//! - the PIL `DPTImageProcessor`'s `pixel_values` (dpt-hybrid-midas's BILINEAR settings, and
//!   BICUBIC, LANCZOS and keep_aspect_ratio variants);
//! - the model's `predicted_depth` (the exported graph against torch);
//! - the guide's final depth map (bicubic upsampling, min-max normalisation, uint8);
//! - Pillow's BILINEAR/BICUBIC resize and torch's bicubic `interpolate` on small cases.
//!
//! Every expected number comes from transformers, torch and Pillow through
//! `tests/golden/make_depth.py` (run by `make fixtures`); nothing here is hand-written.

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use serde::Deserialize;
use tcd_ort::control::depth::{
    depth_to_image, resize_bicubic_torch, DepthEstimator, DptPreprocessor,
};
use tcd_ort::image_io::{read_npy, resize, ResampleFilter, RgbImage};
use tcd_ort::runtime::SessionOptions;

use crate::common::{fixtures_dir, read_png_rgb, scratch_dir};

#[derive(Debug, Deserialize)]
struct Index {
    model: String,
    image_processor: String,
    transformers: String,
    cases: Vec<Case>,
    preprocessors: Vec<PreprocessorCase>,
    resizes: Vec<ResizeCase>,
    interpolations: Vec<InterpolationCase>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    image: String,
    width: u32,
    height: u32,
    pixel_values: String,
    predicted_depth: String,
    depth_map: String,
}

#[derive(Debug, Deserialize)]
struct PreprocessorCase {
    name: String,
    config: String,
    image: String,
    pixel_values: String,
}

#[derive(Debug, Deserialize)]
struct ResizeCase {
    filter: String,
    in_size: [u32; 2],
    out_size: [u32; 2],
    input: Vec<u8>,
    output: Vec<u8>,
}

#[derive(Debug, Deserialize)]
struct InterpolationCase {
    in_size: [usize; 2],
    out_size: [usize; 2],
    input: Vec<f32>,
    output: Vec<f32>,
}

/// The depth fixtures under a fixture root, or a panic that says how to make them.
fn depth_dir(root: &Path) -> PathBuf {
    let dir = root.join("depth");
    if !dir.join("cases.json").is_file() {
        panic!(
            "{}: no depth fixtures; generate them with `make fixtures` \
             (or `.venv/bin/python tests/golden/make_depth.py`)",
            dir.display()
        );
    }
    dir
}

fn index() -> (PathBuf, Index) {
    let dir = depth_dir(&fixtures_dir());
    let text = std::fs::read_to_string(dir.join("cases.json"))
        .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", dir.display()));
    let index: Index = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}/cases.json: {e}; run `make fixtures`", dir.display()));
    (dir, index)
}

fn load_rgb(path: &Path) -> RgbImage {
    let (w, h, rgb) = read_png_rgb(path);
    RgbImage::new(w, h, rgb).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn npy(path: &Path) -> ArrayD<f32> {
    read_npy(path).unwrap_or_else(|e| panic!("{e}; run `make fixtures`"))
}

fn options() -> SessionOptions {
    SessionOptions {
        intra_threads: Some(2),
        ..SessionOptions::default()
    }
}

/// Largest absolute difference, or infinity when the shapes differ.
fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    if a.shape() != b.shape() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn depth_pixel_values_match_the_image_processor() {
    let (dir, index) = index();
    let model_pre =
        DptPreprocessor::from_file(&dir.join(&index.model).join("preprocessor_config.json"))
            .unwrap_or_else(|e| panic!("{e}"));
    let mut checks: Vec<(String, DptPreprocessor, String, String)> = index
        .cases
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                model_pre.clone(),
                c.image.clone(),
                c.pixel_values.clone(),
            )
        })
        .collect();
    for p in &index.preprocessors {
        let pre =
            DptPreprocessor::from_file(&dir.join(&p.config)).unwrap_or_else(|e| panic!("{e}"));
        checks.push((p.name.clone(), pre, p.image.clone(), p.pixel_values.clone()));
    }
    println!(
        "pixel_values vs transformers {} {}",
        index.transformers, index.image_processor
    );
    let mut failures = Vec::new();
    for (name, pre, image, expected) in &checks {
        let image = load_rgb(&dir.join(image));
        let expected = npy(&dir.join(expected));
        let actual = pre
            .pixel_values(&image)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let diff = max_abs_diff(&actual, &expected);
        let differing = actual
            .iter()
            .zip(expected.iter())
            .filter(|(a, b)| a != b)
            .count();
        println!(
            "{name:40} {:?}: max |diff| {diff:.3e}, {differing} values differ",
            expected.shape()
        );
        // One 8-bit step after normalisation is 1/255/0.5 = 7.8e-3; anything below half of that
        // is float rounding, not a different resize.
        if diff > 1e-6 || diff.is_nan() {
            failures.push(format!("{name}: max |diff| {diff:e} ({differing} values)"));
        }
    }
    assert!(failures.is_empty(), "pixel_values differ: {failures:#?}");
}

#[test]
fn depth_graph_and_depth_map_match_the_guide() {
    let (dir, index) = index();
    let mut estimator =
        DepthEstimator::load(&dir.join(&index.model), &options()).unwrap_or_else(|e| panic!("{e}"));
    let mut failures = Vec::new();
    let (mut worst_depth, mut worst_agreement) = (0f32, 1f64);
    for case in &index.cases {
        // The graph alone, on the reference's own pixel values.
        let reference_depth = npy(&dir.join(&case.predicted_depth));
        let depth = estimator
            .predict(&npy(&dir.join(&case.pixel_values)))
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let scale = reference_depth
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(1e-12);
        let rel = max_abs_diff(&depth, &reference_depth) / scale;
        worst_depth = worst_depth.max(rel);
        if rel > 1e-4 || rel.is_nan() {
            failures.push(format!(
                "{}: predicted_depth off by {rel:e} of its largest value",
                case.name
            ));
        }
        // The whole recipe from the image file.
        let image = load_rgb(&dir.join(&case.image));
        let map = estimator
            .estimate(&image, case.width, case.height)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let expected = load_rgb(&dir.join(&case.depth_map));
        assert_eq!(
            (map.width, map.height),
            (expected.width, expected.height),
            "{}",
            case.name
        );
        assert!(
            map.pixels.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]),
            "{}: channels differ",
            case.name
        );
        let (mut same, mut worst) = (0usize, 0u8);
        for (a, b) in map.pixels.iter().zip(&expected.pixels).step_by(3) {
            same += usize::from(a == b);
            worst = worst.max(a.abs_diff(*b));
        }
        let total = (map.width * map.height) as usize;
        let agreement = same as f64 / total as f64;
        worst_agreement = worst_agreement.min(agreement);
        println!(
            "{:32} predicted_depth rel {rel:.2e}; depth map {:.4}% identical, worst {worst}",
            case.name,
            100.0 * agreement
        );
        if agreement < 0.99 || worst > 1 {
            failures.push(format!(
                "{}: {:.4}% identical, worst difference {worst}",
                case.name,
                100.0 * agreement
            ));
        }
        // The same map from the reference's predicted depth isolates the post-processing.
        let post = depth_to_image(&reference_depth, case.width, case.height)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let post_same = post
            .pixels
            .iter()
            .zip(&expected.pixels)
            .step_by(3)
            .filter(|(a, b)| a == b)
            .count();
        if post_same as f64 / (total as f64) < 0.99 {
            failures.push(format!(
                "{}: post-processing alone {post_same}/{total}",
                case.name
            ));
        }
    }
    println!(
        "worst predicted_depth {worst_depth:.2e}, worst agreement {:.4}%",
        100.0 * worst_agreement
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn depth_pillow_resamplers_match_pillow() {
    let (_, index) = index();
    assert!(!index.resizes.is_empty());
    let mut failures = Vec::new();
    for case in &index.resizes {
        let filter = match case.filter.as_str() {
            "bilinear" => ResampleFilter::Bilinear,
            "bicubic" => ResampleFilter::Bicubic,
            other => panic!("unknown filter {other}"),
        };
        let [w, h] = case.in_size;
        let [ow, oh] = case.out_size;
        let image = RgbImage::new(w, h, case.input.clone()).unwrap_or_else(|e| panic!("{e}"));
        let out = resize(&image, ow, oh, filter).unwrap_or_else(|e| panic!("{e}"));
        if out.pixels != case.output {
            failures.push(format!(
                "{} {w}x{h} -> {ow}x{oh}: got {:?}, Pillow {:?}",
                case.filter, out.pixels, case.output
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn depth_bicubic_interpolation_matches_torch() {
    let (_, index) = index();
    assert!(!index.interpolations.is_empty());
    for case in &index.interpolations {
        let [w, h] = case.in_size;
        let [ow, oh] = case.out_size;
        let out = resize_bicubic_torch(&case.input, w, h, ow, oh).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.len(), case.output.len());
        let worst = out
            .iter()
            .zip(&case.output)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let scale = case.output.iter().fold(1f32, |m, v| m.max(v.abs()));
        println!("{w}x{h} -> {ow}x{oh}: max |diff| {worst:.2e} (largest value {scale:.2})");
        // torch's vectorised kernel rounds differently (see `resize_bicubic_torch`): a few ulp.
        assert!(
            worst <= 1e-5 * scale,
            "{w}x{h} -> {ow}x{oh}: {worst:e}\n{out:?}\n{:?}",
            case.output
        );
    }
}

#[test]
fn depth_load_rejects_what_is_not_a_depth_estimator() {
    let missing = scratch_dir("depth-missing").join("nope");
    let err = DepthEstimator::load(&missing, &options()).expect_err("missing dir");
    assert!(err.to_string().contains("not a directory"), "{err}");

    let empty = scratch_dir("depth-empty");
    let err = DepthEstimator::load(&empty, &options()).expect_err("empty dir");
    assert!(err.to_string().contains("tcd_ort.json"), "{err}");

    // A Stable Diffusion pipeline's manifest has a family, not a kind.
    let pipeline = scratch_dir("depth-pipeline");
    std::fs::write(
        pipeline.join("tcd_ort.json"),
        r#"{"format_version": 1, "family": "sd15", "components": {}}"#,
    )
    .expect("write manifest");
    let err = DepthEstimator::load(&pipeline, &options()).expect_err("pipeline dir");
    assert!(err.to_string().contains("not a depth estimator"), "{err}");

    let other = scratch_dir("depth-other-kind");
    std::fs::write(
        other.join("tcd_ort.json"),
        r#"{"format_version": 1, "kind": "controlnet"}"#,
    )
    .expect("write manifest");
    let err = DepthEstimator::load(&other, &options()).expect_err("other kind");
    assert!(err.to_string().contains("\"controlnet\""), "{err}");

    // The right manifest over a graph that is not a DPT: the tiny pipeline's VAE decoder.
    let (dir, index) = index();
    let wrong_graph = scratch_dir("depth-wrong-graph");
    for f in ["tcd_ort.json", "preprocessor_config.json"] {
        std::fs::copy(dir.join(&index.model).join(f), wrong_graph.join(f)).expect("copy");
    }
    let vae = crate::common::repo_root().join("models/tiny-sd15/vae_decoder");
    for f in ["model.onnx", "model.onnx_data"] {
        std::fs::copy(vae.join(f), wrong_graph.join(f))
            .unwrap_or_else(|e| panic!("{}: {e}", vae.join(f).display()));
    }
    let err = DepthEstimator::load(&wrong_graph, &options()).expect_err("wrong graph");
    assert!(err.to_string().contains("pixel_values"), "{err}");

    // A preprocessor with a filter tcd-ort does not implement.
    let bad_pre = scratch_dir("depth-bad-resample");
    std::fs::write(
        bad_pre.join("preprocessor_config.json"),
        r#"{"resample": 0}"#,
    )
    .expect("write");
    let err =
        DptPreprocessor::from_file(&bad_pre.join("preprocessor_config.json")).expect_err("nearest");
    assert!(err.to_string().contains("resample 0"), "{err}");
}

#[test]
fn depth_constant_map_is_an_error_not_a_black_image() {
    let flat = ArrayD::from_elem(ndarray::IxDyn(&[1, 8, 8]), 0.75f32);
    let err = depth_to_image(&flat, 16, 16).expect_err("constant depth");
    assert!(err.to_string().contains("constant"), "{err}");
}

#[test]
#[should_panic(expected = "make fixtures")]
fn depth_missing_fixtures_says_how_to_make_them() {
    depth_dir(&std::env::temp_dir().join(format!("tcd-ort-no-fixtures-{}", std::process::id())));
}
