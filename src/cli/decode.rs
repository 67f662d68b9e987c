//! `tcd-ort decode`: latents saved with `--save-latents` (or diffusers' `output_type="latent"`,
//! as .npy) decoded into PNGs by the model's VAE, a tiny one or in tiles: to try decoders on
//! the same latents, and to measure the decoder alone.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use tcd_ort::image_io::{numbered_path, read_npy, write_png};
use tcd_ort::pipeline::{Engine, EngineOptions, GenerateRequest};
use tcd_ort::runtime::parse_provider_list;

use super::engine_args::EngineArgs;

/// `tcd-ort decode` flags.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// The latents: a float32 .npy of shape [batch, channels, height, width].
    #[arg(long)]
    latents: PathBuf,
    /// Output .png (several images get numbers: out-1.png, out-2.png ...).
    #[arg(long, short)]
    output: PathBuf,
    /// Decode in overlapping tiles, as diffusers' enable_vae_tiling().
    #[arg(long)]
    vae_tiling: bool,
    /// Images decoded at a time (default: all).
    #[arg(long, value_name = "N")]
    decode_chunk: Option<usize>,
    /// Replace existing output files.
    #[arg(long)]
    overwrite: bool,
}

/// Runs `tcd-ort decode`.
pub fn decode(args: DecodeArgs) -> Result<()> {
    if args.output.extension().and_then(|e| e.to_str()) != Some("png") {
        bail!(
            "--output must be a .png path, got {}",
            args.output.display()
        );
    }
    let latents =
        read_npy(&args.latents).with_context(|| format!("--latents {}", args.latents.display()))?;
    let providers = parse_provider_list(&args.engine.ep)?;
    // Only the VAE decoder stays loaded: the other graphs are checked at load and released.
    let mut options = args.engine.options(
        &providers,
        EngineOptions {
            low_memory: true,
            ..EngineOptions::one_shot()
        },
    )?;
    args.engine.session.apply(&providers, &mut options)?;
    let started = Instant::now();
    let mut engine = Engine::load(&args.engine.model, &options)?;
    eprintln!(
        "loaded {} in {:.1}s",
        args.engine.model,
        started.elapsed().as_secs_f32()
    );
    let request = GenerateRequest {
        decode_chunk: args.decode_chunk,
        vae_tiling: args.vae_tiling,
        ..GenerateRequest::default()
    };
    request.validate()?;
    let started = Instant::now();
    let images = engine.decode_latents(&latents, &request)?;
    eprintln!(
        "decoded {} image(s) in {:.2}s",
        images.len(),
        started.elapsed().as_secs_f32()
    );
    for (i, image) in images.iter().enumerate() {
        let path = numbered_path(&args.output, i, images.len());
        write_png(&path, image, &[], args.overwrite)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
