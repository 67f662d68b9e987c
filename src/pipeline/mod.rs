//! Pipelines: an [`Engine`] loads a model directory once (one ONNX Runtime session per
//! component) and then generates from [`GenerateRequest`]s. The CLI, the C ABI and the server
//! only translate to this API.
//!
//! ```no_run
//! use tcd_ort::pipeline::{Engine, EngineOptions, GenerateRequest};
//!
//! # fn main() -> tcd_ort::Result<()> {
//! let mut engine = Engine::load("models/tiny-sd15", &EngineOptions::default())?;
//! let request = GenerateRequest {
//!     prompt: "a photo of a cat".into(),
//!     steps: 4,
//!     eta: 0.3,
//!     seed: 0,
//!     ..GenerateRequest::default()
//! };
//! let out = engine.generate(&request, &mut |_| true)?;
//! println!("{} image(s) of {}x{}", out.images.len(), out.images[0].width, out.images[0].height);
//! # Ok(())
//! # }
//! ```

pub mod conditioning;
mod controlnet;
mod img2img;
mod inpaint;
mod lora;
mod resident;
mod txt2img;

pub use controlnet::{ControlImage, ControlNet, ControlPreprocess};
pub use lora::{apply_loras, LoraReport, LoraSpec};

use std::path::{Path, PathBuf};

use crate::image_io::RgbImage;
use crate::model::{hub, ModelDir};
use crate::runtime::{
    self, CacheStatus, ExecutionProvider, FixedShape, Graph, OptLevel, ProviderAssignment,
    ProviderOptions, RunStats, SessionCache, SessionOptions, ShapeDims, TrtProfile,
};
use crate::sampler::tcd::TcdConfig;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

use conditioning::TextEncoder;

/// How an engine is loaded.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The ONNX Runtime library; `None` searches as [`runtime::find_library`] describes.
    pub ort_lib: Option<PathBuf>,
    /// Execution providers in priority order; several means "fall back in this order".
    pub providers: Vec<ExecutionProvider>,
    /// GPU ordinal.
    pub device_id: i32,
    /// Threads per operator; `None` uses every core.
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
    /// order [`GenerateRequest::control`] gives their images.
    pub controlnets: Vec<String>,
    /// The depth estimator (a directory or hub id of a `python -m export depth` export) for
    /// [`ControlPreprocess::Depth`].
    pub depth_estimator: Option<String>,
    /// Provider settings (CUDA, TensorRT, CoreML). Their `device_id` is ignored in favour of
    /// [`EngineOptions::device_id`]; a TensorRT profile left unset uses the model's native size.
    pub provider_options: ProviderOptions,
    /// Graph optimisation level.
    pub opt_level: OptLevel,
    /// The optimised-model cache (off by default).
    pub session_cache: SessionCache,
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
}

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
            provider_options: ProviderOptions::default(),
            opt_level: OptLevel::default(),
            session_cache: SessionCache::default(),
            io_binding: true,
            fixed_shape: None,
            low_memory: false,
            release_after_use: false,
        }
    }
}

/// One text-to-image request; defaults follow the TCD guide (4 steps, eta 0.3, no CFG).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (used only with guidance > 1).
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    pub steps: usize,
    /// TCD's gamma: 0 is deterministic, 1 is fully stochastic (multistep consistency sampling).
    pub eta: f32,
    /// Classifier-free guidance scale; values <= 1 run a single conditional pass.
    pub guidance: f32,
    /// Seed of the torch-compatible CPU generator.
    pub seed: u64,
    /// Image width; `None` uses the model's default size.
    pub width: Option<usize>,
    /// Image height; `None` uses the model's default size.
    pub height: Option<usize>,
    /// Images per prompt.
    pub num_images: usize,
    /// TCD's `original_inference_steps` (the distillation schedule length); `None` = config's.
    pub original_inference_steps: Option<usize>,
    /// One control image per loaded ControlNet ([`EngineOptions::controlnets`]); empty runs
    /// without ControlNet. Text-to-image only.
    pub control: Vec<ControlImage>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            prompt: String::new(),
            negative_prompt: None,
            steps: 4,
            eta: 0.3,
            guidance: 0.0,
            seed: 0,
            width: None,
            height: None,
            num_images: 1,
            original_inference_steps: None,
            control: Vec::new(),
        }
    }
}

