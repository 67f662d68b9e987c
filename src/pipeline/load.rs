//! Loading an engine: the decisions that depend on the model and the options (which LoRA
//! weights replace which, whether the UNet runs in segments, whether the CPU arena is on, the
//! sessions' settings) made once, then every graph loaded and checked against the others.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::conditioning::TextEncoder;
use super::controlnet::{self, ControlNet};
use super::ip_adapter::{IpAdapter, IpLayout};
use super::lora::{self, LoraSpec};
use super::lora_switch::{fingerprint, LoraState};
use super::options::EngineOptions;
use super::{resident, vae_tiny, Engine, Freeing, ZERO_RESIDUAL_SHAPES};
use crate::control::DepthEstimator;
use crate::model::ModelDir;
use crate::runtime::{
    self, ExecutionProvider, FixedShape, Graph, SessionOptions, TrtProfile, WeightOverride,
};
use crate::sampler::tcd::{TcdConfig, TcdScheduler};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// Resolves `--model`: an existing directory, else a hub id.
pub fn resolve_model(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    crate::model::resolve(model, revision)
}

/// How the UNet loads in low-memory mode: whole, or one segment at a time.
#[derive(Debug, Default)]
struct UnetPlan {
    /// The segment files, in running order; empty to load the UNet whole.
    segments: Vec<PathBuf>,
    /// Why the UNet loads whole although it was exported in segments.
    note: Option<String>,
}

/// In low-memory mode a UNet exported in segments loads one segment at a time, at every step:
/// worth it only when the loads come from the session cache.
fn plan_unet(
    model: &ModelDir,
    options: &EngineOptions,
    denoiser_options: &SessionOptions,
    has_weights: bool,
) -> Result<UnetPlan> {
    if !options.low_memory {
        return Ok(UnetPlan::default());
    }
    let parts = model.segment_paths("unet")?;
    Ok(match denoiser_options.uncached_reloads(has_weights) {
        Some(why) if !parts.is_empty() => UnetPlan {
            note: Some(format!(
                "the UNet loads whole: its {} segments would load at every step and each load \
                 would optimise them again ({why}); pass --session-cache to hold one segment at \
                 a time",
                parts.len()
            )),
            segments: Vec::new(),
        },
        _ => UnetPlan {
            segments: parts,
            note: None,
        },
    })
}

/// Whether the CPU arena is on when the options leave it to the engine
/// ([`EngineOptions::one_shot`]): on for the CPU provider when each component is released
/// after its stage (its arena then lives only through that stage; full-size SD1.5: 33 s at
/// 4.05 GiB on, 36 s at 3.68 GiB off), except in low-memory mode with the UNet loaded whole
/// (arenas would outlive the stage's one component) and for float16 exports, whose weights are
/// cast to float32 every step and would stay in the arena (4.75 instead of 2.50 GiB). With the
/// UNet in segments each segment's session, arena included, lives for one run of it.
pub(super) fn auto_cpu_arena(
    model: &ModelDir,
    providers: &[ExecutionProvider],
    options: &EngineOptions,
    unet_segments: bool,
) -> bool {
    (options.release_after_use || options.low_memory)
        && (!options.low_memory || unet_segments)
        && providers.contains(&ExecutionProvider::Cpu)
        && !model.is_float16()
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
        cache_limit: options.session_cache_limit,
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

/// The LoRAs the export recorded, then the caller's.
fn lora_specs(model: &ModelDir, options: &EngineOptions) -> Vec<LoraSpec> {
    let recorded = model.manifest().map(|m| {
        m.lora.iter().map(|l| LoraSpec {
            source: l.source.clone(),
            weight: l.weight,
            weight_name: l.weight_name.clone(),
        })
    });
    recorded
        .into_iter()
        .flatten()
        .chain(options.loras.iter().cloned())
        .collect()
}

/// What loading decided, for the graphs to be loaded with.
struct Plan<'a> {
    model: &'a ModelDir,
    options: &'a EngineOptions,
    /// The text encoders, the VAE and the depth estimator.
    sessions: SessionOptions,
    /// The UNet and the ControlNets (fixed shapes apply to them only).
    denoisers: SessionOptions,
    unet: UnetPlan,
}

