//! LoRA adapters: read `.safetensors` files, bring their keys to diffusers module paths, and
//! compute the weight deltas that patch the ONNX initializers at load time.
//!
//! TCD itself ships as a LoRA (`h1t/TCD-SD15-LoRA`, `h1t/TCD-SDXL-LoRA`) that users stack with
//! style LoRAs, as in diffusers:
//!
//! ```python
//! pipe.load_lora_weights("h1t/TCD-SDXL-LoRA", adapter_name="tcd")
//! pipe.load_lora_weights("style.safetensors", adapter_name="style")
//! pipe.set_adapters(["tcd", "style"], adapter_weights=[1.0, 0.7])
//! pipe.fuse_lora()
//! ```
//!
//! The engine does the same fusion ahead of time: every adapter becomes `ΔW = weight · alpha/r ·
//! up @ down` per module, the deltas of all adapters are summed per parameter, and the caller adds
//! them to the base weights (whose initializer names are the PyTorch parameter names).
//!
//! ```no_run
//! use tcd_ort::lora::{LoraSet, LoraSource, UnetLayout};
//! let set = LoraSet::load(
//!     &[LoraSource { path: "tcd.safetensors".into(), weight: 1.0 }],
//!     &UnetLayout::default(),
//! )?;
//! for d in set.deltas()? {
//!     println!("{}/{} {:?}", d.component.as_str(), d.param, d.shape);
//! }
//! # Ok::<(), tcd_ort::Error>(())
//! ```
//!
//! * [`file`] reads tensors (f32, f16, bf16) and diffusers' adapter metadata,
//! * [`keys`] detects the key format and converts names and scales,
//! * [`delta`] multiplies the low-rank pairs in parallel.

mod delta;
mod file;
pub mod keys;
mod kohya;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

pub use keys::LoraFormat;

use crate::{Error, Result};

/// One adapter to apply and its strength (diffusers' `adapter_weights` entry).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSource {
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// Multiplies the adapter's delta; 1.0 is the adapter as trained.
    pub weight: f32,
}

/// The model a delta patches; its name is the component's directory in a model folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// `unet/`
    Unet,
    /// `text_encoder/` (CLIP ViT-L for SD 1.x and SDXL)
    TextEncoder,
    /// `text_encoder_2/` (OpenCLIP ViT-bigG, SDXL only)
    TextEncoder2,
}

impl Component {
    /// The component's directory name and diffusers key prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// What key conversion needs to know about the UNet.
///
/// kohya files for SDXL name blocks like the original (SGM) UNet, `input_blocks.<n>`, whose
/// numbering depends on how many layers each diffusers down block has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnetLayout {
    /// `layers_per_block` of the UNet config (2 for SD 1.x, SD 2.x and SDXL).
    pub layers_per_block: usize,
}

impl Default for UnetLayout {
    /// The layout of every released SD 1.x, 2.x and SDXL UNet.
    fn default() -> Self {
        UnetLayout {
            layers_per_block: 2,
        }
    }
}

impl UnetLayout {
    /// Reads `layers_per_block` from a diffusers UNet `config.json` (an integer, or a list
    /// whose entries must agree because the SGM mapping uses one value).
    pub fn from_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::model(path, format!("invalid JSON: {e}")))?;
        let lpb = match v.get("layers_per_block") {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::Array(a)) => {
                let vals: Vec<Option<u64>> = a.iter().map(|x| x.as_u64()).collect();
                match vals.first() {
                    Some(first) if vals.iter().all(|x| x == first) => *first,
                    _ => None,
                }
            }
            _ => None,
        };
        let layers_per_block = lpb.ok_or_else(|| {
            Error::model(
                path,
                "layers_per_block is missing or not one positive integer",
            )
        })? as usize;
        Ok(UnetLayout { layers_per_block })
    }
}

/// The summed change of one parameter.
#[derive(Debug, Clone)]
pub struct Delta {
    /// The model it patches.
    pub component: Component,
    /// The parameter (= ONNX initializer) name, e.g. `down_blocks.0.attentions.0.proj_in.weight`.
    pub param: String,
    /// `(out, in)` for linear layers, `(out, in, kh, kw)` for convolutions.
    pub shape: Vec<usize>,
    /// Row-major values to add to the base weight.
    pub values: Vec<f32>,
}

