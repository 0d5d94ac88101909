//! Load progress: an observer that hears how many bytes of a model's tensors have been loaded.
//!
//! Loading a multi-gigabyte checkpoint maps its files, checks every tensor it uses and, with a
//! load-time quantisation, reads and quantises the selected float weights: seconds to minutes.
//! A [`Checkpoint`](crate::Checkpoint) or [`GgufFile`](crate::gguf::GgufFile) given an observer
//! ([`Checkpoint::set_progress`](crate::Checkpoint::set_progress),
//! [`GgufFile::set_progress`](crate::gguf::GgufFile::set_progress)) reports after each tensor
//! it hands out, quantised or not, in bytes *as stored in the files* (so a quantised tensor
//! counts the float bytes it was made from). The library draws nothing: a terminal bar, a log
//! line or a test are all observers.

use std::sync::{Arc, Mutex};

/// Hears load progress. Within one load, `done` never decreases, never exceeds `total`, and
/// `total` stays the same; the last call of a completed load has `done == total`.
pub trait LoadProgress: Send + Sync {
    /// `done` of `total` bytes of stored tensor data are loaded.
    fn update(&self, done: u64, total: u64);
}

impl<F: Fn(u64, u64) + Send + Sync> LoadProgress for F {
    fn update(&self, done: u64, total: u64) {
        self(done, total)
    }
}

/// A shared observer, as load options carry it.
pub type SharedProgress = Arc<dyn LoadProgress>;

/// The running count of one load, reported to an optional observer.
#[derive(Default)]
pub(crate) struct ProgressCounter {
    observer: Option<SharedProgress>,
    total: u64,
    /// Behind a lock so that the observer hears counts in order even when tensors are loaded
    /// from several threads.
    done: Mutex<u64>,
}

impl ProgressCounter {
    pub(crate) fn new(observer: Option<SharedProgress>, total: u64) -> Self {
        ProgressCounter {
            observer,
            total,
            done: Mutex::new(0),
        }
    }

    /// Adds `bytes` (capped at the total: a tensor looked up twice does not overshoot).
    pub(crate) fn add(&self, bytes: u64) {
        let Some(observer) = &self.observer else { return };
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        *done = (*done + bytes).min(self.total);
        observer.update(*done, self.total);
    }

    /// Reports the load complete: the tensors the model did not ask for (another modality's,
    /// another process's experts) count as done.
    pub(crate) fn finish(&self) {
        let Some(observer) = &self.observer else { return };
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        *done = self.total;
        observer.update(*done, self.total);
    }
}

impl std::fmt::Debug for ProgressCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressCounter")
            .field("observed", &self.observer.is_some())
            .field("total", &self.total)
            .finish()
    }
}
