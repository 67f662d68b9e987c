//! Execution providers: one enum, explicit failure.
//!
//! ONNX Runtime silently falls back to the CPU when a provider cannot be registered. tcd-ort
//! never does: a provider the loaded build lacks is an error naming the package to install, and
//! registration failures are errors too (`error_on_failure`). A fallback happens only when the
//! user lists several providers (`--ep tensorrt,cuda,cpu`).

use std::fmt;
use std::str::FromStr;

use ort::ep::{self, ExecutionProvider as _};

use super::options::{
    ArenaExtendStrategy, CoreMlComputeUnits, CudaOptions, CudnnConvSearch, ProviderOptions,
};
use super::tensorrt::ProfileShapes;
use crate::{Error, Result};

/// A hardware back end for ONNX Runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// ONNX Runtime's own CPU kernels; always available.
    Cpu,
    /// NVIDIA CUDA (`onnxruntime-gpu`).
    Cuda,
    /// NVIDIA TensorRT (`onnxruntime-gpu` plus the TensorRT libraries).
    #[serde(rename = "tensorrt")]
    TensorRt,
    /// DirectML on Windows (`onnxruntime-directml`).
    #[serde(rename = "directml")]
    DirectMl,
    /// Apple CoreML (the macOS `onnxruntime` build).
    #[serde(rename = "coreml")]
    CoreMl,
}

