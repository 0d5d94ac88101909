//! Typed element buffers: the cache stores f32 activations as f32, bf16, f16 or q8 (int8 with
//! one scale per head vector).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use llama4_core::{quantize_q8, KvData, KvDtype};
use ndarray::ArrayView1;
use std::collections::TryReserveError;

/// One page of a layer's keys (or values), `[heads, page_len, head_dim]` row-major in the
/// storage dtype.
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

impl Storage {
    /// `n` zero elements (whole vectors of `d`: `n` is a multiple of `d`), or an error when
    /// the system refuses the memory (rather than an abort).
    pub(crate) fn try_zeros(dtype: KvDtype, d: usize, n: usize) -> Result<Self, TryReserveError> {
        Ok(match dtype {
            KvDtype::F32 => Storage::F32(zeros(n, 0.0)?),
            KvDtype::BF16 => Storage::BF16(zeros(n, bf16::ZERO)?),
            KvDtype::F16 => Storage::F16(zeros(n, f16::ZERO)?),
            KvDtype::Q8 => Storage::Q8 {
                q: zeros(n, 0)?,
                scales: zeros(n / d.max(1), 0.0)?,
                d,
            },
        })
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

    /// Bytes held (elements, and scales for q8).
    pub(crate) fn bytes(&self) -> u64 {
        (match self {
            Storage::F32(v) => 4 * v.len(),
            Storage::BF16(v) => 2 * v.len(),
            Storage::F16(v) => 2 * v.len(),
            Storage::Q8 { q, scales, .. } => q.len() + 4 * scales.len(),
        }) as u64
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

/// `n` copies of `x`, the allocation checked.
fn zeros<T: Clone>(n: usize, x: T) -> Result<Vec<T>, TryReserveError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)?;
    v.resize(n, x);
    Ok(v)
}
