//! How much of the mapped expert tensors this process has touched: the pages present in its
//! own page table (`/proc/self/pagemap`), which, unlike the page cache (`mincore`), does not
//! count pages that other processes on the same host read.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use llama4_core::quant::QWEIGHT_SUFFIX;
use llama4_core::Checkpoint;
use llama4_model::ModelConfig;

use crate::Result;

/// Bytes of the pages of `data` present in this process's page table (Linux): touched by this
/// process, or mapped in with them by the kernel's fault-around (up to 64 KiB about a touched
/// page, when those pages are in the page cache).
///
/// # Errors
/// When `/proc/self/pagemap` cannot be read (not Linux).
pub fn resident_bytes(data: &[u8]) -> Result<u64> {
    if data.is_empty() {
        return Ok(0);
    }
    let page = page_size();
    let start = data.as_ptr() as usize;
    let (first, last) = (start / page, (start + data.len() - 1) / page);
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut entries = vec![0u8; (last - first + 1) * 8];
    pagemap.read_exact_at(&mut entries, (first * 8) as u64)?;
    let present = entries
        .chunks_exact(8)
        .filter(|e| {
            let word = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            word >> 63 == 1
        })
        .count();
    Ok((present * page) as u64)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// What one process holds resident of the mapped expert tensors of every MoE layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpertResidency {
    /// Bytes of every expert tensor of every MoE layer in the checkpoint.
    pub total: u64,
    /// Bytes of this process's share of them.
    pub share: u64,
    /// Resident bytes inside the share.
    pub in_share: u64,
    /// Resident bytes outside the share (other processes' experts): only pages the kernel
    /// mapped in around the share's edges, when expert parallelism works as meant.
    pub outside: u64,
}

impl ExpertResidency {
    /// Every resident byte of the expert tensors.
    pub fn resident(&self) -> u64 {
        self.in_share + self.outside
    }
}

/// Measures, in this process, the resident pages of the expert tensors of `ckpt` (as mapped:
/// experts quantised at load time live in owned memory and show here as released), split
/// into the share `experts` and the rest.
///
/// # Errors
/// A missing tensor; when `/proc/self/pagemap` cannot be read.
pub fn expert_residency(
    ckpt: &Checkpoint,
    config: &ModelConfig,
    experts: Range<usize>,
) -> Result<ExpertResidency> {
    let text = &config.text;
    let e = text.num_local_experts;
    let mut r = ExpertResidency::default();
    for layer in text.moe_layers() {
        for tensor in ["gate_up_proj", "down_proj"] {
            let name = format!(
                "{}model.layers.{layer}.feed_forward.experts.{tensor}",
                config.text_prefix
            );
            let stored = if ckpt.contains(&name) {
                name
            } else {
                format!("{name}{QWEIGHT_SUFFIX}")
            };
            let bytes = ckpt.raw_bytes(&stored)?;
            let per = bytes.len() / e;
            let share = &bytes[experts.start * per..experts.end * per];
            r.total += bytes.len() as u64;
            r.share += share.len() as u64;
            r.in_share += resident_bytes(share)?;
            r.outside += resident_bytes(&bytes[..experts.start * per])?;
            r.outside += resident_bytes(&bytes[experts.end * per..])?;
        }
    }
    Ok(r)
}
