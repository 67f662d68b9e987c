//! ControlNet, step for step as diffusers' `StableDiffusionControlNetPipeline` and
//! `StableDiffusionXLControlNetPipeline` run it with `TCDScheduler`.
//!
//! A ControlNet is its own graph (`python -m export controlnet`): it sees what the UNet sees
//! plus the control image and returns one residual per UNet down-block output and one for the
//! mid block. The UNet export takes those residuals as inputs
//! (`down_block_additional_residual_<i>`, `mid_block_additional_residual`), so one UNet serves
//! runs with and without ControlNet: without, it gets zeros, and `x + 0 == x`.
//!
//! Per step `i` of `n`, ControlNet `k` runs with scale
//! `scale_k * keep`, `keep = 0` when `i / n < start_k` or `(i + 1) / n > end_k` (diffusers'
//! `controlnet_keep`); a ControlNet whose scale is 0 at a step is not run (its residuals would be
//! zeros). Several ControlNets add their scaled residuals in order (`MultiControlNetModel`).

use std::path::{Path, PathBuf};

use ndarray::{concatenate, ArrayD, Axis, IxDyn};
use serde::Deserialize;

use super::conditioning::Conditioning;
use super::resident::{self, PlacedInputs, Resident};
use crate::control;
use crate::image_io::{image_to_unit_tensor, resize_lanczos, RgbImage};
use crate::model::{hub, read_json, UnetConfig};
use crate::runtime::builtin::{self, SCALED_SUM_SCALE};
use crate::runtime::{Destination, Feed, Graph, PlacedTensor, SessionOptions};
use crate::{Error, Result};

/// The manifest kind `python -m export controlnet` writes.
const MANIFEST_KIND: &str = "controlnet";
const MANIFEST_FILE: &str = "tcd_ort.json";
const GRAPH_FILE: &str = "model.onnx";
const DOWN_INPUT: &str = "down_block_additional_residual_";
const MID_INPUT: &str = "mid_block_additional_residual";
const DOWN_OUTPUT: &str = "down_block_res_sample_";
const MID_OUTPUT: &str = "mid_block_res_sample";

/// How a control image is turned into what the ControlNet was trained on.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ControlPreprocess {
    /// The image already is a control image (an edge map, a depth map ...).
    #[default]
    None,
    /// OpenCV's `cv2.Canny(image, low, high)`, stacked to three channels.
    Canny {
        /// Lower hysteresis threshold (diffusers' examples: 100).
        low: f32,
        /// Upper hysteresis threshold (diffusers' examples: 200).
        high: f32,
    },
    /// The depth recipe of diffusers' depth ControlNet examples, with the engine's depth
    /// estimator ([`super::EngineOptions::depth_estimator`]).
    Depth,
}

/// One control image, for the ControlNet at the same position in
/// [`super::EngineOptions::controlnets`].
#[derive(Debug, Clone, PartialEq)]
pub struct ControlImage {
    /// The image; resized (Lanczos) to the output size when that differs.
    pub image: RgbImage,
    /// diffusers' `controlnet_conditioning_scale` (0.5 generalises well with TCD).
    pub scale: f32,
    /// diffusers' `control_guidance_start`: the fraction of steps before the ControlNet acts.
    pub start: f32,
    /// diffusers' `control_guidance_end`: the fraction of steps after which it stops.
    pub end: f32,
    /// What to do with the image first.
    pub preprocess: ControlPreprocess,
}

