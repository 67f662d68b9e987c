//! Reading a LoRA `.safetensors` file.
//!
//! LoRA files are small next to the models they patch (a few to a few hundred MB), so the
//! whole file is read into memory once. Tensors stay in the file's dtype and are widened to
//! f32 only where they are used: fusing computes deltas in f32 like diffusers' `fuse_lora`,
//! and LoRA slots are filled by widening straight from the file's bytes into the slot buffers,
//! so a big LoRA (SDXL's TCD LoRA: 197 M fp16 values) is materialised in f32 once, not twice.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// One tensor of a LoRA file: its shape and its little-endian bytes in the file's dtype
/// (f32, f64, f16 or bf16; integers for alphas), widened to f32 on demand, row-major.
#[derive(Clone)]
pub(crate) struct Tensor {
    pub shape: Vec<usize>,
    dtype: Dtype,
    bytes: Arc<Vec<u8>>,
    range: Range<usize>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Tensor {
    /// A tensor over f32 values (tests and callers that build LoRAs in memory).
    #[cfg(test)]
    pub fn from_f32(shape: &[usize], values: &[f32]) -> Self {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let range = 0..bytes.len();
        Tensor {
            shape: shape.to_vec(),
            dtype: Dtype::F32,
            bytes: Arc::new(bytes),
            range,
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.range.len() / (self.dtype.bitsize() / 8)
    }

    fn raw(&self) -> &[u8] {
        &self.bytes[self.range.clone()]
    }

    /// Every value widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.widen_into(0, &mut out, 1.0);
        out
    }

    /// Writes values `first..first + dst.len()` times `scale` into `dst`.
    ///
    /// The caller keeps the range inside the tensor; a range past its end writes only what
    /// exists (the shapes were checked when the pairs were built).
    pub fn widen_into(&self, first: usize, dst: &mut [f32], scale: f32) {
        let size = self.dtype.bitsize() / 8;
        let raw = self.raw();
        let start = first.saturating_mul(size).min(raw.len());
        let end = first
            .saturating_add(dst.len())
            .saturating_mul(size)
            .min(raw.len());
        let src = &raw[start..end];
        if let Some(signed) = integer(self.dtype) {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(size)) {
                *d = int_le(c, signed) as f32 * scale;
            }
            return;
        }
        match self.dtype {
            Dtype::F32 => {
                for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * scale;
                }
            }
            Dtype::F64 => {
                for (d, c) in dst.iter_mut().zip(src.chunks_exact(8)) {
                    let v = f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                    *d = v as f32 * scale;
                }
            }
            // Through an aligned block (the file's bytes need not be), so that half's slice
            // conversion can use the CPU's conversion instructions: a TCD-SDXL LoRA is 197 M
            // fp16 values.
            Dtype::F16 => {
                let mut block = [f16::ZERO; 1024];
                for (d, c) in dst.chunks_mut(block.len()).zip(src.chunks(2 * block.len())) {
                    let n = d.len().min(c.len() / 2);
                    for (b, p) in block.iter_mut().zip(c.chunks_exact(2)) {
                        *b = f16::from_le_bytes([p[0], p[1]]);
                    }
                    block[..n].convert_to_f32_slice(&mut d[..n]);
                    // A signalling NaN leaves the conversion quiet; the product would quiet it
                    // anyway, so every value equals the exact widening times `scale`.
                    for v in &mut d[..n] {
                        *v *= scale;
                    }
                }
            }
            // bf16 is the top half of an f32, so widening is a shift.
            _ => {
                for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16) * scale;
                }
            }
        }
    }

    /// The first value that is NaN or infinite, with its flat index; checked on the raw bits,
    /// so no f32 copy is made.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        let raw = self.raw();
        let at = |i: usize| {
            let mut one = [0.0f32];
            self.widen_into(i, &mut one, 1.0);
            (i, one[0])
        };
        match self.dtype {
            _ if integer(self.dtype).is_some() => None,
            Dtype::F32 => raw
                .chunks_exact(4)
                .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
            Dtype::F64 => raw.chunks_exact(8).position(|c| {
                !f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]).is_finite()
            }),
            // An all-ones exponent is inf or NaN.
            Dtype::F16 => raw
                .chunks_exact(2)
                .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00),
            _ => raw
                .chunks_exact(2)
                .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80),
        }
        .map(at)
    }
}

