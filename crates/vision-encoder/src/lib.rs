#![deny(missing_docs)]
//! vision-encoder (in progress).
