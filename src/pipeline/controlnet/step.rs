//! The UNet's residual inputs at one step: the ControlNets run, scaled and summed on the host
//! (or through [`super::ResidualSum`] when IoBinding is on), or zeros.

use ndarray::ArrayD;

use super::state::ControlState;
use super::sum::sum_placed;
use super::{ControlNet, ResidualLayout, ResidualSum, MID_OUTPUT};
use crate::pipeline::conditioning::Conditioning;
use crate::pipeline::resident::{self, PlacedInputs, Resident};
use crate::runtime::PlacedTensor;
use crate::{Error, Result};

/// What the UNet's residual inputs get at one step.
#[derive(Debug)]
pub(in crate::pipeline) enum Residuals {
    /// The UNet takes no residuals.
    None,
    /// No ControlNet acts at this step: zeros ([`ResidualLayout::zeros`]).
    Zeros,
    /// The ControlNets' scaled, summed residuals, in [`ResidualLayout::names`] order.
    Sum(Vec<ArrayD<f32>>),
    /// The same, summed where the UNet reads them ([`ResidualSum`]).
    Placed(Vec<PlacedTensor>),
}

/// The residual inputs of one UNet evaluation: the ControlNets' scaled, summed residuals at
/// `step`, or zeros when no ControlNet acts. `sample` and `timestep` are the UNet's for this
/// step; `resident` holds the ControlNets' placed inputs when IoBinding is on.
pub(in crate::pipeline) fn unet_residuals(
    layout: Option<&ResidualLayout>,
    (nets, summer): (&mut [ControlNet], Option<&mut ResidualSum>),
    control: Option<(&ControlState, usize)>,
    (sample, timestep, cond): (&ArrayD<f32>, &ArrayD<f32>, &Conditioning),
    resident: Option<&Resident>,
) -> Result<Residuals> {
    let Some(layout) = layout else {
        if control.is_some() {
            return Err(Error::invalid(
                "the UNet of this model takes no ControlNet residuals; re-export the model with \
                 `python -m export convert` to use ControlNets",
            ));
        }
        return Ok(Residuals::None);
    };
    let Some((state, step)) = control else {
        return Ok(Residuals::Zeros);
    };
    let scales = state
        .scales
        .get(step)
        .ok_or_else(|| Error::Runtime(format!("no ControlNet scales for step {step}")))?;
    if let (Some(summer), Some(resident)) = (summer, resident) {
        return sum_placed(
            nets,
            summer,
            state,
            scales,
            (sample, timestep, cond),
            resident,
        );
    }
    let mut sum: Option<Vec<ArrayD<f32>>> = None;
    {
        let host_only = PlacedInputs::default();
        for (k, ((net, image), &scale)) in
            nets.iter_mut().zip(&state.images).zip(scales).enumerate()
        {
            if scale == 0.0 {
                continue;
            }
            let placed = resident
                .and_then(|r| r.controlnets.get(k))
                .unwrap_or(&host_only);
            let mut inputs = placed.denoiser_inputs(sample.clone(), timestep.clone(), cond);
            inputs.push(("controlnet_cond", placed.feed("controlnet_cond", image)));
            let wanted: Vec<&str> = net
                .down_outputs
                .iter()
                .map(String::as_str)
                .chain(std::iter::once(MID_OUTPUT))
                .collect();
            let mut outputs = resident::run(&mut net.graph, resident.is_some(), inputs, &wanted)?;
            // ControlNetModel: `sample * conditioning_scale`, in float32.
            for o in &mut outputs {
                o.mapv_inplace(|v| v * scale);
            }
            sum = Some(match sum {
                None => outputs,
                Some(mut acc) => {
                    same_shapes(
                        acc.iter().map(|a| a.shape()),
                        outputs.iter().map(|o| o.shape()),
                    )?;
                    for (a, o) in acc.iter_mut().zip(&outputs) {
                        *a += o;
                    }
                    acc
                }
            });
        }
    }
    Ok(match sum {
        None => Residuals::Zeros,
        Some(residuals) if residuals.len() == layout.down.len() + 1 => Residuals::Sum(residuals),
        Some(residuals) => {
            return Err(Error::Runtime(format!(
                "the ControlNets returned {} residuals and the UNet takes {}",
                residuals.len(),
                layout.down.len() + 1
            )))
        }
    })
}

/// Checks that two ControlNets returned residuals of the same shapes, pairwise.
pub(super) fn same_shapes<'a>(
    a: impl Iterator<Item = &'a [usize]>,
    b: impl Iterator<Item = &'a [usize]>,
) -> Result<()> {
    for (a, b) in a.zip(b) {
        if a != b {
            return Err(Error::Runtime(format!(
                "ControlNet residuals disagree in shape: {a:?} and {b:?}"
            )));
        }
    }
    Ok(())
}
