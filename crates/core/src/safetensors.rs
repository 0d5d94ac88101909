//! Reading the safetensors format: an 8-byte little-endian header length, a JSON header, then
//! the data section. Every number in the header is checked before it is used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use crate::{Buffer, DType, Error, Result, WeightData};

/// Headers larger than this are refused rather than parsed (real ones are a few MB at most).
pub const MAX_HEADER_LEN: u64 = 100 << 20;

/// One tensor's entry in a header, validated against the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The dtype string as written (`"BF16"`, …).
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub data_offsets: (usize, usize),
}

/// A parsed header: tensors and the free-form `__metadata__` strings.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// Tensors by name.
    pub tensors: HashMap<String, TensorInfo>,
    /// The `__metadata__` map, if present.
    pub metadata: HashMap<String, String>,
    /// Offset of the data section from the start of the file.
    pub data_start: usize,
}

/// Bytes per element of every dtype the format defines; `None` for strings it does not.
fn element_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Parses and validates the header of a safetensors file held in `bytes`. `path` only names the
/// file in errors. Never panics, whatever the bytes.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let file_len = bytes.len() as u64;
    let err_path = || path.to_path_buf();
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(Error::Truncated {
            path: err_path(),
            file_len,
            needed: 8,
        });
    };
    let mut le = [0u8; 8];
    le.copy_from_slice(len_bytes);
    let header_len = u64::from_le_bytes(le);
    if header_len > MAX_HEADER_LEN {
        return Err(Error::HeaderLength {
            path: err_path(),
            header_len,
        });
    }
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(Error::Truncated {
            path: err_path(),
            file_len,
            needed: data_start,
        });
    }
    let data_start = data_start as usize;
    let data_len = file_len - data_start as u64;
    let header_err = |reason: String| Error::Header {
        path: err_path(),
        reason,
    };

    let json: Value =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| header_err(format!("not JSON: {e}")))?;
    let Value::Object(entries) = json else {
        return Err(header_err("not a JSON object".into()));
    };

    let mut header = Header {
        data_start,
        ..Header::default()
    };
    for (name, entry) in entries {
        if name == "__metadata__" {
            let Value::Object(meta) = entry else {
                return Err(header_err("__metadata__ is not an object".into()));
            };
            for (k, v) in meta {
                let Value::String(v) = v else {
                    return Err(header_err(format!("__metadata__ value `{k}` is not a string")));
                };
                header.metadata.insert(k, v);
            }
            continue;
        }
        let info =
            parse_entry(&name, &entry).map_err(|reason| header_err(format!("tensor `{name}`: {reason}")))?;
        let Some(size) = element_size(&info.0) else {
            return Err(Error::UnsupportedDtype {
                path: err_path(),
                name,
                dtype: info.0,
            });
        };
        let (start, end) = info.2;
        if start > end || end > data_len {
            return Err(Error::OutOfBounds {
                path: err_path(),
                name,
                start,
                end,
                data_len,
            });
        }
        // A zero dimension makes the byte count 0, but the other dimensions must still describe
        // an array that can be indexed: ndarray refuses shapes whose non-zero dimensions multiply
        // past isize::MAX, and a look-up would then fail on a header that was accepted.
        let nonzero_bytes = info
            .1
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= isize::MAX as u64)
            .ok_or_else(|| Error::Overflow {
                path: err_path(),
                name: name.clone(),
            })?;
        let expected = if info.1.contains(&0) { 0 } else { nonzero_bytes };
        let shape: Option<Vec<usize>> = info.1.iter().map(|&d| usize::try_from(d).ok()).collect();
        let Some(shape) = shape else {
            return Err(Error::Overflow {
                path: err_path(),
                name,
            });
        };
        if end - start != expected {
            return Err(Error::ByteLength {
                path: err_path(),
                name,
                shape,
                expected,
                got: end - start,
            });
        }
        // Both offsets are at most `data_len`, which is a usize-sized slice length.
        let data_offsets = (start as usize, end as usize);
        header.tensors.insert(
            name,
            TensorInfo {
                dtype: info.0,
                shape,
                data_offsets,
            },
        );
    }

    // Tensors must not share bytes; empty tensors occupy none.
    let mut ranges: Vec<(&str, usize, usize)> = header
        .tensors
        .iter()
        .filter(|(_, t)| t.data_offsets.0 < t.data_offsets.1)
        .map(|(n, t)| (n.as_str(), t.data_offsets.0, t.data_offsets.1))
        .collect();
    ranges.sort_by_key(|r| (r.1, r.2));
    for pair in ranges.windows(2) {
        if pair[1].1 < pair[0].2 {
            return Err(Error::Overlap {
                path: err_path(),
                first: pair[0].0.to_string(),
                second: pair[1].0.to_string(),
            });
        }
    }
    Ok(header)
}

/// `(dtype, shape, (start, end))` of one entry, or why it is malformed.
type RawEntry = (String, Vec<u64>, (u64, u64));

