//! Which experts each process holds, and the bytes of weights that makes per process.

use std::ops::Range;

use llama4_core::{DType, QuantPolicy, QuantSpec};
use llama4_model::TextConfig;

use crate::{Error, Result};

/// The routed experts process `rank` of `ranks` holds of every MoE layer of `num_experts`:
/// contiguous shares of `⌊E / N⌋`, the last `E mod N` processes one more. Rank 0 also holds
/// everything that is not an expert, so it gets a smaller share when the split is uneven.
///
/// # Errors
/// [`Error::Plan`] for no processes, a rank past the last, or more processes than experts.
pub fn shard(num_experts: usize, ranks: usize, rank: usize) -> Result<Range<usize>> {
    let plan = |reason| Error::Plan {
        experts: num_experts,
        ranks,
        reason,
    };
    if ranks == 0 {
        return Err(plan("there are no processes"));
    }
    if rank >= ranks {
        return Err(plan("the rank is past the last process"));
    }
    if ranks > num_experts {
        return Err(plan("every process must hold at least one expert"));
    }
    let (base, extra) = (num_experts / ranks, num_experts % ranks);
    // Ranks before `ranks - extra` hold `base`, the others `base + 1`.
    let small = ranks - extra;
    let start = rank * base + rank.saturating_sub(small);
    let len = base + usize::from(rank >= small);
    Ok(start..start + len)
}

/// The weights one process holds, in bytes as stored (see [`memory_plan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankMemory {
    /// The process.
    pub rank: usize,
    /// The routed experts it holds of every MoE layer ([`shard`]).
    pub experts: Range<usize>,
    /// Bytes of those experts over all MoE layers.
    pub expert_bytes: u64,
    /// Bytes of every other weight it holds: everything that is not an expert on rank 0 (it
    /// runs the model), only the routers elsewhere.
    pub other_bytes: u64,
}

impl RankMemory {
    /// All weight bytes the process holds.
    pub fn total(&self) -> u64 {
        self.expert_bytes + self.other_bytes
    }
}

/// The weight bytes each of `ranks` processes holds for a text decoder of `config` whose
/// float weights are stored as `dtype` and whose weights `policy` selects are quantised (as
/// a checkpoint saved quantised or quantised at load time stores them).
///
/// This is the estimate loading follows: a process's [`llama4_core::Checkpoint::weight_bytes`]
/// after loading its share equals its [`RankMemory::total`]. Like that counter it leaves out
/// the 1-D tensors (norms and biases, `H` floats each) and, for multimodal checkpoints, the
/// vision tower that rank 0 also holds.
///
/// # Errors
/// [`Error::Plan`] as [`shard`] does.
pub fn memory_plan(
    config: &TextConfig,
    dtype: DType,
    policy: Option<QuantPolicy>,
    ranks: usize,
) -> Result<Vec<RankMemory>> {
    let e = config.num_local_experts;
    let (mut experts_per_expert, mut other, mut routers) = (0u64, 0u64, 0u64);
    for (name, shape) in config.tensor_shapes() {
        if shape.len() < 2 {
            continue;
        }
        let spec = policy.and_then(|p| p.selects(&name).map(|_| p.spec));
        let bytes = stored_bytes(&shape, dtype, spec);
        // Expert tensors are the only 3-D ones, `[E, in, out]`: shared among the ranks.
        if shape.len() == 3 {
            experts_per_expert += bytes / e as u64;
        } else if name.ends_with("router.weight") {
            routers += bytes;
        } else {
            other += bytes;
        }
    }
    (0..ranks)
        .map(|rank| {
            let experts = shard(e, ranks, rank)?;
            Ok(RankMemory {
                rank,
                expert_bytes: experts_per_expert * experts.len() as u64,
                other_bytes: routers + if rank == 0 { other } else { 0 },
                experts,
            })
        })
        .collect()
}

/// Bytes of a 2-D `[out, in]` or expert `[E, in, out]` tensor stored as `dtype`, or quantised
/// with `spec` (values and scales of `[.., out, in]` rows).
fn stored_bytes(shape: &[usize], dtype: DType, spec: Option<QuantSpec>) -> u64 {
    let elements: usize = shape.iter().product();
    let (rows, inp) = match *shape {
        [batch, inp, out] => (batch * out, inp),
        [out, inp] => (out, inp),
        _ => return (elements * dtype.size()) as u64,
    };
    match spec {
        Some(spec) => {
            let row = spec.format.value_bytes(inp) + inp / spec.group_for(inp) * spec.scales.size();
            (rows * row) as u64
        }
        None => (elements * dtype.size()) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama4_core::{QuantFormat, QuantScope};

    #[test]
    fn shards_cover_every_expert_once_smaller_first() {
        for e in 1..40 {
            for n in 1..=e {
                let shares: Vec<_> = (0..n).map(|r| shard(e, n, r).unwrap()).collect();
                assert_eq!(shares[0].start, 0);
                assert_eq!(shares[n - 1].end, e);
                for w in shares.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() <= w[1].len());
                }
                let (lo, hi) = (shares[0].len(), shares[n - 1].len());
                assert!(hi - lo <= 1 && lo == e / n, "{e} experts on {n}: {shares:?}");
            }
        }
        assert_eq!(shard(16, 3, 0).unwrap(), 0..5);
        assert_eq!(shard(16, 3, 2).unwrap(), 10..16);
    }

    #[test]
    fn impossible_shares_are_named_errors() {
        for (e, n, r) in [(4, 0, 0), (4, 5, 0), (4, 2, 2)] {
            assert!(matches!(shard(e, n, r), Err(Error::Plan { .. })), "{e} {n} {r}");
        }
    }

    #[test]
    fn scout_bf16_adds_up_to_its_parameters() {
        let cfg = TextConfig::scout();
        let one = memory_plan(&cfg, DType::BF16, None, 1).unwrap();
        // 48 layers of 16 experts of 3 · 5120 · 8192 parameters, 2 bytes each.
        assert_eq!(one[0].expert_bytes, 48 * 16 * 3 * 5120 * 8192 * 2);
        let four = memory_plan(&cfg, DType::BF16, None, 4).unwrap();
        assert_eq!(
            four.iter().map(|r| r.expert_bytes).sum::<u64>(),
            one[0].expert_bytes
        );
        assert_eq!(four[1].expert_bytes * 4, one[0].expert_bytes);
        // Routers are on every rank, the rest only on rank 0.
        let routers = 48 * 16 * 5120 * 2;
        assert_eq!(four[1].other_bytes, routers);
        assert_eq!(four[0].other_bytes, one[0].other_bytes);
    }

    #[test]
    fn quantised_experts_count_values_and_scales() {
        let cfg = TextConfig::maverick();
        let q4 = llama4_model::quant_policy(QuantSpec::new(QuantFormat::Q4, 32), QuantScope::Experts);
        let plan = memory_plan(&cfg, DType::BF16, Some(q4), 1).unwrap();
        // Half a byte per weight plus a 4-byte scale per 32: 0.625 bytes per weight.
        let weights = 24u64 * 128 * 3 * 5120 * 8192;
        assert_eq!(plan[0].expert_bytes, weights * 5 / 8);
    }
}
