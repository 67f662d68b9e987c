//! `tcd_engine` and `tcd_result`: loading a model and generating images.

use std::ffi::{c_char, c_int, c_void};
use std::path::Path;

use super::options::tcd_engine_options;
use super::request::tcd_request;
use super::status::{
    borrow, borrow_mut, free_box, guard, guard_value, string, tcd_status, Failure,
};
use crate::image_io::{write_png, RgbImage};
use crate::pipeline::{Engine, Progress};

/// A loaded model: one ONNX Runtime session per component. Created by `tcd_engine_new`, freed
/// by `tcd_engine_free`. An engine may be moved to and used from any thread, but it runs one
/// generation at a time: calls that take it must not overlap (guard it with a mutex, or give
/// each thread its own engine). Engines do not share state, except that ONNX Runtime is
/// loaded once per process. No teardown call is needed: freeing the last engine ends every
/// thread started for it, and the process keeps no ONNX Runtime thread (tcd-ort sets
/// `ORT_DISABLE_TELEMETRY=1` before the first load, unless the host set that variable, so
/// ONNX Runtime's telemetry client, whose thread would outlive every engine, never starts).
pub struct tcd_engine {
    pub(super) engine: Engine,
    /// Set when a call on this engine panicked: its state may be half-updated, so every later
    /// call refuses it rather than run on it.
    pub(super) poisoned: bool,
}

/// The images of one generation. Created by `tcd_engine_generate`, freed by
/// `tcd_result_free`. Immutable: it may be read from several threads at once, and freed once
/// no thread reads it.
pub struct tcd_result {
    /// Every image; for an animation every frame, video by video.
    pub(super) images: Vec<RgbImage>,
    /// Frames per video (1 for still images).
    pub(super) frames: usize,
    warnings: String,
}

/// Called after every denoising step with `step` (1-based) of `total` steps and the
/// `user_data` given to `tcd_engine_generate`; return 0 to go on, nonzero to cancel (the
/// generation then fails with `TCD_ERR_CANCELLED`). It runs on the thread that called
/// `tcd_engine_generate` and must not call into the same engine.
///
/// It is declared `C-unwind`, so an exception leaving it unwinds through the library in a
/// defined way: the library's frames are cleaned up, and where the Rust runtime can catch the
/// exception the call returns `TCD_ERR_PANIC` and the engine is marked unusable. Rust's
/// runtime today cannot catch a C++ exception and terminates the process instead (as an
/// exception leaving a `noexcept` function does), so a host should catch its exceptions inside
/// the callback and return nonzero to cancel.
pub type tcd_progress_callback =
    Option<unsafe extern "C-unwind" fn(user_data: *mut c_void, step: u32, total: u32) -> c_int>;

/// Loads the model the options name (the model must be set) and writes the new engine to
/// `*out_engine`; on failure `*out_engine` is set to NULL. The options are copied: they may be
/// freed right after. Errors: `TCD_ERR_MODEL` for a missing or malformed model,
/// `TCD_ERR_RUNTIME` when ONNX Runtime or an execution provider is unavailable, `TCD_ERR_IO`,
/// `TCD_ERR_TOKENIZER`, `TCD_ERR_INVALID_ARGUMENT` (e.g. a LoRA that does not fit).
///
/// # Safety
///
/// `options` is NULL or a live handle no other thread uses during the call; `out_engine` is
/// NULL or points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_new(
    options: *const tcd_engine_options,
    out_engine: *mut *mut tcd_engine,
) -> tcd_status {
    guard("tcd_engine_new", || {
        if out_engine.is_null() {
            return Err(Failure::null("out_engine"));
        }
        // SAFETY: out_engine is non-NULL and writable by the caller's contract.
        unsafe { *out_engine = std::ptr::null_mut() };
        // SAFETY: the caller's contract.
        let options = unsafe { borrow(options, "options") }?;
        let model = options
            .model
            .as_deref()
            .ok_or_else(|| Failure::invalid("no model: call tcd_engine_options_set_model first"))?;
        let engine = Engine::load(model, &options.options)?;
        // SAFETY: as above.
        unsafe {
            *out_engine = Box::into_raw(Box::new(tcd_engine {
                engine,
                poisoned: false,
            }))
        };
        Ok(())
    })
}

/// Frees an engine and its sessions; NULL is a no-op.
///
/// # Safety
///
/// `engine` is NULL or came from `tcd_engine_new`, has not been freed, and no other call is
/// using it.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_free(engine: *mut tcd_engine) {
    // SAFETY: the caller's contract.
    unsafe { free_box(engine) }
}

