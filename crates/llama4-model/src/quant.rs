//! Writing quantised checkpoints.
//!
//! [`quantize_checkpoint`] reads a float checkpoint and writes one `model.safetensors` in which
//! every tensor `N` a [`QuantPolicy`] selects is replaced by `N.qweight` and `N.qscale` (the
//! encoding of [`llama4_core::quant`]), with `__metadata__` entry
//! [`METADATA_KEY`] = `{"format":"q4","group":128,"scales":"f32"}`. Everything else is copied
//! byte for byte, fp8 tensors of a Meta FP8 checkpoint included. Loading the result ([`crate::TextModel::load`]) maps the stored integers
//! without requantising, and gives weights bit-identical to quantising the source at load time
//! with the same policy ([`crate::TextModel::load_with_quantization`]): both go through the same
//! [`Scope`](llama4_core::Scope) look-up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llama4_core::quant::{QuantTarget, METADATA_KEY, QSCALE_SUFFIX, QWEIGHT_SUFFIX};
use llama4_core::safetensors;
use llama4_core::{
    Checkpoint, QuantData, QuantPolicy, QuantScope, QuantSpec, Scales, TensorRole, WeightData,
};

use crate::{Error, Result, SharedProgress};

/// A load-time quantisation policy for Llama 4 checkpoints: `scope` of the tensors
/// [`tensor_role`] names, quantised with `spec`.
pub fn quant_policy(spec: QuantSpec, scope: QuantScope) -> QuantPolicy {
    QuantPolicy::new(spec, scope, tensor_role)
}

/// What a tensor of a Llama 4 checkpoint (Hugging Face names, text-only or multimodal) is, for
/// quantisation: the fused experts (`…feed_forward.experts.{gate_up_proj,down_proj}`), a
/// projection of the text decoder (`…{q,k,v,o,gate,up,down}_proj.weight`, `lm_head.weight`:
/// attention, shared expert, dense MLPs), or anything else: the token embedding, norms, the
/// router (tiny, and routing decisions are sensitive), the vision tower and projector.
pub fn tensor_role(name: &str) -> TensorRole {
    let is_vision = name
        .split('.')
        .any(|c| c == "vision_model" || c == "multi_modal_projector");
    let mut last = name.rsplit('.');
    let (a, b) = (last.next(), last.next());
    if is_vision {
        TensorRole::Other
    } else if matches!(a, Some("gate_up_proj" | "down_proj")) && b == Some("experts") {
        TensorRole::Experts
    } else if a == Some("weight")
        && matches!(
            b,
            Some(
                "q_proj" | "k_proj" | "v_proj" | "o_proj" | "gate_proj" | "up_proj" | "down_proj" | "lm_head"
            )
        )
    {
        TensorRole::Projection
    } else {
        TensorRole::Other
    }
}

/// The metadata key naming the policy's scope (`experts` or `all-linear`), for people reading
/// the file; loading does not need it.
pub const SCOPE_METADATA_KEY: &str = "llama4.quant.scope";

/// What [`quantize_checkpoint`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizeSummary {
    /// The file written (`dst/model.safetensors`).
    pub path: PathBuf,
    /// Tensors replaced by `.qweight` + `.qscale`.
    pub quantized: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Bytes of the source tensors.
    pub bytes_in: u64,
    /// Bytes of the tensors written.
    pub bytes_out: u64,
    /// Other files copied beside it (config.json, tokenizer files, …).
    pub files_copied: Vec<String>,
}

/// Where the bytes of one output tensor come from.
enum Source {
    /// A source tensor, unchanged.
    Copy(String),
    /// The integers of quantised source tensor `N`.
    Values(String),
    /// The scales of quantised source tensor `N`.
    Scales(String),
}

/// How a source tensor selected by the policy is laid out: `(lead, out, in)`.
fn quant_dims(target: QuantTarget, shape: &[usize]) -> Option<(Vec<usize>, usize, usize)> {
    match (target, shape) {
        (QuantTarget::Linear, &[out, inp]) => Some((vec![], out, inp)),
        (QuantTarget::Experts, &[e, inp, out]) => Some((vec![e], out, inp)),
        _ => None,
    }
}

