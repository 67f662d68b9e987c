//! Where NaN or infinite values first appear in a generation. A component that overflows (a
//! float16 VAE, weights with a LoRA fused at too high a weight, a broken noise schedule) would
//! otherwise go on silently and come out as a black image; checking its output names it. A
//! pass over a tensor costs nothing beside the graph that made it.

use ndarray::ArrayD;

use crate::{Error, Result};

/// What usually makes each component's output non-finite, for the message.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source {
    TextEncoder,
    Unet,
    Scheduler,
    VaeEncoder,
    VaeDecoder,
}

impl Source {
    fn hint(self) -> &'static str {
        match self {
            Source::TextEncoder => "the text encoder's weights overflow (a LoRA fused into it at too high a weight?)",
            Source::Unet => "the UNet's weights overflow: a LoRA at too high a weight, a ControlNet scale too large, or a float16 export that needs float32",
            Source::Scheduler => "the scheduler's noise levels (scheduler/scheduler_config.json) do not fit the UNet's output",
            Source::VaeEncoder => "the VAE encoder's weights overflow (float16 VAEs often do; export it in float32)",
            Source::VaeDecoder => "the VAE decoder's weights overflow (float16 VAEs often do, SDXL's needs its fp16-fix; export it in float32)",
        }
    }
}

/// Refuses a tensor with NaN or infinite values; `what` names it (`the UNet's output at step
/// 2 of 4`) and is only built when there are some.
pub(super) fn ensure_finite(
    values: &ArrayD<f32>,
    source: Source,
    what: impl FnOnce() -> String,
) -> Result<()> {
    let count = values.iter().filter(|v| !v.is_finite()).count();
    if count == 0 {
        return Ok(());
    }
    Err(Error::NonFinite {
        what: what(),
        count,
        total: values.len(),
        hint: source.hint().to_string(),
    })
}

/// Checks one denoising step: the UNet's prediction, then the scheduler's new latents.
pub(super) fn ensure_step_finite(
    noise_pred: &ArrayD<f32>,
    latents: &ArrayD<f32>,
    step: usize,
    total: usize,
) -> Result<()> {
    ensure_finite(noise_pred, Source::Unet, || {
        format!("the UNet's output at step {step} of {total}")
    })?;
    ensure_finite(latents, Source::Scheduler, || {
        format!("the latents after step {step} of {total}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_component_and_counts_the_bad_values() {
        let mut x = ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 3]));
        assert!(ensure_finite(&x, Source::Unet, || unreachable!()).is_ok());
        x[[0, 1]] = f32::NAN;
        x[[1, 2]] = f32::INFINITY;
        let e = ensure_finite(&x, Source::Unet, || {
            "the UNet's output at step 2 of 4".into()
        })
        .expect_err("refused");
        let text = e.to_string();
        assert!(
            text.starts_with(
                "the UNet's output at step 2 of 4 has 2 NaN or infinite values (of 6): "
            ),
            "{text}"
        );
        assert!(text.contains("LoRA"), "{text}");
    }
}
