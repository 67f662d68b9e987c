//! What flows in and out of a graph: element types, input and output specs, host tensors.

use std::time::Duration;

use ndarray::ArrayD;
use ort::value::{TensorElementType, ValueType};

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

    /// The name ONNX and the exporter's manifest give the type (`float32`, `int64`).
    pub fn onnx_name(self) -> &'static str {
        match self {
            ElementType::F32 => "float32",
            ElementType::F16 => "float16",
            ElementType::I32 => "int32",
            ElementType::I64 => "int64",
            ElementType::Other => "another type",
        }
    }

    pub(in crate::runtime) fn from_ort(ty: TensorElementType) -> Self {
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

/// A tensor handed to [`super::Graph::run`]; converted to the dtype the graph declares (float16
/// graphs, `python -m export convert --dtype fp16`, get it rounded to the nearest float16).
#[derive(Debug, Clone)]
pub enum TensorInput {
    /// Float data.
    F32(ArrayD<f32>),
    /// Integer data (token ids).
    I64(ArrayD<i64>),
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

pub(super) fn specs(outlets: &[ort::value::Outlet]) -> Vec<IoSpec> {
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
