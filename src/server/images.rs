//! Images in requests and answers: base64 (A1111 and OpenAI JSON), PNG with the generation
//! parameters.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::image_io::{decode_image, encode_png, RgbImage};
use crate::Result;

/// Decodes a base64 PNG or JPEG, with or without a `data:image/...;base64,` prefix.
pub fn decode_b64_image(text: &str) -> std::result::Result<RgbImage, String> {
    let bytes = decode_b64(text)?;
    decode_image(&bytes)
}

/// The bytes of a base64 string, with or without a data-URL prefix.
pub fn decode_b64(text: &str) -> std::result::Result<Vec<u8>, String> {
    let data = match text.split_once(";base64,") {
        Some((head, data)) if head.starts_with("data:") => data,
        _ => text,
    };
    STANDARD
        .decode(data.trim())
        .map_err(|e| format!("not base64 image data: {e}"))
}

/// `image` as base64 PNG with `parameters` in a text chunk, as A1111 saves images.
pub fn encode_b64_png(image: &RgbImage, parameters: &str) -> Result<String> {
    let png = encode_png(image, &[("parameters", parameters.to_string())])?;
    Ok(STANDARD.encode(png))
}
