//! How sessions are built: providers, threads, optimisation level, caching, fixed shapes.

use crate::runtime::options::{FixedShape, OptLevel, ProviderOptions, SessionCache};
use crate::runtime::provider::ExecutionProvider;

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
    /// The cache's size limit in bytes; `None`: [`crate::runtime::cache::DEFAULT_LIMIT`].
    pub cache_limit: Option<u64>,
    /// Build the session for exactly this image size and batch (ONNX Runtime's free-dimension
    /// overrides, see [`crate::runtime::tensorrt::dimension_overrides`]); `None` keeps every
    /// dynamic dimension dynamic.
    pub fixed_shape: Option<FixedShape>,
    /// Use the weights where they are instead of pre-packing them for ONNX Runtime's MatMul
    /// kernels when the session is built (`session.disable_prepacking`). For sessions built
    /// for one run ([`super::Graph::load_segmented`]): packing a segment's weights took longer than
    /// packing them within the run.
    pub disable_prepacking: bool,
}

impl SessionOptions {
    pub(super) fn providers(&self) -> &[ExecutionProvider] {
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
    pub(super) fn cache_bypass(&self, has_overrides: bool) -> Option<String> {
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
