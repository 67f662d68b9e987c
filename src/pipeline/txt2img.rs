//! Text-to-image, step for step as diffusers' `StableDiffusionPipeline` and
//! `StableDiffusionXLPipeline` run with `TCDScheduler`.

use ndarray::{concatenate, ArrayD, Axis, IxDyn, Slice};

use super::conditioning::{encode_sd, encode_sdxl, Conditioning, PromptSpec};
use super::controlnet::{self, ControlState, Residuals};
use super::finite::{ensure_finite, ensure_step_finite, Source};
use super::resident::{self, PlacedInputs, Resident};
use super::vae_tiling::{tiled, Tiles};
use super::{Engine, GenerateRequest, Generated, Progress, Stage};
use crate::image_io::vae_output_to_images;
use crate::rng::TorchGenerator;
use crate::runtime::{Feed, TensorInput};
use crate::sampler::tcd::TcdScheduler;
use crate::{Error, Result};

pub(super) fn check_cancel(
    progress: &mut dyn FnMut(Progress) -> bool,
    event: Progress,
) -> Result<()> {
    if progress(event) {
        Ok(())
    } else {
        Err(Error::Cancelled)
    }
}

pub(super) fn encode_prompts(
    engine: &mut Engine,
    request: &GenerateRequest,
    guidance: bool,
    height: usize,
    width: usize,
) -> Result<Conditioning> {
    engine.stage(Stage::Prompt)?;
    let spec = PromptSpec {
        prompt: &request.prompt,
        negative_prompt: request.negative_prompt.as_deref(),
        num_images: request.num_images,
        guidance,
    };
    let force_zeros = engine.model.force_zeros_for_empty_prompt();
    let mut cond = match engine.encoders.as_mut_slice() {
        [only] => encode_sd(only, &spec),
        [first, second] => encode_sdxl([first, second], &spec, force_zeros, height, width),
        _ => Err(Error::invariant("unexpected number of text encoders")),
    }?;
    let batch = request.num_images * if guidance { 2 } else { 1 };
    cond.ip_adapter = match (
        &mut engine.ip_adapter,
        &request.ip_adapter,
        &engine.ip_layout,
    ) {
        (Some(adapter), Some(reference), _) => {
            adapter.unet_inputs(reference, request.num_images, guidance)?
        }
        (_, _, Some(layout)) => layout.zeros(batch),
        (_, _, None) => Vec::new(),
    };
    for tensor in std::iter::once(&cond.hidden_states).chain(&cond.pooled) {
        ensure_finite(tensor, Source::TextEncoder, || {
            "the text encoders' output".to_string()
        })?;
    }
    Ok(cond)
}

/// Refuses a UNet batch or latent size other than the one a `--fixed-shape` engine was built
/// for.
fn check_fixed_shape(engine: &Engine, batch: usize, h: usize, w: usize) -> Result<()> {
    if let Some(fixed) = engine.fixed_shape {
        let factor = engine.model.vae.scale_factor();
        if (fixed.width, fixed.height, fixed.batch) != (w * factor, h * factor, batch) {
            return Err(Error::invalid(format!(
                "this engine's UNet was built for {}x{} at batch {} (--fixed-shape); the request \
             needs {}x{} at batch {} (images per prompt, doubled by guidance > 1): load \
             the engine for that size or without --fixed-shape",
                fixed.width,
                fixed.height,
                fixed.batch,
                w * factor,
                h * factor,
                batch
            )));
        }
    }
    Ok(())
}

