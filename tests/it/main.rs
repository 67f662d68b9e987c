//! All integration tests, compiled as one binary.

mod common;

mod rng;
mod scheduler;
mod tokenizer;