/// Runs `request` on `engine` and writes the images to `*out_result` (NULL on failure).
/// `progress` may be NULL; otherwise it is called after each denoising step with `user_data`
/// and cancels the generation by returning nonzero (`TCD_ERR_CANCELLED`). After a call that
/// returned `TCD_ERR_PANIC`, the engine is unusable and every later call on it returns
/// `TCD_ERR_POISONED`. Generation is
/// deterministic: the same request on the same model and execution provider gives the same
/// pixels as the Rust API and the CLI.
///
/// # Safety
///
/// `engine` is NULL or a live engine that no other call uses during this one; `request` is
/// NULL or a live request that no thread modifies during the call; `out_result` is NULL or
/// points to writable storage for a pointer; `progress`, when not NULL, is safe to call with
/// `user_data` from this thread.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_generate(
    engine: *mut tcd_engine,
    request: *const tcd_request,
    progress: tcd_progress_callback,
    user_data: *mut c_void,
    out_result: *mut *mut tcd_result,
) -> tcd_status {
    let status = guard("tcd_engine_generate", || {
        if out_result.is_null() {
            return Err(Failure::null("out_result"));
        }
        // SAFETY: out_result is non-NULL and writable by the caller's contract.
        unsafe { *out_result = std::ptr::null_mut() };
        // SAFETY: the caller's contract.
        let engine = unsafe { borrow_mut(engine, "engine") }?;
        if engine.poisoned {
            return Err(Failure::poisoned("engine"));
        }
        // SAFETY: the caller's contract.
        let request = unsafe { borrow(request, "request") }?;
        let (request, task) = request.to_task()?;
        let mut on_progress = |event: Progress| match (progress, event) {
            (Some(callback), Progress::Step { step, total, .. }) => {
                let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                // SAFETY: the caller vouches for the callback and its user data.
                unsafe { callback(user_data, clamp(step), clamp(total)) == 0 }
            }
            _ => true,
        };
        let generated = engine.engine.run(&request, &task, &mut on_progress)?;
        let result = tcd_result {
            images: generated.images,
            frames: generated.frames,
            warnings: generated.warnings.join("\n"),
        };
        // SAFETY: as above.
        unsafe { *out_result = Box::into_raw(Box::new(result)) };
        Ok(())
    });
    if status == tcd_status::TCD_ERR_PANIC {
        // SAFETY: the caller's contract (a live engine no other call uses); the borrow taken
        // inside the guard ended with the panic.
        if let Some(engine) = unsafe { engine.as_mut() } {
            engine.poisoned = true;
        }
    }
    status
}

/// The number of images in a result (0 for NULL).
///
/// # Safety
///
/// `result` is NULL or a live result.
#[no_mangle]
pub unsafe extern "C" fn tcd_result_count(result: *const tcd_result) -> usize {
    guard_value(0, || {
        // SAFETY: the caller's contract.
        unsafe { result.as_ref() }.map_or(0, |r| r.images.len())
    })
}

/// Describes image `index` of a result: its size, and its pixels as tightly packed RGB8
/// (`height` rows of `stride` = `width * 3` bytes, R, G, B per pixel, no alpha: the VAE's
/// output as is, with no copy). The pixels belong to the result and stay valid until
/// `tcd_result_free`. Every output pointer is required; on failure they are left unchanged.
///
/// # Safety
///
/// `result` is NULL or a live result; each output pointer is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tcd_result_image(
    result: *const tcd_result,
    index: usize,
    out_width: *mut u32,
    out_height: *mut u32,
    out_stride: *mut usize,
    out_pixels: *mut *const u8,
) -> tcd_status {
    guard("tcd_result_image", || {
        // SAFETY: the caller's contract.
        let result = unsafe { borrow(result, "result") }?;
        for (ptr, what) in [
            (out_width.is_null(), "out_width"),
            (out_height.is_null(), "out_height"),
            (out_stride.is_null(), "out_stride"),
            (out_pixels.is_null(), "out_pixels"),
        ] {
            if ptr {
                return Err(Failure::null(what));
            }
        }
        let image = result.images.get(index).ok_or_else(|| {
            Failure::invalid(format!(
                "image index {index} is out of range: the result has {} image(s)",
                result.images.len()
            ))
        })?;
        // SAFETY: every output pointer is non-NULL and writable by the caller's contract.
        unsafe {
            *out_width = image.width;
            *out_height = image.height;
            *out_stride = image.width as usize * 3;
            *out_pixels = image.pixels.as_ptr();
        }
        Ok(())
    })
}

