//! Sessions: one ONNX graph loaded once, with its input and output signature.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use half::f16;
use ndarray::{ArrayD, IxDyn};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{IoBinding, Session, SessionInputValue, SessionOutputs};
use ort::value::{DynTensor, DynValue, Tensor, TensorElementType, ValueType};
use ort::AsPointer;

use super::binding::{input_devices, Placement};
use super::cache::{CacheEntry, CacheKey, CacheStatus, DATA_FILE};
use super::initializers::declared_inputs;
use super::options::{FixedShape, OptLevel, ProviderOptions, SessionCache};
use super::provider::ExecutionProvider;
use super::tensorrt::{dimension_overrides, profile_shapes, ProfileShapes};
use crate::{Error, Result};

/// How sessions are built: providers and their settings, threads, optimisation and caching.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Execution providers, in priority order (already checked against the loaded build);
    /// empty means the CPU.
    pub providers: Vec<ExecutionProvider>,
    /// Settings of those providers (device id, CUDA, TensorRT, CoreML).
    pub provider_options: ProviderOptions,
    /// Threads inside one operator; `None` lets ONNX Runtime use every core.
    pub intra_threads: Option<usize>,
    /// Graph optimisation level.
    pub opt_level: OptLevel,
    /// Where optimised graphs are cached.
    pub cache: SessionCache,
    /// Build the session for exactly this image size and batch (ONNX Runtime's free-dimension
    /// overrides, see [`super::tensorrt::dimension_overrides`]); `None` keeps every dynamic
    /// dimension dynamic.
    pub fixed_shape: Option<FixedShape>,
    /// Use the weights where they are instead of pre-packing them for ONNX Runtime's MatMul
    /// kernels when the session is built (`session.disable_prepacking`). For sessions built
    /// for one run ([`Graph::load_segmented`]): packing a segment's weights took longer than
    /// packing them within the run.
    pub disable_prepacking: bool,
}

impl SessionOptions {
    fn providers(&self) -> &[ExecutionProvider] {
        if self.providers.is_empty() {
            &[ExecutionProvider::Cpu]
        } else {
            &self.providers
        }
    }

    /// Why a graph loaded with these options would be optimised afresh each time it loads again
    /// (the session cache off or bypassed), if it would.
    pub fn uncached_reloads(&self, has_overrides: bool) -> Option<String> {
        match self.cache {
            SessionCache::Off => Some("the session cache is off".into()),
            SessionCache::Dir(_) => self.cache_bypass(has_overrides),
        }
    }

    /// Why graphs loaded with these options cannot use the session cache, if they cannot.
    fn cache_bypass(&self, has_overrides: bool) -> Option<String> {
        if has_overrides {
            return Some(
                "weight overrides (LoRA) are folded into optimised graphs; load without LoRA to \
                 use the cache"
                    .into(),
            );
        }
        if self.fixed_shape.is_some() {
            return Some("fixed shapes are folded into optimised graphs".into());
        }
        if let Some(ep) = self.providers().iter().find(|p| p.compiles_subgraphs()) {
            return Some(format!(
                "the {ep} provider compiles subgraphs ONNX Runtime cannot save"
            ));
        }
        if self.opt_level == OptLevel::Disable {
            return Some("optimisation is disabled, there is nothing to cache".into());
        }
        None
    }
}

/// How many nodes of a graph one execution provider runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderAssignment {
    /// ONNX Runtime's provider name (`CUDAExecutionProvider`).
    pub provider: String,
    /// Nodes assigned to it (after fusion).
    pub nodes: usize,
}

/// The element types tcd-ort feeds and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// Anything else (the graph cannot be driven by tcd-ort).
    Other,
}

impl ElementType {
    /// From an ONNX `TensorProto.DataType` code (as stored in a model file).
    pub fn from_onnx(code: i32) -> Self {
        match code {
            1 => ElementType::F32,
            10 => ElementType::F16,
            6 => ElementType::I32,
            7 => ElementType::I64,
            _ => ElementType::Other,
        }
    }

