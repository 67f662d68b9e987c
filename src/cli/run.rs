//! `tcd-ort run`: text-to-image, image-to-image (`--image`) and inpainting (`--image --mask`)
//! from the command line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use tcd_ort::image_io::{
    check_fps, image_grid, load_image, mask_preview, resize_lanczos, stage_bytes, stage_npy,
    stage_png, PendingFile, RgbImage, DEFAULT_FPS, MAX_FPS,
};
use tcd_ort::lora::parse_weighted_source;
use tcd_ort::model::ModelDir;
use tcd_ort::pipeline::{
    animation_frames, output_size, parameters_text, unet_shape, ControlImage, ControlPreprocess,
    Engine, EngineOptions, GenerateRequest, Generated, InpaintMode, IpAdapterImage, Task,
};
use tcd_ort::runtime::{parse_provider_list, ExecutionProvider};

use super::animation::{is_animation_path, Outputs};
use super::engine_args::EngineArgs;
use super::interrupt::{self, Phase};
use super::output::{check_outputs, commit_outputs, run_stats_since, ProgressBar, Timeline};
use super::report::{lora_summary, session_summary};
use super::session_args::RequestShape;

/// `--inpaint-mode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum InpaintModeArg {
    Auto,
    Blend,
    Unet,
}

impl From<InpaintModeArg> for InpaintMode {
    fn from(m: InpaintModeArg) -> Self {
        match m {
            InpaintModeArg::Auto => InpaintMode::Auto,
            InpaintModeArg::Blend => InpaintMode::Blend,
            InpaintModeArg::Unet => InpaintMode::Unet,
        }
    }
}

/// `--control-preprocess` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ControlPreprocessArg {
    None,
    Canny,
    Depth,
}