impl Plan<'_> {
    /// Graphs that are released keep what they need to load again; in low-memory mode every
    /// graph is checked, then released until its stage needs it.
    fn releasable(&self, graph: &mut Graph, options: &SessionOptions) {
        if self.options.low_memory || self.options.release_after_use {
            graph.keep_for_reload(options);
        }
        if self.options.low_memory {
            graph.release();
        }
    }

    fn load_unet(&self, weights: Vec<WeightOverride>) -> Result<Graph> {
        let path = self.model.graph_path("unet");
        if self.unet.segments.is_empty() {
            let mut graph = Graph::load_with_weights("unet", &path, &self.denoisers, weights)?;
            self.releasable(&mut graph, &self.denoisers);
            Ok(graph)
        } else {
            Graph::load_segmented("unet", &path, &self.unet.segments, &self.denoisers, weights)
        }
    }

    /// Everything but the UNet.
    fn load_rest(&self, mut overrides: BTreeMap<String, Vec<WeightOverride>>) -> Result<Rest> {
        let xl = self.model.family().is_xl();
        let names: &[(&str, &str)] = if xl {
            &[
                ("tokenizer", "text_encoder"),
                ("tokenizer_2", "text_encoder_2"),
            ]
        } else {
            &[("tokenizer", "text_encoder")]
        };
        let mut encoders = Vec::new();
        for (tok, enc) in names {
            let tokenizer = ClipTokenizer::from_dir(&self.model.root().join(tok))?;
            let weights = overrides.remove(*enc).unwrap_or_default();
            let path = self.model.graph_path(enc);
            let mut graph = Graph::load_with_weights(enc, &path, &self.sessions, weights)?;
            self.releasable(&mut graph, &self.sessions);
            encoders.push(TextEncoder::new(tokenizer, graph, xl)?);
        }
        let (mut vae_decoder, mut vae_encoder, tiny_vae) = match &self.options.tiny_vae {
            None => {
                let (decoder, encoder) = load_vaes(self.model, &self.sessions)?;
                (decoder, encoder, None)
            }
            Some(source) => {
                let tiny = vae_tiny::load(source, self.model, &self.sessions)?;
                (tiny.decoder, tiny.encoder, Some((tiny.config, tiny.dir)))
            }
        };
        self.releasable(&mut vae_decoder, &self.sessions);
        if let Some(encoder) = vae_encoder.as_mut() {
            self.releasable(encoder, &self.sessions);
        }
        let depth = self
            .options
            .depth_estimator
            .as_deref()
            .map(|source| controlnet::load_depth_estimator(source, None, &self.sessions))
            .transpose()?;
        let ip_adapter = match self.options.ip_adapter.as_deref() {
            Some(source) => {
                let mut adapter = IpAdapter::load(source, None, &self.sessions)?;
                for graph in adapter.graphs_mut() {
                    self.releasable(graph, &self.sessions);
                }
                Some(adapter)
            }
            None => None,
        };
        // `--revision` names a revision of the model repository, not of the ControlNets'.
        let mut controlnets = Vec::with_capacity(self.options.controlnets.len());
        for source in &self.options.controlnets {
            let mut net = ControlNet::load(source, None, &self.denoisers)?;
            self.releasable(net.graph_mut(), &self.denoisers);
            controlnets.push(net);
        }
        Ok(Rest {
            encoders,
            vae_decoder,
            vae_encoder,
            tiny_vae,
            depth,
            controlnets,
            ip_adapter,
        })
    }

    /// Loads every graph. The UNet (most of the weights) loads on its own thread while the
    /// rest loads on this one: on two cores that cuts the start-up by a quarter. In low-memory
    /// mode one graph at a time, so loading peaks at the largest one too.
    fn load(&self, mut overrides: BTreeMap<String, Vec<WeightOverride>>) -> Result<(Rest, Graph)> {
        let unet_weights = overrides.remove("unet").unwrap_or_default();
        if self.options.low_memory {
            let rest = self.load_rest(overrides)?;
            return Ok((rest, self.load_unet(unet_weights)?));
        }
        let (rest, unet) = std::thread::scope(|scope| {
            let unet = scope.spawn(|| self.load_unet(unet_weights));
            let rest = self.load_rest(overrides);
            let unet = unet
                .join()
                .unwrap_or_else(|_| Err(Error::invariant("loading the UNet panicked")));
            (rest, unet)
        });
        Ok((rest?, unet?))
    }
}

