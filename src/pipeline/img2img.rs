//! Image-to-image, step for step as diffusers' `StableDiffusionImg2ImgPipeline` and
//! `StableDiffusionXLImg2ImgPipeline` run with `TCDScheduler`, and the helpers inpainting
//! shares: strength-shortened schedules, VAE encoding.

use super::finite::{ensure_finite, Source};
use ndarray::{concatenate, s, ArrayD, Axis, IxDyn};

use super::conditioning::Conditioning;
use super::request::Field;
use super::txt2img::{check_cancel, denoise, encode_prompts, finish};
use super::vae_tiling::{tiled, Tiles};
use super::{vae_tiny, Engine, GenerateRequest, Generated, Progress, Stage};
use crate::image_io::{image_to_tensor, RgbImage};
use crate::rng::TorchGenerator;
use crate::runtime::TensorInput;
use crate::sampler::tcd::TcdScheduler;
use crate::{Error, Result};

/// The scheduler and the timesteps that run for `strength` (the pipelines' `get_timesteps`):
/// the last `int(steps * strength)` of the TCD schedule, with the scheduler's begin index set.
pub(super) fn strength_schedule(
    engine: &Engine,
    request: &GenerateRequest,
    strength: f64,
) -> Result<(TcdScheduler, Vec<i64>)> {
    let mut scheduler = TcdScheduler::new(engine.scheduler.clone())?;
    scheduler.set_timesteps(
        Some(request.steps),
        request.original_inference_steps,
        None,
        1.0,
    )?;
    let all = scheduler.timesteps().to_vec();
    let steps = all.len();
    // Python's int(num_inference_steps * strength): float64 product, truncated.
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    if init_timestep < 1 {
        return Err(Field::Strength.invalid(format!(
            "{strength} with {steps} steps leaves {init_timestep} denoising steps (steps x \
             strength is rounded down); raise the strength or the steps so that their product \
             is at least 1"
        )));
    }
    let t_start = steps - init_timestep;
    scheduler.set_begin_index(t_start);
    Ok((scheduler, all[t_start..].to_vec()))
}

/// How encoded latents are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LatentScaling {
    /// `scaling_factor * x` (SD pipelines, SDXL inpainting).
    Factor,
    /// `(x - latents_mean) * scaling_factor / latents_std` where the VAE config has them
    /// (SDXL image-to-image).
    MeanStd,
}

/// `vae.encode(image).latent_dist.sample(generator)` scaled for the UNet: one draw of the
/// mean's shape from `generator`, exactly as diffusers' `DiagonalGaussianDistribution`; with
/// `tiling`, the encoder runs in tiles ([`super::vae_tiling`]).
pub(super) fn encode_image(
    engine: &mut Engine,
    image: &ArrayD<f32>,
    generator: &mut TorchGenerator,
    (scaling, tiling): (LatentScaling, bool),
) -> Result<ArrayD<f32>> {
    engine.stage(Stage::Image)?;
    let channels = engine.model.vae.latent_channels;
    let tiles = tiling.then(|| Tiles::of(&engine.model.vae));
    let Some(encoder) = engine.vae_encoder.as_mut() else {
        return Err(Error::model(
            engine.model.root(),
            "vae_encoder/model.onnx is missing; image-to-image and inpainting need the VAE \
             encoder (re-export the model with `python -m export convert`)",
        ));
    };
    // A tiny VAE's encoder gives the latents themselves: nothing to sample, no noise drawn.
    let tiny = encoder.has_output(vae_tiny::LATENTS_OUTPUT);
    let output = if tiny {
        vae_tiny::LATENTS_OUTPUT
    } else {
        "latent_parameters"
    };
    let mut encode_tile = |part: ArrayD<f32>| -> Result<ArrayD<f32>> {
        let inputs = vec![("sample", TensorInput::F32(part))];
        // Tiles come in several shapes: the arena would keep the activations of each.
        let mut out = if tiles.is_some() {
            encoder.run_releasing(inputs, &[output])?
        } else {
            encoder.run(inputs, &[output])?
        };
        out.pop()
            .ok_or_else(|| Error::invariant("vae_encoder returned nothing"))
    };
    let (h, w) = (image.shape()[2], image.shape()[3]);
    let params = match tiles {
        Some(t) if t.tiles_pixels(h, w) => tiled(image, t.sample, t.latent, &mut encode_tile)?,
        _ => encode_tile(image.clone())?,
    };
    ensure_finite(&params, Source::VaeEncoder, || {
        "the VAE encoder's output".to_string()
    })?;
    if tiny {
        return scale_latents(engine, params, scaling);
    }
    if params.ndim() != 4 || params.shape()[1] != 2 * channels {
        return Err(Error::model(
            engine.model.root(),
            format!(
                "vae_encoder output has shape {:?}; expected [batch, {}, h, w] (mean and log \
                 variance of {channels} latent channels)",
                params.shape(),
                2 * channels
            ),
        ));
    }
    let mean = params
        .slice(s![.., ..channels, .., ..])
        .to_owned()
        .into_dyn();
    let logvar = params.slice(s![.., channels.., .., ..]);
    let noise = generator.randn(mean.shape());
    let mut latents = mean;
    ndarray::Zip::from(&mut latents)
        .and(&logvar.into_dyn())
        .and(&noise)
        .for_each(|m, &lv, &z| {
            let std = (0.5 * lv.clamp(-30.0, 20.0)).exp();
            *m += std * z;
        });
    scale_latents(engine, latents, scaling)
}