/// What a generation starts from. Text-to-image needs nothing; image-to-image and inpainting
/// take decoded RGB images (see [`crate::image_io::load_image`] to read files,
/// [`RgbImage::from_rgba`] for RGBA buffers).
///
/// Kept beside [`GenerateRequest`] rather than inside it so that existing request literals stay
/// valid and the text-only path carries no image data.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Text-to-image from pure noise.
    TextToImage,
    /// diffusers' `StableDiffusion(XL)Img2ImgPipeline`: noise the encoded image to the timestep
    /// `strength` selects, then denoise.
    ImageToImage {
        /// The starting image; resized (Lanczos) to the requested size when that differs.
        image: RgbImage,
        /// In `(0, 1]`: the fraction of the schedule that runs (1 ignores the image's content
        /// but keeps its size). diffusers' default is 0.8 for SD, 0.3 for SDXL.
        strength: f64,
    },
    /// diffusers' `StableDiffusion(XL)InpaintPipeline`: repaint where the mask is white.
    /// A 9-channel (inpainting) UNet sees the mask and the masked image; a regular 4-channel
    /// UNet keeps the unmasked area by blending in the re-noised image after every step.
    Inpaint {
        /// The image to repaint.
        image: RgbImage,
        /// White (>= 128 after grayscale conversion) = repaint, black = keep; resized to the
        /// output size when it differs.
        mask: RgbImage,
        /// In `(0, 1]`; 1 starts from pure noise (diffusers' default).
        strength: f64,
        /// Which inpainting method the caller expects; [`InpaintMode::Auto`] follows the UNet.
        mode: InpaintMode,
    },
}

/// How inpainting is done, which depends on the UNet the model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InpaintMode {
    /// Whatever the UNet supports: the 9-channel path for inpainting UNets, blending otherwise.
    #[default]
    Auto,
    /// Latent blending with a regular 4-channel UNet.
    Blend,
    /// A 9-channel inpainting UNet (latents, mask and masked-image latents).
    Unet,
}

/// What a generation reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Prompts are being encoded.
    EncodingPrompt,
    /// The first of `total` denoising steps starts (inputs are encoded and prepared).
    Denoising {
        /// Steps to run.
        total: usize,
    },
    /// Denoising step `step` (1-based) of `total` finished at `timestep`.
    Step {
        /// Steps done.
        step: usize,
        /// Steps in all.
        total: usize,
        /// The timestep just denoised.
        timestep: i64,
    },
    /// The VAE is decoding the latents.
    Decoding,
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generated {
    /// One image per requested image.
    pub images: Vec<RgbImage>,
    /// Final latents before VAE decoding, `[num_images, c, h/f, w/f]` (diffusers'
    /// `output_type="latent"`).
    pub latents: ndarray::ArrayD<f32>,
    /// The timesteps that were run.
    pub timesteps: Vec<i64>,
    /// The control images the ControlNets saw, after preprocessing (Canny edges, depth maps),
    /// at the output size; empty without ControlNet.
    pub control_images: Vec<RgbImage>,
}