    pub(super) fn from_ort(ty: TensorElementType) -> Self {
        match ty {
            TensorElementType::Float32 => ElementType::F32,
            TensorElementType::Float16 => ElementType::F16,
            TensorElementType::Int32 => ElementType::I32,
            TensorElementType::Int64 => ElementType::I64,
            _ => ElementType::Other,
        }
    }
}

/// One named input or output of a graph.
#[derive(Debug, Clone)]
pub struct IoSpec {
    /// The name in the graph.
    pub name: String,
    /// Element type.
    pub dtype: ElementType,
    /// Shape, with -1 for dynamic dimensions.
    pub shape: Vec<i64>,
}

/// A tensor handed to [`Graph::run`]; converted to the dtype the graph declares (float16 graphs,
/// `python -m export convert --dtype fp16`, get it rounded to the nearest float16).
#[derive(Debug, Clone)]
pub enum TensorInput {
    /// Float data.
    F32(ArrayD<f32>),
    /// Integer data (token ids).
    I64(ArrayD<i64>),
}

/// A replacement value for a named weight, supplied when the session is built.
///
/// ONNX Runtime applies replacements of *external* initializers at every optimisation level;
/// [`super::InitializerTable`] tells which names exist and where they live. A replacement must
/// have the initializer's own element type, so the values are converted to `dtype` when the
/// session is built (deltas are computed in float32 either way).
#[derive(Debug, Clone)]
pub struct WeightOverride {
    /// The initializer name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// The new values, in float32.
    pub values: Vec<f32>,
    /// The initializer's element type: [`ElementType::F32`] or [`ElementType::F16`].
    pub dtype: ElementType,
}

/// Time spent inside ONNX Runtime's `Run` for one graph since it was loaded: what benchmarks
/// subtract from a run's wall time to see the engine's own overhead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Completed and failed `Run` calls.
    pub calls: u64,
    /// Their summed wall time: from handing over the inputs to getting the outputs back, without
    /// building the input tensors or copying the outputs out.
    pub total: Duration,
}

/// A replacement weight as ONNX Runtime takes it: built once, shared by every session built
/// from the graph (a reload after [`Graph::release`] reuses it instead of holding a copy).
#[derive(Clone)]
struct PreparedWeight {
    name: String,
    value: Arc<DynValue>,
}

/// Builds the tensors of `overrides` for `model`'s graph `context` names.
fn prepare_weights(
    context: &str,
    model: &Path,
    overrides: Vec<WeightOverride>,
) -> Result<Vec<PreparedWeight>> {
    overrides
        .into_iter()
        .map(|o| {
            let what = format!("{context}: weight '{}'", o.name);
            let tensor = match o.dtype {
                ElementType::F32 => {
                    Tensor::from_array((o.shape.clone(), o.values)).map(|t| t.into_dyn())
                }
                // ONNX Runtime rejects a replacement whose type differs from the initializer's.
                ElementType::F16 => {
                    let values: Vec<f16> = o.values.iter().copied().map(f16::from_f32).collect();
                    Tensor::from_array((o.shape.clone(), values)).map(|t| t.into_dyn())
                }
                other => {
                    return Err(Error::model(
                        model,
                        format!(
                            "{what} has element type {other:?}; only float32 and float16 weights \
                             can be replaced"
                        ),
                    ))
                }
            }
            .map_err(|e| rt_err(&what, e))?;
            Ok(PreparedWeight {
                name: o.name,
                value: Arc::new(tensor),
            })
        })
        .collect()
}

/// Sessions taken out of a graph by [`Graph::release_session`]; dropping them frees their
/// memory.
pub struct ReleasedSession {
    _sessions: Vec<Session>,
}

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

