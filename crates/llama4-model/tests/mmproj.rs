//! A multimodal model whose vision tower and projector come from a llama.cpp projector GGUF
//! (`fixtures/gguf/mmproj-multimodal-F32.gguf`, converted from the tiny multimodal fixture by
//! `tools/llamacpp/make_mmproj_fixture.py`): what `generate --model FILE.gguf --mmproj FILE`
//! runs. Its generation equals the safetensors model's and transformers'.

use std::ops::ControlFlow;
use std::sync::Arc;

use llama4_core::DType;
use llama4_model::vision_encoder::{Mmproj, ProcessorConfig};
use llama4_model::{
    Error, GenerateOptions, ImageTokenIds, MultimodalModel, SamplingConfig, Session, TextModel, Tokenizer,
};

mod common;
use common::{ids, matrix, rel_err};

fn mmproj() -> Mmproj {
    Mmproj::load(llama4_testkit::fixture("gguf/mmproj-multimodal-F32.gguf")).unwrap()
}

/// Greedy generation of `n` tokens after `prompt` with `images`: the expanded prompt ids, the
/// generated ids and the logits that chose them.
fn greedy(
    model: &MultimodalModel,
    prompt: &[u32],
    images: &[std::path::PathBuf],
    n: usize,
) -> (Vec<u32>, Vec<u32>, ndarray::Array2<f32>) {
    let encoded: Vec<_> = images
        .iter()
        .map(|f| model.encode_image_file(f).unwrap())
        .collect();
    let prepared = model.prepare(prompt, &encoded).unwrap();
    let options = GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingConfig::greedy(),
        stop_ids: vec![],
        keep_logits: true,
    };
    let mut session = Session::new(model.text(), DType::F32).unwrap();
    let g = session
        .generate_with_embeddings(&prepared.ids, prepared.embeddings, &options, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    (prepared.ids, g.generated_ids, g.logits.unwrap())
}

#[test]
fn a_gguf_projector_generates_as_the_safetensors_tower_does() {
    let dir = common::fixture_dir("multimodal");
    let tok = Tokenizer::from_dir(&dir).unwrap().unwrap();
    let token_ids = ImageTokenIds::from_tokenizer(&tok).unwrap();
    let mut m = mmproj();
    // The projector file does not record the processor's tile limit; the fixture's reference
    // was made with 6, so the test takes the checkpoint's processor settings.
    let fixture_processor = ProcessorConfig::from_dir(&dir).unwrap();
    assert_eq!(m.processor.tile_size, fixture_processor.tile_size);
    m.processor = fixture_processor;
    let text = Arc::new(TextModel::load(&dir).unwrap());
    let from_gguf = MultimodalModel::from_parts(text, m, token_ids).unwrap();
    let from_safetensors = MultimodalModel::load(&dir).unwrap();

    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let images: Vec<_> = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| dir.join(v.as_str().unwrap()))
        .collect();
    let prompt = tok.encode(meta["prompt"].as_str().unwrap()).unwrap();
    let generated = ids(&st, "generated_ids");
    let run = |model: &MultimodalModel| greedy(model, &prompt, &images, generated.len());
    let (gguf_ids, gguf_generated, gguf_logits) = run(&from_gguf);
    let (st_ids, st_generated, st_logits) = run(&from_safetensors);
    assert_eq!(gguf_ids, st_ids);
    assert_eq!(gguf_ids, ids(&st, "input_ids"));
    assert_eq!(gguf_generated, st_generated);
    assert_eq!(gguf_generated, generated);
    // Same weights, same f32 arithmetic: equal to rounding.
    let same = rel_err(gguf_logits.view(), st_logits.view());
    assert!(same < 1e-6, "GGUF vs safetensors tower: logits off by {same:e}");
    let reference = rel_err(gguf_logits.view(), matrix(&st, "step_logits").view());
    assert!(reference < 1e-4, "vs transformers: logits off by {reference:e}");
}

#[test]
fn a_projector_for_another_model_is_refused() {
    // The GGUF text fixture has hidden size 32; the projector outputs 64.
    let text = TextModel::load_gguf(llama4_testkit::fixture("gguf/tiny-F32.gguf")).unwrap();
    let dir = common::fixture_dir("multimodal");
    let ids = ImageTokenIds::from_tokenizer(&Tokenizer::from_dir(&dir).unwrap().unwrap()).unwrap();
    match MultimodalModel::from_parts(Arc::new(text), mmproj(), ids) {
        Err(Error::Config { field, reason }) => {
            assert_eq!(field, "mm.model.fc.weight");
            assert!(reason.contains("64") && reason.contains("32"), "{reason}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

/// `fixtures/gguf/mm-e2e` (tools/llamacpp/make_mmproj_e2e_fixture.py): a text GGUF and its
/// projector GGUF, both written by llama.cpp's converter from one random multimodal Llama 4,
/// and transformers' greedy generation on a prompt with two images. Loaded as
/// `generate --model text-F32.gguf --mmproj mmproj-F32.gguf --image wide.png --image small.png`
/// loads them.
#[test]
fn a_gguf_model_with_its_projector_generates_as_transformers() {
    let dir = llama4_testkit::fixture("gguf/mm-e2e");
    let g = llama4_model::GgufModel::load(dir.join("text-F32.gguf")).unwrap();
    let tok = g.tokenizer.unwrap().tokenizer;
    let token_ids = ImageTokenIds::from_tokenizer(&tok).unwrap();
    let m = Mmproj::load(dir.join("mmproj-F32.gguf")).unwrap();
    let model = MultimodalModel::from_parts(Arc::new(g.model), m, token_ids).unwrap();

    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("prompt.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // The GGUF tokenizer gives the Hugging Face tokenizer's ids.
    let prompt = tok.encode(meta["prompt"].as_str().unwrap()).unwrap();
    assert_eq!(prompt, ids(&st, "prompt_ids"));
    let images: Vec<_> = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| common::fixture_dir("multimodal").join(v.as_str().unwrap()))
        .collect();
    let generated = ids(&st, "generated_ids");
    let (input_ids, got, logits) = greedy(&model, &prompt, &images, generated.len());
    assert_eq!(input_ids, ids(&st, "input_ids"));
    assert_eq!(got, generated);
    let err = rel_err(logits.view(), matrix(&st, "step_logits").view());
    assert!(err < 1e-4, "vs transformers: logits off by {err:e}");
    eprintln!("GGUF text + projector vs transformers: {err:.2e}");
}
