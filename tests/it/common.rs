//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where `make fixtures` writes generated fixtures (tiny models, diffusers references).
/// A model committed under `models/` (the tiny demo models), as the path string engines take.
pub fn committed_model(name: &str) -> String {
    repo_root()
        .join("models")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

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

/// Worst differences against diffusers' references over a set of cases, and every case that
/// broke a bound, so one run reports all failures at once.
#[derive(Debug, Default)]
pub struct ParityReport {
    /// Largest latent difference, relative to the reference's largest magnitude.
    pub worst_latent: f32,
    /// Largest per-channel pixel difference.
    pub worst_pixel: u8,
    /// What went wrong, one line per case.
    pub failures: Vec<String>,
}

impl ParityReport {
    /// Records a case that could not run.
    pub fn fail(&mut self, message: String) {
        self.failures.push(message);
    }

    /// Compares a generation with diffusers' `<dir>/<name>.npy` (final latents) and
    /// `<name>.png` (`<name>_<i>.png` for several images): latents within 1e-4 of the
    /// reference's largest magnitude, pixels within 2/255.
    pub fn check(&mut self, out: &tcd_ort::pipeline::Generated, dir: &Path, name: &str) {
        let reference = match tcd_ort::image_io::read_npy(&dir.join(format!("{name}.npy"))) {
            Ok(r) => r,
            Err(e) => return self.fail(format!("{e}; run `make fixtures`")),
        };
        if reference.shape() != out.latents.shape() {
            return self.fail(format!(
                "{name}: latent shape {:?} vs diffusers {:?}",
                out.latents.shape(),
                reference.shape()
            ));
        }
        let scale = reference
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(1e-12);
        let diff = out
            .latents
            .iter()
            .zip(reference.iter())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        self.worst_latent = self.worst_latent.max(diff);
        if diff > 1e-4 || diff.is_nan() {
            self.fail(format!("{name}: latents differ by {diff:e} of max"));
        }
        let several = out.images.len() > 1;
        for (i, image) in out.images.iter().enumerate() {
            let png = if several {
                format!("{name}_{i}.png")
            } else {
                format!("{name}.png")
            };
            let (w, h, pixels) = read_png_rgb(&dir.join(&png));
            if (w, h) != (image.width, image.height) {
                self.fail(format!(
                    "{png}: size {}x{} vs diffusers {w}x{h}",
                    image.width, image.height
                ));
                continue;
            }
            let max = pixels
                .iter()
                .zip(&image.pixels)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            self.worst_pixel = self.worst_pixel.max(max);
            if max > 2 {
                self.fail(format!("{png}: pixels differ by up to {max}/255"));
            }
        }
    }

    /// Prints the worst figures and fails the test if any case broke a bound.
    pub fn finish(&self, what: &str, cases: usize) {
        eprintln!(
            "{what}: {cases} cases, worst latent diff {:e} of max, worst pixel diff {}/255",
            self.worst_latent, self.worst_pixel
        );
        assert!(
            self.failures.is_empty(),
            "{what} differs from diffusers:\n{}",
            self.failures.join("\n")
        );
    }
}

/// A small LoRA for the demo model in diffusers' peft format: one attention projection of the
/// first attention block (64 channels), rank 2, with values large enough to move the image.
pub fn tiny_lora_bytes() -> Vec<u8> {
    let module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
    let a: Vec<f32> = (0..2 * 64)
        .map(|i| ((i as f32) * 0.37).sin() * 0.8)
        .collect();
    let b: Vec<f32> = (0..64 * 2)
        .map(|i| ((i as f32) * 0.53).cos() * 0.8)
        .collect();
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (a_bytes, b_bytes) = (bytes(&a), bytes(&b));
    let tensors = [
        (
            format!("{module}.lora_A.weight"),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 64], &a_bytes)
                .expect("view"),
        ),
        (
            format!("{module}.lora_B.weight"),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64, 2], &b_bytes)
                .expect("view"),
        ),
    ];
    safetensors::serialize(tensors, None).expect("serialize")
}
