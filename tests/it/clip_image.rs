//! An IP-Adapter's reference image pre-processed as transformers' `CLIPImageProcessor` does it:
//! `tcd_ort::image_io::clip_pixel_values` must give the Pillow backend's `pixel_values`
//! (`CLIPImageProcessorPil`, what diffusers' `CLIPImageProcessor(...)` is without torchvision)
//! for seeded random images of odd sizes and aspect ratios, with the class defaults (diffusers'
//! processor for a 224-pixel encoder) and with configurations in the key forms real
//! `preprocessor_config.json` files use: a tiny encoder's 32 pixels, legacy ints, LANCZOS and
//! BILINEAR, no resize (padding), a crop that pads one axis and crops the other, no crop, and
//! without the rescale, the normalisation or both; and Pillow's resize on random two-axis
//! cases, which pins down the order of its passes.
//!
//! Every expected number comes from transformers and Pillow through
//! `tests/golden/make_clip_image.py` (run by `make fixtures`); nothing here is hand-written.

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use serde::Deserialize;
use tcd_ort::image_io::{
    clip_pixel_values, read_npy, resize, ClipImageConfig, ClipResize, ResampleFilter, RgbImage,
};

use crate::common::{fixtures_dir, max_pixel_diff, read_png_rgb, scratch_dir};

