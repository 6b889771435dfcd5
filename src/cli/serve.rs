//! `quarry serve MODEL [--host H] [--port P] [--parallel N]`: the OpenAI-compatible HTTP server.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use quarry::engine::Engine;
use quarry::engine::scheduler::SchedulerConfig;
use quarry::server::{ServeConfig, serve};

use super::common::ModelArgs;

/// Serve a model over HTTP with the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models): several
/// requests decoded together; greedy replies equal `quarry run` on the same messages.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (loopback by default: only this machine can connect).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests decoded together; more wait for a slot.
    #[arg(long, short = 'P', value_name = "N", default_value_t = 4)]
    pub parallel: usize,
    /// Positions of KV cache for all sequences together (default: --parallel x the context).
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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let engine = Engine::open_for_text(&args.model.model)?;
    let max = engine.model.config.context_length;
    // Each sequence's limit: the model's context, capped at 8192 unless asked for (a 128k context for every
    // sequence would reserve a pool nobody uses).
    let context = args.model.ctx_size.unwrap_or(max.min(8192));
    if context == 0 || context > max {
        bail!("--ctx-size {context} is outside 1..={max}, the context this model was trained for");
    }
    let pool_tokens = args.kv_pool.unwrap_or(args.parallel * context);
    if pool_tokens < context {
        bail!(
            "--kv-pool {pool_tokens} is smaller than one sequence's context ({context}); raise it"
        );
    }
    let cache_type = args
        .model
        .cache_type
        .unwrap_or_else(|| engine.default_cache_type());
    let scheduler = SchedulerConfig {
        pool_tokens,
        cache_type,
        step_tokens: args.model.batch.max(args.parallel),
        ..SchedulerConfig::new(args.parallel, context)
    };
    let model_name = args
        .model
        .model
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let bytes = pool_tokens * cache_type.bytes_per_token(&engine.model.config);
    eprintln!(
        "{model_name}: {} sequences at a time, {context} positions each; KV pool {pool_tokens} positions ({cache_type}, {:.1} MiB at most)",
        args.parallel,
        bytes as f64 / (1 << 20) as f64
    );
    let cfg = ServeConfig {
        host: args.host,
        port: args.port,
        api_key: args.api_key.filter(|k| !k.is_empty()),
        scheduler,
        model_name,
        max_queue: args.max_queue,
        max_body_bytes: 8 << 20,
        shutdown_grace: Duration::from_secs(30),
    };
    serve(Arc::new(engine), cfg)?;
    Ok(())
}
