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

    /// The spellings [`KvDtype::parse`] accepts, as an error message lists them.
    pub const SPELLINGS: &'static str = "f32, bf16, f16 or q8";

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

/// Pages of a paged cache's keys (or values): page `i` holds slots
/// `i · page_len .. (i + 1) · page_len` of every head, laid out `[heads, page_len, head_dim]`
/// (and, for [`KvDtype::Q8`], scales `[heads, page_len]`). A cache implements it over whatever
/// owns its pages, so that attention reads them in place.
pub trait KvPageTable: Sync {
    /// Number of pages.
    fn pages(&self) -> usize;

    /// Page `i` (`i < pages()`).
    fn page(&self, i: usize) -> KvData<'_>;
}

/// Where a [`KvView`]'s elements are.
#[derive(Clone, Copy)]
pub enum KvStore<'a> {
    /// One buffer: head `h`, slot `j` starts at element `h · head_stride + j · head_dim`.
    /// `head_stride ≥ len · head_dim` lets a cache hand out a prefix of a larger allocation.
    Contiguous {
        /// The elements.
        data: KvData<'a>,
        /// Elements between the starts of consecutive heads.
        head_stride: usize,
    },
    /// Fixed-size pages ([`KvPageTable`]): slot `j` is slot `j % page_len` of page
    /// `j / page_len`, so growing a cache adds a page and copies nothing.
    Paged {
        /// The pages.
        table: &'a dyn KvPageTable,
        /// Positions per page (every page has room for this many).
        page_len: usize,
    },
}

impl std::fmt::Debug for KvStore<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvStore::Contiguous { data, head_stride } => f
                .debug_struct("Contiguous")
                .field("data", data)
                .field("head_stride", head_stride)
                .finish(),
            KvStore::Paged { table, page_len } => f
                .debug_struct("Paged")
                .field("pages", &table.pages())
                .field("page_len", page_len)
                .finish(),
        }
    }
}

/// Keys (or values) of one layer: `heads` heads of `len` position slots of `head_dim`
/// elements, in one buffer or in pages ([`KvStore`]).
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    /// The elements.
    pub store: KvStore<'a>,
    /// Number of key/value heads.
    pub heads: usize,
    /// Number of positions held.
    pub len: usize,
    /// Elements per head vector.
    pub head_dim: usize,
    /// Absolute position of slot 0 (a chunked cache restarts at chunk boundaries).
    pub first_pos: usize,
}

impl<'a> KvView<'a> {
    /// A view of one buffer; see [`KvStore::Contiguous`].
    pub fn contiguous(
        data: KvData<'a>,
        heads: usize,
        len: usize,
        head_dim: usize,
        head_stride: usize,
        first_pos: usize,
    ) -> Self {
        Self {
            store: KvStore::Contiguous { data, head_stride },
            heads,
            len,
            head_dim,
            first_pos,
        }
    }

    /// Slots per segment: the view is segments `0, 1, …` of this many slots each (the last
    /// one possibly partly used). One segment when contiguous, a page when paged.
    pub fn segment_len(&self) -> usize {
        match self.store {
            KvStore::Contiguous { .. } => self.len.max(1),
            KvStore::Paged { page_len, .. } => page_len,
        }
    }

    /// Segment `i`'s elements and head stride (`None` beyond the last segment): head `h`,
    /// slot `j` of the segment starts at element `h · head_stride + j · head_dim`.
    pub fn segment(&self, i: usize) -> Option<(KvData<'a>, usize)> {
        match self.store {
            KvStore::Contiguous { data, head_stride } => (i == 0).then_some((data, head_stride)),
            KvStore::Paged { table, page_len } => {
                (i < table.pages()).then(|| (table.page(i), page_len * self.head_dim))
            }
        }
    }

    /// Number of segments the held slots occupy.
    pub fn segments(&self) -> usize {
        self.len.div_ceil(self.segment_len().max(1))
    }

    /// Element `i` of slot `j` of head `h` as f32 (for tests and references; `None` outside
    /// the view).
    pub fn get(&self, h: usize, j: usize, i: usize) -> Option<f32> {
        if h >= self.heads || j >= self.len || i >= self.head_dim {
            return None;
        }
        let seg = self.segment_len();
        let (data, stride) = self.segment(j / seg)?;
        let at = h * stride + (j % seg) * self.head_dim + i;
        match data {
            KvData::F32(x) => x.get(at).copied(),
            KvData::BF16(x) => x.get(at).map(|v| v.to_f32()),
            KvData::F16(x) => x.get(at).map(|v| v.to_f32()),
            KvData::Q8 { q, scales } => Some(*q.get(at)? as f32 * scales.get(at / self.head_dim)?),
        }
    }

    /// True when every slot the view claims lies inside its data, and every page has one dtype.
    pub fn is_consistent(&self) -> bool {
        match self.store {
            KvStore::Contiguous { data, head_stride } => {
                segment_fits(data, self.heads, self.len, self.head_dim, head_stride)
            }
            KvStore::Paged { table, page_len } => {
                if self.len == 0 || self.heads == 0 || self.head_dim == 0 {
                    return true;
                }
                if page_len == 0 || table.pages() < self.segments() {
                    return false;
                }
                let Some(stride) = page_len.checked_mul(self.head_dim) else {
                    return false;
                };
                let first = std::mem::discriminant(&table.page(0));
                (0..self.segments()).all(|i| {
                    let data = table.page(i);
                    std::mem::discriminant(&data) == first
                        && segment_fits(data, self.heads, page_len, self.head_dim, stride)
                })
            }
        }
    }

    /// True when both views store the same dtype (an empty paged view has none, and matches).
    pub fn same_dtype(&self, other: &KvView) -> bool {
        match (self.segment(0), other.segment(0)) {
            (Some((a, _)), Some((b, _))) => std::mem::discriminant(&a) == std::mem::discriminant(&b),
            _ => true,
        }
    }
}

/// Whether `len` slots of `heads` heads, `head_stride` elements apart, lie inside `data`.
fn segment_fits(data: KvData, heads: usize, len: usize, head_dim: usize, head_stride: usize) -> bool {
    let n = match data {
        KvData::F32(d) => d.len(),
        KvData::BF16(d) => d.len(),
        KvData::F16(d) => d.len(),
        KvData::Q8 { q, .. } => q.len(),
    };
    let Some(row) = len.checked_mul(head_dim) else {
        return false;
    };
    if heads == 0 || row == 0 {
        return true;
    }
    if let KvData::Q8 { scales, .. } = data {
        // One scale per vector, heads `head_stride / D` scales apart.
        if !head_stride.is_multiple_of(head_dim) {
            return false;
        }
        let fits = (heads - 1)
            .checked_mul(head_stride / head_dim)
            .and_then(|s| s.checked_add(len))
            .is_some_and(|end| end <= scales.len());
        if !fits {
            return false;
        }
    }
    head_stride >= row
        && (heads - 1)
            .checked_mul(head_stride)
            .and_then(|s| s.checked_add(row))
            .is_some_and(|end| end <= n)
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
        let view = |scales: &'static [f32], stride| {
            KvView::contiguous(KvData::Q8 { q: &[0; 24], scales }, 2, 3, 4, stride, 0)
        };
        assert!(view(&[1.0; 6], 12).is_consistent());
        assert!(!view(&[1.0; 5], 12).is_consistent());
        // A head stride that is not whole vectors has no scale index.
        assert!(!view(&[1.0; 6], 10).is_consistent());
    }
}
