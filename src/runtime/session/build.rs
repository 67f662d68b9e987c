//! Loading a graph: a session built with the options' providers and replaced weights, read
//! from or stored in the session cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

use super::weights::{prepare_weights, PreparedWeight};
use super::{rt_err, Graph, SessionOptions, WeightOverride};
use crate::runtime::cache::{
    size_text, CacheEntry, CacheKey, CacheStatus, DATA_FILE, DEFAULT_LIMIT,
};
use crate::runtime::initializers::declared_inputs;
use crate::runtime::options::{OptLevel, SessionCache};
use crate::runtime::provider::ExecutionProvider;
use crate::runtime::tensorrt::{dimension_overrides, profile_shapes, ProfileShapes};
use crate::{Error, Result};

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
    pub(super) fn load_prepared(
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
                        options.opt_level.for_graph(name),
                        options.provider_options.device_id,
                        crate::runtime::library::loaded_library().as_deref(),
                    )?;
                    let limit = options.cache_limit.unwrap_or(DEFAULT_LIMIT);
                    if key.source_bytes() > limit {
                        let why = format!(
                            "the graph's {} exceed the session cache's limit of {} \
                             (--session-cache-limit)",
                            size_text(key.source_bytes()),
                            size_text(limit)
                        );
                        (None, CacheStatus::Bypassed(why))
                    } else {
                        (
                            Some(CacheEntry::new(root, name, key, limit)),
                            CacheStatus::Off,
                        )
                    }
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
                            let mut graph = Graph::new(name, path, session, CacheStatus::Hit);
                            graph.cpu_arena = options.provider_options.cpu_arena == Some(true);
                            return Ok(graph);
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
        graph.cpu_arena = options.provider_options.cpu_arena == Some(true);
        Ok(graph)
    }
}

/// A session builder with `options`' providers, threads and fixed shapes, at optimisation
/// `level`. `graph` (component name and file) is the graph the fixed shapes are derived from;
/// graphs built in memory have none.
pub(in crate::runtime) fn configure(
    context: &str,
    options: &SessionOptions,
    level: OptLevel,
    trt_shapes: Option<&ProfileShapes>,
    graph: Option<(&str, &Path)>,
) -> Result<SessionBuilder> {
    let env = crate::runtime::environment()?;
    let err = |e: ort::Error<SessionBuilder>| rt_err(context, e);
    let mut builder = Session::builder(&env).map_err(|e| rt_err(context, e))?;
    builder = builder
        .with_optimization_level(match level {
            OptLevel::Disable => GraphOptimizationLevel::Disable,
            OptLevel::Basic => GraphOptimizationLevel::Level1,
            // `Auto` is resolved per graph by the callers (`OptLevel::for_graph`); a graph built
            // without a name gets its default for unnamed graphs.
            OptLevel::Extended | OptLevel::Auto => GraphOptimizationLevel::Level2,
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
        options.opt_level.for_graph(name)
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
