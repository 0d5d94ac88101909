#![deny(missing_docs)]
//! An OpenAI-compatible HTTP server for Llama 4 checkpoints.
//!
//! One engine thread owns the model and runs up to `parallel` sequences at once, each in its own
//! slot (a session with its key/value cache): requests join and leave between steps, long prompts
//! are prefilled in pieces so running streams keep decoding, a finished request's cache is
//! reused when the next prompt extends it, and a prompt prefix that another slot holds (running
//! or not) is taken from its cache pages, shared rather than copied or prefilled again
//! ([`engine`]). The HTTP handlers ([`api`]) parse, render
//! the chat template, tokenize, queue, and stream back what the engine sends.
//!
//! Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (both streamed as server-sent events with `"stream": true`),
//! `GET /metrics` (Prometheus text).
//!
//! ```no_run
//! let config = llama4_server::ServerConfig { port: 0, ..Default::default() };
//! let server = llama4_server::RunningServer::start(config)?; // the embedded demo model
//! println!("listening on {}", server.url());
//! # Ok::<(), llama4_server::Error>(())
//! ```

pub mod api;
pub mod engine;
mod error;
pub mod metrics;
pub mod openai;
pub mod stop;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use llama4_core::{KvDtype, QuantPolicy};
use llama4_model::{
    is_gguf_path, stop_ids, ChatTemplate, GgufModel, ImageTokenIds, LoadOptions, ModelConfig,
    MultimodalModel, SharedProgress, TerminalProgress, TextModel, Tokenizer,
};
use vision_encoder::Mmproj;

pub use error::{Error, Result};

use api::{AppState, Ready};
use engine::{Engine, EngineConfig, LoadedModel};
use metrics::Metrics;
use openai::SamplingDefaults;

/// The embedded demo model: what the server runs without `--model`.
pub const DEMO_MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo");

/// Default context limit per sequence when the checkpoint allows more.
pub const DEFAULT_CTX_SIZE: usize = 8192;

/// Everything the server is started with.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json), or a Llama 4 GGUF file
    /// (model, tokenizer, chat template and stop ids from the file).
    pub model_dir: PathBuf,
    /// With a GGUF model: llama.cpp's multimodal projector GGUF for it, so requests may carry
    /// images (the layout tokens' ids come from the model file's tokenizer).
    pub mmproj: Option<PathBuf>,
    /// Name reported by `/v1/models` and in responses (default: the directory's name).
    pub model_name: Option<String>,
    /// Address to bind.
    pub host: String,
    /// Port to bind (0: any free port).
    pub port: u16,
    /// Sequences run at once.
    pub parallel: usize,
    /// Context limit per sequence (default: the checkpoint's, at most [`DEFAULT_CTX_SIZE`]).
    pub ctx_size: Option<usize>,
    /// Requests that may wait for a slot; beyond, 503.
    pub queue_size: usize,
    /// Prompt tokens prefilled per engine step while some sequence decodes (see
    /// [`engine::EngineConfig::prefill_chunk`]).
    pub prefill_chunk: usize,
    /// How long an idle engine waits for more requests after one arrives (see
    /// [`engine::EngineConfig::batch_window`]).
    pub batch_window: std::time::Duration,
    /// Load-time quantisation.
    pub quantization: Option<QuantPolicy>,
    /// Required as `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// Request bodies beyond this many bytes get 413.
    pub max_body_bytes: usize,
    /// Storage of the key/value caches.
    pub kv_dtype: KvDtype,
    /// Bytes all slots' key/value caches may hold together (see
    /// [`engine::EngineConfig::kv_budget`]); `None`: no budget.
    pub kv_budget: Option<u64>,
    /// Draw a loading progress bar on stderr (nothing is drawn when stderr is not a terminal).
    pub load_progress: bool,
    /// Rank 0's transport of an expert-parallel group (`--expert-parallel` under `mpirun`): the
    /// model is loaded with [`expert_parallel::load_leader`], keeping only rank 0's share of
    /// every MoE layer's routed experts, and the other ranks run [`expert_parallel::run_worker`]
    /// on the same checkpoint (and `quantization`). They return once the engine drops the model
    /// at shutdown. Safetensors checkpoints only.
    pub expert_group: Option<Arc<dyn expert_parallel::Transport>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_dir: PathBuf::from(DEMO_MODEL_DIR),
            mmproj: None,
            model_name: None,
            host: "127.0.0.1".into(),
            port: 8080,
            parallel: 4,
            ctx_size: None,
            queue_size: 64,
            prefill_chunk: 512,
            batch_window: std::time::Duration::from_millis(5),
            quantization: None,
            api_key: None,
            max_body_bytes: 16 << 20,
            kv_dtype: KvDtype::F32,
            kv_budget: None,
            load_progress: false,
            expert_group: None,
        }
    }
}

