//! The C ABI (`tcd_ort::ffi`), called through its Rust symbols exactly as a C host would: the
//! committed header matches the code, the pixels match the Rust API's, NULL is handled
//! everywhere, and errors and cancellation come back as status codes with messages.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::ptr::{null, null_mut};

use tcd_ort::ffi::*;
use tcd_ort::pipeline::{
    ControlImage, ControlPreprocess, Engine, EngineOptions, GenerateRequest, InpaintMode, Task,
};

use crate::common::{committed_model, repo_root};

fn header_path() -> PathBuf {
    repo_root().join("include").join("tcd_ort.h")
}

fn generated_header() -> String {
    let root = repo_root();
    let config = cbindgen::Config::from_file(root.join("include").join("cbindgen.toml"))
        .expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src").join("ffi").join("mod.rs"))
        .generate()
        .expect("cbindgen parses src/ffi");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

/// The committed header is what cbindgen makes of src/ffi/ (CI fails on drift).
#[test]
fn header_matches_the_code() {
    let generated = generated_header();
    if std::env::var_os("TCD_ORT_UPDATE_HEADER").is_some() {
        std::fs::write(header_path(), &generated).expect("write include/tcd_ort.h");
        return;
    }
    let committed = std::fs::read_to_string(header_path()).unwrap_or_default();
    assert!(
        committed == generated,
        "include/tcd_ort.h is out of date with src/ffi/; regenerate it with \
         `TCD_ORT_UPDATE_HEADER=1 cargo test --test it ffi::header` and commit it"
    );
}

fn demo_model() -> String {
    committed_model("tiny-sd15")
}

pub(crate) fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

/// The calling thread's last error message, read the way the header documents.
pub(crate) fn last_error() -> String {
    // SAFETY: a NULL buffer with length 0 only asks for the length.
    let n = unsafe { tcd_last_error_message(null_mut(), 0) };
    let mut buf = vec![0u8; n + 1];
    // SAFETY: buf has n + 1 writable bytes.
    let written = unsafe { tcd_last_error_message(buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(written, n);
    CStr::from_bytes_with_nul(&buf)
        .expect("NUL-terminated")
        .to_string_lossy()
        .into_owned()
}

/// Asserts a status, showing the message when it differs.
pub(crate) fn check(status: tcd_status, expected: tcd_status) {
    assert_eq!(status, expected, "last error: {}", last_error());
}

pub(crate) fn new_engine(model: &str) -> (tcd_status, *mut tcd_engine) {
    let options = tcd_engine_options_new();
    assert!(!options.is_null());
    let model = cstr(model);
    let mut engine = null_mut();
    // SAFETY: live handles and NUL-terminated strings throughout.
    let status = unsafe {
        check(
            tcd_engine_options_set_model(options, model.as_ptr()),
            tcd_status::TCD_OK,
        );
        check(
            tcd_engine_options_set_providers(options, c"cpu".as_ptr()),
            tcd_status::TCD_OK,
        );
        let status = tcd_engine_new(options, &mut engine);
        tcd_engine_options_free(options);
        status
    };
    (status, engine)
}

pub(crate) fn demo_engine() -> *mut tcd_engine {
    let (status, engine) = new_engine(&demo_model());
    check(status, tcd_status::TCD_OK);
    assert!(!engine.is_null());
    engine
}

/// Copies every image of a result out as (width, height, RGB bytes).
pub(crate) fn result_images(result: *const tcd_result) -> Vec<(u32, u32, Vec<u8>)> {
    // SAFETY: result is live; the out pointers are locals.
    unsafe {
        (0..tcd_result_count(result))
            .map(|i| {
                let (mut w, mut h, mut stride, mut pixels) = (0u32, 0u32, 0usize, null());
                check(
                    tcd_result_image(result, i, &mut w, &mut h, &mut stride, &mut pixels),
                    tcd_status::TCD_OK,
                );
                assert_eq!(stride, w as usize * 3, "RGB8, tightly packed");
                let bytes = std::slice::from_raw_parts(pixels, stride * h as usize).to_vec();
                (w, h, bytes)
            })
            .collect()
    }
}

const PROMPT: &str = "a photo of an astronaut riding a horse on mars";

/// A request with the settings the parity tests share.
pub(crate) fn parity_request() -> *mut tcd_request {
    let request = tcd_request_new();
    let prompt = cstr(PROMPT);
    // SAFETY: request is live; strings are NUL-terminated.
    unsafe {
        check(
            tcd_request_set_prompt(request, prompt.as_ptr()),
            tcd_status::TCD_OK,
        );
        check(
            tcd_request_set_negative_prompt(request, c"blurry".as_ptr()),
            tcd_status::TCD_OK,
        );
        check(tcd_request_set_steps(request, 3), tcd_status::TCD_OK);
        check(tcd_request_set_eta(request, 0.5), tcd_status::TCD_OK);
        check(tcd_request_set_guidance(request, 2.0), tcd_status::TCD_OK);
        check(tcd_request_set_seed(request, 1234), tcd_status::TCD_OK);
        check(tcd_request_set_num_images(request, 2), tcd_status::TCD_OK);
    }
    request
}

pub(crate) fn rust_request() -> GenerateRequest {
    GenerateRequest {
        prompt: PROMPT.into(),
        negative_prompt: Some("blurry".into()),
        steps: 3,
        eta: 0.5,
        guidance: 2.0,
        seed: 1234,
        num_images: 2,
        ..GenerateRequest::default()
    }
}

fn rust_images(task: &Task) -> Vec<(u32, u32, Vec<u8>)> {
    let mut engine = Engine::load(demo_model(), &EngineOptions::default()).expect("load");
    engine
        .run(&rust_request(), task, &mut |_| true)
        .expect("generate")
        .images
        .into_iter()
        .map(|i| (i.width, i.height, i.pixels))
        .collect()
}

pub(crate) fn generate(
    engine: *mut tcd_engine,
    request: *const tcd_request,
) -> Vec<(u32, u32, Vec<u8>)> {
    let mut result = null_mut();
    // SAFETY: live handles; no callback.
    unsafe {
        check(
            tcd_engine_generate(engine, request, None, null_mut(), &mut result),
            tcd_status::TCD_OK,
        );
        let images = result_images(result);
        tcd_result_free(result);
        images
    }
}

/// The C ABI gives byte-identical pixels to `Engine::run` for the same text-to-image request
/// (with a negative prompt, guidance and several images).
#[test]
fn text_to_image_pixels_match_the_rust_api() {
    let engine = demo_engine();
    let request = parity_request();
    let images = generate(engine, request);
    // SAFETY: handles from their constructors, freed once.
    unsafe {
        tcd_request_free(request);
        tcd_engine_free(engine);
    }
    assert_eq!(images.len(), 2);
    assert_eq!(images, rust_images(&Task::TextToImage));
}

/// A 40x32 RGBA test pattern in rows of `stride` bytes (padding filled with junk), and the RGB
/// image the Rust API gets for it.
fn pattern(stride: usize, mask: bool) -> (Vec<u8>, tcd_ort::image_io::RgbImage) {
    let (w, h) = (40usize, 32usize);
    let mut rgba = vec![0xAB; stride * h];
    let mut rgb = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let px = if mask {
                let v = if (12..28).contains(&x) { 255 } else { 0 };
                [v, v, v]
            } else {
                [(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8]
            };
            rgba[y * stride + x * 4..y * stride + x * 4 + 4]
                .copy_from_slice(&[px[0], px[1], px[2], 77]);
            rgb.extend_from_slice(&px);
        }
    }
    (
        rgba,
        tcd_ort::image_io::RgbImage::new(w as u32, h as u32, rgb).expect("pattern"),
    )
}

/// Image-to-image and inpainting through the C ABI (RGBA input with a padded stride) match
/// `Engine::run` byte for byte.
#[test]
fn image_to_image_and_inpainting_pixels_match_the_rust_api() {
    let engine = demo_engine();
    let stride = 40 * 4 + 12;
    let (image_rgba, image) = pattern(stride, false);
    let (mask_rgba, mask) = pattern(stride, true);
    let request = parity_request();
    // SAFETY: live handles; the buffers hold `stride * 32` bytes.
    let (img2img, inpaint) = unsafe {
        check(
            tcd_request_set_image(request, image_rgba.as_ptr(), 40, 32, stride),
            tcd_status::TCD_OK,
        );
        check(
            tcd_request_set_task(request, tcd_task::TCD_TASK_IMG2IMG as i32),
            tcd_status::TCD_OK,
        );
        check(tcd_request_set_strength(request, 0.7), tcd_status::TCD_OK);
        let img2img = generate(engine, request);
        check(
            tcd_request_set_mask(request, mask_rgba.as_ptr(), 40, 32, stride),
            tcd_status::TCD_OK,
        );
        check(
            tcd_request_set_task(request, tcd_task::TCD_TASK_INPAINT as i32),
            tcd_status::TCD_OK,
        );
        check(
            tcd_request_set_inpaint_mode(request, tcd_inpaint_mode::TCD_INPAINT_BLEND as i32),
            tcd_status::TCD_OK,
        );
        let inpaint = generate(engine, request);
        tcd_request_free(request);
        tcd_engine_free(engine);
        (img2img, inpaint)
    };
    assert_eq!(
        img2img,
        rust_images(&Task::ImageToImage {
            image: image.clone(),
            strength: 0.7,
        })
    );
    assert_eq!(
        inpaint,
        rust_images(&Task::Inpaint {
            image,
            mask,
            strength: 0.7,
            mode: InpaintMode::Blend,
        })
    );
}

/// Control images through the C ABI (RGBA with a padded stride, a Canny-preprocessed one and a
/// guidance window) give the same pixels as `Engine::run` with the same ControlNet.
#[test]
fn controlnet_pixels_match_the_rust_api() {
    let controlnet = repo_root()
        .join("models")
        .join("tiny-sd15-controlnet")
        .to_string_lossy()
        .into_owned();
    let options = tcd_engine_options_new();
    let (model, net) = (cstr(&demo_model()), cstr(&controlnet));
    let mut engine = null_mut();
    let stride = 40 * 4 + 12;
    let (rgba, image) = pattern(stride, false);
    // SAFETY: live handles, NUL-terminated strings, buffers of `stride * 32` bytes.
    let c_images = unsafe {
        check(
            tcd_engine_options_set_model(options, model.as_ptr()),
            tcd_status::TCD_OK,
        );
        check(
            tcd_engine_options_add_controlnet(options, net.as_ptr()),
            tcd_status::TCD_OK,
        );
        check(tcd_engine_new(options, &mut engine), tcd_status::TCD_OK);
        tcd_engine_options_free(options);
        let request = parity_request();
        check(
            tcd_request_set_canny_thresholds(request, 50.0, 150.0),
            tcd_status::TCD_OK,
        );
        check(
            tcd_request_add_control_image(
                request,
                rgba.as_ptr(),
                40,
                32,
                stride,
                0.5,
                0.0,
                0.7,
                tcd_control_preprocess::TCD_CONTROL_CANNY as i32,
            ),
            tcd_status::TCD_OK,
        );
        let images = generate(engine, request);
        tcd_request_free(request);
        tcd_engine_free(engine);
        images
    };
    let options = EngineOptions {
        controlnets: vec![controlnet],
        ..EngineOptions::default()
    };
    let mut rust = Engine::load(demo_model(), &options).expect("load with a ControlNet");
    let request = GenerateRequest {
        control: vec![ControlImage {
            scale: 0.5,
            start: 0.0,
            end: 0.7,
            preprocess: ControlPreprocess::Canny {
                low: 50.0,
                high: 150.0,
            },
            ..ControlImage::new(image)
        }],
        ..rust_request()
    };
    let out = rust.generate(&request, &mut |_| true).expect("generate");
    let rust_images: Vec<_> = out
        .images
        .into_iter()
        .map(|i| (i.width, i.height, i.pixels))
        .collect();
    assert_eq!(c_images.len(), 2);
    assert_eq!(c_images, rust_images);
    // And the control image changed the result.
    assert_ne!(c_images, self::rust_images(&Task::TextToImage));
}

/// Every `_free` accepts NULL.
#[test]
fn free_functions_accept_null() {
    // SAFETY: NULL is documented as a no-op.
    unsafe {
        tcd_engine_options_free(null_mut());
        tcd_engine_free(null_mut());
        tcd_request_free(null_mut());
        tcd_result_free(null_mut());
        assert_eq!(tcd_result_count(null()), 0);
    }
}

/// A NULL where a pointer is required is `TCD_ERR_NULL_POINTER` with a message naming it.
#[test]
fn null_required_pointers_are_errors_with_messages() {
    use tcd_status::TCD_ERR_NULL_POINTER as NULL;
    let options = tcd_engine_options_new();
    let request = tcd_request_new();
    // SAFETY: a live request and a NUL-terminated string.
    unsafe { tcd_request_set_prompt(request, c"a cat".as_ptr()) };
    let px = [0u8; 4];
    let mut out_engine = null_mut();
    let mut out_result = null_mut();
    let (mut w, mut h, mut stride, mut pixels) = (0u32, 0u32, 0usize, null());
    let expect = |status: tcd_status, what: &str| {
        assert_eq!(status, NULL, "for {what}");
        let message = last_error();
        assert!(
            message.contains(&format!("`{what}` is NULL")),
            "{what}: {message}"
        );
    };
    // SAFETY: every handle is live or NULL, as each test case intends.
    unsafe {
        let o = null_mut();
        expect(tcd_engine_options_set_model(o, c"m".as_ptr()), "options");
        expect(tcd_engine_options_set_model(options, null()), "model");
        expect(tcd_engine_options_set_revision(o, null()), "options");
        expect(
            tcd_engine_options_set_providers(o, c"cpu".as_ptr()),
            "options",
        );
        expect(
            tcd_engine_options_set_providers(options, null()),
            "providers",
        );
        expect(tcd_engine_options_set_device_id(o, 0), "options");
        expect(tcd_engine_options_set_ort_library(o, null()), "options");
        expect(tcd_engine_options_set_threads(o, 1), "options");
        expect(tcd_engine_options_set_io_binding(o, 0), "options");
        expect(tcd_engine_options_set_cpu_arena(o, 1), "options");
        expect(tcd_engine_options_set_low_memory(o, 1), "options");
        expect(tcd_engine_options_set_release_after_use(o, 1), "options");
        expect(tcd_engine_options_set_fixed_shape(o, 0, 0, 0), "options");
        expect(
            tcd_engine_options_add_lora(o, c"x".as_ptr(), 1.0),
            "options",
        );
        expect(tcd_engine_options_add_lora(options, null(), 1.0), "source");
        expect(
            tcd_engine_options_set_lora_weight_name(o, null()),
            "options",
        );
        expect(tcd_engine_options_set_lora_allow_unmatched(o, 1), "options");
        expect(tcd_engine_new(null(), &mut out_engine), "options");
        assert!(out_engine.is_null());
        expect(tcd_engine_new(options, null_mut()), "out_engine");

        let r = null_mut();
        expect(tcd_request_set_task(r, 0), "request");
        expect(tcd_request_set_prompt(r, c"p".as_ptr()), "request");
        expect(tcd_request_set_negative_prompt(r, null()), "request");
        expect(tcd_request_set_steps(r, 1), "request");
        expect(tcd_request_set_eta(r, 0.3), "request");
        expect(tcd_request_set_guidance(r, 0.0), "request");
        expect(tcd_request_set_seed(r, 0), "request");
        expect(tcd_request_set_size(r, 0, 0), "request");
        expect(tcd_request_set_num_images(r, 1), "request");
        expect(tcd_request_set_original_inference_steps(r, 0), "request");
        expect(tcd_request_set_strength(r, 0.5), "request");
        expect(tcd_request_set_inpaint_mode(r, 0), "request");
        expect(tcd_request_set_image(r, px.as_ptr(), 1, 1, 0), "request");
        expect(tcd_request_set_image(request, null(), 1, 1, 0), "pixels");
        expect(tcd_request_set_mask(r, px.as_ptr(), 1, 1, 0), "request");
        expect(tcd_request_set_mask(request, null(), 1, 1, 0), "pixels");

        expect(
            tcd_engine_generate(null_mut(), request, None, null_mut(), &mut out_result),
            "engine",
        );
        assert!(out_result.is_null());
        expect(
            tcd_engine_generate(null_mut(), request, None, null_mut(), null_mut()),
            "out_result",
        );
        expect(
            tcd_result_image(null(), 0, &mut w, &mut h, &mut stride, &mut pixels),
            "result",
        );
        tcd_engine_options_free(options);
        tcd_request_free(request);
    }
}

/// With a real engine and result, the remaining NULL cases.
#[test]
fn null_request_and_result_outputs_are_errors() {
    let engine = demo_engine();
    let request = tcd_request_new();
    // SAFETY: a live request and a NUL-terminated string.
    unsafe { tcd_request_set_prompt(request, c"a cat".as_ptr()) };
    let mut result = null_mut();
    let (mut w, mut h, mut stride, mut pixels) = (0u32, 0u32, 0usize, null());
    // SAFETY: live handles or NULL, as each case intends.
    unsafe {
        check(tcd_request_set_steps(request, 1), tcd_status::TCD_OK);
        check(
            tcd_engine_generate(engine, null(), None, null_mut(), &mut result),
            tcd_status::TCD_ERR_NULL_POINTER,
        );
        assert!(last_error().contains("`request` is NULL"));
        check(
            tcd_engine_generate(engine, request, None, null_mut(), &mut result),
            tcd_status::TCD_OK,
        );
        assert_eq!(tcd_result_count(result), 1);
        let null_output = |status: tcd_status, what: &str| {
            assert_eq!(status, tcd_status::TCD_ERR_NULL_POINTER, "{what}");
            let message = last_error();
            assert!(message.contains(&format!("`{what}` is NULL")), "{message}");
        };
        null_output(
            tcd_result_image(result, 0, null_mut(), &mut h, &mut stride, &mut pixels),
            "out_width",
        );
        null_output(
            tcd_result_image(result, 0, &mut w, null_mut(), &mut stride, &mut pixels),
            "out_height",
        );
        null_output(
            tcd_result_image(result, 0, &mut w, &mut h, null_mut(), &mut pixels),
            "out_stride",
        );
        null_output(
            tcd_result_image(result, 0, &mut w, &mut h, &mut stride, null_mut()),
            "out_pixels",
        );
        check(
            tcd_result_image(result, 1, &mut w, &mut h, &mut stride, &mut pixels),
            tcd_status::TCD_ERR_INVALID_ARGUMENT,
        );
        assert!(last_error().contains("out of range"), "{}", last_error());
        assert!(pixels.is_null(), "outputs untouched on failure");
        tcd_result_free(result);
        tcd_request_free(request);
        tcd_engine_free(engine);
    }
}

struct Cancel {
    calls: Vec<(u32, u32)>,
    cancel_at: u32,
}

unsafe extern "C-unwind" fn on_progress(user_data: *mut c_void, step: u32, total: u32) -> c_int {
    // SAFETY: the tests pass a live `Cancel` as user data.
    let cancel = unsafe { &mut *user_data.cast::<Cancel>() };
    cancel.calls.push((step, total));
    c_int::from(step >= cancel.cancel_at)
}

/// A callback returning nonzero cancels with `TCD_ERR_CANCELLED`; the engine stays usable and
/// a callback returning 0 sees every step.
#[test]
fn the_progress_callback_cancels() {
    let engine = demo_engine();
    let request = tcd_request_new();
    // SAFETY: a live request and a NUL-terminated string.
    unsafe { tcd_request_set_prompt(request, c"a cat".as_ptr()) };
    let mut result = null_mut();
    let mut cancel = Cancel {
        calls: Vec::new(),
        cancel_at: 2,
    };
    // SAFETY: live handles; `cancel` outlives the calls that use it.
    unsafe {
        check(tcd_request_set_steps(request, 4), tcd_status::TCD_OK);
        let user_data = (&mut cancel as *mut Cancel).cast::<c_void>();
        check(
            tcd_engine_generate(engine, request, Some(on_progress), user_data, &mut result),
            tcd_status::TCD_ERR_CANCELLED,
        );
        assert!(result.is_null());
        assert!(last_error().contains("cancelled"), "{}", last_error());
        assert_eq!(cancel.calls, [(1, 4), (2, 4)]);

        cancel.calls.clear();
        cancel.cancel_at = u32::MAX;
        let user_data = (&mut cancel as *mut Cancel).cast::<c_void>();
        check(
            tcd_engine_generate(engine, request, Some(on_progress), user_data, &mut result),
            tcd_status::TCD_OK,
        );
        assert_eq!(cancel.calls, [(1, 4), (2, 4), (3, 4), (4, 4)]);
        assert_eq!(last_error(), "", "a successful call clears the message");
        tcd_result_free(result);
        tcd_request_free(request);
        tcd_engine_free(engine);
    }
}

/// `tcd_last_error_message` reports the full length, truncates to the buffer (at a character
/// boundary, always NUL-terminated) and writes nothing for a NULL or empty buffer.
#[test]
fn error_messages_fit_any_buffer() {
    let request = tcd_request_new();
    // SAFETY: a live request and a NUL-terminated string.
    unsafe { tcd_request_set_prompt(request, c"a cat".as_ptr()) };
    // SAFETY: live handle; buffers of the lengths passed.
    unsafe {
        check(
            tcd_request_set_steps(request, 0),
            tcd_status::TCD_ERR_INVALID_ARGUMENT,
        );
        let full = last_error();
        assert_eq!(
            full,
            "tcd_request_set_steps: steps must be at least 1 (TCD works well with 2 to 8)"
        );
        let mut small = [0x55 as c_char; 8];
        assert_eq!(
            tcd_last_error_message(small.as_mut_ptr(), small.len()),
            full.len()
        );
        assert_eq!(
            CStr::from_ptr(small.as_ptr()).to_str().expect("UTF-8"),
            &full[..7]
        );
        let mut untouched = [0x55 as c_char; 1];
        assert_eq!(
            tcd_last_error_message(untouched.as_mut_ptr(), 0),
            full.len()
        );
        assert_eq!(untouched[0], 0x55);
        assert_eq!(
            tcd_last_error_message(untouched.as_mut_ptr(), 1),
            full.len()
        );
        assert_eq!(untouched[0], 0);

        // A multi-byte character is never split.
        let prompt = c"\xff".as_ptr();
        check(
            tcd_request_set_prompt(request, prompt),
            tcd_status::TCD_ERR_INVALID_ARGUMENT,
        );
        let message = last_error();
        assert!(message.contains("not valid UTF-8"), "{message}");
        let mut snowman = Vec::new();
        snowman.extend_from_slice(b"\xe2\x98\x83\0");
        let ok = CStr::from_bytes_with_nul(&snowman).expect("C string");
        check(
            tcd_request_set_prompt(request, ok.as_ptr()),
            tcd_status::TCD_OK,
        );
        check(
            tcd_request_set_eta(request, f32::NAN),
            tcd_status::TCD_ERR_INVALID_ARGUMENT,
        );
        tcd_request_free(request);
    }
    // Messages are per thread.
    std::thread::spawn(|| assert_eq!(last_error(), ""))
        .join()
        .expect("thread");
}

/// Bad input is reported with the documented code and a message saying what to change,
/// before anything is loaded where possible.
#[test]
fn bad_input_is_reported() {
    use tcd_status::*;
    let options = tcd_engine_options_new();
    let request = tcd_request_new();
    // SAFETY: a live request and a NUL-terminated string.
    unsafe { tcd_request_set_prompt(request, c"a cat".as_ptr()) };
    let mut engine = null_mut();
    // SAFETY: live handles; NUL-terminated strings.
    unsafe {
        check(
            tcd_engine_new(options, &mut engine),
            TCD_ERR_INVALID_ARGUMENT,
        );
        assert!(last_error().contains("tcd_engine_options_set_model"));
        check(
            tcd_engine_options_set_providers(options, c"cpu,quantum".as_ptr()),
            TCD_ERR_INVALID_ARGUMENT,
        );
        assert!(last_error().contains("quantum"), "{}", last_error());
        check(
            tcd_engine_options_set_device_id(options, -1),
            TCD_ERR_INVALID_ARGUMENT,
        );
        check(
            tcd_engine_options_add_lora(options, c"x.safetensors".as_ptr(), f32::INFINITY),
            TCD_ERR_INVALID_ARGUMENT,
        );
        let invalid = |status: tcd_status, needle: &str| {
            assert_eq!(status, TCD_ERR_INVALID_ARGUMENT, "{needle}");
            let message = last_error();
            assert!(message.contains(needle), "{needle}: {message}");
        };
        invalid(tcd_request_set_steps(request, 0), "steps");
        invalid(tcd_request_set_eta(request, 1.5), "eta");
        invalid(tcd_request_set_guidance(request, -1.0), "guidance");
        invalid(tcd_request_set_size(request, 100, 64), "width");
        invalid(tcd_request_set_num_images(request, 0), "num_images");
        invalid(tcd_request_set_strength(request, 0.0), "strength");
        invalid(tcd_request_set_task(request, 7), "unknown task");
        invalid(
            tcd_request_set_inpaint_mode(request, 9),
            "unknown inpaint mode",
        );
        let px = [0u8; 8];
        invalid(
            tcd_request_set_image(request, px.as_ptr(), 2, 1, 4),
            "stride",
        );
        invalid(
            tcd_request_set_image(request, px.as_ptr(), 0, 1, 0),
            "empty",
        );
        tcd_engine_options_free(options);
    }

    let missing = repo_root().join("models").join("no-such-model");
    let (status, engine) = new_engine(&missing.to_string_lossy());
    check(status, TCD_ERR_MODEL);
    assert!(engine.is_null());
    assert!(
        last_error().contains("no such directory"),
        "{}",
        last_error()
    );

    let engine = demo_engine();
    let mut result = null_mut();
    // SAFETY: live handles.
    unsafe {
        check(tcd_request_set_steps(request, 1), TCD_OK);
        check(
            tcd_request_set_task(request, tcd_task::TCD_TASK_IMG2IMG as i32),
            TCD_OK,
        );
        check(
            tcd_engine_generate(engine, request, None, null_mut(), &mut result),
            TCD_ERR_INVALID_ARGUMENT,
        );
        assert!(last_error().contains("tcd_request_set_image"));
        check(
            tcd_request_set_task(request, tcd_task::TCD_TASK_TXT2IMG as i32),
            TCD_OK,
        );
        tcd_result_free(result);
        tcd_request_free(request);
        tcd_engine_free(engine);
    }
}

/// Status names and the version are static strings.
#[test]
fn status_names_and_version() {
    let name = |s: i32| {
        // SAFETY: tcd_status_name never returns NULL and the string is static.
        unsafe { CStr::from_ptr(tcd_status_name(s)) }
            .to_str()
            .expect("UTF-8")
            .to_string()
    };
    assert_eq!(name(0), "TCD_OK");
    assert_eq!(
        name(tcd_status::TCD_ERR_CANCELLED as i32),
        "TCD_ERR_CANCELLED"
    );
    assert_eq!(name(tcd_status::TCD_ERR_PANIC as i32), "TCD_ERR_PANIC");
    assert_eq!(
        name(tcd_status::TCD_ERR_INTERNAL as i32),
        "TCD_ERR_INTERNAL"
    );
    assert_eq!(name(-3), "TCD_ERR_UNKNOWN");
    // SAFETY: as above.
    let version = unsafe { CStr::from_ptr(tcd_version()) };
    assert_eq!(version.to_str(), Ok(env!("CARGO_PKG_VERSION")));
}

/// An engine is Send: it can be created on one thread and generate on another.
#[test]
fn an_engine_moves_between_threads() {
    struct Handle(*mut tcd_engine);
    // SAFETY: the header documents tcd_engine as Send (one call at a time).
    unsafe impl Send for Handle {}
    let handle = Handle(demo_engine());
    let images = std::thread::spawn(move || {
        let handle = handle;
        let request = tcd_request_new();
        // SAFETY: a live request and a NUL-terminated string.
        unsafe { tcd_request_set_prompt(request, c"a cat".as_ptr()) };
        // SAFETY: the engine is used by this thread only, then freed once.
        unsafe {
            check(tcd_request_set_steps(request, 1), tcd_status::TCD_OK);
            let images = generate(handle.0, request);
            tcd_request_free(request);
            tcd_engine_free(handle.0);
            images
        }
    })
    .join()
    .expect("thread");
    assert_eq!(images.len(), 1);
}

/// Provider and session settings: bad values are `TCD_ERR_INVALID_ARGUMENT` naming what is
/// accepted, a GPU provider the CPU build lacks fails at `tcd_engine_new` naming the package,
/// and the session summary names each graph's provider and the cache outcome.
#[test]
fn provider_and_session_options() {
    use tcd_status::*;
    let cache = crate::common::scratch_dir("ffi-session-cache");
    let options = tcd_engine_options_new();
    let model = cstr(&demo_model());
    let cache_s = cstr(&cache.to_string_lossy());
    let mut engine = null_mut();
    // SAFETY: live handles; NUL-terminated strings or NULL where documented.
    unsafe {
        let invalid = |status: tcd_status, needle: &str| {
            assert_eq!(status, TCD_ERR_INVALID_ARGUMENT, "{needle}");
            let message = last_error();
            assert!(message.contains(needle), "{needle}: {message}");
        };
        invalid(
            tcd_engine_options_set_opt_level(options, c"fast".as_ptr()),
            "disable, basic, extended, all",
        );
        invalid(
            tcd_engine_options_set_cuda(options, c"slow".as_ptr(), null(), 0),
            "exhaustive",
        );
        invalid(
            tcd_engine_options_set_cuda(options, null(), c"double".as_ptr(), 0),
            "same-as-requested",
        );
        invalid(
            tcd_engine_options_set_tensorrt(options, 1, null(), c"512x512".as_ptr()),
            "WIDTHxHEIGHTxBATCH",
        );
        invalid(
            tcd_engine_options_set_coreml_units(options, c"gpu".as_ptr()),
            "cpu-and-gpu",
        );
        invalid(
            tcd_engine_options_set_session_cache(options, c"".as_ptr()),
            "empty session cache",
        );
        check(
            tcd_engine_options_set_cuda(options, c"exhaustive".as_ptr(), null(), 1 << 30),
            TCD_OK,
        );
        check(
            tcd_engine_options_set_tensorrt(options, 0, null(), c"512x512x1".as_ptr()),
            TCD_OK,
        );
        check(
            tcd_engine_options_set_model(options, model.as_ptr()),
            TCD_OK,
        );
        check(
            tcd_engine_options_set_providers(options, c"cuda".as_ptr()),
            TCD_OK,
        );
        check(tcd_engine_new(options, &mut engine), TCD_ERR_RUNTIME);
        assert!(last_error().contains("onnxruntime-gpu"), "{}", last_error());

        check(
            tcd_engine_options_set_providers(options, c"cpu".as_ptr()),
            TCD_OK,
        );
        check(
            tcd_engine_options_set_opt_level(options, c"extended".as_ptr()),
            TCD_OK,
        );
        check(
            tcd_engine_options_set_session_cache(options, cache_s.as_ptr()),
            TCD_OK,
        );
        check(tcd_engine_new(options, &mut engine), TCD_OK);
        let summary = session_summary(engine);
        assert!(
            summary.contains("unet: CPUExecutionProvider [session cache: stored] [io binding]"),
            "{summary}"
        );
        assert_eq!(summary.matches("[io binding]").count(), 1, "{summary}");
        assert_eq!(summary.lines().count(), 4, "{summary}");
        assert_eq!(tcd_engine_session_summary(null(), null_mut(), 0), 0);
        tcd_engine_free(engine);

        // Under a limit smaller than every graph nothing is stored, and the summary says why.
        check(
            tcd_engine_options_set_session_cache_limit(null_mut(), 1),
            TCD_ERR_NULL_POINTER,
        );
        check(
            tcd_engine_options_set_session_cache_limit(options, 1 << 20),
            TCD_OK,
        );
        check(tcd_engine_new(options, &mut engine), TCD_OK);
        let summary = session_summary(engine);
        assert_eq!(
            summary
                .matches("exceed the session cache's limit of 1.0 MiB")
                .count(),
            4,
            "{summary}"
        );
        tcd_engine_free(engine);
        tcd_engine_options_free(options);
    }
    let _ = std::fs::remove_dir_all(&cache);
}

/// The engine's session summary, read as the C API documents (size, then the text).
///
/// # Safety
///
/// `engine` is a live engine.
unsafe fn session_summary(engine: *const tcd_engine) -> String {
    // SAFETY: the caller's contract.
    let n = unsafe { tcd_engine_session_summary(engine, null_mut(), 0) };
    let mut buf = vec![0u8; n + 1];
    // SAFETY: `buf` holds `buf.len()` bytes.
    let written = unsafe { tcd_engine_session_summary(engine, buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(written, n);
    CStr::from_bytes_with_nul(&buf)
        .expect("NUL-terminated")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn fixed_shape_options_check_their_sizes() {
    let options = tcd_engine_options_new();
    assert!(!options.is_null());
    // SAFETY: `options` is live until freed at the end.
    unsafe {
        check(
            tcd_engine_options_set_fixed_shape(options, 512, 512, 2),
            tcd_status::TCD_OK,
        );
        check(
            tcd_engine_options_set_fixed_shape(options, 0, 0, 0),
            tcd_status::TCD_OK,
        );
        for (w, h, b) in [(500, 512, 1), (512, 512, 0), (0, 512, 1)] {
            check(
                tcd_engine_options_set_fixed_shape(options, w, h, b),
                tcd_status::TCD_ERR_INVALID_ARGUMENT,
            );
            assert!(last_error().contains("multiples of 8"), "{}", last_error());
        }
        tcd_engine_options_free(options);
    }
}

/// A prompt past CLIP's 77 tokens comes back as a warning on the result (the library writes
/// nothing to stderr); a short one gives none.
#[test]
fn a_truncated_prompt_is_a_warning_on_the_result() {
    let engine = demo_engine();
    let warnings = |prompt: &str| -> String {
        let request = tcd_request_new();
        let prompt = cstr(prompt);
        let mut result = null_mut();
        // SAFETY: live handles, NUL-terminated strings, buffers of the sizes given.
        unsafe {
            check(
                tcd_request_set_prompt(request, prompt.as_ptr()),
                tcd_status::TCD_OK,
            );
            check(tcd_request_set_steps(request, 1), tcd_status::TCD_OK);
            check(
                tcd_engine_generate(engine, request, None, null_mut(), &mut result),
                tcd_status::TCD_OK,
            );
            let len = tcd_result_warnings(result, null_mut(), 0);
            let mut buf = vec![0u8; len + 1];
            assert_eq!(
                tcd_result_warnings(result, buf.as_mut_ptr().cast(), buf.len()),
                len
            );
            tcd_result_free(result);
            tcd_request_free(request);
            CStr::from_bytes_until_nul(&buf)
                .expect("NUL-terminated")
                .to_string_lossy()
                .into_owned()
        }
    };
    assert_eq!(warnings("a cat"), "");
    let long = "a very long prompt about a cat ".repeat(20);
    let text = warnings(&long);
    assert!(text.contains("truncated because CLIP"), "{text}");
    // SAFETY: the engine is live and freed once.
    unsafe { tcd_engine_free(engine) };
}

/// #19: one rule for Canny's thresholds, the library's: the wrong way round they are swapped
/// (as OpenCV does), in the C ABI as on the command line; only non-finite or negative ones are
/// refused.
#[test]
fn canny_thresholds_follow_the_library_rule() {
    let request = tcd_request_new();
    // SAFETY: a live request, freed once.
    unsafe {
        check(
            tcd_request_set_canny_thresholds(request, 200.0, 100.0),
            tcd_status::TCD_OK,
        );
        check(
            tcd_request_set_canny_thresholds(request, -1.0, 100.0),
            tcd_status::TCD_ERR_INVALID_ARGUMENT,
        );
        tcd_request_free(request);
    }
}
