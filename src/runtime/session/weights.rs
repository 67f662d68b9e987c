//! Replaced weights (load-time LoRA): what callers hand over and what ONNX Runtime takes.

use std::path::Path;
use std::sync::Arc;

use half::f16;
use ort::value::{DynValue, Tensor};

use super::{rt_err, ElementType};
use crate::{Error, Result};

/// A replacement value for a named weight, supplied when the session is built.
///
/// ONNX Runtime applies replacements of *external* initializers at every optimisation level;
/// [`crate::runtime::InitializerTable`] tells which names exist and where they live. A
/// replacement must have the initializer's own element type, so the values are converted to
/// `dtype` when the session is built (deltas are computed in float32 either way).
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

/// A replacement weight as ONNX Runtime takes it: built once, shared by every session built
/// from the graph (a reload after [`super::Graph::release`] reuses it instead of holding a copy).
#[derive(Clone)]
pub(in crate::runtime) struct PreparedWeight {
    pub(in crate::runtime) name: String,
    pub(in crate::runtime) value: Arc<DynValue>,
}

/// Builds the tensors of `overrides` for `model`'s graph `context` names.
pub(super) fn prepare_weights(
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
