//! LoRA loading: key conversion for real-world names, `--lora` argument parsing, and the
//! engine's deltas against diffusers' own.
//!
//! The golden deltas come from `tests/golden/make_lora.py`, which loads each random LoRA with
//! diffusers' `load_lora_weights` (+ `set_adapters` for stacks), calls `fuse_lora()` and stores
//! `fused - base` for every changed parameter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use tcd_ort::lora::{
    param_aliases, parse_lora_arg, Component, LoraFormat, LoraSet, LoraSource, UnetLayout,
};

use crate::common::{fixtures_dir, scratch_dir};

fn golden_dir(family: &str) -> PathBuf {
    let dir = fixtures_dir().join("lora").join(family);
    assert!(
        dir.join("multi.json").exists(),
        "{} is missing; run `.venv/bin/python tests/golden/make_lora.py`",
        dir.display()
    );
    dir
}

fn layout(family: &str) -> UnetLayout {
    let cfg = fixtures_dir()
        .join("parity")
        .join(family)
        .join("diffusers/unet/config.json");
    UnetLayout::from_config(&cfg).unwrap_or_else(|e| panic!("{e}"))
}

/// `{"unet.<param>": (shape, values)}` of a golden deltas file.
fn read_golden(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}");
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// Compares the engine's deltas with diffusers'; returns (worst relative error, its param).
fn compare(family: &str, label: &str, sources: &[LoraSource], golden: &Path) -> (f32, String) {
    let set =
        LoraSet::load(sources, &layout(family)).unwrap_or_else(|e| panic!("{family}/{label}: {e}"));
    let deltas = set
        .deltas()
        .unwrap_or_else(|e| panic!("{family}/{label}: {e}"));
    assert_eq!(set.module_count(), deltas.len());
    let want = read_golden(golden);
    let mut got: BTreeMap<String, _> = BTreeMap::new();
    for d in deltas {
        // diffusers' state_dict names are the exports' names; take whichever alias it uses.
        let name = param_aliases(d.component, &d.param)
            .into_iter()
            .map(|p| format!("{}.{p}", d.component.as_str()))
            .find(|k| want.contains_key(k))
            .unwrap_or_else(|| format!("{}.{}", d.component.as_str(), d.param));
        got.insert(name, (d.shape, d.values));
    }
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{family}/{label}: parameter sets differ; missing {missing:?}, extra {extra:?}"
    );
    let mut worst = (0.0f32, String::new());
    for (name, (shape, want)) in &want {
        let (gshape, got) = &got[name];
        assert_eq!(gshape, shape, "{family}/{label}: {name}");
        let max = want
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let diff = want
            .iter()
            .zip(got)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let rel = diff / max;
        if rel >= worst.0 {
            worst = (rel, name.clone());
        }
    }
    println!(
        "{family}/{label}: {} params, worst relative diff {:.2e} at {}",
        want.len(),
        worst.0,
        worst.1
    );
    assert!(
        worst.0 < 1e-5,
        "{family}/{label}: {} differs by {:.2e}",
        worst.1,
        worst.0
    );
    worst
}

#[test]
fn every_format_matches_diffusers_deltas() {
    for family in ["sd15", "sdxl"] {
        let dir = golden_dir(family);
        let mut formats = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{e}")) {
            let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let Some(format) = name.strip_suffix(".safetensors") else {
                continue;
            };
            if format.ends_with(".deltas") {
                continue;
            }
            let golden = dir.join(format!("{format}.deltas.safetensors"));
            let src = [LoraSource {
                path: path.clone(),
                weight: 1.0,
            }];
            compare(family, format, &src, &golden);
            formats += 1;
        }
        assert!(formats >= 3, "{family}: only {formats} formats found");
    }
}

#[test]
fn stacked_adapters_match_set_adapters_and_fuse() {
    for family in ["sd15", "sdxl"] {
        let dir = golden_dir(family);
        let text =
            std::fs::read_to_string(dir.join("multi.json")).unwrap_or_else(|e| panic!("{e}"));
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        let sources: Vec<LoraSource> = list
            .iter()
            .map(|v| LoraSource {
                path: dir.join(v["file"].as_str().unwrap_or_default()),
                weight: v["weight"].as_f64().unwrap_or(f64::NAN) as f32,
            })
            .collect();
        compare(
            family,
            "multi",
            &sources,
            &dir.join("multi.deltas.safetensors"),
        );
    }
}

#[test]
fn formats_are_detected() {
    let dir = golden_dir("sdxl");
    for (file, want) in [
        ("diffusers", LoraFormat::Diffusers),
        ("diffusers_old", LoraFormat::DiffusersOld),
        ("kohya", LoraFormat::Kohya),
        ("kohya_sgm", LoraFormat::KohyaSgm),
    ] {
        let src = [LoraSource {
            path: dir.join(format!("{file}.safetensors")),
            weight: 1.0,
        }];
        let set = LoraSet::load(&src, &layout("sdxl")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.formats()[0].1, want, "{file}");
    }
}