fn specs(outlets: &[ort::value::Outlet]) -> Vec<IoSpec> {
    outlets
        .iter()
        .map(|o| match o.dtype() {
            ValueType::Tensor { ty, shape, .. } => IoSpec {
                name: o.name().to_string(),
                dtype: ElementType::from_ort(*ty),
                shape: shape.iter().copied().collect(),
            },
            _ => IoSpec {
                name: o.name().to_string(),
                dtype: ElementType::Other,
                shape: Vec::new(),
            },
        })
        .collect()
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
    /// Loads `path` (an `.onnx` file, external data beside it) as component `name`.
    pub fn load(name: &str, path: &Path, options: &SessionOptions) -> Result<Self> {
        Self::load_with_weights(name, path, options, Vec::new())
    }

    /// Loads `path` with some weights replaced (load-time LoRA).
    pub fn load_with_weights(
        name: &str,
        path: &Path,
        options: &SessionOptions,
        overrides: Vec<WeightOverride>,
    ) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::model(path, format!("the {name} graph is missing")));
        }
        let context = format!("loading {} ({})", name, path.display());
        let weights = prepare_weights(&context, path, overrides)?;
        Self::load_prepared(name, path, options, weights)
    }

    /// Loads `path` with prepared replacement weights.
    fn load_prepared(
        name: &str,
        path: &Path,
        options: &SessionOptions,
        weights: Vec<PreparedWeight>,
    ) -> Result<Self> {
        let trt_shapes = if options.providers().contains(&ExecutionProvider::TensorRt) {
            let profile = options.provider_options.tensorrt.profile.ok_or_else(|| {
                Error::invalid("TensorRT needs an optimisation profile (image size and batch)")
            })?;
            profile_shapes(&declared_inputs(path)?, &profile)
                .map_err(|e| Error::model(path, format!("the {name} graph: {e}")))?
        } else {
            None
        };
        let (entry, mut status) = match &options.cache {
            SessionCache::Off => (None, CacheStatus::Off),
            SessionCache::Dir(root) => match options.cache_bypass(!weights.is_empty()) {
                Some(why) => (None, CacheStatus::Bypassed(why)),
                None => {
                    let key = CacheKey::new(
                        path,
                        options.providers(),
                        options.opt_level,
                        options.provider_options.device_id,
                        super::library::loaded_library().as_deref(),
                    )?;
                    (Some(CacheEntry::new(root, name, key)), CacheStatus::Off)
                }
            },
        };
        if let Some(entry) = &entry {
            match entry.lookup() {
                Ok(Some(cached)) => {
                    match build(
                        name,
                        &cached,
                        options,
                        trt_shapes.as_ref(),
                        None,
                        &[],
                        false,
                    ) {
                        Ok(session) => {
                            return Ok(Graph::new(name, path, session, CacheStatus::Hit))
                        }
                        Err(e) => {
                            entry.remove();
                            status = CacheStatus::Rejected(format!("ONNX Runtime: {e}"));
                        }
                    }
                }
                Ok(None) => {}
                Err(why) => {
                    entry.remove();
                    status = CacheStatus::Rejected(why);
                }
            }
        }
        let pending = match &entry {
            Some(entry) => match entry.begin_store() {
                Ok(p) => Some(p),
                Err(e) => {
                    status = CacheStatus::NotStored(e.to_string());
                    None
                }
            },
            None => None,
        };
        let session = build(
            name,
            path,
            options,
            trt_shapes.as_ref(),
            pending.as_ref().map(|p| p.model_path()),
            &weights,
            true,
        )?;
        if let (Some(entry), Some(pending)) = (&entry, pending) {
            match entry.finish_store(pending) {
                Ok(()) if matches!(status, CacheStatus::Off) => status = CacheStatus::Stored,
                Ok(()) => {}
                Err(e) => status = CacheStatus::NotStored(e.to_string()),
            }
        }
        let mut graph = Graph::new(name, path, session, status);
        graph.weights = weights;
        Ok(graph)
    }

    pub(super) fn new(name: &str, path: &Path, session: Session, cache: CacheStatus) -> Self {
        let inputs = specs(session.inputs());
        let outputs = specs(session.outputs());
        let assignment = assignment(&session).unwrap_or_default();
        let placements = input_devices(&session, inputs.len());
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
        }
    }

    /// Loads a graph split into consecutive segments (`export/segments.py`: the files share the
    /// weights of `whole`, the unsplit graph): a run loads each segment, runs it and releases
    /// it before the next one loads, so it holds one segment's weights at a time and pays a
    /// load per segment (from the session cache when it is on). What one segment computes for
    /// a later one passes between them under its name in the whole graph. Replaced weights go
    /// to the segments that read them. Each segment is loaded once here, to check it (and to
    /// fill the session cache), and released.
    pub fn load_segmented(
        name: &str,
        whole: &Path,
        parts: &[PathBuf],
        options: &SessionOptions,
        overrides: Vec<WeightOverride>,
    ) -> Result<Self> {
        if parts.len() < 2 {
            return Err(Error::model(
                whole,
                format!("the {name} graph needs at least 2 segments to load in segments"),
            ));
        }
        let tables = parts
            .iter()
            .map(|p| super::InitializerTable::read(p))
            .collect::<Result<Vec<_>>>()?;
        let mut routed: Vec<Vec<WeightOverride>> = vec![Vec::new(); parts.len()];
        for o in overrides {
            let holders: Vec<usize> = (0..tables.len())
                .filter(|&k| tables[k].get(&o.name).is_some())
                .collect();
            let Some((&last, rest)) = holders.split_last() else {
                return Err(Error::model(
                    whole,
                    format!(
                        "no segment of the {name} graph has the weight '{}'; write the \
                         segments again with `python -m export segment`",
                        o.name
                    ),
                ));
            };
            for &k in rest {
                routed[k].push(o.clone());
            }
            routed[last].push(o);
        }
        // Each segment's session serves one run: pre-packing its MatMul weights at every load
        // cost more than the run's own packing (full-size SD1.5: 0.35-0.6 s against 0.1 s per
        // segment load, runs unchanged). The optimised graph, and so the cache entry, is the
        // same either way.
        let options = &SessionOptions {
            disable_prepacking: true,
            ..options.clone()
        };
        let mut segments = Vec::with_capacity(parts.len());
        for (k, (part, weights)) in parts.iter().zip(routed).enumerate() {
            let mut graph =
                Graph::load_with_weights(&format!("{name}-segment-{k}"), part, options, weights)?;
            graph.keep_for_reload(options);
            graph.release();
            segments.push(graph);
        }
        Self::from_segments(name, whole, options, segments)
    }

    /// The graph the loaded `segments` make together: its inputs are those no earlier segment
    /// computes, its outputs those no later segment reads (and the last segment's).
    fn from_segments(
        name: &str,
        whole: &Path,
        options: &SessionOptions,
        segments: Vec<Graph>,
    ) -> Result<Self> {
        let mut inputs: Vec<IoSpec> = Vec::new();
        let mut placements = Vec::new();
        let mut computed: Vec<&str> = Vec::new();
        for segment in &segments {
            for (spec, placement) in segment.inputs.iter().zip(&segment.placements) {
                let known = computed.contains(&spec.name.as_str())
                    || inputs.iter().any(|i| i.name == spec.name);
                if !known {
                    inputs.push(spec.clone());
                    placements.push(placement.clone());
                }
            }
            computed.extend(segment.outputs.iter().map(|o| o.name.as_str()));
        }
        let last = segments.len() - 1;
        let mut outputs = Vec::new();
        for (k, segment) in segments.iter().enumerate() {
            for spec in &segment.outputs {
                let read_later = segments[k + 1..]
                    .iter()
                    .any(|s| s.input(&spec.name).is_some());
                if k == last || !read_later {
                    outputs.push(spec.clone());
                }
            }
        }
        if outputs.is_empty() {
            return Err(Error::model(
                whole,
                format!("the segments of the {name} graph compute no output"),
            ));
        }
        let mut assignment: Vec<ProviderAssignment> = Vec::new();
        for a in segments.iter().flat_map(|s| &s.assignment) {
            tally(&mut assignment, &a.provider, a.nodes);
        }
        assignment.sort_by_key(|t| std::cmp::Reverse(t.nodes));
        // One status for the graph: the segments' when they agree, else the first that differs
        // from a hit (a miss, a store, a rejection).
        let first = segments[0].cache.clone();
        let cache = segments
            .iter()
            .map(|s| &s.cache)
            .find(|c| **c != first && **c != CacheStatus::Hit)
            .cloned()
            .unwrap_or(first);
        Ok(Graph {
            name: name.to_string(),
            path: whole.to_path_buf(),
            binding: None,
            session: None,
            reload: Some(Box::new(options.clone())),
            weights: Vec::new(),
            inputs,
            placements,
            outputs,
            assignment,
            cache,
            run_stats: RunStats::default(),
            segments,
        })
    }

    /// How many segments the graph runs in (0: loaded whole).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Runs the segments in order, each loaded for its run and released after it.
    fn run_segments(
        &mut self,
        inputs: Vec<(String, DynValue)>,
        wanted: &[&str],
    ) -> Result<Vec<ArrayD<f32>>> {
        let mut values: std::collections::HashMap<String, DynValue> = inputs.into_iter().collect();
        for segment in &mut self.segments {
            segment.ensure_loaded()?;
            let feeds = segment
                .inputs
                .iter()
                .map(|i| {
                    let value = values.get(&i.name).ok_or_else(|| {
                        Error::Runtime(format!(
                            "{}: no value for input '{}' (not fed, and no earlier segment \
                             computes it)",
                            segment.name, i.name
                        ))
                    })?;
                    Ok((i.name.as_str(), SessionInputValue::from(value)))
                })
                .collect::<Result<Vec<_>>>()?;
            let session = segment
                .session
                .as_mut()
                .ok_or_else(|| not_loaded(&segment.name))?;
            let mut outputs = session
                .run(feeds)
                .map_err(|e| rt_err(&format!("running {}", segment.name), e))?;
            let computed: Vec<(String, DynValue)> = segment
                .outputs
                .iter()
                .filter_map(|o| outputs.remove(&o.name).map(|v| (o.name.clone(), v)))
                .collect();
            drop(outputs);
            values.extend(computed);
            segment.release();
        }
        wanted
            .iter()
            .map(|w| {
                let value = values.get(*w).ok_or_else(|| {
                    Error::Runtime(format!("{} produced no output '{w}'", self.name))
                })?;
                read_output(&self.name, &self.outputs, w, value)
            })
            .collect()
    }

    /// Lets [`Graph::release`] drop the session: `options` are kept to build it again, with the
    /// replaced weights it was loaded with (shared with the session, not copied).
    pub fn keep_for_reload(&mut self, options: &SessionOptions) {
        self.reload = Some(Box::new(options.clone()));
    }

    /// Drops the session and its memory (weights, pre-packed kernels, arena) if the graph can
    /// be loaded again ([`Graph::keep_for_reload`]); the next run loads it first. Returns
    /// whether a session was dropped.
    pub fn release(&mut self) -> bool {
        self.release_session().is_some()
    }

    /// [`Graph::release`], handing the session over instead of dropping it: freeing gigabytes
    /// of weights takes a while, which the caller may spend elsewhere.
    pub fn release_session(&mut self) -> Option<ReleasedSession> {
        self.reload.as_ref()?;
        self.binding = None;
        let sessions: Vec<Session> = self
            .session
            .take()
            .into_iter()
            .chain(
                self.segments
                    .iter_mut()
                    .filter_map(|s| s.release_session())
                    .flat_map(|r| r._sessions),
            )
            .collect();
        (!sessions.is_empty()).then_some(ReleasedSession {
            _sessions: sessions,
        })
    }

    /// Whether the session is loaded (for a graph in segments: one of them).
    pub fn is_loaded(&self) -> bool {
        self.session.is_some() || self.segments.iter().any(Graph::is_loaded)
    }

    /// Builds the session again after [`Graph::release`] (through the session cache when it is
    /// on); nothing to do while loaded, nor for a graph in segments, whose runs load them.
    pub fn ensure_loaded(&mut self) -> Result<()> {
        if self.session.is_some() || !self.segments.is_empty() {
            return Ok(());
        }
        let reload = self.reload.as_ref().ok_or_else(|| {
            Error::Runtime(format!("the {} graph was released for good", self.name))
        })?;
        let fresh = Graph::load_prepared(&self.name, &self.path, reload, self.weights.clone())?;
        self.session = fresh.session;
        self.placements = fresh.placements;
        self.assignment = fresh.assignment;
        self.cache = fresh.cache;
        Ok(())
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

    /// Runs the graph and returns the requested outputs as f32 arrays, in the order asked.
    pub fn run(
        &mut self,
        inputs: Vec<(&str, TensorInput)>,
        wanted: &[&str],
    ) -> Result<Vec<ArrayD<f32>>> {
        let mut values: Vec<(String, ort::value::DynValue)> = Vec::with_capacity(inputs.len());
        for (name, data) in inputs {
            let spec = self.spec(name)?;
            values.push((name.to_string(), self.host_tensor(spec, data)?.into_dyn()));
        }
        self.check_outputs(wanted)?;
        let name = self.name.clone();
        let started = Instant::now();
        if !self.segments.is_empty() {
            let outputs = self.run_segments(values, wanted);
            self.run_stats.calls += 1;
            self.run_stats.total += started.elapsed();
            return outputs;
        }
        self.ensure_loaded()?;
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| not_loaded(&self.name))?;
        let outputs = session.run(values);
        self.run_stats.calls += 1;
        self.run_stats.total += started.elapsed();
        let outputs = outputs.map_err(|e| rt_err(&format!("running {name}"), e))?;
        read_outputs(&self.name, &self.outputs, &outputs, wanted)
    }

    /// `data` as a host tensor of the element type `spec` declares.
    pub(super) fn host_tensor(&self, spec: &IoSpec, data: TensorInput) -> Result<DynTensor> {
        let context = format!("{} input '{}'", self.name, spec.name);
        let value = match (spec.dtype, data) {
            (ElementType::F32, TensorInput::F32(a)) => Tensor::from_array(a).map(Tensor::upcast),
            (ElementType::I64, TensorInput::I64(a)) => Tensor::from_array(a).map(Tensor::upcast),
            (ElementType::I32, TensorInput::I64(a)) => {
                let narrowed = a.mapv(|v| v as i32);
                Tensor::from_array(narrowed).map(Tensor::upcast)
            }
            (ElementType::I64, TensorInput::F32(a)) => {
                Tensor::from_array(a.mapv(|v| v as i64)).map(Tensor::upcast)
            }
            (ElementType::I32, TensorInput::F32(a)) => {
                Tensor::from_array(a.mapv(|v| v as i32)).map(Tensor::upcast)
            }
            (ElementType::F32, TensorInput::I64(a)) => {
                Tensor::from_array(a.mapv(|v| v as f32)).map(Tensor::upcast)
            }
            (ElementType::F16, TensorInput::F32(a)) => {
                Tensor::from_array(a.mapv(f16::from_f32)).map(Tensor::upcast)
            }
            (ElementType::F16, TensorInput::I64(a)) => {
                Tensor::from_array(a.mapv(|v| f16::from_f32(v as f32))).map(Tensor::upcast)
            }
            (other, _) => {
                return Err(Error::model(
                    &self.path,
                    format!("{context} has element type {other:?}, which tcd-ort does not feed (export the model in float32 or float16)"),
                ))
            }
        };
        value.map_err(|e| rt_err(&context, e))
    }
}

