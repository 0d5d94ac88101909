//! Typed element buffers: the cache stores f32 activations as f32, bf16, f16 or q8 (int8 with
//! one scale per head vector).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use llama4_core::{quantize_q8, KvData, KvDtype};
use ndarray::ArrayView1;

/// One layer's keys (or values), `[heads, capacity, head_dim]` row-major in the storage dtype.
#[derive(Clone, Debug)]
pub(crate) enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    /// `q` as the float variants; `scales: [heads, capacity]`, one per vector of `d`.
    Q8 {
        q: Vec<i8>,
        scales: Vec<f32>,
        d: usize,
    },
}

/// Runs `$body` with `$v` bound to the inner `Vec` whatever the dtype.
macro_rules! each {
    ($s:expr, $v:ident => $body:expr) => {
        match $s {
            Storage::F32($v) => $body,
            Storage::BF16($v) => $body,
            Storage::F16($v) => $body,
            Storage::Q8 { q: $v, .. } => $body,
        }
    };
}

impl Storage {
    /// `n` zero elements (whole vectors of `d`: `n` is a multiple of `d`).
    pub(crate) fn zeros(dtype: KvDtype, d: usize, n: usize) -> Self {
        match dtype {
            KvDtype::F32 => Storage::F32(vec![0.0; n]),
            KvDtype::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
            KvDtype::F16 => Storage::F16(vec![f16::ZERO; n]),
            KvDtype::Q8 => Storage::Q8 {
                q: vec![0; n],
                scales: vec![0.0; n / d.max(1)],
                d,
            },
        }
    }

    /// Converts `src` into elements `offset .. offset + src.len()`. For q8, `src` is one whole
    /// vector (`offset` a multiple of `d`, `src.len() == d`), quantised with its own scale.
    pub(crate) fn write(&mut self, offset: usize, src: ArrayView1<f32>) {
        let n = src.len();
        if let Storage::Q8 { q, scales, d } = self {
            debug_assert!(n == *d && offset.is_multiple_of(*d));
            let dst = &mut q[offset..offset + n];
            scales[offset / *d] = match src.as_slice() {
                Some(s) => quantize_q8(s, dst),
                None => quantize_q8(&src.to_vec(), dst),
            };
            return;
        }
        match (self, src.as_slice()) {
            (Storage::F32(v), Some(s)) => v[offset..offset + n].copy_from_slice(s),
            (Storage::BF16(v), Some(s)) => v[offset..offset + n].convert_from_f32_slice(s),
            (Storage::F16(v), Some(s)) => v[offset..offset + n].convert_from_f32_slice(s),
            (Storage::F32(v), None) => v[offset..offset + n]
                .iter_mut()
                .zip(src.iter())
                .for_each(|(d, &x)| *d = x),
            (Storage::BF16(v), None) => v[offset..offset + n]
                .iter_mut()
                .zip(src.iter())
                .for_each(|(d, &x)| *d = bf16::from_f32(x)),
            (Storage::F16(v), None) => v[offset..offset + n]
                .iter_mut()
                .zip(src.iter())
                .for_each(|(d, &x)| *d = f16::from_f32(x)),
            (Storage::Q8 { .. }, _) => unreachable!("written above"),
        }
    }

    /// Widens elements `offset .. offset + out.len()` into `out`.
    pub(crate) fn read(&self, offset: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Storage::F32(v) => out.copy_from_slice(&v[offset..offset + n]),
            Storage::BF16(v) => v[offset..offset + n].convert_to_f32_slice(out),
            Storage::F16(v) => v[offset..offset + n].convert_to_f32_slice(out),
            Storage::Q8 { q, scales, d } => {
                let rows = out
                    .chunks_exact_mut(*d)
                    .zip(q[offset..offset + n].chunks_exact(*d));
                for ((o, x), &s) in rows.zip(&scales[offset / *d..]) {
                    for (y, &v) in o.iter_mut().zip(x) {
                        *y = v as f32 * s;
                    }
                }
            }
        }
    }

    /// Makes room for `additional` more elements without changing the contents, so that a
    /// following [`Storage::relayout`] to that size allocates nothing.
    pub(crate) fn try_reserve(&mut self, additional: usize) -> Result<(), std::collections::TryReserveError> {
        if let Storage::Q8 { scales, d, .. } = self {
            scales.try_reserve_exact(additional / (*d).max(1))?;
        }
        each!(self, v => v.try_reserve_exact(additional))
    }

    /// Moves the first `len` rows of each of `heads` blocks of `old_rows` rows into `heads`
    /// blocks of `new_rows` rows (rows of `row` elements); the other rows are zero. Growing
    /// happens in place (in room made by [`Storage::try_reserve`], or allocated here).
    pub(crate) fn relayout(
        &mut self,
        heads: usize,
        row: usize,
        old_rows: usize,
        new_rows: usize,
        len: usize,
    ) {
        if let Storage::Q8 { scales, .. } = self {
            relayout_vec(scales, heads, 1, old_rows, new_rows, len);
        }
        each!(self, v => relayout_vec(v, heads, row, old_rows, new_rows, len))
    }

    /// The elements as the borrowed form attention reads.
    pub(crate) fn data(&self) -> KvData<'_> {
        match self {
            Storage::F32(v) => KvData::F32(v),
            Storage::BF16(v) => KvData::BF16(v),
            Storage::F16(v) => KvData::F16(v),
            Storage::Q8 { q, scales, .. } => KvData::Q8 { q, scales },
        }
    }
}

/// [`Storage::relayout`] of one vector.
fn relayout_vec<T: Copy + Default>(
    v: &mut Vec<T>,
    heads: usize,
    row: usize,
    old_rows: usize,
    new_rows: usize,
    len: usize,
) {
    if new_rows >= old_rows {
        v.resize(heads * new_rows * row, Default::default());
        // Last head first: each block moves up, never onto a block not yet moved.
        for h in (0..heads).rev() {
            let (src, dst) = (h * old_rows * row, h * new_rows * row);
            v.copy_within(src..src + len * row, dst);
            v[dst + len * row..dst + new_rows * row].fill(Default::default());
        }
    } else {
        let mut fresh = vec![Default::default(); heads * new_rows * row];
        for h in 0..heads {
            let (src, dst) = (h * old_rows * row, h * new_rows * row);
            fresh[dst..dst + len * row].copy_from_slice(&v[src..src + len * row]);
        }
        *v = fresh;
    }
}
