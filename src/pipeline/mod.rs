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

mod animatediff;
pub mod conditioning;
mod controlnet;
mod field;
mod finite;
mod img2img;
mod infotext;
mod inpaint;
mod ip_adapter;
mod limits;
mod load;
mod lora;
mod lora_switch;
mod options;
mod request;
mod resident;
mod txt2img;
mod vae_tiling;
mod vae_tiny;

pub use controlnet::{ControlImage, ControlNet, ControlPreprocess};
pub use infotext::parameters_text;
pub use ip_adapter::{IpAdapter, IpAdapterImage, IpAdapterVariant};
pub use limits::Limits;
pub use load::resolve_model;
pub use lora::{apply_loras, LoraReport, LoraSpec};
pub use lora_switch::LoraSwitch;
pub use options::{EngineOptions, SessionReport, MAX_THREADS};
pub use request::{
    animation_frames, output_size, unet_shape, Field, GenerateRequest, InpaintMode, Task,
    DEFAULT_FRAMES, MAX_CONTROL_SCALE, MAX_GUIDANCE, MAX_IP_ADAPTER_SCALE, SIZE_MULTIPLE,
};

use std::path::{Path, PathBuf};

use crate::image_io::RgbImage;
use crate::model::ModelDir;
use crate::runtime::{self, ExecutionProvider, Graph, RunStats, ShapeDims};
use crate::sampler::tcd::TcdConfig;
use crate::{Error, Result};

use conditioning::TextEncoder;

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
    /// The VAE decoded `done` of `total` images or frames (after each chunk,
    /// [`GenerateRequest::decode_chunk`]).
    Decoded {
        /// Images or frames decoded so far.
        done: usize,
        /// Images or frames in all.
        total: usize,
    },
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generated {
    /// One image per requested image; for an animation, every frame of every video, video
    /// by video (`num_images * frames` images).
    pub images: Vec<RgbImage>,
    /// Frames per video: 1 for still images.
    pub frames: usize,
    /// Final latents before VAE decoding, `[num_images, c, h/f, w/f]`, or
    /// `[num_images, c, frames, h/f, w/f]` for an animation (diffusers'
    /// `output_type="latent"`).
    pub latents: ndarray::ArrayD<f32>,
    /// The timesteps that were run.
    pub timesteps: Vec<i64>,
    /// The control images the ControlNets saw, after preprocessing (Canny edges, depth maps),
    /// at the output size; empty without ControlNet.
    pub control_images: Vec<RgbImage>,
    /// What the caller should hear about this generation (a prompt truncated to CLIP's 77
    /// tokens, as diffusers warns); the library itself writes nothing to stderr.
    pub warnings: Vec<String>,
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
    /// The IP-Adapter ([`EngineOptions::ip_adapter`]).
    ip_adapter: Option<ip_adapter::IpAdapter>,
    /// The UNet's IP-Adapter inputs; `None` for exports without them.
    ip_layout: Option<ip_adapter::IpLayout>,
    requires_aesthetics_score: bool,
    scheduler: TcdConfig,
    providers: Vec<ExecutionProvider>,
    ort_library: PathBuf,
    lora_report: LoraReport,
    /// What [`Engine::set_loras`] needs.
    lora_state: lora_switch::LoraState,
    io_binding: bool,
    /// What loading chose that the caller should hear about.
    notes: Vec<String>,
    /// A tiny autoencoder replaced the model's VAE ([`EngineOptions::tiny_vae`]).
    tiny_vae: bool,
    fixed_shape: Option<ShapeDims>,
    limits: Limits,
    low_memory: bool,
    release_after_use: bool,
    /// Sums the ControlNets' residuals where the UNet reads them (with IoBinding).
    residual_sum: Option<controlnet::ResidualSum>,
    /// Zero ControlNet residuals placed on the UNet's device, per `[batch, h, w]`.
    zero_residuals: resident::ShapeCache<Vec<runtime::PlacedTensor>>,
    /// Sessions released after use, being freed beside the next stage.
    freeing: Freeing,
}

/// The start of `text` for a one-line message: quoted, control characters as spaces, cut at
/// `max` characters with the rest counted.
fn excerpt(text: &str, max: usize) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let count = clean.chars().count();
    if count <= max {
        return format!("\"{clean}\"");
    }
    let head: String = clean.chars().take(max).collect();
    format!("\"{head}...\" ({} more characters)", count - max)
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

