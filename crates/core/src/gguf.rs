//! Reading GGUF files (versions 2 and 3): the header, typed metadata, tensor infos, and the
//! tensors' blocks memory-mapped in place.
//!
//! # Layout (little-endian)
//! ```text
//! magic "GGUF" · version u32 · n_tensors u64 · n_kv u64
//! n_kv × (key: string · type u32 · value)
//! n_tensors × (name: string · n_dims u32 · ne[n_dims] u64 · ggml type u32 · offset u64)
//! padding to `general.alignment` (u32, a power of two; 32 when absent)
//! data section: each tensor at `offset` (a multiple of the alignment) from its start
//! ```
//! A string is a u64 length and that many UTF-8 bytes. A value's type is one of u8, i8, u16,
//! i16, u32, i32, f32, bool, string, array, u64, i64, f64 (ids 0..=12); an array is an element
//! type, a u64 count and the elements (arrays of arrays are allowed). `ne[0]` is the contiguous
//! dimension: a matrix `[out, in]` is stored with `ne = [in, out]`; [`TensorInfo::shape`] gives
//! dimensions outermost first.
//!
//! # Hostile files
//! Every count and length is checked against the bytes that remain before anything is
//! allocated (an element takes at least one byte of the file), and against fixed limits
//! ([`MAX_STRING_LEN`], [`MAX_KEY_LEN`], [`MAX_TENSORS`], [`MAX_KVS`], [`MAX_DEPTH`],
//! [`MAX_DIMS`], [`MAX_NAME_LEN`]); sizes use checked arithmetic; every tensor must lie inside
//! the data section, aligned, sized exactly by its type and dimensions, and share no bytes with
//! another. Whatever the bytes, parsing returns a value or a named error in time and memory
//! linear in the file's length.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::ggml::{GgmlData, GgmlType};
use crate::progress::{ProgressCounter, SharedProgress};
use crate::{BatchedWeight, Buffer, Error, Layout, Result, Weight, WeightData};

