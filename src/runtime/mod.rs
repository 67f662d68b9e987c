//! Everything that touches ONNX Runtime: library discovery, the environment, execution
//! providers and sessions. No other module names `ort`.

mod initializers;
mod library;
mod provider;
mod session;

pub use initializers::{f16_to_f32, Initializer, InitializerTable, Storage};
pub(crate) use library::environment;
pub use library::{ensure_loaded, find_library, INSTALL_HINT};
pub use provider::{parse_provider_list, select_providers, ExecutionProvider};
pub use session::{array, ElementType, Graph, IoSpec, SessionOptions, TensorInput, WeightOverride};
