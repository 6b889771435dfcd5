//! Subcommands: one module each, holding its clap arguments and a `run` that calls the library.

mod quantize;

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
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Quantize(a) => quantize::run(a),
    }
}
