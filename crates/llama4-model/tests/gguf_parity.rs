//! Llama 4 from GGUF against llama.cpp on the same files: every fixture of `fixtures/gguf`
//! (made and recorded by `tools/llamacpp/make_gguf_fixtures.py`) gives llama.cpp's logits for
//! the prompt, its greedy continuation and the logits that chose it.

use std::ops::ControlFlow;

use llama4_core::DType;
use llama4_model::{GenerateOptions, Logits, SamplingConfig, Session, TextModel};
use ndarray::{Array2, ArrayView2, Axis};
use safetensors::SafeTensors;

mod common;
use common::{ids, matrix};

const FILES: [&str; 10] = [
    "tiny-F32",
    "tiny-F16",
    "tiny-BF16",
    "tiny-Q8_0",
    "tiny-Q4_0",
    "tiny-Q4_1",
    "tiny-Q5_0",
    "tiny-Q5_1",
    "k-Q4_K_M",
    "k-mixed",
];

fn gguf(name: &str) -> std::path::PathBuf {
    llama4_testkit::fixture(&format!("gguf/{name}.gguf"))
}

fn vector(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn max_abs(a: ArrayView2<f32>) -> f32 {
    a.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_diff(a: ArrayView2<f32>, b: ArrayView2<f32>) -> f32 {
    assert_eq!(a.dim(), b.dim());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn report() {
    let bytes = std::fs::read(llama4_testkit::fixture("gguf/reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let prompt = ids(&st, "prompt_ids");
    for name in FILES {
        let model = TextModel::load_gguf(gguf(name)).unwrap();
        let want: Array2<f32> = matrix(&st, &format!("{name}.logits"));
        let spread = vector(&st, &format!("{name}.stepwise_spread"));
        let mut session = Session::new(&model, DType::F32).unwrap();
        let got = session.prefill(&prompt, Logits::All).unwrap();
        let d = max_diff(got.view(), want.view());
        let greedy = ids(&st, &format!("{name}.greedy_ids"));
        let mut session = Session::new(&model, DType::F32).unwrap();
        let opts = GenerateOptions {
            max_new_tokens: greedy.len(),
            sampling: SamplingConfig::greedy(),
            stop_ids: vec![],
            keep_logits: true,
        };
        let g = session
            .generate(&prompt, &opts, |_| ControlFlow::Continue(()))
            .unwrap();
        let dl = matrix(&st, &format!("{name}.decode_logits"));
        let dd = max_diff(g.logits.as_ref().unwrap().view(), dl.view());
        println!("{name}: prefill max|d| {d:.3e} (max|ref| {:.3}, spread {:.3e}); decode {dd:.3e}; ids {:?} vs {:?}", max_abs(want.view()), spread.iter().fold(0f32,|m,x|m.max(*x)), g.generated_ids, greedy);
        let _ = Axis(0);
    }
}
