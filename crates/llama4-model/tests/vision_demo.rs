//! The multimodal demo model (models/vision-demo, tools/train_vision_demo.py) through our own
//! image path: processor, tiling, vision tower, projector, early fusion, cached greedy generation
//! stopped at the checkpoint's eos. Every held-out picture must be answered with its coloured
//! shape; the test fails when the exact match falls more than 10 points below what transformers
//! scored on the same pictures (recorded in heldout.json), or below 80%.

use std::ops::ControlFlow;
use std::path::PathBuf;

use llama4_core::DType;
use llama4_model::{stop_ids, GenerateOptions, MultimodalModel, SamplingConfig, Session, Tokenizer};

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/vision-demo")
}

struct Case {
    image: PathBuf,
    prompt: String,
    answer: String,
    python_correct: bool,
}

fn heldout() -> Vec<Case> {
    let text = std::fs::read_to_string(demo().join("heldout.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| Case {
            image: demo().join(e["image"].as_str().unwrap()),
            prompt: e["prompt"].as_str().unwrap().to_string(),
            answer: e["answer"].as_str().unwrap().to_string(),
            python_correct: e["python_correct"].as_bool().unwrap(),
        })
        .collect()
}

#[test]
fn vision_demo_names_the_shapes_of_held_out_pictures() {
    let model = MultimodalModel::load(demo()).unwrap();
    let tok = Tokenizer::from_dir(demo()).unwrap().unwrap();
    let stops = stop_ids(demo(), model.text().config()).unwrap();
    assert!(!stops.is_empty());
    let options = GenerateOptions {
        max_new_tokens: 8,
        sampling: SamplingConfig::greedy(),
        stop_ids: stops.clone(),
        keep_logits: false,
    };
    let cases = heldout();
    assert!(cases.len() >= 40, "{} held-out pictures", cases.len());
    let (mut correct, mut python, mut tiled) = (0, 0, 0);
    for case in &cases {
        let image = model.encode_image_file(&case.image).unwrap();
        let (rows, cols) = image.aspect_ratio;
        tiled += usize::from(rows * cols > 1);
        let ids = tok.encode(&case.prompt).unwrap();
        let prepared = model.prepare(&ids, &[image]).unwrap();
        let mut session = Session::new(model.text(), DType::F32).unwrap();
        let g = session
            .generate_with_embeddings(&prepared.ids, prepared.embeddings, &options, |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        let stopped = g.generated_ids.last().is_some_and(|i| stops.contains(i));
        let body = g.answer_ids();
        let text = tok.decode(body).unwrap();
        let ok = stopped && text == case.answer;
        if !ok {
            println!("  {}: want {:?}, got {text:?}", case.image.display(), case.answer);
        }
        correct += usize::from(ok);
        python += usize::from(case.python_correct);
    }
    // The pictures are chosen to exercise tiling: most need several tiles.
    assert!(tiled * 2 > cases.len(), "only {tiled} pictures are tiled");
    let n = cases.len() as f64;
    let accuracy = correct as f64 / n;
    let python_accuracy = python as f64 / n;
    println!(
        "vision demo held-out exact match: {correct}/{} = {:.1}% (transformers: {python}/{} = {:.1}%)",
        cases.len(),
        accuracy * 100.0,
        cases.len(),
        python_accuracy * 100.0
    );
    let floor = (python_accuracy - 0.10).max(0.80);
    assert!(
        accuracy >= floor,
        "exact match {correct}/{} below {:.1}%",
        cases.len(),
        floor * 100.0
    );
}
