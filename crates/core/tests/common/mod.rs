//! Helpers shared by the integration tests of this crate.

// Each test binary uses a different part of this module.
#![allow(dead_code, unused_imports)]

pub mod files;
mod ggml_blocks;
pub mod gguf;
mod values;

pub use ggml_blocks::random_blocks;
pub use values::values;
