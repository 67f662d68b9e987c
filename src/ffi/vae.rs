//! The VAE's settings: the tiny autoencoder of an engine (`EngineOptions::tiny_vae`), tiling
//! for a request (`GenerateRequest::vae_tiling`).

use std::ffi::{c_char, c_int};

use super::options::tcd_engine_options;
use super::request::tcd_request;
use super::status::{borrow_mut, guard, opt_string, tcd_status};

/// Sets a tiny autoencoder to decode and encode in place of the model's VAE: a directory or hub
/// id of a `python -m export vae-tiny` export (TAESD for SD1.x/2.x, TAESDXL for SDXL); NULL
/// goes back to the model's VAE. Checked when the engine loads (`TCD_ERR_MODEL` for one that
/// does not fit the model).
///
/// # Safety
///
/// `options` is NULL or a live handle not used by another thread during the call; `path` is
/// NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_engine_options_set_tiny_vae(
    options: *mut tcd_engine_options,
    path: *const c_char,
) -> tcd_status {
    guard("tcd_engine_options_set_tiny_vae", || {
        // SAFETY: the caller's contract.
        let options = unsafe { borrow_mut(options, "options") }?;
        // SAFETY: the caller's contract.
        options.options.tiny_vae = unsafe { opt_string(path, "path") }?;
        Ok(())
    })
}

/// Decodes (and, for image-to-image and inpainting, encodes) in overlapping tiles of the VAE's
/// sample size, blended as diffusers' `enable_vae_tiling()` does (`on` nonzero): the VAE's
/// memory is bounded by a tile whatever the image size; the pixels differ slightly from an
/// untiled run, as in diffusers. Not with a tiny autoencoder (the generation then fails with
/// `TCD_ERR_INVALID_ARGUMENT`).
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_vae_tiling(
    request: *mut tcd_request,
    on: c_int,
) -> tcd_status {
    guard("tcd_request_set_vae_tiling", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        r.request.vae_tiling = on != 0;
        Ok(())
    })
}
