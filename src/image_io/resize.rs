//! Pillow's `Image.resize` for 8-bit RGB, bit for bit: its filters, fixed-point coefficients
//! and pass order.

use super::image::check_buffer;
use super::RgbImage;
use crate::{Error, Result};

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
/// fractional bits and each pass rounded and clipped to 8 bits, the passes in Pillow 13's order
/// (see `vertical_first`). A same-size request returns a copy, as PIL does.
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
    if vertical_first(in_w, in_h, out_w, out_h) {
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

/// Which pass Pillow runs first. Pillow 13.0 filters columns first when the height shrinks by
/// more than twice as many pixels as the width does (`ImagingResampleInner`,
/// python-pillow/Pillow#9549), rows first otherwise, as every earlier Pillow did. The order
/// matters beyond rounding: the first pass clips its overshoot (bicubic, Lanczos) to 8 bits, so
/// on noisy images the two orders differ by tens of levels.
fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let shrink = |i: usize, o: usize| i as i64 - o as i64;
    let (dx, dy) = (shrink(in_w, out_w), shrink(in_h, out_h));
    dy > 0 && dy > dx * 2
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
