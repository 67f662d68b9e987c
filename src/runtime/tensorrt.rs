//! TensorRT optimisation profiles derived from the requested image size and batch.
//!
//! TensorRT needs the min/opt/max shape of every dynamic input before it builds an engine.
//! tcd-ort derives them from the graph's declared inputs and a [`TrtProfile`], knowing how SD
//! graphs relate their dimensions to the image size:
//!
//! | input | shape |
//! |---|---|
//! | `sample`, `latent_sample`, other 4-d inputs | `[batch, c, H/8, W/8]`; `[batch, 3, H, W]` when c = 3 (pixels) |
//! | `down_block_additional_residual_{i}` | `[batch, c_i, H/(8*2^(i/3)), W/(8*2^(i/3))]` |
//! | `mid_block_additional_residual` | the size of the last down residual |
//! | `encoder_hidden_states`, `input_ids` | `[batch, 77, ...]` (CLIP's sequence length) |
//! | `timestep`, `text_embeds`, `time_ids` | `[batch, ...]` |
//! | `ip_key_{i}`, `ip_value_{i}` | `[batch, 1, width_i]` (the IP-Adapter branch without an adapter) |
//!
//! Fixed dimensions keep their declared size.

use super::initializers::{DeclaredDim, DeclaredInput};
use super::options::{ShapeDims, TrtProfile};
use crate::{Error, Result};

/// CLIP's token sequence length.
const SEQUENCE: i64 = 77;
/// The axis of the UNet's IP-Adapter keys and values that counts image tokens.
const IP_TOKENS_AXIS: &str = "ip_tokens";
/// The VAE's spatial down-sampling factor.
const LATENT_FACTOR: usize = 8;

/// The three `trt_profile_*_shapes` strings of one graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileShapes {
    /// `trt_profile_min_shapes`.
    pub min: String,
    /// `trt_profile_opt_shapes`.
    pub opt: String,
    /// `trt_profile_max_shapes`.
    pub max: String,
}

fn residual_index(name: &str) -> Option<usize> {
    name.strip_prefix("down_block_additional_residual_")?
        .parse()
        .ok()
}

/// The spatial down-sampling of a 4-d input relative to the image.
fn spatial_factor(input: &DeclaredInput, down_residuals: usize, latent: usize) -> usize {
    if let Some(i) = residual_index(&input.name) {
        return latent << (i / 3);
    }
    if input.name == "mid_block_additional_residual" {
        return latent << (down_residuals.saturating_sub(1) / 3);
    }
    match input.dims.get(1) {
        Some(DeclaredDim::Fixed(3)) => 1,
        _ => latent,
    }
}

fn sizes_for(
    input: &DeclaredInput,
    dims: &ShapeDims,
    down_residuals: usize,
    latent: usize,
) -> Result<Option<Vec<i64>>> {
    if !input
        .dims
        .iter()
        .any(|d| !matches!(d, DeclaredDim::Fixed(_)))
    {
        return Ok(None);
    }
    let rank = input.dims.len();
    let factor = spatial_factor(input, down_residuals, latent);
    let mut out = Vec::with_capacity(rank);
    for (axis, dim) in input.dims.iter().enumerate() {
        let size = match dim {
            DeclaredDim::Fixed(n) => *n,
            _ if axis == 0 => dims.batch as i64,
            _ if rank == 4 && axis == 2 => (dims.height / factor) as i64,
            _ if rank == 4 && axis == 3 => (dims.width / factor) as i64,
            _ if axis == 1
                && (input.name == "encoder_hidden_states" || input.name == "input_ids") =>
            {
                SEQUENCE
            }
            DeclaredDim::Named(n) if n.contains("seq") => SEQUENCE,
            // The IP-Adapter branch's image tokens: one zero token when no adapter runs (an
            // engine with fixed shapes refuses an IP-Adapter at load).
            DeclaredDim::Named(n) if n == IP_TOKENS_AXIS => 1,
            _ => {
                return Err(Error::invalid(format!(
                    "cannot derive a fixed size for input '{}' (axis {axis} of {rank} is \
                     dynamic and not a batch, image or sequence axis); re-export the graph with \
                     that axis fixed",
                    input.name
                )))
            }
        };
        if size <= 0 {
            return Err(Error::invalid(format!(
                "the TensorRT profile gives input '{}' a zero-sized axis {axis}; the image size \
                 must be at least {} pixels",
                input.name,
                factor * 8
            )));
        }
        out.push(size);
    }
    Ok(Some(out))
}

fn shape_for(
    input: &DeclaredInput,
    dims: &ShapeDims,
    down_residuals: usize,
) -> Result<Option<String>> {
    Ok(
        sizes_for(input, dims, down_residuals, LATENT_FACTOR)?.map(|sizes| {
            let sizes: Vec<String> = sizes.iter().map(i64::to_string).collect();
            format!("{}:{}", input.name, sizes.join("x"))
        }),
    )
}

