//! Text-to-video, step for step as diffusers' `AnimateDiffPipeline` runs with `TCDScheduler`:
//! the UNet of an AnimateDiff export (`python -m export animatediff`) takes
//! `[batch, channels, frames, h, w]` latents and one prompt embedding per video (it repeats
//! the embedding over the frames itself, as the pipeline does before calling the UNet). The
//! noise, the TCD loop and the prompt encoding are text-to-image's (`txt2img::run` with
//! frames); here the VAE decodes the frames `decode_chunk` at a time (diffusers'
//! `decode_chunk_size`, 16 by default).

use ndarray::{ArrayD, IxDyn};

use super::txt2img::finish;
use super::{Engine, GenerateRequest, Generated, Progress};
use crate::{Error, Result};

/// diffusers' `decode_chunk_size` default.
const DEFAULT_DECODE_CHUNK: usize = 16;

/// Decodes the final video latents `[batch, c, frames, h, w]` as diffusers' `decode_latents`
/// does: frames stacked video by video into one batch, decoded `decode_chunk` at a time; the
/// decoded frames come back in that order.
pub(super) fn finish_video(
    engine: &mut Engine,
    latents: ArrayD<f32>,
    timesteps: Vec<i64>,
    request: &GenerateRequest,
    frames: usize,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Generated> {
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
