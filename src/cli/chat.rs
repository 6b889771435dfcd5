//! `quarry chat [MODEL]`: the interactive chat (a REPL over [`quarry::text::chat::ChatSession`]).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use quarry::engine::Engine;
use quarry::generate::StopReason;
use quarry::hub::registry::Registry;
use quarry::hub::store::{ResolveError, Store, resolve_model};
use quarry::text::chat::command::{self, ChatCommand, HELP, Setting, ShowWhat};
use quarry::text::chat::input::{Assembled, Input, LineAssembler};
use quarry::text::chat::{ChatError, ChatSession, ChatSettings};
use quarry::text::chat_template::{Conversation, Message};
use rustyline::error::ReadlineError;

use super::common::{SamplingArgs, init_threads};
use super::format::{count, plural};

/// Chat with a model in the terminal: replies stream as they are written, Ctrl-C stops a reply, the conversation
/// stays in the KV cache between turns, and the input history is kept in $QUARRY_HOME/history.txt. /help lists the
/// commands.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file, an installed model (by name or by the Hugging Face repo id it was pulled from, org/name), or a
    /// registry model (default: the registry's default model).
    #[arg(value_name = "MODEL")]
    pub model: Option<PathBuf>,
    /// System message for the conversation (/system changes it).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Most tokens per reply, at least 1 (default: no limit, until the end-of-text token or a full context).
    #[arg(long = "max-tokens", short = 'n', value_name = "N", value_parser = super::common::parse_max_tokens)]
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
    run_on(args, path)
}

/// The chat on the model file `path`, with the worker threads already started (`quarry run MODEL` with no prompt at
/// a terminal comes here). `/load MODEL` switches models inside this loop: the conversation and settings go along.
pub fn run_on(args: Args, path: PathBuf) -> anyhow::Result<()> {
    let store = Store::from_env().ok();
    let signals = Signals::install()?;
    let history = match (&store, args.no_history) {
        (Some(s), false) => Some(s.history_file()),
        _ => None,
    };
    let mut editor = editor(history.as_deref())?;
    let mut settings = ChatSettings {
        sampling: args.sampling.params()?,
        max_tokens: args.max_tokens,
        verbose: !args.quiet,
    };
    let mut carried = Conversation::from_messages(Vec::new());
    if let Some(system) = &args.system {
        carried.messages.push(Message::new("system", system));
    }
    let mut unsaved = false;
    let mut path = path;
    let mut previous: Option<PathBuf> = None;
    let style = Style::detect();
    loop {
        let opened = Engine::open_for_text(&path)
            .map_err(anyhow::Error::from)
            .and_then(|engine| {
                let max = engine.model.config.context_length;
                let ctx = args.ctx_size.unwrap_or_else(|| engine.default_context());
                if ctx == 0 || (ctx > max && previous.is_none()) {
                    bail!(
                        "--ctx-size {ctx} is outside 1..={max}, the context this model was trained for"
                    );
                }
                Ok((engine, ctx.min(max)))
            });
        let (engine, ctx) = match (opened, previous.take()) {
            (Ok(o), _) => o,
            (Err(e), None) => return Err(e),
            // A model switched to with /load that does not open: back to the one that did.
            (Err(e), Some(before)) => {
                eprintln!(
                    "{}; staying with {}",
                    super::format::shown(&super::format::error_chain(&e), true),
                    before.display()
                );
                path = before;
                continue;
            }
        };
        let cache = args
            .cache_type
            .unwrap_or_else(|| engine.default_cache_type());
        let mut chat = ChatSession::with_cache(&engine, ctx, args.batch, cache, settings.clone())
            .with_context(|| format!("{}", path.display()))?;
        chat.load(std::mem::replace(
            &mut carried,
            Conversation::from_messages(Vec::new()),
        ));
        let mut repl = Repl {
            chat,
            engine: &engine,
            model_path: &path,
            signals: &signals,
            style,
            unsaved,
        };
        repl.banner();
        let next = repl.run(&mut editor, history.as_deref())?;
        settings = repl.chat.settings().clone();
        unsaved = repl.unsaved;
        match next {
            Next::Exit => {
                repl.leave(if args.no_history {
                    None
                } else {
                    store.as_ref()
                });
                if let Some(h) = &history {
                    let _ = editor.save_history(h);
                }
                return Ok(());
            }
            Next::Switch(to) => {
                carried = repl.chat.conversation();
                previous = Some(std::mem::replace(&mut path, to));
            }
            Next::Continue => unreachable!("the REPL returns only to leave or to switch models"),
        }
    }
}

