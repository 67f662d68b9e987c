//! The AUTOMATIC1111 API subset (`/sdapi/v1/...`): payloads translated into the library's
//! requests, answers in A1111's shapes. Every sampler is answered with TCD and fields that do
//! not apply are ignored; `info` says both.

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::{ApiError, Flavor};
use super::images::{decode_b64_image, encode_b64_png};
use super::{generate, random_seed, AppState, Shared};
use crate::image_io::RgbImage;
use crate::pipeline::{parameters_text, Field, GenerateRequest, InpaintMode, LoraSpec, Task};

/// The request fields as A1111 spells them.
pub fn field_name(field: Field) -> &'static str {
    match field {
        Field::Guidance => "cfg_scale",
        Field::Eta => "tcd_eta",
        Field::NumImages => "batch_size",
        Field::Strength => "denoising_strength",
        Field::Image => "init_images",
        Field::ControlImage => "alwayson_scripts.controlnet.args[].image",
        Field::ControlScale => "alwayson_scripts.controlnet.args[].weight",
        Field::ControlStart => "alwayson_scripts.controlnet.args[].guidance_start",
        Field::ControlEnd => "alwayson_scripts.controlnet.args[].guidance_end",
        Field::CannyThresholds => "alwayson_scripts.controlnet.args[].threshold_a/threshold_b",
        other => other.name(),
    }
}

const FLAVOR: Flavor = Flavor::A1111;

