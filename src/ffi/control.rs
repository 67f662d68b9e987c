//! The control images of a request (one per ControlNet of the engine) and their Canny
//! thresholds.

use super::request::{copy_rgba, tcd_request};
use super::status::{borrow_mut, guard, tcd_status, Failure};
use crate::pipeline::{ControlImage, ControlPreprocess};

/// How a control image is made (the values `tcd_request_add_control_image` takes).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tcd_control_preprocess {
    /// The image already is a control image (an edge map, a depth map ...).
    TCD_CONTROL_NONE = 0,
    /// OpenCV's Canny edges of a photo (thresholds from `tcd_request_set_canny_thresholds`).
    TCD_CONTROL_CANNY = 1,
    /// A depth map of a photo from the engine's depth estimator
    /// (`tcd_engine_options_set_depth_model`).
    TCD_CONTROL_DEPTH = 2,
}

/// Adds the control image of the next ControlNet (the engine's ControlNets take the images in
/// the order they were added with `tcd_engine_options_add_controlnet`), as RGBA8 pixels laid out
/// as for `tcd_request_set_image`. `scale` is diffusers' `controlnet_conditioning_scale` (0.5
/// generalises well with TCD); the ControlNet acts from the fraction `start` of the steps to
/// the fraction `end` (diffusers' `control_guidance_start`/`_end`; 0 and 1 for every step);
/// `preprocess` is a `tcd_control_preprocess` value. The image is resized to the output size,
/// which defaults to the first control image's (rounded down to a multiple of 8). The pixels
/// are copied. Text-to-image only.
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call; `pixels` is
/// NULL or points to at least `stride * (height - 1) + width * 4` readable bytes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tcd_request_add_control_image(
    request: *mut tcd_request,
    pixels: *const u8,
    width: u32,
    height: u32,
    stride: usize,
    scale: f32,
    start: f32,
    end: f32,
    preprocess: i32,
) -> tcd_status {
    guard("tcd_request_add_control_image", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        let kind = match preprocess {
            0 => tcd_control_preprocess::TCD_CONTROL_NONE,
            1 => tcd_control_preprocess::TCD_CONTROL_CANNY,
            2 => tcd_control_preprocess::TCD_CONTROL_DEPTH,
            _ => {
                return Err(Failure::invalid(format!(
                    "unknown control preprocessing {preprocess}: use TCD_CONTROL_NONE (0), \
                     TCD_CONTROL_CANNY (1) or TCD_CONTROL_DEPTH (2)"
                )))
            }
        };
        // SAFETY: the caller's contract.
        let image = unsafe { copy_rgba(pixels, width, height, stride) }?;
        let control = ControlImage {
            scale,
            start,
            end,
            ..ControlImage::new(image)
        };
        control.validate(r.control.len())?;
        r.control.push((control, kind));
        Ok(())
    })
}

/// Removes every control image, so the request runs without ControlNet.
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_clear_control_images(request: *mut tcd_request) -> tcd_status {
    guard("tcd_request_clear_control_images", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        r.control.clear();
        Ok(())
    })
}

/// Sets the hysteresis thresholds of `TCD_CONTROL_CANNY` images, as `cv2.Canny(image, low,
/// high)` takes them (default 100 and 200); finite and >= 0 (given the wrong way round they are
/// swapped, as OpenCV does).
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_canny_thresholds(
    request: *mut tcd_request,
    low: f32,
    high: f32,
) -> tcd_status {
    guard("tcd_request_set_canny_thresholds", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        ControlPreprocess::Canny { low, high }.validate()?;
        r.canny = (low, high);
        Ok(())
    })
}
