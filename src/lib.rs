//! tcd-ort: Trajectory Consistency Distillation Stable Diffusion on ONNX Runtime.

pub mod control;
pub mod error;
#[cfg(feature = "capi")]
pub mod ffi;
pub mod image_io;
pub mod lora;
pub mod rng;
pub mod sampler;
#[cfg(feature = "server")]
pub mod server;
pub mod tokenizer;

pub use error::{Error, Result};
pub mod model;
pub mod pipeline;
pub mod runtime;
