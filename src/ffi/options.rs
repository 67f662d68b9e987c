//! `tcd_engine_options`: how an engine is loaded ([`EngineOptions`] plus the model).

use std::ffi::c_char;
use std::path::PathBuf;

use super::status::{borrow_mut, free_box, guard, guard_new, opt_string, string, tcd_status};
use crate::pipeline::{EngineOptions, Limits, LoraSpec};
use crate::runtime::{parse_provider_list, SessionCache, ShapeDims};

/// Engine options: the model and how to run it. Created by `tcd_engine_options_new`, freed by
/// `tcd_engine_options_free`. Not thread-safe: use one from one thread at a time (it may move
/// between threads). `tcd_engine_new` copies what it needs, so the options may be freed or
/// reused right after.
pub struct tcd_engine_options {
    pub(crate) model: Option<String>,
    pub(crate) options: EngineOptions,
}

/// New options: no model yet, the CPU execution provider, device 0, every core, ONNX Runtime
/// searched for as the CLI does (`ORT_DYLIB_PATH`, `.ort/lib` beside the working directory or
/// the executable, Python's onnxruntime), no LoRAs. NULL only if the library panicked.
#[no_mangle]
pub extern "C" fn tcd_engine_options_new() -> *mut tcd_engine_options {
    guard_new("tcd_engine_options_new", || tcd_engine_options {
        model: None,
        options: EngineOptions::default(),
    })
}

/// Frees options; NULL is a no-op.
///
/// # Safety
///
/// `options` is NULL or came from `tcd_engine_options_new` and has not been freed.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_free(options: *mut tcd_engine_options) {
    // SAFETY: the caller's contract.
    unsafe { free_box(options) }
}

/// Sets the model: a model directory (a tcd-ort or optimum ONNX export) or a Hugging Face hub
/// id (`owner/name`, downloaded on `tcd_engine_new`). Required.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `model` is
/// NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_model(
    options: *mut tcd_engine_options,
    model: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_set_model", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        let model = unsafe { string(model, "model") }?;
        if model.is_empty() {
            return Err(super::status::Failure::invalid(
                "the model is empty: pass a model directory or a hub id",
            ));
        }
        options.model = Some(model);
        Ok(())
    })
}

/// Sets the hub revision (branch, tag or commit) used when the model is a hub id; NULL
/// restores the default (`main`).
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `revision`
/// is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_revision(
    options: *mut tcd_engine_options,
    revision: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_set_revision", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        options.options.revision = unsafe { opt_string(revision, "revision") }?;
        Ok(())
    })
}

/// Sets the execution providers from a comma-separated list in priority order, as the CLI's
/// `--ep`: `"cpu"`, `"cuda"`, `"tensorrt,cuda,cpu"` (fall back in that order). Also accepts
/// `"directml"` and `"coreml"`. An unknown name is `TCD_ERR_INVALID_ARGUMENT`; a provider that
/// is known but unavailable is reported by `tcd_engine_new`.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `providers`
/// is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_providers(
    options: *mut tcd_engine_options,
    providers: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_set_providers", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        let providers = unsafe { string(providers, "providers") }?;
        options.options.providers = parse_provider_list(&providers)?;
        Ok(())
    })
}

/// Sets the GPU ordinal for the CUDA, TensorRT and DirectML providers (default 0).
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_device_id(
    options: *mut tcd_engine_options,
    device_id: i32,
) -> tcd_status {
    guard("tcd_engine_options_set_device_id", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        if device_id < 0 {
            return Err(super::status::Failure::invalid(format!(
                "the device id must be >= 0, got {device_id}"
            )));
        }
        options.options.device_id = device_id;
        Ok(())
    })
}

/// Sets the ONNX Runtime shared library (a file, or a directory holding it); NULL restores the
/// search described at `tcd_engine_options_new`. ONNX Runtime is loaded once per process: a
/// later engine asking for a different library fails with `TCD_ERR_RUNTIME`.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `path` is
/// NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_ort_library(
    options: *mut tcd_engine_options,
    path: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_set_ort_library", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        options.options.ort_lib = unsafe { opt_string(path, "path") }?.map(PathBuf::from);
        Ok(())
    })
}