/// The fields of `/sdapi/v1/txt2img` and `/img2img` that tcd-ort reads; the rest of the payload
/// is kept to say what was ignored.
#[derive(Debug, Deserialize)]
struct Payload {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    steps: Option<usize>,
    #[serde(default)]
    cfg_scale: Option<f32>,
    #[serde(default)]
    width: Option<usize>,
    #[serde(default)]
    height: Option<usize>,
    #[serde(default)]
    batch_size: Option<usize>,
    #[serde(default)]
    n_iter: Option<usize>,
    #[serde(default)]
    sampler_name: Option<String>,
    #[serde(default)]
    sampler_index: Option<String>,
    /// TCD's gamma (A1111's own `eta` belongs to its DDIM and ancestral samplers).
    #[serde(default)]
    tcd_eta: Option<f32>,
    #[serde(default)]
    denoising_strength: Option<f64>,
    #[serde(default)]
    init_images: Vec<String>,
    #[serde(default)]
    mask: Option<String>,
    #[serde(default)]
    inpainting_mask_invert: Option<u8>,
    /// Decode in tiles (diffusers' `enable_vae_tiling()`); A1111's own `tiling` is another
    /// thing (seamless textures) and is ignored.
    #[serde(default)]
    vae_tiling: bool,
    /// Extension scripts; `controlnet` is read ([`super::controlnet`]), the rest ignored.
    #[serde(default)]
    alwayson_scripts: Option<Value>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// A1111's defaults of fields tcd-ort ignores, as clients (`webuiapi`) send them with every
/// request: such a field changes nothing there either, so only a departure from it is said.
const A1111_DEFAULTS: &[(&str, DefaultValue)] = &[
    ("eta", DefaultValue::Number(1.0)),
    ("subseed", DefaultValue::Number(-1.0)),
    ("seed_resize_from_h", DefaultValue::Number(-1.0)),
    ("seed_resize_from_w", DefaultValue::Number(-1.0)),
    ("scheduler", DefaultValue::Text("automatic")),
    ("hr_scale", DefaultValue::Number(2.0)),
    ("hr_upscaler", DefaultValue::Text("Latent")),
    ("s_noise", DefaultValue::Number(1.0)),
    ("s_tmax", DefaultValue::Number(-1.0)),
    ("send_images", DefaultValue::Flag(true)),
    (
        "override_settings_restore_afterwards",
        DefaultValue::Flag(true),
    ),
    ("image_cfg_scale", DefaultValue::Number(1.5)),
    ("mask_blur", DefaultValue::Number(4.0)),
    ("inpaint_full_res", DefaultValue::Flag(true)),
    ("inpaint_full_res_padding", DefaultValue::Number(32.0)),
    ("initial_noise_multiplier", DefaultValue::Number(1.0)),
    ("mask_round", DefaultValue::Flag(true)),
];

#[derive(Debug, Clone, Copy)]
enum DefaultValue {
    Number(f64),
    Text(&'static str),
    Flag(bool),
}

impl DefaultValue {
    fn is(self, value: &Value) -> bool {
        match (self, value) {
            (DefaultValue::Number(n), Value::Number(v)) => v.as_f64() == Some(n),
            (DefaultValue::Text(t), Value::String(v)) => v == t,
            (DefaultValue::Flag(f), Value::Bool(v)) => *v == f,
            _ => false,
        }
    }
}

/// What `info.tcd_notes` says of a payload: the sampler answered with TCD, fields ignored
/// (those set to something other than nothing or A1111's default), classifier-free guidance
/// a TCD model does not need.
fn notes(payload: &Payload) -> Vec<String> {
    let mut notes = Vec::new();
    for name in [
        payload.sampler_name.as_deref(),
        payload.sampler_index.as_deref(),
    ]
    .into_iter()
    .flatten()
    {
        if !name.eq_ignore_ascii_case("tcd") && !notes.iter().any(|n: &String| n.contains(name)) {
            notes.push(format!(
                "sampler '{name}' answered with TCD, this server's only sampler"
            ));
        }
    }
    let meaningful = |name: &str, v: &Value| {
        let at_default = A1111_DEFAULTS.iter().any(|(n, d)| *n == name && d.is(v));
        !at_default
            && match v {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::Bool(true) => true,
            }
    };
    let ignored: Vec<&str> = payload
        .other
        .iter()
        .filter(|(k, v)| meaningful(k, v))
        .map(|(k, _)| k.as_str())
        .collect();
    if !ignored.is_empty() {
        notes.push(format!("ignored fields: {}", ignored.join(", ")));
    }
    if let Some(Value::Object(scripts)) = &payload.alwayson_scripts {
        let other: Vec<&str> = scripts
            .keys()
            .filter(|k| !k.eq_ignore_ascii_case("controlnet"))
            .map(String::as_str)
            .collect();
        if !other.is_empty() {
            notes.push(format!("ignored scripts: {}", other.join(", ")));
        }
    }
    if let Some(cfg) = payload.cfg_scale.filter(|c| *c > 1.0) {
        notes.push(format!(
            "cfg_scale {cfg} runs classifier-free guidance (twice the UNet work per step); TCD \
             models are distilled to run without it: send cfg_scale 0 (or 1) unless you mean it"
        ));
    }
    notes
}

fn parse(body: &Bytes) -> Result<Payload, ApiError> {
    super::parse_json(body, FLAVOR)
}

/// `POST /sdapi/v1/txt2img`.
pub async fn txt2img(State(state): Shared, body: Bytes) -> Result<Json<Value>, ApiError> {
    let payload = parse(&body)?;
    run(state, payload, &body, Task::TextToImage).await
}

/// `POST /sdapi/v1/img2img`: image-to-image, or inpainting with `mask`.
pub async fn img2img(State(state): Shared, body: Bytes) -> Result<Json<Value>, ApiError> {
    let payload = parse(&body)?;
    let first = payload.init_images.first().ok_or_else(|| {
        ApiError::bad_request(FLAVOR, Some("init_images"), "init_images needs one image")
    })?;
    let image = decode_b64_image(first).map_err(|e| {
        ApiError::bad_request(FLAVOR, Some("init_images"), format!("init_images: {e}"))
    })?;
    let strength = payload.denoising_strength.unwrap_or(0.75);
    let task = match &payload.mask {
        None => Task::ImageToImage { image, strength },
        Some(mask) => {
            let mut mask = decode_b64_image(mask)
                .map_err(|e| ApiError::bad_request(FLAVOR, Some("mask"), format!("mask: {e}")))?;
            if payload.inpainting_mask_invert == Some(1) {
                invert(&mut mask);
            }
            Task::Inpaint {
                image,
                mask,
                strength,
                mode: InpaintMode::Auto,
            }
        }
    };
    run(state, payload, &body, task).await
}

fn invert(mask: &mut RgbImage) {
    for p in &mut mask.pixels {
        *p = 255 - *p;
    }
}

/// The library's requests of a payload: one per iteration (`n_iter`), seeds following on as
/// A1111's do, and the LoRAs its prompt names.
struct Plan {
    runs: Vec<GenerateRequest>,
    loras: Vec<LoraSpec>,
    tags: Vec<(String, f32)>,
    seed: u64,
    batch: usize,
}

fn plan(state: &AppState, payload: &Payload) -> Result<Plan, ApiError> {
    let (prompt, tags) = super::catalog::take_lora_tags(&payload.prompt)
        .map_err(|e| ApiError::bad_request(FLAVOR, Some("prompt"), e))?;
    let loras = tags
        .iter()
        .map(|(name, weight)| state.loras.spec(name, *weight))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::bad_request(FLAVOR, Some("prompt"), e))?;
    let batch = payload.batch_size.unwrap_or(1);
    let iterations = payload.n_iter.unwrap_or(1);
    if iterations == 0 || iterations.saturating_mul(batch) > state.limits.max_images {
        return Err(ApiError::bad_request(
            FLAVOR,
            Some("n_iter"),
            format!(
                "n_iter must be at least 1 and batch_size x n_iter at most {}",
                state.limits.max_images
            ),
        ));
    }
    let seed = match payload.seed {
        None | Some(-1) => random_seed(),
        Some(s) if s < 0 => {
            return Err(ApiError::bad_request(
                FLAVOR,
                Some("seed"),
                "seed must be -1 (random) or at least 0",
            ))
        }
        Some(s) => s as u64,
    };
    let control =
        super::controlnet::control_images(payload.alwayson_scripts.as_ref(), state.controlnets)?;
    let defaults = GenerateRequest::default();
    let runs = (0..iterations)
        .map(|k| GenerateRequest {
            prompt: prompt.clone(),
            negative_prompt: payload.negative_prompt.clone().filter(|n| !n.is_empty()),
            steps: payload.steps.unwrap_or(defaults.steps),
            eta: payload.tcd_eta.unwrap_or(defaults.eta),
            guidance: payload.cfg_scale.unwrap_or(defaults.guidance),
            seed: seed.wrapping_add((k * batch) as u64),
            width: payload.width,
            height: payload.height,
            num_images: batch,
            control: control.clone(),
            vae_tiling: payload.vae_tiling,
            ..GenerateRequest::default()
        })
        .collect();
    Ok(Plan {
        runs,
        loras,
        tags,
        seed,
        batch,
    })
}

async fn run(
    state: AppState,
    payload: Payload,
    body: &Bytes,
    task: Task,
) -> Result<Json<Value>, ApiError> {
    let plan = plan(&state, &payload)?;
    state
        .check(&plan.runs[0], &task)
        .map_err(|e| ApiError::from_engine(FLAVOR, e, field_name))?;
    let notes = notes(&payload);
    let done = generate(
        &state,
        plan.runs.clone(),
        task.clone(),
        plan.loras.clone(),
        FLAVOR,
        field_name,
    )
    .await?;
    let mut images = Vec::new();
    let mut infotexts = Vec::new();
    let mut seeds = Vec::new();
    for (request, generated) in plan.runs.iter().zip(&done.generated) {
        // The prompt as sent, LoRA tags included, as A1111 writes it.
        let shown = GenerateRequest {
            prompt: payload.prompt.clone(),
            ..request.clone()
        };
        for (i, image) in generated.images.iter().enumerate() {
            let mut text = parameters_text(
                &shown,
                &task,
                (image.width, image.height),
                &state.model_name,
                (&[], None),
            );
            if plan.batch > 1 {
                text.push_str(&format!(", Batch size: {}, Batch pos: {i}", plan.batch));
            }
            images.push(
                encode_b64_png(image, &text)
                    .map_err(|e| ApiError::from_engine(FLAVOR, e, field_name))?,
            );
            infotexts.push(text);
            seeds.push(request.seed);
        }
    }
    let first = &plan.runs[0];
    let (width, height) = done.generated[0]
        .images
        .first()
        .map_or((0, 0), |i| (i.width, i.height));
    let warnings: Vec<&String> = done.generated.iter().flat_map(|g| &g.warnings).collect();
    let info = json!({
        "prompt": payload.prompt,
        "all_prompts": vec![&payload.prompt; images.len()],
        "negative_prompt": payload.negative_prompt.clone().unwrap_or_default(),
        "seed": plan.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "steps": first.steps,
        "cfg_scale": short(first.guidance),
        "tcd_eta": short(first.eta),
        "width": width,
        "height": height,
        "sampler_name": "TCD",
        "batch_size": plan.batch,
        "n_iter": plan.runs.len(),
        "sd_model_name": state.model_name,
        "infotexts": infotexts,
        "loras": plan.tags.iter().map(|(n, w)| json!({"name": n, "weight": short(*w)})).collect::<Vec<_>>(),
        "tcd_notes": notes,
        "lora_switch": {
            "seconds": done.lora_switch.elapsed.as_secs_f64(),
            "unchanged": done.lora_switch.unchanged,
            "slot_tensors": done.lora_switch.swapped,
            "rebuilt": done.lora_switch.rebuilt,
        },
        "warnings": warnings,
    });
    let parameters: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    Ok(Json(json!({
        "images": images,
        "parameters": parameters,
        "info": info.to_string(),
    })))
}

/// A float32 setting as JSON shows it: 0.3, not 0.30000001192092896.
fn short(value: f32) -> Value {
    value
        .to_string()
        .parse::<f64>()
        .map_or(Value::Null, Value::from)
}

/// `GET /sdapi/v1/progress`.
pub async fn progress(State(state): Shared) -> Json<Value> {
    let p = state.queue.snapshot();
    let fraction = if p.steps == 0 {
        0.0
    } else {
        p.step as f64 / p.steps as f64
    };
    let elapsed = p.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let eta = if fraction > 0.0 {
        elapsed / fraction - elapsed
    } else {
        0.0
    };
    Json(json!({
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": false,
            "job": if p.running > 0 { "txt2img" } else { "" },
            "job_count": p.running + p.queued,
            "job_timestamp": "0",
            "job_no": p.finished,
            "sampling_step": p.step,
            "sampling_steps": p.steps,
        },
        "current_image": Value::Null,
        "textinfo": Value::Null,
    }))
}

