//! AnimateDiff parity with diffusers (issue #21) on a tiny random-weight SD1.5-like pipeline
//! with a tiny random motion adapter: 8 and 16 frames, guidance 0 and 2, a motion LoRA at 1.2
//! stacked with a TCD LoRA at 1.0 (applied at load time, in diffusers' and in the original
//! AnimateDiff key names, and fused at export), and a decode chunk that does not divide the
//! frames. Then the request checks, the command line's outputs and the C ABI.
//!
//! The references come from diffusers' `AnimateDiffPipeline` with `TCDScheduler` through
//! `tests/golden/make_animatediff.py` (run by `make fixtures`); nothing here is hand-written.
//! Final latents must agree within 1e-4 of their largest magnitude, every frame within 2/255.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{ArrayD, Ix4};
use serde::Deserialize;
use tcd_ort::image_io::{read_npy, RgbImage};
use tcd_ort::pipeline::{
    Engine, EngineOptions, Field, GenerateRequest, Generated, LoraSpec, Progress, Task,
};
use tcd_ort::Error;

use crate::common::{
    committed_model, max_pixel_diff, read_cases, read_png_rgb, relative_diff, repo_root,
    scratch_dir, LoraRef,
};

/// An AnimateDiff case's fields beside its request.
#[derive(Debug, Deserialize)]
struct Extra {
    frames: usize,
    decode_chunk: Option<usize>,
    /// The export, relative to [`root`]: `onnx` or `onnx_fused`.
    model: String,
    #[serde(default)]
    loras: Vec<LoraRef>,
}

type Case = crate::common::Case<Extra>;

fn root() -> PathBuf {
    crate::common::fixtures_dir().join("animatediff")
}

fn model() -> PathBuf {
    root().join("onnx")
}

fn load(model: &Path, loras: &[LoraRef]) -> Engine {
    let options = EngineOptions {
        loras: loras
            .iter()
            .map(|l| LoraSpec {
                source: root().join(&l.file).to_string_lossy().into_owned(),
                weight: l.weight,
                weight_name: None,
            })
            .collect(),
        ..EngineOptions::default()
    };
    Engine::load(model.to_string_lossy(), &options)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", model.display()))
}

fn request(case: &Case) -> GenerateRequest {
    GenerateRequest {
        frames: Some(case.extra.frames),
        decode_chunk: case.extra.decode_chunk,
        ..case.request()
    }
}