/// Sets the threads ONNX Runtime uses per operator; 0 (the default) uses every core. At most
/// 256.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_threads(
    options: *mut tcd_engine_options,
    threads: u32,
) -> tcd_status {
    guard("tcd_engine_options_set_threads", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        let mut changed = options.options.clone();
        changed.intra_threads = (threads > 0).then_some(threads as usize);
        changed.validate()?;
        options.options = changed;
        Ok(())
    })
}

/// Sets how much one request may ask for: the longest output side in pixels, the pixels of one
/// output image and the images per request (defaults 2048, 2048 x 2048 and 16); 0 keeps a
/// limit's default. At most 16384, 8192 x 8192 and 256. A request past them fails with
/// `TCD_ERR_INVALID_ARGUMENT` before anything is allocated.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_limits(
    options: *mut tcd_engine_options,
    max_side: u32,
    max_pixels: u64,
    max_images: u32,
) -> tcd_status {
    guard("tcd_engine_options_set_limits", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        let default = Limits::DEFAULT;
        let or_default = |v: usize, d: usize| if v == 0 { d } else { v };
        let mut changed = options.options.clone();
        changed.limits = Limits {
            max_side: or_default(max_side as usize, default.max_side),
            max_pixels: or_default(
                usize::try_from(max_pixels).unwrap_or(usize::MAX),
                default.max_pixels,
            ),
            max_images: or_default(max_images as usize, default.max_images),
        };
        changed.validate()?;
        options.options = changed;
        Ok(())
    })
}

/// Adds a LoRA applied at load time: a `.safetensors` file, a directory or a hub id, with its
/// weight (diffusers' `adapter_weights`; 1.0 applies it fully). Several are summed, like
/// diffusers' `set_adapters`, after any LoRA the model's export recorded.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `source` is
/// NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_add_lora(
    options: *mut tcd_engine_options,
    source: *const c_char,
    weight: f32,
) -> tcd_status {
    guard("tcd_engine_options_add_lora", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        let source = unsafe { string(source, "source") }?;
        let mut changed = options.options.clone();
        changed.loras.push(LoraSpec {
            source,
            weight,
            weight_name: None,
        });
        changed.validate()?;
        options.options = changed;
        Ok(())
    })
}

/// Sets the file read from LoRA directories and repositories; NULL restores the default
/// (`pytorch_lora_weights.safetensors`).
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `name` is
/// NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_lora_weight_name(
    options: *mut tcd_engine_options,
    name: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_set_lora_weight_name", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        options.options.lora_weight_name = unsafe { opt_string(name, "name") }?;
        Ok(())
    })
}

/// Nonzero skips LoRA targets that match no weight of the model instead of failing (default 0).
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_lora_allow_unmatched(
    options: *mut tcd_engine_options,
    allow: i32,
) -> tcd_status {
    guard("tcd_engine_options_set_lora_allow_unmatched", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        options.options.lora_allow_unmatched = allow != 0;
        Ok(())
    })
}

/// Sets the graph optimisation level: `"disable"`, `"basic"`, `"extended"`, `"all"` or
/// `"auto"` (the default: `"all"` for the VAE's graphs, `"extended"` for the others). Anything
/// else is `TCD_ERR_INVALID_ARGUMENT`.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `level` is
/// NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_opt_level(
    options: *mut tcd_engine_options,
    level: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_set_opt_level", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        let level = unsafe { string(level, "level") }?;
        options.options.opt_level = level.parse()?;
        Ok(())
    })
}

/// Sets the optimised-model cache: a directory, `"auto"` (`$XDG_CACHE_HOME/tcd-ort/sessions`
/// or `~/.cache/tcd-ort/sessions`) or `"off"`; NULL also turns it off (the default). Graphs
/// with LoRA weights and TensorRT, DirectML or CoreML sessions are never cached.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `cache` is
/// NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_session_cache(
    options: *mut tcd_engine_options,
    cache: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_set_session_cache", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        options.options.session_cache = match unsafe { opt_string(cache, "cache") }? {
            Some(s) => s.parse()?,
            None => SessionCache::Off,
        };
        Ok(())
    })
}

