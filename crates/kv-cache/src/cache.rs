//! The cache of a whole decoder: one [`LayerCache`] per layer.

use ndarray::ArrayView3;

use crate::{CacheSpec, KvError, LayerCache, LayerKind, LayerView, MemoryBytes, PagePool, Result, Segments};

/// One cache per decoder layer, built from the layers' kinds.
///
/// During a forward pass each layer appends its new keys/values and reads its view; layers are
/// updated one after another, so between layers they may briefly disagree on their length
/// ([`KvCache::len`] is the smallest).
#[derive(Clone, Debug)]
pub struct KvCache {
    spec: CacheSpec,
    pool: Option<PagePool>,
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// An empty cache with one layer per entry of `kinds`; nothing is allocated yet.
    pub fn new(kinds: &[LayerKind], spec: CacheSpec) -> Result<Self> {
        Self::build(kinds, spec, None)
    }

    /// [`KvCache::new`] whose pages count against `pool`'s byte budget (shared with every
    /// other cache of the pool: an engine's sessions).
    pub fn with_pool(kinds: &[LayerKind], spec: CacheSpec, pool: PagePool) -> Result<Self> {
        Self::build(kinds, spec, Some(pool))
    }

    fn build(kinds: &[LayerKind], spec: CacheSpec, pool: Option<PagePool>) -> Result<Self> {
        let layers = kinds
            .iter()
            .map(|&kind| match &pool {
                Some(p) => LayerCache::with_pool(kind, spec, p.clone()),
                None => LayerCache::new(kind, spec),
            })
            .collect::<Result<Vec<_>>>()?;
        spec.validate()?;
        Ok(Self { spec, pool, layers })
    }

    /// The budget this cache's pages count against, if any.
    pub fn pool(&self) -> Option<&PagePool> {
        self.pool.as_ref()
    }

    /// The shapes and dtype shared by every layer.
    pub fn spec(&self) -> CacheSpec {
        self.spec
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The layers' kinds, in order.
    pub fn kinds(&self) -> impl Iterator<Item = LayerKind> + '_ {
        self.layers.iter().map(LayerCache::kind)
    }

    /// Layer `i`'s cache.
    pub fn layer(&self, i: usize) -> Result<&LayerCache> {
        let layers = self.layers.len();
        self.layers
            .get(i)
            .ok_or(KvError::NoSuchLayer { layer: i, layers })
    }

    /// Layer `i`'s cache, mutably (hand it to that layer's attention).
    pub fn layer_mut(&mut self, i: usize) -> Result<&mut LayerCache> {
        let layers = self.layers.len();
        self.layers
            .get_mut(i)
            .ok_or(KvError::NoSuchLayer { layer: i, layers })
    }

    /// All layers, mutably, in order.
    pub fn layers_mut(&mut self) -> impl Iterator<Item = &mut LayerCache> {
        self.layers.iter_mut()
    }

    /// Positions every layer has appended: the absolute position of the next token.
    pub fn len(&self) -> usize {
        self.layers.iter().map(LayerCache::next_pos).min().unwrap_or(0)
    }

    /// True when no position was appended.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pieces in which layer `layer` must append (and attend) the next `t` tokens; see
    /// [`LayerKind::segments`].
    pub fn segments(&self, layer: usize, t: usize) -> Result<Segments> {
        Ok(self.layer(layer)?.segments(t))
    }

    /// Appends to layer `layer`; see [`LayerCache::append`].
    ///
    /// # Shapes
    /// `k`, `v`: `[T, Hkv, D]`.
    pub fn append(&mut self, layer: usize, k: ArrayView3<f32>, v: ArrayView3<f32>) -> Result<()> {
        self.layer_mut(layer)?.append(k, v)
    }

