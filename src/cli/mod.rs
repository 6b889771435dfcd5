//! Subcommands: one module each, holding its clap arguments and a `run` that calls the library.

mod bench;
mod common;
mod info;
mod logits;
mod perplexity;
mod quantize;
mod run;
mod synth;
mod tokenize;

use clap::{Parser, Subcommand};

/// Quantize IBM Granite 3.x models to GGUF and run them fast on a CPU, offline.
#[derive(Parser, Debug)]
#[command(name = "quarry", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Convert a Hugging Face snapshot folder (config.json, safetensors, tokenizer) into one GGUF file.
    Quantize(quantize::Args),
    /// Generate a reply to a prompt (chat template applied) and stream it to stdout.
    Run(run::Args),
    /// Show the token ids of a text or of a rendered conversation.
    Tokenize(tokenize::Args),
    /// Show a model file's architecture, sizes, tensor types and memory needs.
    Info(info::Args),
    /// Write the logits of every prompt position to a .npy file.
    Logits(logits::Args),
    /// Measure prompt and generation speed like llama-bench (same JSON records with -o json).
    Bench(bench::Args),
    /// Measure perplexity over a text, and the KL divergence from a base model, like llama-perplexity.
    Perplexity(perplexity::Args),
    /// Write a random-weight GGUF with the exact layout of a registry model, to measure speed without its weights.
    Synth(synth::Args),
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Quantize(a) => quantize::run(a),
        Command::Info(a) => info::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Run(a) => {
            common::init_threads(a.model.threads)?;
            run::run(a)
        }
        Command::Tokenize(a) => tokenize::run(a),
        Command::Logits(a) => {
            common::init_threads(a.model.threads)?;
            logits::run(a)
        }
        Command::Perplexity(a) => {
            common::init_threads(a.threads)?;
            perplexity::run(a)
        }
    }
}
