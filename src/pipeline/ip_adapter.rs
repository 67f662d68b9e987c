//! IP-Adapter (diffusers' `load_ip_adapter` + `set_ip_adapter_scale`): a reference image steers
//! the generation through an extra attention in every cross-attention layer of the UNet.
//!
//! The UNet export takes, per cross-attention layer, the adapter's keys and values
//! (`ip_key_i`, `ip_value_i`: the image tokens through that layer's `to_k_ip` / `to_v_ip`) and
//! one scale per layer (`ip_adapter_scale`), and adds `scale * attention(query, key, value)`
//! before the layer's `to_out`, as `IPAdapterAttnProcessor2_0` does (`export/unet.py`). Keys and
//! values do not depend on the timestep, so the adapter's own graphs (`python -m export
//! ip-adapter`: the CLIP image encoder and the image projection with every `to_k_ip` /
//! `to_v_ip`) run once per generation, not once per step. Without an adapter the UNet gets one
//! zero token and scale 0: its plain output, exactly. The scale is a request field, so it
//! changes between generations without reloading anything.

use std::path::{Path, PathBuf};

use ndarray::{concatenate, ArrayD, Axis, IxDyn};
use serde::Deserialize;

use super::controlnet::numbered;
use super::request::{Field, MAX_IP_ADAPTER_SCALE};
use crate::image_io::{clip_pixel_values, ClipImageConfig, RgbImage};
use crate::model::{hub, read_json, MANIFEST_FORMAT_VERSION};
use crate::runtime::{Graph, SessionOptions, TensorInput};
use crate::{Error, Result};

/// The prefix of the UNet's and the projection's per-layer key inputs / outputs.
const IP_KEY: &str = "ip_key_";
/// The prefix of the per-layer value inputs / outputs.
const IP_VALUE: &str = "ip_value_";
/// The UNet's per-layer scale input, f32 `[layers]`.
const IP_SCALE: &str = "ip_adapter_scale";
const MANIFEST_KIND: &str = "ip-adapter";
const MANIFEST_FILE: &str = "tcd_ort.json";
const GRAPH_FILE: &str = "model.onnx";
/// The image encoder's output a plain adapter projects (`image_embeds`, `[batch, dim]`).
const PLAIN_OUTPUT: &str = "image_embeds";
/// The image encoder's output a "plus" adapter resamples (`hidden_states[-2]`).
const PLUS_OUTPUT: &str = "image_hidden_states";

/// A request's reference image for the engine's IP-Adapter
/// ([`super::EngineOptions::ip_adapter`]).
#[derive(Debug, Clone, PartialEq)]
pub struct IpAdapterImage {
    /// The reference image, any size: pre-processed as CLIP's image processor does it
    /// (shortest side resized, centre crop, normalised).
    pub image: RgbImage,
    /// diffusers' `set_ip_adapter_scale`: 0 ignores the image, 1 (diffusers' default) is full
    /// strength; the TCD guide uses 0.5.
    pub scale: f32,
}

impl IpAdapterImage {
    /// A reference image at diffusers' default scale, 1.
    pub fn new(image: RgbImage) -> Self {
        IpAdapterImage { image, scale: 1.0 }
    }

    /// Checks the scale ([`IpAdapterImage::check_scale`]).
    pub fn validate(&self) -> Result<()> {
        Self::check_scale(self.scale)
    }

    /// A scale must be a number from 0 to [`MAX_IP_ADAPTER_SCALE`] (NaN and infinities are
    /// refused).
    pub fn check_scale(scale: f32) -> Result<()> {
        if !(0.0..=MAX_IP_ADAPTER_SCALE).contains(&scale) {
            return Err(Field::IpAdapterScale.invalid(format!(
                "must be a number from 0 to {MAX_IP_ADAPTER_SCALE} (1 is full strength, the TCD \
                 guide uses 0.5), got {scale}"
            )));
        }
        Ok(())
    }
}

/// The IP-Adapter inputs of a UNet export: the key/value width of each cross-attention layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct IpLayout {
    dims: Vec<usize>,
}

