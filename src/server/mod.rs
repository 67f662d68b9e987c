//! `tcd-ort serve`: the AUTOMATIC1111 and OpenAI image APIs over HTTP (feature `server`).
//!
//! Routes translate their payloads into [`GenerateRequest`]s and answers into the APIs' shapes;
//! everything else is the library's: requests are checked by it ([`output_size`],
//! [`GenerateRequest::validate`]), run by [`Engine`]s on worker threads ([`queue`]), and LoRAs
//! named per request are switched into the loaded engine ([`Engine::set_loras`]). The async
//! runtime only parses, waits and answers.
//!
//! Behaviour under load: a bounded queue (429 with `Retry-After` when full), a time limit per
//! request (504), generation stopped between steps when its client disconnects, body size
//! limited (413), `--api-key` checked on every route but `/healthz`. On SIGTERM or Ctrl-C the
//! server stops accepting connections, answers what it accepted (after `shutdown_grace` the
//! remaining jobs are stopped and answered 503) and returns.

mod a1111;
mod auth;
mod catalog;
mod controlnet;
mod error;
mod images;
mod metrics;
mod openai;
pub mod queue;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::model::ModelDir;
use crate::pipeline::{
    animation_frames, output_size, Engine, Field, GenerateRequest, Limits, LoraSpec, Task,
};
use crate::{Error, Result};
pub use catalog::{take_lora_tags, LoraCatalog};
use error::{ApiError, Flavor};
use metrics::Metrics;
use queue::{Done, Queue, Ticket, Work};

/// How a server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Required as a bearer token (or Basic password) on every route but `/healthz`.
    pub api_key: Option<String>,
    /// Jobs that may wait for a worker; more are answered 429.
    pub queue: usize,
    /// The most a request may take, waiting included.
    pub timeout: Duration,
    /// The largest request body, in bytes.
    pub max_body: usize,
    /// How long a shutdown waits for accepted work before stopping it.
    pub shutdown_grace: Duration,
    /// The LoRAs requests may name.
    pub lora_dir: Option<PathBuf>,
    /// The model's name in answers (`sd_model_checkpoint`).
    pub model_name: String,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 7860)),
            api_key: None,
            queue: 8,
            timeout: Duration::from_secs(600),
            max_body: 32 << 20,
            shutdown_grace: Duration::from_secs(30),
            lora_dir: None,
            model_name: "model".into(),
        }
    }
}

/// What every handler sees.
pub struct Server {
    queue: Arc<Queue>,
    loras: LoraCatalog,
    metrics: Arc<Metrics>,
    model: ModelDir,
    model_name: String,
    limits: Limits,
    /// ControlNets loaded: A1111 requests send one unit per ControlNet.
    controlnets: usize,
    api_key: Option<String>,
    draining: AtomicBool,
}

type AppState = Arc<Server>;
type Shared = State<AppState>;

impl Server {
    /// The library's checks of a request against the model, before it waits in the queue.
    fn check(&self, request: &GenerateRequest, task: &Task) -> Result<()> {
        request.validate()?;
        task.validate()?;
        animation_frames(&self.model, request, task)?;
        output_size(&self.model, request, task, &self.limits)?;
        Ok(())
    }
}

/// Parses a JSON body; a refusal names the field at fault (`steps: invalid type: string`).
fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    flavor: Flavor,
) -> std::result::Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || path == "." {
            ApiError::bad_request(flavor, None, format!("invalid JSON body: {inner}"))
        } else {
            ApiError::bad_request(flavor, Some(&path), format!("{path}: {inner}"))
        }
    })
}

/// Logs each request and its answer to stderr (tower-http's trace at `info`), unless
/// `RUST_LOG` says otherwise. Front ends call it once; a host embedding the server keeps its
/// own subscriber.
pub fn log_requests() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tower_http=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// A seed in A1111's range (a 32-bit integer) when the request has none.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() & 0xffff_ffff
}

/// Queues a job and waits for its answer; dropping the future (a client that went away)
/// stops the job.
async fn generate(
    state: &AppState,
    runs: Vec<GenerateRequest>,
    task: Task,
    loras: Vec<LoraSpec>,
    flavor: Flavor,
    name: fn(Field) -> &'static str,
) -> std::result::Result<Done, ApiError> {
    let work = Work { runs, task, loras };
    let (answer, flag) = state
        .queue
        .submit(work)
        .map_err(|r| ApiError::from_refused(flavor, r))?;
    let ticket = Ticket::new(flag);
    let answer = answer.await.map_err(|_| {
        ApiError::new(
            flavor,
            StatusCode::INTERNAL_SERVER_ERROR,
            "the worker ended without answering",
        )
    })?;
    ticket.done();
    answer.map_err(|f| ApiError::from_failed(flavor, f, name))
}

