//! What a generation is asked to do ([`GenerateRequest`], [`Task`]) and the checks that need no
//! engine: every front end (the CLI, the C ABI, the server) calls [`GenerateRequest::validate`]
//! and [`Task::validate`] or lets [`super::Engine::run`] call them, and maps the [`Field`] of a
//! refusal to its own spelling (`--steps`, `tcd_request_set_steps`, `"steps"`). The checks that
//! need the model (sizes against its VAE, the output size a request gets) are here too, taking
//! the [`ModelDir`] instead of an engine, so a front end can ask before loading.

use crate::image_io::RgbImage;
use crate::model::ModelDir;
use crate::runtime::ShapeDims;
use crate::{Error, Result};

use super::controlnet::{ControlImage, ControlPreprocess};
pub use super::field::Field;
use super::ip_adapter::IpAdapterImage;
use super::limits::Limits;

/// One text-to-image request; defaults follow the TCD guide (4 steps, eta 0.3, no CFG).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (used only with guidance > 1).
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    pub steps: usize,
    /// TCD's gamma: 0 is deterministic, 1 is fully stochastic (multistep consistency sampling).
    pub eta: f32,
    /// Classifier-free guidance scale; values <= 1 run a single conditional pass.
    pub guidance: f32,
    /// Seed of the torch-compatible CPU generator.
    pub seed: u64,
    /// Image width; `None` uses the model's default size.
    pub width: Option<usize>,
    /// Image height; `None` uses the model's default size.
    pub height: Option<usize>,
    /// Images per prompt.
    pub num_images: usize,
    /// TCD's `original_inference_steps` (the distillation schedule length); `None` = config's.
    pub original_inference_steps: Option<usize>,
    /// One control image per loaded ControlNet ([`EngineOptions::controlnets`]); empty runs
    /// without ControlNet. Text-to-image only.
    pub control: Vec<ControlImage>,
    /// The reference image and scale for the engine's IP-Adapter
    /// ([`EngineOptions::ip_adapter`]); `None` runs without it. Every task.
    pub ip_adapter: Option<IpAdapterImage>,
    /// Frames of each video, on a model with a motion module (`python -m export animatediff`);
    /// `None` gives diffusers' 16 there. A still-image model refuses it.
    pub frames: Option<usize>,
    /// How many images or frames the VAE decodes at a time (diffusers' `decode_chunk_size`):
    /// smaller bounds the decoder's memory, the pixels are the same. `None` decodes every image
    /// at once and 16 frames at a time (diffusers' defaults).
    pub decode_chunk: Option<usize>,
    /// Decode (and, for image-to-image and inpainting, encode) in overlapping tiles of the
    /// VAE's `sample_size`, blended as diffusers' `enable_vae_tiling()` does: the VAE's memory
    /// is bounded by a tile, whatever the image size. Changes the pixels slightly, as in
    /// diffusers; not with a tiny VAE.
    pub vae_tiling: bool,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            prompt: String::new(),
            negative_prompt: None,
            steps: 4,
            eta: 0.3,
            guidance: 0.0,
            seed: 0,
            width: None,
            height: None,
            num_images: 1,
            original_inference_steps: None,
            control: Vec::new(),
            ip_adapter: None,
            frames: None,
            decode_chunk: None,
            vae_tiling: false,
        }
    }
}

