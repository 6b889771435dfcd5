//! Random-weight GGUF files with exactly the layout the converter writes for a config: the same tensor names,
//! shapes and types (the same `convert::plan` and type recipe), the same metadata (the same
//! builder), only the values are drawn at random. They let speed be measured, and regressions caught, for a model
//! whose weights are not at hand; llama.cpp loads them like any converted file.
//!
//! The tokenizer is either a real one (a folder with `tokenizer.json`, embedded exactly as the converter embeds
//! it) or a synthetic byte-level BPE vocabulary of the model's size (module `vocab`). Values are drawn per tensor
//! and per fixed-size task from a seed, so a file depends on the seed alone, not on the thread count, and blocks
//! are written straight as random quants with a plausible scale (module `values`) instead of quantizing floats.

mod values;
mod vocab;

use std::path::PathBuf;
use std::time::Instant;

use crate::convert::metadata;
use crate::convert::output::write_gguf;
use crate::convert::plan;
use crate::convert::vocab::Vocab;
use crate::convert::{ConvertReport, TargetType, on_pool};
use crate::error::ConvertError;
use crate::hf::HfConfig;

pub use vocab::{MAX_SYNTHETIC_VOCAB_SIZE, MIN_SYNTHETIC_VOCAB_SIZE};

use self::vocab::synthetic_tokenizer;

/// What to synthesize, into what.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// The model's shape (from a registry entry or a `config.json`).
    pub config: HfConfig,
    /// The GGUF file to write (replaced only once the new one is complete).
    pub output: PathBuf,
    pub target: TargetType,
    /// As [`ConvertOptions::embedding_type`](crate::ConvertOptions::embedding_type).
    pub embedding_type: Option<TargetType>,
    /// A folder with the model's `tokenizer.json` (and `tokenizer_config.json`, ...), embedded as the converter
    /// embeds it; `None` writes a synthetic byte-level vocabulary of `config.vocab_size` tokens.
    pub tokenizer: Option<PathBuf>,
    /// Same seed, same file.
    pub seed: u64,
    /// `general.name`.
    pub model_name: String,
    /// Draw a progress bar on stderr; indicatif hides it when stderr is not a terminal.
    pub progress: bool,
    /// Worker threads; `None` uses rayon's global pool (one per core).
    pub threads: Option<usize>,
}

impl SynthOptions {
    /// Seed 0, the synthetic vocabulary, the recipe's embedding type, named "synthetic".
    pub fn new(config: HfConfig, output: impl Into<PathBuf>, target: TargetType) -> SynthOptions {
        SynthOptions {
            config,
            output: output.into(),
            target,
            embedding_type: None,
            tokenizer: None,
            seed: 0,
            model_name: "synthetic".to_string(),
            progress: false,
            threads: None,
        }
    }
}

/// Writes the random-weight GGUF file `opts.output` (through `OUT.part`, like the converter).
pub fn synthesize(opts: &SynthOptions) -> Result<ConvertReport, ConvertError> {
    on_pool(opts.threads, || synthesize_on_current_pool(opts))
}

fn synthesize_on_current_pool(opts: &SynthOptions) -> Result<ConvertReport, ConvertError> {
    let started = Instant::now();
    let config = &opts.config;
    let tensors = plan::plan(config, opts.target, opts.embedding_type);
    let vocab = match &opts.tokenizer {
        Some(dir) => Vocab::load(dir, config.vocab_size)?,
        None => Vocab::from_sources(synthetic_tokenizer(config.vocab_size)?, config.vocab_size)?,
    };
    let metadata = metadata::build(config, &vocab, &tensors, opts.target, &opts.model_name);
    drop(vocab);
    let file_bytes = write_gguf(
        &opts.output,
        metadata,
        &tensors,
        opts.progress,
        |tensor, sink| {
            let values = values::Distribution::of(tensor.role, config);
            values::write_random_tensor(sink, tensor, values, opts.seed)
        },
    )?;
    Ok(ConvertReport::new(
        &opts.output,
        config,
        opts.target,
        tensors,
        file_bytes,
        started,
    ))
}
