//! Weight views: a linear layer's matrix, or a batch of them (the expert tensors).

use half::{bf16, f16};
use ndarray::{Array2, ArrayView2};

use crate::ggml::{GgmlData, GgmlType};
use crate::quant::{self, QuantData, QuantSpec};
use crate::{Buffer, DType, Error, Result};

/// Stored elements of a weight, in the dtype the checkpoint holds.
///
/// New storage formats (quantised ones) are added here; layers only see [`Weight`].
#[derive(Clone, Debug)]
pub enum WeightData {
    /// f32 elements.
    F32(Buffer<f32>),
    /// bf16 elements.
    BF16(Buffer<bf16>),
    /// f16 elements.
    F16(Buffer<f16>),
    /// Quantised integers with per-group scales (always [`Layout::OutIn`]; see [`crate::quant`]).
    Quant(Box<QuantData>),
    /// ggml blocks as a GGUF file stores them (always [`Layout::OutIn`], whole blocks per row;
    /// see [`crate::ggml`]).
    Ggml(Box<GgmlData>),
}

impl WeightData {
    /// The element type of float storage; `None` for quantised storage (see [`Self::quant`]).
    pub fn dtype(&self) -> Option<DType> {
        match self {
            WeightData::F32(_) => Some(DType::F32),
            WeightData::BF16(_) => Some(DType::BF16),
            WeightData::F16(_) => Some(DType::F16),
            WeightData::Quant(_) | WeightData::Ggml(_) => None,
        }
    }

    /// The ggml type of ggml storage; `None` otherwise.
    pub fn ggml(&self) -> Option<GgmlType> {
        match self {
            WeightData::Ggml(g) => Some(g.ty()),
            _ => None,
        }
    }

    /// The quantisation of quantised storage; `None` for floats.
    pub fn quant(&self) -> Option<QuantSpec> {
        match self {
            WeightData::Quant(q) => Some(q.spec()),
            _ => None,
        }
    }

    /// Bytes stored (for quantised storage, values and scales).
    pub fn nbytes(&self) -> usize {
        match self {
            WeightData::F32(b) => b.len() * 4,
            WeightData::BF16(b) => b.len() * 2,
            WeightData::F16(b) => b.len() * 2,
            WeightData::Quant(q) => q.nbytes(),
            WeightData::Ggml(g) => g.nbytes(),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(b) => b.len(),
            WeightData::BF16(b) => b.len(),
            WeightData::F16(b) => b.len(),
            WeightData::Quant(q) => q.len(),
            WeightData::Ggml(g) => g.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when the elements live in a memory map.
    pub fn is_mapped(&self) -> bool {
        match self {
            WeightData::F32(b) => b.is_mapped(),
            WeightData::BF16(b) => b.is_mapped(),
            WeightData::F16(b) => b.is_mapped(),
            WeightData::Quant(q) => q.is_mapped(),
            WeightData::Ggml(g) => g.is_mapped(),
        }
    }

    /// Elements `start..start + len`, sharing storage.
    pub fn slice(&self, start: usize, len: usize) -> Self {
        match self {
            WeightData::F32(b) => WeightData::F32(b.slice(start, len)),
            WeightData::BF16(b) => WeightData::BF16(b.slice(start, len)),
            WeightData::F16(b) => WeightData::F16(b.slice(start, len)),
            WeightData::Quant(q) => WeightData::Quant(Box::new(q.slice(start, len))),
            WeightData::Ggml(g) => WeightData::Ggml(Box::new(g.slice(start, len))),
        }
    }

    /// All elements widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            WeightData::F32(b) => b.to_vec(),
            WeightData::BF16(b) => b.iter().map(|v| v.to_f32()).collect(),
            WeightData::F16(b) => b.iter().map(|v| v.to_f32()).collect(),
            WeightData::Quant(q) => q.to_f32_vec(),
            WeightData::Ggml(g) => g.to_f32_vec(),
        }
    }

    /// Elements `start .. start + out.len()` widened to f32 into `out`: an embedding row,
    /// without the allocation of [`Self::slice`] + [`Self::to_f32_vec`].
    ///
    /// # Panics
    /// When the range ends past [`Self::len`].
    pub fn widen_into(&self, start: usize, out: &mut [f32]) {
        let range = start..start + out.len();
        match self {
            WeightData::F32(b) => out.copy_from_slice(&b[range]),
            WeightData::BF16(b) => out.iter_mut().zip(&b[range]).for_each(|(o, v)| *o = v.to_f32()),
            WeightData::F16(b) => out.iter_mut().zip(&b[range]).for_each(|(o, v)| *o = v.to_f32()),
            WeightData::Quant(q) => {
                assert!(range.end <= q.len(), "elements {range:?} of {}", q.len());
                out.iter_mut().zip(range).for_each(|(o, i)| *o = q.value(i));
            }
            WeightData::Ggml(g) => g.dequantize_into(start, out),
        }
    }

