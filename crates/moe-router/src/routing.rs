//! Routing as pure functions over plain data: top-k selection, the Llama 4 sigmoid rule, the
//! softmax alternative, and grouping tokens by expert. No weights are involved here, so every
//! function can be tested alone.

use ndarray::{Array2, ArrayView1, ArrayView2};

use crate::{Error, Result};

/// The experts chosen for each token and the weight of each choice.
///
/// Stored token-major: token `t` owns slots `t·k .. (t+1)·k`, best-ranked expert first.
///
/// The default value is the empty routing (no tokens, no experts): a placeholder to refill
/// with [`crate::Router::route_into`], [`sigmoid_top_k_into`] or [`softmax_top_k_into`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routing {
    num_experts: usize,
    top_k: usize,
    experts: Vec<u32>,
    weights: Vec<f32>,
}

impl Routing {
    /// A routing from flat, token-major expert ids and weights (`T·k` each).
    ///
    /// Checks that `1 ≤ k ≤ num_experts`, that both lists hold a whole number of tokens, that
    /// every id is below `num_experts`, and that no token names an expert twice.
    pub fn new(num_experts: usize, top_k: usize, experts: Vec<u32>, weights: Vec<f32>) -> Result<Self> {
        check_top_k(top_k, num_experts)?;
        if experts.len() != weights.len() {
            return Err(Error::Mismatch {
                what: "routing weights (one per selected expert)",
                expected: experts.len(),
                got: weights.len(),
            });
        }
        if !experts.len().is_multiple_of(top_k) {
            return Err(Error::Mismatch {
                what: "routing length modulo top-k",
                expected: 0,
                got: experts.len() % top_k,
            });
        }
        let routing = Routing {
            num_experts,
            top_k,
            experts,
            weights,
        };
        routing.check_ids()?;
        Ok(routing)
    }

    /// Checks that every id is below `num_experts` and that no token names an expert twice.
    fn check_ids(&self) -> Result<()> {
        for (token, chosen) in self.experts.chunks_exact(self.top_k).enumerate() {
            for (slot, &e) in chosen.iter().enumerate() {
                if e as usize >= self.num_experts {
                    return Err(Error::ExpertOutOfRange {
                        token,
                        expert: e as usize,
                        num_experts: self.num_experts,
                    });
                }
                // k is small (1 or 2 in practice): a quadratic scan beats a set.
                if chosen[..slot].contains(&e) {
                    return Err(Error::DuplicateExpert {
                        token,
                        expert: e as usize,
                    });
                }
            }
        }
        Ok(())
    }

    /// Refills `self` in place as a routing of `tokens` tokens, `top_k` of `num_experts`
    /// each: `fill(t, experts, weights)` writes token `t`'s choices (`top_k` slots each, best
    /// first). Checked as [`Routing::new`] checks; on error `self` is left empty. Allocates
    /// nothing once `self` has held as many choices: what a custom [`crate::Router`]'s
    /// `route_into` uses.
    pub fn refill(
        &mut self,
        num_experts: usize,
        top_k: usize,
        tokens: usize,
        mut fill: impl FnMut(usize, &mut [u32], &mut [f32]),
    ) -> Result<()> {
        check_top_k(top_k, num_experts)?;
        self.reset(num_experts, top_k, tokens);
        let slots = self
            .experts
            .chunks_exact_mut(top_k)
            .zip(self.weights.chunks_exact_mut(top_k));
        for (t, (e, w)) in slots.enumerate() {
            fill(t, e, w);
        }
        self.finish()
    }

    /// Makes `self` a routing of `tokens` tokens, `top_k` of `num_experts` each, reusing its
    /// storage; ids and weights are stale until the caller writes them (`top_k` is checked).
    fn reset(&mut self, num_experts: usize, top_k: usize, tokens: usize) {
        debug_assert!(check_top_k(top_k, num_experts).is_ok());
        self.num_experts = num_experts;
        self.top_k = top_k;
        self.experts.clear();
        self.experts.resize(tokens * top_k, 0);
        self.weights.clear();
        self.weights.resize(tokens * top_k, 0.0);
    }