/// Arguments of `tcd-ort run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// What to steer away from (used when --guidance > 1).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Denoising steps (TCD works well with 2 to 8).
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// TCD's gamma in [0, 1]: stochasticity of each step; higher blurs, 0.3 is a good default.
    #[arg(long, default_value_t = 0.3)]
    eta: f32,
    /// Classifier-free guidance scale; 0 (or anything <= 1) runs no unconditional pass.
    #[arg(long, default_value_t = 0.0)]
    guidance: f32,
    /// Seed; the same seed gives the noise diffusers draws with torch.Generator("cpu").manual_seed(N).
    /// Random when omitted (it is printed and stored in the PNG).
    #[arg(long)]
    seed: Option<u64>,
    /// Image width in pixels (a multiple of 8); defaults to the model's native size.
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels (a multiple of 8); defaults to the model's native size.
    #[arg(long)]
    height: Option<usize>,
    /// Images to generate for the prompt; several are written as NAME-1.png, NAME-2.png, ...
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// TCD's original_inference_steps (length of the distillation schedule); default from the
    /// scheduler config (50).
    #[arg(long)]
    original_inference_steps: Option<usize>,
    /// Start from this image (PNG or JPEG): image-to-image, or inpainting with --mask. The output
    /// size defaults to the image's, rounded down to a multiple of 8.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Inpainting mask: white repaints, black keeps; resized to the output size if it differs.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// How much of --image to repaint, in (0, 1]: the share of the schedule that runs.
    /// Default 0.8 for image-to-image, 1.0 for inpainting (diffusers' SD defaults).
    #[arg(long)]
    strength: Option<f64>,
    /// Inpainting method: auto (follow the UNet), blend (latent blending with a regular UNet) or
    /// unet (a 9-channel inpainting UNet); a method the model cannot do is an error.
    #[arg(long, value_enum, default_value_t = InpaintModeArg::Auto)]
    inpaint_mode: InpaintModeArg,
    /// A ControlNet (a directory or hub id of a `python -m export controlnet` export) with an
    /// optional conditioning scale (`DIR:0.5`; default 1.0, 0.5 generalises well with TCD).
    /// Repeat for several: their residuals add up. Give one --control-image per ControlNet.
    #[arg(long = "controlnet", value_name = "DIR_OR_ID[:SCALE]")]
    controlnets: Vec<String>,
    /// The control image of each --controlnet, in the same order (PNG or JPEG); resized to the
    /// output size, which defaults to the first control image's.
    #[arg(long = "control-image", value_name = "PATH")]
    control_images: Vec<PathBuf>,
    /// How each control image is made: none (it already is an edge or depth map), canny (edges
    /// of a photo, as cv2.Canny), depth (a depth map of a photo, with --depth-model). One value
    /// for every ControlNet, or one per ControlNet.
    #[arg(long = "control-preprocess", value_enum)]
    control_preprocess: Vec<ControlPreprocessArg>,
    /// Canny's lower hysteresis threshold.
    #[arg(long, default_value_t = 100.0)]
    canny_low: f32,
    /// Canny's upper hysteresis threshold.
    #[arg(long, default_value_t = 200.0)]
    canny_high: f32,
    /// Fraction of the steps before each ControlNet starts acting (diffusers'
    /// control_guidance_start); one value, or one per ControlNet.
    #[arg(long = "control-start")]
    control_start: Vec<f32>,
    /// Fraction of the steps after which each ControlNet stops (control_guidance_end); one
    /// value, or one per ControlNet.
    #[arg(long = "control-end")]
    control_end: Vec<f32>,
    /// The depth estimator for --control-preprocess depth: a directory or hub id of a
    /// `python -m export depth` export (e.g. of Intel/dpt-hybrid-midas).
    #[arg(long)]
    depth_model: Option<String>,
    /// An IP-Adapter (a directory or hub id of a `python -m export ip-adapter` export, for the
    /// model's base): --ip-adapter-image steers the generation.
    #[arg(long, value_name = "DIR_OR_ID")]
    ip_adapter: Option<String>,
    /// The IP-Adapter's reference image (PNG or JPEG, any size: CLIP's pre-processing crops
    /// its centre square).
    #[arg(long, value_name = "PATH")]
    ip_adapter_image: Option<PathBuf>,
    /// How strongly the reference image steers, from 0 to 10 (diffusers' set_ip_adapter_scale;
    /// default 1.0, the TCD guide uses 0.5).
    #[arg(long, value_name = "F")]
    ip_adapter_scale: Option<f32>,
    /// Also write the inputs (image, mask, control images as the ControlNets saw them) and the
    /// results side by side to this PNG.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Output path: a .png for a still-image model; for an AnimateDiff model a .gif, an .apng
    /// or a directory (a path without an extension) of numbered PNGs. Several images or videos
    /// get numbers (out-1.png, out-2.png ...).
    #[arg(long, short)]
    output: PathBuf,
    /// Frames of each video, on an AnimateDiff model (default 16, at most the motion
    /// adapter's maximum).
    #[arg(long)]
    frames: Option<usize>,
    /// Frames per second of a .gif or .apng output (default 8).
    #[arg(long)]
    fps: Option<u32>,
    /// How many images or frames the VAE decodes at a time: lower bounds the decoder's memory,
    /// the pixels are the same (default: every image at once, 16 frames at a time).
    #[arg(long, value_name = "N")]
    decode_chunk: Option<usize>,
    /// Decode (and encode --image) in overlapping tiles of the VAE's sample size, as diffusers'
    /// enable_vae_tiling(): bounded VAE memory for large images, slightly different pixels.
    #[arg(long)]
    vae_tiling: bool,
    /// Replace existing output files. A symbolic link in an output's place is replaced by the
    /// new file; the file it points to is left as it was.
    #[arg(long)]
    overwrite: bool,
    /// Also write the final latents (before VAE decoding) as a NumPy .npy file.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Write where the time went to this JSON file (for benchmarks): load, prompt encoding,
    /// each denoising step, VAE decoding and the whole run, and the time spent inside ONNX
    /// Runtime's Run per graph, in seconds.
    #[arg(long)]
    timings: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    // Keep seeds in the range torch's manual_seed accepts everywhere.
    (nanos as u64 ^ u64::from(std::process::id()).rotate_left(32)) & 0x7fff_ffff_ffff_ffff
}

/// Reads the image an option names; errors say which option.
fn read_image(flag: &str, path: &Path) -> Result<tcd_ort::image_io::RgbImage> {
    load_image(path).with_context(|| flag.to_string())
}

/// One value for every ControlNet, or one each.
fn per_controlnet<T: Copy>(flag: &str, values: &[T], default: T, count: usize) -> Result<Vec<T>> {
    match values.len() {
        0 => Ok(vec![default; count]),
        1 => Ok(vec![values[0]; count]),
        n if n == count => Ok(values.to_vec()),
        n => bail!("{flag} was given {n} times for {count} ControlNet(s): give it once, or once per --controlnet"),
    }
}