impl ExecutionProvider {
    /// Every provider, in the order the CLI lists them.
    pub const ALL: [ExecutionProvider; 5] = [
        ExecutionProvider::Cpu,
        ExecutionProvider::Cuda,
        ExecutionProvider::TensorRt,
        ExecutionProvider::DirectMl,
        ExecutionProvider::CoreMl,
    ];

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
            ExecutionProvider::TensorRt => "tensorrt",
            ExecutionProvider::DirectMl => "directml",
            ExecutionProvider::CoreMl => "coreml",
        }
    }

    /// The ONNX Runtime package whose build includes this provider.
    pub fn package_hint(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "onnxruntime",
            ExecutionProvider::Cuda => {
                "onnxruntime-gpu (with CUDA 13 and cuDNN 9 on the library path)"
            }
            ExecutionProvider::TensorRt => {
                "onnxruntime-gpu (with CUDA 13, cuDNN 9 and TensorRT 10 on the library path)"
            }
            ExecutionProvider::DirectMl => "onnxruntime-directml (Windows only)",
            ExecutionProvider::CoreMl => "the macOS onnxruntime build",
        }
    }

    /// Whether the loaded ONNX Runtime build was compiled with this provider.
    ///
    /// ONNX Runtime must be loaded first ([`super::ensure_loaded`]).
    pub fn is_compiled_in(self) -> Result<bool> {
        let available = match self {
            ExecutionProvider::Cpu => return Ok(true),
            ExecutionProvider::Cuda => ep::CUDA::is_available(),
            ExecutionProvider::TensorRt => ep::TensorRT::is_available(),
            ExecutionProvider::DirectMl => ep::DirectML::is_available(),
            ExecutionProvider::CoreMl => ep::CoreML::is_available(),
        };
        available.map_err(|e| Error::Runtime(format!("could not query providers: {e}")))
    }

    /// ONNX Runtime's name for the provider, as graph assignment reports it.
    pub fn ort_name(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "CPUExecutionProvider",
            ExecutionProvider::Cuda => "CUDAExecutionProvider",
            ExecutionProvider::TensorRt => "TensorrtExecutionProvider",
            ExecutionProvider::DirectMl => "DmlExecutionProvider",
            ExecutionProvider::CoreMl => "CoreMLExecutionProvider",
        }
    }

    /// Whether the provider compiles subgraphs into nodes ONNX Runtime cannot save as an
    /// optimised model (so the session cache must not be used with it).
    pub fn compiles_subgraphs(self) -> bool {
        matches!(
            self,
            ExecutionProvider::TensorRt | ExecutionProvider::DirectMl | ExecutionProvider::CoreMl
        )
    }

    /// The provider configured for registration, failing loudly rather than falling back.
    ///
    /// `trt_shapes` is the graph's TensorRT optimisation profile, when it has dynamic inputs.
    pub(crate) fn dispatch(
        self,
        options: &ProviderOptions,
        trt_shapes: Option<&ProfileShapes>,
    ) -> Result<ep::ExecutionProviderDispatch> {
        let device_id = options.device_id;
        Ok(match self {
            ExecutionProvider::Cpu => ep::CPU::default()
                .with_arena_allocator(options.cpu_arena.unwrap_or(false))
                .build(),
            ExecutionProvider::Cuda => cuda(&options.cuda, device_id).build().error_on_failure(),
            ExecutionProvider::TensorRt => {
                let trt = &options.tensorrt;
                let dir = trt.resolved_cache_dir()?;
                let engines = dir.join("engines");
                let timing = dir.join("timing");
                for d in [&engines, &timing] {
                    std::fs::create_dir_all(d).map_err(|e| {
                        Error::Runtime(format!(
                            "cannot create the TensorRT cache directory {} ({e}); pick another \
                             with --trt-cache-dir",
                            d.display()
                        ))
                    })?;
                }
                let mut builder = ep::TensorRT::default()
                    .with_device_id(device_id)
                    .with_fp16(trt.fp16)
                    .with_engine_cache(true)
                    .with_engine_cache_path(engines.display())
                    .with_timing_cache(true)
                    .with_timing_cache_path(timing.display());
                if let Some(shapes) = trt_shapes {
                    builder = builder
                        .with_profile_min_shapes(&shapes.min)
                        .with_profile_opt_shapes(&shapes.opt)
                        .with_profile_max_shapes(&shapes.max);
                }
                builder.build().error_on_failure()
            }
            ExecutionProvider::DirectMl => ep::DirectML::default()
                .with_device_id(device_id)
                .build()
                .error_on_failure(),
            ExecutionProvider::CoreMl => {
                let units = match options.coreml.compute_units {
                    CoreMlComputeUnits::All => ep::coreml::ComputeUnits::All,
                    CoreMlComputeUnits::CpuAndNeuralEngine => {
                        ep::coreml::ComputeUnits::CPUAndNeuralEngine
                    }
                    CoreMlComputeUnits::CpuAndGpu => ep::coreml::ComputeUnits::CPUAndGPU,
                    CoreMlComputeUnits::CpuOnly => ep::coreml::ComputeUnits::CPUOnly,
                };
                ep::CoreML::default()
                    .with_model_format(ep::coreml::ModelFormat::MLProgram)
                    .with_compute_units(units)
                    .build()
                    .error_on_failure()
            }
        })
    }
}

fn cuda(options: &CudaOptions, device_id: i32) -> ep::CUDA {
    let mut cuda = ep::CUDA::default()
        .with_device_id(device_id)
        .with_conv_algorithm_search(match options.cudnn_conv_search {
            CudnnConvSearch::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
            CudnnConvSearch::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
            CudnnConvSearch::Default => ep::cuda::ConvAlgorithmSearch::Default,
        })
        .with_arena_extend_strategy(match options.arena_extend {
            ArenaExtendStrategy::NextPowerOfTwo => ep::ArenaExtendStrategy::NextPowerOfTwo,
            ArenaExtendStrategy::SameAsRequested => ep::ArenaExtendStrategy::SameAsRequested,
        });
    if let Some(limit) = options.gpu_mem_limit {
        cuda = cuda.with_memory_limit(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    cuda
}

impl fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExecutionProvider {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase();
        ExecutionProvider::ALL
            .into_iter()
            .find(|ep| ep.as_str() == wanted)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown execution provider '{s}'; expected one of: cpu, cuda, tensorrt, directml, coreml"
                ))
            })
    }
}

