//! LoRA slots (issue #3): models exported with `convert --lora-slots RANK` take LoRAs unfused,
//! and must give what diffusers gives with the same adapters loaded unfused
//! (`load_lora_weights` + `set_adapters`, no `fuse_lora`).
//!
//! Fixtures and references come from `tests/golden/make_lora_slots.py` (run by `make
//! fixtures`): a TCD-shaped diffusers-format LoRA on every slotted module (linear layers, 1x1
//! and 3x3 convs, strided down/upsampler convs, shortcuts) and a kohya (SDXL: kohya with SGM
//! block names) LoRA on the UNet and the text encoders, alone and stacked with weights
//! [1.0, 0.7], on slot exports of rank 8 (everything fits) and rank 4 (where both LoRAs touch
//! a module, 4 + 4 ranks overflow the slot and the engine fuses it).

use std::path::PathBuf;

use tcd_ort::pipeline::{Engine, EngineOptions, Generated};

use crate::common::{
    check_cases, copy_dir, fixtures_dir, max_abs, max_abs_diff, parity_model, read_cases, Loras,
};

type Case = crate::common::Case<Loras>;

fn slots_dir(family: &str) -> PathBuf {
    fixtures_dir().join("lora_slots").join(family)
}

fn cases(family: &str) -> Vec<Case> {
    read_cases(&slots_dir(family), "LoRA slot")
}

fn options(family: &str, case: &Case) -> EngineOptions {
    case.extra.engine_options(&slots_dir(family))
}

fn generate(model: &std::path::Path, options: &EngineOptions, case: &Case) -> (Engine, Generated) {
    let mut engine = Engine::load(model.to_string_lossy(), options)
        .unwrap_or_else(|e| panic!("{}/{}: {e}", model.display(), case.name));
    let out = engine
        .generate(&case.request(), &mut |_| true)
        .unwrap_or_else(|e| panic!("{}/{}: {e}", model.display(), case.name));
    (engine, out)
}

/// Every case on the rank-8 slot export: each LoRA module of the UNet goes into its slot, the
/// text encoders' are fused, and the images match diffusers' unfused adapters.
fn check_slots(family: &str) {
    let dir = slots_dir(family);
    let model = dir.join("slots_r8");
    let cases = cases(family);
    assert!(
        cases.iter().any(|c| c.extra.loras.len() > 1),
        "a multi-adapter case"
    );
    let what = format!("{family} LoRAs in rank-8 slots");
    check_cases(&what, &cases, &dir.join("reference"), |case, report| {
        let (engine, out) = generate(&model, &options(family, case), case);
        let lora = engine.lora_report();
        if !case.extra.loras.is_empty() {
            let slotted = lora.slotted.get("unet").copied().unwrap_or(0);
            if slotted == 0 {
                report.fail(format!("{}: no UNet module went into a slot", case.name));
            }
            if lora.patched.contains_key("unet") || !lora.slot_overflow.is_empty() {
                report.fail(format!(
                    "{}: UNet modules were fused on a rank-8 slot export: {:?}",
                    case.name, lora
                ));
            }
            let style = case.extra.loras.iter().any(|l| l.file.starts_with("style"));
            if style != lora.patched.contains_key("text_encoder") {
                report.fail(format!(
                    "{}: text encoder LoRAs should be fused exactly when the style LoRA is loaded: {:?}",
                    case.name, lora
                ));
            }
        }
        Ok(out)
    });
}

#[test]
fn sd15_loras_in_slots_match_diffusers_unfused() {
    check_slots("sd15");
}

#[test]
fn sdxl_loras_in_slots_match_diffusers_unfused() {
    check_slots("sdxl");
}