/// The graphs besides the UNet.
struct Rest {
    encoders: Vec<TextEncoder>,
    vae_decoder: Graph,
    vae_encoder: Option<Graph>,
    /// The tiny VAE's config and directory when it replaces the model's VAE.
    tiny_vae: Option<(crate::model::VaeConfig, PathBuf)>,
    depth: Option<DepthEstimator>,
    controlnets: Vec<ControlNet>,
    ip_adapter: Option<IpAdapter>,
}

/// Checks a loaded graph against what the manifest says of it.
fn check_manifest(model: &ModelDir, graph: &Graph) -> Result<()> {
    let Some(manifest) = model.manifest() else {
        return Ok(());
    };
    let io = graph.inputs().iter().chain(graph.outputs());
    manifest
        .check_graph(
            graph.name(),
            io.map(|s| (s.name.as_str(), s.dtype.onnx_name(), s.shape.as_slice())),
        )
        .map_err(|message| Error::model(model.root().join("tcd_ort.json"), message))
}

/// Checks the loaded UNet against the manifest, the ControlNets and the IP-Adapter; returns
/// the layouts of its ControlNet residual and IP-Adapter inputs.
fn check_unet(
    model: &ModelDir,
    unet: &Graph,
    rest: &Rest,
) -> Result<(Option<controlnet::ResidualLayout>, Option<IpLayout>)> {
    let xl = model.family().is_xl();
    let mut required = vec!["sample", "timestep", "encoder_hidden_states"];
    if xl {
        required.extend(["text_embeds", "time_ids"]);
    }
    unet.require_inputs(&required)?;
    check_motion(model, unet, rest)?;
    // A tiny VAE is not the model's export: `vae_tiny::load` checked its graphs.
    let vaes = match rest.tiny_vae {
        None => Some(&rest.vae_decoder).into_iter().chain(&rest.vae_encoder),
        Some(_) => None.into_iter().chain(&None),
    };
    let graphs = rest.encoders.iter().map(|e| &e.graph);
    let graphs = graphs.chain([unet]).chain(vaes);
    for graph in graphs {
        check_manifest(model, graph)?;
    }
    let residuals = controlnet::ResidualLayout::from_unet(unet, &model.unet, model.root())?;
    for net in &rest.controlnets {
        match &residuals {
            Some(layout) => layout.check(net, xl, &model.unet)?,
            None => {
                return Err(Error::model(
                    model.root(),
                    "the UNet of this model takes no ControlNet residuals (an older or an \
                     optimum export); re-export it with `python -m export convert` to use \
                     ControlNets",
                ))
            }
        }
    }
    let ip_layout = IpLayout::from_unet(unet, model.root())?;
    if let Some(adapter) = &rest.ip_adapter {
        let width = model.unet.cross_attention_dim.as_u64().map(|d| d as usize);
        adapter.check_fits(ip_layout.as_ref(), width, model.root())?;
    }
    Ok((residuals, ip_layout))
}

