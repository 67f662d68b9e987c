//! Samplers.

pub mod tcd;
