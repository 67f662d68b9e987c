//! #19: the README's table of bad inputs, row by row. Each row's command-line arguments run
//! `tcd-ort run` on the tiny model, and its C ABI calls run through the C symbols; both must
//! fail cleanly (a non-zero exit with one `error:` line; an error status with a message) with
//! the row's message. A row added to the README is a test added here.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::null_mut;

use tcd_ort::ffi::*;

use crate::common::{copy_dir, fixtures_dir, repo_root, scratch_dir, tiny_lora_bytes_scaled};

/// One row of the table.
#[derive(Debug)]
struct Row {
    input: String,
    cli: Option<String>,
    capi: Option<String>,
    message: String,
}

/// The rows between the README's `bad-inputs` markers.
fn rows() -> Vec<Row> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let start = readme
        .find("<!-- bad-inputs:begin -->")
        .expect("the README's bad-inputs table");
    let end = readme
        .find("<!-- bad-inputs:end -->")
        .expect("the table's end");
    let cell = |s: &str| {
        let s = s.trim().trim_matches('`').trim();
        (s != "—").then(|| s.to_string())
    };
    readme[start..end]
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| Input"))
        .map(|line| {
            let cells: Vec<&str> = line.trim().trim_matches('|').split(" | ").collect();
            assert_eq!(cells.len(), 4, "a row of four cells: {line}");
            Row {
                input: cells[0].trim().to_string(),
                cli: cell(cells[1]),
                capi: cell(cells[2]),
                message: cells[3].trim().to_string(),
            }
        })
        .collect()
}

/// The files and models the rows name as `{name}`, made once in a scratch directory.
struct Inputs {
    dir: PathBuf,
}

impl Inputs {
    fn make() -> Self {
        let dir = scratch_dir("bad-inputs");
        let tiny = tcd_ort::image_io::RgbImage::new(7, 7, vec![128; 7 * 7 * 3]).expect("image");
        tcd_ort::image_io::write_png(&dir.join("tiny.png"), &tiny, &[], true).expect("png");
        std::fs::write(dir.join("huge.png"), png_header(20000, 20000)).expect("huge.png");
        std::fs::create_dir_all(dir.join("a-directory")).expect("mkdir");
        std::fs::write(
            dir.join("overflow.safetensors"),
            tiny_lora_bytes_scaled(1e20),
        )
        .expect("LoRA");
        let ort = std::fs::read_dir(repo_root().join(".ort").join("lib"))
            .expect(".ort/lib (make setup-ort)")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.to_string_lossy().contains("libonnxruntime.so"))
            .expect("the library in .ort/lib");
        let bytes = std::fs::read(ort).expect("the library");
        std::fs::write(dir.join("libonnxruntime.so"), &bytes[..100_000]).expect("cut short");
        let demo = repo_root().join("models").join("tiny-sd15");
        let model = |name: &str, edit: &dyn Fn(&Path)| {
            let to = dir.join(name);
            copy_dir(&demo, &to);
            edit(&to);
        };
        model("bad-betas", &|m| {
            edit_json(&m.join("scheduler").join("scheduler_config.json"), &|j| {
                j["beta_start"] = 10.0.into();
                j["beta_end"] = (-5.0).into();
            })
        });
        model("truncated-data", &|m| {
            let data = m.join("unet").join("model.onnx_data");
            let bytes = std::fs::read(&data).expect("weights");
            std::fs::write(&data, &bytes[..1000]).expect("cut short");
        });
        model("manifest-v99", &|m| {
            edit_json(&m.join("tcd_ort.json"), &|j| {
                j["format_version"] = 99.into()
            })
        });
        model("manifest-dtype", &|m| {
            edit_json(&m.join("tcd_ort.json"), &|j| {
                j["components"]["unet"]["inputs"]["sample"]["dtype"] = "float16".into();
            })
        });
        model("manifest-shape", &|m| {
            edit_json(&m.join("tcd_ort.json"), &|j| {
                j["components"]["unet"]["inputs"]["sample"]["shape"][1] = 9.into();
            })
        });
        let adapter = fixtures_dir().join("ip_adapter").join("sdxl");
        copy_dir(
            &adapter.join("ip_plain").join("onnx"),
            &dir.join("sdxl-ip-adapter"),
        );
        Inputs { dir }
    }

    /// `text` with every `{name}` replaced by its path.
    fn expand(&self, text: &str) -> String {
        [
            ("{dir}", "a-directory"),
            ("{truncated_ort}", "libonnxruntime.so"),
            ("{tiny_png}", "tiny.png"),
            ("{huge_png}", "huge.png"),
            ("{overflow_lora}", "overflow.safetensors"),
            ("{bad_betas}", "bad-betas"),
            ("{truncated_data}", "truncated-data"),
            ("{manifest_v99}", "manifest-v99"),
            ("{manifest_dtype}", "manifest-dtype"),
            ("{manifest_shape}", "manifest-shape"),
            ("{sdxl_ip_adapter}", "sdxl-ip-adapter"),
        ]
        .iter()
        .fold(text.to_string(), |t, (name, file)| {
            t.replace(name, &self.dir.join(file).to_string_lossy())
        })
    }
}

fn edit_json(path: &Path, edit: &dyn Fn(&mut serde_json::Value)) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("JSON");
    edit(&mut json);
    std::fs::write(path, json.to_string()).expect("write");
}