impl IpLayout {
    /// The layout of `unet`'s inputs; `None` for exports without them (made before IP-Adapter
    /// support, or by optimum).
    pub(super) fn from_unet(unet: &Graph, root: &Path) -> Result<Option<Self>> {
        let names = || unet.inputs().iter().map(|i| i.name.as_str());
        let keys = numbered(names(), IP_KEY, root)?;
        let values = numbered(names(), IP_VALUE, root)?;
        let scale = unet.input(IP_SCALE);
        if keys.is_empty() && values.is_empty() && scale.is_none() {
            return Ok(None);
        }
        let broken = |what: String| {
            Err(Error::model(
                root,
                format!("the UNet's IP-Adapter inputs are inconsistent ({what}); re-export it"),
            ))
        };
        if keys.len() != values.len() || keys.is_empty() {
            return broken(format!(
                "{} {IP_KEY}<i> and {} {IP_VALUE}<i>",
                keys.len(),
                values.len()
            ));
        }
        let mut dims = Vec::with_capacity(keys.len());
        for (key, value) in keys.iter().zip(&values) {
            let width = |name: &str| match unet.input(name).map(|i| i.shape.as_slice()) {
                Some(&[_, _, d]) if d > 0 => Some(d as usize),
                _ => None,
            };
            match (width(key), width(value)) {
                (Some(k), Some(v)) if k == v => dims.push(k),
                _ => return broken(format!("{key} and {value} must be [batch, tokens, width]")),
            }
        }
        match scale.map(|s| s.shape.as_slice()) {
            Some(&[n]) if n == dims.len() as i64 => {}
            _ => return broken(format!("{IP_SCALE} must be [{}]", dims.len())),
        }
        Ok(Some(IpLayout { dims }))
    }

    /// The inputs for a UNet batch of `batch` without an adapter: one zero token per layer,
    /// scale 0.
    pub(super) fn zeros(&self, batch: usize) -> Vec<(String, ArrayD<f32>)> {
        let mut inputs = Vec::with_capacity(2 * self.dims.len() + 1);
        for (i, &dim) in self.dims.iter().enumerate() {
            for prefix in [IP_KEY, IP_VALUE] {
                inputs.push((
                    format!("{prefix}{i}"),
                    ArrayD::zeros(IxDyn(&[batch, 1, dim])),
                ));
            }
        }
        inputs.push((
            IP_SCALE.to_string(),
            ArrayD::zeros(IxDyn(&[self.dims.len()])),
        ));
        inputs
    }
}

/// Plain adapters project CLIP's image embedding; "plus" adapters resample the encoder's
/// penultimate hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpAdapterVariant {
    /// `ImageProjection` of `image_embeds` (h94's `ip-adapter_sd15`, `ip-adapter_sdxl`).
    Plain,
    /// The `Resampler` of `hidden_states[-2]` (h94's `ip-adapter-plus_*`).
    Plus,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    format_version: Option<u32>,
    kind: Option<String>,
    variant: IpAdapterVariant,
    family: Option<String>,
    cross_attention_dim: usize,
    tokens: usize,
    layers: Vec<usize>,
}

/// A loaded IP-Adapter export (`python -m export ip-adapter`).
#[derive(Debug)]
pub struct IpAdapter {
    source: String,
    dir: PathBuf,
    encoder: Graph,
    projection: Graph,
    preprocess: ClipImageConfig,
    manifest: Manifest,
}

