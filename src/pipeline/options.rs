//! How an engine is loaded ([`EngineOptions`], with a preset for one-generation processes) and
//! what loading reports about each graph ([`SessionReport`]).

use std::path::PathBuf;

use super::{Limits, LoraSpec};
use crate::runtime::{
    CacheStatus, ExecutionProvider, OptLevel, ProviderAssignment, ProviderOptions, SessionCache,
    ShapeDims,
};
use crate::{Error, Result};

/// How an engine is loaded.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The ONNX Runtime library; `None` searches as [`runtime::find_library`] describes.
    pub ort_lib: Option<PathBuf>,
    /// Execution providers in priority order; several means "fall back in this order".
    pub providers: Vec<ExecutionProvider>,
    /// GPU ordinal.
    pub device_id: i32,
    /// Threads per operator; `None` uses every core. At most [`MAX_THREADS`].
    pub intra_threads: Option<usize>,
    /// Hub revision when the model is a hub id.
    pub revision: Option<String>,
    /// LoRAs applied at load time, summed with their weights (diffusers' `set_adapters`).
    pub loras: Vec<LoraSpec>,
    /// The file to read from LoRA repositories or directories (default
    /// `pytorch_lora_weights.safetensors`).
    pub lora_weight_name: Option<String>,
    /// Skip LoRA targets that match no weight instead of failing.
    pub lora_allow_unmatched: bool,
    /// ControlNets (directories or hub ids of `python -m export controlnet` exports), in the
    /// order [`super::GenerateRequest::control`] gives their images.
    pub controlnets: Vec<String>,
    /// The depth estimator (a directory or hub id of a `python -m export depth` export) for
    /// [`super::ControlPreprocess::Depth`].
    pub depth_estimator: Option<String>,
    /// An IP-Adapter (a directory or hub id of a `python -m export ip-adapter` export) for
    /// [`super::GenerateRequest::ip_adapter`]; it must fit the model's base (SD1.5 adapters on
    /// SD1.5 models, SDXL ones on SDXL).
    pub ip_adapter: Option<String>,
    /// A tiny autoencoder (a directory or hub id of a `python -m export vae-tiny` export of
    /// diffusers' `AutoencoderTiny`: TAESD for SD1.x/2.x, TAESDXL for SDXL) loaded in place of
    /// the model's VAE, for decoding and, for image-to-image and inpainting, encoding: several
    /// times faster and smaller, slightly less detailed (`pipe.vae = AutoencoderTiny(...)`).
    pub tiny_vae: Option<String>,
    /// Provider settings (CUDA, TensorRT, CoreML). Their `device_id` is ignored in favour of
    /// [`EngineOptions::device_id`]; a TensorRT profile left unset uses the model's native size;
    /// a CPU arena left unset ([`ProviderOptions::cpu_arena`] `None`) is chosen by the engine
    /// for the model ([`EngineOptions::one_shot`]).
    pub provider_options: ProviderOptions,
    /// Graph optimisation level.
    pub opt_level: OptLevel,
    /// The optimised-model cache (off by default).
    pub session_cache: SessionCache,
    /// The session cache's size limit in bytes: after each store the least recently used
    /// entries are deleted until the cache fits, and a graph larger than the limit is not
    /// stored. `None`: [`crate::runtime::cache::DEFAULT_LIMIT`] (20 GiB).
    pub session_cache_limit: Option<u64>,
    /// Run the UNet and the ControlNets through IoBindings (default on): the conditioning,
    /// control images and zero ControlNet residuals are placed once where the session reads
    /// them (device memory on a GPU) instead of being copied from the host at every step.
    /// Results are the same either way; off is for A/B measurement.
    pub io_binding: bool,
    /// Build the UNet and ControlNet sessions for exactly this output size and UNet batch
    /// (images per prompt, doubled by classifier-free guidance): ONNX Runtime then folds the
    /// graphs' shape arithmetic, which on CUDA otherwise runs on the CPU inside every step.
    /// Requests of another size or batch are refused. `None` (the default) keeps them dynamic.
    pub fixed_shape: Option<ShapeDims>,
    /// Hold one component at a time: the text encoders, the VAE encoder, the UNet with its
    /// ControlNets and the VAE decoder are each loaded for their stage of a generation and
    /// released before the next stage loads (from the session cache when it is on). Peak memory
    /// is then the largest component's instead of all of them together; every generation
    /// pays the loads. Load-time LoRA weights stay in memory for the reloads (one copy, shared
    /// with the session while it is loaded). With the session cache on, a UNet exported in
    /// segments (the manifest's `segments`, `export/segments.py`) goes further: each step
    /// loads one segment from the cache, runs it and releases it before the next, so the
    /// stage holds the largest segment's weights; without the cache (or with weight overrides
    /// or fixed shapes, which bypass it) the UNet loads whole and [`Engine::notes`] says why.
    /// Each segment's session lives for one run of it, so
    /// [`ProviderOptions::cpu_arena`] costs no memory there and speeds the steps. Off by
    /// default.
    pub low_memory: bool,
    /// Release each component once a generation is past its stage: the text encoders when
    /// the prompt is encoded, the VAE encoder when the image is, the UNet with its ControlNets
    /// before the VAE decodes. Everything still loads (in parallel) up front, so a bad model
    /// fails at load; a later generation loads what it needs again. For hosts that generate
    /// once per process, like the command line's `run` (on there by default): the peak is the
    /// loaded weights at start-up rather than all weights plus the VAE decoder's activations.
    /// Off by default; implied by [`EngineOptions::low_memory`].
    pub release_after_use: bool,
    /// How much one request may ask for (output size, images per request).
    pub limits: Limits,
}

