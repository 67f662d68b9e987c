//! Depth maps for depth ControlNets, computed as diffusers' ControlNet-depth guide computes them
//! with `Intel/dpt-hybrid-midas`:
//!
//! ```python
//! image = feature_extractor(images=image, return_tensors="pt").pixel_values  # DPTImageProcessor
//! depth_map = depth_estimator(image).predicted_depth                          # DPTForDepthEstimation
//! depth_map = F.interpolate(depth_map.unsqueeze(1), size=(H, W), mode="bicubic", align_corners=False)
//! depth_map = (depth_map - amin(depth_map)) / (amax(depth_map) - amin(depth_map))
//! image = (cat([depth_map] * 3) * 255.0).clip(0, 255).astype(np.uint8)       # HWC, to PIL
//! ```
//!
//! The steps, each as its reference does it:
//!
//! 1. [`DptPreprocessor::pixel_values`]: transformers' PIL `DPTImageProcessor` (transformers 5
//!    calls it `DPTImageProcessorPil`): the output size from `size`, `keep_aspect_ratio` and
//!    `ensure_multiple_of`; Pillow's resize with the configured `resample` (bit-exact, see
//!    [`crate::image_io::resize`]); `f32(f64(v) * rescale_factor)`; `(x - mean) / std` in f32.
//! 2. [`DepthEstimator::predict`]: the exported graph (`python -m export depth`), `pixel_values`
//!    `[batch, 3, h, w]` to `predicted_depth` `[batch, h, w]`.
//! 3. [`depth_to_image`]: torch's CPU `upsample_bicubic2d` (`a = -0.75`, `align_corners=False`,
//!    border indices clamped) in f32 ([`resize_bicubic_torch`]), min-max normalisation over the
//!    whole map in f32, `* 255`, clip, truncation to u8, the map in R, G and B.
//!
//! A constant depth map (max == min) makes the reference divide 0 by 0: NaN everywhere, which
//! NumPy's `astype(np.uint8)` turns into 0 with an "invalid value" warning on x86 (the value is
//! undefined by C). A black control image that silently means "no depth" helps nobody, so
//! [`depth_to_image`] returns an error instead; so does a map with NaN or infinite values.

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use serde::Deserialize;

use crate::image_io::{resize, ResampleFilter, RgbImage};
use crate::model::read_json;
use crate::runtime::{ElementType, Graph, SessionOptions, TensorInput};
use crate::{Error, Result};

/// The `kind` in `tcd_ort.json` of a directory written by `python -m export depth`.
pub const MANIFEST_KIND: &str = "depth-estimator";
const MANIFEST_FILE: &str = "tcd_ort.json";
const PREPROCESSOR_FILE: &str = "preprocessor_config.json";
const GRAPH_FILE: &str = "model.onnx";
const COMPONENT: &str = "depth_estimator";
const INPUT: &str = "pixel_values";
const OUTPUT: &str = "predicted_depth";
const EXPORT_HINT: &str = "export one with `python -m export depth Intel/dpt-hybrid-midas DIR`";

/// The settings of a transformers `DPTImageProcessor` (`preprocessor_config.json`), with the
/// class's defaults for keys the file leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct DptPreprocessor {
    /// Whether images are resized (`do_resize`, default true).
    pub do_resize: bool,
    /// Target `(width, height)` (`size`, default 384x384).
    pub size: (u32, u32),
    /// Scale both sides by the factor closest to 1 instead of stretching (default false).
    pub keep_aspect_ratio: bool,
    /// Round each side to a multiple of this (default 1).
    pub ensure_multiple_of: u32,
    /// Pillow filter (`resample`, default BICUBIC; dpt-hybrid-midas sets 2, BILINEAR).
    pub resample: ResampleFilter,
    /// Whether to multiply by `rescale_factor` (default true).
    pub do_rescale: bool,
    /// Default `1 / 255`.
    pub rescale_factor: f64,
    /// Whether to normalise with `image_mean` / `image_std` (default true).
    pub do_normalize: bool,
    /// Per-channel mean (default 0.5).
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation (default 0.5).
    pub image_std: [f32; 3],
}

