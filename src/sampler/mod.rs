//! Samplers.

pub mod config;
pub mod tcd;
mod torch_math;
