//! Counters and gauges shared by the engine and the HTTP side, rendered in the Prometheus text
//! format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock, Weak};

use expert_parallel::Leader;

/// An `f64` gauge stored in an atomic.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Relaxed);
    }

    /// The value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

/// Everything `/metrics` reports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// HTTP responses by endpoint and status.
    pub http: Mutex<BTreeMap<(String, u16), u64>>,
    /// Generation requests the engine admitted.
    pub requests_admitted: AtomicU64,
    /// Requests that ended by a stop id or stop string.
    pub finished_stop: AtomicU64,
    /// Requests that ended at `max_tokens`.
    pub finished_length: AtomicU64,
    /// Requests whose client went away before the end.
    pub cancelled: AtomicU64,
    /// Requests that failed inside the engine.
    pub failed: AtomicU64,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens found in a cache (the slot's own, or shared from another slot) and not
    /// prefilled again.
    pub prompt_tokens_reused: AtomicU64,
    /// Of those, the tokens whose cache pages another slot holds and now shares.
    pub prompt_tokens_shared: AtomicU64,
    /// Requests that waited for room in the key/value cache budget before admission.
    pub budget_waits: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Forward passes run.
    pub steps: AtomicU64,
    /// Seconds spent in forward passes, in microseconds.
    pub step_micros: AtomicU64,
    /// Requests waiting for a slot.
    pub queue_depth: AtomicU64,
    /// Sequences in the last forward pass.
    pub batch_size: Gauge,
    /// Sequences holding a slot.
    pub active: Gauge,
    /// Decode tokens per second of the last forward pass that decoded.
    pub decode_tokens_per_s: Gauge,
    /// Bytes of key/value cache the slots hold (shared pages once, with a budget).
    pub kv_cache_bytes: Gauge,
    /// Rank 0 of an expert-parallel group, for its communication counts. Weak: the model's MoE
    /// layers own it, and the group stops when the model is dropped, not when `/metrics` is.
    pub expert_group: OnceLock<Weak<Leader>>,
}

impl Metrics {
    /// Counts one HTTP response.
    pub fn count_response(&self, endpoint: &str, status: u16) {
        if let Ok(mut map) = self.http.lock() {
            *map.entry((endpoint.to_string(), status)).or_default() += 1;
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let get = |a: &AtomicU64| a.load(Relaxed) as f64;
        counter(
            "llama4_requests_admitted_total",
            "Generation requests admitted to a slot.",
            get(&self.requests_admitted),
        );
        counter(
            "llama4_prompt_tokens_total",
            "Prompt tokens of admitted requests.",
            get(&self.prompt_tokens),
        );
        counter(
            "llama4_prompt_tokens_reused_total",
            "Prompt tokens taken from a slot's cache instead of prefilled.",
            get(&self.prompt_tokens_reused),
        );
        counter(
            "llama4_prompt_tokens_shared_total",
            "Prompt tokens whose cache pages were shared from another slot (part of the reused).",
            get(&self.prompt_tokens_shared),
        );
        counter(
            "llama4_requests_waited_for_cache_budget_total",
            "Requests that waited for room in the key/value cache budget.",
            get(&self.budget_waits),
        );
        counter(
            "llama4_generated_tokens_total",
            "Tokens generated.",
            get(&self.generated_tokens),
        );
        counter(
            "llama4_steps_total",
            "Forward passes run by the engine.",
            get(&self.steps),
        );
        counter(
            "llama4_step_seconds_total",
            "Time spent in forward passes.",
            get(&self.step_micros) / 1e6,
        );
        if let Some(leader) = self.expert_group.get().and_then(Weak::upgrade) {
            let c = leader.stats();
            counter(
                "llama4_expert_parallel_layer_calls_total",
                "MoE layer calls exchanged with the other ranks of the expert-parallel group.",
                c.calls as f64,
            );
            counter(
                "llama4_expert_parallel_broadcast_seconds_total",
                "Time rank 0 spent broadcasting rows and routing to the group.",
                c.broadcast.as_secs_f64(),
            );
            counter(
                "llama4_expert_parallel_reduce_seconds_total",
                "Time rank 0 spent summing the ranks' contributions (waiting for the slowest included).",
                c.reduce.as_secs_f64(),
            );
            counter(
                "llama4_expert_parallel_sent_bytes_total",
                "Bytes rank 0 broadcast to the group.",
                c.bytes_sent as f64,
            );
            counter(
                "llama4_expert_parallel_reduced_bytes_total",
                "Bytes of the contributions summed into rank 0.",
                c.bytes_reduced as f64,
            );
        }
        let _ = writeln!(
            out,
            "# HELP llama4_requests_finished_total Requests that ended, by reason.\n\
             # TYPE llama4_requests_finished_total counter"
        );
        for (reason, a) in [
            ("stop", &self.finished_stop),
            ("length", &self.finished_length),
            ("cancelled", &self.cancelled),
            ("error", &self.failed),
        ] {
            let _ = writeln!(
                out,
                "llama4_requests_finished_total{{reason=\"{reason}\"}} {}",
                get(a)
            );
        }
        let mut gauge = |name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "llama4_queue_depth",
            "Requests waiting for a slot.",
            get(&self.queue_depth),
        );
        gauge(
            "llama4_active_sequences",
            "Sequences holding a slot.",
            self.active.get(),
        );
        gauge(
            "llama4_batch_size",
            "Sequences in the last forward pass.",
            self.batch_size.get(),
        );
        gauge(
            "llama4_decode_tokens_per_second",
            "Decode tokens per second of the last forward pass that decoded.",
            self.decode_tokens_per_s.get(),
        );
        gauge(
            "llama4_kv_cache_bytes",
            "Bytes of key/value cache the slots hold.",
            self.kv_cache_bytes.get(),
        );
        let _ = writeln!(
            out,
            "# HELP llama4_http_responses_total HTTP responses by endpoint and status.\n\
             # TYPE llama4_http_responses_total counter"
        );
        if let Ok(map) = self.http.lock() {
            for ((endpoint, status), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "llama4_http_responses_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out
    }
}
