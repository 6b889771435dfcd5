//! `quarry chat [MODEL]`: the interactive chat (a REPL over [`quarry::text::chat::ChatSession`]).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use quarry::engine::Engine;
use quarry::generate::StopReason;
use quarry::hub::registry::Registry;
use quarry::hub::store::{ResolveError, Store, resolve_model};
use quarry::text::chat::command::{self, ChatCommand, HELP, Setting};
use quarry::text::chat::input::{Assembled, Input, LineAssembler};
use quarry::text::chat::{ChatError, ChatSession, ChatSettings};
use quarry::text::chat_template::Conversation;
use rustyline::error::ReadlineError;

use super::common::{SamplingArgs, init_threads};
use super::format::count;

/// Chat with a model in the terminal: replies stream as they are written, Ctrl-C stops a reply, the conversation
/// stays in the KV cache between turns, and the input history is kept in $QUARRY_HOME/history.txt. /help lists the
/// commands.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file, an installed model, or a registry model (default: the registry's default model).
    #[arg(value_name = "MODEL")]
    pub model: Option<PathBuf>,
    /// System message for the conversation (/system changes it).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Most tokens per reply (default: until the end-of-text token or a full context).
    #[arg(long = "max-tokens", short = 'n', value_name = "N")]
    pub max_tokens: Option<usize>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Context size in tokens (default: the model's, at most 4096). Older turns are dropped when it fills up.
    #[arg(long, short = 'c', value_name = "N")]
    pub ctx_size: Option<usize>,
    /// Prompt tokens per forward pass.
    #[arg(long, short = 'b', value_name = "N", default_value_t = quarry::generate::DEFAULT_BATCH)]
    pub batch: usize,
    /// How the KV cache stores keys and values: f32, f16 or q8_0 (default f16 for a quantized
    /// model, f32 for a float one).
    #[arg(long, value_name = "TYPE")]
    pub cache_type: Option<quarry::model::KvType>,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't', value_name = "N", value_parser = super::common::parse_threads)]
    pub threads: Option<usize>,
    /// Hide the speed line after each reply (/set verbose on shows it again).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Neither read nor write the input history file.
    #[arg(long)]
    pub no_history: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // First: a pull offered below converts on rayon's global pool, which is sized once.
    init_threads(args.threads)?;
    let registry = Registry::builtin();
    let store = Store::from_env().ok();
    let path = find_model(&args, store.as_ref(), &registry)?;
    let engine = Engine::open_for_text(&path)?;
    let max = engine.model.config.context_length;
    let ctx = args.ctx_size.unwrap_or_else(|| engine.default_context());
    if ctx == 0 || ctx > max {
        bail!("--ctx-size {ctx} is outside 1..={max}, the context this model was trained for");
    }
    if args.max_tokens == Some(0) {
        bail!("--max-tokens must be at least 1");
    }
    let settings = ChatSettings {
        sampling: args.sampling.params()?,
        max_tokens: args.max_tokens,
        verbose: !args.quiet,
    };
    let cache = args
        .cache_type
        .unwrap_or_else(|| engine.default_cache_type());
    let mut chat = ChatSession::with_cache(&engine, ctx, args.batch, cache, settings)
        .with_context(|| format!("{}", path.display()))?;
    chat.set_system(args.system.clone());

    // Ctrl-C while a reply is written arrives as SIGINT (at the prompt, rustyline reads it as a key instead): it
    // sets `stop`, which the token callback checks. A second Ctrl-C before the first is noticed (a long prompt
    // still being processed) ends the program, so it can never be stuck.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        130,
        Arc::clone(&stop),
    )?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;

    let history = match (&store, args.no_history) {
        (Some(s), false) => Some(s.history_file()),
        _ => None,
    };
    let mut repl = Repl {
        chat,
        engine: &engine,
        model_path: &path,
        stop,
        style: Style::detect(),
    };
    repl.run(history.as_deref())
}