/// Loads the checkpoint, tokenizer and chat template, and starts the engine.
fn load(config: &ServerConfig, metrics: Arc<Metrics>) -> Result<Ready> {
    let dir = &config.model_dir;
    let bar = config.load_progress.then(|| {
        let label = if config.quantization.is_some() {
            "loading + quantising"
        } else {
            "loading"
        };
        Arc::new(TerminalProgress::new(label))
    });
    let progress = bar.clone().map(|b| b as SharedProgress);
    let options = LoadOptions {
        quantization: config.quantization,
        progress: progress.clone(),
    };
    if is_gguf_path(dir) {
        if config.quantization.is_some() {
            return Err(Error::Config(
                "--quantize applies to safetensors checkpoints; a GGUF file runs in its stored types".into(),
            ));
        }
        if let Some(t) = &config.expert_group {
            // The workers wait for rank 0's first message.
            let _ = expert_parallel::stop_workers(t.as_ref());
            return Err(Error::Config(
                "--expert-parallel needs a safetensors checkpoint directory, not a GGUF file".into(),
            ));
        }
        let g = GgufModel::load_with_progress(dir, progress.clone())?;
        let template = g.chat_template()?;
        let tokenizer = g.tokenizer.map(|t| t.tokenizer);
        let model = match &config.mmproj {
            None => LoadedModel::Text(Arc::new(g.model)),
            Some(path) => {
                let tok = tokenizer.as_ref().ok_or_else(|| {
                    Error::Config(
                        "--mmproj needs the GGUF model's tokenizer (for the image tokens' ids)".into(),
                    )
                })?;
                let ids = ImageTokenIds::from_tokenizer(tok)?;
                let mmproj = Mmproj::load_with_progress(path, progress).map_err(llama4_model::Error::from)?;
                LoadedModel::Multimodal(MultimodalModel::from_parts(Arc::new(g.model), mmproj, ids)?)
            }
        };
        drop(bar);
        return start(config, metrics, model, tokenizer, g.stop_ids, template);
    }
    // First, so that any failure below stops the workers (dropping the leader does).
    let leader = match &config.expert_group {
        Some(t) => Some(expert_parallel::new_leader(dir, t.clone())?),
        None => None,
    };
    if let Some(l) = &leader {
        // Set once: loading runs once.
        let _ = metrics.expert_group.set(Arc::downgrade(l));
    }
    if config.mmproj.is_some() {
        return Err(Error::Config(
            "--mmproj goes with a GGUF --model; a checkpoint directory holds its own vision tower".into(),
        ));
    }
    let model_config = ModelConfig::from_dir(dir)?;
    // Without tokenizer.json the server takes token ids and answers with ids (benchmarks).
    let tokenizer = Tokenizer::from_dir(dir)?;
    let model = if model_config.multimodal.is_some() {
        let tok = tokenizer.as_ref().ok_or_else(|| {
            Error::Config(format!(
                "{} has no tokenizer.json (the image tokens' ids come from it)",
                dir.display()
            ))
        })?;
        let ids = ImageTokenIds::from_tokenizer(tok)?;
        // With a group, the model's MoE layers hold the leader: the group stops when the
        // engine drops the model.
        LoadedModel::Multimodal(match &leader {
            Some(l) => {
                MultimodalModel::load_with_options_and_moe(dir, ids, &options, &mut |i, scope, cfg| {
                    l.build_moe(i, scope, cfg)
                })?
            }
            None => MultimodalModel::load_with_options(dir, ids, &options)?,
        })
    } else {
        LoadedModel::Text(Arc::new(match &leader {
            Some(l) => TextModel::load_with_options_and_moe(dir, &options, &mut |i, scope, cfg| {
                l.build_moe(i, scope, cfg)
            })?,
            None => TextModel::load_with_options(dir, &options)?,
        }))
    };
    drop(bar);
    let stops = stop_ids(dir, model.text().config())?;
    let template = ChatTemplate::from_dir(dir)?;
    start(config, metrics, model, tokenizer, stops, template)
}