#[derive(Debug, Deserialize)]
struct Index {
    image_processor: String,
    diffusers_class: String,
    transformers: String,
    pillow: String,
    cases: Vec<Case>,
    resizes: Vec<ResizeCase>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    /// `preprocessor_config.json`, or none for the class defaults.
    config: Option<String>,
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

/// The CLIP image fixtures under a fixture root, or a panic that says how to make them.
fn clip_image_dir(root: &Path) -> PathBuf {
    let dir = root.join("clip_image");
    if !dir.join("cases.json").is_file() {
        panic!(
            "{}: no CLIP image fixtures; generate them with `make fixtures` \
             (or `.venv/bin/python tests/golden/make_clip_image.py`)",
            dir.display()
        );
    }
    dir
}

fn index() -> (PathBuf, Index) {
    let dir = clip_image_dir(&fixtures_dir());
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

#[test]
fn clip_image_pixel_values_match_the_image_processor() {
    let (dir, index) = index();
    assert!(!index.cases.is_empty());
    println!(
        "pixel_values vs transformers {} {} (diffusers' CLIPImageProcessor is {} there), \
         Pillow {}",
        index.transformers, index.image_processor, index.diffusers_class, index.pillow
    );
    let mut failures = Vec::new();
    let mut worst = 0f32;
    for case in &index.cases {
        let config = match &case.config {
            None => ClipImageConfig::default(),
            Some(path) => {
                ClipImageConfig::from_file(&dir.join(path)).unwrap_or_else(|e| panic!("{e}"))
            }
        };
        let image = load_rgb(&dir.join(&case.image));
        let expected: ArrayD<f32> = read_npy(&dir.join(&case.pixel_values))
            .unwrap_or_else(|e| panic!("{e}; run `make fixtures`"));
        let actual = match clip_pixel_values(&image, &config) {
            Ok(a) => a,
            Err(e) => {
                failures.push(format!("{}: {e}", case.name));
                continue;
            }
        };
        if actual.shape() != expected.shape() {
            failures.push(format!(
                "{}: shape {:?}, transformers {:?}",
                case.name,
                actual.shape(),
                expected.shape()
            ));
            continue;
        }
        let (mut diff, mut differing) = (0f32, 0usize);
        for (a, b) in actual.iter().zip(expected.iter()) {
            diff = diff.max((a - b).abs());
            differing += usize::from(a != b);
        }
        worst = worst.max(diff);
        println!(
            "{:24} {:?}: max |diff| {diff:.3e}, {differing} values differ",
            case.name,
            expected.shape()
        );
        // One 8-bit step after normalisation is 1 / 255 / 0.27 = 1.5e-2; the arithmetic after
        // the resize is transformers' own, so anything above float rounding is a bug.
        if diff > 1e-6 || diff.is_nan() {
            failures.push(format!(
                "{}: max |diff| {diff:e} ({differing} values)",
                case.name
            ));
        }
    }
    println!("{} cases, worst max |diff| {worst:e}", index.cases.len());
    assert!(failures.is_empty(), "pixel_values differ: {failures:#?}");
}

#[test]
fn clip_image_pillow_resize_passes_run_in_pillows_order() {
    // Random two-axis resizes on noise: Pillow 13 runs the vertical pass first when the height
    // shrinks by more than twice as many pixels as the width, and the orders differ by tens of
    // levels where the first pass clips.
    let (_, index) = index();
    assert!(!index.resizes.is_empty());
    let mut failures = Vec::new();
    for case in &index.resizes {
        let filter = match case.filter.as_str() {
            "lanczos" => ResampleFilter::Lanczos,
            "bilinear" => ResampleFilter::Bilinear,
            "bicubic" => ResampleFilter::Bicubic,
            other => panic!("unknown filter {other}"),
        };
        let [w, h] = case.in_size;
        let [ow, oh] = case.out_size;
        let image = RgbImage::new(w, h, case.input.clone()).unwrap_or_else(|e| panic!("{e}"));
        let out = resize(&image, ow, oh, filter).unwrap_or_else(|e| panic!("{e}"));
        if out.pixels != case.output {
            let worst = max_pixel_diff(&out.pixels, &case.output);
            failures.push(format!(
                "{} {w}x{h} -> {ow}x{oh}: off by up to {worst}",
                case.filter
            ));
        }
    }
    println!("{} Pillow resizes", index.resizes.len());
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn clip_image_saved_processor_reads_back_as_its_settings() {
    // diffusers' processor for a 32-pixel encoder, as `save_pretrained` wrote it.
    let (dir, _) = index();
    let config = ClipImageConfig::from_file(&dir.join("configs/tiny32/preprocessor_config.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config,
        ClipImageConfig {
            size: ClipResize::ShortestEdge(32),
            crop_size: (32, 32),
            ..ClipImageConfig::default()
        }
    );
    // The struct deserialises from the JSON alone too.
    let text = std::fs::read_to_string(dir.join("configs/tiny32/preprocessor_config.json"))
        .expect("read config");
    let direct: ClipImageConfig = serde_json::from_str(&text).expect("deserialise");
    assert_eq!(direct, config);
    let empty: ClipImageConfig = serde_json::from_str("{}").expect("empty object");
    assert_eq!(empty, ClipImageConfig::default());
}

#[test]
fn clip_image_bad_configs_are_errors_that_name_the_file() {
    let scratch = scratch_dir("clip-image-bad-config");
    let missing = scratch.join("missing.json");
    let err = ClipImageConfig::from_file(&missing).expect_err("missing file");
    assert!(err.to_string().contains("missing file"), "{err}");

    let cases = [
        ("not_json", "{\"size\": ", "invalid JSON"),
        ("wrong_type", r#"{"do_resize": "yes"}"#, "invalid JSON"),
        (
            "nearest",
            r#"{"resample": 0}"#,
            "resample 0 is not supported",
        ),
        ("box", r#"{"resample": 4}"#, "resample 4 is not supported"),
        (
            "longest_edge",
            r#"{"size": {"shortest_edge": 224, "longest_edge": 256}}"#,
            "is not supported",
        ),
        (
            "zero_size",
            r#"{"size": {"shortest_edge": 0}}"#,
            "empty side",
        ),
        (
            "zero_crop",
            r#"{"crop_size": {"height": 0, "width": 8}}"#,
            "is empty",
        ),
        (
            "crop_edge",
            r#"{"crop_size": {"shortest_edge": 8}}"#,
            "crop_size",
        ),
        ("std_zero", r#"{"image_std": 0}"#, "image_std contains 0"),
        (
            "mean_two",
            r#"{"image_mean": [0.5, 0.5]}"#,
            "list of 3 numbers",
        ),
    ];
    for (name, json, expected) in cases {
        let path = scratch.join(format!("{name}.json"));
        std::fs::write(&path, json).expect("write config");
        let err = ClipImageConfig::from_file(&path).expect_err(name);
        let message = err.to_string();
        assert!(message.contains(expected), "{name}: {message}");
        assert!(
            message.contains(&path.display().to_string()),
            "{name}: {message}"
        );
        // Deserialising the JSON directly refuses it too.
        assert!(
            serde_json::from_str::<ClipImageConfig>(json).is_err(),
            "{name}"
        );
    }
}

#[test]
fn clip_image_sliver_is_refused_before_a_huge_resize() {
    // 1x16384 to a shortest edge of 224 would be 224x3670016 pixels (2.4 GB) before the crop.
    let sliver = RgbImage::new(1, 16384, vec![128; 16384 * 3]).expect("image");
    let err = clip_pixel_values(&sliver, &ClipImageConfig::default()).expect_err("sliver");
    assert!(err.to_string().contains("512 MiB"), "{err}");
    // Settings built in code are checked as the file's are.
    let bad = ClipImageConfig {
        crop_size: (0, 224),
        ..ClipImageConfig::default()
    };
    let image = RgbImage::new(2, 2, vec![0; 12]).expect("image");
    let err = clip_pixel_values(&image, &bad).expect_err("empty crop");
    assert!(err.to_string().contains("crop_size"), "{err}");
}

#[test]
#[should_panic(expected = "make fixtures")]
fn clip_image_missing_fixtures_says_how_to_make_them() {
    clip_image_dir(
        &std::env::temp_dir().join(format!("tcd-ort-no-fixtures-{}", std::process::id())),
    );
}