/// The file's first four bytes.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Longest string accepted (llama.cpp's limit).
pub const MAX_STRING_LEN: u64 = 1 << 30;
/// Longest metadata key (the format's limit: `2^16 − 1` bytes).
pub const MAX_KEY_LEN: u64 = (1 << 16) - 1;
/// Most tensors accepted (Llama 4 Maverick has under 1,500).
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most metadata entries accepted.
pub const MAX_KVS: u64 = 1 << 20;
/// Deepest nesting of arrays accepted.
pub const MAX_DEPTH: usize = 8;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Tensor names are shorter than this (ggml's `GGML_MAX_NAME`).
pub const MAX_NAME_LEN: usize = 64;
/// The alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key of the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)] // one variant per GGUF value type, named as the format names them
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: elements of one type, stored compactly.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)] // as `Value`
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Value {
    /// The format's name of the value's type (`u32`, `string`, `array`, …).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// An integer value of any integer type that is non-negative, as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// An integer value of any integer type, as i64 (`None` for a u64 above `i64::MAX`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float value (f32, or f64 rounded to f32).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// A bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array value.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The format's name of the element type.
    pub fn element_type_name(&self) -> &'static str {
        match self {
            Array::U8(_) => "u8",
            Array::I8(_) => "i8",
            Array::U16(_) => "u16",
            Array::I16(_) => "i16",
            Array::U32(_) => "u32",
            Array::I32(_) => "i32",
            Array::F32(_) => "f32",
            Array::Bool(_) => "bool",
            Array::String(_) => "string",
            Array::Array(_) => "array",
            Array::U64(_) => "u64",
            Array::I64(_) => "i64",
            Array::F64(_) => "f64",
        }
    }

    /// The elements of a string array.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Array::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of an integer array of any integer type, as i64 (`None` when another type,
    /// or a u64 element above `i64::MAX`).
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        Some(match self {
            Array::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I64(v) => v.clone(),
            Array::U64(v) => v.iter().map(|&x| i64::try_from(x).ok()).collect::<Option<_>>()?,
            _ => return None,
        })
    }

    /// The elements of a float array (f32, or f64 rounded to f32).
    pub fn to_f32s(&self) -> Option<Vec<f32>> {
        match self {
            Array::F32(v) => Some(v.clone()),
            Array::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            _ => None,
        }
    }

    /// The elements of a bool array.
    pub fn as_bools(&self) -> Option<&[bool]> {
        match self {
            Array::Bool(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor's entry, validated against the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The name.
    pub name: String,
    /// ggml's dimensions, contiguous first (`ne`); empty for a scalar.
    pub ne: Vec<u64>,
    /// The ggml type.
    pub ty: GgmlType,
    /// Start of the tensor's bytes in the data section (a multiple of the alignment).
    pub offset: u64,
    /// Bytes of the tensor.
    pub nbytes: u64,
}

impl TensorInfo {
    /// The dimensions outermost first (`ne` reversed): `[out, in]` for a matrix, `[E, out, in]`
    /// for a batch of experts.
    pub fn shape(&self) -> Vec<usize> {
        // Each dimension was checked to fit in usize when the header was parsed.
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

/// A parsed header.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// The format version (2 or 3).
    pub version: u32,
    /// The metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// The tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// The data alignment.
    pub alignment: u64,
    /// Offset of the data section from the start of the file.
    pub data_start: u64,
    /// Bytes of the data section (to the end of the file).
    pub data_len: u64,
    keys: HashMap<String, usize>,
    names: HashMap<String, usize>,
}

impl Header {
    /// The value of metadata `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.keys.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The entry of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.names.get(name).map(|&i| &self.tensors[i])
    }
}

/// Value type ids.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Fewest file bytes one element of value type `t` takes (a string its length, an array its
/// type and count); `None` for an unknown type.
fn min_size(t: u32) -> Option<u64> {
    Some(match t {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 | T_STRING => 8,
        T_ARRAY => 12,
        _ => return None,
    })
}

struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn bad(&self, reason: impl Into<String>) -> Error {
        Error::GgufHeader {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            reason: reason.into(),
        }
    }

    fn limit(&self, what: &'static str, value: u64, limit: u64) -> Error {
        Error::GgufLimit {
            path: self.path.to_path_buf(),
            what,
            value,
            limit,
        }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::GgufTruncated {
                path: self.path.to_path_buf(),
                offset: self.pos as u64,
                needed: n,
                file_len: self.bytes.len() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A string of at most `max` bytes.
    fn string(&mut self, max: u64, what: &'static str) -> Result<String> {
        let len = self.u64()?;
        if len > max {
            return Err(self.limit(what, len, max));
        }
        let at = self.pos;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::GgufHeader {
            path: self.path.to_path_buf(),
            offset: at as u64,
            reason: format!("{what} is not UTF-8"),
        })
    }

    /// A count of elements that each take at least `min` bytes: checked against the bytes left
    /// before anything is allocated for them.
    fn count(&mut self, min: u64, what: &'static str, max: u64) -> Result<usize> {
        let n = self.u64()?;
        if n > max {
            return Err(self.limit(what, n, max));
        }
        match n.checked_mul(min) {
            Some(need) if need <= self.remaining() => Ok(n as usize),
            _ => Err(Error::GgufTruncated {
                path: self.path.to_path_buf(),
                offset: self.pos as u64,
                needed: n.saturating_mul(min),
                file_len: self.bytes.len() as u64,
            }),
        }
    }

    fn bool(&mut self) -> Result<bool> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.bad(format!("bool byte {b} is neither 0 nor 1"))),
        }
    }

    fn value(&mut self, t: u32, depth: usize) -> Result<Value> {
        Ok(match t {
            T_U8 => Value::U8(self.take(1)?[0]),
            T_I8 => Value::I8(self.take(1)?[0] as i8),
            T_U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            T_I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            T_U32 => Value::U32(self.u32()?),
            T_I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            T_F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            T_BOOL => Value::Bool(self.bool()?),
            T_STRING => Value::String(self.string(MAX_STRING_LEN, "string value")?),
            T_ARRAY => Value::Array(self.array_value(depth + 1)?),
            T_U64 => Value::U64(self.u64()?),
            T_I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            T_F64 => Value::F64(f64::from_le_bytes(self.array()?)),
            _ => return Err(self.bad(format!("unknown value type {t}"))),
        })
    }

    /// Elements of fixed size `N` decoded by `f`.
    fn fixed<const N: usize, T>(&mut self, n: usize, f: impl Fn([u8; N]) -> T) -> Result<Vec<T>> {
        let bytes = self.take((n * N) as u64)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks of N")))
            .collect())
    }

    fn array_value(&mut self, depth: usize) -> Result<Array> {
        if depth > MAX_DEPTH {
            return Err(self.limit("array nesting", depth as u64, MAX_DEPTH as u64));
        }
        let t = self.u32()?;
        let min = min_size(t).ok_or_else(|| self.bad(format!("unknown array element type {t}")))?;
        let n = self.count(min, "array length", u64::MAX)?;
        Ok(match t {
            T_U8 => Array::U8(self.fixed(n, |b: [u8; 1]| b[0])?),
            T_I8 => Array::I8(self.fixed(n, |b: [u8; 1]| b[0] as i8)?),
            T_U16 => Array::U16(self.fixed(n, u16::from_le_bytes)?),
            T_I16 => Array::I16(self.fixed(n, i16::from_le_bytes)?),
            T_U32 => Array::U32(self.fixed(n, u32::from_le_bytes)?),
            T_I32 => Array::I32(self.fixed(n, i32::from_le_bytes)?),
            T_F32 => Array::F32(self.fixed(n, f32::from_le_bytes)?),
            T_U64 => Array::U64(self.fixed(n, u64::from_le_bytes)?),
            T_I64 => Array::I64(self.fixed(n, i64::from_le_bytes)?),
            T_F64 => Array::F64(self.fixed(n, f64::from_le_bytes)?),
            T_BOOL => Array::Bool((0..n).map(|_| self.bool()).collect::<Result<_>>()?),
            T_STRING => Array::String(
                (0..n)
                    .map(|_| self.string(MAX_STRING_LEN, "string element"))
                    .collect::<Result<_>>()?,
            ),
            _ => Array::Array(
                (0..n)
                    .map(|_| self.array_value(depth + 1))
                    .collect::<Result<_>>()?,
            ),
        })
    }
}

