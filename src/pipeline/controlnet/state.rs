//! One generation's control: the control images preprocessed and batched, and each
//! ControlNet's scale at each step.

use ndarray::{concatenate, ArrayD, Axis};

use super::{ControlImage, ControlPreprocess};
use crate::control;
use crate::image_io::{image_to_unit_tensor, resize_lanczos, RgbImage};
use crate::{Error, Result};

/// Control images ready for the ControlNets, and each ControlNet's scale at each step.
#[derive(Debug, Clone)]
pub(in crate::pipeline) struct ControlState {
    /// Per ControlNet: `[batch, 3, H, W]` in `[0, 1]`, batched like the UNet input.
    pub(super) images: Vec<ArrayD<f32>>,
    /// `scales[step][net]`: `scale * controlnet_keep`.
    pub(super) scales: Vec<Vec<f32>>,
    /// The preprocessed control images at the output size.
    previews: Vec<RgbImage>,
}

impl ControlState {
    /// Per ControlNet: the batched control image.
    pub(in crate::pipeline) fn images(&self) -> &[ArrayD<f32>] {
        &self.images
    }

    /// Every non-zero scale some ControlNet runs with at some step, once each.
    pub(in crate::pipeline) fn distinct_scales(&self) -> Vec<f32> {
        let mut seen: Vec<f32> = Vec::new();
        for &s in self.scales.iter().flatten() {
            if s != 0.0 && !seen.iter().any(|v| v.to_bits() == s.to_bits()) {
                seen.push(s);
            }
        }
        seen
    }

    /// The control images after preprocessing and resizing, one per ControlNet.
    pub(in crate::pipeline) fn into_previews(self) -> Vec<RgbImage> {
        self.previews
    }
}

/// diffusers' `controlnet_keep` times the scale, for every step and ControlNet.
pub(super) fn step_scales(control: &[ControlImage], steps: usize) -> Vec<Vec<f32>> {
    (0..steps)
        .map(|i| {
            let (from, to) = (i as f64 / steps as f64, (i + 1) as f64 / steps as f64);
            control
                .iter()
                .map(|c| {
                    let keep = if from < f64::from(c.start) || to > f64::from(c.end) {
                        0.0
                    } else {
                        1.0
                    };
                    (f64::from(c.scale) * keep) as f32
                })
                .collect()
        })
        .collect()
}

/// Preprocesses the control images (`depth` runs the depth estimator) and batches them as
/// diffusers' `prepare_image` does: resized to the output size, `/ 255`, repeated per image,
/// doubled for classifier-free guidance.
pub(in crate::pipeline) fn prepare(
    control: &[ControlImage],
    depth: &mut Option<control::DepthEstimator>,
    steps: usize,
    (height, width): (usize, usize),
    num_images: usize,
    guidance: bool,
) -> Result<Option<ControlState>> {
    if control.is_empty() {
        return Ok(None);
    }
    let mut images = Vec::with_capacity(control.len());
    let mut previews = Vec::with_capacity(control.len());
    for c in control {
        let prepared = match c.preprocess {
            ControlPreprocess::None => c.image.clone(),
            ControlPreprocess::Canny { low, high } => control::canny(&c.image, low, high)?,
            ControlPreprocess::Depth => match depth.as_mut() {
                Some(estimator) => estimator.estimate(&c.image, width as u32, height as u32)?,
                None => {
                    return Err(Error::invalid(
                        "--control-preprocess depth needs a depth estimator: load one with \
                         --depth-model DIR_OR_ID (export Intel/dpt-hybrid-midas with `python -m \
                         export depth`)",
                    ))
                }
            },
        };
        let one = image_to_unit_tensor(&prepared, width as u32, height as u32)?;
        previews.push(
            if (prepared.width as usize, prepared.height as usize) == (width, height) {
                prepared
            } else {
                resize_lanczos(&prepared, width as u32, height as u32)?
            },
        );
        let copies = num_images * if guidance { 2 } else { 1 };
        let views: Vec<_> = (0..copies).map(|_| one.view()).collect();
        images.push(
            concatenate(Axis(0), &views)
                .map_err(|e| Error::internal("batching control images", e))?,
        );
    }
    Ok(Some(ControlState {
        images,
        scales: step_scales(control, steps),
        previews,
    }))
}
