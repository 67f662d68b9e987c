//! Weights swapped into a loaded session: a graph whose initializers are also graph inputs
//! ("overridable" initializers, as `python -m export convert --lora-slots` writes the LoRA
//! slots) takes new values for them with every run, so adapters change between generations
//! without building the session again. ONNX Runtime keeps such initializers out of constant
//! folding, and uses the stored value when a run feeds none.

use ort::session::Session;

use super::weights::{prepare_weights, PreparedWeight};
use super::{Graph, WeightOverride};
use crate::{Error, Result};

/// The names of `session`'s overridable initializers.
pub(super) fn overridable(session: &Session) -> Vec<String> {
    session
        .overridable_initializers()
        .iter()
        .map(|o| o.name().to_string())
        .collect()
}

impl Graph {
    /// The weights this graph takes at run time ([`Graph::swap_weights`]); for a graph in
    /// segments, those of every segment.
    pub fn swappable_weights(&self) -> impl Iterator<Item = &str> {
        self.swappable
            .iter()
            .chain(self.segments.iter().flat_map(|s| s.swappable.iter()))
            .map(String::as_str)
    }

    /// Whether [`Graph::swap_weights`] can take a weight called `name`.
    pub fn can_swap(&self, name: &str) -> bool {
        self.swappable_weights().any(|n| n == name)
    }

    /// Feeds `weights` with every later run in place of the stored values, replacing what an
    /// earlier call swapped in; an empty list runs on the stored values again. Every name must
    /// be one of [`Graph::swappable_weights`] (ONNX Runtime would ignore or refuse the others).
    pub fn swap_weights(&mut self, weights: Vec<WeightOverride>) -> Result<()> {
        if let Some(w) = weights.iter().find(|w| !self.can_swap(&w.name)) {
            return Err(Error::model(
                &self.path,
                format!(
                    "the {} graph takes no weight '{}' at run time (re-export the model with \
                     `--lora-slots`)",
                    self.name, w.name
                ),
            ));
        }
        let context = format!("swapping weights into {}", self.name);
        let prepared = prepare_weights(&context, &self.path, weights)?;
        // A segment reads its own share; the whole graph keeps every value for its own runs.
        for segment in &mut self.segments {
            segment.swapped = prepared
                .iter()
                .filter(|p| segment.swappable.contains(&p.name))
                .cloned()
                .collect();
        }
        self.swapped = if self.segments.is_empty() {
            prepared
        } else {
            Vec::new()
        };
        self.binding = None;
        Ok(())
    }

    /// The swapped-in weights the next run feeds.
    pub(in crate::runtime) fn swapped(&self) -> &[PreparedWeight] {
        &self.swapped
    }
}