/// A loaded pipeline: tokenizers, sessions and configs, created once.
#[derive(Debug)]
pub struct Engine {
    model: ModelDir,
    encoders: Vec<TextEncoder>,
    unet: Graph,
    vae_decoder: Graph,
    vae_encoder: Option<Graph>,
    controlnets: Vec<ControlNet>,
    residuals: Option<controlnet::ResidualLayout>,
    depth: Option<crate::control::DepthEstimator>,
    requires_aesthetics_score: bool,
    scheduler: TcdConfig,
    providers: Vec<ExecutionProvider>,
    ort_library: PathBuf,
    lora_report: LoraReport,
    io_binding: bool,
    /// What loading chose that the caller should hear about.
    notes: Vec<String>,
    fixed_shape: Option<ShapeDims>,
    low_memory: bool,
    release_after_use: bool,
    /// Sums the ControlNets' residuals where the UNet reads them (with IoBinding).
    residual_sum: Option<controlnet::ResidualSum>,
    /// Zero ControlNet residuals placed on the UNet's device, per `[batch, h, w]`.
    zero_residuals: resident::ShapeCache<Vec<runtime::PlacedTensor>>,
    /// Sessions released after use, being freed beside the next stage.
    freeing: Freeing,
}

/// Frees released sessions on a thread of their own (release-after-use): dropping the UNet's
/// gigabytes of weights and its arena took 0.19 s on the full-size SD1.5 job, which now
/// overlaps the VAE decode. Dropped (and so joined) before a graph loads and with the engine.
#[derive(Debug, Default)]
struct Freeing(Option<std::thread::JoinHandle<()>>);

impl Freeing {
    fn start(&mut self, sessions: Vec<runtime::ReleasedSession>) {
        self.wait();
        if !sessions.is_empty() {
            self.0 = Some(std::thread::spawn(move || drop(sessions)));
        }
    }

    fn wait(&mut self) {
        if let Some(thread) = self.0.take() {
            // A panic while freeing leaves nothing to recover.
            let _ = thread.join();
        }
    }
}

impl Drop for Freeing {
    fn drop(&mut self) {
        self.wait();
    }
}

/// The stages of a generation in order, each with its own graphs
/// ([`EngineOptions::low_memory`], [`EngineOptions::release_after_use`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Stage {
    /// The text encoders.
    Prompt,
    /// The VAE encoder (image-to-image, inpainting).
    Image,
    /// The UNet and the ControlNets.
    Denoise,
    /// The VAE decoder.
    Decode,
}

/// How many shapes of zero ControlNet residuals an engine keeps placed (a size with and without
/// guidance, and one more).
const ZERO_RESIDUAL_SHAPES: usize = 3;

/// Resolves `--model`: an existing directory, else a hub id.
pub fn resolve_model(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if hub::looks_like_hub_id(model) {
        return hub::resolve_pipeline(model, revision);
    }
    Err(Error::model(
        path,
        "no such directory (and not a Hugging Face hub id of the form owner/name)",
    ))
}

/// The session options of `options`; a TensorRT profile left unset covers the model's native
/// size at batch 1 to 2 (one image, with or without guidance).
fn session_options(
    model: &ModelDir,
    providers: &[ExecutionProvider],
    options: &EngineOptions,
) -> Result<SessionOptions> {
    let mut provider_options = options.provider_options.clone();
    provider_options.device_id = options.device_id;
    if providers.contains(&ExecutionProvider::TensorRt)
        && provider_options.tensorrt.profile.is_none()
    {
        let size = model.default_image_size();
        provider_options.tensorrt.profile = Some(TrtProfile::for_request(size, size, 1, true)?);
    }
    Ok(SessionOptions {
        providers: providers.to_vec(),
        provider_options,
        intra_threads: options.intra_threads,
        opt_level: options.opt_level,
        cache: options.session_cache.clone(),
        fixed_shape: None,
        disable_prepacking: false,
    })
}

/// Loads the VAE decoder and, when the model has one, the encoder.
fn load_vaes(model: &ModelDir, options: &SessionOptions) -> Result<(Graph, Option<Graph>)> {
    let vae_decoder = Graph::load("vae_decoder", &model.graph_path("vae_decoder"), options)?;
    vae_decoder.require_inputs(&["latent_sample"])?;
    let vae_encoder = if model.has_component("vae_encoder") {
        let graph = Graph::load("vae_encoder", &model.graph_path("vae_encoder"), options)?;
        graph.require_inputs(&["sample"])?;
        Some(graph)
    } else {
        None
    };
    Ok((vae_decoder, vae_encoder))
}

