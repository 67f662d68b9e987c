//! Image files: PNG and JPEG in, PNG with generation parameters out, and output paths.

use std::fs::{File, OpenOptions};
use std::io::BufWriter;
use std::path::Path;

use super::RgbImage;
use crate::{Error, Result};

/// Reads a PNG or JPEG into RGB (alpha dropped, grayscale replicated: PIL's `convert("RGB")`).
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(path, &bytes)
}

/// Decodes the bytes of a PNG or JPEG as [`load_image`] does; `path` is only used in messages.
#[doc(hidden)]
pub fn decode_image(path: &Path, bytes: &[u8]) -> Result<RgbImage> {
    let decoded = image::load_from_memory(bytes).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: format!("cannot decode (PNG and JPEG are supported): {e}"),
    })?;
    let rgb = decoded.to_rgb8();
    let (width, height) = rgb.dimensions();
    RgbImage::new(width, height, rgb.into_raw())
}

/// Opens `path` for writing, refusing to replace an existing file unless `overwrite`.
pub fn create_output(path: &Path, overwrite: bool) -> Result<File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("the directory {} does not exist", parent.display()),
                ),
            ));
        }
    }
    let mut options = OpenOptions::new();
    options.write(true);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::invalid(format!(
                "{} already exists; pass --overwrite to replace it",
                path.display()
            ))
        } else {
            Error::io(path, e)
        }
    })
}

/// Writes `image` as a PNG with `text` entries (keyword, value) in tEXt/iTXt chunks.
pub fn write_png(
    path: &Path,
    image: &RgbImage,
    text: &[(&str, String)],
    overwrite: bool,
) -> Result<()> {
    let file = create_output(path, overwrite)?;
    let fail = |e: png::EncodingError| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut encoder = png::Encoder::new(BufWriter::new(file), image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        if value.is_ascii() {
            encoder
                .add_text_chunk(key.to_string(), value.clone())
                .map_err(fail)?;
        } else {
            encoder
                .add_itxt_chunk(key.to_string(), value.clone())
                .map_err(fail)?;
        }
    }
    let mut writer = encoder.write_header().map_err(fail)?;
    writer.write_image_data(&image.pixels).map_err(fail)?;
    writer.finish().map_err(fail)
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
