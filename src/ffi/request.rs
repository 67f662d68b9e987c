//! `tcd_request`: one generation ([`GenerateRequest`] plus the [`Task`] and its images).

use std::ffi::c_char;

use super::control::tcd_control_preprocess;
use super::status::{borrow_mut, free_box, guard, guard_new, opt_string, tcd_status, Failure};
use crate::image_io::RgbImage;
use crate::pipeline::{
    ControlImage, ControlPreprocess, Field, GenerateRequest, InpaintMode, IpAdapterImage, Task,
};

/// What a request generates (the values `tcd_request_set_task` takes).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tcd_task {
    /// Text-to-image from pure noise (the default).
    TCD_TASK_TXT2IMG = 0,
    /// Image-to-image: needs `tcd_request_set_image`; strength defaults to 0.8.
    TCD_TASK_IMG2IMG = 1,
    /// Inpainting: needs `tcd_request_set_image` and `tcd_request_set_mask`; strength defaults
    /// to 1.0.
    TCD_TASK_INPAINT = 2,
}

/// How inpainting is done (the values `tcd_request_set_inpaint_mode` takes).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tcd_inpaint_mode {
    /// Whatever the model's UNet supports (the default).
    TCD_INPAINT_AUTO = 0,
    /// Latent blending with a regular 4-channel UNet.
    TCD_INPAINT_BLEND = 1,
    /// A 9-channel inpainting UNet; other models fail with `TCD_ERR_INVALID_ARGUMENT`.
    TCD_INPAINT_UNET = 2,
}

/// A generation request. Created by `tcd_request_new`, freed by `tcd_request_free`. Not
/// thread-safe: set it from one thread at a time (it may move between threads); while
/// `tcd_engine_generate` reads it, do not change it. One request may be used for any number of
/// generations, on any engine.
pub struct tcd_request {
    pub(super) request: GenerateRequest,
    task: tcd_task,
    strength: Option<f64>,
    mode: InpaintMode,
    image: Option<RgbImage>,
    mask: Option<RgbImage>,
    pub(super) control: Vec<(ControlImage, tcd_control_preprocess)>,
    pub(super) canny: (f32, f32),
    /// The IP-Adapter's reference image (`tcd_request_set_ip_adapter_image`).
    pub(super) ip_image: Option<RgbImage>,
    /// Its scale (`tcd_request_set_ip_adapter_scale`; diffusers' default 1).
    pub(super) ip_scale: f32,
    /// Whether `tcd_request_set_prompt` was called: a request that never got one is a host's
    /// mistake, not a wish for an image without a prompt.
    prompt_set: bool,
}

impl tcd_request {
    /// Whether `tcd_engine_generate` would accept the request before running it (for the fuzz
    /// targets, which have no engine).
    #[doc(hidden)]
    pub fn is_complete(&self) -> bool {
        self.to_task().is_ok()
    }

    /// The library's request and task; fails when the prompt was never set or the task lacks
    /// its images.
    pub(crate) fn to_task(&self) -> Result<(GenerateRequest, Task), Failure> {
        if !self.prompt_set {
            return Err(Failure::invalid(
                "no prompt: call tcd_request_set_prompt first (an empty string asks for an \
                 image without one)",
            ));
        }
        let needs = |what: Option<&RgbImage>, setter: &str, task: &str| {
            what.cloned().ok_or_else(|| {
                Failure::invalid(format!("{task} needs an input: call {setter} first"))
            })
        };
        let task = match self.task {
            tcd_task::TCD_TASK_TXT2IMG => Task::TextToImage,
            tcd_task::TCD_TASK_IMG2IMG => Task::ImageToImage {
                image: needs(
                    self.image.as_ref(),
                    "tcd_request_set_image",
                    "image-to-image",
                )?,
                strength: self.strength.unwrap_or(0.8),
            },
            tcd_task::TCD_TASK_INPAINT => Task::Inpaint {
                image: needs(self.image.as_ref(), "tcd_request_set_image", "inpainting")?,
                mask: needs(self.mask.as_ref(), "tcd_request_set_mask", "inpainting")?,
                strength: self.strength.unwrap_or(1.0),
                mode: self.mode,
            },
        };
        let (low, high) = self.canny;
        let control = self
            .control
            .iter()
            .map(|(image, kind)| ControlImage {
                preprocess: match kind {
                    tcd_control_preprocess::TCD_CONTROL_NONE => ControlPreprocess::None,
                    tcd_control_preprocess::TCD_CONTROL_CANNY => {
                        ControlPreprocess::Canny { low, high }
                    }
                    tcd_control_preprocess::TCD_CONTROL_DEPTH => ControlPreprocess::Depth,
                },
                ..image.clone()
            })
            .collect();
        let ip_adapter = self.ip_image.as_ref().map(|image| IpAdapterImage {
            image: image.clone(),
            scale: self.ip_scale,
        });
        let request = GenerateRequest {
            control,
            ip_adapter,
            ..self.request.clone()
        };
        Ok((request, task))
    }
}

