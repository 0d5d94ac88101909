//! Generate text with a Llama 4 checkpoint.
//!
//! ```text
//! cargo run --release --example generate                      # the embedded demo model
//! cargo run --release --example generate -- --model DIR --prompt "Hello" --chat
//! ```
//!
//! Options (this command line is an interface other tools rely on):
//! ```text
//! --model DIR|FILE.gguf  checkpoint directory (default: the embedded demo model), or a Llama 4
//!                      GGUF file as llama.cpp writes it (tokenizer, chat template and stop ids
//!                      from its metadata; weights run in their stored ggml types)
//! --prompt TEXT | --prompt-ids 1,2,3
//! --chat               render the prompt as a user turn with the checkpoint's chat template (the
//!                      Llama 4 template when it has none)
//! --system TEXT        with --chat (implied): a system message first
//! --conversation FILE  with --chat (implied): earlier messages, a JSON array of OpenAI-style
//!                      messages ({"role": "system"|"user"|"assistant"|"tool", "content": ...});
//!                      --prompt, if given, is appended as the last user turn
//! --image FILE         repeatable; each <|image|> in the prompt takes the next
//! --mmproj FILE        with a GGUF --model and --image: the vision tower and projector from
//!                      llama.cpp's multimodal projector GGUF (`convert_hf_to_gguf.py --mmproj`);
//!                      image tokens' ids from the model file's tokenizer
//! --max-new-tokens N   --temperature T (0, or below 1e-5, = greedy)   --top-k K   --top-p P   --seed S
//! --ignore-eos
//! --cache f32|bf16|f16|q8  key/value cache storage (default f32; q8 is int8 with one scale per
//!                      token and head)
//! --dump-logits FILE   safetensors with one tensor "logits", F32 [generated, vocab]; row r holds the
//!                      logits that chose generated token r (row 0 comes from the prompt's last position)
//! --check-weights      scan every tensor for NaN/Inf after loading and name the first that holds one
//! --json               print one JSON object as the last line of stdout with prompt_ids, generated_ids,
//!                      text, prefill_tokens_per_s, decode_tokens_per_s
//! --quantize q8|q4|fp8 quantise weights at load time (int8 / int4, symmetric, one scale per group;
//!                      or float8 e4m3 with one scale per output row, activations kept f32);
//!                      by default only the MoE experts; never embeddings, norms, router, vision tower
//! --quantize-all       with --quantize: also every other projection of the text decoder (attention,
//!                      shared expert, dense MLP, lm_head)
//! --quant-group N      input features per scale: a multiple of 32 dividing every quantised weight's
//!                      input width (default 32)
//! --quant-scales f32|f16  storage of the scales (default f32)
//! --expert-parallel   share the routed experts of every MoE layer among the ranks of an MPI job
//!                      (`mpirun -np N generate --model DIR ... --expert-parallel`; needs a build
//!                      with `--features mpi`): rank 0 prints, the others only serve their experts
//! --save-quantized DIR write the quantised checkpoint to DIR (model.safetensors with `llama4.quant`
//!                      metadata, plus config and tokenizer files) and exit; with --prompt or
//!                      --prompt-ids, generate afterwards with the checkpoint just written
//! ```
//! A checkpoint saved quantised loads as is (`--model DIR`, no `--quantize` needed) and is never
//! requantised.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use expert_parallel::Transport;
use llama4_core::input::{read_capped, Cap};
use llama4_core::{KvDtype, QuantFormat, QuantPolicy, QuantScope, QuantSpec, ScaleType};
use llama4_examples::{check_output_dir, check_output_file, parse_kv_dtype, utf8_args};
use llama4_model::{
    check_chat_tokens, check_text_only_prompt, is_gguf_path, quantize_checkpoint_with_progress, stop_ids,
    ChatOptions, ChatTemplate, GenerateOptions, GgufModel, ImageTokenIds, LoadOptions, ModelConfig,
    MultimodalModel, SamplingConfig, Session, SharedProgress, StreamDecoder, TerminalProgress, TextModel,
    Tokenizer,
};
use vision_encoder::Mmproj;

