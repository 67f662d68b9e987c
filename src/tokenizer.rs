//! CLIP tokenization.
