//! Criterion benches of CLIP tokenisation with the real SD1.5 tokenizer
//! (`tests/fixtures/clip-tokenizer/sd15`, the `save_pretrained` layout diffusers pipelines ship):
//! loading it, and encoding a short prompt, a typical one and one past the 77-token limit (the
//! truncation path), as the engine does once per prompt and image batch.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion};
use tcd_ort::tokenizer::ClipTokenizer;

const SHORT: &str = "a photo of a cat";
const TYPICAL: &str = "A cinematic shot of a baby racoon wearing an intricate italian priest robe.";
const LONG: &str = "Painting of the orange cat Otto von Garfield, Count of Bismarck-Schönhausen, \
    Duke of Lauenburg, Minister-President of Prussia. Depicted wearing a Prussian Pickelhaube and \
    eating his favorite meal - lasagna. Painting of the orange cat Otto von Garfield, Count of \
    Bismarck-Schönhausen, Duke of Lauenburg, Minister-President of Prussia. Depicted wearing a \
    Prussian Pickelhaube and eating his favorite meal - lasagna.";

/// The committed tokenizer fixture; a clear message instead of a bench of nothing when absent.
fn fixture() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tokenizer/sd15");
    let missing: Vec<&str> = ["tokenizer_config.json", "vocab.json", "merges.txt"]
        .into_iter()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "the CLIP tokenizer fixture {} lacks {}: it is committed with the repository \
             (tests/fixtures/clip-tokenizer/sd15); restore it with `git checkout -- tests/fixtures`",
            dir.display(),
            missing.join(", ")
        );
        std::process::exit(1);
    }
    dir
}

fn load(tokenizer_dir: &Path) -> ClipTokenizer {
    match ClipTokenizer::from_dir(tokenizer_dir) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("loading {}: {e}", tokenizer_dir.display());
            std::process::exit(1);
        }
    }
}

fn tokenizer(c: &mut Criterion) {
    let dir = fixture();
    c.bench_function("load clip tokenizer (sd15)", |b| {
        b.iter(|| black_box(load(black_box(&dir))))
    });
    let tok = load(&dir);
    for (name, text) in [("short", SHORT), ("typical", TYPICAL), ("truncated", LONG)] {
        c.bench_function(&format!("encode {name} prompt"), |b| {
            b.iter(|| match tok.encode(black_box(text)) {
                Ok(ids) => black_box(ids),
                Err(e) => panic!("encode: {e}"),
            })
        });
    }
}

criterion_group!(benches, tokenizer);
criterion_main!(benches);
