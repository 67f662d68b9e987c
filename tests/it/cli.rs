//! The `tcd-ort` binary: a real run on the committed demo model, and every bad input giving a
//! one-line error and a non-zero exit without touching existing files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tcd_ort::image_io::read_npy;
use tcd_ort::pipeline::{Engine, EngineOptions, GenerateRequest};

use crate::common::{copy_dir, read_png_rgb, repo_root, scratch_dir};

fn demo_model() -> PathBuf {
    repo_root().join("models").join("tiny-sd15")
}

fn tcd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tcd-ort"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("the binary starts")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a clean failure: non-zero status, one `error:` line, no panic.
fn assert_fails_with(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {err}");
    assert!(
        errors[0].contains(needle),
        "expected '{needle}' in: {}",
        errors[0]
    );
}

fn base_args<'a>(model: &'a str, output: &'a str) -> Vec<&'a str> {
    vec![
        "run", "--model", model, "--prompt", "a cat", "--seed", "0", "--output", output, "-q",
    ]
}

#[test]
fn run_writes_png_with_parameters_and_latents_matching_the_library() {
    let dir = scratch_dir("cli-run");
    let png = dir.join("out.png");
    let npy = dir.join("latents.npy");
    let model = demo_model();
    let model_s = model.to_string_lossy().into_owned();
    let png_s = png.to_string_lossy().into_owned();
    let npy_s = npy.to_string_lossy().into_owned();
    let mut args = base_args(&model_s, &png_s);
    args.extend(["--steps", "2", "--eta", "0.3", "--save-latents", &npy_s]);
    let out = tcd(&args);
    assert!(out.status.success(), "{}", stderr(&out));

    let mut engine = Engine::load(&model_s, &EngineOptions::default()).expect("loads");
    let request = GenerateRequest {
        prompt: "a cat".into(),
        steps: 2,
        eta: 0.3,
        seed: 0,
        ..GenerateRequest::default()
    };
    let expected = engine.generate(&request, &mut |_| true).expect("runs");
    let (w, h, pixels) = read_png_rgb(&png);
    assert_eq!(
        (w, h),
        (expected.images[0].width, expected.images[0].height)
    );
    assert_eq!(pixels, expected.images[0].pixels);
    assert_eq!(read_npy(&npy).expect("npy"), expected.latents);

    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png).expect("png"),
    ));
    let reader = decoder.read_info().expect("png header");
    let text: Vec<String> = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|t| format!("{}={}", t.keyword, t.text))
        .collect();
    let params = text
        .iter()
        .find(|t| t.starts_with("parameters="))
        .expect("a parameters text chunk");
    assert!(params.contains("a cat"), "{params}");
    assert!(params.contains("Steps: 2"), "{params}");
    assert!(params.contains("Seed: 0"), "{params}");
    assert!(params.contains("Eta: 0.3"), "{params}");
}

