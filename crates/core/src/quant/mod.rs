//! Quantised weight storage: int8 (`q8`) and int4 (`q4`), symmetric, one scale per group of
//! `group` consecutive input features of an output row.
//!
//! A quantised matrix is always stored `[out, in]` ([`Layout::OutIn`](crate::Layout)), whatever
//! layout it was quantised from, so that every group is contiguous. For row `o` and group `g`
//! (input features `g·group .. (g+1)·group`):
//!
//! ```text
//! s[o, g] = max |w[o, i]| / QMAX            (QMAX = 127 for q8, 7 for q4; rounded to the scale dtype)
//! q[o, i] = clamp(round_half_even(w[o, i] / s[o, g]), -QMAX, QMAX)     (0 when s = 0)
//! w[o, i] ≈ q[o, i] · s[o, g]
//! ```
//!
//! Storage: q8 keeps one `i8` per element; q4 packs two per byte as `q + 8` (0..=15), element
//! `2j` in the low nibble and `2j + 1` in the high one. Scales are `[out, in / group]` row-major,
//! f32 or f16.
//!
//! The kernels ([`crate::kernels::linear`]) multiply by integer dot products, as llama.cpp's
//! Q8_0 / Q4_0 paths do: each token's activations are quantised to int8 per group with the
//! same rule (`QMAX = 127`, f32 scale), and
//!
//! ```text
//! y[r, o] = Σ_g  s_w[o, g] · s_x[r, g] · Σ_{i in g} q_w[o, i] · q_x[r, i]
//! ```
//!
//! The integer sums are exact; only the order of the f32 sum over groups differs between
//! kernel paths. [`linear_reference`] is the scalar definition the kernels are tested against.
//!
//! # fp8 (`F8E4M3`)
//! Meta's FP8 checkpoints (transformers' `fbgemm_fp8` layout) store one float8 e4m3fn byte per
//! weight and one f32 scale per output row, so an fp8 [`QuantData`] has one group per row
//! (`group = in`):
//!
//! ```text
//! w[o, i] = fp8(q[o, i]) · s[o]              (fp8: the exact value of the e4m3fn code)
//! s[o]    = max |w[o, :]| / 448              (when Rust quantises: 448 is e4m3fn's largest value)
//! q[o, i] = e4m3fn(w[o, i] / s[o])           (round to nearest even, saturating at ±448)
//! ```
//!
//! Unlike the integer formats, activations are NOT quantised: the kernels multiply f32
//! activations by the exactly dequantised weights. (fbgemm on a GPU also rounds each activation
//! row to fp8; keeping f32 is more accurate and equals the float model run on the dequantised
//! weights.) A spec's group 0 means "one scale per row, whatever the width"
//! ([`QuantSpec::fp8`]).

use half::f16;

use crate::{Buffer, Error, Result};

mod fp8;
mod policy;

pub use fp8::*;
pub use policy::{QuantPolicy, QuantScope, QuantTarget, TensorRole};

/// Group sizes must be multiples of this (one 32-byte block of int8 activations).
pub const GROUP_ALIGN: usize = 32;

/// The stored format of a quantised weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 8-bit signed integers in `[-127, 127]`.
    Q8,
    /// 4-bit signed integers in `[-7, 7]`, two per byte.
    Q4,
    /// float8 e4m3fn codes, one scale per output row (see the module doc).
    F8E4M3,
}

impl QuantFormat {
    /// The largest magnitude stored: 127 (q8), 7 (q4), 448 (fp8's largest finite value).
    pub fn qmax(self) -> i32 {
        match self {
            QuantFormat::Q8 => 127,
            QuantFormat::Q4 => 7,
            QuantFormat::F8E4M3 => 448,
        }
    }