/// `println!` that returns an error when stdout is closed (`generate | head`) instead of
/// panicking.
macro_rules! outln {
    ($fmt:literal; no newline) => {{
        let mut out = std::io::stdout();
        write!(out, $fmt).and_then(|()| out.flush()).map_err(stdout_error)?
    }};
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).map_err(stdout_error)?
    };
}

/// A failed write to stdout, said as such.
fn stdout_error(e: std::io::Error) -> Box<dyn std::error::Error> {
    format!("cannot write to stdout: {e}").into()
}

/// The embedded demo model and the prompt it is shown with.
const DEMO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo");
const DEMO_PROMPT_FILE: &str = "default_prompt.txt";

#[derive(Debug, Default)]
struct Args {
    model: Option<PathBuf>,
    prompt: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    chat: bool,
    system: Option<String>,
    conversation: Option<PathBuf>,
    images: Vec<PathBuf>,
    mmproj: Option<PathBuf>,
    max_new_tokens: Option<usize>,
    sampling: SamplingConfig,
    ignore_eos: bool,
    /// `None`: f32.
    cache: Option<KvDtype>,
    dump_logits: Option<PathBuf>,
    check_weights: bool,
    json: bool,
    quantize: Option<QuantFormat>,
    quantize_all: bool,
    quant_group: Option<usize>,
    quant_scales: Option<ScaleType>,
    save_quantized: Option<PathBuf>,
    expert_parallel: bool,
}

