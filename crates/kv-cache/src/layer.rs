//! The cache of one attention layer, in pages.

use std::sync::Arc;

use llama4_core::{KvData, KvPageTable, KvStore, KvView};
use ndarray::{Array3, ArrayView3, Axis};

use crate::kind::paged_capacity;
use crate::pool::Lease;
use crate::storage::Storage;
use crate::{CacheSpec, KvError, LayerKind, PagePool, Result, Segments};

/// Keys and values of one layer as attention reads them.
#[derive(Clone, Copy, Debug)]
pub struct LayerView<'a> {
    /// Keys `[Hkv, len, D]`.
    pub k: KvView<'a>,
    /// Values `[Hkv, len, D]`, same `len` and `first_pos` as the keys.
    pub v: KvView<'a>,
}

/// One page of keys (or values), counted against the cache's [`PagePool`] while it lives.
#[derive(Debug)]
struct Page {
    data: Storage,
    _lease: Option<Lease>,
}

/// The pages of a layer's keys (or values), each `[Hkv, page_len, D]`. A page is shared
/// between clones of the cache until one of them writes to it (copy on write).
#[derive(Clone, Debug, Default)]
struct Pages(Vec<Arc<Page>>);

impl KvPageTable for Pages {
    fn pages(&self) -> usize {
        self.0.len()
    }

    fn page(&self, i: usize) -> KvData<'_> {
        self.0[i].data.data()
    }
}

/// Keys and values of one layer in fixed-size pages of `page_len` positions, each page stored
/// head-major `[Hkv, page_len, D]` so that a head's positions within a page are contiguous for
/// the attention dot products. Growing adds pages and never copies what is held.
///
/// It holds the absolute positions `first_pos .. first_pos + len`. A global layer holds every
/// position appended (`first_pos = 0`). A chunked layer with chunk `C`, after the token at `p`
/// was appended, holds exactly `C·floor(p/C) ..= p`: it restarts at slot 0 of the pages it
/// has when an append begins a new chunk, so it never holds more than `C` positions.
///
/// Cloning shares the pages: a clone (a fork of the sequence, or a conversation prefix kept for
/// reuse) costs no copy of the keys, and the first append of either side copies only the page
/// it writes to.
#[derive(Clone, Debug)]
pub struct LayerCache {
    kind: LayerKind,
    spec: CacheSpec,
    /// The budget pages count against (none: only the system's memory).
    pool: Option<PagePool>,
    page_len: usize,
    k: Pages,
    v: Pages,
    /// Absolute position of slot 0.
    first_pos: usize,
    /// Positions held (slots `0..len`).
    len: usize,
}

impl LayerCache {
    /// An empty cache; nothing is allocated until the first append or [`LayerCache::reserve`].
    pub fn new(kind: LayerKind, spec: CacheSpec) -> Result<Self> {
        Self::build(kind, spec, None)
    }

    /// [`LayerCache::new`] whose pages count against `pool`'s budget.
    pub fn with_pool(kind: LayerKind, spec: CacheSpec, pool: PagePool) -> Result<Self> {
        Self::build(kind, spec, Some(pool))
    }

    fn build(kind: LayerKind, spec: CacheSpec, pool: Option<PagePool>) -> Result<Self> {
        spec.validate()?;
        Ok(Self {
            kind,
            spec,
            pool,
            page_len: spec.page_len_for(kind),
            k: Pages::default(),
            v: Pages::default(),
            first_pos: 0,
            len: 0,
        })
    }

    /// The layer kind.
    pub fn kind(&self) -> LayerKind {
        self.kind
    }

    /// The shapes and dtype.
    pub fn spec(&self) -> CacheSpec {
        self.spec
    }

    /// Positions appended so far (kept or not): the absolute position of the next token.
    pub fn next_pos(&self) -> usize {
        self.first_pos + self.len
    }

    /// Absolute position of the oldest position held.
    pub fn first_pos(&self) -> usize {
        self.first_pos
    }

    /// Positions held now.
    pub fn held(&self) -> usize {
        self.len
    }

    /// The budget this cache's pages count against, if any.
    pub fn pool(&self) -> Option<&PagePool> {
        self.pool.as_ref()
    }

    /// Positions per page.
    pub fn page_len(&self) -> usize {
        self.page_len
    }

