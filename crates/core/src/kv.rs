//! Borrowed views of cached keys and values: the contract between the cache (which owns the
//! storage) and attention (which reads it).

use half::{bf16, f16};

use crate::DType;

/// Element format of a key/value cache: a float [`DType`] or int8 with one scale per vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// IEEE binary32.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE binary16.
    F16,
    /// Symmetric int8 per head vector: `x ≈ q · s` with `s = max|x| / 127` (one f32 per token
    /// and head), `q = round(x / s)` in `-127..=127`. The error of each element is at most
    /// `s / 2 = max|x| / 254`.
    Q8,
}

impl KvDtype {
    /// Bytes one head vector of `head_dim` elements takes (the scale included).
    pub fn vector_bytes(self, head_dim: usize) -> usize {
        match self {
            KvDtype::F32 => 4 * head_dim,
            KvDtype::BF16 | KvDtype::F16 => 2 * head_dim,
            KvDtype::Q8 => head_dim + 4,
        }
    }

    /// Parses the spelling used by command lines: `f32`, `bf16`, `f16`, `q8`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(KvDtype::F32),
            "bf16" => Some(KvDtype::BF16),
            "f16" => Some(KvDtype::F16),
            "q8" => Some(KvDtype::Q8),
            _ => None,
        }
    }
}

impl From<DType> for KvDtype {
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => KvDtype::F32,
            DType::BF16 => KvDtype::BF16,
            DType::F16 => KvDtype::F16,
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F32 => "f32",
            KvDtype::BF16 => "bf16",
            KvDtype::F16 => "f16",
            KvDtype::Q8 => "q8",
        })
    }
}

/// Elements of cached keys or values in their storage dtype.
#[derive(Clone, Copy, Debug)]
pub enum KvData<'a> {
    /// f32 storage.
    F32(&'a [f32]),
    /// bf16 storage.
    BF16(&'a [bf16]),
    /// f16 storage.
    F16(&'a [f16]),
    /// [`KvDtype::Q8`] storage: element `h · head_stride + j · D + i` of `q` times scale
    /// `h · head_stride / D + j` of `scales` (so `head_stride` is a multiple of `D`).
    Q8 {
        /// The int8 elements.
        q: &'a [i8],
        /// One scale per head vector.
        scales: &'a [f32],
    },
}

/// Keys (or values) of one layer, laid out `[heads, len, head_dim]`: head `h`, position slot `j`
/// starts at element `h · head_stride + j · head_dim`. `head_stride ≥ len · head_dim` lets a
/// cache hand out a prefix of a larger allocation without copying.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    /// The elements.
    pub data: KvData<'a>,
    /// Number of key/value heads.
    pub heads: usize,
    /// Number of positions held.
    pub len: usize,
    /// Elements per head vector.
    pub head_dim: usize,
    /// Elements between the starts of consecutive heads.
    pub head_stride: usize,
    /// Absolute position of slot 0 (a chunked cache restarts at chunk boundaries).
    pub first_pos: usize,
}

impl<'a> KvView<'a> {
    /// True when every slot the view claims lies inside `data`.
    pub fn is_consistent(&self) -> bool {
        let n = match self.data {
            KvData::F32(d) => d.len(),
            KvData::BF16(d) => d.len(),
            KvData::F16(d) => d.len(),
            KvData::Q8 { q, .. } => q.len(),
        };
        let Some(row) = self.len.checked_mul(self.head_dim) else {
            return false;
        };
        if self.heads == 0 || row == 0 {
            return true;
        }
        if let KvData::Q8 { scales, .. } = self.data {
            // One scale per vector, heads `head_stride / D` scales apart.
            if !self.head_stride.is_multiple_of(self.head_dim) {
                return false;
            }
            let fits = (self.heads - 1)
                .checked_mul(self.head_stride / self.head_dim)
                .and_then(|s| s.checked_add(self.len))
                .is_some_and(|end| end <= scales.len());
            if !fits {
                return false;
            }
        }
        self.head_stride >= row
            && (self.heads - 1)
                .checked_mul(self.head_stride)
                .and_then(|s| s.checked_add(row))
                .is_some_and(|end| end <= n)
    }
}

/// Quantises one head vector to [`KvDtype::Q8`]: writes `q` and returns the scale
/// `max|x| / 127` (0 for a zero vector, whose `q` is all 0). Non-finite elements saturate.
///
/// # Shapes
/// `x: [D]`, `q: [D]` (the shorter length is used).
pub fn quantize_q8(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, &v| m.max(v.abs()));
    if amax == 0.0 || amax.is_nan() {
        q.fill(0);
        return 0.0;
    }
    let scale = amax / 127.0;
    let inv = 1.0 / scale;
    for (d, &v) in q.iter_mut().zip(x) {
        // `as` saturates; the clamp only matters for rounding at the edge.
        *d = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_error_is_within_half_a_step() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let mut q = vec![0i8; x.len()];
        let s = quantize_q8(&x, &mut q);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(s, amax / 127.0);
        assert!(q.iter().any(|&v| v.abs() == 127));
        for (&a, &b) in x.iter().zip(&q) {
            assert!(
                (a - b as f32 * s).abs() <= s * 0.5 * (1.0 + 1e-5),
                "{a} vs {}",
                b as f32 * s
            );
        }
        let mut z = [5i8; 4];
        assert_eq!(quantize_q8(&[0.0; 4], &mut z), 0.0);
        assert_eq!(z, [0; 4]);
    }

    #[test]
    fn q8_views_check_their_scales() {
        let view = |scales: &'static [f32], stride| KvView {
            data: KvData::Q8 { q: &[0; 24], scales },
            heads: 2,
            len: 3,
            head_dim: 4,
            head_stride: stride,
            first_pos: 0,
        };
        assert!(view(&[1.0; 6], 12).is_consistent());
        assert!(!view(&[1.0; 5], 12).is_consistent());
        // A head stride that is not whole vectors has no scale index.
        assert!(!view(&[1.0; 6], 10).is_consistent());
    }
}
