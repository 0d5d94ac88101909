//! Load progress: the observer of [`LoadOptions::progress`] / [`GgufModel::load_with_progress`]
//! hears every tensor loaded, in stored bytes, in order, ending at the file's total.

use std::path::Path;
use std::sync::{Arc, Mutex};

use llama4_core::gguf::GgufFile;
use llama4_core::{QuantFormat, QuantScope, QuantSpec, SharedProgress};
use llama4_model::{quant_policy, GgufModel, ImageTokenIds, LoadOptions, MultimodalModel, TextModel};

/// Every `(done, total)` an observer heard.
type Calls = Arc<Mutex<Vec<(u64, u64)>>>;

/// An observer recording every call.
fn recorder() -> (SharedProgress, Calls) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let sink = calls.clone();
    let observer: SharedProgress = Arc::new(move |done, total| sink.lock().unwrap().push((done, total)));
    (observer, calls)
}

/// Bytes of tensor data in a safetensors file, from its own header.
fn safetensors_bytes(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.tensors()
        .values()
        .map(|t| (t.data_offsets.1 - t.data_offsets.0) as u64)
        .sum()
}

/// Monotone, one total throughout, ending at it; and fine-grained: one call per tensor at
/// least (`min_calls`), with intermediate counts strictly between 0 and the total.
fn check(calls: &[(u64, u64)], total: u64, min_calls: usize) {
    assert!(
        calls.len() >= min_calls,
        "{} calls, want at least {min_calls}",
        calls.len()
    );
    assert!(calls.iter().all(|&(_, t)| t == total), "total changed: {calls:?}");
    assert!(
        calls.windows(2).all(|w| w[0].0 <= w[1].0),
        "not monotone: {calls:?}"
    );
    assert_eq!(calls.last().unwrap().0, total);
    let middle = calls.iter().filter(|&&(d, _)| d > 0 && d < total).count();
    assert!(
        middle >= min_calls / 2,
        "only {middle} intermediate counts: {calls:?}"
    );
}

#[test]
fn gguf_progress_is_monotone_and_ends_at_the_file_total() {
    let path = llama4_testkit::fixture("gguf/tiny-Q8_0.gguf");
    let f = GgufFile::open(&path).unwrap();
    let total: u64 = f.header().tensors.iter().map(|t| t.nbytes).sum();
    let tensors = f.header().tensors.len();
    let (observer, calls) = recorder();
    let g = GgufModel::load_with_progress(&path, Some(observer)).unwrap();
    let calls = calls.lock().unwrap();
    // Every tensor of the file is used by the model: one report each, then the final one.
    check(&calls, total, tensors);
    assert_eq!(calls.len(), tensors + 1);
    // The model is the one `load` gives.
    let plain = GgufModel::load(&path).unwrap();
    let ids = [1u32, 20, 300, 7];
    assert_eq!(
        g.model.forward_uncached(&ids).unwrap(),
        plain.model.forward_uncached(&ids).unwrap()
    );
}

#[test]
fn safetensors_progress_counts_load_time_quantisation() {
    let dir = llama4_testkit::fixture("models/scout");
    let total = safetensors_bytes(&dir.join("model.safetensors"));
    let (observer, calls) = recorder();
    let options = LoadOptions {
        quantization: Some(quant_policy(
            QuantSpec::new(QuantFormat::Q8, 32),
            QuantScope::Experts,
        )),
        progress: Some(observer),
    };
    let model = TextModel::load_with_options(&dir, &options).unwrap();
    assert!(model.checkpoint().unwrap().quantized_weights() > 0);
    let calls = calls.lock().unwrap();
    check(&calls, total, 2 * model.config().layers.len());
    // Without an observer nothing changes: the same model as `load_with_quantization`.
    let plain = TextModel::load_with_quantization(&dir, options.quantization).unwrap();
    let ids = [1u32, 5, 9];
    assert_eq!(
        model.forward_uncached(&ids).unwrap(),
        plain.forward_uncached(&ids).unwrap()
    );
}

