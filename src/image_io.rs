//! Image and tensor files: input images and masks pre-processed and VAE output post-processed
//! exactly as diffusers' `VaeImageProcessor` does (including PIL's Lanczos resize and grayscale
//! conversion), PNG with generation parameters, image grids, and NumPy `.npy` for latents.

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

impl RgbImage {
    /// Wraps RGB bytes, checking that there are `width * height * 3` of them.
    pub fn new(width: u32, height: u32, pixels: Vec<u8>) -> Result<Self> {
        check_buffer(width, height, pixels.len(), 3)?;
        Ok(RgbImage {
            width,
            height,
            pixels,
        })
    }

    /// Drops the alpha channel of RGBA bytes, as PIL's `convert("RGB")` does.
    pub fn from_rgba(width: u32, height: u32, rgba: &[u8]) -> Result<Self> {
        check_buffer(width, height, rgba.len(), 4)?;
        let pixels = rgba
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect();
        Ok(RgbImage {
            width,
            height,
            pixels,
        })
    }

    /// Replicates 8-bit grayscale into RGB, as PIL's `convert("RGB")` does.
    pub fn from_gray(width: u32, height: u32, gray: &[u8]) -> Result<Self> {
        check_buffer(width, height, gray.len(), 1)?;
        let pixels = gray.iter().flat_map(|&v| [v, v, v]).collect();
        Ok(RgbImage {
            width,
            height,
            pixels,
        })
    }
}

fn check_buffer(width: u32, height: u32, len: usize, channels: usize) -> Result<()> {
    let expected = (width as usize)
        .checked_mul(height as usize)
        .and_then(|n| n.checked_mul(channels));
    if width == 0 || height == 0 || expected != Some(len) {
        return Err(Error::invalid(format!(
            "an image of {width}x{height} with {channels} channel(s) needs {} bytes, got {len}",
            expected.map_or_else(|| "more".to_string(), |n| n.to_string())
        )));
    }
    Ok(())
}

/// Reads a PNG or JPEG into RGB (alpha dropped, grayscale replicated: PIL's `convert("RGB")`).
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let decoded = image::load_from_memory(&bytes).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: format!("cannot decode (PNG and JPEG are supported): {e}"),
    })?;
    let rgb = decoded.to_rgb8();
    let (width, height) = rgb.dimensions();
    RgbImage::new(width, height, rgb.into_raw())
}

/// A Pillow resampling filter (`PIL.Image.Resampling`), as image processors name them in their
/// `resample` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleFilter {
    /// `BILINEAR` (2): the triangle filter, support 1.
    Bilinear,
    /// `BICUBIC` (3): Keys' cubic with `a = -0.5`, support 2.
    Bicubic,
    /// `LANCZOS` (1): a 3-lobe windowed sinc, support 3.
    Lanczos,
}

