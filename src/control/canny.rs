//! Canny edge detection, bit-exact with OpenCV's `cv2.Canny(image, low, high)` at its defaults
//! (3×3 Sobel aperture, L1 gradient norm): the preprocessor of ControlNet-canny.
//!
//! diffusers' examples build the control image as
//! `np.concatenate([cv2.Canny(np.array(image), low, high)[:, :, None]] * 3, axis=2)`, i.e. Canny
//! on the **RGB** array, so [`canny`] follows OpenCV's multi-channel rule and [`canny_gray`] its
//! single-channel one. The steps, each as OpenCV's `modules/imgproc/src/canny.cpp` does them:
//!
//! 1. Sobel derivatives `dx`, `dy` per channel, borders replicated (`BORDER_REPLICATE`).
//! 2. Magnitude `|dx| + |dy|`; with several channels, the channel with the largest magnitude
//!    (the first one on ties) gives the pixel its magnitude and its direction.
//! 3. Non-maximum suppression along the gradient direction quantised to 0°, 45°, 90° or 135°
//!    with OpenCV's fixed-point tangent test; magnitudes outside the image count as 0.
//! 4. Hysteresis: pixels that survive and exceed `high` seed edges, which grow through
//!    8-connected survivors exceeding `low`. Both thresholds are floored to integers first and
//!    swapped when `low > high`.

use crate::image_io::RgbImage;
use crate::{Error, Result};

/// The low threshold of diffusers' ControlNet-canny examples.
pub const DEFAULT_LOW: f32 = 100.0;
/// The high threshold of diffusers' ControlNet-canny examples.
pub const DEFAULT_HIGH: f32 = 200.0;

/// `tan(22.5°)` in 15-bit fixed point, the constant OpenCV's sector test uses; the test must use
/// the same rounding to pick the same neighbours on near-diagonal gradients.
const TG22: i32 = 13573;
const SHIFT: u32 = 15;

/// Map states during suppression and hysteresis, as OpenCV names them.
const CANDIDATE: u8 = 0;
const NOT_EDGE: u8 = 1;
const EDGE: u8 = 2;

/// The Canny edge map of an RGB image as a 3-channel image (the edge map in R, G and B), ready
/// to be a ControlNet-canny control image: what diffusers' examples compute with
/// `cv2.Canny(np.array(image), low, high)` followed by stacking the result three times.
///
/// `low` and `high` are the hysteresis thresholds on the L1 gradient magnitude (Sobel 3×3, so
/// 0 to 2040); OpenCV floors them and swaps them when `low > high`, and so does this.
/// Errors when a threshold is negative or not finite, or when the pixel buffer does not hold
/// `width * height * 3` bytes.
pub fn canny(image: &RgbImage, low: f32, high: f32) -> Result<RgbImage> {
    let edges = edge_map(&image.pixels, image.width, image.height, 3, low, high)?;
    RgbImage::from_gray(image.width, image.height, &edges)
}

/// The Canny edge map of an 8-bit grayscale image (`width * height` bytes, row-major): 255 on
/// edges, 0 elsewhere, as `cv2.Canny(gray, low, high)` returns it.
///
/// Thresholds as for [`canny`]. Errors on bad thresholds or a buffer of the wrong size.
pub fn canny_gray(gray: &[u8], width: u32, height: u32, low: f32, high: f32) -> Result<Vec<u8>> {
    edge_map(gray, width, height, 1, low, high)
}

/// OpenCV's integer thresholds: swapped into order, then floored.
fn thresholds(low: f32, high: f32) -> Result<(i32, i32)> {
    for (name, value) in [("low", low), ("high", high)] {
        if !value.is_finite() || value < 0.0 {
            return Err(Error::invalid(format!(
                "Canny {name} threshold must be a finite number >= 0, got {value} \
                 (diffusers' examples use 100 and 200)"
            )));
        }
    }
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    // Magnitudes never exceed 2040, so saturating huge thresholds changes nothing. They are
    // also always even (dx and dy share their parity), so rounding instead of flooring would
    // only show with fractions above an odd integer; the fixtures include such a case.
    Ok((low.floor() as i32, high.floor() as i32))
}

fn edge_map(
    pixels: &[u8],
    width: u32,
    height: u32,
    channels: usize,
    low: f32,
    high: f32,
) -> Result<Vec<u8>> {
    let (low, high) = thresholds(low, high)?;
    let (w, h) = (width as usize, height as usize);
    let expected = w.checked_mul(h).and_then(|n| n.checked_mul(channels));
    if w == 0 || h == 0 || expected != Some(pixels.len()) {
        return Err(Error::invalid(format!(
            "Canny needs a non-empty {width}x{height} image with {channels} channel(s) \
             ({} bytes), got {} bytes",
            expected.map_or_else(|| "more".to_string(), |n| n.to_string()),
            pixels.len()
        )));
    }
    let gradient = Gradient::sobel(pixels, w, h, channels);
    let mut map = gradient.suppress(low, high);
    hysteresis(&mut map, w + 2);
    Ok(map_to_edges(&map, w, h))
}

/// Per-pixel derivatives of the winning channel and a magnitude plane padded by one zero pixel
/// on every side, so that suppression at the border compares against 0 as OpenCV's does.
struct Gradient {
    width: usize,
    height: usize,
    dx: Vec<i32>,
    dy: Vec<i32>,
    /// `(width + 2) * (height + 2)` L1 magnitudes, zero on the frame.
    magnitude: Vec<i32>,
}

