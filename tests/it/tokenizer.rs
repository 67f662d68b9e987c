//! CLIP tokenizer parity with transformers' `CLIPTokenizer`.
//!
//! Expected ids come from `tests/fixtures/tokenizer.json`, written by
//! `tests/golden/make_tokenizer.py` (transformers 5.23.0, the tokenizer diffusers 0.42 loads).
//! `tests/fixtures/clip-tokenizer/sd15` holds the full save_pretrained layout; `sdxl_2` holds only
//! the configs of SDXL's `tokenizer_2` (pad `!`), whose vocabulary files are identical to sd15's.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tcd_ort::tokenizer::ClipTokenizer;
use tcd_ort::Error;

const CONFIGS: [&str; 2] = ["tokenizer_config.json", "special_tokens_map.json"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn golden() -> Value {
    let path = fixtures().join("tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run .venv/bin/python tests/golden/make_tokenizer.py",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("golden tokenizer.json is valid JSON")
}

/// A fresh directory under the system temp dir, unique per test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tcd-ort-tokenizer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Assemble a tokenizer dir from the variant's configs and sd15's vocabulary files.
fn assemble(variant: &str, files: &[&str], name: &str) -> PathBuf {
    let dir = scratch(name);
    let base = fixtures().join("clip-tokenizer");
    for f in CONFIGS {
        std::fs::copy(base.join(variant).join(f), dir.join(f)).expect("copy config");
    }
    for f in files {
        std::fs::copy(base.join("sd15").join(f), dir.join(f)).expect("copy vocabulary file");
    }
    dir
}

fn check_variant(variant: &str, files: &[&str], layout: &str) {
    let golden = golden();
    let g = &golden["variants"][variant];
    let dir = assemble(variant, files, &format!("{variant}-{layout}"));
    let tok = ClipTokenizer::from_dir(&dir).expect("load tokenizer");
    assert_eq!(tok.pad_id(), g["pad_id"].as_i64().expect("pad_id"));
    assert_eq!(tok.bos_id(), g["bos_id"].as_i64().expect("bos_id"));
    assert_eq!(tok.eos_id(), g["eos_id"].as_i64().expect("eos_id"));
    assert_eq!(
        tok.max_length() as u64,
        g["max_length"].as_u64().expect("max_length")
    );

    let cases = golden["cases"].as_object().expect("cases");
    let mut failures = Vec::new();
    for (name, text) in cases {
        let text = text.as_str().expect("case text");
        let want = &g["encodings"][name];
        let ids: Vec<i64> = want["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_i64().expect("id"))
            .collect();
        let got = tok.encode(text).expect("encode");
        if got != ids {
            failures.push(format!("{name}: {text:?}\n  want {ids:?}\n  got  {got:?}"));
        }
        let len = tok.untruncated_len(text).expect("untruncated_len");
        if len as u64 != want["untruncated_len"].as_u64().expect("untruncated_len") {
            failures.push(format!(
                "{name}: untruncated_len {len}, want {}",
                want["untruncated_len"]
            ));
        }
        let cut = tok.truncated_text(text).expect("truncated_text");
        if cut.as_deref() != want["truncated_text"].as_str() {
            failures.push(format!(
                "{name}: truncated_text {cut:?}, want {}",
                want["truncated_text"]
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "{variant} ({layout}):\n{}",
        failures.join("\n")
    );
}

#[test]
fn sd15_tokenizer_json_matches_transformers() {
    check_variant("sd15", &["tokenizer.json"], "json");
}

#[test]
fn sd15_vocab_merges_matches_transformers() {
    check_variant("sd15", &["vocab.json", "merges.txt"], "vocab");
}

#[test]
fn sdxl_tokenizer_2_tokenizer_json_matches_transformers() {
    check_variant("sdxl_2", &["tokenizer.json"], "json");
}

#[test]
fn sdxl_tokenizer_2_vocab_merges_matches_transformers() {
    check_variant("sdxl_2", &["vocab.json", "merges.txt"], "vocab");
}

#[test]
fn committed_sd15_dir_loads_directly() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("clip-tokenizer/sd15")).expect("load");
    let ids = tok.encode("a photo of a cat").expect("encode");
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert_eq!(ids.len(), 77);
    assert!(ids[7..].iter().all(|&id| id == 49407));
}

#[test]
fn truncation_keeps_bos_and_eos() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("clip-tokenizer/sd15")).expect("load");
    let text = vec!["cat"; 200].join(" ");
    let ids = tok.encode(&text).expect("encode");
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert_eq!(tok.untruncated_len(&text).expect("len"), 202);
}

#[test]
fn missing_dir_is_a_model_error() {
    let dir = fixtures().join("clip-tokenizer/does-not-exist");
    let err = ClipTokenizer::from_dir(&dir).expect_err("missing dir must fail");
    assert!(matches!(err, Error::Model { .. }), "{err}");
    assert!(err.to_string().contains("does-not-exist"), "{err}");
}

#[test]
fn missing_merges_names_the_file() {
    let dir = assemble("sd15", &["vocab.json"], "no-merges");
    let err = ClipTokenizer::from_dir(&dir).expect_err("missing merges.txt must fail");
    assert!(err.to_string().contains("merges.txt"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_tokenizer_json_names_the_file() {
    let dir = scratch("corrupt-json");
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": [1, 2").expect("write");
    let err = ClipTokenizer::from_dir(&dir).expect_err("corrupt tokenizer.json must fail");
    assert!(matches!(err, Error::Model { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_vocab_and_config_name_the_file() {
    let dir = assemble("sd15", &["merges.txt"], "corrupt-vocab");
    std::fs::write(dir.join("vocab.json"), "[\"not a map\"]").expect("write");
    let err = ClipTokenizer::from_dir(&dir).expect_err("corrupt vocab.json must fail");
    assert!(err.to_string().contains("vocab.json"), "{err}");

    std::fs::write(dir.join("tokenizer_config.json"), "not json").expect("write");
    let err = ClipTokenizer::from_dir(&dir).expect_err("corrupt config must fail");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_pad_token_is_reported() {
    let dir = assemble("sd15", &["tokenizer.json"], "bad-pad");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"pad_token": "<pad-not-in-vocab>", "model_max_length": 77}"#,
    )
    .expect("write");
    std::fs::remove_file(dir.join("special_tokens_map.json")).expect("remove");
    let err = ClipTokenizer::from_dir(&dir).expect_err("unknown pad must fail");
    assert!(err.to_string().contains("<pad-not-in-vocab>"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
