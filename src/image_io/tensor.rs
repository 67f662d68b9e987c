//! Images to the tensors the graphs take (diffusers' `VaeImageProcessor`), and VAE output back
//! to images.

use ndarray::{ArrayD, ArrayView4, Axis};

use super::{resize_lanczos, to_grayscale, RgbImage};
use crate::{Error, Result};

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
        .map_err(|e| Error::internal("mask tensor", e))
}

/// The binarised mask as an image (white = repainted), for grids.
pub fn mask_preview(mask: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    let tensor = mask_to_tensor(mask, width, height)?;
    let gray: Vec<u8> = tensor.iter().map(|&v| (v * 255.0) as u8).collect();
    RgbImage::from_gray(width, height, &gray)
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
}
