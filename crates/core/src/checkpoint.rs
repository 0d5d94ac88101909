//! A checkpoint directory in Hugging Face layout, with look-up by scoped names.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use ndarray::{Array1, ArrayD, IxDyn};
use serde_json::Value;

use crate::safetensors::SafetensorsFile;
use crate::{BatchedWeight, DType, Error, Layout, Result, Weight, WeightData};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// The tensors of a checkpoint: one `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists. Every file is memory-mapped; nothing is read until a
/// weight is used.
pub struct Checkpoint {
    location: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    names: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens a checkpoint directory, or a single `.safetensors` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_file() {
            return Self::from_files(path.to_path_buf(), vec![SafetensorsFile::open(path)?]);
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            return Self::from_files(path.to_path_buf(), vec![SafetensorsFile::open(single)?]);
        }
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_sharded(path, &index);
        }
        Err(Error::NoCheckpoint {
            dir: path.to_path_buf(),
        })
    }

    fn from_files(location: PathBuf, files: Vec<SafetensorsFile>) -> Result<Self> {
        let mut names = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.header().tensors.keys() {
                names.insert(name.clone(), i);
            }
        }
        Ok(Checkpoint {
            location,
            files,
            names,
        })
    }

    fn open_sharded(dir: &Path, index: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Index {
            path: index.to_path_buf(),
            reason,
        };
        let text = std::fs::read(index).map_err(|source| Error::Io {
            path: index.to_path_buf(),
            source,
        })?;
        let json: Value = serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no `weight_map` object".into()))?;

        let mut shard_of: HashMap<String, usize> = HashMap::new();
        let mut shard_names: Vec<String> = Vec::new();
        let mut names = HashMap::new();
        for (name, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(format!("shard of `{name}` is not a string")))?;
            // Shards live beside the index: refuse names that would escape the directory.
            let plain = Path::new(shard)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
            if !plain || shard.is_empty() {
                return Err(bad(format!(
                    "shard name `{shard}` is not a file name in the directory"
                )));
            }
            let next = shard_names.len();
            let i = *shard_of.entry(shard.to_string()).or_insert_with(|| {
                shard_names.push(shard.to_string());
                next
            });
            names.insert(name.clone(), i);
        }

        let mut files = Vec::with_capacity(shard_names.len());
        for shard in &shard_names {
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(Error::MissingShard {
                    index: index.to_path_buf(),
                    shard: path,
                });
            }
            files.push(SafetensorsFile::open(path)?);
        }
        Ok(Checkpoint {
            location: dir.to_path_buf(),
            files,
            names,
        })
    }

    /// The directory (or file) this checkpoint was opened from.
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// Every tensor name, in no particular order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// True when the checkpoint has a tensor of this full name.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// The `__metadata__` strings of the file holding `name`, if that tensor exists.
    pub fn metadata_of(&self, name: &str) -> Option<&HashMap<String, String>> {
        self.names.get(name).map(|&i| &self.files[i].header().metadata)
    }

    /// A view of the names under `prefix` (`"model.layers.3.self_attn"`).
    pub fn scope(&self, prefix: &str) -> Scope<'_> {
        Scope {
            ckpt: self,
            prefix: prefix.to_string(),
        }
    }

    /// The root scope (no prefix).
    pub fn root(&self) -> Scope<'_> {
        self.scope("")
    }

    /// Shape, dtype and file of a tensor by full name.
    fn find(&self, name: &str) -> Result<(&SafetensorsFile, &crate::safetensors::TensorInfo)> {
        let missing = |path: &Path| Error::MissingTensor {
            name: name.to_string(),
            path: path.to_path_buf(),
        };
        let &i = self.names.get(name).ok_or_else(|| missing(&self.location))?;
        let file = &self.files[i];
        // The index may name a shard that does not hold the tensor.
        let info = file.info(name).ok_or_else(|| missing(file.path()))?;
        Ok((file, info))
    }

    /// The stored shape of a tensor by full name.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.find(name)?.1.shape)
    }

    /// The elements of a tensor by full name, checked against `expected` shape.
    pub fn data(&self, name: &str, expected: &[usize]) -> Result<WeightData> {
        let (file, info) = self.find(name)?;
        if info.shape != expected {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                path: file.path().to_path_buf(),
                expected: expected.to_vec(),
                got: info.shape.clone(),
            });
        }
        file.data(name)
    }
}

/// Names under a prefix of a [`Checkpoint`]; look-ups check shape and dtype and name the full
/// tensor and its file in errors.
#[derive(Clone)]
pub struct Scope<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
}

impl<'a> Scope<'a> {
    /// The full name of `name` under this scope.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A nested scope: `scope("model").scope("layers.0")` is `model.layers.0`.
    pub fn scope(&self, sub: &str) -> Scope<'a> {
        Scope {
            ckpt: self.ckpt,
            prefix: self.name(sub),
        }
    }

    /// The checkpoint this scope belongs to.
    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.ckpt
    }

    /// True when the tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(&self.name(name))
    }

    /// A linear layer's weight stored `[out, in]` (PyTorch `nn.Linear`).
    pub fn weight(&self, name: &str, [out_features, in_features]: [usize; 2]) -> Result<Weight> {
        let data = self.ckpt.data(&self.name(name), &[out_features, in_features])?;
        Weight::new(data, Layout::OutIn, out_features, in_features)
    }

    /// A weight stored `[in, out]` and applied as `x · W`.
    pub fn weight_in_out(&self, name: &str, [in_features, out_features]: [usize; 2]) -> Result<Weight> {
        let data = self.ckpt.data(&self.name(name), &[in_features, out_features])?;
        Weight::new(data, Layout::InOut, out_features, in_features)
    }

    /// A batch of weights stored `[batch, in, out]` (the expert tensors).
    pub fn batched_in_out(
        &self,
        name: &str,
        [batch, in_features, out_features]: [usize; 3],
    ) -> Result<BatchedWeight> {
        let data = self
            .ckpt
            .data(&self.name(name), &[batch, in_features, out_features])?;
        BatchedWeight::new(data, Layout::InOut, batch, out_features, in_features)
    }

    /// A tensor of any shape converted to f32 (norm weights, embeddings of small models, …).
    pub fn array(&self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        let data = self.ckpt.data(&self.name(name), shape)?;
        // The header check makes this infallible; an error rather than a panic all the same.
        ArrayD::from_shape_vec(IxDyn(shape), data.to_f32_vec())
            .map_err(|e| Error::shape("Scope::array", format!("`{}`: {e}", self.name(name))))
    }

    /// A 1-D tensor converted to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Array1<f32>> {
        let data = self.ckpt.data(&self.name(name), &[len])?;
        Ok(Array1::from_vec(data.to_f32_vec()))
    }

    /// Like [`Scope::weight`], but only if stored in one of `dtypes`.
    pub fn weight_of(&self, name: &str, shape: [usize; 2], dtypes: &[DType]) -> Result<Weight> {
        let w = self.weight(name, shape)?;
        match w.dtype() {
            Some(d) if dtypes.contains(&d) => Ok(w),
            Some(got) => {
                let full = self.name(name);
                let (file, _) = self.ckpt.find(&full)?;
                Err(Error::DtypeMismatch {
                    name: full,
                    path: file.path().to_path_buf(),
                    got,
                })
            }
            None => Err(Error::Quant(format!(
                "`{}` is quantised; it must be stored as one of {dtypes:?}",
                self.name(name)
            ))),
        }
    }
}