    /// The name used on the command line and in checkpoint metadata: `q8`, `q4` or `fp8`.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8 => "q8",
            QuantFormat::Q4 => "q4",
            QuantFormat::F8E4M3 => "fp8",
        }
    }

    /// Parses [`QuantFormat::name`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "q8" => Some(QuantFormat::Q8),
            "q4" => Some(QuantFormat::Q4),
            "fp8" => Some(QuantFormat::F8E4M3),
            _ => None,
        }
    }

    /// Bytes holding `elements` values (`elements` even for q4).
    pub fn value_bytes(self, elements: usize) -> usize {
        match self {
            QuantFormat::Q8 | QuantFormat::F8E4M3 => elements,
            QuantFormat::Q4 => elements / 2,
        }
    }

    /// The safetensors dtype of the stored values: `I8`, `U8` or `F8_E4M3`.
    pub fn safetensors_dtype(self) -> &'static str {
        match self {
            QuantFormat::Q8 => "I8",
            QuantFormat::Q4 => "U8",
            QuantFormat::F8E4M3 => "F8_E4M3",
        }
    }
}

/// The storage type of the per-group scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleType {
    /// f32 scales.
    F32,
    /// f16 scales (the scale is rounded to f16 before the weights are quantised with it).
    F16,
}

/// How to quantise: format, group size along the input dimension, scale type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    /// Stored format.
    pub format: QuantFormat,
    /// Input features per scale: a positive multiple of [`GROUP_ALIGN`] for q8 / q4. fp8 keeps
    /// one scale per row: its group is the row width, or 0 for "the row, whatever its width".
    pub group: usize,
    /// Scale storage.
    pub scales: ScaleType,
}

impl QuantSpec {
    /// `format` with groups of `group` and f32 scales.
    pub fn new(format: QuantFormat, group: usize) -> Self {
        QuantSpec {
            format,
            group,
            scales: ScaleType::F32,
        }
    }

    /// fp8 with one f32 scale per output row, for any width (group 0).
    pub fn fp8() -> Self {
        QuantSpec::new(QuantFormat::F8E4M3, 0)
    }

    /// The same spec with `scales`.
    pub fn with_scales(self, scales: ScaleType) -> Self {
        QuantSpec { scales, ..self }
    }

    /// The group size of rows of `in_features` under this spec: `group`, except fp8's group 0,
    /// which is the row width.
    pub fn group_for(&self, in_features: usize) -> usize {
        if self.format == QuantFormat::F8E4M3 && self.group == 0 {
            in_features
        } else {
            self.group
        }
    }

    /// Checks the spec on its own, whatever the width: q8 / q4 groups are positive multiples
    /// of [`GROUP_ALIGN`]; any fp8 group is accepted (0 is per row).
    pub fn check_group(&self) -> Result<()> {
        if self.format != QuantFormat::F8E4M3 && (self.group == 0 || !self.group.is_multiple_of(GROUP_ALIGN))
        {
            return Err(Error::Quant(format!(
                "group size {} is not a positive multiple of {GROUP_ALIGN}",
                self.group
            )));
        }
        Ok(())
    }

    /// Checks that rows of `in_features` can be quantised with this spec (for fp8: the rows
    /// are not empty, one scale per row needs a row, and the group is 0 or the row width).
    /// After it, [`QuantSpec::group_for`] of `in_features` is positive and divides it.
    pub fn check(&self, in_features: usize) -> Result<()> {
        self.check_group()?;
        if self.format == QuantFormat::F8E4M3 {
            if in_features == 0 {
                return Err(Error::Quant("fp8 rows must not be empty".into()));
            }
            if self.group != 0 && self.group != in_features {
                return Err(Error::Quant(format!(
                    "fp8 keeps one scale per row: group {} must be 0 or the input width {in_features}",
                    self.group
                )));
            }
            return Ok(());
        }
        if !in_features.is_multiple_of(self.group) {
            return Err(Error::Quant(format!(
                "input width {in_features} is not a multiple of the group size {}",
                self.group
            )));
        }
        Ok(())
    }
}

/// Per-group scales, `[rows, in / group]` row-major.
#[derive(Clone, Debug)]
pub enum Scales {
    /// f32 scales.
    F32(Buffer<f32>),
    /// f16 scales.
    F16(Buffer<f16>),
}

impl Scales {
    /// Number of scales.
    pub fn len(&self) -> usize {
        match self {
            Scales::F32(b) => b.len(),
            Scales::F16(b) => b.len(),
        }
    }

