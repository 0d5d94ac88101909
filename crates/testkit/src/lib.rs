#![deny(missing_docs)]
//! Test data shared by the workspace's tests and benches: one seeded generator, the paths of the
//! committed fixtures, reading and writing small safetensors files, and error measures.
//!
//! Helpers panic on failure: they only ever run inside tests, where a panic is the report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::bf16;
use ndarray::{Array2, ArrayD, ArrayView2, IxDyn};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// Deterministic values in [-1, 1) from `seed` (an LCG): the workspace's one generator of test
/// and bench data.
pub fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.uniform(1.0)).collect()
}

/// The LCG behind [`values`], for tests that draw values one at a time.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    const A: u64 = 6364136223846793005;
    const C: u64 = 1442695040888963407;

    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(Self::A).wrapping_add(Self::C))
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(Self::A).wrapping_add(Self::C);
        self.0
    }

    /// Uniform in `[-scale, scale)`, from the top 24 bits.
    pub fn uniform(&mut self, scale: f32) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
    }

    /// `n` values of [`Rng::uniform`].
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(scale)).collect()
    }

    /// A `[rows, cols]` array of [`Rng::uniform`] values.
    pub fn array(&mut self, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
        Array2::from_shape_vec((rows, cols), self.vec(rows * cols, scale)).expect("sized")
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 33) % n as u64) as usize
    }
}

/// The workspace root (where `fixtures/` and `models/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `fixtures/<path>` of the workspace.
pub fn fixture(path: &str) -> PathBuf {
    workspace_root().join("fixtures").join(path)
}

/// `models/<name>` of the workspace (the embedded demo models).
pub fn model_dir(name: &str) -> PathBuf {
    workspace_root().join("models").join(name)
}

/// Offset just past the last GGUF string `s` (a u64 length, then the bytes) in `bytes`: for a
/// tensor name, its info's `n_dims`; for a metadata key, its value type. Tests edit hostile
/// copies of fixtures from there.
pub fn gguf_string_end(bytes: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend(s.as_bytes());
    let at = bytes
        .windows(needle.len())
        .rposition(|w| w == needle)
        .unwrap_or_else(|| panic!("{s} not in the header"));
    at + needle.len()
}

/// max |a − b| / max |b| (NaN anywhere in `a` gives NaN).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err of different lengths");
    let scale = b.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
    let diff = a.iter().zip(b).fold(0f64, |m, (&x, &y)| {
        let d = (x as f64 - y as f64).abs();
        if d.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(d)
        }
    });
    diff / scale.max(f64::MIN_POSITIVE)
}

/// [`rel_err`] of two matrices of the same shape (any memory layout).
pub fn rel_err_2d(a: ArrayView2<f32>, b: ArrayView2<f32>) -> f64 {
    assert_eq!(a.dim(), b.dim(), "rel_err_2d of different shapes");
    let (a, b): (Vec<f32>, Vec<f32>) = a.iter().zip(b.iter()).map(|(&x, &y)| (x, y)).unzip();
    rel_err(&a, &b)
}

/// Every tensor of a safetensors file as f32 (F32, BF16 and I64 converted).
pub fn read_tensors(path: &Path) -> HashMap<String, ArrayD<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = tensor_f32(&view);
            let arr = ArrayD::from_shape_vec(IxDyn(view.shape()), values).expect("shape");
            (name, arr)
        })
        .collect()
}

fn tensor_f32(view: &TensorView) -> Vec<f32> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// Token ids stored as I64 under `name`.
pub fn ids(st: &SafeTensors, name: &str) -> Vec<u32> {
    st.tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
        .collect()
}

/// The 2-D F32 tensor `name`.
pub fn matrix(st: &SafeTensors, name: &str) -> Array2<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let shape = t.shape();
    assert_eq!(shape.len(), 2, "{name} is not 2-D");
    Array2::from_shape_vec((shape[0], shape[1]), tensor_f32(&t)).expect("shape")
}

/// A tensor to write: dtype, shape and little-endian bytes.
pub struct Tensor {
    /// Its name in the file.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian data.
    pub bytes: Vec<u8>,
}

/// A [`Tensor`].
pub fn tensor(name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Tensor {
    Tensor {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        bytes,
    }
}

/// Little-endian f32 bytes of `v`.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `tensors` with `metadata` as `dir/model.safetensors` and returns its path.
pub fn write_safetensors(
    dir: &Path,
    tensors: &[Tensor],
    metadata: Option<HashMap<String, String>>,
) -> PathBuf {
    let views = tensors.iter().map(|t| {
        (
            t.name.clone(),
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes).expect("consistent tensor"),
        )
    });
    let bytes = safetensors::serialize(views, metadata).expect("serialisable");
    let path = dir.join("model.safetensors");
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// One bf16 step at `x`: the spacing of bf16 numbers around `|x|` (8 significant bits).
pub fn bf16_step(x: f32) -> f32 {
    let a = x.abs().max(f32::MIN_POSITIVE);
    2f32.powf(a.log2().floor() - 7.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_seeded_and_in_range() {
        let a = values(1000, 7);
        assert_eq!(a, values(1000, 7));
        assert_ne!(a, values(1000, 8));
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.1, "mean {mean}");
    }

    #[test]
    fn rel_err_sees_nan_and_scale() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[1.0, 2.5], &[1.0, 2.0]) - 0.25).abs() < 1e-12);
        assert!(rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]).is_nan());
    }
}
