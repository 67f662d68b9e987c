//! A `.npy` file's bytes (latents given on the command line).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tcd_ort::image_io::parse_npy(Path::new("fuzz.npy"), data);
});
