//! All integration tests, compiled as one binary.

mod common;