/// A new text-to-image request with TCD's defaults: no prompt yet (`tcd_request_set_prompt` is
/// required before generating), no negative prompt, 4 steps,
/// eta 0.3, guidance 0 (no classifier-free guidance), seed 0, the model's native size, one
/// image. NULL only if the library panicked.
#[no_mangle]
pub extern "C" fn tcd_request_new() -> *mut tcd_request {
    guard_new("tcd_request_new", || tcd_request {
        request: GenerateRequest::default(),
        task: tcd_task::TCD_TASK_TXT2IMG,
        strength: None,
        mode: InpaintMode::Auto,
        image: None,
        mask: None,
        control: Vec::new(),
        canny: (100.0, 200.0),
        ip_image: None,
        ip_scale: 1.0,
        prompt_set: false,
    })
}

/// Frees a request; NULL is a no-op.
///
/// # Safety
///
/// `request` is NULL or came from `tcd_request_new` and has not been freed.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_free(request: *mut tcd_request) {
    // SAFETY: the caller's contract.
    unsafe { free_box(request) }
}

/// Sets the task: a `tcd_task` value (`TCD_TASK_TXT2IMG`, `TCD_TASK_IMG2IMG`,
/// `TCD_TASK_INPAINT`). Images the task does not use are ignored.
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_task(request: *mut tcd_request, task: i32) -> tcd_status {
    guard("tcd_request_set_task", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        r.task = match task {
            0 => tcd_task::TCD_TASK_TXT2IMG,
            1 => tcd_task::TCD_TASK_IMG2IMG,
            2 => tcd_task::TCD_TASK_INPAINT,
            _ => {
                return Err(Failure::invalid(format!(
                    "unknown task {task}: use TCD_TASK_TXT2IMG (0), TCD_TASK_IMG2IMG (1) \
                         or TCD_TASK_INPAINT (2)"
                )))
            }
        };
        Ok(())
    })
}

/// Sets the prompt (NULL or "" is the empty prompt: an image without one). Required before
/// `tcd_engine_generate`.
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call; `prompt` is
/// NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_prompt(
    request: *mut tcd_request,
    prompt: *const c_char,
) -> tcd_status {
    guard("tcd_request_set_prompt", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        // SAFETY: the caller's contract.
        r.request.prompt = unsafe { opt_string(prompt, "prompt") }?.unwrap_or_default();
        r.prompt_set = true;
        Ok(())
    })
}

/// Sets what to steer away from (used only with guidance > 1); NULL removes it.
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call;
/// `negative_prompt` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_negative_prompt(
    request: *mut tcd_request,
    negative_prompt: *const c_char,
) -> tcd_status {
    guard("tcd_request_set_negative_prompt", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        // SAFETY: the caller's contract.
        r.request.negative_prompt = unsafe { opt_string(negative_prompt, "negative_prompt") }?;
        Ok(())
    })
}

