//! Issue #8: low-memory mode holds one component at a time (text encoders, VAE encoder, UNet
//! with its ControlNets, VAE decoder), loading each for its stage and releasing it before the
//! next one loads; release-after-use loads everything up front and releases each component once
//! a generation is past its stage. The graphs and their inputs are the same, so the results
//! must be bit-identical to an engine that keeps everything loaded, on every task, across
//! generations and through the session cache.

use tcd_ort::image_io::load_image;
use tcd_ort::pipeline::{
    ControlImage, Engine, EngineOptions, GenerateRequest, Generated, InpaintMode, LoraSpec, Task,
};
use tcd_ort::runtime::{CacheStatus, SessionCache};

use crate::common::{committed_model, repo_root, scratch_dir};

fn load(low_memory: bool, session_cache: SessionCache) -> Engine {
    load_with(EngineOptions {
        low_memory,
        session_cache,
        ..EngineOptions::default()
    })
}

fn load_with(options: EngineOptions) -> Engine {
    let options = EngineOptions {
        intra_threads: Some(1),
        controlnets: vec![committed_model("tiny-sd15-controlnet")],
        ..options
    };
    Engine::load(committed_model("tiny-sd15"), &options).expect("the committed tiny model loads")
}

fn request(control: bool) -> GenerateRequest {
    let image = load_image(&repo_root().join("models").join("control-edges-64x64.png"))
        .expect("the committed control image");
    GenerateRequest {
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        negative_prompt: Some("blurry".into()),
        steps: 3,
        eta: 0.3,
        guidance: 2.0,
        seed: 11,
        control: if control {
            vec![ControlImage {
                scale: 0.7,
                ..ControlImage::new(image)
            }]
        } else {
            Vec::new()
        },
        ..GenerateRequest::default()
    }
}

fn tasks() -> Vec<(&'static str, Task, bool)> {
    let image = load_image(&repo_root().join("models").join("control-edges-64x64.png"))
        .expect("the committed image");
    let mut mask = image.clone();
    for (i, px) in mask.pixels.chunks_mut(3).enumerate() {
        let v = if i % 64 < 32 { 255 } else { 0 };
        px.fill(v);
    }
    vec![
        ("text-to-image", Task::TextToImage, false),
        ("ControlNet", Task::TextToImage, true),
        (
            "image-to-image",
            Task::ImageToImage {
                image: image.clone(),
                strength: 0.8,
            },
            false,
        ),
        (
            "inpainting",
            Task::Inpaint {
                image,
                mask,
                strength: 1.0,
                mode: InpaintMode::Auto,
            },
            false,
        ),
    ]
}

fn assert_same(a: &Generated, b: &Generated, what: &str) {
    assert_eq!(a.latents.shape(), b.latents.shape(), "{what}");
    let differing = a
        .latents
        .iter()
        .zip(b.latents.iter())
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(
        differing, 0,
        "{what}: {differing} latents differ in low-memory mode"
    );
    assert_eq!(
        a.images, b.images,
        "{what}: images differ in low-memory mode"
    );
}

#[test]
fn low_memory_mode_matches_and_holds_one_component() {
    let mut low = load(true, SessionCache::Off);
    let mut full = load(false, SessionCache::Off);
    assert!(low.low_memory() && !full.low_memory());
    assert!(
        low.loaded_components().is_empty(),
        "nothing stays loaded after the checks at load: {:?}",
        low.loaded_components()
    );
    assert_eq!(
        full.loaded_components().len(),
        5,
        "{:?}",
        full.loaded_components()
    );
    let mut steps = 0;
    for round in 0..2 {
        for (what, task, control) in tasks() {
            let what = format!("{what}, round {round}");
            let request = request(control);
            let a = low
                .run(&request, &task, &mut |_| true)
                .expect("low-memory run");
            let b = full.run(&request, &task, &mut |_| true).expect("full run");
            assert_same(&a, &b, &what);
            steps += a.timesteps.len() as u64;
            assert_eq!(
                low.loaded_components(),
                vec!["vae_decoder".to_string()],
                "{what}: only the last stage's graph stays loaded"
            );
        }
    }
    // Every stage loaded its graphs again and ran: one UNet call per step of every generation.
    let unet_calls: u64 = low
        .run_stats()
        .into_iter()
        .filter(|(name, _)| name == "unet")
        .map(|(_, s)| s.calls)
        .sum();
    assert_eq!(unet_calls, steps);
    assert!(steps >= 8 * 2, "{steps} steps");
}