#[test]
fn multimodal_progress_covers_the_vision_tower_too() {
    let dir = llama4_testkit::fixture("models/multimodal");
    let total = safetensors_bytes(&dir.join("model.safetensors"));
    let tok = llama4_model::Tokenizer::from_dir(&dir).unwrap().unwrap();
    let ids = ImageTokenIds::from_tokenizer(&tok).unwrap();
    let (observer, calls) = recorder();
    let options = LoadOptions {
        quantization: None,
        progress: Some(observer),
    };
    MultimodalModel::load_with_options(&dir, ids, &options).unwrap();
    let calls = calls.lock().unwrap();
    // Every tensor of the checkpoint is used, so the count reaches the total before the final
    // report: no jump at the end.
    check(&calls, total, 20);
    assert_eq!(calls[calls.len() - 2].0, total);
}

#[test]
fn saving_a_quantised_checkpoint_reports_every_source_byte() {
    let dir = llama4_testkit::fixture("models/scout");
    let total = safetensors_bytes(&dir.join("model.safetensors"));
    let out = tempfile::tempdir().unwrap();
    let (observer, calls) = recorder();
    let policy = quant_policy(QuantSpec::new(QuantFormat::Q4, 32), QuantScope::Experts);
    let summary =
        llama4_model::quantize_checkpoint_with_progress(&dir, out.path(), &policy, Some(observer)).unwrap();
    assert!(summary.quantized > 0);
    assert_eq!(summary.bytes_in, total);
    let calls = calls.lock().unwrap();
    check(&calls, total, summary.quantized + summary.copied);
}

#[test]
fn a_projector_gguf_reports_its_tensors() {
    let path = llama4_testkit::fixture("gguf/mmproj-multimodal-F32.gguf");
    let f = GgufFile::open(&path).unwrap();
    let total: u64 = f.header().tensors.iter().map(|t| t.nbytes).sum();
    let (observer, calls) = recorder();
    llama4_model::vision_encoder::Mmproj::load_with_progress(&path, Some(observer)).unwrap();
    let calls = calls.lock().unwrap();
    // Every tensor of the file is the tower's or the projector's.
    check(&calls, total, f.header().tensors.len());
    assert_eq!(calls[calls.len() - 2].0, total);
}

/// Only a load that holds every weight as stored copies the files into huge pages: `load` (when
/// the machine offers them), never a load that quantises, nor the `_moe` loaders whose builder
/// may hold only some experts. Each model gives the same logits whatever the storage.
#[test]
fn only_whole_float_loads_copy_into_huge_pages() {
    let dir = llama4_testkit::fixture("models/scout");
    let offered = std::env::var("LLAMA4_WEIGHTS").is_err()
        && std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|mode| mode.contains("[always]") || mode.contains("[madvise]"));
    let copied = |m: &TextModel| m.checkpoint().unwrap().in_huge_pages();
    let whole = TextModel::load(&dir).unwrap();
    assert_eq!(copied(&whole), offered);
    let mut build = |_: usize, scope: &llama4_core::Scope<'_>, cfg: &moe_router::MoeConfig| {
        Ok(llama4_model::FeedForwardLayer::Moe(Box::new(
            moe_router::Moe::load(scope, cfg)?,
        )))
    };
    let partial = TextModel::load_with_moe(&dir, None, &mut build).unwrap();
    assert!(!copied(&partial));
    let ids = [1u32, 5, 9, 2];
    let logits = |m: &TextModel| m.forward_uncached(&ids).unwrap();
    assert_eq!(logits(&whole), logits(&partial));
    let q8 = quant_policy(QuantSpec::new(QuantFormat::Q8, 32), QuantScope::Experts);
    let quantised = TextModel::load_with_quantization(&dir, Some(q8)).unwrap();
    assert!(!copied(&quantised));
}