/// diffusers' frames (`<name>_frames.npy`, uint8 [frames, H, W, 3]).
fn reference_frames(name: &str) -> ndarray::Array4<u8> {
    let path = root().join("reference").join(format!("{name}_frames.npy"));
    ndarray_npy::read_npy::<_, ndarray::Array4<u8>>(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", path.display()))
}

/// Latents and every frame against diffusers; returns (latent diff, pixel diff) or why not.
fn compare(out: &Generated, case: &Case) -> Result<(f32, u8), String> {
    let name = &case.name;
    let reference: ArrayD<f32> = read_npy(&root().join("reference").join(format!("{name}.npy")))
        .map_err(|e| format!("{name}: {e}"))?;
    if out.latents.shape() != reference.shape() {
        return Err(format!(
            "{name}: latents {:?} vs diffusers {:?}",
            out.latents.shape(),
            reference.shape()
        ));
    }
    let latent = relative_diff(&out.latents, &reference);
    let frames = reference_frames(name);
    let &[count, h, w, _] = frames.shape() else {
        unreachable!("Array4")
    };
    if out.frames != case.extra.frames || out.images.len() != count {
        return Err(format!(
            "{name}: {} frames in {} images vs diffusers' {count}",
            out.frames,
            out.images.len()
        ));
    }
    let mut pixel = 0;
    for (i, image) in out.images.iter().enumerate() {
        if (image.width as usize, image.height as usize) != (w, h) {
            return Err(format!(
                "{name}: frame {i} is {}x{}",
                image.width, image.height
            ));
        }
        let want = frames.index_axis(ndarray::Axis(0), i);
        let want: Vec<u8> = want.iter().copied().collect();
        pixel = pixel.max(max_pixel_diff(&image.pixels, &want));
    }
    if latent > 1e-4 || latent.is_nan() || pixel > 2 {
        return Err(format!(
            "{name}: latents differ by {latent:e} of max, frames by up to {pixel}/255"
        ));
    }
    Ok((latent, pixel))
}

#[test]
fn videos_match_diffusers() {
    let cases: Vec<Case> = read_cases(&root(), "AnimateDiff");
    assert!(cases.len() >= 8, "the fixture has {} cases", cases.len());
    let mut engines: HashMap<String, Engine> = HashMap::new();
    let mut latents: HashMap<String, ArrayD<f32>> = HashMap::new();
    let (mut worst_latent, mut worst_pixel, mut failures) = (0f32, 0u8, Vec::new());
    for case in &cases {
        let key = format!("{}|{:?}", case.extra.model, case.extra.loras);
        let engine = engines
            .entry(key)
            .or_insert_with(|| load(&root().join(&case.extra.model), &case.extra.loras));
        match engine.generate(&request(case), &mut |_| true) {
            Ok(out) => {
                match compare(&out, case) {
                    Ok((l, p)) => {
                        worst_latent = worst_latent.max(l);
                        worst_pixel = worst_pixel.max(p);
                    }
                    Err(e) => failures.push(e),
                }
                latents.insert(case.name.clone(), out.latents);
            }
            Err(e) => failures.push(format!("{}: {e}", case.name)),
        }
    }
    eprintln!(
        "AnimateDiff: {} cases, worst latent diff {worst_latent:e} of max, worst pixel diff \
         {worst_pixel}/255",
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A motion LoRA in the original AnimateDiff names is the same LoRA.
    let by_file = |file: &str| {
        cases
            .iter()
            .find(|c| c.extra.loras.iter().any(|l| l.file == file))
            .map(|c| &latents[&c.name])
    };
    let diffusers = by_file("motion_lora.safetensors").expect("a motion LoRA case");
    let original = by_file("motion_lora_original.safetensors").expect("an original-names case");
    if diffusers.shape() == original.shape() {
        assert_eq!(relative_diff(diffusers, original), 0.0);
    }
}

fn small_request(frames: Option<usize>) -> GenerateRequest {
    GenerateRequest {
        prompt: "a lighthouse in a storm".into(),
        steps: 2,
        frames,
        width: Some(32),
        height: Some(32),
        ..GenerateRequest::default()
    }
}

fn field_of<T: std::fmt::Debug>(r: tcd_ort::Result<T>) -> Field {
    match r {
        Err(Error::InvalidField { field, .. }) => field,
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn frames_and_chunks_are_checked_and_reported() {
    let mut engine = load(&model(), &[]);
    let max = engine.motion().expect("a motion module").max_frames;
    let mut run = |r: GenerateRequest| engine.generate(&r, &mut |_| true);
    assert_eq!(field_of(run(small_request(Some(0)))), Field::Frames);
    assert_eq!(field_of(run(small_request(Some(max + 1)))), Field::Frames);
    let chunk = GenerateRequest {
        decode_chunk: Some(0),
        ..small_request(Some(2))
    };
    assert_eq!(field_of(run(chunk)), Field::DecodeChunk);
    // Image-to-image is not an animation task.
    let image = RgbImage::new(32, 32, vec![90; 32 * 32 * 3]).expect("image");
    let task = Task::ImageToImage {
        image,
        strength: 0.5,
    };
    let refused = engine.run(&small_request(Some(2)), &task, &mut |_| true);
    assert_eq!(field_of(refused), Field::Image);
    // The default frame count, and a decode in chunks of 3 reported chunk by chunk.
    let mut decoded = Vec::new();
    let request = GenerateRequest {
        decode_chunk: Some(3),
        ..small_request(None)
    };
    let out = engine
        .generate(&request, &mut |p| {
            if let Progress::Decoded { done, total } = p {
                decoded.push((done, total));
            }
            true
        })
        .expect("generates");
    let frames = tcd_ort::pipeline::DEFAULT_FRAMES.min(max);
    assert_eq!((out.frames, out.images.len()), (frames, frames));
    assert_eq!(&out.latents.shape()[..3], &[1, 4, frames]);
    let expected: Vec<(usize, usize)> = (1..=frames.div_ceil(3))
        .map(|k| ((3 * k).min(frames), frames))
        .collect();
    assert_eq!(decoded, expected);
    // A still-image model refuses frames.
    let mut still = Engine::load(committed_model("tiny-sd15"), &EngineOptions::default())
        .expect("the demo model");
    let refused = still.generate(&small_request(Some(4)), &mut |_| true);
    assert_eq!(field_of(refused), Field::Frames);
}

#[test]
fn a_fixed_shape_is_refused_for_a_motion_model() {
    let options = EngineOptions {
        fixed_shape: Some(tcd_ort::runtime::ShapeDims {
            width: 32,
            height: 32,
            batch: 1,
        }),
        ..EngineOptions::default()
    };
    let err = Engine::load(model().to_string_lossy(), &options).expect_err("refused");
    assert!(err.to_string().contains("fixed shape"), "{err}");
}

fn tcd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tcd-ort"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("the binary starts")
}

fn cli_args<'a>(model: &'a str, output: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "run", "--model", model, "--prompt", "a cat", "--seed", "3", "--steps", "2", "--width",
        "32", "--height", "32", "--output", output, "-q",
    ];
    args.extend(extra);
    args
}

/// A clean one-line failure naming `needle`, with `output` not written.
fn assert_refused(args: &[&str], needle: &str, output: &Path) {
    let out = tcd(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    assert!(errors[0].contains(needle), "'{needle}' in {}", errors[0]);
    assert!(!output.exists(), "{} written", output.display());
}

#[test]
fn the_command_line_writes_gifs_apngs_and_frame_directories() {
    let dir = scratch_dir("animatediff-cli");
    let model = model().to_string_lossy().into_owned();
    let gif = dir.join("anim.gif");
    let npy = dir.join("latents.npy");
    let (gif_s, npy_s) = (gif.to_string_lossy(), npy.to_string_lossy());
    let extra = ["--frames", "5", "--fps", "10", "--save-latents", &npy_s];
    let out = tcd(&cli_args(&model, &gif_s, &extra));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let latents: ArrayD<f32> = read_npy(&npy).expect("latents");
    assert_eq!(&latents.shape()[..3], &[1, 4, 5]);
    let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
        std::fs::File::open(&gif).expect("gif"),
    ))
    .expect("a GIF");
    let frames = image::AnimationDecoder::into_frames(decoder)
        .collect_frames()
        .expect("frames");
    assert_eq!(frames.len(), 5);
    assert_eq!(frames[0].delay().numer_denom_ms(), (100, 1));

    // The same request as a directory of PNGs: the library's frames, exactly.
    let frames_dir = dir.join("frames");
    let out = tcd(&cli_args(
        &model,
        &frames_dir.to_string_lossy(),
        &["--frames", "5", "--decode-chunk", "2"],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut engine = load(&root().join("onnx"), &[]);
    let library = engine
        .generate(
            &GenerateRequest {
                prompt: "a cat".into(),
                seed: 3,
                steps: 2,
                ..small_request(Some(5))
            },
            &mut |_| true,
        )
        .expect("generates");
    for (i, image) in library.images.iter().enumerate() {
        let (w, h, pixels) = read_png_rgb(&frames_dir.join(format!("{:04}.png", i + 1)));
        assert_eq!((w, h), (32, 32));
        assert_eq!(pixels, image.pixels, "frame {i}");
    }
    assert!(!frames_dir.join("0006.png").exists());
    let apng = dir.join("anim.apng");
    let out = tcd(&cli_args(
        &model,
        &apng.to_string_lossy(),
        &["--frames", "3"],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reader = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&apng).expect("apng"),
    ))
    .read_info()
    .expect("a PNG");
    assert_eq!(
        reader.info().animation_control().map(|a| a.num_frames),
        Some(3)
    );
}

#[test]
fn the_command_line_refuses_bad_animation_requests_before_loading() {
    let dir = scratch_dir("animatediff-cli-bad");
    let model = model().to_string_lossy().into_owned();
    let still = committed_model("tiny-sd15");
    let gif = dir.join("a.gif");
    let png = dir.join("a.png");
    let (gif_s, png_s) = (gif.to_string_lossy(), png.to_string_lossy());
    assert_refused(
        &cli_args(&model, &gif_s, &["--frames", "0"]),
        "--frames",
        &gif,
    );
    assert_refused(
        &cli_args(&model, &gif_s, &["--frames", "100000"]),
        "--frames",
        &gif,
    );
    assert_refused(&cli_args(&model, &gif_s, &["--fps", "0"]), "--fps", &gif);
    assert_refused(
        &cli_args(&model, &gif_s, &["--decode-chunk", "0"]),
        "--decode-chunk",
        &gif,
    );
    assert_refused(&cli_args(&model, &png_s, &[]), "makes animations", &png);
    assert_refused(&cli_args(&still, &gif_s, &[]), "makes still images", &gif);
    assert_refused(
        &cli_args(&still, &png_s, &["--frames", "8"]),
        "--frames",
        &png,
    );
    assert_refused(&cli_args(&model, &png_s, &["--fps", "8"]), "--fps", &png);
}

#[test]
fn the_c_abi_returns_every_frame_and_writes_animations() {
    use crate::ffi::{check, cstr, new_engine, result_images};
    use std::ptr::null_mut;
    use tcd_ort::ffi::*;
    let dir = scratch_dir("animatediff-ffi");
    let (status, engine) = new_engine(&model().to_string_lossy());
    check(status, tcd_status::TCD_OK);
    let request = tcd_request_new();
    let prompt = cstr("a cat");
    let gif = cstr(&dir.join("a.gif").to_string_lossy());
    let frames_dir = cstr(&dir.join("frames").to_string_lossy());
    // SAFETY: live handles, NUL-terminated strings, local out pointers.
    unsafe {
        check(
            tcd_request_set_prompt(request, prompt.as_ptr()),
            tcd_status::TCD_OK,
        );
        check(tcd_request_set_steps(request, 2), tcd_status::TCD_OK);
        check(tcd_request_set_seed(request, 3), tcd_status::TCD_OK);
        check(tcd_request_set_size(request, 32, 32), tcd_status::TCD_OK);
        check(tcd_request_set_frames(request, 5), tcd_status::TCD_OK);
        check(tcd_request_set_decode_chunk(request, 2), tcd_status::TCD_OK);
        let mut result = null_mut();
        check(
            tcd_engine_generate(engine, request, None, null_mut(), &mut result),
            tcd_status::TCD_OK,
        );
        assert_eq!(tcd_result_frames(result), 5);
        let images = result_images(result);
        assert_eq!(images.len(), 5);
        check(
            tcd_result_write_animation(result, 0, gif.as_ptr(), 8, 0),
            tcd_status::TCD_OK,
        );
        check(
            tcd_result_write_animation(result, 0, frames_dir.as_ptr(), 8, 0),
            tcd_status::TCD_OK,
        );
        // Written once; again only with overwrite, and only videos that exist.
        check(
            tcd_result_write_animation(result, 0, gif.as_ptr(), 8, 0),
            tcd_status::TCD_ERR_INVALID_ARGUMENT,
        );
        check(
            tcd_result_write_animation(result, 1, gif.as_ptr(), 8, 1),
            tcd_status::TCD_ERR_INVALID_ARGUMENT,
        );
        check(
            tcd_result_write_animation(result, 0, gif.as_ptr(), 0, 1),
            tcd_status::TCD_ERR_INVALID_ARGUMENT,
        );
        let (_, _, last) = read_png_rgb(&dir.join("frames").join("0005.png"));
        assert_eq!(last, images[4].2);
        assert_eq!(tcd_result_frames(std::ptr::null()), 0);
        tcd_result_free(result);
        // Frames past the motion module's maximum fail the generation.
        check(tcd_request_set_frames(request, 100_000), tcd_status::TCD_OK);
        let mut result = null_mut();
        check(
            tcd_engine_generate(engine, request, None, null_mut(), &mut result),
            tcd_status::TCD_ERR_INVALID_ARGUMENT,
        );
        check(tcd_request_set_decode_chunk(request, 0), tcd_status::TCD_OK);
        tcd_request_free(request);
        tcd_engine_free(engine);
    }
}

/// The latents file of the demo's still images keeps its 4-dimensional shape.
#[test]
fn still_images_report_one_frame() {
    let mut still = Engine::load(committed_model("tiny-sd15"), &EngineOptions::default())
        .expect("the demo model");
    let out = still
        .generate(&small_request(None), &mut |_| true)
        .expect("generates");
    assert_eq!(out.frames, 1);
    assert_eq!(
        out.latents.view().into_dimensionality::<Ix4>().map(|_| ()),
        Ok(())
    );
}