/// Sets the session cache's size limit in bytes; 0 restores the default (20 GiB). After each
/// store the least recently used entries are deleted until the cache fits, and a graph larger
/// than the limit is not stored.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_session_cache_limit(
    options: *mut tcd_engine_options,
    bytes: u64,
) -> tcd_status {
    guard("tcd_engine_options_set_session_cache_limit", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        options.options.session_cache_limit = (bytes > 0).then_some(bytes);
        Ok(())
    })
}

/// Turns IoBinding in the denoising loop on (non-zero, the default) or off (0): with it, the
/// conditioning, control images and zero ControlNet residuals are placed once where the UNet
/// and ControlNets read them (device memory on a GPU) instead of being copied from the host at
/// every step. Results are the same either way; off is for A/B measurement.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_io_binding(
    options: *mut tcd_engine_options,
    enabled: i32,
) -> tcd_status {
    guard("tcd_engine_options_set_io_binding", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        options.options.io_binding = enabled != 0;
        Ok(())
    })
}

/// Turns low-memory mode on (non-zero) or off (0, the default): the engine then holds one
/// component at a time (text encoders, VAE encoder, UNet with its ControlNets, VAE decoder),
/// each loaded for its stage of a generation and released before the next one loads, so peak
/// memory is the largest component's. Every generation pays the loads (fast with a session
/// cache). With a session cache, a UNet exported in segments (`python -m export convert` writes
/// two) loads one segment at a time, each from the cache for its part of every step; the CPU
/// arena (`tcd_engine_options_set_cpu_arena`) then costs no memory, as each segment's session
/// lives for one run of it, and makes the steps faster.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_low_memory(
    options: *mut tcd_engine_options,
    enabled: i32,
) -> tcd_status {
    guard("tcd_engine_options_set_low_memory", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        options.options.low_memory = enabled != 0;
        Ok(())
    })
}

/// Turns release-after-use on (non-zero) or off (0, the default): every component still loads
/// at `tcd_engine_new`, and each is released once a generation is past its stage (the text
/// encoders after the prompt, the VAE encoder after the image, the UNet with its ControlNets
/// before the VAE decodes). For hosts that generate once per process: the peak memory drops
/// to the weights loaded at start-up; a later generation loads what it needs again.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_release_after_use(
    options: *mut tcd_engine_options,
    enabled: i32,
) -> tcd_status {
    guard("tcd_engine_options_set_release_after_use", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        options.options.release_after_use = enabled != 0;
        Ok(())
    })
}

/// Turns ONNX Runtime's memory arena for the CPU provider on (non-zero) or off (0, the
/// default): on is faster (fewer page faults) at a higher peak memory. Each session has its
/// own arena, freed with the session: with release-after-use it lives only through its stage
/// (the command line turns both on by default).
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_cpu_arena(
    options: *mut tcd_engine_options,
    enabled: i32,
) -> tcd_status {
    guard("tcd_engine_options_set_cpu_arena", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        options.options.provider_options.cpu_arena = Some(enabled != 0);
        Ok(())
    })
}

/// Builds the UNet and ControlNet sessions for exactly one output size and UNet batch (images
/// per prompt, doubled when guidance > 1), so ONNX Runtime folds the graphs' shape arithmetic;
/// the engine then refuses requests of another size or batch. `width = height = batch = 0`
/// goes back to dynamic shapes (the default). Sizes must be positive multiples of 8.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_fixed_shape(
    options: *mut tcd_engine_options,
    width: u32,
    height: u32,
    batch: u32,
) -> tcd_status {
    guard("tcd_engine_options_set_fixed_shape", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        options.options.fixed_shape = match (width, height, batch) {
            (0, 0, 0) => None,
            (w, h, b) if w > 0 && h > 0 && b > 0 && w % 8 == 0 && h % 8 == 0 => Some(ShapeDims {
                width: w as usize,
                height: h as usize,
                batch: b as usize,
            }),
            (w, h, b) => {
                return Err(super::status::Failure::invalid(format!(
                    "fixed shape {w}x{h} at batch {b}: width and height must be positive \
                     multiples of 8 and batch at least 1 (all three 0 for dynamic shapes)"
                )))
            }
        };
        Ok(())
    })
}