fn parse_entry(name: &str, entry: &Value) -> std::result::Result<RawEntry, String> {
    let _ = name;
    let obj = entry.as_object().ok_or("entry is not an object")?;
    let dtype = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("missing or non-string `dtype`")?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("missing or non-array `shape`")?
        .iter()
        .map(|d| d.as_u64().ok_or("shape entries must be non-negative integers"))
        .collect::<std::result::Result<Vec<u64>, _>>()?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or("missing or non-array `data_offsets`")?;
    let [start, end] = offsets.as_slice() else {
        return Err("`data_offsets` must have two entries".into());
    };
    let start = start.as_u64().ok_or("offsets must be non-negative integers")?;
    let end = end.as_u64().ok_or("offsets must be non-negative integers")?;
    Ok((dtype.to_string(), shape, (start, end)))
}

/// A memory-mapped safetensors file with a validated header.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Arc<Mmap>,
    header: Header,
    /// `map` is an anonymous copy ([`SafetensorsFile::copy_to_huge_pages`]): its pages hold the
    /// bytes, not a cache of the file, so they are never released.
    copied: bool,
}

impl SafetensorsFile {
    /// Maps and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        // A FIFO or device in place of a weight file is refused before it is opened.
        let (file, file_len) = crate::input::open_regular(&path)?;
        if file_len < 8 {
            // Mapping an empty file fails on some systems; this is the error that matters.
            return Err(Error::Truncated {
                path,
                file_len,
                needed: 8,
            });
        }
        // SAFETY: the map is read-only. Like every memory-mapped reader, this assumes the file
        // is not truncated or rewritten by another process while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = parse_header(&path, &map)?;
        Ok(SafetensorsFile {
            path,
            map: Arc::new(map),
            header,
            copied: false,
        })
    }

    /// Maps every page of the file into the process now (see [`crate::buffer::populate`]),
    /// so that the first forward pass does not take one page fault per 4 KiB of weights.
    pub fn populate_resident_pages(&self) {
        crate::buffer::populate(&self.map);
    }

    /// Replaces the file's map by a copy in anonymous memory backed by huge pages (see
    /// [`crate::buffer::copy_to_huge_pages`]); a second call keeps the first copy. Tensors
    /// loaded before keep reading the file.
    pub(crate) fn copy_to_huge_pages(&mut self) -> std::io::Result<()> {
        if self.copied {
            return Ok(());
        }
        // SAFETY: not copied yet (checked above), so `map` is the file's map.
        self.map = Arc::new(unsafe { crate::buffer::copy_to_huge_pages(&self.map) }?);
        self.copied = true;
        Ok(())
    }

    /// Whether the file is read from a copy ([`SafetensorsFile::copy_to_huge_pages`]).
    pub(crate) fn is_copied(&self) -> bool {
        self.copied
    }

    /// Bytes of the file.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Drops this file's pages from the process's resident set (they stay in the page cache and
    /// fault back in when read). Advisory: errors are ignored. Nothing is released from a copy
    /// in huge pages, whose pages would come back as zeros.
    pub fn release_resident_pages(&self) {
        if self.copied {
            return;
        }
        #[cfg(unix)]
        // SAFETY: the map is a read-only map of the file (not a copy, checked above), so
        // dropping its pages discards nothing: a later read refaults the same bytes from the
        // file.
        unsafe {
            let _ = self.map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed);
        }
    }

    /// [`Self::release_resident_pages`] for the pages of tensor `name` only (from the page
    /// holding its first byte; a neighbour sharing that page refaults if read).
    pub fn release_tensor_pages(&self, name: &str) {
        if self.copied {
            return;
        }
        #[cfg(unix)]
        if let Some(info) = self.header.tensors.get(name) {
            const PAGE: usize = 4096;
            let start = (self.header.data_start + info.data_offsets.0) / PAGE * PAGE;
            let end = self.header.data_start + info.data_offsets.1;
            // SAFETY: as in `release_resident_pages`; the range lies inside the map (checked
            // when the header was parsed).
            unsafe {
                let _ =
                    self.map
                        .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start);
            }
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The tensor's entry, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.get(name)
    }

    /// The tensor's elements as stored (zero-copy when aligned).
    pub fn data(&self, name: &str) -> Result<WeightData> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.path.clone(),
        })?;
        let dtype = DType::from_safetensors_name(&info.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: self.path.clone(),
            name: name.to_string(),
            dtype: info.dtype.clone(),
        })?;
        let offset = self.header.data_start + info.data_offsets.0;
        let len = (info.data_offsets.1 - info.data_offsets.0) / dtype.size();
        Ok(match dtype {
            DType::F32 => WeightData::F32(Buffer::from_map(&self.map, offset, len)),
            DType::BF16 => WeightData::BF16(Buffer::from_map(&self.map, offset, len)),
            DType::F16 => WeightData::F16(Buffer::from_map(&self.map, offset, len)),
        })
    }

    /// The bytes of an `I8`, `U8` or `F8_E4M3` tensor (the codes of a quantised tensor),
    /// borrowed from the map. Other dtypes are [`Error::UnsupportedDtype`]: they have their own
    /// element type ([`SafetensorsFile::data`]).
    pub fn byte_data(&self, name: &str) -> Result<Buffer<u8>> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.path.clone(),
        })?;
        if !matches!(info.dtype.as_str(), "I8" | "U8" | "F8_E4M3") {
            return Err(Error::UnsupportedDtype {
                path: self.path.clone(),
                name: name.to_string(),
                dtype: info.dtype.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        Ok(Buffer::from_map(
            &self.map,
            self.header.data_start + start,
            end - start,
        ))
    }

    /// The stored bytes of any tensor, exactly as in the file (for copying it unchanged).
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.path.clone(),
        })?;
        let (start, end) = info.data_offsets;
        // The header check put both offsets inside the data section.
        Ok(&self.map[self.header.data_start + start..self.header.data_start + end])
    }
}