/// An AnimateDiff model's UNet takes video latents, and nothing else runs beside it; a
/// still-image model's takes image latents.
fn check_motion(model: &ModelDir, unet: &Graph, rest: &Rest) -> Result<()> {
    let rank = unet.input("sample").map_or(0, |i| i.shape.len());
    match model.motion() {
        Some(_) if rank != 5 => Err(Error::model(
            model.root(),
            format!(
                "the manifest names a motion module but the UNet's sample has {rank} dimensions, \
                 not [batch, channels, frames, height, width]; re-export it with `python -m \
                 export animatediff`"
            ),
        )),
        Some(_) if !rest.controlnets.is_empty() || rest.ip_adapter.is_some() => Err(Error::model(
            model.root(),
            "an AnimateDiff model runs without ControlNets and IP-Adapters (its UNet has no \
             inputs for them)",
        )),
        None if rank == 5 => Err(Error::model(
            model.root(),
            "the UNet takes video latents ([batch, channels, frames, height, width]) but the \
             model names no motion module (tcd_ort.json `motion`, or `motion_max_seq_length` in \
             unet/config.json); re-export it with `python -m export animatediff`",
        )),
        _ => Ok(()),
    }
}

/// The UNet's LoRA slot values, taken out of `overrides` when the export lets a loaded session
/// take them at run time (the manifest's `lora_slots.unet.overridable`): the session is then
/// built without replaced weights (so the session cache and segments serve it) and the slots
/// are fed to it ([`Graph::swap_weights`]), as [`Engine::set_loras`] does later.
fn run_time_slots(
    model: &ModelDir,
    overrides: &mut BTreeMap<String, Vec<WeightOverride>>,
) -> Vec<WeightOverride> {
    let Some(slots) = model
        .manifest()
        .and_then(|m| m.lora_slots.get("unet"))
        .filter(|s| s.overridable)
    else {
        return Vec::new();
    };
    let names = slots.tensor_names();
    let Some(unet) = overrides.get_mut("unet") else {
        return Vec::new();
    };
    let (fed, built): (Vec<_>, Vec<_>) = std::mem::take(unet)
        .into_iter()
        .partition(|w| names.contains(&w.name));
    *unet = built;
    fed
}

/// The fingerprints of the fused weights each graph is built with ([`LoraState::fused`]): the
/// UNet's LoRA slots are left out, since its session takes them at run time.
fn loaded_prints(
    model: &ModelDir,
    overrides: &BTreeMap<String, Vec<WeightOverride>>,
) -> BTreeMap<String, u64> {
    let slots = model
        .manifest()
        .and_then(|m| m.lora_slots.get("unet"))
        .map(|slots| slots.tensor_names())
        .unwrap_or_default();
    overrides
        .iter()
        .filter_map(|(component, weights)| {
            let fused: Vec<&WeightOverride> = weights
                .iter()
                .filter(|w| component != "unet" || !slots.contains(&w.name))
                .collect();
            fingerprint(&fused).map(|p| (component.clone(), p))
        })
        .collect()
}

/// A tiny VAE's config becomes the engine's (its scaling factor decodes and encodes); the
/// note says so.
fn use_tiny_vae(
    model: &mut ModelDir,
    tiny: Option<(crate::model::VaeConfig, PathBuf)>,
) -> Option<String> {
    let (config, dir) = tiny?;
    let note = format!(
        "VAE: the tiny autoencoder of {} (scaling factor {})",
        dir.display(),
        config.scaling_factor
    );
    model.vae = config;
    Some(note)
}

/// The scheduler's config, checked by building the noise schedule once at load.
fn scheduler_config(model: &ModelDir) -> Result<TcdConfig> {
    let path = model.root().join("scheduler").join("scheduler_config.json");
    let config: TcdConfig = serde_json::from_value(model.scheduler_config.clone())
        .map_err(|e| Error::model(&path, format!("not a usable scheduler config: {e}")))?;
    TcdScheduler::new(config.clone()).map_err(|e| Error::model(&path, e.to_string()))?;
    Ok(config)
}

