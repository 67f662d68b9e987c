//! Issue #8: low-memory mode holds one component at a time (text encoders, VAE encoder, UNet
//! with its ControlNets, VAE decoder), loading each for its stage and releasing it before the
//! next one loads. The graphs and their inputs are the same, so the results must be
//! bit-identical to an engine that keeps everything loaded, on every task, across generations
//! and through the session cache.

use tcd_ort::image_io::load_image;
use tcd_ort::pipeline::{
    ControlImage, Engine, EngineOptions, GenerateRequest, Generated, InpaintMode, Task,
};
use tcd_ort::runtime::{CacheStatus, SessionCache};

use crate::common::{committed_model, repo_root, scratch_dir};

fn load(low_memory: bool, session_cache: SessionCache) -> Engine {
    let options = EngineOptions {
        intra_threads: Some(1),
        controlnets: vec![committed_model("tiny-sd15-controlnet")],
        low_memory,
        session_cache,
        ..EngineOptions::default()
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