impl Engine {
    /// Loads a model directory or hub id with the given options.
    pub fn load(model: impl AsRef<str>, options: &EngineOptions) -> Result<Self> {
        let root = resolve_model(model.as_ref(), options.revision.as_deref())?;
        let model = ModelDir::open(&root)?;
        let scheduler: TcdConfig =
            serde_json::from_value(model.scheduler_config.clone()).map_err(|e| {
                Error::model(
                    root.join("scheduler").join("scheduler_config.json"),
                    format!("not a usable scheduler config: {e}"),
                )
            })?;
        let ort_library = runtime::ensure_loaded(options.ort_lib.as_deref())?;
        let providers = runtime::select_providers(&options.providers)?;
        let session_options = session_options(&model, &providers, options)?;
        // LoRAs the export recorded come first, then the caller's.
        let mut loras: Vec<LoraSpec> = model
            .manifest()
            .map(|m| {
                m.lora
                    .iter()
                    .map(|l| LoraSpec {
                        source: l.source.clone(),
                        weight: l.weight,
                        weight_name: l.weight_name.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        loras.extend(options.loras.iter().cloned());
        let (mut overrides, lora_report) = lora::weight_overrides(
            &model,
            &loras,
            options.lora_weight_name.as_deref(),
            options.lora_allow_unmatched,
        )?;
        // Only the denoisers are fixed: they run every step and their batch is known.
        let denoiser_options = SessionOptions {
            fixed_shape: options.fixed_shape.map(|dims| FixedShape {
                dims,
                latent_factor: model.vae.scale_factor(),
            }),
            ..session_options.clone()
        };
        let unet_path = model.graph_path("unet");
        let unet_weights = overrides.remove("unet").unwrap_or_default();
        let xl = model.family().is_xl();
        let names: &[(&str, &str)] = if xl {
            &[
                ("tokenizer", "text_encoder"),
                ("tokenizer_2", "text_encoder_2"),
            ]
        } else {
            &[("tokenizer", "text_encoder")]
        };
        let low_memory = options.low_memory;
        let releases = low_memory || options.release_after_use;
        // Graphs that are released keep what they need to load again; in low-memory mode every
        // graph is checked, then released until its stage needs it.
        let releasable = |mut graph: Graph, options: &SessionOptions| {
            if releases {
                graph.keep_for_reload(options);
            }
            if low_memory {
                graph.release();
            }
            graph
        };
        // In low-memory mode a UNet exported in segments loads one segment at a time, at every
        // step: worth it only when the loads come from the session cache.
        let mut notes = Vec::new();
        let unet_segments = if low_memory {
            let parts = model.segment_paths("unet")?;
            let uncached = denoiser_options.uncached_reloads(!unet_weights.is_empty());
            match uncached {
                Some(why) if !parts.is_empty() => {
                    notes.push(format!(
                        "the UNet loads whole: its {} segments would load at every step and \
                         each load would optimise them again ({why}); pass --session-cache \
                         to hold one segment at a time",
                        parts.len()
                    ));
                    Vec::new()
                }
                _ => parts,
            }
        } else {
            Vec::new()
        };
        let load_unet = || {
            if unet_segments.is_empty() {
                Graph::load_with_weights("unet", &unet_path, &denoiser_options, unet_weights)
                    .map(|g| releasable(g, &denoiser_options))
            } else {
                Graph::load_segmented(
                    "unet",
                    &unet_path,
                    &unet_segments,
                    &denoiser_options,
                    unet_weights,
                )
            }
        };
        let mut load_rest = || -> Result<_> {
            let mut encoders = Vec::new();
            for (tok, enc) in names {
                let tokenizer = ClipTokenizer::from_dir(&root.join(tok))?;
                let weights = overrides.remove(*enc).unwrap_or_default();
                let graph = Graph::load_with_weights(
                    enc,
                    &model.graph_path(enc),
                    &session_options,
                    weights,
                )?;
                encoders.push(TextEncoder::new(
                    tokenizer,
                    releasable(graph, &session_options),
                    xl,
                )?);
            }
            let (decoder, encoder) = load_vaes(&model, &session_options)?;
            let decoder = releasable(decoder, &session_options);
            let encoder = encoder.map(|e| releasable(e, &session_options));
            let depth = options
                .depth_estimator
                .as_deref()
                .map(|source| controlnet::load_depth_estimator(source, None, &session_options))
                .transpose()?;
            // `--revision` names a revision of the model repository, not of the ControlNets'.
            let mut controlnets = Vec::with_capacity(options.controlnets.len());
            for source in &options.controlnets {
                let mut net = ControlNet::load(source, None, &denoiser_options)?;
                if releases {
                    net.graph_mut().keep_for_reload(&denoiser_options);
                }
                if low_memory {
                    net.graph_mut().release();
                }
                controlnets.push(net);
            }
            Ok((encoders, (decoder, encoder), depth, controlnets))
        };
        let (rest, unet) = if low_memory {
            // One graph at a time, so loading peaks at the largest one too.
            let rest = load_rest();
            let unet = match &rest {
                Ok(_) => load_unet(),
                Err(_) => Err(Error::Runtime("not loaded".into())),
            };
            (rest, unet)
        } else {
            // The UNet (most of the weights) loads on its own thread while the rest loads on
            // this one: on two cores that cuts the start-up by a quarter.
            std::thread::scope(|scope| {
                let unet = scope.spawn(load_unet);
                let rest = load_rest();
                let unet = unet
                    .join()
                    .unwrap_or_else(|_| Err(Error::Runtime("loading the UNet panicked".into())));
                (rest, unet)
            })
        };
        let (encoders, (vae_decoder, vae_encoder), depth, controlnets) = rest?;
        let unet = unet?;
        let mut required = vec!["sample", "timestep", "encoder_hidden_states"];
        if xl {
            required.extend(["text_embeds", "time_ids"]);
        }
        unet.require_inputs(&required)?;
        let residuals = controlnet::ResidualLayout::from_unet(&unet, &model.unet, &root)?;
        for net in &controlnets {
            match &residuals {
                Some(layout) => layout.check(net, xl, &model.unet)?,
                None => {
                    return Err(Error::model(
                        &root,
                        "the UNet of this model takes no ControlNet residuals (an older or an \
                         optimum export); re-export it with `python -m export convert` to use \
                         ControlNets",
                    ))
                }
            }
        }
        // A UNet in segments runs from host memory: its sessions come and go within a step.
        let io_binding = options.io_binding && unet.segment_count() == 0;
        let residual_sum = match (&residuals, io_binding) {
            (Some(layout), true) => {
                controlnet::ResidualSum::build(layout, &unet, &controlnets, &session_options)?
            }
            _ => None,
        };
        // SDXL refiners condition on an aesthetic score instead of the target size.
        let requires_aesthetics_score = std::fs::read_to_string(root.join("model_index.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("requires_aesthetics_score")?.as_bool())
            .unwrap_or(false);
        Ok(Engine {
            model,
            encoders,
            unet,
            vae_decoder,
            vae_encoder,
            controlnets,
            residuals,
            residual_sum,
            depth,
            requires_aesthetics_score,
            scheduler,
            providers,
            ort_library,
            lora_report,
            io_binding,
            notes,
            fixed_shape: options.fixed_shape,
            low_memory: options.low_memory,
            release_after_use: options.release_after_use,
            zero_residuals: resident::ShapeCache::new(ZERO_RESIDUAL_SHAPES),
            freeing: Freeing::default(),
        })
    }

    /// What loading chose that the caller should hear about (e.g. why low-memory mode loads the
    /// UNet whole).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// What load-time LoRA application did.
    pub fn lora_report(&self) -> &LoraReport {
        &self.lora_report
    }

    /// The model directory.
    pub fn model(&self) -> &ModelDir {
        &self.model
    }

    /// Per graph: the providers its nodes run on and the session cache's outcome.
    pub fn sessions(&self) -> Vec<SessionReport> {
        let encoders = self.encoders.iter().map(|e| &e.graph);
        let sums = self.residual_sum.iter().flat_map(|s| s.graphs());
        let graphs = encoders
            .chain([&self.unet, &self.vae_decoder])
            .chain(self.vae_encoder.as_ref())
            .chain(self.controlnets.iter().map(ControlNet::graph))
            .chain(sums.clone());
        // The denoising loop binds the UNet, the ControlNets and the residual sums; the encoders
        // and the VAE run once per generation.
        let denoiser = |g: &Graph| {
            std::ptr::eq(g, &self.unet)
                || self.controlnets.iter().any(|c| std::ptr::eq(g, c.graph()))
                || sums.clone().any(|s| std::ptr::eq(g, s))
        };
        graphs
            .map(|g| SessionReport {
                component: g.name().to_string(),
                assignment: g.assignment().to_vec(),
                cache: g.cache_status().clone(),
                io_binding: self.io_binding && denoiser(g),
                device_inputs: g.reads_device_inputs(),
                segments: g.segment_count(),
            })
            .collect()
    }

    /// Low-memory mode ([`EngineOptions::low_memory`]): releases every graph `stage` does not
    /// use, then loads the ones it does. Release-after-use
    /// ([`EngineOptions::release_after_use`]): releases the graphs of the stages before
    /// `stage`, then loads the ones it uses if they were released. Nothing to do otherwise.
    pub(super) fn stage(&mut self, stage: Stage) -> Result<()> {
        if !self.low_memory && !self.release_after_use {
            return Ok(());
        }
        let low_memory = self.low_memory;
        let mut released = Vec::new();
        for other in [Stage::Prompt, Stage::Image, Stage::Denoise, Stage::Decode] {
            if other == stage || !(low_memory || other < stage) {
                continue;
            }
            if other == Stage::Denoise {
                // Placed zeros hold on to the UNet's session.
                self.zero_residuals.clear();
            }
            for graph in self.stage_graphs(other) {
                released.extend(graph.release_session());
            }
        }
        // Low-memory mode frees before it loads, so the peak stays one stage's; released after
        // use, the graphs of this stage are loaded already and freeing can overlap it.
        let loads = self.stage_graphs(stage).iter().any(|g| !g.is_loaded());
        if low_memory || loads {
            self.freeing.wait();
            drop(released);
        } else {
            self.freeing.start(released);
        }
        for graph in self.stage_graphs(stage) {
            graph.ensure_loaded()?;
        }
        Ok(())
    }

    /// The graphs `stage` runs.
    fn stage_graphs(&mut self, stage: Stage) -> Vec<&mut Graph> {
        match stage {
            Stage::Prompt => self.encoders.iter_mut().map(|e| &mut e.graph).collect(),
            Stage::Image => self.vae_encoder.iter_mut().collect(),
            Stage::Denoise => std::iter::once(&mut self.unet)
                .chain(self.controlnets.iter_mut().map(ControlNet::graph_mut))
                .collect(),
            Stage::Decode => vec![&mut self.vae_decoder],
        }
    }

    /// The components whose sessions are loaded now (all of them, except in low-memory and
    /// release-after-use modes).
    pub fn loaded_components(&self) -> Vec<String> {
        let encoders = self.encoders.iter().map(|e| &e.graph);
        encoders
            .chain([&self.unet, &self.vae_decoder])
            .chain(self.vae_encoder.as_ref())
            .chain(self.controlnets.iter().map(ControlNet::graph))
            .filter(|g| g.is_loaded())
            .map(|g| g.name().to_string())
            .collect()
    }

    /// Whether the engine holds one component at a time ([`EngineOptions::low_memory`]).
    pub fn low_memory(&self) -> bool {
        self.low_memory
    }

    /// Whether the engine releases each component once a generation is past its stage
    /// ([`EngineOptions::release_after_use`]).
    pub fn release_after_use(&self) -> bool {
        self.release_after_use
    }

    /// Whether the denoising loop runs through IoBindings ([`EngineOptions::io_binding`]).
    pub fn io_binding(&self) -> bool {
        self.io_binding
    }

    /// Per graph (component name, load order): the calls into ONNX Runtime's `Run` and the time
    /// spent inside them since the engine was loaded. A run's wall time minus their sum is the
    /// engine's own work (tokenising, scheduling, conversions, image encoding).
    pub fn run_stats(&self) -> Vec<(String, RunStats)> {
        let encoders = self.encoders.iter().map(|e| &e.graph);
        let graphs = encoders
            .chain([&self.unet, &self.vae_decoder])
            .chain(self.vae_encoder.as_ref())
            .chain(self.controlnets.iter().map(ControlNet::graph))
            .chain(self.residual_sum.iter().flat_map(|s| s.graphs()))
            .chain(self.depth.as_ref().map(|d| d.graph()));
        graphs
            .map(|g| (g.name().to_string(), g.run_stats()))
            .collect()
    }

    /// The execution providers the sessions were registered with.
    pub fn providers(&self) -> &[ExecutionProvider] {
        &self.providers
    }

    /// The ONNX Runtime library in use.
    pub fn ort_library(&self) -> &Path {
        &self.ort_library
    }

    /// The scheduler config (diffusers' `TCDScheduler.from_config(pipe.scheduler.config)`).
    pub fn scheduler_config(&self) -> &TcdConfig {
        &self.scheduler
    }

    /// The loaded ControlNets, in load order.
    pub fn controlnets(&self) -> &[ControlNet] {
        &self.controlnets
    }

    /// Whether the UNet takes ControlNet residuals (exports made before ControlNet support, and
    /// optimum's, do not).
    pub fn accepts_controlnet(&self) -> bool {
        self.residuals.is_some()
    }

    /// Whether the model has a VAE encoder (needed by image-to-image and inpainting).
    pub fn has_vae_encoder(&self) -> bool {
        self.vae_encoder.is_some()
    }

    /// Runs text-to-image. `progress` returns `false` to cancel.
    pub fn generate(
        &mut self,
        request: &GenerateRequest,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Generated> {
        self.run(request, &Task::TextToImage, progress)
    }

    /// Runs `task` with the prompt, seed and sampling settings of `request`. The output size is
    /// `request.width`/`height` when given, else the input image's size rounded down to a
    /// multiple of 8 (diffusers' `get_default_height_width`). `progress` returns `false` to
    /// cancel.
    pub fn run(
        &mut self,
        request: &GenerateRequest,
        task: &Task,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Generated> {
        controlnet::validate(self.controlnets.len(), &request.control)?;
        if !request.control.is_empty() && *task != Task::TextToImage {
            return Err(Error::invalid(
                "ControlNet runs with text-to-image only; drop --image/--mask or the control images",
            ));
        }
        match task {
            Task::TextToImage => txt2img::run(self, request, progress),
            Task::ImageToImage { image, strength } => {
                img2img::run(self, request, image, *strength, progress)
            }
            Task::Inpaint {
                image,
                mask,
                strength,
                mode,
            } => inpaint::run(self, request, image, mask, *strength, *mode, progress),
        }
    }
}