    /// Pages allocated (for keys; as many for values).
    pub fn pages(&self) -> usize {
        self.k.0.len()
    }

    /// Pages shared with another clone of this cache (for keys and values together).
    pub fn shared_pages(&self) -> usize {
        let shared = |p: &Pages| p.0.iter().filter(|x| Arc::strong_count(x) > 1).count();
        shared(&self.k) + shared(&self.v)
    }

    /// Positions per head allocated: whole pages.
    pub fn capacity(&self) -> usize {
        self.pages() * self.page_len
    }

    /// Bytes allocated for keys and values (capacity, not positions held: that is what the
    /// memory costs; pages shared with a clone are counted by each holder).
    pub fn memory_bytes(&self) -> u64 {
        // Cannot overflow: the same product was allocated.
        2 * (self.capacity() * self.spec.kv_heads * self.spec.dtype.vector_bytes(self.spec.head_dim)) as u64
    }

    /// How to split `t` tokens appended next so that no piece crosses a chunk boundary: see
    /// [`LayerKind::segments`].
    pub fn segments(&self, t: usize) -> Segments {
        self.kind.segments(self.next_pos(), t)
    }

    /// Appends the keys and values of `T` new tokens at positions `next_pos() ..`, rounding them
    /// to the storage dtype. A chunked layer first drops what it holds when the new tokens start
    /// a new chunk.
    ///
    /// # Shapes
    /// `k`, `v`: `[T, Hkv, D]` (token-major, as the k/v projections produce them).
    ///
    /// # Errors
    /// [`KvError::Shape`] for other shapes, [`KvError::CrossesChunk`] when the tokens of a
    /// chunked layer span a chunk boundary (split them with [`LayerCache::segments`]),
    /// [`KvError::Alloc`] when the system refuses a page. The cache is unchanged on error.
    pub fn append(&mut self, k: ArrayView3<f32>, v: ArrayView3<f32>) -> Result<()> {
        let (hkv, d) = (self.spec.kv_heads, self.spec.head_dim);
        let t = k.dim().0;
        let expected = [t, hkv, d];
        for (what, x) in [("keys", &k), ("values", &v)] {
            let got: [usize; 3] = x.dim().into();
            if got != expected {
                return Err(KvError::Shape { what, expected, got });
            }
        }
        if t == 0 {
            return Ok(());
        }
        let start = self.next_pos();
        start.checked_add(t).ok_or(KvError::Overflow("positions"))?;
        let mut slot0 = self.len;
        if let Some(chunk) = self.kind.chunk() {
            if start / chunk != (start + t - 1) / chunk {
                return Err(KvError::CrossesChunk { start, len: t, chunk });
            }
            if start.is_multiple_of(chunk) {
                // A new chunk: no later query can see what is held; its pages are reused.
                slot0 = 0;
            }
        }
        let needed = slot0 + t;
        self.grow_to(needed)?;
        let p = self.page_len;
        // A page shared with a clone is copied before it is written (and the copy counted
        // against the pool), all of them before any write: a refused copy changes nothing.
        for page in slot0 / p..needed.div_ceil(p) {
            self.own(page)?;
        }
        if slot0 == 0 {
            self.first_pos = start;
        }
        let stride = p * d;
        for (i, (kt, vt)) in k.outer_iter().zip(v.outer_iter()).enumerate() {
            let slot = slot0 + i;
            let (page, at) = (slot / p, (slot % p) * d);
            let (Some(kp), Some(vp)) = (
                Arc::get_mut(&mut self.k.0[page]),
                Arc::get_mut(&mut self.v.0[page]),
            ) else {
                unreachable!("pages to write were made unique above")
            };
            for (h, (kh, vh)) in kt.outer_iter().zip(vt.outer_iter()).enumerate() {
                kp.data.write(h * stride + at, kh);
                vp.data.write(h * stride + at, vh);
            }
        }
        self.len = needed;
        Ok(())
    }

    /// Makes page `i` of keys and of values this cache's alone, copying a shared one.
    fn own(&mut self, i: usize) -> Result<()> {
        for table in [&mut self.k.0, &mut self.v.0] {
            if Arc::get_mut(&mut table[i]).is_none() {
                let data = table[i].data.clone();
                let lease = lease(self.pool.as_ref(), &data)?;
                table[i] = Arc::new(Page { data, _lease: lease });
            }
        }
        Ok(())
    }