impl ResampleFilter {
    /// The filter of a `PIL.Image.Resampling` value (what `preprocessor_config.json` stores);
    /// `None` for the ones tcd-ort does not implement (NEAREST, BOX, HAMMING).
    pub fn from_pil(value: i64) -> Option<Self> {
        match value {
            1 => Some(ResampleFilter::Lanczos),
            2 => Some(ResampleFilter::Bilinear),
            3 => Some(ResampleFilter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            ResampleFilter::Bilinear => 1.0,
            ResampleFilter::Bicubic => 2.0,
            ResampleFilter::Lanczos => 3.0,
        }
    }

    /// Pillow's `bilinear_filter`, `bicubic_filter` and `lanczos_filter`, in double.
    fn weight(self, x: f64) -> f64 {
        match self {
            ResampleFilter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            ResampleFilter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            ResampleFilter::Lanczos => {
                fn sinc(x: f64) -> f64 {
                    if x == 0.0 {
                        1.0
                    } else {
                        let x = x * std::f64::consts::PI;
                        x.sin() / x
                    }
                }
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// PIL's `Image.resize(size, Image.LANCZOS)` for 8-bit RGB; see [`resize`].
pub fn resize_lanczos(image: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    resize(image, width, height, ResampleFilter::Lanczos)
}

/// PIL's `Image.resize(size, filter)` for 8-bit RGB.
///
/// This is Pillow's `ImagingResample`: a separable filter with coefficients quantised to 22
/// fractional bits and each pass rounded and clipped to 8 bits. A one-axis resize is bit-exact;
/// for two-axis resizes see `vertical_first`. A same-size request returns a copy, as PIL does.
pub fn resize(
    image: &RgbImage,
    width: u32,
    height: u32,
    filter: ResampleFilter,
) -> Result<RgbImage> {
    check_buffer(image.width, image.height, image.pixels.len(), 3)?;
    if width == 0 || height == 0 {
        return Err(Error::invalid(format!(
            "cannot resize an image to {width}x{height}"
        )));
    }
    let (in_w, in_h) = (image.width as usize, image.height as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let mut pixels = image.pixels.clone();
    let horizontal = |pixels: &[u8], h: usize| -> Vec<u8> {
        let k = Coefficients::new(filter, in_w, out_w);
        let mut out = vec![0u8; out_w * h * 3];
        for y in 0..h {
            for c in 0..3 {
                k.apply(
                    &pixels[y * in_w * 3 + c..(y + 1) * in_w * 3],
                    3,
                    &mut out[y * out_w * 3 + c..(y + 1) * out_w * 3],
                    3,
                );
            }
        }
        out
    };
    let vertical = |pixels: &[u8], w: usize| -> Vec<u8> {
        let k = Coefficients::new(filter, in_h, out_h);
        let mut out = vec![0u8; w * out_h * 3];
        for x in 0..w * 3 {
            k.apply(&pixels[x..], w * 3, &mut out[x..], w * 3);
        }
        out
    };
    if vertical_first(filter, in_w, in_h, out_w, out_h) {
        if out_h != in_h {
            pixels = vertical(&pixels, in_w);
        }
        if out_w != in_w {
            pixels = horizontal(&pixels, out_h);
        }
    } else {
        if out_w != in_w {
            pixels = horizontal(&pixels, in_h);
        }
        if out_h != in_h {
            pixels = vertical(&pixels, out_w);
        }
    }
    RgbImage::new(width, height, pixels)
}

/// Which pass Pillow runs first. Pillow 13 no longer always filters rows first; running the
/// pass with the longer kernel first reproduces it for most size pairs (about 92% of random
/// ones with Lanczos, checked against Pillow 13.0); the rest differ in a few pixels by rounding.
fn vertical_first(
    filter: ResampleFilter,
    in_w: usize,
    in_h: usize,
    out_w: usize,
    out_h: usize,
) -> bool {
    Coefficients::new(filter, in_h, out_h).ksize > Coefficients::new(filter, in_w, out_w).ksize
}

/// Pillow's `PRECISION_BITS` for 8-bit resampling: `32 - 8 - 2`.
const PRECISION_BITS: u32 = 22;

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Per output pixel: the first input pixel and how many are read, and fixed-point weights
/// (Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`).
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

impl Coefficients {
    fn new(filter: ResampleFilter, in_size: usize, out_size: usize) -> Self {
        // PIL passes the box as floats: (in1 - in0) is computed in float, then widened.
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin).min(ksize);
            let mut ww = 0.0;
            for (x, slot) in k.iter_mut().enumerate().take(count) {
                let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
                *slot = w;
                ww += w;
            }
            for (x, &w) in k.iter().enumerate().take(count) {
                let w = if ww != 0.0 { w / ww } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                weights[xx * ksize + x] = if w < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                };
            }
            bounds.push((xmin, count));
        }
        Coefficients {
            ksize,
            bounds,
            weights,
        }
    }

    /// Filters one line: `src[i * src_stride]` is input pixel `i`, `dst[o * dst_stride]`
    /// output pixel `o` (one channel).
    fn apply(&self, src: &[u8], src_stride: usize, dst: &mut [u8], dst_stride: usize) {
        for (o, &(first, count)) in self.bounds.iter().enumerate() {
            let k = &self.weights[o * self.ksize..o * self.ksize + count];
            let mut ss: i32 = 1 << (PRECISION_BITS - 1);
            for (i, &w) in k.iter().enumerate() {
                ss = ss.wrapping_add(i32::from(src[(first + i) * src_stride]).wrapping_mul(w));
            }
            dst[o * dst_stride] = clip8(ss);
        }
    }
}

/// PIL's `convert("L")` of RGB: ITU-R 601-2 luma in 16-bit fixed point, rounded.
pub fn to_grayscale(image: &RgbImage) -> Vec<u8> {
    image
        .pixels
        .chunks_exact(3)
        .map(|p| {
            let l = u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471;
            ((l + 0x8000) >> 16) as u8
        })
        .collect()
}

/// Resizes to `(width, height)` with PIL's Lanczos when the size differs.
fn fit(image: &RgbImage, width: u32, height: u32) -> Result<std::borrow::Cow<'_, RgbImage>> {
    if (image.width, image.height) == (width, height) {
        Ok(std::borrow::Cow::Borrowed(image))
    } else {
        resize_lanczos(image, width, height).map(std::borrow::Cow::Owned)
    }
}

/// diffusers' `VaeImageProcessor.preprocess` of an RGB image: resize (Lanczos) to
/// `(width, height)`, `/ 255`, `* 2 - 1`; `[1, 3, height, width]` float32.
pub fn image_to_tensor(image: &RgbImage, width: u32, height: u32) -> Result<ArrayD<f32>> {
    rgb_tensor(image, width, height, |unit| 2.0 * unit - 1.0)
}

/// The same without the normalisation to `[-1, 1]` (`do_normalize=False`, as ControlNet
/// pipelines prepare control images): values `v / 255` in `[0, 1]`.
pub fn image_to_unit_tensor(image: &RgbImage, width: u32, height: u32) -> Result<ArrayD<f32>> {
    rgb_tensor(image, width, height, |unit| unit)
}

fn rgb_tensor(
    image: &RgbImage,
    width: u32,
    height: u32,
    map: impl Fn(f32) -> f32,
) -> Result<ArrayD<f32>> {
    let image = fit(image, width, height)?;
    let (w, h) = (width as usize, height as usize);
    let mut out = ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 3, h, w]));
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let unit = f32::from(image.pixels[(y * w + x) * 3 + c]) / 255.0;
                out[[0, c, y, x]] = map(unit);
            }
        }
    }
    Ok(out)
}