/// Parses `tensorrt,cuda,cpu` into an ordered, duplicate-free list.
pub fn parse_provider_list(s: &str) -> Result<Vec<ExecutionProvider>> {
    let mut list = Vec::new();
    for part in s.split(',') {
        if part.trim().is_empty() {
            return Err(Error::invalid(format!(
                "empty entry in execution provider list '{s}'"
            )));
        }
        let ep: ExecutionProvider = part.parse()?;
        if list.contains(&ep) {
            return Err(Error::invalid(format!(
                "execution provider '{ep}' is listed twice in '{s}'"
            )));
        }
        list.push(ep);
    }
    Ok(list)
}

/// Picks the providers to register from the user's ordered list.
///
/// Providers the loaded build lacks are dropped only when a later entry remains (the user asked
/// for a fallback); a single provider that is missing is an error naming the package to install.
/// Returns the providers and, for each one dropped, a sentence saying so (for the caller to
/// pass on: the library writes nothing to stderr).
pub fn select_providers(
    wanted: &[ExecutionProvider],
) -> Result<(Vec<ExecutionProvider>, Vec<String>)> {
    let chosen = select_with(wanted, |ep| ep.is_compiled_in())?;
    let dropped = wanted
        .iter()
        .filter(|ep| !chosen.contains(ep))
        .map(|ep| {
            format!(
                "execution provider '{ep}' is not in the loaded ONNX Runtime build (it needs {}); \
                 falling back as requested",
                ep.package_hint()
            )
        })
        .collect();
    Ok((chosen, dropped))
}

fn select_with(
    wanted: &[ExecutionProvider],
    compiled_in: impl Fn(ExecutionProvider) -> Result<bool>,
) -> Result<Vec<ExecutionProvider>> {
    let wanted = if wanted.is_empty() {
        &[ExecutionProvider::Cpu][..]
    } else {
        wanted
    };
    let mut chosen = Vec::new();
    let mut missing = Vec::new();
    for &ep in wanted {
        if compiled_in(ep)? {
            chosen.push(ep);
        } else {
            missing.push(ep);
        }
    }
    if chosen.is_empty() {
        let names: Vec<String> = missing
            .iter()
            .map(|ep| format!("'{ep}' needs {}", ep.package_hint()))
            .collect();
        return Err(Error::Runtime(format!(
            "the loaded ONNX Runtime build has no requested execution provider: {}; install that \
             package and point --ort-lib at its libonnxruntime, or choose --ep cpu",
            names.join(", ")
        )));
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_case_insensitively() {
        assert_eq!(
            "TensorRT".parse::<ExecutionProvider>().ok(),
            Some(ExecutionProvider::TensorRt)
        );
        assert_eq!(
            parse_provider_list("tensorrt,cuda,cpu").ok(),
            Some(vec![
                ExecutionProvider::TensorRt,
                ExecutionProvider::Cuda,
                ExecutionProvider::Cpu
            ])
        );
    }

    #[test]
    fn rejects_unknown_and_duplicate_providers() {
        let err = "vulkan".parse::<ExecutionProvider>().expect_err("unknown");
        assert!(err.to_string().contains("expected one of"), "{err}");
        assert!(parse_provider_list("cuda,cuda").is_err());
        assert!(parse_provider_list("cuda,").is_err());
    }

    #[test]
    fn a_single_missing_provider_is_an_error_naming_the_package() {
        let err = select_with(&[ExecutionProvider::Cuda], |ep| {
            Ok(ep == ExecutionProvider::Cpu)
        })
        .expect_err("cuda is missing");
        let msg = err.to_string();
        assert!(msg.contains("onnxruntime-gpu"), "{msg}");
    }

    #[test]
    fn a_fallback_list_drops_missing_providers() {
        let chosen = select_with(
            &[ExecutionProvider::TensorRt, ExecutionProvider::Cpu],
            |ep| Ok(ep == ExecutionProvider::Cpu),
        )
        .expect("cpu remains");
        assert_eq!(chosen, vec![ExecutionProvider::Cpu]);
    }
}
