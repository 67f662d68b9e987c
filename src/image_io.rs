//! Image and tensor files: VAE output to pixels exactly as diffusers' `VaeImageProcessor`
//! post-processes, PNG with generation parameters, and NumPy `.npy` for latents.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use ndarray::{ArrayD, ArrayView4, Axis};

use crate::{Error, Result};

/// An 8-bit RGB image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes.
    pub pixels: Vec<u8>,
}

/// Converts decoded VAE output `[batch, 3, h, w]` in [-1, 1] into RGB images.
///
/// Matches diffusers: `(x * 0.5 + 0.5).clamp(0, 1)`, then `(x * 255).round()` with NumPy's
/// round-half-to-even, in float32.
pub fn vae_output_to_images(decoded: &ArrayD<f32>) -> Result<Vec<RgbImage>> {
    let view: ArrayView4<f32> = decoded.view().into_dimensionality().map_err(|_| {
        Error::Runtime(format!(
            "VAE output has shape {:?}, expected [batch, 3, h, w]",
            decoded.shape()
        ))
    })?;
    let (_, channels, height, width) = view.dim();
    if channels != 3 {
        return Err(Error::Runtime(format!(
            "VAE output has {channels} channels, expected 3"
        )));
    }
    let mut images = Vec::with_capacity(view.len_of(Axis(0)));
    for sample in view.outer_iter() {
        let mut pixels = Vec::with_capacity(height * width * 3);
        for y in 0..height {
            for x in 0..width {
                for c in 0..3 {
                    pixels.push(to_u8(sample[[c, y, x]]));
                }
            }
        }
        images.push(RgbImage {
            width: width as u32,
            height: height as u32,
            pixels,
        });
    }
    Ok(images)
}

fn to_u8(v: f32) -> u8 {
    let unit = (v * 0.5 + 0.5).clamp(0.0, 1.0);
    // NaN (a broken fp16 VAE, say) clamps to NaN and then saturates to 0: black, like diffusers.
    (unit * 255.0).round_ties_even() as u8
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

/// Writes a float32 array as a NumPy `.npy` file (format 1.0, little-endian, C order).
pub fn write_npy(path: &Path, array: &ArrayD<f32>, overwrite: bool) -> Result<()> {
    let file = create_output(path, overwrite)?;
    let shape = array
        .shape()
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>();
    let shape = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let header_len = u16::try_from(header.len())
        .map_err(|_| Error::invalid("array has too many dimensions for .npy"))?;
    let mut out = BufWriter::new(file);
    let io = |e| Error::io(path, e);
    out.write_all(b"\x93NUMPY\x01\x00").map_err(io)?;
    out.write_all(&header_len.to_le_bytes()).map_err(io)?;
    out.write_all(header.as_bytes()).map_err(io)?;
    for v in array.as_standard_layout().iter() {
        out.write_all(&v.to_le_bytes()).map_err(io)?;
    }
    out.flush().map_err(io)
}

/// Reads a float32 little-endian C-order `.npy` file (what `write_npy` and NumPy write).
pub fn read_npy(path: &Path) -> Result<ArrayD<f32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: &str| Error::Image {
        path: path.to_path_buf(),
        message: format!("not a float32 .npy file: {m}"),
    };
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing magic"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unsupported version")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    if !header.contains("'<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("only little-endian float32 in C order is supported"));
    }
    let open = header.find("'shape': (").ok_or_else(|| bad("no shape"))? + 10;
    let close = header[open..].find(')').ok_or_else(|| bad("no shape"))? + open;
    let shape: Vec<usize> = header[open..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("bad shape")))
        .collect::<Result<_>>()?;
    let data = &bytes[start + header_len..];
    let count: usize = shape.iter().product();
    if data.len() != count * 4 {
        return Err(bad("data length does not match the shape"));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    ArrayD::from_shape_vec(shape, values).map_err(|e| bad(&e.to_string()))
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
    fn pixels_round_half_to_even_like_numpy() {
        // 0.5 * 255 = 127.5 rounds to 128 (even); values outside [-1, 1] clamp.
        assert_eq!(to_u8(0.0), 128);
        assert_eq!(to_u8(-1.5), 0);
        assert_eq!(to_u8(1.5), 255);
        assert_eq!(to_u8(f32::NAN), 0);
    }

    #[test]
    fn npy_round_trips() {
        let dir = std::env::temp_dir().join(format!("tcd-ort-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("a.npy");
        let a = ArrayD::from_shape_vec(vec![1, 2, 3], vec![0.5, -1.0, 2.0, 3.0, 4.0, 5.0])
            .expect("shape");
        write_npy(&path, &a, true).expect("write");
        assert_eq!(read_npy(&path).expect("read"), a);
        let err = write_npy(&path, &a, false).expect_err("exists");
        assert!(err.to_string().contains("--overwrite"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

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
