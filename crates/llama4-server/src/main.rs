//! `llama4-server`: an OpenAI-compatible HTTP server for a Llama 4 checkpoint.
//!
//! ```text
//! cargo run --release -p llama4-server                        # the embedded demo model on :8080
//! cargo run --release -p llama4-server -- --model DIR --parallel 8 --port 8000
//! ```
//!
//! Options:
//! ```text
//! --model DIR|FILE.gguf  checkpoint directory (default: the embedded demo model, models/demo), or
//!                        a Llama 4 GGUF file (tokenizer, chat template, stop ids from its metadata)
//! --mmproj FILE          with a GGUF --model: llama.cpp's multimodal projector GGUF for it
//!                        (`convert_hf_to_gguf.py --mmproj`), so requests may carry images
//! --alias NAME           model name in /v1/models and in responses (default: the directory's
//!                        name, or the GGUF file's without `.gguf`)
//! --host ADDR            address to bind (default 127.0.0.1)
//! --port N               port (default 8080; 0 picks a free one)
//! --parallel N           sequences run at once (default 4)
//! --ctx-size N           context limit per sequence in tokens (default: the checkpoint's, at most 8192)
//! --queue-size N         requests that may wait for a slot; beyond, 503 (default 64)
//! --prefill-chunk N      prompt tokens prefilled per engine step while a stream decodes (default
//!                        512; four times as many while none does)
//! --batch-window-ms N    after a request reaches an idle server, wait up to N ms for more so
//!                      that a burst starts together (default 5; 0: start at once)
//! --kv-cache f32|bf16|f16|q8  key/value cache storage (default f32; q8: int8, one scale per
//!                      token and head); `--kv-dtype` is the same flag
//! --kv-budget-mib N      MiB of key/value cache all sequences may hold together; a request
//!                        whose prompt and max_tokens do not fit beside the running ones waits
//!                        (default: no budget)
//! --quantize q8|q4|fp8   quantise weights at load time, as examples/generate.rs does
//! --quantize-all         with --quantize: every projection of the text decoder, not only the experts
//! --quant-group N        input features per scale (default 32)
//! --quant-scales f32|f16 storage of the scales (default f32)
//! --api-key KEY          require `Authorization: Bearer KEY` (also from LLAMA4_API_KEY)
//! --max-body-bytes N     request bodies beyond N bytes get 413 (default 16 MiB)
//! --expert-parallel      share the routed experts of every MoE layer among the ranks of an MPI
//!                        job (`mpirun -np N llama4-server --model DIR --expert-parallel`; needs a
//!                        build with `--features mpi`): rank 0 serves HTTP, the others hold and
//!                        run their experts, and exit when rank 0 shuts down
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use llama4_core::{KvDtype, QuantFormat, QuantScope, QuantSpec, ScaleType};
use llama4_server::{serve, ServerConfig};

/// Prints one line to stderr in a single write. `eprintln!` writes each formatted piece
/// separately (stderr is unbuffered), so under `mpirun` the lines of two ranks could interleave
/// mid-line and garble the address a script reads from the log.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut line = format!($($arg)*);
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

/// The environment variable the API key may come from.
const API_KEY_ENV: &str = "LLAMA4_API_KEY";

/// What the command line asks for.
#[derive(Debug)]
struct Args {
    config: ServerConfig,
    /// `--expert-parallel`: run as one rank of an MPI job.
    expert_parallel: bool,
}

