#![deny(missing_docs)]
//! irope-attn (in progress).
