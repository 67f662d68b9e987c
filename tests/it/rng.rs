//! rng tests.