impl Default for DptPreprocessor {
    /// `DPTImageProcessor`'s class defaults.
    fn default() -> Self {
        DptPreprocessor {
            do_resize: true,
            size: (384, 384),
            keep_aspect_ratio: false,
            ensure_multiple_of: 1,
            resample: ResampleFilter::Bicubic,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }
}

/// `preprocessor_config.json` as written; every key optional.
#[derive(Debug, Deserialize)]
struct RawPreprocessor {
    do_resize: Option<bool>,
    size: Option<RawSize>,
    keep_aspect_ratio: Option<bool>,
    ensure_multiple_of: Option<u32>,
    resample: Option<i64>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<PerChannel>,
    image_std: Option<PerChannel>,
    do_pad: Option<bool>,
    size_divisor: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Square(u32),
    HeightWidth { height: u32, width: u32 },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PerChannel {
    One(f32),
    Three([f32; 3]),
}

impl PerChannel {
    fn values(&self) -> [f32; 3] {
        match *self {
            PerChannel::One(v) => [v; 3],
            PerChannel::Three(v) => v,
        }
    }
}

impl DptPreprocessor {
    /// Reads a `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawPreprocessor = read_json(path)?;
        Self::from_raw(raw).map_err(|message| Error::model(path, message))
    }

    fn from_raw(raw: RawPreprocessor) -> std::result::Result<Self, String> {
        let d = DptPreprocessor::default();
        if raw.do_pad == Some(true) && raw.size_divisor.is_some_and(|n| n > 1) {
            return Err(
                "do_pad with size_divisor is not supported by tcd-ort's DPT \
                        preprocessing (no DPT depth checkpoint for ControlNet uses it)"
                    .into(),
            );
        }
        let size = match raw.size {
            None => d.size,
            Some(RawSize::Square(s)) => (s, s),
            Some(RawSize::HeightWidth { height, width }) => (width, height),
        };
        if size.0 == 0 || size.1 == 0 {
            return Err(format!("size {}x{} is empty", size.0, size.1));
        }
        let resample = match raw.resample {
            None => d.resample,
            Some(v) => ResampleFilter::from_pil(v).ok_or_else(|| {
                format!(
                    "resample {v} is not supported (tcd-ort implements Pillow's BILINEAR (2), \
                     BICUBIC (3) and LANCZOS (1))"
                )
            })?,
        };
        let ensure_multiple_of = raw.ensure_multiple_of.unwrap_or(1);
        if ensure_multiple_of == 0 {
            return Err("ensure_multiple_of must be at least 1".into());
        }
        let image_std = raw.image_std.map_or(d.image_std, |s| s.values());
        if image_std.contains(&0.0) {
            return Err("image_std contains 0".into());
        }
        Ok(DptPreprocessor {
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            size,
            keep_aspect_ratio: raw.keep_aspect_ratio.unwrap_or(d.keep_aspect_ratio),
            ensure_multiple_of,
            resample,
            do_rescale: raw.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: raw.do_normalize.unwrap_or(d.do_normalize),
            image_mean: raw.image_mean.map_or(d.image_mean, |m| m.values()),
            image_std,
        })
    }

    /// The `(width, height)` an image of `(width, height)` is resized to: transformers'
    /// `get_resize_output_image_size` for DPT, in f64 with Python's round-half-to-even.
    pub fn output_size(&self, width: u32, height: u32) -> Result<(u32, u32)> {
        if !self.do_resize {
            return Ok((width, height));
        }
        let mut scale_w = f64::from(self.size.0) / f64::from(width);
        let mut scale_h = f64::from(self.size.1) / f64::from(height);
        if self.keep_aspect_ratio {
            // Scale as little as possible.
            if (1.0 - scale_w).abs() < (1.0 - scale_h).abs() {
                scale_h = scale_w;
            } else {
                scale_w = scale_h;
            }
        }
        let multiple = f64::from(self.ensure_multiple_of);
        let constrain = |v: f64| -> f64 {
            let x = (v / multiple).round_ties_even() * multiple;
            if x < 0.0 {
                (v / multiple).ceil() * multiple
            } else {
                x
            }
        };
        let new_w = constrain(scale_w * f64::from(width));
        let new_h = constrain(scale_h * f64::from(height));
        if new_w < 1.0 || new_h < 1.0 || new_w > f64::from(u32::MAX) || new_h > f64::from(u32::MAX)
        {
            return Err(Error::invalid(format!(
                "a {width}x{height} image would be resized to {new_w}x{new_h} by the depth \
                 estimator's preprocessing"
            )));
        }
        Ok((new_w as u32, new_h as u32))
    }

