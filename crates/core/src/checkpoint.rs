//! A checkpoint directory in Hugging Face layout, with look-up by scoped names.
//!
//! # Quantised weights
//! A weight `N` may be stored quantised, as `N.qweight` and `N.qscale` (see
//! [`crate::quant`] for the encoding) with the file's `__metadata__` entry
//! [`METADATA_KEY`](crate::quant::METADATA_KEY) giving format, group size and scale type. The
//! look-ups ([`Scope::weight`], [`Scope::weight_in_out`], [`Scope::batched_in_out`]) load such a
//! pair when `N` itself is absent, checked against the metadata and the shape asked for, and
//! return a quantised [`Weight`] (always [`Layout::OutIn`]) borrowing the memory map.
//!
//! A [`QuantPolicy`] set with [`Checkpoint::set_quantization`] quantises the float weights it
//! selects as they are looked up, so layer code does not change. Weights stored quantised are
//! used as stored: they are never requantised, whatever the policy says.
//!
//! # fp8 checkpoints
//! Meta's FP8 checkpoints (transformers' `fbgemm_fp8`) store a converted weight `N` as
//! `F8_E4M3` with a sibling `N_scale` holding one scale per output: `[out, 1]` for an
//! `nn.Linear` weight `[out, in]`, `[E, 1, out]` or `[E, out, 1]` for an expert tensor
//! `[E, in, out]`. A look-up that finds `N` stored as `F8_E4M3` returns an fp8 [`QuantData`]
//! (see [`crate::quant`]): an `[out, in]` weight borrows the map; an `[in, out]` one is
//! transposed once, one matrix at a time, into owned bytes (1 byte per weight). Scales may be
//! F32 (as fbgemm writes them), BF16 or F16; fp8 is recognised by dtype, whatever the config's
//! module lists say.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::{Array1, ArrayD, IxDyn};
use serde_json::Value;

use crate::input::{probe, read_capped, Cap, Probe};
use crate::progress::{ProgressCounter, SharedProgress};
use crate::quant::{QuantData, QuantFormat, QuantPolicy, QuantSpec, QuantTarget, ScaleType, Scales};
use crate::quant::{FP8_SCALE_SUFFIX, METADATA_KEY, QSCALE_SUFFIX, QWEIGHT_SUFFIX};
use crate::safetensors::{SafetensorsFile, TensorInfo};
use crate::{BatchedWeight, DType, Error, Layout, Result, Weight, WeightData};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// The tensors of a checkpoint: one `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists. Every file is memory-mapped; nothing is read until a
/// weight is used, unless the files are copied ([`Checkpoint::copy_to_huge_pages`]).
pub struct Checkpoint {
    location: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    names: HashMap<String, usize>,
    /// Load-time quantisation of float weights.
    quant: Option<QuantPolicy>,
    /// Bytes of the weights handed out by look-ups (as stored, after any quantisation).
    weight_bytes: AtomicUsize,
    /// Weights handed out quantised (stored so, or quantised by the policy).
    quantized_weights: AtomicUsize,
    /// Stored bytes of the tensors handed out, for a load-progress observer.
    progress: ProgressCounter,
}