async fn healthz(State(state): Shared) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        )
            .into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics_text(State(state): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

/// Counts every answer by route and status.
async fn count(State(state): Shared, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let response = next.run(request).await;
    state
        .metrics
        .record_request(&route, response.status().as_u16());
    response
}

/// A body over the limit, a wrong method or an unknown route, in the API's error shape.
async fn shape_errors(request: Request, next: Next) -> Response {
    let flavor = if request.uri().path().starts_with("/v1/") {
        Flavor::OpenAi
    } else {
        Flavor::A1111
    };
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            "the request body is larger than the server accepts (--max-body-mb)"
        }
        StatusCode::NOT_FOUND => "no such route (GET /openapi.json lists them)",
        StatusCode::METHOD_NOT_ALLOWED => "this route does not take that method",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported content type",
        _ => return response,
    };
    let mut answer = if is_json {
        response
    } else {
        ApiError::new(flavor, status, message).into_response()
    };
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body was not read: the connection cannot carry another request.
        answer.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    answer
}

fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/options", get(a1111::options))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/loras", get(a1111::loras))
        .route("/v1/images/generations", post(openai::generations))
        .route("/v1/images/edits", post(openai::edits))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(middleware::from_fn(shape_errors))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .with_state(state)
}

/// Serves `engines` (one worker each, all loaded from the same model) until SIGTERM or
/// Ctrl-C; `ready` hears the address once the server listens.
pub fn serve(
    engines: Vec<Engine>,
    options: ServeOptions,
    ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    let model = engines
        .first()
        .map(|e| e.model().clone())
        .ok_or_else(|| Error::invalid("serve needs at least one engine"))?;
    let limits = engines[0].limits();
    let controlnets = engines[0].controlnets().len();
    let metrics = Arc::new(Metrics::default());
    let queue = Queue::new(options.queue.max(1), options.timeout, metrics.clone());
    let loras = LoraCatalog::open(options.lora_dir.as_deref())?;
    let mut workers = Vec::new();
    for (k, engine) in engines.into_iter().enumerate() {
        workers.push(
            queue
                .spawn_worker(k, engine)
                .map_err(|e| Error::io("a worker thread", e))?,
        );
    }
    let state = Arc::new(Server {
        queue: queue.clone(),
        loras,
        metrics,
        model,
        model_name: options.model_name.clone(),
        limits,
        controlnets,
        api_key: options.api_key.clone(),
        draining: AtomicBool::new(false),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tcd-ort-http")
        .enable_all()
        .build()
        .map_err(|e| Error::io("the HTTP runtime", e))?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|e| Error::io(options.listen.to_string(), e))?;
        let address = listener
            .local_addr()
            .map_err(|e| Error::io(options.listen.to_string(), e))?;
        // Listening for signals before saying so: a SIGTERM right after the `ready` line must
        // stop the server gracefully, not kill it.
        let signals = Signals::install()?;
        ready(address);
        let app = router(state.clone(), options.max_body);
        let shutdown = shutdown_signal(signals, state.clone(), options.shutdown_grace);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| Error::io(address.to_string(), e))
    });
    queue.stop_all(queue::Stop::Shutdown);
    queue.close();
    for worker in workers {
        let _ = worker.join();
    }
    served
}

/// SIGTERM and Ctrl-C (SIGINT), caught from the moment this is made.
struct Signals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (inside the runtime).
    fn install() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let fail = |e| Error::io("the signal handlers", e);
            Ok(Signals {
                terminate: signal(SignalKind::terminate()).map_err(fail)?,
                interrupt: signal(SignalKind::interrupt()).map_err(fail)?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Resolves on the first signal.
    async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.terminate.recv() => {},
            _ = self.interrupt.recv() => {},
        }
        #[cfg(not(unix))]
        {
            let _ = &mut self;
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C: new work is refused from then on, and after `grace` the
/// accepted work still running is stopped (its requests answered 503).
async fn shutdown_signal(signals: Signals, state: AppState, grace: Duration) {
    signals.recv().await;
    state.draining.store(true, Ordering::SeqCst);
    state.queue.close();
    let queue = state.queue.clone();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        queue.stop_all(queue::Stop::Shutdown);
    });
}
