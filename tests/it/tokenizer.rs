//! tokenizer tests.
