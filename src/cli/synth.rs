//! `quarry synth MODEL -o OUT.gguf [--type q4_0]`: a random-weight GGUF with the exact layout of a registry model.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use quarry::hub::registry::Registry;
use quarry_quantize::hf::HfConfig;
use quarry_quantize::{SynthOptions, TargetType, synthesize};

use super::format::{plural, type_counts};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model of the registry (models.toml), e.g. granite-3.0-1b-a400m-instruct.
    pub model: String,

    /// The GGUF file to write. It appears only when complete (written as OUT.part, then renamed).
    #[arg(short, long, value_name = "OUT.gguf")]
    pub output: PathBuf,

    /// Weight type, with the same recipe as `quarry quantize`: q4_0 (output head kept at q8_0), q4_k_m, q5_k_m,
    /// q6_k, iq4_nl, iq4_xs, q8_0, f16 or f32.
    #[arg(long = "type", value_name = "TYPE", default_value = "q4_0")]
    pub target: TargetType,

    /// Type of the output head (the tied token embedding, or output.weight) and of an untied input embedding.
    /// Default for the head: q8_0 in a q4_0 file, q6_k in a k-quant mix or an iq4 type (q8_0 when its rows are not
    /// whole 256-blocks), else the --type; an untied input embedding gets the --type's base type.
    #[arg(long, value_name = "TYPE")]
    pub embedding_type: Option<TargetType>,

    /// A folder holding the model's tokenizer.json and tokenizer_config.json, embedded as `quarry quantize` would.
    /// Default: a synthetic byte-level vocabulary of the model's size.
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,

    /// Seed of the random weights: the same seed writes the same file.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Worker threads (default: one per core).
    #[arg(long, short = 't', value_name = "N", value_parser = super::common::parse_threads)]
    pub threads: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let registry = Registry::builtin();
    let model = registry.get(&args.model)?;
    let origin = format!("models.toml [{}]", model.name);
    let config = HfConfig::parse(Path::new(&origin), &model.config_json())?;
    let options = SynthOptions {
        embedding_type: args.embedding_type,
        tokenizer: args.tokenizer,
        seed: args.seed,
        // Says what the file is wherever the name is shown (`quarry info`, llama.cpp's log).
        model_name: format!("{} (random weights, seed {})", model.name, args.seed),
        progress: std::io::stderr().is_terminal(),
        threads: args.threads,
        ..SynthOptions::new(config, &args.output, args.target)
    };
    let report = synthesize(&options).with_context(|| format!("synth {} failed", args.model))?;
    println!(
        "wrote {} ({} with random weights, {}, seed {}): {} ({}), {:.1} MiB in {:.1} s",
        report.output.display(),
        model.name,
        report.target,
        args.seed,
        plural(report.tensors.len(), "tensor", "tensors"),
        type_counts(&report.type_counts()),
        report.file_bytes as f64 / (1024.0 * 1024.0),
        report.elapsed.as_secs_f64(),
    );
    Ok(())
}
