//! Seeded noise sources.