    /// What attention reads: keys and values of the held positions, slot 0 at `first_pos()`,
    /// in pages ([`KvStore::Paged`]).
    pub fn view(&self) -> LayerView<'_> {
        LayerView {
            k: self.view_of(&self.k),
            v: self.view_of(&self.v),
        }
    }

    fn view_of<'a>(&'a self, table: &'a Pages) -> KvView<'a> {
        KvView {
            store: KvStore::Paged {
                table,
                page_len: self.page_len,
            },
            heads: self.spec.kv_heads,
            len: self.len,
            head_dim: self.spec.head_dim,
            first_pos: self.first_pos,
        }
    }

    /// The held keys widened to f32.
    ///
    /// # Shapes
    /// → `[Hkv, held, D]`.
    pub fn keys_f32(&self) -> Array3<f32> {
        self.widen(&self.k)
    }

    /// The held values widened to f32.
    ///
    /// # Shapes
    /// → `[Hkv, held, D]`.
    pub fn values_f32(&self) -> Array3<f32> {
        self.widen(&self.v)
    }

    fn widen(&self, pages: &Pages) -> Array3<f32> {
        let (hkv, d, p) = (self.spec.kv_heads, self.spec.head_dim, self.page_len);
        let mut out = Array3::zeros((hkv, self.len, d));
        for (h, mut head) in out.axis_iter_mut(Axis(0)).enumerate() {
            let Some(dst) = head.as_slice_mut() else {
                continue;
            };
            for (page, dst) in pages.0.iter().zip(dst.chunks_mut(p * d)) {
                page.data.read(h * p * d, dst);
            }
        }
        out
    }

    /// Checks that [`LayerCache::truncate`]`(len)` would succeed, without changing anything.
    pub fn check_truncate(&self, len: usize) -> Result<()> {
        let next = self.next_pos();
        if len > next {
            return Err(KvError::TruncateBeyond {
                requested: len,
                len: next,
            });
        }
        match self.kind.chunk() {
            Some(chunk) if len < self.first_pos && !len.is_multiple_of(chunk) => Err(KvError::Evicted {
                requested: len,
                first_held: self.first_pos,
                chunk,
            }),
            _ => Ok(()),
        }
    }

    /// Keeps the first `len` positions, so that the next append is position `len` (to regenerate
    /// from a shorter prefix). Pages are kept.
    ///
    /// A global layer can truncate to any `len ≤ next_pos()`. A chunked layer can truncate inside
    /// the chunk it holds, or to any multiple of its chunk size: the next token then starts a new
    /// chunk and needs none of the dropped keys, so the layer is left empty at `first_pos = len`.
    ///
    /// # Errors
    /// [`KvError::TruncateBeyond`] if `len > next_pos()`; [`KvError::Evicted`] if a chunked layer
    /// no longer holds the keys of `len`'s chunk. The cache is unchanged on error.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.check_truncate(len)?;
        if len >= self.first_pos {
            self.len = len - self.first_pos;
        } else {
            self.first_pos = len;
            self.len = 0;
        }
        Ok(())
    }

    /// Forgets every position; pages are kept for the next sequence.
    pub fn reset(&mut self) {
        self.first_pos = 0;
        self.len = 0;
    }

    /// Pre-allocates the pages of a context of `n_tokens` positions in total (`min(n_tokens, C)`
    /// for a chunked layer), so that filling it allocates nothing. Never frees.
    pub fn reserve(&mut self, n_tokens: usize) -> Result<()> {
        self.grow_to(self.kind.max_held(n_tokens))
    }

    /// Frees the pages beyond the positions held.
    pub fn shrink_to_fit(&mut self) {
        let keep = self.len.div_ceil(self.page_len);
        self.k.0.truncate(keep);
        self.v.0.truncate(keep);
        self.k.0.shrink_to_fit();
        self.v.0.shrink_to_fit();
    }

    /// Adds pages until `slots` positions fit.
    fn grow_to(&mut self, slots: usize) -> Result<()> {
        let capacity = paged_capacity(self.page_len, slots)?;
        if capacity <= self.capacity() {
            return Ok(());
        }
        // Refuse sizes whose byte count does not fit in memory arithmetic before allocating.
        let bytes = self.spec.layer_bytes(capacity)?;
        usize::try_from(bytes).map_err(|_| KvError::Overflow("capacity"))?;
        let (hkv, d) = (self.spec.kv_heads, self.spec.head_dim);
        let elems = hkv * self.page_len * d;
        let pages = capacity / self.page_len;
        let alloc = |_| KvError::Alloc { bytes };
        let adding = pages - self.pages();
        if adding > 1 {
            // Pages are small, so a system that cannot hold them all would grant each one and
            // fail only when they are touched. Ask once for the whole growth as one block (and
            // free it): a size the system can never grant is refused here, as an error.
            let whole = self.spec.layer_bytes(adding * self.page_len)?;
            let whole = usize::try_from(whole).map_err(|_| KvError::Overflow("capacity"))?;
            Vec::<u8>::new().try_reserve_exact(whole).map_err(alloc)?;
        }
        // Every page first, then the tables: a refused allocation leaves the layer as it was.
        let mut fresh = Vec::new();
        fresh.try_reserve_exact(2 * adding).map_err(alloc)?;
        for _ in 0..2 * adding {
            let data = Storage::try_zeros(self.spec.dtype, d, elems).map_err(alloc)?;
            let lease = lease(self.pool.as_ref(), &data)?;
            fresh.push(Arc::new(Page { data, _lease: lease }));
        }
        for table in [&mut self.k.0, &mut self.v.0] {
            table.try_reserve_exact(pages - table.len()).map_err(alloc)?;
        }
        let half = fresh.len() / 2;
        let mut fresh = fresh.into_iter();
        self.k.0.extend(fresh.by_ref().take(half));
        self.v.0.extend(fresh);
        Ok(())
    }
}