/// The most threads per operator an engine accepts: past the cores a machine has, ONNX
/// Runtime's threads only wait on each other, and each one costs a stack.
pub const MAX_THREADS: usize = 256;

/// How one loaded graph runs: the providers ONNX Runtime assigned its nodes to and what the
/// session cache did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionReport {
    /// The component (`unet`, `text_encoder`, ...).
    pub component: String,
    /// Providers and their node counts, most nodes first.
    pub assignment: Vec<ProviderAssignment>,
    /// The session cache's outcome.
    pub cache: CacheStatus,
    /// Whether the denoising loop runs this graph through an IoBinding
    /// ([`EngineOptions::io_binding`]).
    pub io_binding: bool,
    /// Whether the session reads some input from device memory, where placed inputs save
    /// host-to-device copies (false on the CPU, where binding adds and saves no copies).
    pub device_inputs: bool,
    /// How many segments the graph runs in, each loaded for its part of every run (low-memory
    /// mode); 0 for a graph loaded whole.
    pub segments: usize,
}

impl EngineOptions {
    /// Checks the options that need no model: what [`super::Engine::from_model`] checks first,
    /// and what a front end can check before it reads anything.
    pub fn validate(&self) -> Result<()> {
        if let Some(n) = self.intra_threads.filter(|&n| n > MAX_THREADS) {
            return Err(Error::invalid(format!(
                "threads must be at most {MAX_THREADS}, got {n} (more threads than cores only \
                 slow ONNX Runtime down; leave it unset to use every core)"
            )));
        }
        if self.fixed_shape.is_some() && self.ip_adapter.is_some() {
            return Err(Error::invalid(
                "an IP-Adapter needs the UNet's shapes dynamic (its image tokens are UNet \
                 inputs): load it without a fixed shape",
            ));
        }
        if let Some(lora) = self.loras.iter().find(|l| !l.weight.is_finite()) {
            return Err(Error::invalid(format!(
                "LoRA {}: weight must be a finite number, got {}",
                lora.source, lora.weight
            )));
        }
        let l = &self.limits;
        let ceiling = &Limits::LARGE;
        if l.max_side > ceiling.max_side
            || l.max_pixels > ceiling.max_pixels
            || l.max_images > ceiling.max_images
        {
            return Err(Error::invalid(format!(
                "limits past the ceiling: at most {} per side, {} pixels and {} images per \
                 request (Limits::LARGE), got {}, {} and {}",
                ceiling.max_side,
                ceiling.max_pixels,
                ceiling.max_images,
                l.max_side,
                l.max_pixels,
                l.max_images
            )));
        }
        Ok(())
    }

    /// The preset for a process that loads a model, generates once and exits (the command
    /// line's `run`): each component is released once a generation is past its stage, and the
    /// engine turns ONNX Runtime's CPU arena on where that costs no lasting memory (see
    /// [`super::Engine::from_model`]). Long-lived hosts keep [`EngineOptions::default`], which
    /// keeps everything loaded with the arena off.
    pub fn one_shot() -> Self {
        let defaults = EngineOptions::default();
        EngineOptions {
            release_after_use: true,
            provider_options: ProviderOptions {
                cpu_arena: None,
                ..defaults.provider_options.clone()
            },
            ..defaults
        }
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            ort_lib: None,
            providers: vec![ExecutionProvider::Cpu],
            device_id: 0,
            intra_threads: None,
            revision: None,
            loras: Vec::new(),
            lora_weight_name: None,
            lora_allow_unmatched: false,
            controlnets: Vec::new(),
            depth_estimator: None,
            ip_adapter: None,
            tiny_vae: None,
            provider_options: ProviderOptions::default(),
            opt_level: OptLevel::default(),
            session_cache: SessionCache::default(),
            session_cache_limit: None,
            io_binding: true,
            fixed_shape: None,
            low_memory: false,
            release_after_use: false,
            limits: Limits::DEFAULT,
        }
    }
}