/// Sets the CUDA provider's settings (also used by TensorRT for nodes it leaves to CUDA).
/// `cudnn_search`: `"exhaustive"`, `"heuristic"` (default) or `"default"`; `arena_extend`:
/// `"same-as-requested"` (default) or `"next-power-of-two"`; NULL keeps the current value.
/// `gpu_mem_limit` caps the memory arena in bytes; 0 means no cap.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; the strings
/// are NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_cuda(
    options: *mut tcd_engine_options,
    cudnn_search: *const c_char,
    arena_extend: *const c_char,
    gpu_mem_limit: u64,
) -> tcd_status {
    guard("tcd_engine_options_set_cuda", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        let search = unsafe { opt_string(cudnn_search, "cudnn_search") }?;
        // SAFETY: the caller's contract.
        let arena = unsafe { opt_string(arena_extend, "arena_extend") }?;
        let cuda = &mut options.options.provider_options.cuda;
        let search = search.map(|s| s.parse()).transpose()?;
        let arena = arena.map(|s| s.parse()).transpose()?;
        if let Some(v) = search {
            cuda.cudnn_conv_search = v;
        }
        if let Some(v) = arena {
            cuda.arena_extend = v;
        }
        cuda.gpu_mem_limit = (gpu_mem_limit > 0).then_some(gpu_mem_limit);
        Ok(())
    })
}

/// Sets the TensorRT provider's settings. `fp16` nonzero builds fp16 engines (the default);
/// `cache_dir` holds engines and the timing cache (NULL: `$XDG_CACHE_HOME/tcd-ort/tensorrt`
/// or `~/.cache/tcd-ort/tensorrt`); `profile` is the optimisation profile, `"WxHxB"` or
/// `"MIN:OPT:MAX"` with each part `WIDTHxHEIGHTxBATCH` (NULL: the model's native size at batch
/// 1 to 2).
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; the strings
/// are NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_tensorrt(
    options: *mut tcd_engine_options,
    fp16: i32,
    cache_dir: *const c_char,
    profile: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_set_tensorrt", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        let cache_dir = unsafe { opt_string(cache_dir, "cache_dir") }?;
        // SAFETY: the caller's contract.
        let profile = unsafe { opt_string(profile, "profile") }?;
        let profile = profile.map(|p| p.parse()).transpose()?;
        let trt = &mut options.options.provider_options.tensorrt;
        trt.fp16 = fp16 != 0;
        trt.cache_dir = cache_dir.map(PathBuf::from);
        trt.profile = profile;
        Ok(())
    })
}

/// Sets the CoreML compute units: `"all"` (default), `"cpu-and-neural-engine"`,
/// `"cpu-and-gpu"` or `"cpu-only"`.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `units` is
/// NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_coreml_units(
    options: *mut tcd_engine_options,
    units: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_set_coreml_units", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        let units = unsafe { string(units, "units") }?;
        options.options.provider_options.coreml.compute_units = units.parse()?;
        Ok(())
    })
}

/// Adds a ControlNet: a directory or hub id of a `python -m export controlnet` export, made for
/// the model's base (SD 1.x/2.x or SDXL). Requests then give one control image per ControlNet,
/// in the order they were added (`tcd_request_add_control_image`).
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `source` is
/// NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_add_controlnet(
    options: *mut tcd_engine_options,
    source: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_add_controlnet", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        let source = unsafe { string(source, "source") }?;
        if source.is_empty() {
            return Err(super::status::Failure::invalid(
                "the ControlNet is empty: pass a directory or a hub id",
            ));
        }
        options.options.controlnets.push(source);
        Ok(())
    })
}

/// Sets the depth estimator used by `TCD_CONTROL_DEPTH` control images: a directory or hub id of
/// a `python -m export depth` export (e.g. of Intel/dpt-hybrid-midas); NULL removes it.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `path` is
/// NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_depth_model(
    options: *mut tcd_engine_options,
    path: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_set_depth_model", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        options.options.depth_estimator = unsafe { opt_string(path, "path") }?;
        Ok(())
    })
}