/// One tensor of a file a [`Writer`] writes: its name, dtype string, shape; its bytes come later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Full tensor name.
    pub name: String,
    /// Dtype string as the format spells it (`"BF16"`, `"I8"`, …).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Writes a safetensors file whose tensors are known up front and whose bytes are produced one
/// tensor at a time, in any order: the header is written first, each tensor lands at its own
/// offset, and the file appears under its name only once [`Writer::finish`] has checked it.
///
/// Tensors are laid out widest element first: with the data section starting 8-aligned (the
/// header is padded), every tensor starts at a multiple of its element size, so a reader maps
/// it without copying.
pub struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    data_start: u64,
    /// Byte range of each entry (in the caller's order) inside the data section.
    ranges: Vec<(usize, usize)>,
    written: Vec<bool>,
}

impl Writer {
    /// Creates `path` (as `path.partial` until finished) holding `entries` and `metadata`.
    ///
    /// # Errors
    /// [`Error::Header`] for a dtype the format does not define or a size that overflows;
    /// [`Error::Io`] when the file cannot be created.
    pub fn create(
        path: impl AsRef<Path>,
        entries: &[Entry],
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bad = |reason: String| Error::Header {
            path: path.clone(),
            reason,
        };
        let mut sizes = Vec::with_capacity(entries.len());
        for e in entries {
            let elem = element_size(&e.dtype)
                .ok_or_else(|| bad(format!("`{}`: unknown dtype {}", e.name, e.dtype)))?;
            let len = e
                .shape
                .iter()
                .try_fold(elem, |n, &d| n.checked_mul(d as u64))
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| bad(format!("`{}`: size overflows", e.name)))?;
            sizes.push((elem, len));
        }
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by(|&a, &b| {
            sizes[b]
                .0
                .cmp(&sizes[a].0)
                .then_with(|| entries[a].name.cmp(&entries[b].name))
        });
        let mut ranges = vec![(0, 0); entries.len()];
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for &i in &order {
            let end = offset
                .checked_add(sizes[i].1)
                .ok_or_else(|| bad("file size overflows".into()))?;
            ranges[i] = (offset, end);
            let e = &entries[i];
            header.insert(
                e.name.clone(),
                serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::json!(metadata));
        }
        let mut header = Value::Object(header).to_string().into_bytes();
        header.resize(header.len().div_ceil(8) * 8, b' ');
        let tmp = path.with_extension("safetensors.partial");
        let io = |source| Error::Io {
            path: tmp.clone(),
            source,
        };
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        use std::io::Write;
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&header))
            .map_err(io)?;
        Ok(Writer {
            data_start: 8 + header.len() as u64,
            path,
            tmp,
            out,
            ranges,
            written: vec![false; entries.len()],
        })
    }

    /// Bytes of the data section, once every tensor is written.
    pub fn data_len(&self) -> usize {
        self.ranges.iter().map(|r| r.1).max().unwrap_or(0)
    }

    /// Writes the bytes of entry `index` (in the order given to [`Writer::create`]).
    ///
    /// # Errors
    /// [`Error::Shape`] when `bytes` is not the entry's size or the index is out of range,
    /// [`Error::Io`] when writing fails.
    pub fn write(&mut self, index: usize, bytes: &[u8]) -> Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        let &(start, end) = self
            .ranges
            .get(index)
            .ok_or_else(|| Error::shape("safetensors::Writer::write", format!("no entry {index}")))?;
        if bytes.len() != end - start {
            return Err(Error::shape(
                "safetensors::Writer::write",
                format!("entry {index} takes {} bytes, got {}", end - start, bytes.len()),
            ));
        }
        let io = |source| Error::Io {
            path: self.tmp.clone(),
            source,
        };
        self.out
            .seek(SeekFrom::Start(self.data_start + start as u64))
            .and_then(|_| self.out.write_all(bytes))
            .map_err(io)?;
        self.written[index] = true;
        Ok(())
    }

    /// Flushes, checks that every entry was written and that the file parses, and moves it to
    /// its name.
    pub fn finish(mut self) -> Result<PathBuf> {
        use std::io::Write;
        if let Some(i) = self.written.iter().position(|w| !w) {
            return Err(Error::Header {
                path: self.path.clone(),
                reason: format!("entry {i} was never written"),
            });
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        self.out.flush().map_err(io(&self.tmp))?;
        drop(self.out);
        std::fs::rename(&self.tmp, &self.path).map_err(io(&self.path))?;
        SafetensorsFile::open(&self.path)?;
        Ok(self.path)
    }
}