/// Starts the engine on a loaded model.
fn start(
    config: &ServerConfig,
    metrics: Arc<Metrics>,
    model: LoadedModel,
    tokenizer: Option<Tokenizer>,
    stops: Vec<u32>,
    template: ChatTemplate,
) -> Result<Ready> {
    let dir = &config.model_dir;
    let text = model.text().config();
    let ctx_size = config
        .ctx_size
        .unwrap_or_else(|| text.max_position_embeddings.min(DEFAULT_CTX_SIZE));
    if ctx_size == 0 {
        return Err(Error::Config("the context size must be at least 1".into()));
    }
    let vocab_size = text.vocab_size;
    let takes_images = model.multimodal().is_some();
    let model_name = config.model_name.clone().unwrap_or_else(|| {
        dir.canonicalize()
            .ok()
            // A GGUF file is named by its stem (`scout-Q4_K_M.gguf` → `scout-Q4_K_M`).
            .and_then(|d| match is_gguf_path(&d) {
                true => d.file_stem().map(|n| n.to_string_lossy().into_owned()),
                false => d.file_name().map(|n| n.to_string_lossy().into_owned()),
            })
            .unwrap_or_else(|| "llama4".into())
    });
    let tokenizer = tokenizer.map(Arc::new);
    let engine = Engine::start(
        Arc::new(model),
        tokenizer.clone(),
        stops,
        EngineConfig {
            parallel: config.parallel.max(1),
            ctx_size,
            queue_size: config.queue_size,
            prefill_chunk: config.prefill_chunk.max(1),
            batch_window: config.batch_window,
            kv_dtype: config.kv_dtype,
            kv_budget: config.kv_budget,
        },
        metrics,
    )?;
    Ok(Ready {
        engine,
        tokenizer,
        template,
        model_name,
        vocab_size,
        ctx_size,
        takes_images,
        defaults: SamplingDefaults::from_dir(dir),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

/// Serves on `listener` until `shutdown` completes. The socket answers at once (`/health` says
/// 503 while the model loads); `on_ready` hears when loading ended and how.
///
/// # Errors
/// When loading fails (the server then stops) or serving fails.
pub async fn serve(
    config: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: Option<std::sync::mpsc::Sender<std::result::Result<(), String>>>,
) -> Result<()> {
    let state = Arc::new(AppState {
        ready: OnceLock::new(),
        metrics: Arc::new(Metrics::default()),
        api_key: config.api_key.clone(),
    });
    let app = api::router(state.clone(), config.max_body_bytes);
    let server =
        tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await });
    let loader = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let ready = load(&config, state.metrics.clone())?;
            // Set once, here: the cell was empty.
            let _ = state.ready.set(ready);
            Ok::<(), Error>(())
        })
    };
    let loaded = loader
        .await
        .map_err(|e| Error::Start(format!("loading panicked: {e}")))
        .and_then(|r| r);
    if let Some(tx) = on_ready {
        let _ = tx.send(loaded.as_ref().map(|_| ()).map_err(|e| e.to_string()));
    }
    if let Err(e) = loaded {
        server.abort();
        return Err(e);
    }
    server
        .await
        .map_err(|e| Error::Start(format!("the server task failed: {e}")))?
        .map_err(|source| Error::Io {
            context: "serving".into(),
            source,
        })
}

/// A server running on its own thread and runtime (for tests and embedding): started with
/// [`RunningServer::start`], stopped when dropped.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl RunningServer {
    /// Binds `config.host:config.port` (port 0: a free port), loads the model and returns once
    /// the server answers requests.
    ///
    /// # Errors
    /// When binding or loading fails.
    pub fn start(config: ServerConfig) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|source| Error::Io {
                context: "starting the async runtime".into(),
                source,
            })?;
        let bind = format!("{}:{}", config.host, config.port);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(&bind))
            .map_err(|source| Error::Io {
                context: format!("binding {bind}"),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            context: "reading the bound address".into(),
            source,
        })?;
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("llama4-http".into())
            .spawn(move || {
                runtime.block_on(serve(
                    config,
                    listener,
                    async move {
                        let _ = stop.await;
                    },
                    Some(ready_tx),
                ))
            })
            .map_err(|e| Error::Start(format!("server thread: {e}")))?;
        let mut server = RunningServer {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(server),
            Ok(Err(_)) | Err(_) => match server.thread.take().map(|t| t.join()) {
                Some(Ok(Err(e))) => Err(e),
                _ => Err(Error::Start("the server stopped while loading".into())),
            },
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
