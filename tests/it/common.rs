//! Helpers shared by the integration tests: paths, the golden case every diffusers parity suite
//! reads from its `cases.json`, and the runner that holds the engine's output to diffusers'.

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tcd_ort::pipeline::{EngineOptions, GenerateRequest, Generated, LoraSpec};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A model committed under `models/` (the tiny demo models), as the path string engines take.
pub fn committed_model(name: &str) -> String {
    repo_root()
        .join("models")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Where `make fixtures` writes generated fixtures (tiny models, diffusers references).
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("TCD_ORT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests").join("fixtures").join("generated"))
}

/// The tiny text-to-image export of a family (`parity/<family>/onnx`, from
/// `tests/golden/make_parity.py`), which most suites run on.
pub fn parity_model(family: &str) -> PathBuf {
    fixtures_dir().join("parity").join(family).join("onnx")
}

/// The model a suite's family runs on: the suite's own export (`<suite>/<family>/onnx`) when its
/// script wrote one, else the text-to-image parity export (the same tiny weights).
pub fn suite_model(suite: &Path, family: &str) -> PathBuf {
    let own = suite.join(family).join("onnx");
    if own.is_dir() {
        return own;
    }
    parity_model(family)
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
    pub fn check(&mut self, out: &Generated, dir: &Path, name: &str) {
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
        let diff = max_abs_diff(&out.latents, &reference) / max_abs(&reference).max(1e-12);
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
            let max = max_pixel_diff(&pixels, &image.pixels);
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

/// Largest magnitude in `a` (0 when empty; `f32::max` passes over NaNs).
pub fn max_abs(a: &ArrayD<f32>) -> f32 {
    a.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Largest elementwise difference of `a` and `b`, over the elements they share (`f32::max`
/// passes over NaNs).
pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    a.iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Largest difference of `a` from `reference`, relative to the reference's largest magnitude.
pub fn relative_diff(a: &ArrayD<f32>, reference: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), reference.shape());
    max_abs_diff(a, reference) / max_abs(reference).max(1e-12)
}

/// Largest per-channel difference of two 8-bit images' bytes.
pub fn max_pixel_diff(a: &[u8], b: &[u8]) -> u8 {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// One generation a golden script (`tests/golden/make_*.py`) ran through diffusers, as the
/// script wrote it to its `cases.json`: the request every suite shares and, flattened into the
/// same JSON object, the suite's own inputs in `extra` (nothing for text-to-image, [`Loras`] for
/// adapters, images and control inputs in their suites).
#[derive(Debug, Deserialize)]
pub struct Case<X = ()> {
    /// Names the reference files (`<name>.npy`, `<name>.png`).
    pub name: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub eta: f32,
    pub guidance: f32,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// Images per prompt; the scripts write it only when there are several.
    #[serde(default = "one")]
    pub num_images: usize,
    /// The suite's own fields.
    #[serde(flatten)]
    pub extra: X,
}

fn one() -> usize {
    1
}

impl<X> Case<X> {
    /// The request diffusers was given, without control images (which only the ControlNet
    /// suite adds).
    pub fn request(&self) -> GenerateRequest {
        GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            eta: self.eta,
            guidance: self.guidance,
            seed: self.seed,
            width: Some(self.width),
            height: Some(self.height),
            num_images: self.num_images,
            ..GenerateRequest::default()
        }
    }
}

/// The cases a golden script wrote to `<dir>/cases.json`, or a panic that says how to make the
/// `what` fixtures.
pub fn read_cases<X: DeserializeOwned>(dir: &Path, what: &str) -> Vec<Case<X>> {
    let path = dir.join("cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; generate the {what} fixtures with `make fixtures`",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("cases.json parses")
}

/// Runs every case through `generate` and holds each output to diffusers' reference files in
/// `reference` ([`ParityReport::check`]). An engine error fails its case; `generate` may record
/// failures of its own in the report. All failures are reported at once, under `what`.
pub fn check_cases<X>(
    what: &str,
    cases: &[Case<X>],
    reference: &Path,
    mut generate: impl FnMut(&Case<X>, &mut ParityReport) -> tcd_ort::Result<Generated>,
) {
    let mut report = ParityReport::default();
    for case in cases {
        match generate(case, &mut report) {
            Ok(out) => report.check(&out, reference, &case.name),
            Err(e) => report.fail(format!("{}: {e}", case.name)),
        }
    }
    report.finish(what, cases.len());
}

/// An adapter a LoRA case loads: a file beside its `cases.json`, and its weight.
#[derive(Debug, Deserialize)]
pub struct LoraRef {
    pub file: String,
    pub weight: f32,
}

/// The adapters of a LoRA case (`tests/golden/make_lora.py`, `make_lora_slots.py`).
#[derive(Debug, Deserialize)]
pub struct Loras {
    pub loras: Vec<LoraRef>,
    /// diffusers fused the adapters (`fuse_lora`) for the reference.
    #[serde(default)]
    pub fuse: bool,
}

impl Loras {
    /// Engine options that apply these adapters, read from `dir`, at load time.
    pub fn engine_options(&self, dir: &Path) -> EngineOptions {
        EngineOptions {
            loras: self
                .loras
                .iter()
                .map(|l| LoraSpec {
                    source: dir.join(&l.file).to_string_lossy().into_owned(),
                    weight: l.weight,
                    weight_name: None,
                })
                .collect(),
            ..EngineOptions::default()
        }
    }
}

/// Copies a directory tree (a model to corrupt or re-manifest in a scratch dir).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A small LoRA for the demo model in diffusers' peft format: one attention projection of the
/// first attention block (64 channels), rank 2, with values large enough to move the image.
pub fn tiny_lora_bytes() -> Vec<u8> {
    tiny_lora_bytes_scaled(1.0)
}

/// [`tiny_lora_bytes`] with every value multiplied by `scale` (1e20 overflows float32 once
/// fused: finite values, infinite weights).
pub fn tiny_lora_bytes_scaled(scale: f32) -> Vec<u8> {
    let module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
    let a: Vec<f32> = (0..2 * 64)
        .map(|i| ((i as f32) * 0.37).sin() * 0.8 * scale)
        .collect();
    let b: Vec<f32> = (0..64 * 2)
        .map(|i| ((i as f32) * 0.53).cos() * 0.8 * scale)
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