/// Sets the denoising steps, at least 1 (TCD works well with 2 to 8; default 4).
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_steps(
    request: *mut tcd_request,
    steps: u32,
) -> tcd_status {
    guard("tcd_request_set_steps", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        let steps = steps as usize;
        checked(
            Field::Steps,
            GenerateRequest {
                steps,
                ..GenerateRequest::default()
            },
        )?;
        r.request.steps = steps;
        Ok(())
    })
}

/// Sets eta, TCD's gamma in [0, 1]: 0 is deterministic, higher values add stochasticity and
/// blur (default 0.3).
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_eta(request: *mut tcd_request, eta: f32) -> tcd_status {
    guard("tcd_request_set_eta", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        checked(
            Field::Eta,
            GenerateRequest {
                eta,
                ..GenerateRequest::default()
            },
        )?;
        r.request.eta = eta;
        Ok(())
    })
}

/// Sets the classifier-free guidance scale, a finite number >= 0; values <= 1 run a single
/// conditional pass (default 0).
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_guidance(
    request: *mut tcd_request,
    guidance: f32,
) -> tcd_status {
    guard("tcd_request_set_guidance", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        checked(
            Field::Guidance,
            GenerateRequest {
                guidance,
                ..GenerateRequest::default()
            },
        )?;
        r.request.guidance = guidance;
        Ok(())
    })
}

/// Sets the seed of the torch-compatible CPU generator: the same seed gives the noise diffusers
/// draws with `torch.Generator("cpu").manual_seed(seed)` (default 0).
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_seed(request: *mut tcd_request, seed: u64) -> tcd_status {
    guard("tcd_request_set_seed", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        r.request.seed = seed;
        Ok(())
    })
}

/// Sets the output size in pixels, each a multiple of 8 (the model may need a larger multiple);
/// 0 uses the model's native size for text-to-image, and the input image's size (rounded down
/// to a multiple of 8) for image-to-image and inpainting.
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_size(
    request: *mut tcd_request,
    width: u32,
    height: u32,
) -> tcd_status {
    guard("tcd_request_set_size", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        // 0 asks for the default size.
        let sized = GenerateRequest {
            width: (width > 0).then_some(width as usize),
            height: (height > 0).then_some(height as usize),
            ..GenerateRequest::default()
        };
        checked(Field::Width, sized.clone())?;
        checked(Field::Height, sized.clone())?;
        (r.request.width, r.request.height) = (sized.width, sized.height);
        Ok(())
    })
}

/// Sets the number of images generated for the prompt, at least 1 (default 1).
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_num_images(
    request: *mut tcd_request,
    num_images: u32,
) -> tcd_status {
    guard("tcd_request_set_num_images", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        let num_images = num_images as usize;
        checked(
            Field::NumImages,
            GenerateRequest {
                num_images,
                ..GenerateRequest::default()
            },
        )?;
        r.request.num_images = num_images;
        Ok(())
    })
}

/// Sets TCD's `original_inference_steps` (the distillation schedule length); 0 uses the model's
/// scheduler config (50 for the released TCD models).
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_original_inference_steps(
    request: *mut tcd_request,
    original_inference_steps: u32,
) -> tcd_status {
    guard("tcd_request_set_original_inference_steps", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        r.request.original_inference_steps =
            (original_inference_steps > 0).then_some(original_inference_steps as usize);
        Ok(())
    })
}

/// Sets how much of the input image to repaint, in (0, 1]: the share of the schedule that runs
/// (image-to-image and inpainting; default 0.8 and 1.0).
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_strength(
    request: *mut tcd_request,
    strength: f64,
) -> tcd_status {
    guard("tcd_request_set_strength", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        Task::ImageToImage {
            image: RgbImage::new(1, 1, vec![0; 3])?,
            strength,
        }
        .validate()?;
        r.strength = Some(strength);
        Ok(())
    })
}

/// Sets the inpainting method: a `tcd_inpaint_mode` value (default `TCD_INPAINT_AUTO`).
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_inpaint_mode(
    request: *mut tcd_request,
    mode: i32,
) -> tcd_status {
    guard("tcd_request_set_inpaint_mode", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        r.mode = match mode {
            0 => InpaintMode::Auto,
            1 => InpaintMode::Blend,
            2 => InpaintMode::Unet,
            _ => {
                return Err(Failure::invalid(format!(
                    "unknown inpaint mode {mode}: use TCD_INPAINT_AUTO (0), \
                         TCD_INPAINT_BLEND (1) or TCD_INPAINT_UNET (2)"
                )))
            }
        };
        Ok(())
    })
}

