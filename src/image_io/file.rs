//! Image files: PNG and JPEG in, PNG with generation parameters out, and output paths.

use std::path::Path;

use super::{PendingFile, RgbImage};
use crate::{Error, Result};

/// The largest input image side decoded: a few hundred kilobytes of PNG can claim to be
/// gigapixels, and the decoder would allocate them before reading a pixel.
pub const MAX_INPUT_SIDE: u32 = 16384;

/// The most memory one decode may take (a 16384x8192 RGBA image); also the bound on an image
/// that pre-processing resizes to a size computed from its aspect ratio.
pub(super) const MAX_INPUT_BYTES: u64 = 512 << 20;

/// Reads a PNG or JPEG into RGB (alpha dropped, grayscale replicated: PIL's `convert("RGB")`).
/// Images past [`MAX_INPUT_SIDE`] on a side, or needing more than 512 MiB to decode, are
/// refused from their header, before anything is allocated.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let image_error = |message: String| Error::Image {
        path: path.to_path_buf(),
        message,
    };
    if path.is_dir() {
        return Err(image_error(
            "is a directory; expected a PNG or JPEG file".into(),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes).map_err(image_error)
}

/// Decodes PNG or JPEG bytes into RGB within the input limits; the error is the message.
pub fn decode_image(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let decoded = reader(bytes)?.decode().map_err(decode_error)?;
    let rgb = decoded.to_rgb8();
    let (width, height) = rgb.dimensions();
    RgbImage::new(width, height, rgb.into_raw()).map_err(|e| e.to_string())
}

/// Writes `image` as a PNG with `text` entries (keyword, value) in tEXt/iTXt chunks, atomically
/// (see [`PendingFile`]).
pub fn write_png(
    path: &Path,
    image: &RgbImage,
    text: &[(&str, String)],
    overwrite: bool,
) -> Result<()> {
    stage_png(path, image, text, overwrite)?.commit()
}

/// Encodes `image` as [`write_png`] does into a temporary beside `path`, to be committed with
/// the other outputs of the same run.
pub fn stage_png(
    path: &Path,
    image: &RgbImage,
    text: &[(&str, String)],
    overwrite: bool,
) -> Result<PendingFile> {
    PendingFile::write(path, overwrite, |file| {
        encode_png_to(file, image, text).map_err(|e| match e {
            png::EncodingError::IoError(e) => Error::io(path, e),
            other => Error::Image {
                path: path.to_path_buf(),
                message: other.to_string(),
            },
        })
    })
}

/// `image` as PNG bytes with `text` entries, as [`write_png`] writes them (for a server's
/// responses).
pub fn encode_png(image: &RgbImage, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    encode_png_to(&mut bytes, image, text).map_err(|e| Error::Image {
        path: "(in memory)".into(),
        message: e.to_string(),
    })?;
    Ok(bytes)
}

fn encode_png_to<W: std::io::Write>(
    out: W,
    image: &RgbImage,
    text: &[(&str, String)],
) -> std::result::Result<(), png::EncodingError> {
    let mut encoder = png::Encoder::new(out, image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        if value.is_ascii() {
            encoder.add_text_chunk(key.to_string(), value.clone())?;
        } else {
            encoder.add_itxt_chunk(key.to_string(), value.clone())?;
        }
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&image.pixels)?;
    writer.finish()
}

/// The alpha channel of PNG bytes, `None` for an image without one; within the input limits
/// of [`decode_image`]. OpenAI's image edits mark the area to repaint by transparency.
pub fn decode_alpha(bytes: &[u8]) -> std::result::Result<Option<Vec<u8>>, String> {
    let decoded = reader(bytes)?.decode().map_err(decode_error)?;
    if !decoded.color().has_alpha() {
        return Ok(None);
    }
    Ok(Some(decoded.to_rgba8().pixels().map(|p| p.0[3]).collect()))
}

fn reader(bytes: &[u8]) -> std::result::Result<image::ImageReader<std::io::Cursor<&[u8]>>, String> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE);
    limits.max_image_height = Some(MAX_INPUT_SIDE);
    limits.max_alloc = Some(MAX_INPUT_BYTES);
    reader.limits(limits);
    Ok(reader)
}

fn decode_error(e: image::ImageError) -> String {
    match e {
        image::ImageError::Limits(_) => format!(
            "too large to decode (at most {MAX_INPUT_SIDE} pixels per side and 512 MiB): {e}"
        ),
        e => format!("cannot decode (PNG and JPEG are supported): {e}"),
    }
}

/// The output path of image `index` of `count`: `out.png` for one, `out-1.png`... for several.
pub fn numbered_path(path: &Path, index: usize, count: usize) -> std::path::PathBuf {
    if count <= 1 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{}.{}", index + 1, ext.to_string_lossy()),
        None => format!("{stem}-{}", index + 1),
    };
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_images_get_numbers() {
        assert_eq!(
            numbered_path(Path::new("a/out.png"), 0, 1),
            Path::new("a/out.png")
        );
        assert_eq!(
            numbered_path(Path::new("a/out.png"), 1, 3),
            Path::new("a/out-2.png")
        );
    }
}
