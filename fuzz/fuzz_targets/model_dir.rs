//! The JSON files of a model directory: `model_index.json`, the manifest `tcd_ort.json`, the
//! UNet, VAE and text encoder configs and `scheduler_config.json`, given as NUL-separated
//! parts, opened as the engine opens a model, then the decisions taken from them.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tcd_ort::lora::UnetLayout;
use tcd_ort::model::ModelDir;
use tcd_ort::pipeline::{unet_shape, GenerateRequest, Task};

const FILES: [&str; 6] = [
    "model_index.json",
    "tcd_ort.json",
    "unet/config.json",
    "vae_decoder/config.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
];

/// A model directory of this process, its graphs present (empty: nothing here loads them).
fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tcd-ort-fuzz-model-{}", std::process::id()));
        for component in ["text_encoder", "unet", "vae_decoder", "scheduler"] {
            std::fs::create_dir_all(dir.join(component)).expect("scratch directory");
        }
        for graph in ["text_encoder", "unet", "vae_decoder"] {
            std::fs::write(dir.join(graph).join("model.onnx"), b"").expect("graph");
            std::fs::write(dir.join(graph).join("segment_0.onnx"), b"").expect("segment");
        }
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = model_dir();
    let mut parts = data.split(|&b| b == 0);
    for file in FILES {
        let path = dir.join(file);
        let _ = match parts.next() {
            // An empty part leaves the file out (the manifest is optional).
            Some(part) if !part.is_empty() => std::fs::write(&path, part),
            _ => std::fs::remove_file(&path),
        };
    }
    let _ = UnetLayout::from_config(&dir.join("unet/config.json"));
    let Ok(model) = ModelDir::open(dir) else {
        return;
    };
    let _ = model.family();
    let _ = model.default_image_size();
    let _ = model.is_float16();
    let _ = model.requires_aesthetics_score();
    let _ = model.force_zeros_for_empty_prompt();
    let request = GenerateRequest::default();
    let _ = unet_shape(&model, &request, &Task::TextToImage);
    for component in [
        "text_encoder",
        "text_encoder_2",
        "unet",
        "vae_decoder",
        "controlnet",
    ] {
        let _ = model.segment_paths(component);
        let _ = model.has_component(component);
    }
    if let Some(manifest) = model.manifest() {
        for slots in manifest.lora_slots.values() {
            let _ = slots.graph_scale();
            let _ = slots.names("down_blocks.0.attentions.0.proj_in");
        }
    }
});
