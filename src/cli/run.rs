//! `quarry run MODEL --prompt "..."`: one prompt in, the model's reply streamed out.

use std::io::{IsTerminal, Read, Write};
use std::ops::ControlFlow;

use anyhow::{Context, bail};
use quarry::engine::Engine;
use quarry::generate::{Session, StopReason, generate};
use quarry::sampling::Sampler;
use quarry::text::chat_template::{Conversation, Message};
use serde_json::json;

use super::common::{ModelArgs, OutputFormat, SamplingArgs, parse_ids};

/// Generate a reply to one prompt. The model's chat template is applied unless --raw or --prompt-ids is
/// given; the text streams to stdout as it is generated. Without --prompt, a piped stdin is the prompt.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user's message (or, with --raw, the exact text to continue).
    #[arg(long, short = 'p', value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Token ids to continue, comma-separated; no template, no tokenizing.
    #[arg(long, value_name = "IDS", conflicts_with_all = ["prompt", "raw", "system"])]
    pub prompt_ids: Option<String>,
    /// Continue the prompt text as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// A system message placed before the prompt (chat template only).
    #[arg(long, value_name = "TEXT", conflicts_with = "raw")]
    pub system: Option<String>,
    /// Most tokens to generate (default: until the end-of-text token or a full context).
    #[arg(long = "max-tokens", short = 'n', value_name = "N")]
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
    let params = args.sampling.params()?;
    let engine = Engine::open_for_text(&args.model.model)?;
    let tokenizer = engine.tokenizer();
    let prompt: Vec<u32> = match &args.prompt_ids {
        Some(ids) => parse_ids(ids)?,
        None => {
            let text = match &args.prompt {
                Some(p) => p.clone(),
                None if !std::io::stdin().is_terminal() => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("reading the prompt from stdin")?;
                    if s.trim().is_empty() {
                        bail!("stdin was empty: pipe the prompt in, or give --prompt TEXT");
                    }
                    // `echo text | quarry run` ends the message with a newline nobody typed; raw text stays exact.
                    if !args.raw {
                        s.truncate(s.trim_end().len());
                    }
                    s
                }
                None => bail!(
                    "no prompt: give --prompt TEXT, --prompt-ids IDS, or pipe the prompt to stdin"
                ),
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
    let eos = tokenizer.eos_id();
    let mut generated = Vec::new();
    let mut stream = tokenizer.stream(true);
    // Not locked across the loop: generation runs on a worker thread (see `quarry::generate::generate`).
    let mut stdout = std::io::stdout();
    let streaming = args.format == OutputFormat::Text;
    let mut write_error = None;
    let stats = generate(
        &mut session,
        &prompt,
        &mut sampler,
        max_tokens,
        &[eos],
        |id| {
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
            ControlFlow::Continue(())
        },
    )?;
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
    if args.verbose || stats.stop == StopReason::ContextFull {
        if stats.stop == StopReason::ContextFull {
            eprintln!(
                "(stopped: the context of {ctx} tokens is full; raise --ctx-size for longer replies)"
            );
        }
        eprintln!(
            "prompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.1} tok/s | kernels {}",
            stats.prompt_tokens,
            stats.prompt_tokens_per_second(),
            stats.generated_tokens,
            stats.generation_tokens_per_second(),
            engine.model.kernels().name
        );
    }
    Ok(())
}
