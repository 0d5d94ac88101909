//! Typed element buffers: the cache stores f32 activations as f32, bf16 or f16.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use llama4_core::{DType, KvData};
use ndarray::ArrayView1;

/// One layer's keys (or values), `[heads, capacity, head_dim]` row-major in the storage dtype.
#[derive(Clone, Debug)]
pub(crate) enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

/// Runs `$body` with `$v` bound to the inner `Vec` whatever the dtype.
macro_rules! each {
    ($s:expr, $v:ident => $body:expr) => {
        match $s {
            Storage::F32($v) => $body,
            Storage::BF16($v) => $body,
            Storage::F16($v) => $body,
        }
    };
}

impl Storage {
    /// `n` zero elements.
    pub(crate) fn zeros(dtype: DType, n: usize) -> Self {
        match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
            DType::F16 => Storage::F16(vec![f16::ZERO; n]),
        }
    }

    /// Converts `src` into elements `offset .. offset + src.len()`.
    pub(crate) fn write(&mut self, offset: usize, src: ArrayView1<f32>) {
        let n = src.len();
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
        }
    }

    /// Widens elements `offset .. offset + out.len()` into `out`.
    pub(crate) fn read(&self, offset: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Storage::F32(v) => out.copy_from_slice(&v[offset..offset + n]),
            Storage::BF16(v) => v[offset..offset + n].convert_to_f32_slice(out),
            Storage::F16(v) => v[offset..offset + n].convert_to_f32_slice(out),
        }
    }

    /// Makes room for `additional` more elements without changing the contents, so that a
    /// following [`Storage::relayout`] to that size allocates nothing.
    pub(crate) fn try_reserve(&mut self, additional: usize) -> Result<(), std::collections::TryReserveError> {
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
        each!(self, v => {
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
        })
    }

    /// The elements as the borrowed form attention reads.
    pub(crate) fn data(&self) -> KvData<'_> {
        match self {
            Storage::F32(v) => KvData::F32(v),
            Storage::BF16(v) => KvData::BF16(v),
            Storage::F16(v) => KvData::F16(v),
        }
    }
}
