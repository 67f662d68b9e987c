//! Key formats: which module of which component each LoRA tensor patches, and its scale.
//!
//! Every format is brought to diffusers/peft module paths (the names the ONNX exports keep as
//! initializer names), following diffusers 0.42 `lora_state_dict` + `load_lora_adapter`:
//!
//! * **diffusers / peft**: `unet.<module>.lora_A.weight` / `.lora_B.weight`, also under
//!   `text_encoder.` and `text_encoder_2.`.
//! * **diffusers (old)**: `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.down.weight`,
//!   and attention-processor names `attn1.processor.to_q_lora.down.weight`.
//! * **AnimateDiff motion LoRAs, original names** (`down_blocks.0.motion_modules.0.
//!   temporal_transformer...attention_blocks.0.processor.to_q_lora.down.weight`): renamed to
//!   diffusers' as its conversion script does, then read as diffusers (old).
//! * **kohya**: `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
//!   text encoders as `lora_te_` (`lora_te1_`) and `lora_te2_`.
//! * **kohya, SGM blocks** (SDXL trained on the original UNet): `lora_unet_input_blocks_4_1_...`,
//!   mapped to diffusers blocks with the UNet's `layers_per_block` like
//!   `_maybe_map_sgm_blocks_to_diffusers`.
//!
//! Scales follow peft: `alpha / r` per module, where `alpha` comes from kohya `.alpha` keys or
//! diffusers' saved adapter metadata, and is `r` (scale 1) when a file carries neither.

use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;

use super::file::{LoraFile, Tensor};
use super::{Component, UnetLayout};
use crate::{Error, Result};

use super::kohya::kohya;

/// The key format an adapter file was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// diffusers / peft names: `unet.<module>.lora_A.weight`, `lora_B`.
    Diffusers,
    /// Older diffusers names: `.lora.down.weight`, `lora_linear_layer`, `to_q_lora`.
    DiffusersOld,
    /// kohya-ss names with diffusers block names: `lora_unet_down_blocks_0_...`.
    Kohya,
    /// kohya-ss names with the original (SGM) block names: `lora_unet_input_blocks_4_1_...`.
    KohyaSgm,
}

impl LoraFormat {
    /// A short name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            LoraFormat::Diffusers => "diffusers",
            LoraFormat::DiffusersOld => "diffusers (old)",
            LoraFormat::Kohya => "kohya",
            LoraFormat::KohyaSgm => "kohya (SGM blocks)",
        }
    }
}

/// One low-rank pair, converted and validated, with its final scale (without the user weight).
#[derive(Debug)]
pub(crate) struct Module {
    pub component: Component,
    /// diffusers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub module: String,
    pub down: Tensor,
    pub up: Tensor,
    /// `alpha / r` as peft computes it.
    pub scale: f32,
}

/// Where a raw tensor goes before pairing.
pub(super) enum Role {
    Down,
    Up,
    Alpha,
}

/// A module while its tensors are being collected.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) down: Option<(String, Tensor)>,
    pub(super) up: Option<(String, Tensor)>,
    pub(super) alpha: Option<f32>,
    /// Whether diffusers' `alpha_pattern` reaches this module (set by the converter of the file's format).
    pub(super) alpha_reaches: bool,
    /// Position of the module in the order diffusers sees the keys (ties in "most common alpha").
    pub(super) order: usize,
}

