//! LoRA end to end: the engine with adapters applied at load time against diffusers'
//! `load_lora_weights` + `set_adapters` (and `fuse_lora`) on the same tiny models, and the
//! export-fused model against load-time application.
//!
//! References come from `tests/golden/make_lora.py` (run by `make fixtures`).

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use serde::Deserialize;
use tcd_ort::image_io::read_npy;
use tcd_ort::pipeline::{Engine, EngineOptions, GenerateRequest, LoraSpec};

use crate::common::{fixtures_dir, ParityReport};

#[derive(Debug, Deserialize)]
struct LoraRef {
    file: String,
    weight: f32,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative_prompt: Option<String>,
    steps: usize,
    eta: f32,
    guidance: f32,
    seed: u64,
    width: usize,
    height: usize,
    loras: Vec<LoraRef>,
    #[serde(default)]
    fuse: bool,
}

fn lora_dir(family: &str) -> PathBuf {
    fixtures_dir().join("lora").join(family)
}

fn base_model(family: &str) -> String {
    fixtures_dir()
        .join("parity")
        .join(family)
        .join("onnx")
        .to_string_lossy()
        .into_owned()
}

fn request(case: &Case) -> GenerateRequest {
    GenerateRequest {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        steps: case.steps,
        eta: case.eta,
        guidance: case.guidance,
        seed: case.seed,
        width: Some(case.width),
        height: Some(case.height),
        num_images: 1,
        original_inference_steps: None,
        control: Vec::new(),
    }
}

fn relative_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn cases(family: &str) -> Vec<Case> {
    let path = lora_dir(family).join("cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; generate the LoRA fixtures with `make fixtures`",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("cases.json parses")
}

fn check_family(family: &str) {
    let dir = lora_dir(family);
    let cases = cases(family);
    assert!(
        cases.iter().any(|c| c.loras.len() > 1),
        "a multi-adapter case"
    );
    let mut report = ParityReport::default();
    for case in &cases {
        let options = EngineOptions {
            loras: case
                .loras
                .iter()
                .map(|l| LoraSpec {
                    source: dir.join(&l.file).to_string_lossy().into_owned(),
                    weight: l.weight,
                    weight_name: None,
                })
                .collect(),
            ..EngineOptions::default()
        };
        let mut engine = Engine::load(base_model(family), &options)
            .unwrap_or_else(|e| panic!("{family}/{}: {e}", case.name));
        assert!(
            engine.lora_report().patched.values().sum::<usize>() > 0,
            "{}: nothing patched",
            case.name
        );
        let out = engine
            .generate(&request(case), &mut |_| true)
            .unwrap_or_else(|e| panic!("{family}/{}: {e}", case.name));
        report.check(&out, &dir.join("reference"), &case.name);
    }
    report.finish(&format!("{family} with LoRAs"), cases.len());
}

#[test]
fn sd15_loras_at_load_time_match_diffusers() {
    check_family("sd15");
}

#[test]
fn sdxl_loras_at_load_time_match_diffusers() {
    check_family("sdxl");
}

/// The export-fused model (`convert --lora A --lora B:0.7 --fuse-lora`) and the same adapters
/// applied at load time to the unfused export give the same latents.
fn check_fused_export(family: &str) {
    let dir = lora_dir(family);
    let case = cases(family)
        .into_iter()
        .find(|c| c.loras.len() > 1 && !c.fuse)
        .expect("a multi-adapter case");
    let loaded = EngineOptions {
        loras: case
            .loras
            .iter()
            .map(|l| LoraSpec {
                source: dir.join(&l.file).to_string_lossy().into_owned(),
                weight: l.weight,
                weight_name: None,
            })
            .collect(),
        ..EngineOptions::default()
    };
    let a = Engine::load(base_model(family), &loaded)
        .expect("loads with LoRAs")
        .generate(&request(&case), &mut |_| true)
        .expect("runs");
    let fused = dir.join("fused_onnx");
    let b = Engine::load(fused.to_string_lossy(), &EngineOptions::default())
        .expect("the fused export loads")
        .generate(&request(&case), &mut |_| true)
        .expect("runs");
    let diff = relative_diff(&a.latents, &b.latents);
    eprintln!("{family}: export-fused vs load-time latents differ by {diff:e} of max");
    assert!(diff <= 1e-4, "{family}: {diff:e}");
    let pixels = a.images[0]
        .pixels
        .iter()
        .zip(&b.images[0].pixels)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0);
    assert!(pixels <= 2, "{family}: pixels differ by {pixels}/255");
}

#[test]
fn sd15_export_fused_equals_load_time() {
    check_fused_export("sd15");
}

#[test]
fn sdxl_export_fused_equals_load_time() {
    check_fused_export("sdxl");
}

