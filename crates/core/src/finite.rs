//! A load-time scan for NaN and infinities in a checkpoint's tensors.
//!
//! Broken weights (or quantisation scales) make every logit NaN, and generation then has no
//! meaningful token to pick. The generation loop detects that on the logits row it samples
//! from; this scan, optional because it reads every byte of the checkpoint, says which tensor
//! is to blame.

use rayon::prelude::*;

use crate::{bf16, f16, Checkpoint, Error, Result};

/// Elements per block scanned by one task.
const BLOCK: usize = 1 << 20;

/// How to find non-finite elements of one stored dtype: element width, the exponent mask
/// that is all ones exactly for NaN and infinities, and the element widened to f64.
struct Kind {
    width: usize,
    is_bad: fn(&[u8]) -> bool,
    value: fn(&[u8]) -> f64,
}

fn kind(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F32" => Kind {
            width: 4,
            is_bad: |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000,
            value: |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        },
        "F64" => Kind {
            width: 8,
            is_bad: |b| {
                let v = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                v & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000
            },
            value: |b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        },
        "BF16" => Kind {
            width: 2,
            is_bad: |b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80,
            value: |b| bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        },
        "F16" => Kind {
            width: 2,
            is_bad: |b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00,
            value: |b| f16::from_le_bytes([b[0], b[1]]).to_f64(),
        },
        // e4m3fn has no infinities; S.1111.111 is NaN.
        "F8_E4M3" => Kind {
            width: 1,
            is_bad: |b| b[0] & 0x7f == 0x7f,
            value: |_| f64::NAN,
        },
        "F8_E5M2" => Kind {
            width: 1,
            is_bad: |b| b[0] & 0x7c == 0x7c,
            value: |b| match b[0] & 0x7f {
                0x7c if b[0] & 0x80 != 0 => f64::NEG_INFINITY,
                0x7c => f64::INFINITY,
                _ => f64::NAN,
            },
        },
        "F8_E8M0" => Kind {
            width: 1,
            is_bad: |b| b[0] == 0xff,
            value: |_| f64::NAN,
        },
        // Integers and booleans hold no NaN.
        _ => return None,
    })
}

/// Index and value of the first non-finite element of `bytes` stored as `k`.
fn first_bad(bytes: &[u8], k: &Kind) -> Option<(usize, f64)> {
    let block_bytes = BLOCK * k.width;
    let block = bytes
        .par_chunks(block_bytes)
        .position_first(|c| c.chunks_exact(k.width).any(k.is_bad))?;
    let start = block * block_bytes;
    let end = (start + block_bytes).min(bytes.len());
    let (i, e) = bytes[start..end]
        .chunks_exact(k.width)
        .enumerate()
        .find(|(_, e)| (k.is_bad)(e))?;
    Some((block * BLOCK + i, (k.value)(e)))
}

impl Checkpoint {
    /// Scans every floating-point tensor of the checkpoint (weights, quantisation scales, fp8
    /// values) for NaN and infinities, in the order of their names. Reads every byte: a full
    /// pass over the files, in parallel.
    ///
    /// # Errors
    /// [`Error::NonFiniteWeight`] naming the first tensor (by name) that holds one, with the
    /// element's index and value.
    pub fn check_finite(&self) -> Result<()> {
        let mut names: Vec<&str> = self.tensor_names().collect();
        names.sort_unstable();
        for name in names {
            let info = self.info(name)?;
            let Some(k) = kind(&info.dtype) else {
                continue;
            };
            if let Some((index, value)) = first_bad(self.raw_bytes(name)?, &k) {
                return Err(Error::NonFiniteWeight {
                    name: name.to_string(),
                    path: self.file_of(name)?.to_path_buf(),
                    index,
                    value,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_non_finite_element_of_each_dtype() {
        let f32s: Vec<u8> = [1.0f32, f32::INFINITY, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(first_bad(&f32s, &kind("F32").unwrap()), Some((1, f64::INFINITY)));
        let bf: Vec<u8> = [bf16::from_f32(2.0), bf16::from_f32(-1.0), bf16::NEG_INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            first_bad(&bf, &kind("BF16").unwrap()),
            Some((2, f64::NEG_INFINITY))
        );
        let h: Vec<u8> = [f16::MAX, f16::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let (i, v) = first_bad(&h, &kind("F16").unwrap()).unwrap();
        assert!(i == 1 && v.is_nan());
        // Largest finite values are not flagged; e4m3fn 0x7e is 448, 0x7f NaN.
        assert_eq!(first_bad(&[0x7e, 0xfe], &kind("F8_E4M3").unwrap()), None);
        assert_eq!(
            first_bad(&[0x7e, 0xff], &kind("F8_E4M3").unwrap()).map(|r| r.0),
            Some(1)
        );
        assert!(kind("I8").is_none());
        // Past the first block.
        let mut big = vec![0u8; (BLOCK + 3) * 2];
        big[(BLOCK + 2) * 2 + 1] = 0x7f;
        big[(BLOCK + 2) * 2] = 0xc0;
        let (i, v) = first_bad(&big, &kind("BF16").unwrap()).unwrap();
        assert!(i == BLOCK + 2 && v.is_nan());
    }
}
