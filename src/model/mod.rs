//! Model directories: the optimum-compatible layout tcd-ort reads, its configs and manifest,
//! and resolution of Hugging Face hub ids.
//!
//! ```text
//! model_index.json            pipeline class, SDXL's force_zeros_for_empty_prompt
//! scheduler/scheduler_config.json
//! tokenizer/  (+ tokenizer_2/)   tokenizer.json, or vocab.json + merges.txt
//! text_encoder/ (+ text_encoder_2/)  model.onnx [+ model.onnx_data], config.json
//! unet/ vae_decoder/ vae_encoder/    model.onnx [+ model.onnx_data], config.json
//! tcd_ort.json                 written by tcd-ort's exporter (optional)
//! ```

pub mod hub;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// The model family, which decides how prompts are conditioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Stable Diffusion 1.x.
    Sd15,
    /// Stable Diffusion 2.x (base or v-prediction).
    Sd21,
    /// Stable Diffusion XL (two text encoders, pooled embeddings, time ids).
    Sdxl,
}

impl Family {
    /// Whether prompts are conditioned the SDXL way.
    pub fn is_xl(self) -> bool {
        self == Family::Sdxl
    }
}

/// The `tcd_ort.json` manifest written by the exporter; every field is optional so that older or
/// foreign directories still load.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Manifest {
    /// Format version of the manifest.
    #[serde(default)]
    pub format_version: u32,
    /// The model family.
    pub family: Option<Family>,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: Option<String>,
    /// `float32` or `float16` (`python -m export convert --dtype fp16`: text encoders and UNet
    /// in float16, the VAE in float32 unless exported with `--vae-dtype fp16`).
    pub dtype: Option<String>,
    /// Whether ONNX initializers keep their PyTorch parameter names.
    #[serde(default)]
    pub weights_keep_names: bool,
    /// LoRAs recorded at export for the engine to apply at load time.
    #[serde(default)]
    pub lora: Vec<ManifestLora>,
    /// Empty LoRA layers exported per component (`convert --lora-slots RANK`), keyed by
    /// component directory (`unet`).
    #[serde(default)]
    pub lora_slots: BTreeMap<String, LoraSlots>,
    /// Per component directory (`unet`, `vae_decoder` ...): weight dtype and graph signature.
    #[serde(default)]
    pub components: BTreeMap<String, ManifestComponent>,
    /// The motion module of an AnimateDiff export (`python -m export animatediff`).
    pub motion: Option<Motion>,
}

/// An AnimateDiff UNet's motion module: its UNet takes `[batch, channels, frames, h, w]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Motion {
    /// The most frames the motion module's positional embeddings cover (the adapter's
    /// `motion_max_seq_length`).
    pub max_frames: usize,
    /// The motion adapter the export was made with, as given to the exporter.
    #[serde(default)]
    pub source: Option<String>,
}

/// The newest `tcd_ort.json` format this engine reads.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// The dtype names a manifest may give, as the exporter writes them.
const MANIFEST_DTYPES: [&str; 4] = ["float32", "float16", "int32", "int64"];