/// A PNG signature and header claiming `width` x `height` RGB, and no pixels.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn run_cli(inputs: &Inputs, row: &Row, args: &str) {
    let out_png = inputs.dir.join("out.png");
    let args: Vec<String> = inputs
        .expand(args)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tcd-ort"));
    command.arg("run");
    for (flag, value) in [
        ("--model", "models/tiny-sd15"),
        ("--prompt", "a cat"),
        ("--steps", "1"),
    ] {
        if !args.iter().any(|a| a == flag) {
            command.args([flag, value]);
        }
    }
    command
        .args(["-q", "--overwrite", "--output"])
        .arg(&out_png)
        .args(&args)
        .current_dir(repo_root());
    let out = command.output().expect("the binary starts");
    let err = String::from_utf8_lossy(&out.stderr);
    let what = format!("{} ({args:?})", row.input);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert_eq!(err.lines().count(), 1, "{what}: one line: {err}");
    assert!(err.starts_with("error: "), "{what}: {err}");
    assert!(err.contains(&row.message), "{what}: {err}");
    assert!(!out_png.exists(), "{what}: no output written");
}

fn last_error() -> String {
    // SAFETY: a NULL buffer with length 0 only asks for the length; then a buffer of n + 1.
    unsafe {
        let n = tcd_last_error_message(null_mut(), 0);
        let mut buf = vec![0u8; n + 1];
        tcd_last_error_message(buf.as_mut_ptr().cast(), buf.len());
        CStr::from_bytes_until_nul(&buf)
            .expect("NUL-terminated")
            .to_string_lossy()
            .into_owned()
    }
}

/// A call of the C column: its name and arguments.
fn parse_call(call: &str) -> (&str, Vec<&str>) {
    let call = call.trim();
    match call.split_once('(') {
        Some((name, args)) => (
            name.trim(),
            args.trim_end_matches(')')
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .collect(),
        ),
        None => (call, Vec::new()),
    }
}

fn num<T: std::str::FromStr>(s: &str) -> T {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s}"))
}

/// Runs the C column's calls in order: every one but the last must succeed, the last must
/// fail with the row's message.
fn run_capi(inputs: &Inputs, row: &Row, calls: &str) {
    let calls = inputs.expand(calls);
    let calls: Vec<&str> = calls.split("; ").collect();
    let options = tcd_engine_options_new();
    let request = tcd_request_new();
    let mut engine = null_mut();
    let demo = CString::new("models/tiny-sd15").expect("no NUL");
    let prompt = CString::new("a cat").expect("no NUL");
    // SAFETY: live handles, NUL-terminated strings; every handle is freed once at the end.
    unsafe {
        tcd_engine_options_set_model(options, demo.as_ptr());
        if !row.input.contains("without a prompt") {
            tcd_request_set_prompt(request, prompt.as_ptr());
        }
        tcd_request_set_steps(request, 1);
        for (k, call) in calls.iter().enumerate() {
            let (name, args) = parse_call(call);
            let text = |i: usize| CString::new(args[i]).expect("no NUL");
            let status = match name {
                "tcd_request_set_guidance" => tcd_request_set_guidance(request, num(args[0])),
                "tcd_request_set_steps" => tcd_request_set_steps(request, num(args[0])),
                "tcd_request_set_eta" => tcd_request_set_eta(request, num(args[0])),
                "tcd_request_set_size" => tcd_request_set_size(request, num(args[0]), num(args[1])),
                "tcd_request_set_num_images" => tcd_request_set_num_images(request, num(args[0])),
                "tcd_request_set_ip_adapter_scale" => {
                    tcd_request_set_ip_adapter_scale(request, num(args[0]))
                }
                "tcd_request_set_canny_thresholds" => {
                    tcd_request_set_canny_thresholds(request, num(args[0]), num(args[1]))
                }
                "tcd_engine_options_set_threads" => {
                    tcd_engine_options_set_threads(options, num(args[0]))
                }
                "tcd_engine_options_set_limits" => {
                    tcd_engine_options_set_limits(options, num(args[0]), num(args[1]), num(args[2]))
                }
                "tcd_engine_options_set_ip_adapter" => {
                    tcd_engine_options_set_ip_adapter(options, text(0).as_ptr())
                }
                "tcd_engine_options_add_lora" => {
                    tcd_engine_options_add_lora(options, text(0).as_ptr(), num(args[1]))
                }
                "tcd_engine_new" => {
                    let model = text(0);
                    tcd_engine_options_set_model(options, model.as_ptr());
                    tcd_engine_new(options, &mut engine)
                }
                "generate" => {
                    let status = tcd_engine_new(options, &mut engine);
                    assert_eq!(
                        status,
                        tcd_status::TCD_OK,
                        "{}: {}",
                        row.input,
                        last_error()
                    );
                    let mut result = null_mut();
                    let status =
                        tcd_engine_generate(engine, request, None, null_mut(), &mut result);
                    tcd_result_free(result);
                    status
                }
                other => panic!("{}: no such call in this test: {other}", row.input),
            };
            let what = format!("{}: {call}", row.input);
            if k + 1 < calls.len() {
                assert_eq!(status, tcd_status::TCD_OK, "{what}: {}", last_error());
            } else {
                assert_ne!(status, tcd_status::TCD_OK, "{what} must fail");
                let message = last_error();
                assert!(message.contains(&row.message), "{what}: {message}");
            }
        }
        tcd_engine_free(engine);
        tcd_request_free(request);
        tcd_engine_options_free(options);
    }
}

#[test]
fn every_row_of_the_readme_table_fails_cleanly_with_its_message() {
    let rows = rows();
    assert!(rows.len() >= 20, "the table has its rows: {}", rows.len());
    let inputs = Inputs::make();
    for row in &rows {
        assert!(
            row.cli.is_some() || row.capi.is_some(),
            "{}: a row tests something",
            row.input
        );
        if let Some(args) = &row.cli {
            run_cli(&inputs, row, args);
        }
        if let Some(calls) = &row.capi {
            run_capi(&inputs, row, calls);
        }
    }
}
