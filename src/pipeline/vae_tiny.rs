//! diffusers' `AutoencoderTiny` (TAESD for SD1.x/2.x, TAESDXL for SDXL) in place of the model's
//! VAE ([`super::EngineOptions::tiny_vae`]), as `pipe.vae = AutoencoderTiny(...)` does: an
//! export of `python -m export vae-tiny` whose decoder takes the latents divided by its own
//! `scaling_factor` (1.0 for TAESD) and whose encoder gives the latents themselves, with no
//! distribution to sample (diffusers' `retrieve_latents` reads `.latents`), so image-to-image
//! and inpainting draw no encoder noise with it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::{hub, read_json, ModelDir, VaeConfig};
use crate::runtime::{Graph, SessionOptions};
use crate::{Error, Result};

/// The manifest kind `python -m export vae-tiny` writes.
const MANIFEST_KIND: &str = "vae-tiny";
/// The encoder output of a tiny VAE: latents, not a distribution's parameters.
pub(super) const LATENTS_OUTPUT: &str = "latents";

#[derive(Debug, Deserialize)]
struct Manifest {
    kind: Option<String>,
}

/// A loaded tiny autoencoder.
pub(super) struct TinyVae {
    pub(super) decoder: Graph,
    pub(super) encoder: Option<Graph>,
    /// Its config: the engine's VAE config while it is in use.
    pub(super) config: VaeConfig,
    pub(super) dir: PathBuf,
}

fn resolve(source: &str) -> Result<PathBuf> {
    let path = Path::new(source);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if hub::looks_like_hub_id(source) {
        return hub::resolve_export(source, None, "tiny VAE", &["vae_decoder", "vae_encoder"]);
    }
    Err(Error::model(
        path,
        "no such tiny VAE directory (and not a Hugging Face hub id of the form owner/name)",
    ))
}

/// Loads the tiny VAE `source` names for `model`, checking that it speaks the model's latents.
pub(super) fn load(source: &str, model: &ModelDir, options: &SessionOptions) -> Result<TinyVae> {
    let dir = resolve(source)?;
    let manifest_path = dir.join("tcd_ort.json");
    if !manifest_path.is_file() {
        return Err(Error::model(
            &dir,
            "a tiny VAE is a directory written by `python -m export vae-tiny SOURCE DIR` \
             (tcd_ort.json, vae_decoder/, vae_encoder/)",
        ));
    }
    let manifest: Manifest = read_json(&manifest_path)?;
    if manifest.kind.as_deref() != Some(MANIFEST_KIND) {
        return Err(Error::model(
            &manifest_path,
            format!(
                "this export is a {}, not a tiny VAE (export one with `python -m export vae-tiny \
                 madebyollin/taesd DIR`)",
                manifest.kind.as_deref().unwrap_or("pipeline")
            ),
        ));
    }
    let config: VaeConfig = read_json(&dir.join("vae_decoder").join("config.json"))?;
    let (ours, theirs) = (&model.vae, &config);
    if ours.latent_channels != theirs.latent_channels
        || ours.scale_factor() != theirs.scale_factor()
    {
        return Err(Error::model(
            &dir,
            format!(
                "this tiny VAE has {} latent channels at {} pixels per latent, the model {} at \
                 {}: a tiny VAE for another family (TAESD is for SD1.x/2.x, TAESDXL for SDXL)?",
                theirs.latent_channels,
                theirs.scale_factor(),
                ours.latent_channels,
                ours.scale_factor()
            ),
        ));
    }
    let decoder = Graph::load(
        "vae_decoder",
        &dir.join("vae_decoder").join("model.onnx"),
        options,
    )?;
    decoder.require_inputs(&["latent_sample"])?;
    let encoder_path = dir.join("vae_encoder").join("model.onnx");
    let encoder = if encoder_path.is_file() {
        let graph = Graph::load("vae_encoder", &encoder_path, options)?;
        graph.require_inputs(&["sample"])?;
        if !graph.has_output(LATENTS_OUTPUT) {
            return Err(Error::model(
                &encoder_path,
                format!("a tiny VAE's encoder must output '{LATENTS_OUTPUT}'; re-export it"),
            ));
        }
        Some(graph)
    } else {
        None
    };
    Ok(TinyVae {
        decoder,
        encoder,
        config,
        dir,
    })
}