/// Writes image `index` of a result to `path` as a PNG, atomically: the file is written to a
/// temporary beside `path` (`.NAME.tmp-PID-N`), synced, and renamed into place, so `path`
/// holds either the whole new image or what it held before (a failed write leaves no
/// temporary). An existing `path` is refused (`TCD_ERR_INVALID_ARGUMENT`) unless `overwrite`
/// is nonzero; a symbolic link at `path` is then replaced by the file, its target left alone.
/// Errors: `TCD_ERR_IO` when the directory does not exist or takes no new file, or `path` is
/// a directory.
///
/// # Safety
///
/// `result` is NULL or a live result; `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_result_write_png(
    result: *const tcd_result,
    index: usize,
    path: *const c_char,
    overwrite: c_int,
) -> tcd_status {
    guard("tcd_result_write_png", || {
        // SAFETY: the caller's contract.
        let result = unsafe { borrow(result, "result") }?;
        // SAFETY: the caller's contract.
        let path = unsafe { string(path, "path") }?;
        let image = result.images.get(index).ok_or_else(|| {
            Failure::invalid(format!(
                "image index {index} is out of range: the result has {} image(s)",
                result.images.len()
            ))
        })?;
        let text = [("Software", format!("tcd-ort {}", env!("CARGO_PKG_VERSION")))];
        write_png(Path::new(&path), image, &text, overwrite != 0)?;
        Ok(())
    })
}

/// Frees a result and its pixels; NULL is a no-op.
///
/// # Safety
///
/// `result` is NULL or came from `tcd_engine_generate` and has not been freed; no pointer
/// from `tcd_result_image` is used afterwards.
#[no_mangle]
pub unsafe extern "C" fn tcd_result_free(result: *mut tcd_result) {
    // SAFETY: the caller's contract.
    unsafe { free_box(result) }
}

/// Writes what the generation warned about, one warning per line (e.g. a prompt truncated to
/// CLIP's 77 tokens, as diffusers warns); empty when there was nothing. The library writes
/// nothing to stderr: a host shows or logs these as it likes. Buffer handling as
/// `tcd_last_error_message`: returns the full length (call again with return value + 1 bytes
/// when it is `>= len`); 0 when `result` is NULL.
///
/// # Safety
///
/// `result` is NULL or a live result; `buf` is NULL or points to at least `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn tcd_result_warnings(
    result: *const tcd_result,
    buf: *mut c_char,
    len: usize,
) -> usize {
    guard_value(0, || {
        // SAFETY: the caller's contract.
        let Some(result) = (unsafe { result.as_ref() }) else {
            return 0;
        };
        // SAFETY: the caller's contract.
        unsafe { super::status::copy_out(&result.warnings, buf, len) }
    })
}

// The thread-safety the header promises: engines and results move between threads, results
// are also shared.
const _: () = {
    const fn send<T: Send>() {}
    const fn sync<T: Sync>() {}
    send::<tcd_engine>();
    send::<tcd_result>();
    sync::<tcd_result>();
    send::<super::options::tcd_engine_options>();
    send::<tcd_request>();
};

/// Writes which execution providers run each graph of `engine`, one graph per line:
/// `unet: CUDAExecutionProvider` (`unet: TensorrtExecutionProvider (812 nodes) +
/// CUDAExecutionProvider (3 nodes)` when split), followed by ` [session cache: hit]` when a
/// session cache is set and by ` [io binding]` for the graphs the denoising loop runs through
/// an IoBinding (`tcd_engine_options_set_io_binding`). Buffer handling as `tcd_last_error_message`: returns the full length
/// (call again with return value + 1 bytes when it is `>= len`); 0 when `engine` is NULL or
/// unusable (`TCD_ERR_POISONED`).
///
/// # Safety
///
/// `engine` is NULL or a live engine; `buf` is NULL or points to at least `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_session_summary(
    engine: *const tcd_engine,
    buf: *mut c_char,
    len: usize,
) -> usize {
    guard_value(0, || {
        // SAFETY: the caller's contract.
        let Ok(engine) = (unsafe { borrow(engine, "engine") }) else {
            return 0;
        };
        if engine.poisoned {
            return 0;
        }
        let lines: Vec<String> = engine
            .engine
            .sessions()
            .into_iter()
            .map(|s| {
                let providers: Vec<String> = match s.assignment.as_slice() {
                    [one] => vec![one.provider.clone()],
                    many => many
                        .iter()
                        .map(|a| format!("{} ({} nodes)", a.provider, a.nodes))
                        .collect(),
                };
                let mut line = format!("{}: {}", s.component, providers.join(" + "));
                if s.cache != crate::runtime::CacheStatus::Off {
                    line.push_str(&format!(" [session cache: {}]", s.cache));
                }
                if s.io_binding {
                    line.push_str(" [io binding]");
                }
                line
            })
            .collect();
        // SAFETY: the caller's contract.
        unsafe { super::status::copy_out(&lines.join("\n"), buf, len) }
    })
}
