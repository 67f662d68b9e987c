//! CLIP tokenization, id-for-id with what diffusers feeds the text encoders.
//!
//! diffusers' `encode_prompt` calls
//! `tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)`
//! with transformers' `CLIPTokenizer`. Since transformers 5 that class is backed by the
//! `tokenizers` library and, whatever files it was loaded from, rebuilds the same pipeline:
//!
//! 1. normalizer: NFC, every run of whitespace to one space, lowercase;
//! 2. pre-tokenizer: CLIP's split regex (keeping the matches) followed by GPT-2 byte-level mapping;
//! 3. model: BPE over CLIP's 49408-token vocabulary, `</w>` marking the end of a word;
//! 4. special tokens (`bos`, `eos`, `unk`, `pad`) matched in the raw text as whole tokens, which is
//!    why SDXL's second tokenizer (pad `!`) encodes every `!` as id 0;
//! 5. `<|startoftext|>` … `<|endoftext|>` around at most `model_max_length - 2` tokens, then padding.
//!
//! [`ClipTokenizer`] reproduces that pipeline from either `tokenizer.json` (what `save_pretrained`
//! writes) or `vocab.json` + `merges.txt` (what optimum-cli exports), so both layouts give the same
//! ids. Note that this is not OpenAI's original `SimpleTokenizer`: there is no `ftfy` repair and no
//! HTML unescaping (`&amp;` stays four characters), exactly as in transformers.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// CLIP's pre-tokenization regex, as in transformers' `CLIPTokenizer` and OpenAI's
/// `simple_tokenizer.py`.
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// transformers' default `bos_token` for CLIP.
const DEFAULT_BOS: &str = "<|startoftext|>";
/// transformers' default `eos_token`, `unk_token` and `pad_token` for CLIP.
const DEFAULT_EOS: &str = "<|endoftext|>";
/// CLIP's context length; every Stable Diffusion text encoder uses it.
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// A CLIP tokenizer loaded from a model's `tokenizer/` (or `tokenizer_2/`) directory.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// The special tokens and length a tokenizer directory's JSON configs declare.
struct Config {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    max_length: usize,
    /// `added_tokens_decoder` of `tokenizer_config.json`, which transformers re-adds on load.
    added: Vec<AddedToken>,
}

impl ClipTokenizer {
    /// Load the tokenizer in `dir`.
    ///
    /// Uses `tokenizer.json` when present, otherwise `vocab.json` + `merges.txt`; reads the special
    /// tokens and `model_max_length` (default 77) from `tokenizer_config.json`, falling back to
    /// `special_tokens_map.json` the way transformers does.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::model(
                dir,
                "tokenizer directory not found (expected tokenizer.json, or vocab.json and merges.txt)",
            ));
        }
        let config = read_config(dir)?;
        let json = dir.join("tokenizer.json");
        let mut tokenizer = if json.is_file() {
            let mut t = Tokenizer::from_file(&json)
                .map_err(|e| Error::model(&json, format!("cannot load tokenizer.json: {e}")))?;
            let is_bpe = matches!(t.get_model(), tokenizers::ModelWrapper::BPE(_));
            if !is_bpe {
                return Err(Error::model(
                    &json,
                    "not a BPE tokenizer, so not a CLIP tokenizer",
                ));
            }
            // transformers 5 keeps only the vocabulary and merges of tokenizer.json and rebuilds
            // CLIP's pipeline around them; do the same so old files behave like new ones.
            t.with_truncation(None)
                .map_err(|e| Error::model(&json, format!("cannot clear truncation: {e}")))?;
            t.with_padding(None);
            t
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            for p in [&vocab_path, &merges_path] {
                if !p.is_file() {
                    return Err(Error::model(
                        dir,
                        format!(
                            "neither tokenizer.json nor {} found",
                            p.file_name()
                                .map(|n| n.to_string_lossy())
                                .unwrap_or_default()
                        ),
                    ));
                }
            }
            let vocab = read_vocab(&vocab_path)?;
            let merges = read_merges(&merges_path)?;
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .end_of_word_suffix("</w>".to_string())
                .continuing_subword_prefix(String::new())
                .unk_token(config.unk.clone())
                .fuse_unk(false)
                .build()
                .map_err(|e| Error::model(dir, format!("invalid vocab.json/merges.txt: {e}")))?;
            Tokenizer::new(bpe)
        };
        install_clip_pipeline(&mut tokenizer, dir)?;

        let id_of = |token: &str, role: &str| -> Result<u32> {
            tokenizer.token_to_id(token).ok_or_else(|| {
                Error::model(
                    dir,
                    format!("{role} token {token:?} is not in the vocabulary"),
                )
            })
        };
        let bos_id = id_of(&config.bos, "bos")?;
        let eos_id = id_of(&config.eos, "eos")?;
        let pad_id = id_of(&config.pad, "pad")?;
        id_of(&config.unk, "unk")?;

        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((config.eos.clone(), eos_id), (config.bos.clone(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        tokenizer.add_special_tokens(&config.added);
        let specials: Vec<AddedToken> = [&config.unk, &config.bos, &config.eos, &config.pad]
            .into_iter()
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        tokenizer.add_special_tokens(&specials);

        Ok(Self {
            tokenizer,
            max_length: config.max_length,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// The ids diffusers passes to the text encoder: `<|startoftext|>`, at most
    /// `max_length - 2` tokens of `text`, `<|endoftext|>`, then the pad id up to
    /// [`max_length`](Self::max_length).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let body = self.body(text)?;
        let keep = body.len().min(self.max_length.saturating_sub(2));
        let mut ids = Vec::with_capacity(self.max_length.max(2));
        ids.push(i64::from(self.bos_id));
        ids.extend(body[..keep].iter().map(|&id| i64::from(id)));
        ids.push(i64::from(self.eos_id));
        ids.resize(self.max_length.max(ids.len()), i64::from(self.pad_id));
        Ok(ids)
    }

    /// Length of `text`'s ids with `<|startoftext|>` and `<|endoftext|>` but without truncation;
    /// above [`max_length`](Self::max_length) the prompt is cut, and diffusers warns.
    pub fn untruncated_len(&self, text: &str) -> Result<usize> {
        Ok(self.body(text)?.len() + 2)
    }

    /// The part of `text` that [`encode`](Self::encode) drops, decoded the way diffusers prints it
    /// in its truncation warning, or `None` when nothing is dropped.
    pub fn truncated_text(&self, text: &str) -> Result<Option<String>> {
        let body = self.body(text)?;
        let keep = self.max_length.saturating_sub(2);
        if body.len() <= keep {
            return Ok(None);
        }
        let decoded = self
            .tokenizer
            .decode(&body[keep..], false)
            .map_err(|e| Error::Tokenizer(format!("cannot decode truncated tokens: {e}")))?;
        Ok(Some(decoded.replace("</w>", " ").trim().to_string()))
    }

    /// `model_max_length` from `tokenizer_config.json` (77 for every Stable Diffusion tokenizer).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id [`encode`](Self::encode) pads with: 49407 (`<|endoftext|>`) for SD1.5/SD2.1's
    /// tokenizer, 0 (`!`) for SDXL's `tokenizer_2`.
    pub fn pad_id(&self) -> i64 {
        i64::from(self.pad_id)
    }

    /// The `<|startoftext|>` id.
    pub fn bos_id(&self) -> i64 {
        i64::from(self.bos_id)
    }

    /// The `<|endoftext|>` id.
    pub fn eos_id(&self) -> i64 {
        i64::from(self.eos_id)
    }

    /// The ids of `text` between the special tokens.
    fn body(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// Set the normalizer, pre-tokenizer and decoder of transformers 5's `CLIPTokenizer`.
fn install_clip_pipeline(tokenizer: &mut Tokenizer, dir: &Path) -> Result<()> {
    let internal =
        |e: tokenizers::Error| Error::model(dir, format!("cannot build CLIP pipeline: {e}"));
    let whitespace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(internal)?;
    tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
        NFC.into(),
        whitespace.into(),
        Lowercase.into(),
    ])));
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_REGEX.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(internal)?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(())
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::model(path, format!("invalid JSON: {e}")))
}

