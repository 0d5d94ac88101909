//! One call of the kernel on checked inputs: work items, their working space, the parallel run,
//! and the exact merge of items that split one query's keys.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{
    kernel, run_item, visible_slots, Args, AttentionScratch, AttnContext, Dims, Item, Kernel, KvElem,
    Partial, Path, Work, KEY_TILE, MIN_KEYS_PER_SPLIT, ROWS_PER_ITEM,
};
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
}

impl Call<'_> {
    /// Attention into `out` (`[T, Hq, D]`, overwritten).
    pub fn run<E: KvElem>(
        &self,
        (kd, k_scales): (&[E], &[f32]),
        (vd, v_scales): (&[E], &[f32]),
        k: &KvView,
        v: &KvView,
        out: &mut [f32],
        scratch: &mut AttentionScratch,
    ) {
        // Zero: rows that see no key stay so, and the merge below accumulates here.
        out.fill(0.0);
        if self.dims.t == 0 || self.dims.len == 0 {
            return;
        }
        let args = Args {
            q: self.q,
            k: kd,
            v: vd,
            k_stride: k.head_stride,
            v_stride: v.head_stride,
            k_scales,
            v_scales,
            scale_stride: k.head_stride / self.dims.d.max(1),
            dims: self.dims,
            ctx: self.ctx,
        };
        self.plan_items(scratch);
        self.prepare_work(scratch);
        self.execute(&args, scratch);
        self.merge(scratch, out);
    }

    /// Items: kv heads × query blocks; when that leaves threads idle (decoding with few kv
    /// heads), the keys of each item are split too and the pieces merged afterwards. Sizes the
    /// partial buffers for them.
    fn plan_items(&self, scratch: &mut AttentionScratch) {
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
        let tokens_per_item = (ROWS_PER_ITEM / rep).max(1);
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
    fn prepare_work(&self, scratch: &mut AttentionScratch) {
        let threads = pool::threads();
        if scratch.work.len() < threads {
            scratch.work.resize_with(threads, Work::default);
        }
        let rep = self.dims.group();
        let mut largest = [(Kernel::Body, 0usize); 3];
        for it in &scratch.items {
            let rows = (it.t1 - it.t0) * rep;
            let k = kernel(self.isa, self.path, rows);
            let slot = &mut largest[k as usize];
            *slot = (k, slot.1.max(rows));
        }
        for w in &mut scratch.work {
            for &(k, rows) in &largest {
                if rows > 0 {
                    w.prepare(k, self.dims.d, rows);
                }
            }
        }
    }

    /// One task per thread, each claiming items until none is left.
    fn execute<E: KvElem>(&self, args: &Args<E>, scratch: &mut AttentionScratch) {
        let (d, rep) = (self.dims.d, self.dims.group());
        let items = &scratch.items[..];
        let workers = pool::threads().min(items.len());
        let next = AtomicUsize::new(0);
        let work = SyncPtr(scratch.work.as_mut_ptr());
        let (acc, m, l) = (
            SyncPtr(scratch.acc.as_mut_ptr()),
            SyncPtr(scratch.m.as_mut_ptr()),
            SyncPtr(scratch.l.as_mut_ptr()),
        );
        let (isa, path) = (self.isa, self.path);
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
                run_item(isa, path, args, it, work, out);
            }
        });
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
                    let (m1, m2) = (m_all[dst], p_m[row]);
                    if m2 == f32::NEG_INFINITY {
                        continue;
                    }
                    let m = m1.max(m2);
                    let (a1, a2) = ((m1 - m).exp(), (m2 - m).exp());
                    l_all[dst] = l_all[dst] * a1 + p_l[row] * a2;
                    let acc = &mut out[dst * d..(dst + 1) * d];
                    for (x, &y) in acc.iter_mut().zip(&p_acc[row * d..(row + 1) * d]) {
                        *x = *x * a1 + y * a2;
                    }
                    m_all[dst] = m;
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

/// `v` with room for `n` elements in all (`Vec::reserve` counts from the length).
fn reserve_total<T>(v: &mut Vec<T>, n: usize) {
    v.reserve(n.saturating_sub(v.len()));
}
