//! The flags that load an engine, shared by `tcd-ort run` and `tcd-ort serve`: the model,
//! providers, threads, load-time LoRAs, limits and the session flags ([`SessionArgs`]).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use tcd_ort::lora::parse_lora_arg;
use tcd_ort::pipeline::{EngineOptions, Limits, LoraSpec};
use tcd_ort::runtime::ExecutionProvider;

use super::session_args::SessionArgs;

/// Model and engine flags.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Model directory (tcd-ort or optimum ONNX export) or Hugging Face hub id.
    #[arg(long)]
    pub model: String,
    /// Execution provider(s): cpu, cuda, tensorrt, directml, coreml; a comma-separated list
    /// (tensorrt,cuda,cpu) falls back in that order.
    #[arg(long, default_value = "cpu")]
    pub ep: String,
    /// GPU ordinal for cuda, tensorrt and directml.
    #[arg(long, default_value_t = 0)]
    device_id: i32,
    /// Threads per operator (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// The ONNX Runtime library (file or directory); default: ORT_DYLIB_PATH, .ort/lib, Python's onnxruntime.
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// A LoRA to apply at load time: a .safetensors file, a directory or a hub id, with an
    /// optional weight (`h1t/TCD-SD15-LoRA:1.0`). Repeat for several (summed, like diffusers'
    /// set_adapters).
    #[arg(long = "lora", value_name = "PATH_OR_ID[:WEIGHT]")]
    loras: Vec<String>,
    /// The file to read from LoRA directories and repositories
    /// (default pytorch_lora_weights.safetensors).
    #[arg(long)]
    lora_weight_name: Option<String>,
    /// Skip LoRA entries that match no weight of the model instead of failing.
    #[arg(long)]
    lora_allow_unmatched: bool,
    /// Hub revision (branch, tag or commit) when --model is a hub id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Lift the size limits (2048 per side, 2048x2048 pixels, 16 images per run) to 16384 per
    /// side, 8192x8192 pixels and 256 images, for machines with the memory for it.
    #[arg(long)]
    allow_large: bool,
    /// A tiny autoencoder (a `python -m export vae-tiny` export of TAESD for SD1.x/2.x or
    /// TAESDXL for SDXL, a directory or hub id) decoding and encoding in place of the model's
    /// VAE: faster, slightly less detailed.
    #[arg(long, value_name = "DIR_OR_ID")]
    tiny_vae: Option<String>,
    #[command(flatten)]
    pub session: SessionArgs,
}

impl EngineArgs {
    /// The engine options of these flags on `preset` (the library's choice for the process:
    /// [`EngineOptions::one_shot`] for `run`, the defaults for `serve`).
    pub fn options(
        &self,
        providers: &[ExecutionProvider],
        preset: EngineOptions,
    ) -> Result<EngineOptions> {
        let loras = self
            .loras
            .iter()
            .map(|s| {
                let (source, weight) = parse_lora_arg(s)?;
                Ok(LoraSpec {
                    source,
                    weight,
                    weight_name: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(EngineOptions {
            ort_lib: self.ort_lib.clone(),
            providers: providers.to_vec(),
            device_id: self.device_id,
            intra_threads: self.threads,
            revision: self.revision.clone(),
            loras,
            lora_weight_name: self.lora_weight_name.clone(),
            lora_allow_unmatched: self.lora_allow_unmatched,
            tiny_vae: self.tiny_vae.clone(),
            limits: if self.allow_large {
                Limits::LARGE
            } else {
                Limits::DEFAULT
            },
            ..preset
        })
    }

    /// The model's name in generation parameters: the last part of its path or hub id.
    pub fn model_name(&self) -> String {
        Path::new(&self.model)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.model.clone())
    }
}
