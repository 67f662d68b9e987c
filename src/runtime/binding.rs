//! IoBinding: inputs placed once where a session reads them, outputs read back on the host.
//!
//! A denoising loop runs the same UNet (and ControlNets) several times with inputs that mostly
//! do not change: the prompt embeddings, SDXL's pooled embeddings and time ids, the control
//! images, and the zero residuals a UNet export takes when no ControlNet acts. [`Graph::place`]
//! copies such a tensor once to the memory the session reads that input from (device memory
//! for CUDA, TensorRT or DirectML, as ONNX Runtime reports it per input) and
//! [`Graph::run_bound`] binds it there for every run without another copy. Inputs that change
//! every run go as [`Feed::Host`] and are copied once per run, as ordinary runs copy them;
//! outputs are bound to host memory, the one copy back the sampler needs.
//!
//! When an input is read from host memory (the CPU provider, CoreML), a placed tensor *is* the
//! host tensor: nothing is copied, and binding adds no copies to a plain run.

use std::sync::Arc;

use ndarray::ArrayD;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session, SharedSessionInner};
use ort::value::{DynTensor, DynTensorValueType, DynValue, ValueType};
use ort::AsPointer;

use super::session::{not_loaded, read_output, rt_err, ElementType, Graph, TensorInput};
use crate::{Error, Result};

/// Where a session reads one input from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Placement {
    /// Host memory: a host tensor is bound as it is.
    Host,
    /// Device memory of ONNX Runtime's allocation device `device` (`Cuda`, `DML` ...), ordinal
    /// `id`.
    Device { device: String, id: i32 },
}

/// Asks the session where it reads each input; inputs it cannot say anything about are read
/// from host memory (ONNX Runtime then copies them when they are bound, which is correct, only
/// not free).
pub(super) fn input_devices(session: &Session, count: usize) -> Vec<Placement> {
    query_input_devices(session, count).unwrap_or_else(|_| vec![Placement::Host; count])
}

fn query_input_devices(session: &Session, count: usize) -> Result<Vec<Placement>> {
    let api = ort::api();
    let mut infos: Vec<*const ort::sys::OrtMemoryInfo> = vec![std::ptr::null(); count];
    // SAFETY: the session is live and `infos` has room for one pointer per input; ONNX Runtime
    // fills it with memory infos owned by the session.
    unsafe {
        ort::Error::result_from_status((api.SessionGetMemoryInfoForInputs)(
            session.ptr(),
            infos.as_mut_ptr(),
            count,
        ))
    }
    .map_err(|e| rt_err("reading input placement", e))?;
    let mut placements = Vec::with_capacity(count);
    for info in infos {
        if info.is_null() {
            placements.push(Placement::Host);
            continue;
        }
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let mut id: std::ffi::c_int = 0;
        let mut mem_type = ort::sys::OrtMemType::OrtMemTypeDefault;
        // SAFETY: `info` is a live memory info owned by the session; the out-pointers are valid.
        unsafe {
            ort::Error::result_from_status((api.MemoryInfoGetName)(info, &mut name))
                .and_then(|()| ort::Error::result_from_status((api.MemoryInfoGetId)(info, &mut id)))
                .and_then(|()| {
                    ort::Error::result_from_status((api.MemoryInfoGetMemType)(info, &mut mem_type))
                })
        }
        .map_err(|e| rt_err("reading input placement", e))?;
        if name.is_null() {
            placements.push(Placement::Host);
            continue;
        }
        // SAFETY: ONNX Runtime returns a NUL-terminated string owned by the memory info.
        let device = unsafe { std::ffi::CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        let host = matches!(
            mem_type,
            ort::sys::OrtMemType::OrtMemTypeCPUInput | ort::sys::OrtMemType::OrtMemTypeCPUOutput
        ) || device_info(&device, id).is_none_or(|m| m.is_cpu_accessible());
        placements.push(if host {
            Placement::Host
        } else {
            Placement::Device { device, id }
        });
    }
    Ok(placements)
}

fn device_info(device: &str, id: i32) -> Option<MemoryInfo<'static>> {
    MemoryInfo::new(
        AllocationDevice::new(device),
        id,
        AllocatorType::Device,
        MemoryType::Default,
    )
    .ok()
}

fn host_info() -> Result<MemoryInfo<'static>> {
    MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Device,
        MemoryType::Default,
    )
    .map_err(|e| rt_err("describing host memory", e))
}

/// A tensor placed where one graph reads one of its inputs ([`Graph::place`]): uploaded once,
/// bound by [`Graph::run_bound`] as often as needed without another copy.
pub struct PlacedTensor {
    value: DynTensor,
    input: String,
    dtype: ElementType,
    shape: Vec<usize>,
    on_device: bool,
    // Device memory comes from the session's allocator, which must outlive it.
    _session: Arc<SharedSessionInner>,
}

impl std::fmt::Debug for PlacedTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacedTensor")
            .field("input", &self.input)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("on_device", &self.on_device)
            .finish()
    }
}