/// The configuration from the arguments after the program name.
fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut c = ServerConfig {
        api_key: std::env::var(API_KEY_ENV).ok().filter(|k| !k.is_empty()),
        // A bar on stderr while loading; indicatif draws nothing when stderr is not a terminal.
        load_progress: true,
        ..ServerConfig::default()
    };
    let mut expert_parallel = false;
    let (mut format, mut all, mut group, mut scales) = (None, false, None, None);
    fn value<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
        let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
        v.parse().map_err(|_| format!("{flag}: cannot parse `{v}`"))
    }
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--model" => c.model_dir = value::<PathBuf>(&flag, it.next())?,
            "--mmproj" => c.mmproj = Some(value::<PathBuf>(&flag, it.next())?),
            "--alias" => c.model_name = Some(value(&flag, it.next())?),
            "--host" => c.host = value(&flag, it.next())?,
            "--port" => c.port = value(&flag, it.next())?,
            "--parallel" | "-np" => c.parallel = value(&flag, it.next())?,
            "--ctx-size" | "-c" => c.ctx_size = Some(value(&flag, it.next())?),
            "--queue-size" => c.queue_size = value(&flag, it.next())?,
            "--prefill-chunk" => c.prefill_chunk = value(&flag, it.next())?,
            "--batch-window-ms" => {
                c.batch_window = std::time::Duration::from_millis(value(&flag, it.next())?)
            }
            "--kv-cache" | "--kv-dtype" => {
                let name: String = value(&flag, it.next())?;
                c.kv_dtype = KvDtype::parse(&name)
                    .ok_or_else(|| format!("{flag} takes {}, not `{name}`", KvDtype::SPELLINGS))?;
            }
            "--kv-budget-mib" => {
                let mib: u64 = value(&flag, it.next())?;
                c.kv_budget = Some(
                    mib.checked_mul(1 << 20)
                        .ok_or_else(|| format!("{flag} {mib} overflows"))?,
                );
            }
            "--quantize" => {
                let name: String = value(&flag, it.next())?;
                format = Some(
                    QuantFormat::parse(&name)
                        .ok_or_else(|| format!("--quantize takes q8, q4 or fp8, not `{name}`"))?,
                );
            }
            "--quantize-all" => all = true,
            "--quant-group" => group = Some(value(&flag, it.next())?),
            "--quant-scales" => {
                let name: String = value(&flag, it.next())?;
                scales = Some(
                    ScaleType::parse(&name)
                        .ok_or_else(|| format!("--quant-scales takes f32 or f16, not `{name}`"))?,
                );
            }
            "--api-key" => c.api_key = Some(value(&flag, it.next())?),
            "--max-body-bytes" => c.max_body_bytes = value(&flag, it.next())?,
            "--expert-parallel" => expert_parallel = true,
            "-h" | "--help" => {
                let help: Vec<&str> = include_str!("main.rs")
                    .lines()
                    .skip_while(|l| *l != "//! Options:")
                    .skip(2)
                    .take_while(|l| *l != "//! ```")
                    .map(|l| l.trim_start_matches("//! "))
                    .collect();
                println!(
                    "llama4-server: an OpenAI-compatible server for Llama 4\n\n{}",
                    help.join("\n")
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown option `{other}` (see --help)")),
        }
    }
    if c.parallel == 0 {
        return Err("--parallel must be at least 1".into());
    }
    match format {
        None if all || group.is_some() || scales.is_some() => {
            return Err("--quantize-all, --quant-group and --quant-scales need --quantize q8|q4|fp8".into())
        }
        None => {}
        Some(f) => {
            let spec = match f {
                QuantFormat::F8E4M3 if group.is_some() => {
                    return Err("--quant-group does not apply to fp8 (one scale per output row)".into())
                }
                QuantFormat::F8E4M3 => QuantSpec::fp8(),
                f => QuantSpec::new(f, group.unwrap_or(32)),
            }
            .with_scales(scales.unwrap_or(ScaleType::F32));
            spec.check_group().map_err(|e| format!("--quant-group: {e}"))?;
            let scope = if all {
                QuantScope::AllLinear
            } else {
                QuantScope::Experts
            };
            c.quantization = Some(llama4_model::quant_policy(spec, scope));
        }
    }
    Ok(Args {
        config: c,
        expert_parallel,
    })
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            say!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !args.expert_parallel {
        return run_server(args.config);
    }
    expert_parallel(args.config)
}

