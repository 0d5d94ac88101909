//! A global allocator that counts, for the tests and benchmarks that show a path allocates
//! nothing (a decode step, a kernel call with a warmed-up scratch).
//!
//! It sees every thread of the process: a test binary that installs it should hold one test,
//! since libtest runs the tests of a binary concurrently.
//!
//! ```
//! use llama4_core::alloc_count::CountingAllocator;
//!
//! #[global_allocator]
//! static ALLOC: CountingAllocator = CountingAllocator::new();
//!
//! let v = vec![1u8; 4];
//! assert_eq!(ALLOC.count(|| v.iter().map(|&x| x as u32).sum::<u32>()), 0);
//! assert_eq!(ALLOC.count(|| vec![0u8; 16].len()), 1);
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting allocations (`alloc`, `alloc_zeroed`, `realloc`).
#[derive(Debug, Default)]
pub struct CountingAllocator {
    allocations: AtomicUsize,
}

impl CountingAllocator {
    /// A counter at zero (`const`, for a `static`).
    pub const fn new() -> Self {
        CountingAllocator {
            allocations: AtomicUsize::new(0),
        }
    }

    /// Allocations on every thread so far.
    pub fn allocations(&self) -> usize {
        self.allocations.load(Ordering::SeqCst)
    }

    /// Allocations made while `f` ran, by any thread.
    pub fn count<R>(&self, f: impl FnOnce() -> R) -> usize {
        let before = self.allocations();
        std::hint::black_box(f());
        self.allocations() - before
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the contract; the
// counter has no effect on it.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}