    /// Validates ids written after [`Routing::reset`]; on error leaves an empty routing, so
    /// that no invalid routing escapes.
    fn finish(&mut self) -> Result<()> {
        self.check_ids().inspect_err(|_| {
            self.experts.clear();
            self.weights.clear();
        })
    }

    /// Number of routed tokens `T`.
    pub fn num_tokens(&self) -> usize {
        // k is 0 only in the empty default routing.
        self.experts.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// Experts per token `k`.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Number of experts `E` the ids refer to.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// The experts chosen for `token`, best-ranked first.
    ///
    /// # Panics
    /// When `token >= num_tokens()`.
    pub fn experts_of(&self, token: usize) -> &[u32] {
        &self.experts[token * self.top_k..(token + 1) * self.top_k]
    }

    /// The weights of the experts chosen for `token`, in the order of [`Routing::experts_of`].
    ///
    /// # Panics
    /// When `token >= num_tokens()`.
    pub fn weights_of(&self, token: usize) -> &[f32] {
        &self.weights[token * self.top_k..(token + 1) * self.top_k]
    }

    /// All expert ids, token-major (`T·k`).
    pub fn experts(&self) -> &[u32] {
        &self.experts
    }

    /// All weights, token-major (`T·k`).
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// The weights as a dense `[T, E]` matrix, 0 for experts a token did not choose: the form
    /// the reference implementation multiplies every expert's input by.
    pub fn dense_weights(&self) -> Array2<f32> {
        let mut dense = Array2::zeros((self.num_tokens(), self.num_experts));
        for t in 0..self.num_tokens() {
            for (&e, &w) in self.experts_of(t).iter().zip(self.weights_of(t)) {
                dense[(t, e as usize)] = w;
            }
        }
        dense
    }

    /// How many tokens chose each expert (`E` counts, summing to `T·k`).
    pub fn tokens_per_expert(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_experts];
        for &e in &self.experts {
            counts[e as usize] += 1;
        }
        counts
    }
}

fn check_top_k(top_k: usize, num_experts: usize) -> Result<()> {
    if top_k == 0 || top_k > num_experts {
        return Err(Error::TopK { top_k, num_experts });
    }
    Ok(())
}

/// Ranking used by [`top_k_into`]: NaN ranks above every number (as in `torch.topk`), so a
/// corrupted logit is selected and poisons the output instead of being silently skipped.
#[inline]
fn ranks_above(a: f32, b: f32) -> bool {
    if a.is_nan() {
        !b.is_nan()
    } else {
        a > b
    }
}

/// Writes into `out` the indices of the `out.len()` largest values of `row`, largest first.
///
/// Ties: the lower index ranks first (what `torch.topk` returns on CPU for exact ties in
/// practice; torch does not promise an order). NaN ranks above `+inf`, as in `torch.topk`.
///
/// # Panics
/// When `out.len() > row.len()` (callers check k against the expert count at construction).
pub fn top_k_into(row: &[f32], out: &mut [u32]) {
    let k = out.len();
    assert!(k <= row.len(), "top-{k} of {} values", row.len());
    // Insertion into a sorted list of k: E·k steps, and k is 1 or 2 for Llama 4.
    let mut filled = 0;
    for (i, &v) in row.iter().enumerate() {
        // Position among the current best: after every kept value that ranks at or above `v`
        // (kept values all have lower indices, so equal values stay in index order).
        let mut pos = filled;
        while pos > 0 && ranks_above(v, row[out[pos - 1] as usize]) {
            pos -= 1;
        }
        if pos >= k {
            continue;
        }
        let end = if filled < k { filled } else { k - 1 };
        out.copy_within(pos..end, pos + 1);
        out[pos] = i as u32;
        if filled < k {
            filled += 1;
        }
    }
}