/// The MODEL argument (or the registry default) as a file; a model that is not installed is offered for download
/// when someone is at the terminal to say yes.
fn find_model(args: &Args, store: Option<&Store>, registry: &Registry) -> anyhow::Result<PathBuf> {
    let arg = args
        .model
        .clone()
        .unwrap_or_else(|| PathBuf::from(&registry.default));
    match resolve_model(&arg, store, registry) {
        Ok(p) => Ok(p),
        Err(e @ (ResolveError::NotPulled { .. } | ResolveError::RepoNotPulled { .. })) => {
            let what = arg.display().to_string();
            let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
            if !interactive {
                return Err(e.into());
            }
            eprint!(
                "{what} is not installed. Download and convert it now (`quarry pull {what}`)? [y/N] "
            );
            let mut answer = String::new();
            std::io::stdin().lock().read_line(&mut answer)?;
            if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
                return Err(e.into());
            }
            let model = super::pull::pull_model(&what, None, None, args.threads)?;
            Ok(model.gguf())
        }
        Err(e) => Err(e.into()),
    }
}

/// Dim notes when writing to a terminal that wants colour.
#[derive(Clone, Copy)]
struct Style {
    dim: bool,
}

impl Style {
    fn detect() -> Style {
        Style {
            dim: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn note(&self, text: &str) {
        if self.dim {
            println!("\x1b[2m{text}\x1b[0m");
        } else {
            println!("{text}");
        }
    }
}

/// What a command asks the loop to do next.
#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    Exit,
}

struct Repl<'e> {
    chat: ChatSession<'e>,
    engine: &'e Engine,
    model_path: &'e Path,
    stop: Arc<AtomicBool>,
    style: Style,
}