/// Parses and validates the header of a GGUF file held in `bytes` (`path` only names the file
/// in errors). Never panics, whatever the bytes.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let mut r = Reader { path, bytes, pos: 0 };
    if r.array::<4>()? != MAGIC {
        return Err(Error::GgufHeader {
            path: path.to_path_buf(),
            offset: 0,
            reason: "not a GGUF file (magic is not \"GGUF\")".into(),
        });
    }
    let version = r.u32()?;
    match version {
        2 | 3 => {}
        1 => return Err(r.bad("GGUF version 1 is not supported (it predates 64-bit lengths)")),
        v if v.swap_bytes() <= 3 => {
            return Err(r.bad(format!(
                "version {v}: a big-endian file, which this reader does not read"
            )))
        }
        v => return Err(r.bad(format!("unknown GGUF version {v}"))),
    }
    // A tensor info takes at least 24 bytes, a key-value pair 13.
    let n_tensors = r.u64()?;
    if n_tensors > MAX_TENSORS {
        return Err(r.limit("tensor count", n_tensors, MAX_TENSORS));
    }
    let n_kv = r.count(13, "metadata count", MAX_KVS)?;
    let mut h = Header {
        version,
        alignment: DEFAULT_ALIGNMENT,
        ..Header::default()
    };
    for _ in 0..n_kv {
        let at = r.pos;
        let key = r.string(MAX_KEY_LEN, "key")?;
        if key.is_empty() {
            return Err(r.bad("empty key"));
        }
        let t = r.u32()?;
        let value = r.value(t, 0)?;
        if h.keys.insert(key.clone(), h.metadata.len()).is_some() {
            return Err(Error::GgufHeader {
                path: path.to_path_buf(),
                offset: at as u64,
                reason: format!("duplicate key `{key}`"),
            });
        }
        h.metadata.push((key, value));
    }
    if let Some(v) = h.get(ALIGNMENT_KEY).cloned() {
        match v {
            Value::U32(a) if a.is_power_of_two() => h.alignment = a as u64,
            _ => {
                return Err(r.bad(format!(
                    "`{ALIGNMENT_KEY}` must be a u32 power of two, not {} {v:?}",
                    v.type_name()
                )))
            }
        }
    }
    if n_tensors.saturating_mul(24) > r.remaining() {
        return Err(Error::GgufTruncated {
            path: path.to_path_buf(),
            offset: r.pos as u64,
            needed: n_tensors.saturating_mul(24),
            file_len: bytes.len() as u64,
        });
    }
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = r.string(MAX_NAME_LEN as u64 - 1, "tensor name")?;
        let n_dims = r.u32()?;
        if n_dims > MAX_DIMS {
            return Err(r.bad(format!(
                "tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"
            )));
        }
        let ne = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<u64>>>()?;
        let id = r.u32()?;
        let offset = r.u64()?;
        raw.push((name, ne, id, offset));
    }
    // The data section starts at the next multiple of the alignment.
    let header_end = r.pos as u64;
    let file_len = bytes.len() as u64;
    let data_start = header_end
        .checked_next_multiple_of(h.alignment)
        .filter(|&s| s <= file_len || raw.is_empty())
        .ok_or(Error::GgufTruncated {
            path: path.to_path_buf(),
            offset: header_end,
            needed: h.alignment,
            file_len,
        })?;
    h.data_start = data_start;
    h.data_len = file_len.saturating_sub(data_start);

    for (name, ne, id, offset) in raw {
        let overflow = || Error::Overflow {
            path: path.to_path_buf(),
            name: name.clone(),
        };
        let ty = GgmlType::from_id(id)
            .ok_or_else(|| r.bad(format!("tensor `{name}` has unknown ggml type id {id}")))?;
        // Elements must be indexable (ggml uses i64, slices usize); zero-sized tensors too.
        let limit = (isize::MAX as u64).min(i64::MAX as u64);
        let elements = ne
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&e| e <= limit)
            .ok_or_else(overflow)?;
        let elements = if ne.contains(&0) { 0 } else { elements };
        let row = ne.first().copied().unwrap_or(1);
        if row % ty.block_size() as u64 != 0 {
            return Err(r.bad(format!(
                "tensor `{name}` of {ty} has rows of {row}, not a multiple of its block size {}",
                ty.block_size()
            )));
        }
        let nbytes = (elements / ty.block_size() as u64)
            .checked_mul(ty.type_size() as u64)
            .filter(|&b| b <= limit)
            .ok_or_else(overflow)?;
        if offset % h.alignment != 0 {
            return Err(r.bad(format!(
                "tensor `{name}` at offset {offset}, not a multiple of the alignment {}",
                h.alignment
            )));
        }
        let end = offset.checked_add(nbytes).ok_or_else(overflow)?;
        if end > h.data_len {
            return Err(Error::OutOfBounds {
                path: path.to_path_buf(),
                name,
                start: offset,
                end,
                data_len: h.data_len,
            });
        }
        if h.names.insert(name.clone(), h.tensors.len()).is_some() {
            return Err(r.bad(format!("duplicate tensor name `{name}`")));
        }
        h.tensors.push(TensorInfo {
            name,
            ne,
            ty,
            offset,
            nbytes,
        });
    }
    // Tensors must not share bytes; empty ones occupy none.
    let mut ranges: Vec<(u64, u64, &str)> = h
        .tensors
        .iter()
        .filter(|t| t.nbytes > 0)
        .map(|t| (t.offset, t.offset + t.nbytes, t.name.as_str()))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(Error::Overlap {
                path: path.to_path_buf(),
                first: pair[0].2.to_string(),
                second: pair[1].2.to_string(),
            });
        }
    }
    Ok(h)
}

