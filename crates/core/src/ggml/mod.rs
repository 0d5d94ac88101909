//! ggml's tensor types as a weight storage format: the blocks of a GGUF file, read in place.
//!
//! A ggml tensor is stored row by row; each row of `ne0` elements is `ne0 / block_size` blocks of
//! `type_size` bytes (see [`GgmlType`]). A matrix `[out, in]` (ggml `ne = [in, out]`) is therefore
//! [`Layout::OutIn`](crate::Layout) with whole blocks per row, and a [`Weight`](crate::Weight) over
//! [`GgmlData`] runs through [`crate::kernels::linear_into`] like any other storage.
//!
//! # Arithmetic (as ggml-cpu)
//! Each weight type is multiplied as llama.cpp's CPU backend does, so that results differ from
//! llama.cpp's by rounding, not by method: the activations are first converted to the weight
//! type's *dot type* (`vec_dot_type` in `ggml-cpu.c`, table `type_traits_cpu`), then each block
//! gives an exact integer dot product scaled in f32 ([`dot`] holds the scalar definitions):
//!
//! | weight | activations become | per-block result |
//! |---|---|---|
//! | F32 | f32 | f32 products |
//! | F16 | f16 (round to nearest even) | f16 · f16 products, exact in f32 |
//! | BF16 | bf16 (round to nearest even) | bf16 · bf16 products, exact in f32 |
//! | Q4_0, Q5_0, Q8_0 | Q8_0 | `Σq_w·q_x · (d_w·d_x)` |
//! | Q4_1, Q5_1 | Q8_1 | `Σq_w·q_x · (d_w·d_x) + m_w·s_x` |
//! | Q2_K … Q6_K | Q8_K | `d_w·d_x · Σ_sub sc·Σq_w·q_x − dmin_w·d_x · Σ_sub m·bsum` |
//!
//! [`act`] quantises activations bit for bit as ggml-cpu does on x86 (Q8_0 / Q8_1: the AVX path of
//! `quantize_row_q8_0` / `_q8_1`, round half to even; Q8_K: `quantize_row_q8_K_ref`). The
//! integer sums are exact, so two implementations differ only in the order of the f32 additions
//! over blocks (and, within a k-quant block, in how the integer sum is split into lanes before it
//! is converted to f32): see [`dot::rounding_bound`].
//!
//! Dequantisation ([`dequantize`]) follows `dequantize_row_*` of `ggml-quants.c` operation by
//! operation, so its values equal llama.cpp's bit for bit.

pub mod act;
pub mod dequant;
pub mod dot;

use std::fmt;

use half::{bf16, f16};

use crate::{Buffer, Error, Result};

pub use dequant::dequantize;

/// Elements per k-quant super-block (`QK_K`).
pub const QK_K: usize = 256;

/// A ggml tensor type, by its id in GGUF files (`enum ggml_type` of `ggml.h`).
///
/// Every id a GGUF file may hold is named, so that an unsupported one can be reported by name;
/// [`GgmlType::is_supported`] tells which this library multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // the names are ggml's
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    BF16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
    Nvfp4,
    Q1_0,
    Q2_0,
}

/// `(type, id, name, block size, bytes per block)`, from `ggml.h` / `ggml.c` / `ggml-common.h`.
const TABLE: [(GgmlType, u32, &str, usize, usize); 35] = [
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8K, 15, "Q8_K", 256, 292),
    (GgmlType::Iq2Xxs, 16, "IQ2_XXS", 256, 66),
    (GgmlType::Iq2Xs, 17, "IQ2_XS", 256, 74),
    (GgmlType::Iq3Xxs, 18, "IQ3_XXS", 256, 98),
    (GgmlType::Iq1S, 19, "IQ1_S", 256, 50),
    (GgmlType::Iq4Nl, 20, "IQ4_NL", 32, 18),
    (GgmlType::Iq3S, 21, "IQ3_S", 256, 110),
    (GgmlType::Iq2S, 22, "IQ2_S", 256, 82),
    (GgmlType::Iq4Xs, 23, "IQ4_XS", 256, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::Iq1M, 29, "IQ1_M", 256, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::Tq1_0, 34, "TQ1_0", 256, 54),
    (GgmlType::Tq2_0, 35, "TQ2_0", 256, 66),
    (GgmlType::Mxfp4, 39, "MXFP4", 32, 17),
    (GgmlType::Nvfp4, 40, "NVFP4", 64, 36),
    (GgmlType::Q1_0, 41, "Q1_0", 128, 18),
    (GgmlType::Q2_0, 42, "Q2_0", 64, 18),
];