/// The ControlNet sources and the control images of the request.
fn control_args(args: &RunArgs) -> Result<(Vec<String>, Vec<ControlImage>)> {
    let count = args.controlnets.len();
    if count == 0 {
        if !args.control_images.is_empty() {
            bail!("--control-image needs a --controlnet to read it");
        }
        if !args.control_preprocess.is_empty()
            || !args.control_start.is_empty()
            || !args.control_end.is_empty()
        {
            bail!("--control-preprocess, --control-start and --control-end need a --controlnet");
        }
        return Ok((Vec::new(), Vec::new()));
    }
    if args.control_images.len() != count {
        bail!(
            "{count} --controlnet but {} --control-image: give one control image per ControlNet, in the same order",
            args.control_images.len()
        );
    }
    let preprocess = per_controlnet(
        "--control-preprocess",
        &args.control_preprocess,
        ControlPreprocessArg::None,
        count,
    )?;
    if preprocess.contains(&ControlPreprocessArg::Depth) && args.depth_model.is_none() {
        bail!("--control-preprocess depth needs --depth-model DIR_OR_ID (a `python -m export depth` export of e.g. Intel/dpt-hybrid-midas)");
    }
    let starts = per_controlnet("--control-start", &args.control_start, 0.0, count)?;
    let ends = per_controlnet("--control-end", &args.control_end, 1.0, count)?;
    let mut sources = Vec::with_capacity(count);
    let mut control = Vec::with_capacity(count);
    for (i, spec) in args.controlnets.iter().enumerate() {
        let (source, scale) = parse_weighted_source("--controlnet", "SCALE", spec)?;
        let image = read_image(
            &format!("--control-image {}", i + 1),
            &args.control_images[i],
        )?;
        control.push(ControlImage {
            image,
            scale,
            start: starts[i],
            end: ends[i],
            preprocess: match preprocess[i] {
                ControlPreprocessArg::None => ControlPreprocess::None,
                ControlPreprocessArg::Canny => ControlPreprocess::Canny {
                    low: args.canny_low,
                    high: args.canny_high,
                },
                ControlPreprocessArg::Depth => ControlPreprocess::Depth,
            },
        });
        sources.push(source);
    }
    Ok((sources, control))
}

/// The paths and flag combinations `run` refuses before it reads anything.
fn check_flags(args: &RunArgs) -> Result<()> {
    let is = |p: &Path, ext: &str| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case(ext))
    };
    if !is(&args.output, "png") && !is_animation_path(&args.output) {
        bail!(
            "--output must be a .png path (or, for an AnimateDiff model, a .gif, an .apng or a \
             directory), got {}",
            args.output.display()
        );
    }
    if let Some(fps) = args.fps {
        if !is_animation_path(&args.output) {
            bail!("--fps needs an animation --output (.gif or .apng)");
        }
        check_fps(fps).map_err(|_| {
            anyhow::anyhow!("--fps must be from 1 to {MAX_FPS} frames per second, got {fps}")
        })?;
    }
    if let Some(p) = &args.save_latents {
        if p.extension().and_then(|e| e.to_str()) != Some("npy") {
            bail!("--save-latents must be a .npy path, got {}", p.display());
        }
    }
    if args.image.is_none() {
        if args.mask.is_some() {
            bail!("--mask needs --image (the picture to inpaint)");
        }
        if args.strength.is_some() {
            bail!("--strength needs --image (it says how much of that image to repaint)");
        }
        if args.grid.is_some() && args.control_images.is_empty() && args.ip_adapter_image.is_none()
        {
            bail!(
                "--grid needs --image, --control-image or --ip-adapter-image (it shows the inputs \
                 beside the result)"
            );
        }
    }
    if args.mask.is_none() && args.inpaint_mode != InpaintModeArg::Auto {
        bail!("--inpaint-mode needs --image and --mask");
    }
    match (&args.ip_adapter, &args.ip_adapter_image) {
        (Some(_), None) => bail!("--ip-adapter needs --ip-adapter-image (the reference image)"),
        (None, Some(_)) => bail!("--ip-adapter-image needs --ip-adapter (the adapter to read it)"),
        _ if args.ip_adapter_scale.is_some() && args.ip_adapter.is_none() => {
            bail!("--ip-adapter-scale needs --ip-adapter and --ip-adapter-image")
        }
        _ => {}
    }
    if let Some(p) = args.grid.as_deref().filter(|p| !is(p, "png")) {
        bail!("--grid must be a .png path, got {}", p.display());
    }
    Ok(())
}