/// What a generation starts from. Text-to-image needs nothing; image-to-image and inpainting
/// take decoded RGB images (see [`crate::image_io::load_image`] to read files,
/// [`RgbImage::from_rgba`] for RGBA buffers).
///
/// Kept beside [`GenerateRequest`] rather than inside it so that existing request literals stay
/// valid and the text-only path carries no image data.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Text-to-image from pure noise.
    TextToImage,
    /// diffusers' `StableDiffusion(XL)Img2ImgPipeline`: noise the encoded image to the timestep
    /// `strength` selects, then denoise.
    ImageToImage {
        /// The starting image; resized (Lanczos) to the requested size when that differs.
        image: RgbImage,
        /// In `(0, 1]`: the fraction of the schedule that runs (1 ignores the image's content
        /// but keeps its size). diffusers' default is 0.8 for SD, 0.3 for SDXL.
        strength: f64,
    },
    /// diffusers' `StableDiffusion(XL)InpaintPipeline`: repaint where the mask is white.
    /// A 9-channel (inpainting) UNet sees the mask and the masked image; a regular 4-channel
    /// UNet keeps the unmasked area by blending in the re-noised image after every step.
    Inpaint {
        /// The image to repaint.
        image: RgbImage,
        /// White (>= 128 after grayscale conversion) = repaint, black = keep; resized to the
        /// output size when it differs.
        mask: RgbImage,
        /// In `(0, 1]`; 1 starts from pure noise (diffusers' default).
        strength: f64,
        /// Which inpainting method the caller expects; [`InpaintMode::Auto`] follows the UNet.
        mode: InpaintMode,
    },
}

/// How inpainting is done, which depends on the UNet the model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InpaintMode {
    /// Whatever the UNet supports: the 9-channel path for inpainting UNets, blending otherwise.
    #[default]
    Auto,
    /// Latent blending with a regular 4-channel UNet.
    Blend,
    /// A 9-channel inpainting UNet (latents, mask and masked-image latents).
    Unet,
}

/// The smallest multiple every output side must be, whatever the model (diffusers' pipelines
/// check 8; a model whose VAE downsamples more needs a multiple of its factor).
pub const SIZE_MULTIPLE: usize = 8;

/// The largest classifier-free guidance scale accepted: images burn out well before it (TCD
/// needs none; SD1.5 without TCD uses 7.5), and larger values only overflow.
pub const MAX_GUIDANCE: f32 = 100.0;

/// The largest ControlNet conditioning scale accepted (diffusers' default is 1; past a few
/// the residuals swamp the UNet's own features).
pub const MAX_CONTROL_SCALE: f32 = 10.0;

/// The largest IP-Adapter scale accepted (diffusers' default is 1; InstantStyle-like uses stay
/// at or below it, and far past it the image tokens swamp the prompt).
pub const MAX_IP_ADAPTER_SCALE: f32 = 10.0;

impl GenerateRequest {
    /// Checks every field on its own, without a model: what [`super::Engine::run`] checks
    /// first, and what a front end can check before it loads anything.
    pub fn validate(&self) -> Result<()> {
        for field in [
            Field::Steps,
            Field::Eta,
            Field::Guidance,
            Field::Width,
            Field::Height,
            Field::NumImages,
            Field::OriginalInferenceSteps,
            Field::Frames,
            Field::DecodeChunk,
        ] {
            self.check(field)?;
        }
        for (k, control) in self.control.iter().enumerate() {
            control.validate(k)?;
        }
        if let Some(ip) = &self.ip_adapter {
            ip.validate()?;
        }
        Ok(())
    }

    /// Checks one field (a front end that sets fields one at a time, like the C ABI, refuses
    /// a bad value when it is set). Fields a request does not hold pass.
    pub fn check(&self, field: Field) -> Result<()> {
        match field {
            Field::Steps if self.steps == 0 => {
                Err(field.invalid("must be at least 1 (TCD works well with 2 to 8)"))
            }
            Field::Eta if !(0.0..=1.0).contains(&self.eta) => Err(field.invalid(format!(
                "must be between 0 and 1 (it is TCD's gamma; 0.3 is a good default), got {}",
                self.eta
            ))),
            Field::Guidance if !(0.0..=MAX_GUIDANCE).contains(&self.guidance) => Err(field
                .invalid(format!(
                    "must be a number from 0 to {MAX_GUIDANCE}, got {} (TCD needs none: values \
                     <= 1 run no unconditional pass)",
                    self.guidance
                ))),
            Field::Width => check_side(field, self.width, SIZE_MULTIPLE),
            Field::Height => check_side(field, self.height, SIZE_MULTIPLE),
            Field::NumImages if self.num_images == 0 => Err(field.invalid("must be at least 1")),
            Field::NumImages if self.num_images > Limits::LARGE.max_images => {
                Err(field.invalid(format!(
                    "must be at most {}, got {}",
                    Limits::LARGE.max_images,
                    self.num_images
                )))
            }
            Field::OriginalInferenceSteps if self.original_inference_steps == Some(0) => {
                Err(field.invalid("must be at least 1 (the released TCD models use 50)"))
            }
            Field::Frames if self.frames == Some(0) => {
                Err(field.invalid("must be at least 1 (diffusers' AnimateDiff default is 16)"))
            }
            Field::DecodeChunk if self.decode_chunk == Some(0) => {
                Err(field.invalid("must be at least 1 (diffusers' default is 16)"))
            }
            _ => Ok(()),
        }
    }

