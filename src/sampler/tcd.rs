//! The TCD scheduler.
