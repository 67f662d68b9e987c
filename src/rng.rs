//! Seeded noise sources.
//!
//! [`TorchGenerator`] reproduces `torch.Generator("cpu").manual_seed(seed)` followed by
//! `torch.randn(shape, generator=g, dtype=torch.float32)` bit for bit, so that a seed gives the
//! same initial latents and the same per-step noise as a diffusers pipeline run on the CPU
//! generator (diffusers' `randn_tensor` always draws from a CPU generator when one is passed).
//!
//! # What is reproduced
//!
//! * The engine is the 32-bit Mersenne Twister (mt19937) that ATen ships in
//!   `ATen/core/MT19937RNGEngine.h`. It is seeded with the low 32 bits of the 64-bit seed, as
//!   torch does.
//! * `randn` of a float32 tensor with 16 or more elements takes ATen's `normal_fill` path
//!   (`ATen/native/cpu/DistributionTemplates.h`): one 24-bit uniform per element, then
//!   Box-Muller over blocks of 16 (`NormalFill16`), and when the element count is not a
//!   multiple of 16 the last 16 uniforms are drawn again and the tail block recomputed.
//!   x86-64 builds of torch run the AVX2 specialisation of `NormalFill16<float>` even on
//!   AVX-512 CPUs (the kernel is not registered for AVX-512, so dispatch falls back to AVX2).
//!   That specialisation computes `log`, `sin` and `cos` with the Cephes polynomials of
//!   `avx_mathfun.h`, and the compiler fuses its multiply-adds; both are reproduced lane by
//!   lane here. The C library's `logf`/`cosf` would differ in the last bits.
//! * `randn` with fewer than 16 elements takes the per-element path:
//!   `at::normal_distribution<double>` with 53-bit uniforms, `log1p`, and a cached second
//!   sample that lives in the generator across calls until it is reseeded.
//!
//! # Which torch builds this matches
//!
//! Checked against torch 2.15.0 (x86-64 Linux wheel) on an AVX-512 CPU, with the default
//! kernels and with `ATEN_CPU_CAPABILITY=avx2`; both give the same numbers. The fixture
//! `tests/fixtures/rng.json` records the reference output; regenerate it with
//! `tests/golden/make_rng.py` to check another torch build. Not matched: torch builds whose
//! CPU capability is below AVX2 (`ATEN_CPU_CAPABILITY=default`, which takes the scalar libm
//! path), aarch64 and POWER builds, and releases before 1.9 (which used `log(1 - u)` in the
//! short path).
//!
//! CUDA generators use Philox and are not reproduced here.

use ndarray::{ArrayD, IxDyn};

