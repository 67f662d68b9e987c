//! Loading a ControlNet exported by `python -m export controlnet` (and the depth estimator its
//! depth preprocessing runs).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{numbered, DOWN_OUTPUT, GRAPH_FILE, MANIFEST_FILE, MANIFEST_KIND, MID_OUTPUT};
use crate::control;
use crate::model::{hub, read_json};
use crate::runtime::{Graph, SessionOptions};
use crate::{Error, Result};

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
    pub(super) dir: PathBuf,
    pub(super) graph: Graph,
    pub(super) xl: bool,
    pub(super) cross_attention_dim: serde_json::Value,
    pub(super) down_outputs: Vec<String>,
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
    pub(in crate::pipeline) fn graph_mut(&mut self) -> &mut Graph {
        &mut self.graph
    }

    /// Whether it is an SDXL ControlNet.
    pub fn is_xl(&self) -> bool {
        self.xl
    }

    pub(super) fn channels(&self, output: &str) -> Option<usize> {
        let spec = self.graph.outputs().iter().find(|o| o.name == output)?;
        spec.shape
            .get(1)
            .copied()
            .filter(|&c| c > 0)
            .map(|c| c as usize)
    }
}

/// Loads the depth estimator of [`super::ControlPreprocess::Depth`]: a directory or a hub id of
/// a `python -m export depth` export.
pub(in crate::pipeline) fn load_depth_estimator(
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
