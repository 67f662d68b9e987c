//! VAE tiling ([`super::GenerateRequest::vae_tiling`]), exactly as diffusers'
//! `pipe.vae.enable_tiling()` runs `AutoencoderKL.tiled_decode` and `_tiled_encode`: the input
//! cut into tiles of the VAE's `sample_size` (pixels) or `sample_size / scale factor`
//! (latents) overlapping by a quarter, each tile run on its own, neighbours blended linearly
//! over the overlap (top edge first, then left, each tile blended in place so that the next
//! row blends with the blended tile) and the tiles cropped and joined. The decoder's memory is
//! then bounded by the tile, whatever the image size; the output differs slightly from an
//! untiled run (diffusers' own seams).

use ndarray::{concatenate, s, ArrayD, Axis};

use crate::model::VaeConfig;
use crate::{Error, Result};

/// diffusers' `tile_overlap_factor`.
const OVERLAP: f64 = 0.25;

/// The tile sides of a VAE, as diffusers derives them from its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tiles {
    /// `tile_sample_min_size`: the VAE config's `sample_size`.
    pub(super) sample: usize,
    /// `tile_latent_min_size`: `int(sample_size / 2 ** (len(block_out_channels) - 1))`.
    pub(super) latent: usize,
}

impl Tiles {
    pub(super) fn of(vae: &VaeConfig) -> Self {
        let sample = vae.tile_sample_size();
        Tiles {
            sample,
            latent: sample / vae.scale_factor(),
        }
    }

    /// Whether diffusers tiles a decode of latents `h` x `w`.
    pub(super) fn tiles_latents(&self, h: usize, w: usize) -> bool {
        h > self.latent || w > self.latent
    }

    /// Whether diffusers tiles an encode of an image `h` x `w`.
    pub(super) fn tiles_pixels(&self, h: usize, w: usize) -> bool {
        h > self.sample || w > self.sample
    }
}

/// Runs `run` on the tiles of `input` (`[batch, c, h, w]`), `tile_in` on a side, whose outputs
/// are `tile_out` on a side, and blends them as diffusers does.
pub(super) fn tiled(
    input: &ArrayD<f32>,
    tile_in: usize,
    tile_out: usize,
    run: &mut dyn FnMut(ArrayD<f32>) -> Result<ArrayD<f32>>,
) -> Result<ArrayD<f32>> {
    if input.ndim() != 4 || tile_in == 0 || tile_out == 0 {
        return Err(Error::invariant(
            "tiling needs [batch, c, h, w] and non-empty tiles",
        ));
    }
    // Python's int() of float64 products, as diffusers computes them.
    let overlap_size = ((tile_in as f64 * (1.0 - OVERLAP)) as usize).max(1);
    let blend_extent = (tile_out as f64 * OVERLAP) as usize;
    let row_limit = tile_out - blend_extent;
    let (h, w) = (input.shape()[2], input.shape()[3]);
    let mut rows: Vec<Vec<ArrayD<f32>>> = Vec::new();
    for i in (0..h).step_by(overlap_size) {
        let mut row = Vec::new();
        for j in (0..w).step_by(overlap_size) {
            let tile = input
                .slice(s![.., .., i..(i + tile_in).min(h), j..(j + tile_in).min(w)])
                .to_owned()
                .into_dyn();
            row.push(run(tile)?);
        }
        rows.push(row);
    }
    let mut joined_rows = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            if i > 0 {
                let (above, here) = rows.split_at_mut(i);
                blend_v(&above[i - 1][j], &mut here[0][j], blend_extent);
            }
            if j > 0 {
                let (left, here) = rows[i].split_at_mut(j);
                blend_h(&left[j - 1], &mut here[0], blend_extent);
            }
        }
        let cropped: Vec<_> = rows[i]
            .iter()
            .map(|t| {
                let (th, tw) = (t.shape()[2], t.shape()[3]);
                t.slice(s![.., .., ..row_limit.min(th), ..row_limit.min(tw)])
                    .into_dyn()
            })
            .collect();
        joined_rows
            .push(concatenate(Axis(3), &cropped).map_err(|e| Error::internal("joining tiles", e))?);
    }
    let views: Vec<_> = joined_rows.iter().map(|r| r.view()).collect();
    concatenate(Axis(2), &views).map_err(|e| Error::internal("joining tile rows", e))
}

/// The blend weights of position `k` of `extent`, as torch computes `a * (1 - k / e)` and
/// `b * (k / e)` with a Python float on float32 tensors.
fn weights(k: usize, extent: usize) -> (f32, f32) {
    let t = k as f64 / extent as f64;
    ((1.0 - t) as f32, t as f32)
}

/// diffusers' `blend_v`: the top `extent` rows of `b` fade in from the bottom rows of `a`.
fn blend_v(a: &ArrayD<f32>, b: &mut ArrayD<f32>, extent: usize) {
    let extent = extent.min(a.shape()[2]).min(b.shape()[2]);
    let ah = a.shape()[2];
    for y in 0..extent {
        let (wa, wb) = weights(y, extent);
        let above = a.slice(s![.., .., ah - extent + y, ..]);
        let mut here = b.slice_mut(s![.., .., y, ..]);
        ndarray::Zip::from(&mut here)
            .and(&above)
            .for_each(|v, &u| *v = u * wa + *v * wb);
    }
}

/// diffusers' `blend_h`: the left `extent` columns of `b` fade in from the right ones of `a`.
fn blend_h(a: &ArrayD<f32>, b: &mut ArrayD<f32>, extent: usize) {
    let extent = extent.min(a.shape()[3]).min(b.shape()[3]);
    let aw = a.shape()[3];
    for x in 0..extent {
        let (wa, wb) = weights(x, extent);
        let left = a.slice(s![.., .., .., aw - extent + x]);
        let mut here = b.slice_mut(s![.., .., .., x]);
        ndarray::Zip::from(&mut here)
            .and(&left)
            .for_each(|v, &u| *v = u * wa + *v * wb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With an identity "decoder" and no scale change, tiling gives back the input where tiles
    /// do not overlap, and blends two equal overlaps to themselves.
    #[test]
    fn tiling_an_identity_gives_the_input_back() {
        let input = ArrayD::from_shape_fn(vec![1, 2, 10, 13], |d| (d[2] * 13 + d[3]) as f32);
        let out = tiled(&input, 8, 8, &mut |t| Ok(t)).expect("tiled");
        assert_eq!(out.shape(), input.shape());
        assert_eq!(out, input);
    }

    #[test]
    fn blending_follows_diffusers_weights() {
        let a = ArrayD::from_elem(vec![1, 1, 4, 2], 1.0f32);
        let mut b = ArrayD::from_elem(vec![1, 1, 4, 2], 0.0f32);
        blend_v(&a, &mut b, 2);
        // Row 0: all a; row 1: half and half; rows 2, 3 untouched.
        assert_eq!(b.slice(s![0, 0, .., 0]).to_vec(), vec![1.0, 0.5, 0.0, 0.0]);
    }
}
