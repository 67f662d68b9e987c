//! Execution-provider and session start-up flags of `tcd-ort run`, kept apart from the
//! generation flags: they translate to [`ProviderOptions`], [`OptLevel`] and [`SessionCache`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use tcd_ort::pipeline::{Engine, EngineOptions, SessionReport};
use tcd_ort::runtime::{
    parse_bytes, ArenaExtendStrategy, CacheStatus, CoreMlComputeUnits, CudnnConvSearch,
    ExecutionProvider, OptLevel, SessionCache, ShapeDims, TrtProfile,
};

fn bytes(s: &str) -> std::result::Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

/// Provider and session flags.
#[derive(Debug, Args)]
pub struct SessionArgs {
    /// Graph optimisation level: disable, basic, extended or all.
    #[arg(long, default_value_t = OptLevel::All)]
    opt_level: OptLevel,
    /// Cache ONNX Runtime's optimised graphs here so later starts skip optimisation: a
    /// directory, `auto` ($XDG_CACHE_HOME/tcd-ort/sessions or ~/.cache/tcd-ort/sessions) or
    /// `off`. Graphs with LoRA weights and TensorRT/DirectML/CoreML sessions are never cached.
    #[arg(long, value_name = "DIR|auto|off", default_value = "off")]
    session_cache: SessionCache,
    /// ONNX Runtime's memory arena for the CPU provider: on is faster (fewer page faults),
    /// and each component's arena lives as long as its session. Default: on, since each
    /// component is released after its stage (full-size SD1.5: 33 s at 4.05 GiB on, 36 s at
    /// 3.68 GiB off); off with --keep-loaded, where the arenas would add up, with --low-memory
    /// unless the UNet runs in segments (each segment's arena then lives for one run of it),
    /// and for float16 exports, whose weights are cast to float32 every
    /// step and would stay in the arena (4.75 instead of 2.50 GiB; a hub id's dtype is not
    /// known before it loads: pass --cpu-arena off for a float16 repository).
    #[arg(
        long,
        value_name = "on|off",
        num_args = 0..=1,
        default_missing_value = "on",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    cpu_arena: Option<bool>,
    /// cuDNN convolution algorithm search with --ep cuda: exhaustive, heuristic (default) or
    /// default.
    #[arg(long, value_name = "MODE")]
    cuda_cudnn_search: Option<CudnnConvSearch>,
    /// CUDA memory arena growth: same-as-requested (default) or next-power-of-two.
    #[arg(long, value_name = "STRATEGY")]
    cuda_arena_extend: Option<ArenaExtendStrategy>,
    /// Cap on CUDA's memory arena, e.g. 6G or 8192M (default: the whole device).
    #[arg(long, value_name = "BYTES", value_parser = bytes)]
    gpu_mem_limit: Option<u64>,
    /// TensorRT fp16 engines (default true).
    #[arg(long, value_name = "BOOL")]
    trt_fp16: Option<bool>,
    /// TensorRT engine and timing cache directory (default $XDG_CACHE_HOME/tcd-ort/tensorrt or
    /// ~/.cache/tcd-ort/tensorrt).
    #[arg(long, value_name = "DIR")]
    trt_cache_dir: Option<PathBuf>,
    /// TensorRT optimisation profile: WxHxB (fixed) or MIN:OPT:MAX, each WIDTHxHEIGHTxBATCH
    /// where the batch counts the guidance pass. Default: --width/--height (or the model's
    /// size) at batch 1 to --num-images (doubled with --guidance > 1).
    #[arg(long, value_name = "PROFILE")]
    trt_profile_shapes: Option<TrtProfile>,
    /// CoreML compute units: all (default), cpu-and-neural-engine, cpu-and-gpu or cpu-only.
    #[arg(long, value_name = "UNITS")]
    coreml_units: Option<CoreMlComputeUnits>,
    /// Feed the UNet and ControlNets from host memory at every step instead of binding the
    /// conditioning, control images and zero residuals on the device once (same results; for
    /// A/B timing).
    #[arg(long)]
    no_io_binding: bool,
    /// Build the UNet (and ControlNet) sessions for exactly this run's size and batch, so
    /// ONNX Runtime folds their shape arithmetic (on CUDA it otherwise runs on the CPU inside
    /// every step). The loaded engine then refuses other sizes.
    #[arg(long)]
    fixed_shape: bool,
    /// Hold one component at a time: the text encoders, the UNet (with its ControlNets) and the
    /// VAE are each loaded for their stage and released before the next one loads. Peak memory
    /// is the largest component's instead of all of them. With --session-cache, a UNet exported
    /// in segments (`python -m export segment`) holds one segment at a time, each loaded from
    /// the cache for its part of every step.
    #[arg(long)]
    low_memory: bool,
    /// Keep every component loaded until the run ends. By default each is released once the
    /// generation is past its stage (the text encoders after the prompt, the UNet before the
    /// VAE decodes): this one-generation process then peaks lower, with the same result.
    #[arg(long, conflicts_with = "low_memory")]
    keep_loaded: bool,
}

