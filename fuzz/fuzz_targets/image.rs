//! An input image's bytes (PNG or JPEG), decoded to RGB as the engine takes it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = tcd_ort::image_io::decode_image(data) {
        let _ = tcd_ort::image_io::to_grayscale(&image);
    }
});
