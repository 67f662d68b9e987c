//! Everything that touches ONNX Runtime: library discovery, the environment, execution
//! providers, sessions and their IoBindings. No other module names `ort`.

mod binding;
pub mod builtin;
pub mod cache;
mod initializers;
mod library;
mod options;
mod provider;
mod session;
pub mod tensorrt;

pub use binding::{Destination, Feed, PlacedTensor};
pub use cache::CacheStatus;
pub use initializers::{
    declared_inputs, f16_to_f32, DeclaredDim, DeclaredInput, Initializer, InitializerTable, Storage,
};
pub(crate) use library::environment;
pub use library::{ensure_loaded, find_library, INSTALL_HINT, TELEMETRY_ENV};
pub use options::{
    parse_bytes, user_cache_dir, ArenaExtendStrategy, CoreMlComputeUnits, CoreMlOptions,
    CudaOptions, CudnnConvSearch, FixedShape, OptLevel, ProviderOptions, SessionCache, ShapeDims,
    TensorRtOptions, TrtProfile,
};
pub use provider::{parse_provider_list, select_providers, ExecutionProvider};
pub use session::{
    array, ElementType, Graph, IoSpec, ProviderAssignment, ReleasedSession, RunStats,
    SessionOptions, TensorInput, WeightOverride,
};
