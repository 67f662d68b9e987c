//! An input image's bytes (PNG or JPEG), decoded to RGB as the engine takes it.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = tcd_ort::image_io::decode_image(Path::new("fuzz.png"), data) {
        let _ = tcd_ort::image_io::to_grayscale(&image);
    }
});
