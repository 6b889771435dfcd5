//! `quarry serve [MODEL] [--host H] [--port P] [--parallel N]`: the OpenAI- and ollama-compatible HTTP server.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use quarry::engine::Engine;
use quarry::engine::scheduler::SchedulerConfig;
use quarry::hub::registry::Registry;
use quarry::server::{ConnectionLimits, Loaded, ServeConfig, serve_with};

/// Serve a model over HTTP with the OpenAI and ollama APIs (/v1/chat/completions, /v1/completions, /api/chat,
/// ...): several requests decoded together; greedy replies equal `quarry run` on the same messages.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file or an installed model, by name or by the repo id it was pulled from (default: the registry's
    /// default model, once pulled).
    #[arg(value_name = "MODEL")]
    pub model: Option<PathBuf>,
    /// Each sequence's context in tokens (default: the model's, at most 8192).
    #[arg(long, short = 'c', value_name = "N")]
    pub ctx_size: Option<usize>,
    /// Prompt tokens per forward step (shared by all sequences' prompt chunks).
    #[arg(long, short = 'b', value_name = "N", default_value_t = quarry::generate::DEFAULT_BATCH)]
    pub batch: usize,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't', value_name = "N", value_parser = super::common::parse_threads)]
    pub threads: Option<usize>,
    /// How the KV cache stores keys and values: f32, f16 or q8_0 (default f16 for a quantized
    /// model, f32 for a float one).
    #[arg(long, value_name = "TYPE")]
    pub cache_type: Option<quarry::model::KvType>,
    /// Address to listen on (loopback by default: only this machine can connect).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests decoded together; more wait for a slot.
    #[arg(long, short = 'P', value_name = "N", default_value_t = 4)]
    pub parallel: usize,
    /// Positions of KV cache for all sequences together (default: --parallel x the context, in whole 64-position blocks).
    #[arg(long, value_name = "TOKENS")]
    pub kv_pool: Option<usize>,
    /// Requests that may wait for a slot; beyond them a request gets 503 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_queue: usize,
    /// Requests must send `Authorization: Bearer KEY` (all routes but /health).
    #[arg(
        long,
        value_name = "KEY",
        env = "QUARRY_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Seconds a client may take to send a request's header (from connecting, for its first request); its
    /// connection is closed beyond, so idle and slow clients cannot hold connections for ever.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_seconds)]
    pub header_timeout: f64,
    /// Seconds a kept-alive connection may stay idle after its last reply before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = parse_seconds)]
    pub idle_timeout: f64,
    /// Seconds a request's body may take to arrive after its header; 408 beyond.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = parse_seconds)]
    pub body_timeout: f64,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds in (0, 86400]")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let arg = args
        .model
        .clone()
        .unwrap_or_else(|| PathBuf::from(&Registry::builtin().default));
    let path = super::common::resolve_model(&arg)?;
    super::common::init_threads(args.threads)?;
    // The id clients see: an installed model's name as given (its file is always `model.gguf`), else the file's.
    let model_name = if arg.is_file() {
        arg.file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
    } else {
        arg.to_string_lossy().into_owned()
    };
    let cfg = ServeConfig {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        model_name: model_name.clone(),
        max_queue: args.max_queue,
        max_body_bytes: 8 << 20,
        shutdown_grace: Duration::from_secs(30),
    };
    // Listening starts before the model is opened (`/health` answers 503 meanwhile).
    let limits = ConnectionLimits {
        header_timeout: Duration::from_secs_f64(args.header_timeout),
        idle_timeout: Duration::from_secs_f64(args.idle_timeout),
        body_timeout: Duration::from_secs_f64(args.body_timeout),
    };
    serve_with(cfg, limits, move || {
        load(&path, &model_name, &args).map_err(|e| super::format::error_chain(&e))
    })?;
    Ok(())
}

/// Opens the model and sizes the scheduler from it and the arguments.
fn load(path: &std::path::Path, model_name: &str, args: &Args) -> anyhow::Result<Loaded> {
    let engine = Engine::open_for_text(path)?;
    let max = engine.model.config.context_length;
    // Each sequence's limit: the model's context, capped at 8192 unless asked for (a 128k context for every
    // sequence would reserve a pool nobody uses).
    let context = args.ctx_size.unwrap_or(max.min(8192));
    if context == 0 || context > max {
        bail!("--ctx-size {context} is outside 1..={max}, the context this model was trained for");
    }
    let pool_tokens = args
        .kv_pool
        .unwrap_or_else(|| SchedulerConfig::pool_for(args.parallel, context));
    if pool_tokens < context {
        bail!(
            "--kv-pool {pool_tokens} is smaller than one sequence's context ({context}); raise it"
        );
    }
    let cache_type = args
        .cache_type
        .unwrap_or_else(|| engine.default_cache_type());
    let scheduler = SchedulerConfig {
        pool_tokens,
        cache_type,
        step_tokens: args.batch.max(args.parallel),
        ..SchedulerConfig::new(args.parallel, context)
    };
    let bytes = pool_tokens * cache_type.bytes_per_token(&engine.model.config);
    eprintln!(
        "{model_name}: {} sequences at a time, {context} positions each; KV pool {pool_tokens} positions ({cache_type}, {:.1} MiB at most)",
        args.parallel,
        bytes as f64 / (1 << 20) as f64
    );
    Ok(Loaded { engine, scheduler })
}
