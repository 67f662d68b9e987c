//! 8-bit RGB images: checked construction, PIL's grayscale conversion, grids.

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

pub(super) fn check_buffer(width: u32, height: u32, len: usize, channels: usize) -> Result<()> {
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
