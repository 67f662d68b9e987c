//! Canny edges against OpenCV: `tcd_ort::control::canny` must reproduce `cv2.Canny` on
//! photo-like images, RGB (diffusers' ControlNet-canny recipe) and grayscale, for diffusers'
//! thresholds (100, 200) and others, including swapped and fractional ones.
//!
//! The expected edge maps come from OpenCV through `tests/golden/make_canny.py` (run by
//! `make fixtures`); nothing here is hand-written. The bar is agreement on 99% of pixels in
//! every case; the implementation is meant to be exact, and the agreement is printed.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tcd_ort::control::{canny, canny_gray};
use tcd_ort::image_io::RgbImage;

use crate::common::{fixtures_dir, read_png_rgb};

#[derive(Debug, Deserialize)]
struct Index {
    opencv: String,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    image: String,
    gray: bool,
    low: f32,
    high: f32,
    edges: String,
}

/// The Canny fixtures under a fixture root, or a panic that says how to make them.
fn canny_dir(root: &Path) -> PathBuf {
    let dir = root.join("canny");
    if !dir.join("index.json").is_file() {
        panic!(
            "{}: no Canny fixtures; generate them with `make fixtures` \
             (or `.venv/bin/python tests/golden/make_canny.py`)",
            dir.display()
        );
    }
    dir
}

fn read_gray(path: &Path) -> (u32, u32, Vec<u8>) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", path.display()))
        .to_luma8();
    (img.width(), img.height(), img.into_raw())
}

#[test]
fn canny_matches_opencv() {
    let dir = canny_dir(&fixtures_dir());
    let text = std::fs::read_to_string(dir.join("index.json"))
        .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", dir.display()));
    let index: Index = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}/index.json: {e}; run `make fixtures`", dir.display()));
    assert!(!index.cases.is_empty(), "no cases in {}", dir.display());
    println!("Canny vs OpenCV {}", index.opencv);
    let mut failures = Vec::new();
    for case in &index.cases {
        let (ew, eh, expected) = read_gray(&dir.join(&case.edges));
        let actual = if case.gray {
            let (w, h, gray) = read_gray(&dir.join(&case.image));
            canny_gray(&gray, w, h, case.low, case.high)
                .unwrap_or_else(|e| panic!("{}: {e}", case.name))
        } else {
            let (w, h, rgb) = read_png_rgb(&dir.join(&case.image));
            let image = RgbImage::new(w, h, rgb).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let edges =
                canny(&image, case.low, case.high).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!((edges.width, edges.height), (w, h), "{}", case.name);
            // The control image repeats the edge map in R, G and B.
            assert!(
                edges.pixels.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]),
                "{}: channels differ",
                case.name
            );
            edges.pixels.iter().step_by(3).copied().collect()
        };
        assert_eq!(actual.len(), (ew * eh) as usize, "{}", case.name);
        let same = actual.iter().zip(&expected).filter(|(a, b)| a == b).count();
        let agreement = same as f64 / expected.len() as f64;
        let edges = expected.iter().filter(|&&v| v != 0).count();
        println!(
            "{:32} {ew}x{eh}: {:.4}% of pixels agree ({} differ, {edges} edge pixels)",
            case.name,
            100.0 * agreement,
            expected.len() - same
        );
        if agreement < 0.99 {
            failures.push(format!(
                "{}: {:.4}% agreement",
                case.name,
                100.0 * agreement
            ));
        }
    }
    assert!(failures.is_empty(), "below 99%: {failures:#?}");
}

#[test]
fn canny_rejects_bad_thresholds() {
    let image = RgbImage::from_gray(4, 4, &[128; 16]).unwrap_or_else(|e| panic!("{e}"));
    for (low, high) in [
        (-1.0, 200.0),
        (100.0, -0.5),
        (f32::NAN, 200.0),
        (100.0, f32::INFINITY),
    ] {
        let err = canny(&image, low, high).err();
        assert!(err.is_some(), "({low}, {high}) accepted");
        assert!(canny_gray(&[128; 16], 4, 4, low, high).is_err());
    }
    // Unordered thresholds are OpenCV-legal: they are swapped, not rejected.
    assert!(canny(&image, 200.0, 100.0).is_ok());
}

#[test]
fn canny_rejects_bad_sizes() {
    assert!(canny_gray(&[0; 15], 4, 4, 100.0, 200.0).is_err());
    assert!(canny_gray(&[], 0, 0, 100.0, 200.0).is_err());
    // RgbImage's fields are public, so a mismatched buffer can reach `canny`.
    let image = RgbImage {
        width: 4,
        height: 4,
        pixels: vec![0; 47],
    };
    assert!(canny(&image, 100.0, 200.0).is_err());
}

#[test]
#[should_panic(expected = "make fixtures")]
fn canny_missing_fixtures_says_how_to_make_them() {
    canny_dir(&std::env::temp_dir().join(format!("tcd-ort-no-fixtures-{}", std::process::id())));
}