/// The change of one parameter, computed when it is applied (see [`LoraSet::pending`]).
pub struct PendingDelta<'a> {
    /// The model it patches.
    pub component: Component,
    /// The parameter (= ONNX initializer) name.
    pub param: String,
    /// `(out, in)` for linear layers, `(out, in, kh, kw)` for convolutions.
    pub shape: Vec<usize>,
    terms: Vec<delta::Term<'a>>,
}

impl PendingDelta<'_> {
    /// Adds the summed delta into `base`, the row-major base weight: `W' = W + Σ weight ·
    /// alpha/r · up @ down`, as diffusers' `fuse_lora` computes it (delta first, then added).
    pub fn add_to(&self, base: &mut [f32]) -> Result<()> {
        let numel: usize = self.shape.iter().product();
        if base.len() != numel {
            return Err(Error::invalid(format!(
                "LoRA delta for {}.{} has {numel} values but the weight has {}",
                self.component.as_str(),
                self.param,
                base.len()
            )));
        }
        delta::add_into(&self.terms, self.cols(), base);
        Ok(())
    }

    /// The summed delta as its own buffer.
    pub fn values(&self) -> Vec<f32> {
        delta::accumulate(&self.terms, self.shape[0], self.cols())
    }

    /// The ranks of every adapter's pair, summed: the rank a LoRA slot needs to hold them.
    pub fn rank(&self) -> usize {
        self.terms.iter().map(|t| t.up.shape[1]).sum()
    }

    /// The pairs of every adapter as one unfused LoRA of rank `rank` (a slot exported with
    /// `convert --lora-slots RANK`): `A` is `rank × (in·kh·kw)` with each adapter's down rows
    /// in turn, `B` is `out × rank` with each adapter's up columns times `weight · alpha/r`
    /// and `b_scale`; both are zero-padded past [`Self::rank`], so `B @ A` is the summed delta
    /// times `b_scale`. An error when the ranks do not fit.
    pub fn slot_values(&self, rank: usize, b_scale: f32) -> Result<(Vec<f32>, Vec<f32>)> {
        if self.rank() > rank {
            return Err(Error::invalid(format!(
                "the LoRAs on {}.{} have rank {} in all, more than its slot's {rank}",
                self.component.as_str(),
                self.param,
                self.rank()
            )));
        }
        Ok(delta::fill_slot(
            &self.terms,
            self.shape[0],
            self.cols(),
            rank,
            b_scale,
        ))
    }

    fn cols(&self) -> usize {
        self.shape[1..].iter().product()
    }
}

impl std::fmt::Debug for PendingDelta<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingDelta")
            .field("component", &self.component)
            .field("param", &self.param)
            .field("shape", &self.shape)
            .field("terms", &self.terms.len())
            .finish()
    }
}

/// A parameter the loaded adapters change, before any delta is computed.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The model it patches.
    pub component: Component,
    /// The parameter (= ONNX initializer) name.
    pub param: String,
    /// The delta's shape, which the base weight must have (trailing 1s aside).
    pub shape: Vec<usize>,
    /// The adapter files that change it.
    pub sources: Vec<PathBuf>,
}

impl Target {
    /// Checks the base weight's shape; a mismatch means the adapter was trained for another
    /// model (e.g. an SD 1.5 LoRA on SDXL).
    pub fn check_base_shape(&self, base: Option<&[usize]>) -> Result<()> {
        let files = self
            .sources
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        match base {
            None => Err(Error::invalid(format!(
                "LoRA {files} was made for another base model: {}/{} does not exist in this model",
                self.component.as_str(),
                self.param
            ))),
            Some(base) if squeeze(base) != squeeze(&self.shape) => {
                Err(Error::invalid(format!(
                    "LoRA {files} was made for another base model: {}/{} has shape {:?} in the LoRA but {:?} in this model",
                    self.component.as_str(),
                    self.param,
                    self.shape,
                    base
                )))
            }
            Some(_) => Ok(()),
        }
    }
}