fn load_err(path: &Path) -> String {
    let src = [LoraSource {
        path: path.to_path_buf(),
        weight: 1.0,
    }];
    match LoraSet::load(&src, &UnetLayout::default()).and_then(|s| s.deltas()) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_files_are_rejected_with_clear_errors() {
    for family in ["sd15", "sdxl"] {
        let bad = golden_dir(family).join("bad");
        for (file, expect) in [
            ("truncated.safetensors", "not a readable LoRA"),
            ("not_safetensors.safetensors", "not a readable LoRA"),
            ("rank_mismatch.safetensors", "rank mismatch"),
            ("nan.safetensors", "non-finite"),
        ] {
            let msg = load_err(&bad.join(file));
            println!("{family}/bad/{file}: {msg}");
            assert!(msg.contains(expect), "{family}/{file}: {msg}");
            assert!(
                msg.contains(file),
                "{family}/{file}: message does not name the file: {msg}"
            );
        }
    }
}

#[test]
fn a_lora_for_another_base_model_is_named_as_such() {
    // sd15/bad/other_base is an SDXL LoRA: its shapes do not fit the SD1.5 UNet.
    let dir = golden_dir("sd15");
    let base = read_golden(&dir.join("diffusers.deltas.safetensors"));
    let src = [LoraSource {
        path: dir.join("bad/other_base.safetensors"),
        weight: 1.0,
    }];
    let set = LoraSet::load(&src, &layout("sd15")).unwrap_or_else(|e| panic!("{e}"));
    let errors: Vec<String> = set
        .targets()
        .iter()
        .filter_map(|t| {
            let key = param_aliases(t.component, &t.param)
                .into_iter()
                .map(|p| format!("{}.{p}", t.component.as_str()))
                .find(|k| base.contains_key(k));
            // Parameters the SD1.5 golden does not touch may still exist in the model; the
            // golden only lists changed ones, so only shapes of known ones are checked.
            key.and_then(|k| t.check_base_shape(Some(&base[&k].0)).err())
                .map(|e| e.to_string())
        })
        .collect();
    assert!(!errors.is_empty(), "no shape mismatch found");
    assert!(errors[0].contains("another base model"), "{}", errors[0]);
    println!("{}", errors[0]);
}

#[test]
fn unknown_keys_are_listed() {
    let dir = scratch_dir("lora-unknown");
    let path = dir.join("weird.safetensors");
    let data = vec![0u8; 16];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &data)
        .unwrap_or_else(|e| panic!("{e}"));
    let bytes = safetensors::serialize(
        [
            ("model.diffusion_model.foo.weight", view.clone()),
            ("base_model.model.x.lora_A.weight", view),
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{e}"));
    let msg = load_err(&path);
    assert!(msg.contains("unrecognised LoRA key format"), "{msg}");
    assert!(msg.contains("model.diffusion_model.foo.weight"), "{msg}");
}

/// Writes a kohya file holding one rank-1 module per stem, converts it and returns the targets.
fn convert_kohya(stems: &[(&str, &[usize], &[usize])], lpb: usize) -> Vec<(Component, String)> {
    let dir = scratch_dir("lora-kohya");
    let path = dir.join("k.safetensors");
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (stem, down, up) in stems {
        owned.push((
            format!("{stem}.lora_down.weight"),
            down.to_vec(),
            vec![0u8; 4 * down.iter().product::<usize>()],
        ));
        owned.push((
            format!("{stem}.lora_up.weight"),
            up.to_vec(),
            vec![0u8; 4 * up.iter().product::<usize>()],
        ));
        owned.push((
            format!("{stem}.alpha"),
            vec![],
            1.0f32.to_le_bytes().to_vec(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(k, s, d)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap_or_else(|e| panic!("{e}")),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{e}"));
    let set = LoraSet::load(
        &[LoraSource { path, weight: 1.0 }],
        &UnetLayout {
            layers_per_block: lpb,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    set.targets()
        .into_iter()
        .map(|t| (t.component, t.param))
        .collect()
}

#[test]
fn sdxl_kohya_sgm_names_map_to_diffusers_modules() {
    // Names as in h1t/TCD-SDXL-LoRA's kohya export and typical SDXL style LoRAs.
    let lin: (&[usize], &[usize]) = (&[1, 8], &[8, 1]);
    let conv: (&[usize], &[usize]) = (&[1, 8, 3, 3], &[8, 1, 1, 1]);
    let stems = [
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            lin,
        ),
        (
            "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
            lin,
        ),
        (
            "lora_unet_input_blocks_7_1_transformer_blocks_1_ff_net_0_proj",
            lin,
        ),
        ("lora_unet_input_blocks_1_0_in_layers_2", conv),
        ("lora_unet_input_blocks_2_0_emb_layers_1", lin),
        ("lora_unet_input_blocks_3_0_op", conv),
        ("lora_unet_input_blocks_0_0", conv),
        ("lora_unet_middle_block_1_proj_in", lin),
        ("lora_unet_middle_block_2_out_layers_3", conv),
        ("lora_unet_output_blocks_2_2_conv", conv),
        ("lora_unet_output_blocks_5_1_proj_out", lin),
        ("lora_unet_output_blocks_0_0_skip_connection", conv),
        ("lora_unet_time_embed_0", lin),
        ("lora_unet_label_emb_0_0", lin),
        ("lora_unet_out_2", conv),
        (
            "lora_te1_text_model_encoder_layers_11_self_attn_q_proj",
            lin,
        ),
        ("lora_te2_text_model_encoder_layers_31_mlp_fc2", lin),
        ("lora_te2_text_projection", lin),
    ];
    let stems: Vec<_> = stems.iter().map(|(s, (d, u))| (*s, *d, *u)).collect();
    let got = convert_kohya(&stems, 2);
    use Component::*;
    let want: Vec<(Component, &str)> = vec![
        (Unet, "add_embedding.linear_1.weight"),
        (Unet, "conv_in.weight"),
        (Unet, "conv_out.weight"),
        (Unet, "down_blocks.0.downsamplers.0.conv.weight"),
        (Unet, "down_blocks.0.resnets.0.conv1.weight"),
        (Unet, "down_blocks.0.resnets.1.time_emb_proj.weight"),
        (
            Unet,
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        ),
        (
            Unet,
            "down_blocks.2.attentions.0.transformer_blocks.1.ff.net.0.proj.weight",
        ),
        (
            Unet,
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0.weight",
        ),
        (Unet, "mid_block.attentions.0.proj_in.weight"),
        (Unet, "mid_block.resnets.1.conv2.weight"),
        (Unet, "time_embedding.linear_1.weight"),
        (Unet, "up_blocks.0.resnets.0.conv_shortcut.weight"),
        (Unet, "up_blocks.0.upsamplers.0.conv.weight"),
        (Unet, "up_blocks.1.attentions.2.proj_out.weight"),
        (TextEncoder, "encoder.layers.11.self_attn.q_proj.weight"),
        (TextEncoder2, "text_model.encoder.layers.31.mlp.fc2.weight"),
        (TextEncoder2, "text_projection.weight"),
    ];
    let want: Vec<(Component, String)> =
        want.into_iter().map(|(c, s)| (c, s.to_string())).collect();
    assert_eq!(got, want);
}

#[test]
fn sd15_kohya_names_map_to_diffusers_modules() {
    let lin: (&[usize], &[usize]) = (&[1, 8], &[8, 1]);
    let stems = [
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
            lin,
        ),
        (
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
            lin,
        ),
        ("lora_unet_mid_block_attentions_0_proj_out", lin),
        ("lora_unet_down_blocks_1_resnets_0_time_emb_proj", lin),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", lin),
    ];
    let stems: Vec<_> = stems.iter().map(|(s, (d, u))| (*s, *d, *u)).collect();
    let got = convert_kohya(&stems, 2);
    let names: Vec<&str> = got.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(
        names,
        [
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight",
            "down_blocks.1.resnets.0.time_emb_proj.weight",
            "mid_block.attentions.0.proj_out.weight",
            "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.weight",
            "encoder.layers.0.mlp.fc1.weight",
        ]
    );
}

#[test]
fn lora_arguments_split_only_a_trailing_weight() {
    let ok = |s: &str| parse_lora_arg(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(ok("h1t/TCD-SDXL-LoRA"), ("h1t/TCD-SDXL-LoRA".into(), 1.0));
    assert_eq!(
        ok("h1t/TCD-SDXL-LoRA:0.5"),
        ("h1t/TCD-SDXL-LoRA".into(), 0.5)
    );
    assert_eq!(
        ok("style.safetensors:-1"),
        ("style.safetensors".into(), -1.0)
    );
    assert_eq!(
        ok("style.safetensors:1e-1"),
        ("style.safetensors".into(), 0.1)
    );
    assert_eq!(
        ok(r"C:\loras\x.safetensors"),
        (r"C:\loras\x.safetensors".into(), 1.0)
    );
    assert_eq!(
        ok(r"C:\loras\x.safetensors:0.7"),
        (r"C:\loras\x.safetensors".into(), 0.7)
    );
    assert_eq!(
        ok("C:/loras/x.safetensors"),
        ("C:/loras/x.safetensors".into(), 1.0)
    );
    assert!(parse_lora_arg("").is_err());
    assert!(parse_lora_arg("x.safetensors:").is_err());
    assert!(parse_lora_arg(":0.5").is_err());
    assert!(parse_lora_arg("x:1.2.3").is_err());
    // #19: a mistyped weight is named as one, not reported as a missing file.
    let message = |s: &str| parse_lora_arg(s).expect_err(s).to_string();
    assert_eq!(
        message("x.safetensors:nan"),
        "--lora x.safetensors:nan: weight must be a finite number, got nan"
    );
    assert_eq!(
        message("x.safetensors:inf"),
        "--lora x.safetensors:inf: weight must be a finite number, got inf"
    );
    assert_eq!(
        message("x.safetensors:abc"),
        "--lora x.safetensors:abc: weight abc is not a number (and no file is named \
         x.safetensors:abc)"
    );
}