impl Manifest {
    /// Checks what can be checked without the graphs: a format this engine reads and dtype
    /// names it knows. The error is the message.
    fn check(&self) -> std::result::Result<(), String> {
        if self.format_version > MANIFEST_FORMAT_VERSION {
            return Err(format!(
                "format_version {} is newer than the {MANIFEST_FORMAT_VERSION} this tcd-ort \
                 reads: upgrade tcd-ort, or export the model again with this version's exporter",
                self.format_version
            ));
        }
        let weight_dtype = |where_: &str, dtype: &Option<String>| match dtype.as_deref() {
            None | Some("float32" | "float16") => Ok(()),
            Some(other) => Err(format!(
                "{where_} is {other:?}; expected \"float32\" or \"float16\""
            )),
        };
        weight_dtype("dtype", &self.dtype)?;
        for (name, component) in &self.components {
            weight_dtype(
                &format!("components.{name}.weights_dtype"),
                &component.weights_dtype,
            )?;
            let tensors = component.inputs.iter().chain(&component.outputs);
            for (tensor, spec) in tensors {
                if !MANIFEST_DTYPES.contains(&spec.dtype.as_str()) {
                    return Err(format!(
                        "components.{name}: {tensor} has dtype {:?}; expected one of {}",
                        spec.dtype,
                        MANIFEST_DTYPES.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks a loaded graph's inputs and outputs (name, dtype name, shape with -1 for dynamic
    /// dimensions) against what the manifest says of `component`: a manifest that contradicts
    /// its graphs was edited or belongs to another export. The error is the message.
    pub fn check_graph<'a>(
        &self,
        component: &str,
        io: impl IntoIterator<Item = (&'a str, &'a str, &'a [i64])>,
    ) -> std::result::Result<(), String> {
        let Some(described) = self.components.get(component) else {
            return Ok(());
        };
        let io: Vec<_> = io.into_iter().collect();
        let tensors = described.inputs.iter().chain(&described.outputs);
        for (name, spec) in tensors {
            let Some(&(_, dtype, shape)) = io.iter().find(|(n, _, _)| n == name) else {
                return Err(format!(
                    "components.{component} lists {name}, which the graph does not have"
                ));
            };
            if dtype != spec.dtype {
                return Err(format!(
                    "components.{component}: {name} is {} in the manifest but {dtype} in the graph",
                    spec.dtype
                ));
            }
            let fixed_differs =
                spec.shape.len() != shape.len()
                    || spec.shape.iter().zip(shape).any(|(want, &got)| {
                        want.as_i64().is_some_and(|want| got >= 0 && want != got)
                    });
            if fixed_differs {
                return Err(format!(
                    "components.{component}: {name} has shape {} in the manifest but {shape:?} in \
                     the graph",
                    serde_json::Value::from(spec.shape.clone())
                ));
            }
        }
        Ok(())
    }
}

/// The LoRA slots of one component: peft LoRA layers exported with A = B = 0, whose
/// initializers the engine replaces to apply LoRAs unfused (`y = W x + B (A x)`).
///
/// See `export/lora_slots.py` for how they are written.
#[derive(Debug, Clone, Deserialize)]
pub struct LoraSlots {
    /// The slot rank: how many LoRA ranks fit in one module's slot, summed over adapters.
    pub rank: usize,
    /// peft's `lora_alpha` of the slots; the graph scales `B (A x)` by `lora_alpha / rank`.
    pub lora_alpha: Option<f32>,
    /// The peft `target_modules` the slots were injected with (for the record).
    #[serde(default)]
    pub target_modules: Vec<String>,
    /// Every module (diffusers path, e.g. `down_blocks.0.resnets.0.conv1`) that has a slot.
    pub modules: Vec<String>,
    /// Initializer name pattern of A, with `{module}` for the module path.
    pub lora_a: String,
    /// Initializer name pattern of B, with `{module}` for the module path.
    pub lora_b: String,
    /// The slots are also graph inputs ("overridable" initializers): a loaded session takes
    /// their values with every run, so LoRAs change without building it again.
    #[serde(default)]
    pub overridable: bool,
}

impl LoraSlots {
    /// Every slot initializer's name.
    pub fn tensor_names(&self) -> std::collections::HashSet<String> {
        self.modules
            .iter()
            .flat_map(|m| {
                let (a, b) = self.names(m);
                [a, b]
            })
            .collect()
    }

    /// The initializer names of `module`'s A and B.
    pub fn names(&self, module: &str) -> (String, String) {
        (
            self.lora_a.replace("{module}", module),
            self.lora_b.replace("{module}", module),
        )
    }

    /// The scale the graph applies to `B (A x)`: `lora_alpha / rank` as in peft (1 when the
    /// manifest does not say).
    pub fn graph_scale(&self) -> f32 {
        match self.lora_alpha {
            Some(alpha) if self.rank > 0 => alpha / self.rank as f32,
            _ => 1.0,
        }
    }
}

/// One component as the manifest describes it. The engine feeds and reads each graph by the
/// dtypes the graph itself declares (these mirror them), converting to and from float32.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ManifestComponent {
    /// The dtype of most of its weights (`float32`, `float16`); absent in older manifests.
    pub weights_dtype: Option<String>,
    /// How the graph computes attention: `fused` (ONNX Runtime's
    /// `com.microsoft.MultiHeadAttention`, `export --attention fused`) or `plain` (standard ONNX
    /// ops only); absent in older manifests, whose graphs are plain.
    pub attention: Option<String>,
    /// Graph inputs by name.
    #[serde(default)]
    pub inputs: BTreeMap<String, ManifestTensor>,
    /// Graph outputs by name.
    #[serde(default)]
    pub outputs: BTreeMap<String, ManifestTensor>,
    /// The graph as consecutive segments (files beside `model.onnx`, sharing its weights), in
    /// running order: what low-memory mode loads one at a time (`export/segments.py`).
    #[serde(default)]
    pub segments: Vec<String>,
}

/// A graph input or output in the manifest.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ManifestTensor {
    /// `float32`, `float16`, `int32`, `int64` ...
    pub dtype: String,
    /// Fixed dims as numbers, dynamic ones as their axis name.
    #[serde(default)]
    pub shape: Vec<serde_json::Value>,
}

/// A LoRA recorded in the manifest (`python -m export convert --lora ...` without fusing).
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestLora {
    /// A `.safetensors` path, a directory or a hub id.
    pub source: String,
    /// The adapter weight.
    #[serde(default = "one")]
    pub weight: f32,
    /// The file inside a directory or repository.
    pub weight_name: Option<String>,
}

fn one() -> f32 {
    1.0
}

/// The parts of `unet/config.json` the pipelines read.
#[derive(Debug, Clone, Deserialize)]
pub struct UnetConfig {
    /// Latent channels the UNet takes (4, or 9 for inpainting UNets).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Default latent edge length; the default image size is this times the VAE scale factor.
    pub sample_size: Option<usize>,
    /// Width of the guidance embedding of guidance-distilled UNets (LCM); disables CFG.
    pub time_cond_proj_dim: Option<usize>,
    /// SDXL's `addition_time_embed_dim`.
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL's `projection_class_embeddings_input_dim`.
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// ResNet layers per down block; SGM-named (kohya SDXL) LoRA keys are mapped with it.
    pub layers_per_block: Option<usize>,
    /// Channels of each down block (ControlNet residual shapes follow them).
    #[serde(default)]
    pub block_out_channels: Vec<usize>,
    /// The down blocks; every one but the last halves the resolution.
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Width of the text conditioning (a number, or one per block in some configs).
    #[serde(default)]
    pub cross_attention_dim: serde_json::Value,
    /// The motion module's frame limit (`UNetMotionModel`'s config only).
    pub motion_max_seq_length: Option<usize>,
}

fn default_in_channels() -> usize {
    4
}

/// The parts of the VAE's `config.json` the pipelines read.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// Channel widths per block; the spatial scale factor is `2^(len - 1)`.
    #[serde(default = "default_vae_blocks")]
    pub block_out_channels: Vec<usize>,
    /// Latent channels.
    #[serde(default = "default_in_channels")]
    pub latent_channels: usize,
    /// Latents are multiplied by this after encoding and divided before decoding.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f32,
    /// Per-channel latent means (some SDXL fine-tunes).
    pub latents_mean: Option<Vec<f32>>,
    /// Per-channel latent standard deviations (some SDXL fine-tunes).
    pub latents_std: Option<Vec<f32>>,
    /// The image size the VAE was trained at (a number, or a list whose first entry counts):
    /// the tile side of VAE tiling.
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

fn default_vae_blocks() -> Vec<usize> {
    vec![128, 256, 512, 512]
}

fn default_scaling_factor() -> f32 {
    0.18215
}

impl VaeConfig {
    /// diffusers' `tile_sample_min_size`: `sample_size` (its first entry when a list), or
    /// `AutoencoderKL`'s default 32.
    pub fn tile_sample_size(&self) -> usize {
        let size = match &self.sample_size {
            Some(serde_json::Value::Array(list)) => list.first().and_then(|v| v.as_u64()),
            Some(v) => v.as_u64(),
            None => None,
        };
        size.and_then(|s| usize::try_from(s).ok())
            .filter(|s| *s > 0)
            .unwrap_or(32)
    }

    /// Image pixels per latent pixel along each axis, as diffusers computes it.
    pub fn scale_factor(&self) -> usize {
        // Saturating for configs `ModelDir::open` has not checked (it refuses past 16 blocks).
        let shift =
            u32::try_from(self.block_out_channels.len().saturating_sub(1)).unwrap_or(u32::MAX);
        1usize.checked_shl(shift).unwrap_or(1 << (usize::BITS - 1))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    force_zeros_for_empty_prompt: Option<bool>,
    requires_aesthetics_score: Option<bool>,
}

/// Refuses configs whose sizes are meaningless or would overflow where they are used.
fn check_sizes(root: &Path, unet: &UnetConfig, vae: &VaeConfig) -> Result<()> {
    if vae.block_out_channels.is_empty() {
        return Err(Error::model(
            root.join("vae_decoder").join("config.json"),
            "block_out_channels is empty",
        ));
    }
    // The VAE halves the image once per block after the first; past 16 blocks the factor,
    // and the native size that multiplies it, stop meaning anything (and stop fitting).
    if vae.block_out_channels.len() > 16 {
        return Err(Error::model(
            root.join("vae_decoder").join("config.json"),
            format!(
                "block_out_channels has {} entries; a VAE has at most 16",
                vae.block_out_channels.len()
            ),
        ));
    }
    if unet.sample_size.is_some_and(|s| {
        s.checked_mul(vae.scale_factor())
            .is_none_or(|px| px > 1 << 20)
    }) {
        return Err(Error::model(
            root.join("unet").join("config.json"),
            "sample_size times the VAE's scale factor is past a million pixels",
        ));
    }
    Ok(())
}

/// A model directory on disk, checked and with its configs read.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    family: Family,
    manifest: Option<Manifest>,
    class_name: Option<String>,
    force_zeros_for_empty_prompt: bool,
    requires_aesthetics_score: bool,
    /// The UNet's config.
    pub unet: UnetConfig,
    /// The VAE's config (from `vae_decoder/`).
    pub vae: VaeConfig,
    /// The raw scheduler config, for [`crate::sampler::tcd::TcdConfig`].
    pub scheduler_config: serde_json::Value,
    /// `projection_dim` of `text_encoder_2` (SDXL), used for the time ids check.
    pub text_encoder_2_projection_dim: Option<usize>,
}

/// Reads a JSON file, telling a missing file from malformed JSON.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::model(path, "missing file")
        } else {
            Error::io(path, e)
        }
    })?;
    serde_json::from_str(&text).map_err(|e| Error::model(path, format!("invalid JSON: {e}")))
}

