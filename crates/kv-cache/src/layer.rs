//! The cache of one attention layer.

use llama4_core::KvView;
use ndarray::{Array3, ArrayView3, Axis};

use crate::kind::grown_capacity;
use crate::storage::Storage;
use crate::{CacheSpec, KvError, LayerKind, Result, Segments};

/// Keys and values of one layer as attention reads them.
#[derive(Clone, Copy, Debug)]
pub struct LayerView<'a> {
    /// Keys `[Hkv, len, D]`.
    pub k: KvView<'a>,
    /// Values `[Hkv, len, D]`, same `len` and `first_pos` as the keys.
    pub v: KvView<'a>,
}

/// Keys and values of one layer, stored head-major `[Hkv, capacity, D]` so that each head's
/// positions are contiguous for the attention dot products.
///
/// It holds the absolute positions `first_pos .. first_pos + len`. A global layer holds every
/// position appended (`first_pos = 0`). A chunked layer with chunk `C`, after the token at `p`
/// was appended, holds exactly `C·floor(p/C) ..= p`: it restarts (without freeing) when an append
/// begins a new chunk, so it never holds more than `C` positions.
#[derive(Clone, Debug)]
pub struct LayerCache {
    kind: LayerKind,
    spec: CacheSpec,
    k: Storage,
    v: Storage,
    /// Positions per head allocated.
    capacity: usize,
    /// Absolute position of slot 0.
    first_pos: usize,
    /// Positions held (slots `0..len`).
    len: usize,
}

