//! The LoRAs a server offers (`--lora-dir`), by name only: requests never carry paths.
//! A1111 clients name them in the prompt (`<lora:NAME:WEIGHT>`), OpenAI clients in `loras`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::pipeline::LoraSpec;
use crate::{Error, Result};

/// The `.safetensors` files of a directory, by file stem.
#[derive(Debug, Default, Clone)]
pub struct LoraCatalog {
    files: BTreeMap<String, PathBuf>,
}

impl LoraCatalog {
    /// Lists `dir` (its top level); no directory offers nothing.
    pub fn open(dir: Option<&Path>) -> Result<Self> {
        let Some(dir) = dir else {
            return Ok(LoraCatalog::default());
        };
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let is_lora = path.extension().is_some_and(|e| e == "safetensors") && path.is_file();
            if let (true, Some(stem)) = (is_lora, path.file_stem().and_then(|s| s.to_str())) {
                files.insert(stem.to_string(), path.clone());
            }
        }
        Ok(LoraCatalog { files })
    }

    /// The names offered, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    /// The adapter called `name` at `weight`; an unknown name is an error listing the known.
    pub fn spec(&self, name: &str, weight: f32) -> std::result::Result<LoraSpec, String> {
        if !weight.is_finite() {
            return Err(format!("LoRA {name}: the weight must be a finite number"));
        }
        let path = self.files.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.names().collect();
            if known.is_empty() {
                format!("unknown LoRA '{name}': this server offers none (start it with --lora-dir)")
            } else {
                format!(
                    "unknown LoRA '{name}'; this server offers: {}",
                    known.join(", ")
                )
            }
        })?;
        Ok(LoraSpec {
            source: path.to_string_lossy().into_owned(),
            weight,
            weight_name: None,
        })
    }
}

/// Takes A1111's `<lora:NAME:WEIGHT>` tags out of `prompt`: the prompt without them (spaces
/// where they stood collapsed) and the (name, weight) pairs; a name given twice is an error.
pub fn take_lora_tags(prompt: &str) -> std::result::Result<(String, Vec<(String, f32)>), String> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags: Vec<(String, f32)> = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        text.push_str(&rest[..start]);
        let after = &rest[start + "<lora:".len()..];
        let end = after
            .find('>')
            .ok_or_else(|| format!("unclosed LoRA tag in the prompt: '{}'", &rest[start..]))?;
        let body = &after[..end];
        let mut parts = body.split(':');
        let name = parts.next().unwrap_or_default().trim().to_string();
        let weight = match parts.next() {
            None => 1.0,
            Some(w) => w
                .trim()
                .parse::<f32>()
                .map_err(|_| format!("LoRA tag <lora:{body}>: the weight '{w}' is not a number"))?,
        };
        if parts.next().is_some() {
            return Err(format!(
                "LoRA tag <lora:{body}>: separate text-encoder and UNet weights are not supported; \
                 give one weight"
            ));
        }
        if name.is_empty() {
            return Err("a LoRA tag in the prompt has no name".into());
        }
        if tags.iter().any(|(n, _)| *n == name) {
            return Err(format!("LoRA {name} is named twice in the prompt"));
        }
        tags.push((name, weight));
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    Ok((text, tags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_come_out_of_the_prompt() {
        let (text, tags) =
            take_lora_tags("a cat <lora:style:0.8>, best <lora:tcd> quality").expect("parsed");
        assert_eq!(text, "a cat , best quality");
        assert_eq!(tags, vec![("style".into(), 0.8), ("tcd".into(), 1.0)]);
        assert!(take_lora_tags("x <lora:a:b>").is_err());
        assert!(take_lora_tags("x <lora:a:1:2>").is_err());
        assert!(take_lora_tags("x <lora:a:1").is_err());
        assert!(take_lora_tags("<lora:a><lora:a:2>").is_err());
    }

    #[test]
    fn unknown_names_are_refused_with_the_known_ones() {
        let catalog = LoraCatalog {
            files: BTreeMap::from([("style".to_string(), PathBuf::from("/l/style.safetensors"))]),
        };
        assert!(catalog.spec("style", 0.5).is_ok());
        let err = catalog.spec("../etc/passwd", 1.0).expect_err("unknown");
        assert!(err.contains("offers: style"), "{err}");
        assert!(catalog.spec("style", f32::NAN).is_err());
    }
}
