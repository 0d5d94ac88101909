#![deny(missing_docs)]
//! moe-router (in progress).
