//! Execution-provider and session start-up flags of `tcd-ort run`, kept apart from the
//! generation flags: they translate to [`ProviderOptions`], [`OptLevel`] and [`SessionCache`].

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use tcd_ort::pipeline::EngineOptions;
use tcd_ort::runtime::{
    parse_bytes, ArenaExtendStrategy, CoreMlComputeUnits, CudnnConvSearch, ExecutionProvider,
    OptLevel, SessionCache, ShapeDims, TrtProfile,
};

fn bytes(s: &str) -> std::result::Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

/// Provider and session flags.
#[derive(Debug, Args)]
pub struct SessionArgs {
    /// Graph optimisation level: disable, basic, extended, all, or auto: `all` for the VAE,
    /// `extended` for the other graphs (the CPU layout `all` adds cost the SD1.5 UNet 3.9 s of
    /// start-up and sped up no step).
    #[arg(long, default_value_t = OptLevel::Auto)]
    opt_level: OptLevel,
    /// Cache ONNX Runtime's optimised graphs here so later starts skip optimisation: a
    /// directory, `auto` ($XDG_CACHE_HOME/tcd-ort/sessions or ~/.cache/tcd-ort/sessions) or
    /// `off`. Graphs with fused LoRA weights and TensorRT/DirectML/CoreML sessions are never
    /// cached (LoRAs in the run-time slots of a `--lora-slots` export keep the cache).
    #[arg(long, value_name = "DIR|auto|off", default_value = "off")]
    session_cache: SessionCache,
    /// The session cache's size limit, e.g. 8G (default 20G): after each store the least
    /// recently used entries are deleted until the cache fits; a graph larger than the limit is
    /// not stored.
    #[arg(long, value_name = "BYTES", value_parser = bytes)]
    session_cache_limit: Option<u64>,
    /// ONNX Runtime's memory arena for the CPU provider: on is faster (fewer page faults),
    /// and each component's arena lives as long as its session. Default: on, since each
    /// component is released after its stage (full-size SD1.5: 33 s at 4.05 GiB on, 36 s at
    /// 3.68 GiB off); off with --keep-loaded, where the arenas would add up, with --low-memory
    /// unless the UNet runs in segments (each segment's arena then lives for one run of it),
    /// and for float16 exports (hub ids included), whose weights are cast to float32 every
    /// step and would stay in the arena (4.75 instead of 2.50 GiB). The engine decides this
    /// default with the model open (`EngineOptions::one_shot`).
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
    /// Whether the UNet's input shape is needed before loading: a derived TensorRT profile or
    /// `--fixed-shape`.
    pub fn needs_unet_shape(&self, providers: &[ExecutionProvider]) -> bool {
        self.fixed_shape
            || (providers.contains(&ExecutionProvider::TensorRt)
                && self.trt_profile_shapes.is_none())
    }
}

/// The UNet input a request makes, as the library works it out
/// ([`tcd_ort::pipeline::unet_shape`]), for a derived TensorRT profile or `--fixed-shape`.
pub struct RequestShape {
    /// Output size and UNet batch.
    pub dims: ShapeDims,
    /// Images per prompt.
    pub num_images: usize,
    /// Whether classifier-free guidance doubles the batch.
    pub guidance: bool,
}

impl SessionArgs {
    /// Fills the provider and session fields of `options`, refusing flags for providers that
    /// are not in `providers`; before the model is read.
    pub fn apply(
        &self,
        providers: &[ExecutionProvider],
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
        // Unset, the engine chooses for the model (`EngineOptions::one_shot`).
        po.cpu_arena = self.cpu_arena;
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
        po.tensorrt.profile = self.trt_profile_shapes;
        if let Some(v) = self.coreml_units {
            po.coreml.compute_units = v;
        }
        options.opt_level = self.opt_level;
        options.session_cache = self.session_cache.clone();
        options.session_cache_limit = self.session_cache_limit;
        options.io_binding = !self.no_io_binding;
        options.low_memory = self.low_memory;
        options.release_after_use = !self.keep_loaded;
        Ok(())
    }