    /// True when there are no scales.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Scale `i` as f32.
    ///
    /// # Panics
    /// When `i >= len()`.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Scales::F32(b) => b[i],
            Scales::F16(b) => b[i].to_f32(),
        }
    }

    /// The storage type.
    pub fn scale_type(&self) -> ScaleType {
        match self {
            Scales::F32(_) => ScaleType::F32,
            Scales::F16(_) => ScaleType::F16,
        }
    }

    /// Bytes stored.
    pub fn nbytes(&self) -> usize {
        match self {
            Scales::F32(b) => b.len() * 4,
            Scales::F16(b) => b.len() * 2,
        }
    }

    pub(crate) fn slice(&self, start: usize, len: usize) -> Self {
        match self {
            Scales::F32(b) => Scales::F32(b.slice(start, len)),
            Scales::F16(b) => Scales::F16(b.slice(start, len)),
        }
    }

    /// True when the scales live in a memory map.
    pub fn is_mapped(&self) -> bool {
        match self {
            Scales::F32(b) => b.is_mapped(),
            Scales::F16(b) => b.is_mapped(),
        }
    }
}

/// The stored values and scales of a quantised matrix (or batch of matrices), rows of a width
/// that is a multiple of `group` laid end to end (for fp8, `group` is the row width).
#[derive(Clone, Debug)]
pub struct QuantData {
    format: QuantFormat,
    group: usize,
    values: Buffer<u8>,
    scales: Scales,
}

impl QuantData {
    /// Values and scales as stored (see the module doc for the encoding). Checks that their
    /// sizes agree: `values` holds `scales.len() · group` elements. `group` is positive.
    pub fn new(format: QuantFormat, group: usize, values: Buffer<u8>, scales: Scales) -> Result<Self> {
        QuantSpec::new(format, group).check_group()?;
        if group == 0 {
            return Err(Error::Quant(format!(
                "{} data needs a positive group size",
                format.name()
            )));
        }
        let elements = scales.len().checked_mul(group);
        if elements.map(|e| format.value_bytes(e)) != Some(values.len()) {
            return Err(Error::Quant(format!(
                "{} value bytes do not match {} scales of groups of {group} in {}",
                values.len(),
                scales.len(),
                format.name()
            )));
        }
        Ok(QuantData {
            format,
            group,
            values,
            scales,
        })
    }

    /// `parts`, all quantised with `spec` (and, for fp8, rows of one width), laid end to end in
    /// one owned buffer.
    pub fn concat(parts: &[QuantData], spec: QuantSpec) -> Result<Self> {
        // fp8's spec may leave the group to the row width (0): the parts know it.
        let group = parts.first().map_or(spec.group, |p| p.group);
        if parts.iter().any(|p| p.group != group || p.format != spec.format) {
            return Err(Error::Quant(format!(
                "parts to concatenate differ from {spec:?} in format or group"
            )));
        }
        let mut values = Vec::with_capacity(parts.iter().map(|p| p.values.len()).sum());
        for p in parts {
            values.extend_from_slice(&p.values);
        }
        let n = parts.iter().map(|p| p.scales.len()).sum();
        let scales = match spec.scales {
            ScaleType::F32 => {
                let mut s = Vec::with_capacity(n);
                // A part with other scales is left out; `new` then rejects the lengths.
                parts.iter().for_each(|p| {
                    if let Scales::F32(b) = &p.scales {
                        s.extend_from_slice(b)
                    }
                });
                Scales::F32(Buffer::from_vec(s))
            }
            ScaleType::F16 => {
                let mut s = Vec::with_capacity(n);
                parts.iter().for_each(|p| {
                    if let Scales::F16(b) = &p.scales {
                        s.extend_from_slice(b)
                    }
                });
                Scales::F16(Buffer::from_vec(s))
            }
        };
        QuantData::new(spec.format, group, Buffer::from_vec(values), scales)
    }

    /// The stored format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Input features per scale.
    pub fn group(&self) -> usize {
        self.group
    }

    /// The spec this data was quantised with.
    pub fn spec(&self) -> QuantSpec {
        QuantSpec::new(self.format, self.group).with_scales(self.scales.scale_type())
    }

    /// The stored value bytes.
    pub fn values(&self) -> &Buffer<u8> {
        &self.values
    }

