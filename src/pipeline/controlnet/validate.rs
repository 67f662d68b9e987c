//! The checks of a request's control images against the loaded ControlNets.

use super::{ControlImage, ControlPreprocess};
use crate::{Error, Result};

/// Checks the control part of a request against the loaded ControlNets.
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
        let which = format!("ControlNet {}", k + 1);
        if !c.scale.is_finite() {
            return Err(Error::invalid(format!(
                "{which}: the conditioning scale must be a finite number, got {}",
                c.scale
            )));
        }
        // diffusers' check_inputs, word for word in spirit.
        if !(c.start.is_finite() && c.end.is_finite()) || c.start >= c.end {
            return Err(Error::invalid(format!(
                "{which}: --control-start ({}) must be smaller than --control-end ({})",
                c.start, c.end
            )));
        }
        if c.start < 0.0 {
            return Err(Error::invalid(format!(
                "{which}: --control-start must be >= 0, got {}",
                c.start
            )));
        }
        if c.end > 1.0 {
            return Err(Error::invalid(format!(
                "{which}: --control-end must be <= 1, got {}",
                c.end
            )));
        }
        if let ControlPreprocess::Canny { low, high } = c.preprocess {
            if !(low.is_finite() && high.is_finite()) || low < 0.0 || high < 0.0 {
                return Err(Error::invalid(format!(
                    "{which}: Canny thresholds must be finite and >= 0, got {low} and {high}"
                )));
            }
        }
    }
    Ok(())
}
