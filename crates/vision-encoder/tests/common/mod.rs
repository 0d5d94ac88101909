//! Fixture reading shared by the integration tests.
#![allow(dead_code, unused_imports)]

use std::path::PathBuf;

pub use llama4_testkit::{bf16_step, read_tensors};

/// `fixtures/vision` (written by `tools/make_vision_fixtures.py`).
pub fn fixtures() -> PathBuf {
    llama4_testkit::fixture("vision")
}