impl Engine {
    /// Loads a model directory or hub id with the given options.
    pub fn load(model: impl AsRef<str>, options: &EngineOptions) -> Result<Self> {
        let model = ModelDir::resolve(model.as_ref(), options.revision.as_deref())?;
        Self::from_model(model, options)
    }

    /// Loads an opened model directory ([`ModelDir::resolve`]): for a front end that read the
    /// model before loading (for its native size, say), so that it is read once.
    pub fn from_model(model: ModelDir, options: &EngineOptions) -> Result<Self> {
        options.validate()?;
        if model.motion().is_some() && options.fixed_shape.is_some() {
            return Err(Error::invalid(
                "an AnimateDiff model's UNet takes any number of frames and cannot be built for \
                 a fixed shape: load it without a fixed shape",
            ));
        }
        let scheduler = scheduler_config(&model)?;
        let ort_library = runtime::ensure_loaded(options.ort_lib.as_deref())?;
        let (providers, dropped_providers) = runtime::select_providers(&options.providers)?;
        let loras = lora_specs(&model, options);
        let (mut overrides, lora_report) = lora::weight_overrides(
            &model,
            &loras,
            options.lora_weight_name.as_deref(),
            options.lora_allow_unmatched,
        )?;
        let fed_slots = run_time_slots(&model, &mut overrides);
        let mut sessions = session_options(&model, &providers, options)?;
        // Only the denoisers are fixed: they run every step and their batch is known.
        let mut denoisers = SessionOptions {
            fixed_shape: options.fixed_shape.map(|dims| FixedShape {
                dims,
                latent_factor: model.vae.scale_factor(),
            }),
            ..sessions.clone()
        };
        let unet_weights = overrides.get("unet").is_some_and(|w| !w.is_empty());
        let unet = plan_unet(&model, options, &denoisers, unet_weights)?;
        let arena = options.provider_options.cpu_arena.unwrap_or_else(|| {
            auto_cpu_arena(&model, &providers, options, !unet.segments.is_empty())
        });
        sessions.provider_options.cpu_arena = Some(arena);
        denoisers.provider_options.cpu_arena = Some(arena);
        let plan = Plan {
            model: &model,
            options,
            sessions,
            denoisers,
            unet,
        };
        let fused = loaded_prints(&model, &overrides);
        let (rest, mut unet) = plan.load(overrides)?;
        unet.swap_weights(fed_slots)?;
        let mut notes: Vec<String> = dropped_providers
            .into_iter()
            .chain(plan.unet.note.clone())
            .collect();
        let lora_state = LoraState {
            base: loras,
            weight_name: options.lora_weight_name.clone(),
            allow_unmatched: options.lora_allow_unmatched,
            extra: Vec::new(),
            fused,
            sessions: plan.sessions.clone(),
            denoisers: plan.denoisers.clone(),
            unet_segments: plan.unet.segments.clone(),
            keep_for_reload: options.low_memory || options.release_after_use,
            low_memory: options.low_memory,
        };
        let sessions = plan.sessions;
        let mut model = model;
        let tiny_vae = rest.tiny_vae.is_some();
        notes.extend(use_tiny_vae(&mut model, rest.tiny_vae.clone()));
        let (residuals, ip_layout) = check_unet(&model, &unet, &rest)?;
        // A UNet in segments runs from host memory: its sessions come and go within a step.
        let io_binding = options.io_binding && unet.segment_count() == 0;
        let residual_sum = match (&residuals, io_binding) {
            (Some(layout), true) => {
                controlnet::ResidualSum::build(layout, &unet, &rest.controlnets, &sessions)?
            }
            _ => None,
        };
        Ok(Engine {
            requires_aesthetics_score: model.requires_aesthetics_score(),
            model,
            encoders: rest.encoders,
            unet,
            vae_decoder: rest.vae_decoder,
            vae_encoder: rest.vae_encoder,
            controlnets: rest.controlnets,
            residuals,
            residual_sum,
            depth: rest.depth,
            ip_adapter: rest.ip_adapter,
            ip_layout,
            scheduler,
            providers,
            ort_library,
            lora_report,
            lora_state,
            io_binding,
            notes,
            tiny_vae,
            fixed_shape: options.fixed_shape,
            limits: options.limits,
            low_memory: options.low_memory,
            release_after_use: options.release_after_use,
            zero_residuals: resident::ShapeCache::new(ZERO_RESIDUAL_SHAPES),
            freeing: Freeing::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::SessionCache;

    fn model(parts: &[&str]) -> ModelDir {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        ModelDir::open(
            parts
                .iter()
                .fold(root.to_path_buf(), |p, part| p.join(part)),
        )
        .expect("the model (the fp16 one is made by `make fixtures`)")
    }

    fn fixtures() -> PathBuf {
        std::env::var_os("TCD_ORT_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests")
                    .join("fixtures")
                    .join("generated")
            })
    }

    #[test]
    fn the_one_shot_preset_turns_the_cpu_arena_on_where_it_costs_no_lasting_memory() {
        use ExecutionProvider::{Cpu, Cuda};
        let tiny = model(&["models", "tiny-sd15"]);
        let fp16 = ModelDir::open(fixtures().join("fp16").join("sd15").join("onnx"))
            .expect("the float16 export (run `make fixtures`)");
        assert!(fp16.is_float16() && !tiny.is_float16());
        let one_shot = EngineOptions::one_shot();
        let keep_loaded = EngineOptions::default();
        let low_memory = EngineOptions {
            low_memory: true,
            ..EngineOptions::one_shot()
        };
        assert!(auto_cpu_arena(&tiny, &[Cpu], &one_shot, false));
        assert!(!auto_cpu_arena(&tiny, &[Cpu], &keep_loaded, false));
        assert!(!auto_cpu_arena(&tiny, &[Cpu], &low_memory, false));
        // With the UNet in segments each segment's arena lives for one run.
        assert!(auto_cpu_arena(&tiny, &[Cpu], &low_memory, true));
        // A float16 model's per-step casts would stay in the arena.
        assert!(!auto_cpu_arena(&fp16, &[Cpu], &one_shot, false));
        assert!(!auto_cpu_arena(&fp16, &[Cpu], &low_memory, true));
        // Another provider's host fallback keeps ONNX Runtime's default.
        assert!(!auto_cpu_arena(&tiny, &[Cuda], &one_shot, false));
        assert_eq!(one_shot.provider_options.cpu_arena, None);
        assert_eq!(keep_loaded.provider_options.cpu_arena, Some(false));
    }

    #[test]
    fn low_memory_runs_the_unet_in_segments_only_from_the_session_cache() {
        let tiny = model(&["models", "tiny-sd15"]);
        let plan = |options: &EngineOptions, weights: bool| {
            let sessions =
                session_options(&tiny, &[ExecutionProvider::Cpu], options).expect("options");
            plan_unet(&tiny, options, &sessions, weights).expect("a plan")
        };
        let cached = EngineOptions {
            low_memory: true,
            session_cache: SessionCache::Dir(PathBuf::from("/tmp/tcd-ort-unused")),
            ..EngineOptions::one_shot()
        };
        assert_eq!(plan(&cached, false).segments.len(), 2);
        let with_lora = plan(&cached, true);
        assert!(with_lora.segments.is_empty(), "LoRAs bypass the cache");
        assert!(with_lora.note.is_some_and(|n| n.contains("LoRA")));
        let uncached = EngineOptions {
            session_cache: SessionCache::Off,
            ..cached.clone()
        };
        let whole = plan(&uncached, false);
        assert!(whole.segments.is_empty());
        assert!(whole.note.is_some_and(|n| n.contains("--session-cache")));
        let not_low = EngineOptions {
            low_memory: false,
            ..cached
        };
        assert!(plan(&not_low, false).segments.is_empty());
    }
}
