//! Weight deltas: `ΔW = Σ_adapters weight · scale · up @ down`, one buffer per parameter.
//!
//! A conv LoRA (`up (out, r, 1, 1)`, `down (r, in, kh, kw)`) is the same product with `down`
//! flattened to `(r, in·kh·kw)`; this equals peft's 1×1 squeeze-matmul and its k×k
//! `conv2d(A^T, B)^T` exactly in exact arithmetic.

use rayon::prelude::*;

use super::file::Tensor;

/// One term of a parameter's delta.
pub(crate) struct Term<'a> {
    pub down: &'a Tensor,
    pub up: &'a Tensor,
    /// user weight · alpha / r
    pub scale: f32,
}

/// The delta's shape: `(out, in)` for linear layers, `(out, in, kh, kw)` for convs.
pub(crate) fn delta_shape(down: &Tensor, up: &Tensor) -> Vec<usize> {
    let mut shape = vec![up.shape[0]];
    shape.extend_from_slice(&down.shape[1..]);
    shape
}

/// Accumulates every term into one `out × cols` buffer; rows are split across threads.
///
/// Every term must have the same delta shape (checked by the caller).
pub(crate) fn accumulate(terms: &[Term<'_>], out: usize, cols: usize) -> Vec<f32> {
    let mut values = vec![0.0f32; out * cols];
    add_into(terms, cols, &mut values);
    values
}

/// Adds the summed delta of `terms` into `base` (`out × cols`, row-major), rows split across
/// threads.
///
/// Each block of rows gets its delta computed in a small scratch buffer and then added, so the
/// result is `w + Σ terms` exactly as when the whole delta is materialised first (and as peft's
/// merge adds a computed delta), without a delta-sized allocation.
pub(crate) fn add_into(terms: &[Term<'_>], cols: usize, base: &mut [f32]) {
    // A few rows per task keeps the per-task overhead small next to r·cols FMAs per row.
    let rows_per_task = (4096 / cols.max(1)).clamp(1, 64);
    base.par_chunks_mut(rows_per_task * cols)
        .enumerate()
        .for_each(|(chunk, block)| {
            let first = chunk * rows_per_task;
            let mut delta = vec![0.0f32; block.len()];
            for (i, row) in delta.chunks_exact_mut(cols).enumerate() {
                delta_row(terms, first + i, cols, row);
            }
            for (w, d) in block.iter_mut().zip(&delta) {
                *w += d;
            }
        });
}

/// Row `o` of the summed delta, accumulated into `row` (zeroed by the caller).
fn delta_row(terms: &[Term<'_>], o: usize, cols: usize, row: &mut [f32]) {
    for t in terms {
        let r = t.up.shape[1];
        let up_row = &t.up.values[o * r..(o + 1) * r];
        let down = &t.down.values[..r * cols];
        // Four ranks per pass: the output row is loaded and stored a quarter as
        // often, which is what bounds this loop once `down` sits in cache.
        let mut k = 0;
        while k + 4 <= r {
            let s = [
                up_row[k] * t.scale,
                up_row[k + 1] * t.scale,
                up_row[k + 2] * t.scale,
                up_row[k + 3] * t.scale,
            ];
            let d0 = &down[k * cols..(k + 1) * cols];
            let d1 = &down[(k + 1) * cols..(k + 2) * cols];
            let d2 = &down[(k + 2) * cols..(k + 3) * cols];
            let d3 = &down[(k + 3) * cols..(k + 4) * cols];
            for ((((d, &a0), &a1), &a2), &a3) in row.iter_mut().zip(d0).zip(d1).zip(d2).zip(d3) {
                *d += s[0] * a0 + s[1] * a1 + s[2] * a2 + s[3] * a3;
            }
            k += 4;
        }
        for (kk, &u) in up_row.iter().enumerate().skip(k) {
            let s = u * t.scale;
            let down_row = &down[kk * cols..(kk + 1) * cols];
            for (d, &a) in row.iter_mut().zip(down_row) {
                *d += s * a;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], values: Vec<f32>) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            values,
        }
    }

    #[test]
    fn linear_is_scaled_up_times_down() {
        // up (2×1), down (1×3)
        let up = t(&[2, 1], vec![1.0, 2.0]);
        let down = t(&[1, 3], vec![1.0, 0.5, -1.0]);
        let d = accumulate(
            &[Term {
                down: &down,
                up: &up,
                scale: 2.0,
            }],
            2,
            3,
        );
        assert_eq!(d, vec![2.0, 1.0, -2.0, 4.0, 2.0, -4.0]);
    }

    #[test]
    fn conv_kxk_matches_explicit_sum() {
        let (o, r, i, k) = (3, 6, 2, 3);
        let up = t(&[o, r, 1, 1], (0..o * r).map(|x| x as f32 * 0.1).collect());
        let down = t(
            &[r, i, k, k],
            (0..r * i * k * k).map(|x| (x as f32).sin()).collect(),
        );
        let cols = i * k * k;
        let d = accumulate(
            &[Term {
                down: &down,
                up: &up,
                scale: 0.5,
            }],
            o,
            cols,
        );
        for oo in 0..o {
            for c in 0..cols {
                let want: f32 = (0..r)
                    .map(|rr| up.values[oo * r + rr] * down.values[rr * cols + c])
                    .sum::<f32>()
                    * 0.5;
                assert!((d[oo * cols + c] - want).abs() < 1e-6);
            }
        }
        assert_eq!(delta_shape(&down, &up), vec![o, i, k, k]);
    }
}