/// The request, the task and the ControlNet sources the flags ask for, checked by the library
/// (its refusals name fields, which `cli::main` shows as flags).
fn build_request(args: &RunArgs, seed: u64) -> Result<(GenerateRequest, Task, Vec<String>)> {
    let task = match (&args.image, &args.mask) {
        (None, _) => Task::TextToImage,
        (Some(image), None) => Task::ImageToImage {
            image: read_image("--image", image)?,
            strength: args.strength.unwrap_or(0.8),
        },
        (Some(image), Some(mask)) => Task::Inpaint {
            image: read_image("--image", image)?,
            mask: read_image("--mask", mask)?,
            strength: args.strength.unwrap_or(1.0),
            mode: args.inpaint_mode.into(),
        },
    };
    task.validate()?;
    let (controlnets, control) = control_args(args)?;
    if !control.is_empty() && args.image.is_some() {
        bail!("ControlNet runs with text-to-image only; drop --image/--mask or the ControlNets");
    }
    let request = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        eta: args.eta,
        guidance: args.guidance,
        seed,
        width: args.width,
        height: args.height,
        num_images: args.num_images,
        original_inference_steps: args.original_inference_steps,
        control,
        ip_adapter: match &args.ip_adapter_image {
            Some(path) => Some(IpAdapterImage {
                image: read_image("--ip-adapter-image", path)?,
                scale: args.ip_adapter_scale.unwrap_or(1.0),
            }),
            None => None,
        },
        frames: args.frames,
        decode_chunk: args.decode_chunk,
        vae_tiling: args.vae_tiling,
    };
    request.validate()?;
    Ok((request, task, controlnets))
}

/// The engine options of the flags, on the library's preset for a one-generation process.
fn engine_options(
    args: &RunArgs,
    providers: &[ExecutionProvider],
    controlnets: Vec<String>,
) -> Result<EngineOptions> {
    Ok(EngineOptions {
        controlnets,
        depth_estimator: args.depth_model.clone(),
        ip_adapter: args.ip_adapter.clone(),
        ..args.engine.options(providers, EngineOptions::one_shot())?
    })
}

/// What loading did, for stderr.
fn load_report(args: &RunArgs, engine: &Engine, seconds: f32) -> Vec<String> {
    let providers: Vec<&str> = engine.providers().iter().map(|p| p.as_str()).collect();
    let mut lines = vec![format!(
        "loaded {} ({:?}) in {seconds:.1}s on {} with ONNX Runtime {}",
        args.engine.model,
        engine.model().family(),
        providers.join(","),
        engine.ort_library().display()
    )];
    lines.extend(session_summary(engine));
    lines.extend(lora_summary(engine.lora_report()));
    lines
}

/// Writes the images or videos, the grid and the latents to temporaries beside their
/// destinations, to be committed together once every output of the run is written.
fn stage_outputs(
    args: &RunArgs,
    (request, task, controlnets): (&GenerateRequest, &Task, &[String]),
    generated: &Generated,
    outputs: &Outputs,
) -> Result<Vec<PendingFile>> {
    let model_name = args.engine.model_name();
    let text = |image: &RgbImage| {
        let parameters = parameters_text(
            request,
            task,
            (image.width, image.height),
            &model_name,
            (controlnets, args.ip_adapter.as_deref()),
        );
        vec![
            ("parameters", parameters),
            ("Software", format!("tcd-ort {}", env!("CARGO_PKG_VERSION"))),
        ]
    };
    let fps = args.fps.unwrap_or(DEFAULT_FPS);
    let mut staged = outputs.stage(generated, fps, args.overwrite, &text)?;
    if let (Some(path), Some(first)) = (&args.grid, generated.images.first()) {
        let (w, h) = (first.width, first.height);
        let mut cells = Vec::new();
        match task {
            Task::TextToImage => {}
            Task::ImageToImage { image, .. } => cells.push(resize_lanczos(image, w, h)?),
            Task::Inpaint { image, mask, .. } => {
                cells.push(resize_lanczos(image, w, h)?);
                cells.push(mask_preview(mask, w, h)?);
            }
        }
        cells.extend(generated.control_images.iter().cloned());
        if let Some(reference) = &request.ip_adapter {
            cells.push(resize_lanczos(&reference.image, w, h)?);
        }
        cells.extend(generated.images.iter().cloned());
        let grid = image_grid(&cells.iter().collect::<Vec<_>>())?;
        staged.push(
            stage_png(path, &grid, &[], args.overwrite)
                .with_context(|| format!("writing --grid {}", path.display()))?,
        );
    }
    if let Some(path) = &args.save_latents {
        staged.push(
            stage_npy(path, &generated.latents, args.overwrite)
                .with_context(|| format!("writing --save-latents {}", path.display()))?,
        );
    }
    Ok(staged)
}

