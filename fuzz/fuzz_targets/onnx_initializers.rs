//! An `.onnx` file's bytes: the initializer table, every initializer's values (embedded or
//! external), and the declared inputs, all read without ONNX Runtime.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tcd_ort::runtime::{declared_inputs, InitializerTable};

/// A model directory of this process, with an external data file the inputs may point into.
fn model_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tcd-ort-fuzz-onnx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let data: Vec<u8> = (0..4096u32)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        std::fs::write(dir.join("model.onnx_data"), data).expect("external data");
        dir.join("model.onnx")
    })
}

fuzz_target!(|data: &[u8]| {
    let model = model_path();
    if std::fs::write(model, data).is_err() {
        return;
    }
    if let Ok(table) = InitializerTable::read(model) {
        let names: Vec<String> = table.names().map(str::to_string).collect();
        for name in names {
            if let Some(init) = table.get(&name) {
                let _ = table.read_f32(init);
            }
        }
    }
    let _ = declared_inputs(model);
});
