//! All integration tests, compiled as one binary.

mod cli;
mod common;
mod parity;

mod rng;
mod scheduler;
mod tokenizer;