/// `--expert-parallel`: rank 0 serves with its share of the experts, the other ranks serve
/// theirs to it. MPI is initialised before anything runs and finalised after everything that
/// uses it is dropped.
#[cfg(feature = "mpi")]
fn expert_parallel(mut config: ServerConfig) -> ExitCode {
    use expert_parallel::Transport;

    let mpi = match expert_parallel::Mpi::init() {
        Ok(m) => m,
        Err(e) => {
            say!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let transport = mpi.transport();
    let (rank, size) = (transport.rank(), transport.size());
    let code = if rank == 0 {
        config.expert_group = Some(transport);
        run_server(config)
    } else {
        say!(
            "llama4-server: rank {rank} of {size}: loading its share of the experts of {}",
            config.model_dir.display()
        );
        match expert_parallel::run_worker(&config.model_dir, config.quantization, transport) {
            Ok((worker, stats)) => {
                let s = stats.unwrap_or_default();
                say!(
                    "llama4-server: rank {rank}: rank 0 stopped; exiting (experts {:?}: {} layer calls, \
                     {:.1} ms on its experts)",
                    worker.experts(),
                    s.calls,
                    s.compute.as_secs_f64() * 1e3
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                say!("llama4-server: rank {rank}: error: {e}");
                ExitCode::FAILURE
            }
        }
    };
    drop(mpi);
    code
}

#[cfg(not(feature = "mpi"))]
fn expert_parallel(_: ServerConfig) -> ExitCode {
    say!("error: --expert-parallel needs a build with `--features mpi`, run under mpirun");
    ExitCode::FAILURE
}

/// Serves HTTP until SIGINT or SIGTERM; returns once the engine (and the model) is dropped.
fn run_server(config: ServerConfig) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve_http(config))
}

async fn serve_http(config: ServerConfig) -> ExitCode {
    let bind = format!("{}:{}", config.host, config.port);
    let listener = match tokio::net::TcpListener::bind(&bind).await {
        Ok(l) => l,
        Err(e) => {
            say!("error: cannot bind {bind}: {e}");
            if let Some(t) = &config.expert_group {
                // The workers wait for rank 0's first message.
                let _ = expert_parallel::stop_workers(t.as_ref());
            }
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or(bind);
    say!(
        "llama4-server: loading {} ({} slots); listening on http://{addr}",
        config.model_dir.display(),
        config.parallel
    );
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(Ok(())) = ready_rx.recv() {
            say!("llama4-server: model loaded; ready");
        }
    });
    let shutdown = async {
        shutdown_signal().await;
        say!("llama4-server: shutting down");
    };
    match serve(config, listener, shutdown, Some(ready_tx)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT (Ctrl-C), or SIGTERM (what service managers and `mpirun` send to stop a job).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServerConfig, String> {
        parse_args(args.iter().map(|a| a.to_string())).map(|a| a.config)
    }

    #[test]
    fn batch_window_flag_is_in_milliseconds() {
        use std::time::Duration;
        assert_eq!(parse(&[]).unwrap().batch_window, Duration::from_millis(5));
        assert_eq!(
            parse(&["--batch-window-ms", "0"]).unwrap().batch_window,
            Duration::ZERO
        );
        assert_eq!(
            parse(&["--batch-window-ms", "20"]).unwrap().batch_window,
            Duration::from_millis(20)
        );
        assert!(parse(&["--batch-window-ms", "-1"]).is_err());
    }

    #[test]
    fn kv_cache_flag_takes_every_format_and_names_bad_values() {
        assert_eq!(parse(&[]).unwrap().kv_dtype, KvDtype::F32);
        for (name, dtype) in [
            ("f32", KvDtype::F32),
            ("bf16", KvDtype::BF16),
            ("f16", KvDtype::F16),
            ("q8", KvDtype::Q8),
        ] {
            assert_eq!(parse(&["--kv-cache", name]).unwrap().kv_dtype, dtype);
            assert_eq!(parse(&["--kv-dtype", name]).unwrap().kv_dtype, dtype);
        }
        assert_eq!(
            parse(&["--kv-cache", "q4"]).err().unwrap(),
            "--kv-cache takes f32, bf16, f16 or q8, not `q4`"
        );
        assert_eq!(
            parse(&["--kv-dtype", "int8"]).err().unwrap(),
            "--kv-dtype takes f32, bf16, f16 or q8, not `int8`"
        );
        assert_eq!(parse(&["--kv-cache"]).err().unwrap(), "--kv-cache needs a value");
        assert_eq!(parse(&[]).unwrap().kv_budget, None);
        assert_eq!(parse(&["--kv-budget-mib", "3"]).unwrap().kv_budget, Some(3 << 20));
        assert!(parse(&["--kv-budget-mib", "-1"]).is_err());
        assert!(parse(&["--kv-budget-mib", &u64::MAX.to_string()]).is_err());
    }
}