/// One UNet evaluation with classifier-free guidance folded in, as the pipelines do it.
/// `control` is the ControlNet state and the step index, when ControlNets take part;
/// `resident` the inputs placed for this generation when IoBinding is on
/// ([`Resident::place`]).
pub(super) fn predict_noise(
    engine: &mut Engine,
    latents: &ArrayD<f32>,
    timestep: i64,
    cond: &Conditioning,
    guidance: Option<f32>,
    control: Option<(&ControlState, usize)>,
    resident: Option<&Resident>,
) -> Result<ArrayD<f32>> {
    let model_input = match guidance {
        Some(_) => concatenate(Axis(0), &[latents.view(), latents.view()])
            .map_err(|e| Error::internal("batching latents", e))?,
        None => latents.clone(),
    };
    // Images `[batch, c, h, w]`; videos `[batch, c, frames, h, w]`.
    let (batch, h, w) = match *model_input.shape() {
        [batch, _, h, w] | [batch, _, _, h, w] => (batch, h, w),
        _ => return Err(Error::invariant("latents must have 4 or 5 dimensions")),
    };
    check_fixed_shape(engine, batch, h, w)?;
    let timestep_len = match engine.unet.input("timestep").map(|i| i.shape.as_slice()) {
        // A graph with a static single timestep (some exports) takes exactly one.
        Some([1]) => 1,
        Some([]) => 0,
        _ => batch,
    };
    let timestep_array = if timestep_len == 0 {
        ArrayD::from_elem(IxDyn(&[]), timestep as f32)
    } else {
        ArrayD::from_elem(IxDyn(&[timestep_len]), timestep as f32)
    };
    let residuals = controlnet::unet_residuals(
        engine.residuals.as_ref(),
        (&mut engine.controlnets, engine.residual_sum.as_mut()),
        control,
        (&model_input, &timestep_array, cond),
        resident,
    )?;
    // Sums left where the UNet reads them are bound as they are.
    let (residuals, placed_sums) = match residuals {
        Residuals::Placed(sums) => (Residuals::None, sums),
        other => (other, Vec::new()),
    };
    let host_only = PlacedInputs::default();
    let placed = resident.map_or(&host_only, |r| &r.unet);
    let mut inputs: Vec<(&str, Feed<'_>)> =
        placed.denoiser_inputs(model_input, timestep_array, cond);
    // The IP-Adapter branch is the UNet's alone.
    inputs.extend(
        cond.ip_adapter
            .iter()
            .map(|(name, value)| (name.as_str(), placed.feed(name, value))),
    );
    inputs.extend(placed_sums.iter().map(|p| (p.input(), Feed::Placed(p))));
    match (residuals, engine.residuals.as_ref()) {
        (Residuals::Sum(sum), Some(layout)) => inputs.extend(
            layout
                .names()
                .zip(sum)
                .map(|(name, value)| (name, Feed::Host(TensorInput::F32(value)))),
        ),
        // Zeros are the same every step and every generation of this size: placed once.
        (Residuals::Zeros, Some(layout)) if resident.is_some() => {
            let unet = &engine.unet;
            let zeros = engine
                .zero_residuals
                .get_or_try_insert(&[batch, h, w], || {
                    layout
                        .zeros(batch, h, w)
                        .into_iter()
                        .map(|(name, value)| unet.place(name, TensorInput::F32(value)))
                        .collect()
                })?;
            inputs.extend(zeros.iter().map(|p| (p.input(), Feed::Placed(p))));
        }
        (Residuals::Zeros, Some(layout)) => inputs.extend(
            layout
                .zeros(batch, h, w)
                .into_iter()
                .map(|(name, value)| (name, Feed::Host(TensorInput::F32(value)))),
        ),
        (Residuals::None | Residuals::Placed(_), _) | (_, None) => {}
    }
    let mut out = resident::run(
        &mut engine.unet,
        resident.is_some(),
        inputs,
        &["out_sample"],
    )?;
    let noise = out
        .pop()
        .ok_or_else(|| Error::invariant("unet returned nothing"))?;
    match guidance {
        Some(scale) => {
            let half = batch / 2;
            let uncond = noise.slice_axis(Axis(0), Slice::from(..half));
            let text = noise.slice_axis(Axis(0), Slice::from(half..));
            // uncond + scale * (text - uncond), in float32 like torch.
            let mut guided = text.to_owned();
            guided.zip_mut_with(&uncond, |t, &u| *t = u + scale * (*t - u));
            Ok(guided)
        }
        None => Ok(noise),
    }
}

/// Decodes final latents into images (diffusers' `vae.decode(latents / scaling_factor)`),
/// `chunk` images at a time (diffusers' `decode_chunk_size`; each image decodes on its own, so
/// the pixels do not depend on it), reporting each chunk; with `tiling`, each chunk in tiles
/// ([`super::vae_tiling`]).
pub(super) fn decode(
    engine: &mut Engine,
    latents: &ArrayD<f32>,
    (chunk, tiling): (usize, bool),
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<ArrayD<f32>> {
    engine.stage(Stage::Decode)?;
    let vae = &engine.model.vae;
    let scaled = match (&vae.latents_mean, &vae.latents_std) {
        (Some(mean), Some(std)) if mean.len() == latents.shape()[1] && std.len() == mean.len() => {
            let mut out = latents.clone();
            for (c, mut channel) in out.axis_iter_mut(Axis(1)).enumerate() {
                channel.mapv_inplace(|v| v * std[c] / vae.scaling_factor + mean[c]);
            }
            out
        }
        _ => latents.mapv(|v| v / vae.scaling_factor),
    };
    let total = scaled.shape()[0];
    let chunk = chunk.clamp(1, total.max(1));
    let tiles = tiling.then(|| Tiles::of(&engine.model.vae));
    let decoder = &mut engine.vae_decoder;
    // Tiles come in several shapes: the arena would keep the activations of each.
    let release = tiles.is_some();
    let mut decode_tile = |part: ArrayD<f32>| -> Result<ArrayD<f32>> {
        let inputs = vec![("latent_sample", TensorInput::F32(part))];
        let mut out = if release {
            decoder.run_releasing(inputs, &["sample"])?
        } else {
            decoder.run(inputs, &["sample"])?
        };
        out.pop()
            .ok_or_else(|| Error::invariant("vae_decoder returned nothing"))
    };
    let mut run = |part: ArrayD<f32>| -> Result<ArrayD<f32>> {
        let (h, w) = (part.shape()[2], part.shape()[3]);
        let decoded = match tiles {
            Some(t) if t.tiles_latents(h, w) => tiled(&part, t.latent, t.sample, &mut decode_tile)?,
            _ => decode_tile(part)?,
        };
        ensure_finite(&decoded, Source::VaeDecoder, || {
            "the VAE decoder's output".to_string()
        })?;
        Ok(decoded)
    };
    if chunk >= total {
        let decoded = run(scaled)?;
        check_cancel(progress, Progress::Decoded { done: total, total })?;
        return Ok(decoded);
    }
    let mut parts = Vec::new();
    for start in (0..total).step_by(chunk) {
        let end = (start + chunk).min(total);
        parts.push(run(scaled
            .slice_axis(Axis(0), Slice::from(start..end))
            .to_owned())?);
        check_cancel(progress, Progress::Decoded { done: end, total })?;
    }
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    concatenate(Axis(0), &views).map_err(|e| Error::internal("joining decoded chunks", e))
}

/// Text-to-image; with `frames`, text-to-video on an AnimateDiff model (the same loop on
/// `[batch, c, frames, h, w]` latents, [`super::animatediff`]).
pub(super) fn run(
    engine: &mut Engine,
    request: &GenerateRequest,
    frames: Option<usize>,
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
    if channels != engine.model.vae.latent_channels {
        return Err(Error::model(
            engine.model.root(),
            format!(
                "the UNet takes {channels} channels but the VAE has {} latent channels: this is an inpainting UNet; text-to-image needs a regular one",
                engine.model.vae.latent_channels
            ),
        ));
    }
    // diffusers' prepare_latents: (batch, channels, [frames,] h, w).
    let shape: Vec<usize> = [request.num_images, channels]
        .into_iter()
        .chain(frames)
        .chain([height / factor, width / factor])
        .collect();
    let mut generator = TorchGenerator::new(request.seed);
    let sigma = scheduler.init_noise_sigma();
    let mut latents = generator.randn(&shape);
    if sigma != 1.0 {
        latents.mapv_inplace(|v| v * sigma);
    }
    scheduler.set_begin_index(0);
    let control = controlnet::prepare(
        &request.control,
        &mut engine.depth,
        timesteps.len(),
        (height, width),
        request.num_images,
        guidance.is_some(),
    )?;
    let latents = denoise(
        engine,
        &mut scheduler,
        &timesteps,
        latents,
        &cond,
        guidance,
        request.eta,
        &mut generator,
        control.as_ref(),
        progress,
    )?;
    let mut generated = match frames {
        Some(frames) => {
            super::animatediff::finish_video(engine, latents, timesteps, request, frames, progress)?
        }
        None => finish(engine, latents, timesteps, request, progress)?,
    };
    if let Some(control) = control {
        generated.control_images = control.into_previews();
    }
    Ok(generated)
}

/// The TCD loop shared by text-to-image and image-to-image: predict, step, report.
#[allow(clippy::too_many_arguments)]
pub(super) fn denoise(
    engine: &mut Engine,
    scheduler: &mut TcdScheduler,
    timesteps: &[i64],
    mut latents: ArrayD<f32>,
    cond: &Conditioning,
    guidance: Option<f32>,
    eta: f32,
    generator: &mut TorchGenerator,
    control: Option<&ControlState>,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<ArrayD<f32>> {
    let total = timesteps.len();
    check_cancel(progress, Progress::Denoising { total })?;
    engine.stage(Stage::Denoise)?;
    let resident = Resident::place(
        engine.io_binding,
        &engine.unet,
        (&engine.controlnets, engine.residual_sum.as_ref()),
        cond,
        control,
    )?;
    for (i, &t) in timesteps.iter().enumerate() {
        let noise_pred = predict_noise(
            engine,
            &latents,
            t,
            cond,
            guidance,
            control.map(|c| (c, i)),
            resident.as_ref(),
        )?;
        latents = scheduler
            .step(&noise_pred, t, &latents, eta, generator)?
            .prev_sample;
        ensure_step_finite(&noise_pred, &latents, i + 1, total)?;
        check_cancel(
            progress,
            Progress::Step {
                step: i + 1,
                total,
                timestep: t,
            },
        )?;
    }
    Ok(latents)
}

/// Decodes the final latents into images: the end every task shares. `request.decode_chunk`
/// images at a time (all at once by default).
pub(super) fn finish(
    engine: &mut Engine,
    latents: ArrayD<f32>,
    timesteps: Vec<i64>,
    request: &GenerateRequest,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Generated> {
    check_cancel(progress, Progress::Decoding)?;
    let chunk = request.decode_chunk.unwrap_or(latents.shape()[0]);
    let decoded = decode(engine, &latents, (chunk, request.vae_tiling), progress)?;
    let images = vae_output_to_images(&decoded)?;
    Ok(Generated {
        images,
        frames: 1,
        latents,
        timesteps,
        control_images: Vec::new(),
        warnings: Vec::new(),
    })
}
