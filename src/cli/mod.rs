//! Subcommands: one module each, holding its clap arguments and a `run` that calls the library.

mod batch;
mod bench;
mod chat;
mod common;
pub mod format;
mod import;
mod info;
mod list;
mod logits;
mod perplexity;
mod pull;
mod quantize;
mod rm;
mod run;
mod serve;
mod show;
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
    /// Chat with a model in the terminal (replies stream; Ctrl-C stops one; /help lists the commands).
    Chat(chat::Args),
    /// Convert a Hugging Face snapshot folder (config.json, safetensors, tokenizer) into one GGUF file, or
    /// requantize a GGUF file.
    Quantize(quantize::Args),
    /// Generate a reply to a prompt (chat template applied) and stream it to stdout; no prompt: the chat.
    Run(run::Args),
    /// Generate replies for many requests (JSON lines) at once, several decoded together; resumable.
    Batch(batch::Args),
    /// Serve a model over HTTP with the OpenAI API, several requests decoded together.
    Serve(serve::Args),
    /// Show the token ids of a text or of a rendered conversation.
    Tokenize(tokenize::Args),
    /// Show a model's parameters, sizes, chat template and license (as `ollama show`).
    Show(show::Args),
    /// Show a model file's architecture, sizes, tensor types and memory needs.
    Info(info::Args),
    /// Write the logits of every prompt position to a .npy file.
    Logits(logits::Args),
    /// Measure prompt and generation speed like llama-bench (same JSON records with -o json).
    Bench(bench::Args),
    /// Measure perplexity over a text, and the KL divergence from a base model, like llama-perplexity.
    Perplexity(perplexity::Args),
    /// Download a model from Hugging Face, verify it, convert it and install it.
    Pull(pull::Args),
    /// Install a model from a Hugging Face folder or a GGUF file on this machine (no network needed).
    Import(import::Args),
    /// List the installed models (--available: the registry's).
    List(list::Args),
    /// Remove an installed model.
    Rm(rm::Args),
    /// Write a random-weight GGUF with the exact layout of a registry model, to measure speed without its weights.
    Synth(synth::Args),
}

/// The kernel sets `QUARRY_KERNEL` can name, on any CPU (`quarry info` prints the one in use).
const KERNEL_SETS: [&str; 6] = [
    "scalar",
    "portable",
    "avx2",
    "avxvnni",
    "avx512vnni",
    "avx512amx",
];

/// A `QUARRY_KERNEL` that names no kernel set at all is a typo, refused before any work; a real set this CPU lacks
/// gets the library's warning and the best available set.
fn check_kernel_env() -> anyhow::Result<()> {
    if let Some(want) = std::env::var_os("QUARRY_KERNEL") {
        let want = want.to_string_lossy();
        if !KERNEL_SETS.contains(&want.as_ref()) {
            let here: Vec<&str> = quarry::kernels::available()
                .iter()
                .map(|k| k.name)
                .collect();
            anyhow::bail!(
                "QUARRY_KERNEL={} is not a kernel set: the sets are {}, and this CPU has {}; unset it to use the best",
                format::shown(&want, false),
                KERNEL_SETS.join(", "),
                here.join(", ")
            );
        }
    }
    Ok(())
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    check_kernel_env()?;
    match cli.command {
        Command::Quantize(a) => quantize::run(a),
        Command::Info(mut a) => {
            a.model = common::resolve_model(&a.model)?;
            info::run(a)
        }
        Command::Show(mut a) => {
            a.model = common::resolve_model(&a.model)?;
            show::run(a)
        }
        Command::Bench(mut a) => {
            a.model = common::resolve_model(&a.model)?;
            bench::run(a)
        }
        Command::Synth(a) => synth::run(a),
        Command::Run(mut a) => {
            a.model.model = common::resolve_model(&a.model.model)?;
            common::init_threads(a.model.threads)?;
            run::run(a)
        }
        Command::Batch(mut a) => {
            a.model.model = common::resolve_model(&a.model.model)?;
            common::init_threads(a.model.threads)?;
            batch::run(a)
        }
        Command::Serve(a) => serve::run(a),
        Command::Tokenize(mut a) => {
            a.model = common::resolve_model(&a.model)?;
            tokenize::run(a)
        }
        Command::Logits(mut a) => {
            a.model.model = common::resolve_model(&a.model.model)?;
            common::init_threads(a.model.threads)?;
            logits::run(a)
        }
        Command::Perplexity(mut a) => {
            a.model = common::resolve_model(&a.model)?;
            if let Some(base) = &a.kl_base {
                a.kl_base = Some(common::resolve_model(base)?);
            }
            common::init_threads(a.threads)?;
            perplexity::run(a)
        }
        Command::Chat(a) => chat::run(a),
        Command::Pull(a) => pull::run(a),
        Command::Import(a) => import::run(a),
        Command::List(a) => list::run(a),
        Command::Rm(a) => rm::run(a),
    }
}
