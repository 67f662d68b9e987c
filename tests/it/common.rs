//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where `make fixtures` writes generated fixtures (tiny models, diffusers references).
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("TCD_ORT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests").join("fixtures").join("generated"))
}

/// Decodes an 8-bit RGB or RGBA PNG into (width, height, RGB bytes).
pub fn read_png_rgb(path: &Path) -> (u32, u32, Vec<u8>) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

/// A fresh empty directory under the target dir for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = repo_root()
        .join("target")
        .join("test-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}
