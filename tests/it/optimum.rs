//! Plain `optimum-cli export onnx` output loads as-is and generates what diffusers generates.
//!
//! `tests/golden/make_optimum.py` (run by `make fixtures`, in the optimum-onnx 0.1.0 environment of
//! `export/requirements-optimum.txt`) exports the tiny parity pipelines with
//! `optimum-cli export onnx --task text-to-image` into `optimum/<family>/`, untouched: no
//! `tcd_ort.json`, tokenizers as `vocab.json` + `merges.txt`, int64 `input_ids` with a dynamic
//! sequence length, a scalar float `timestep`, and `hidden_states.N` outputs on both SDXL encoders.
//! The weights are the parity pipelines' own, so the references are diffusers' outputs in
//! `parity/<family>/reference/` (from `tests/golden/make_parity.py`), held to the parity tests'
//! tolerances: latents within 1e-4 of their largest magnitude, pixels within 2/255.

use std::path::PathBuf;

use tcd_ort::pipeline::{Engine, EngineOptions};

use crate::common::{check_cases, fixtures_dir, read_cases, Case};

/// A few parity cases that between them cover: one step without guidance at a non-square size,
/// several steps with guidance (a batch of two through a scalar timestep), a negative prompt, two
/// images per prompt, and a prompt long enough to be truncated.
fn wanted(case: &Case) -> bool {
    let square = case.width == case.height;
    let single = case.steps == 1 && case.eta == 0.0 && case.guidance == 0.0 && !square;
    let guided = case.steps == 4 && case.eta == 0.3 && case.guidance == 2.0 && square;
    single
        || guided
        || matches!(
            case.name.as_str(),
            "negative_prompt" | "two_images" | "unicode_long_prompt"
        )
}

fn check_family(family: &str) {
    let optimum: PathBuf = fixtures_dir().join("optimum").join(family);
    let parity = fixtures_dir().join("parity").join(family);
    assert!(
        optimum.join("model_index.json").is_file(),
        "{}: no optimum export; generate the fixtures with `make fixtures`",
        optimum.display()
    );
    let cases: Vec<Case> = read_cases(&parity, "parity");
    let cases: Vec<Case> = cases.into_iter().filter(wanted).collect();
    assert!(cases.len() >= 5, "{family}: expected parity cases missing");

    let mut engine = Engine::load(optimum.to_string_lossy(), &EngineOptions::default())
        .unwrap_or_else(|e| panic!("{family}: the optimum export does not load: {e}"));
    assert!(
        engine.model().manifest().is_none(),
        "{family}: the optimum export must be tested as-is, without a tcd_ort.json"
    );
    check_cases(
        &format!("{family} (optimum-cli export)"),
        &cases,
        &parity.join("reference"),
        |case, _| engine.generate(&case.request(), &mut |_| true),
    );
}

#[test]
fn sd15_optimum_export_matches_diffusers() {
    check_family("sd15");
}

#[test]
fn sdxl_optimum_export_matches_diffusers() {
    check_family("sdxl");
}