/// Quantises the checkpoint at `src` (a directory or one `.safetensors` file) with `policy` and
/// writes `dst/model.safetensors`, copying the directory's other files (config.json, tokenizer
/// and generation configs, …) beside it.
///
/// Tensors are streamed: one is quantised at a time, through the same look-up that load-time
/// quantisation uses, so the stored bytes are exactly those a model loaded with
/// [`crate::TextModel::load_with_quantization`] holds. Tensors are written widest element first
/// so every one stays aligned for zero-copy mapping.
///
/// # Errors
/// [`Error::QuantizeCheckpoint`] when the source already holds quantised tensors or `dst` is
/// the source directory; [`llama4_core::Error::Quant`] naming the tensor when a selected weight's
/// input width is not whole groups (checked before anything is written); file errors.
pub fn quantize_checkpoint(
    src: impl AsRef<Path>,
    dst: impl AsRef<Path>,
    policy: &QuantPolicy,
) -> Result<QuantizeSummary> {
    quantize_checkpoint_with_progress(src, dst, policy, None)
}

/// [`quantize_checkpoint`] with `progress` told, after each tensor written, the source bytes
/// done out of the source checkpoint's total (see [`llama4_core::progress`]).
pub fn quantize_checkpoint_with_progress(
    src: impl AsRef<Path>,
    dst: impl AsRef<Path>,
    policy: &QuantPolicy,
    progress: Option<SharedProgress>,
) -> Result<QuantizeSummary> {
    let (src, dst) = (src.as_ref(), dst.as_ref());
    let ckpt = Checkpoint::open(src)?.with_quantization(Some(*policy));
    let src_dir = if src.is_file() {
        src.parent().map(Path::to_path_buf)
    } else {
        Some(src.to_path_buf())
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    if let Some(dir) = &src_dir {
        let same =
            std::fs::canonicalize(dir).map_err(io(dir))? == std::fs::canonicalize(dst).map_err(io(dst))?;
        if same {
            return Err(Error::QuantizeCheckpoint {
                path: dst.to_path_buf(),
                reason: "the destination is the source directory".into(),
            });
        }
    }

    let mut names: Vec<&str> = ckpt.tensor_names().collect();
    names.sort_unstable();
    let (entries, sources, metadata, quantized) = plan(&ckpt, &names, policy)?;
    let mut out = safetensors::Writer::create(dst.join("model.safetensors"), &entries, &metadata)?;
    // Where each source tensor's output entries are: a quantised one's values and scales.
    let at: BTreeMap<(&str, u8), usize> = sources
        .iter()
        .enumerate()
        .map(|(i, source)| match source {
            Source::Copy(n) => ((n.as_str(), 0), i),
            Source::Values(n) => ((n.as_str(), 1), i),
            Source::Scales(n) => ((n.as_str(), 2), i),
        })
        .collect();
    let total = names
        .iter()
        .map(|&n| ckpt.raw_bytes(n).map(|b| b.len() as u64))
        .sum::<std::result::Result<u64, _>>()?;
    let mut bytes_in = 0u64;
    for &name in &names {
        if let Some(p) = &progress {
            // Reported before the tensor too, so a long quantisation shows where it is.
            p.update(bytes_in, total);
        }
        bytes_in += ckpt.raw_bytes(name)?.len() as u64;
        if let Some(&i) = at.get(&(name, 0)) {
            out.write(i, ckpt.raw_bytes(name)?)?;
            continue;
        }
        let q = quantized_data(&ckpt, name, policy)?;
        let (Some(&values), Some(&scales)) = (at.get(&(name, 1)), at.get(&(name, 2))) else {
            return Err(internal(name));
        };
        out.write(values, q.values())?;
        out.write(scales, &scale_bytes(q.scales()))?;
    }
    if let Some(p) = &progress {
        p.update(total, total);
    }
    let bytes_out = out.data_len() as u64;
    let path = out.finish()?;

    let mut files_copied = Vec::new();
    if let Some(dir) = &src_dir {
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let from = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
            if from.is_file() && !is_weights {
                std::fs::copy(&from, dst.join(&name)).map_err(io(&from))?;
                files_copied.push(name);
            }
        }
    }
    files_copied.sort();
    Ok(QuantizeSummary {
        path,
        quantized,
        copied: names.len() - quantized,
        bytes_in,
        bytes_out,
        files_copied,
    })
}

