//! Prompt conditioning for SD (one CLIP encoder) and SDXL (two encoders, pooled embeddings and
//! time ids), in one place so every task shares it.
//!
//! The maths follows diffusers' `encode_prompt` of `StableDiffusionPipeline` and
//! `StableDiffusionXLPipeline`, including SDXL's `force_zeros_for_empty_prompt`.

use ndarray::{concatenate, Array2, ArrayD, Axis, IxDyn};

use crate::runtime::{Graph, TensorInput};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// One text encoder with its tokenizer.
#[derive(Debug)]
pub struct TextEncoder {
    /// The tokenizer of this encoder.
    pub tokenizer: ClipTokenizer,
    /// The encoder graph.
    pub graph: Graph,
    /// The `hidden_states.N` output holding the penultimate layer (SDXL); `None` for SD.
    penultimate: Option<String>,
}

impl TextEncoder {
    /// Wraps an encoder; `xl` selects the penultimate hidden state as SDXL does.
    pub fn new(tokenizer: ClipTokenizer, graph: Graph, xl: bool) -> Result<Self> {
        graph.require_inputs(&["input_ids"])?;
        let penultimate = if xl {
            let mut layers: Vec<usize> = graph
                .outputs()
                .iter()
                .filter_map(|o| o.name.strip_prefix("hidden_states.")?.parse().ok())
                .collect();
            layers.sort_unstable();
            if layers.len() < 2 {
                return Err(Error::model(
                    graph.name(),
                    "an SDXL text encoder must output every hidden state (hidden_states.0 ... \
                     hidden_states.N); re-export it with `python -m export convert`",
                ));
            }
            Some(format!("hidden_states.{}", layers[layers.len() - 2]))
        } else {
            if !graph.has_output("last_hidden_state") {
                return Err(Error::model(
                    graph.name(),
                    "the text encoder has no output 'last_hidden_state'",
                ));
            }
            None
        };
        Ok(TextEncoder {
            tokenizer,
            graph,
            penultimate,
        })
    }

    fn ids(&self, text: &str) -> Result<ArrayD<i64>> {
        let ids = self.tokenizer.encode(text)?;
        let len = ids.len();
        ArrayD::from_shape_vec(IxDyn(&[1, len]), ids)
            .map_err(|e| Error::Tokenizer(format!("token ids: {e}")))
    }

    /// Hidden states `[1, seq, d]` (SD: last layer; SDXL: penultimate) and, where the graph has
    /// one, the projected pooled embedding `[1, proj]`.
    fn encode(&mut self, text: &str) -> Result<(ArrayD<f32>, Option<ArrayD<f32>>)> {
        let ids = self.ids(text)?;
        let hidden_name = self
            .penultimate
            .clone()
            .unwrap_or_else(|| "last_hidden_state".to_string());
        let pooled = self.graph.has_output("text_embeds");
        let mut wanted = vec![hidden_name.as_str()];
        if pooled {
            wanted.push("text_embeds");
        }
        let mut out = self
            .graph
            .run(vec![("input_ids", TensorInput::I64(ids))], &wanted)?;
        let pooled = if pooled { out.pop() } else { None };
        let hidden = out
            .pop()
            .ok_or_else(|| Error::invariant("text encoder returned nothing"))?;
        Ok((hidden, pooled))
    }
}

/// What the UNet is conditioned on for a whole batch (CFG halves included).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `encoder_hidden_states`: `[batch, seq, d]`.
    pub hidden_states: ArrayD<f32>,
    /// SDXL `text_embeds`: `[batch, proj]`.
    pub pooled: Option<ArrayD<f32>>,
    /// SDXL `time_ids`: `[batch, 6]`.
    pub time_ids: Option<ArrayD<f32>>,
    /// The UNet's IP-Adapter inputs by name (`ip_key_i`, `ip_value_i`, `ip_adapter_scale`):
    /// the adapter's for the request's reference image, else zeros; empty for a UNet without
    /// them. The UNet reads them, the ControlNets do not.
    pub ip_adapter: Vec<(String, ArrayD<f32>)>,
}