impl SessionArgs {
    /// Whether the CPU arena's default depends on the model: no --cpu-arena given, and each
    /// component released after its stage on the CPU provider.
    /// `unet_segments`: low-memory mode will run the UNet in segments
    /// ([`SessionArgs::expects_unet_segments`]).
    pub fn arena_by_default(&self, providers: &[ExecutionProvider], unet_segments: bool) -> bool {
        self.cpu_arena.is_none()
            && !self.keep_loaded
            && (!self.low_memory || unet_segments)
            && providers.contains(&ExecutionProvider::Cpu)
    }

    /// Whether low-memory mode will run `model`'s UNet in segments, read before loading: a
    /// local directory whose manifest lists them, the session cache on, and nothing that
    /// bypasses the cache (`loras` given or recorded in the manifest, --fixed-shape), as
    /// [`tcd_ort::Engine::load`] decides.
    pub fn expects_unet_segments(&self, model: &str, loras: bool) -> bool {
        if !self.low_memory
            || loras
            || self.fixed_shape
            || matches!(self.session_cache, SessionCache::Off)
        {
            return false;
        }
        let root = Path::new(model);
        root.is_dir()
            && tcd_ort::model::ModelDir::open(root)
                .ok()
                .is_some_and(|dir| {
                    let manifest_loras = dir.manifest().is_some_and(|m| !m.lora.is_empty());
                    !manifest_loras && dir.segment_paths("unet").is_ok_and(|p| !p.is_empty())
                })
    }

    /// Whether the model's native size is needed before loading (a derived TensorRT profile
    /// or `--fixed-shape` without both --width and --height).
    pub fn needs_native_size(&self, providers: &[ExecutionProvider]) -> bool {
        self.fixed_shape
            || (providers.contains(&ExecutionProvider::TensorRt)
                && self.trt_profile_shapes.is_none())
    }
}

/// What the request asks of a derived TensorRT profile.
pub struct RequestShape {
    /// `--width`.
    pub width: Option<usize>,
    /// `--height`.
    pub height: Option<usize>,
    /// `--num-images`.
    pub num_images: usize,
    /// Whether classifier-free guidance doubles the batch.
    pub guidance: bool,
    /// The model's native image size, when known before loading.
    pub native_size: Option<usize>,
    /// Whether the model's export is float16 (its manifest, read before loading): on the CPU
    /// its weights are cast to float32 in every step, and an arena would keep those copies.
    pub float16: bool,
    /// Whether low-memory mode will run the UNet in segments
    /// ([`SessionArgs::expects_unet_segments`]): each segment's session, its arena included,
    /// lives for one run of it, so the arena saves time without holding memory.
    pub unet_segments: bool,
}

