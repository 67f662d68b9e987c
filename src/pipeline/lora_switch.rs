//! LoRAs changed on a loaded engine ([`Engine::set_loras`]), as a server does per request.
//!
//! The adapters of the engine's options stay; the ones set here come on top, replacing those
//! set before. Where the model was exported with LoRA slots (`--lora-slots`, whose slots ONNX
//! Runtime takes as run-time inputs) the UNet keeps its session and the slots are fed with
//! every step: switching costs the slots' computation (a fraction of a second on full-size
//! SD1.5). What has no slot (text-encoder LoRAs, modules outside the slots' targets, adapters
//! past the slot rank) is fused, and only the graphs whose fused weights change are built again.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use super::lora::{self, LoraReport, LoraSpec};
use super::{controlnet, Engine};
use crate::runtime::{Graph, SessionOptions, WeightOverride};
use crate::Result;

/// What the engine keeps to change its LoRAs after loading.
#[derive(Debug)]
pub(super) struct LoraState {
    /// The adapters of [`super::EngineOptions::loras`] and the model's manifest.
    pub(super) base: Vec<LoraSpec>,
    pub(super) weight_name: Option<String>,
    pub(super) allow_unmatched: bool,
    /// The adapters [`Engine::set_loras`] added.
    pub(super) extra: Vec<LoraSpec>,
    /// Per component, a fingerprint of the fused weights its session was built with
    /// (absent: none).
    pub(super) fused: BTreeMap<String, u64>,
    /// The options the text encoders and the UNet were built with.
    pub(super) sessions: SessionOptions,
    pub(super) denoisers: SessionOptions,
    /// The UNet's segment files when it loads in segments.
    pub(super) unet_segments: Vec<std::path::PathBuf>,
    pub(super) keep_for_reload: bool,
    pub(super) low_memory: bool,
}

/// What [`Engine::set_loras`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraSwitch {
    /// Nothing changed: the same adapters were already set.
    pub unchanged: bool,
    /// Weights fed to the UNet at run time (LoRA slot matrices).
    pub swapped: usize,
    /// Components whose sessions were built again with new fused weights.
    pub rebuilt: Vec<String>,
    /// The adapters now applied (the engine's own and the ones set), as loading reports them.
    pub report: LoraReport,
    /// How long the switch took.
    pub elapsed: Duration,
}

/// Names, shapes and values of `weights`, hashed: equal sets of fused weights build equal
/// sessions.
pub(super) fn fingerprint(weights: &[&WeightOverride]) -> Option<u64> {
    if weights.is_empty() {
        return None;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for w in weights {
        w.name.hash(&mut hasher);
        w.shape.hash(&mut hasher);
        for v in &w.values {
            v.to_bits().hash(&mut hasher);
        }
    }
    Some(hasher.finish())
}

/// Splits `weights` into those `graph` takes at run time and those it must be built with.
pub(super) fn split_swappable(
    graph: &Graph,
    weights: Vec<WeightOverride>,
) -> (Vec<WeightOverride>, Vec<WeightOverride>) {
    weights.into_iter().partition(|w| graph.can_swap(&w.name))
}

impl Engine {
    /// Applies `loras` on top of the adapters the engine loaded with, replacing those of the
    /// previous call (an empty list goes back to the loaded state). LoRA slots are swapped into
    /// the loaded UNet; fused weights rebuild only the graphs they change. On an error the
    /// engine keeps the adapters it had.
    pub fn set_loras(&mut self, loras: &[LoraSpec]) -> Result<LoraSwitch> {
        let started = Instant::now();
        if loras == self.lora_state.extra.as_slice() {
            return Ok(LoraSwitch {
                unchanged: true,
                report: self.lora_report.clone(),
                elapsed: started.elapsed(),
                ..LoraSwitch::default()
            });
        }
        let state = &self.lora_state;
        let all: Vec<LoraSpec> = state.base.iter().chain(loras).cloned().collect();
        let (mut overrides, report) = lora::weight_overrides(
            &self.model,
            &all,
            state.weight_name.as_deref(),
            state.allow_unmatched,
        )?;
        let mut switch = LoraSwitch {
            report: report.clone(),
            ..LoraSwitch::default()
        };
        // Every graph is built before any is replaced, so that a failure changes nothing.
        let (swap, fused) =
            split_swappable(&self.unet, overrides.remove("unet").unwrap_or_default());
        let mut unet = None;
        let unet_print = fingerprint(&fused.iter().collect::<Vec<_>>());
        if unet_print != state.fused.get("unet").copied() {
            unet = Some(self.build_unet(fused)?);
        }
        let mut encoders = Vec::new();
        for (k, encoder) in self.encoders.iter().enumerate() {
            let name = encoder.graph.name().to_string();
            let weights = overrides.remove(&name).unwrap_or_default();
            let print = fingerprint(&weights.iter().collect::<Vec<_>>());
            if print != state.fused.get(&name).copied() {
                let graph = self.build_graph(&name, &state.sessions, weights)?;
                encoders.push((k, name, graph, print));
            }
        }
        switch.swapped = swap.len();
        match unet {
            Some(mut graph) => {
                graph.swap_weights(swap)?;
                self.unet = graph;
                switch.rebuilt.push("unet".into());
                set_print(&mut self.lora_state.fused, "unet", unet_print);
                if let (Some(layout), Some(_)) = (&self.residuals, &self.residual_sum) {
                    self.residual_sum = controlnet::ResidualSum::build(
                        layout,
                        &self.unet,
                        &self.controlnets,
                        &self.lora_state.sessions,
                    )?;
                }
            }
            None => self.unet.swap_weights(swap)?,
        }
        for (k, name, graph, print) in encoders {
            self.encoders[k].graph = graph;
            set_print(&mut self.lora_state.fused, &name, print);
            switch.rebuilt.push(name);
        }
        self.lora_state.extra = loras.to_vec();
        self.lora_report = report;
        switch.elapsed = started.elapsed();
        Ok(switch)
    }

    fn build_unet(&self, fused: Vec<WeightOverride>) -> Result<Graph> {
        let state = &self.lora_state;
        let path = self.model.graph_path("unet");
        if state.unet_segments.is_empty() {
            return self.build_graph("unet", &state.denoisers, fused);
        }
        Graph::load_segmented("unet", &path, &state.unet_segments, &state.denoisers, fused)
    }

    /// Builds component `name` again with `weights`, released until used in low-memory mode.
    fn build_graph(
        &self,
        name: &str,
        options: &SessionOptions,
        weights: Vec<WeightOverride>,
    ) -> Result<Graph> {
        let path = self.model.graph_path(name);
        let mut graph = Graph::load_with_weights(name, &path, options, weights)?;
        if self.lora_state.keep_for_reload {
            graph.keep_for_reload(options);
        }
        if self.lora_state.low_memory {
            graph.release();
        }
        Ok(graph)
    }
}

fn set_print(prints: &mut BTreeMap<String, u64>, name: &str, print: Option<u64>) {
    match print {
        Some(p) => prints.insert(name.to_string(), p),
        None => prints.remove(name),
    };
}
