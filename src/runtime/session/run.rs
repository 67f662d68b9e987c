//! Running a graph on host tensors, and reading its outputs back as float32.

use std::time::Instant;

use half::f16;
use ndarray::ArrayD;
use ort::session::{RunOptions, SessionInputValue, SessionOutputs};
use ort::value::{DynTensor, DynValue, Tensor};

use super::{not_loaded, rt_err, ElementType, Graph, IoSpec, TensorInput};
use crate::{Error, Result};

impl Graph {
    /// Runs the graph and returns the requested outputs as f32 arrays, in the order asked.
    pub fn run(
        &mut self,
        inputs: Vec<(&str, TensorInput)>,
        wanted: &[&str],
    ) -> Result<Vec<ArrayD<f32>>> {
        self.run_host(inputs, wanted, false)
    }

    /// [`Graph::run`], then hands the CPU arena's unused memory back (ONNX Runtime's
    /// `memory.enable_memory_arena_shrinkage`; nothing to do for a session without the arena):
    /// for runs of many shapes, such as the tiles of
    /// a tiled VAE decode, whose activations the arena would otherwise keep, each shape adding
    /// its own (2.6 GiB instead of 1.3 GiB for a 1024x1024 SD1.5 decode).
    pub fn run_releasing(
        &mut self,
        inputs: Vec<(&str, TensorInput)>,
        wanted: &[&str],
    ) -> Result<Vec<ArrayD<f32>>> {
        self.run_host(inputs, wanted, true)
    }

    fn run_host(
        &mut self,
        inputs: Vec<(&str, TensorInput)>,
        wanted: &[&str],
        shrink_arena: bool,
    ) -> Result<Vec<ArrayD<f32>>> {
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
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
        let feeds: Vec<(&str, SessionInputValue<'_>)> = values
            .iter()
            .map(|(n, v)| (n.as_str(), SessionInputValue::from(v)))
            .chain(
                self.swapped
                    .iter()
                    .map(|w| (w.name.as_str(), SessionInputValue::from(&*w.value))),
            )
            .collect();
        // Only an arena can shrink (ONNX Runtime refuses the option without one).
        let shrinking = if shrink_arena && self.cpu_arena {
            let mut options =
                RunOptions::new().map_err(|e| rt_err(&format!("run options of {name}"), e))?;
            options
                .set("memory.enable_memory_arena_shrinkage", "cpu:0")
                .map_err(|e| rt_err(&format!("run options of {name}"), e))?;
            Some(options)
        } else {
            None
        };
        let outputs = match &shrinking {
            Some(options) => session.run_with_options(feeds, options),
            None => session.run(feeds),
        };
        self.run_stats.calls += 1;
        self.run_stats.total += started.elapsed();
        let outputs = outputs.map_err(|e| rt_err(&format!("running {name}"), e))?;
        read_outputs(&self.name, &self.outputs, &outputs, wanted)
    }

    /// `data` as a host tensor of the element type `spec` declares.
    pub(in crate::runtime) fn host_tensor(
        &self,
        spec: &IoSpec,
        data: TensorInput,
    ) -> Result<DynTensor> {
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
pub(in crate::runtime) fn read_output(
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