impl SessionArgs {
    /// Fills the provider and session fields of `options`, refusing flags for providers that
    /// are not in `providers`.
    pub fn apply(
        &self,
        providers: &[ExecutionProvider],
        shape: &RequestShape,
        options: &mut EngineOptions,
    ) -> Result<()> {
        let uses = |ep: ExecutionProvider| providers.contains(&ep);
        let need = |given: bool, flag: &str, eps: &[ExecutionProvider]| -> Result<()> {
            if given && !eps.iter().any(|ep| uses(*ep)) {
                let names: Vec<&str> = eps.iter().map(|ep| ep.as_str()).collect();
                bail!(
                    "{flag} applies only to --ep {}; it has no effect with --ep {}",
                    names.join(" or "),
                    providers
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                );
            }
            Ok(())
        };
        use ExecutionProvider::{CoreMl, Cpu, Cuda, TensorRt};
        need(self.cpu_arena == Some(true), "--cpu-arena", &[Cpu])?;
        need(
            self.cuda_cudnn_search.is_some(),
            "--cuda-cudnn-search",
            &[Cuda, TensorRt],
        )?;
        need(
            self.cuda_arena_extend.is_some(),
            "--cuda-arena-extend",
            &[Cuda, TensorRt],
        )?;
        need(
            self.gpu_mem_limit.is_some(),
            "--gpu-mem-limit",
            &[Cuda, TensorRt],
        )?;
        need(self.trt_fp16.is_some(), "--trt-fp16", &[TensorRt])?;
        need(self.trt_cache_dir.is_some(), "--trt-cache-dir", &[TensorRt])?;
        need(
            self.trt_profile_shapes.is_some(),
            "--trt-profile-shapes",
            &[TensorRt],
        )?;
        need(self.coreml_units.is_some(), "--coreml-units", &[CoreMl])?;

        let po = &mut options.provider_options;
        po.cpu_arena = self
            .cpu_arena
            .unwrap_or(self.arena_by_default(providers, shape.unet_segments) && !shape.float16);
        if let Some(v) = self.cuda_cudnn_search {
            po.cuda.cudnn_conv_search = v;
        }
        if let Some(v) = self.cuda_arena_extend {
            po.cuda.arena_extend = v;
        }
        po.cuda.gpu_mem_limit = self.gpu_mem_limit;
        if let Some(v) = self.trt_fp16 {
            po.tensorrt.fp16 = v;
        }
        po.tensorrt.cache_dir = self.trt_cache_dir.clone();
        po.tensorrt.profile = match self.trt_profile_shapes {
            Some(p) => Some(p),
            None if uses(TensorRt) => {
                let size =
                    |v: Option<usize>, other: Option<usize>| v.or(other).or(shape.native_size);
                match (
                    size(shape.width, shape.height),
                    size(shape.height, shape.width),
                ) {
                    (Some(w), Some(h)) => Some(TrtProfile::for_request(
                        w,
                        h,
                        shape.num_images,
                        shape.guidance,
                    )?),
                    _ => None,
                }
            }
            None => None,
        };
        if let Some(v) = self.coreml_units {
            po.coreml.compute_units = v;
        }
        options.opt_level = self.opt_level;
        options.session_cache = self.session_cache.clone();
        options.io_binding = !self.no_io_binding;
        options.low_memory = self.low_memory;
        options.release_after_use = !self.keep_loaded;
        options.fixed_shape = if self.fixed_shape {
            let size = |v: Option<usize>, other: Option<usize>| v.or(other).or(shape.native_size);
            match (
                size(shape.width, shape.height),
                size(shape.height, shape.width),
            ) {
                (Some(width), Some(height)) => Some(ShapeDims {
                    width,
                    height,
                    batch: shape.num_images * if shape.guidance { 2 } else { 1 },
                }),
                _ => bail!("--fixed-shape needs the output size: pass --width and --height"),
            }
        } else {
            None
        };
        Ok(())
    }
}

/// Whether `model` is a local directory holding a float16 export (`--dtype fp16`), read before
/// loading. A hub id is not looked up (that would ask the hub twice), nor is a directory that
/// cannot be read (the engine then says what is wrong with it): both count as float32.
pub fn float16_model(model: &str) -> bool {
    let root = Path::new(model);
    root.is_dir()
        && tcd_ort::model::ModelDir::open(root)
            .ok()
            .and_then(|dir| dir.manifest()?.dtype.clone())
            .is_some_and(|dtype| dtype == "float16")
}

/// The model's native image size, read before loading when a TensorRT profile needs it.
pub fn native_size(model: &str, revision: Option<&str>) -> Option<usize> {
    let root = tcd_ort::pipeline::resolve_model(model, revision).ok()?;
    let dir = tcd_ort::model::ModelDir::open(&root).ok()?;
    Some(dir.default_image_size())
}

/// The per-graph summary printed after loading: the providers each graph's nodes run on and,
/// with a session cache, what it did.
/// A note for a graph exported with fused attention whose main provider cannot run ONNX
/// Runtime's contrib ops (TensorRT, CoreML): ONNX Runtime hands those nodes to the next provider,
/// splitting the graph around every attention.
fn fused_attention_note(fused: bool, session: &SessionReport) -> Option<String> {
    const NO_CONTRIB_OPS: [&str; 2] = ["TensorrtExecutionProvider", "CoreMLExecutionProvider"];
    let (first, rest) = session.assignment.split_first()?;
    if !fused || rest.is_empty() || !NO_CONTRIB_OPS.contains(&first.provider.as_str()) {
        return None;
    }
    let others: Vec<&str> = rest.iter().map(|a| a.provider.as_str()).collect();
    Some(format!(
        "note: {}'s attention is com.microsoft.MultiHeadAttention (export --attention fused), \
         which {} does not run: those nodes run on {}; export with --attention plain for it",
        session.component,
        first.provider,
        others.join(" and ")
    ))
}