impl IpAdapter {
    /// Loads an IP-Adapter export: a directory, or a hub id whose repository holds one.
    pub fn load(source: &str, revision: Option<&str>, options: &SessionOptions) -> Result<Self> {
        let path = Path::new(source);
        let dir = if path.exists() {
            path.to_path_buf()
        } else if hub::looks_like_hub_id(source) {
            hub::resolve_export(
                source,
                revision,
                "IP-Adapter",
                &["image_encoder", "image_projection"],
            )?
        } else {
            return Err(Error::model(
                path,
                "no such IP-Adapter directory (and not a Hugging Face hub id of the form owner/name)",
            ));
        };
        let manifest_path = dir.join(MANIFEST_FILE);
        if !manifest_path.is_file() {
            let hint = if dir.join("model_index.json").is_file() {
                "this is a whole pipeline, not an IP-Adapter"
            } else {
                "no tcd_ort.json: not an IP-Adapter export"
            };
            return Err(Error::model(
                &dir,
                format!(
                    "{hint}; export one with `python -m export ip-adapter SOURCE DIR` (SOURCE \
                     laid out as h94/IP-Adapter)"
                ),
            ));
        }
        let kind: serde_json::Value = read_json(&manifest_path)?;
        let kind = kind
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("pipeline");
        if kind != MANIFEST_KIND {
            return Err(Error::model(
                &manifest_path,
                format!(
                    "this export is a {kind}, not an IP-Adapter (export one with `python -m \
                     export ip-adapter SOURCE DIR`)"
                ),
            ));
        }
        let manifest: Manifest = read_json(&manifest_path)?;
        if let Some(v) = manifest
            .format_version
            .filter(|&v| v > MANIFEST_FORMAT_VERSION)
        {
            return Err(Error::model(
                &manifest_path,
                format!("format_version {v} is newer than the {MANIFEST_FORMAT_VERSION} this tcd-ort reads; update tcd-ort"),
            ));
        }
        debug_assert_eq!(manifest.kind.as_deref(), Some(MANIFEST_KIND));
        let encoder_dir = dir.join("image_encoder");
        if !encoder_dir.join(GRAPH_FILE).is_file() {
            return Err(Error::model(
                &encoder_dir,
                "the IP-Adapter's image encoder is missing (image_encoder/model.onnx); re-export \
                 it with `python -m export ip-adapter`",
            ));
        }
        let preprocess = ClipImageConfig::from_file(&encoder_dir.join("preprocessor_config.json"))?;
        let encoder = Graph::load("image_encoder", &encoder_dir.join(GRAPH_FILE), options)?;
        let projection_path = dir.join("image_projection").join(GRAPH_FILE);
        let projection = Graph::load("image_projection", &projection_path, options)?;
        let adapter = IpAdapter {
            source: source.to_string(),
            dir,
            encoder,
            projection,
            preprocess,
            manifest,
        };
        adapter.check_graphs()?;
        Ok(adapter)
    }

    /// The graphs agree with each other and with the manifest.
    fn check_graphs(&self) -> Result<()> {
        let output = self.encoder_output();
        self.encoder.require_inputs(&["pixel_values"])?;
        if !self.encoder.has_output(output) {
            return Err(Error::model(
                &self.dir,
                format!(
                    "the image encoder of this {:?} IP-Adapter must output '{output}'; re-export it",
                    self.manifest.variant
                ),
            ));
        }
        self.projection.require_inputs(&[output])?;
        let outputs = || self.projection.outputs().iter().map(|o| o.name.as_str());
        let keys = numbered(outputs(), IP_KEY, &self.dir)?;
        let values = numbered(outputs(), IP_VALUE, &self.dir)?;
        let layers = self.manifest.layers.len();
        if keys.len() != layers || values.len() != layers {
            return Err(Error::model(
                &self.dir,
                format!(
                    "the image projection has {} {IP_KEY}<i> and {} {IP_VALUE}<i> outputs but \
                     the manifest lists {layers} layers; re-export it",
                    keys.len(),
                    values.len()
                ),
            ));
        }
        Ok(())
    }