/// Bad adapters are clear errors at load time, before any session is built.
#[test]
fn bad_adapters_are_clear_errors() {
    let bad = lora_dir("sd15").join("bad");
    for (file, needle) in [
        ("truncated.safetensors", "truncated.safetensors"),
        ("not_safetensors.safetensors", "not_safetensors.safetensors"),
        ("rank_mismatch.safetensors", "rank"),
        ("nan.safetensors", "NaN"),
        ("other_base.safetensors", "another base model"),
    ] {
        let options = EngineOptions {
            loras: vec![LoraSpec {
                source: bad.join(file).to_string_lossy().into_owned(),
                weight: 1.0,
                weight_name: None,
            }],
            ..EngineOptions::default()
        };
        let err = Engine::load(base_model("sd15"), &options).expect_err(file);
        assert!(err.to_string().contains(needle), "{file}: {err}");
    }
}

pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// An unfused export that records LoRAs in its manifest gets them applied at load time, the
/// same as passing them explicitly.
#[test]
fn loras_recorded_in_the_manifest_are_applied_at_load() {
    let dir = lora_dir("sd15");
    let case = cases("sd15")
        .into_iter()
        .find(|c| c.loras.len() > 1 && !c.fuse)
        .expect("a multi-adapter case");
    let model = crate::common::scratch_dir("manifest-lora").join("model");
    copy_dir(Path::new(&base_model("sd15")), &model);
    let manifest_path = model.join("tcd_ort.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("manifest"))
            .expect("json");
    manifest["lora"] = case
        .loras
        .iter()
        .map(|l| {
            serde_json::json!({
                "source": dir.join(&l.file).to_string_lossy(),
                "weight": l.weight,
                "weight_name": null,
            })
        })
        .collect();
    std::fs::write(&manifest_path, manifest.to_string()).expect("write manifest");
    let mut engine =
        Engine::load(model.to_string_lossy(), &EngineOptions::default()).expect("loads");
    assert_eq!(engine.lora_report().adapters, case.loras.len());
    let out = engine
        .generate(&request(&case), &mut |_| true)
        .expect("runs");
    let reference = read_npy(&dir.join("reference").join(format!("{}.npy", case.name)))
        .expect("reference latents");
    let diff = relative_diff(&out.latents, &reference);
    assert!(diff <= 1e-4, "{diff:e}");
}

/// Writes a diffusers-format LoRA (rank 2) for the given `(module, out, in)` linear layers.
fn write_linear_lora(path: &Path, modules: &[(&str, usize, usize)]) {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, (module, out, inp)) in modules.iter().enumerate() {
        let bytes = |n: usize, k: f32| -> Vec<u8> {
            (0..n)
                .flat_map(|j| (((j as f32) * k + i as f32).sin() * 0.5).to_le_bytes())
                .collect()
        };
        owned.push((
            format!("{module}.lora_A.weight"),
            vec![2, *inp],
            bytes(2 * inp, 0.37),
        ));
        owned.push((
            format!("{module}.lora_B.weight"),
            vec![*out, 2],
            bytes(out * 2, 0.53),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(name, shape, data)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .expect("view"),
            )
        })
        .collect();
    std::fs::write(
        path,
        safetensors::serialize(views, None).expect("serialize"),
    )
    .expect("write");
}

/// Targets that match no weight are an error listing them, unless the caller allows skipping.
#[test]
fn unmatched_targets_are_listed_or_skipped_on_request() {
    let dir = crate::common::scratch_dir("lora-unmatched");
    let file = dir.join("partial.safetensors");
    write_linear_lora(
        &file,
        &[
            (
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                64,
                64,
            ),
            (
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn9.to_q",
                64,
                64,
            ),
        ],
    );
    let mut options = EngineOptions {
        loras: vec![LoraSpec {
            source: file.to_string_lossy().into_owned(),
            weight: 1.0,
            weight_name: None,
        }],
        ..EngineOptions::default()
    };
    let err = Engine::load(base_model("sd15"), &options).expect_err("an unmatched target");
    let msg = err.to_string();
    assert!(msg.contains("attn9.to_q"), "{msg}");
    assert!(msg.contains("--lora-allow-unmatched"), "{msg}");

    options.lora_allow_unmatched = true;
    let engine = Engine::load(base_model("sd15"), &options).expect("loads, skipping one");
    let report = engine.lora_report();
    assert_eq!(report.patched.get("unet"), Some(&1));
    assert_eq!(report.unmatched.len(), 1, "{:?}", report.unmatched);
}

/// An export whose weights lost their PyTorch names (plain optimum-cli) cannot take a LoRA at
/// load time: the error says how to re-export.
#[test]
fn a_model_without_parameter_names_asks_for_a_re_export() {
    let optimum = fixtures_dir().join("optimum").join("sd15");
    assert!(
        optimum.join("model_index.json").exists(),
        "{} is missing; run `make fixtures`",
        optimum.display()
    );
    let options = EngineOptions {
        loras: vec![LoraSpec {
            source: lora_dir("sd15")
                .join("diffusers.safetensors")
                .to_string_lossy()
                .into_owned(),
            weight: 1.0,
            weight_name: None,
        }],
        ..EngineOptions::default()
    };
    let err = Engine::load(optimum.to_string_lossy(), &options).expect_err("names are gone");
    let msg = err.to_string();
    assert!(msg.contains("re-export"), "{msg}");
    assert!(msg.contains("python -m export convert"), "{msg}");
}