/// For an integer dtype, whether it is signed; `None` for every other dtype.
fn integer(dtype: Dtype) -> Option<bool> {
    match dtype {
        Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64 => Some(true),
        Dtype::U8 | Dtype::U16 | Dtype::U32 | Dtype::U64 => Some(false),
        _ => None,
    }
}

/// A little-endian integer of 1 to 8 bytes, sign-extended when `signed`, as f64 (exact up to
/// 2^53, far beyond any alpha).
fn int_le(bytes: &[u8], signed: bool) -> f64 {
    let mut wide = [0u8; 8];
    let negative = signed && bytes.last().is_some_and(|b| b & 0x80 != 0);
    if negative {
        wide = [0xff; 8];
    }
    wide[..bytes.len().min(8)].copy_from_slice(&bytes[..bytes.len().min(8)]);
    if signed {
        i64::from_le_bytes(wide) as f64
    } else {
        u64::from_le_bytes(wide) as f64
    }
}

/// The tensors of one file, by name (sorted, like `safetensors.safe_open(...).keys()`,
/// which decides the order diffusers sees the keys in), plus diffusers' adapter metadata.
#[derive(Debug)]
pub(crate) struct LoraFile {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, Tensor>,
    /// The JSON under `__metadata__["lora_adapter_metadata"]`, written by diffusers'
    /// `save_lora_weights` (peft `LoraConfig` fields prefixed by component, e.g. `unet.lora_alpha`).
    pub adapter_metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

impl LoraFile {
    /// Reads and indexes `path`; every failure names the file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, bytes)
    }