/// Encoded latents scaled for the UNet.
fn scale_latents(
    engine: &Engine,
    mut latents: ArrayD<f32>,
    scaling: LatentScaling,
) -> Result<ArrayD<f32>> {
    let channels = engine.model.vae.latent_channels;
    if latents.ndim() != 4 || latents.shape()[1] != channels {
        return Err(Error::model(
            engine.model.root(),
            format!(
                "the VAE encoder's latents have shape {:?}; expected [batch, {channels}, h, w]",
                latents.shape()
            ),
        ));
    }
    let vae = &engine.model.vae;
    match (scaling, &vae.latents_mean, &vae.latents_std) {
        (LatentScaling::MeanStd, Some(mean), Some(std))
            if mean.len() == channels && std.len() == channels =>
        {
            for (c, mut channel) in latents.axis_iter_mut(Axis(1)).enumerate() {
                channel.mapv_inplace(|v| (v - mean[c]) * vae.scaling_factor / std[c]);
            }
        }
        _ => latents.mapv_inplace(|v| vae.scaling_factor * v),
    }
    Ok(latents)
}

/// Repeats a batch-1 tensor `n` times along axis 0 (`tensor.repeat(n, 1, 1, 1)`).
pub(super) fn repeat_batch(a: &ArrayD<f32>, n: usize) -> Result<ArrayD<f32>> {
    let views: Vec<_> = (0..n).map(|_| a.view()).collect();
    concatenate(Axis(0), &views).map_err(|e| Error::internal("batching", e))
}

/// Replaces SDXL time ids with the refiner form `(original size, crop, aesthetic score)` when
/// the pipeline config asks for it (`requires_aesthetics_score`), with diffusers' default
/// scores 6.0 and 2.5 (negative).
pub(super) fn apply_aesthetics(
    engine: &Engine,
    cond: &mut Conditioning,
    request: &GenerateRequest,
    guidance: bool,
    height: usize,
    width: usize,
) -> Result<()> {
    if !engine.requires_aesthetics_score || cond.time_ids.is_none() {
        return Ok(());
    }
    let row = |score: f32| [height as f32, width as f32, 0.0, 0.0, score];
    let n = request.num_images;
    let mut values = Vec::new();
    if guidance {
        for _ in 0..n {
            values.extend(row(2.5));
        }
    }
    for _ in 0..n {
        values.extend(row(6.0));
    }
    let rows = values.len() / 5;
    cond.time_ids = Some(
        ArrayD::from_shape_vec(IxDyn(&[rows, 5]), values)
            .map_err(|e| Error::internal("time ids", e))?,
    );
    Ok(())
}

/// Classifier-free guidance as the pipelines decide it.
pub(super) fn guidance_of(engine: &Engine, request: &GenerateRequest) -> Option<f32> {
    request
        .uses_guidance(&engine.model)
        .then_some(request.guidance)
}

pub(super) fn run(
    engine: &mut Engine,
    request: &GenerateRequest,
    (image, strength): (&RgbImage, f64),
    (height, width): (usize, usize),
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Generated> {
    let channels = engine.model.unet.in_channels;
    if channels != engine.model.vae.latent_channels {
        return Err(Error::model(
            engine.model.root(),
            format!(
                "the UNet takes {channels} channels: this is an inpainting UNet; give a mask \
                 (--mask) or use a regular model for image-to-image"
            ),
        ));
    }
    let guidance = guidance_of(engine, request);
    let (mut scheduler, timesteps) = strength_schedule(engine, request, strength)?;

    check_cancel(progress, Progress::EncodingPrompt)?;
    let mut cond = encode_prompts(engine, request, guidance.is_some(), height, width)?;
    apply_aesthetics(
        engine,
        &mut cond,
        request,
        guidance.is_some(),
        height,
        width,
    )?;

    let pixels = image_to_tensor(image, width as u32, height as u32)?;
    let mut generator = TorchGenerator::new(request.seed);
    let scaling = if engine.model.family().is_xl() {
        LatentScaling::MeanStd
    } else {
        LatentScaling::Factor
    };
    let init = encode_image(
        engine,
        &pixels,
        &mut generator,
        (scaling, request.vae_tiling),
    )?;
    let init = repeat_batch(&init, request.num_images)?;
    let noise = generator.randn(init.shape());
    let latents = scheduler.add_noise(&init, &noise, &timesteps[..1])?;
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
    finish(engine, latents, timesteps, request, progress)
}
