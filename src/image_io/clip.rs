//! The CLIP image encoder's pre-processing: an IP-Adapter's reference image to `pixel_values`,
//! as transformers' `CLIPImageProcessor` makes them.
//!
//! diffusers' `load_ip_adapter` creates `CLIPImageProcessor(size=s, crop_size=s)` (`s` the image
//! encoder's `image_size`, 224 for the real ones, which are also the class defaults) and its
//! pipelines call `feature_extractor(image, return_tensors="pt").pixel_values`. In transformers 5
//! that name is the torchvision backend when torchvision is installed and `CLIPImageProcessorPil`
//! otherwise (the pinned environment has no torchvision); the Pillow backend, the only one before
//! transformers 5, is the one reproduced here, bit for bit:
//!
//! 1. resize (`do_resize`) with Pillow's `resample` filter ([`super::resize`]) to `size`: either
//!    the shortest side to `shortest_edge`, the other side `int(shortest_edge * long / short)`
//!    (`get_resize_output_image_size(..., default_to_square=False)`), or an exact height and
//!    width;
//! 2. centre crop (`do_center_crop`) to `crop_size`, with `image_transforms.center_crop`'s
//!    offsets (`(size - crop) // 2`) and its zero padding where the image is smaller;
//! 3. `f32(f64(v) * rescale_factor)` (`do_rescale`), then `(x - mean) / std` in f32
//!    (`do_normalize`), channels first: `[1, 3, height, width]` float32.
//!
//! The padding is added to the 8-bit pixels, before the rescale and the normalisation, so a
//! padded pixel becomes `-mean / std`, as in transformers.

use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use serde::Deserialize;
use serde_json::Value;

use super::file::MAX_INPUT_BYTES;
use super::{resize, ResampleFilter, RgbImage};
use crate::model::read_json;
use crate::{Error, Result};

/// transformers' `OPENAI_CLIP_MEAN`. NumPy makes float32 from the float64 values (as Python
/// parses them), so they are rounded to f64 first, then to f32, never straight to f32.
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// transformers' `OPENAI_CLIP_STD`, rounded as [`OPENAI_CLIP_MEAN`] is.
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The `image_processor_type` / `feature_extractor_type` names of a CLIP image processor: the
/// class, its transformers 5 backends, and the feature extractor it replaced.
const CLIP_PROCESSOR_TYPES: [&str; 4] = [
    "CLIPImageProcessor",
    "CLIPImageProcessorPil",
    "CLIPImageProcessorFast",
    "CLIPFeatureExtractor",
];

/// How `size` resizes an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipResize {
    /// `{"shortest_edge": n}` (or a bare `n`): the shorter side becomes `n`, the longer one
    /// `int(n * long / short)` (truncated, so the aspect ratio is kept to within a pixel).
    ShortestEdge(u32),
    /// `{"height": h, "width": w}` (or `[h, w]`, or a bare `n` with `default_to_square`):
    /// exactly this size, whatever the aspect ratio.
    Exact {
        /// Output width in pixels.
        width: u32,
        /// Output height in pixels.
        height: u32,
    },
}

/// The settings of a transformers `CLIPImageProcessor` (`preprocessor_config.json`), with the
/// class's defaults for the keys a file leaves out.
///
/// It deserialises from the file's JSON (every key optional, unknown keys ignored) and checks
/// it: [`ClipImageConfig::from_file`] reads one with the path in its errors.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawClipImageConfig")]
pub struct ClipImageConfig {
    /// Whether images are resized (`do_resize`, default true).
    pub do_resize: bool,
    /// The resize (`size`, default `{"shortest_edge": 224}`).
    pub size: ClipResize,
    /// Pillow filter (`resample`, default 3, BICUBIC).
    pub resample: ResampleFilter,
    /// Whether images are centre-cropped (`do_center_crop`, default true).
    pub do_center_crop: bool,
    /// The crop's `(width, height)` (`crop_size`, default 224x224).
    pub crop_size: (u32, u32),
    /// Whether to multiply by `rescale_factor` (`do_rescale`, default true).
    pub do_rescale: bool,
    /// `rescale_factor`, default `1 / 255`.
    pub rescale_factor: f64,
    /// Whether to normalise with `image_mean` / `image_std` (`do_normalize`, default true).
    pub do_normalize: bool,
    /// Per-channel mean (default the OpenAI CLIP mean).
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation (default the OpenAI CLIP standard deviation).
    pub image_std: [f32; 3],
    /// Whether images are converted to RGB (`do_convert_rgb`, default true). An [`RgbImage`]
    /// is RGB already (the loaders drop alpha as diffusers' `load_image` does), so this is
    /// kept for completeness and changes nothing.
    pub do_convert_rgb: bool,
}

