//! One call of the kernel on checked inputs: work items, their working space, the parallel run,
//! and the exact merge of items that split one query's keys.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{
    kernel, run_item, visible_slots, Ahead, Args, AttentionScratch, AttnContext, Dims, Item, Kernel, KvElem,
    Partial, Path, Work, KEY_TILE, MIN_KEYS_PER_SPLIT, ROWS_PER_ITEM, ROWS_PER_ITEM_BF16,
};
use crate::kernels::simd::QueryI8;
use crate::kernels::Isa;
use crate::pool::{self, SyncPtr};
use crate::scratch::refill;
use crate::KvView;

/// Pieces per thread a decode call's keys are split into (each at least
/// [`MIN_KEYS_PER_SPLIT`] keys): more than one, so that a thread the system preempts (other
/// processes share the cores) leaves pieces that the others take, rather than the whole call
/// waiting for its one piece.
const PIECES_PER_THREAD: usize = 4;

/// A checked call: everything but the key/value data.
pub(super) struct Call<'a> {
    pub isa: Isa,
    pub path: Path,
    /// Queries `[T, Hq, D]`, standard layout.
    pub q: &'a [f32],
    pub dims: Dims,
    pub ctx: &'a AttnContext<'a>,
    /// Slots per segment of the key/value views ([`KvView::segment_len`]).
    pub seg: usize,
}

impl<'c> Call<'c> {
    /// Attention into `out` (`[T, Hq, D]`, overwritten) over keys and values of element type
    /// `E` (checked by the caller, as every segment's layout).
    pub fn run<E: KvElem>(&self, k: &KvView, v: &KvView, out: &mut [f32], scratch: &mut AttentionScratch) {
        // Zero: rows that see no key stay so, and the merge below accumulates here.
        out.fill(0.0);
        if self.dims.t == 0 || self.dims.len == 0 {
            return;
        }
        self.plan_items::<E>(scratch);
        self.prepare_work::<E>(scratch);
        self.round_queries::<E>(&mut scratch.qi);
        self.execute::<E>(k, v, scratch);
        self.merge(scratch, out);
    }

    /// `qi`: the scaled query rows rounded to int8 when this call scores int8 keys in
    /// integers, else nothing. Only a call of one query token (a decode step) rounds its
    /// queries: the tokens of a prefill keep one arithmetic, whichever kernel each item of
    /// them runs.
    fn round_queries<E: KvElem>(&self, qi: &mut Vec<QueryI8>) {
        let d = self.dims.d;
        qi.clear();
        if !(E::INT_DOT && self.dims.t == 1 && d > 0 && 32 % d == 0) {
            return;
        }
        let mut row = [0f32; 32];
        qi.extend(self.q.chunks_exact(d).map(|x| {
            for (r, &v) in row.iter_mut().zip(x) {
                *r = v * self.ctx.scale;
            }
            QueryI8::new(&row[..d])
        }));
    }

