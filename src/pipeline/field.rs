//! The fields of a request as the library names them: what a refusal ([`Error::InvalidField`],
//! [`Error::OverLimit`]) points at, and what front ends map to their own spelling (`--steps`,
//! `tcd_request_set_steps`, `"cfg_scale"`).

use crate::Error;

/// A field of a request, as the library names it. A refused value is an
/// [`Error::InvalidField`] naming one; front ends show it under their own name
/// ([`Field::name`] is the library's, and the field of
/// [`GenerateRequest`](super::GenerateRequest) or [`Task`](super::Task)).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// [`GenerateRequest::steps`](super::GenerateRequest::steps).
    Steps,
    /// [`GenerateRequest::eta`](super::GenerateRequest::eta).
    Eta,
    /// [`GenerateRequest::guidance`](super::GenerateRequest::guidance).
    Guidance,
    /// [`GenerateRequest::width`](super::GenerateRequest::width).
    Width,
    /// [`GenerateRequest::height`](super::GenerateRequest::height).
    Height,
    /// [`GenerateRequest::num_images`](super::GenerateRequest::num_images).
    NumImages,
    /// [`GenerateRequest::original_inference_steps`](super::GenerateRequest::original_inference_steps).
    OriginalInferenceSteps,
    /// The strength of [`Task::ImageToImage`](super::Task::ImageToImage) and [`Task::Inpaint`](super::Task::Inpaint).
    Strength,
    /// The input image of [`Task::ImageToImage`](super::Task::ImageToImage) and [`Task::Inpaint`](super::Task::Inpaint).
    Image,
    /// The mode of [`Task::Inpaint`](super::Task::Inpaint).
    InpaintMode,
    /// [`ControlImage::image`](super::ControlImage::image).
    ControlImage,
    /// [`ControlImage::scale`](super::ControlImage::scale).
    ControlScale,
    /// [`ControlImage::start`](super::ControlImage::start).
    ControlStart,
    /// [`ControlImage::end`](super::ControlImage::end).
    ControlEnd,
    /// The thresholds of [`ControlPreprocess::Canny`](super::ControlPreprocess::Canny).
    CannyThresholds,
    /// [`IpAdapterImage::image`](super::IpAdapterImage::image).
    IpAdapterImage,
    /// [`IpAdapterImage::scale`](super::IpAdapterImage::scale).
    IpAdapterScale,
    /// [`GenerateRequest::frames`](super::GenerateRequest::frames).
    Frames,
    /// [`GenerateRequest::decode_chunk`](super::GenerateRequest::decode_chunk).
    DecodeChunk,
    /// [`GenerateRequest::vae_tiling`](super::GenerateRequest::vae_tiling).
    VaeTiling,
}

impl Field {
    /// The library's name of the field (the Rust field's name).
    pub fn name(self) -> &'static str {
        match self {
            Field::Steps => "steps",
            Field::Eta => "eta",
            Field::Guidance => "guidance",
            Field::Width => "width",
            Field::Height => "height",
            Field::NumImages => "num_images",
            Field::OriginalInferenceSteps => "original_inference_steps",
            Field::Strength => "strength",
            Field::Image => "image",
            Field::InpaintMode => "inpaint_mode",
            Field::ControlImage => "control_image",
            Field::ControlScale => "control_scale",
            Field::ControlStart => "control_start",
            Field::ControlEnd => "control_end",
            Field::CannyThresholds => "canny_thresholds",
            Field::IpAdapterImage => "ip_adapter_image",
            Field::IpAdapterScale => "ip_adapter_scale",
            Field::Frames => "frames",
            Field::DecodeChunk => "decode_chunk",
            Field::VaeTiling => "vae_tiling",
        }
    }

    /// A refusal of this field: `message` follows the field's name (`must be at least 1`).
    pub fn invalid(self, message: impl Into<String>) -> Error {
        Error::InvalidField {
            field: self,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