fn repeat_rows(a: &ArrayD<f32>, times: usize) -> Result<ArrayD<f32>> {
    let views: Vec<_> = (0..times).map(|_| a.view()).collect();
    concatenate(Axis(0), &views).map_err(|e| Error::internal("batching embeddings", e))
}

fn cat(parts: &[ArrayD<f32>], axis: usize) -> Result<ArrayD<f32>> {
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    concatenate(Axis(axis), &views).map_err(|e| Error::internal("joining embeddings", e))
}

/// Prompts for one generation.
#[derive(Debug, Clone)]
pub struct PromptSpec<'a> {
    /// The prompt.
    pub prompt: &'a str,
    /// The negative prompt; `None` differs from `""` for SDXL (zero embeddings).
    pub negative_prompt: Option<&'a str>,
    /// Images per prompt.
    pub num_images: usize,
    /// Whether classifier-free guidance runs (the unconditional half comes first).
    pub guidance: bool,
}

/// SD 1.x/2.x: `last_hidden_state` of the one encoder.
pub fn encode_sd(encoder: &mut TextEncoder, spec: &PromptSpec<'_>) -> Result<Conditioning> {
    let (cond, _) = encoder.encode(spec.prompt)?;
    let cond = repeat_rows(&cond, spec.num_images)?;
    let hidden_states = if spec.guidance {
        let (uncond, _) = encoder.encode(spec.negative_prompt.unwrap_or(""))?;
        cat(&[repeat_rows(&uncond, spec.num_images)?, cond], 0)?
    } else {
        cond
    };
    Ok(Conditioning {
        hidden_states,
        pooled: None,
        time_ids: None,
        ip_adapter: Vec::new(),
    })
}

/// SDXL: penultimate hidden states of both encoders side by side, the second encoder's pooled
/// projection, and `add_time_ids` = (original size, crop top-left, target size).
pub fn encode_sdxl(
    encoders: [&mut TextEncoder; 2],
    spec: &PromptSpec<'_>,
    force_zeros_for_empty_prompt: bool,
    height: usize,
    width: usize,
) -> Result<Conditioning> {
    let [first, second] = encoders;
    let encode_pair = |first: &mut TextEncoder,
                       second: &mut TextEncoder,
                       text: &str|
     -> Result<(ArrayD<f32>, ArrayD<f32>)> {
        let (h1, _) = first.encode(text)?;
        let (h2, pooled) = second.encode(text)?;
        let pooled = pooled.ok_or_else(|| {
            Error::model(
                second.graph.name(),
                "text_encoder_2 has no 'text_embeds' output (it must be a CLIPTextModelWithProjection)",
            )
        })?;
        Ok((cat(&[h1, h2], 2)?, pooled))
    };
    let (cond, cond_pooled) = encode_pair(first, second, spec.prompt)?;
    let n = spec.num_images;
    let time_ids_row = Array2::from_shape_vec(
        (1, 6),
        vec![
            height as f32,
            width as f32,
            0.0,
            0.0,
            height as f32,
            width as f32,
        ],
    )
    .map_err(|e| Error::internal("time ids", e))?
    .into_dyn();
    let (hidden_states, pooled, rows) = if spec.guidance {
        let (uncond, uncond_pooled) =
            if spec.negative_prompt.is_none() && force_zeros_for_empty_prompt {
                (
                    ArrayD::zeros(cond.raw_dim()),
                    ArrayD::zeros(cond_pooled.raw_dim()),
                )
            } else {
                encode_pair(first, second, spec.negative_prompt.unwrap_or(""))?
            };
        (
            cat(&[repeat_rows(&uncond, n)?, repeat_rows(&cond, n)?], 0)?,
            cat(
                &[
                    repeat_rows(&uncond_pooled, n)?,
                    repeat_rows(&cond_pooled, n)?,
                ],
                0,
            )?,
            2 * n,
        )
    } else {
        (repeat_rows(&cond, n)?, repeat_rows(&cond_pooled, n)?, n)
    };
    Ok(Conditioning {
        hidden_states,
        pooled: Some(pooled),
        time_ids: Some(repeat_rows(&time_ids_row, rows)?),
        ip_adapter: Vec::new(),
    })
}