impl PlacedTensor {
    /// The input it was placed for.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Its shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Whether it lives in device memory (false: it is the host tensor itself).
    pub fn on_device(&self) -> bool {
        self.on_device
    }
}

/// Where one graph input reads from: the memory [`Graph::run_bound_placed`] leaves another
/// graph's output in, so that it is bound there without a copy.
#[derive(Debug, Clone)]
pub struct Destination {
    input: String,
    dtype: ElementType,
    placement: Placement,
}

impl Destination {
    /// The input.
    pub fn input(&self) -> &str {
        &self.input
    }
}

/// One input of [`Graph::run_bound`].
#[derive(Debug)]
pub enum Feed<'a> {
    /// Host data, converted to the input's element type and copied for this run only.
    Host(TensorInput),
    /// A tensor already placed by [`Graph::place`].
    Placed(&'a PlacedTensor),
}

impl Graph {
    /// Converts `data` to the element type of input `name` and copies it to the memory the
    /// session reads that input from, once; on host memory the converted tensor is used as it
    /// is.
    pub fn place(&self, name: &str, data: TensorInput) -> Result<PlacedTensor> {
        let index = self.input_index(name)?;
        let target = match self.placements.get(index) {
            Some(Placement::Device { device, id }) => device_info(device, *id),
            _ => None,
        };
        self.place_in(index, data, target)
    }

    /// [`Graph::place`] through the session's allocator and ONNX Runtime's copy even when the
    /// input is read from host memory: the path device inputs take, for tests on machines
    /// without an accelerator.
    #[doc(hidden)]
    pub fn place_copied(&self, name: &str, data: TensorInput) -> Result<PlacedTensor> {
        let index = self.input_index(name)?;
        let target = match self.placements.get(index) {
            Some(Placement::Device { device, id }) => device_info(device, *id),
            _ => None,
        };
        self.place_in(index, data, Some(target.map_or_else(host_info, Ok)?))
    }

    fn input_index(&self, name: &str) -> Result<usize> {
        self.inputs
            .iter()
            .position(|i| i.name == name)
            .ok_or_else(|| {
                Error::model(
                    &self.path,
                    format!("the {} graph has no input '{name}'", self.name),
                )
            })
    }

    fn place_in(
        &self,
        index: usize,
        data: TensorInput,
        target: Option<MemoryInfo<'static>>,
    ) -> Result<PlacedTensor> {
        let spec = &self.inputs[index];
        let shape: Vec<usize> = match &data {
            TensorInput::F32(a) => a.shape().to_vec(),
            TensorInput::I64(a) => a.shape().to_vec(),
        };
        let host = self.host_tensor(spec, data)?;
        let context = format!("placing {} input '{}'", self.name, spec.name);
        let (value, on_device) = match target {
            None => (host, false),
            Some(info) => {
                let on_device = !info.is_cpu_accessible();
                let allocator =
                    Allocator::new(self.session()?, info).map_err(|e| rt_err(&context, e))?;
                let mut placed =
                    DynTensor::new(&allocator, *host.data_type(), host.shape().clone())
                        .map_err(|e| rt_err(&context, e))?;
                host.copy_into(&mut placed)
                    .map_err(|e| rt_err(&context, e))?;
                (placed, on_device)
            }
        };
        Ok(PlacedTensor {
            value,
            input: spec.name.clone(),
            dtype: spec.dtype,
            shape,
            on_device,
            _session: self.session()?.inner(),
        })
    }