    /// Owned storage of `values` rounded to `dtype` (round to nearest even).
    pub fn from_f32(values: &[f32], dtype: DType) -> Self {
        match dtype {
            DType::F32 => WeightData::F32(Buffer::from_vec(values.to_vec())),
            DType::BF16 => WeightData::BF16(Buffer::from_vec(
                values.iter().map(|&v| bf16::from_f32(v)).collect(),
            )),
            DType::F16 => WeightData::F16(Buffer::from_vec(
                values.iter().map(|&v| f16::from_f32(v)).collect(),
            )),
        }
    }
}

/// How a 2-D weight is laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[out, in]` row-major: PyTorch `nn.Linear`, applied as `x · Wᵀ`.
    OutIn,
    /// `[in, out]` row-major: Llama 4's fused expert tensors, applied as `x · W`.
    InOut,
}

/// The matrix of a linear map from `in_features` to `out_features`, in its stored dtype and
/// layout. Cloning shares storage.
#[derive(Clone, Debug)]
pub struct Weight {
    data: WeightData,
    in_features: usize,
    out_features: usize,
    layout: Layout,
}

impl Weight {
    /// A weight over `data` holding `out_features × in_features` elements in `layout`.
    pub fn new(data: WeightData, layout: Layout, out_features: usize, in_features: usize) -> Result<Self> {
        let need = out_features.checked_mul(in_features);
        if need != Some(data.len()) {
            return Err(Error::shape(
                "Weight::new",
                format!("{} elements for {out_features}×{in_features}", data.len()),
            ));
        }
        check_quant_layout(&data, layout, in_features)?;
        Ok(Weight {
            data,
            in_features,
            out_features,
            layout,
        })
    }

    /// An owned weight from a `[out, in]` f32 matrix, stored in `dtype` (rounded to nearest).
    pub fn from_out_in(w: ArrayView2<f32>, dtype: DType) -> Self {
        let (out_features, in_features) = w.dim();
        let values: Vec<f32> = w.iter().copied().collect();
        Weight {
            data: WeightData::from_f32(&values, dtype),
            in_features,
            out_features,
            layout: Layout::OutIn,
        }
    }

    /// An owned weight from an `[in, out]` f32 matrix, stored in `dtype` (rounded to nearest).
    pub fn from_in_out(w: ArrayView2<f32>, dtype: DType) -> Self {
        let (in_features, out_features) = w.dim();
        let values: Vec<f32> = w.iter().copied().collect();
        Weight {
            data: WeightData::from_f32(&values, dtype),
            in_features,
            out_features,
            layout: Layout::InOut,
        }
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Memory layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Element type of float storage; `None` when quantised (see [`Self::quant`]).
    pub fn dtype(&self) -> Option<DType> {
        self.data.dtype()
    }

    /// The quantisation, when quantised.
    pub fn quant(&self) -> Option<QuantSpec> {
        self.data.quant()
    }

    /// The stored elements.
    pub fn data(&self) -> &WeightData {
        &self.data
    }

    /// Bytes stored (what one pass over the weight reads).
    pub fn nbytes(&self) -> usize {
        self.data.nbytes()
    }

    /// This matrix quantised with `spec`, stored `[out, in]` whatever its layout.
    ///
    /// Errors when `spec` does not fit the input width or a value is not finite.
    pub fn quantized(&self, spec: QuantSpec) -> Result<Self> {
        let w = self.to_f32_out_in();
        let values = w.as_slice().expect("to_f32_out_in is standard layout");
        Ok(Weight {
            data: WeightData::Quant(Box::new(quant::quantize(values, self.in_features, spec)?)),
            in_features: self.in_features,
            out_features: self.out_features,
            layout: Layout::OutIn,
        })
    }

    /// The matrix as `[out, in]` f32, whatever the storage: for tests and reference paths.
    pub fn to_f32_out_in(&self) -> Array2<f32> {
        let v = self.data.to_f32_vec();
        match self.layout {
            Layout::OutIn => Array2::from_shape_vec((self.out_features, self.in_features), v)
                .expect("length checked at construction"),
            Layout::InOut => Array2::from_shape_vec((self.in_features, self.out_features), v)
                .expect("length checked at construction")
                .reversed_axes()
                .as_standard_layout()
                .into_owned(),
        }
    }

    /// An owned copy stored in `dtype` and `layout` (rounded to nearest): for tests and for
    /// repacking at load time.
    pub fn converted(&self, dtype: DType, layout: Layout) -> Self {
        let w = self.to_f32_out_in();
        match layout {
            Layout::OutIn => Self::from_out_in(w.view(), dtype),
            Layout::InOut => Self::from_in_out(w.t(), dtype),
        }
    }
}

/// A batch of equally shaped weights in one tensor, `[batch, ..]`: the expert tensors
/// (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`, both [`Layout::InOut`]).
#[derive(Clone, Debug)]
pub struct BatchedWeight {
    data: WeightData,
    batch: usize,
    in_features: usize,
    out_features: usize,
    layout: Layout,
    /// Each matrix as a [`Weight`] sharing `data`, made once: building one per call would box
    /// a new `QuantData` for quantised storage, an allocation per expert per decode step.
    matrices: Box<[Weight]>,
}

impl BatchedWeight {
    /// A batch over `data` of `batch` matrices, each `out_features × in_features` in `layout`.
    pub fn new(
        data: WeightData,
        layout: Layout,
        batch: usize,
        out_features: usize,
        in_features: usize,
    ) -> Result<Self> {
        let need = batch
            .checked_mul(out_features)
            .and_then(|n| n.checked_mul(in_features));
        if need != Some(data.len()) {
            return Err(Error::shape(
                "BatchedWeight::new",
                format!("{} elements for {batch}×{out_features}×{in_features}", data.len()),
            ));
        }
        check_quant_layout(&data, layout, in_features)?;
        Ok(Self::with_matrices(
            data,
            layout,
            batch,
            out_features,
            in_features,
        ))
    }

