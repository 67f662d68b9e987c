//! Inpainting, step for step as diffusers' `StableDiffusionInpaintPipeline` and
//! `StableDiffusionXLInpaintPipeline` run with `TCDScheduler`.
//!
//! A 9-channel UNet takes `latents ‖ mask ‖ masked-image latents`; a regular 4-channel UNet
//! gets the image's latents, re-noised to the next timestep, blended back outside the mask after
//! every step. Random numbers are drawn in diffusers' order: image latents (when needed), the
//! initial noise, then the masked image's latents (drawn even when a 4-channel UNet ignores them,
//! as diffusers does).

use ndarray::{concatenate, ArrayD, Axis, IxDyn, Zip};

use super::finite::ensure_step_finite;
use super::img2img::{
    apply_aesthetics, encode_image, guidance_of, repeat_batch, strength_schedule, LatentScaling,
};
use super::request::Field;
use super::resident::Resident;
use super::txt2img::{check_cancel, encode_prompts, finish, predict_noise};
use super::{Engine, GenerateRequest, Generated, InpaintMode, Progress, Stage};
use crate::image_io::{image_to_tensor, mask_to_tensor, RgbImage};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// `F.interpolate(mask, size)` with torch's default `nearest` mode: source index
/// `floor(dst * (in / out))` in float32, clamped.
fn nearest(mask: &ArrayD<f32>, out_h: usize, out_w: usize) -> Result<ArrayD<f32>> {
    let (in_h, in_w) = match mask.shape() {
        [1, 1, h, w] => (*h, *w),
        other => {
            return Err(Error::Runtime(format!(
                "mask has shape {other:?}, expected [1, 1, h, w]"
            )))
        }
    };
    let index = |o: usize, input: usize, output: usize| -> usize {
        if input == output {
            o
        } else {
            let scale = input as f32 / output as f32;
            ((o as f32 * scale).floor() as usize).min(input - 1)
        }
    };
    let mut out = ArrayD::<f32>::zeros(IxDyn(&[1, 1, out_h, out_w]));
    for y in 0..out_h {
        for x in 0..out_w {
            out[[0, 0, y, x]] = mask[[0, 0, index(y, in_h, out_h), index(x, in_w, out_w)]];
        }
    }
    Ok(out)
}

// The steps of diffusers' inpainting pipelines in their order (random draws included), which
// parity depends on; kept in one piece to be read beside them.
#[allow(clippy::too_many_lines)]
pub(super) fn run(
    engine: &mut Engine,
    request: &GenerateRequest,
    image: &RgbImage,
    mask: &RgbImage,
    (strength, mode): (f64, InpaintMode),
    (height, width): (usize, usize),
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Generated> {
    let latent_channels = engine.model.vae.latent_channels;
    let unet_channels = engine.model.unet.in_channels;
    let concat = if unet_channels == 2 * latent_channels + 1 {
        true
    } else if unet_channels == latent_channels {
        false
    } else {
        return Err(Error::model(
            engine.model.root(),
            format!(
                "the UNet takes {unet_channels} channels; inpainting needs {latent_channels} \
                 (blending) or {} (an inpainting UNet)",
                2 * latent_channels + 1
            ),
        ));
    };
    match (mode, concat) {
        (InpaintMode::Unet, false) => {
            return Err(Field::InpaintMode.invalid(format!(
                "unet needs an inpainting UNet ({} input channels) but this model's UNet takes \
                 {unet_channels}; use blend (or auto), or an inpainting checkpoint such as \
                 diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
                2 * latent_channels + 1
            )))
        }
        (InpaintMode::Blend, true) => {
            return Err(Field::InpaintMode.invalid(
                "blend needs a regular 4-channel UNet, but this model has a 9-channel inpainting \
                 UNet; use unet (or auto)",
            ))
        }
        _ => {}
    }
    let guidance = guidance_of(engine, request);
    let (mut scheduler, timesteps) = strength_schedule(engine, request, strength)?;
    let is_strength_max = strength == 1.0;

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

    let (w, h) = (width as u32, height as u32);
    let init_image = image_to_tensor(image, w, h)?;
    let mask_full = mask_to_tensor(mask, w, h)?;
    let mut masked_image = init_image.clone();
    Zip::from(&mut masked_image)
        .and(
            mask_full
                .broadcast(init_image.raw_dim())
                .ok_or_else(|| Error::invariant("mask does not broadcast over the image"))?,
        )
        .for_each(|p, &m| *p *= if m < 0.5 { 1.0 } else { 0.0 });

    let n = request.num_images;
    let factor = engine.model.vae.scale_factor();
    let latent_shape = [n, latent_channels, height / factor, width / factor];
    let mut generator = TorchGenerator::new(request.seed);
    let image_latents = if !concat || !is_strength_max {
        let encoded = encode_image(
            engine,
            &init_image,
            &mut generator,
            (LatentScaling::Factor, request.vae_tiling),
        )?;
        Some(repeat_batch(&encoded, n)?)
    } else {
        None
    };
    let noise = generator.randn(&latent_shape);
    let mut latents = match (&image_latents, is_strength_max) {
        (Some(init), false) => scheduler.add_noise(init, &noise, &timesteps[..1])?,
        _ => {
            let sigma = scheduler.init_noise_sigma();
            noise.mapv(|v| v * sigma)
        }
    };
    let mask_latent = repeat_batch(&nearest(&mask_full, height / factor, width / factor)?, n)?;
    let masked_latents = repeat_batch(
        &encode_image(
            engine,
            &masked_image,
            &mut generator,
            (LatentScaling::Factor, request.vae_tiling),
        )?,
        n,
    )?;
    let extra = if concat {
        Some(
            concatenate(Axis(1), &[mask_latent.view(), masked_latents.view()])
                .map_err(|e| Error::internal("joining mask and image latents", e))?,
        )
    } else {
        None
    };

    let total = timesteps.len();
    check_cancel(progress, Progress::Denoising { total })?;
    engine.stage(Stage::Denoise)?;
    let resident = Resident::place(engine.io_binding, &engine.unet, (&[], None), &cond, None)?;
    let resident = resident.as_ref();
    for (i, &t) in timesteps.iter().enumerate() {
        let noise_pred = match &extra {
            Some(extra) => {
                let input = concatenate(Axis(1), &[latents.view(), extra.view()])
                    .map_err(|e| Error::internal("building the UNet input", e))?;
                predict_noise(engine, &input, t, &cond, guidance, None, resident)?
            }
            None => predict_noise(engine, &latents, t, &cond, guidance, None, resident)?,
        };
        latents = scheduler
            .step(&noise_pred, t, &latents, request.eta, &mut generator)?
            .prev_sample;
        ensure_step_finite(&noise_pred, &latents, i + 1, total)?;
        if let (None, Some(image_latents)) = (&extra, &image_latents) {
            let proper = match timesteps.get(i + 1) {
                Some(&next) => scheduler.add_noise(image_latents, &noise, &[next])?,
                None => image_latents.clone(),
            };
            Zip::from(&mut latents)
                .and(&proper)
                .and(
                    &mask_latent.broadcast(proper.raw_dim()).ok_or_else(|| {
                        Error::invariant("mask does not broadcast over the latents")
                    })?,
                )
                .for_each(|l, &p, &m| *l = (1.0 - m) * p + m * *l);
        }
        check_cancel(
            progress,
            Progress::Step {
                step: i + 1,
                total,
                timestep: t,
            },
        )?;
    }
    finish(engine, latents, timesteps, request, progress)
}
