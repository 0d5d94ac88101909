//! Held-out exact-match accuracy: the measure the demo models are trained for and the research
//! examples report before and after swapping a part. A directory's `heldout.json` is a list of
//! `{"prompt", "answer"}`; a case is right when greedy generation decodes to exactly the answer
//! and ends on a stop id (an answer followed by more text is wrong).

use std::ops::ControlFlow;
use std::path::Path;

use llama4_core::input::{read_capped, Cap};

use crate::{
    stop_ids, Error, GenerateOptions, KvDtype, Result, SamplingConfig, Session, TextModel, Tokenizer,
};

/// New tokens allowed per answer: the demos' answers are at most ten digits and a stop.
pub const MAX_ANSWER_TOKENS: usize = 16;

/// One held-out prompt and the answer expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// The prompt text, encoded with the tokenizer's defaults.
    pub prompt: String,
    /// The exact answer text.
    pub answer: String,
}

/// Reads `dir/heldout.json`.
///
/// # Errors
/// [`Error::Io`] when it cannot be read, [`Error::HeldOut`] when it is not a list of
/// `{"prompt": string, "answer": string}`.
pub fn cases(dir: impl AsRef<Path>) -> Result<Vec<Case>> {
    let path = dir.as_ref().join("heldout.json");
    let bad = |reason: String| Error::HeldOut {
        path: path.clone(),
        reason,
    };
    let bytes = read_capped(&path, Cap::JSON).map_err(Error::input)?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let list = value.as_array().ok_or_else(|| bad("not a list".into()))?;
    list.iter()
        .enumerate()
        .map(|(i, e)| match (e["prompt"].as_str(), e["answer"].as_str()) {
            (Some(prompt), Some(answer)) => Ok(Case {
                prompt: prompt.to_string(),
                answer: answer.to_string(),
            }),
            _ => Err(bad(format!("entry {i} lacks a `prompt` or `answer` string"))),
        })
        .collect()
}

/// What [`evaluate`] saw: every greedy answer and how many were exactly right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Exactly right answers.
    pub correct: usize,
    /// The decoded answers, in case order.
    pub answers: Vec<String>,
}

impl Outcome {
    /// Cases evaluated.
    pub fn total(&self) -> usize {
        self.answers.len()
    }

    /// `correct / total` (0 for no cases).
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total().max(1) as f64
    }

    /// `correct/total = percent`, for reports.
    pub fn score(&self) -> String {
        format!(
            "{:>3}/{} = {:5.1}%",
            self.correct,
            self.total(),
            100.0 * self.accuracy()
        )
    }
}

/// Answers every case greedily (at most [`MAX_ANSWER_TOKENS`] new tokens, stopping at the stop
/// ids of the checkpoint in `dir`), one fresh session per case with its cache in `kv`.
pub fn evaluate(
    model: &TextModel,
    tokenizer: &Tokenizer,
    dir: impl AsRef<Path>,
    cases: &[Case],
    kv: impl Into<KvDtype>,
) -> Result<Outcome> {
    let kv = kv.into();
    let stops = stop_ids(dir, model.config())?;
    let options = GenerateOptions {
        max_new_tokens: MAX_ANSWER_TOKENS,
        sampling: SamplingConfig::greedy(),
        stop_ids: stops.clone(),
        keep_logits: false,
    };
    let mut outcome = Outcome {
        correct: 0,
        answers: Vec::with_capacity(cases.len()),
    };
    for case in cases {
        let mut session = Session::new(model, kv)?;
        let g = session.generate(&tokenizer.encode(&case.prompt)?, &options, |_| {
            ControlFlow::Continue(())
        })?;
        let text = tokenizer.decode(g.answer_ids())?;
        let stopped = g.generated_ids.last().is_some_and(|id| stops.contains(id));
        outcome.correct += usize::from(stopped && text == case.answer);
        outcome.answers.push(text);
    }
    Ok(outcome)
}
