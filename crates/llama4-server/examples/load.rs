//! Load benchmark: N concurrent streamed completions (128-id prompts, 128 new tokens,
//! `ignore_eos`) against the server, for each N, printing aggregate decode tokens/s.
//!
//! ```text
//! # start a server in this process on the checkpoint (slots = the largest N):
//! cargo run --release -p llama4-server --example load -- --model /tmp/bench-mid
//! # or against a running server:
//! cargo run --release -p llama4-server --example load -- --url http://127.0.0.1:8080
//! ```
//!
//! Options: `--streams 1,4,8,16`, `--prompt-len 128`, `--new-tokens 128`, `--rounds 1` (the median
//! of several rounds is printed), `--warmup` (first an unmeasured round of the largest N, with
//! prompts of its own, so that a server just started is measured warm), `--api-key KEY`,
//! `--timeline` (each stream's first and last token times, on stderr).
//!
//! Per stream, decode rate = (tokens − 1) / (time of the last token − time of the first); the
//! aggregate is the sum over streams (they run side by side), also given as all tokens over the
//! wall time of the round (prefill included). "While all decode" counts the tokens every stream
//! received between the latest first token and the earliest last token, over that time: the
//! batched decode rate with every stream in the batch and no prompt being prefilled, which the
//! arrival order and the server's prefill schedule do not change. Streams carry text pieces,
//! and a server may hold back the tokens of an unfinished UTF-8 character and send them in one
//! piece (llama-server does), so a stream's pieces in the window are scaled by its tokens per
//! piece.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use llama4_server::{RunningServer, ServerConfig};
use serde_json::{json, Value};

struct Args {
    url: Option<String>,
    model: Option<PathBuf>,
    streams: Vec<usize>,
    prompt_len: usize,
    new_tokens: usize,
    rounds: usize,
    warmup: bool,
    api_key: Option<String>,
    timeline: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        url: None,
        model: None,
        streams: vec![1, 4, 8, 16],
        prompt_len: 128,
        new_tokens: 128,
        rounds: 1,
        warmup: false,
        api_key: None,
        timeline: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |s: String| s.parse::<usize>().map_err(|_| format!("bad number `{s}`"));
        match flag.as_str() {
            "--url" => a.url = Some(v()?),
            "--model" => a.model = Some(PathBuf::from(v()?)),
            "--streams" => {
                a.streams = v()?
                    .split(',')
                    .map(|s| num(s.trim().to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--prompt-len" => a.prompt_len = num(v()?)?,
            "--new-tokens" => a.new_tokens = num(v()?)?,
            "--rounds" => a.rounds = num(v()?)?.max(1),
            "--api-key" => a.api_key = Some(v()?),
            "--timeline" => a.timeline = true,
            "--warmup" => a.warmup = true,
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    if a.streams.is_empty() || a.streams.contains(&0) {
        return Err("--streams takes positive numbers".into());
    }
    Ok(a)
}

/// One stream's timings.
struct StreamResult {
    tokens: usize,
    /// When each non-empty text piece arrived (at least one).
    pieces: Vec<Instant>,
}

impl StreamResult {
    fn first(&self) -> Instant {
        self.pieces[0]
    }

    fn last(&self) -> Instant {
        self.pieces[self.pieces.len() - 1]
    }

    /// (tokens − 1) / (time of the last token − time of the first).
    fn decode_rate(&self) -> f64 {
        self.tokens.saturating_sub(1) as f64 / (self.last() - self.first()).as_secs_f64().max(1e-9)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3600)))
        .build()
        .into()
}

fn run_stream(
    url: &str,
    key: Option<&str>,
    prompt: &[u32],
    new_tokens: usize,
) -> Result<StreamResult, String> {
    let body = json!({
        "prompt": prompt, "max_tokens": new_tokens, "ignore_eos": true, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut req = agent().post(format!("{url}/v1/completions"));
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let resp = req.send(body.to_string()).map_err(|e| e.to_string())?;
    let (mut tokens, mut pieces) = (0, vec![]);
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        } else if v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
            pieces.push(Instant::now());
        }
    }
    if pieces.is_empty() {
        return Err("no tokens streamed".into());
    }
    Ok(StreamResult { tokens, pieces })
}

/// The round number whose prompts the warm-up round sends (no measured round has it).
const WARMUP_ROUND: usize = 0xff_ffff;

/// A prompt of `len` ids drawn from `[256, vocab)` with a fixed LCG, different per stream, per
/// number of streams `n` and per round, so that no run finds its prompts in the server's caches.
fn prompt(len: usize, vocab: usize, stream: usize, n: usize, round: usize) -> Vec<u32> {
    let seed = (round as u64) << 40 | (n as u64) << 20 | (stream as u64 + 1);
    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let span = vocab.saturating_sub(256).max(1) as u64;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (256.min(vocab as u64 - 1) + (x >> 33) % span) as u32
        })
        .collect()
}