/// Runs `tcd-ort run`.
pub fn run(args: RunArgs) -> Result<()> {
    interrupt::install()?;
    let providers: Vec<ExecutionProvider> = parse_provider_list(&args.engine.ep)?;
    check_flags(&args)?;
    let seed = args.seed.unwrap_or_else(random_seed);
    // Cheap checks first, so a bad request fails before minutes of model loading.
    let (mut request, task, controlnets) = build_request(&args, seed)?;
    let mut options = engine_options(&args, &providers, controlnets.clone())?;
    options.validate()?;
    let load_started = Instant::now();
    let model = ModelDir::resolve(&args.engine.model, args.engine.revision.as_deref())?;
    // An animation model's frame count, and the output kind it needs.
    request.frames = animation_frames(&model, &request, &task)?;
    let outputs = Outputs::plan(&args.output, request.frames, request.num_images)?;
    let mut all_outputs: Vec<(&str, PathBuf)> = outputs
        .files()
        .into_iter()
        .map(|p| ("--output", p))
        .collect();
    all_outputs.extend(
        args.save_latents
            .iter()
            .map(|p| ("--save-latents", p.clone())),
    );
    all_outputs.extend(args.grid.iter().map(|p| ("--grid", p.clone())));
    all_outputs.extend(args.timings.iter().map(|p| ("--timings", p.clone())));
    check_outputs(&all_outputs, args.overwrite)?;

    args.engine.session.apply(&providers, &mut options)?;
    output_size(&model, &request, &task, &options.limits)?;
    // The UNet's input shape, for a TensorRT profile or fixed shapes, as the engine will see it.
    let shape = if args.engine.session.needs_unet_shape(&providers) {
        Some(RequestShape {
            dims: unet_shape(&model, &request, &task, &options.limits)?,
            num_images: request.num_images,
            guidance: request.uses_guidance(&model),
        })
    } else {
        None
    };
    args.engine
        .session
        .apply_shape(&providers, shape.as_ref(), &mut options)?;
    let mut engine = Engine::from_model(model, &options)?;
    if !args.quiet {
        for line in load_report(&args, &engine, load_started.elapsed().as_secs_f32()) {
            eprintln!("{line}");
        }
        if args.seed.is_none() {
            eprintln!("seed: {seed}");
        }
    }
    let mut bar = ProgressBar::new(!args.quiet);
    let mut timeline = Timeline::default();
    let runs_before = engine.run_stats();
    let generate_started = Instant::now();
    interrupt::enter(Phase::Generating);
    let generated = engine.run(&request, &task, &mut |event| {
        timeline.record(event, generate_started.elapsed().as_secs_f64());
        bar.update(event) && !interrupt::requested()
    });
    interrupt::enter(Phase::Writing);
    let generated = match (generated, interrupt::stopped()) {
        (Err(tcd_ort::Error::Cancelled), Some(stopped)) => return Err(stopped.into()),
        (generated, _) => generated?,
    };
    for warning in &generated.warnings {
        eprintln!("warning: {warning}");
    }
    let generate_s = generate_started.elapsed().as_secs_f64();
    let load_s = generate_started.duration_since(load_started).as_secs_f64();
    let runs = run_stats_since(&runs_before, engine.run_stats());
    let mut staged = stage_outputs(&args, (&request, &task, &controlnets), &generated, &outputs)?;
    if let Some(path) = &args.timings {
        let total = load_started.elapsed().as_secs_f64();
        let mut json = timeline.to_json(load_s, generate_s, total, &runs);
        json["io_binding"] = engine.io_binding().into();
        staged.push(
            stage_bytes(path, args.overwrite, format!("{json:#}\n").as_bytes())
                .with_context(|| format!("writing --timings {}", path.display()))?,
        );
    }
    commit_outputs(staged, args.quiet)
}
