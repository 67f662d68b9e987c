//! All integration tests, compiled as one binary.

mod cli;
mod common;
mod initializers;
mod hub;
mod parity;

mod rng;
mod scheduler;
mod tokenizer;