    /// What layer `layer`'s attention reads; see [`LayerCache::view`].
    pub fn view(&self, layer: usize) -> Result<LayerView<'_>> {
        Ok(self.layer(layer)?.view())
    }

    /// Keeps the first `len` positions in every layer (to regenerate from a shorter prefix).
    /// All layers or none: if any layer refuses (see [`LayerCache::truncate`]), nothing changes.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for l in &self.layers {
            l.check_truncate(len)?;
        }
        for l in &mut self.layers {
            l.truncate(len)?;
        }
        Ok(())
    }

    /// The largest `l ≤ len` (and `≤` [`KvCache::len`]) that [`KvCache::truncate`] accepts:
    /// `len` itself, or lower where a chunked layer no longer holds the keys `len` needs (the
    /// start of that chunk, where nothing before is needed). Changes nothing.
    pub fn truncatable(&self, len: usize) -> usize {
        let mut l = len.min(self.len());
        loop {
            match self.layers.iter().find_map(|x| x.check_truncate(l).err()) {
                None => return l,
                // A chunked layer accepts any multiple of its chunk, and `l` only decreases.
                Some(KvError::Evicted { chunk, .. }) => l = l / chunk * chunk,
                Some(_) => return 0,
            }
        }
    }

    /// Forgets every position in every layer; capacity is kept.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(LayerCache::reset);
    }

    /// Pre-allocates every layer's pages for a context of `n_tokens` positions in total
    /// ([`CacheSpec::estimate`]); filling them afterwards allocates nothing.
    pub fn reserve(&mut self, n_tokens: usize) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.reserve(n_tokens))
    }

    /// Frees the pages beyond what each layer holds.
    pub fn shrink_to_fit(&mut self) {
        self.layers.iter_mut().for_each(LayerCache::shrink_to_fit);
    }

    /// Bytes allocated, per layer kind.
    pub fn memory_bytes(&self) -> MemoryBytes {
        let mut out = MemoryBytes::default();
        for l in &self.layers {
            // Sums of allocated sizes cannot overflow u64.
            let _ = out.add(l.kind(), l.memory_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama4_core::{DType, KvDtype};
    use ndarray::Array3;

    fn fill(c: &mut KvCache, t: usize) {
        let s = c.spec();
        let k = Array3::from_shape_fn((t, s.kv_heads, s.head_dim), |(i, h, j)| {
            (i * 100 + h * 10 + j) as f32
        });
        for layer in 0..c.num_layers() {
            for piece in c.segments(layer, t).unwrap() {
                let kp = k.slice(ndarray::s![piece, .., ..]);
                c.append(layer, kp, kp).unwrap();
            }
        }
    }

    #[test]
    fn per_kind_memory_and_lengths() {
        let kinds = [
            LayerKind::chunked(8).unwrap(),
            LayerKind::Global,
            LayerKind::chunked(8).unwrap(),
        ];
        let spec = CacheSpec::new(2, 4, DType::F16).with_page_len(16);
        let mut c = KvCache::new(&kinds, spec).unwrap();
        assert!(c.is_empty());
        assert_eq!(c.memory_bytes(), MemoryBytes::default());
        fill(&mut c, 20);
        assert_eq!(c.len(), 20);
        // Chunked: one page of 8 (pages never exceed the chunk); global: two pages of 16.
        let per_pos = 2 * 2 * 4 * 2;
        assert_eq!(
            c.memory_bytes(),
            MemoryBytes {
                chunked: 2 * 8 * per_pos,
                global: 32 * per_pos
            }
        );
        assert_eq!(c.memory_bytes(), spec.estimate(&kinds, 20).unwrap());
        assert_eq!(c.view(0).unwrap().k.first_pos, 16);
        assert_eq!(c.view(1).unwrap().k.len, 20);
        c.reset();
        assert!(c.is_empty());
        assert_eq!(c.memory_bytes().global, 32 * per_pos);
    }

    /// Over contexts far beyond the chunk, in every format and with pages that do and do not
    /// divide the chunk: the chunked layers hold one chunk's pages whatever the context, the
    /// global layers' bytes grow linearly (whole pages), and what is allocated is the estimate,
    /// whether the cache was grown or reserved first.
    #[test]
    fn chunked_memory_is_flat_global_is_linear_and_the_estimate_is_allocated() {
        let c8 = LayerKind::chunked(8).unwrap();
        let kinds = [c8, LayerKind::Global, c8, LayerKind::Global];
        for dtype in [KvDtype::F32, KvDtype::BF16, KvDtype::F16, KvDtype::Q8] {
            for page in [3, 8, 64] {
                let spec = CacheSpec::new(2, 16, dtype).with_page_len(page);
                // K and V of one position of one layer: 2 · Hkv · (D · bytes, or D + 4 for q8).
                let per_pos = spec.layer_bytes(1).unwrap();
                assert_eq!(per_pos, 2 * 2 * dtype.vector_bytes(16) as u64);
                let chunk_pages = 8usize.div_ceil(page.min(8)) * page.min(8);
                for n in [8, 64, 300, 1000] {
                    for reserved in [false, true] {
                        let mut c = KvCache::new(&kinds, spec).unwrap();
                        if reserved {
                            c.reserve(n).unwrap();
                        }
                        let before = c.memory_bytes();
                        fill(&mut c, n);
                        let m = c.memory_bytes();
                        let what = format!("{dtype} page {page} n={n} reserved {reserved}");
                        assert_eq!(m, spec.estimate(&kinds, n).unwrap(), "{what}");
                        if reserved {
                            assert_eq!(m, before, "{what}: filling a reserved cache allocates");
                        }
                        assert_eq!(m.chunked, 2 * chunk_pages as u64 * per_pos, "{what}: flat");
                        let global = n.div_ceil(page) * page;
                        assert_eq!(m.global, 2 * global as u64 * per_pos, "{what}: linear");
                    }
                }
            }
        }
    }

    #[test]
    fn len_is_the_shortest_layer_and_bad_layers_are_errors() {
        let kinds = [LayerKind::Global, LayerKind::chunked(4).unwrap()];
        let mut c = KvCache::new(&kinds, CacheSpec::new(1, 2, DType::F32)).unwrap();
        let k = Array3::<f32>::zeros((3, 1, 2));
        c.append(0, k.view(), k.view()).unwrap();
        assert_eq!(c.len(), 0);
        c.append(1, k.view(), k.view()).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(
            c.append(2, k.view(), k.view()),
            Err(KvError::NoSuchLayer { layer: 2, layers: 2 })
        );
        assert!(matches!(c.view(5), Err(KvError::NoSuchLayer { layer: 5, .. })));
    }

    #[test]
    fn truncate_is_all_layers_or_none() {
        let kinds = [LayerKind::Global, LayerKind::chunked(4).unwrap()];
        let mut c = KvCache::new(&kinds, CacheSpec::new(1, 2, DType::F32)).unwrap();
        fill(&mut c, 10); // chunked holds 8, 9
        assert_eq!(
            c.truncate(7),
            Err(KvError::Evicted {
                requested: 7,
                first_held: 8,
                chunk: 4
            })
        );
        assert_eq!(c.view(0).unwrap().k.len, 10);
        c.truncate(8).unwrap();
        assert_eq!(c.len(), 8);
        assert_eq!(c.view(0).unwrap().k.len, 8);
    }

    #[test]
    fn truncatable_lowers_to_where_every_layer_can_restart() {
        let kinds = [LayerKind::Global, LayerKind::chunked(4).unwrap()];
        let mut c = KvCache::new(&kinds, CacheSpec::new(1, 2, DType::F32)).unwrap();
        fill(&mut c, 10); // chunked holds 8, 9
        assert_eq!(c.truncatable(10), 10);
        assert_eq!(c.truncatable(12), 10);
        assert_eq!(c.truncatable(9), 9);
        assert_eq!(c.truncatable(7), 4);
        assert_eq!(c.truncatable(3), 0);
        for l in 0..=10 {
            let t = c.truncatable(l);
            assert!(t <= l && c.clone().truncate(t).is_ok(), "{l} -> {t}");
            assert!((t + 1..=l).all(|m| c.clone().truncate(m).is_err()), "{l} -> {t}");
        }
    }

    /// Caches of one pool stay within its budget together: a page that does not fit is an
    /// error that changes nothing, a clone's shared pages count once, a copy on write counts,
    /// and a dropped cache gives its pages back.
    #[test]
    fn caches_of_a_pool_share_its_budget() {
        let kinds = [LayerKind::Global, LayerKind::chunked(4).unwrap()];
        let spec = CacheSpec::new(1, 2, DType::F32).with_page_len(4);
        // One page of keys or values: 1 head × 4 positions × 2 × 4 bytes.
        let page = 32u64;
        let pool = PagePool::new(14 * page);
        let mut a = KvCache::with_pool(&kinds, spec, pool.clone()).unwrap();
        fill(&mut a, 8); // global: 2 pages, chunked: 1, each for K and V
        assert_eq!(pool.used(), 6 * page);
        assert_eq!(pool.used(), a.memory_bytes().total());
        let mut b = a.clone();
        assert_eq!(pool.used(), 6 * page, "shared pages count once");
        b.truncate(6).unwrap();
        // Position 6 goes into the global layer's second page and the chunked layer's page
        // (which holds 4..8): both copied, for K and V.
        fill(&mut b, 1);
        assert_eq!(pool.used(), 10 * page);
        let mut c = KvCache::with_pool(&kinds, spec, pool.clone()).unwrap();
        fill(&mut c, 4); // 4 pages
        assert_eq!(pool.used(), 14 * page);
        let before = (c.len(), c.memory_bytes());
        let k = ndarray::Array3::<f32>::zeros((1, 1, 2));
        assert_eq!(
            c.append(0, k.view(), k.view()),
            Err(KvError::Budget {
                requested: page,
                used: 14 * page,
                budget: 14 * page
            })
        );
        assert_eq!((c.len(), c.memory_bytes()), before);
        drop(a);
        // b still holds the global layer's first page, which it shared with a.
        assert_eq!(pool.used(), 10 * page);
        drop(b);
        assert_eq!(pool.used(), 4 * page);
        fill(&mut c, 4);
        drop(c);
        assert_eq!(pool.used(), 0);
    }

    #[test]
    fn errors_convert_to_the_core_error() {
        let e: llama4_core::Error = KvError::NoSuchLayer { layer: 3, layers: 2 }.into();
        assert!(matches!(e, llama4_core::Error::Shape { op: "kv-cache", .. }));
        assert!(e.to_string().contains("layer 3"));
    }
}