/// A lease of `pool`'s budget for the bytes of `data` (none without a pool).
fn lease(pool: Option<&PagePool>, data: &Storage) -> Result<Option<Lease>> {
    pool.map(|p| p.lease(data.bytes())).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama4_core::{DType, KvData};
    use ndarray::{s, Array3};

    /// `[t, hkv, d]` with element value `1000·pos + 10·h + j` (exact in f32): a misplaced
    /// element shows which position/head it came from.
    fn tokens(start: usize, t: usize, hkv: usize, d: usize) -> Array3<f32> {
        Array3::from_shape_fn((t, hkv, d), |(i, h, j)| (1000 * (start + i) + 10 * h + j) as f32)
    }

    fn push(c: &mut LayerCache, t: usize) -> Result<()> {
        let s = c.spec();
        let k = tokens(c.next_pos(), t, s.kv_heads, s.head_dim);
        let v = k.mapv(|x| -x);
        c.append(k.view(), v.view())
    }

    fn spec() -> CacheSpec {
        CacheSpec::new(2, 3, DType::F32)
    }

    #[test]
    fn append_rejects_bad_shapes_and_changes_nothing() {
        let mut c = LayerCache::new(LayerKind::Global, spec()).unwrap();
        push(&mut c, 2).unwrap();
        let k = Array3::<f32>::zeros((2, 2, 4));
        let v = Array3::<f32>::zeros((2, 2, 3));
        assert_eq!(
            c.append(k.view(), v.view()),
            Err(KvError::Shape {
                what: "keys",
                expected: [2, 2, 3],
                got: [2, 2, 4]
            })
        );
        let k = Array3::<f32>::zeros((2, 2, 3));
        let v = Array3::<f32>::zeros((1, 2, 3));
        assert_eq!(
            c.append(k.view(), v.view()),
            Err(KvError::Shape {
                what: "values",
                expected: [2, 2, 3],
                got: [1, 2, 3]
            })
        );
        assert_eq!((c.next_pos(), c.held()), (2, 2));
        assert_eq!(c.keys_f32(), tokens(0, 2, 2, 3).permuted_axes([1, 0, 2]));
    }

    #[test]
    fn crossing_a_chunk_boundary_is_refused() {
        let mut c = LayerCache::new(LayerKind::chunked(4).unwrap(), spec()).unwrap();
        push(&mut c, 3).unwrap();
        assert_eq!(
            push(&mut c, 2),
            Err(KvError::CrossesChunk {
                start: 3,
                len: 2,
                chunk: 4
            })
        );
        assert_eq!((c.first_pos(), c.held()), (0, 3));
        assert_eq!(c.segments(2).collect::<Vec<_>>(), vec![0..1, 1..2]);
        push(&mut c, 1).unwrap();
        push(&mut c, 4).unwrap();
        assert_eq!((c.first_pos(), c.held()), (4, 4));
    }

    #[test]
    fn chunked_layer_restarts_at_each_boundary_and_keeps_its_capacity() {
        let mut c = LayerCache::new(LayerKind::chunked(4).unwrap(), spec()).unwrap();
        push(&mut c, 4).unwrap();
        assert_eq!((c.first_pos(), c.held(), c.capacity()), (0, 4, 4));
        push(&mut c, 1).unwrap();
        assert_eq!((c.first_pos(), c.held(), c.capacity()), (4, 1, 4));
        assert_eq!(c.keys_f32(), tokens(4, 1, 2, 3).permuted_axes([1, 0, 2]));
        assert_eq!(c.values_f32(), c.keys_f32().mapv(|x| -x));
    }

    #[test]
    fn global_layer_grows_by_pages_and_keeps_its_contents() {
        let mut c = LayerCache::new(LayerKind::Global, spec().with_page_len(16)).unwrap();
        let mut caps = Vec::new();
        for _ in 0..100 {
            push(&mut c, 1).unwrap();
            if caps.last() != Some(&c.capacity()) {
                caps.push(c.capacity());
            }
        }
        assert_eq!(caps, vec![16, 32, 48, 64, 80, 96, 112]);
        assert_eq!(c.keys_f32(), tokens(0, 100, 2, 3).permuted_axes([1, 0, 2]));
        assert_eq!(c.values_f32(), c.keys_f32().mapv(|x| -x));
    }

    #[test]
    fn view_is_paged_head_major() {
        let mut c = LayerCache::new(LayerKind::Global, spec().with_page_len(4)).unwrap();
        push(&mut c, 10).unwrap();
        let view = c.view();
        assert!(view.k.is_consistent() && view.v.is_consistent());
        assert_eq!(
            (view.k.heads, view.k.len, view.k.head_dim, view.k.first_pos),
            (2, 10, 3, 0)
        );
        assert_eq!((view.k.segment_len(), view.k.segments()), (4, 3));
        for p in 0..10 {
            let (KvData::F32(data), stride) = view.k.segment(p / 4).unwrap() else {
                panic!("f32 storage expected")
            };
            assert_eq!(stride, 4 * 3);
            for h in 0..2 {
                for j in 0..3 {
                    let at = h * stride + (p % 4) * 3 + j;
                    assert_eq!(data[at], (1000 * p + 10 * h + j) as f32);
                    assert_eq!(view.v.get(h, p, j), Some(-data[at]));
                }
            }
        }
    }

    /// A clone shares every page; each side's next append copies only the page it writes,
    /// and neither sees the other's new keys.
    #[test]
    fn clones_share_pages_until_written() {
        let mut a = LayerCache::new(LayerKind::Global, spec().with_page_len(4)).unwrap();
        push(&mut a, 10).unwrap(); // pages 0, 1 full; page 2 holds 8, 9
        let mut b = a.clone();
        assert_eq!((a.shared_pages(), b.shared_pages()), (6, 6));
        push(&mut b, 1).unwrap();
        // b wrote into page 2 (keys and values): a copy; pages 0 and 1 still shared.
        assert_eq!((a.shared_pages(), b.shared_pages()), (4, 4));
        b.truncate(9).unwrap();
        push(&mut b, 1).unwrap();
        assert_eq!(a.keys_f32(), tokens(0, 10, 2, 3).permuted_axes([1, 0, 2]));
        assert_eq!(b.keys_f32(), tokens(0, 10, 2, 3).permuted_axes([1, 0, 2]));
        // Regenerating from a shared prefix: truncate into page 1 and write over it.
        let mut c = a.clone();
        c.truncate(5).unwrap();
        let k = Array3::from_elem((1, 2, 3), 7.0f32);
        c.append(k.view(), k.view()).unwrap();
        assert_eq!(c.keys_f32()[[1, 5, 2]], 7.0);
        assert_eq!(a.keys_f32(), tokens(0, 10, 2, 3).permuted_axes([1, 0, 2]));
        assert_eq!(c.memory_bytes(), a.memory_bytes());
    }

    #[test]
    fn truncate_global_to_any_shorter_length() {
        let mut c = LayerCache::new(LayerKind::Global, spec()).unwrap();
        push(&mut c, 10).unwrap();
        assert_eq!(
            c.truncate(11),
            Err(KvError::TruncateBeyond {
                requested: 11,
                len: 10
            })
        );
        c.truncate(10).unwrap();
        c.truncate(3).unwrap();
        assert_eq!((c.next_pos(), c.held(), c.capacity()), (3, 3, c.page_len()));
        push(&mut c, 2).unwrap();
        assert_eq!(c.keys_f32(), tokens(0, 5, 2, 3).permuted_axes([1, 0, 2]));
    }

    #[test]
    fn truncate_chunked_inside_the_chunk_to_a_boundary_or_refuse() {
        let mut c = LayerCache::new(LayerKind::chunked(4).unwrap(), spec()).unwrap();
        push(&mut c, 4).unwrap();
        push(&mut c, 4).unwrap();
        push(&mut c, 2).unwrap(); // holds 8, 9
        let before = c.clone();
        assert_eq!(
            c.truncate(6),
            Err(KvError::Evicted {
                requested: 6,
                first_held: 8,
                chunk: 4
            })
        );
        assert_eq!((c.first_pos(), c.held()), (before.first_pos(), before.held()));
        c.truncate(9).unwrap();
        assert_eq!((c.first_pos(), c.held()), (8, 1));
        // A multiple of the chunk: the next token starts a new chunk, nothing dropped is needed.
        c.truncate(4).unwrap();
        assert_eq!((c.first_pos(), c.held(), c.next_pos()), (4, 0, 4));
        push(&mut c, 1).unwrap();
        assert_eq!(c.keys_f32(), tokens(4, 1, 2, 3).permuted_axes([1, 0, 2]));
        c.truncate(0).unwrap();
        assert_eq!((c.first_pos(), c.held()), (0, 0));
    }

    #[test]
    fn reserve_presizes_pages_and_shrink_frees() {
        let mut g = LayerCache::new(LayerKind::Global, spec().with_page_len(8)).unwrap();
        let mut ch = LayerCache::new(LayerKind::chunked(8).unwrap(), spec().with_page_len(16)).unwrap();
        g.reserve(37).unwrap();
        ch.reserve(37).unwrap();
        assert_eq!((g.capacity(), ch.capacity(), ch.page_len()), (40, 8, 8));
        assert_eq!(g.memory_bytes(), 2 * 40 * 2 * 3 * 4);
        push(&mut g, 37).unwrap();
        assert_eq!(g.capacity(), 40);
        g.truncate(5).unwrap();
        g.shrink_to_fit();
        assert_eq!(g.capacity(), 8);
        assert_eq!(g.keys_f32(), tokens(0, 5, 2, 3).permuted_axes([1, 0, 2]));
        g.reset();
        g.shrink_to_fit();
        assert_eq!((g.capacity(), g.memory_bytes()), (0, 0));
    }

    #[test]
    fn zero_sizes_are_rejected() {
        assert!(matches!(
            LayerCache::new(LayerKind::Global, CacheSpec::new(0, 3, DType::F32)),
            Err(KvError::InvalidSpec(_))
        ));
        assert!(matches!(
            LayerCache::new(LayerKind::Global, CacheSpec::new(2, 0, DType::BF16)),
            Err(KvError::InvalidSpec(_))
        ));
    }

    #[test]
    fn non_contiguous_input_is_stored_like_contiguous() {
        let base = tokens(0, 6, 2, 3);
        let k = base.slice(s![..;2, .., ..]); // positions 0, 2, 4 of `base`: strided
        let mut a = LayerCache::new(LayerKind::Global, CacheSpec::new(2, 3, DType::BF16)).unwrap();
        let mut b = a.clone();
        a.append(k, k).unwrap();
        let owned = k.to_owned();
        b.append(owned.view(), owned.view()).unwrap();
        assert_eq!(a.keys_f32(), b.keys_f32());
    }
}