    /// Whether this request runs classifier-free guidance on `model` (diffusers: a guidance
    /// scale above 1 and a UNet that is not guidance-distilled), and so doubles the UNet's batch.
    pub fn uses_guidance(&self, model: &ModelDir) -> bool {
        self.guidance > 1.0 && model.unet.time_cond_proj_dim.is_none()
    }
}

fn check_side(field: Field, value: Option<usize>, multiple: usize) -> Result<()> {
    match value {
        Some(v) if v == 0 || v % multiple != 0 => Err(field.invalid(format!(
            "must be a positive multiple of {multiple}, got {v}"
        ))),
        Some(v) if v > Limits::LARGE.max_side => Err(field.invalid(format!(
            "must be at most {} pixels, got {v}",
            Limits::LARGE.max_side
        ))),
        _ => Ok(()),
    }
}

impl ControlImage {
    /// Checks the image's settings, without a model (how many control images a request may
    /// carry depends on the ControlNets loaded, which the engine checks). `k` (from 0) says
    /// which ControlNet the image is for in messages.
    pub fn validate(&self, k: usize) -> Result<()> {
        let which = format!("of ControlNet {}", k + 1);
        if !(0.0..=MAX_CONTROL_SCALE).contains(&self.scale) {
            return Err(Field::ControlScale.invalid(format!(
                "{which} must be a number from 0 to {MAX_CONTROL_SCALE}, got {} (1 is full \
                 strength; 0.5 generalises well with TCD)",
                self.scale
            )));
        }
        // diffusers' check_inputs: 0 <= start < end <= 1.
        if !(self.start.is_finite() && self.end.is_finite()) || self.start >= self.end {
            return Err(Field::ControlStart.invalid(format!(
                "{which} ({}) must be smaller than its end ({})",
                self.start, self.end
            )));
        }
        if self.start < 0.0 {
            return Err(
                Field::ControlStart.invalid(format!("{which} must be >= 0, got {}", self.start))
            );
        }
        if self.end > 1.0 {
            return Err(
                Field::ControlEnd.invalid(format!("{which} must be <= 1, got {}", self.end))
            );
        }
        self.preprocess.validate().map_err(|e| match e {
            Error::InvalidField { field, message } => field.invalid(format!("{which} {message}")),
            other => other,
        })
    }
}

impl ControlPreprocess {
    /// Checks the preprocessing settings: Canny's thresholds finite and >= 0 (given the wrong
    /// way round they are swapped, as OpenCV does).
    pub fn validate(&self) -> Result<()> {
        match *self {
            ControlPreprocess::Canny { low, high }
                if !(low.is_finite() && high.is_finite()) || low < 0.0 || high < 0.0 =>
            {
                Err(Field::CannyThresholds
                    .invalid(format!("must be finite and >= 0, got {low} and {high}")))
            }
            _ => Ok(()),
        }
    }
}

/// Checks a strength: in `(0, 1]`.
fn check_strength(strength: f64) -> Result<()> {
    if strength > 0.0 && strength <= 1.0 {
        Ok(())
    } else {
        Err(Field::Strength.invalid(format!(
            "must be in (0, 1], got {strength}: 1 repaints everything, smaller values keep more \
             of the input image"
        )))
    }
}

