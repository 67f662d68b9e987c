//! How much one request may ask for ([`Limits`]), per engine.

use super::request::Field;
use crate::{Error, Result};

/// How much one request may ask for, checked before anything is allocated. A host lowers or
/// raises them for its engine ([`super::EngineOptions::limits`]); [`Limits::LARGE`] is as far
/// as they go: beyond it the noise and image buffers alone run into gigabytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest side of an output image, in pixels.
    pub max_side: usize,
    /// Pixels in one output image (width x height).
    pub max_pixels: usize,
    /// Images per request.
    pub max_images: usize,
}

impl Limits {
    /// The default: sides up to 2048 and 2048x2048 pixels (four times SDXL's native
    /// 1024x1024), 16 images per request.
    pub const DEFAULT: Limits = Limits {
        max_side: 2048,
        max_pixels: 2048 * 2048,
        max_images: 16,
    };

    /// For users who really want more (4096x4096 and up), and the ceiling of every limit:
    /// sides up to 16384, 8192x8192 pixels, 256 images per request.
    pub const LARGE: Limits = Limits {
        max_side: 16384,
        max_pixels: 8192 * 8192,
        max_images: 256,
    };

    /// Checks an output size `(height, width)` and the request's image count against the
    /// limits: a refusal is an [`Error::OverLimit`] naming the field.
    pub fn check(&self, (height, width): (usize, usize), num_images: usize) -> Result<()> {
        let over = |field, message: String| Err(Error::OverLimit { field, message });
        for (field, side) in [(Field::Width, width), (Field::Height, height)] {
            if side > self.max_side {
                return over(
                    field,
                    format!("is {side} pixels, past the limit of {}", self.max_side),
                );
            }
        }
        if width * height > self.max_pixels {
            return over(
                Field::Width,
                format!(
                    "x height is {width}x{height} = {} pixels, past the limit of {}",
                    width * height,
                    self.max_pixels
                ),
            );
        }
        if num_images > self.max_images {
            return over(
                Field::NumImages,
                format!(
                    "is {num_images}, past the limit of {} per request",
                    self.max_images
                ),
            );
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}
