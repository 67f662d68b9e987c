//! Sessions: one ONNX graph loaded once, with its input and output signature.

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};

use super::provider::ExecutionProvider;
use crate::{Error, Result};

/// How sessions are built.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Execution providers, in priority order (already checked against the loaded build).
    pub providers: Vec<ExecutionProvider>,
    /// GPU ordinal for CUDA, TensorRT and DirectML.
    pub device_id: i32,
    /// Threads inside one operator; `None` lets ONNX Runtime use every core.
    pub intra_threads: Option<usize>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            providers: vec![ExecutionProvider::Cpu],
            device_id: 0,
            intra_threads: None,
        }
    }
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
    fn from_ort(ty: TensorElementType) -> Self {
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

/// A tensor handed to [`Graph::run`]; converted to the dtype the graph declares.
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
/// [`super::InitializerTable`] tells which names exist and where they live.
#[derive(Debug, Clone)]
pub struct WeightOverride {
    /// The initializer name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// The new values (float32).
    pub values: Vec<f32>,
}

/// One loaded ONNX graph.
pub struct Graph {
    name: String,
    path: PathBuf,
    session: Session,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
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

fn rt_err(context: &str, e: impl std::fmt::Display) -> Error {
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
        let env = super::environment()?;
        let context = format!("loading {} ({})", name, path.display());
        let mut builder = Session::builder(&env).map_err(|e| rt_err(&context, e))?;
        builder = builder
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| rt_err(&context, e))?;
        if let Some(n) = options.intra_threads {
            builder = builder
                .with_intra_threads(n)
                .map_err(|e| rt_err(&context, e))?;
        }
        let dispatch: Vec<_> = options
            .providers
            .iter()
            .map(|ep| ep.dispatch(options.device_id))
            .collect();
        builder = builder.with_execution_providers(dispatch).map_err(|e| {
            rt_err(
                &format!(
                    "{context}: registering execution provider(s) {}",
                    options
                        .providers
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                e,
            )
        })?;
        for o in overrides {
            let tensor = Tensor::from_array((o.shape.clone(), o.values))
                .map_err(|e| rt_err(&format!("{context}: weight '{}'", o.name), e))?;
            builder = builder
                .with_external_initializer(&o.name, tensor.into_dyn())
                .map_err(|e| rt_err(&format!("{context}: replacing weight '{}'", o.name), e))?;
        }
        let session = builder.commit_from_file(path).map_err(|e| {
            Error::model(
                path,
                format!("ONNX Runtime could not load the {name} graph: {e}"),
            )
        })?;
        let inputs = specs(session.inputs());
        let outputs = specs(session.outputs());
        Ok(Graph {
            name: name.to_string(),
            path: path.to_path_buf(),
            session,
            inputs,
            outputs,
        })
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

    /// Runs the graph and returns the requested outputs as f32 arrays, in the order asked.
    pub fn run(
        &mut self,
        inputs: Vec<(&str, TensorInput)>,
        wanted: &[&str],
    ) -> Result<Vec<ArrayD<f32>>> {
        let mut values: Vec<(String, ort::value::DynValue)> = Vec::with_capacity(inputs.len());
        for (name, data) in inputs {
            let spec = self.input(name).ok_or_else(|| {
                Error::model(
                    &self.path,
                    format!("the {} graph has no input '{name}'", self.name),
                )
            })?;
            values.push((name.to_string(), self.to_value(spec, data)?));
        }
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
        let name = self.name.clone();
        let outputs = self
            .session
            .run(values)
            .map_err(|e| rt_err(&format!("running {name}"), e))?;
        let mut result = Vec::with_capacity(wanted.len());
        for w in wanted {
            let value = outputs
                .get(*w)
                .ok_or_else(|| Error::Runtime(format!("{name} produced no output '{w}'")))?;
            let array = value
                .try_extract_array::<f32>()
                .map_err(|e| rt_err(&format!("reading {name} output '{w}'"), e))?;
            result.push(array.to_owned());
        }
        Ok(result)
    }

    fn to_value(&self, spec: &IoSpec, data: TensorInput) -> Result<ort::value::DynValue> {
        let context = format!("{} input '{}'", self.name, spec.name);
        let value = match (spec.dtype, data) {
            (ElementType::F32, TensorInput::F32(a)) => {
                Tensor::from_array(a).map(|t| t.into_dyn())
            }
            (ElementType::I64, TensorInput::I64(a)) => {
                Tensor::from_array(a).map(|t| t.into_dyn())
            }
            (ElementType::I32, TensorInput::I64(a)) => {
                let narrowed = a.mapv(|v| v as i32);
                Tensor::from_array(narrowed).map(|t| t.into_dyn())
            }
            (ElementType::I64, TensorInput::F32(a)) => {
                Tensor::from_array(a.mapv(|v| v as i64)).map(|t| t.into_dyn())
            }
            (ElementType::I32, TensorInput::F32(a)) => {
                Tensor::from_array(a.mapv(|v| v as i32)).map(|t| t.into_dyn())
            }
            (ElementType::F32, TensorInput::I64(a)) => {
                Tensor::from_array(a.mapv(|v| v as f32)).map(|t| t.into_dyn())
            }
            (other, _) => {
                return Err(Error::model(
                    &self.path,
                    format!("{context} has element type {other:?}, which tcd-ort does not feed yet (export the model in float32)"),
                ))
            }
        };
        value.map_err(|e| rt_err(&context, e))
    }
}

/// Builds an `ArrayD` from a shape and data, as graphs expect.
pub fn array(shape: &[usize], data: Vec<f32>) -> Result<ArrayD<f32>> {
    ArrayD::from_shape_vec(IxDyn(shape), data)
        .map_err(|e| Error::Runtime(format!("tensor of shape {shape:?}: {e}")))
}
