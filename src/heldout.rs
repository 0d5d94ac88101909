//! Held-out accuracy of a model on its `heldout.json` (a list of `{"prompt", "answer"}`, as the
//! demo models have): what the research examples report before and after swapping a part.

use std::ops::ControlFlow;
use std::path::Path;

use llama4_core::input::{read_capped, Cap};
use llama4_model::{stop_ids, DType, GenerateOptions, Session, TextModel, Tokenizer};

type Error = Box<dyn std::error::Error>;

/// The held-out prompts and their expected answers.
pub fn cases(dir: &Path) -> Result<Vec<(String, String)>, Error> {
    let bytes = read_capped(&dir.join("heldout.json"), Cap::JSON)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
    let list = v.as_array().ok_or("heldout.json is not a list")?;
    list.iter()
        .map(|e| match (e["prompt"].as_str(), e["answer"].as_str()) {
            (Some(p), Some(a)) => Ok((p.to_string(), a.to_string())),
            _ => Err("heldout.json entries need prompt and answer strings".into()),
        })
        .collect()
}

/// Greedy answers to every case, and how many are exactly right.
pub struct Outcome {
    /// Exact matches.
    pub correct: usize,
    /// The answers, in case order.
    pub answers: Vec<String>,
}

impl Outcome {
    /// `correct/total = percent`.
    pub fn score(&self) -> String {
        let n = self.answers.len();
        format!(
            "{:>3}/{n} = {:5.1}%",
            self.correct,
            100.0 * self.correct as f64 / n.max(1) as f64
        )
    }
}

/// Runs every case greedily (up to 16 new tokens, the model's stop ids) through `model`.
pub fn evaluate(
    model: &TextModel,
    tok: &Tokenizer,
    dir: &Path,
    cases: &[(String, String)],
) -> Result<Outcome, Error> {
    let options = GenerateOptions {
        max_new_tokens: 16,
        stop_ids: stop_ids(dir, model.config())?,
        ..Default::default()
    };
    let mut outcome = Outcome {
        correct: 0,
        answers: Vec::new(),
    };
    for (prompt, answer) in cases {
        let mut session = Session::new(model, DType::F32)?;
        let g = session.generate(&tok.encode(prompt)?, &options, |_| ControlFlow::Continue(()))?;
        let text = tok.decode(g.answer_ids())?;
        outcome.correct += usize::from(&text == answer);
        outcome.answers.push(text);
    }
    Ok(outcome)
}
