//! scheduler tests.