/// Converts every key of `file`; `Err` lists offending keys when the format is not recognised.
pub(crate) fn convert(file: LoraFile, layout: &UnetLayout) -> Result<(LoraFormat, Vec<Module>)> {
    let LoraFile {
        path,
        tensors,
        adapter_metadata,
    } = file;
    if tensors.is_empty() {
        return Err(Error::lora(&path, "the LoRA file holds no tensors"));
    }
    // diffusers drops DoRA magnitudes with a warning and loads the rest as a plain LoRA.
    let tensors: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| !k.contains("dora_scale"))
        .collect();
    let is_kohya = tensors.keys().all(|k| {
        ["lora_te_", "lora_unet_", "lora_te1_", "lora_te2_"]
            .iter()
            .any(|p| k.starts_with(p))
    });
    let (format, pending) = if is_kohya {
        kohya(&path, tensors, layout)?
    } else {
        diffusers(&path, tensors)?
    };
    let alphas = resolve_alphas(&path, format, &pending, adapter_metadata.as_ref())?;
    let mut pairs = Vec::with_capacity(pending.len());
    for ((component, module), p) in pending {
        let (down_key, down) = p.down.ok_or_else(|| {
            let up = p.up.as_ref().map(|(k, _)| k.as_str()).unwrap_or("?");
            Error::lora(&path, format!("{up} has no matching down (lora_A) tensor"))
        })?;
        let (up_key, up) = p.up.ok_or_else(|| {
            Error::lora(
                &path,
                format!("{down_key} has no matching up (lora_B) tensor"),
            )
        })?;
        pairs.push((
            component,
            module,
            p.alpha,
            p.alpha_reaches,
            down_key,
            down,
            up_key,
            up,
        ));
    }
    // Checking every value for NaN/inf reads the whole file: in parallel, first error in order.
    let ranks = pairs
        .par_iter()
        .map(|(_, _, _, _, down_key, down, up_key, up)| {
            check_pair(&path, down_key, down, up_key, up)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let mut modules = Vec::with_capacity(pairs.len());
    for ((component, module, alpha, reaches, _, down, _, up), rank) in pairs.into_iter().zip(ranks)
    {
        let (alpha, rslora) = alphas(component, &module, alpha, reaches, rank);
        let scale = if rslora {
            alpha / (rank as f32).sqrt()
        } else {
            alpha / rank as f32
        };
        modules.push(Module {
            component,
            module,
            down,
            up,
            scale,
        });
    }
    Ok((format, modules))
}

pub(super) type PendingMap = BTreeMap<(Component, String), Pending>;

/// Checks shapes and values of one pair; returns the rank.
fn check_pair(
    path: &std::path::Path,
    down_key: &str,
    down: &Tensor,
    up_key: &str,
    up: &Tensor,
) -> Result<usize> {
    let conv_up = up.shape.len() == 4 && up.shape[2] == 1 && up.shape[3] == 1;
    if !(up.shape.len() == 2 || conv_up) || !(down.shape.len() == 2 || down.shape.len() == 4) {
        return Err(Error::lora(
            path,
            format!(
                "{down_key} {:?} / {up_key} {:?}: expected 2-D (linear) or 4-D (conv) LoRA tensors",
                down.shape, up.shape
            ),
        ));
    }
    if up.shape[1] != down.shape[0] || (up.shape.len() == 4) != (down.shape.len() == 4) {
        return Err(Error::lora(
            path,
            format!(
                "rank mismatch: {down_key} has shape {:?} but {up_key} has shape {:?} (up must be (out, r), down (r, in))",
                down.shape, up.shape
            ),
        ));
    }
    if up.shape[1] == 0 {
        return Err(Error::lora(path, format!("{down_key} has rank 0")));
    }
    for (key, t) in [(down_key, down), (up_key, up)] {
        if let Some((i, v)) = t.first_non_finite() {
            return Err(Error::lora(
                path,
                format!(
                    "{key} holds a non-finite value ({v} at flat index {i}); the file is damaged"
                ),
            ));
        }
    }
    Ok(up.shape[1])
}

pub(super) fn unknown_keys(path: &std::path::Path, bad: &[String], total: usize) -> Error {
    let shown: Vec<&str> = bad.iter().take(5).map(String::as_str).collect();
    Error::lora(
        path,
        format!(
            "unrecognised LoRA key format ({} of {total} keys), e.g. {}; supported: diffusers/peft (unet.*.lora_A.weight), \
             old diffusers (.lora.down.weight, to_q_lora), kohya (lora_unet_*, lora_te_*, lora_te1_*, lora_te2_*)",
            bad.len(),
            shown.join(", ")
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// diffusers / peft
// ---------------------------------------------------------------------------------------------

fn diffusers(
    path: &std::path::Path,
    tensors: BTreeMap<String, Tensor>,
) -> Result<(LoraFormat, PendingMap)> {
    let total = tensors.len();
    let mut pending = PendingMap::new();
    let mut bad = Vec::new();
    let mut old = false;
    for (order, (key, t)) in tensors.into_iter().enumerate() {
        // Original AnimateDiff motion-LoRA names, as diffusers' conversion script renames them.
        let renamed = animatediff_key(&key);
        let key_or_renamed = renamed.as_deref().unwrap_or(&key);
        // Longest prefix first: `text_encoder_2.` also starts with `text_encoder`.
        let (component, rest) = if let Some(r) = key_or_renamed.strip_prefix("unet.") {
            (Component::Unet, r)
        } else if let Some(r) = key_or_renamed.strip_prefix("text_encoder_2.") {
            (Component::TextEncoder2, r)
        } else if let Some(r) = key_or_renamed.strip_prefix("text_encoder.") {
            (Component::TextEncoder, r)
        } else {
            bad.push(key);
            continue;
        };
        let Some((module, role, is_old)) = diffusers_key(component, rest) else {
            bad.push(key);
            continue;
        };
        let is_old = is_old || renamed.is_some();
        old |= is_old;
        let p = pending.entry((component, module)).or_default();
        p.order = p.order.max(order);
        let slot = match role {
            Role::Down => &mut p.down,
            Role::Up => &mut p.up,
            Role::Alpha => {
                bad.push(key);
                continue;
            }
        };
        *slot = Some((key, t));
    }
    if !bad.is_empty() {
        return Err(unknown_keys(path, &bad, total));
    }
    let format = if old {
        LoraFormat::DiffusersOld
    } else {
        LoraFormat::Diffusers
    };
    Ok((format, pending))
}

/// A motion-LoRA key in the original AnimateDiff names (`down_blocks.0.motion_modules.0.
/// temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora.down.weight`)
/// in diffusers' (`unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.processor.
/// to_q_lora.down.weight`), renamed as diffusers' `convert_animatediff_motion_lora_to_diffusers.py`
/// does; `None` for any other key.
fn animatediff_key(key: &str) -> Option<String> {
    let block = ["down_blocks.", "up_blocks.", "mid_block."]
        .iter()
        .any(|b| key.starts_with(b));
    if !block || !key.contains(".motion_modules.") {
        return None;
    }
    let renamed = key
        .replace(".norms.0", ".norm1")
        .replace(".norms.1", ".norm2")
        .replace(".ff_norm", ".norm3")
        .replace(".attention_blocks.0", ".attn1")
        .replace(".attention_blocks.1", ".attn2")
        .replace(".temporal_transformer", "");
    Some(format!("unet.{renamed}"))
}

/// Splits a diffusers key (component prefix removed) into module path, role and "old format".
fn diffusers_key(component: Component, key: &str) -> Option<(String, Role, bool)> {
    // diffusers applies `.processor.` -> `.` to every key (KEYS_TO_ALWAYS_REPLACE).
    let key = key.replace(".processor.", ".");
    const SUFFIXES: [(&str, bool, bool); 8] = [
        (".lora_A.weight", true, false),
        (".lora_B.weight", false, false),
        (".lora.down.weight", true, true),
        (".lora.up.weight", false, true),
        (".lora_linear_layer.down.weight", true, true),
        (".lora_linear_layer.up.weight", false, true),
        ("_lora.down.weight", true, true),
        ("_lora.up.weight", false, true),
    ];
    for (suffix, is_down, is_old) in SUFFIXES {
        let Some(module) = key.strip_suffix(suffix) else {
            continue;
        };
        let role = if is_down { Role::Down } else { Role::Up };
        let module = if suffix.starts_with('_') {
            // Attention-processor names: `attn1.to_q_lora` (UNet), `self_attn.to_q_lora` (CLIP).
            let (parent, proj) = module.rsplit_once('.').unwrap_or(("", module));
            let proj = match (component, proj) {
                (Component::Unet, "to_q" | "to_k" | "to_v") => proj.to_string(),
                (Component::Unet, "to_out") => "to_out.0".to_string(),
                (_, "to_q") => "q_proj".to_string(),
                (_, "to_k") => "k_proj".to_string(),
                (_, "to_v") => "v_proj".to_string(),
                (_, "to_out") => "out_proj".to_string(),
                _ => return None,
            };
            if parent.is_empty() {
                proj
            } else {
                format!("{parent}.{proj}")
            }
        } else {
            module.to_string()
        };
        return Some((normalize_module(component, module), role, is_old));
    }
    None
}

/// CLIP module paths as the exports name them (transformers 5): `CLIPTextModel`
/// (`text_encoder`) is flattened, so its parameters have no `text_model.` prefix, while
/// `CLIPTextModelWithProjection` (`text_encoder_2`) keeps it. LoRA files carry either spelling;
/// [`super::param_aliases`] gives the other one for exports made with older transformers.
pub(super) fn normalize_module(component: Component, module: String) -> String {
    match component {
        Component::Unet => module,
        Component::TextEncoder => match module.strip_prefix("text_model.") {
            Some(rest) => rest.to_string(),
            None => module,
        },
        Component::TextEncoder2 => {
            if module.starts_with("text_model.") || module.starts_with("text_projection") {
                module
            } else {
                format!("text_model.{module}")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// `(component, module, own alpha, alpha reaches module, rank) -> (alpha, use_rslora)`.
type AlphaFn = Box<dyn Fn(Component, &str, Option<f32>, bool, usize) -> (f32, bool)>;

/// peft's `lora_alpha` / `alpha_pattern` as diffusers' `get_peft_kwargs` builds them.
fn resolve_alphas(
    path: &std::path::Path,
    format: LoraFormat,
    pending: &PendingMap,
    metadata: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<AlphaFn> {
    match format {
        LoraFormat::Kohya | LoraFormat::KohyaSgm => {
            // Per component: the alpha when all agree, else the most common one (first seen wins
            // ties, like collections.Counter) with per-module exceptions where they reach.
            let mut defaults: HashMap<Component, f32> = HashMap::new();
            for c in [
                Component::Unet,
                Component::TextEncoder,
                Component::TextEncoder2,
            ] {
                let mut seen: Vec<(usize, f32)> = pending
                    .iter()
                    .filter(|((pc, _), _)| *pc == c)
                    .filter_map(|(_, p)| p.alpha.map(|a| (p.order, a)))
                    .collect();
                seen.sort_by_key(|(o, _)| *o);
                let mut counts: Vec<(f32, usize)> = Vec::new();
                for (_, a) in seen {
                    match counts.iter_mut().find(|(v, _)| *v == a) {
                        Some(e) => e.1 += 1,
                        None => counts.push((a, 1)),
                    }
                }
                let mut best: Option<(f32, usize)> = None;
                for (v, n) in counts {
                    if best.is_none_or(|(_, bn)| n > bn) {
                        best = Some((v, n));
                    }
                }
                if let Some((v, _)) = best {
                    defaults.insert(c, v);
                }
            }
            Ok(Box::new(move |c, _m, own, reaches, rank| {
                match defaults.get(&c) {
                    // No alphas for this component: peft's alpha equals the rank.
                    None => (rank as f32, false),
                    Some(&d) => match own {
                        Some(a) if reaches => (a, false),
                        _ => (d, false),
                    },
                }
            }))
        }
        LoraFormat::Diffusers | LoraFormat::DiffusersOld => {
            let Some(meta) = metadata else {
                return Ok(Box::new(|_, _, _, _, rank| (rank as f32, false)));
            };
            let mut configs: HashMap<Component, PeftConfig> = HashMap::new();
            for c in [
                Component::Unet,
                Component::TextEncoder,
                Component::TextEncoder2,
            ] {
                if let Some(cfg) = PeftConfig::from_metadata(path, meta, c)? {
                    configs.insert(c, cfg);
                }
            }
            Ok(Box::new(move |c, m, _, _, rank| match configs.get(&c) {
                None => (rank as f32, false),
                Some(cfg) => (cfg.alpha_for(m), cfg.use_rslora),
            }))
        }
    }
}

/// The parts of a saved peft `LoraConfig` that decide the scale.
struct PeftConfig {
    lora_alpha: f32,
    alpha_pattern: Vec<(String, f32)>,
    use_rslora: bool,
}

impl PeftConfig {
    fn from_metadata(
        path: &std::path::Path,
        meta: &serde_json::Map<String, serde_json::Value>,
        c: Component,
    ) -> Result<Option<Self>> {
        let get = |k: &str| meta.get(&format!("{}.{k}", c.as_str()));
        let Some(alpha) = get("lora_alpha") else {
            return Ok(None);
        };
        let lora_alpha = alpha.as_f64().ok_or_else(|| {
            Error::lora(
                path,
                format!(
                    "{}.lora_alpha in the adapter metadata is not a number",
                    c.as_str()
                ),
            )
        })? as f32;
        if get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(Error::lora(
                path,
                "DoRA adapters (use_dora) are not supported; use a plain LoRA",
            ));
        }
        let mut alpha_pattern = Vec::new();
        if let Some(serde_json::Value::Object(p)) = get("alpha_pattern") {
            for (k, v) in p {
                if let Some(a) = v.as_f64() {
                    alpha_pattern.push((k.clone(), a as f32));
                }
            }
        }
        let use_rslora = get("use_rslora").and_then(|v| v.as_bool()) == Some(true);
        Ok(Some(PeftConfig {
            lora_alpha,
            alpha_pattern,
            use_rslora,
        }))
    }

    /// peft's `get_pattern_key`: a pattern names the module or a dotted suffix of it; a leading
    /// `^` anchors it at the start.
    fn alpha_for(&self, module: &str) -> f32 {
        for (pat, a) in &self.alpha_pattern {
            let hit = match pat.strip_prefix('^') {
                Some(p) => module == p,
                None => module == pat || module.ends_with(&format!(".{pat}")),
            };
            if hit {
                return *a;
            }
        }
        self.lora_alpha
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_animatediff_names_become_diffusers_names() {
        let original = "up_blocks.1.motion_modules.2.temporal_transformer.transformer_blocks.0.\
                        attention_blocks.1.processor.to_out_lora.up.weight";
        assert_eq!(
            animatediff_key(original).as_deref(),
            Some(
                "unet.up_blocks.1.motion_modules.2.transformer_blocks.0.attn2.processor.\
                 to_out_lora.up.weight"
            )
        );
        let (module, role, old) = diffusers_key(
            Component::Unet,
            "up_blocks.1.motion_modules.2.transformer_blocks.0.attn2.processor.to_out_lora.up.weight",
        )
        .expect("a diffusers key");
        assert_eq!(
            module,
            "up_blocks.1.motion_modules.2.transformer_blocks.0.attn2.to_out.0"
        );
        assert!(matches!(role, Role::Up) && old);
        // Keys of other formats are left alone.
        assert_eq!(
            animatediff_key("unet.down_blocks.0.motion_modules.0.x"),
            None
        );
        assert_eq!(animatediff_key("down_blocks.0.attentions.0.x"), None);
    }
}
