//! Issue #19: hostile files and C hosts. A crafted model, `.npy` or LoRA file must be refused
//! with a message, never read files outside the model, allocate what it merely announces, or
//! crash; integer LoRA alphas load as in diffusers.

use std::path::Path;

use tcd_ort::lora::{LoraSet, LoraSource, UnetLayout};
use tcd_ort::runtime::{Graph, InitializerTable, SessionOptions};

use crate::common::scratch_dir;

/// Minimal protobuf writing: just what an ONNX file with one initializer needs.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn int_field(field: u64, v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(field << 3, &mut out);
    varint(v, &mut out);
    out
}

fn bytes_field(field: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint((field << 3) | 2, &mut out);
    varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// A float32 `TensorProto` named `W` of shape `dims` whose data lives at `location` (`length`
/// bytes, when given).
fn external_tensor(dims: &[u64], location: &str, length: Option<u64>) -> Vec<u8> {
    let mut t = Vec::new();
    for &d in dims {
        t.extend(int_field(1, d));
    }
    t.extend(int_field(2, 1));
    t.extend(bytes_field(8, b"W"));
    let mut entry = bytes_field(1, b"location");
    entry.extend(bytes_field(2, location.as_bytes()));
    t.extend(bytes_field(13, &entry));
    if let Some(length) = length {
        let mut entry = bytes_field(1, b"length");
        entry.extend(bytes_field(2, length.to_string().as_bytes()));
        t.extend(bytes_field(13, &entry));
    }
    t.extend(int_field(14, 1));
    t
}

/// A model whose graph outputs the initializer `W` (float32, 4 values) through an Identity.
fn identity_model(tensor: &[u8]) -> Vec<u8> {
    let mut node = bytes_field(1, b"W");
    node.extend(bytes_field(2, b"Y"));
    node.extend(bytes_field(4, b"Identity"));
    let dim = bytes_field(1, &int_field(1, 4));
    let mut tensor_type = int_field(1, 1);
    tensor_type.extend(bytes_field(2, &dim));
    let mut output = bytes_field(1, b"Y");
    output.extend(bytes_field(2, &bytes_field(1, &tensor_type)));
    let mut graph = bytes_field(1, &node);
    graph.extend(bytes_field(2, b"g"));
    graph.extend(bytes_field(5, tensor));
    graph.extend(bytes_field(12, &output));
    let mut model = int_field(1, 8);
    model.extend(bytes_field(8, &int_field(2, 17)));
    model.extend(bytes_field(7, &graph));
    model
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A model directory beside a `secret.bin` it must not read; returns (dir, model path).
fn model_dir(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let root = scratch_dir(name);
    let values: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write(&root.join("secret.bin"), &values);
    let dir = root.join("model");
    std::fs::create_dir_all(&dir).expect("model dir");
    write(&dir.join("inside.bin"), &values);
    let model = dir.join("model.onnx");
    (root, model)
}

#[test]
fn issue_19_external_data_leaving_the_model_directory_is_refused() {
    let (root, model) = model_dir("hostile-location");
    let dir = model.parent().expect("model dir").to_path_buf();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(root.join("secret.bin"), dir.join("link.bin")).expect("link");
        std::os::unix::fs::symlink(&root, dir.join("up")).expect("link");
    }
    let secret = root.join("secret.bin").to_string_lossy().into_owned();
    let mut hostile = vec!["../secret.bin", "./../secret.bin", secret.as_str(), ""];
    if cfg!(unix) {
        hostile.extend(["link.bin", "up/secret.bin"]);
    }
    for location in hostile {
        write(
            &model,
            &identity_model(&external_tensor(&[4], location, None)),
        );
        let err = InitializerTable::read(&model)
            .err()
            .unwrap_or_else(|| panic!("'{location}' was accepted"))
            .to_string();
        assert!(err.contains(&*model.to_string_lossy()), "{err}");
        assert!(err.contains(&format!("'{location}'")), "{err}");
        assert!(err.contains("outside the model's directory"), "{err}");
    }
    write(
        &model,
        &identity_model(&external_tensor(&[4], "inside.bin", None)),
    );
    let table = InitializerTable::read(&model).unwrap_or_else(|e| panic!("{e}"));
    let w = table.get("W").expect("W");
    assert_eq!(table.read_f32(w).ok(), Some(vec![1.0, 2.0, 3.0, 4.0]));
}

/// ONNX Runtime 1.31 refuses the same locations itself when a session is built, so the
/// engine's sessions never read them either.
#[test]
fn issue_19_onnx_runtime_refuses_external_data_outside_the_model_directory() {
    tcd_ort::runtime::ensure_loaded(None).expect("ONNX Runtime loads");
    let (_, model) = model_dir("hostile-location-ort");
    write(
        &model,
        &identity_model(&external_tensor(&[4], "inside.bin", None)),
    );
    Graph::load("g", &model, &SessionOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    write(
        &model,
        &identity_model(&external_tensor(&[4], "../secret.bin", None)),
    );
    let err = Graph::load("g", &model, &SessionOptions::default())
        .err()
        .unwrap_or_else(|| panic!("ONNX Runtime accepted ../secret.bin"))
        .to_string();
    assert!(err.contains("escapes model directory"), "{err}");
}

#[test]
fn issue_19_initializer_sizes_are_checked_before_allocating() {
    let (_, model) = model_dir("hostile-sizes");
    for (dims, length, expect) in [
        // The element count overflows usize.
        (vec![1u64 << 62, 16], None, "does not fit its shape"),
        // 2^40 floats announced, 16 bytes on disk: refused before 4 TiB are allocated.
        (
            vec![1u64 << 40],
            Some(4u64 << 40),
            "runs past the end of the file",
        ),
        (vec![1u64 << 40], None, "runs past the end of the file"),
        // The byte count overflows.
        (vec![1u64 << 62], None, "does not fit its shape"),
    ] {
        write(
            &model,
            &identity_model(&external_tensor(&dims, "inside.bin", length)),
        );
        let table = InitializerTable::read(&model).unwrap_or_else(|e| panic!("{e}"));
        let w = table.get("W").expect("W");
        let err = table
            .read_f32(w)
            .err()
            .unwrap_or_else(|| panic!("{dims:?} was accepted"))
            .to_string();
        assert!(err.contains(expect), "{dims:?}: {err}");
    }
}

/// A `.npy` header announcing more than the file holds, with the given shape.
fn npy(shape: &str, data: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    header.push_str(&" ".repeat((64 - (10 + header.len() + 1) % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn issue_19_npy_sizes_are_checked_before_allocating() {
    let path = Path::new("crafted.npy");
    let four = [0u8; 16];
    for (bytes, expect) in [
        (npy("(1099511627776,)", &four), "needs 4398046511104 bytes"),
        (
            npy("(4611686018427387904, 16)", &four),
            "more than addressable",
        ),
        (npy("(2, 3)", &four), "needs 24 bytes but the file holds 16"),
        // A version-2 header announcing 4 GiB of header in a 12-byte file.
        (
            b"\x93NUMPY\x02\x00\xff\xff\xff\xff".to_vec(),
            "the header runs past the end",
        ),
    ] {
        let err = tcd_ort::image_io::parse_npy(path, &bytes)
            .err()
            .unwrap_or_else(|| panic!("accepted"))
            .to_string();
        assert!(err.contains(expect), "{err}");
        assert!(err.contains("crafted.npy"), "{err}");
    }
    let ok = tcd_ort::image_io::parse_npy(path, &npy("(2, 2)", &four)).expect("reads");
    assert_eq!(ok.shape(), [2, 2]);
}

/// A kohya LoRA (one rank-2 module) with its alpha stored as `dtype` bytes.
fn kohya_lora(dir: &Path, name: &str, dtype: safetensors::Dtype, alpha: &[u8]) -> LoraSource {
    let stem = "lora_unet_mid_block_attentions_0_proj_out";
    let down: Vec<u8> = (0..16)
        .flat_map(|i| (i as f32 * 0.25).to_le_bytes())
        .collect();
    let up: Vec<u8> = (0..16)
        .flat_map(|i| (1.0 - i as f32).to_le_bytes())
        .collect();
    let view = |dtype, shape: Vec<usize>, data| {
        safetensors::tensor::TensorView::new(dtype, shape, data).unwrap_or_else(|e| panic!("{e}"))
    };
    let tensors = [
        (
            format!("{stem}.lora_down.weight"),
            view(safetensors::Dtype::F32, vec![2, 8], &down),
        ),
        (
            format!("{stem}.lora_up.weight"),
            view(safetensors::Dtype::F32, vec![8, 2], &up),
        ),
        (format!("{stem}.alpha"), view(dtype, vec![], alpha)),
    ];
    let bytes = safetensors::serialize(tensors, None).unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join(name);
    write(&path, &bytes);
    LoraSource { path, weight: 1.0 }
}

fn deltas(source: LoraSource) -> Vec<f32> {
    let set = LoraSet::load(&[source], &UnetLayout::default()).unwrap_or_else(|e| panic!("{e}"));
    let deltas = set.deltas().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(deltas.len(), 1);
    deltas[0].values.clone()
}

/// diffusers' `convert_state_dict_to_kohya` writes alphas as int64 scalars, and diffusers
/// loads them; so does the engine, with the same scale as a float alpha.
#[test]
fn issue_19_kohya_integer_alphas_load_like_float_ones() {
    use safetensors::Dtype;
    let dir = scratch_dir("hostile-int-alpha");
    let expected = deltas(kohya_lora(
        &dir,
        "f32.safetensors",
        Dtype::F32,
        &8.0f32.to_le_bytes(),
    ));
    let half = deltas(kohya_lora(
        &dir,
        "f32-half.safetensors",
        Dtype::F32,
        &4.0f32.to_le_bytes(),
    ));
    assert_ne!(expected, half, "the alpha matters");
    for (dtype, bytes) in [
        (Dtype::I64, 8i64.to_le_bytes().to_vec()),
        (Dtype::I32, 8i32.to_le_bytes().to_vec()),
        (Dtype::I16, 8i16.to_le_bytes().to_vec()),
        (Dtype::I8, vec![8]),
        (Dtype::U64, 8u64.to_le_bytes().to_vec()),
        (Dtype::U32, 8u32.to_le_bytes().to_vec()),
        (Dtype::U16, 8u16.to_le_bytes().to_vec()),
        (Dtype::U8, vec![8]),
        (Dtype::F64, 8f64.to_le_bytes().to_vec()),
        (Dtype::F16, half::f16::from_f32(8.0).to_le_bytes().to_vec()),
        (
            Dtype::BF16,
            half::bf16::from_f32(8.0).to_le_bytes().to_vec(),
        ),
    ] {
        let got = deltas(kohya_lora(
            &dir,
            &format!("{dtype:?}.safetensors"),
            dtype,
            &bytes,
        ));
        assert_eq!(got, expected, "{dtype:?}");
    }
    // A negative integer alpha keeps its sign.
    let negative = deltas(kohya_lora(
        &dir,
        "neg.safetensors",
        Dtype::I64,
        &(-8i64).to_le_bytes(),
    ));
    assert_eq!(negative, expected.iter().map(|v| -v).collect::<Vec<_>>());
}

/// Integer tensors other than alphas are still refused, and every LoRA load error names the
/// file as a LoRA, not as a model.
#[test]
fn issue_19_lora_errors_name_the_lora_file() {
    let dir = scratch_dir("hostile-lora-errors");
    let garbage = dir.join("garbage.safetensors");
    write(&garbage, b"hello world, not a file");
    let empty = dir.join("empty.safetensors");
    write(
        &empty,
        &safetensors::serialize(
            Vec::<(String, safetensors::tensor::TensorView<'_>)>::new(),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let int_weight = dir.join("int-weight.safetensors");
    let data = [0u8; 16];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![2, 2], &data)
        .unwrap_or_else(|e| panic!("{e}"));
    write(
        &int_weight,
        &safetensors::serialize([("lora_unet_x.lora_down.weight", view)], None)
            .unwrap_or_else(|e| panic!("{e}")),
    );
    for (path, expect) in [
        (&garbage, "not a readable LoRA"),
        (&empty, "holds no tensors"),
        (&int_weight, "dtype I32"),
    ] {
        let err = LoraSet::load(
            &[LoraSource {
                path: path.clone(),
                weight: 1.0,
            }],
            &UnetLayout::default(),
        )
        .err()
        .unwrap_or_else(|| panic!("{} was accepted", path.display()))
        .to_string();
        let prefix = format!("LoRA {}: ", path.display());
        assert!(err.starts_with(&prefix), "{err}");
        assert!(err.contains(expect), "{err}");
    }
}

mod ffi {
    use std::ffi::{c_int, c_void};
    use std::ptr::null_mut;

    use tcd_ort::ffi::*;

    use crate::ffi::{check, demo_engine, last_error};

    unsafe extern "C-unwind" fn panics(_: *mut c_void, _: u32, _: u32) -> c_int {
        panic!("the host's callback unwinds");
    }

    /// A callback that unwinds is caught at the boundary (`TCD_ERR_PANIC`), and the engine it
    /// ran on refuses every later call instead of running on half-updated state.
    #[test]
    fn issue_19_an_unwinding_callback_poisons_the_engine() {
        let engine = demo_engine();
        let request = tcd_request_new();
        // SAFETY: a live request and a NUL-terminated string.
        unsafe { tcd_request_set_prompt(request, c"a cat".as_ptr()) };
        let mut result = null_mut();
        // SAFETY: live handles throughout; the callback ignores its user data.
        unsafe {
            check(tcd_request_set_steps(request, 2), tcd_status::TCD_OK);
            check(
                tcd_engine_generate(engine, request, Some(panics), null_mut(), &mut result),
                tcd_status::TCD_ERR_PANIC,
            );
            assert!(result.is_null());
            assert!(last_error().contains("unwinds"), "{}", last_error());
            check(
                tcd_engine_generate(engine, request, None, null_mut(), &mut result),
                tcd_status::TCD_ERR_POISONED,
            );
            assert!(result.is_null());
            assert!(last_error().contains("free it"), "{}", last_error());
            assert_eq!(tcd_engine_session_summary(engine, null_mut(), 0), 0);
            tcd_request_free(request);
            tcd_engine_free(engine);
        }
    }

    /// A (pointer, length) pair past `isize::MAX` bytes is refused before any slice is built.
    #[test]
    fn issue_19_image_buffers_past_isize_max_are_refused() {
        let request = tcd_request_new();
        // SAFETY: a live request and a NUL-terminated string.
        unsafe { tcd_request_set_prompt(request, c"a cat".as_ptr()) };
        let pixels = [0u8; 8];
        let stride = isize::MAX as usize + 1;
        // SAFETY: a live request; the call must fail before reading past `pixels`.
        unsafe {
            check(
                tcd_request_set_image(request, pixels.as_ptr(), 1, 2, stride),
                tcd_status::TCD_ERR_INVALID_ARGUMENT,
            );
            assert!(last_error().contains("too large"), "{}", last_error());
            check(
                tcd_request_set_mask(request, pixels.as_ptr(), 1, 2, stride),
                tcd_status::TCD_ERR_INVALID_ARGUMENT,
            );
            tcd_request_free(request);
        }
    }
}

/// A copy of the tiny model's JSON files (graphs empty: opening reads none) with `edit`
/// applied to (file, JSON) pairs.
fn model_with(name: &str, edit: impl Fn(&str, &mut serde_json::Value)) -> std::path::PathBuf {
    let from = std::path::PathBuf::from(crate::common::committed_model("tiny-sd15"));
    let dir = scratch_dir(name);
    for file in [
        "model_index.json",
        "unet/config.json",
        "vae_decoder/config.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
    ] {
        let text = std::fs::read_to_string(from.join(file)).unwrap_or_else(|e| panic!("{e}"));
        let mut json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        edit(file, &mut json);
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("component dir");
        write(&path, json.to_string().as_bytes());
    }
    for graph in ["text_encoder", "unet", "vae_decoder"] {
        write(&dir.join(graph).join("model.onnx"), b"");
    }
    dir
}

/// Sizes from configs are products and shifts: a crafted VAE or UNet config is refused when
/// the model opens, instead of overflowing when an image size is derived from it.
#[test]
fn issue_19_config_sizes_that_overflow_are_refused() {
    use tcd_ort::model::ModelDir;
    let plain = model_with("hostile-config-plain", |_, _| {});
    let model = ModelDir::open(&plain).unwrap_or_else(|e| panic!("{e}"));
    assert!(model.default_image_size() > 0);
    let deep_vae = model_with("hostile-config-vae", |file, json| {
        if file == "vae_decoder/config.json" {
            json["block_out_channels"] = serde_json::json!(vec![4; 65]);
        }
    });
    let huge_sample = model_with("hostile-config-unet", |file, json| {
        if file == "unet/config.json" {
            json["sample_size"] = serde_json::json!(1u64 << 62);
        }
    });
    for (dir, expect) in [
        (deep_vae, "at most 16"),
        (huge_sample, "sample_size times the VAE's scale factor"),
    ] {
        let err = ModelDir::open(&dir)
            .err()
            .unwrap_or_else(|| panic!("{} was accepted", dir.display()))
            .to_string();
        assert!(err.contains(expect), "{err}");
    }
}

/// A scheduler config's `num_train_timesteps` sizes the noise schedule: refused past
/// `MAX_TRAIN_TIMESTEPS` instead of allocating what it announces.
#[test]
fn issue_19_scheduler_configs_cannot_ask_for_terabytes() {
    use tcd_ort::sampler::tcd::{TcdConfig, TcdScheduler, MAX_TRAIN_TIMESTEPS};
    let text = format!("{{\"num_train_timesteps\": {}}}", 1u64 << 40);
    let config = TcdConfig::from_json(&text).unwrap_or_else(|e| panic!("{e}"));
    let err = TcdScheduler::new(config)
        .err()
        .unwrap_or_else(|| panic!("2^40 training timesteps were accepted"))
        .to_string();
    assert!(err.contains("num_train_timesteps"), "{err}");
    let config = TcdConfig {
        num_train_timesteps: MAX_TRAIN_TIMESTEPS,
        ..TcdConfig::default()
    };
    assert!(TcdScheduler::new(config).is_ok());
}
