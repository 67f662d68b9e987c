//! The checks of a request's control images against the loaded ControlNets.

use super::ControlImage;
use crate::{Error, Result};

/// Checks the control part of a request against the loaded ControlNets: one image per
/// ControlNet, each valid on its own ([`ControlImage::validate`]).
pub(in crate::pipeline) fn validate(loaded: usize, control: &[ControlImage]) -> Result<()> {
    if control.is_empty() {
        return Ok(());
    }
    if loaded == 0 {
        return Err(Error::invalid(format!(
            "{} control image(s) given but no ControlNet is loaded (--controlnet DIR_OR_ID)",
            control.len()
        )));
    }
    if control.len() != loaded {
        return Err(Error::invalid(format!(
            "{} control image(s) given for {loaded} ControlNet(s): give one --control-image per \
             --controlnet, in the same order",
            control.len()
        )));
    }
    for (k, c) in control.iter().enumerate() {
        c.validate(k)?;
    }
    Ok(())
}
