//! The C ABI: opaque handles around [`crate::pipeline`], in the style of rustls-ffi.
//!
//! `include/tcd_ort.h` is generated from this module by cbindgen (`include/cbindgen.toml`) and
//! committed; the `ffi` integration test fails when it drifts from the code
//! (`TCD_ORT_UPDATE_HEADER=1 cargo test --test it ffi::header` rewrites it).
//!
//! Conventions every entry point follows:
//!
//! - Handles are opaque and created by a `_new` function; each has a `_free` that accepts NULL.
//! - Fallible calls return a [`tcd_status`]; `TCD_OK` is 0. On failure the calling thread's
//!   last error message ([`tcd_last_error_message`]) says what went wrong and what to change;
//!   every fallible call clears it first, so it always describes the latest call.
//! - No panic crosses the boundary: every entry point runs inside `catch_unwind` and reports a
//!   panic as `TCD_ERR_PANIC`.
//! - Strings are NUL-terminated UTF-8; the library copies what it keeps, so the caller's
//!   buffers may be released as soon as a call returns.
//!
//! This module is a thin translator: everything it checks or computes the Rust API does too.

#![allow(non_camel_case_types)]

mod animation;
mod control;
mod engine;
mod ip_adapter;
mod lora;
mod options;
mod request;
mod status;
mod vae;

pub use animation::{
    tcd_request_set_decode_chunk, tcd_request_set_frames, tcd_result_frames,
    tcd_result_write_animation,
};
pub use control::{
    tcd_control_preprocess, tcd_request_add_control_image, tcd_request_clear_control_images,
    tcd_request_set_canny_thresholds,
};
pub use engine::{
    tcd_engine, tcd_engine_free, tcd_engine_generate, tcd_engine_new, tcd_engine_session_summary,
    tcd_progress_callback, tcd_result, tcd_result_count, tcd_result_free, tcd_result_image,
    tcd_result_warnings, tcd_result_write_png,
};
pub use ip_adapter::{
    tcd_engine_options_set_ip_adapter, tcd_request_clear_ip_adapter_image,
    tcd_request_set_ip_adapter_image, tcd_request_set_ip_adapter_scale,
};
pub use lora::tcd_engine_set_loras;
pub use options::{
    tcd_engine_options, tcd_engine_options_add_controlnet, tcd_engine_options_add_lora,
    tcd_engine_options_free, tcd_engine_options_new, tcd_engine_options_set_coreml_units,
    tcd_engine_options_set_cpu_arena, tcd_engine_options_set_cuda,
    tcd_engine_options_set_depth_model, tcd_engine_options_set_device_id,
    tcd_engine_options_set_fixed_shape, tcd_engine_options_set_io_binding,
    tcd_engine_options_set_limits, tcd_engine_options_set_lora_allow_unmatched,
    tcd_engine_options_set_lora_weight_name, tcd_engine_options_set_low_memory,
    tcd_engine_options_set_model, tcd_engine_options_set_opt_level,
    tcd_engine_options_set_ort_library, tcd_engine_options_set_providers,
    tcd_engine_options_set_release_after_use, tcd_engine_options_set_revision,
    tcd_engine_options_set_session_cache, tcd_engine_options_set_session_cache_limit,
    tcd_engine_options_set_tensorrt, tcd_engine_options_set_threads,
};
pub use request::{
    tcd_inpaint_mode, tcd_request, tcd_request_free, tcd_request_new, tcd_request_set_eta,
    tcd_request_set_guidance, tcd_request_set_image, tcd_request_set_inpaint_mode,
    tcd_request_set_mask, tcd_request_set_negative_prompt, tcd_request_set_num_images,
    tcd_request_set_original_inference_steps, tcd_request_set_prompt, tcd_request_set_seed,
    tcd_request_set_size, tcd_request_set_steps, tcd_request_set_strength, tcd_request_set_task,
    tcd_task,
};
pub use status::{tcd_last_error_message, tcd_status, tcd_status_name, tcd_version};
pub use vae::{tcd_engine_options_set_tiny_vae, tcd_request_set_vae_tiling};
