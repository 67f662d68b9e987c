//! Execution providers and session start-up (issue #7): which provider each graph runs on,
//! clear errors for providers the CPU build lacks and for flags of providers not chosen,
//! TensorRT profiles from the real graph inputs, and the optimised-model session cache (hits,
//! byte-identical output, invalidation, corrupt entries, LoRA bypass).
//!
//! The GPU paths (CUDA, TensorRT, DirectML, CoreML) cannot run on the CPU wheel; these tests
//! only check that asking for them fails with the package to install.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tcd_ort::pipeline::{Engine, EngineOptions, GenerateRequest, LoraSpec, SessionReport};
use tcd_ort::runtime::{
    declared_inputs, tensorrt::profile_shapes, CacheStatus, SessionCache, TrtProfile,
};

use crate::common::{copy_dir, fixtures_dir, repo_root, scratch_dir};

fn demo_model() -> PathBuf {
    repo_root().join("models").join("tiny-sd15")
}

fn tcd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tcd-ort"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("the binary starts")
}

fn run_args<'a>(output: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "--model",
        "models/tiny-sd15",
        "--prompt",
        "a cat",
        "--seed",
        "0",
        "--steps",
        "2",
        "--output",
        output,
    ];
    args.extend_from_slice(extra);
    args
}

fn assert_fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

#[test]
fn every_gpu_provider_missing_from_the_cpu_build_names_its_package() {
    let dir = scratch_dir("ep-missing");
    let png = dir.join("x.png");
    let png = png.to_string_lossy();
    for (ep, package) in [
        ("cuda", "onnxruntime-gpu"),
        ("tensorrt", "TensorRT"),
        ("directml", "onnxruntime-directml"),
        ("coreml", "macOS onnxruntime"),
    ] {
        let out = tcd(&run_args(&png, &["--ep", ep]));
        assert_fails_with(&out, package);
    }
    assert!(!dir.join("x.png").exists());
}

#[test]
fn provider_flags_need_their_provider_and_valid_values() {
    let dir = scratch_dir("ep-flags");
    let png = dir.join("x.png");
    let png = png.to_string_lossy();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--trt-fp16", "false"],
            "--trt-fp16 applies only to --ep tensorrt",
        ),
        (&["--trt-cache-dir", "/tmp"], "--trt-cache-dir applies only"),
        (
            &["--trt-profile-shapes", "512x512x1"],
            "--trt-profile-shapes applies only",
        ),
        (
            &["--cuda-cudnn-search", "heuristic"],
            "--cuda-cudnn-search applies only",
        ),
        (&["--gpu-mem-limit", "4G"], "--gpu-mem-limit applies only"),
        (
            &["--cpu-arena", "--ep", "cuda"],
            "--cpu-arena applies only to --ep cpu",
        ),
        (
            &["--coreml-units", "cpu-only"],
            "--coreml-units applies only",
        ),
        (
            &["--opt-level", "fast"],
            "expected one of: disable, basic, extended, all",
        ),
        (
            &["--cuda-cudnn-search", "slow", "--ep", "cuda"],
            "cuDNN convolution search",
        ),
        (
            &["--cuda-arena-extend", "double", "--ep", "cuda"],
            "next-power-of-two",
        ),
        (
            &["--gpu-mem-limit", "lots", "--ep", "cuda"],
            "bad memory size",
        ),
        (
            &["--trt-profile-shapes", "512x512", "--ep", "tensorrt"],
            "WIDTHxHEIGHTxBATCH",
        ),
        (
            &[
                "--trt-profile-shapes",
                "1024x1024x1:512x512x1:512x512x1",
                "--ep",
                "tensorrt",
            ],
            "min <= opt <= max",
        ),
        (&["--session-cache", ""], "empty session cache"),
        (&["--session-cache-limit", "lots"], "bad memory size 'lots'"),
    ];
    for (extra, needle) in cases {
        assert_fails_with(&tcd(&run_args(&png, extra)), needle);
    }
    assert!(!dir.join("x.png").exists());
}

