//! Small graphs the engine builds itself, in memory, with ONNX Runtime's model editor, so that
//! arithmetic between two exported graphs runs where their tensors live (on the accelerator)
//! instead of on the host.
//!
//! [`scaled_sum`] is the one there is: per tensor `i`, `out_i = x_i * scale` or
//! `out_i = acc_i + x_i * scale`. Several ControlNets' residuals are summed with it exactly as
//! diffusers' `MultiControlNetModel` does: each ControlNet's outputs times its conditioning
//! scale, then added in order. For float16 tensors the product is taken in float32 and rounded
//! once (PyTorch multiplies a half tensor by a Python float that way), and the sum is a float16
//! addition, like `samples_prev + samples_curr` (ONNX Runtime's CPU provider has no float16
//! Add: it adds in float32 without rounding the product first, a difference of at most one
//! float16 step; float16 models are for accelerators).

use std::path::PathBuf;

use ort::editor::{Graph as EditorGraph, Model, Node, Opset, ONNX_DOMAIN};
use ort::operator::Attribute;
use ort::value::{Outlet, Shape, SymbolicDimensions, TensorElementType, ValueType};

use super::cache::CacheStatus;
use super::options::OptLevel;
use super::provider::ExecutionProvider;
use super::session::{configure, rt_err, ElementType, Graph, SessionOptions};
use crate::{Error, Result};

/// The opset the built graphs declare (Cast, Mul and Add are unchanged since 13).
const OPSET: u32 = 17;

/// The name of input `i` of `x` tensors in a [`scaled_sum`] graph.
pub fn scaled_sum_x(i: usize) -> String {
    format!("x_{i}")
}

/// The name of accumulator input `i` of an accumulating [`scaled_sum`] graph.
pub fn scaled_sum_acc(i: usize) -> String {
    format!("acc_{i}")
}

/// The name of output `i` of a [`scaled_sum`] graph.
pub fn scaled_sum_out(i: usize) -> String {
    format!("out_{i}")
}

/// The scalar float32 input of a [`scaled_sum`] graph.
pub const SCALED_SUM_SCALE: &str = "scale";

fn ort_type(dtype: ElementType) -> Result<(TensorElementType, i64)> {
    match dtype {
        ElementType::F32 => Ok((TensorElementType::Float32, 1)),
        ElementType::F16 => Ok((TensorElementType::Float16, 10)),
        other => Err(Error::Runtime(format!(
            "a scaled sum is built for float32 or float16 tensors, not {other:?}"
        ))),
    }
}

fn outlet(name: &str, ty: TensorElementType, rank: usize) -> Outlet {
    Outlet::new(
        name,
        ValueType::Tensor {
            ty,
            shape: Shape::new(vec![-1; rank]),
            dimension_symbols: SymbolicDimensions::empty(rank),
        },
    )
}

/// The providers a built graph runs on: those of `options`, with TensorRT replaced by CUDA. The
/// tensors it adds already live in CUDA memory (TensorRT reads and writes there too), and
/// elementwise arithmetic gains nothing from an engine build per shape.
fn providers_for_builtin(options: &SessionOptions) -> Vec<ExecutionProvider> {
    let mut providers = Vec::new();
    for p in &options.providers {
        let p = match p {
            ExecutionProvider::TensorRt => ExecutionProvider::Cuda,
            other => *other,
        };
        if !providers.contains(&p) {
            providers.push(p);
        }
    }
    providers
}

