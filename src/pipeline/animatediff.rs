//! Text-to-video, step for step as diffusers' `AnimateDiffPipeline` runs with `TCDScheduler`:
//! the UNet of an AnimateDiff export (`python -m export animatediff`) takes
//! `[batch, channels, frames, h, w]` latents and one prompt embedding per video (it repeats
//! the embedding over the frames itself, as the pipeline does before calling the UNet). The
//! TCD loop and the prompt encoding are text-to-image's; the VAE decodes the frames
//! `decode_chunk` at a time (diffusers' `decode_chunk_size`, 16 by default).

use ndarray::{ArrayD, IxDyn};

use super::txt2img::{check_cancel, denoise, encode_prompts, finish};
use super::{Engine, GenerateRequest, Generated, Progress};
use crate::rng::TorchGenerator;
use crate::sampler::tcd::TcdScheduler;
use crate::{Error, Result};

/// diffusers' `decode_chunk_size` default.
const DEFAULT_DECODE_CHUNK: usize = 16;

pub(super) fn run(
    engine: &mut Engine,
    request: &GenerateRequest,
    frames: usize,
    (height, width): (usize, usize),
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Generated> {
    let guidance = request
        .uses_guidance(&engine.model)
        .then_some(request.guidance);
    let mut scheduler = TcdScheduler::new(engine.scheduler.clone())?;
    scheduler.set_timesteps(
        Some(request.steps),
        request.original_inference_steps,
        None,
        1.0,
    )?;
    let timesteps = scheduler.timesteps().to_vec();

    check_cancel(progress, Progress::EncodingPrompt)?;
    let cond = encode_prompts(engine, request, guidance.is_some(), height, width)?;

    let factor = engine.model.vae.scale_factor();
    let channels = engine.model.unet.in_channels;
    // diffusers' prepare_latents: randn of (batch, channels, frames, h, w), then the scheduler's
    // initial sigma.
    let shape = [
        request.num_images,
        channels,
        frames,
        height / factor,
        width / factor,
    ];
    let mut generator = TorchGenerator::new(request.seed);
    let sigma = scheduler.init_noise_sigma();
    let mut latents = generator.randn(&shape);
    if sigma != 1.0 {
        latents.mapv_inplace(|v| v * sigma);
    }
    scheduler.set_begin_index(0);
    let latents = denoise(
        engine,
        &mut scheduler,
        &timesteps,
        latents,
        &cond,
        guidance,
        request.eta,
        &mut generator,
        None,
        progress,
    )?;
    // diffusers' decode_latents: (batch, c, frames, h, w) -> (batch * frames, c, h, w), video by
    // video; the decoded frames come back in that order.
    let stacked = frames_as_batch(&latents)?;
    let chunked = GenerateRequest {
        decode_chunk: Some(request.decode_chunk.unwrap_or(DEFAULT_DECODE_CHUNK)),
        ..request.clone()
    };
    let mut generated = finish(engine, stacked, timesteps, &chunked, progress)?;
    generated.latents = latents;
    generated.frames = frames;
    Ok(generated)
}

/// `[batch, c, frames, h, w]` -> `[batch * frames, c, h, w]`, frames of one video together.
fn frames_as_batch(latents: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    let &[batch, channels, frames, h, w] = latents.shape() else {
        return Err(Error::invariant("video latents must have 5 dimensions"));
    };
    let permuted = latents.view().permuted_axes(IxDyn(&[0, 2, 1, 3, 4]));
    let data: Vec<f32> = permuted.iter().copied().collect();
    ArrayD::from_shape_vec(IxDyn(&[batch * frames, channels, h, w]), data)
        .map_err(|e| Error::internal("stacking frames", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_stacked_video_by_video() {
        // Element value = its (b, c, f, y, x) index, packed.
        let latents = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4, 1, 2]), |i| {
            (i[0] * 10000 + i[1] * 1000 + i[2] * 100 + i[4]) as f32
        });
        let stacked = frames_as_batch(&latents).expect("stacked");
        assert_eq!(stacked.shape(), &[8, 3, 1, 2]);
        for b in 0..2 {
            for f in 0..4 {
                for c in 0..3 {
                    for x in 0..2 {
                        assert_eq!(
                            stacked[[b * 4 + f, c, 0, x]],
                            latents[[b, c, f, 0, x]],
                            "video {b} frame {f} channel {c}"
                        );
                    }
                }
            }
        }
    }
}