#[test]
fn release_after_use_matches_and_releases_each_stage_when_done() {
    let mut released = load_with(EngineOptions {
        release_after_use: true,
        ..EngineOptions::default()
    });
    let mut full = load(false, SessionCache::Off);
    assert!(released.release_after_use() && !released.low_memory());
    assert!(!full.release_after_use());
    assert_eq!(
        released.loaded_components(),
        full.loaded_components(),
        "everything loads up front"
    );
    let mut steps = 0;
    for round in 0..2 {
        for (what, task, control) in tasks() {
            let what = format!("{what}, round {round}");
            let request = request(control);
            let a = released
                .run(&request, &task, &mut |_| true)
                .expect("release-after-use run");
            let b = full.run(&request, &task, &mut |_| true).expect("full run");
            assert_same(&a, &b, &what);
            steps += a.timesteps.len() as u64;
            assert_eq!(
                released.loaded_components(),
                vec!["vae_decoder".to_string()],
                "{what}: the stages before the decode are released"
            );
            assert_eq!(full.loaded_components().len(), 5, "{what}");
        }
    }
    let unet_calls: u64 = released
        .run_stats()
        .into_iter()
        .filter(|(name, _)| name == "unet")
        .map(|(_, s)| s.calls)
        .sum();
    assert_eq!(
        unet_calls, steps,
        "the UNet loaded again for each generation"
    );
}

/// Load-time LoRA weights are built once and shared by the reloaded sessions: a released and
/// reloaded graph computes what the first session did.
#[test]
fn released_graphs_reload_with_their_lora_weights() {
    let generated = crate::common::fixtures_dir();
    let lora = generated
        .join("lora")
        .join("sd15")
        .join("diffusers.safetensors");
    let model = generated.join("parity").join("sd15").join("onnx");
    let load = |loras: &[&std::path::Path], release_after_use| {
        let options = EngineOptions {
            intra_threads: Some(1),
            loras: loras
                .iter()
                .map(|path| LoraSpec {
                    source: path.to_string_lossy().into_owned(),
                    weight: 0.8,
                    weight_name: None,
                })
                .collect(),
            release_after_use,
            ..EngineOptions::default()
        };
        Engine::load(model.to_string_lossy(), &options)
            .expect("the LoRA fixtures load; run `make fixtures`")
    };
    let mut released = load(&[&lora], true);
    let mut full = load(&[&lora], false);
    assert!(released.lora_report().patched.values().sum::<usize>() > 0);
    let request = request(false);
    let mut latents = Vec::new();
    for round in 0..2 {
        let a = released
            .run(&request, &Task::TextToImage, &mut |_| true)
            .expect("release-after-use run");
        assert_eq!(
            released.loaded_components(),
            vec!["vae_decoder".to_string()],
            "round {round}"
        );
        let b = full
            .run(&request, &Task::TextToImage, &mut |_| true)
            .expect("full run");
        assert_same(&a, &b, &format!("with a LoRA, round {round}"));
        latents.push(a.latents);
    }
    let without = load(&[], true)
        .run(&request, &Task::TextToImage, &mut |_| true)
        .expect("run without the LoRA");
    assert_ne!(
        latents[1], without.latents,
        "the reloaded UNet kept the LoRA"
    );
}

/// Reloads go through the session cache when it is on.
#[test]
fn low_memory_reloads_hit_the_session_cache() {
    let dir = scratch_dir("low-memory-cache");
    let cache = SessionCache::Dir(dir.clone());
    // The first engine fills the cache; the low-memory engine's loads then hit it.
    let mut full = load(false, cache.clone());
    let mut low = load(true, cache);
    let request = request(false);
    let a = low
        .run(&request, &Task::TextToImage, &mut |_| true)
        .expect("low-memory run");
    let b = full
        .run(&request, &Task::TextToImage, &mut |_| true)
        .expect("full run");
    assert_same(&a, &b, "through the cache");
    let unet = low
        .sessions()
        .into_iter()
        .find(|s| s.component == "unet")
        .expect("a unet session");
    assert_eq!(
        unet.cache,
        CacheStatus::Hit,
        "the reloaded UNet came from the cache"
    );
    let _ = std::fs::remove_dir_all(dir);
}