impl Task {
    /// Checks the task's own fields, without a model.
    pub fn validate(&self) -> Result<()> {
        match self {
            Task::TextToImage => Ok(()),
            Task::ImageToImage { strength, .. } | Task::Inpaint { strength, .. } => {
                check_strength(*strength)
            }
        }
    }

    /// The input image, for the tasks that start from one.
    pub fn image(&self) -> Option<&RgbImage> {
        match self {
            Task::TextToImage => None,
            Task::ImageToImage { image, .. } | Task::Inpaint { image, .. } => Some(image),
        }
    }
}

/// The output size `(height, width)` a request gets on `model`: the request's own when given;
/// else the input image's (image-to-image, inpainting) or the first control image's, rounded
/// down to the model's multiple (diffusers' `get_default_height_width`); else the model's
/// native size. Refuses sizes that are not a multiple of the model's VAE factor and sizes or
/// image counts past `limits`.
pub fn output_size(
    model: &ModelDir,
    request: &GenerateRequest,
    task: &Task,
    limits: &Limits,
) -> Result<(usize, usize)> {
    let factor = model.vae.scale_factor();
    let multiple = factor.max(SIZE_MULTIPLE);
    let native = model.default_image_size();
    // ControlNet pipelines default to the control image's size, rounded down like an input
    // image's.
    let from_image = match (task.image(), request.control.first()) {
        (Some(image), _) => Some((Field::Image, image, "")),
        (None, Some(c)) => Some((Field::ControlImage, &c.image, "of ControlNet 1 ")),
        (None, None) => None,
    };
    let round = |(field, image, which): (Field, &RgbImage, &str),
                 side: u32,
                 given: Option<usize>,
                 flag: Field|
     -> Result<usize> {
        if let Some(v) = given {
            return Ok(v);
        }
        let v = side as usize - side as usize % multiple;
        if v == 0 {
            return Err(field.invalid(format!(
                "{which}is {}x{}, and the output's {flag} follows it: it must be at least \
                 {multiple} pixels (or give the {flag})",
                image.width, image.height
            )));
        }
        Ok(v)
    };
    let (width, height) = match from_image {
        Some(source) => (
            round(source, source.1.width, request.width, Field::Width)?,
            round(source, source.1.height, request.height, Field::Height)?,
        ),
        None => (
            request.width.unwrap_or(native),
            request.height.unwrap_or(native),
        ),
    };
    check_side(Field::Height, Some(height), multiple)?;
    check_side(Field::Width, Some(width), multiple)?;
    limits.check((height, width), request.num_images)?;
    Ok((height, width))
}

/// diffusers' `AnimateDiffPipeline` default frame count.
pub const DEFAULT_FRAMES: usize = 16;

/// The frames of each video `request` makes on `model`: `Some` on a model with a motion module
/// (the request's count, or [`DEFAULT_FRAMES`]), `None` for still images. Refuses frames past
/// the motion module's maximum, frames on a still-image model, and what animations do not run
/// with (image-to-image, inpainting, ControlNet, an IP-Adapter).
pub fn animation_frames(
    model: &ModelDir,
    request: &GenerateRequest,
    task: &Task,
) -> Result<Option<usize>> {
    let Some(motion) = model.motion() else {
        return match request.frames {
            Some(_) => Err(Field::Frames.invalid(
                "is set but this model makes still images: animations need a model exported \
                 with a motion adapter (`python -m export animatediff`)",
            )),
            None => Ok(None),
        };
    };
    let frames = request
        .frames
        .unwrap_or(DEFAULT_FRAMES.min(motion.max_frames));
    if frames > motion.max_frames {
        return Err(Field::Frames.invalid(format!(
            "must be at most {} (the motion adapter's maximum), got {frames}",
            motion.max_frames
        )));
    }
    if task.image().is_some() {
        return Err(Field::Image.invalid(
            "is not taken by an animation model: it makes videos from text only (image-to-image \
             and inpainting on videos are not supported)",
        ));
    }
    if !request.control.is_empty() {
        return Err(Field::ControlImage.invalid(
            "is not taken by an animation model (ControlNet on frames is not supported)",
        ));
    }
    if request.ip_adapter.is_some() {
        return Err(Field::IpAdapterImage
            .invalid("is not taken by an animation model (its UNet has no IP-Adapter inputs)"));
    }
    Ok(Some(frames))
}