pub fn session_summary(engine: &Engine) -> Vec<String> {
    let sessions = engine.sessions();
    let mut lines = Vec::new();
    let providers: Vec<String> = sessions
        .iter()
        .map(|s| {
            let names: Vec<String> = match s.assignment.as_slice() {
                [] => vec!["unknown".into()],
                [one] => vec![one.provider.clone()],
                many => many
                    .iter()
                    .map(|a| format!("{} ({} nodes)", a.provider, a.nodes))
                    .collect(),
            };
            format!("{}: {}", s.component, names.join(" + "))
        })
        .collect();
    lines.push(format!("providers: {}", providers.join(", ")));
    let manifest = engine.model().manifest();
    for s in &sessions {
        let attention = manifest
            .and_then(|m| m.components.get(&s.component))
            .and_then(|c| c.attention.as_deref());
        lines.extend(fused_attention_note(attention == Some("fused"), s));
    }
    let bound: Vec<&SessionReport> = sessions.iter().filter(|s| s.io_binding).collect();
    lines.push(match bound.as_slice() {
        [] => "io binding: off".to_string(),
        graphs => {
            let names: Vec<&str> = graphs.iter().map(|s| s.component.as_str()).collect();
            let on_device = graphs.iter().any(|s| s.device_inputs);
            format!(
                "io binding: {} ({})",
                names.join(", "),
                if on_device {
                    "conditioning and zero residuals stay on the device"
                } else {
                    "inputs in host memory, bound without copies"
                }
            )
        }
    });
    for s in sessions.iter().filter(|s| s.segments > 0) {
        lines.push(format!(
            "{}: {} segments, each loaded for its part of every step (low-memory mode)",
            s.component, s.segments
        ));
    }
    lines.extend(engine.notes().iter().map(|n| format!("note: {n}")));
    if sessions.iter().any(|s| s.cache != CacheStatus::Off) {
        let cache: Vec<String> = sessions
            .iter()
            .map(|s| format!("{}: {}", s.component, s.cache))
            .collect();
        lines.push(format!("session cache: {}", cache.join(", ")));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcd_ort::runtime::ProviderAssignment;

    fn report(providers: &[&str]) -> SessionReport {
        SessionReport {
            component: "unet".into(),
            assignment: providers
                .iter()
                .map(|p| ProviderAssignment {
                    provider: p.to_string(),
                    nodes: 1,
                })
                .collect(),
            cache: CacheStatus::Off,
            io_binding: false,
            device_inputs: false,
            segments: 0,
        }
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        session: SessionArgs,
    }

    /// The engine options the command line makes of `flags` for `providers`.
    fn applied(flags: &[&str], providers: &[ExecutionProvider]) -> Result<EngineOptions> {
        applied_to(flags, providers, false, false)
    }

    fn applied_to(
        flags: &[&str],
        providers: &[ExecutionProvider],
        float16: bool,
        unet_segments: bool,
    ) -> Result<EngineOptions> {
        let args = <Cli as clap::Parser>::try_parse_from(
            std::iter::once("tcd-ort").chain(flags.iter().copied()),
        )?;
        let shape = RequestShape {
            width: None,
            height: None,
            num_images: 1,
            guidance: false,
            native_size: Some(64),
            float16,
            unet_segments,
        };
        let mut options = EngineOptions::default();
        args.session.apply(providers, &shape, &mut options)?;
        Ok(options)
    }

    #[test]
    fn a_run_releases_each_stage_and_uses_the_cpu_arena_unless_told_otherwise() {
        use ExecutionProvider::{Cpu, Cuda};
        let modes = |flags: &[&str], providers: &[ExecutionProvider]| {
            let o = applied(flags, providers).expect("valid flags");
            (
                o.release_after_use,
                o.low_memory,
                o.provider_options.cpu_arena,
            )
        };
        assert_eq!(modes(&[], &[Cpu]), (true, false, true));
        assert_eq!(modes(&["--keep-loaded"], &[Cpu]), (false, false, false));
        assert_eq!(modes(&["--low-memory"], &[Cpu]), (true, true, false));
        assert_eq!(modes(&["--cpu-arena", "off"], &[Cpu]), (true, false, false));
        assert_eq!(
            modes(&["--keep-loaded", "--cpu-arena"], &[Cpu]),
            (false, false, true)
        );
        assert_eq!(
            modes(&["--low-memory", "--cpu-arena=on"], &[Cpu]),
            (true, true, true)
        );
        // A float16 model's per-step casts would stay in the arena.
        let arena = |flags: &[&str]| {
            applied_to(flags, &[Cpu], true, false)
                .expect("valid flags")
                .provider_options
                .cpu_arena
        };
        assert!(!arena(&[]));
        assert!(arena(&["--cpu-arena"]));
        // Low-memory mode with the UNet in segments: each segment's arena lives for one run.
        let segmented = |flags: &[&str], float16: bool| {
            applied_to(flags, &[Cpu], float16, true)
                .expect("valid flags")
                .provider_options
                .cpu_arena
        };
        assert!(segmented(&["--low-memory"], false));
        assert!(!segmented(&["--low-memory", "--cpu-arena", "off"], false));
        assert!(!segmented(&["--low-memory"], true));
        assert!(!segmented(&["--keep-loaded"], false));
        // Another provider's host fallback keeps ONNX Runtime's default.
        assert_eq!(modes(&[], &[Cuda]), (true, false, false));
        assert_eq!(
            modes(&["--cpu-arena", "off"], &[Cuda]),
            (true, false, false)
        );
        let err = applied(&["--cpu-arena"], &[Cuda]).expect_err("no CPU provider");
        assert!(err.to_string().contains("--cpu-arena"), "{err}");
        let err = applied(&["--keep-loaded", "--low-memory"], &[Cpu]).expect_err("conflict");
        assert!(err.to_string().contains("--low-memory"), "{err}");
        let err = applied(&["--cpu-arena", "sometimes"], &[Cpu]).expect_err("not on or off");
        assert!(err.to_string().contains("sometimes"), "{err}");
    }

    #[test]
    fn float16_exports_are_told_before_loading() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let fixtures = std::env::var_os("TCD_ORT_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("tests").join("fixtures").join("generated"));
        let fp16 = fixtures.join("fp16").join("sd15").join("onnx");
        assert!(
            float16_model(&fp16.to_string_lossy()),
            "{} (run `make fixtures`)",
            fp16.display()
        );
        let fp32 = root.join("models").join("tiny-sd15");
        assert!(!float16_model(&fp32.to_string_lossy()));
        assert!(!float16_model("/no/such/model"));
        assert!(!float16_model("tcd-ort/not-looked-up"));
    }

    #[test]
    fn unet_segments_are_expected_as_the_engine_decides() {
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join("tiny-sd15");
        let tiny = tiny.to_string_lossy();
        let expects = |flags: &[&str], model: &str, loras: bool| {
            let args = <Cli as clap::Parser>::try_parse_from(
                std::iter::once("tcd-ort").chain(flags.iter().copied()),
            )
            .expect("valid flags");
            args.session.expects_unet_segments(model, loras)
        };
        let cached = ["--low-memory", "--session-cache", "/tmp/tcd-ort-unused"];
        assert!(expects(&cached, &tiny, false));
        assert!(!expects(&cached, &tiny, true), "LoRAs bypass the cache");
        assert!(!expects(&["--low-memory"], &tiny, false), "no cache");
        assert!(!expects(
            &["--session-cache", "/tmp/tcd-ort-unused"],
            &tiny,
            false
        ));
        assert!(!expects(
            &[&cached[..], &["--fixed-shape"]].concat(),
            &tiny,
            false
        ));
        assert!(!expects(&cached, "/no/such/model", false));
        assert!(!expects(&cached, "owner/hub-id", false));
    }

    #[test]
    fn fused_attention_is_noted_where_tensorrt_or_coreml_hand_it_on() {
        let trt = report(&["TensorrtExecutionProvider", "CUDAExecutionProvider"]);
        let note = fused_attention_note(true, &trt).expect("a note for TensorRT");
        assert!(
            note.contains("unet") && note.contains("CUDAExecutionProvider"),
            "{note}"
        );
        assert!(note.contains("--attention plain"), "{note}");
        let coreml = report(&["CoreMLExecutionProvider", "CPUExecutionProvider"]);
        assert!(fused_attention_note(true, &coreml).is_some());
        // Plain graphs, graphs TensorRT runs whole, and CUDA (which runs the op) get none.
        assert_eq!(fused_attention_note(false, &trt), None);
        assert_eq!(
            fused_attention_note(true, &report(&["TensorrtExecutionProvider"])),
            None
        );
        let cuda = report(&["CUDAExecutionProvider", "CPUExecutionProvider"]);
        assert_eq!(fused_attention_note(true, &cuda), None);
    }
}
