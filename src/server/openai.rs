//! The OpenAI Images API (`/v1/images/generations`, `/v1/images/edits`): base64 PNGs only
//! (`response_format: "b64_json"`), any `WxH` size within the server's limits, and tcd-ort's
//! own fields (`steps`, `seed`, `eta`, `guidance`, `negative_prompt`, `loras`) beside OpenAI's.

use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, Flavor};
use super::images::encode_b64_png;
use super::{generate, random_seed, AppState, Shared};
use crate::image_io::{decode_alpha, decode_image, RgbImage};
use crate::pipeline::{parameters_text, Field, GenerateRequest, InpaintMode, LoraSpec, Task};

const FLAVOR: Flavor = Flavor::OpenAi;

/// The request fields as this API spells them.
pub fn field_name(field: Field) -> &'static str {
    match field {
        Field::NumImages => "n",
        Field::Width | Field::Height => "size",
        other => other.name(),
    }
}

/// A LoRA named in `loras`.
#[derive(Debug, Deserialize)]
struct NamedLora {
    name: String,
    #[serde(default = "one")]
    weight: f32,
}

fn one() -> f32 {
    1.0
}

/// The fields both routes read.
#[derive(Debug, Default, Deserialize)]
struct Common {
    prompt: Option<String>,
    n: Option<usize>,
    size: Option<String>,
    response_format: Option<String>,
    output_format: Option<String>,
    negative_prompt: Option<String>,
    steps: Option<usize>,
    seed: Option<u64>,
    eta: Option<f32>,
    guidance: Option<f32>,
    strength: Option<f64>,
    #[serde(default)]
    vae_tiling: bool,
    #[serde(default)]
    loras: Vec<NamedLora>,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(FLAVOR, Some(param), message)
}

/// `"WxH"` as (width, height); `"auto"` or none is the model's (or the input image's) size.
fn parse_size(size: Option<&str>) -> Result<Option<(usize, usize)>, ApiError> {
    let Some(size) = size.filter(|s| *s != "auto") else {
        return Ok(None);
    };
    let parsed = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    parsed.map(Some).ok_or_else(|| {
        bad(
            "size",
            format!("size '{size}' is not WIDTHxHEIGHT (e.g. 512x512, 1024x1024) or auto"),
        )
    })
}

impl Common {
    fn request(&self, state: &AppState) -> Result<(GenerateRequest, Vec<LoraSpec>), ApiError> {
        let prompt = self
            .prompt
            .clone()
            .ok_or_else(|| bad("prompt", "prompt is required"))?;
        match self.response_format.as_deref() {
            None | Some("b64_json") => {}
            Some(other) => {
                return Err(bad(
                    "response_format",
                    format!(
                    "response_format '{other}' is not supported: this server answers b64_json only"
                ),
                ))
            }
        }
        if let Some(format) = self.output_format.as_deref().filter(|f| *f != "png") {
            return Err(bad(
                "output_format",
                format!("output_format '{format}' is not supported: this server writes png"),
            ));
        }
        let size = parse_size(self.size.as_deref())?;
        let loras = self
            .loras
            .iter()
            .map(|l| state.loras.spec(&l.name, l.weight))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("loras", e))?;
        let defaults = GenerateRequest::default();
        let request = GenerateRequest {
            prompt,
            negative_prompt: self.negative_prompt.clone().filter(|n| !n.is_empty()),
            steps: self.steps.unwrap_or(defaults.steps),
            eta: self.eta.unwrap_or(defaults.eta),
            guidance: self.guidance.unwrap_or(defaults.guidance),
            seed: self.seed.unwrap_or_else(random_seed),
            width: size.map(|s| s.0),
            height: size.map(|s| s.1),
            num_images: self.n.unwrap_or(1),
            vae_tiling: self.vae_tiling,
            ..defaults
        };
        Ok((request, loras))
    }
}

async fn answer(
    state: AppState,
    request: GenerateRequest,
    task: Task,
    loras: Vec<LoraSpec>,
) -> Result<Json<Value>, ApiError> {
    state
        .check(&request, &task)
        .map_err(|e| ApiError::from_engine(FLAVOR, e, field_name))?;
    let done = generate(
        &state,
        vec![request.clone()],
        task.clone(),
        loras,
        FLAVOR,
        field_name,
    )
    .await?;
    let mut data = Vec::new();
    for generated in &done.generated {
        for image in &generated.images {
            let text = parameters_text(
                &request,
                &task,
                (image.width, image.height),
                &state.model_name,
                (&[], None),
            );
            let b64 = encode_b64_png(image, &text)
                .map_err(|e| ApiError::from_engine(FLAVOR, e, field_name))?;
            data.push(json!({"b64_json": b64, "revised_prompt": Value::Null}));
        }
    }
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Json(
        json!({"created": created, "data": data, "output_format": "png"}),
    ))
}

/// `POST /v1/images/generations`.
pub async fn generations(State(state): Shared, body: Bytes) -> Result<Json<Value>, ApiError> {
    let common: Common = super::parse_json(&body, FLAVOR)?;
    let (request, loras) = common.request(&state)?;
    answer(state, request, Task::TextToImage, loras).await
}

