//! Prompts through the committed tiny model's CLIP tokenizer.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tcd_ort::tokenizer::ClipTokenizer;

fn tokenizer() -> &'static ClipTokenizer {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-sd15/tokenizer");
        ClipTokenizer::from_dir(&dir).expect("the committed tokenizer loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let t = tokenizer();
    let _ = t.encode(&text);
    let _ = t.untruncated_len(&text);
    let _ = t.truncated_text(&text);
});
