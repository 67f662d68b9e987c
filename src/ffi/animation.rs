//! Animations through the C ABI: a request's frame count and decode chunk, and a result's
//! videos (every frame is an image of the result, video by video; `tcd_result_frames` says
//! how many make one video).

use std::ffi::{c_char, c_int};
use std::path::Path;

use super::engine::tcd_result;
use super::request::{checked, tcd_request};
use super::status::{borrow, borrow_mut, guard, string, tcd_status, Failure};
use crate::image_io::{
    commit_all, encode_apng, encode_gif, frame_path, stage_bytes, stage_png, AnimationFormat,
};
use crate::pipeline::{Field, GenerateRequest};

/// Sets the frames of each video, for an engine on an AnimateDiff model (`python -m export
/// animatediff`); 0 uses the default (16, or the motion adapter's maximum if lower). A count
/// past the motion adapter's maximum, or any count on a still-image model, fails
/// `tcd_engine_generate` with `TCD_ERR_INVALID_ARGUMENT`.
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_frames(
    request: *mut tcd_request,
    frames: u32,
) -> tcd_status {
    guard("tcd_request_set_frames", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        r.request.frames = (frames > 0).then_some(frames as usize);
        Ok(())
    })
}

/// Sets how many images or frames the VAE decodes at a time (diffusers' `decode_chunk_size`):
/// lower bounds the decoder's memory, the pixels are the same. 0 uses the default (every image
/// at once, 16 frames at a time).
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_decode_chunk(
    request: *mut tcd_request,
    chunk: u32,
) -> tcd_status {
    guard("tcd_request_set_decode_chunk", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        let decode_chunk = (chunk > 0).then_some(chunk as usize);
        checked(
            Field::DecodeChunk,
            GenerateRequest {
                decode_chunk,
                ..GenerateRequest::default()
            },
        )?;
        r.request.decode_chunk = decode_chunk;
        Ok(())
    })
}

/// The frames of each video in `result`: 1 for still images; for an animation, images
/// `v * frames` to `(v + 1) * frames - 1` of `tcd_result_image` are video `v`'s frames.
/// 0 for NULL.
///
/// # Safety
///
/// `result` is NULL or a live result.
#[no_mangle]
pub unsafe extern "C" fn tcd_result_frames(result: *const tcd_result) -> usize {
    // SAFETY: the caller's contract.
    match unsafe { result.as_ref() } {
        Some(result) => result.frames,
        None => 0,
    }
}

/// Writes video `video` of an animation result to `path` at `fps` frames per second (1 to
/// 100), in the kind the path asks for: a looping GIF (`.gif`), a looping animated PNG
/// (`.apng`), or a directory of numbered PNGs (a path without an extension, or an existing
/// directory: `0001.png`, `0002.png` ...). Written atomically as `tcd_result_write_png` writes
/// (for a directory: every frame, or none). An existing file is refused
/// (`TCD_ERR_INVALID_ARGUMENT`) unless `overwrite` is nonzero.
///
/// # Safety
///
/// `result` is NULL or a live result; `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_result_write_animation(
    result: *const tcd_result,
    video: usize,
    path: *const c_char,
    fps: u32,
    overwrite: c_int,
) -> tcd_status {
    guard("tcd_result_write_animation", || {
        // SAFETY: the caller's contract.
        let result = unsafe { borrow(result, "result") }?;
        // SAFETY: the caller's contract.
        let path = unsafe { string(path, "path") }?;
        let path = Path::new(&path);
        let frames = result.frames.max(1);
        let videos = result.images.len() / frames;
        let Some(images) = result.images.chunks(frames).nth(video) else {
            return Err(Failure::invalid(format!(
                "video index {video} is out of range: the result has {videos} video(s)"
            )));
        };
        let overwrite = overwrite != 0;
        let text = [("Software", format!("tcd-ort {}", env!("CARGO_PKG_VERSION")))];
        let staged = match AnimationFormat::from_path(path) {
            Some(AnimationFormat::Gif) => {
                vec![stage_bytes(path, overwrite, &encode_gif(images, fps)?)?]
            }
            Some(AnimationFormat::Apng) => {
                vec![stage_bytes(
                    path,
                    overwrite,
                    &encode_apng(images, fps, &text)?,
                )?]
            }
            Some(AnimationFormat::Frames) => {
                crate::image_io::check_fps(fps)?;
                std::fs::create_dir_all(path).map_err(|e| crate::Error::io(path, e))?;
                images
                    .iter()
                    .enumerate()
                    .map(|(f, image)| stage_png(&frame_path(path, f), image, &text, overwrite))
                    .collect::<crate::Result<Vec<_>>>()?
            }
            None => {
                return Err(Failure::invalid(format!(
                    "{} is not an animation path: give a .gif, an .apng or a directory",
                    path.display()
                )))
            }
        };
        commit_all(staged)?;
        Ok(())
    })
}