impl Gradient {
    fn sobel(pixels: &[u8], w: usize, h: usize, channels: usize) -> Self {
        let stride = w + 2;
        let mut dx = vec![0; w * h];
        let mut dy = vec![0; w * h];
        let mut magnitude = vec![0; stride * (h + 2)];
        let at =
            |row: usize, col: usize, c: usize| i32::from(pixels[(row * w + col) * channels + c]);
        for y in 0..h {
            // BORDER_REPLICATE: the row or column beyond the edge repeats the edge.
            let (ym, yp) = (y.saturating_sub(1), (y + 1).min(h - 1));
            for x in 0..w {
                let (xm, xp) = (x.saturating_sub(1), (x + 1).min(w - 1));
                let mut best = (0, 0, -1);
                for c in 0..channels {
                    let gx = (at(ym, xp, c) + 2 * at(y, xp, c) + at(yp, xp, c))
                        - (at(ym, xm, c) + 2 * at(y, xm, c) + at(yp, xm, c));
                    let gy = (at(yp, xm, c) + 2 * at(yp, x, c) + at(yp, xp, c))
                        - (at(ym, xm, c) + 2 * at(ym, x, c) + at(ym, xp, c));
                    let m = gx.abs() + gy.abs();
                    // Strictly greater: on a tie the earlier channel keeps the pixel, which
                    // decides the direction and so which neighbours suppression compares.
                    if m > best.2 {
                        best = (gx, gy, m);
                    }
                }
                dx[y * w + x] = best.0;
                dy[y * w + x] = best.1;
                magnitude[(y + 1) * stride + x + 1] = best.2;
            }
        }
        Gradient {
            width: w,
            height: h,
            dx,
            dy,
            magnitude,
        }
    }

    /// Non-maximum suppression and double thresholding into a padded map whose frame is
    /// [`NOT_EDGE`], so hysteresis never leaves the image.
    fn suppress(&self, low: i32, high: i32) -> Vec<u8> {
        let (w, h) = (self.width, self.height);
        let stride = w + 2;
        let mag = &self.magnitude;
        let mut map = vec![NOT_EDGE; stride * (h + 2)];
        for y in 0..h {
            for x in 0..w {
                let p = (y + 1) * stride + x + 1;
                let m = mag[p];
                if m <= low {
                    continue;
                }
                let (xs, ys) = (self.dx[y * w + x], self.dy[y * w + x]);
                let ax = xs.abs();
                let ay = ys.abs() << SHIFT;
                let tg22x = ax * TG22;
                // The mix of strict and non-strict comparisons is OpenCV's: on a plateau
                // exactly one of two equal neighbours survives, the upper or left one.
                let is_max = if ay < tg22x {
                    m > mag[p - 1] && m >= mag[p + 1]
                } else {
                    let tg67x = tg22x + (ax << (SHIFT + 1));
                    if ay > tg67x {
                        m > mag[p - stride] && m >= mag[p + stride]
                    } else if (xs ^ ys) < 0 {
                        // Opposite signs: the gradient runs along the anti-diagonal.
                        m > mag[p - stride + 1] && m > mag[p + stride - 1]
                    } else {
                        m > mag[p - stride - 1] && m > mag[p + stride + 1]
                    }
                };
                if is_max {
                    map[p] = if m > high { EDGE } else { CANDIDATE };
                }
            }
        }
        map
    }
}

/// Grows edges from every strong pixel through 8-connected candidates. The result does not
/// depend on the order pixels are visited in, so a plain stack gives OpenCV's output.
fn hysteresis(map: &mut [u8], stride: usize) {
    let mut stack: Vec<usize> = map
        .iter()
        .enumerate()
        .filter_map(|(i, &s)| (s == EDGE).then_some(i))
        .collect();
    while let Some(p) = stack.pop() {
        // Every EDGE pixel is inside the NOT_EDGE frame, so its neighbours are in bounds.
        for q in [
            p - stride - 1,
            p - stride,
            p - stride + 1,
            p - 1,
            p + 1,
            p + stride - 1,
            p + stride,
            p + stride + 1,
        ] {
            if map[q] == CANDIDATE {
                map[q] = EDGE;
                stack.push(q);
            }
        }
    }
}

fn map_to_edges(map: &[u8], w: usize, h: usize) -> Vec<u8> {
    let stride = w + 2;
    (0..h)
        .flat_map(|y| {
            map[(y + 1) * stride + 1..(y + 1) * stride + 1 + w]
                .iter()
                .map(|&s| if s == EDGE { 255 } else { 0 })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_swapped_and_floored() {
        assert_eq!(thresholds(200.9, 100.5).ok(), Some((100, 200)));
        assert_eq!(thresholds(0.0, 0.0).ok(), Some((0, 0)));
    }

    #[test]
    fn a_vertical_step_gives_one_edge_column() {
        let (w, h) = (8, 5);
        let gray: Vec<u8> = (0..w * h)
            .map(|i| if i % w < 4 { 0 } else { 200 })
            .collect();
        let edges =
            canny_gray(&gray, w as u32, h as u32, DEFAULT_LOW, DEFAULT_HIGH).unwrap_or_default();
        // Both columns beside the step have the same magnitude; the non-strict test on the
        // right neighbour keeps the left one, as OpenCV does.
        for row in edges.chunks(w) {
            assert_eq!(row, [0, 0, 0, 255, 0, 0, 0, 0]);
        }
    }
}
