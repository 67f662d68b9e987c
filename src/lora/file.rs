//! Reading a LoRA `.safetensors` file into f32 tensors.
//!
//! LoRA files are small next to the models they patch (a few to a few hundred MB), so the
//! whole file is read into memory once and every tensor is widened to f32: the deltas are
//! computed in f32 like diffusers' `fuse_lora` does before casting back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// One tensor of a LoRA file, widened to f32, in row-major order.
#[derive(Debug, Clone)]
pub(crate) struct Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
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
    /// Reads and decodes `path`; every failure names the file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &bytes)
    }

    /// Decodes the bytes of a safetensors file; `path` is only used in messages.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |why: String| {
            Error::model(
                path,
                format!("not a readable LoRA .safetensors file ({why}); re-download it or check that it is a safetensors LoRA"),
            )
        };
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
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
        // Widening is most of the time spent on a big file (SDXL's TCD LoRA: 197 M fp16
        // values), so tensors are widened in parallel.
        let tensors = st
            .tensors()
            .into_par_iter()
            .map(|(name, view)| {
                let values = to_f32(view.dtype(), view.data()).ok_or_else(|| {
                    Error::model(
                        path,
                        format!(
                            "tensor {name} has dtype {:?}; LoRA tensors must be F32, F16, BF16 or F64",
                            view.dtype()
                        ),
                    )
                })?;
                let shape = view.shape().to_vec();
                Ok((name, Tensor { shape, values }))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(LoraFile {
            path: path.to_path_buf(),
            tensors,
            adapter_metadata,
        })
    }
}

/// Widens little-endian raw data to f32; `None` for dtypes a LoRA never uses.
fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        // bf16 is the top half of an f32, so widening is a shift.
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        _ => return None,
    })
}

/// IEEE half to single precision, exact for every input (subnormals, inf, NaN included).
///
/// Written without branches on the data (three candidates and a select) so that the widening
/// loop vectorises: a TCD-SDXL LoRA is 197 M fp16 values.
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    // Normal numbers: rebias the exponent from 15 to 127.
    let normal = (em << 13) + ((127 - 15) << 23);
    // Inf and NaN: all-ones exponent, mantissa (NaN payload) kept.
    let inf_nan = (em << 13) | 0x7f80_0000;
    // Zero and subnormals: em · 2^-24, exact in f32.
    let small = (em as f32 * f32::from_bits(0x3380_0000)).to_bits();
    let bits = if em < 0x0400 {
        small
    } else if em >= 0x7c00 {
        inf_nan
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversion_matches_known_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn half_conversion_agrees_with_the_runtime_one_on_every_input() {
        for h in 0..=u16::MAX {
            let (a, b) = (f16_to_f32(h), crate::runtime::f16_to_f32(h));
            assert_eq!(a.to_bits(), b.to_bits(), "{h:#06x}: {a} vs {b}");
        }
    }

    #[test]
    fn garbage_is_a_model_error_naming_the_file() {
        let err = LoraFile::parse(Path::new("x.safetensors"), b"hello world, not a file")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("x.safetensors"), "{err}");
    }
}