    /// The scales.
    pub fn scales(&self) -> &Scales {
        &self.scales
    }

    /// Number of (logical) elements.
    pub fn len(&self) -> usize {
        self.scales.len() * self.group
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes stored (values and scales).
    pub fn nbytes(&self) -> usize {
        self.values.len() + self.scales.nbytes()
    }

    /// True when values and scales live in a memory map.
    pub fn is_mapped(&self) -> bool {
        self.values.is_mapped() && self.scales.is_mapped()
    }

    /// Elements `start..start + len`, sharing storage.
    ///
    /// # Panics
    /// When `start` or `len` is not a multiple of the group size (slices are whole rows or
    /// whole matrices, whose widths are), or the range is out of bounds.
    pub fn slice(&self, start: usize, len: usize) -> Self {
        assert!(
            start.is_multiple_of(self.group) && len.is_multiple_of(self.group),
            "quantised slice {start}+{len} is not aligned to groups of {}",
            self.group
        );
        QuantData {
            format: self.format,
            group: self.group,
            values: self
                .values
                .slice(self.format.value_bytes(start), self.format.value_bytes(len)),
            scales: self.scales.slice(start / self.group, len / self.group),
        }
    }

    /// Stored code `i`: the integer (in `[-QMAX, QMAX]`) for q8 / q4, the raw byte (`0..=255`)
    /// for fp8, whose value is [`QuantData::value`].
    #[inline]
    pub fn q(&self, i: usize) -> i32 {
        match self.format {
            QuantFormat::Q8 => self.values[i] as i8 as i32,
            QuantFormat::Q4 => {
                let b = self.values[i / 2];
                let nib = if i.is_multiple_of(2) { b & 0x0f } else { b >> 4 };
                nib as i32 - 8
            }
            QuantFormat::F8E4M3 => self.values[i] as i32,
        }
    }

    /// Stored element `i` before scaling, as f32 (exact; an fp8 NaN code gives NaN).
    #[inline]
    pub fn value(&self, i: usize) -> f32 {
        match self.format {
            QuantFormat::F8E4M3 => FP8_E4M3_TABLE[self.values[i] as usize],
            _ => self.q(i) as f32,
        }
    }

    /// All elements dequantised (`value · s`, one f32 rounding) to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        (0..self.len())
            .map(|i| self.value(i) * self.scales.get(i / self.group))
            .collect()
    }
}

/// Quantises rows of `values` (`[rows, in_features]` row-major) with `spec`. Blocks of rows are
/// quantised in parallel; every group is independent, so the result does not depend on the split.
///
/// Errors when the spec does not fit `in_features`, or a value is not finite.
pub fn quantize(values: &[f32], in_features: usize, spec: QuantSpec) -> Result<QuantData> {
    use rayon::prelude::*;
    spec.check(in_features)?;
    let spec = QuantSpec {
        group: spec.group_for(in_features),
        ..spec
    };
    let g = spec.group;
    if !values.len().is_multiple_of(g) {
        return Err(Error::Quant(format!(
            "{} values are not whole groups of {g}",
            values.len()
        )));
    }
    // Blocks of about 256K elements (whole groups): large enough to amortise a task.
    let block = ((1usize << 18) / g).max(1) * g;
    let parts = values
        .par_chunks(block)
        .enumerate()
        .map(|(b, chunk)| quantize_block(chunk, b * block, spec))
        .collect::<Result<Vec<_>>>()?;
    QuantData::concat(&parts, spec)
}

