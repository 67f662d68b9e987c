//! LoRAs switched on a loaded engine (issue #22, `Engine::set_loras`), as `tcd-ort serve` does
//! per request: every case of `tests/golden/make_lora_slots.py` run on ONE engine, switching
//! adapters between generations, must match diffusers' unfused adapters as a fresh load does.
//! On a rank-8 slot export the UNet keeps its session (its slots are fed at run time) and only
//! the text encoder is rebuilt, for the style LoRA's text-encoder modules; on rank 4, modules
//! that overflow their slot are fused and the UNet is rebuilt.

use std::path::{Path, PathBuf};

use tcd_ort::pipeline::{Engine, EngineOptions, LoraSpec};

use crate::common::{check_cases, fixtures_dir, read_cases, Loras};

type Case = crate::common::Case<Loras>;

fn slots_dir(family: &str) -> PathBuf {
    fixtures_dir().join("lora_slots").join(family)
}

fn specs(dir: &Path, case: &Case) -> Vec<LoraSpec> {
    case.extra.engine_options(dir).loras
}

/// The cases in order, then back in reverse: every switch direction, none -> some -> other
/// -> none.
fn round_trip(family: &str) -> Vec<Case> {
    let mut cases = read_cases(&slots_dir(family), "LoRA slot");
    let back: Vec<Case> = read_cases(&slots_dir(family), "LoRA slot")
        .into_iter()
        .rev()
        .collect();
    cases.extend(back);
    cases
}

fn check_switching(family: &str, rank: &str) {
    let dir = slots_dir(family);
    let mut engine = Engine::load(dir.join(rank).to_string_lossy(), &EngineOptions::default())
        .expect("load without LoRAs");
    let cases = round_trip(family);
    let what = format!("{family} LoRAs switched on one loaded {rank} engine");
    // Whether the previous case's adapters touched the text encoders (the style LoRA does).
    let mut text_before = false;
    check_cases(&what, &cases, &dir.join("reference"), |case, report| {
        let wanted = specs(&dir, case);
        let switch = engine.set_loras(&wanted)?;
        let text_now = case.extra.loras.iter().any(|l| l.file.starts_with("style"));
        let text_untouched = !text_before && !text_now;
        text_before = text_now;
        if rank == "slots_r8" && switch.rebuilt.iter().any(|c| c == "unet") {
            report.fail(format!(
                "{}: the UNet was rebuilt although every module fits its slot: {switch:?}",
                case.name
            ));
        }
        if text_untouched && switch.rebuilt.iter().any(|c| c.starts_with("text_encoder")) {
            report.fail(format!(
                "{}: a text encoder was rebuilt though no LoRA before or now touches it: \
                 {switch:?}",
                case.name
            ));
        }
        if !wanted.is_empty() && !switch.unchanged && switch.swapped == 0 {
            report.fail(format!(
                "{}: nothing went into the slots: {switch:?}",
                case.name
            ));
        }
        eprintln!(
            "{}: switched in {:.3}s, {} slot tensors, rebuilt {:?}",
            case.name,
            switch.elapsed.as_secs_f64(),
            switch.swapped,
            switch.rebuilt
        );
        engine.generate(&case.request(), &mut |_| true)
    });
}

#[test]
fn sd15_loras_switched_per_request_match_diffusers() {
    check_switching("sd15", "slots_r8");
}

#[test]
fn sdxl_loras_switched_per_request_match_diffusers() {
    check_switching("sdxl", "slots_r8");
}

/// Where adapters overflow a slot, the UNet is rebuilt with the fused modules: slower, the
/// same images.
#[test]
fn sd15_loras_overflowing_slots_rebuild_the_unet_and_still_match() {
    check_switching("sd15", "slots_r4");
}

/// A refused switch (an unreadable LoRA) leaves the engine with the adapters it had.
#[test]
fn a_failed_switch_keeps_the_previous_loras() {
    let family = "sd15";
    let dir = slots_dir(family);
    let cases = read_cases::<Loras>(&dir, "LoRA slot");
    let case = cases
        .iter()
        .find(|c| !c.extra.loras.is_empty())
        .expect("a case with LoRAs");
    let mut engine = Engine::load(
        dir.join("slots_r8").to_string_lossy(),
        &EngineOptions::default(),
    )
    .expect("load");
    engine.set_loras(&specs(&dir, case)).expect("switch");
    let before = engine
        .generate(&case.request(), &mut |_| true)
        .expect("run");
    let missing = LoraSpec {
        source: dir
            .join("no-such-lora.safetensors")
            .to_string_lossy()
            .into_owned(),
        weight: 1.0,
        weight_name: None,
    };
    let err = engine.set_loras(&[missing]).expect_err("missing file");
    assert!(err.to_string().contains("no-such-lora"), "{err}");
    let after = engine
        .generate(&case.request(), &mut |_| true)
        .expect("run");
    assert_eq!(before.latents, after.latents);
    // The same adapters again: nothing to do.
    let again = engine.set_loras(&specs(&dir, case)).expect("same");
    assert!(again.unchanged, "{again:?}");
}