impl Repl<'_> {
    fn run(&mut self, history: Option<&Path>) -> anyhow::Result<()> {
        let config = rustyline::Config::builder()
            .auto_add_history(false)
            .max_history_size(1000)?
            .history_ignore_dups(true)?
            .build();
        let mut editor = rustyline::DefaultEditor::with_config(config)?;
        if let Some(path) = history {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match editor.load_history(path) {
                Ok(()) => {}
                Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("(history {} not read: {e})", path.display()),
            }
        }
        self.banner();
        let mut input = LineAssembler::new();
        let mut history_warned = false;
        loop {
            let prompt = if input.continuing() { "... " } else { ">>> " };
            let line = match editor.readline(prompt) {
                Ok(line) => line,
                // Ctrl-C at the prompt: the line is gone; so is a half-typed block.
                Err(ReadlineError::Interrupted) => {
                    if input.reset() {
                        self.style.note("(input discarded)");
                    }
                    continue;
                }
                Err(ReadlineError::Eof) => break,
                Err(e) => return Err(e).context("reading the input"),
            };
            let Assembled::Ready(entry) = input.push(&line) else {
                continue;
            };
            let text = match &entry {
                Input::Command(t) | Input::Message(t) => t.clone(),
            };
            let _ = editor.add_history_entry(text);
            if let Some(path) = history
                && let Err(e) = editor.save_history(path)
                && !history_warned
            {
                eprintln!("(history {} not written: {e})", path.display());
                history_warned = true;
            }
            let next = match entry {
                Input::Command(line) => match command::parse(&line) {
                    Some(Ok(cmd)) => self.command(cmd),
                    Some(Err(e)) => {
                        println!("{e}");
                        Next::Continue
                    }
                    None => {
                        self.turn(&line);
                        Next::Continue
                    }
                },
                Input::Message(text) => {
                    self.turn(&text);
                    Next::Continue
                }
            };
            if next == Next::Exit {
                break;
            }
        }
        if let Some(path) = history {
            let _ = editor.save_history(path);
        }
        Ok(())
    }

    fn banner(&self) {
        let cfg = &self.engine.model.config;
        let name = cfg.name.clone().unwrap_or_else(|| {
            self.model_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let name = super::format::shown(&name, false);
        self.style.note(&format!(
            "quarry chat: {name} ({}, context {} tokens). /help for commands, Ctrl-C stops a reply, Ctrl-D or /bye leaves.",
            cfg.arch.gguf_name(),
            self.chat.context_size()
        ));
    }

    /// One exchange: the message in, the reply streamed out. Errors are reported and the chat goes on.
    fn turn(&mut self, text: &str) {
        let prepared = match self.chat.submit(text) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{e}");
                return;
            }
        };
        if prepared.dropped_turns > 0 {
            self.style.note(&format!(
                "(the conversation outgrew the context of {} tokens: the {} oldest {} dropped; the system message stays)",
                self.chat.context_size(),
                prepared.dropped_turns,
                if prepared.dropped_turns == 1 { "turn was" } else { "turns were" }
            ));
        }
        self.stop.store(false, Ordering::SeqCst);
        // Not locked across the reply: generation runs on a worker thread (see `generate`).
        let mut out = std::io::stdout();
        let result = self.chat.reply(&self.stop, |piece| {
            // A closed stdout ends nothing here: the reply still goes into the conversation.
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        });
        let _ = writeln!(out);
        self.stop.store(false, Ordering::SeqCst);
        let stats = match result {
            Ok(s) => s.clone(),
            Err(e) => {
                eprintln!("{e}");
                return;
            }
        };
        let g = &stats.generation;
        match g.stop {
            StopReason::Interrupted => self.style.note("(stopped)"),
            StopReason::ContextFull => self.style.note(&format!(
                "(the context of {} tokens is full: the reply was cut; the next message drops the oldest turns)",
                self.chat.context_size()
            )),
            StopReason::MaxTokens | StopReason::EndOfText => {}
        }
        if self.chat.settings().verbose {
            self.style.note(&format!(
                "{} tokens{}, {:.1} tok/s · prompt: {} new, {} cached · context {}/{}",
                g.generated_tokens,
                if g.stop == StopReason::MaxTokens {
                    " (the reply limit)"
                } else {
                    ""
                },
                g.generation_tokens_per_second(),
                g.prompt_tokens_computed,
                stats.reused_tokens,
                stats.context_used,
                self.chat.context_size()
            ));
        }
    }

    fn command(&mut self, cmd: ChatCommand) -> Next {
        match cmd {
            ChatCommand::Help => println!("{HELP}"),
            ChatCommand::Bye => return Next::Exit,
            ChatCommand::System(None) => match self.chat.system() {
                Some(s) => println!("system: {s}"),
                None => println!(
                    "no system message (the chat template's default applies, if it has one)"
                ),
            },
            ChatCommand::System(Some(text)) => {
                self.chat.set_system(Some(text));
                println!("system message set");
            }
            ChatCommand::Clear => {
                self.chat.clear();
                println!("conversation cleared (the system message stays)");
            }
            ChatCommand::ShowSettings => println!("{}", self.settings_line()),
            ChatCommand::Set(setting) => match self.chat.apply(setting) {
                Ok(()) => println!("{}", describe(setting)),
                Err(e) => println!("not changed: {e}"),
            },
            ChatCommand::Show => self.show(),
            ChatCommand::Save(path) => match self.chat.save(&path) {
                Ok(n) => println!("saved {n} messages to {}", path.display()),
                Err(e) => println!("{e}"),
            },
            ChatCommand::Load(path) => match Conversation::from_file(&path) {
                Ok(conversation) => {
                    let n = conversation.messages.len();
                    self.chat.load(conversation);
                    println!("loaded {n} messages from {}", path.display());
                }
                Err(e) => println!("{}", ChatError::from(e)),
            },
            ChatCommand::Stats => self.stats(),
        }
        Next::Continue
    }

    fn settings_line(&self) -> String {
        let s = self.chat.settings();
        let p = &s.sampling;
        format!(
            "temperature {}, top_k {}, top_p {}, min_p {}, repeat_penalty {}, seed {}, max_tokens {}, verbose {}",
            p.temperature,
            p.top_k,
            p.top_p,
            p.min_p,
            p.repeat_penalty,
            p.seed,
            s.max_tokens.map_or("none".to_string(), |n| n.to_string()),
            if s.verbose { "on" } else { "off" }
        )
    }

    fn show(&self) {
        let file = &self.engine.file;
        let cfg = &self.engine.model.config;
        let by_type = file.type_tallies();
        let parameters: u64 = by_type.iter().map(|t| t.elements).sum();
        // The type holding most weights names the file's quantization.
        let main_type = by_type
            .iter()
            .max_by_key(|t| t.elements)
            .map(|t| t.ty.name())
            .unwrap_or("?");
        println!(
            "model: {} ({}{})",
            super::format::shown(&self.model_path.display().to_string(), false),
            cfg.arch.gguf_name(),
            cfg.name
                .as_ref()
                .map(|n| format!(", {}", super::format::shown(n, false)))
                .unwrap_or_default()
        );
        let experts = if cfg.n_expert > 0 {
            format!(
                ", {} experts ({} per token)",
                cfg.n_expert, cfg.n_expert_used
            )
        } else {
            String::new()
        };
        println!(
            "       {} parameters, mostly {main_type}; {} layers, {} wide{experts}",
            count(parameters),
            cfg.n_layer,
            cfg.n_embd,
        );
        println!(
            "context: {} tokens ({} used; the model was trained for {}); {} threads, kernels {}",
            self.chat.context_size(),
            self.chat.context_used(),
            cfg.context_length,
            rayon::current_num_threads(),
            self.engine.model.kernels().name
        );
        match self.chat.system() {
            Some(s) => println!("system: {s}"),
            None => println!("system: none (the chat template's default applies, if it has one)"),
        }
        println!("conversation: {} messages", self.chat.messages().len());
        println!("settings: {}", self.settings_line());
    }

    fn stats(&self) {
        match self.chat.last_turn() {
            None => println!("no reply yet: 0 tokens generated"),
            Some(t) => {
                let g = &t.generation;
                println!(
                    "last reply: {} tokens in {:.2} s, {:.1} tok/s ({})",
                    g.generated_tokens,
                    g.generation_time.as_secs_f64(),
                    g.generation_tokens_per_second(),
                    match g.stop {
                        StopReason::EndOfText => "ended by the model",
                        StopReason::MaxTokens => "reply limit reached",
                        StopReason::ContextFull => "context full",
                        StopReason::Interrupted => "stopped with Ctrl-C",
                    }
                );
                println!(
                    "last prompt: {} tokens: {} computed ({:.1} tok/s), {} reused from the cache{}",
                    g.prompt_tokens,
                    g.prompt_tokens_computed,
                    g.prompt_tokens_per_second(),
                    t.reused_tokens,
                    if t.dropped_turns > 0 {
                        format!("; {} oldest turns dropped to fit", t.dropped_turns)
                    } else {
                        String::new()
                    }
                );
            }
        }
        let used = self.chat.context_used();
        let size = self.chat.context_size();
        println!(
            "context: {used} of {size} tokens used ({:.0}%)",
            100.0 * used as f64 / size as f64
        );
        let tot = self.chat.totals();
        let rate = |n: usize, t: std::time::Duration| {
            if t.is_zero() {
                0.0
            } else {
                n as f64 / t.as_secs_f64()
            }
        };
        println!(
            "session: {} replies, {} tokens generated ({:.1} tok/s); prompts: {} tokens computed ({:.1} tok/s), {} reused",
            tot.turns,
            tot.generated_tokens,
            rate(
                tot.generated_tokens.saturating_sub(tot.turns),
                tot.generation_time
            ),
            tot.prompt_tokens_computed,
            rate(tot.prompt_tokens_computed, tot.prompt_time),
            tot.prompt_tokens_reused
        );
    }
}

fn describe(setting: Setting) -> String {
    match setting {
        Setting::Temperature(v) => format!("temperature set to {v}"),
        Setting::TopK(v) => format!("top_k set to {v}"),
        Setting::TopP(v) => format!("top_p set to {v}"),
        Setting::MinP(v) => format!("min_p set to {v}"),
        Setting::RepeatPenalty(v) => format!("repeat_penalty set to {v}"),
        Setting::Seed(v) => format!("seed set to {v}"),
        Setting::MaxTokens(Some(v)) => format!("max_tokens set to {v}"),
        Setting::MaxTokens(None) => "max_tokens set to none (until the end of text)".to_string(),
        Setting::Verbose(true) => "verbose on".to_string(),
        Setting::Verbose(false) => "verbose off".to_string(),
    }
}