impl Default for ClipImageConfig {
    /// `CLIPImageProcessor()`'s class defaults.
    fn default() -> Self {
        ClipImageConfig {
            do_resize: true,
            size: ClipResize::ShortestEdge(224),
            resample: ResampleFilter::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN.map(|v| v as f32),
            image_std: OPENAI_CLIP_STD.map(|v| v as f32),
            do_convert_rgb: true,
        }
    }
}

/// `preprocessor_config.json` as written; every key optional. The size keys take several
/// shapes (ints, lists, dicts), read from JSON values so that errors can name them.
#[derive(Debug, Deserialize)]
struct RawClipImageConfig {
    image_processor_type: Option<String>,
    feature_extractor_type: Option<String>,
    do_resize: Option<bool>,
    size: Option<Value>,
    default_to_square: Option<bool>,
    resample: Option<i64>,
    do_center_crop: Option<bool>,
    crop_size: Option<Value>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Value>,
    image_std: Option<Value>,
    do_convert_rgb: Option<bool>,
    do_pad: Option<bool>,
    pad_size: Option<Value>,
}

impl TryFrom<RawClipImageConfig> for ClipImageConfig {
    type Error = String;

    fn try_from(raw: RawClipImageConfig) -> std::result::Result<Self, String> {
        let d = ClipImageConfig::default();
        // The defaults below are CLIP's: another processor's file (SigLIP's, say) leaves out keys
        // whose defaults differ, so it would be read wrong.
        for kind in [&raw.image_processor_type, &raw.feature_extractor_type] {
            if let Some(kind) = kind
                .as_deref()
                .filter(|k| !CLIP_PROCESSOR_TYPES.contains(k))
            {
                return Err(format!(
                    "this is a {kind}'s configuration, not a CLIPImageProcessor's (tcd-ort \
                     pre-processes reference images for CLIP image encoders only)"
                ));
            }
        }
        if raw.do_pad == Some(true) && raw.pad_size.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(String::from(
                "do_pad with a pad_size is not supported by tcd-ort's CLIP image preprocessing \
                 (CLIP image encoders do not pad)",
            ));
        }
        // CLIPImageProcessor's class attribute: a bare `size` is the shortest edge.
        let square = raw.default_to_square.unwrap_or(false);
        let size = match raw.size {
            None | Some(Value::Null) => d.size,
            Some(v) => parse_size("size", &v, square)?,
        };
        let crop_size = match raw.crop_size {
            // transformers reads a bare crop size as a square whatever `default_to_square` says.
            None | Some(Value::Null) => d.crop_size,
            Some(v) => match parse_size("crop_size", &v, true)? {
                ClipResize::Exact { width, height } => (width, height),
                ClipResize::ShortestEdge(_) => {
                    return Err(format!(
                        "crop_size {v} is not supported (a crop needs {{\"height\": h, \
                         \"width\": w}} or a number)"
                    ))
                }
            },
        };
        let resample = match raw.resample {
            None => d.resample,
            Some(v) => ResampleFilter::from_pil(v).ok_or_else(|| {
                format!(
                    "resample {v} is not supported (tcd-ort implements Pillow's BILINEAR (2), \
                     BICUBIC (3) and LANCZOS (1))"
                )
            })?,
        };
        let rescale_factor = raw.rescale_factor.unwrap_or(d.rescale_factor);
        if !rescale_factor.is_finite() {
            return Err(format!("rescale_factor {rescale_factor} is not finite"));
        }
        let image_mean = match raw.image_mean {
            None | Some(Value::Null) => d.image_mean,
            Some(v) => per_channel("image_mean", &v)?,
        };
        let image_std = match raw.image_std {
            None | Some(Value::Null) => d.image_std,
            Some(v) => per_channel("image_std", &v)?,
        };
        let config = ClipImageConfig {
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            size,
            resample,
            do_center_crop: raw.do_center_crop.unwrap_or(d.do_center_crop),
            crop_size,
            do_rescale: raw.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor,
            do_normalize: raw.do_normalize.unwrap_or(d.do_normalize),
            image_mean,
            image_std,
            do_convert_rgb: raw.do_convert_rgb.unwrap_or(d.do_convert_rgb),
        };
        config.check()?;
        Ok(config)
    }
}

