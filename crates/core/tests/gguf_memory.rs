//! Parsing a GGUF header takes memory linear in the file's length, whatever the header claims:
//! peak heap use while parsing hostile files stays under 16 bytes per file byte plus 64 KiB.
//! (One test in this binary: the allocator it installs sees every thread.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::gguf::*;
use llama4_core::gguf::parse_header;

/// The system allocator, tracking bytes in use and their peak.
struct Peak {
    now: AtomicUsize,
    peak: AtomicUsize,
}

// SAFETY: every call is forwarded unchanged to `System`; the counters do not affect it.
unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = self.now.fetch_add(l.size(), Ordering::SeqCst) + l.size();
        self.peak.fetch_max(now, Ordering::SeqCst);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        self.now.fetch_sub(l.size(), Ordering::SeqCst);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // Old and new blocks may both be live during the copy.
        let now = self.now.fetch_add(new, Ordering::SeqCst) + new;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let r = System.realloc(p, l, new);
        self.now.fetch_sub(l.size(), Ordering::SeqCst);
        r
    }
}

#[global_allocator]
static ALLOC: Peak = Peak {
    now: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
};

/// Peak extra heap bytes while parsing `bytes`.
fn peak_parsing(bytes: &[u8]) -> usize {
    let base = ALLOC.now.load(Ordering::SeqCst);
    ALLOC.peak.store(base, Ordering::SeqCst);
    let _ = std::hint::black_box(parse_header(Path::new("m.gguf"), bytes));
    ALLOC.peak.load(Ordering::SeqCst) - base
}

fn with(kv: Vec<u8>, ty: u32) -> Vec<u8> {
    Gguf::new(3).kv("k", ty, kv).build()
}

#[test]
fn hostile_headers_take_memory_linear_in_the_file() {
    let mut files: Vec<(&str, Vec<u8>)> = Vec::new();
    // Dense worst cases: many tiny elements, each a heap object of its own.
    let n = 20_000u64;
    files.push((
        "empty strings",
        with(array(STRING, n, &vec![0u8; 8 * n as usize]), ARRAY),
    ));
    files.push((
        "empty arrays",
        with(array(ARRAY, n, &array(U8, 0, &[]).repeat(n as usize)), ARRAY),
    ));
    files.push(("bytes", with(array(U8, n, &vec![7u8; n as usize]), ARRAY)));
    files.push(("bools", with(array(BOOL, n, &vec![1u8; n as usize]), ARRAY)));
    let keys: Vec<u8> = (0..2000u32)
        .flat_map(|i| {
            [
                string(format!("k{i}").as_bytes()),
                U8.to_le_bytes().to_vec(),
                vec![1],
            ]
            .concat()
        })
        .collect();
    let mut many = b"GGUF\x03\0\0\0".to_vec();
    many.extend(0u64.to_le_bytes());
    many.extend(2000u64.to_le_bytes());
    many.extend(keys);
    files.push(("many keys", many));
    // Claims far beyond the file: counts, lengths, tensors.
    files.push(("huge array", with(array(U64, 1 << 61, &[0; 64]), ARRAY)));
    files.push((
        "huge string",
        with(
            [(1u64 << 29).to_le_bytes().to_vec(), vec![b'a'; 64]].concat(),
            STRING,
        ),
    ));
    let mut t = b"GGUF\x03\0\0\0".to_vec();
    t.extend((1u64 << 19).to_le_bytes());
    t.extend(0u64.to_le_bytes());
    t.extend(vec![0u8; 256]);
    files.push(("huge tensor count", t));
    let tensors = (0..1000).fold(Gguf::new(3), |g, i| {
        g.tensor(tensor(&format!("t{i}"), &[8], 0, vec![0; 32]))
    });
    files.push(("many tensors", tensors.build()));
    for (what, bytes) in files {
        let peak = peak_parsing(&bytes);
        let bound = 16 * bytes.len() + (64 << 10);
        assert!(
            peak <= bound,
            "{what}: {peak} bytes for a {}-byte file",
            bytes.len()
        );
        eprintln!(
            "{what}: {} bytes of file, peak {peak} bytes while parsing",
            bytes.len()
        );
    }
}