/// The UNet's input shape a request makes on `model`: the output size and the batch (images
/// per prompt, doubled by classifier-free guidance). What an engine built for fixed shapes
/// ([`super::EngineOptions::fixed_shape`]) or a TensorRT profile must cover.
pub fn unet_shape(
    model: &ModelDir,
    request: &GenerateRequest,
    task: &Task,
    limits: &Limits,
) -> Result<ShapeDims> {
    let (height, width) = output_size(model, request, task, limits)?;
    let doubled = if request.uses_guidance(model) { 2 } else { 1 };
    Ok(ShapeDims {
        width,
        height,
        batch: request.num_images * doubled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelDir {
        ModelDir::open(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models")
                .join("tiny-sd15"),
        )
        .expect("the committed tiny model")
    }

    fn field_of(r: Result<()>) -> Field {
        match r {
            Err(Error::InvalidField { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn each_bad_field_is_named_by_the_library() {
        let ok = GenerateRequest::default();
        assert!(ok.validate().is_ok());
        let bad = |r: GenerateRequest| field_of(r.validate());
        assert_eq!(
            bad(GenerateRequest {
                steps: 0,
                ..ok.clone()
            }),
            Field::Steps
        );
        assert_eq!(
            bad(GenerateRequest {
                eta: 1.5,
                ..ok.clone()
            }),
            Field::Eta
        );
        assert_eq!(
            bad(GenerateRequest {
                guidance: f32::NAN,
                ..ok.clone()
            }),
            Field::Guidance
        );
        assert_eq!(
            bad(GenerateRequest {
                width: Some(100),
                ..ok.clone()
            }),
            Field::Width
        );
        assert_eq!(
            bad(GenerateRequest {
                num_images: 0,
                ..ok.clone()
            }),
            Field::NumImages
        );
        assert_eq!(
            bad(GenerateRequest {
                original_inference_steps: Some(0),
                ..ok.clone()
            }),
            Field::OriginalInferenceSteps
        );
        let message = GenerateRequest { steps: 0, ..ok }
            .validate()
            .expect_err("refused")
            .to_string();
        assert_eq!(
            message,
            "steps must be at least 1 (TCD works well with 2 to 8)"
        );
        let image = RgbImage::new(8, 8, vec![0; 8 * 8 * 3]).expect("image");
        let task = Task::ImageToImage {
            image,
            strength: 0.0,
        };
        assert_eq!(field_of(task.validate()), Field::Strength);
        let control = ControlImage {
            start: 0.6,
            end: 0.5,
            ..ControlImage::new(RgbImage::new(8, 8, vec![0; 8 * 8 * 3]).expect("image"))
        };
        assert_eq!(field_of(control.validate(0)), Field::ControlStart);
    }

    #[test]
    fn output_sizes_and_unet_shapes_follow_the_pipelines() {
        let model = tiny();
        let native = model.default_image_size();
        let request = GenerateRequest::default();
        assert_eq!(
            output_size(&model, &request, &Task::TextToImage, &Limits::DEFAULT).expect("size"),
            (native, native)
        );
        let tall = GenerateRequest {
            height: Some(96),
            num_images: 2,
            guidance: 2.0,
            ..request.clone()
        };
        // The other side keeps the model's size, as diffusers' pipelines do.
        let dims = unet_shape(&model, &tall, &Task::TextToImage, &Limits::DEFAULT).expect("shape");
        assert_eq!((dims.width, dims.height, dims.batch), (native, 96, 4));
        // An input image gives its size, rounded down to the model's multiple.
        let image = RgbImage::new(70, 41, vec![0; 70 * 41 * 3]).expect("image");
        let task = Task::ImageToImage {
            image,
            strength: 0.5,
        };
        assert_eq!(
            output_size(&model, &request, &task, &Limits::DEFAULT).expect("size"),
            (40, 64)
        );
    }
}