    /// `DPTImageProcessor(images=image, return_tensors="pt").pixel_values`: `[1, 3, h, w]`.
    pub fn pixel_values(&self, image: &RgbImage) -> Result<ArrayD<f32>> {
        let (w, h) = self.output_size(image.width, image.height)?;
        let resized = if (w, h) == (image.width, image.height) {
            // Pillow's resize to the same size is a copy.
            std::borrow::Cow::Borrowed(image)
        } else {
            std::borrow::Cow::Owned(resize(image, w, h, self.resample)?)
        };
        let (w, h) = (w as usize, h as usize);
        let mut values = vec![0f32; 3 * h * w];
        for (i, rgb) in resized.pixels.chunks_exact(3).enumerate() {
            for (c, &v) in rgb.iter().enumerate() {
                // transformers' `rescale`: float64 multiply, then float32; `normalize`: float32.
                let mut x = if self.do_rescale {
                    (f64::from(v) * self.rescale_factor) as f32
                } else {
                    f32::from(v)
                };
                if self.do_normalize {
                    x = (x - self.image_mean[c]) / self.image_std[c];
                }
                values[c * h * w + i] = x;
            }
        }
        ArrayD::from_shape_vec(IxDyn(&[1, 3, h, w]), values)
            .map_err(|e| Error::internal("pixel values", e))
    }
}

/// The `tcd_ort.json` fields a depth estimator directory needs.
#[derive(Debug, Deserialize)]
struct DepthManifest {
    #[serde(default)]
    format_version: u32,
    kind: Option<String>,
}

/// A DPT depth estimator exported by `python -m export depth`, with its image processor.
#[derive(Debug)]
pub struct DepthEstimator {
    dir: PathBuf,
    graph: Graph,
    preprocessor: DptPreprocessor,
}

impl DepthEstimator {
    /// Loads a directory written by `python -m export depth`: checks `tcd_ort.json` says it is a
    /// depth estimator, reads `preprocessor_config.json`, and loads `model.onnx`, which must take
    /// a float32 `pixel_values` `[batch, 3, height, width]` and give `predicted_depth`
    /// `[batch, height, width]`.
    ///
    /// ONNX Runtime is loaded first if nothing in the process has loaded it (the default search
    /// of [`crate::runtime::ensure_loaded`]); call that with a path beforehand to choose one.
    pub fn load(dir: &Path, options: &SessionOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::model(
                dir,
                format!("not a directory; a depth estimator is a directory ({EXPORT_HINT})"),
            ));
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        if !manifest_path.is_file() {
            return Err(Error::model(
                dir,
                format!("not a depth estimator: no {MANIFEST_FILE} ({EXPORT_HINT})"),
            ));
        }
        let manifest: DepthManifest = read_json(&manifest_path)?;
        match manifest.kind.as_deref() {
            Some(MANIFEST_KIND) => {}
            Some(other) => {
                return Err(Error::model(
                    dir,
                    format!(
                        "{MANIFEST_FILE} says this is a {other:?}, not a {MANIFEST_KIND:?} \
                         ({EXPORT_HINT})"
                    ),
                ))
            }
            None => {
                return Err(Error::model(
                    dir,
                    format!(
                        "not a depth estimator: {MANIFEST_FILE} has no \"kind\" (a Stable \
                         Diffusion pipeline directory?) ({EXPORT_HINT})"
                    ),
                ))
            }
        }
        if manifest.format_version != 1 {
            return Err(Error::model(
                &manifest_path,
                format!(
                    "format_version {} is not supported (this tcd-ort reads 1); re-export with \
                     this version's `python -m export depth`",
                    manifest.format_version
                ),
            ));
        }
        let preprocessor = DptPreprocessor::from_file(&dir.join(PREPROCESSOR_FILE))?;
        // A no-op when the engine (or the caller, with an explicit library) already loaded it.
        crate::runtime::ensure_loaded(None)?;
        let graph = Graph::load(COMPONENT, &dir.join(GRAPH_FILE), options)?;
        check_signature(&graph, dir)?;
        Ok(DepthEstimator {
            dir: dir.to_path_buf(),
            graph,
            preprocessor,
        })
    }

    /// The image processor settings read from `preprocessor_config.json`.
    pub fn preprocessor(&self) -> &DptPreprocessor {
        &self.preprocessor
    }