#[test]
fn the_summary_names_the_provider_of_every_graph() {
    let dir = scratch_dir("ep-summary");
    let png = dir.join("x.png");
    let out = tcd(&run_args(&png.to_string_lossy(), &["--opt-level", "basic"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for component in ["text_encoder", "unet", "vae_decoder"] {
        assert!(
            err.contains(&format!("{component}: CPUExecutionProvider")),
            "{component} missing from: {err}"
        );
    }
}

#[test]
fn the_cpu_arena_changes_memory_use_not_pixels() {
    let dir = scratch_dir("cpu-arena");
    let (plain, arena) = (dir.join("plain.png"), dir.join("arena.png"));
    let off: &[&str] = &["--cpu-arena", "off"];
    for (png, extra) in [(&plain, off), (&arena, &["--cpu-arena"][..])] {
        let out = tcd(&run_args(&png.to_string_lossy(), extra));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let read = |p: &std::path::Path| std::fs::read(p).expect("png written");
    assert_eq!(read(&plain), read(&arena));
}

#[test]
fn fixed_shape_runs_at_the_native_size() {
    let dir = scratch_dir("fixed-shape");
    let png = dir.join("x.png");
    let out = tcd(&run_args(&png.to_string_lossy(), &["--fixed-shape"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(png.is_file());
}

#[test]
fn engine_reports_cpu_assignment_for_every_graph() {
    let engine = Engine::load(
        demo_model().to_string_lossy(),
        &EngineOptions {
            intra_threads: Some(1),
            ..EngineOptions::default()
        },
    )
    .expect("loads");
    let sessions = engine.sessions();
    assert_eq!(sessions.len(), 4, "{sessions:?}");
    for s in &sessions {
        assert_eq!(s.assignment.len(), 1, "{s:?}");
        assert_eq!(s.assignment[0].provider, "CPUExecutionProvider");
        assert!(s.assignment[0].nodes > 0);
        assert_eq!(s.cache, CacheStatus::Off);
    }
}

#[test]
fn tensorrt_profiles_come_from_the_exported_graph_inputs() {
    let profile = TrtProfile::for_request(512, 768, 2, true).expect("profile");
    let unet = declared_inputs(&demo_model().join("unet").join("model.onnx")).expect("inputs");
    let shapes = profile_shapes(&unet, &profile)
        .expect("derivable")
        .expect("dynamic");
    // tiny-sd15: 4 latent channels, cross-attention dim 32, blocks of 32 and 64 channels with
    // 2 layers each: ControlNet residuals at the latent size and at half of it.
    let residuals = |batch: usize| {
        [
            (0, 32, 96, 64),
            (1, 32, 96, 64),
            (2, 32, 96, 64),
            (3, 32, 48, 32),
            (4, 64, 48, 32),
            (5, 64, 48, 32),
        ]
        .iter()
        .map(|(i, c, h, w)| format!(",down_block_additional_residual_{i}:{batch}x{c}x{h}x{w}"))
        .collect::<String>()
            + &format!(",mid_block_additional_residual:{batch}x64x48x32")
            // The IP-Adapter branch of its 6 cross-attention layers (64 wide): one token, the
            // no-adapter case (engines with an IP-Adapter keep dynamic shapes).
            + &(0..6)
                .map(|i| format!(",ip_key_{i}:{batch}x1x64,ip_value_{i}:{batch}x1x64"))
                .collect::<String>()
    };
    assert_eq!(
        shapes.opt,
        format!(
            "sample:4x4x96x64,timestep:4,encoder_hidden_states:4x77x32{}",
            residuals(4)
        )
    );
    assert_eq!(
        shapes.min,
        format!(
            "sample:1x4x96x64,timestep:1,encoder_hidden_states:1x77x32{}",
            residuals(1)
        )
    );
    let text =
        declared_inputs(&demo_model().join("text_encoder").join("model.onnx")).expect("inputs");
    let shapes = profile_shapes(&text, &profile)
        .expect("derivable")
        .expect("dynamic");
    assert_eq!(shapes.max, "input_ids:4x77");
}

fn load(model: &Path, cache: &Path, loras: Vec<LoraSpec>) -> Engine {
    Engine::load(
        model.to_string_lossy(),
        &EngineOptions {
            intra_threads: Some(1),
            session_cache: SessionCache::Dir(cache.to_path_buf()),
            loras,
            ..EngineOptions::default()
        },
    )
    .expect("loads")
}

fn statuses(engine: &Engine) -> Vec<CacheStatus> {
    engine
        .sessions()
        .into_iter()
        .map(|s: SessionReport| s.cache)
        .collect()
}

fn generate(engine: &mut Engine) -> (Vec<u8>, Vec<u32>) {
    let out = engine
        .generate(
            &GenerateRequest {
                prompt: "a photo of a cat".into(),
                steps: 2,
                seed: 7,
                ..GenerateRequest::default()
            },
            &mut |_| true,
        )
        .expect("generates");
    let latents = out.latents.iter().map(|v| v.to_bits()).collect();
    (out.images[0].pixels.clone(), latents)
}

fn entries(cache: &Path, component: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{component}-")))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

#[test]
fn second_start_uses_the_cache_and_gives_byte_identical_output() {
    let dir = scratch_dir("ep-cache");
    let cache = dir.join("cache");
    let model = demo_model();

    let mut plain = Engine::load(
        model.to_string_lossy(),
        &EngineOptions {
            intra_threads: Some(1),
            ..EngineOptions::default()
        },
    )
    .expect("loads");
    let reference = generate(&mut plain);

    let mut first = load(&model, &cache, Vec::new());
    assert!(
        statuses(&first).iter().all(|s| *s == CacheStatus::Stored),
        "{:?}",
        first.sessions()
    );
    assert_eq!(generate(&mut first), reference, "storing changes nothing");
    drop(first);

    let mut second = load(&model, &cache, Vec::new());
    assert!(
        statuses(&second).iter().all(|s| *s == CacheStatus::Hit),
        "{:?}",
        second.sessions()
    );
    assert_eq!(
        generate(&mut second),
        reference,
        "a cached graph must give the cacheless run's bits"
    );
    for s in second.sessions() {
        assert_eq!(s.assignment[0].provider, "CPUExecutionProvider");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn graphs_over_the_cache_limit_are_not_stored() {
    let dir = scratch_dir("ep-cache-limit");
    let cache = dir.join("cache");
    let model = demo_model();
    // Between the sizes of the tiny model's graphs: the text encoder and UNet (6 MB each) are
    // over it, the VAE's two graphs (1-2 MB) fit together.
    let limit = 4 << 20;
    let engine = Engine::load(
        model.to_string_lossy(),
        &EngineOptions {
            intra_threads: Some(1),
            session_cache: SessionCache::Dir(cache.clone()),
            session_cache_limit: Some(limit),
            ..EngineOptions::default()
        },
    )
    .expect("loads");
    let (mut bypassed, mut stored) = (0, 0);
    for s in engine.sessions() {
        let source: u64 = std::fs::read_dir(model.join(&s.component))
            .expect("component dir")
            .flatten()
            .map(|f| f.metadata().expect("meta").len())
            .sum();
        if source > limit {
            assert!(
                matches!(&s.cache, CacheStatus::Bypassed(why)
                    if why.contains("exceed the session cache's limit of 4.0 MiB")),
                "{}: {:?}",
                s.component,
                s.cache
            );
            assert!(entries(&cache, &s.component).is_empty());
            bypassed += 1;
        } else {
            assert_eq!(s.cache, CacheStatus::Stored, "{}", s.component);
            assert_eq!(entries(&cache, &s.component).len(), 1);
            stored += 1;
        }
    }
    assert!(bypassed >= 2 && stored >= 1, "{:?}", engine.sessions());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_or_stale_entries_fall_back_to_the_source_model() {
    let dir = scratch_dir("ep-cache-corrupt");
    let cache = dir.join("cache");
    let model = dir.join("model");
    copy_dir(&demo_model(), &model);
    let mut engine = load(&model, &cache, Vec::new());
    let reference = generate(&mut engine);
    drop(engine);

    // Same size, garbage content: ONNX Runtime refuses it; the entry is replaced.
    let [unet_entry] = &entries(&cache, "unet")[..] else {
        panic!("one unet entry: {:?}", entries(&cache, "unet"));
    };
    let cached = unet_entry.join("model.onnx");
    let len = std::fs::metadata(&cached).expect("entry").len() as usize;
    std::fs::write(&cached, vec![0xffu8; len]).expect("corrupt");
    // Truncated weights: caught by the recorded size before ONNX Runtime sees them.
    let [vae_entry] = &entries(&cache, "vae_decoder")[..] else {
        panic!("one vae entry");
    };
    let data = vae_entry.join("model.onnx.data");
    let bytes = std::fs::read(&data).expect("data");
    std::fs::write(&data, &bytes[..bytes.len() / 2]).expect("truncate");

    let mut engine = load(&model, &cache, Vec::new());
    let by_name: Vec<(String, CacheStatus)> = engine
        .sessions()
        .into_iter()
        .map(|s| (s.component, s.cache))
        .collect();
    for (component, status) in &by_name {
        match component.as_str() {
            "unet" | "vae_decoder" => assert!(
                matches!(status, CacheStatus::Rejected(_)),
                "{component}: {status:?}"
            ),
            _ => assert_eq!(*status, CacheStatus::Hit, "{component}"),
        }
    }
    assert_eq!(generate(&mut engine), reference);
    drop(engine);
    let engine = load(&model, &cache, Vec::new());
    assert!(
        statuses(&engine).iter().all(|s| *s == CacheStatus::Hit),
        "rejected entries are stored again: {:?}",
        engine.sessions()
    );
    drop(engine);

    // The model changes on disk: its entry no longer matches, a new one replaces it.
    let weights = model.join("unet").join("model.onnx_data");
    let mut bytes = std::fs::read(&weights).expect("weights");
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(&weights, &bytes).expect("append");
    let before = entries(&cache, "unet");
    let engine = load(&model, &cache, Vec::new());
    let unet = engine
        .sessions()
        .into_iter()
        .find(|s| s.component == "unet")
        .expect("unet");
    assert_eq!(unet.cache, CacheStatus::Stored);
    let after = entries(&cache, "unet");
    assert_eq!(after.len(), 1, "the stale entry is pruned: {after:?}");
    assert_ne!(before, after);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn graphs_with_lora_weights_bypass_the_cache() {
    let base = fixtures_dir().join("parity").join("sd15").join("onnx");
    let lora = fixtures_dir()
        .join("lora")
        .join("sd15")
        .join("diffusers.safetensors");
    assert!(
        base.is_dir() && lora.is_file(),
        "{} or {} is missing; run `make fixtures`",
        base.display(),
        lora.display()
    );
    let dir = scratch_dir("ep-cache-lora");
    let cache = dir.join("cache");
    let spec = LoraSpec {
        source: lora.to_string_lossy().into_owned(),
        weight: 1.0,
        weight_name: None,
    };
    let engine = load(&base, &cache, vec![spec]);
    let report = engine.lora_report();
    assert!(!report.patched.is_empty(), "the LoRA patches something");
    for s in engine.sessions() {
        if report.patched.contains_key(&s.component) {
            assert!(
                matches!(&s.cache, CacheStatus::Bypassed(why) if why.contains("LoRA")),
                "{s:?}"
            );
            assert!(entries(&cache, &s.component).is_empty());
        } else {
            assert_eq!(s.cache, CacheStatus::Stored, "{s:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