/// Number of words in the mt19937 state.
const MT_N: usize = 624;
/// Middle word offset of the mt19937 recurrence.
const MT_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The 32-bit Mersenne Twister, laid out as ATen's `at::mt19937`.
#[derive(Clone, Debug)]
struct Mt19937 {
    state: Box<[u32; MT_N]>,
    /// Index of the next word to hand out; `MT_N` means the state must be regenerated.
    left: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; MT_N]);
        // torch keeps the full 64-bit seed for `initial_seed()` but only feeds the low 32 bits
        // to the engine (`init_with_uint32`).
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self { state, left: MT_N }
    }

    fn twist(&mut self) {
        let s = &mut self.state;
        for i in 0..MT_N {
            let y = (s[i] & UPPER_MASK) | (s[(i + 1) % MT_N] & LOWER_MASK);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            s[i] = s[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.left = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.left >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.left];
        self.left += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// A seeded generator that draws the same numbers as torch's default CPU generator.
///
/// Consecutive calls continue the same stream, exactly like reusing one `torch.Generator`:
/// a diffusers run that draws the initial latents and then one noise tensor per scheduler step
/// is reproduced by calling [`TorchGenerator::randn`] in the same order with the same shapes.
#[derive(Clone, Debug)]
pub struct TorchGenerator {
    seed: u64,
    engine: Mt19937,
    /// The second Box-Muller sample of the short (< 16 elements) path, which torch keeps in
    /// the generator (`next_double_normal_sample_`) and hands out on the next short draw.
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// The generator `torch.Generator("cpu").manual_seed(seed)` gives.
    ///
    /// Any `u64` is accepted; as in torch only the low 32 bits reach the engine, so seeds that
    /// differ only above bit 31 give the same numbers.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            engine: Mt19937::new(seed),
            next_double_normal: None,
        }
    }

    /// The seed this generator was created with (torch's `initial_seed()`).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// One raw 32-bit draw (torch's `CPUGeneratorImpl::random`).
    pub fn next_u32(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// One raw 64-bit draw made of two 32-bit draws, the first in the high half
    /// (torch's `CPUGeneratorImpl::random64`).
    pub fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.engine.next_u32());
        let lo = u64::from(self.engine.next_u32());
        (hi << 32) | lo
    }

    /// A float uniform in `[0, 1)` with 24 random bits (`uniform_real_distribution<float>`).
    fn uniform_f32(&mut self) -> f32 {
        const MASK: u32 = (1 << f32::MANTISSA_DIGITS) - 1;
        const DIVISOR: f32 = 1.0 / (1u32 << f32::MANTISSA_DIGITS) as f32;
        (self.next_u32() & MASK) as f32 * DIVISOR
    }

    /// A double uniform in `[0, 1)` with 53 random bits (`uniform_real_distribution<double>`).
    fn uniform_f64(&mut self) -> f64 {
        const MASK: u64 = (1 << f64::MANTISSA_DIGITS) - 1;
        const DIVISOR: f64 = 1.0 / (1u64 << f64::MANTISSA_DIGITS) as f64;
        (self.next_u64() & MASK) as f64 * DIVISOR
    }

    /// One standard normal sample from `at::normal_distribution<double>`, including its cache.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        // log1p(-u2) keeps the argument away from log(0): u2 < 1 always.
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// Fills `out` like `torch.randn(out.len(), generator=g, dtype=torch.float32)`.
    pub fn fill_randn(&mut self, out: &mut [f32]) {
        let n = out.len();
        if n < 16 {
            for v in out.iter_mut() {
                // `normal_kernel` computes `ret * std + mean` in double (std 1, mean 0 add
                // nothing), then narrows to float.
                *v = self.normal_f64() as f32;
            }
            return;
        }
        for v in out.iter_mut() {
            *v = self.uniform_f32();
        }
        for block in out.chunks_exact_mut(16) {
            normal_fill_16(block);
        }
        if !n.is_multiple_of(16) {
            // torch redraws the last 16 uniforms (overlapping the last full block) rather than
            // drawing only the remainder; the overlap is recomputed from fresh uniforms.
            let tail = &mut out[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
    }

    /// A float32 tensor of standard normal samples, bit-exact with
    /// `torch.randn(shape, generator=g, dtype=torch.float32)` on a CPU generator.
    ///
    /// The values depend only on the element count (in row-major order), as in torch.
    pub fn randn(&mut self, shape: &[usize]) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let mut data = vec![0.0f32; n];
        self.fill_randn(&mut data);
        // The vector has exactly `product(shape)` elements, so the shape always fits.
        ArrayD::from_shape_vec(IxDyn(shape), data)
            .unwrap_or_else(|_| unreachable!("buffer length equals the shape's element count"))
    }

    /// Like [`TorchGenerator::randn`] with the shape of `like` (`torch.randn_like`).
    pub fn randn_like<T>(&mut self, like: &ArrayD<T>) -> ArrayD<f32> {
        self.randn(like.shape())
    }

    /// A float32 tensor of uniforms in `[0, 1)`, bit-exact with
    /// `torch.rand(shape, generator=g, dtype=torch.float32)` on a CPU generator.
    pub fn rand(&mut self, shape: &[usize]) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        ArrayD::from_shape_vec(IxDyn(shape), data)
            .unwrap_or_else(|_| unreachable!("buffer length equals the shape's element count"))
    }
}

/// Whether the reference build fused multiply-adds (GCC contracts `mul` + `add` intrinsics into
/// FMA under its default `-ffp-contract=fast` when targeting AVX2+FMA).
const FUSED: bool = true;

/// `a * b + c`, fused or not as the reference build does it.
#[inline(always)]
fn mad(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Box-Muller over one block of 16 uniforms, as ATen's AVX2 `NormalFill16<float>` (mean 0,
/// std 1): Cephes-style `log256_ps` and `sincos256_ps` from `avx_mathfun.h`, lane by lane.
fn normal_fill_16(data: &mut [f32]) {
    const TWO_PI: f32 = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        // [0, 1) -> (0, 1] so the log is finite.
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * log_ps(u1)).sqrt();
        let theta = TWO_PI * u2;
        let (sin, cos) = sincos_ps(theta);
        // `_mm256_fmadd_ps(n, std, mean)` with std 1 and mean 0 is exact.
        data[j] = radius * cos;
        data[j + 8] = radius * sin;
    }
}

