//! The ControlNets' residuals scaled and summed on the device, where the UNet reads them.

use ndarray::ArrayD;

use super::state::ControlState;
use super::step::{same_shapes, Residuals};
use super::{ControlNet, ResidualLayout, MID_INPUT, MID_OUTPUT};
use crate::pipeline::conditioning::Conditioning;
use crate::pipeline::resident::{PlacedInputs, Resident};
use crate::runtime::builtin::{self, SCALED_SUM_SCALE};
use crate::runtime::{Destination, Feed, Graph, PlacedTensor, SessionOptions};
use crate::{Error, Result};

/// The ControlNets' residuals scaled and summed where the UNet reads them (issue #7): each
/// ControlNet's outputs are bound to the memory of the sum graphs' inputs, and the sums to the
/// memory of the UNet's residual inputs, so on an accelerator nothing goes to the host and back
/// ([`crate::runtime::builtin::scaled_sum`]). Used with IoBinding; without it the residuals
/// are scaled and summed on the host.
#[derive(Debug)]
pub(in crate::pipeline) struct ResidualSum {
    /// `out_i = x_i * scale`: the first ControlNet acting at a step.
    first: Graph,
    /// `out_i = acc_i + x_i * scale`: every further one (built for two or more ControlNets).
    add: Option<Graph>,
    x_names: Vec<String>,
    acc_names: Vec<String>,
    out_names: Vec<String>,
    /// Where the ControlNets' residuals go: the sum graphs' `x_i` inputs.
    into_sum: Vec<Destination>,
    /// Where the sums go: the UNet's residual inputs, in [`ResidualLayout::names`] order.
    into_unet: Vec<Destination>,
}

impl ResidualSum {
    /// Builds the sum graphs for `nets` and the UNet's residual inputs; `None` when the
    /// ControlNets' outputs differ in element type (they are then summed on the host).
    pub(in crate::pipeline) fn build(
        layout: &ResidualLayout,
        unet: &Graph,
        nets: &[ControlNet],
        options: &SessionOptions,
    ) -> Result<Option<Self>> {
        let Some(first_net) = nets.first() else {
            return Ok(None);
        };
        let dtype_of = |net: &ControlNet| {
            net.graph
                .outputs()
                .iter()
                .find(|o| o.name == MID_OUTPUT)
                .map(|o| o.dtype)
        };
        let x_dtype = dtype_of(first_net);
        if nets.iter().any(|n| dtype_of(n) != x_dtype) {
            return Ok(None);
        }
        let (Some(x_dtype), Some(unet_dtype)) = (x_dtype, unet.input(MID_INPUT).map(|i| i.dtype))
        else {
            return Ok(None);
        };
        let count = layout.down.len() + 1;
        let first = builtin::scaled_sum(
            "controlnet_scale",
            count,
            4,
            (x_dtype, unet_dtype),
            false,
            options,
        )?;
        let add = if nets.len() > 1 {
            Some(builtin::scaled_sum(
                "controlnet_sum",
                count,
                4,
                (x_dtype, unet_dtype),
                true,
                options,
            )?)
        } else {
            None
        };
        let x_names: Vec<String> = (0..count).map(builtin::scaled_sum_x).collect();
        // Both graphs read `x_i` alike.
        let into_sum = x_names
            .iter()
            .map(|x| first.destination(x))
            .collect::<Result<_>>()?;
        let into_unet = layout
            .names()
            .map(|n| unet.destination(n))
            .collect::<Result<_>>()?;
        Ok(Some(ResidualSum {
            first,
            add,
            x_names,
            acc_names: (0..count).map(builtin::scaled_sum_acc).collect(),
            out_names: (0..count).map(builtin::scaled_sum_out).collect(),
            into_sum,
            into_unet,
        }))
    }

    /// The sum graphs (for session reports and run statistics).
    pub(in crate::pipeline) fn graphs(&self) -> impl Iterator<Item = &Graph> + Clone {
        std::iter::once(&self.first).chain(self.add.as_ref())
    }

    /// The graph the scales are placed for (both sum graphs read `scale` alike).
    pub(in crate::pipeline) fn scale_graph(&self) -> &Graph {
        &self.first
    }
}

/// [`super::unet_residuals`] through [`ResidualSum`]: the residuals stay where the ControlNets
/// wrote them, the sums where the UNet reads them.
pub(super) fn sum_placed(
    nets: &mut [ControlNet],
    summer: &mut ResidualSum,
    state: &ControlState,
    scales: &[f32],
    (sample, timestep, cond): (&ArrayD<f32>, &ArrayD<f32>, &Conditioning),
    resident: &Resident,
) -> Result<Residuals> {
    let mut acc: Option<Vec<PlacedTensor>> = None;
    let host_only = PlacedInputs::default();
    for (k, ((net, image), &scale)) in nets.iter_mut().zip(&state.images).zip(scales).enumerate() {
        if scale == 0.0 {
            continue;
        }
        let placed = resident.controlnets.get(k).unwrap_or(&host_only);
        let mut inputs = placed.denoiser_inputs(sample.clone(), timestep.clone(), cond);
        inputs.push(("controlnet_cond", placed.feed("controlnet_cond", image)));
        let outputs: Vec<(&str, &Destination)> = net
            .down_outputs
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(MID_OUTPUT))
            .zip(&summer.into_sum)
            .collect();
        let residuals = net.graph.run_bound_placed(inputs, &outputs)?;
        if let Some(previous) = &acc {
            same_shapes(
                previous.iter().map(PlacedTensor::shape),
                residuals.iter().map(PlacedTensor::shape),
            )?;
        }
        let mut inputs: Vec<(&str, Feed<'_>)> = vec![(SCALED_SUM_SCALE, resident.scale(scale))];
        inputs.extend(
            summer
                .x_names
                .iter()
                .map(String::as_str)
                .zip(residuals.iter().map(Feed::Placed)),
        );
        let graph = match &acc {
            None => &mut summer.first,
            Some(previous) => {
                inputs.extend(
                    summer
                        .acc_names
                        .iter()
                        .map(String::as_str)
                        .zip(previous.iter().map(Feed::Placed)),
                );
                summer.add.as_mut().ok_or_else(|| {
                    Error::invariant("a second ControlNet acted but no sum graph was built")
                })?
            }
        };
        let outputs: Vec<(&str, &Destination)> = summer
            .out_names
            .iter()
            .map(String::as_str)
            .zip(&summer.into_unet)
            .collect();
        let next = graph.run_bound_placed(inputs, &outputs)?;
        acc = Some(next);
    }
    Ok(acc.map_or(Residuals::Zeros, Residuals::Placed))
}