/// Copies the outputs in `wanted` out of `outputs` as f32 arrays (float16 widened exactly);
/// `specs` are the graph's outputs, `name` its component name.
pub(super) fn read_outputs(
    name: &str,
    specs: &[IoSpec],
    outputs: &SessionOutputs<'_>,
    wanted: &[&str],
) -> Result<Vec<ArrayD<f32>>> {
    wanted
        .iter()
        .map(|w| {
            let value = outputs
                .get(*w)
                .ok_or_else(|| Error::Runtime(format!("{name} produced no output '{w}'")))?;
            read_output(name, specs, w, value)
        })
        .collect()
}

/// Copies output `w` of graph `name` to an f32 array (float16 widened exactly).
pub(super) fn read_output(
    name: &str,
    specs: &[IoSpec],
    w: &str,
    value: &DynValue,
) -> Result<ArrayD<f32>> {
    let context = format!("reading {name} output '{w}'");
    let dtype = specs
        .iter()
        .find(|o| o.name == w)
        .map_or(ElementType::Other, |o| o.dtype);
    match dtype {
        // Float16 graphs: widened exactly, so callers always see f32.
        ElementType::F16 => value
            .try_extract_array::<f16>()
            .map(|a| a.mapv(f16::to_f32))
            .map_err(|e| rt_err(&context, e)),
        _ => value
            .try_extract_array::<f32>()
            .map(|a| a.to_owned())
            .map_err(|e| rt_err(&context, e)),
    }
}

