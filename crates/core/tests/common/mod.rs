//! Helpers shared by the GGUF / ggml integration tests of this crate (the others use
//! `llama4-testkit`).

// Each test binary uses a different part of this module.
#![allow(dead_code, unused_imports)]

mod ggml_blocks;
pub mod gguf;

pub use ggml_blocks::random_blocks;
