//! Helpers shared by the integration tests of this crate.

// Each test binary uses a different part of this module.
#![allow(dead_code, unused_imports)]

pub mod files;
pub mod gguf;
mod values;

pub use values::values;