impl LayerCache {
    /// An empty cache; nothing is allocated until the first append or [`LayerCache::reserve`].
    pub fn new(kind: LayerKind, spec: CacheSpec) -> Result<Self> {
        spec.validate()?;
        Ok(Self {
            kind,
            spec,
            k: Storage::zeros(spec.dtype, spec.head_dim, 0),
            v: Storage::zeros(spec.dtype, spec.head_dim, 0),
            capacity: 0,
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

    /// Positions per head allocated.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes allocated for keys and values (capacity, not positions held: that is what the
    /// memory costs).
    pub fn memory_bytes(&self) -> u64 {
        // Cannot overflow: the same product was allocated.
        2 * (self.capacity * self.spec.kv_heads * self.spec.dtype.vector_bytes(self.spec.head_dim)) as u64
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
    /// chunked layer span a chunk boundary (split them with [`LayerCache::segments`]). The cache
    /// is unchanged on error.
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
        if let Some(chunk) = self.kind.chunk() {
            if start / chunk != (start + t - 1) / chunk {
                return Err(KvError::CrossesChunk { start, len: t, chunk });
            }
            if start.is_multiple_of(chunk) {
                // A new chunk: no later query can see what is held.
                self.first_pos = start;
                self.len = 0;
            }
        }
        let needed = self.len + t;
        if needed > self.capacity {
            self.grow_to(grown_capacity(self.kind, needed)?)?;
        }
        let stride = self.capacity * d;
        for (i, (kt, vt)) in k.outer_iter().zip(v.outer_iter()).enumerate() {
            let slot = (self.len + i) * d;
            for (h, (kh, vh)) in kt.outer_iter().zip(vt.outer_iter()).enumerate() {
                self.k.write(h * stride + slot, kh);
                self.v.write(h * stride + slot, vh);
            }
        }
        self.len = needed;
        Ok(())
    }

    /// What attention reads: keys and values of the held positions, slot 0 at `first_pos()`.
    pub fn view(&self) -> LayerView<'_> {
        let make = |data| KvView {
            data,
            heads: self.spec.kv_heads,
            len: self.len,
            head_dim: self.spec.head_dim,
            head_stride: self.capacity * self.spec.head_dim,
            first_pos: self.first_pos,
        };
        LayerView {
            k: make(self.k.data()),
            v: make(self.v.data()),
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

    fn widen(&self, s: &Storage) -> Array3<f32> {
        let (hkv, d) = (self.spec.kv_heads, self.spec.head_dim);
        let mut out = Array3::zeros((hkv, self.len, d));
        for (h, mut head) in out.axis_iter_mut(Axis(0)).enumerate() {
            if let Some(dst) = head.as_slice_mut() {
                s.read(h * self.capacity * d, dst);
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
    /// from a shorter prefix). Capacity is kept.
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

    /// Forgets every position; capacity is kept for the next sequence.
    pub fn reset(&mut self) {
        self.first_pos = 0;
        self.len = 0;
    }

    /// Pre-sizes for a context of `n_tokens` positions in total (`min(n_tokens, C)` for a chunked
    /// layer), so that filling it never grows. Never shrinks.
    pub fn reserve(&mut self, n_tokens: usize) -> Result<()> {
        let target = self.kind.max_held(n_tokens);
        if target > self.capacity {
            self.grow_to(target)?;
        }
        Ok(())
    }

    /// Frees the capacity beyond the positions held.
    pub fn shrink_to_fit(&mut self) {
        if self.capacity > self.len {
            self.relayout(self.len);
        }
    }

    fn grow_to(&mut self, capacity: usize) -> Result<()> {
        // Refuse sizes whose byte count does not fit in memory arithmetic before allocating.
        let bytes = self.spec.layer_bytes(capacity)?;
        usize::try_from(bytes).map_err(|_| KvError::Overflow("capacity"))?;
        // Room for both keys and values first: an allocation the system refuses is an error,
        // not an abort, and leaves the layer as it was.
        let (hkv, d) = (self.spec.kv_heads, self.spec.head_dim);
        let additional = hkv * d * (capacity - self.capacity);
        for s in [&mut self.k, &mut self.v] {
            s.try_reserve(additional).map_err(|_| KvError::Alloc { bytes })?;
        }
        self.relayout(capacity);
        Ok(())
    }

    fn relayout(&mut self, capacity: usize) {
        let (hkv, d) = (self.spec.kv_heads, self.spec.head_dim);
        self.k.relayout(hkv, d, self.capacity, capacity, self.len);
        self.v.relayout(hkv, d, self.capacity, capacity, self.len);
        self.capacity = capacity;
    }
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
    fn global_layer_grows_along_the_ladder_and_keeps_its_contents() {
        let mut c = LayerCache::new(LayerKind::Global, spec()).unwrap();
        let mut caps = Vec::new();
        for _ in 0..100 {
            push(&mut c, 1).unwrap();
            if caps.last() != Some(&c.capacity()) {
                caps.push(c.capacity());
            }
        }
        assert_eq!(caps, vec![16, 24, 32, 48, 64, 96, 128]);
        assert_eq!(c.keys_f32(), tokens(0, 100, 2, 3).permuted_axes([1, 0, 2]));
    }

    #[test]
    fn view_is_head_major_with_a_capacity_stride() {
        let mut c = LayerCache::new(LayerKind::Global, spec()).unwrap();
        push(&mut c, 5).unwrap();
        let view = c.view();
        assert!(view.k.is_consistent() && view.v.is_consistent());
        assert_eq!(
            (view.k.heads, view.k.len, view.k.head_dim, view.k.first_pos),
            (2, 5, 3, 0)
        );
        assert_eq!(view.k.head_stride, 16 * 3);
        let KvData::F32(data) = view.k.data else {
            panic!("f32 storage expected")
        };
        for p in 0..5 {
            for h in 0..2 {
                for j in 0..3 {
                    let at = h * view.k.head_stride + p * 3 + j;
                    assert_eq!(data[at], (1000 * p + 10 * h + j) as f32);
                }
            }
        }
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
        assert_eq!((c.next_pos(), c.held(), c.capacity()), (3, 3, 16));
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
    fn reserve_presizes_exactly_and_shrink_frees() {
        let mut g = LayerCache::new(LayerKind::Global, spec()).unwrap();
        let mut ch = LayerCache::new(LayerKind::chunked(8).unwrap(), spec()).unwrap();
        g.reserve(37).unwrap();
        ch.reserve(37).unwrap();
        assert_eq!((g.capacity(), ch.capacity()), (37, 8));
        assert_eq!(g.memory_bytes(), 2 * 37 * 2 * 3 * 4);
        push(&mut g, 37).unwrap();
        assert_eq!(g.capacity(), 37);
        g.truncate(5).unwrap();
        g.shrink_to_fit();
        assert_eq!(g.capacity(), 5);
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
