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
    // A few rows per task keeps the per-task overhead small next to r·cols FMAs per row.
    let rows_per_task = (4096 / cols.max(1)).clamp(1, 64);
    values
        .par_chunks_mut(rows_per_task * cols)
        .enumerate()
        .for_each(|(chunk, block)| {
            let first = chunk * rows_per_task;
            for (i, row) in block.chunks_exact_mut(cols).enumerate() {
                let o = first + i;
                for t in terms {
                    let r = t.up.shape[1];
                    let up_row = &t.up.values[o * r..(o + 1) * r];
                    for (k, &u) in up_row.iter().enumerate() {
                        let s = u * t.scale;
                        if s == 0.0 {
                            continue;
                        }
                        let down_row = &t.down.values[k * cols..(k + 1) * cols];
                        // Written as a zip so the compiler vectorises it.
                        for (d, &a) in row.iter_mut().zip(down_row) {
                            *d += s * a;
                        }
                    }
                }
            }
        });
    values
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
        let (o, r, i, k) = (3, 2, 2, 3);
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
