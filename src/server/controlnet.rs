//! ControlNet in A1111 requests, as the sd-webui-controlnet extension's API sends it:
//! `alwayson_scripts.controlnet.args` is a list of units, each an image and how to use it. The
//! enabled units go, in order, to the ControlNets the server loaded (`--controlnet`).

use serde::Deserialize;
use serde_json::Value;

use super::error::{ApiError, Flavor};
use super::images::decode_b64_image;
use crate::pipeline::{ControlImage, ControlPreprocess};

/// One unit of the extension's API.
#[derive(Debug, Deserialize)]
struct Unit {
    #[serde(default = "yes")]
    enabled: bool,
    /// Base64, or `{"image": base64, "mask": ...}` as some clients send it.
    #[serde(default)]
    image: Option<Value>,
    #[serde(default)]
    input_image: Option<String>,
    #[serde(default)]
    module: Option<String>,
    #[serde(default)]
    weight: Option<f32>,
    #[serde(default)]
    guidance_start: Option<f32>,
    #[serde(default)]
    guidance_end: Option<f32>,
    /// Canny's low threshold.
    #[serde(default)]
    threshold_a: Option<f32>,
    /// Canny's high threshold.
    #[serde(default)]
    threshold_b: Option<f32>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
struct Script {
    #[serde(default)]
    args: Vec<Unit>,
}

fn bad(message: String) -> ApiError {
    ApiError::bad_request(Flavor::A1111, Some("alwayson_scripts.controlnet"), message)
}

/// The control images of `alwayson_scripts` (its `controlnet` entry, any capitalisation), for
/// `loaded` ControlNets; none when the request has no enabled unit.
pub fn control_images(
    scripts: Option<&Value>,
    loaded: usize,
) -> Result<Vec<ControlImage>, ApiError> {
    let Some(Value::Object(scripts)) = scripts else {
        return Ok(Vec::new());
    };
    let Some((_, script)) = scripts
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("controlnet"))
    else {
        return Ok(Vec::new());
    };
    let script: Script = serde_json::from_value(script.clone())
        .map_err(|e| bad(format!("alwayson_scripts.controlnet: {e}")))?;
    let units: Vec<Unit> = script.args.into_iter().filter(|u| u.enabled).collect();
    if units.is_empty() {
        return Ok(Vec::new());
    }
    if units.len() != loaded {
        return Err(bad(format!(
            "{} enabled ControlNet unit(s) for the {loaded} ControlNet(s) this server loaded \
             (--controlnet): send one unit per ControlNet, in the server's order",
            units.len()
        )));
    }
    units
        .into_iter()
        .enumerate()
        .map(|(i, unit)| control_image(i, unit))
        .collect()
}

fn control_image(i: usize, unit: Unit) -> Result<ControlImage, ApiError> {
    let n = i + 1;
    let text = match (&unit.image, &unit.input_image) {
        (Some(Value::String(s)), _) => s.clone(),
        (Some(Value::Object(o)), _) => match o.get("image") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(bad(format!("unit {n}: image.image must be base64"))),
        },
        (None | Some(Value::Null), Some(s)) => s.clone(),
        _ => return Err(bad(format!("unit {n} has no image"))),
    };
    let image = decode_b64_image(&text).map_err(|e| bad(format!("unit {n}: image: {e}")))?;
    let module = unit
        .module
        .as_deref()
        .unwrap_or("none")
        .to_ascii_lowercase();
    let preprocess = match module.as_str() {
        "none" | "" => ControlPreprocess::None,
        "canny" => ControlPreprocess::Canny {
            low: unit.threshold_a.unwrap_or(100.0),
            high: unit.threshold_b.unwrap_or(200.0),
        },
        m if m.starts_with("depth") => ControlPreprocess::Depth,
        other => {
            return Err(bad(format!(
                "unit {n}: module '{other}' is not available; use canny, depth or none (an \
                 image that already is a control map)"
            )))
        }
    };
    // The library checks the values with the rest of the request.
    Ok(ControlImage {
        image,
        scale: unit.weight.unwrap_or(1.0),
        start: unit.guidance_start.unwrap_or(0.0),
        end: unit.guidance_end.unwrap_or(1.0),
        preprocess,
    })
}