    /// Runs the graph through an IoBinding: placed inputs are bound where they are, host inputs
    /// are copied for this run, and the outputs in `wanted` are bound to host memory and
    /// returned as f32 arrays, in the order asked.
    pub fn run_bound(
        &mut self,
        inputs: Vec<(&str, Feed<'_>)>,
        wanted: &[&str],
    ) -> Result<Vec<ArrayD<f32>>> {
        let targets: Vec<(&str, Option<&Destination>)> =
            wanted.iter().map(|w| (*w, None)).collect();
        let values = self.run_binding(inputs, &targets)?;
        wanted
            .iter()
            .zip(&values)
            .map(|(w, value)| read_output(&self.name, &self.outputs, w, value))
            .collect()
    }

    /// [`Graph::run_bound`] with every output left where its next reader reads it: output
    /// `name` is bound to the memory of `destination` and comes back as a tensor placed there,
    /// ready for [`Feed::Placed`] (on accelerators nothing is copied to the host).
    pub fn run_bound_placed(
        &mut self,
        inputs: Vec<(&str, Feed<'_>)>,
        outputs: &[(&str, &Destination)],
    ) -> Result<Vec<PlacedTensor>> {
        let targets: Vec<(&str, Option<&Destination>)> =
            outputs.iter().map(|(w, d)| (*w, Some(*d))).collect();
        let values = self.run_binding(inputs, &targets)?;
        let session = self.session()?.inner();
        outputs
            .iter()
            .zip(values)
            .map(|((w, destination), value)| {
                let context = format!("{} output '{w}'", self.name);
                let value = value
                    .downcast::<DynTensorValueType>()
                    .map_err(|e| rt_err(&context, e))?;
                let dtype = match value.dtype() {
                    ValueType::Tensor { ty, .. } => ElementType::from_ort(*ty),
                    _ => ElementType::Other,
                };
                if dtype != destination.dtype {
                    return Err(Error::Runtime(format!(
                        "{context} is {dtype:?} and input '{}' takes {:?}",
                        destination.input, destination.dtype
                    )));
                }
                let shape = value.shape().iter().map(|&d| d as usize).collect();
                Ok(PlacedTensor {
                    on_device: !value.memory_info().is_cpu_accessible(),
                    value,
                    input: destination.input.clone(),
                    dtype,
                    shape,
                    _session: session.clone(),
                })
            })
            .collect()
    }

    /// Binds, runs and returns the outputs in the order of `outputs`, each bound to host memory
    /// or to its destination's.
    fn run_binding(
        &mut self,
        inputs: Vec<(&str, Feed<'_>)>,
        outputs: &[(&str, Option<&Destination>)],
    ) -> Result<Vec<DynValue>> {
        let wanted: Vec<&str> = outputs.iter().map(|(w, _)| *w).collect();
        self.check_outputs(&wanted)?;
        self.ensure_loaded()?;
        let mut binding = match self.binding.take() {
            Some(b) => b,
            None => self
                .session()?
                .create_binding()
                .map_err(|e| rt_err(&format!("binding {}", self.name), e))?,
        };
        let result = self.run_with(&mut binding, inputs, outputs);
        // Releases this run's host copies and outputs; placed tensors stay with their owners,
        // and returned outputs hold their own references.
        binding.clear();
        self.binding = Some(binding);
        result
    }

    fn run_with(
        &mut self,
        binding: &mut IoBinding,
        inputs: Vec<(&str, Feed<'_>)>,
        outputs: &[(&str, Option<&Destination>)],
    ) -> Result<Vec<DynValue>> {
        binding.clear();
        let context = format!("binding {}", self.name);
        for (name, feed) in inputs {
            let spec = self.spec(name)?;
            match feed {
                Feed::Host(data) => {
                    let value = self.host_tensor(spec, data)?;
                    binding.bind_input(name, &value)
                }
                Feed::Placed(placed) => {
                    if placed.dtype != spec.dtype {
                        return Err(Error::Runtime(format!(
                            "{context}: '{name}' was placed as {:?} for input '{}' and the \
                             graph takes {:?}",
                            placed.dtype, placed.input, spec.dtype
                        )));
                    }
                    binding.bind_input(name, &placed.value)
                }
            }
            .map_err(|e| rt_err(&format!("{context} input '{name}'"), e))?;
        }
        for w in self.swapped() {
            binding
                .bind_input(&w.name, &*w.value)
                .map_err(|e| rt_err(&format!("{context} weight '{}'", w.name), e))?;
        }
        let host = host_info()?;
        for (w, destination) in outputs {
            let memory = match destination.map(|d| &d.placement) {
                Some(Placement::Device { device, id }) => device_info(device, *id),
                _ => None,
            };
            binding
                .bind_output_to_device(*w, memory.as_ref().unwrap_or(&host))
                .map_err(|e| rt_err(&format!("{context} output '{w}'"), e))?;
        }
        // Host inputs bound to device memory are copied when bound; make sure those copies are
        // done before the run reads them.
        binding
            .synchronize_inputs()
            .map_err(|e| rt_err(&context, e))?;
        let name = self.name.clone();
        let started = std::time::Instant::now();
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| not_loaded(&self.name))?;
        let result = session.run_binding(binding);
        self.run_stats.calls += 1;
        self.run_stats.total += started.elapsed();
        let mut result = result.map_err(|e| rt_err(&format!("running {name}"), e))?;
        binding
            .synchronize_outputs()
            .map_err(|e| rt_err(&context, e))?;
        outputs
            .iter()
            .map(|(w, _)| {
                result
                    .remove(*w)
                    .ok_or_else(|| Error::Runtime(format!("{name} produced no output '{w}'")))
            })
            .collect()
    }

    /// Where input `input` of this graph reads from, for [`Graph::run_bound_placed`] to leave
    /// another graph's output there.
    pub fn destination(&self, input: &str) -> Result<Destination> {
        let index = self.input_index(input)?;
        Ok(Destination {
            input: input.to_string(),
            dtype: self.inputs[index].dtype,
            placement: self
                .placements
                .get(index)
                .cloned()
                .unwrap_or(Placement::Host),
        })
    }

    /// Whether some input of this graph is read from device memory (so placing inputs saves
    /// copies); false on the CPU.
    pub fn reads_device_inputs(&self) -> bool {
        self.placements
            .iter()
            .any(|p| matches!(p, Placement::Device { .. }))
    }
}
