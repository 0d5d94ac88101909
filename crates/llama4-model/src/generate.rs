//! Token selection and the generation loop.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use ndarray::Array2;

use crate::session::{Logits, Session};
use crate::{Error, Result, TextModel};

/// Temperatures below this are greedy: dividing logits by a smaller number overflows f32 and
/// would turn the choice into noise, while the distribution it stands for is already the
/// argmax. (1e-5 is the floor vLLM uses for the same reason.)
pub const MIN_TEMPERATURE: f32 = 1e-5;

/// How the next token is chosen from logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; `0`, or anything below [`MIN_TEMPERATURE`], means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (`None` or 1: all).
    pub top_p: Option<f32>,
    /// Seed of the random stream.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::default()
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Sampling(format!(
                "temperature {} must be ≥ 0",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Sampling(format!("top-p {p} must be in (0, 1]")));
            }
        }
        Ok(())
    }
}

/// Chooses tokens from logits: greedy, or temperature → top-k → top-p → a draw, in that order
/// (the order transformers applies its logits warpers).
#[derive(Clone, Debug)]
pub struct Sampler {
    config: SamplingConfig,
    rng: SplitMix64,
    /// Candidates and their probabilities, reused from token to token.
    cand: Vec<(u32, f32)>,
    probs: Vec<f64>,
}

impl Sampler {
    /// A sampler with its random stream seeded from `config.seed`.
    pub fn new(config: SamplingConfig) -> Result<Self> {
        config.validate()?;
        Ok(Sampler {
            config,
            rng: SplitMix64(config.seed),
            cand: Vec::new(),
            probs: Vec::new(),
        })
    }

    /// The next token. Ties in greedy mode go to the lowest id. A `-inf` logit masks its
    /// token out.
    ///
    /// # Errors
    /// [`Error::NonFiniteLogits`] for a NaN or `+inf` logit, or when every logit is `-inf`:
    /// there is no distribution to choose from.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::Empty("sample"));
        }
        crate::checks::check_sampleable(logits)?;
        if self.config.temperature < MIN_TEMPERATURE {
            return Ok(argmax(logits));
        }
        let t = self.config.temperature;
        let (cand, probs) = (&mut self.cand, &mut self.probs);
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_nan())
                .map(|(i, &v)| (i as u32, v / t)),
        );
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.config.top_k.filter(|&k| k > 0) {
            cand.truncate(k);
        }
        let max = cand[0].1;
        probs.clear();
        probs.extend(cand.iter().map(|&(_, v)| ((v - max) as f64).exp()));
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = self.config.top_p.filter(|&p| p < 1.0) {
            // Keep tokens while the mass before them is below p (the first is always kept).
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .take_while(|&&q| {
                    let before = mass;
                    mass += q;
                    before < p as f64
                })
                .count();
            probs.truncate(keep.max(1));
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.next_f64() * total;
        for (i, &p) in probs.iter().enumerate() {
            if u < p {
                return Ok(cand[i].0);
            }
            u -= p;
        }
        Ok(cand[probs.len() - 1].0)
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A small, well-mixed, seedable random stream (SplitMix64); sampling needs nothing more.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What to generate.
#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: SamplingConfig,
    /// Ids that end generation (the stop id itself is kept in the output).
    pub stop_ids: Vec<u32>,
    /// Keep the logits row that chose each token.
    pub keep_logits: bool,
}

/// What generation produced.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The prompt.
    pub prompt_ids: Vec<u32>,
    /// Generated ids, in order (including a final stop id, if one ended generation).
    pub generated_ids: Vec<u32>,
    /// `[generated, V]`: row `r` holds the logits that chose generated token `r` (with
    /// [`GenerateOptions::keep_logits`]).
    pub logits: Option<Array2<f32>>,
    /// Time of the prompt's forward pass.
    pub prefill_time: Duration,
    /// Time of every later forward pass.
    pub decode_time: Duration,
    /// Forward passes after the prefill.
    pub decode_steps: usize,
    /// True when a stop id ended generation (it is the last of `generated_ids`).
    pub stopped: bool,
}

impl Generation {
    /// The generated ids without the stop id that ended generation: the answer's text.
    pub fn answer_ids(&self) -> &[u32] {
        let n = self.generated_ids.len() - usize::from(self.stopped);
        &self.generated_ids[..n]
    }

    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_ids.len() as f64 / self.prefill_time.as_secs_f64().max(1e-12)
    }

    /// Generated tokens per second of decoding (forward passes after the prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.decode_steps as f64 / self.decode_time.as_secs_f64().max(1e-12)
    }
}

impl<M: std::borrow::Borrow<TextModel>> Session<M> {
    /// Prefills `prompt` and generates up to `max_new_tokens`, calling `on_token(id)` after
    /// each; the callback may stop generation early with `ControlFlow::Break`.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Generation> {
        self.generate_from(prompt, None, options, on_token)
    }

    /// The generation loop; the prompt's input embeddings are looked up unless given (images
    /// already scattered into them).
    pub(crate) fn generate_from(
        &mut self,
        prompt: &[u32],
        embeddings: Option<Array2<f32>>,
        options: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let mut sampler = Sampler::new(options.sampling)?;
        let vocab = self.model().config().vocab_size;
        let mut kept = Vec::new();
        let mut generated = Vec::new();
        crate::checks::check_room(self.len(), prompt.len(), options.max_new_tokens, self.max_len())?;
        let start = Instant::now();
        let first = match embeddings {
            Some(e) => self.prefill_embeddings(prompt, e, Logits::Last)?,
            None => self.prefill(prompt, Logits::Last)?,
        };
        let prefill_time = start.elapsed();
        let mut decode_time = Duration::ZERO;
        let mut decode_steps = 0;
        let mut stopped = false;
        let first = first.as_slice().ok_or(Error::Empty("logits"))?;
        let mut next = if options.max_new_tokens > 0 {
            Some(pick(&mut sampler, first, options.keep_logits, &mut kept)?)
        } else {
            None
        };
        while let Some(id) = next {
            generated.push(id);
            stopped = options.stop_ids.contains(&id);
            if on_token(id).is_break() || stopped || generated.len() == options.max_new_tokens {
                break;
            }
            let t = Instant::now();
            // The logits stay in the session's buffer: a decode step allocates nothing.
            let row = self.step_logits(id)?;
            decode_time += t.elapsed();
            decode_steps += 1;
            next = Some(pick(&mut sampler, row, options.keep_logits, &mut kept)?);
        }
        let logits = options
            .keep_logits
            .then(|| Array2::from_shape_vec((generated.len(), vocab), kept))
            .transpose()
            .map_err(|e| llama4_core::Error::shape("generate", e.to_string()))?;
        Ok(Generation {
            prompt_ids: prompt.to_vec(),
            generated_ids: generated,
            logits,
            prefill_time,
            decode_time,
            decode_steps,
            stopped,
        })
    }
}

/// The next token from `logits`, which are appended to `kept` when `keep`.
fn pick(sampler: &mut Sampler, logits: &[f32], keep: bool, kept: &mut Vec<f32>) -> Result<u32> {
    // Broken weights show here first: refuse to pick from NaN/Inf logits.
    crate::checks::check_logits_finite(logits)?;
    if keep {
        kept.extend_from_slice(logits);
    }
    sampler.sample(logits)
}