/// `POST /v1/images/edits` (multipart): inpainting where the mask (or, without one, the
/// image itself) is transparent.
pub async fn edits(
    State(state): Shared,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::bad_request(
            FLAVOR,
            None,
            format!("expected a multipart/form-data body: {e}"),
        )
    })?;
    let mut fields = serde_json::Map::new();
    let mut image: Option<Vec<u8>> = None;
    let mut mask: Option<Vec<u8>> = None;
    while let Some(field) = multipart.next_field().await.map_err(|e| {
        ApiError::bad_request(FLAVOR, None, format!("malformed multipart body: {e}"))
    })? {
        let name = field.name().unwrap_or_default().to_string();
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::bad_request(FLAVOR, Some(&name), format!("{name}: {e}")))?;
        match name.as_str() {
            "image" | "image[]" if image.is_none() => image = Some(data.to_vec()),
            "image" | "image[]" => return Err(bad("image", "give one image to edit")),
            "mask" => mask = Some(data.to_vec()),
            "loras" => {
                let value: Value = serde_json::from_slice(&data)
                    .map_err(|e| bad("loras", format!("loras must be a JSON list: {e}")))?;
                fields.insert(name, value);
            }
            _ => {
                let text = String::from_utf8(data.to_vec())
                    .map_err(|_| bad(&name, format!("{name} must be text")))?;
                fields.insert(name, form_value(&text));
            }
        }
    }
    let form = serde_json::to_vec(&Value::Object(fields)).map_err(|e| {
        ApiError::new(
            FLAVOR,
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )
    })?;
    let common: Common = super::parse_json(&form, FLAVOR)?;
    let (request, loras) = common.request(&state)?;
    let image = image.ok_or_else(|| bad("image", "image is required"))?;
    let (picture, repaint) = edit_inputs(&image, mask.as_deref())?;
    let task = Task::Inpaint {
        image: picture,
        mask: repaint,
        strength: common.strength.unwrap_or(1.0),
        mode: InpaintMode::Auto,
    };
    answer(state, request, task, loras).await
}

/// A form field's text as the JSON value it stands for (numbers are numbers).
fn form_value(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ (Value::Number(_) | Value::Bool(_))) => v,
        _ => Value::String(text.to_string()),
    }
}

/// The image and the repaint mask (white = repaint) of an edit: transparency in the mask, or
/// in the image when no mask is sent, marks what to repaint, as OpenAI's API does.
fn edit_inputs(image: &[u8], mask: Option<&[u8]>) -> Result<(RgbImage, RgbImage), ApiError> {
    let picture = decode_image(image).map_err(|e| bad("image", format!("image: {e}")))?;
    let (source, param) = match mask {
        Some(m) => (m, "mask"),
        None => (image, "image"),
    };
    let decoded = decode_image(source).map_err(|e| bad(param, format!("{param}: {e}")))?;
    let alpha = decode_alpha(source)
        .map_err(|e| bad(param, format!("{param}: {e}")))?
        .ok_or_else(|| {
            bad(
                param,
                format!(
                    "{param} has no transparency: send a PNG mask whose transparent pixels \
                     (alpha 0) mark what to repaint"
                ),
            )
        })?;
    if (decoded.width, decoded.height) != (picture.width, picture.height) {
        return Err(bad(
            "mask",
            format!(
                "the mask is {}x{} and the image {}x{}: they must be the same size",
                decoded.width, decoded.height, picture.width, picture.height
            ),
        ));
    }
    let gray: Vec<u8> = alpha.iter().map(|a| 255 - a).collect();
    let repaint = RgbImage::from_gray(picture.width, picture.height, &gray)
        .map_err(|e| ApiError::from_engine(FLAVOR, e, field_name))?;
    Ok((picture, repaint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_width_by_height_or_auto() {
        assert_eq!(parse_size(Some("512x768")).expect("ok"), Some((512, 768)));
        assert_eq!(parse_size(Some("auto")).expect("ok"), None);
        assert_eq!(parse_size(None).expect("ok"), None);
        for bad in ["512", "x512", "512x", "big", "-8x8"] {
            let err = parse_size(Some(bad)).expect_err(bad);
            assert_eq!(err.param.as_deref(), Some("size"));
        }
    }

    #[test]
    fn transparency_marks_what_to_repaint() {
        // 2x1: an opaque pixel (keep) and a transparent one (repaint).
        let rgba = image::RgbaImage::from_raw(2, 1, vec![9, 9, 9, 255, 9, 9, 9, 0]).expect("img");
        let mut png = Vec::new();
        rgba.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        let (picture, mask) = edit_inputs(&png, None).expect("edit inputs");
        assert_eq!((picture.width, picture.height), (2, 1));
        assert_eq!(mask.pixels, vec![0, 0, 0, 255, 255, 255]);
        let opaque = image::RgbImage::from_raw(2, 1, vec![0; 6]).expect("img");
        let mut no_alpha = Vec::new();
        opaque
            .write_to(
                &mut std::io::Cursor::new(&mut no_alpha),
                image::ImageFormat::Png,
            )
            .expect("encode");
        let err = edit_inputs(&no_alpha, None).expect_err("no transparency");
        assert!(err.message.contains("transparen"), "{}", err.message);
    }
}
