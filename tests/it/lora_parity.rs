//! LoRA end to end: the engine with adapters applied at load time against diffusers'
//! `load_lora_weights` + `set_adapters` (and `fuse_lora`) on the same tiny models, and the
//! export-fused model against load-time application.
//!
//! References come from `tests/golden/make_lora.py` (run by `make fixtures`).

use std::path::{Path, PathBuf};

use tcd_ort::image_io::read_npy;
use tcd_ort::pipeline::{Engine, EngineOptions, LoraSpec};

use crate::common::{
    check_cases, copy_dir, fixtures_dir, max_pixel_diff, parity_model, read_cases, relative_diff,
    Loras,
};

type Case = crate::common::Case<Loras>;

fn lora_dir(family: &str) -> PathBuf {
    fixtures_dir().join("lora").join(family)
}

fn base_model(family: &str) -> String {
    parity_model(family).to_string_lossy().into_owned()
}

fn cases(family: &str) -> Vec<Case> {
    read_cases(&lora_dir(family), "LoRA")
}

fn check_family(family: &str) {
    let dir = lora_dir(family);
    let cases = cases(family);
    assert!(
        cases.iter().any(|c| c.extra.loras.len() > 1),
        "a multi-adapter case"
    );
    let model = base_model(family);
    check_cases(
        &format!("{family} with LoRAs"),
        &cases,
        &dir.join("reference"),
        |case, _| {
            let mut engine = Engine::load(&model, &case.extra.engine_options(&dir))
                .unwrap_or_else(|e| panic!("{family}/{}: {e}", case.name));
            assert!(
                engine.lora_report().patched.values().sum::<usize>() > 0,
                "{}: nothing patched",
                case.name
            );
            engine.generate(&case.request(), &mut |_| true)
        },
    );
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
        .find(|c| c.extra.loras.len() > 1 && !c.extra.fuse)
        .expect("a multi-adapter case");
    let a = Engine::load(base_model(family), &case.extra.engine_options(&dir))
        .expect("loads with LoRAs")
        .generate(&case.request(), &mut |_| true)
        .expect("runs");
    let fused = dir.join("fused_onnx");
    let b = Engine::load(fused.to_string_lossy(), &EngineOptions::default())
        .expect("the fused export loads")
        .generate(&case.request(), &mut |_| true)
        .expect("runs");
    let diff = relative_diff(&a.latents, &b.latents);
    eprintln!("{family}: export-fused vs load-time latents differ by {diff:e} of max");
    assert!(diff <= 1e-4, "{family}: {diff:e}");
    let pixels = max_pixel_diff(&a.images[0].pixels, &b.images[0].pixels);
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

/// An unfused export that records LoRAs in its manifest gets them applied at load time, the
/// same as passing them explicitly.
#[test]
fn loras_recorded_in_the_manifest_are_applied_at_load() {
    let dir = lora_dir("sd15");
    let case = cases("sd15")
        .into_iter()
        .find(|c| c.extra.loras.len() > 1 && !c.extra.fuse)
        .expect("a multi-adapter case");
    let model = crate::common::scratch_dir("manifest-lora").join("model");
    copy_dir(&parity_model("sd15"), &model);
    let manifest_path = model.join("tcd_ort.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("manifest"))
            .expect("json");
    manifest["lora"] = case
        .extra
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
    assert_eq!(engine.lora_report().adapters, case.extra.loras.len());
    let out = engine
        .generate(&case.request(), &mut |_| true)
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