/// Tokens per second over all streams while every stream was past its first token and before
/// its last (`None` when those spans do not overlap): each stream's pieces in that window times
/// its tokens per piece.
fn while_all_decode(results: &[StreamResult]) -> Option<f64> {
    let from = results.iter().map(StreamResult::first).max()?;
    let to = results.iter().map(StreamResult::last).min()?;
    let span = to.checked_duration_since(from)?.as_secs_f64();
    let tokens: f64 = results
        .iter()
        .map(|r| {
            let within = r.pieces.iter().filter(|&&t| t > from && t <= to).count();
            // The pieces after the first carry the tokens after the first.
            let per_piece =
                r.tokens.saturating_sub(1) as f64 / r.pieces.len().saturating_sub(1).max(1) as f64;
            within as f64 * per_piece
        })
        .sum();
    (span > 0.0).then(|| tokens / span)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let max_streams = args.streams.iter().copied().max().unwrap_or(1);
    let _server;
    let url = match (&args.url, &args.model) {
        (Some(u), _) => u.trim_end_matches('/').to_string(),
        (None, model) => {
            let config = ServerConfig {
                model_dir: model
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(llama4_server::DEMO_MODEL_DIR)),
                port: 0,
                parallel: max_streams,
                queue_size: max_streams,
                ctx_size: Some(args.prompt_len + args.new_tokens),
                api_key: args.api_key.clone(),
                ..Default::default()
            };
            let server = RunningServer::start(config)?;
            let url = server.url();
            _server = server;
            url
        }
    };
    let mut req = agent().get(format!("{url}/v1/models"));
    if let Some(k) = &args.api_key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let models: Value = serde_json::from_str(&req.call()?.body_mut().read_to_string()?)?;
    let vocab = models["data"][0]["meta"]["n_vocab"].as_u64().unwrap_or(32_000) as usize;
    let counts: Vec<String> = args.streams.iter().map(usize::to_string).collect();
    println!(
        "model {} at {url}: {} concurrent streams of {}-id prompts, {} new tokens each (ignore_eos), {} round(s){}",
        models["data"][0]["id"],
        counts.join(", "),
        args.prompt_len,
        args.new_tokens,
        args.rounds,
        if args.warmup { " after a warm-up round" } else { "" }
    );
    println!(
        "streams  decode tok/s (sum of streams)  while all decode  tok/s (all tokens / wall)  mean time to first token"
    );
    let run_round = |n: usize, round: usize| -> Result<(Instant, Vec<StreamResult>), String> {
        let started = Instant::now();
        let results: Vec<Result<StreamResult, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let (url, key) = (&url, args.api_key.as_deref());
                    let p = prompt(args.prompt_len, vocab, i, n, round);
                    s.spawn(move || run_stream(url, key, &p, args.new_tokens))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("stream thread panicked".into())))
                .collect()
        });
        Ok((started, results.into_iter().collect::<Result<Vec<_>, _>>()?))
    };
    if args.warmup {
        run_round(max_streams, WARMUP_ROUND)?;
    }
    for &n in &args.streams {
        let (mut decode, mut steady, mut overall, mut ttft) = (vec![], vec![], vec![], vec![]);
        for round in 0..args.rounds {
            let (started, results) = run_round(n, round)?;
            let wall = started.elapsed().as_secs_f64();
            if args.timeline {
                for (i, r) in results.iter().enumerate() {
                    let at = |t: Instant| (t - started).as_secs_f64();
                    eprintln!(
                        "  stream {i:>2}: first token {:.3} s, last {:.3} s, {:.1} tok/s",
                        at(r.first()),
                        at(r.last()),
                        r.decode_rate()
                    );
                }
            }
            decode.push(results.iter().map(StreamResult::decode_rate).sum::<f64>());
            steady.extend(while_all_decode(&results));
            overall.push(results.iter().map(|r| r.tokens).sum::<usize>() as f64 / wall);
            ttft.push(
                results
                    .iter()
                    .map(|r| (r.first() - started).as_secs_f64())
                    .sum::<f64>()
                    / n as f64,
            );
        }
        let steady = if steady.is_empty() {
            "-".to_string()
        } else {
            format!("{:.1}", median(steady))
        };
        println!(
            "{n:>7}  {:>30.1}  {steady:>16}  {:>25.1}  {:>22.2} s",
            median(decode),
            median(overall),
            median(ttft)
        );
    }
    Ok(())
}
