//! Typed element storage, owned or borrowed from a memory-mapped file.

use std::ops::Deref;
use std::sync::Arc;

use bytemuck::Pod;
use memmap2::Mmap;

/// A `/proc/meminfo` field in bytes; `None` where it cannot be read.
fn meminfo(field: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?
        .checked_mul(1024)
}

/// Whether `bytes` of mapped weights fit in half of this machine's memory (`MemTotal` of
/// `/proc/meminfo`); `false` where that is unknown.
pub(crate) fn fits_in_memory(bytes: u64) -> bool {
    meminfo("MemTotal").is_some_and(|total| bytes <= total / 2)
}

/// Prefaults every page of `map` into the process's page tables (`MADV_POPULATE_READ`, Linux
/// 5.14 and later), reading from the file what is not in the page cache. Advisory: on other
/// systems, or when the kernel refuses, pages fault in when first read, as before.
pub(crate) fn populate(map: &Mmap) {
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::PopulateRead);
    #[cfg(not(target_os = "linux"))]
    let _ = map;
}

/// Whether the kernel backs anonymous memory with transparent huge pages when asked
/// (`/sys/kernel/mm/transparent_hugepage/enabled` set to `always` or `madvise`), and the
/// environment does not keep weights in their file maps (`LLAMA4_WEIGHTS=mapped`).
fn huge_pages_available() -> bool {
    if std::env::var("LLAMA4_WEIGHTS").is_ok_and(|v| v.trim() == "mapped") {
        return false;
    }
    #[cfg(target_os = "linux")]
    {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|mode| mode.contains("[always]") || mode.contains("[madvise]"))
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Whether a file of `bytes` is to be copied into huge pages: the kernel offers them
/// ([`huge_pages_available`]) and the copy fits in half of the memory this process can have,
/// the smaller of `MemAvailable` and a cgroup's limit (v2 `memory.max`, v1
/// `memory.limit_in_bytes`). Unlike a file's pages, which the kernel reclaims and processes
/// share, a copy stays this process's own.
pub(crate) fn may_copy_to_huge_pages(bytes: u64) -> bool {
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok())
    .min();
    let fits = meminfo("MemAvailable")
        .is_some_and(|available| bytes <= available.min(cgroup.unwrap_or(u64::MAX)) / 2);
    fits && huge_pages_available()
}

/// A read-only copy of the file map `map` in anonymous memory that the kernel is asked to back
/// with transparent huge pages (2 MiB on x86-64, `MADV_HUGEPAGE`).
///
/// Why: a decode step streams every weight it uses once, and with the 4 KiB pages of a file
/// map each 4 KiB needs its own TLB entry and page walk (two-level in a virtual machine),
/// which the hardware prefetchers do not run ahead of. File maps get huge pages only on file
/// systems that offer them; anonymous memory gets them wherever the kernel does.
///
/// The copy goes a block at a time, and each block of `map` is dropped from the resident set
/// once copied, so that the process does not hold the file twice at its peak.
///
/// # Safety
/// `map` is a read-only map of a file, whose dropped pages refault from the file; never an
/// earlier copy, whose dropped pages would read as zeros.
pub(crate) unsafe fn copy_to_huge_pages(map: &Mmap) -> std::io::Result<Mmap> {
    const BLOCK: usize = 64 << 20;
    let mut copy = memmap2::MmapOptions::new().len(map.len()).map_anon()?;
    #[cfg(target_os = "linux")]
    copy.advise(memmap2::Advice::HugePage)?;
    for (start, (dst, src)) in (0..)
        .step_by(BLOCK)
        .zip(copy.chunks_mut(BLOCK).zip(map.chunks(BLOCK)))
    {
        dst.copy_from_slice(src);
        #[cfg(unix)]
        // SAFETY: `map` is a read-only map of a file (the caller's contract), so dropping its
        // pages discards nothing: a later read refaults them from the file.
        unsafe {
            let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, src.len());
        }
        #[cfg(not(unix))]
        let _ = start;
    }
    copy.make_read_only()
}

/// A contiguous run of `T`, either owned or borrowed from a memory map.
///
/// Cloning is cheap (a reference count); slicing shares the storage. A mapped buffer is only
/// created when its bytes are aligned for `T`, so dereferencing never copies.
#[derive(Clone)]
pub struct Buffer<T: Pod> {
    source: Source<T>,
    /// First element, counted in `T`s from the start of `source`.
    start: usize,
    len: usize,
}

#[derive(Clone)]
enum Source<T> {
    Owned(Arc<[T]>),
    /// `byte_offset` is where element 0 lives inside the map; it is aligned for `T`.
    Mapped {
        map: Arc<Mmap>,
        byte_offset: usize,
    },
}

impl<T: Pod> Buffer<T> {
    /// Takes ownership of `data`.
    pub fn from_vec(data: Vec<T>) -> Self {
        let len = data.len();
        Buffer {
            source: Source::Owned(data.into()),
            start: 0,
            len,
        }
    }

    /// Borrows `len` elements at `byte_offset` in `map` when that is aligned for `T`, or copies
    /// them into owned storage when it is not. The caller has checked the range is in bounds.
    pub(crate) fn from_map(map: &Arc<Mmap>, byte_offset: usize, len: usize) -> Self {
        let size = std::mem::size_of::<T>();
        let bytes = &map[byte_offset..byte_offset + len * size];
        if bytemuck::try_cast_slice::<u8, T>(bytes).is_ok() {
            Buffer {
                source: Source::Mapped {
                    map: Arc::clone(map),
                    byte_offset,
                },
                start: 0,
                len,
            }
        } else {
            // Misaligned in the file: one copy, element by element from unaligned bytes.
            let data: Vec<T> = bytes
                .chunks_exact(size)
                .map(bytemuck::pod_read_unaligned)
                .collect();
            Self::from_vec(data)
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when the elements live in a memory map rather than in owned memory.
    pub fn is_mapped(&self) -> bool {
        matches!(self.source, Source::Mapped { .. })
    }

    /// Elements `start..start + len` of this buffer, sharing storage.
    ///
    /// # Panics
    /// When the range is out of bounds (a programming error, not a data error).
    pub fn slice(&self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.len, "buffer slice out of bounds");
        Buffer {
            source: self.source.clone(),
            start: self.start + start,
            len,
        }
    }
}

impl<T: Pod> Deref for Buffer<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.source {
            Source::Owned(data) => &data[self.start..self.start + self.len],
            Source::Mapped { map, byte_offset } => {
                let size = std::mem::size_of::<T>();
                let begin = byte_offset + self.start * size;
                // Alignment was checked when the buffer was created, so this cast cannot fail.
                bytemuck::cast_slice(&map[begin..begin + self.len * size])
            }
        }
    }
}

impl<T: Pod + std::fmt::Debug> std::fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &self.len)
            .field("mapped", &self.is_mapped())
            .finish()
    }
}