/// One lane of `log256_ps` (Cephes `logf`), for the positive normal inputs Box-Muller feeds it.
// The constants are copied digit for digit from `avx_mathfun.h` so they can be checked against
// it; they round to the same f32 values the C compiler produced.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
fn log_ps(x: f32) -> f32 {
    const SQRTHF: f32 = 0.707_106_781_186_547_524;
    const P: [f32; 9] = [
        7.037_683_629_2e-2,
        -1.151_461_031_0e-1,
        1.167_699_874_0e-1,
        -1.242_014_084_6e-1,
        1.424_932_278_7e-1,
        -1.666_805_766_5e-1,
        2.000_071_476_5e-1,
        -2.499_999_399_3e-1,
        3.333_333_117_4e-1,
    ];
    const Q1: f32 = -2.121_944_40e-4;
    const Q2: f32 = 0.693_359_375;
    let invalid = x <= 0.0;
    let x = x.max(f32::from_bits(0x0080_0000));
    let bits = x.to_bits();
    let exp = (bits >> 23) as i32 - 0x7f;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = exp as f32 + 1.0;
    let small = x < SQRTHF;
    let tmp = if small { x } else { 0.0 };
    x -= 1.0;
    if small {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let mut y = P[0];
    for p in &P[1..] {
        y = mad(y, x, *p);
    }
    y *= x;
    y = mad(y, z, e * Q1);
    y = mad(-z, 0.5, y);
    let x = mad(e, Q2, x + y);
    if invalid {
        f32::NAN
    } else {
        x
    }
}

/// One lane of `sincos256_ps` (Cephes `sinf`/`cosf` with a shared range reduction).
// The constants are copied digit for digit from `avx_mathfun.h` so they can be checked against
// it; they round to the same f32 values the C compiler produced.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
fn sincos_ps(x: f32) -> (f32, f32) {
    const FOPI: f32 = 1.273_239_544_735_16;
    const DP1: f32 = -0.785_156_25;
    const DP2: f32 = -2.418_756_484_985_351_562_5e-4;
    const DP3: f32 = -3.774_894_977_445_941_08e-8;
    const SIN_P: [f32; 3] = [-1.951_529_589_1e-4, 8.332_160_873_6e-3, -1.666_665_461_1e-1];
    const COS_P: [f32; 3] = [
        2.443_315_711_809_948e-5,
        -1.388_731_625_493_765e-3,
        4.166_664_568_298_827e-2,
    ];
    let sign_in = x.to_bits() & 0x8000_0000;
    let mut x = x.abs();
    let j = (((x * FOPI) as i32).wrapping_add(1)) & !1;
    let y = j as f32;
    let sign_sin = sign_in ^ (((j & 4) as u32) << 29);
    let use_sin_poly = (j & 2) == 0;
    x = mad(y, DP1, x);
    x = mad(y, DP2, x);
    x = mad(y, DP3, x);
    let sign_cos = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
    let z = x * x;
    let mut yc = mad(COS_P[0], z, COS_P[1]);
    yc = mad(yc, z, COS_P[2]);
    yc *= z;
    yc = mad(yc, z, -(z * 0.5));
    yc += 1.0;
    let mut ys = mad(SIN_P[0], z, SIN_P[1]);
    ys = mad(ys, z, SIN_P[2]);
    ys *= z;
    ys = mad(ys, x, x);
    // The lanes are selected with bit masks and recombined with additions, which turns a
    // negative zero into a positive one; keep the additions for bit parity.
    let (ysin1, ysin2) = if use_sin_poly { (0.0, ys) } else { (yc, 0.0) };
    let s = ysin1 + ysin2;
    let c = (yc - ysin1) + (ys - ysin2);
    (
        f32::from_bits(s.to_bits() ^ sign_sin),
        f32::from_bits(c.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first outputs of mt19937 seeded with 5489 are the C++ standard's reference values.
    #[test]
    fn mt19937_reference() {
        let mut g = TorchGenerator::new(5489);
        assert_eq!(g.next_u32(), 3_499_211_612);
        assert_eq!(g.next_u32(), 581_869_302);
    }

    #[test]
    fn torch_seed_zero_short() {
        // torch.randn(3, generator=torch.Generator().manual_seed(0)) on torch 2.15.0.
        let mut g = TorchGenerator::new(0);
        let v = g.randn(&[3]);
        let expect = [1.540_996_1_f32, -0.293_428_9, -2.178_789_3];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