/// `tcd_engine_set_loras`: the C entry point switches as `Engine::set_loras` does, and checks
/// its pointers.
#[test]
fn c_hosts_switch_loras_on_a_loaded_engine() {
    use std::ptr::null;

    use tcd_ort::ffi::*;

    use crate::ffi::{check, cstr, generate, new_engine, parity_request};

    let dir = slots_dir("sd15");
    let model = dir.join("slots_r8");
    let (status, engine) = new_engine(&model.to_string_lossy());
    check(status, tcd_status::TCD_OK);
    let request = parity_request();
    let tcd = cstr(&dir.join("tcd.safetensors").to_string_lossy());
    let sources = [tcd.as_ptr()];
    let weights = [0.8f32];
    let base = generate(engine, request);
    // SAFETY: live engine; arrays of one element.
    unsafe {
        check(
            tcd_engine_set_loras(engine, sources.as_ptr(), weights.as_ptr(), 1),
            tcd_status::TCD_OK,
        );
    }
    let switched = generate(engine, request);
    let mut rust = Engine::load(
        model.to_string_lossy(),
        &EngineOptions {
            loras: vec![LoraSpec {
                source: dir.join("tcd.safetensors").to_string_lossy().into_owned(),
                weight: 0.8,
                weight_name: None,
            }],
            ..EngineOptions::default()
        },
    )
    .expect("load with the LoRA");
    let loaded = rust
        .generate(&crate::ffi::rust_request(), &mut |_| true)
        .expect("run");
    let loaded: Vec<_> = loaded
        .images
        .iter()
        .map(|i| (i.width, i.height, i.pixels.clone()))
        .collect();
    assert_eq!(switched, loaded, "switched in C = loaded with the LoRA");
    assert_ne!(switched, base, "the LoRA changes the images");
    // SAFETY: live engine; NULL arrays with a count are refused, count 0 takes none.
    unsafe {
        check(
            tcd_engine_set_loras(engine, null(), weights.as_ptr(), 1),
            tcd_status::TCD_ERR_NULL_POINTER,
        );
        check(
            tcd_engine_set_loras(engine, null(), null(), 0),
            tcd_status::TCD_OK,
        );
    }
    assert_eq!(generate(engine, request), base, "back to the loaded state");
    // SAFETY: handles from their constructors, freed once.
    unsafe {
        tcd_request_free(request);
        tcd_engine_free(engine);
    }
}

/// On a model whose slots are run-time inputs, load-time LoRAs go into the slots by feeding
/// them: the UNet is built without replaced weights, so the session cache serves it (a start
/// with the TCD LoRA from the cache instead of optimising the UNet again), same images.
#[test]
fn slot_loras_at_load_keep_the_session_cache() {
    use tcd_ort::runtime::{CacheStatus, SessionCache};

    let dir = slots_dir("sd15");
    let cache = std::env::temp_dir().join(format!("tcd-ort-slot-cache-{}", std::process::id()));
    let cases = read_cases::<Loras>(&dir, "LoRA slot");
    let case = cases
        .iter()
        .find(|c| {
            !c.extra.loras.is_empty() && c.extra.loras.iter().all(|l| l.file.starts_with("tcd"))
        })
        .expect("a TCD-only case");
    let options = EngineOptions {
        session_cache: SessionCache::Dir(cache.clone()),
        ..case.extra.engine_options(&dir)
    };
    let model = dir.join("slots_r8");
    let unet_cache = |engine: &Engine| {
        engine
            .sessions()
            .into_iter()
            .find(|s| s.component == "unet")
            .map(|s| s.cache)
            .expect("a unet session")
    };
    let mut first = Engine::load(model.to_string_lossy(), &options).expect("first load");
    assert_eq!(unet_cache(&first), CacheStatus::Stored);
    let a = first.generate(&case.request(), &mut |_| true).expect("run");
    drop(first);
    let mut second = Engine::load(model.to_string_lossy(), &options).expect("second load");
    assert_eq!(unet_cache(&second), CacheStatus::Hit);
    let b = second
        .generate(&case.request(), &mut |_| true)
        .expect("run");
    assert_eq!(a.latents, b.latents);
    let _ = std::fs::remove_dir_all(&cache);
}
