//! The tiny autoencoder option (`EngineOptions::tiny_vae`).

use std::ffi::c_char;

use super::options::tcd_engine_options;
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