/// `--low-memory` loads each component for its stage and `--keep-loaded` keeps every one to
/// the end (the default releases each after its stage); the PNG is the same every way.
#[test]
fn low_memory_flag_gives_the_same_image() {
    let dir = scratch_dir("cli-low-memory");
    let model_s = demo_model().to_string_lossy().into_owned();
    let mut pixels = Vec::new();
    for (name, extra) in [
        ("plain.png", None),
        ("low.png", Some("--low-memory")),
        ("kept.png", Some("--keep-loaded")),
    ] {
        let png = dir.join(name);
        let png_s = png.to_string_lossy().into_owned();
        let mut args = base_args(&model_s, &png_s);
        args.extend(["--steps", "2", "--guidance", "2"]);
        args.extend(extra);
        let out = tcd(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        pixels.push(read_png_rgb(&png));
    }
    assert_eq!(pixels[0], pixels[1], "--low-memory changed the image");
    assert_eq!(pixels[0], pixels[2], "--keep-loaded changed the image");

    // Without -q the run says how the UNet loads: whole without the session cache (and why),
    // in its segments with it, where ONNX Runtime's per-segment optimisation moves the image by
    // float32 rounding at most.
    let cache = dir.join("cache").to_string_lossy().into_owned();
    for (name, cached) in [("whole.png", false), ("segments.png", true)] {
        let png = dir.join(name).to_string_lossy().into_owned();
        let mut args = base_args(&model_s, &png);
        args.retain(|a| *a != "-q");
        args.extend(["--steps", "2", "--guidance", "2", "--low-memory"]);
        if cached {
            args.extend(["--session-cache", &cache]);
        }
        let out = tcd(&args);
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        if cached {
            assert!(err.contains("unet: 2 segments"), "{err}");
            let (w, h, seg) = read_png_rgb(&dir.join(name));
            assert_eq!((w, h), (pixels[0].0, pixels[0].1));
            let off = seg
                .iter()
                .zip(&pixels[0].2)
                .map(|(a, b)| a.abs_diff(*b))
                .max();
            assert!(off <= Some(1), "segments moved a pixel by {off:?}");
        } else {
            assert!(err.contains("note: the UNet loads whole"), "{err}");
            assert!(err.contains("--session-cache"), "{err}");
        }
    }
}

#[test]
fn several_images_are_numbered() {
    let dir = scratch_dir("cli-num");
    let png = dir.join("img.png");
    let model_s = demo_model().to_string_lossy().into_owned();
    let png_s = png.to_string_lossy().into_owned();
    let mut args = base_args(&model_s, &png_s);
    args.extend(["--steps", "1", "--num-images", "2"]);
    let out = tcd(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let a = read_png_rgb(&dir.join("img-1.png"));
    let b = read_png_rgb(&dir.join("img-2.png"));
    assert_ne!(a.2, b.2, "two images from one seed batch differ");
}

#[test]
fn never_overwrites_without_the_flag() {
    let dir = scratch_dir("cli-overwrite");
    let png = dir.join("exists.png");
    std::fs::write(&png, b"keep me").expect("write");
    let model_s = demo_model().to_string_lossy().into_owned();
    let png_s = png.to_string_lossy().into_owned();
    let out = tcd(&base_args(&model_s, &png_s));
    assert_fails_with(&out, "--overwrite");
    assert_eq!(std::fs::read(&png).expect("read"), b"keep me");

    let mut args = base_args(&model_s, &png_s);
    args.extend(["--steps", "1", "--overwrite"]);
    let out = tcd(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(read_png_rgb(&png).0 > 0);
}

fn bad_request(extra: &[&str], needle: &str) {
    let dir = scratch_dir("cli-bad");
    let png = dir.join("never.png");
    let model_s = demo_model().to_string_lossy().into_owned();
    let png_s = png.to_string_lossy().into_owned();
    let mut args = base_args(&model_s, &png_s);
    args.extend(extra);
    let out = tcd(&args);
    assert_fails_with(&out, needle);
    assert!(!png.exists(), "nothing is written on failure");
}

#[test]
fn zero_steps_is_an_error() {
    bad_request(&["--steps", "0"], "--steps");
}

#[test]
fn eta_above_one_is_an_error() {
    bad_request(&["--eta", "1.5"], "--eta");
}

#[test]
fn size_not_a_multiple_of_8_is_an_error() {
    bad_request(&["--width", "100", "--height", "100"], "multiple of 8");
}

#[test]
fn unknown_execution_provider_is_an_error() {
    bad_request(&["--ep", "vulkan"], "unknown execution provider");
}

#[test]
fn provider_missing_from_the_build_is_an_error_naming_the_package() {
    // The CPU wheel has no CUDA provider: never a silent CPU run.
    bad_request(&["--ep", "cuda"], "onnxruntime-gpu");
}

#[test]
fn missing_model_is_an_error() {
    let dir = scratch_dir("cli-missing");
    let png = dir.join("x.png");
    let out = tcd(&base_args(
        &dir.join("no-such-model").to_string_lossy(),
        &png.to_string_lossy(),
    ));
    assert_fails_with(&out, "no such directory");
}

#[test]
fn corrupt_model_files_are_errors() {
    let dir = scratch_dir("cli-corrupt");
    let model = dir.join("model");
    copy_dir(&demo_model(), &model);
    let png = dir.join("x.png");
    let model_s = model.to_string_lossy().into_owned();
    let png_s = png.to_string_lossy().into_owned();

    std::fs::write(model.join("unet").join("model.onnx"), b"not a protobuf").expect("corrupt");
    assert_fails_with(&tcd(&base_args(&model_s, &png_s)), "unet");

    std::fs::write(model.join("model_index.json"), b"{ not json").expect("corrupt");
    assert_fails_with(&tcd(&base_args(&model_s, &png_s)), "model_index.json");

    std::fs::remove_file(model.join("model_index.json")).expect("remove");
    assert_fails_with(&tcd(&base_args(&model_s, &png_s)), "model_index.json");
    assert!(!png.exists());
}

#[test]
fn missing_onnx_runtime_is_an_error_saying_how_to_install_it() {
    let dir = scratch_dir("cli-noort");
    let png = dir.join("x.png");
    let model_s = demo_model().to_string_lossy().into_owned();
    let png_s = png.to_string_lossy().into_owned();
    let mut args = base_args(&model_s, &png_s);
    args.extend(["--ort-lib", "/nonexistent/libonnxruntime.so"]);
    assert_fails_with(&tcd(&args), "pip install onnxruntime");

    let out = Command::new(env!("CARGO_BIN_EXE_tcd-ort"))
        .args(base_args(&model_s, &png_s))
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .expect("starts");
    assert_fails_with(&out, "pip install onnxruntime");
}

#[test]
fn bad_output_extension_is_an_error() {
    let dir = scratch_dir("cli-ext");
    let out_path = dir.join("x.jpg");
    let model_s = demo_model().to_string_lossy().into_owned();
    let out = tcd(&base_args(&model_s, &out_path.to_string_lossy()));
    assert_fails_with(&out, ".png");
}

/// A small RGB test picture and a mask of another size, written as PNGs into `dir`.
fn write_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let image = dir.join("in.png");
    let pixels: Vec<u8> = (0..64 * 64 * 3).map(|i| (i * 7 % 251) as u8).collect();
    let rgb = tcd_ort::image_io::RgbImage::new(64, 64, pixels).expect("image");
    tcd_ort::image_io::write_png(&image, &rgb, &[], true).expect("write image");
    let mask = dir.join("mask.png");
    let gray: Vec<u8> = (0..48 * 40)
        .map(|i| if (i % 48) > 20 { 255 } else { 0 })
        .collect();
    let m = tcd_ort::image_io::RgbImage::from_gray(48, 40, &gray).expect("mask");
    tcd_ort::image_io::write_png(&mask, &m, &[], true).expect("write mask");
    (image, mask)
}

#[test]
fn image_to_image_and_inpainting_write_images_and_grids() {
    let dir = scratch_dir("cli-img2img");
    let (image, mask) = write_inputs(&dir);
    let model = demo_model();
    let model_s = model.to_string_lossy().into_owned();
    let (image_s, mask_s) = (
        image.to_string_lossy().into_owned(),
        mask.to_string_lossy().into_owned(),
    );
    for (name, extra) in [
        ("i2i", vec!["--image", &image_s, "--strength", "0.5"]),
        ("inpaint", vec!["--image", &image_s, "--mask", &mask_s]),
    ] {
        let png = dir.join(format!("{name}.png"));
        let grid = dir.join(format!("{name}-grid.png"));
        let (png_s, grid_s) = (
            png.to_string_lossy().into_owned(),
            grid.to_string_lossy().into_owned(),
        );
        let mut args = base_args(&model_s, &png_s);
        args.extend(["--steps", "2", "--grid", &grid_s]);
        args.extend(extra.iter().copied());
        let out = tcd(&args);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        // The output takes the input's size; the grid holds input (+ mask) + result.
        assert_eq!(read_png_rgb(&png).0, 64, "{name}");
        let cells = if name == "inpaint" { 3 } else { 2 };
        assert_eq!(read_png_rgb(&grid).0, 64 * cells, "{name} grid");
        // The grid is an output too: it is never replaced without --overwrite.
        std::fs::remove_file(&png).expect("remove");
        assert_fails_with(&tcd(&args), "--overwrite");
        assert!(!png.exists(), "{name}: nothing written on failure");
    }
}

/// Bad image-to-image inputs fail before anything is written.
fn bad_image_request(extra: &[&str], needle: &str) {
    let dir = scratch_dir("cli-bad-img");
    let (image, _) = write_inputs(&dir);
    let png = dir.join("out.png");
    let (model_s, png_s) = (
        demo_model().to_string_lossy().into_owned(),
        png.to_string_lossy().into_owned(),
    );
    let image_s = image.to_string_lossy().into_owned();
    let mut args = base_args(&model_s, &png_s);
    for a in extra {
        args.push(if *a == "IMAGE" { &image_s } else { a });
    }
    assert_fails_with(&tcd(&args), needle);
    assert!(!png.exists(), "nothing is written on failure");
}

#[test]
fn unreadable_image_is_an_error() {
    bad_image_request(&["--image", "Cargo.toml"], "Cargo.toml");
    bad_image_request(&["--image", "no/such/image.png"], "image.png");
}

#[test]
fn strength_outside_zero_one_is_an_error() {
    bad_image_request(&["--image", "IMAGE", "--strength", "0"], "--strength");
    bad_image_request(&["--image", "IMAGE", "--strength", "1.5"], "--strength");
}

#[test]
fn mask_or_strength_without_image_is_an_error() {
    bad_image_request(&["--mask", "IMAGE"], "--mask needs --image");
    bad_image_request(&["--strength", "0.5"], "--strength needs --image");
}

#[test]
fn strength_leaving_no_steps_is_an_error() {
    bad_image_request(
        &["--image", "IMAGE", "--steps", "2", "--strength", "0.2"],
        "--strength",
    );
}

#[test]
fn an_inpainting_method_the_unet_cannot_do_is_an_error() {
    let dir = scratch_dir("cli-inpaint-mode");
    let (image, mask) = write_inputs(&dir);
    let png = dir.join("out.png");
    let (model_s, png_s) = (
        demo_model().to_string_lossy().into_owned(),
        png.to_string_lossy().into_owned(),
    );
    let (image_s, mask_s) = (
        image.to_string_lossy().into_owned(),
        mask.to_string_lossy().into_owned(),
    );
    // The demo model has a regular 4-channel UNet: the 9-channel path is refused.
    let mut args = base_args(&model_s, &png_s);
    args.extend([
        "--image",
        &image_s,
        "--mask",
        &mask_s,
        "--inpaint-mode",
        "unet",
    ]);
    assert_fails_with(&tcd(&args), "inpainting UNet");
    assert!(!png.exists());
    // Blending is what it can do.
    let mut args = base_args(&model_s, &png_s);
    args.extend(["--steps", "1", "--image", &image_s, "--mask", &mask_s]);
    args.extend(["--inpaint-mode", "blend"]);
    let out = tcd(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    // Without a mask there is nothing to inpaint.
    bad_image_request(
        &["--image", "IMAGE", "--inpaint-mode", "unet"],
        "--inpaint-mode needs",
    );
}

/// `--timings` writes where the time went: one entry per step, every phase positive, the
/// phases within the whole.
#[test]
fn timings_json_reports_each_phase() {
    let dir = scratch_dir("cli-timings");
    let png = dir.join("out.png");
    let json = dir.join("timings.json");
    let model_s = demo_model().to_string_lossy().into_owned();
    let (png_s, json_s) = (
        png.to_string_lossy().into_owned(),
        json.to_string_lossy().into_owned(),
    );
    let mut args = base_args(&model_s, &png_s);
    args.extend(["--steps", "3", "--timings", &json_s]);
    let out = tcd(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("timings written"))
            .expect("timings are JSON");
    let num = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("{k} in {t}"));
    let steps: Vec<f64> = t["steps_s"]
        .as_array()
        .expect("steps_s")
        .iter()
        .map(|v| v.as_f64().expect("seconds"))
        .collect();
    assert_eq!(steps.len(), 3, "{t}");
    for v in steps
        .iter()
        .chain([num("load_s"), num("encode_s"), num("decode_s")].iter())
    {
        assert!(*v > 0.0, "{t}");
    }
    let phases = num("encode_s") + steps.iter().sum::<f64>() + num("decode_s");
    assert!(phases <= num("generate_s") + 1e-9, "{t}");
    assert!(
        num("load_s") + num("generate_s") <= num("total_s") + 1e-9,
        "{t}"
    );
    // Time inside ONNX Runtime's Run: one text encoder call, one UNet call per step (no CFG),
    // one VAE decode, summed into ort_run_s, all within the generation.
    let runs = t["ort_runs"].as_object().expect("ort_runs");
    let calls = |k: &str| {
        runs[k]["calls"]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {t}"))
    };
    assert_eq!(
        (calls("text_encoder"), calls("unet"), calls("vae_decoder")),
        (1, 3, 1),
        "{t}"
    );
    let summed: f64 = runs
        .values()
        .map(|r| r["seconds"].as_f64().expect("seconds"))
        .sum();
    assert!((summed - num("ort_run_s")).abs() < 1e-9, "{t}");
    assert!(
        num("ort_run_s") > 0.0 && num("ort_run_s") <= num("generate_s"),
        "{t}"
    );
    // An existing timings file is kept unless --overwrite.
    let again = tcd(&args);
    assert_fails_with(&again, "--overwrite");
}

#[test]
fn controlnet_flags_are_checked_before_loading() {
    bad_image_request(&["--control-image", "IMAGE"], "needs a --controlnet");
    bad_image_request(&["--control-start", "0.5"], "need a --controlnet");
    bad_image_request(
        &[
            "--controlnet",
            "some/dir",
            "--controlnet",
            "other/dir",
            "--control-image",
            "IMAGE",
        ],
        "2 --controlnet but 1 --control-image",
    );
    bad_image_request(
        &["--controlnet", "some/dir:x1", "--control-image", "IMAGE"],
        "scale x1 is not a number (and no file is named some/dir:x1)",
    );
    bad_image_request(
        &["--controlnet", "./no/such/dir", "--control-image", "IMAGE"],
        "no such ControlNet",
    );
    bad_image_request(
        &[
            "--controlnet",
            "some/dir:0.5",
            "--control-image",
            "IMAGE",
            "--control-preprocess",
            "depth",
        ],
        "--depth-model",
    );
    bad_image_request(
        &[
            "--controlnet",
            "a",
            "--controlnet",
            "b",
            "--control-image",
            "IMAGE",
            "--control-image",
            "IMAGE",
            "--control-end",
            "0.5",
            "--control-end",
            "0.6",
            "--control-end",
            "0.7",
        ],
        "--control-end was given 3 times for 2",
    );
    bad_image_request(
        &[
            "--controlnet",
            "missing/controlnet:0.5",
            "--control-image",
            "no/such.png",
        ],
        "such.png",
    );
    bad_image_request(
        &[
            "--controlnet",
            "x",
            "--control-image",
            "IMAGE",
            "--image",
            "IMAGE",
        ],
        "text-to-image only",
    );
}

/// `--controlnet` with `--control-image` (the committed tiny ControlNet and edge drawing) writes
/// the same pixels as the library, records the ControlNet in the PNG parameters, and `--grid`
/// shows the control image beside the result.
#[test]
fn controlnet_run_matches_the_library() {
    let dir = scratch_dir("cli-controlnet");
    let (png, grid) = (dir.join("out.png"), dir.join("grid.png"));
    let model_s = demo_model().to_string_lossy().into_owned();
    let net = repo_root().join("models").join("tiny-sd15-controlnet");
    let edges = repo_root().join("models").join("control-edges-64x64.png");
    let (png_s, grid_s) = (
        png.to_string_lossy().into_owned(),
        grid.to_string_lossy().into_owned(),
    );
    let net_arg = format!("{}:0.5", net.display());
    let edges_s = edges.to_string_lossy().into_owned();
    let mut args = base_args(&model_s, &png_s);
    args.extend([
        "--steps",
        "2",
        "--controlnet",
        &net_arg,
        "--control-image",
        &edges_s,
        "--control-end",
        "0.5",
        "--grid",
        &grid_s,
    ]);
    let out = tcd(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let options = EngineOptions {
        controlnets: vec![net.to_string_lossy().into_owned()],
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(model_s.as_str(), &options).expect("load");
    let request = GenerateRequest {
        prompt: "a cat".into(),
        steps: 2,
        seed: 0,
        control: vec![tcd_ort::pipeline::ControlImage {
            scale: 0.5,
            end: 0.5,
            ..tcd_ort::pipeline::ControlImage::new(
                tcd_ort::image_io::load_image(&edges).expect("edges"),
            )
        }],
        ..GenerateRequest::default()
    };
    let lib = engine.generate(&request, &mut |_| true).expect("generate");
    let (w, h, pixels) = read_png_rgb(&png);
    assert_eq!((w, h), (64, 64), "the size defaults to the control image's");
    assert_eq!(pixels, lib.images[0].pixels);
    let text = String::from_utf8_lossy(&std::fs::read(&png).expect("png")).into_owned();
    assert!(
        text.contains("ControlNet 1: "),
        "parameters record the ControlNet"
    );
    let (gw, gh, _) = read_png_rgb(&grid);
    assert_eq!((gw, gh), (128, 64), "control image and result side by side");
}

/// `--ip-adapter` with `--ip-adapter-image` (the committed tiny adapter) writes the same pixels
/// as the library, records the adapter and its scale in the PNG parameters, and `--grid` shows
/// the reference image beside the result.
#[test]
fn ip_adapter_run_matches_the_library() {
    let dir = scratch_dir("cli-ip-adapter");
    let (png, grid) = (dir.join("out.png"), dir.join("grid.png"));
    let model_s = demo_model().to_string_lossy().into_owned();
    let adapter = repo_root().join("models").join("tiny-sd15-ip-adapter");
    let reference = repo_root().join("models").join("control-edges-64x64.png");
    let (png_s, grid_s) = (
        png.to_string_lossy().into_owned(),
        grid.to_string_lossy().into_owned(),
    );
    let (adapter_s, reference_s) = (
        adapter.to_string_lossy().into_owned(),
        reference.to_string_lossy().into_owned(),
    );
    let mut args = base_args(&model_s, &png_s);
    args.extend([
        "--steps",
        "2",
        "--ip-adapter",
        &adapter_s,
        "--ip-adapter-image",
        &reference_s,
        "--ip-adapter-scale",
        "0.5",
        "--grid",
        &grid_s,
    ]);
    let out = tcd(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let options = EngineOptions {
        ip_adapter: Some(adapter_s.clone()),
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(model_s.as_str(), &options).expect("load");
    let request = GenerateRequest {
        prompt: "a cat".into(),
        steps: 2,
        seed: 0,
        ip_adapter: Some(tcd_ort::pipeline::IpAdapterImage {
            scale: 0.5,
            ..tcd_ort::pipeline::IpAdapterImage::new(
                tcd_ort::image_io::load_image(&reference).expect("reference"),
            )
        }),
        ..GenerateRequest::default()
    };
    let lib = engine.generate(&request, &mut |_| true).expect("generate");
    let (_, _, pixels) = read_png_rgb(&png);
    assert_eq!(pixels, lib.images[0].pixels);
    let plain = Engine::load(model_s.as_str(), &EngineOptions::default())
        .expect("load")
        .generate(
            &GenerateRequest {
                ip_adapter: None,
                ..request
            },
            &mut |_| true,
        )
        .expect("generate");
    assert_ne!(
        pixels, plain.images[0].pixels,
        "the adapter steers the image"
    );
    let text = String::from_utf8_lossy(&std::fs::read(&png).expect("png")).into_owned();
    assert!(
        text.contains(&format!("IP-Adapter: {adapter_s} (scale 0.5)")),
        "parameters record the IP-Adapter"
    );
    let (gw, gh, _) = read_png_rgb(&grid);
    assert_eq!(
        (gw, gh),
        (128, 64),
        "reference image and result side by side"
    );
}

/// The library's warnings reach the command line's stderr, even with --quiet.
#[test]
fn a_truncated_prompt_is_warned_about() {
    let dir = scratch_dir("cli-truncated");
    let png = dir.join("out.png");
    let (model_s, png_s) = (
        demo_model().to_string_lossy().into_owned(),
        png.to_string_lossy().into_owned(),
    );
    let long = "a very long prompt about a cat ".repeat(20);
    let mut args = base_args(&model_s, &png_s);
    args[4] = &long;
    args.extend(["--steps", "1"]);
    let out = tcd(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "warning: the prompt was truncated because CLIP can only handle sequences up to 77 \
             tokens; dropped: \""
        ),
        "{}",
        stderr(&out)
    );
}

/// #19: a long negative prompt is warned about too, each warning is one short line (an
/// excerpt of what was dropped), and control characters from a prompt never reach the PNG's
/// line-based `parameters` chunk.
#[test]
fn truncation_warnings_are_short_and_prompts_stay_on_their_line() {
    let dir = scratch_dir("cli-truncated-negative");
    let png = dir.join("out.png");
    let (model_s, png_s) = (
        demo_model().to_string_lossy().into_owned(),
        png.to_string_lossy().into_owned(),
    );
    let long = "a very long prompt about a cat ".repeat(20);
    let prompt = format!("a cat\nNegative prompt: fake\u{7} {long}");
    let mut args = base_args(&model_s, &png_s);
    args[4] = &prompt;
    args.extend([
        "--steps",
        "1",
        "--guidance",
        "2",
        "--negative-prompt",
        &long,
    ]);
    let out = tcd(&args);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 2, "{err}");
    assert!(warnings[0].contains("the prompt was truncated"), "{err}");
    assert!(
        warnings[1].contains("the negative prompt was truncated"),
        "{err}"
    );
    for w in &warnings {
        assert!(w.len() < 250, "one short line: {w}");
        assert!(w.contains("more characters)"), "an excerpt: {w}");
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png).expect("png"),
    ));
    let reader = decoder.read_info().expect("png header");
    let params = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .expect("a parameters text chunk");
    let lines: Vec<&str> = params.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "prompt, negative prompt, settings: {params:?}"
    );
    assert!(
        lines[0].starts_with("a cat Negative prompt: fake "),
        "{params:?}"
    );
    assert!(
        lines[1].starts_with("Negative prompt: a very long"),
        "{params:?}"
    );
    assert!(
        !params.chars().any(|c| c.is_control() && c != '\n'),
        "{params:?}"
    );
}

/// `tcd-ort serve` refuses bad flags on one line, before loading anything.
#[test]
fn serve_refuses_bad_flags() {
    let model = demo_model();
    let model = model.to_string_lossy();
    let cases: &[(&[&str], &str)] = &[
        (&["--workers", "0"], "--workers"),
        (&["--timeout", "0"], "--timeout"),
        (&["--max-body-mb", "0"], "--max-body-mb"),
        (&["--api-key", ""], "--api-key"),
        (&["--lora-dir", "/nonexistent/loras"], "--lora-dir"),
        (&["--listen", "localhost"], "--listen"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["serve", "--model", &model];
        args.extend_from_slice(extra);
        assert_fails_with(&tcd(&args), needle);
    }
}

/// `tcd-ort decode` on `run --save-latents`'s latents gives `run`'s pixels, tiled or not.
#[test]
fn decode_gives_the_pixels_of_run() {
    let dir = std::env::temp_dir().join(format!("tcd-ort-decode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let model = demo_model();
    let model = model.to_string_lossy();
    for tiling in [false, true] {
        let png = dir.join(format!("run-{tiling}.png"));
        let npy = dir.join(format!("run-{tiling}.npy"));
        let decoded = dir.join(format!("decoded-{tiling}.png"));
        let (png_s, npy_s, decoded_s) = (
            png.to_string_lossy(),
            npy.to_string_lossy(),
            decoded.to_string_lossy(),
        );
        let mut args = base_args(&model, &png_s);
        args.extend(["--width", "128", "--height", "96", "--save-latents", &npy_s]);
        let mut decode = vec![
            "decode",
            "--model",
            &model,
            "--latents",
            &npy_s,
            "--output",
            &decoded_s,
        ];
        if tiling {
            args.push("--vae-tiling");
            decode.push("--vae-tiling");
        }
        let out = tcd(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = tcd(&decode);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(
            read_png_rgb(&png),
            read_png_rgb(&decoded),
            "tiling {tiling}"
        );
    }
    let bad = dir.join("bad.npy");
    std::fs::write(&bad, b"not npy").expect("write");
    let bad_s = bad.to_string_lossy();
    let out_s = dir.join("x.png");
    let out_s = out_s.to_string_lossy();
    assert_fails_with(
        &tcd(&[
            "decode",
            "--model",
            &model,
            "--latents",
            &bad_s,
            "--output",
            &out_s,
        ]),
        "--latents",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