/// `POST /sdapi/v1/interrupt`: stops the running generations between steps.
pub async fn interrupt(State(state): Shared) -> Json<Value> {
    state.queue.interrupt();
    Json(json!({}))
}

/// `GET /sdapi/v1/options`: the settings clients read.
pub async fn options(State(state): Shared) -> Json<Value> {
    Json(json!({
        "sd_model_checkpoint": state.model_name,
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "eta_noise_seed_delta": 0,
    }))
}

/// `GET /sdapi/v1/sd-models`: the one model this server loaded.
pub async fn sd_models(State(state): Shared) -> Json<Value> {
    Json(json!([{
        "title": state.model_name,
        "model_name": state.model_name,
        "hash": Value::Null,
        "sha256": Value::Null,
        "filename": state.model_name,
        "config": Value::Null,
    }]))
}

/// `GET /sdapi/v1/samplers`.
pub async fn samplers() -> Json<Value> {
    Json(json!([{"name": "TCD", "aliases": ["tcd"], "options": {}}]))
}

/// `GET /sdapi/v1/loras`: the names `<lora:NAME:WEIGHT>` accepts (no paths).
pub async fn loras(State(state): Shared) -> Json<Value> {
    Json(Value::Array(
        state
            .loras
            .names()
            .map(|n| json!({"name": n, "alias": n, "metadata": {}}))
            .collect(),
    ))
}