/// Ctrl-C while the model works arrives as SIGINT (at the prompt the line editor reads it as a key instead): it sets
/// `stop`, which prompt processing checks between chunks and generation after every token. The third one before
/// the model has noticed ends the program, so that it can never be stuck.
struct Signals {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
        let counted = Arc::clone(&count);
        // SAFETY: the action only increments an atomic and calls `_exit`, both async-signal-safe.
        unsafe {
            signal_hook::low_level::register(signal_hook::consts::SIGINT, move || {
                if counted.fetch_add(1, Ordering::SeqCst) + 1 >= 3 {
                    signal_hook::low_level::exit(130);
                }
            })
        }?;
        Ok(Signals { stop, count })
    }

    fn reset(&self) {
        self.stop.store(false, Ordering::SeqCst);
        self.count.store(0, Ordering::SeqCst);
    }
}

/// The line editor, with the input history of earlier sessions.
fn editor(history: Option<&Path>) -> anyhow::Result<rustyline::DefaultEditor> {
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
    Ok(editor)
}

/// Where leaving the chat keeps a conversation that was not saved with `/save`.
const LAST_CHAT: &str = "last-chat.json";

/// A test of prompt progress and cancellation needs prompt processing that lasts seconds, which the tiny fixture
/// models never do: this many milliseconds of sleep after each prompt chunk (unset: none).
const SLOW_PROMPT_ENV: &str = "QUARRY_TEST_SLOW_PROMPT_MS";

/// How long prompt processing runs before its progress is shown.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);

/// `prompt: 512/3000 tokens` on stderr while a long prompt is processed (on a terminal, after
/// [`PROGRESS_AFTER`]), erased when the reply starts.
pub(super) struct PromptProgress {
    start: Instant,
    on_terminal: bool,
    slow: Option<Duration>,
    shown: AtomicBool,
}

impl PromptProgress {
    pub(super) fn new() -> PromptProgress {
        PromptProgress {
            start: Instant::now(),
            on_terminal: std::io::stderr().is_terminal(),
            slow: std::env::var(SLOW_PROMPT_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis),
            shown: AtomicBool::new(false),
        }
    }

    pub(super) fn update(&self, done: usize, total: usize) {
        if let Some(slow) = self.slow {
            std::thread::sleep(slow);
        }
        if self.on_terminal && self.start.elapsed() >= PROGRESS_AFTER {
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\r\x1b[Kprocessing the prompt: {done}/{total} tokens ({}%), Ctrl-C cancels",
                100 * done / total.max(1)
            );
            let _ = err.flush();
            self.shown.store(true, Ordering::Relaxed);
        }
    }

