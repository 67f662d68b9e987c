//! Sessions: one ONNX graph loaded once, with its input and output signature.
//!
//! [`Graph`] is defined here with its accessors; the rest is split by concern:
//! `options` (how sessions are built), `io` (element types, input and output specs),
//! `weights` (replaced initializers), `build` (loading through the session cache),
//! `segments` (a graph loaded and run in consecutive parts), `lifecycle` (release and
//! reload), `assignment` (which provider runs which nodes) and `run` (host runs).

mod assignment;
mod build;
mod io;
mod lifecycle;
mod options;
mod run;
mod segments;
mod swap;
mod weights;

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use ort::session::{IoBinding, Session};

use super::binding::{input_devices, Placement};
use super::cache::CacheStatus;
use crate::{Error, Result};

pub use assignment::ProviderAssignment;
pub(super) use build::configure;
pub use io::{ElementType, IoSpec, RunStats, TensorInput};
pub use lifecycle::ReleasedSession;
pub use options::SessionOptions;
pub(super) use run::read_output;
pub use weights::WeightOverride;

use assignment::assignment;
use io::specs;
use weights::PreparedWeight;

/// One loaded ONNX graph.
pub struct Graph {
    pub(super) name: String,
    pub(super) path: PathBuf,
    /// Created on the first [`Graph::run_bound`] and reused: binding is cheap, but the binding
    /// object holds what was bound last, which is released when the next run clears it.
    pub(super) binding: Option<IoBinding>,
    /// `None` while the graph is released ([`Graph::release`]).
    pub(super) session: Option<Session>,
    /// The options to build the session again with after [`Graph::release`].
    reload: Option<Box<SessionOptions>>,
    /// The replaced weights (load-time LoRA) the session was built with, for reloads.
    weights: Vec<PreparedWeight>,
    pub(super) inputs: Vec<IoSpec>,
    /// Where the session reads each input (aligned with `inputs`).
    pub(super) placements: Vec<Placement>,
    pub(super) outputs: Vec<IoSpec>,
    assignment: Vec<ProviderAssignment>,
    cache: CacheStatus,
    pub(super) run_stats: RunStats,
    /// The graph as consecutive segments ([`Graph::load_segmented`]), each loaded for its part
    /// of a run and released before the next loads; empty for a graph loaded whole, which
    /// `session` runs.
    segments: Vec<Graph>,
    /// The initializers ONNX Runtime lets a run feed ([`Graph::swap_weights`]).
    swappable: Vec<String>,
    /// The values fed for them with every run.
    swapped: Vec<PreparedWeight>,
    /// The session was built with ONNX Runtime's CPU arena ([`Graph::run_releasing`] can then
    /// shrink it).
    cpu_arena: bool,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("assignment", &self.assignment)
            .field("cache", &self.cache)
            .field("run_stats", &self.run_stats)
            .field("segments", &self.segments.len())
            .finish()
    }
}

pub(super) fn not_loaded(name: &str) -> Error {
    Error::Runtime(format!(
        "the {name} graph is released (low-memory mode) and must be loaded first"
    ))
}

pub(super) fn rt_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Runtime(format!("{context}: {e}"))
}

impl Graph {
    pub(super) fn new(name: &str, path: &Path, session: Session, cache: CacheStatus) -> Self {
        let inputs = specs(session.inputs());
        let outputs = specs(session.outputs());
        let assignment = assignment(&session).unwrap_or_default();
        let placements = input_devices(&session, inputs.len());
        let swappable = swap::overridable(&session);
        Graph {
            name: name.to_string(),
            path: path.to_path_buf(),
            binding: None,
            session: Some(session),
            reload: None,
            weights: Vec::new(),
            inputs,
            placements,
            outputs,
            assignment,
            cache,
            run_stats: RunStats::default(),
            segments: Vec::new(),
            swappable,
            swapped: Vec::new(),
            cpu_arena: false,
        }
    }

    /// The session; an error while the graph is released.
    pub(super) fn session(&self) -> Result<&Session> {
        self.session.as_ref().ok_or_else(|| not_loaded(&self.name))
    }

    /// How often and how long ONNX Runtime ran this graph since it was loaded.
    pub fn run_stats(&self) -> RunStats {
        self.run_stats
    }

    /// Which execution providers run this graph's nodes, most nodes first (as ONNX Runtime
    /// assigned them, after any fallback); empty if ONNX Runtime could not say.
    pub fn assignment(&self) -> &[ProviderAssignment] {
        &self.assignment
    }

    /// What the session cache did for this graph.
    pub fn cache_status(&self) -> &CacheStatus {
        &self.cache
    }

    /// The component name (`unet`, `text_encoder`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The graph's inputs.
    pub fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    /// The graph's outputs.
    pub fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }

    /// The input called `name`, if the graph has one.
    pub fn input(&self, name: &str) -> Option<&IoSpec> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// Whether the graph has an output called `name`.
    pub fn has_output(&self, name: &str) -> bool {
        self.outputs.iter().any(|o| o.name == name)
    }

    /// Checks that every input the caller will feed exists, naming what the graph has instead.
    pub fn require_inputs(&self, names: &[&str]) -> Result<()> {
        for n in names {
            if self.input(n).is_none() {
                return Err(Error::model(
                    &self.path,
                    format!(
                        "the {} graph has no input '{n}' (it has: {})",
                        self.name,
                        self.inputs
                            .iter()
                            .map(|i| i.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The input called `name`, or an error naming the graph.
    pub(super) fn spec(&self, name: &str) -> Result<&IoSpec> {
        self.input(name).ok_or_else(|| {
            Error::model(
                &self.path,
                format!("the {} graph has no input '{name}'", self.name),
            )
        })
    }

    /// Checks that the graph has every output in `wanted`.
    pub(super) fn check_outputs(&self, wanted: &[&str]) -> Result<()> {
        for w in wanted {
            if !self.has_output(w) {
                return Err(Error::model(
                    &self.path,
                    format!(
                        "the {} graph has no output '{w}' (it has: {})",
                        self.name,
                        self.outputs
                            .iter()
                            .map(|o| o.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Builds an `ArrayD` from a shape and data, as graphs expect.
pub fn array(shape: &[usize], data: Vec<f32>) -> Result<ArrayD<f32>> {
    ArrayD::from_shape_vec(IxDyn(shape), data)
        .map_err(|e| Error::internal(format!("tensor of shape {shape:?}"), e))
}