    /// Indexes the bytes of a safetensors file; `path` is only used in messages.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let bad = |why: String| {
            Error::lora(
                path,
                format!("not a readable LoRA .safetensors file ({why}); re-download it or check that it is a safetensors LoRA"),
            )
        };
        let bytes = Arc::new(bytes);
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let adapter_metadata = match header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("lora_adapter_metadata"))
        {
            Some(raw) => match serde_json::from_str::<serde_json::Value>(raw) {
                Ok(serde_json::Value::Object(map)) => Some(map),
                _ => return Err(bad("its lora_adapter_metadata is not a JSON object".into())),
            },
            None => None,
        };
        let base = bytes.as_ptr() as usize;
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let float = matches!(
                    view.dtype(),
                    Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16
                );
                // diffusers' `convert_state_dict_to_kohya` writes alphas as int64 scalars.
                let int_alpha = name.ends_with(".alpha") && integer(view.dtype()).is_some();
                if !(float || int_alpha) {
                    return Err(Error::lora(
                        path,
                        format!(
                            "tensor {name} has dtype {:?}; LoRA tensors must be F32, F16, BF16 or F64 (alphas may also be integers)",
                            view.dtype()
                        ),
                    ));
                }
                // The view borrows `bytes`; keep its place so the tensor can share the buffer.
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                let tensor = Tensor {
                    shape: view.shape().to_vec(),
                    dtype: view.dtype(),
                    bytes: Arc::clone(&bytes),
                    range: start..start + data.len(),
                };
                Ok((name, tensor))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(LoraFile {
            path: path.to_path_buf(),
            tensors,
            adapter_metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor of raw little-endian `bytes` in `dtype`, as the file holds it.
    fn raw(dtype: Dtype, bytes: Vec<u8>) -> Tensor {
        let n = bytes.len() / (dtype.bitsize() / 8);
        let range = 0..bytes.len();
        Tensor {
            shape: vec![n],
            dtype,
            bytes: Arc::new(bytes),
            range,
        }
    }

    #[test]
    fn widening_a_slice_with_a_scale_matches_widening_all_of_it() {
        let halves: Vec<u16> = vec![0x3c00, 0xc000, 0x0001, 0x7bff, 0x3555, 0x0000];
        let f16 = raw(
            Dtype::F16,
            halves.iter().flat_map(|h| h.to_le_bytes()).collect(),
        );
        let bf16 = raw(
            Dtype::BF16,
            halves.iter().flat_map(|h| h.to_le_bytes()).collect(),
        );
        let f64s = [1.5f64, -2.25, 1e-3, 7.0, 0.1, -0.0];
        let f64t = raw(
            Dtype::F64,
            f64s.iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        for t in [&f16, &bf16, &f64t] {
            let all = t.to_f32();
            assert_eq!(all.len(), 6);
            let mut part = [0.0f32; 3];
            t.widen_into(2, &mut part, -0.5);
            for (i, v) in part.iter().enumerate() {
                assert_eq!(
                    v.to_bits(),
                    (all[2 + i] * -0.5).to_bits(),
                    "{:?} {i}",
                    t.dtype
                );
            }
        }
        assert_eq!(f16.to_f32()[..2], [1.0, -2.0]);
        assert_eq!(bf16.to_f32()[0], f32::from_bits(0x3c00 << 16));
        assert_eq!(f64t.to_f32()[1], -2.25);
    }

    /// The fp16 tensor of the values `halves` (bit patterns).
    fn halves(halves: impl Iterator<Item = u16>) -> Tensor {
        raw(Dtype::F16, halves.flat_map(u16::to_le_bytes).collect())
    }

    #[test]
    fn half_conversion_matches_known_values() {
        let f16_to_f32 = |h: u16| halves(std::iter::once(h)).to_f32()[0];
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn half_widening_agrees_with_the_runtime_conversion_on_every_input() {
        // Every fp16 bit pattern, from offsets that split the conversion blocks differently.
        let all = halves(0..=u16::MAX);
        for scale in [1.0f32, -0.5, 3.0e-4] {
            for first in [0usize, 1, 1023] {
                let mut dst = vec![0.0f32; 65_536 - first];
                all.widen_into(first, &mut dst, scale);
                for (i, v) in dst.iter().enumerate() {
                    let h = (first + i) as u16;
                    let expected = crate::runtime::f16_to_f32(h) * scale;
                    assert_eq!(v.to_bits(), expected.to_bits(), "{h:#06x} * {scale}");
                }
            }
        }
    }

    #[test]
    fn non_finite_values_are_found_on_the_raw_bits_of_every_dtype() {
        // f16: 0x7c00 = +inf, 0xfe00 = NaN; bf16: 0x7f80 = +inf, 0x7fc0 = NaN.
        let f16 = |h: &[u16]| raw(Dtype::F16, h.iter().flat_map(|h| h.to_le_bytes()).collect());
        let bf16 = |h: &[u16]| {
            raw(
                Dtype::BF16,
                h.iter().flat_map(|h| h.to_le_bytes()).collect(),
            )
        };
        let f32t = |v: &[f32]| raw(Dtype::F32, v.iter().flat_map(|v| v.to_le_bytes()).collect());
        assert_eq!(f16(&[0x3c00, 0x7bff, 0x0001]).first_non_finite(), None);
        assert_eq!(
            f16(&[0x3c00, 0x7c00]).first_non_finite(),
            Some((1, f32::INFINITY))
        );
        assert!(f16(&[0xfe00])
            .first_non_finite()
            .is_some_and(|(i, v)| i == 0 && v.is_nan()));
        // 0x7f7f is bf16's largest finite value, not an infinity.
        assert_eq!(bf16(&[0x7f7f, 0x3f80]).first_non_finite(), None);
        assert_eq!(
            bf16(&[0x3f80, 0x3f80, 0x7f80]).first_non_finite(),
            Some((2, f32::INFINITY))
        );
        assert!(bf16(&[0x7fc0])
            .first_non_finite()
            .is_some_and(|(_, v)| v.is_nan()));
        assert_eq!(f32t(&[1.0, f32::MAX]).first_non_finite(), None);
        assert!(f32t(&[1.0, f32::NAN])
            .first_non_finite()
            .is_some_and(|(i, v)| i == 1 && v.is_nan()));
    }

    #[test]
    fn integer_alphas_widen_with_their_sign() {
        assert_eq!(
            raw(Dtype::I64, (-3i64).to_le_bytes().to_vec()).to_f32(),
            [-3.0]
        );
        assert_eq!(raw(Dtype::I8, vec![0xfe]).to_f32(), [-2.0]);
        assert_eq!(raw(Dtype::U8, vec![0xfe]).to_f32(), [254.0]);
        assert_eq!(raw(Dtype::U16, vec![0x00, 0x80]).to_f32(), [32768.0]);
        assert_eq!(
            raw(Dtype::I32, 16i32.to_le_bytes().to_vec()).to_f32(),
            [16.0]
        );
        assert_eq!(raw(Dtype::I16, vec![8, 0]).first_non_finite(), None);
    }

    #[test]
    fn garbage_is_a_lora_error_naming_the_file() {
        let err = LoraFile::parse(
            Path::new("x.safetensors"),
            b"hello world, not a file".to_vec(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.starts_with("LoRA x.safetensors: "), "{err}");
    }
}