/// The indices of the `k` largest values of `row`, largest first; see [`top_k_into`].
///
/// # Panics
/// When `k > row.len()`.
pub fn top_k(row: &[f32], k: usize) -> Vec<u32> {
    let mut out = vec![0; k];
    top_k_into(row, &mut out);
    out
}

/// `1 / (1 + e^-x)` in f32.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The Llama 4 rule: per token, the top-k experts by RAW logit, each weighted by
/// `sigmoid(logit)`; no softmax, no renormalisation.
///
/// # Shapes
/// `logits: [T, E]` → a [`Routing`] of `T` tokens, `k` experts each.
pub fn sigmoid_top_k(logits: ArrayView2<f32>, k: usize) -> Result<Routing> {
    let mut routing = Routing::default();
    sigmoid_top_k_into(logits, k, &mut routing)?;
    Ok(routing)
}

/// [`sigmoid_top_k`] refilling `routing` in place: allocates nothing once `routing` has held
/// as many tokens, when the rows of `logits` are contiguous (strided rows are copied).
///
/// # Shapes
/// `logits: [T, E]`; `routing` becomes a routing of `T` tokens, `k` experts each.
pub fn sigmoid_top_k_into(logits: ArrayView2<f32>, k: usize, routing: &mut Routing) -> Result<()> {
    let (t, e) = logits.dim();
    check_top_k(k, e)?;
    routing.reset(e, k, t);
    let mut row_buf = Vec::new();
    for (ti, row) in logits.rows().into_iter().enumerate() {
        let row = contiguous(row, &mut row_buf);
        let slots = &mut routing.experts[ti * k..(ti + 1) * k];
        top_k_into(row, slots);
        for (w, &ei) in routing.weights[ti * k..(ti + 1) * k].iter_mut().zip(slots.iter()) {
            *w = sigmoid(row[ei as usize]);
        }
    }
    routing.finish()
}

/// The softmax alternative (Mixtral / DeepSeek style): per token, the top-k experts by logit,
/// each weighted by its softmax probability over ALL experts; with `renormalize`, the selected
/// probabilities are divided by their sum so they add to 1.
///
/// # Shapes
/// `logits: [T, E]` → a [`Routing`] of `T` tokens, `k` experts each.
pub fn softmax_top_k(logits: ArrayView2<f32>, k: usize, renormalize: bool) -> Result<Routing> {
    let mut routing = Routing::default();
    let mut probs = vec![0f32; logits.ncols()];
    softmax_top_k_into(logits, k, renormalize, &mut probs, &mut routing)?;
    Ok(routing)
}

/// [`softmax_top_k`] refilling `routing` in place, with `probs` (`E` values, overwritten) as
/// the per-token temporary: allocates nothing once `routing` has held as many tokens, when
/// the rows of `logits` are contiguous (strided rows are copied).
///
/// # Shapes
/// `logits: [T, E]`, `probs: [E]`; `routing` becomes a routing of `T` tokens, `k` experts each.
pub fn softmax_top_k_into(
    logits: ArrayView2<f32>,
    k: usize,
    renormalize: bool,
    probs: &mut [f32],
    routing: &mut Routing,
) -> Result<()> {
    let (t, e) = logits.dim();
    check_top_k(k, e)?;
    if probs.len() != e {
        return Err(Error::Mismatch {
            what: "softmax temporary length (E)",
            expected: e,
            got: probs.len(),
        });
    }
    routing.reset(e, k, t);
    let mut row_buf = Vec::new();
    for (ti, row) in logits.rows().into_iter().enumerate() {
        let row = contiguous(row, &mut row_buf);
        let slots = &mut routing.experts[ti * k..(ti + 1) * k];
        // Select on the logits, not on the probabilities: underflow to 0 would merge ties.
        top_k_into(row, slots);
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for (p, &l) in probs.iter_mut().zip(row) {
            *p = (l - m).exp();
            sum += *p;
        }
        let w = &mut routing.weights[ti * k..(ti + 1) * k];
        for (wi, &ei) in w.iter_mut().zip(slots.iter()) {
            *wi = probs[ei as usize] / sum;
        }
        if renormalize {
            let s: f32 = w.iter().sum();
            w.iter_mut().for_each(|wi| *wi /= s);
        }
    }
    routing.finish()
}