/// A size (`name` in messages) as transformers' `get_size_dict` reads it: a number (a square with `square`, else
/// the shortest edge), `[height, width]`, `{"shortest_edge": n}` or `{"height", "width"}`.
fn parse_size(name: &str, value: &Value, square: bool) -> std::result::Result<ClipResize, String> {
    let side = |v: &Value| -> Option<u32> { v.as_u64().and_then(|n| u32::try_from(n).ok()) };
    let unsupported = || {
        format!(
            "{name} {value} is not supported (tcd-ort reads a number, [height, width], \
             {{\"shortest_edge\": n}} or {{\"height\": h, \"width\": w}})"
        )
    };
    match value {
        Value::Number(_) => {
            let n = side(value).ok_or_else(unsupported)?;
            Ok(if square {
                ClipResize::Exact {
                    width: n,
                    height: n,
                }
            } else {
                ClipResize::ShortestEdge(n)
            })
        }
        Value::Array(items) => match items.as_slice() {
            [h, w] => Ok(ClipResize::Exact {
                width: side(w).ok_or_else(unsupported)?,
                height: side(h).ok_or_else(unsupported)?,
            }),
            _ => Err(unsupported()),
        },
        Value::Object(map) => {
            // Keys with null values are absent (as a saved `SizeDict` may write them).
            let keys: Vec<&str> = map
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| k.as_str())
                .collect();
            let get = |key: &str| map.get(key).and_then(side).ok_or_else(unsupported);
            match keys.as_slice() {
                ["shortest_edge"] => Ok(ClipResize::ShortestEdge(get("shortest_edge")?)),
                ["height", "width"] | ["width", "height"] => Ok(ClipResize::Exact {
                    width: get("width")?,
                    height: get("height")?,
                }),
                _ => Err(unsupported()),
            }
        }
        _ => Err(unsupported()),
    }
}

/// `image_mean` / `image_std`: one number for every channel, or three. NumPy's float32 from
/// the float64 that Python parsed.
fn per_channel(name: &str, value: &Value) -> std::result::Result<[f32; 3], String> {
    let bad = || format!("{name} must be a number or a list of 3 numbers, got {value}");
    match value {
        Value::Number(n) => n.as_f64().map(|v| [v as f32; 3]).ok_or_else(bad),
        Value::Array(items) if items.len() == 3 => {
            let mut out = [0f32; 3];
            for (slot, item) in out.iter_mut().zip(items) {
                *slot = item.as_f64().ok_or_else(bad)? as f32;
            }
            Ok(out)
        }
        _ => Err(bad()),
    }
}

impl ClipImageConfig {
    /// Reads a `preprocessor_config.json` (the class defaults for the keys it leaves out).
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawClipImageConfig = read_json(path)?;
        Self::try_from(raw).map_err(|message| Error::model(path, message))
    }

    /// What the deserialiser checks, for configurations built in code too.
    fn check(&self) -> std::result::Result<(), String> {
        let size_ok = match self.size {
            ClipResize::ShortestEdge(n) => n > 0,
            ClipResize::Exact { width, height } => width > 0 && height > 0,
        };
        if !size_ok {
            return Err(format!("size {:?} has an empty side", self.size));
        }
        if self.crop_size.0 == 0 || self.crop_size.1 == 0 {
            return Err(format!(
                "crop_size {}x{} is empty",
                self.crop_size.0, self.crop_size.1
            ));
        }
        if self.image_std.contains(&0.0) {
            return Err("image_std contains 0".into());
        }
        let finite = |v: &[f32; 3]| v.iter().all(|x| x.is_finite());
        if !finite(&self.image_mean) || !finite(&self.image_std) {
            return Err("image_mean and image_std must be finite".into());
        }
        Ok(())
    }

    /// The `(width, height)` an image of `(width, height)` is resized to (itself when
    /// `do_resize` is false). For a shortest edge this is transformers'
    /// `get_resize_output_image_size(..., default_to_square=False)`: the long side is
    /// `int(shortest_edge * long / short)`, a float64 division truncated.
    pub fn resized_size(&self, width: u32, height: u32) -> Result<(u32, u32)> {
        if width == 0 || height == 0 {
            return Err(Error::invalid(format!(
                "cannot pre-process a {width}x{height} image"
            )));
        }
        if !self.do_resize {
            return Ok((width, height));
        }
        match self.size {
            ClipResize::Exact { width, height } => Ok((width, height)),
            ClipResize::ShortestEdge(short_target) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python: the int product is exact, its true division correctly rounded.
                let new_long =
                    (u64::from(short_target) * u64::from(long)) as f64 / f64::from(short);
                let new_long = u32::try_from(new_long as u64).map_err(|_| {
                    Error::invalid(format!(
                        "a {width}x{height} image would be resized to a side of {new_long} \
                         pixels by the CLIP image preprocessing"
                    ))
                })?;
                Ok(if width <= height {
                    (short_target, new_long)
                } else {
                    (new_long, short_target)
                })
            }
        }
    }
}