    /// Erases the progress line, if one is shown.
    pub(super) fn clear(&self) {
        if self.shown.swap(false, Ordering::Relaxed) {
            let mut err = std::io::stderr();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
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
            let model = super::pull::pull_model(&what, None, None, args.threads, false)?;
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
    /// `/load MODEL`: this model file next, with the conversation.
    Switch(PathBuf),
}

struct Repl<'e> {
    chat: ChatSession<'e>,
    engine: &'e Engine,
    model_path: &'e Path,
    signals: &'e Signals,
    style: Style,
    /// Messages changed since the last `/save` (or since the start): leaving keeps them in [`LAST_CHAT`].
    unsaved: bool,
}

impl Repl<'_> {
    fn run(
        &mut self,
        editor: &mut rustyline::DefaultEditor,
        history: Option<&Path>,
    ) -> anyhow::Result<Next> {
        let mut input = LineAssembler::new();
        let mut history_warned = false;
        let mut interrupted = false;
        loop {
            let prompt = if input.continuing() { "... " } else { ">>> " };
            let line = match editor.readline(prompt) {
                Ok(line) => line,
                // Ctrl-C at the prompt: the line is gone; so is a half-typed block. Twice in a row leaves.
                Err(ReadlineError::Interrupted) => {
                    if input.reset() {
                        self.style.note("(input discarded)");
                    } else if interrupted {
                        return Ok(Next::Exit);
                    } else {
                        self.style.note("(Ctrl-C again, Ctrl-D or /bye leaves)");
                    }
                    interrupted = true;
                    continue;
                }
                Err(ReadlineError::Eof) => {
                    // What was typed into an open block is sent, not dropped.
                    if let Some(Input::Message(text)) = input.finish_pending() {
                        self.turn(&text);
                    }
                    return Ok(Next::Exit);
                }
                Err(e) => return Err(e).context("reading the input"),
            };
            interrupted = false;
            let Assembled::Ready(entry) = input.push(&line) else {
                continue;
            };
            // A message that starts with '/' was typed with a leading space (else it would be a command): it goes
            // into the history with that space, so that recalling it sends it as a message again.
            let text = match &entry {
                Input::Command(t) => t.clone(),
                Input::Message(t) if t.starts_with('/') => format!(" {t}"),
                Input::Message(t) => t.clone(),
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
            if next != Next::Continue {
                return Ok(next);
            }
        }
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
            "{name}, context {}. /help for commands, /bye leaves.",
            self.chat.context_size()
        ));
    }

    /// On leaving: a conversation not saved with `/save` is kept in the store's [`LAST_CHAT`], and the way back is
    /// printed; without a store (or with --no-history) the loss is at least said.
    fn leave(&self, store: Option<&Store>) {
        let n = self.chat.messages().len();
        if !self.unsaved || n == 0 {
            return;
        }
        let messages = super::format::plural(n, "message", "messages");
        match store {
            Some(store) => {
                let path = store.root().join(LAST_CHAT);
                match self.chat.save(&path) {
                    Ok(_) => self.style.note(&format!(
                        "(the conversation, {messages}, is kept in {0}: `/open {0}` in a chat continues it)",
                        path.display()
                    )),
                    Err(e) => eprintln!("(the conversation of {messages} was not saved: {e})"),
                }
            }
            None => self.style.note(&format!(
                "(the conversation of {messages} was not saved; /save FILE before leaving keeps one)"
            )),
        }
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
                "(the conversation outgrew the context of {} tokens: {} dropped; the system message stays)",
                self.chat.context_size(),
                match prepared.dropped_turns {
                    1 => "the oldest turn was".to_string(),
                    n => format!("the {n} oldest turns were"),
                }
            ));
        }
        self.signals.reset();
        // Not locked across the reply: generation runs on a worker thread (see `generate`).
        let mut out = std::io::stdout();
        let progress = PromptProgress::new();
        let mut started = false;
        let result = self.chat.reply_observed(
            &self.signals.stop,
            |done, total| progress.update(done, total),
            |piece| {
                if !started {
                    progress.clear();
                    started = true;
                }
                // A closed stdout ends nothing here: the reply still goes into the conversation.
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            },
        );
        progress.clear();
        self.signals.reset();
        let stats = match result {
            Ok(s) => s.clone(),
            Err(e @ ChatError::PromptCancelled { .. }) => {
                self.style.note(&format!("({e})"));
                return;
            }
            Err(e) => {
                let _ = writeln!(out);
                eprintln!("{e}");
                return;
            }
        };
        let _ = writeln!(out);
        self.unsaved = true;
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
                "{}{}, {:.1} tok/s · prompt: {} new, {} cached · context {}/{}",
                plural(g.generated_tokens, "token", "tokens"),
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
                self.unsaved = true;
                println!("system message set");
            }
            ChatCommand::Clear => {
                self.chat.clear();
                self.unsaved = false;
                println!(
                    "conversation cleared, context {}/{} (the system message stays)",
                    self.chat.context_used(),
                    self.chat.context_size()
                );
            }
            ChatCommand::ShowSettings => println!("{}", self.settings_line()),
            ChatCommand::Set(setting) => match self.chat.apply(setting) {
                Ok(()) => println!("{}", describe(setting)),
                Err(e) => println!("not changed: {e}"),
            },
            ChatCommand::Show(ShowWhat::Info) => self.show(),
            ChatCommand::Show(ShowWhat::Template) => {
                let template = self.chat.template();
                println!(
                    "{}",
                    super::format::shown(template.source().trim_end(), true)
                );
                println!("(from {})", super::format::shown(template.origin(), false));
            }
            ChatCommand::Show(ShowWhat::System) => match self.chat.system() {
                Some(s) => println!("{s}"),
                None => println!(
                    "no system message (the chat template's default applies, if it has one)"
                ),
            },
            ChatCommand::Show(ShowWhat::License) => {
                match self
                    .engine
                    .file
                    .get("general.license")
                    .and_then(|v| v.as_str())
                {
                    Some(l) => println!("{}", super::format::shown(l, true)),
                    None => println!("the model file names no license (general.license)"),
                }
            }
            ChatCommand::Save(path) => match self.chat.save(&path) {
                Ok(n) => {
                    self.unsaved = false;
                    println!(
                        "saved {} to {}",
                        plural(n, "message", "messages"),
                        path.display()
                    );
                }
                Err(e) => println!("{e}"),
            },
            ChatCommand::Open(path) => match Conversation::from_file(&path) {
                Ok(conversation) => {
                    let n = conversation.messages.len();
                    self.chat.load(conversation);
                    self.unsaved = false;
                    println!(
                        "opened {} from {}",
                        plural(n, "message", "messages"),
                        path.display()
                    );
                }
                Err(e) => println!("{}", ChatError::from(e)),
            },
            ChatCommand::Load(model) => {
                let path = Path::new(&model);
                if path.extension().is_some_and(|e| e == "json") {
                    println!(
                        "/load switches models; `/open {model}` continues a conversation saved with /save"
                    );
                    return Next::Continue;
                }
                let store = Store::from_env().ok();
                match resolve_model(path, store.as_ref(), &Registry::builtin()) {
                    Ok(file) => {
                        println!("loading {model} (the conversation goes along)");
                        return Next::Switch(file);
                    }
                    Err(e) => println!("{e}"),
                }
            }
            ChatCommand::Stats => self.stats(),
        }
        Next::Continue
    }

    fn settings_line(&self) -> String {
        let s = self.chat.settings();
        let p = &s.sampling;
        format!(
            "temperature {}, top_k {}, top_p {}, min_p {}, repeat_penalty {}, repeat_last_n {}, seed {}, max_tokens {}, verbose {}",
            p.temperature,
            p.top_k,
            p.top_p,
            p.min_p,
            p.repeat_penalty,
            p.repeat_last_n,
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
        println!(
            "conversation: {}",
            plural(self.chat.messages().len(), "message", "messages")
        );
        println!("settings: {}", self.settings_line());
    }

    fn stats(&self) {
        match self.chat.last_turn() {
            None => println!("no reply yet: 0 tokens generated"),
            Some(t) => {
                let g = &t.generation;
                println!(
                    "last reply: {} in {:.2} s, {:.1} tok/s ({})",
                    plural(g.generated_tokens, "token", "tokens"),
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
                    "last prompt: {}: {} computed ({:.1} tok/s), {} reused from the cache{}",
                    plural(g.prompt_tokens, "token", "tokens"),
                    g.prompt_tokens_computed,
                    g.prompt_tokens_per_second(),
                    t.reused_tokens,
                    if t.dropped_turns > 0 {
                        format!(
                            "; {} dropped to fit",
                            plural(t.dropped_turns, "oldest turn", "oldest turns")
                        )
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
            "session: {}, {} generated ({:.1} tok/s); prompts: {} computed ({:.1} tok/s), {} reused",
            plural(tot.turns, "reply", "replies"),
            plural(tot.generated_tokens, "token", "tokens"),
            rate(
                tot.generated_tokens.saturating_sub(tot.turns),
                tot.generation_time
            ),
            plural(tot.prompt_tokens_computed, "token", "tokens"),
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
        Setting::RepeatLastN(v) => format!("repeat_last_n set to {v}"),
        Setting::Seed(v) => format!("seed set to {v}"),
        Setting::MaxTokens(Some(v)) => format!("max_tokens set to {v}"),
        Setting::MaxTokens(None) => "max_tokens set to none (until the end of text)".to_string(),
        Setting::Verbose(true) => "verbose on".to_string(),
        Setting::Verbose(false) => "verbose off".to_string(),
    }
}