/// A session builder with `options`' providers, threads and fixed shapes, at optimisation
/// `level`. `graph` (component name and file) is the graph the fixed shapes are derived from;
/// graphs built in memory have none.
pub(super) fn configure(
    context: &str,
    options: &SessionOptions,
    level: OptLevel,
    trt_shapes: Option<&ProfileShapes>,
    graph: Option<(&str, &Path)>,
) -> Result<SessionBuilder> {
    let env = super::environment()?;
    let err = |e: ort::Error<SessionBuilder>| rt_err(context, e);
    let mut builder = Session::builder(&env).map_err(|e| rt_err(context, e))?;
    builder = builder
        .with_optimization_level(match level {
            OptLevel::Disable => GraphOptimizationLevel::Disable,
            OptLevel::Basic => GraphOptimizationLevel::Level1,
            OptLevel::Extended => GraphOptimizationLevel::Level2,
            OptLevel::All => GraphOptimizationLevel::Level3,
        })
        .map_err(err)?;
    builder = builder
        .with_config_entry("session.record_ep_graph_assignment_info", "1")
        .map_err(err)?;
    if let Some(n) = options.intra_threads {
        builder = builder.with_intra_threads(n).map_err(err)?;
    }
    if options.disable_prepacking {
        builder = builder
            .with_config_entry("session.disable_prepacking", "1")
            .map_err(err)?;
    }
    if let (Some(fixed), Some((name, model))) = (&options.fixed_shape, graph) {
        let fixed = dimension_overrides(&declared_inputs(model)?, &fixed.dims, fixed.latent_factor)
            .map_err(|e| Error::model(model, format!("the {name} graph: {e}")))?;
        for (dim, size) in fixed {
            builder = builder.with_dimension_override(&dim, size).map_err(err)?;
        }
    }
    let providers = options.providers();
    if providers.contains(&ExecutionProvider::DirectMl) {
        // The DirectML provider supports neither memory patterns nor parallel execution.
        builder = builder
            .with_memory_pattern(false)
            .map_err(err)?
            .with_parallel_execution(false)
            .map_err(err)?;
    }
    let dispatch = providers
        .iter()
        .map(|ep| ep.dispatch(&options.provider_options, trt_shapes))
        .collect::<Result<Vec<_>>>()?;
    builder.with_execution_providers(dispatch).map_err(|e| {
        rt_err(
            &format!(
                "{context}: registering execution provider(s) {}",
                providers
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            e,
        )
    })
}

/// Builds a session for `model`. With `save_to`, ONNX Runtime writes the optimised graph there
/// (its weights in [`DATA_FILE`] beside it). `optimise` is false for a graph from the cache,
/// which is already optimised: running the optimisers again would only cost time.
fn build(
    name: &str,
    model: &Path,
    options: &SessionOptions,
    trt_shapes: Option<&ProfileShapes>,
    save_to: Option<PathBuf>,
    weights: &[PreparedWeight],
    optimise: bool,
) -> Result<Session> {
    let context = format!("loading {} ({})", name, model.display());
    let err = |e: ort::Error<SessionBuilder>| rt_err(&context, e);
    let level = if optimise {
        options.opt_level
    } else {
        OptLevel::Disable
    };
    let mut builder = configure(&context, options, level, trt_shapes, Some((name, model)))?;
    if let Some(path) = &save_to {
        builder = builder
            .with_optimized_model_path(path)
            .map_err(err)?
            .with_config_entry(
                "session.optimized_model_external_initializers_file_name",
                DATA_FILE,
            )
            .map_err(err)?;
    }
    for w in weights {
        builder = builder
            .with_external_initializer(&w.name, Arc::clone(&w.value))
            .map_err(|e| rt_err(&format!("{context}: replacing weight '{}'", w.name), e))?;
    }
    builder.commit_from_file(model).map_err(|e| {
        Error::model(
            model,
            format!("ONNX Runtime could not load the {name} graph: {e}"),
        )
    })
}

/// Reads ONNX Runtime's record of which provider runs which nodes.
fn assignment(session: &Session) -> Result<Vec<ProviderAssignment>> {
    let api = ort::api();
    let mut subgraphs: *const *const ort::sys::OrtEpAssignedSubgraph = std::ptr::null();
    let mut count = 0usize;
    // SAFETY: the session pointer is live for the call; ONNX Runtime fills the out-pointers with
    // an array owned by the session, valid while it lives.
    unsafe {
        ort::Error::result_from_status((api.Session_GetEpGraphAssignmentInfo)(
            session.ptr(),
            &mut subgraphs,
            &mut count,
        ))
    }
    .map_err(|e| rt_err("reading provider assignment", e))?;
    if subgraphs.is_null() || count == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: ONNX Runtime returned `count` valid subgraph pointers at `subgraphs`.
    let subgraphs = unsafe { std::slice::from_raw_parts(subgraphs, count) };
    let mut totals: Vec<ProviderAssignment> = Vec::new();
    for &subgraph in subgraphs {
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let mut nodes: *const *const ort::sys::OrtEpAssignedNode = std::ptr::null();
        let mut n = 0usize;
        // SAFETY: `subgraph` came from the session above; the out-pointers are valid.
        unsafe {
            ort::Error::result_from_status((api.EpAssignedSubgraph_GetEpName)(subgraph, &mut name))
                .and_then(|()| {
                    ort::Error::result_from_status((api.EpAssignedSubgraph_GetNodes)(
                        subgraph, &mut nodes, &mut n,
                    ))
                })
        }
        .map_err(|e| rt_err("reading provider assignment", e))?;
        if name.is_null() {
            continue;
        }
        // SAFETY: ONNX Runtime returns a NUL-terminated string owned by the session.
        let provider = unsafe { std::ffi::CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        tally(&mut totals, &provider, n);
    }
    totals.sort_by_key(|t| std::cmp::Reverse(t.nodes));
    Ok(totals)
}

/// Adds `nodes` to `provider`'s count in `totals`.
fn tally(totals: &mut Vec<ProviderAssignment>, provider: &str, nodes: usize) {
    match totals.iter_mut().find(|t| t.provider == provider) {
        Some(t) => t.nodes += nodes,
        None => totals.push(ProviderAssignment {
            provider: provider.to_string(),
            nodes,
        }),
    }
}

/// Builds an `ArrayD` from a shape and data, as graphs expect.
pub fn array(shape: &[usize], data: Vec<f32>) -> Result<ArrayD<f32>> {
    ArrayD::from_shape_vec(IxDyn(shape), data)
        .map_err(|e| Error::Runtime(format!("tensor of shape {shape:?}: {e}")))
}