    /// The loaded graph.
    pub(crate) fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs the graph: `pixel_values` `[batch, 3, h, w]` to `predicted_depth` `[batch, h, w]`.
    pub fn predict(&mut self, pixel_values: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let shape = pixel_values.shape();
        if shape.len() != 4 || shape[1] != 3 {
            return Err(Error::invalid(format!(
                "pixel values must be [batch, 3, height, width], got {shape:?}"
            )));
        }
        if let Some(spec) = self.graph.input(INPUT) {
            for (axis, name) in [(2, "height"), (3, "width")] {
                let fixed = spec.shape.get(axis).copied().unwrap_or(-1);
                if fixed > 0 && fixed as usize != shape[axis] {
                    return Err(Error::model(
                        &self.dir,
                        format!(
                            "the depth graph takes a {name} of {fixed}, the preprocessing made \
                             {}; preprocessor_config.json and model.onnx do not belong together",
                            shape[axis]
                        ),
                    ));
                }
            }
        }
        let mut out = self.graph.run(
            vec![(INPUT, TensorInput::F32(pixel_values.clone()))],
            &[OUTPUT],
        )?;
        let depth = out
            .pop()
            .ok_or_else(|| Error::invariant("the depth graph returned nothing"))?;
        if depth.ndim() != 3 || depth.shape()[0] != shape[0] {
            return Err(Error::model(
                &self.dir,
                format!(
                    "predicted_depth has shape {:?}, expected [{}, height, width]",
                    depth.shape(),
                    shape[0]
                ),
            ));
        }
        Ok(depth)
    }

    /// The depth control image of `image` at `width` x `height`: the guide's `get_depth_map`
    /// (see the module documentation). Errors on a constant or non-finite depth map.
    pub fn estimate(&mut self, image: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
        let pixel_values = self.preprocessor.pixel_values(image)?;
        let depth = self.predict(&pixel_values)?;
        depth_to_image(&depth, width, height)
    }
}

fn check_signature(graph: &Graph, dir: &Path) -> Result<()> {
    let bad = |message: String| Error::model(dir, format!("{message} ({EXPORT_HINT})"));
    let input = graph.input(INPUT).ok_or_else(|| {
        bad(format!(
            "the graph has no input '{INPUT}' (it has: {}), so it is not a depth estimator",
            names(graph.inputs())
        ))
    })?;
    if input.dtype != ElementType::F32 || input.shape.len() != 4 {
        return Err(bad(format!(
            "input '{INPUT}' is {:?} {:?}, expected float32 [batch, 3, height, width]",
            input.dtype, input.shape
        )));
    }
    if input.shape[1] > 0 && input.shape[1] != 3 {
        return Err(bad(format!(
            "input '{INPUT}' has {} channels, expected 3",
            input.shape[1]
        )));
    }
    let output = graph
        .outputs()
        .iter()
        .find(|o| o.name == OUTPUT)
        .ok_or_else(|| {
            bad(format!(
                "the graph has no output '{OUTPUT}' (it has: {})",
                names(graph.outputs())
            ))
        })?;
    if output.dtype != ElementType::F32 || output.shape.len() != 3 {
        return Err(bad(format!(
            "output '{OUTPUT}' is {:?} {:?}, expected float32 [batch, height, width]",
            output.dtype, output.shape
        )));
    }
    Ok(())
}