/// [`quantize`] of whole groups on one thread; `first` is the index of `values[0]` (for errors).
fn quantize_block(values: &[f32], first: usize, spec: QuantSpec) -> Result<QuantData> {
    let g = spec.group;
    let qmax = spec.format.qmax();
    let mut scales = Vec::with_capacity(values.len() / g);
    let mut q = vec![0i8; values.len()];
    for (gi, (src, dst)) in values.chunks_exact(g).zip(q.chunks_exact_mut(g)).enumerate() {
        let mut amax = 0f32;
        for (i, &v) in src.iter().enumerate() {
            if !v.is_finite() {
                return Err(Error::Quant(format!(
                    "value {v} at element {} cannot be quantised",
                    first + gi * g + i
                )));
            }
            amax = amax.max(v.abs());
        }
        let mut s = amax / qmax as f32;
        if spec.scales == ScaleType::F16 {
            s = f16::from_f32(s).to_f32();
        }
        scales.push(s);
        if s > 0.0 {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = if spec.format == QuantFormat::F8E4M3 {
                    // The code's bits, carried in the i8 buffer.
                    fp8_e4m3_from_f32(v / s) as i8
                } else {
                    round_half_even(v / s).clamp(-qmax as f32, qmax as f32) as i8
                };
            }
        }
    }
    let values = match spec.format {
        QuantFormat::Q8 | QuantFormat::F8E4M3 => q.iter().map(|&v| v as u8).collect(),
        QuantFormat::Q4 => q
            .chunks_exact(2)
            .map(|p| ((p[0] + 8) as u8) | (((p[1] + 8) as u8) << 4))
            .collect(),
    };
    let scales = match spec.scales {
        ScaleType::F32 => Scales::F32(Buffer::from_vec(scales)),
        ScaleType::F16 => Scales::F16(Buffer::from_vec(
            scales.iter().map(|&s| f16::from_f32(s)).collect(),
        )),
    };
    QuantData::new(spec.format, g, Buffer::from_vec(values), scales)
}

/// `x.round_ties_even()` for `|x| < 2^22` (larger values are returned unrounded, which the
/// callers clamp anyway): adding and removing `1.5 · 2^23` leaves no fraction bits, and the
/// default rounding mode rounds half to even. `round_ties_even` itself compiles to a libm
/// call on baseline x86-64, which made load-time quantisation twice as slow.
#[inline(always)]
fn round_half_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    if x.abs() < 4_194_304.0 {
        (x + MAGIC) - MAGIC
    } else {
        x
    }
}

/// One token row's activations quantised to int8 per group: `s = max|x| / 127` (f32),
/// `q = round_half_even(x · (127 / max|x|))` (0 when the group is all zero). The kernels use
/// exactly this rule, so their integer sums equal the reference's.
///
/// # Shapes
/// `x: [k]` → `q: [k]`, `s: [k / group]`.
pub fn quantize_activations(x: &[f32], group: usize, q: &mut [i8], s: &mut [f32]) {
    for ((xg, qg), sg) in x.chunks(group).zip(q.chunks_mut(group)).zip(s.iter_mut()) {
        let amax = xg.iter().fold(0f32, |m, v| m.max(v.abs()));
        if amax > 0.0 && amax.is_finite() {
            let inv = 127.0 / amax;
            *sg = amax / 127.0;
            for (d, &v) in qg.iter_mut().zip(xg) {
                *d = round_half_even(v * inv).clamp(-127.0, 127.0) as i8;
            }
        } else {
            *sg = if amax.is_finite() { 0.0 } else { f32::NAN };
            qg.fill(0);
        }
    }
}