impl Args {
    /// The load-time quantisation asked for.
    fn quant_policy(&self) -> Option<QuantPolicy> {
        let spec = match self.quantize? {
            QuantFormat::F8E4M3 => QuantSpec::fp8(),
            format => QuantSpec::new(format, self.quant_group.unwrap_or(32)),
        }
        .with_scales(self.quant_scales.unwrap_or(ScaleType::F32));
        let scope = if self.quantize_all {
            QuantScope::AllLinear
        } else {
            QuantScope::Experts
        };
        Some(llama4_model::quant_policy(spec, scope))
    }
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = utf8_args().map_err(|e| e.to_string())?;
    fn value<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
        let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
        v.parse().map_err(|_| format!("{flag}: cannot parse `{v}`"))
    }
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--model" => a.model = Some(value(&flag, it.next())?),
            "--prompt" => a.prompt = Some(value(&flag, it.next())?),
            "--prompt-ids" => {
                let list: String = value(&flag, it.next())?;
                let ids = list
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<u32>()
                            .map_err(|_| format!("--prompt-ids: bad id `{s}`"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                a.prompt_ids = Some(ids);
            }
            "--chat" => a.chat = true,
            "--system" => {
                a.system = Some(value(&flag, it.next())?);
                a.chat = true;
            }
            "--conversation" => {
                a.conversation = Some(value(&flag, it.next())?);
                a.chat = true;
            }
            "--image" => a.images.push(value(&flag, it.next())?),
            "--mmproj" => a.mmproj = Some(value(&flag, it.next())?),
            "--max-new-tokens" => a.max_new_tokens = Some(value(&flag, it.next())?),
            "--temperature" => a.sampling.temperature = value(&flag, it.next())?,
            "--top-k" => a.sampling.top_k = Some(value(&flag, it.next())?),
            "--top-p" => a.sampling.top_p = Some(value(&flag, it.next())?),
            "--seed" => a.sampling.seed = value(&flag, it.next())?,
            "--ignore-eos" => a.ignore_eos = true,
            "--cache" => a.cache = Some(parse_kv_dtype(&flag, it.next().as_deref())?),
            "--dump-logits" => a.dump_logits = Some(value(&flag, it.next())?),
            "--check-weights" => a.check_weights = true,
            "--json" => a.json = true,
            "--quantize" => {
                let name: String = value(&flag, it.next())?;
                a.quantize = Some(
                    QuantFormat::parse(&name)
                        .ok_or_else(|| format!("--quantize takes q8, q4 or fp8, not `{name}`"))?,
                );
            }
            "--quantize-all" => a.quantize_all = true,
            "--quant-group" => a.quant_group = Some(value(&flag, it.next())?),
            "--quant-scales" => {
                let name: String = value(&flag, it.next())?;
                a.quant_scales = Some(
                    ScaleType::parse(&name)
                        .ok_or_else(|| format!("--quant-scales takes f32 or f16, not `{name}`"))?,
                );
            }
            "--save-quantized" => a.save_quantized = Some(value(&flag, it.next())?),
            "--expert-parallel" => a.expert_parallel = true,
            "-h" | "--help" => {
                // Nothing to report if stdout is closed: exit all the same.
                let _ = writeln!(
                    std::io::stdout(),
                    "{}",
                    include_str!("generate.rs")
                        .lines()
                        .skip(8)
                        .take_while(|l| *l != "//! ```")
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown option `{other}` (see --help)")),
        }
    }
    // Every rank parses the same arguments: what is refused here stops every rank alike.
    if a.expert_parallel && a.save_quantized.is_some() {
        return Err("--save-quantized does not combine with --expert-parallel".into());
    }
    if a.mmproj.is_some() && a.images.is_empty() {
        return Err("--mmproj needs --image (without images only the text model runs)".into());
    }
    if a.mmproj.is_some() && a.expert_parallel {
        return Err(
            "--mmproj does not combine with --expert-parallel (a GGUF model runs on one process)".into(),
        );
    }
    if a.prompt.is_some() && a.prompt_ids.is_some() {
        return Err("give --prompt or --prompt-ids, not both".into());
    }
    if a.quantize.is_none()
        && (a.quantize_all
            || a.quant_group.is_some()
            || a.quant_scales.is_some()
            || a.save_quantized.is_some())
    {
        return Err(
            "--quantize-all, --quant-group, --quant-scales and --save-quantized need --quantize q8|q4|fp8"
                .into(),
        );
    }
    if a.quantize == Some(QuantFormat::F8E4M3) && a.quant_group.is_some() {
        return Err("--quant-group does not apply to fp8 (one scale per output row)".into());
    }
    if let Some(policy) = a.quant_policy() {
        policy
            .spec
            .check_group()
            .map_err(|e| format!("--quant-group: {e}"))?;
    }
    // Output paths are checked before any work, not found wrong after a generation.
    if let Some(path) = &a.dump_logits {
        check_output_file("--dump-logits", path)?;
    }
    if let Some(path) = &a.save_quantized {
        check_output_dir("--save-quantized", path)?;
    }
    Ok(a)
}

fn main() -> ExitCode {
    // MPI is initialised before anything runs and finalised after everything is dropped.
    #[cfg(feature = "mpi")]
    let mpi = if std::env::args_os().skip(1).any(|a| a == "--expert-parallel") {
        match expert_parallel::Mpi::init() {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    #[cfg(feature = "mpi")]
    let group: Option<Arc<dyn Transport>> = mpi.as_ref().map(|m| m.transport() as Arc<dyn Transport>);
    #[cfg(not(feature = "mpi"))]
    let group: Option<Arc<dyn Transport>> = None;
    let rank = group.as_ref().map_or(0, |t| t.rank());
    let result = match group {
        Some(t) if t.rank() != 0 => serve_experts(t),
        group => run(group),
    };
    #[cfg(feature = "mpi")]
    drop(mpi);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if rank > 0 => {
            eprintln!("rank {rank}: error: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--expert-parallel` on ranks 1 and up: loads this rank's share of the experts and serves
/// rank 0 until it stops; prints nothing on success.
fn serve_experts(transport: Arc<dyn Transport>) -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let dir = args.model.clone().unwrap_or_else(|| PathBuf::from(DEMO_DIR));
    expert_parallel::run_worker(&dir, args.quant_policy(), transport)?;
    Ok(())
}

fn run(group: Option<Arc<dyn Transport>>) -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    if args.expert_parallel && group.is_none() {
        return Err("--expert-parallel needs a build with `--features mpi`, run under mpirun".into());
    }
    let mut dir = args.model.clone().unwrap_or_else(|| PathBuf::from(DEMO_DIR));
    let mut policy = args.quant_policy();
    if let (Some(out), Some(p)) = (&args.save_quantized, &policy) {
        let started = Instant::now();
        let bar = Arc::new(TerminalProgress::new("quantising"));
        let summary = quantize_checkpoint_with_progress(&dir, out, p, Some(bar.clone() as SharedProgress))
            .map_err(|e| quant_error(e, p))?;
        bar.finish();
        eprintln!(
            "saved {}: {} tensors quantised ({} {} {}, {} scales), {} copied, {:.2} MB → {:.2} MB in {:.1} s",
            summary.path.display(),
            summary.quantized,
            p.scope.name(),
            p.spec.format.name(),
            group_label(&p.spec),
            p.spec.scales.name(),
            summary.copied,
            summary.bytes_in as f64 / 1e6,
            summary.bytes_out as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        if args.prompt.is_none() && args.prompt_ids.is_none() {
            return Ok(());
        }
        // Go on with the checkpoint just written: it loads without requantising.
        dir = out.clone();
        policy = None;
    }
    let load_started = Instant::now();
    // A bar on stderr while loading (and quantising); nothing is drawn unless stderr is a terminal.
    let bar = Arc::new(TerminalProgress::new(match policy {
        Some(_) => "loading + quantising",
        None => "loading",
    }));
    let options = LoadOptions {
        quantization: policy,
        progress: Some(bar.clone() as SharedProgress),
    };
    if args.mmproj.is_some() && !is_gguf_path(&dir) {
        return Err(
            "--mmproj goes with a GGUF --model; a checkpoint directory holds its own vision tower".into(),
        );
    }
    // A GGUF file: the text model, tokenizer, chat template and stop ids all come from it.
    let gguf = if is_gguf_path(&dir) {
        if !args.images.is_empty() && args.mmproj.is_none() {
            return Err(
                "--image with a GGUF model needs --mmproj FILE (the vision tower's projector GGUF)".into(),
            );
        }
        if policy.is_some() {
            return Err(
                "--quantize applies to safetensors checkpoints; a GGUF file runs in its stored types".into(),
            );
        }
        if group.is_some() {
            return Err("--expert-parallel needs a safetensors checkpoint directory, not a GGUF file".into());
        }
        let g = GgufModel::load_with_progress(&dir, options.progress.clone())?;
        let chat = if args.chat { Some(g.chat_template()?) } else { None };
        Some((g, chat))
    } else {
        None
    };
    let mut gguf_facts = None;
    // What a text prompt without a tokenizer is told.
    let mut no_tokenizer = "this checkpoint has no tokenizer.json: use --prompt-ids".to_string();
    // With --expert-parallel, rank 0's share of the experts; the group stops when it is dropped.
    let mut leader = None;
    // Without --image only the text model is loaded (a multimodal checkpoint then runs as text).
    let (text_model, multimodal, tokenizer) = if let Some((g, chat)) = gguf {
        gguf_facts = Some((g.stop_ids, g.weight_bytes, chat));
        if let Some(reason) = &g.tokenizer_unsupported {
            eprintln!(
                "warning: {}: {reason}; the model runs on --prompt-ids only",
                dir.display()
            );
            no_tokenizer = format!("{}: {reason}: use --prompt-ids", dir.display());
        }
        let tokenizer = g.tokenizer.map(|t| t.tokenizer);
        match &args.mmproj {
            None => (Some(g.model), None, tokenizer),
            Some(path) => {
                let tok = tokenizer
                    .as_ref()
                    .ok_or("--mmproj needs the GGUF model's tokenizer (for the image tokens' ids)")?;
                let ids = ImageTokenIds::from_tokenizer(tok)?;
                let mmproj = Mmproj::load_with_progress(path, options.progress.clone())?;
                let mm = MultimodalModel::from_parts(Arc::new(g.model), mmproj, ids)?;
                (None, Some(mm), tokenizer)
            }
        }
    } else if args.images.is_empty() {
        let model = match group {
            Some(t) => {
                let (model, l) = expert_parallel::load_leader(&dir, policy, t)?;
                leader = Some(l);
                model
            }
            None => TextModel::load_with_options(&dir, &options).map_err(|e| match &policy {
                Some(p) => quant_error(e, p),
                None => e.into(),
            })?,
        };
        (Some(model), None, Tokenizer::from_dir(&dir)?)
    } else {
        if ModelConfig::from_dir(&dir)?.multimodal.is_none() {
            return Err(format!(
                "--image needs a multimodal checkpoint with a vision tower; {} is text-only",
                dir.display()
            )
            .into());
        }
        let tokenizer = Tokenizer::from_dir(&dir)?;
        let tok = tokenizer
            .as_ref()
            .ok_or("--image needs the checkpoint's tokenizer.json (for the image tokens' ids)")?;
        let ids = ImageTokenIds::from_tokenizer(tok)?;
        let mm = match group {
            Some(t) => {
                let (mm, l) = expert_parallel::load_leader_multimodal(&dir, ids, policy, t)?;
                leader = Some(l);
                mm
            }
            None => MultimodalModel::load_with_options(&dir, ids, &options).map_err(|e| match &policy {
                Some(p) => quant_error(e, p),
                None => e.into(),
            })?,
        };
        (None, Some(mm), tokenizer)
    };
    bar.finish();
    let model: &TextModel = match (&text_model, &multimodal) {
        (Some(m), _) => m,
        (None, Some(mm)) => mm.text(),
        (None, None) => unreachable!("one of them is loaded above"),
    };
    if args.check_weights {
        model
            .checkpoint()
            .ok_or("--check-weights scans safetensors checkpoints, not GGUF files")?
            .check_finite()?;
    }
    let load_time = load_started.elapsed();
    let weight_bytes = match (model.checkpoint(), &gguf_facts) {
        (Some(c), _) => c.weight_bytes(),
        (None, Some((_, bytes, _))) => *bytes as usize,
        (None, None) => 0,
    };

    let prompt_text = match (&args.prompt, &args.prompt_ids) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(_)) => None,
        // A conversation file without --prompt is the whole chat.
        (None, None) if args.conversation.is_some() => Some(String::new()),
        (None, None) => {
            let path = dir.join(DEMO_PROMPT_FILE);
            if !path.exists() {
                return Err(format!(
                    "no --prompt given and {} has no {DEMO_PROMPT_FILE}",
                    dir.display()
                )
                .into());
            }
            let bytes = read_capped(&path, Cap::TEXT)?;
            let text = String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
            Some(text.trim_end_matches('\n').to_string())
        }
    };
    let prompt_ids = match (&prompt_text, &args.prompt_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => {
            let tok = tokenizer.as_ref().ok_or(no_tokenizer.as_str())?;
            if args.chat {
                // Refused when the tokenizer lacks a special token the chat format writes.
                check_chat_tokens(tok)?;
                let template = match &gguf_facts {
                    Some((_, _, Some(t))) => t,
                    _ => &ChatTemplate::from_dir(&dir)?,
                };
                tok.encode_with(&render_chat(template, &args, text)?, false)?
            } else {
                tok.encode(text)?
            }
        }
        (None, None) => unreachable!("one of them is set above"),
    };

    // Without --image, a multimodal checkpoint runs as text: image tokens in the prompt would
    // be embedded as ordinary tokens, so they are refused.
    if args.images.is_empty() && gguf_facts.is_none() {
        if let Some(tok) = &tokenizer {
            if ModelConfig::from_dir(&dir)?.multimodal.is_some() {
                if let Ok(ids) = ImageTokenIds::from_tokenizer(tok) {
                    check_text_only_prompt(&prompt_ids, &ids)
                        .map_err(|e| format!("{e}: give one --image per <|image|>"))?;
                }
            }
        }
    }
    let stops = match &gguf_facts {
        _ if args.ignore_eos => vec![],
        Some((ids, _, _)) => ids.clone(),
        None => stop_ids(&dir, model.config())?,
    };
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens.unwrap_or(64),
        sampling: args.sampling,
        stop_ids: stops.clone(),
        keep_logits: args.dump_logits.is_some(),
    };

    // Each <|image|> of the prompt takes the next image; the model sees the expanded prompt.
    let prepared = match &multimodal {
        Some(mm) => {
            let images = args
                .images
                .iter()
                .map(|path| mm.encode_image_file(path))
                .collect::<Result<Vec<_>, _>>()?;
            if !args.json {
                for (path, image) in args.images.iter().zip(&images) {
                    let (rows, cols) = image.aspect_ratio;
                    outln!(
                        "image: {} ({rows}×{cols} tiles{}, {} image tokens)",
                        path.display(),
                        if rows * cols > 1 { " + global" } else { "" },
                        image.features.nrows()
                    );
                }
            }
            Some(mm.prepare(&prompt_ids, &images)?)
        }
        None => None,
    };

    if !args.json {
        match (&prompt_text, &tokenizer) {
            (Some(t), _) if !args.chat => outln!("prompt: {t}"),
            (_, Some(tok)) => outln!("prompt: {}", tok.decode(&prompt_ids)?),
            _ => outln!("prompt ids: {prompt_ids:?}"),
        }
        outln!("answer: "; no newline);
    }
    let mut session = Session::new(model, args.cache.unwrap_or(KvDtype::F32))?;
    let mut stream = StreamDecoder::with_stop_ids(&stops);
    let mut stream_err: Option<Box<dyn std::error::Error>> = None;
    let on_token = |id| {
        if !args.json && !stops.contains(&id) {
            let piece = match &tokenizer {
                Some(tok) => stream.push(tok, id).map_err(Into::into),
                None => Ok(format!("{id} ")),
            };
            let shown = piece.and_then(|p| {
                let mut out = std::io::stdout();
                write!(out, "{p}")
                    .and_then(|()| out.flush())
                    .map_err(stdout_error)
            });
            if let Err(e) = shown {
                stream_err = Some(e);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    };
    let generation = match prepared {
        Some(p) => session.generate_with_embeddings(&p.ids, p.embeddings, &options, on_token),
        None => session.generate(&prompt_ids, &options, on_token),
    }
    .map_err(generation_error)?;
    if let Some(e) = stream_err {
        return Err(e);
    }

    if let (Some(path), Some(logits)) = (&args.dump_logits, &generation.logits) {
        dump_logits(path, logits)?;
    }
    let shown = generation.answer_ids();
    let text = match &tokenizer {
        Some(tok) => tok.decode(shown)?,
        None => String::new(),
    };
    if args.json {
        let out = serde_json::json!({
            "prompt_ids": generation.prompt_ids,
            "generated_ids": generation.generated_ids,
            "text": text,
            "prefill_tokens_per_s": generation.prefill_tokens_per_s(),
            "decode_tokens_per_s": generation.decode_tokens_per_s(),
            "weight_bytes": weight_bytes,
            "load_s": load_time.as_secs_f64(),
        });
        outln!("{out}");
    } else {
        outln!();
        let cache = session.cache_memory();
        outln!(
            "prefill: {} tokens in {:.1} ms ({:.1} tokens/s)",
            generation.prompt_ids.len(),
            generation.prefill_time.as_secs_f64() * 1e3,
            generation.prefill_tokens_per_s()
        );
        outln!(
            "decode:  {} tokens in {:.1} ms ({:.1} tokens/s)",
            generation.decode_steps,
            generation.decode_time.as_secs_f64() * 1e3,
            generation.decode_tokens_per_s()
        );
        outln!(
            "memory:  weights {:.2} MB mapped, KV cache {:.1} KB (chunked layers {:.1} KB, global layers {:.1} KB), peak RSS {:.1} MB",
            weight_file_bytes(&dir) as f64 / 1e6,
            cache.total() as f64 / 1e3,
            cache.chunked as f64 / 1e3,
            cache.global as f64 / 1e3,
            peak_rss_bytes().unwrap_or(0) as f64 / 1e6
        );
        let quantized = model.checkpoint().map_or(0, |c| c.quantized_weights());
        outln!(
            "weights: {:.2} MB loaded in {:.1} ms, {quantized} tensors quantised{}",
            weight_bytes as f64 / 1e6,
            load_time.as_secs_f64() * 1e3,
            match policy {
                Some(p) if quantized > 0 => format!(
                    " ({} {} {}, {} scales, at load time)",
                    p.scope.name(),
                    p.spec.format.name(),
                    group_label(&p.spec),
                    p.spec.scales.name()
                ),
                None if quantized > 0 => " (stored quantised)".to_string(),
                _ => String::new(),
            }
        );
        if let Some(l) = &leader {
            let c = l.stats();
            outln!(
                "experts: {} ranks, this one holds experts {:?} of each MoE layer; {:.1} ms in communication \
                 over {} layer calls ({} rows; {:.2} MB sent, {:.2} MB reduced)",
                l.size(),
                l.experts(),
                c.comm().as_secs_f64() * 1e3,
                c.calls,
                c.rows,
                c.bytes_sent as f64 / 1e6,
                c.bytes_reduced as f64 / 1e6
            );
        }
    }
    Ok(())
}

/// The chat prompt: `--system`, the messages of `--conversation`, then `user` as the last user
/// turn (unless empty), rendered with the checkpoint's chat template.
fn render_chat(
    template: &ChatTemplate,
    args: &Args,
    user: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(serde_json::json!({"role": "system", "content": system}));
    }
    if let Some(path) = &args.conversation {
        let bytes = read_capped(path, Cap::JSON)?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        // Either a bare array of messages or a request body with `messages`.
        let list = value
            .get("messages")
            .unwrap_or(&value)
            .as_array()
            .ok_or_else(|| format!("{}: expected a JSON array of messages", path.display()))?;
        messages.extend(list.iter().cloned());
    }
    if !user.is_empty() || messages.is_empty() {
        messages.push(serde_json::json!({"role": "user", "content": user}));
    }
    let options = ChatOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    Ok(template.render(&messages, &options)?)
}

/// A quantisation error with what to do about it: most often a group size that does not divide
/// a weight's input width.
fn quant_error(e: llama4_model::Error, policy: &QuantPolicy) -> Box<dyn std::error::Error> {
    let text = e.to_string();
    if text.contains("not a multiple of the group size") {
        format!(
            "{text}\n--quant-group {} does not divide that weight's input width: choose a multiple of 32 \
             that divides it{}",
            policy.spec.group,
            if policy.scope == QuantScope::AllLinear {
                ", or drop --quantize-all"
            } else {
                ""
            }
        )
        .into()
    } else {
        e.into()
    }
}

/// A generation error with the flag that fixes it.
fn generation_error(e: llama4_model::Error) -> Box<dyn std::error::Error> {
    match e {
        llama4_model::Error::MaxNewTokens { most, .. } => {
            format!("{e}\nlower --max-new-tokens to at most {most}").into()
        }
        llama4_model::Error::NonFiniteLogits { .. } => {
            format!("{e}\nrun with --check-weights to find the tensor").into()
        }
        e => e.into(),
    }
}

/// Writes `logits` `[generated, vocab]` as the one F32 tensor "logits".
fn dump_logits(path: &Path, logits: &ndarray::Array2<f32>) -> Result<(), Box<dyn std::error::Error>> {
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, logits.shape().to_vec(), &bytes)?;
    safetensors::serialize_to_file([("logits", view)], None, path)?;
    Ok(())
}

/// Bytes of the checkpoint's safetensors files (memory-mapped, not copied).
fn weight_file_bytes(dir: &Path) -> u64 {
    if dir.is_file() {
        return dir.metadata().map_or(0, |m| m.len());
    }
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter(|e| e.file_name() != "reference.safetensors")
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Peak resident set size of this process (Linux `VmHWM`).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// How a spec groups its scales, for messages: `group N`, or one scale per row for fp8.
fn group_label(spec: &QuantSpec) -> String {
    match spec.format {
        QuantFormat::F8E4M3 => "one scale per row".to_string(),
        _ => format!("group {}", spec.group),
    }
}