/// Drops trailing 1s so a linear LoRA fits a 1×1 conv (SD 1.x `proj_in`) and vice versa.
fn squeeze(shape: &[usize]) -> &[usize] {
    let mut n = shape.len();
    while n > 2 && shape[n - 1] == 1 {
        n -= 1;
    }
    &shape[..n]
}

/// One parsed adapter file.
#[derive(Debug)]
struct Adapter {
    path: PathBuf,
    weight: f32,
    format: LoraFormat,
    modules: Vec<keys::Module>,
}

/// Parsed, converted and validated adapters, ready to produce deltas.
#[derive(Debug)]
pub struct LoraSet {
    adapters: Vec<Adapter>,
}

impl LoraSet {
    /// Reads every file, converts its keys and checks ranks and values.
    ///
    /// Files are parsed in parallel; the first error (in source order) is returned and names
    /// its file.
    pub fn load(sources: &[LoraSource], layout: &UnetLayout) -> Result<Self> {
        for s in sources {
            if !s.weight.is_finite() {
                return Err(Error::invalid(format!(
                    "LoRA weight for {} must be a finite number, got {}",
                    s.path.display(),
                    s.weight
                )));
            }
        }
        let adapters = sources
            .par_iter()
            .map(|s| {
                let f = file::LoraFile::read(&s.path)?;
                let (format, modules) = keys::convert(f, layout)?;
                Ok(Adapter {
                    path: s.path.clone(),
                    weight: s.weight,
                    format,
                    modules,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LoraSet { adapters })
    }

    /// One adapter at weight 1 from a file's bytes (`path` names it in messages): what
    /// [`LoraSet::load`] does per file, for the fuzz targets.
    #[doc(hidden)]
    pub fn parse(path: &Path, bytes: Vec<u8>, layout: &UnetLayout) -> Result<Self> {
        let (format, modules) = keys::convert(file::LoraFile::parse(path, bytes)?, layout)?;
        Ok(LoraSet {
            adapters: vec![Adapter {
                path: path.to_path_buf(),
                weight: 1.0,
                format,
                modules,
            }],
        })
    }

    /// How many distinct parameters the adapters change, over all components.
    pub fn module_count(&self) -> usize {
        self.groups().len()
    }

    /// The key format each adapter was written in, in source order.
    pub fn formats(&self) -> Vec<(PathBuf, LoraFormat)> {
        self.adapters
            .iter()
            .map(|a| (a.path.clone(), a.format))
            .collect()
    }

    /// Every parameter the adapters change, with its expected shape, sorted by component and
    /// name. Check these against the base model before computing deltas.
    pub fn targets(&self) -> Vec<Target> {
        self.groups()
            .into_iter()
            .map(|((component, param), terms)| {
                let m = terms[0].1;
                Target {
                    component,
                    param,
                    shape: delta::delta_shape(&m.down, &m.up),
                    sources: terms.iter().map(|(a, _)| a.path.clone()).collect(),
                }
            })
            .collect()
    }

    /// The summed delta of every changed parameter, computed in parallel, sorted by component
    /// and name.
    pub fn deltas(&self) -> Result<Vec<Delta>> {
        Ok(self
            .pending()?
            .into_par_iter()
            .map(|p| {
                let values = p.values();
                Delta {
                    component: p.component,
                    param: p.param,
                    shape: p.shape,
                    values,
                }
            })
            .collect())
    }

    /// Every changed parameter with its delta not yet computed, sorted by component and name;
    /// [`PendingDelta::add_to`] adds one into a base weight in place, so patching a whole model
    /// never holds more than the patched weights (SDXL's TCD LoRA changes 2.3 B parameters).
    pub fn pending(&self) -> Result<Vec<PendingDelta<'_>>> {
        self.groups()
            .into_iter()
            .map(|((component, param), terms)| {
                let (a0, m0) = terms[0];
                let shape = delta::delta_shape(&m0.down, &m0.up);
                for (a, m) in &terms[1..] {
                    let s = delta::delta_shape(&m.down, &m.up);
                    if squeeze(&s) != squeeze(&shape) {
                        return Err(Error::invalid(format!(
                            "LoRAs {} and {} disagree on {}/{param}: shapes {:?} and {:?}; they were made for different base models",
                            a0.path.display(),
                            a.path.display(),
                            component.as_str(),
                            shape,
                            s
                        )));
                    }
                }
                let terms = terms
                    .iter()
                    .map(|(a, m)| delta::Term {
                        down: &m.down,
                        up: &m.up,
                        scale: a.weight * m.scale,
                    })
                    .collect();
                Ok(PendingDelta {
                    component,
                    param,
                    shape,
                    terms,
                })
            })
            .collect()
    }

    /// Modules of all adapters grouped by target parameter.
    fn groups(&self) -> BTreeMap<(Component, String), Vec<(&Adapter, &keys::Module)>> {
        let mut groups: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for a in &self.adapters {
            for m in &a.modules {
                groups
                    .entry((m.component, format!("{}.weight", m.module)))
                    .or_default()
                    .push((a, m));
            }
        }
        groups
    }
}

/// Every spelling a parameter of `component` may have in an export: CLIP parameters sit under
/// `text_model.` or not depending on the transformers version that exported them, so the
/// integration can look both up. The first entry is the name [`LoraSet`] reports.
pub fn param_aliases(component: Component, param: &str) -> Vec<String> {
    let mut names = vec![param.to_string()];
    if component != Component::Unet && !param.starts_with("text_projection") {
        match param.strip_prefix("text_model.") {
            Some(rest) => names.push(rest.to_string()),
            None => names.push(format!("text_model.{param}")),
        }
    }
    names
}

/// Splits a command-line LoRA argument `PATH_OR_ID[:WEIGHT]` into the path or hub id and the
/// weight (1.0 when absent).
///
/// Only a trailing `:<number>` is a weight, so `C:\loras\x.safetensors` and `h1t/TCD-SDXL-LoRA`
/// keep their colons and `C:\x.safetensors:0.5` splits at the last one.
pub fn parse_lora_arg(s: &str) -> Result<(String, f32)> {
    parse_weighted_source("--lora", "WEIGHT", s)
}

/// Parses `PATH_OR_ID[:NUMBER]` for option `flag` (`--lora`, `--controlnet`); the number
/// defaults to 1.0. `what` names the number in messages (`WEIGHT`, `SCALE`).
pub fn parse_weighted_source(flag: &str, what: &str, s: &str) -> Result<(String, f32)> {
    let s = s.trim();
    if s.is_empty() {
        return Err(Error::invalid(format!(
            "empty {flag} argument; expected PATH_OR_ID[:{what}]"
        )));
    }
    let word = what.to_ascii_lowercase();
    if let Some((head, tail)) = s.rsplit_once(':') {
        if tail.is_empty() {
            return Err(Error::invalid(format!(
                "{flag} {s}: nothing after ':'; expected PATH_OR_ID[:{what}], e.g. {head}:0.8"
            )));
        }
        // A Windows drive letter alone (`C:\...`) is never a number: its tail starts with a slash.
        let looks_numeric = tail
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
            && tail.chars().any(|c| c.is_ascii_digit());
        // `nan`, `inf` or a word after the colon of a path that does not exist is a weight
        // mistyped, not part of a file name.
        let a_word =
            !tail.contains(['/', '\\']) && !head.is_empty() && !std::path::Path::new(s).exists();
        if !looks_numeric && a_word {
            return Err(Error::invalid(match tail.parse::<f32>() {
                Ok(_) => format!("{flag} {s}: {word} must be a finite number, got {tail}"),
                Err(_) => {
                    format!("{flag} {s}: {word} {tail} is not a number (and no file is named {s})")
                }
            }));
        }
        if looks_numeric {
            let w: f32 = tail.parse().map_err(|_| {
                Error::invalid(format!("{flag} {s}: {word} {tail} is not a number"))
            })?;
            if !w.is_finite() {
                return Err(Error::invalid(format!("{flag} {s}: {word} must be finite")));
            }
            if head.is_empty() {
                return Err(Error::invalid(format!(
                    "{flag} {s}: missing path before the {word}"
                )));
            }
            return Ok((head.to_string(), w));
        }
    }
    Ok((s.to_string(), 1.0))
}