/// A special token entry: either a plain string or an `AddedToken` dict with `content`.
fn token_str(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_config(dir: &Path) -> Result<Config> {
    let config_path = dir.join("tokenizer_config.json");
    let config = read_json(&config_path)?.unwrap_or(Value::Null);
    let map_path = dir.join("special_tokens_map.json");
    let map = read_json(&map_path)?.unwrap_or(Value::Null);
    let decoder = config
        .get("added_tokens_decoder")
        .and_then(Value::as_object);

    // transformers reads special_tokens_map.json only for configs without added_tokens_decoder,
    // and then lets it override tokenizer_config.json.
    let lookup = |key: &str, default: &str| -> String {
        let from_map = if decoder.is_none() {
            token_str(map.get(key))
        } else {
            None
        };
        from_map
            .or_else(|| token_str(config.get(key)))
            .unwrap_or_else(|| default.to_string())
    };

    let max_length = match config.get("model_max_length") {
        None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
        Some(v) => match v.as_u64() {
            Some(n) if (2..=1 << 20).contains(&n) => n as usize,
            _ => {
                return Err(Error::model(
                    &config_path,
                    format!("model_max_length must be an integer between 2 and 1048576, got {v}"),
                ))
            }
        },
    };

    let mut added = Vec::new();
    if let Some(decoder) = decoder {
        let mut entries: Vec<(u64, &Value)> = decoder
            .iter()
            .filter_map(|(k, v)| k.parse::<u64>().ok().map(|id| (id, v)))
            .collect();
        entries.sort_by_key(|(id, _)| *id);
        for (_, v) in entries {
            let Some(content) = token_str(Some(v)) else {
                return Err(Error::model(
                    &config_path,
                    "added_tokens_decoder entry without \"content\"",
                ));
            };
            let flag =
                |name: &str, default: bool| v.get(name).and_then(Value::as_bool).unwrap_or(default);
            let special = flag("special", false);
            added.push(
                AddedToken::from(content, special)
                    .single_word(flag("single_word", false))
                    .lstrip(flag("lstrip", false))
                    .rstrip(flag("rstrip", false))
                    .normalized(flag("normalized", !special)),
            );
        }
    }

    Ok(Config {
        bos: lookup("bos_token", DEFAULT_BOS),
        eos: lookup("eos_token", DEFAULT_EOS),
        unk: lookup("unk_token", DEFAULT_EOS),
        pad: lookup("pad_token", DEFAULT_EOS),
        max_length,
        added,
    })
}

fn read_vocab(path: &Path) -> Result<Vocab> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let vocab: HashMap<String, u32> = serde_json::from_str(&text).map_err(|e| {
        Error::model(
            path,
            format!("vocab.json must map tokens to integer ids: {e}"),
        )
    })?;
    Ok(vocab.into_iter().collect())
}

fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // Same rule as the tokenizers crate's reader: skip the header and blank lines.
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(Error::model(
                    path,
                    format!("line {} is not a merge of two tokens: {line:?}", i + 1),
                ))
            }
        }
    }
    Ok(merges)
}