/// On the rank-4 slot export two rank-4 LoRAs overflow the modules both touch: those are
/// fused (and reported), the TCD LoRA's other modules still go into slots, and the result
/// still matches diffusers.
fn check_overflow(family: &str) {
    let dir = slots_dir(family);
    let model = dir.join("slots_r4");
    let multi: Vec<Case> = cases(family)
        .into_iter()
        .filter(|c| c.extra.loras.len() > 1)
        .collect();
    assert!(!multi.is_empty(), "a multi-adapter case");
    let what = format!("{family} LoRAs overflowing rank-4 slots");
    check_cases(&what, &multi, &dir.join("reference"), |case, report| {
        let (engine, out) = generate(&model, &options(family, case), case);
        let lora = engine.lora_report();
        let fused_unet = lora.patched.get("unet").copied().unwrap_or(0);
        if lora.slot_overflow.is_empty() || fused_unet != lora.slot_overflow.len() {
            report.fail(format!(
                "{}: expected the shared modules to overflow and be fused: {:?}",
                case.name, lora
            ));
        }
        if lora.slotted.get("unet").copied().unwrap_or(0) == 0 {
            report.fail(format!(
                "{}: the TCD-only modules should still go into slots",
                case.name
            ));
        }
        Ok(out)
    });
}

/// SD1.5 only: which modules overflow is decided per module, whatever the family
/// (tests/golden/make_lora_slots.py makes the rank-4 export for SD1.5 alone).
#[test]
fn sd15_slot_overflow_falls_back_to_fusing() {
    check_overflow("sd15");
}

/// Without LoRAs a slot export computes the plain export's latents (the slots are zero).
#[test]
fn empty_slots_equal_the_plain_export() {
    for family in ["sd15", "sdxl"] {
        let case = cases(family)
            .into_iter()
            .find(|c| c.extra.loras.is_empty())
            .expect("a case without LoRAs");
        let (_, slotted) = generate(
            &slots_dir(family).join("slots_r8"),
            &EngineOptions::default(),
            &case,
        );
        let (_, plain) = generate(&parity_model(family), &EngineOptions::default(), &case);
        let scale = max_abs(&plain.latents);
        let diff = max_abs_diff(&slotted.latents, &plain.latents);
        eprintln!("{family}: empty slots vs plain export: {diff:e} (max |latent| {scale})");
        assert!(diff <= 1e-6 * scale, "{family}: {diff:e} of {scale}");
        assert_eq!(slotted.images[0].pixels, plain.images[0].pixels, "{family}");
    }
}

/// The same LoRAs on the plain export (fused) and in slots agree.
#[test]
fn slots_and_fusing_agree() {
    let family = "sd15";
    let case = cases(family)
        .into_iter()
        .find(|c| c.extra.loras.len() > 1)
        .expect("a multi-adapter case");
    let options = options(family, &case);
    let (_, slotted) = generate(&slots_dir(family).join("slots_r8"), &options, &case);
    let (engine, fused) = generate(&parity_model(family), &options, &case);
    assert!(engine.lora_report().slotted.is_empty());
    let scale = max_abs(&fused.latents);
    let diff = max_abs_diff(&slotted.latents, &fused.latents);
    assert!(diff <= 1e-4 * scale, "{diff:e} of {scale}");
}

/// A manifest that promises slots the graph does not have is a clear error, not a silently
/// ignored replacement.
#[test]
fn a_slot_missing_from_the_graph_is_a_clear_error() {
    let family = "sd15";
    let case = cases(family)
        .into_iter()
        .find(|c| c.extra.loras.len() == 1)
        .expect("a single-adapter case");
    let model = crate::common::scratch_dir("lora-slot-missing").join("model");
    copy_dir(&slots_dir(family).join("slots_r8"), &model);
    let path = model.join("tcd_ort.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("manifest")).expect("json");
    manifest["lora_slots"]["unet"]["lora_a"] = "{module}.lora_down.weight".into();
    std::fs::write(&path, manifest.to_string()).expect("write manifest");
    let err = Engine::load(model.to_string_lossy(), &options(family, &case))
        .expect_err("the slot names do not exist");
    let msg = err.to_string();
    assert!(msg.contains("lora_down.weight"), "{msg}");
    assert!(msg.contains("re-export"), "{msg}");
}