    /// The batch with its per-matrix views (shapes already checked).
    fn with_matrices(
        data: WeightData,
        layout: Layout,
        batch: usize,
        out_features: usize,
        in_features: usize,
    ) -> Self {
        let per = in_features * out_features;
        let matrices = (0..batch)
            .map(|i| Weight {
                data: data.slice(i * per, per),
                in_features,
                out_features,
                layout,
            })
            .collect();
        BatchedWeight {
            data,
            batch,
            in_features,
            out_features,
            layout,
            matrices,
        }
    }

    /// Number of matrices.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Input width of each matrix.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width of each matrix.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Element type of float storage; `None` when quantised (see [`Self::quant`]).
    pub fn dtype(&self) -> Option<DType> {
        self.data.dtype()
    }

    /// The quantisation, when quantised.
    pub fn quant(&self) -> Option<QuantSpec> {
        self.data.quant()
    }

    /// The stored elements of all matrices.
    pub fn data(&self) -> &WeightData {
        &self.data
    }

    /// Bytes stored per matrix (what one pass over one matrix reads).
    pub fn nbytes_per_matrix(&self) -> usize {
        self.data.nbytes() / self.batch.max(1)
    }

    /// Every matrix quantised with `spec`, stored `[out, in]` whatever the layout.
    ///
    /// Errors when `spec` does not fit the input width or a value is not finite.
    pub fn quantized(&self, spec: QuantSpec) -> Result<Self> {
        spec.check(self.in_features)?;
        // One matrix at a time: only one is ever widened to f32 (Scout's expert tensors are
        // 5 GB each in f32).
        let parts = (0..self.batch)
            .map(|e| match self.get(e).quantized(spec)?.data {
                WeightData::Quant(q) => Ok(*q),
                _ => unreachable!("Weight::quantized returns quantised data"),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::with_matrices(
            WeightData::Quant(Box::new(QuantData::concat(&parts, spec)?)),
            Layout::OutIn,
            self.batch,
            self.out_features,
            self.in_features,
        ))
    }

    /// Memory layout of each matrix.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Matrices `range` as a batch of their own, sharing storage (no bytes are read): a share of
    /// the experts of one tensor.
    ///
    /// # Errors
    /// A shape error when `range` does not lie in `0..batch()`.
    pub fn narrow(&self, range: std::ops::Range<usize>) -> Result<Self> {
        if range.start > range.end || range.end > self.batch {
            return Err(Error::shape(
                "BatchedWeight::narrow",
                format!("matrices {range:?} of a batch of {}", self.batch),
            ));
        }
        let per = self.in_features * self.out_features;
        // Whole matrices are whole quantisation groups (the group divides `in_features`).
        let data = self.data.slice(range.start * per, range.len() * per);
        Ok(Self::with_matrices(
            data,
            self.layout,
            range.len(),
            self.out_features,
            self.in_features,
        ))
    }

    /// Matrix `index`, sharing storage (no bytes are read).
    ///
    /// # Panics
    /// When `index >= batch()`.
    pub fn get(&self, index: usize) -> Weight {
        self.matrix(index).clone()
    }

    /// Matrix `index`, borrowed: unlike [`Self::get`], no clone (which for quantised storage
    /// allocates).
    ///
    /// # Panics
    /// When `index >= batch()`.
    pub fn matrix(&self, index: usize) -> &Weight {
        assert!(
            index < self.batch,
            "batch index {index} out of range {}",
            self.batch
        );
        &self.matrices[index]
    }
}

/// Quantised storage is `[out, in]` with whole groups (ggml: whole blocks) per row.
fn check_quant_layout(data: &WeightData, layout: Layout, in_features: usize) -> Result<()> {
    match data {
        WeightData::Quant(q) => {
            if layout != Layout::OutIn {
                return Err(Error::Quant("quantised weights are stored [out, in]".into()));
            }
            q.spec().check(in_features)?;
        }
        WeightData::Ggml(g) => {
            if layout != Layout::OutIn {
                return Err(Error::Quant("ggml weights are stored [out, in]".into()));
            }
            if !in_features.is_multiple_of(g.ty().block_size()) {
                return Err(Error::Quant(format!(
                    "{} rows of {in_features} are not whole blocks of {}",
                    g.ty(),
                    g.ty().block_size()
                )));
            }
        }
        _ => {}
    }
    Ok(())
}