/// The scalar definition of the quantised linear map (see the module doc): `y = x · Wᵀ` with
/// `w` an `[n, k]` quantised matrix. For fp8, `y[r, o] = Σ_i x[r, i] · (fp8(q[o, i]) · s[o])`
/// with f32 activations, summed in order in f32.
///
/// # Shapes
/// `x: [t, k]`, `y: [t, n]`, both row-major.
#[allow(clippy::needless_range_loop)] // index loops state the formula most plainly
pub fn linear_reference(x: &[f32], t: usize, k: usize, n: usize, w: &QuantData, y: &mut [f32]) {
    if w.format() == QuantFormat::F8E4M3 {
        for r in 0..t {
            for o in 0..n {
                let s = w.scales().get(o * k / w.group());
                let mut acc = 0f32;
                for i in 0..k {
                    acc += x[r * k + i] * (w.value(o * k + i) * s);
                }
                y[r * n + o] = acc;
            }
        }
        return;
    }
    let g = w.group();
    let groups = k / g;
    let mut qx = vec![0i8; k];
    let mut sx = vec![0f32; groups];
    for r in 0..t {
        quantize_activations(&x[r * k..(r + 1) * k], g, &mut qx, &mut sx);
        for o in 0..n {
            let mut acc = 0f32;
            for gi in 0..groups {
                let mut isum = 0i32;
                for i in gi * g..(gi + 1) * g {
                    isum += w.q(o * k + i) * qx[i] as i32;
                }
                acc += w.scales().get(o * groups + gi) * sx[gi] * isum as f32;
            }
            y[r * n + o] = acc;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load-time quantisation policy and the stored format of quantised checkpoints.
// ---------------------------------------------------------------------------------------------

/// The `__metadata__` key of a safetensors file holding quantised tensors; its value is
/// [`QuantSpec::to_metadata`] (`{"format":"q4","group":128,"scales":"f32"}`).
pub const METADATA_KEY: &str = "llama4.quant";

/// Suffix of the stored integers of quantised tensor `N`: `N.qweight`, I8 `[.., out, in]` for
/// q8, U8 `[.., out, in / 2]` for q4 or F8_E4M3 `[.., out, in]` for fp8 (the module doc's
/// encoding).
pub const QWEIGHT_SUFFIX: &str = ".qweight";

/// Suffix of the scales of fp8 tensor `N` in Meta's FP8 checkpoints: `N_scale`
/// (`q_proj.weight_scale`, `experts.gate_up_proj_scale`; see [`crate::Checkpoint`]).
pub const FP8_SCALE_SUFFIX: &str = "_scale";

/// Suffix of the scales of quantised tensor `N`: `N.qscale`, F32 or F16 `[.., out, in / group]`.
pub const QSCALE_SUFFIX: &str = ".qscale";

impl ScaleType {
    /// The name used on the command line and in checkpoint metadata: `f32` or `f16`.
    pub fn name(self) -> &'static str {
        match self {
            ScaleType::F32 => "f32",
            ScaleType::F16 => "f16",
        }
    }

    /// Parses [`ScaleType::name`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(ScaleType::F32),
            "f16" => Some(ScaleType::F16),
            _ => None,
        }
    }

    /// Bytes per scale.
    pub fn size(self) -> usize {
        match self {
            ScaleType::F32 => 4,
            ScaleType::F16 => 2,
        }
    }
}

impl QuantSpec {
    /// The JSON stored under [`METADATA_KEY`]: `{"format":"q4","group":128,"scales":"f32"}`.
    pub fn to_metadata(&self) -> String {
        serde_json::json!({
            "format": self.format.name(),
            "group": self.group,
            "scales": self.scales.name(),
        })
        .to_string()
    }

    /// Parses [`QuantSpec::to_metadata`], checking every field (the group size too; fp8's group
    /// 0 means one scale per row).
    pub fn from_metadata(s: &str) -> Result<Self> {
        let bad = |why: String| Error::Quant(format!("metadata `{METADATA_KEY}` = `{s}`: {why}"));
        let v: serde_json::Value = serde_json::from_str(s).map_err(|e| bad(format!("not JSON: {e}")))?;
        let field = |k: &str| v.get(k).ok_or_else(|| bad(format!("no `{k}` field")));
        let format = field("format")?
            .as_str()
            .and_then(QuantFormat::parse)
            .ok_or_else(|| bad("`format` must be \"q8\", \"q4\" or \"fp8\"".into()))?;
        let group = field("group")?
            .as_u64()
            .and_then(|g| usize::try_from(g).ok())
            .ok_or_else(|| bad("`group` must be a non-negative integer".into()))?;
        let scales = field("scales")?
            .as_str()
            .and_then(ScaleType::parse)
            .ok_or_else(|| bad("`scales` must be \"f32\" or \"f16\"".into()))?;
        let spec = QuantSpec::new(format, group).with_scales(scales);
        spec.check_group().map_err(|e| bad(e.to_string()))?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::round_half_even;

    #[test]
    fn round_half_even_matches_std() {
        let mut x = -300.0f32;
        while x <= 300.0 {
            for v in [x, x + 0.5, x - 0.5, x + 0.499_999_97, x + 0.500_000_06] {
                assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
            }
            x += 0.25;
        }
        for v in [
            0.0f32,
            -0.0,
            1e-30,
            -1e-30,
            4_194_303.5,
            -4_194_302.5,
            1e9,
            f32::INFINITY,
        ] {
            assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
        }
    }
}