/// Copies an RGBA8 buffer (`height` rows of `stride` bytes, each starting with `width` RGBA
/// pixels) into an RGB image, dropping alpha as PIL's `convert("RGB")` does.
///
/// # Safety
///
/// `pixels` is NULL or points to `stride * (height - 1) + width * 4` readable bytes.
pub(super) unsafe fn copy_rgba(
    pixels: *const u8,
    width: u32,
    height: u32,
    stride: usize,
) -> Result<RgbImage, Failure> {
    if pixels.is_null() {
        return Err(Failure::null("pixels"));
    }
    if width == 0 || height == 0 {
        return Err(Failure::invalid(format!(
            "an image must not be empty, got {width}x{height}"
        )));
    }
    let row = (width as usize)
        .checked_mul(4)
        .ok_or_else(|| Failure::invalid("the image is too wide"))?;
    let stride = if stride == 0 { row } else { stride };
    if stride < row {
        return Err(Failure::invalid(format!(
            "the stride ({stride} bytes) is smaller than a row of {width} RGBA pixels ({row} bytes)"
        )));
    }
    // A slice may span at most isize::MAX bytes; no real buffer is larger.
    let len = stride
        .checked_mul(height as usize - 1)
        .and_then(|n| n.checked_add(row))
        .filter(|&n| isize::try_from(n).is_ok())
        .ok_or_else(|| Failure::invalid("the image is too large"))?;
    // SAFETY: the caller provides `len` readable bytes at `pixels`.
    let bytes = unsafe { std::slice::from_raw_parts(pixels, len) };
    let mut rgba = Vec::with_capacity(row * height as usize);
    for y in 0..height as usize {
        rgba.extend_from_slice(&bytes[y * stride..y * stride + row]);
    }
    Ok(RgbImage::from_rgba(width, height, &rgba)?)
}

/// Sets the input image of image-to-image and inpainting from RGBA8 pixels: `height` rows,
/// `stride` bytes apart (0 means tightly packed, `width * 4`), each starting with `width`
/// pixels of R, G, B, A bytes. Alpha is ignored. The pixels are copied.
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call; `pixels` is
/// NULL or points to at least `stride * (height - 1) + width * 4` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_image(
    request: *mut tcd_request,
    pixels: *const u8,
    width: u32,
    height: u32,
    stride: usize,
) -> tcd_status {
    guard("tcd_request_set_image", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        // SAFETY: the caller's contract.
        r.image = Some(unsafe { copy_rgba(pixels, width, height, stride) }?);
        Ok(())
    })
}

/// Sets the inpainting mask from RGBA8 pixels laid out as for `tcd_request_set_image`: white
/// (>= 128 after grayscale conversion of R, G, B) repaints, black keeps; alpha is ignored. It is
/// resized to the output size when that differs. The pixels are copied.
///
/// # Safety
///
/// `request` is NULL or a live handle that no other thread uses during the call; `pixels` is
/// NULL or points to at least `stride * (height - 1) + width * 4` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn tcd_request_set_mask(
    request: *mut tcd_request,
    pixels: *const u8,
    width: u32,
    height: u32,
    stride: usize,
) -> tcd_status {
    guard("tcd_request_set_mask", || {
        // SAFETY: the caller's contract.
        let r = unsafe { borrow_mut(request, "request") }?;
        // SAFETY: the caller's contract.
        r.mask = Some(unsafe { copy_rgba(pixels, width, height, stride) }?);
        Ok(())
    })
}

/// The library's check of one request field, for setters that refuse a bad value when it is
/// set: the field's message, under the setter's name (added by `guard`).
pub(super) fn checked(field: Field, request: GenerateRequest) -> Result<(), Failure> {
    request.check(field).map_err(Failure::from)
}
