#![deny(missing_docs)]
//! llama4-model (in progress).
