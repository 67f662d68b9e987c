//! LoRA key conversion: newline-separated key names, each given a small tensor of the shape a
//! LoRA pair needs, so the fuzzer explores names rather than the safetensors header.
#![no_main]

mod common;

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use tcd_ort::lora::{LoraSet, UnetLayout};

fuzz_target!(|data: &[u8]| {
    let Some((&layers, names)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(names);
    // Unique: safetensors' serializer panics on a repeated name (a file cannot hold one).
    let keys: std::collections::BTreeSet<&str> = text.split('\n').take(64).collect();
    let down = [0u8; 4 * 4 * 2];
    let up = [0u8; 4 * 2 * 4];
    let alpha = 2i64.to_le_bytes();
    let mut tensors = Vec::new();
    for key in &keys {
        // lora_up / lora_B are (out, r), alphas scalars, everything else (r, in).
        let view = if key.ends_with(".alpha") {
            TensorView::new(Dtype::I64, vec![], &alpha)
        } else if key.contains("up") || key.contains("lora_B") {
            TensorView::new(Dtype::F32, vec![4, 2], &up)
        } else {
            TensorView::new(Dtype::F32, vec![2, 4], &down)
        };
        if let Ok(view) = view {
            tensors.push((key.to_string(), view));
        }
    }
    let Ok(bytes) = safetensors::serialize(tensors, None) else {
        return;
    };
    let layout = UnetLayout {
        layers_per_block: usize::from(layers % 4),
    };
    if let Ok(set) = LoraSet::parse(Path::new("fuzz.safetensors"), bytes, &layout) {
        common::exercise(&set);
    }
});
