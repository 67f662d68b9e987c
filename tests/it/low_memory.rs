//! Issue #8: low-memory mode holds one component at a time (text encoders, VAE encoder, UNet
//! with its ControlNets, VAE decoder), loading each for its stage and releasing it before the
//! next one loads; release-after-use loads everything up front and releases each component once
//! a generation is past its stage. The graphs and their inputs are the same, so the results
//! must be bit-identical to an engine that keeps everything loaded, on every task, across
//! generations and through the session cache. With the session cache on, a UNet exported in
//! segments (the committed tiny model has two) loads one segment at a time at every step:
//! ONNX Runtime then optimises each segment on its own, so the results agree to float32
//! rounding instead of bit for bit.

use ndarray::ArrayD;
use tcd_ort::image_io::load_image;
use tcd_ort::pipeline::{
    ControlImage, Engine, EngineOptions, GenerateRequest, Generated, InpaintMode, LoraSpec,
    SessionReport, Task,
};
use tcd_ort::runtime::{
    CacheStatus, Graph, InitializerTable, SessionCache, SessionOptions, TensorInput, WeightOverride,
};

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

/// How often the engine ran the UNet since it loaded.
fn unet_calls(engine: &Engine) -> u64 {
    engine
        .run_stats()
        .into_iter()
        .filter(|(name, _)| name == "unet")
        .map(|(_, s)| s.calls)
        .sum()
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
    assert_eq!(unet_calls(&low), steps);
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
    assert_eq!(
        unet_calls(&released),
        steps,
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

fn unet_report(engine: &Engine) -> SessionReport {
    engine
        .sessions()
        .into_iter()
        .find(|s| s.component == "unet")
        .expect("a unet session")
}

/// Latents within float32 rounding of each other (relative to their scale), images within
/// 1/255.
fn assert_close(a: &Generated, b: &Generated, what: &str) {
    assert_eq!(a.latents.shape(), b.latents.shape(), "{what}");
    let scale = b.latents.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a
        .latents
        .iter()
        .zip(b.latents.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        worst <= 1e-4 * scale.max(1.0),
        "{what}: latents differ by up to {worst} (scale {scale})"
    );
    assert!(
        a.latents.iter().all(|v| v.is_finite()),
        "{what}: non-finite latents"
    );
    for (x, y) in a.images.iter().zip(&b.images) {
        let off = x
            .pixels
            .iter()
            .zip(&y.pixels)
            .map(|(p, q)| p.abs_diff(*q))
            .max()
            .unwrap_or(0);
        assert!(off <= 1, "{what}: pixels differ by {off}/255");
    }
}

/// With the session cache on, low-memory mode runs the committed model's UNet in its two
/// segments, each loaded from the cache for its part of every step and released after it, on
/// every task; the results match an engine that keeps the whole UNet loaded. A second engine's
/// segment loads hit the cache.
#[test]
fn low_memory_runs_the_unet_in_segments_through_the_cache() {
    let dir = scratch_dir("low-memory-segments");
    let cache = SessionCache::Dir(dir.clone());
    let mut low = load(true, cache.clone());
    let mut full = load(false, SessionCache::Off);
    let unet = unet_report(&low);
    assert_eq!(unet.segments, 2, "{unet:?}");
    assert_eq!(unet.cache, CacheStatus::Stored, "{unet:?}");
    assert!(!unet.io_binding, "a UNet in segments runs from host memory");
    assert!(low.notes().is_empty(), "{:?}", low.notes());
    assert!(low.loaded_components().is_empty());
    assert_eq!(unet_report(&full).segments, 0);
    let mut steps = 0;
    for (what, task, control) in tasks() {
        let request = request(control);
        let a = low
            .run(&request, &task, &mut |_| true)
            .expect("low-memory run");
        let b = full.run(&request, &task, &mut |_| true).expect("full run");
        assert_close(&a, &b, what);
        steps += a.timesteps.len() as u64;
        assert_eq!(
            low.loaded_components(),
            vec!["vae_decoder".to_string()],
            "{what}: no segment stays loaded after its run"
        );
    }
    assert_eq!(unet_calls(&low), steps);
    // The segments' optimised graphs are in the cache, one entry each.
    let entries: Vec<String> = std::fs::read_dir(&dir)
        .expect("the cache directory")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.starts_with("unet"))
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(entries.iter().all(|e| e.starts_with("unet-segment-")));
    let again = load(true, cache);
    assert_eq!(unet_report(&again).cache, CacheStatus::Hit);
    let _ = std::fs::remove_dir_all(dir);
}

/// Segments reloaded at every step would each be optimised again without the cache, or with
/// weight overrides (which bypass it): low-memory mode then loads the UNet whole and says why.
#[test]
fn low_memory_loads_the_unet_whole_when_segments_would_not_come_from_the_cache() {
    let low = load(true, SessionCache::Off);
    assert_eq!(unet_report(&low).segments, 0);
    let note = low.notes().join("\n");
    assert!(
        note.contains("2 segments") && note.contains("session cache is off"),
        "{note}"
    );
    let dir = scratch_dir("low-memory-segments-lora");
    let lora = crate::common::fixtures_dir()
        .join("lora")
        .join("sd15")
        .join("diffusers.safetensors");
    let with_lora = Engine::load(
        committed_model("tiny-sd15"),
        &EngineOptions {
            intra_threads: Some(1),
            low_memory: true,
            session_cache: SessionCache::Dir(dir.clone()),
            loras: vec![LoraSpec {
                source: lora.to_string_lossy().into_owned(),
                weight: 1.0,
                weight_name: None,
            }],
            lora_allow_unmatched: true,
            ..EngineOptions::default()
        },
    )
    .expect("the LoRA fixture loads onto the committed model; run `make fixtures`");
    assert!(with_lora.lora_report().patched.values().sum::<usize>() > 0);
    assert_eq!(unet_report(&with_lora).segments, 0);
    let note = with_lora.notes().join("\n");
    assert!(note.contains("LoRA"), "{note}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A graph loaded in segments computes what the whole graph computes, with replaced weights
/// routed to the segments that read them; a weight no segment has is refused by name.
#[test]
// One scenario, step by step: the whole graph, then its segments, then replaced weights.
#[allow(clippy::too_many_lines)]
fn a_graph_in_segments_runs_like_the_whole_graph_with_replaced_weights() {
    tcd_ort::runtime::ensure_loaded(None).expect("ONNX Runtime loads");
    let root = std::path::PathBuf::from(committed_model("tiny-sd15")).join("unet");
    let whole = root.join("model.onnx");
    let parts = [root.join("segment_0.onnx"), root.join("segment_1.onnx")];
    let table = InitializerTable::read(&whole).expect("the UNet's initializers");
    // One weight of each segment: the first convolution and the last.
    let overrides: Vec<WeightOverride> = ["conv_in.weight", "conv_out.bias"]
        .iter()
        .map(|name| {
            let init = table.get(name).expect("a UNet weight");
            let values = table.read_f32(init).expect("its values");
            WeightOverride {
                name: name.to_string(),
                shape: init.dims.clone(),
                values: values.iter().map(|v| v * 0.5 + 0.01).collect(),
                dtype: tcd_ort::runtime::ElementType::F32,
            }
        })
        .collect();
    let options = SessionOptions {
        intra_threads: Some(1),
        ..SessionOptions::default()
    };
    let mut segmented = Graph::load_segmented("unet", &whole, &parts, &options, overrides.clone())
        .expect("the segments load");
    let mut replaced = Graph::load_with_weights("unet", &whole, &options, overrides.clone())
        .expect("the whole UNet loads");
    let mut original = Graph::load("unet", &whole, &options).expect("the whole UNet loads");
    assert_eq!(segmented.segment_count(), 2);
    assert!(!segmented.is_loaded(), "segments load for their runs only");
    let mut names: Vec<&str> = segmented.inputs().iter().map(|i| i.name.as_str()).collect();
    let mut expected: Vec<&str> = replaced.inputs().iter().map(|i| i.name.as_str()).collect();
    names.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        names, expected,
        "the segments take the whole graph's inputs"
    );
    let outputs: Vec<&str> = segmented
        .outputs()
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(outputs, ["out_sample"]);

    // 64x64 pixels: 32x32 latents; the residuals of block_out_channels (32, 64), 2 layers.
    let residuals: [(usize, usize); 6] =
        [(32, 32), (32, 32), (32, 32), (32, 16), (64, 16), (64, 16)];
    let ip_inputs: Vec<(String, usize)> = segmented
        .inputs()
        .iter()
        .filter(|i| i.name.starts_with("ip_key_") || i.name.starts_with("ip_value_"))
        .map(|i| (i.name.clone(), i.shape[2] as usize))
        .collect();
    assert!(
        !ip_inputs.is_empty(),
        "the UNet takes the IP-Adapter inputs"
    );
    let inputs = || {
        let mut feeds = vec![
            (
                "sample".to_string(),
                ArrayD::from_shape_fn(ndarray::IxDyn(&[1, 4, 32, 32]), |i| {
                    ((i[1] * 7 + i[2] * 3 + i[3]) % 11) as f32 / 11.0 - 0.5
                }),
            ),
            (
                "encoder_hidden_states".to_string(),
                ArrayD::from_shape_fn(ndarray::IxDyn(&[1, 77, 32]), |i| {
                    ((i[1] + i[2] * 5) % 13) as f32 / 13.0 - 0.5
                }),
            ),
        ];
        for (k, (c, h)) in residuals.iter().enumerate() {
            feeds.push((
                format!("down_block_additional_residual_{k}"),
                ArrayD::zeros(ndarray::IxDyn(&[1, *c, *h, *h])),
            ));
        }
        feeds.push((
            "mid_block_additional_residual".to_string(),
            ArrayD::zeros(ndarray::IxDyn(&[1, 64, 16, 16])),
        ));
        // The IP-Adapter branch: two image tokens per layer at scale 0.5, so its inputs reach
        // the segments that read them.
        for (i, (name, width)) in ip_inputs.iter().enumerate() {
            let values = (0..2 * width).map(|k| ((k + i) % 7) as f32 * 0.1 - 0.3);
            let tokens = ArrayD::from_shape_vec(ndarray::IxDyn(&[1, 2, *width]), values.collect())
                .expect("tokens");
            feeds.push((name.clone(), tokens));
        }
        feeds.push((
            "ip_adapter_scale".to_string(),
            ArrayD::from_elem(ndarray::IxDyn(&[ip_inputs.len() / 2]), 0.5),
        ));
        feeds
    };
    let run = |graph: &mut Graph| {
        let feeds = inputs();
        let mut named: Vec<(&str, TensorInput)> = feeds
            .iter()
            .map(|(n, a)| (n.as_str(), TensorInput::F32(a.clone())))
            .collect();
        named.push((
            "timestep",
            TensorInput::I64(ArrayD::from_elem(ndarray::IxDyn(&[1]), 499)),
        ));
        graph
            .run(named, &["out_sample"])
            .expect("the UNet runs")
            .remove(0)
    };
    let a = run(&mut segmented);
    let b = run(&mut replaced);
    let c = run(&mut original);
    assert!(
        !segmented.is_loaded(),
        "each segment is released after its run"
    );
    let worst = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst < 1e-4, "segments and whole graph differ by {worst}");
    let moved = b
        .iter()
        .zip(&c)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        moved > 1e-2,
        "the replaced weights changed nothing ({moved})"
    );
    // A second run reloads the segments and computes the same.
    let again = run(&mut segmented);
    assert_eq!(again, a);

    let unknown = WeightOverride {
        name: "no_such.weight".into(),
        ..overrides[0].clone()
    };
    let err = Graph::load_segmented("unet", &whole, &parts, &options, vec![unknown])
        .expect_err("an unknown weight is refused");
    assert!(err.to_string().contains("no_such.weight"), "{err}");
}