/// The output tensors in write order, the file's metadata, and how many tensors are quantised.
/// The output tensors with where each one's bytes come from, the file's metadata, and how many
/// tensors are quantised. Checks every selected tensor before anything is written.
fn plan(ckpt: &Checkpoint, names: &[&str], policy: &QuantPolicy) -> Result<Plan> {
    let spec = policy.spec;
    let (mut entries, mut sources) = (Vec::new(), Vec::new());
    let mut metadata = BTreeMap::new();
    let mut quantized = 0;
    for &name in names {
        if name.ends_with(QWEIGHT_SUFFIX) || name.ends_with(QSCALE_SUFFIX) {
            return Err(Error::QuantizeCheckpoint {
                path: ckpt.location().to_path_buf(),
                reason: format!("`{name}` is already quantised"),
            });
        }
        if let Some(meta) = ckpt.metadata_of(name) {
            for (k, v) in meta {
                metadata.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let info = ckpt.info(name)?;
        // fp8 tensors of a Meta FP8 checkpoint are already quantised: copied as they are (with
        // their `_scale` siblings, which no policy selects) and read as fp8 again at load.
        let dims = policy
            .selects(name)
            .filter(|_| info.dtype != "F8_E4M3")
            .and_then(|target| quant_dims(target, &info.shape));
        let Some((lead, out, inp)) = dims else {
            entries.push(safetensors::Entry {
                name: name.to_string(),
                dtype: info.dtype.clone(),
                shape: info.shape.clone(),
            });
            sources.push(Source::Copy(name.to_string()));
            continue;
        };
        spec.check(inp).map_err(|e| match e {
            llama4_core::Error::Quant(reason) => llama4_core::Error::Quant(format!("`{name}`: {reason}")),
            e => e,
        })?;
        quantized += 1;
        let shape = |last: usize| lead.iter().copied().chain([out, last]).collect::<Vec<_>>();
        entries.push(safetensors::Entry {
            name: format!("{name}{QWEIGHT_SUFFIX}"),
            dtype: spec.format.safetensors_dtype().into(),
            shape: shape(spec.format.value_bytes(inp)),
        });
        sources.push(Source::Values(name.to_string()));
        entries.push(safetensors::Entry {
            name: format!("{name}{QSCALE_SUFFIX}"),
            dtype: spec.scales.name().to_uppercase(),
            shape: shape(inp / spec.group_for(inp)),
        });
        sources.push(Source::Scales(name.to_string()));
    }
    metadata.insert(METADATA_KEY.to_string(), spec.to_metadata());
    metadata.insert(SCOPE_METADATA_KEY.to_string(), policy.scope.name().to_string());
    Ok((entries, sources, metadata, quantized))
}

/// What [`plan`] gives: output entries, the source of each, metadata, tensors quantised.
type Plan = (
    Vec<safetensors::Entry>,
    Vec<Source>,
    BTreeMap<String, String>,
    usize,
);

/// Tensor `name` quantised by the look-up a model load uses.
fn quantized_data(ckpt: &Checkpoint, name: &str, policy: &QuantPolicy) -> Result<QuantData> {
    let info = ckpt.info(name)?;
    let root = ckpt.root();
    let data = match (policy.selects(name), info.shape.as_slice()) {
        (Some(QuantTarget::Linear), &[out, inp]) => root.weight(name, [out, inp])?.data().clone(),
        (Some(QuantTarget::Experts), &[e, inp, out]) => {
            root.batched_in_out(name, [e, inp, out])?.data().clone()
        }
        _ => return Err(internal(name)),
    };
    match data {
        WeightData::Quant(q) => Ok(*q),
        _ => Err(internal(name)),
    }
}

/// The plan and the look-up disagree about `name` (a bug here, not bad input).
fn internal(name: &str) -> Error {
    Error::QuantizeCheckpoint {
        path: PathBuf::from(name),
        reason: "internal error: the plan and the load-time policy disagree about this tensor".into(),
    }
}

/// Scales as little-endian bytes.
fn scale_bytes(scales: &Scales) -> Vec<u8> {
    match scales {
        Scales::F32(b) => b.iter().flat_map(|s| s.to_le_bytes()).collect(),
        Scales::F16(b) => b.iter().flat_map(|s| s.to_bits().to_le_bytes()).collect(),
    }
}
