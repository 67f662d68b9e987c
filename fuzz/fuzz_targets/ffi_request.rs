//! The C ABI's request setters, called in the order and with the values the input spells: a
//! byte picks the setter, the bytes after it its arguments. Pixel buffers are real buffers of
//! the size the call says, except for sizes past what memory can hold, which the library must
//! refuse before reading (AddressSanitizer reports any read past the buffer).
#![no_main]

use std::ffi::CString;
use std::ptr::{null, null_mut};

use libfuzzer_sys::fuzz_target;
use tcd_ort::ffi::*;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn f32(&mut self) -> f32 {
        f32::from_le_bytes(self.take())
    }
    /// A string up to the next NUL (absent: NULL).
    fn string(&mut self) -> Option<CString> {
        if self.u8() % 8 == 0 {
            return None;
        }
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        let s = CString::new(&self.0[..end]).ok();
        self.0 = &self.0[(end + 1).min(self.0.len())..];
        s
    }
    /// (width, height, stride): small sizes mostly, sometimes any.
    fn image(&mut self) -> (u32, u32, usize) {
        if self.u8() % 16 == 0 {
            (self.u32(), self.u32(), usize::from_le_bytes(self.take()))
        } else {
            let stride = usize::from(self.u8()) * 4;
            (u32::from(self.u8() % 32), u32::from(self.u8() % 32), stride)
        }
    }
}

/// The bytes an image of these sizes spans, in exact arithmetic; `None` when the library
/// refuses the sizes whatever the buffer (empty, or a stride shorter than a row).
fn span(width: u32, height: u32, stride: usize) -> Option<u128> {
    let row = u128::from(width) * 4;
    let stride = if stride == 0 { row } else { stride as u128 };
    if width == 0 || height == 0 || stride < row {
        return None;
    }
    Some(stride * u128::from(height - 1) + row)
}

/// Calls an image setter with a buffer as large as the sizes say, or with a one-byte buffer
/// when the library must refuse the sizes without reading (refused shapes, and spans past
/// `isize::MAX` bytes); sizes that are valid but too large to allocate here are skipped.
fn with_pixels(width: u32, height: u32, stride: usize, call: impl FnOnce(*const u8)) {
    match span(width, height, stride) {
        Some(n) if n <= 1 << 20 => call(vec![128u8; n as usize].as_ptr()),
        Some(n) if n <= isize::MAX as u128 => {}
        _ => call([0u8].as_ptr()),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let request = tcd_request_new();
    while !input.0.is_empty() {
        // One in 32 calls passes a NULL request.
        let op = input.u8();
        let r = if op >= 248 { null_mut() } else { request };
        // SAFETY: `r` is NULL or the live request; strings are NUL-terminated; every pixel
        // buffer spans what its sizes say, or the sizes cannot be allocated at all.
        unsafe {
            match op % 17 {
                0 => {
                    let _ = tcd_request_set_task(r, i32::from(input.u8()) - 1);
                }
                1 => {
                    let s = input.string();
                    let _ = tcd_request_set_prompt(r, s.as_ref().map_or(null(), |s| s.as_ptr()));
                }
                2 => {
                    let s = input.string();
                    let p = s.as_ref().map_or(null(), |s| s.as_ptr());
                    let _ = tcd_request_set_negative_prompt(r, p);
                }
                3 => {
                    let _ = tcd_request_set_steps(r, input.u32());
                }
                4 => {
                    let _ = tcd_request_set_eta(r, input.f32());
                }
                5 => {
                    let _ = tcd_request_set_guidance(r, input.f32());
                }
                6 => {
                    let _ = tcd_request_set_seed(r, u64::from_le_bytes(input.take()));
                }
                7 => {
                    let _ = tcd_request_set_size(r, input.u32(), input.u32());
                }
                8 => {
                    let _ = tcd_request_set_num_images(r, input.u32());
                }
                9 => {
                    let _ = tcd_request_set_original_inference_steps(r, input.u32());
                }
                10 => {
                    let _ = tcd_request_set_strength(r, f64::from_le_bytes(input.take()));
                }
                11 => {
                    let _ = tcd_request_set_inpaint_mode(r, i32::from(input.u8()) - 1);
                }
                12 => {
                    let (w, h, stride) = input.image();
                    with_pixels(w, h, stride, |p| {
                        let _ = tcd_request_set_image(r, p, w, h, stride);
                    });
                }
                13 => {
                    let (w, h, stride) = input.image();
                    with_pixels(w, h, stride, |p| {
                        let _ = tcd_request_set_mask(r, p, w, h, stride);
                    });
                }
                14 => {
                    let (w, h, stride) = input.image();
                    let (scale, start, end) = (input.f32(), input.f32(), input.f32());
                    let kind = i32::from(input.u8() % 4);
                    with_pixels(w, h, stride, |p| {
                        let _ = tcd_request_add_control_image(
                            r, p, w, h, stride, scale, start, end, kind,
                        );
                    });
                }
                15 => {
                    let _ = tcd_request_clear_control_images(r);
                }
                _ => {
                    let _ = tcd_request_set_canny_thresholds(r, input.f32(), input.f32());
                }
            }
        }
        // SAFETY: a NULL buffer of length 0 only asks for the length.
        let _ = unsafe { tcd_last_error_message(null_mut(), 0) };
    }
    // SAFETY: the live request, freed once.
    unsafe {
        if let Some(r) = request.as_ref() {
            let _ = r.is_complete();
        }
        tcd_request_free(request);
    }
});