impl Checkpoint {
    /// Opens a checkpoint directory, or a single `.safetensors` file.
    ///
    /// # Errors
    /// [`Error::NoCheckpoint`] when the directory holds neither file; [`Error::NotRegularFile`]
    /// when `path`, `model.safetensors`, the index or a shard is a FIFO, device, directory or
    /// unfollowable link (such a file is there, so it is not reported missing).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        match probe(path)? {
            Probe::File(_) => {
                return Self::from_files(path.to_path_buf(), vec![SafetensorsFile::open(path)?])
            }
            Probe::Dir => {}
            Probe::Absent => {
                return Err(Error::NoCheckpoint {
                    dir: path.to_path_buf(),
                })
            }
        }
        let single = path.join(SINGLE_FILE);
        if present(&single)? {
            return Self::from_files(path.to_path_buf(), vec![SafetensorsFile::open(single)?]);
        }
        let index = path.join(INDEX_FILE);
        if present(&index)? {
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
        Ok(Checkpoint::assemble(location, files, names))
    }

    fn open_sharded(dir: &Path, index: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Index {
            path: index.to_path_buf(),
            reason,
        };
        let text = read_capped(index, Cap::JSON)?;
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
            if !present(&path)? {
                return Err(Error::MissingShard {
                    index: index.to_path_buf(),
                    shard: path,
                });
            }
            files.push(SafetensorsFile::open(path)?);
        }
        Ok(Checkpoint::assemble(dir.to_path_buf(), files, names))
    }

    fn assemble(location: PathBuf, files: Vec<SafetensorsFile>, names: HashMap<String, usize>) -> Self {
        Checkpoint {
            location,
            files,
            names,
            quant: None,
            weight_bytes: AtomicUsize::new(0),
            quantized_weights: AtomicUsize::new(0),
            progress: ProgressCounter::default(),
        }
    }

    /// Sets (or clears) the load-progress observer: every later look-up reports the stored
    /// bytes of the tensors it used (see [`crate::progress`]), out of the bytes of every tensor
    /// of every file. [`Checkpoint::finish_progress`] reports the load complete.
    pub fn set_progress(&mut self, observer: Option<SharedProgress>) {
        let total = self.stored_bytes_total();
        self.progress = ProgressCounter::new(observer, total);
    }

    /// [`Checkpoint::set_progress`] by value.
    pub fn with_progress(mut self, observer: Option<SharedProgress>) -> Self {
        self.set_progress(observer);
        self
    }

    /// Reports the load complete (`done == total`): the tensors no look-up asked for (another
    /// modality's, or experts another process holds) count as done. Model loaders call it.
    pub fn finish_progress(&self) {
        self.progress.finish();
    }

    /// Bytes of tensor data of every file, as stored.
    fn stored_bytes_total(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.header().tensors.values())
            .map(|t| (t.data_offsets.1 - t.data_offsets.0) as u64)
            .sum()
    }

    /// Reports tensor `full` loaded: the stored bytes of it or of the tensors it was made from
    /// (`.qweight` and `.qscale`, an fp8 `_scale`), `part.0` of `part.1` matrices of them.
    fn report_loaded(&self, full: &str, (part, of): (usize, usize)) {
        let stored: u64 = [
            full.to_string(),
            format!("{full}{QWEIGHT_SUFFIX}"),
            format!("{full}{QSCALE_SUFFIX}"),
            format!("{full}{FP8_SCALE_SUFFIX}"),
        ]
        .iter()
        .filter_map(|n| self.find(n).ok())
        .map(|(_, t)| (t.data_offsets.1 - t.data_offsets.0) as u64)
        .sum();
        let bytes = if of == 0 {
            stored
        } else {
            (stored as u128 * part as u128 / of as u128) as u64
        };
        self.progress.add(bytes);
    }

    /// Sets (or clears) the load-time quantisation of float weights: every later
    /// [`Scope::weight`], [`Scope::weight_in_out`] or [`Scope::batched_in_out`] of a tensor the
    /// policy selects ([`QuantPolicy::selects`]) returns it quantised with the policy's spec.
    ///
    /// Weights stored quantised (`N.qweight` + `N.qscale`) are returned as stored whatever the
    /// policy: a pre-quantised checkpoint is never requantised.
    pub fn set_quantization(&mut self, policy: Option<QuantPolicy>) {
        self.quant = policy;
    }

    /// [`Checkpoint::set_quantization`] by value.
    pub fn with_quantization(mut self, policy: Option<QuantPolicy>) -> Self {
        self.set_quantization(policy);
        self
    }

    /// Copies every file into anonymous memory backed by 2 MiB pages when the whole checkpoint
    /// fits in half of the memory this process can have (`MemAvailable`, a cgroup's limit), is
    /// not quantised at load, holds no fp8 tensor (fp8 experts are transposed into memory of
    /// their own at load, so a copy would hold them twice), and the kernel offers transparent
    /// huge pages (`LLAMA4_WEIGHTS=mapped` keeps the files mapped); reports whether every file
    /// is copied. Call it before loading tensors (those loaded before keep reading the file)
    /// and before setting a quantisation policy.
    ///
    /// A decode step streams each weight it uses once, and with a file map's 4 KiB pages each
    /// 4 KiB needs its own TLB entry and page walk. Measured on bench-mid (bf16, 1.4 GB),
    /// 8-stream decode steps, builds alternated (AMD EPYC Zen 5, 2 cores, a virtual machine):
    /// median ratios of step times, copied / mapped, 0.863, 0.871 and 0.907 over sets of 8-10
    /// pairs; one stream 0.737. The copy replaces the prefault of
    /// [`Checkpoint::populate_resident_pages`] (both read the whole file); a file whose copy
    /// fails stays mapped.
    pub fn copy_to_huge_pages(&mut self) -> bool {
        let total: u64 = self.files.iter().map(SafetensorsFile::file_len).sum();
        let fp8 = |f: &SafetensorsFile| f.header().tensors.values().any(|t| t.dtype == "F8_E4M3");
        if self.quant.is_some() || self.files.iter().any(fp8) || !crate::buffer::may_copy_to_huge_pages(total)
        {
            return false;
        }
        // Files copied before a failure stay copied; the answer is whether all were.
        for f in &mut self.files {
            if f.copy_to_huge_pages().is_err() {
                break;
            }
        }
        self.in_huge_pages()
    }

    /// Whether [`Checkpoint::copy_to_huge_pages`] copied every file.
    pub fn in_huge_pages(&self) -> bool {
        self.files.iter().all(SafetensorsFile::is_copied)
    }

    /// Prefaults the pages of every file when the whole checkpoint fits in half of this
    /// machine's memory and is not quantised at load, and reports whether it did. Faulting them
    /// in 4 KiB at a time during the first forward pass cost 7% of a 512-token prefill of
    /// bench-mid (786 MB as Q8_0). A checkpoint larger than memory is left to fault in what runs
    /// (a token reads only its experts); a quantised one no longer reads its float originals.
    pub fn populate_resident_pages(&self) -> bool {
        let total: u64 = self.files.iter().map(SafetensorsFile::file_len).sum();
        let fits = self.quant.is_none() && crate::buffer::fits_in_memory(total);
        if fits {
            for f in &self.files {
                f.populate_resident_pages();
            }
        }
        fits
    }

    /// Drops the mapped files' pages from the resident set. After load-time quantisation the
    /// float originals were read once and are not needed again; weights still used from the map
    /// fault back in from the page cache.
    pub fn release_resident_pages(&self) {
        for f in &self.files {
            f.release_resident_pages();
        }
    }

    /// Drops the resident pages of tensor `name` (its float original after quantising it).
    fn release_tensor_pages(&self, name: &str) {
        if let Ok((file, _)) = self.find(name) {
            file.release_tensor_pages(name);
        }
    }

    /// The load-time quantisation, if any.
    pub fn quantization(&self) -> Option<QuantPolicy> {
        self.quant
    }

    /// Bytes of every weight the look-ups have returned so far, as held in memory or in the
    /// map (quantised weights count their values and scales).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes.load(Ordering::Relaxed)
    }

    /// How many of the weights returned so far were quantised (stored so, or by the policy).
    pub fn quantized_weights(&self) -> usize {
        self.quantized_weights.load(Ordering::Relaxed)
    }

    /// Records a weight handed out.
    fn account(&self, nbytes: usize, quantized: bool) {
        self.weight_bytes.fetch_add(nbytes, Ordering::Relaxed);
        if quantized {
            self.quantized_weights.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The directory (or file) this checkpoint was opened from.
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// Every tensor name, in no particular order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// True when the checkpoint has a tensor of exactly this full name (a quantised `N` is
    /// stored as `N.qweight` and `N.qscale`: see [`Checkpoint::is_stored_quantized`]).
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// True when `name` is stored quantised (`name.qweight` exists and `name` does not).
    pub fn is_stored_quantized(&self, name: &str) -> bool {
        !self.contains(name) && self.contains(&format!("{name}{QWEIGHT_SUFFIX}"))
    }

    /// The header entry (dtype, shape, offsets) of a tensor by full name.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        Ok(self.find(name)?.1)
    }

    /// The bytes of a tensor exactly as stored (to copy it unchanged).
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8]> {
        self.find(name)?.0.raw_bytes(name)
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

    /// The file holding tensor `name`.
    pub(crate) fn file_of(&self, name: &str) -> Result<&Path> {
        Ok(self.find(name)?.0.path())
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

    /// The quantisation spec in the `__metadata__` of the file holding tensor `stored`, the
    /// `.qweight` or `.qscale` of quantised tensor `name`.
    fn file_spec(&self, name: &str, stored: &str) -> Result<(QuantSpec, &Path)> {
        let (file, _) = self.find(stored)?;
        let bad = |reason: String| Error::QuantTensor {
            name: name.to_string(),
            path: file.path().to_path_buf(),
            reason,
        };
        let meta = file
            .header()
            .metadata
            .get(METADATA_KEY)
            .ok_or_else(|| bad(format!("the file has no `{METADATA_KEY}` metadata")))?;
        let spec = QuantSpec::from_metadata(meta).map_err(|e| bad(e.to_string()))?;
        Ok((spec, file.path()))
    }

    /// The stored quantisation of `name` (from `name.qweight` and `name.qscale`), checked
    /// against the file's metadata and against `lead` batch dimensions of `out × in` matrices:
    /// `qweight` must be `lead + [out, in]` I8 (q8), `lead + [out, in / 2]` U8 (q4) or
    /// `lead + [out, in]` F8_E4M3 (fp8), `qscale` `lead + [out, in / group]` in the metadata's
    /// scale type.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] naming `name.qweight` or `name.qscale` when one is absent,
    /// [`Error::ShapeMismatch`] naming it when its shape is wrong, [`Error::QuantTensor`] when the
    /// metadata is missing or malformed, a dtype disagrees with it, or `in` is not whole groups.
    pub fn stored_quant(&self, name: &str, lead: &[usize], out: usize, inp: usize) -> Result<QuantData> {
        let qw = format!("{name}{QWEIGHT_SUFFIX}");
        let qs = format!("{name}{QSCALE_SUFFIX}");
        let (wfile, winfo) = self.find(&qw)?;
        let (sfile, sinfo) = self.find(&qs)?;
        let (spec, path) = self.file_spec(name, &qw)?;
        let bad = |path: &Path, reason: String| Error::QuantTensor {
            name: name.to_string(),
            path: path.to_path_buf(),
            reason,
        };
        if sfile.path() != path {
            let (other, _) = self.file_spec(name, &qs)?;
            if other != spec {
                return Err(bad(
                    sfile.path(),
                    format!("metadata {other:?} differs from {spec:?} of the qweight's file"),
                ));
            }
        }
        spec.check(inp).map_err(|e| bad(path, e.to_string()))?;
        let group = spec.group_for(inp);
        let (want_w, want_s) = (
            spec.format.safetensors_dtype(),
            match spec.scales {
                ScaleType::F32 => "F32",
                ScaleType::F16 => "F16",
            },
        );
        for (tensor, info, want) in [(&qw, winfo, want_w), (&qs, sinfo, want_s)] {
            if info.dtype != want {
                return Err(bad(
                    path,
                    format!(
                        "`{tensor}` is {}, {} needs {want}",
                        info.dtype,
                        spec.to_metadata()
                    ),
                ));
            }
        }
        let shape = |last: usize| lead.iter().copied().chain([out, last]).collect::<Vec<_>>();
        let checks = [
            (&qw, wfile, winfo, shape(spec.format.value_bytes(inp))),
            (&qs, sfile, sinfo, shape(inp / group)),
        ];
        for (tensor, file, info, expected) in checks {
            if info.shape != expected {
                return Err(Error::ShapeMismatch {
                    name: tensor.clone(),
                    path: file.path().to_path_buf(),
                    expected,
                    got: info.shape.clone(),
                });
            }
        }
        let values = wfile.byte_data(&qw)?;
        let scales = match sfile.data(&qs)? {
            WeightData::F32(b) => Scales::F32(b),
            WeightData::F16(b) => Scales::F16(b),
            _ => return Err(bad(sfile.path(), format!("`{qs}` is not F32 or F16"))),
        };
        QuantData::new(spec.format, group, values, scales).map_err(|e| bad(path, e.to_string()))
    }

    /// The fp8 weight `name` (see the module doc) when it is stored as `F8_E4M3`; `None` when it
    /// is absent or stored otherwise. `lead` batch dimensions of `out × in` matrices stored in
    /// `layout` order; the result is matrices `range` of them (counted over the flattened lead
    /// dimensions), `[range.len(), out, in]`: the others' bytes are not read.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] naming the tensor or its scales when a shape is wrong,
    /// [`Error::QuantTensor`] when the scales are absent or of a dtype other than F32, BF16 or F16.
    fn stored_fp8(
        &self,
        name: &str,
        lead: &[usize],
        out: usize,
        inp: usize,
        layout: Layout,
        range: Range<usize>,
    ) -> Result<Option<QuantData>> {
        let Ok((file, info)) = self.find(name) else {
            return Ok(None);
        };
        if info.dtype != "F8_E4M3" {
            return Ok(None);
        }
        let bad = |reason: String| Error::QuantTensor {
            name: name.to_string(),
            path: file.path().to_path_buf(),
            reason,
        };
        let dims = |a: usize, b: usize| lead.iter().copied().chain([a, b]).collect::<Vec<_>>();
        let (rows, cols) = match layout {
            Layout::OutIn => (out, inp),
            Layout::InOut => (inp, out),
        };
        if info.shape != dims(rows, cols) {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                path: file.path().to_path_buf(),
                expected: dims(rows, cols),
                got: info.shape.clone(),
            });
        }
        let scale_name = format!("{name}{FP8_SCALE_SUFFIX}");
        let Ok((sfile, sinfo)) = self.find(&scale_name) else {
            return Err(bad(format!(
                "an F8_E4M3 tensor needs its per-output scales `{scale_name}`"
            )));
        };
        // One scale per output, as a column (fbgemm's linears and down_proj) or a row (gate_up_proj).
        if sinfo.shape != dims(out, 1) && sinfo.shape != dims(1, out) {
            return Err(Error::ShapeMismatch {
                name: scale_name,
                path: sfile.path().to_path_buf(),
                expected: dims(out, 1),
                got: sinfo.shape.clone(),
            });
        }
        let scales = match sinfo.dtype.as_str() {
            "F32" | "BF16" | "F16" => match sfile.data(&scale_name)? {
                WeightData::F32(b) => Scales::F32(b),
                WeightData::F16(b) => Scales::F16(b),
                // bf16 widens to f32 exactly; scales are few.
                other => Scales::F32(crate::Buffer::from_vec(other.to_f32_vec())),
            },
            other => {
                return Err(bad(format!(
                    "scales `{scale_name}` are {other}; F32, BF16 or F16 expected"
                )))
            }
        };
        let per = rows * cols;
        let mapped = file.byte_data(name)?.slice(range.start * per, range.len() * per);
        let scales = scales.slice(range.start * out, range.len() * out);
        let values = match layout {
            Layout::OutIn => mapped,
            Layout::InOut => {
                let owned = transpose_bytes(&mapped, range.len(), rows, cols);
                drop(mapped);
                // The stored orientation was read once and is not needed again.
                file.release_tensor_pages(name);
                crate::Buffer::from_vec(owned)
            }
        };
        QuantData::new(QuantFormat::F8E4M3, inp, values, scales)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }

    /// The policy's spec if it selects `name` as a `target`.
    fn policy_for(&self, name: &str, target: QuantTarget) -> Option<QuantSpec> {
        let policy = self.quant?;
        (policy.selects(name) == Some(target)).then_some(policy.spec)
    }

    /// Refuses a name stored both as floats and quantised: which one is meant is unclear.
    fn check_not_both(&self, name: &str) -> Result<bool> {
        let quantized = self.contains(&format!("{name}{QWEIGHT_SUFFIX}"));
        if quantized && self.contains(name) {
            let (file, _) = self.find(name)?;
            return Err(Error::QuantTensor {
                name: name.to_string(),
                path: file.path().to_path_buf(),
                reason: format!("stored both as floats and as `{name}{QWEIGHT_SUFFIX}`"),
            });
        }
        Ok(quantized)
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

    /// True when the tensor exists, stored as floats or quantised (`name.qweight`).
    pub fn contains(&self, name: &str) -> bool {
        let full = self.name(name);
        self.ckpt.contains(&full) || self.ckpt.contains(&format!("{full}{QWEIGHT_SUFFIX}"))
    }

    /// A linear layer's weight stored `[out, in]` (PyTorch `nn.Linear`).
    ///
    /// Quantised when stored so or when the checkpoint's [`QuantPolicy`] selects it (see the
    /// module doc); [`Error::Quant`] naming the tensor when its input width is not whole groups.
    pub fn weight(&self, name: &str, shape: [usize; 2]) -> Result<Weight> {
        self.matrix(name, shape, Layout::OutIn)
    }

    /// A weight stored `[in, out]` and applied as `x · W`.
    ///
    /// Quantised like [`Scope::weight`] (then stored `[out, in]`).
    pub fn weight_in_out(&self, name: &str, shape: [usize; 2]) -> Result<Weight> {
        self.matrix(name, shape, Layout::InOut)
    }

    /// A 2-D weight whose `stored` shape is in `layout`'s order.
    fn matrix(&self, name: &str, stored: [usize; 2], layout: Layout) -> Result<Weight> {
        let full = self.name(name);
        let (out, inp) = match layout {
            Layout::OutIn => (stored[0], stored[1]),
            Layout::InOut => (stored[1], stored[0]),
        };
        if self.ckpt.check_not_both(&full)? {
            let q = self.ckpt.stored_quant(&full, &[], out, inp)?;
            let w = Weight::new(WeightData::Quant(Box::new(q)), Layout::OutIn, out, inp)?;
            self.ckpt.account(w.nbytes(), true);
            self.ckpt.report_loaded(&full, (1, 1));
            return Ok(w);
        }
        if let Some(q) = self.ckpt.stored_fp8(&full, &[], out, inp, layout, 0..1)? {
            let w = Weight::new(WeightData::Quant(Box::new(q)), Layout::OutIn, out, inp)?;
            self.ckpt.account(w.nbytes(), true);
            self.ckpt.report_loaded(&full, (1, 1));
            return Ok(w);
        }
        let w = Weight::new(self.ckpt.data(&full, &stored)?, layout, out, inp)?;
        let w = match self.ckpt.policy_for(&full, QuantTarget::Linear) {
            Some(spec) => {
                let q = w.quantized(spec).map_err(|e| name_quant_error(&full, e))?;
                self.ckpt.release_tensor_pages(&full);
                q
            }
            None => w,
        };
        self.ckpt.account(w.nbytes(), w.quant().is_some());
        self.ckpt.report_loaded(&full, (1, 1));
        Ok(w)
    }

    /// A batch of weights stored `[batch, in, out]` (the expert tensors).
    ///
    /// Quantised like [`Scope::weight`] (then stored `[batch, out, in]`).
    pub fn batched_in_out(&self, name: &str, shape: [usize; 3]) -> Result<BatchedWeight> {
        self.batched_in_out_range(name, shape, 0..shape[0])
    }

    /// Matrices `range` of a batch stored `[batch, in, out]`, as a batch of `range.len()`: what
    /// one process of an expert-parallel run holds of an expert tensor. Only their bytes are
    /// used: the other matrices of a mapped tensor are never read, and a load-time quantisation
    /// or an fp8 transpose handles `range` alone. [`Checkpoint::weight_bytes`] counts `range`.
    ///
    /// # Errors
    /// As [`Scope::batched_in_out`], and a shape error when `range` does not lie in `0..batch`.
    pub fn batched_in_out_range(
        &self,
        name: &str,
        [batch, in_features, out_features]: [usize; 3],
        range: Range<usize>,
    ) -> Result<BatchedWeight> {
        let full = self.name(name);
        if range.start > range.end || range.end > batch {
            return Err(Error::shape(
                "Scope::batched_in_out_range",
                format!("matrices {range:?} of `{full}`, which holds {batch}"),
            ));
        }
        let n = range.len();
        if self.ckpt.check_not_both(&full)? {
            let q = self
                .ckpt
                .stored_quant(&full, &[batch], out_features, in_features)?;
            // Whole matrices are whole groups (the group divides `in_features`).
            let per = in_features * out_features;
            let data = WeightData::Quant(Box::new(q.slice(range.start * per, n * per)));
            let w = BatchedWeight::new(data, Layout::OutIn, n, out_features, in_features)?;
            self.ckpt.account(w.data().nbytes(), true);
            self.ckpt.report_loaded(&full, (n, batch));
            return Ok(w);
        }
        let fp8 = self.ckpt.stored_fp8(
            &full,
            &[batch],
            out_features,
            in_features,
            Layout::InOut,
            range.clone(),
        )?;
        if let Some(q) = fp8 {
            let data = WeightData::Quant(Box::new(q));
            let w = BatchedWeight::new(data, Layout::OutIn, n, out_features, in_features)?;
            self.ckpt.account(w.data().nbytes(), true);
            self.ckpt.report_loaded(&full, (n, batch));
            return Ok(w);
        }
        let data = self.ckpt.data(&full, &[batch, in_features, out_features])?;
        let w = BatchedWeight::new(data, Layout::InOut, batch, out_features, in_features)?.narrow(range)?;
        let w = match self.ckpt.policy_for(&full, QuantTarget::Experts) {
            Some(spec) => {
                let q = w.quantized(spec).map_err(|e| name_quant_error(&full, e))?;
                self.ckpt.release_tensor_pages(&full);
                q
            }
            None => w,
        };
        self.ckpt.account(w.data().nbytes(), w.quant().is_some());
        self.ckpt.report_loaded(&full, (n, batch));
        Ok(w)
    }

    /// A tensor of any shape converted to f32 (norm weights, embeddings of small models, …).
    pub fn array(&self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        let data = self.ckpt.data(&self.name(name), shape)?;
        self.ckpt.report_loaded(&self.name(name), (1, 1));
        // The header check makes this infallible; an error rather than a panic all the same.
        ArrayD::from_shape_vec(IxDyn(shape), data.to_f32_vec())
            .map_err(|e| Error::shape("Scope::array", format!("`{}`: {e}", self.name(name))))
    }

    /// A 1-D tensor converted to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Array1<f32>> {
        let data = self.ckpt.data(&self.name(name), &[len])?;
        self.ckpt.report_loaded(&self.name(name), (1, 1));
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

/// True when a regular file is at `path`, false when nothing is; anything else there (a
/// directory, FIFO, device or unfollowable link) is [`Error::NotRegularFile`], not "missing".
fn present(path: &Path) -> Result<bool> {
    match probe(path)? {
        Probe::File(_) => Ok(true),
        Probe::Absent => Ok(false),
        Probe::Dir => Err(Error::NotRegularFile {
            path: path.to_path_buf(),
            what: "a directory".into(),
        }),
    }
}

/// `batch` row-major `rows × cols` byte matrices, each transposed to `cols × rows`. Tiles of
/// 64 × 64 keep both sides in cache; matrices run in parallel.
fn transpose_bytes(src: &[u8], batch: usize, rows: usize, cols: usize) -> Vec<u8> {
    use rayon::prelude::*;
    const TILE: usize = 64;
    let per = rows * cols;
    let mut dst = vec![0u8; batch * per];
    if per == 0 {
        return dst;
    }
    dst.par_chunks_mut(per)
        .zip(src.par_chunks(per))
        .for_each(|(d, s)| {
            for r0 in (0..rows).step_by(TILE) {
                for c0 in (0..cols).step_by(TILE) {
                    for c in c0..(c0 + TILE).min(cols) {
                        for r in r0..(r0 + TILE).min(rows) {
                            d[c * rows + r] = s[r * cols + c];
                        }
                    }
                }
            }
        });
    dst
}

/// Names the tensor in a quantisation error (the quantiser does not know it).
fn name_quant_error(name: &str, e: Error) -> Error {
    match e {
        Error::Quant(reason) => Error::Quant(format!("`{name}`: {reason}")),
        e => e,
    }
}
