//! The float32 arithmetic of the torch calls diffusers' scheduler makes (`linspace`, `cumprod`,
//! the cosine beta schedule, zero-terminal-SNR rescaling, Python's `int()`), reproduced so that
//! the schedule matches bit for bit.

/// `int(x)` of a non-negative Python float.
pub(super) fn truncate_to_usize(x: f64) -> usize {
    // `as` truncates toward zero and saturates, like int() for the values that reach here.
    x as usize
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit.
///
/// ATen's kernel narrows the ends to float, computes the step in float, and fills the first half
/// forward from `start` and the second half backward from `end`; the compiler fuses each
/// `start + step * i` into one FMA.
pub(super) fn torch_linspace(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of a float32 CPU tensor: ATen accumulates in double and narrows each
/// partial product.
pub(super) fn torch_cumprod(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform, computed in double and
/// narrowed to float32 as `torch.tensor(betas, dtype=torch.float32)` does.
pub(super) fn betas_for_alpha_bar_cosine(n: usize, max_beta: f64) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` in float32 (Lin et al., 2023, Algorithm 1): shift and
/// scale `sqrt(alphas_cumprod)` so the last timestep has zero signal.
pub(super) fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = torch_cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_bar[0], sqrt_bar[sqrt_bar.len() - 1]);
    let scale = first / (first - last);
    for v in sqrt_bar.iter_mut() {
        *v -= last;
        *v *= scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}
