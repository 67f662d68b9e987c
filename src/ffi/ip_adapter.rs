//! The IP-Adapter of a request (its reference image and scale) and of an engine.

use std::ffi::c_char;

use super::options::tcd_engine_options;
use super::request::{copy_rgba, tcd_request};
use super::status::{borrow_mut, guard, opt_string, tcd_status};
use crate::pipeline::IpAdapterImage;

/// Loads an IP-Adapter with the engine: a directory or hub id of a `python -m export
/// ip-adapter` export, for the model's base (SD1.5 adapters on SD1.5 models, SDXL ones on
/// SDXL); an adapter for another base fails `tcd_engine_new`. NULL removes it.
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `path` is
/// NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_ip_adapter(
    options: *mut tcd_engine_options,
    path: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_set_ip_adapter", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        options.options.ip_adapter = unsafe { opt_string(path, "path") }?;
        Ok(())
    })
}

/// Sets the IP-Adapter's reference image from RGBA8 pixels laid out as for
/// `tcd_request_set_image` (any size: CLIP's pre-processing crops its centre square). The
/// engine must have loaded an IP-Adapter (`tcd_engine_options_set_ip_adapter`). The pixels are
/// copied. Every task.
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call; `pixels` is
/// NULL or points to at least `stride * (height - 1) + width * 4` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_ip_adapter_image(
    request: *mut tcd_request,
    pixels: *const u8,
    width: u32,
    height: u32,
    stride: usize,
) -> tcd_status {
    guard("tcd_request_set_ip_adapter_image", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        // SAFETY: the caller's contract.
        r.ip_image = Some(unsafe { copy_rgba(pixels, width, height, stride) }?);
        Ok(())
    })
}

/// Removes the reference image, so the request runs without the IP-Adapter.
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_clear_ip_adapter_image(
    request: *mut tcd_request,
) -> tcd_status {
    guard("tcd_request_clear_ip_adapter_image", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        r.ip_image = None;
        Ok(())
    })
}

/// How strongly the reference image steers, from 0 to 10 (diffusers' `set_ip_adapter_scale`;
/// default 1, the TCD guide uses 0.5). It can change between generations of a loaded engine.
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_ip_adapter_scale(
    request: *mut tcd_request,
    scale: f32,
) -> tcd_status {
    guard("tcd_request_set_ip_adapter_scale", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        IpAdapterImage::check_scale(scale)?;
        r.ip_scale = scale;
        Ok(())
    })
}
