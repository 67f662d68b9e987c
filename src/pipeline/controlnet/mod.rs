//! ControlNet, step for step as diffusers' `StableDiffusionControlNetPipeline` and
//! `StableDiffusionXLControlNetPipeline` run it with `TCDScheduler`.
//!
//! A ControlNet is its own graph (`python -m export controlnet`): it sees what the UNet sees
//! plus the control image and returns one residual per UNet down-block output and one for the
//! mid block. The UNet export takes those residuals as inputs
//! (`down_block_additional_residual_<i>`, `mid_block_additional_residual`), so one UNet serves
//! runs with and without ControlNet: without, it gets zeros, and `x + 0 == x`.
//!
//! Per step `i` of `n`, ControlNet `k` runs with scale
//! `scale_k * keep`, `keep = 0` when `i / n < start_k` or `(i + 1) / n > end_k` (diffusers'
//! `controlnet_keep`); a ControlNet whose scale is 0 at a step is not run (its residuals would be
//! zeros). Several ControlNets add their scaled residuals in order (`MultiControlNetModel`).
//!
//! The parts, one file each: `request` (what a request asks of the ControlNets), `validate`
//! (its checks), `net` (loading a ControlNet export), `layout` (the UNet's residual inputs),
//! `state` (control images and step scales of one generation), `step` (the residuals of one
//! UNet evaluation) and `sum` (summing them where the UNet reads them).

mod layout;
mod net;
mod request;
mod state;
mod step;
mod sum;
#[cfg(test)]
mod tests;
mod validate;

use std::path::Path;

use crate::{Error, Result};

pub(crate) use layout::ResidualLayout;
pub(super) use net::load_depth_estimator;
pub use net::ControlNet;
pub use request::{ControlImage, ControlPreprocess};
pub(super) use state::{prepare, ControlState};
pub(super) use step::{unet_residuals, Residuals};
pub(super) use sum::ResidualSum;
pub(super) use validate::validate;

/// The manifest kind `python -m export controlnet` writes.
const MANIFEST_KIND: &str = "controlnet";
const MANIFEST_FILE: &str = "tcd_ort.json";
const GRAPH_FILE: &str = "model.onnx";
const DOWN_INPUT: &str = "down_block_additional_residual_";
const MID_INPUT: &str = "mid_block_additional_residual";
const DOWN_OUTPUT: &str = "down_block_res_sample_";
const MID_OUTPUT: &str = "mid_block_res_sample";

/// `down_block_res_sample_0 ... _{n-1}` (or the UNet's `down_block_additional_residual_*`):
/// the names with `prefix`, ordered by index, which must run from 0 without gaps.
pub(super) fn numbered<'a>(
    names: impl Iterator<Item = &'a str>,
    prefix: &str,
    what: &Path,
) -> Result<Vec<String>> {
    let mut found: Vec<(usize, String)> = names
        .filter_map(|n| Some((n.strip_prefix(prefix)?.parse().ok()?, n.to_string())))
        .collect();
    found.sort();
    for (expected, (index, name)) in found.iter().enumerate() {
        if *index != expected {
            return Err(Error::model(
                what,
                format!("{name}: the {prefix}<i> tensors must be numbered 0, 1, ... without gaps"),
            ));
        }
    }
    Ok(found.into_iter().map(|(_, n)| n).collect())
}
