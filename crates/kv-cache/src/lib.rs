#![deny(missing_docs)]
//! kv-cache (in progress).