fn names(specs: &[crate::runtime::IoSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The guide's post-processing of `predicted_depth` (`[1, h, w]` or `[h, w]`): bicubic resize
/// to `height` x `width` as torch does it, min-max normalisation, `* 255`, clip, truncation to
/// u8, the same value in R, G and B.
///
/// Errors when the map holds NaN or infinite values, or is constant (see the module docs).
pub fn depth_to_image(predicted_depth: &ArrayD<f32>, width: u32, height: u32) -> Result<RgbImage> {
    let shape = predicted_depth.shape();
    let (in_h, in_w) = match *shape {
        [1, h, w] | [h, w] => (h, w),
        _ => {
            return Err(Error::invalid(format!(
                "a depth map must be [1, height, width] or [height, width], got {shape:?}"
            )))
        }
    };
    let values: Vec<f32> = predicted_depth.iter().copied().collect();
    let resized = resize_bicubic_torch(&values, in_w, in_h, width as usize, height as usize)?;
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in &resized {
        if !v.is_finite() {
            return Err(Error::Runtime(format!(
                "the depth estimator produced a non-finite depth ({v}); a float16 export or a \
                 broken model? The control image would be garbage"
            )));
        }
        min = min.min(v);
        max = max.max(v);
    }
    let range = max - min;
    if range == 0.0 {
        return Err(Error::invalid(format!(
            "the depth map is constant ({min} everywhere), so it cannot be normalised (the \
             Python recipe divides by zero and gets a black image); the input image is probably \
             blank or uniform"
        )));
    }
    let gray: Vec<u8> = resized
        .iter()
        .map(|&v| {
            let unit = (v - min) / range;
            // NumPy: float32 * 255.0 stays float32; clip; astype(uint8) truncates.
            (unit * 255.0).clamp(0.0, 255.0) as u8
        })
        .collect();
    RgbImage::from_gray(width, height, &gray)
}

/// torch's `F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False)` of one
/// `in_h` x `in_w` f32 plane (row-major), as the CPU kernel computes it: source coordinate
/// `(dst + 0.5) * (in / out) - 0.5` in f32, Keys' cubic with `a = -0.75`, taps beyond the
/// border clamped to the edge, rows of taps interpolated along x first.
///
/// Not bit-exact: torch's vectorised kernel rounds differently (plain, fused and separable
/// orderings were all tried); the results differ by a few units in the last place, about 1e-6
/// on values of order 1, which moves a u8 depth pixel only when it sits on a truncation edge.
pub fn resize_bicubic_torch(
    values: &[f32],
    in_w: usize,
    in_h: usize,
    out_w: usize,
    out_h: usize,
) -> Result<Vec<f32>> {
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 || values.len() != in_w * in_h {
        return Err(Error::invalid(format!(
            "cannot resize a {in_w}x{in_h} plane of {} values to {out_w}x{out_h}",
            values.len()
        )));
    }
    let xs = cubic_taps(in_w, out_w);
    let ys = cubic_taps(in_h, out_h);
    let mut out = Vec::with_capacity(out_w * out_h);
    for (yi, wy) in &ys {
        for (xi, wx) in &xs {
            let mut acc = 0f32;
            for j in 0..4 {
                let row = &values[yi[j] * in_w..(yi[j] + 1) * in_w];
                let mut t = row[xi[0]] * wx[0];
                for i in 1..4 {
                    t += row[xi[i]] * wx[i];
                }
                if j == 0 {
                    acc = t * wy[0];
                } else {
                    acc += t * wy[j];
                }
            }
            out.push(acc);
        }
    }
    Ok(out)
}

/// Per output index: the four (clamped) input indices and their weights, as torch's
/// `HelperInterpCubic::compute_indices_weights` makes them.
fn cubic_taps(in_size: usize, out_size: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = in_size as f32 / out_size as f32;
    let last = in_size as i64 - 1;
    (0..out_size)
        .map(|o| {
            let real = scale * (o as f32 + 0.5) - 0.5;
            let index = (real.floor() as i64).min(last);
            let t = (real - index as f32).clamp(0.0, 1.0);
            let idx = std::array::from_fn(|j| (index - 1 + j as i64).clamp(0, last) as usize);
            (idx, cubic_weights(t))
        })
        .collect()
}

/// torch's `get_cubic_upsample_coefficients` with `A = -0.75`, in f32.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let u = 1.0 - t;
    [far(t + 1.0), near(t), near(u), far(u + 1.0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_weights_sum_to_one() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let w = cubic_weights(t);
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{t}: {w:?}");
        }
        assert_eq!(cubic_weights(0.0), [0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn keep_aspect_ratio_scales_as_little_as_possible() {
        let p = DptPreprocessor {
            keep_aspect_ratio: true,
            ensure_multiple_of: 32,
            ..DptPreprocessor::default()
        };
        // 640x480 to 384: the height's factor (0.8) is closer to 1 than the width's (0.6).
        assert_eq!(p.output_size(640, 480).ok(), Some((512, 384)));
        let plain = DptPreprocessor::default();
        assert_eq!(plain.output_size(640, 480).ok(), Some((384, 384)));
    }

    #[test]
    fn constant_and_non_finite_depth_are_errors() {
        let flat = ArrayD::from_elem(IxDyn(&[1, 4, 4]), 2.5f32);
        let err = depth_to_image(&flat, 8, 8).expect_err("constant");
        assert!(err.to_string().contains("constant"), "{err}");
        let mut nan = ArrayD::from_shape_fn(IxDyn(&[1, 4, 4]), |d| d[2] as f32);
        nan[[0, 1, 1]] = f32::NAN;
        assert!(depth_to_image(&nan, 8, 8).is_err());
    }
}
