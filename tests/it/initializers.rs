//! The ONNX weight table: names, shapes and values read straight from the exported files must
//! equal the diffusers weights they came from (what load-time LoRA patches rely on).

use safetensors::SafeTensors;
use tcd_ort::runtime::InitializerTable;

use crate::common::fixtures_dir;

#[test]
fn exported_unet_weights_keep_their_names_and_values() {
    let family = fixtures_dir().join("parity").join("sd15");
    let table = InitializerTable::read(&family.join("onnx").join("unet").join("model.onnx"))
        .expect("the weight table reads");
    let st_path = family
        .join("diffusers")
        .join("unet")
        .join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&st_path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make fixtures`", st_path.display()));
    let weights = SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut checked = 0;
    for (name, view) in weights.tensors() {
        let init = table
            .get(&name)
            .unwrap_or_else(|| panic!("parameter {name} has no initializer of that name"));
        assert!(init.is_external(), "{name} lives in external data");
        assert_eq!(init.dims, view.shape(), "{name}: shape");
        let values = table.read_f32(init).expect("reads");
        let expected: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(values, expected, "{name}: values");
        checked += 1;
    }
    assert!(checked > 100, "only {checked} parameters checked");
}