impl GgmlType {
    /// The types this library reads and multiplies.
    pub const SUPPORTED: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        TABLE
            .iter()
            .find(|r| r.0 == self)
            .expect("every type is in the table")
    }

    /// The type of GGUF type id `id`; `None` for ids ggml does not define (or has removed).
    pub fn from_id(id: u32) -> Option<Self> {
        TABLE.iter().find(|r| r.1 == id).map(|r| r.0)
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// ggml's name, upper case as llama.cpp prints it (`Q4_K`, `IQ2_XXS`).
    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        self.row().3
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().4
    }

    /// True for the types [`GgmlData`] holds (see [`GgmlType::SUPPORTED`]).
    pub fn is_supported(self) -> bool {
        Self::SUPPORTED.contains(&self)
    }

    /// Bytes of `elements` values (`None` when not whole blocks, or on overflow).
    pub fn bytes_for(self, elements: usize) -> Option<usize> {
        if !elements.is_multiple_of(self.block_size()) {
            return None;
        }
        (elements / self.block_size()).checked_mul(self.type_size())
    }

    /// The type activations are converted to before the dot product with this weight type
    /// (`vec_dot_type` of ggml-cpu); `None` for unsupported types.
    pub fn dot_type(self) -> Option<DotType> {
        Some(match self {
            GgmlType::F32 => DotType::F32,
            GgmlType::F16 => DotType::F16,
            GgmlType::BF16 => DotType::BF16,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => DotType::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 => DotType::Q8_1,
            GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => DotType::Q8K,
            _ => return None,
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The form activations take for the dot product with a weight type (ggml's `vec_dot_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DotType {
    /// f32, unchanged.
    F32,
    /// Rounded to f16.
    F16,
    /// Rounded to bf16.
    BF16,
    /// Blocks of 32 int8 with an f16 scale.
    Q8_0,
    /// Blocks of 32 int8 with an f16 scale and the f16 `d · Σq`.
    Q8_1,
    /// Super-blocks of 256 int8 with an f32 scale and sums of each 16.
    Q8K,
}

/// The stored blocks of a ggml matrix (or batch of matrices): rows of whole blocks laid end to
/// end, owned or borrowed from a memory map. Cloning shares storage.
#[derive(Clone, Debug)]
pub struct GgmlData {
    ty: GgmlType,
    bytes: Buffer<u8>,
    len: usize,
}

impl GgmlData {
    /// `len` elements of type `ty` stored in `bytes`.
    ///
    /// Errors when `ty` is not supported, `len` is not whole blocks or `bytes` is not their size.
    /// Float types must be aligned for their element (the kernels read them as slices): a
    /// misaligned buffer is copied once into owned storage.
    pub fn new(ty: GgmlType, bytes: Buffer<u8>, len: usize) -> Result<Self> {
        if !ty.is_supported() {
            return Err(Error::Quant(format!("ggml type {ty} is not supported")));
        }
        if ty.bytes_for(len) != Some(bytes.len()) {
            return Err(Error::Quant(format!(
                "{} bytes do not hold {len} elements of {ty} (blocks of {}, {} bytes each)",
                bytes.len(),
                ty.block_size(),
                ty.type_size()
            )));
        }
        let aligned = match ty {
            GgmlType::F32 => bytemuck::try_cast_slice::<u8, f32>(&bytes).is_ok(),
            GgmlType::F16 | GgmlType::BF16 => bytemuck::try_cast_slice::<u8, u16>(&bytes).is_ok(),
            _ => true,
        };
        let bytes = if aligned {
            bytes
        } else {
            // An owned `Arc<[u8]>` starts after its two counters, 8-aligned.
            let copy = Buffer::from_vec(bytes.to_vec());
            if bytemuck::try_cast_slice::<u8, f32>(&copy).is_err() {
                return Err(Error::Quant(format!("cannot align {ty} storage")));
            }
            copy
        };
        Ok(GgmlData { ty, bytes, len })
    }

    /// Owned storage of `values` in a float type (`F32`, `F16` or `BF16`, rounded to nearest
    /// even); for tests and tools. Quantised types are refused (this library reads their blocks,
    /// it does not make them).
    pub fn from_f32(values: &[f32], ty: GgmlType) -> Result<Self> {
        let bytes: Vec<u8> = match ty {
            GgmlType::F32 => bytemuck::cast_slice(values).to_vec(),
            GgmlType::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            GgmlType::BF16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            _ => return Err(Error::Quant(format!("{ty} is not a float type"))),
        };
        GgmlData::new(ty, Buffer::from_vec(bytes), values.len())
    }

    /// The element type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// The stored blocks.
    pub fn bytes(&self) -> &Buffer<u8> {
        &self.bytes
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes stored.
    pub fn nbytes(&self) -> usize {
        self.bytes.len()
    }

    /// True when the blocks live in a memory map.
    pub fn is_mapped(&self) -> bool {
        self.bytes.is_mapped()
    }

    /// Elements `start..start + len`, sharing storage.
    ///
    /// # Panics
    /// When the range is out of bounds or does not start and end on block boundaries.
    pub fn slice(&self, start: usize, len: usize) -> Self {
        let bs = self.ty.block_size();
        assert!(
            start.is_multiple_of(bs) && len.is_multiple_of(bs) && start + len <= self.len,
            "{} slice {start}+{len} of {} is not whole blocks",
            self.ty,
            self.len
        );
        let ts = self.ty.type_size();
        GgmlData {
            ty: self.ty,
            bytes: self.bytes.slice(start / bs * ts, len / bs * ts),
            len,
        }
    }

    /// Elements `start .. start + out.len()` dequantised into `out` (an embedding row), bit for
    /// bit as ggml's `dequantize_row_*`.
    ///
    /// # Panics
    /// When the range ends past [`Self::len`].
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        assert!(end <= self.len, "elements {start}..{end} of {}", self.len);
        let (bs, ts) = (self.ty.block_size(), self.ty.type_size());
        let (b0, b1) = (start / bs, end.div_ceil(bs));
        if start.is_multiple_of(bs) && end.is_multiple_of(bs) {
            dequantize(self.ty, &self.bytes[b0 * ts..b1 * ts], out);
            return;
        }
        // A range that cuts blocks: one block at a time through a buffer on the stack.
        let mut block = [0f32; QK_K];
        for b in b0..b1 {
            dequantize(self.ty, &self.bytes[b * ts..(b + 1) * ts], &mut block[..bs]);
            let (lo, hi) = ((b * bs).max(start), ((b + 1) * bs).min(end));
            out[lo - start..hi - start].copy_from_slice(&block[lo - b * bs..hi - b * bs]);
        }
    }

    /// Every element dequantised to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.len];
        self.dequantize_into(0, &mut v);
        v
    }
}