/// `CLIPImageProcessor(...)(image, return_tensors="pt").pixel_values` for one RGB image with
/// these settings: `[1, 3, height, width]` float32, `height` x `width` the crop size (the resized
/// size without the crop). See the module documentation for the steps.
///
/// Without the rescale and the normalisation transformers returns the 8-bit values themselves
/// (a uint8 tensor); they come back here as float32 `0.0..=255.0`.
///
/// Errors on settings that [`ClipImageConfig::from_file`] would refuse, and when the resized
/// image would take more than 512 MiB (a sliver of an image, resized to a shortest edge, can
/// ask for gigabytes before the crop throws almost all of it away).
pub fn clip_pixel_values(image: &RgbImage, config: &ClipImageConfig) -> Result<ArrayD<f32>> {
    config
        .check()
        .map_err(|m| Error::invalid(format!("CLIP image preprocessing: {m}")))?;
    let (w, h) = config.resized_size(image.width, image.height)?;
    if u64::from(w) * u64::from(h) * 3 > MAX_INPUT_BYTES {
        return Err(Error::invalid(format!(
            "a {}x{} image would be resized to {w}x{h} by the CLIP image preprocessing (more \
             than 512 MiB); crop it closer to a square first",
            image.width, image.height
        )));
    }
    if config.do_center_crop {
        let (cw, ch) = config.crop_size;
        if u64::from(cw) * u64::from(ch) * 3 * 4 > MAX_INPUT_BYTES {
            return Err(Error::invalid(format!(
                "CLIP image preprocessing: crop_size {cw}x{ch} makes a tensor of more than \
                 512 MiB"
            )));
        }
    }
    let resized = if (w, h) == (image.width, image.height) {
        // Pillow's resize to the same size is a copy.
        std::borrow::Cow::Borrowed(image)
    } else {
        std::borrow::Cow::Owned(resize(image, w, h, config.resample)?)
    };
    let (in_w, in_h) = (w as usize, h as usize);
    let (out_w, out_h) = if config.do_center_crop {
        (config.crop_size.0 as usize, config.crop_size.1 as usize)
    } else {
        (in_w, in_h)
    };
    // `center_crop`'s offset `(size - crop) // 2` (Python's floor division), negative where
    // the image is padded: its padding `ceil((crop - size) / 2)` lands on the same pixels.
    let offset = |size: usize, crop: usize| (size as i64 - crop as i64).div_euclid(2);
    let (left, top) = (offset(in_w, out_w), offset(in_h, out_h));
    let value = |c: usize, v: u8| -> f32 {
        // transformers' `rescale`: float64 multiply, then float32; `normalize`: float32.
        let mut x = if config.do_rescale {
            (f64::from(v) * config.rescale_factor) as f32
        } else {
            f32::from(v)
        };
        if config.do_normalize {
            x = (x - config.image_mean[c]) / config.image_std[c];
        }
        x
    };
    let mut values = vec![0f32; 3 * out_h * out_w];
    for y in 0..out_h {
        let sy = usize::try_from(y as i64 + top).ok().filter(|&sy| sy < in_h);
        for x in 0..out_w {
            let sx = usize::try_from(x as i64 + left)
                .ok()
                .filter(|&sx| sx < in_w);
            for c in 0..3 {
                let v = match (sy, sx) {
                    (Some(sy), Some(sx)) => resized.pixels[(sy * in_w + sx) * 3 + c],
                    _ => 0,
                };
                values[(c * out_h + y) * out_w + x] = value(c, v);
            }
        }
    }
    ArrayD::from_shape_vec(IxDyn(&[1, 3, out_h, out_w]), values)
        .map_err(|e| Error::internal("CLIP pixel values", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> std::result::Result<ClipImageConfig, String> {
        let raw: RawClipImageConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        ClipImageConfig::try_from(raw)
    }

    #[test]
    fn shortest_edge_truncates_the_long_side() {
        let config = ClipImageConfig::default();
        // 224 * 300 / 200 = 336; 224 * 53 / 37 = 320.86 -> 320; 224 * 500 / 97 = 1154.6.
        assert_eq!(config.resized_size(300, 200).ok(), Some((336, 224)));
        assert_eq!(config.resized_size(37, 53).ok(), Some((224, 320)));
        assert_eq!(config.resized_size(97, 500).ok(), Some((224, 1154)));
        assert_eq!(config.resized_size(500, 97).ok(), Some((1154, 224)));
    }

    #[test]
    fn key_forms_of_real_configs() {
        let legacy = parse(r#"{"size": 224, "crop_size": 224}"#).expect("legacy");
        assert_eq!(legacy, ClipImageConfig::default());
        let square = parse(r#"{"size": 30, "default_to_square": true}"#).expect("square");
        assert_eq!(
            square.size,
            ClipResize::Exact {
                width: 30,
                height: 30
            }
        );
        let listed = parse(r#"{"size": [20, 30], "crop_size": [10, 12]}"#).expect("lists");
        assert_eq!(
            listed.size,
            ClipResize::Exact {
                width: 30,
                height: 20
            }
        );
        assert_eq!(listed.crop_size, (12, 10));
        let nulls = parse(r#"{"size": {"shortest_edge": 32, "height": null}}"#).expect("nulls");
        assert_eq!(nulls.size, ClipResize::ShortestEdge(32));
        let scalar = parse(r#"{"image_mean": 0.5, "image_std": 0.25}"#).expect("scalars");
        assert_eq!((scalar.image_mean, scalar.image_std), ([0.5; 3], [0.25; 3]));
    }

    #[test]
    fn default_mean_is_numpys_float32() {
        // np.float32(0.48145466) rounds the float64; the f32 literal rounds the decimal.
        let d = ClipImageConfig::default();
        assert_eq!(d.image_mean[0], 0.48145466_f64 as f32);
        assert_eq!(d.image_std[2], 0.27577711_f64 as f32);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            (r#"{"resample": 0}"#, "resample 0"),
            (r#"{"resample": 4}"#, "resample 4"),
            (r#"{"size": {"shortest_edge": 0}}"#, "empty side"),
            (
                r#"{"size": {"shortest_edge": 224, "longest_edge": 300}}"#,
                "is not supported",
            ),
            (r#"{"size": -3}"#, "is not supported"),
            (r#"{"crop_size": {"shortest_edge": 224}}"#, "crop_size"),
            (r#"{"crop_size": {"side": 224}}"#, "crop_size {"),
            (
                r#"{"image_processor_type": "SiglipImageProcessor"}"#,
                "not a CLIPImageProcessor",
            ),
            (r#"{"crop_size": 0}"#, "crop_size 0x0 is empty"),
            (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean must be"),
            (r#"{"image_std": [0.5, 0, 0.5]}"#, "image_std contains 0"),
            (
                r#"{"do_pad": true, "pad_size": {"height": 9, "width": 9}}"#,
                "pad_size",
            ),
        ];
        for (json, expected) in cases {
            let err = parse(json).expect_err(json);
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn padding_is_minus_mean_over_std() {
        let image = RgbImage::new(1, 1, vec![255, 255, 255]).expect("image");
        let config = ClipImageConfig {
            do_resize: false,
            crop_size: (3, 2),
            ..ClipImageConfig::default()
        };
        let out = clip_pixel_values(&image, &config).expect("pixel values");
        assert_eq!(out.shape(), &[1, 3, 2, 3]);
        // The pixel lands at ceil((2 - 1) / 2) = 1, ceil((3 - 1) / 2) = 1.
        let (mean, std) = (config.image_mean[0], config.image_std[0]);
        assert_eq!(out[[0, 0, 1, 1]], (1.0 - mean) / std);
        assert_eq!(out[[0, 0, 0, 0]], -mean / std);
    }
}