/// Finds a model: an existing directory, else a Hugging Face hub id (downloaded into the hub
/// cache, at `revision` when given).
pub fn resolve(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if hub::looks_like_hub_id(model) {
        return hub::resolve_pipeline(model, revision);
    }
    Err(Error::model(
        path,
        "no such directory (and not a Hugging Face hub id of the form owner/name)",
    ))
}

impl ModelDir {
    /// Finds a model ([`resolve`]) and opens it: what a front end does once, before deciding
    /// anything that depends on the model, and then hands to [`crate::pipeline::Engine::from_model`].
    pub fn resolve(model: &str, revision: Option<&str>) -> Result<Self> {
        Self::open(resolve(model, revision)?)
    }

    /// Opens a model directory, checking that the components text-to-image needs are present.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(Error::model(
                &root,
                "not a directory (give a model directory exported by `python -m export`, an \
                 optimum-cli ONNX export, or a Hugging Face hub id)",
            ));
        }
        let index: ModelIndex = read_json(&root.join("model_index.json"))?;
        let manifest_path = root.join("tcd_ort.json");
        let manifest: Option<Manifest> = if manifest_path.is_file() {
            let manifest: Manifest = read_json(&manifest_path)?;
            manifest
                .check()
                .map_err(|message| Error::model(&manifest_path, message))?;
            Some(manifest)
        } else {
            None
        };
        for component in ["text_encoder", "unet", "vae_decoder"] {
            let graph = root.join(component).join("model.onnx");
            if !graph.is_file() {
                return Err(Error::model(
                    &root,
                    format!("{component}/model.onnx is missing"),
                ));
            }
        }
        let has_second_encoder = root.join("text_encoder_2").join("model.onnx").is_file();
        let unet: UnetConfig = read_json(&root.join("unet").join("config.json"))?;
        let vae: VaeConfig = read_json(&root.join("vae_decoder").join("config.json"))?;
        let scheduler_config: serde_json::Value =
            read_json(&root.join("scheduler").join("scheduler_config.json"))?;
        let class_is_xl = index
            .class_name
            .as_deref()
            .is_some_and(|c| c.contains("XL"));
        let family = match manifest.as_ref().and_then(|m| m.family) {
            Some(f) => f,
            None if has_second_encoder || class_is_xl => Family::Sdxl,
            None => {
                let te: serde_json::Value =
                    read_json(&root.join("text_encoder").join("config.json")).unwrap_or_default();
                // SD 2.x uses OpenCLIP ViT-H (1024 wide) and pads prompts with "!"; SD 1.x
                // uses CLIP ViT-L (768) and pads with the end-of-text token.
                let tok: serde_json::Value =
                    read_json(&root.join("tokenizer").join("tokenizer_config.json"))
                        .unwrap_or_default();
                let pads_with_bang = match tok.get("pad_token") {
                    Some(serde_json::Value::String(s)) => s == "!",
                    Some(v) => v.get("content").and_then(|c| c.as_str()) == Some("!"),
                    None => false,
                };
                if te.get("hidden_size").and_then(|v| v.as_u64()) == Some(1024) || pads_with_bang {
                    Family::Sd21
                } else {
                    Family::Sd15
                }
            }
        };
        if family.is_xl() && !has_second_encoder {
            return Err(Error::model(
                &root,
                "an SDXL model needs text_encoder_2/model.onnx, which is missing",
            ));
        }
        let text_encoder_2_projection_dim = if family.is_xl() {
            let te2: serde_json::Value =
                read_json(&root.join("text_encoder_2").join("config.json")).unwrap_or_default();
            te2.get("projection_dim")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        } else {
            None
        };
        check_sizes(&root, &unet, &vae)?;
        Ok(ModelDir {
            force_zeros_for_empty_prompt: index
                .force_zeros_for_empty_prompt
                .unwrap_or(family.is_xl()),
            requires_aesthetics_score: index.requires_aesthetics_score.unwrap_or(false),
            class_name: index.class_name,
            root,
            family,
            manifest,
            unet,
            vae,
            scheduler_config,
            text_encoder_2_projection_dim,
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The model family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The manifest, when the exporter wrote one.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// The pipeline class named in `model_index.json`.
    pub fn class_name(&self) -> Option<&str> {
        self.class_name.as_deref()
    }

    /// SDXL refiners: whether the UNet is conditioned on an aesthetic score instead of the
    /// target size (`model_index.json`'s `requires_aesthetics_score`).
    pub fn requires_aesthetics_score(&self) -> bool {
        self.requires_aesthetics_score
    }

    /// Whether the export's weights are float16 (the manifest's `dtype`).
    pub fn is_float16(&self) -> bool {
        self.manifest
            .as_ref()
            .and_then(|m| m.dtype.as_deref())
            .is_some_and(|dtype| dtype == "float16")
    }

    /// SDXL: whether an absent negative prompt means zero embeddings (as diffusers does).
    pub fn force_zeros_for_empty_prompt(&self) -> bool {
        self.force_zeros_for_empty_prompt
    }

    /// The `model.onnx` of a component.
    pub fn graph_path(&self, component: &str) -> PathBuf {
        self.root.join(component).join("model.onnx")
    }

    /// The segment files of a component the manifest lists (`export/segments.py`), in running
    /// order; empty when it lists none. A listed file that is missing is an error.
    pub fn segment_paths(&self, component: &str) -> Result<Vec<PathBuf>> {
        let Some(listed) = self
            .manifest
            .as_ref()
            .and_then(|m| m.components.get(component))
            .map(|c| &c.segments)
        else {
            return Ok(Vec::new());
        };
        listed
            .iter()
            .map(|file| {
                let path = self.root.join(component).join(file);
                let plain = Path::new(file).file_name() == Some(file.as_ref());
                if !plain || !path.is_file() {
                    return Err(Error::model(
                        &path,
                        format!(
                            "the manifest lists this {component} segment but it is missing; \
                             write the segments again with `python -m export segment {}`",
                            self.root.display()
                        ),
                    ));
                }
                Ok(path)
            })
            .collect()
    }

    /// Whether a component is present.
    pub fn has_component(&self, component: &str) -> bool {
        self.graph_path(component).is_file()
    }

    /// The motion module of an AnimateDiff model (the manifest's, else the UNet config's);
    /// `None` for still-image models.
    pub fn motion(&self) -> Option<Motion> {
        let manifest = self.manifest.as_ref().and_then(|m| m.motion.clone());
        manifest.or_else(|| {
            self.unet.motion_max_seq_length.map(|max_frames| Motion {
                max_frames,
                source: None,
            })
        })
    }

    /// The default image edge length: the UNet's sample size times the VAE scale factor.
    pub fn default_image_size(&self) -> usize {
        self.unet
            .sample_size
            .unwrap_or(64)
            .saturating_mul(self.vae.scale_factor())
    }
}