/// Builds the graph `out_i = [acc_i +] cast(cast_f32(x_i) * scale)` for `count` tensors of rank
/// `rank`: `x_i` of element type `x`, `acc_i` and `out_i` of `out`, `scale` a float32 scalar.
/// It runs on `options`' providers (TensorRT as CUDA), unoptimised: there is nothing to fuse,
/// and keeping the product and the sum apart keeps float32 results bit-identical to the same
/// arithmetic on the host.
// One ONNX graph written out node by node; its parts mean little apart.
#[allow(clippy::too_many_lines)]
pub fn scaled_sum(
    name: &str,
    count: usize,
    rank: usize,
    (x, out): (ElementType, ElementType),
    accumulate: bool,
    options: &SessionOptions,
) -> Result<Graph> {
    let context = format!("building the {name} graph");
    let ort = |e: ort::Error| rt_err(&context, e);
    let (x_ty, _) = ort_type(x)?;
    let (out_ty, out_code) = ort_type(out)?;
    let mut graph = EditorGraph::new().map_err(ort)?;
    let mut inputs = Vec::with_capacity(2 * count + 1);
    let mut outputs = Vec::with_capacity(count);
    inputs.push(outlet(SCALED_SUM_SCALE, TensorElementType::Float32, 0));
    for i in 0..count {
        let (x_name, out_name) = (scaled_sum_x(i), scaled_sum_out(i));
        inputs.push(outlet(&x_name, x_ty, rank));
        let mut operand = x_name;
        if x != ElementType::F32 {
            let cast = format!("x32_{i}");
            graph
                .add_node(
                    Node::new(
                        "Cast",
                        ONNX_DOMAIN,
                        format!("cast_x_{i}"),
                        [operand.as_str()],
                        [cast.as_str()],
                        [Attribute::new("to", 1i64).map_err(ort)?],
                    )
                    .map_err(ort)?,
                )
                .map_err(ort)?;
            operand = cast;
        }
        // The last node of the chain writes `out_i`.
        let needs_round = out != ElementType::F32;
        let scaled = if !needs_round && !accumulate {
            out_name.clone()
        } else {
            format!("scaled_{i}")
        };
        graph
            .add_node(
                Node::new(
                    "Mul",
                    ONNX_DOMAIN,
                    format!("mul_{i}"),
                    [operand.as_str(), SCALED_SUM_SCALE],
                    [scaled.as_str()],
                    [],
                )
                .map_err(ort)?,
            )
            .map_err(ort)?;
        let mut result = scaled;
        if needs_round {
            let rounded = if accumulate {
                format!("rounded_{i}")
            } else {
                out_name.clone()
            };
            graph
                .add_node(
                    Node::new(
                        "Cast",
                        ONNX_DOMAIN,
                        format!("cast_out_{i}"),
                        [result.as_str()],
                        [rounded.as_str()],
                        [Attribute::new("to", out_code).map_err(ort)?],
                    )
                    .map_err(ort)?,
                )
                .map_err(ort)?;
            result = rounded;
        }
        if accumulate {
            let acc = scaled_sum_acc(i);
            inputs.push(outlet(&acc, out_ty, rank));
            graph
                .add_node(
                    Node::new(
                        "Add",
                        ONNX_DOMAIN,
                        format!("add_{i}"),
                        [acc.as_str(), result.as_str()],
                        [out_name.as_str()],
                        [],
                    )
                    .map_err(ort)?,
                )
                .map_err(ort)?;
        }
        outputs.push(outlet(&out_name, out_ty, rank));
    }
    graph.set_inputs(inputs).map_err(ort)?;
    graph.set_outputs(outputs).map_err(ort)?;
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, OPSET).map_err(ort)?]).map_err(ort)?;
    model.set_graph(graph).map_err(ort)?;
    let built = SessionOptions {
        providers: providers_for_builtin(options),
        fixed_shape: None,
        ..options.clone()
    };
    let builder = configure(&context, &built, OptLevel::Disable, None, None)?;
    let session = model.into_session(&builder).map_err(|e| {
        Error::Runtime(format!(
            "{context}: ONNX Runtime's model editor failed ({e}); this ONNX Runtime build may \
             lack it, run with --no-io-binding"
        ))
    })?;
    let path = PathBuf::from(format!("<{name}: built in memory>"));
    let graph = Graph::new(name, &path, session, CacheStatus::Off);
    let expected = 1 + count * if accumulate { 2 } else { 1 };
    if graph.inputs().len() != expected || graph.outputs().len() != count {
        return Err(Error::Runtime(format!(
            "{context}: ONNX Runtime built it with {} inputs and {} outputs, expected {expected} \
             and {count}",
            graph.inputs().len(),
            graph.outputs().len()
        )));
    }
    Ok(graph)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensorrt_becomes_cuda_once() {
        let options = SessionOptions {
            providers: vec![
                ExecutionProvider::TensorRt,
                ExecutionProvider::Cuda,
                ExecutionProvider::Cpu,
            ],
            ..SessionOptions::default()
        };
        assert_eq!(
            providers_for_builtin(&options),
            vec![ExecutionProvider::Cuda, ExecutionProvider::Cpu]
        );
        let cpu = SessionOptions::default();
        assert!(providers_for_builtin(&cpu).is_empty());
    }

    #[test]
    fn only_float_types() {
        assert!(ort_type(ElementType::I64).is_err());
        assert_eq!(ort_type(ElementType::F16).expect("f16").1, 10);
    }
}