/// `row` as a slice: borrowed when contiguous, else copied into `buf`.
fn contiguous<'a>(row: ArrayView1<'a, f32>, buf: &'a mut Vec<f32>) -> &'a [f32] {
    match row.to_slice() {
        Some(s) => s,
        None => {
            buf.clear();
            buf.extend(row.iter().copied());
            buf
        }
    }
}

/// Token assignments grouped by expert (compressed rows): expert `e` owns entries
/// `offsets[e] .. offsets[e+1]`, each a token index and that token's weight for `e`, tokens in
/// ascending order. Running expert `e` once over its group is the sparse dispatch.
///
/// The default value groups nothing over no experts; [`ExpertGroups::regroup`] refills it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExpertGroups {
    offsets: Vec<usize>,
    tokens: Vec<u32>,
    weights: Vec<f32>,
}

impl ExpertGroups {
    /// Groups a routing by expert (a counting sort: `O(T·k + E)`).
    pub fn from_routing(routing: &Routing) -> Self {
        let mut groups = ExpertGroups::default();
        groups.regroup(routing);
        groups
    }

    /// [`ExpertGroups::from_routing`] in place, reusing `self`'s storage: allocates nothing
    /// once `self` has held as many experts and assignments.
    pub fn regroup(&mut self, routing: &Routing) {
        let e = routing.num_experts();
        let offsets = &mut self.offsets;
        offsets.clear();
        offsets.resize(e + 1, 0);
        for &x in routing.experts() {
            offsets[x as usize + 1] += 1;
        }
        for i in 0..e {
            offsets[i + 1] += offsets[i];
        }
        let n = routing.experts().len();
        self.tokens.clear();
        self.tokens.resize(n, 0);
        self.weights.clear();
        self.weights.resize(n, 0.0);
        // `offsets[x]` serves as expert x's write cursor; after the pass it has reached the
        // group's end, `offsets[x + 1]`, so shifting right by one restores the starts.
        let k = routing.top_k();
        for (slot, (&x, &w)) in routing.experts().iter().zip(routing.weights()).enumerate() {
            let at = &mut offsets[x as usize];
            self.tokens[*at] = (slot / k) as u32;
            self.weights[*at] = w;
            *at += 1;
        }
        offsets.copy_within(0..e, 1);
        offsets[0] = 0;
    }

    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        // `offsets` is empty only in the default value.
        self.offsets.len().saturating_sub(1)
    }

    /// Tokens routed to `expert`, ascending.
    ///
    /// # Panics
    /// When `expert >= num_experts()`.
    pub fn tokens(&self, expert: usize) -> &[u32] {
        &self.tokens[self.offsets[expert]..self.offsets[expert + 1]]
    }

    /// The weights of those tokens for `expert`, in the order of [`ExpertGroups::tokens`].
    ///
    /// # Panics
    /// When `expert >= num_experts()`.
    pub fn weights(&self, expert: usize) -> &[f32] {
        &self.weights[self.offsets[expert]..self.offsets[expert + 1]]
    }

    /// Number of tokens routed to `expert`.
    ///
    /// # Panics
    /// When `expert >= num_experts()`.
    pub fn len(&self, expert: usize) -> usize {
        self.offsets[expert + 1] - self.offsets[expert]
    }

    /// True when no token was routed anywhere (an empty input).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Experts that at least one token chose, ascending.
    pub fn active_experts(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_experts()).filter(move |&e| self.len(e) > 0)
    }

    /// The largest group size (0 for an empty input).
    pub fn max_len(&self) -> usize {
        (0..self.num_experts()).map(|e| self.len(e)).max().unwrap_or(0)
    }

    /// All token indices, concatenated group after group (`T·k`).
    pub fn all_tokens(&self) -> &[u32] {
        &self.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn top_k_orders_by_value_then_index() {
        assert_eq!(top_k(&[0.1, 0.5, 0.3, 0.5], 2), vec![1, 3]);
        assert_eq!(top_k(&[0.1, 0.5, 0.3, 0.5], 3), vec![1, 3, 2]);
        assert_eq!(top_k(&[2.0, 2.0, 2.0], 3), vec![0, 1, 2]);
        assert_eq!(top_k(&[-1.0, -3.0, -2.0], 1), vec![0]);
        assert_eq!(top_k(&[1.0, f32::NAN, f32::INFINITY], 2), vec![1, 2]);
    }

    #[test]
    fn sigmoid_rule_uses_raw_logits_without_renormalising() {
        let r = sigmoid_top_k(array![[0.0f32, 2.0, -1.0, 1.0]].view(), 2).unwrap();
        assert_eq!(r.experts_of(0), &[1, 3]);
        let w = r.weights_of(0);
        assert!((w[0] - 1.0 / (1.0 + (-2f32).exp())).abs() < 1e-7);
        assert!((w[1] - 1.0 / (1.0 + (-1f32).exp())).abs() < 1e-7);
        // Not a distribution: the two sigmoids sum to more than 1.
        assert!(w[0] + w[1] > 1.0);
    }

    #[test]
    fn softmax_rule_weights_by_probability() {
        let logits = array![[0.0f32, 1.0, 2.0]];
        let r = softmax_top_k(logits.view(), 1, false).unwrap();
        let z: f32 = [0.0f32, 1.0, 2.0].iter().map(|v| v.exp()).sum();
        assert_eq!(r.experts_of(0), &[2]);
        assert!((r.weights_of(0)[0] - 2f32.exp() / z).abs() < 1e-6);
        let r = softmax_top_k(logits.view(), 2, true).unwrap();
        assert!((r.weights_of(0).iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn bad_top_k_and_bad_routings_are_errors() {
        let l = array![[0.0f32, 1.0]];
        assert!(matches!(
            sigmoid_top_k(l.view(), 0),
            Err(Error::TopK {
                top_k: 0,
                num_experts: 2
            })
        ));
        assert!(matches!(
            sigmoid_top_k(l.view(), 3),
            Err(Error::TopK {
                top_k: 3,
                num_experts: 2
            })
        ));
        assert!(matches!(
            Routing::new(2, 1, vec![2], vec![0.5]),
            Err(Error::ExpertOutOfRange {
                token: 0,
                expert: 2,
                num_experts: 2
            })
        ));
        assert!(matches!(
            Routing::new(3, 2, vec![0, 1, 2, 2], vec![0.5; 4]),
            Err(Error::DuplicateExpert { token: 1, expert: 2 })
        ));
        assert!(matches!(
            Routing::new(3, 2, vec![0, 1, 2], vec![0.5; 3]),
            Err(Error::Mismatch { .. })
        ));
        assert!(matches!(
            Routing::new(3, 1, vec![0, 1], vec![0.5; 3]),
            Err(Error::Mismatch { .. })
        ));
    }

    #[test]
    fn groups_keep_tokens_ascending() {
        let r = Routing::new(3, 2, vec![2, 0, 0, 1, 2, 1], vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).unwrap();
        let g = ExpertGroups::from_routing(&r);
        assert_eq!(g.tokens(0), &[0, 1]);
        assert_eq!(g.weights(0), &[0.2, 0.3]);
        assert_eq!(g.tokens(1), &[1, 2]);
        assert_eq!(g.weights(1), &[0.4, 0.6]);
        assert_eq!(g.tokens(2), &[0, 2]);
        assert_eq!(g.weights(2), &[0.1, 0.5]);
        assert_eq!(g.active_experts().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(r.tokens_per_expert(), vec![2, 2, 2]);
    }
}
