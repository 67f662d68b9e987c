//! What a request asks of the ControlNets: one control image each, with its scale, step window
//! and preprocessing.

use crate::image_io::RgbImage;

/// How a control image is turned into what the ControlNet was trained on.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ControlPreprocess {
    /// The image already is a control image (an edge map, a depth map ...).
    #[default]
    None,
    /// OpenCV's `cv2.Canny(image, low, high)`, stacked to three channels.
    Canny {
        /// Lower hysteresis threshold (diffusers' examples: 100).
        low: f32,
        /// Upper hysteresis threshold (diffusers' examples: 200).
        high: f32,
    },
    /// The depth recipe of diffusers' depth ControlNet examples, with the engine's depth
    /// estimator ([`crate::pipeline::EngineOptions::depth_estimator`]).
    Depth,
}

/// One control image, for the ControlNet at the same position in
/// [`crate::pipeline::EngineOptions::controlnets`].
#[derive(Debug, Clone, PartialEq)]
pub struct ControlImage {
    /// The image; resized (Lanczos) to the output size when that differs.
    pub image: RgbImage,
    /// diffusers' `controlnet_conditioning_scale` (0.5 generalises well with TCD).
    pub scale: f32,
    /// diffusers' `control_guidance_start`: the fraction of steps before the ControlNet acts.
    pub start: f32,
    /// diffusers' `control_guidance_end`: the fraction of steps after which it stops.
    pub end: f32,
    /// What to do with the image first.
    pub preprocess: ControlPreprocess,
}

impl ControlImage {
    /// A control image used as it is, at scale 1 over every step (diffusers' defaults).
    pub fn new(image: RgbImage) -> Self {
        ControlImage {
            image,
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            preprocess: ControlPreprocess::None,
        }
    }
}