    /// The inputs of the items' kernels over segment `p` of the views (one buffer, or one
    /// page): its elements, and the slots it holds as if they were the whole view.
    fn segment_args<'a, E: KvElem>(
        &'a self,
        k: &KvView<'a>,
        v: &KvView<'a>,
        qi: &'a [QueryI8],
        p: usize,
    ) -> Option<Args<'a, E>> {
        let ((kd, k_stride), (vd, v_stride)) = (k.segment(p)?, v.segment(p)?);
        let ((k, k_scales), (v, v_scales)) = (E::typed(kd)?, E::typed(vd)?);
        let seg = self.seg;
        let base = p * seg;
        Some(Args {
            q: self.q,
            k,
            v,
            k_stride,
            v_stride,
            k_scales,
            v_scales,
            scale_stride: k_stride / self.dims.d.max(1),
            qi,
            dims: Dims {
                len: self.dims.len.checked_sub(base)?.min(seg),
                first_pos: self.dims.first_pos + base,
                ..self.dims
            },
            ctx: self.ctx,
            ahead: None,
        })
    }

    /// Items: kv heads × query blocks; when that leaves threads idle (decoding with few kv
    /// heads), the keys of each item are split too and the pieces merged afterwards. Sizes the
    /// partial buffers for them.
    fn plan_items<E: KvElem>(&self, scratch: &mut AttentionScratch) {
        let Dims {
            t,
            hkv,
            d,
            len,
            first_pos,
            ..
        } = self.dims;
        let rep = self.dims.group();
        let ctx = self.ctx;
        let rows_per_item = match kernel::<E>(self.isa, self.path, ROWS_PER_ITEM) {
            #[cfg(target_arch = "x86_64")]
            Kernel::RowsBf16 => ROWS_PER_ITEM_BF16,
            _ => ROWS_PER_ITEM,
        };
        let tokens_per_item = (rows_per_item / rep).max(1);
        let base = &mut scratch.base;
        base.clear();
        for g in 0..hkv {
            for t0 in (0..t).step_by(tokens_per_item) {
                let t1 = (t0 + tokens_per_item).min(t);
                let (mut s0, mut s1) = (usize::MAX, 0);
                for &p in &ctx.positions[t0..t1] {
                    let (lo, hi) = visible_slots(ctx.mask, p, first_pos, len);
                    if lo < hi {
                        s0 = s0.min(lo);
                        s1 = s1.max(hi);
                    }
                }
                if s0 < s1 {
                    base.push(Item {
                        g,
                        t0,
                        t1,
                        s0,
                        s1,
                        row0: 0,
                    });
                }
            }
        }
        let threads = pool::threads();
        let base_rows = base.iter().map(|it| (it.t1 - it.t0) * rep).sum::<usize>();
        let items = &mut scratch.items;
        items.clear();
        if base.len() < 2 * threads {
            let splits = (PIECES_PER_THREAD * threads).div_ceil(base.len().max(1));
            // Room for the most pieces these items can give, so that decoding over a growing
            // cache does not allocate whenever one more split starts.
            reserve_total(items, base.len() * splits);
            reserve_total(&mut scratch.acc, base_rows * splits * d);
            reserve_total(&mut scratch.m, base_rows * splits);
            reserve_total(&mut scratch.l, base_rows * splits);
            for &it in base.iter() {
                let n = it.s1 - it.s0;
                let parts = splits.min(n / MIN_KEYS_PER_SPLIT).max(1);
                // Split on tile boundaries so each piece reads whole tiles.
                let step = n.div_ceil(parts).div_ceil(KEY_TILE) * KEY_TILE;
                items.extend((it.s0..it.s1).step_by(step).map(|s0| Item {
                    s0,
                    s1: (s0 + step).min(it.s1),
                    ..it
                }));
            }
        } else {
            items.extend_from_slice(base);
        }
        let mut rows_total = 0;
        for it in items.iter_mut() {
            it.row0 = rows_total;
            rows_total += (it.t1 - it.t0) * rep;
        }
        // Stale contents are fine: each item's kernel overwrites all of its rows.
        scratch.acc.resize(rows_total * d, 0.0);
        scratch.m.resize(rows_total, 0.0);
        scratch.l.resize(rows_total, 0.0);
    }

    /// One working space per thread, each sized for the largest item of each kernel, whichever
    /// items its task ends up with.
    fn prepare_work<E: KvElem>(&self, scratch: &mut AttentionScratch) {
        let threads = pool::threads();
        if scratch.work.len() < threads {
            scratch.work.resize_with(threads, Work::default);
        }
        let rep = self.dims.group();
        let mut largest = [(Kernel::Body, 0usize); 4];
        for it in &scratch.items {
            let rows = (it.t1 - it.t0) * rep;
            let k = kernel::<E>(self.isa, self.path, rows);
            let slot = &mut largest[k as usize];
            *slot = (k, slot.1.max(rows));
        }
        let most = largest.iter().map(|&(_, rows)| rows).max().unwrap_or(0);
        for w in &mut scratch.work {
            for &(k, rows) in &largest {
                if rows > 0 {
                    w.prepare(k, self.dims.d, rows);
                }
            }
            w.spill.prepare(self.dims.d, most);
        }
    }

    /// One task per thread, each claiming items until none is left.
    fn execute<E: KvElem>(&self, k: &KvView, v: &KvView, scratch: &mut AttentionScratch) {
        let (d, rep) = (self.dims.d, self.dims.group());
        let items = &scratch.items[..];
        let qi = &scratch.qi[..];
        let workers = pool::threads().min(items.len());
        let next = AtomicUsize::new(0);
        let work = SyncPtr(scratch.work.as_mut_ptr());
        let (acc, m, l) = (
            SyncPtr(scratch.acc.as_mut_ptr()),
            SyncPtr(scratch.m.as_mut_ptr()),
            SyncPtr(scratch.l.as_mut_ptr()),
        );
        pool::run(workers, &|w| {
            // SAFETY: `w < workers <= work.len()`, and the pool runs task `w` once: no other
            // reference to `work[w]` exists while it runs; the vector is not resized meanwhile.
            let work = unsafe { &mut *work.get().add(w) };
            while let Some(&it) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                let rows = (it.t1 - it.t0) * rep;
                // SAFETY: the counter hands each item to one task; items' rows
                // `row0..row0 + rows` are disjoint and inside the partial buffers, sized to
                // their total by `plan_items`. The pool returns only after every task has
                // finished, so these borrows end before the merge reads the buffers.
                let out = unsafe {
                    Partial {
                        acc: std::slice::from_raw_parts_mut(acc.get().add(it.row0 * d), rows * d),
                        m: std::slice::from_raw_parts_mut(m.get().add(it.row0), rows),
                        l: std::slice::from_raw_parts_mut(l.get().add(it.row0), rows),
                    }
                };
                self.run_segments::<E>((k, v, qi), it, work, out);
            }
        });
    }

    /// One item over the segments its key slots cover: the first writes `out`, each later one
    /// is computed aside and folded in (log-sum-exp), so a page boundary costs one merge of
    /// the item's rows.
    fn run_segments<E: KvElem>(
        &self,
        (k, v, qi): (&KvView, &KvView, &[QueryI8]),
        it: Item,
        work: &mut Work,
        out: Partial,
    ) {
        let (first, last) = (it.s0 / self.seg, (it.s1 - 1) / self.seg);
        let Partial { acc, m, l } = out;
        // Nothing seen yet: what a segment that cannot be read (never, after `check`) leaves.
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        acc.fill(0.0);
        let mut spill = std::mem::take(&mut work.spill);
        let mut next = self.segment_args::<E>(k, v, qi, first);
        for p in first..=last {
            let this = next.take();
            if p < last {
                next = self.segment_args::<E>(k, v, qi, p + 1);
            }
            let Some(mut args) = this else {
                continue;
            };
            args.ahead = next.as_ref().map(|n| Ahead {
                k: n.k,
                v: n.v,
                k_scales: n.k_scales,
                v_scales: n.v_scales,
            });
            let base = p * self.seg;
            let sub = Item {
                s0: it.s0.max(base) - base,
                s1: it.s1.min(base + self.seg) - base,
                ..it
            };
            if p == first {
                let out = Partial {
                    acc: &mut *acc,
                    m: &mut *m,
                    l: &mut *l,
                };
                run_item(self.isa, self.path, &args, sub, work, out);
            } else {
                let rows = m.len();
                let d = self.dims.d;
                let piece = Partial {
                    acc: &mut spill.acc[..rows * d],
                    m: &mut spill.m[..rows],
                    l: &mut spill.l[..rows],
                };
                run_item(self.isa, self.path, &args, sub, work, piece);
                for r in 0..rows {
                    fold(
                        &mut acc[r * d..(r + 1) * d],
                        (&mut m[r], &mut l[r]),
                        &spill.acc[r * d..(r + 1) * d],
                        (spill.m[r], spill.l[r]),
                    );
                }
            }
        }
        work.spill = spill;
    }

    /// Merges pieces of the same (head, token) rows with the log-sum-exp rule into `out`, then
    /// normalises.
    fn merge(&self, scratch: &mut AttentionScratch, out: &mut [f32]) {
        let Dims { t, hq, d, .. } = self.dims;
        let rep = self.dims.group();
        let m_all = refill(&mut scratch.m_all, t * hq, f32::NEG_INFINITY);
        let l_all = refill(&mut scratch.l_all, t * hq, 0f32);
        let (p_acc, p_m, p_l) = (&scratch.acc, &scratch.m, &scratch.l);
        for it in &scratch.items {
            for ti in 0..it.t1 - it.t0 {
                for r in 0..rep {
                    let row = it.row0 + ti * rep + r;
                    let dst = (it.t0 + ti) * hq + it.g * rep + r;
                    fold(
                        &mut out[dst * d..(dst + 1) * d],
                        (&mut m_all[dst], &mut l_all[dst]),
                        &p_acc[row * d..(row + 1) * d],
                        (p_m[row], p_l[row]),
                    );
                }
            }
        }
        for (row, &l) in l_all.iter().enumerate() {
            let o = &mut out[row * d..(row + 1) * d];
            if l > 0.0 {
                let inv = 1.0 / l;
                for y in o {
                    *y *= inv;
                }
            } else {
                // Accumulated from nothing (or from non-finite scores): no key seen.
                o.fill(0.0);
            }
        }
    }
}

/// Folds a partial row (unnormalised `acc2` with running max `m2` and sum `l2`) computed over
/// other keys into `acc` with its `(m, l)`, exactly: both are rescaled to the larger max.
#[inline]
fn fold(acc: &mut [f32], (m, l): (&mut f32, &mut f32), acc2: &[f32], (m2, l2): (f32, f32)) {
    if m2 == f32::NEG_INFINITY {
        return;
    }
    let mx = m.max(m2);
    let (a1, a2) = ((*m - mx).exp(), (m2 - mx).exp());
    *l = *l * a1 + l2 * a2;
    for (x, &y) in acc.iter_mut().zip(acc2) {
        *x = *x * a1 + y * a2;
    }
    *m = mx;
}

/// `v` with room for `n` elements in all (`Vec::reserve` counts from the length).
fn reserve_total<T>(v: &mut Vec<T>, n: usize) {
    v.reserve(n.saturating_sub(v.len()));
}