/// A memory-mapped GGUF file with a validated header.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    header: Header,
    /// Stored bytes of the tensors handed out, for a load-progress observer.
    progress: ProgressCounter,
    /// `map` is an anonymous copy ([`GgufFile::copy_to_huge_pages`]).
    copied: bool,
}

impl GgufFile {
    /// Maps and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        if file_len < 4 {
            // Mapping an empty file fails on some systems; this is the error that matters.
            return Err(Error::GgufTruncated {
                path,
                offset: 0,
                needed: 4,
                file_len,
            });
        }
        // SAFETY: the map is read-only. Like every memory-mapped reader, this assumes the file
        // is not truncated or rewritten by another process while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = parse_header(&path, &map)?;
        Ok(GgufFile {
            path,
            map: Arc::new(map),
            header,
            progress: ProgressCounter::default(),
            copied: false,
        })
    }

    /// Sets (or clears) the load-progress observer: every later [`GgufFile::weight`],
    /// [`GgufFile::batched`] or [`GgufFile::to_f32`] reports the tensor's stored bytes, out of
    /// the bytes of every tensor in the file (see [`crate::progress`]);
    /// [`GgufFile::finish_progress`] reports the load complete.
    pub fn set_progress(&mut self, observer: Option<SharedProgress>) {
        let total = self.header.tensors.iter().map(|t| t.nbytes).sum();
        self.progress = ProgressCounter::new(observer, total);
    }

    /// [`GgufFile::set_progress`] by value.
    pub fn with_progress(mut self, observer: Option<SharedProgress>) -> Self {
        self.set_progress(observer);
        self
    }

    /// Reports the load complete (`done == total`): tensors nothing asked for count as done.
    pub fn finish_progress(&self) {
        self.progress.finish();
    }

    /// Copies the file into anonymous memory backed by 2 MiB pages when it fits in half of the
    /// memory this process can have and the kernel offers transparent huge pages, and reports
    /// whether it is copied (see [`crate::Checkpoint::copy_to_huge_pages`]). Call it before
    /// loading tensors: those loaded before keep reading the file's map.
    pub fn copy_to_huge_pages(&mut self) -> bool {
        if self.copied {
            return true;
        }
        if !crate::buffer::may_copy_to_huge_pages(self.map.len() as u64) {
            return false;
        }
        // SAFETY: not copied yet (checked above), so `map` is the file's map.
        match unsafe { crate::buffer::copy_to_huge_pages(&self.map) } {
            Ok(copy) => {
                self.map = Arc::new(copy);
                self.copied = true;
                true
            }
            Err(_) => false,
        }
    }

    /// Prefaults the file's pages when it fits in half of this machine's memory, and reports
    /// whether it did (see [`crate::Checkpoint::populate_resident_pages`]).
    pub fn populate_resident_pages(&self) -> bool {
        let fits = crate::buffer::fits_in_memory(self.map.len() as u64);
        if fits {
            crate::buffer::populate(&self.map);
        }
        fits
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The value of metadata `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.header.get(key)
    }

    /// The entry of tensor `name`, or [`Error::MissingTensor`].
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.header.tensor(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.path.clone(),
        })
    }

    /// The stored bytes of tensor `name`, exactly as in the file.
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.info(name)?;
        // The header check put the range inside the data section, itself inside the file.
        let start = (self.header.data_start + t.offset) as usize;
        Ok(&self.map[start..start + t.nbytes as usize])
    }

    /// The blocks of tensor `name` as weight storage, borrowed from the map. A type this library
    /// does not multiply (the IQ family, integer types, …) is [`Error::UnsupportedDtype`]
    /// naming the tensor and the type.
    pub fn data(&self, name: &str) -> Result<GgmlData> {
        let t = self.info(name)?;
        if !t.ty.is_supported() {
            return Err(Error::UnsupportedDtype {
                path: self.path.clone(),
                name: name.to_string(),
                dtype: t.ty.name().to_string(),
            });
        }
        let start = (self.header.data_start + t.offset) as usize;
        let bytes = Buffer::from_map(&self.map, start, t.nbytes as usize);
        GgmlData::new(t.ty, bytes, t.elements() as usize)
    }

    /// Checks that tensor `name` has `shape` (outermost first).
    fn check_shape(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo> {
        let t = self.info(name)?;
        if t.shape() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                path: self.path.clone(),
                expected: shape.to_vec(),
                got: t.shape(),
            });
        }
        Ok(t)
    }

    /// Matrix `name` of shape `[out, in]` (ggml `ne = [in, out]`) as a [`Weight`] read in place;
    /// multiplying by it treats the activations as llama.cpp does for its type.
    pub fn weight(&self, name: &str, [out, inp]: [usize; 2]) -> Result<Weight> {
        let t = self.check_shape(name, &[out, inp])?;
        let w = Weight::new(
            WeightData::Ggml(Box::new(self.data(name)?)),
            Layout::OutIn,
            out,
            inp,
        )?;
        self.progress.add(t.nbytes);
        Ok(w)
    }

    /// A batch of matrices `[batch, out, in]` (ggml `ne = [in, out, batch]`: llama.cpp's
    /// `ffn_*_exps` expert tensors) as a [`BatchedWeight`] read in place.
    pub fn batched(&self, name: &str, [batch, out, inp]: [usize; 3]) -> Result<BatchedWeight> {
        let t = self.check_shape(name, &[batch, out, inp])?;
        let w = BatchedWeight::new(
            WeightData::Ggml(Box::new(self.data(name)?)),
            Layout::OutIn,
            batch,
            out,
            inp,
        )?;
        self.progress.add(t.nbytes);
        Ok(w)
    }

    /// Tensor `name` of `shape` dequantised to f32 (norm weights, biases, an embedding table to
    /// copy), bit for bit as llama.cpp dequantises it.
    pub fn to_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.check_shape(name, shape)?;
        let values = self.data(name)?.to_f32_vec();
        self.progress.add(t.nbytes);
        Ok(values)
    }
}