impl ControlImage {
    /// A control image used as it is, at scale 1 over every step (diffusers' defaults).
    pub fn new(image: RgbImage) -> Self {
        ControlImage {
            image,
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            preprocess: ControlPreprocess::None,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Manifest {
    kind: Option<String>,
    family: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Config {
    #[serde(default)]
    global_pool_conditions: bool,
    addition_embed_type: Option<String>,
    #[serde(default)]
    cross_attention_dim: serde_json::Value,
    #[serde(default = "three")]
    conditioning_channels: usize,
}

fn three() -> usize {
    3
}

/// A loaded ControlNet graph.
#[derive(Debug)]
pub struct ControlNet {
    source: String,
    dir: PathBuf,
    graph: Graph,
    xl: bool,
    cross_attention_dim: serde_json::Value,
    down_outputs: Vec<String>,
}

/// `down_block_res_sample_0 ... _{n-1}` (or the UNet's `down_block_additional_residual_*`):
/// the names with `prefix`, ordered by index, which must run from 0 without gaps.
fn numbered<'a>(
    names: impl Iterator<Item = &'a str>,
    prefix: &str,
    what: &Path,
) -> Result<Vec<String>> {
    let mut found: Vec<(usize, String)> = names
        .filter_map(|n| Some((n.strip_prefix(prefix)?.parse().ok()?, n.to_string())))
        .collect();
    found.sort();
    for (expected, (index, name)) in found.iter().enumerate() {
        if *index != expected {
            return Err(Error::model(
                what,
                format!("{name}: the {prefix}<i> tensors must be numbered 0, 1, ... without gaps"),
            ));
        }
    }
    Ok(found.into_iter().map(|(_, n)| n).collect())
}

impl ControlNet {
    /// Loads a ControlNet exported by `python -m export controlnet`: a directory, or a hub id
    /// whose repository holds such an export.
    pub fn load(source: &str, revision: Option<&str>, options: &SessionOptions) -> Result<Self> {
        let path = Path::new(source);
        let dir = if path.exists() {
            path.to_path_buf()
        } else if hub::looks_like_hub_id(source) {
            hub::resolve_single_graph(source, revision, "ControlNet")?
        } else {
            return Err(Error::model(
                path,
                "no such ControlNet directory (and not a Hugging Face hub id of the form owner/name)",
            ));
        };
        if !dir.is_dir() {
            return Err(Error::model(
                &dir,
                "a ControlNet is a directory (model.onnx, config.json, tcd_ort.json) written by \
                 `python -m export controlnet`",
            ));
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        if !manifest_path.is_file() && dir.join("model_index.json").is_file() {
            return Err(Error::model(
                &dir,
                "this is a whole pipeline, not a ControlNet; give the directory `python -m export \
                 controlnet` wrote",
            ));
        }
        let manifest: Manifest = read_json(&manifest_path)?;
        if manifest.kind.as_deref() != Some(MANIFEST_KIND) {
            return Err(Error::model(
                &manifest_path,
                format!(
                    "this export is a {}, not a ControlNet (export one with `python -m export \
                     controlnet SOURCE DIR`)",
                    manifest.kind.as_deref().unwrap_or("pipeline")
                ),
            ));
        }
        let config: Config = read_json(&dir.join("config.json"))?;
        if config.global_pool_conditions {
            return Err(Error::model(
                dir.join("config.json"),
                "ControlNets with global_pool_conditions (guess mode only, e.g. shuffle) are not \
                 supported",
            ));
        }
        if config.conditioning_channels != 3 {
            return Err(Error::model(
                dir.join("config.json"),
                format!(
                    "the ControlNet takes {}-channel control images; only RGB (3) is supported",
                    config.conditioning_channels
                ),
            ));
        }
        let xl = config.addition_embed_type.as_deref() == Some("text_time")
            || manifest.family.as_deref() == Some("sdxl");
        let graph = Graph::load("controlnet", &dir.join(GRAPH_FILE), options)?;
        let mut required = vec![
            "sample",
            "timestep",
            "encoder_hidden_states",
            "controlnet_cond",
        ];
        if xl {
            required.extend(["text_embeds", "time_ids"]);
        }
        graph.require_inputs(&required)?;
        let down_outputs = numbered(
            graph.outputs().iter().map(|o| o.name.as_str()),
            DOWN_OUTPUT,
            &dir,
        )?;
        if down_outputs.is_empty() || !graph.has_output(MID_OUTPUT) {
            return Err(Error::model(
                &dir,
                format!(
                    "the ControlNet graph must output {DOWN_OUTPUT}<i> and {MID_OUTPUT}; \
                     re-export it with `python -m export controlnet`"
                ),
            ));
        }
        Ok(ControlNet {
            source: source.to_string(),
            dir,
            graph,
            xl,
            cross_attention_dim: config.cross_attention_dim,
            down_outputs,
        })
    }

    /// What the ControlNet was loaded from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The graph (for session reports).
    pub(crate) fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The graph, to release or reload it (low-memory mode).
    pub(super) fn graph_mut(&mut self) -> &mut Graph {
        &mut self.graph
    }

    /// Whether it is an SDXL ControlNet.
    pub fn is_xl(&self) -> bool {
        self.xl
    }

    fn channels(&self, output: &str) -> Option<usize> {
        let spec = self.graph.outputs().iter().find(|o| o.name == output)?;
        spec.shape
            .get(1)
            .copied()
            .filter(|&c| c > 0)
            .map(|c| c as usize)
    }
}

#[derive(Debug, Clone)]
struct Residual {
    name: String,
    channels: usize,
    /// How many times the latent resolution is halved (ceil) at this residual.
    level: usize,
}

/// The ControlNet residual inputs of a UNet export and their shapes.
#[derive(Debug, Clone)]
pub(crate) struct ResidualLayout {
    down: Vec<Residual>,
    mid: Residual,
}

fn halve(mut v: usize, times: usize) -> usize {
    for _ in 0..times {
        v = v.div_ceil(2);
    }
    v
}

impl ResidualLayout {
    /// `None` when the UNet export has no residual inputs (an older or an optimum export).
    pub(crate) fn from_unet(
        unet: &Graph,
        config: &UnetConfig,
        root: &Path,
    ) -> Result<Option<Self>> {
        let down_names = numbered(
            unet.inputs().iter().map(|i| i.name.as_str()),
            DOWN_INPUT,
            root,
        )?;
        let has_mid = unet.input(MID_INPUT).is_some();
        if down_names.is_empty() && !has_mid {
            return Ok(None);
        }
        if down_names.is_empty() || !has_mid {
            return Err(Error::model(
                root,
                format!("the UNet has only some of the ControlNet residual inputs ({DOWN_INPUT}<i>, {MID_INPUT}); re-export it"),
            ));
        }
        let blocks = &config.block_out_channels;
        if blocks.is_empty() {
            return Err(Error::model(
                root.join("unet").join("config.json"),
                "block_out_channels is missing; it is needed for the ControlNet residual shapes",
            ));
        }
        let per_block = config.layers_per_block.unwrap_or(2);
        // diffusers' UNet: conv_in, then `layers_per_block` resnets per down block, then a
        // downsampler after every block but the last.
        let mut shapes = vec![(blocks[0], 0)];
        for (b, &c) in blocks.iter().enumerate() {
            shapes.extend(std::iter::repeat_n((c, b), per_block));
            if b + 1 < blocks.len() {
                shapes.push((c, b + 1));
            }
        }
        if shapes.len() != down_names.len() {
            return Err(Error::model(
                root,
                format!(
                    "the UNet has {} down-block residual inputs but its config implies {}",
                    down_names.len(),
                    shapes.len()
                ),
            ));
        }
        let static_channels = |name: &str, fallback: usize| {
            unet.input(name)
                .and_then(|i| i.shape.get(1).copied())
                .filter(|&c| c > 0)
                .map_or(fallback, |c| c as usize)
        };
        let down = down_names
            .into_iter()
            .zip(shapes)
            .map(|(name, (c, level))| Residual {
                channels: static_channels(&name, c),
                name,
                level,
            })
            .collect();
        let last = blocks.len() - 1;
        let mid = Residual {
            name: MID_INPUT.to_string(),
            channels: static_channels(MID_INPUT, blocks[last]),
            level: last,
        };
        Ok(Some(ResidualLayout { down, mid }))
    }

    fn all(&self) -> impl Iterator<Item = &Residual> {
        self.down.iter().chain(std::iter::once(&self.mid))
    }

    /// The UNet's residual inputs, down blocks first, then the mid block.
    pub(super) fn names(&self) -> impl Iterator<Item = &str> {
        self.all().map(|r| r.name.as_str())
    }

    /// Zero residuals for a UNet batch of latents `[batch, c, h, w]`, by input name.
    pub(super) fn zeros(&self, batch: usize, h: usize, w: usize) -> Vec<(&str, ArrayD<f32>)> {
        self.all()
            .map(|r| {
                let shape = [batch, r.channels, halve(h, r.level), halve(w, r.level)];
                (r.name.as_str(), ArrayD::zeros(IxDyn(&shape)))
            })
            .collect()
    }

    /// Checks that `net` was made for this UNet: same number of residuals, same channels, same
    /// conditioning family.
    pub(crate) fn check(&self, net: &ControlNet, xl: bool, config: &UnetConfig) -> Result<()> {
        let another = |detail: String| {
            Error::model(
                &net.dir,
                format!(
                    "this ControlNet was made for another base model than the one loaded: {detail}"
                ),
            )
        };
        if net.xl != xl {
            return Err(another(format!(
                "it is an {} ControlNet and the model is {}",
                if net.xl { "SDXL" } else { "SD 1.x/2.x" },
                if xl { "SDXL" } else { "SD 1.x/2.x" }
            )));
        }
        if !net.cross_attention_dim.is_null()
            && !config.cross_attention_dim.is_null()
            && net.cross_attention_dim != config.cross_attention_dim
        {
            return Err(another(format!(
                "its cross_attention_dim is {} and the UNet's is {}",
                net.cross_attention_dim, config.cross_attention_dim
            )));
        }
        if net.down_outputs.len() != self.down.len() {
            return Err(another(format!(
                "it returns {} down-block residuals and the UNet takes {}",
                net.down_outputs.len(),
                self.down.len()
            )));
        }
        let outputs = net
            .down_outputs
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(MID_OUTPUT));
        for (output, residual) in outputs.zip(self.all()) {
            if let Some(c) = net.channels(output) {
                if c != residual.channels {
                    return Err(another(format!(
                        "its {output} has {c} channels and the UNet's {} takes {}",
                        residual.name, residual.channels
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The ControlNets' residuals scaled and summed where the UNet reads them (issue #7): each
/// ControlNet's outputs are bound to the memory of the sum graphs' inputs, and the sums to the
/// memory of the UNet's residual inputs, so on an accelerator nothing goes to the host and back
/// ([`crate::runtime::builtin::scaled_sum`]). Used with IoBinding; without it the residuals
/// are scaled and summed on the host.
#[derive(Debug)]
pub(super) struct ResidualSum {
    /// `out_i = x_i * scale`: the first ControlNet acting at a step.
    first: Graph,
    /// `out_i = acc_i + x_i * scale`: every further one (built for two or more ControlNets).
    add: Option<Graph>,
    x_names: Vec<String>,
    acc_names: Vec<String>,
    out_names: Vec<String>,
    /// Where the ControlNets' residuals go: the sum graphs' `x_i` inputs.
    into_sum: Vec<Destination>,
    /// Where the sums go: the UNet's residual inputs, in [`ResidualLayout::names`] order.
    into_unet: Vec<Destination>,
}

impl ResidualSum {
    /// Builds the sum graphs for `nets` and the UNet's residual inputs; `None` when the
    /// ControlNets' outputs differ in element type (they are then summed on the host).
    pub(super) fn build(
        layout: &ResidualLayout,
        unet: &Graph,
        nets: &[ControlNet],
        options: &SessionOptions,
    ) -> Result<Option<Self>> {
        let Some(first_net) = nets.first() else {
            return Ok(None);
        };
        let dtype_of = |net: &ControlNet| {
            net.graph
                .outputs()
                .iter()
                .find(|o| o.name == MID_OUTPUT)
                .map(|o| o.dtype)
        };
        let x_dtype = dtype_of(first_net);
        if nets.iter().any(|n| dtype_of(n) != x_dtype) {
            return Ok(None);
        }
        let (Some(x_dtype), Some(unet_dtype)) = (x_dtype, unet.input(MID_INPUT).map(|i| i.dtype))
        else {
            return Ok(None);
        };
        let count = layout.down.len() + 1;
        let first = builtin::scaled_sum(
            "controlnet_scale",
            count,
            4,
            (x_dtype, unet_dtype),
            false,
            options,
        )?;
        let add = if nets.len() > 1 {
            Some(builtin::scaled_sum(
                "controlnet_sum",
                count,
                4,
                (x_dtype, unet_dtype),
                true,
                options,
            )?)
        } else {
            None
        };
        let x_names: Vec<String> = (0..count).map(builtin::scaled_sum_x).collect();
        // Both graphs read `x_i` alike.
        let into_sum = x_names
            .iter()
            .map(|x| first.destination(x))
            .collect::<Result<_>>()?;
        let into_unet = layout
            .names()
            .map(|n| unet.destination(n))
            .collect::<Result<_>>()?;
        Ok(Some(ResidualSum {
            first,
            add,
            x_names,
            acc_names: (0..count).map(builtin::scaled_sum_acc).collect(),
            out_names: (0..count).map(builtin::scaled_sum_out).collect(),
            into_sum,
            into_unet,
        }))
    }

    /// The sum graphs (for session reports and run statistics).
    pub(super) fn graphs(&self) -> impl Iterator<Item = &Graph> + Clone {
        std::iter::once(&self.first).chain(self.add.as_ref())
    }

    /// The graph the scales are placed for (both sum graphs read `scale` alike).
    pub(super) fn scale_graph(&self) -> &Graph {
        &self.first
    }
}

/// Loads the depth estimator of [`ControlPreprocess::Depth`]: a directory or a hub id of a
/// `python -m export depth` export.
pub(super) fn load_depth_estimator(
    source: &str,
    revision: Option<&str>,
    options: &SessionOptions,
) -> Result<control::DepthEstimator> {
    let path = Path::new(source);
    let dir = if path.exists() {
        path.to_path_buf()
    } else if hub::looks_like_hub_id(source) {
        hub::resolve_single_graph(source, revision, "depth estimator")?
    } else {
        return Err(Error::model(
            path,
            "no such depth estimator directory (and not a Hugging Face hub id of the form \
             owner/name)",
        ));
    };
    control::DepthEstimator::load(&dir, options)
}

/// Control images ready for the ControlNets, and each ControlNet's scale at each step.
#[derive(Debug, Clone)]
pub(super) struct ControlState {
    /// Per ControlNet: `[batch, 3, H, W]` in `[0, 1]`, batched like the UNet input.
    images: Vec<ArrayD<f32>>,
    /// `scales[step][net]`: `scale * controlnet_keep`.
    scales: Vec<Vec<f32>>,
    /// The preprocessed control images at the output size.
    previews: Vec<RgbImage>,
}

impl ControlState {
    /// Per ControlNet: the batched control image.
    pub(super) fn images(&self) -> &[ArrayD<f32>] {
        &self.images
    }

    /// Every non-zero scale some ControlNet runs with at some step, once each.
    pub(super) fn distinct_scales(&self) -> Vec<f32> {
        let mut seen: Vec<f32> = Vec::new();
        for &s in self.scales.iter().flatten() {
            if s != 0.0 && !seen.iter().any(|v| v.to_bits() == s.to_bits()) {
                seen.push(s);
            }
        }
        seen
    }

    /// The control images after preprocessing and resizing, one per ControlNet.
    pub(super) fn into_previews(self) -> Vec<RgbImage> {
        self.previews
    }
}

/// Checks the control part of a request against the loaded ControlNets.
pub(super) fn validate(loaded: usize, control: &[ControlImage]) -> Result<()> {
    if control.is_empty() {
        return Ok(());
    }
    if loaded == 0 {
        return Err(Error::invalid(format!(
            "{} control image(s) given but no ControlNet is loaded (--controlnet DIR_OR_ID)",
            control.len()
        )));
    }
    if control.len() != loaded {
        return Err(Error::invalid(format!(
            "{} control image(s) given for {loaded} ControlNet(s): give one --control-image per \
             --controlnet, in the same order",
            control.len()
        )));
    }
    for (k, c) in control.iter().enumerate() {
        let which = format!("ControlNet {}", k + 1);
        if !c.scale.is_finite() {
            return Err(Error::invalid(format!(
                "{which}: the conditioning scale must be a finite number, got {}",
                c.scale
            )));
        }
        // diffusers' check_inputs, word for word in spirit.
        if !(c.start.is_finite() && c.end.is_finite()) || c.start >= c.end {
            return Err(Error::invalid(format!(
                "{which}: --control-start ({}) must be smaller than --control-end ({})",
                c.start, c.end
            )));
        }
        if c.start < 0.0 {
            return Err(Error::invalid(format!(
                "{which}: --control-start must be >= 0, got {}",
                c.start
            )));
        }
        if c.end > 1.0 {
            return Err(Error::invalid(format!(
                "{which}: --control-end must be <= 1, got {}",
                c.end
            )));
        }
        if let ControlPreprocess::Canny { low, high } = c.preprocess {
            if !(low.is_finite() && high.is_finite()) || low < 0.0 || high < 0.0 {
                return Err(Error::invalid(format!(
                    "{which}: Canny thresholds must be finite and >= 0, got {low} and {high}"
                )));
            }
        }
    }
    Ok(())
}

/// diffusers' `controlnet_keep` times the scale, for every step and ControlNet.
fn step_scales(control: &[ControlImage], steps: usize) -> Vec<Vec<f32>> {
    (0..steps)
        .map(|i| {
            let (from, to) = (i as f64 / steps as f64, (i + 1) as f64 / steps as f64);
            control
                .iter()
                .map(|c| {
                    let keep = if from < f64::from(c.start) || to > f64::from(c.end) {
                        0.0
                    } else {
                        1.0
                    };
                    (f64::from(c.scale) * keep) as f32
                })
                .collect()
        })
        .collect()
}

/// Preprocesses the control images (`depth` runs the depth estimator) and batches them as
/// diffusers' `prepare_image` does: resized to the output size, `/ 255`, repeated per image,
/// doubled for classifier-free guidance.
pub(super) fn prepare(
    control: &[ControlImage],
    depth: &mut Option<control::DepthEstimator>,
    steps: usize,
    (height, width): (usize, usize),
    num_images: usize,
    guidance: bool,
) -> Result<Option<ControlState>> {
    if control.is_empty() {
        return Ok(None);
    }
    let mut images = Vec::with_capacity(control.len());
    let mut previews = Vec::with_capacity(control.len());
    for c in control {
        let prepared = match c.preprocess {
            ControlPreprocess::None => c.image.clone(),
            ControlPreprocess::Canny { low, high } => control::canny(&c.image, low, high)?,
            ControlPreprocess::Depth => match depth.as_mut() {
                Some(estimator) => estimator.estimate(&c.image, width as u32, height as u32)?,
                None => {
                    return Err(Error::invalid(
                        "--control-preprocess depth needs a depth estimator: load one with \
                         --depth-model DIR_OR_ID (export Intel/dpt-hybrid-midas with `python -m \
                         export depth`)",
                    ))
                }
            },
        };
        let one = image_to_unit_tensor(&prepared, width as u32, height as u32)?;
        previews.push(
            if (prepared.width as usize, prepared.height as usize) == (width, height) {
                prepared
            } else {
                resize_lanczos(&prepared, width as u32, height as u32)?
            },
        );
        let copies = num_images * if guidance { 2 } else { 1 };
        let views: Vec<_> = (0..copies).map(|_| one.view()).collect();
        images.push(
            concatenate(Axis(0), &views)
                .map_err(|e| Error::Runtime(format!("batching control images: {e}")))?,
        );
    }
    Ok(Some(ControlState {
        images,
        scales: step_scales(control, steps),
        previews,
    }))
}

/// What the UNet's residual inputs get at one step.
#[derive(Debug)]
pub(super) enum Residuals {
    /// The UNet takes no residuals.
    None,
    /// No ControlNet acts at this step: zeros ([`ResidualLayout::zeros`]).
    Zeros,
    /// The ControlNets' scaled, summed residuals, in [`ResidualLayout::names`] order.
    Sum(Vec<ArrayD<f32>>),
    /// The same, summed where the UNet reads them ([`ResidualSum`]).
    Placed(Vec<PlacedTensor>),
}

/// The residual inputs of one UNet evaluation: the ControlNets' scaled, summed residuals at
/// `step`, or zeros when no ControlNet acts. `sample` and `timestep` are the UNet's for this
/// step; `resident` holds the ControlNets' placed inputs when IoBinding is on.
pub(super) fn unet_residuals(
    layout: Option<&ResidualLayout>,
    (nets, summer): (&mut [ControlNet], Option<&mut ResidualSum>),
    control: Option<(&ControlState, usize)>,
    (sample, timestep, cond): (&ArrayD<f32>, &ArrayD<f32>, &Conditioning),
    resident: Option<&Resident>,
) -> Result<Residuals> {
    let Some(layout) = layout else {
        if control.is_some() {
            return Err(Error::invalid(
                "the UNet of this model takes no ControlNet residuals; re-export the model with \
                 `python -m export convert` to use ControlNets",
            ));
        }
        return Ok(Residuals::None);
    };
    let Some((state, step)) = control else {
        return Ok(Residuals::Zeros);
    };
    let scales = state
        .scales
        .get(step)
        .ok_or_else(|| Error::Runtime(format!("no ControlNet scales for step {step}")))?;
    if let (Some(summer), Some(resident)) = (summer, resident) {
        return sum_placed(
            nets,
            summer,
            state,
            scales,
            (sample, timestep, cond),
            resident,
        );
    }
    let mut sum: Option<Vec<ArrayD<f32>>> = None;
    {
        let host_only = PlacedInputs::default();
        for (k, ((net, image), &scale)) in
            nets.iter_mut().zip(&state.images).zip(scales).enumerate()
        {
            if scale == 0.0 {
                continue;
            }
            let placed = resident
                .and_then(|r| r.controlnets.get(k))
                .unwrap_or(&host_only);
            let mut inputs = placed.denoiser_inputs(sample.clone(), timestep.clone(), cond);
            inputs.push(("controlnet_cond", placed.feed("controlnet_cond", image)));
            let wanted: Vec<&str> = net
                .down_outputs
                .iter()
                .map(String::as_str)
                .chain(std::iter::once(MID_OUTPUT))
                .collect();
            let mut outputs = resident::run(&mut net.graph, resident.is_some(), inputs, &wanted)?;
            // ControlNetModel: `sample * conditioning_scale`, in float32.
            for o in &mut outputs {
                o.mapv_inplace(|v| v * scale);
            }
            sum = Some(match sum {
                None => outputs,
                Some(mut acc) => {
                    same_shapes(
                        acc.iter().map(|a| a.shape()),
                        outputs.iter().map(|o| o.shape()),
                    )?;
                    for (a, o) in acc.iter_mut().zip(&outputs) {
                        *a += o;
                    }
                    acc
                }
            });
        }
    }
    Ok(match sum {
        None => Residuals::Zeros,
        Some(residuals) if residuals.len() == layout.down.len() + 1 => Residuals::Sum(residuals),
        Some(residuals) => {
            return Err(Error::Runtime(format!(
                "the ControlNets returned {} residuals and the UNet takes {}",
                residuals.len(),
                layout.down.len() + 1
            )))
        }
    })
}

/// Checks that two ControlNets returned residuals of the same shapes, pairwise.
fn same_shapes<'a>(
    a: impl Iterator<Item = &'a [usize]>,
    b: impl Iterator<Item = &'a [usize]>,
) -> Result<()> {
    for (a, b) in a.zip(b) {
        if a != b {
            return Err(Error::Runtime(format!(
                "ControlNet residuals disagree in shape: {a:?} and {b:?}"
            )));
        }
    }
    Ok(())
}

/// [`unet_residuals`] through [`ResidualSum`]: the residuals stay where the ControlNets wrote
/// them, the sums where the UNet reads them.
fn sum_placed(
    nets: &mut [ControlNet],
    summer: &mut ResidualSum,
    state: &ControlState,
    scales: &[f32],
    (sample, timestep, cond): (&ArrayD<f32>, &ArrayD<f32>, &Conditioning),
    resident: &Resident,
) -> Result<Residuals> {
    let mut acc: Option<Vec<PlacedTensor>> = None;
    let host_only = PlacedInputs::default();
    for (k, ((net, image), &scale)) in nets.iter_mut().zip(&state.images).zip(scales).enumerate() {
        if scale == 0.0 {
            continue;
        }
        let placed = resident.controlnets.get(k).unwrap_or(&host_only);
        let mut inputs = placed.denoiser_inputs(sample.clone(), timestep.clone(), cond);
        inputs.push(("controlnet_cond", placed.feed("controlnet_cond", image)));
        let outputs: Vec<(&str, &Destination)> = net
            .down_outputs
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(MID_OUTPUT))
            .zip(&summer.into_sum)
            .collect();
        let residuals = net.graph.run_bound_placed(inputs, &outputs)?;
        if let Some(previous) = &acc {
            same_shapes(
                previous.iter().map(PlacedTensor::shape),
                residuals.iter().map(PlacedTensor::shape),
            )?;
        }
        let mut inputs: Vec<(&str, Feed<'_>)> = vec![(SCALED_SUM_SCALE, resident.scale(scale))];
        inputs.extend(
            summer
                .x_names
                .iter()
                .map(String::as_str)
                .zip(residuals.iter().map(Feed::Placed)),
        );
        let graph = match &acc {
            None => &mut summer.first,
            Some(previous) => {
                inputs.extend(
                    summer
                        .acc_names
                        .iter()
                        .map(String::as_str)
                        .zip(previous.iter().map(Feed::Placed)),
                );
                summer.add.as_mut().ok_or_else(|| {
                    Error::Runtime("a second ControlNet acted but no sum graph was built".into())
                })?
            }
        };
        let outputs: Vec<(&str, &Destination)> = summer
            .out_names
            .iter()
            .map(String::as_str)
            .zip(&summer.into_unet)
            .collect();
        let next = graph.run_bound_placed(inputs, &outputs)?;
        acc = Some(next);
    }
    Ok(acc.map_or(Residuals::Zeros, Residuals::Placed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> RgbImage {
        RgbImage::new(2, 2, vec![0; 12]).expect("2x2")
    }

    fn with_window(start: f32, end: f32, scale: f32) -> ControlImage {
        ControlImage {
            scale,
            start,
            end,
            ..ControlImage::new(image())
        }
    }

    #[test]
    fn keep_follows_diffusers() {
        // diffusers: keep = 1 - (i / n < start or (i + 1) / n > end).
        let scales = step_scales(
            &[with_window(0.0, 0.5, 0.5), with_window(0.25, 1.0, 1.0)],
            4,
        );
        assert_eq!(
            scales,
            vec![
                vec![0.5, 0.0],
                vec![0.5, 1.0],
                vec![0.0, 1.0],
                vec![0.0, 1.0]
            ]
        );
        // A window narrower than one step switches the ControlNet off everywhere.
        let scales = step_scales(&[with_window(0.3, 0.4, 1.0)], 2);
        assert_eq!(scales, vec![vec![0.0], vec![0.0]]);
    }

    #[test]
    fn bad_control_requests_are_refused() {
        let ok = with_window(0.0, 1.0, 0.5);
        assert!(validate(1, std::slice::from_ref(&ok)).is_ok());
        assert!(validate(0, &[]).is_ok());
        let msg = validate(0, std::slice::from_ref(&ok))
            .expect_err("refused")
            .to_string();
        assert!(msg.contains("no ControlNet is loaded"), "{msg}");
        let msg = validate(2, std::slice::from_ref(&ok))
            .expect_err("refused")
            .to_string();
        assert!(msg.contains("1 control image(s) given for 2"), "{msg}");
        for (bad, needle) in [
            (with_window(0.5, 0.5, 1.0), "smaller than"),
            (with_window(-0.1, 1.0, 1.0), ">= 0"),
            (with_window(0.0, 1.5, 1.0), "<= 1"),
            (with_window(0.0, 1.0, f32::NAN), "finite"),
        ] {
            let msg = validate(1, &[bad]).expect_err("refused").to_string();
            assert!(msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn residual_sizes_halve_with_ceiling() {
        assert_eq!(halve(10, 0), 10);
        assert_eq!(halve(10, 1), 5);
        assert_eq!(halve(10, 2), 3);
        assert_eq!(halve(6, 3), 1);
    }
}
