//! `tcd-ort serve`: loads the model once per worker and serves the A1111 and OpenAI image
//! APIs ([`tcd_ort::server`]) until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tcd_ort::model::ModelDir;
use tcd_ort::pipeline::{Engine, EngineOptions};
use tcd_ort::runtime::parse_provider_list;
use tcd_ort::server::{serve as run_server, ServeOptions};

use super::engine_args::EngineArgs;
use super::report::{lora_summary, session_summary};

/// `tcd-ort serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Address and port to listen on (port 0 picks a free one; the address in use is printed).
    #[arg(long, default_value = "127.0.0.1:7860")]
    listen: SocketAddr,
    /// LoRAs requests may name: the .safetensors files of this directory, by file stem
    /// (`<lora:NAME:WEIGHT>` in A1111 prompts, `loras` in OpenAI requests).
    #[arg(long, value_name = "DIR")]
    lora_dir: Option<PathBuf>,
    /// A ControlNet (a directory or hub id of a `python -m export controlnet` export), loaded
    /// for A1111 requests' `alwayson_scripts.controlnet` units (one unit per ControlNet, in
    /// this order). Repeatable.
    #[arg(long = "controlnet", value_name = "DIR_OR_ID")]
    controlnets: Vec<String>,
    /// The depth estimator for units with `module: "depth"` (a `python -m export depth`
    /// export).
    #[arg(long, value_name = "DIR_OR_ID")]
    depth_model: Option<String>,
    /// Require this key on every route but /healthz: `Authorization: Bearer KEY`, or HTTP
    /// Basic auth with the key as password. Default: the TCD_ORT_API_KEY environment variable.
    #[arg(long, env = "TCD_ORT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests that may wait for a worker; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 8)]
    queue: usize,
    /// Generation workers, each with its own copy of the model in memory.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The most seconds a request may take, waiting included (then 504).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// The largest request body in MiB (images come base64-encoded in JSON).
    #[arg(long, default_value_t = 32)]
    max_body_mb: usize,
    /// Seconds a shutdown (SIGTERM, Ctrl-C) waits for accepted requests before stopping them.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// No request log on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// Runs `tcd-ort serve`.
pub fn serve(args: ServeArgs) -> Result<()> {
    if args.workers == 0 || args.workers > 64 {
        bail!("--workers must be between 1 and 64");
    }
    if args.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    if args.max_body_mb == 0 || args.max_body_mb > 4096 {
        bail!("--max-body-mb must be between 1 and 4096");
    }
    if args.api_key.as_deref().is_some_and(str::is_empty) {
        bail!("--api-key must not be empty");
    }
    if let Some(dir) = &args.lora_dir {
        if !dir.is_dir() {
            bail!("--lora-dir {}: not a directory", dir.display());
        }
    }
    let providers = parse_provider_list(&args.engine.ep)?;
    let mut options = EngineOptions {
        controlnets: args.controlnets.clone(),
        depth_estimator: args.depth_model.clone(),
        ..args.engine.options(&providers, EngineOptions::default())?
    };
    options.validate()?;
    args.engine.session.apply(&providers, &mut options)?;
    args.engine
        .session
        .apply_shape(&providers, None, &mut options)?;
    let started = Instant::now();
    let model = ModelDir::resolve(&args.engine.model, args.engine.revision.as_deref())?;
    let mut engines = Vec::with_capacity(args.workers);
    for _ in 0..args.workers {
        engines.push(Engine::from_model(model.clone(), &options)?);
    }
    let engine = &engines[0];
    eprintln!(
        "loaded {} ({:?}) in {:.1}s: {} worker(s) on {}",
        args.engine.model,
        engine.model().family(),
        started.elapsed().as_secs_f32(),
        args.workers,
        engine
            .providers()
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    for line in session_summary(engine)
        .into_iter()
        .chain(lora_summary(engine.lora_report()))
    {
        eprintln!("{line}");
    }
    if !args.quiet {
        tcd_ort::server::log_requests();
    }
    let options = ServeOptions {
        listen: args.listen,
        api_key: args.api_key.clone(),
        queue: args.queue,
        timeout: Duration::from_secs(args.timeout),
        max_body: args.max_body_mb << 20,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        lora_dir: args.lora_dir.clone(),
        model_name: args.engine.model_name(),
    };
    run_server(engines, options, |address| {
        eprintln!("listening on http://{address}");
    })
    .with_context(|| format!("serving on {}", args.listen))
}
