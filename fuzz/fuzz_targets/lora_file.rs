//! A LoRA `.safetensors` file's bytes: parsing, key conversion and the deltas it implies.
#![no_main]

mod common;

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tcd_ort::lora::{LoraSet, UnetLayout};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    if let Ok(set) = LoraSet::parse(path, data.to_vec(), &UnetLayout::default()) {
        common::exercise(&set);
    }
});
