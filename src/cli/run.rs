//! `quarry run MODEL "prompt"` (or `--prompt`): one prompt in, the model's reply streamed out; with no prompt at a
//! terminal, the chat.

use std::io::{IsTerminal, Read, Write};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use quarry::engine::Engine;
use quarry::generate::{Session, StopReason, generate_observed};
use quarry::sampling::Sampler;
use quarry::text::chat_template::{Conversation, Message};
use serde_json::json;

use super::common::{ModelArgs, OutputFormat, SamplingArgs, parse_ids};
use super::format::plural;

/// Generate a reply to one prompt, as `ollama run MODEL "prompt"` does. The model's chat template is applied
/// unless --raw or --prompt-ids is given; the text streams to stdout as it is generated. A piped stdin is the
/// prompt, or joined with the PROMPT words (the piped text first, then a blank line, then the words, as ollama
/// orders them); --prompt TEXT is the whole prompt and leaves stdin alone. With no prompt at a terminal, the chat
/// opens. Ctrl-C stops: what was generated is printed (with -v, the speed line; with --format json, the object
/// with "stop_reason": "interrupted"), and the exit status is 130.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user's message, as words after MODEL (or, with --raw, the exact text to continue).
    #[arg(value_name = "PROMPT", conflicts_with = "prompt")]
    pub words: Vec<String>,
    /// The user's message as one option (then stdin is not read).
    #[arg(long, short = 'p', value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Token ids to continue, comma-separated; no template, no tokenizing.
    #[arg(long, value_name = "IDS", conflicts_with_all = ["prompt", "words", "raw", "system"])]
    pub prompt_ids: Option<String>,
    /// Continue the prompt text as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// A system message placed before the prompt (chat template only).
    #[arg(long, value_name = "TEXT", conflicts_with = "raw")]
    pub system: Option<String>,
    /// Most tokens to generate, at least 1 (default: no limit, until the end-of-text token or a full context).
    #[arg(long = "max-tokens", short = 'n', value_name = "N", value_parser = super::common::parse_max_tokens)]
    pub max_tokens: Option<usize>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// text: stream the reply; json: print one object with the ids, the text and the speed.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// Print prompt and generation speed to stderr after the reply.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let stdin_is_terminal = std::io::stdin().is_terminal();
    if args.prompt.is_none()
        && args.prompt_ids.is_none()
        && args.words.is_empty()
        && stdin_is_terminal
    {
        if args.raw || args.format == OutputFormat::Json || !std::io::stdout().is_terminal() {
            bail!(
                "no prompt: give it after MODEL (`quarry run MODEL \"...\"`), or pipe it to stdin (--raw, \
                 --format json and an output that is not a terminal need one; without them, `quarry run MODEL` at a \
                 terminal opens the chat)"
            );
        }
        return chat_instead(args);
    }
    let params = args.sampling.params()?;
    let engine = Engine::open_for_text(&args.model.model)?;
    let tokenizer = engine.tokenizer();
    let prompt: Vec<u32> = match &args.prompt_ids {
        Some(ids) => parse_ids(ids)?,
        None => {
            let words = (!args.words.is_empty()).then(|| args.words.join(" "));
            let text = match (&args.prompt, words) {
                (Some(p), _) => p.clone(),
                (None, words) if !stdin_is_terminal => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("reading the prompt from stdin")?;
                    // `echo text | quarry run` ends the message with a newline nobody typed; raw text stays exact
                    // (unless words follow it).
                    if !args.raw || words.is_some() {
                        s.truncate(s.trim_end().len());
                    }
                    match words {
                        Some(w) if s.trim().is_empty() => w,
                        Some(w) => format!("{s}\n\n{w}"),
                        None if s.trim().is_empty() => bail!(
                            "stdin was empty: pipe the prompt in, or give it after MODEL (`quarry run MODEL \"...\"`)"
                        ),
                        None => s,
                    }
                }
                (None, Some(w)) => w,
                (None, None) => unreachable!("no prompt at a terminal opens the chat above"),
            };
            let text = if args.raw {
                text
            } else {
                let Some(template) = &engine.chat_template else {
                    bail!(
                        "{} has no chat template (tokenizer.chat_template); pass --raw to continue the text as it is",
                        args.model.model.display()
                    );
                };
                let mut messages = Vec::new();
                if let Some(system) = &args.system {
                    messages.push(Message::new("system", system));
                }
                messages.push(Message::new("user", &text));
                template.render(&Conversation::from_messages(messages), true)?
            };
            let limit = args
                .model
                .ctx_size
                .unwrap_or(engine.model.config.context_length);
            tokenizer.encode_at_most(&text, limit)?
        }
    };
    if prompt.is_empty() {
        bail!("the prompt is empty: there is nothing to continue");
    }
    let ctx = args.model.context_for(&engine, prompt.len())?;
    let cache = args
        .model
        .cache_type
        .unwrap_or_else(|| engine.default_cache_type());
    let mut session = Session::with_cache(&engine.model, ctx, args.model.batch, cache);
    let mut sampler = Sampler::new(params);
    let max_tokens = args.max_tokens.unwrap_or(usize::MAX);
    // Ctrl-C sets `stop`, checked between prompt chunks and after every token; a second one before the first is
    // noticed ends the program at once, so that it can never be stuck.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        130,
        Arc::clone(&stop),
    )?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    let progress = super::chat::PromptProgress::new();
    let eos = tokenizer.eos_id();
    let mut generated = Vec::new();
    let mut stream = tokenizer.stream(true);
    // Not locked across the loop: generation runs on a worker thread (see `quarry::generate::generate`).
    let mut stdout = std::io::stdout();
    let streaming = args.format == OutputFormat::Text;
    let mut write_error = None;
    let stats = generate_observed(
        &mut session,
        &prompt,
        &mut sampler,
        max_tokens,
        &[eos],
        |done, total| {
            if stop.load(Ordering::Relaxed) {
                return ControlFlow::Break(());
            }
            progress.update(done, total);
            ControlFlow::Continue(())
        },
        |id| {
            if generated.is_empty() {
                progress.clear();
            }
            generated.push(id);
            if streaming {
                let piece = match stream.push(id) {
                    Ok(p) => p,
                    Err(e) => {
                        write_error = Some(anyhow::Error::from(e));
                        return ControlFlow::Break(());
                    }
                };
                if let Err(e) = stdout
                    .write_all(piece.as_bytes())
                    .and_then(|_| stdout.flush())
                {
                    // A closed pipe (`quarry run ... | head`) ends generation quietly.
                    if e.kind() != std::io::ErrorKind::BrokenPipe {
                        write_error = Some(e.into());
                    }
                    return ControlFlow::Break(());
                }
            }
            if stop.load(Ordering::Relaxed) {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        },
    )?;
    progress.clear();
    if let Some(e) = write_error {
        return Err(e);
    }
    let text = tokenizer.decode(&generated, true)?;
    match args.format {
        OutputFormat::Text => {
            let rest = stream.finish()?;
            let _ = writeln!(stdout, "{rest}");
        }
        OutputFormat::Json => {
            let v = json!({
                "prompt_ids": prompt,
                "generated_ids": generated,
                "text": text,
                "prompt_tokens": stats.prompt_tokens,
                "generated_tokens": stats.generated_tokens,
                "prompt_tokens_per_second": stats.prompt_tokens_per_second(),
                "generation_tokens_per_second": stats.generation_tokens_per_second(),
                "stop_reason": match stats.stop {
                    StopReason::EndOfText => "end_of_text",
                    StopReason::MaxTokens => "max_tokens",
                    StopReason::ContextFull => "context_full",
                    StopReason::Interrupted => "interrupted",
                },
            });
            writeln!(stdout, "{v}")?;
        }
    }
    let interrupted = stop.load(Ordering::Relaxed) && stats.stop == StopReason::Interrupted;
    if interrupted {
        eprintln!(
            "(interrupted{})",
            if stats.prompt_done {
                String::new()
            } else {
                format!(
                    " while processing the prompt, after {} of {} tokens",
                    stats.prompt_tokens_computed, stats.prompt_tokens
                )
            }
        );
    }
    if args.verbose || stats.stop == StopReason::ContextFull {
        if stats.stop == StopReason::ContextFull {
            eprintln!(
                "(stopped: the context of {ctx} tokens is full; raise --ctx-size for longer replies)"
            );
        }
        eprintln!(
            "prompt: {}, {:.1} tok/s | generation: {}, {:.1} tok/s | kernels {}",
            plural(stats.prompt_tokens, "token", "tokens"),
            stats.prompt_tokens_per_second(),
            plural(stats.generated_tokens, "token", "tokens"),
            stats.generation_tokens_per_second(),
            engine.model.kernels().name
        );
    }
    if interrupted {
        let _ = stdout.flush();
        std::process::exit(130);
    }
    Ok(())
}

/// `quarry run MODEL` with no prompt at a terminal: the chat, with the same options (as `ollama run MODEL`).
fn chat_instead(args: Args) -> anyhow::Result<()> {
    let path = args.model.model.clone();
    let chat = super::chat::Args {
        model: Some(path.clone()),
        system: args.system,
        max_tokens: args.max_tokens,
        sampling: args.sampling,
        ctx_size: args.model.ctx_size,
        batch: args.model.batch,
        cache_type: args.model.cache_type,
        threads: args.model.threads,
        quiet: false,
        no_history: false,
    };
    super::chat::run_on(chat, path)
}