impl Engine {
    /// What loading chose that the caller should hear about (e.g. why low-memory mode loads the
    /// UNet whole).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The size and count limits requests are checked against.
    pub fn limits(&self) -> Limits {
        self.limits
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
            .chain(self.ip_adapter.iter().flat_map(IpAdapter::graphs))
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
            Stage::Prompt => {
                let adapter = self.ip_adapter.iter_mut().flat_map(|a| a.graphs_mut());
                let encoders = self.encoders.iter_mut().map(|e| &mut e.graph);
                encoders.chain(adapter).collect()
            }
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
            .chain(self.ip_adapter.iter().flat_map(IpAdapter::graphs))
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
            .chain(self.depth.as_ref().map(|d| d.graph()))
            .chain(self.ip_adapter.iter().flat_map(IpAdapter::graphs));
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

    /// The loaded IP-Adapter ([`EngineOptions::ip_adapter`]).
    pub fn ip_adapter(&self) -> Option<&IpAdapter> {
        self.ip_adapter.as_ref()
    }

    /// Whether the model has a VAE encoder (needed by image-to-image and inpainting).
    pub fn has_vae_encoder(&self) -> bool {
        self.vae_encoder.is_some()
    }

    /// The motion module, on an AnimateDiff model: [`Engine::generate`] then makes videos of
    /// [`GenerateRequest::frames`] frames.
    pub fn motion(&self) -> Option<crate::model::Motion> {
        self.model.motion()
    }

    /// Runs text-to-image (text-to-video on a model with a motion module). `progress` returns
    /// `false` to cancel.
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
        request.validate()?;
        task.validate()?;
        controlnet::validate(self.controlnets.len(), &request.control)?;
        if !request.control.is_empty() && *task != Task::TextToImage {
            return Err(Error::invalid(
                "ControlNet runs with text-to-image only; drop --image/--mask or the control images",
            ));
        }
        if request.ip_adapter.is_some() && self.ip_adapter.is_none() {
            return Err(Field::IpAdapterImage.invalid(
                "is set but the engine loaded no IP-Adapter (EngineOptions::ip_adapter)",
            ));
        }
        if request.vae_tiling && self.tiny_vae {
            return Err(Field::VaeTiling.invalid(
                "is not available with a tiny autoencoder (it decodes large images in little \
                 memory already); leave it off or load the model's VAE",
            ));
        }
        let frames = request::animation_frames(&self.model, request, task)?;
        let size = request::output_size(&self.model, request, task, &self.limits)?;
        let warnings = self.prompt_warnings(request)?;
        let mut generated = match (task, frames) {
            // animation_frames admits text-to-video only.
            (_, Some(frames)) => txt2img::run(self, request, Some(frames), size, progress),
            (Task::TextToImage, None) => txt2img::run(self, request, None, size, progress),
            (Task::ImageToImage { image, strength }, None) => {
                img2img::run(self, request, (image, *strength), size, progress)
            }
            (
                Task::Inpaint {
                    image,
                    mask,
                    strength,
                    mode,
                },
                None,
            ) => inpaint::run(
                self,
                request,
                image,
                mask,
                (*strength, *mode),
                size,
                progress,
            ),
        }?;
        generated.warnings.extend(warnings);
        Ok(generated)
    }

    /// Decodes final latents (`[batch, channels, h, w]`, as [`Generated::latents`] or
    /// `--save-latents` holds them, before the VAE's scaling) into images, as a generation's
    /// last stage does with `request`'s [`GenerateRequest::decode_chunk`] and
    /// [`GenerateRequest::vae_tiling`] (its other fields are not read).
    pub fn decode_latents(
        &mut self,
        latents: &ndarray::ArrayD<f32>,
        request: &GenerateRequest,
    ) -> Result<Vec<RgbImage>> {
        let channels = self.model.vae.latent_channels;
        if latents.ndim() != 4 || latents.shape()[1] != channels || latents.is_empty() {
            return Err(Error::invalid(format!(
                "latents of shape {:?} cannot be decoded: the VAE takes [batch, {channels}, \
                 height, width]",
                latents.shape()
            )));
        }
        if request.vae_tiling && self.tiny_vae {
            return Err(Field::VaeTiling.invalid("is not available with a tiny autoencoder"));
        }
        let chunk = request.decode_chunk.unwrap_or(latents.shape()[0]);
        let decoded = txt2img::decode(self, latents, (chunk, request.vae_tiling), &mut |_| true)?;
        crate::image_io::vae_output_to_images(&decoded)
    }

    /// diffusers' truncation warning, for the prompt and the negative prompt, when one runs
    /// past what a text encoder reads: the start of the dropped part, on one line.
    fn prompt_warnings(&self, request: &GenerateRequest) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        let prompts = [
            ("prompt", Some(&request.prompt)),
            ("negative prompt", request.negative_prompt.as_ref()),
        ];
        for (which, text) in prompts {
            let Some(text) = text else { continue };
            for encoder in &self.encoders {
                if let Some(dropped) = encoder.tokenizer.truncated_text(text)? {
                    warnings.push(format!(
                        "the {which} was truncated because CLIP can only handle sequences up \
                         to {} tokens; dropped: {}",
                        encoder.tokenizer.max_length(),
                        excerpt(&dropped, 60)
                    ));
                    break;
                }
            }
        }
        Ok(warnings)
    }
}