/// The size of every named dynamic dimension of `inputs` at one image size and batch, for
/// ONNX Runtime's free-dimension overrides: with every input shape known when the session is
/// built, the optimiser folds the graph's shape arithmetic away (on CUDA that arithmetic
/// otherwise runs on the CPU inside every step). An error when a dimension cannot be derived
/// or one name would need two sizes. `latent_factor` is the VAE's down-sampling (8 for every
/// released SD model).
pub fn dimension_overrides(
    inputs: &[DeclaredInput],
    dims: &ShapeDims,
    latent_factor: usize,
) -> Result<Vec<(String, i64)>> {
    let down_residuals = inputs
        .iter()
        .filter(|i| residual_index(&i.name).is_some())
        .count();
    let mut out: Vec<(String, i64)> = Vec::new();
    for input in inputs {
        let Some(sizes) = sizes_for(input, dims, down_residuals, latent_factor)? else {
            continue;
        };
        for (dim, size) in input.dims.iter().zip(sizes) {
            let DeclaredDim::Named(name) = dim else {
                continue;
            };
            match out.iter().find(|(n, _)| n == name) {
                Some((_, known)) if *known != size => {
                    return Err(Error::invalid(format!(
                        "dimension '{name}' would be {known} for one input and {size} for '{}'; \
                         the graph cannot be fixed to one size",
                        input.name
                    )))
                }
                Some(_) => {}
                None => out.push((name.clone(), size)),
            }
        }
    }
    Ok(out)
}

