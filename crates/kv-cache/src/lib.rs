#![deny(missing_docs)]
#![doc = include_str!("../README.md")]

mod cache;
mod error;
mod kind;
mod layer;
mod pool;
mod spec;
mod storage;

pub use cache::KvCache;
pub use error::{KvError, Result};
pub use kind::{MIN_PAGE_LEN, PAGE_BYTES};
pub use layer::{LayerCache, LayerView};
pub use pool::PagePool;
pub use spec::{CacheSpec, MemoryBytes};

pub use llama4_core::{DType, KvData, KvDtype, KvView, LayerKind, Segments};

#[cfg(test)]
mod scout;