    /// Fills what depends on the request's UNet input (`shape`, when
    /// [`SessionArgs::needs_unet_shape`] asks for it): a TensorRT profile derived from it, and
    /// `--fixed-shape`.
    pub fn apply_shape(
        &self,
        providers: &[ExecutionProvider],
        shape: Option<&RequestShape>,
        options: &mut EngineOptions,
    ) -> Result<()> {
        let po = &mut options.provider_options;
        if po.tensorrt.profile.is_none() && providers.contains(&ExecutionProvider::TensorRt) {
            if let Some(s) = shape {
                po.tensorrt.profile = Some(TrtProfile::for_request(
                    s.dims.width,
                    s.dims.height,
                    s.num_images,
                    s.guidance,
                )?);
            }
        }
        options.fixed_shape = match (self.fixed_shape, shape) {
            (true, Some(s)) => Some(s.dims),
            (true, None) => bail!("--fixed-shape needs the output size: pass --width and --height"),
            (false, _) => None,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        session: SessionArgs,
    }

    /// The engine options the command line makes of `flags` for `providers`.
    fn applied(flags: &[&str], providers: &[ExecutionProvider]) -> Result<EngineOptions> {
        let args = <Cli as clap::Parser>::try_parse_from(
            std::iter::once("tcd-ort").chain(flags.iter().copied()),
        )?;
        let mut options = EngineOptions::one_shot();
        args.session.apply(providers, &mut options)?;
        Ok(options)
    }

    /// What the engine is left to decide is decided by it (`auto_cpu_arena` in the library,
    /// tested there with the model and the segments); the flags only pass on what was said.
    #[test]
    fn a_run_releases_each_stage_and_leaves_the_cpu_arena_to_the_engine_unless_told() {
        use ExecutionProvider::{Cpu, Cuda};
        let modes = |flags: &[&str], providers: &[ExecutionProvider]| {
            let o = applied(flags, providers).expect("valid flags");
            (
                o.release_after_use,
                o.low_memory,
                o.provider_options.cpu_arena,
            )
        };
        assert_eq!(modes(&[], &[Cpu]), (true, false, None));
        assert_eq!(modes(&["--keep-loaded"], &[Cpu]), (false, false, None));
        assert_eq!(modes(&["--low-memory"], &[Cpu]), (true, true, None));
        assert_eq!(
            modes(&["--cpu-arena", "off"], &[Cpu]),
            (true, false, Some(false))
        );
        assert_eq!(
            modes(&["--keep-loaded", "--cpu-arena"], &[Cpu]),
            (false, false, Some(true))
        );
        assert_eq!(
            modes(&["--low-memory", "--cpu-arena=on"], &[Cpu]),
            (true, true, Some(true))
        );
        assert_eq!(
            modes(&["--cpu-arena", "off"], &[Cuda]),
            (true, false, Some(false))
        );
        let err = applied(&["--cpu-arena"], &[Cuda]).expect_err("no CPU provider");
        assert!(err.to_string().contains("--cpu-arena"), "{err}");
        let err = applied(&["--keep-loaded", "--low-memory"], &[Cpu]).expect_err("conflict");
        assert!(err.to_string().contains("--low-memory"), "{err}");
        let err = applied(&["--cpu-arena", "sometimes"], &[Cpu]).expect_err("not on or off");
        assert!(err.to_string().contains("sometimes"), "{err}");
    }

    #[test]
    fn shapes_come_from_the_request_as_the_library_works_them_out() {
        use ExecutionProvider::{Cpu, TensorRt};
        let args = |flags: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(
                std::iter::once("tcd-ort").chain(flags.iter().copied()),
            )
            .expect("valid flags")
            .session
        };
        let shape = RequestShape {
            dims: ShapeDims {
                width: 64,
                height: 96,
                batch: 4,
            },
            num_images: 2,
            guidance: true,
        };
        let fixed = args(&["--fixed-shape"]);
        assert!(fixed.needs_unet_shape(&[Cpu]));
        let mut options = EngineOptions::one_shot();
        fixed
            .apply_shape(&[Cpu], Some(&shape), &mut options)
            .expect("a shape");
        assert_eq!(options.fixed_shape, Some(shape.dims));
        let err = fixed
            .apply_shape(&[Cpu], None, &mut EngineOptions::one_shot())
            .expect_err("no shape");
        assert!(err.to_string().contains("--width"), "{err}");
        let trt = args(&[]);
        assert!(trt.needs_unet_shape(&[TensorRt]) && !trt.needs_unet_shape(&[Cpu]));
        let mut options = EngineOptions::one_shot();
        trt.apply_shape(&[TensorRt], Some(&shape), &mut options)
            .expect("a profile");
        assert_eq!(
            options.provider_options.tensorrt.profile,
            Some(TrtProfile::for_request(64, 96, 2, true).expect("profile"))
        );
    }
}
