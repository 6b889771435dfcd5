//! Options and helpers shared by several subcommands.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Which model file and how much room to give it.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF model file, or an installed model: its name (`quarry list`) or the Hugging Face repo id it was
    /// pulled from (org/name).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long, short = 'c', value_name = "N")]
    pub ctx_size: Option<usize>,
    /// Prompt tokens per forward pass.
    #[arg(long, short = 'b', value_name = "N", default_value_t = quarry::generate::DEFAULT_BATCH)]
    pub batch: usize,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't', value_name = "N", value_parser = super::common::parse_threads)]
    pub threads: Option<usize>,
    /// How the KV cache stores keys and values: f32, f16 or q8_0 (default f16 for a quantized
    /// model, f32 for a float one; `logits` always defaults to f32).
    #[arg(long, value_name = "TYPE")]
    pub cache_type: Option<quarry::model::KvType>,
}

/// A MODEL argument to the GGUF file it names: a path, an installed model's name (or the repo id it was pulled
/// from); a registry model that is not installed yet is an error saying which `quarry pull` to run.
pub fn resolve_model(arg: &Path) -> anyhow::Result<PathBuf> {
    // Without a store folder (no $QUARRY_HOME, no cache folder), paths still work.
    let store = quarry::hub::store::Store::from_env().ok();
    let registry = quarry::hub::registry::Registry::builtin();
    Ok(quarry::hub::store::resolve_model(
        arg,
        store.as_ref(),
        &registry,
    )?)
}

/// A `--type` value (q4_0, q4_k_m, ...; any case), for clap.
pub fn parse_type(s: &str) -> Result<quarry_quantize::TargetType, String> {
    s.parse()
}

/// Parses `1,2,3` (spaces allowed) into token ids.
pub fn parse_ids(text: &str) -> anyhow::Result<Vec<u32>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("'{s}' is not a token id (expected e.g. 1,2,3)"))
        })
        .collect()
}

/// Writes `path` through a temporary file in the same folder, renamed over it only when complete, so that an
/// error or a kill never leaves a partial file under the real name.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let Some(name) = path.file_name() else {
        bail!("{} is not a file path", path.display())
    };
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".part");
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let result = (|| {
        let mut out = BufWriter::new(File::create(&tmp)?);
        write(&mut out)?;
        out.flush()?;
        out.get_ref().sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(())
}

/// How a command prints its result: for people, or one JSON object for scripts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

/// The most worker threads any command starts (ggml's own limit): far more threads than cores only slows the
/// work down, and a count in the thousands would spend minutes creating threads.
pub const MAX_THREADS: usize = 512;

/// `--threads N` of every command: a whole number in 1..=[`MAX_THREADS`].
pub fn parse_threads(s: &str) -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        Ok(n) => Err(format!(
            "{n} threads is outside 1..={MAX_THREADS} (this machine has {cores} cores)"
        )),
        Err(_) => Err(format!("'{s}' is not a number of threads")),
    }
}

/// `-n/--max-tokens N` of `run` and `chat` (and `/set max_tokens` in the chat): a whole number of at least 1.
/// 0 is refused everywhere rather than meaning "nothing" in one command and "no limit" in another; leaving the
/// option out is what means no limit.
pub fn parse_max_tokens(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err(
            "0 would generate nothing; leave -n out for no limit (until the end-of-text token or a full context)"
                .to_string(),
        ),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a whole number of tokens")),
    }
}

/// Sizes rayon's global pool once, before any work: `--threads`, else every core.
pub fn init_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        builder = builder.num_threads(n);
    }
    builder
        .build_global()
        .context("starting the worker threads")
}

impl ModelArgs {
    /// The context size for a prompt of `prompt_len` tokens: `--ctx-size`, else the engine's default; a prompt
    /// that does not fit is an error here, before any work.
    pub fn context_for(
        &self,
        engine: &quarry::engine::Engine,
        prompt_len: usize,
    ) -> anyhow::Result<usize> {
        let max = engine.model.config.context_length;
        let ctx = self.ctx_size.unwrap_or_else(|| engine.default_context());
        if ctx == 0 || ctx > max {
            bail!("--ctx-size {ctx} is outside 1..={max}, the context this model was trained for");
        }
        if prompt_len > ctx {
            bail!(
                "the prompt has {prompt_len} tokens but the context holds {ctx}{}; shorten the prompt",
                if ctx < max {
                    format!(" (raise --ctx-size, up to {max})")
                } else {
                    String::new()
                }
            );
        }
        Ok(ctx)
    }
}

/// Sampling options shared by `run` and `chat`; defaults are llama.cpp's.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy (always the most likely token).
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40, allow_negative_numbers = true)]
    pub top_k: usize,
    /// Keep the most likely tokens up to this total probability (1 = all).
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one (0 = none).
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Penalty for repeating recent tokens (1 = none).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty considers.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    pub repeat_last_n: usize,
    /// Random seed: the same seed gives the same text (default: a new one each run).
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self) -> anyhow::Result<quarry::sampling::SamplingParams> {
        let seed = self.seed.unwrap_or_else(quarry::sampling::fresh_seed);
        let p = quarry::sampling::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
        };
        p.validate().map_err(anyhow::Error::msg)?;
        Ok(p)
    }
}