    fn encoder_output(&self) -> &'static str {
        match self.manifest.variant {
            IpAdapterVariant::Plain => PLAIN_OUTPUT,
            IpAdapterVariant::Plus => PLUS_OUTPUT,
        }
    }

    /// What the adapter was loaded from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Plain or plus.
    pub fn variant(&self) -> IpAdapterVariant {
        self.manifest.variant
    }

    /// Image tokens per reference image.
    pub fn tokens(&self) -> usize {
        self.manifest.tokens
    }

    /// The graphs (for session reports and stage handling).
    pub(crate) fn graphs(&self) -> [&Graph; 2] {
        [&self.encoder, &self.projection]
    }

    pub(super) fn graphs_mut(&mut self) -> [&mut Graph; 2] {
        [&mut self.encoder, &mut self.projection]
    }

    /// Checks that the adapter was made for this UNet: the same text width and the same
    /// cross-attention layers (an SD1.5 adapter on SDXL, say, is refused here, at load).
    pub(super) fn check_fits(
        &self,
        layout: Option<&IpLayout>,
        cross_attention_dim: Option<usize>,
        model_root: &Path,
    ) -> Result<()> {
        let Some(layout) = layout else {
            return Err(Error::model(
                model_root,
                "the UNet of this model takes no IP-Adapter inputs (an older or an optimum \
                 export); re-export it with `python -m export convert` to use an IP-Adapter",
            ));
        };
        let m = &self.manifest;
        let dim_fits = cross_attention_dim.is_none_or(|d| d == m.cross_attention_dim);
        if !dim_fits || layout.dims != m.layers {
            let family = m.family.as_deref().unwrap_or("another base");
            return Err(Error::model(
                &self.dir,
                format!(
                    "this IP-Adapter ({family}) was made for a UNet with cross_attention_dim {} \
                     and {} cross-attention layers; this model's UNet has cross_attention_dim \
                     {} and {} layers: use an IP-Adapter of the model's base (h94/IP-Adapter: \
                     models/ for SD1.5, sdxl_models/ for SDXL)",
                    m.cross_attention_dim,
                    m.layers.len(),
                    cross_attention_dim.map_or_else(|| "?".to_string(), |d| d.to_string()),
                    layout.dims.len()
                ),
            ));
        }
        Ok(())
    }

    /// The UNet's IP-Adapter inputs for one generation, batched as the UNet's conditioning is:
    /// with guidance the unconditional half first (diffusers' negative image embeddings: zeros
    /// through the projection for plain adapters, the encoder's output for an all-black image
    /// for plus ones), each half repeated `num_images` times.
    pub(super) fn unet_inputs(
        &mut self,
        reference: &IpAdapterImage,
        num_images: usize,
        guidance: bool,
    ) -> Result<Vec<(String, ArrayD<f32>)>> {
        let pixels = clip_pixel_values(&reference.image, &self.preprocess)?;
        let output = self.encoder_output();
        let embeds = match (self.manifest.variant, guidance) {
            (IpAdapterVariant::Plus, true) => {
                let black = ArrayD::zeros(pixels.raw_dim());
                let batch = cat(&[black, pixels])?;
                self.encode(batch)?
            }
            (IpAdapterVariant::Plain, true) => {
                let embeds = self.encode(pixels)?;
                cat(&[ArrayD::zeros(embeds.raw_dim()), embeds])?
            }
            (_, false) => self.encode(pixels)?,
        };
        let names: Vec<String> = (0..self.manifest.layers.len())
            .flat_map(|i| [format!("{IP_KEY}{i}"), format!("{IP_VALUE}{i}")])
            .collect();
        let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        let projected = self
            .projection
            .run(vec![(output, TensorInput::F32(embeds))], &wanted)?;
        let mut inputs = Vec::with_capacity(names.len() + 1);
        for (name, tokens) in names.into_iter().zip(projected) {
            inputs.push((name, repeat_each(&tokens, num_images)?));
        }
        let scale = ArrayD::from_elem(IxDyn(&[self.manifest.layers.len()]), reference.scale);
        inputs.push((IP_SCALE.to_string(), scale));
        Ok(inputs)
    }

    fn encode(&mut self, pixels: ArrayD<f32>) -> Result<ArrayD<f32>> {
        let output = self.encoder_output();
        let mut out = self
            .encoder
            .run(vec![("pixel_values", TensorInput::F32(pixels))], &[output])?;
        out.pop()
            .ok_or_else(|| Error::invariant("the image encoder returned nothing"))
    }
}

fn cat(parts: &[ArrayD<f32>]) -> Result<ArrayD<f32>> {
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    concatenate(Axis(0), &views).map_err(|e| Error::internal("batching image embeddings", e))
}

/// Each row of `a` repeated `times` times in place (`[a0, a0, a1, a1]`): the per-image copies
/// of each half of a guidance batch.
fn repeat_each(a: &ArrayD<f32>, times: usize) -> Result<ArrayD<f32>> {
    let rows: Vec<_> = a
        .axis_iter(Axis(0))
        .flat_map(|row| std::iter::repeat_n(row.insert_axis(Axis(0)), times))
        .collect();
    concatenate(Axis(0), &rows).map_err(|e| Error::internal("repeating image tokens", e))
}
