//! Key formats: which module of which component each LoRA tensor patches, and its scale.
//!
//! Every format is brought to diffusers/peft module paths (the names the ONNX exports keep as
//! initializer names), following diffusers 0.42 `lora_state_dict` + `load_lora_adapter`:
//!
//! * **diffusers / peft**: `unet.<module>.lora_A.weight` / `.lora_B.weight`, also under
//!   `text_encoder.` and `text_encoder_2.`.
//! * **diffusers (old)**: `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.down.weight`,
//!   and attention-processor names `attn1.processor.to_q_lora.down.weight`.
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
enum Role {
    Down,
    Up,
    Alpha,
}

/// A module while its tensors are being collected.
#[derive(Default)]
struct Pending {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<f32>,
    /// Whether diffusers' `alpha_pattern` reaches this module (see [`kohya_alpha_reaches`]).
    alpha_reaches: bool,
    /// Position of the module in the order diffusers sees the keys (ties in "most common alpha").
    order: usize,
}

/// Converts every key of `file`; `Err` lists offending keys when the format is not recognised.
pub(crate) fn convert(file: LoraFile, layout: &UnetLayout) -> Result<(LoraFormat, Vec<Module>)> {
    let LoraFile {
        path,
        tensors,
        adapter_metadata,
    } = file;
    if tensors.is_empty() {
        return Err(Error::model(&path, "the LoRA file holds no tensors"));
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
            Error::model(&path, format!("{up} has no matching down (lora_A) tensor"))
        })?;
        let (up_key, up) = p.up.ok_or_else(|| {
            Error::model(
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

type PendingMap = BTreeMap<(Component, String), Pending>;

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
        return Err(Error::model(
            path,
            format!(
                "{down_key} {:?} / {up_key} {:?}: expected 2-D (linear) or 4-D (conv) LoRA tensors",
                down.shape, up.shape
            ),
        ));
    }
    if up.shape[1] != down.shape[0] || (up.shape.len() == 4) != (down.shape.len() == 4) {
        return Err(Error::model(
            path,
            format!(
                "rank mismatch: {down_key} has shape {:?} but {up_key} has shape {:?} (up must be (out, r), down (r, in))",
                down.shape, up.shape
            ),
        ));
    }
    if up.shape[1] == 0 {
        return Err(Error::model(path, format!("{down_key} has rank 0")));
    }
    for (key, t) in [(down_key, down), (up_key, up)] {
        if let Some((i, v)) = t.first_non_finite() {
            return Err(Error::model(
                path,
                format!(
                    "{key} holds a non-finite value ({v} at flat index {i}); the file is damaged"
                ),
            ));
        }
    }
    Ok(up.shape[1])
}

fn unknown_keys(path: &std::path::Path, bad: &[String], total: usize) -> Error {
    let shown: Vec<&str> = bad.iter().take(5).map(String::as_str).collect();
    Error::model(
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
        // Longest prefix first: `text_encoder_2.` also starts with `text_encoder`.
        let (component, rest) = if let Some(r) = key.strip_prefix("unet.") {
            (Component::Unet, r)
        } else if let Some(r) = key.strip_prefix("text_encoder_2.") {
            (Component::TextEncoder2, r)
        } else if let Some(r) = key.strip_prefix("text_encoder.") {
            (Component::TextEncoder, r)
        } else {
            bad.push(key);
            continue;
        };
        let Some((module, role, is_old)) = diffusers_key(component, rest) else {
            bad.push(key);
            continue;
        };
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
fn normalize_module(component: Component, module: String) -> String {
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
// kohya
// ---------------------------------------------------------------------------------------------

fn kohya(
    path: &std::path::Path,
    tensors: BTreeMap<String, Tensor>,
    layout: &UnetLayout,
) -> Result<(LoraFormat, PendingMap)> {
    let total = tensors.len();
    let sgm_patterns = ["input_blocks", "middle_block", "output_blocks"];
    let not_sgm = ["down_blocks", "mid_block", "up_blocks"];
    let (mut has_sgm, mut has_not_sgm) = (false, false);
    for k in tensors.keys() {
        if sgm_patterns.iter().any(|p| k.contains(p)) {
            has_sgm = true;
        } else if not_sgm.iter().any(|p| k.contains(p)) {
            has_not_sgm = true;
        }
    }
    // A file with both spellings: diffusers keeps the diffusers-named half only.
    let drop_sgm = has_sgm && has_not_sgm;
    let map_sgm = has_sgm && !drop_sgm;
    let format = if map_sgm {
        LoraFormat::KohyaSgm
    } else {
        LoraFormat::Kohya
    };

    let mut pending = PendingMap::new();
    let mut bad = Vec::new();
    for (key, t) in tensors {
        if drop_sgm && sgm_patterns.iter().any(|p| key.contains(p)) {
            continue;
        }
        let Some((stem, suffix)) = key.split_once('.') else {
            bad.push(key);
            continue;
        };
        let role = match suffix {
            "lora_down.weight" => Role::Down,
            "lora_up.weight" => Role::Up,
            "alpha" => Role::Alpha,
            _ => {
                bad.push(key);
                continue;
            }
        };
        let (stem, order) = if map_sgm {
            match sgm_to_diffusers(stem, layout) {
                Some(s) => s,
                None => {
                    bad.push(key);
                    continue;
                }
            }
        } else {
            (stem.to_string(), (0, 0))
        };
        let Some((component, module, reaches)) = kohya_module(&stem) else {
            bad.push(key);
            continue;
        };
        let p = pending.entry((component, module)).or_default();
        p.alpha_reaches = reaches;
        // Sorted keys within a group; groups in the order `_maybe_map_sgm_blocks_to_diffusers`
        // builds its new dict.
        p.order = order.0 * 1_000_000 + order.1 * 10_000;
        match role {
            Role::Down => p.down = Some((key, t)),
            Role::Up => p.up = Some((key, t)),
            Role::Alpha => {
                let alpha = t.to_f32();
                if alpha.len() != 1 || !alpha[0].is_finite() {
                    return Err(Error::model(
                        path,
                        format!("{key} must be one finite number, got shape {:?}", t.shape),
                    ));
                }
                p.alpha = Some(alpha[0]);
            }
        }
    }
    if !bad.is_empty() {
        return Err(unknown_keys(path, &bad, total));
    }
    // Within a group diffusers iterates keys in file (sorted) order; fold that in.
    for (i, p) in pending.values_mut().enumerate() {
        p.order += i;
    }
    Ok((format, pending))
}

/// `_maybe_map_sgm_blocks_to_diffusers` for one kohya stem (`lora_unet_input_blocks_4_1_...`).
///
/// Returns the stem in diffusers block numbering and a (group, id) order key. Unlike diffusers,
/// block ids are matched exactly, so `input_blocks_1` never captures `input_blocks_10` (which
/// makes diffusers fail on SD 1.x SGM files); where diffusers succeeds the result is the same.
fn sgm_to_diffusers(stem: &str, layout: &UnetLayout) -> Option<(String, (usize, usize))> {
    let is_sgm = ["input_blocks", "middle_block", "output_blocks"]
        .iter()
        .any(|p| stem.contains(p));
    // time_embed, label_emb, out_2 and input_blocks_0_0 (conv_in) pass through unchanged.
    if stem.contains("text") || !is_sgm || stem.contains("input_blocks_0_0") {
        return Some((stem.to_string(), (0, 0)));
    }
    let parts: Vec<&str> = stem.split('_').collect();
    // lora _ unet _ input _ blocks _ <id> _ <inner> _ rest...
    let layer_id: usize = parts.get(4)?.parse().ok()?;
    let lpb1 = layout.layers_per_block + 1;
    let inner_map = ["resnets", "attentions", "upsamplers"];
    let head = &parts[..4];
    let joined = |mid: Vec<String>, tail: &[&str]| {
        let mut all: Vec<String> = head.iter().map(|s| s.to_string()).collect();
        all.extend(mid);
        all.extend(tail.iter().map(|s| s.to_string()));
        all.join("_")
    };
    if stem.contains("input_blocks") {
        let inner: usize = parts.get(5)?.parse().ok()?;
        let block = layer_id.checked_sub(1)? / lpb1;
        let layer = (layer_id - 1) % lpb1;
        let (inner_key, layer) = if stem.contains("op") {
            ("downsamplers".to_string(), "0".to_string())
        } else {
            (inner_map.get(inner)?.to_string(), layer.to_string())
        };
        Some((
            joined(vec![block.to_string(), inner_key, layer], &parts[6..]),
            (1, layer_id),
        ))
    } else if stem.contains("middle_block") {
        let part = match layer_id {
            0 => ["resnets", "0"],
            1 => ["attentions", "0"],
            2 => ["resnets", "1"],
            _ => return None,
        };
        Some((
            joined(part.iter().map(|s| s.to_string()).collect(), &parts[5..]),
            (2, layer_id),
        ))
    } else {
        let inner: usize = parts.get(5)?.parse().ok()?;
        let block = layer_id / lpb1;
        let layer = if inner < 2 { layer_id % lpb1 } else { 0 };
        Some((
            joined(
                vec![
                    block.to_string(),
                    inner_map.get(inner)?.to_string(),
                    layer.to_string(),
                ],
                &parts[6..],
            ),
            (3, layer_id),
        ))
    }
}

/// A kohya stem (after SGM mapping) to (component, diffusers module, whether a non-uniform
/// `.alpha` reaches the module in diffusers).
fn kohya_module(stem: &str) -> Option<(Component, String, bool)> {
    if let Some(rest) = stem.strip_prefix("lora_unet_") {
        let (module, reaches) = kohya_unet(rest)?;
        return Some((Component::Unet, module, reaches));
    }
    let (component, rest) = if let Some(r) = stem.strip_prefix("lora_te_") {
        (Component::TextEncoder, r)
    } else if let Some(r) = stem.strip_prefix("lora_te1_") {
        (Component::TextEncoder, r)
    } else {
        (Component::TextEncoder2, stem.strip_prefix("lora_te2_")?)
    };
    let mut name = rest.replace('_', ".");
    for (from, to) in [
        ("text.model", "text_model"),
        ("self.attn", "self_attn"),
        ("q.proj", "q_proj"),
        ("k.proj", "k_proj"),
        ("v.proj", "v_proj"),
        ("out.proj", "out_proj"),
        ("text.projection", "text_projection"),
    ] {
        name = name.replace(from, to);
    }
    // diffusers names a self-attention alpha after `to_q_lora.down.weight`, which no module
    // matches, and matches MLP alphas against `text_model.*`, which only CLIPTextModelWithProjection
    // (text_encoder_2) still has under transformers 5.
    let reaches = !name.contains("self_attn")
        && (component == Component::TextEncoder2 || name.starts_with("text_projection"));
    Some((component, normalize_module(component, name), reaches))
}

/// `_convert_unet_lora_key` followed by `convert_unet_state_dict_to_peft`, on the stem only.
fn kohya_unet(rest: &str) -> Option<(String, bool)> {
    // Run on the full key like diffusers: some rules look at what follows the module name.
    let mut n = format!("{rest}.lora.down.weight").replace('_', ".");
    let r = |n: &mut String, a: &str, b: &str| *n = n.replace(a, b);
    r(&mut n, "input.blocks.0.0", "conv_in");
    r(&mut n, "out.2", "conv_out");
    for (a, b) in [
        ("input.blocks", "down_blocks"),
        ("down.blocks", "down_blocks"),
        ("middle.block", "mid_block"),
        ("mid.block", "mid_block"),
        ("output.blocks", "up_blocks"),
        ("up.blocks", "up_blocks"),
        ("transformer.blocks", "transformer_blocks"),
        ("to.q.lora", "to_q_lora"),
        ("to.k.lora", "to_k_lora"),
        ("to.v.lora", "to_v_lora"),
        ("to.out.0.lora", "to_out_lora"),
        ("proj.in", "proj_in"),
        ("proj.out", "proj_out"),
        ("emb.layers", "time_emb_proj"),
        ("conv.in", "conv_in"),
        ("conv.out", "conv_out"),
        ("time.embed.0", "time_embedding.linear_1"),
        ("time.embed.2", "time_embedding.linear_2"),
        ("label.emb.0.0", "add_embedding.linear_1"),
        ("label.emb.0.2", "add_embedding.linear_2"),
        ("time.embedding.linear.1", "time_embedding.linear_1"),
        ("time.embedding.linear.2", "time_embedding.linear_2"),
    ] {
        r(&mut n, a, b);
    }
    if n.contains("emb") && !n.contains("time.emb.proj") {
        // re.sub(r"\.\d+(?=\D*$)", "", n, count=1): drop the last `.<digits>` group.
        n = drop_last_index(&n);
    }
    if n.contains(".in.") {
        r(&mut n, "in.layers.2", "conv1");
    }
    if n.contains(".out.") {
        r(&mut n, "out.layers.3", "conv2");
    }
    if n.contains("downsamplers") || n.contains("upsamplers") {
        r(&mut n, "op", "conv");
    }
    if n.contains("skip") {
        r(&mut n, "skip.connection", "conv_shortcut");
    }
    if n.contains("time.emb.proj") {
        r(&mut n, "time.emb.proj", "time_emb_proj");
    }
    if n.contains("conv.shortcut") {
        r(&mut n, "conv.shortcut", "conv_shortcut");
    }
    // Attention projections become processor names whose alpha key matches no module.
    let attn = ["to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"]
        .iter()
        .any(|p| n.contains(p));
    // UNET_TO_DIFFUSERS, first match wins.
    for (a, b) in [
        (".to_out_lora.down", ".to_out.0.lora_A"),
        (".to_q_lora.down", ".to_q.lora_A"),
        (".to_k_lora.down", ".to_k.lora_A"),
        (".to_v_lora.down", ".to_v.lora_A"),
        (".lora.down", ".lora_A"),
    ] {
        if n.contains(a) {
            n = n.replace(a, b);
            break;
        }
    }
    let module = n.strip_suffix(".lora_A.weight")?.to_string();
    Some((module, !attn))
}

fn drop_last_index(n: &str) -> String {
    let b = n.as_bytes();
    // Position after which only non-digits follow.
    let tail = b
        .iter()
        .rposition(|c| c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    let mut start = tail;
    while start > 0 && b[start - 1].is_ascii_digit() {
        start -= 1;
    }
    if tail > 0 && start > 0 && b[start - 1] == b'.' {
        format!("{}{}", &n[..start - 1], &n[tail..])
    } else {
        n.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// alpha
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
            Error::model(
                path,
                format!(
                    "{}.lora_alpha in the adapter metadata is not a number",
                    c.as_str()
                ),
            )
        })? as f32;
        if get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(Error::model(
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
    fn last_index_is_dropped() {
        assert_eq!(
            drop_last_index("down_blocks.0.resnets.1.time_emb_proj.1.lora.down.weight"),
            "down_blocks.0.resnets.1.time_emb_proj.lora.down.weight"
        );
        assert_eq!(drop_last_index("a.b"), "a.b");
    }
}
