//! Weight deltas: `ΔW = Σ_adapters weight · scale · up @ down`, one buffer per parameter.
//!
//! A conv LoRA (`up (out, r, 1, 1)`, `down (r, in, kh, kw)`) is the same product with `down`
//! flattened to `(r, in·kh·kw)`; this equals peft's 1×1 squeeze-matmul and its k×k
//! `conv2d(A^T, B)^T` exactly in exact arithmetic.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};
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
/// Each block of rows is one GEMM per term, `base[rows] += scale · up[rows] @ down`, through
/// `matrixmultiply` (which picks AVX/FMA kernels at run time), accumulating straight into the
/// weight: no delta-sized buffer, and the same sum as peft's merge up to float rounding.
pub(crate) fn add_into(terms: &[Term<'_>], cols: usize, base: &mut [f32]) {
    // The file's tensors widened once per call; a module's pair is small next to its weight.
    let widened: Vec<(Vec<f32>, Vec<f32>)> = terms
        .iter()
        .map(|t| (t.up.to_f32(), t.down.to_f32()))
        .collect();
    // Blocks of rows large enough for the GEMM kernel to reach full speed, small enough that
    // both cores stay busy on the narrower layers.
    let rows_per_task = (262_144 / cols.max(1)).clamp(8, 256);
    base.par_chunks_mut(rows_per_task * cols)
        .enumerate()
        .for_each(|(chunk, block)| {
            let first = chunk * rows_per_task;
            let rows = block.len() / cols;
            // Shapes were validated when the adapters were loaded (ranks agree, `base` has
            // out × cols values), so these views always exist.
            let Ok(mut c) = ArrayViewMut2::from_shape((rows, cols), block) else {
                return;
            };
            for (t, (up, down)) in terms.iter().zip(&widened) {
                let r = t.up.shape[1];
                let up = &up[first * r..(first + rows) * r];
                let down = &down[..r * cols];
                if let (Ok(a), Ok(b)) = (
                    ArrayView2::from_shape((rows, r), up),
                    ArrayView2::from_shape((r, cols), down),
                ) {
                    general_mat_mul(t.scale, &a, &b, 1.0, &mut c);
                }
            }
        });
}

/// Fills one LoRA slot of rank `rank` (see `export/lora_slots.py`) with `terms`, unfused:
/// `A` (`rank × cols`) holds each term's `down` rows one after the other, `B` (`out × rank`)
/// each term's `up` columns times its scale and `b_scale`; both are zero past the summed rank,
/// so `B @ A` is the summed delta and the padding adds nothing.
///
/// The caller checks that the ranks fit and every term has the delta shape `out × cols`.
pub(crate) fn fill_slot(
    terms: &[Term<'_>],
    out: usize,
    cols: usize,
    rank: usize,
    b_scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    // Widened straight from the file's bytes into the slot buffers: the only f32 copy.
    let mut a = vec![0.0f32; rank * cols];
    let mut b = vec![0.0f32; out * rank];
    let mut first = 0;
    for t in terms {
        let r = t.up.shape[1];
        t.down
            .widen_into(0, &mut a[first * cols..(first + r) * cols], 1.0);
        let scale = t.scale * b_scale;
        for (o, row) in b.chunks_exact_mut(rank).enumerate() {
            t.up.widen_into(o * r, &mut row[first..first + r], scale);
        }
        first += r;
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], values: Vec<f32>) -> Tensor {
        Tensor::from_f32(shape, &values)
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
    fn a_filled_slot_multiplies_to_the_summed_delta() {
        // Two terms of ranks 2 and 1 in a slot of rank 4 (one padding row / column).
        let (out, cols) = (3, 5);
        let up1 = t(&[out, 2], (0..6).map(|x| x as f32 - 2.0).collect());
        let down1 = t(&[2, cols], (0..10).map(|x| (x as f32).cos()).collect());
        let up2 = t(&[out, 1], vec![0.5, -1.0, 2.0]);
        let down2 = t(&[1, cols], (0..5).map(|x| x as f32 * 0.25).collect());
        let terms = [
            Term {
                down: &down1,
                up: &up1,
                scale: 0.5,
            },
            Term {
                down: &down2,
                up: &up2,
                scale: -0.7,
            },
        ];
        let (a, b) = fill_slot(&terms, out, cols, 4, 2.0);
        assert_eq!(a.len(), 4 * cols);
        assert_eq!(b.len(), out * 4);
        assert!(a[3 * cols..].iter().all(|&v| v == 0.0));
        assert!((0..out).all(|o| b[o * 4 + 3] == 0.0));
        let want = accumulate(&terms, out, cols);
        for o in 0..out {
            for c in 0..cols {
                let got: f32 = (0..4).map(|k| b[o * 4 + k] * a[k * cols + c]).sum();
                // b_scale 2 doubles the product.
                assert!((got - 2.0 * want[o * cols + c]).abs() < 1e-5, "{o},{c}");
            }
        }
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
        let (up_v, down_v) = (up.to_f32(), down.to_f32());
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
                    .map(|rr| up_v[oo * r + rr] * down_v[rr * cols + c])
                    .sum::<f32>()
                    * 0.5;
                assert!((d[oo * cols + c] - want).abs() < 1e-6);
            }
        }
        assert_eq!(delta_shape(&down, &up), vec![o, i, k, k]);
    }
}