/// The min/opt/max shapes of every dynamic input, or `None` when the graph is fully static.
pub fn profile_shapes(
    inputs: &[DeclaredInput],
    profile: &TrtProfile,
) -> Result<Option<ProfileShapes>> {
    let down_residuals = inputs
        .iter()
        .filter(|i| residual_index(&i.name).is_some())
        .count();
    let corner = |dims: &ShapeDims| -> Result<String> {
        let mut parts = Vec::new();
        for input in inputs {
            if let Some(s) = shape_for(input, dims, down_residuals)? {
                parts.push(s);
            }
        }
        Ok(parts.join(","))
    };
    let min = corner(&profile.min)?;
    if min.is_empty() {
        return Ok(None);
    }
    Ok(Some(ProfileShapes {
        min,
        opt: corner(&profile.opt)?,
        max: corner(&profile.max)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, dims: &[Option<i64>]) -> DeclaredInput {
        DeclaredInput {
            name: name.into(),
            dims: dims
                .iter()
                .map(|d| match d {
                    Some(n) => DeclaredDim::Fixed(*n),
                    None => DeclaredDim::Named("d".into()),
                })
                .collect(),
        }
    }

    fn named(name: &str, dims: &[&str]) -> DeclaredInput {
        DeclaredInput {
            name: name.into(),
            dims: dims
                .iter()
                .map(|d| match d.parse() {
                    Ok(n) => DeclaredDim::Fixed(n),
                    Err(_) => DeclaredDim::Named((*d).into()),
                })
                .collect(),
        }
    }

    #[test]
    fn fixed_shapes_name_every_dynamic_dimension_once() {
        let mut inputs = vec![
            named("sample", &["batch", "4", "height", "width"]),
            named("timestep", &["batch"]),
            named("encoder_hidden_states", &["batch", "sequence", "768"]),
            named(
                "controlnet_cond",
                &["batch", "3", "image_height", "image_width"],
            ),
        ];
        // SD1.5's twelve down residuals: three per resolution level.
        for i in 0..12 {
            let (h, w) = match i / 3 {
                0 => ("height".to_string(), "width".to_string()),
                level => (format!("height_{level}"), format!("width_{level}")),
            };
            inputs.push(named(
                &format!("down_block_additional_residual_{i}"),
                &["batch", "320", &h, &w],
            ));
        }
        inputs.push(named(
            "mid_block_additional_residual",
            &["batch", "1280", "height_3", "width_3"],
        ));
        let dims = ShapeDims {
            width: 768,
            height: 512,
            batch: 2,
        };
        let mut got = dimension_overrides(&inputs, &dims, 8).expect("derivable");
        got.sort();
        let want: Vec<(String, i64)> = [
            ("batch", 2),
            ("height", 64),
            ("height_1", 32),
            ("height_2", 16),
            ("height_3", 8),
            ("image_height", 512),
            ("image_width", 768),
            ("sequence", 77),
            ("width", 96),
            ("width_1", 48),
            ("width_2", 24),
            ("width_3", 12),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), *v))
        .collect();
        assert_eq!(got, want);
        // A tiny VAE that down-samples by 2 halves only the latent axes.
        let tiny = dimension_overrides(&inputs[..1], &dims, 2).expect("derivable");
        assert!(tiny.contains(&("height".to_string(), 256)), "{tiny:?}");
    }

    #[test]
    fn one_name_with_two_sizes_cannot_be_fixed() {
        // `height` names a latent axis and a pixel axis: no single size fits both.
        let inputs = vec![
            named("sample", &["batch", "4", "height", "width"]),
            named("controlnet_cond", &["batch", "3", "height", "width"]),
        ];
        let dims = ShapeDims {
            width: 512,
            height: 512,
            batch: 1,
        };
        let err = dimension_overrides(&inputs, &dims, 8).expect_err("conflict");
        assert!(err.to_string().contains("dimension 'height'"), "{err}");
    }

    #[test]
    fn sd15_unet_with_controlnet_residuals() {
        let mut inputs = vec![
            input("sample", &[None, Some(4), None, None]),
            input("timestep", &[None]),
            input("encoder_hidden_states", &[None, None, Some(768)]),
        ];
        let channels = [
            320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280,
        ];
        for (i, c) in channels.iter().enumerate() {
            inputs.push(input(
                &format!("down_block_additional_residual_{i}"),
                &[None, Some(*c), None, None],
            ));
        }
        inputs.push(input(
            "mid_block_additional_residual",
            &[None, Some(1280), None, None],
        ));
        let profile: TrtProfile = "512x512x1:512x768x2:1024x1024x2".parse().expect("profile");
        let shapes = profile_shapes(&inputs, &profile)
            .expect("derivable")
            .expect("dynamic");
        let opt: Vec<&str> = shapes.opt.split(',').collect();
        assert_eq!(opt[0], "sample:2x4x96x64");
        assert_eq!(opt[1], "timestep:2");
        assert_eq!(opt[2], "encoder_hidden_states:2x77x768");
        assert_eq!(opt[3], "down_block_additional_residual_0:2x320x96x64");
        assert_eq!(opt[6], "down_block_additional_residual_3:2x320x48x32");
        assert_eq!(opt[12], "down_block_additional_residual_9:2x1280x12x8");
        assert_eq!(opt[15], "mid_block_additional_residual:2x1280x12x8");
        assert!(
            shapes.min.starts_with("sample:1x4x64x64,"),
            "{}",
            shapes.min
        );
        assert!(
            shapes.max.starts_with("sample:2x4x128x128,"),
            "{}",
            shapes.max
        );
    }

    #[test]
    fn sdxl_mid_residual_and_conditioning() {
        let mut inputs = vec![
            input("sample", &[None, Some(4), None, None]),
            input("text_embeds", &[None, Some(1280)]),
            input("time_ids", &[None, Some(6)]),
        ];
        for i in 0..9 {
            inputs.push(input(
                &format!("down_block_additional_residual_{i}"),
                &[None, Some(320), None, None],
            ));
        }
        inputs.push(input(
            "mid_block_additional_residual",
            &[None, Some(1280), None, None],
        ));
        let profile: TrtProfile = "1024x1024x2".parse().expect("profile");
        let shapes = profile_shapes(&inputs, &profile)
            .expect("derivable")
            .expect("dynamic");
        assert!(shapes.opt.contains("text_embeds:2x1280,time_ids:2x6,"));
        assert!(shapes
            .opt
            .ends_with("mid_block_additional_residual:2x1280x32x32"));
    }

    #[test]
    fn vae_and_text_encoder() {
        let profile: TrtProfile = "512x512x1".parse().expect("profile");
        let vae_enc = profile_shapes(&[input("sample", &[None, Some(3), None, None])], &profile)
            .expect("derivable")
            .expect("dynamic");
        assert_eq!(vae_enc.opt, "sample:1x3x512x512");
        let vae_dec = profile_shapes(
            &[input("latent_sample", &[None, Some(4), None, None])],
            &profile,
        )
        .expect("derivable")
        .expect("dynamic");
        assert_eq!(vae_dec.max, "latent_sample:1x4x64x64");
        let text = profile_shapes(&[input("input_ids", &[None, Some(77)])], &profile)
            .expect("derivable")
            .expect("dynamic");
        assert_eq!(text.min, "input_ids:1x77");
    }

    #[test]
    fn static_graphs_need_no_profile_and_unknown_axes_are_errors() {
        let profile: TrtProfile = "512x512x1".parse().expect("profile");
        let fixed = [input("sample", &[Some(1), Some(4), Some(64), Some(64)])];
        assert_eq!(profile_shapes(&fixed, &profile).ok(), Some(None));
        let odd = [input("mystery", &[None, None])];
        let err = profile_shapes(&odd, &profile).expect_err("underivable");
        assert!(err.to_string().contains("mystery"), "{err}");
    }
}