/// diffusers' mask pre-processing (`VaeImageProcessor(do_normalize=False, do_binarize=True,
/// do_convert_grayscale=True)`): resize (Lanczos, in RGB) to `(width, height)`, PIL's
/// `convert("L")`, `/ 255`, then 1 where `>= 0.5` and 0 elsewhere; `[1, 1, height, width]`.
pub fn mask_to_tensor(mask: &RgbImage, width: u32, height: u32) -> Result<ArrayD<f32>> {
    let mask = fit(mask, width, height)?;
    let gray = to_grayscale(&mask);
    let values = gray
        .iter()
        .map(|&v| if f32::from(v) / 255.0 < 0.5 { 0.0 } else { 1.0 })
        .collect();
    ArrayD::from_shape_vec(vec![1, 1, height as usize, width as usize], values)
        .map_err(|e| Error::Runtime(format!("mask tensor: {e}")))
}

/// The binarised mask as an image (white = repainted), for grids.
pub fn mask_preview(mask: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    let tensor = mask_to_tensor(mask, width, height)?;
    let gray: Vec<u8> = tensor.iter().map(|&v| (v * 255.0) as u8).collect();
    RgbImage::from_gray(width, height, &gray)
}

/// Places images side by side in one row (diffusers' `make_image_grid(images, 1, n)`): every
/// cell has the size of the first image; larger images are cropped, smaller ones leave black.
pub fn image_grid(images: &[&RgbImage]) -> Result<RgbImage> {
    let Some(first) = images.first() else {
        return Err(Error::invalid("an image grid needs at least one image"));
    };
    let (cw, ch) = (first.width as usize, first.height as usize);
    let total_w = cw * images.len();
    let mut pixels = vec![0u8; total_w * ch * 3];
    for (i, image) in images.iter().enumerate() {
        let (w, h) = (image.width as usize, image.height as usize);
        for y in 0..h.min(ch) {
            let src = &image.pixels[y * w * 3..y * w * 3 + w.min(cw) * 3];
            let start = (y * total_w + i * cw) * 3;
            pixels[start..start + src.len()].copy_from_slice(src);
        }
    }
    RgbImage::new(
        u32::try_from(total_w).map_err(|_| Error::invalid("image grid too wide"))?,
        first.height,
        pixels,
    )
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
