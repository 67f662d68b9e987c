//! The kohya key format (`lora_unet_<module with _>.lora_down.weight`, `.alpha`, text encoders
//! as `lora_te_`/`lora_te1_`/`lora_te2_`) and its SGM-block variant, brought to diffusers module
//! paths as diffusers' `_convert_non_diffusers_lora_to_diffusers` and
//! `_maybe_map_sgm_blocks_to_diffusers` do.

use std::collections::BTreeMap;

use super::file::Tensor;
use super::keys::{normalize_module, unknown_keys, LoraFormat, PendingMap, Role};
use super::{Component, UnetLayout};
use crate::{Error, Result};

pub(super) fn kohya(
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
                    return Err(Error::lora(
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
