//! The ControlNet residual inputs of a UNet export: their names and shapes, and whether a
//! ControlNet fits them.

use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use super::{numbered, ControlNet, DOWN_INPUT, MID_INPUT, MID_OUTPUT};
use crate::model::UnetConfig;
use crate::runtime::Graph;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub(super) struct Residual {
    name: String,
    channels: usize,
    /// How many times the latent resolution is halved (ceil) at this residual.
    level: usize,
}

/// The ControlNet residual inputs of a UNet export and their shapes.
#[derive(Debug, Clone)]
pub(crate) struct ResidualLayout {
    pub(super) down: Vec<Residual>,
    mid: Residual,
}

pub(super) fn halve(mut v: usize, times: usize) -> usize {
    for _ in 0..times {
        v = v.div_ceil(2);
    }
    v
}

impl ResidualLayout {
    /// `None` when the UNet export has no residual inputs (an older or an optimum export).
    pub(crate) fn from_unet(
        unet: &Graph,
        config: &UnetConfig,
        root: &Path,
    ) -> Result<Option<Self>> {
        let down_names = numbered(
            unet.inputs().iter().map(|i| i.name.as_str()),
            DOWN_INPUT,
            root,
        )?;
        let has_mid = unet.input(MID_INPUT).is_some();
        if down_names.is_empty() && !has_mid {
            return Ok(None);
        }
        if down_names.is_empty() || !has_mid {
            return Err(Error::model(
                root,
                format!("the UNet has only some of the ControlNet residual inputs ({DOWN_INPUT}<i>, {MID_INPUT}); re-export it"),
            ));
        }
        let blocks = &config.block_out_channels;
        if blocks.is_empty() {
            return Err(Error::model(
                root.join("unet").join("config.json"),
                "block_out_channels is missing; it is needed for the ControlNet residual shapes",
            ));
        }
        let per_block = config.layers_per_block.unwrap_or(2);
        // diffusers' UNet: conv_in, then `layers_per_block` resnets per down block, then a
        // downsampler after every block but the last.
        let mut shapes = vec![(blocks[0], 0)];
        for (b, &c) in blocks.iter().enumerate() {
            shapes.extend(std::iter::repeat_n((c, b), per_block));
            if b + 1 < blocks.len() {
                shapes.push((c, b + 1));
            }
        }
        if shapes.len() != down_names.len() {
            return Err(Error::model(
                root,
                format!(
                    "the UNet has {} down-block residual inputs but its config implies {}",
                    down_names.len(),
                    shapes.len()
                ),
            ));
        }
        let static_channels = |name: &str, fallback: usize| {
            unet.input(name)
                .and_then(|i| i.shape.get(1).copied())
                .filter(|&c| c > 0)
                .map_or(fallback, |c| c as usize)
        };
        let down = down_names
            .into_iter()
            .zip(shapes)
            .map(|(name, (c, level))| Residual {
                channels: static_channels(&name, c),
                name,
                level,
            })
            .collect();
        let last = blocks.len() - 1;
        let mid = Residual {
            name: MID_INPUT.to_string(),
            channels: static_channels(MID_INPUT, blocks[last]),
            level: last,
        };
        Ok(Some(ResidualLayout { down, mid }))
    }

    fn all(&self) -> impl Iterator<Item = &Residual> {
        self.down.iter().chain(std::iter::once(&self.mid))
    }

    /// The UNet's residual inputs, down blocks first, then the mid block.
    pub(in crate::pipeline) fn names(&self) -> impl Iterator<Item = &str> {
        self.all().map(|r| r.name.as_str())
    }

    /// Zero residuals for a UNet batch of latents `[batch, c, h, w]`, by input name.
    pub(in crate::pipeline) fn zeros(
        &self,
        batch: usize,
        h: usize,
        w: usize,
    ) -> Vec<(&str, ArrayD<f32>)> {
        self.all()
            .map(|r| {
                let shape = [batch, r.channels, halve(h, r.level), halve(w, r.level)];
                (r.name.as_str(), ArrayD::zeros(IxDyn(&shape)))
            })
            .collect()
    }

    /// Checks that `net` was made for this UNet: same number of residuals, same channels, same
    /// conditioning family.
    pub(crate) fn check(&self, net: &ControlNet, xl: bool, config: &UnetConfig) -> Result<()> {
        let another = |detail: String| {
            Error::model(
                &net.dir,
                format!(
                    "this ControlNet was made for another base model than the one loaded: {detail}"
                ),
            )
        };
        if net.xl != xl {
            return Err(another(format!(
                "it is an {} ControlNet and the model is {}",
                if net.xl { "SDXL" } else { "SD 1.x/2.x" },
                if xl { "SDXL" } else { "SD 1.x/2.x" }
            )));
        }
        if !net.cross_attention_dim.is_null()
            && !config.cross_attention_dim.is_null()
            && net.cross_attention_dim != config.cross_attention_dim
        {
            return Err(another(format!(
                "its cross_attention_dim is {} and the UNet's is {}",
                net.cross_attention_dim, config.cross_attention_dim
            )));
        }
        if net.down_outputs.len() != self.down.len() {
            return Err(another(format!(
                "it returns {} down-block residuals and the UNet takes {}",
                net.down_outputs.len(),
                self.down.len()
            )));
        }
        let outputs = net
            .down_outputs
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(MID_OUTPUT));
        for (output, residual) in outputs.zip(self.all()) {
            if let Some(c) = net.channels(output) {
                if c != residual.channels {
                    return Err(another(format!(
                        "its {output} has {c} channels and the UNet's {} takes {}",
                        residual.name, residual.channels
                    )));
                }
            }
        }
        Ok(())
    }
}
