//! Conversations to prompt text, with the model's own Jinja chat template.
//!
//! The template is the truth for Granite (llama.cpp's built-in Granite format adds a stray newline after the
//! generation prompt), so the template shipped with the model (`tokenizer.chat_template`) is rendered with
//! minijinja, set up the way Hugging Face transformers sets up jinja2 for `apply_chat_template`: `trim_blocks`
//! and `lstrip_blocks`, no auto-escaping, a `tojson` that is Python's `json.dumps` (not minijinja's
//! HTML-escaping one), `raise_exception`, `strftime_now`, and Python string and dict methods.
//!
//! Known differences from jinja2, none of which the Granite 3.x templates touch: a list or dict printed directly
//! (`{{ message }}`, `x | string`) comes out JSON-like (`{"a": 1}`) where Python prints its repr (`{'a': 1}`);
//! floats of 1e16 and more print positionally; transformers' `{% generation %}` block tag is not supported.

use std::fmt::Write as _;
use std::path::Path;

use chrono::{NaiveDate, NaiveDateTime};
use minijinja::value::{Kwargs, Rest, Serde, ValueKind, ValueOrKwargs};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};
use quarry_quantize::gguf::{Array, GgufFile};
use serde::{Deserialize, Serialize};

/// GGUF key of the Jinja chat template.
pub const GGUF_CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";
/// The template's name inside minijinja, which its error messages show with a line number.
const TEMPLATE_NAME: &str = "chat_template";

/// A chat-template problem, naming where the template or the conversation came from.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("{origin}: no chat template (`{key}` is missing)")]
    Missing { origin: String, key: &'static str },
    #[error("{origin}: `{key}` {problem}")]
    BadMetadata {
        origin: String,
        key: String,
        problem: String,
    },
    #[error("{origin}: the chat template does not compile: {detail}")]
    Syntax { origin: String, detail: String },
    /// The template itself refused the conversation with `raise_exception(message)`.
    #[error("{origin}: the chat template rejects this conversation: {message}")]
    Raised { origin: String, message: String },
    #[error("{origin}: rendering the chat template failed: {detail}")]
    Render { origin: String, detail: String },
    #[error("{origin}: not a usable conversation: {problem}")]
    Conversation { origin: String, problem: String },
    #[error(transparent)]
    Input(#[from] super::input::InputError),
}

/// One chat message: a JSON object with at least a `role`, usually a `content`, and whatever else a template
/// reads (`tool_calls`, `name`, ...). Keys keep their order, so a template that prints a message prints it as
/// written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Message(pub serde_json::Map<String, serde_json::Value>);

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        let mut fields = serde_json::Map::new();
        fields.insert("role".into(), role.into());
        fields.insert("content".into(), content.into());
        Message(fields)
    }

    pub fn role(&self) -> Option<&str> {
        self.0.get("role").and_then(serde_json::Value::as_str)
    }

    pub fn content(&self) -> Option<&str> {
        self.0.get("content").and_then(serde_json::Value::as_str)
    }
}

/// What `apply_chat_template` is given: the messages, optional tool definitions and documents, and any further
/// template variables (`controls` for the Granite 3.1 template, for instance), kept in `extra`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents: Option<Vec<serde_json::Value>>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Template variables the renderer sets itself; a conversation may not set them through `extra`.
const RESERVED_VARIABLES: &[&str] = &[
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
];

impl Conversation {
    pub fn from_messages(messages: Vec<Message>) -> Conversation {
        Conversation {
            messages,
            ..Conversation::default()
        }
    }

    /// Parses either a JSON list of messages or `{"messages": [...], "tools": [...], "documents": [...], ...}`.
    pub fn from_json_str(json: &str) -> Result<Conversation, ChatTemplateError> {
        Self::parse(json, "conversation JSON")
    }

    /// [`Self::from_json_str`] of a file's contents.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Conversation, ChatTemplateError> {
        let origin = path.as_ref().display().to_string();
        let json = super::input::read_text(
            path.as_ref(),
            super::input::MAX_CONVERSATION_BYTES,
            "conversation file",
        )?;
        Self::parse(&json, &origin)
    }

    fn parse(json: &str, origin: &str) -> Result<Conversation, ChatTemplateError> {
        let problem = |problem: String| ChatTemplateError::Conversation {
            origin: origin.to_string(),
            problem,
        };
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| problem(format!("invalid JSON: {e}")))?;
        let conversation = match value {
            serde_json::Value::Array(_) => {
                Conversation::from_messages(parse_messages(value).map_err(problem)?)
            }
            serde_json::Value::Object(fields) if fields.contains_key("messages") => {
                let mut conversation = Conversation::default();
                for (key, value) in fields {
                    match key.as_str() {
                        "messages" => {
                            conversation.messages = parse_messages(value).map_err(problem)?
                        }
                        "tools" => {
                            conversation.tools = optional_list(&key, value).map_err(problem)?
                        }
                        "documents" => {
                            conversation.documents = optional_list(&key, value).map_err(problem)?
                        }
                        _ => {
                            conversation.extra.insert(key, value);
                        }
                    }
                }
                conversation
            }
            _ => {
                return Err(problem(
                    "expected a list of messages or an object with a \"messages\" list".into(),
                ));
            }
        };
        conversation.check().map_err(problem)?;
        Ok(conversation)
    }

    /// The shape every template relies on: each message has a string `role`; no reserved variable in `extra`.
    fn check(&self) -> Result<(), String> {
        for (i, message) in self.messages.iter().enumerate() {
            if message.role().is_none() {
                return Err(format!("message {i} has no string \"role\""));
            }
        }
        match self
            .extra
            .keys()
            .find(|k| RESERVED_VARIABLES.contains(&k.as_str()))
        {
            Some(key) => Err(format!(
                "\"{key}\" is set by the renderer, not by the conversation"
            )),
            None => Ok(()),
        }
    }
}

fn parse_messages(messages: serde_json::Value) -> Result<Vec<Message>, String> {
    let serde_json::Value::Array(messages) = messages else {
        return Err(format!("\"messages\" must be a list, not {messages}"));
    };
    messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| match message {
            serde_json::Value::Object(fields) => Ok(Message(fields)),
            other => Err(format!("message {i} must be an object, not {other}")),
        })
        .collect()
}

/// `tools` and `documents`: a list, or absent / null.
fn optional_list(
    key: &str,
    value: serde_json::Value,
) -> Result<Option<Vec<serde_json::Value>>, String> {
    match value {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Array(items) => Ok(Some(items)),
        other => Err(format!("\"{key}\" must be a list, not {other}")),
    }
}

/// The texts of the special tokens that transformers hands to every template (`bos_token`, `eos_token`, ...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub unk: Option<String>,
    pub pad: Option<String>,
}

/// The date `strftime_now` reports.
#[derive(Clone, Copy, Debug)]
enum Clock {
    /// The local date and time at each render (what transformers does).
    Local,
    /// A fixed moment, for reproducible prompts and tests.
    Fixed(NaiveDateTime),
}

/// A compiled chat template with everything it needs to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The Jinja text, for callers that adapt to what a template handles (which roles it names).
    source: String,
    origin: String,
    special_tokens: SpecialTokens,
    clock: Clock,
    /// One of Granite's own templates, rendered in-process even where others render in a child process
    /// ([`super::template_sandbox`]).
    trusted: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("special_tokens", &self.special_tokens)
            .field("trusted", &self.trusted)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names it in errors (a file, or a file and key).
    pub fn new(source: &str, origin: &str) -> Result<ChatTemplate, ChatTemplateError> {
        let mut env = Environment::new();
        // jinja2 as transformers configures it: block tags eat their own line, nothing is HTML-escaped.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        bound_sequence_filters(&mut env);
        env.set_formatter(|out, state, value| {
            check_item_count(value, "the template prints")?;
            minijinja::escape_formatter(out, state, value)
        });
        env.add_function("raise_exception", raise_exception);
        set_clock(&mut env, Clock::Local);
        env.set_fuel(Some(RENDER_FUEL));
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ChatTemplateError::Syntax {
                origin: origin.to_string(),
                detail: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            origin: origin.to_string(),
            special_tokens: SpecialTokens::default(),
            clock: Clock::Local,
            trusted: super::template_sandbox::is_trusted(source),
        })
    }

    /// The template's Jinja text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from, as errors name it.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether [`Self::render`] runs in a child process ([`super::template_sandbox`]): the binary has turned
    /// isolation on and this is not one of Granite's own templates.
    pub fn renders_isolated(&self) -> bool {
        !self.trusted && super::template_sandbox::renderer().is_some()
    }

    /// The template of a GGUF file (`tokenizer.chat_template`), with its special tokens' texts taken from
    /// `tokenizer.ggml.tokens` at the ids the file names.
    pub fn from_gguf(gguf: &GgufFile) -> Result<ChatTemplate, ChatTemplateError> {
        let file = gguf.path().display().to_string();
        let source = match gguf.get(GGUF_CHAT_TEMPLATE_KEY) {
            None => {
                return Err(ChatTemplateError::Missing {
                    origin: file,
                    key: GGUF_CHAT_TEMPLATE_KEY,
                });
            }
            Some(value) => value
                .as_str()
                .ok_or_else(|| ChatTemplateError::BadMetadata {
                    origin: file.clone(),
                    key: GGUF_CHAT_TEMPLATE_KEY.to_string(),
                    problem: format!("is a {:?}, not a string", value.value_type()),
                })?,
        };
        let template = ChatTemplate::new(source, &format!("{file} ({GGUF_CHAT_TEMPLATE_KEY})"))?;
        let tokens = match gguf.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(Array::String(tokens)) => tokens.as_slice(),
            _ => &[],
        };
        let text_of = |key: &str| {
            let id = gguf.get(key)?.as_u64()?;
            tokens.get(usize::try_from(id).ok()?).cloned()
        };
        Ok(template.with_special_tokens(SpecialTokens {
            bos: text_of("tokenizer.ggml.bos_token_id"),
            eos: text_of("tokenizer.ggml.eos_token_id"),
            unk: text_of("tokenizer.ggml.unknown_token_id"),
            pad: text_of("tokenizer.ggml.padding_token_id"),
        }))
    }

    /// The template and special tokens of a Hugging Face `tokenizer_config.json` (as a string; `origin` names
    /// it in errors). A list of named templates is accepted; the one named "default" is used.
    pub fn from_tokenizer_config(
        json: &str,
        origin: &str,
    ) -> Result<ChatTemplate, ChatTemplateError> {
        let bad = |problem: String| ChatTemplateError::BadMetadata {
            origin: origin.to_string(),
            key: "chat_template".to_string(),
            problem,
        };
        let config: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| bad(format!("cannot be read: invalid JSON: {e}")))?;
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => {
                return Err(ChatTemplateError::Missing {
                    origin: origin.to_string(),
                    key: "chat_template",
                });
            }
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(serde_json::Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| bad("is a list without a template named \"default\"".into()))?,
            Some(other) => return Err(bad(format!("is {other}, not a template string"))),
        };
        // A special token is written either as its text or as an AddedToken object with a "content".
        let text_of = |key: &str| match config.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            token => token.get("content")?.as_str().map(str::to_string),
        };
        Ok(
            ChatTemplate::new(source, origin)?.with_special_tokens(SpecialTokens {
                bos: text_of("bos_token"),
                eos: text_of("eos_token"),
                unk: text_of("unk_token"),
                pad: text_of("pad_token"),
            }),
        )
    }

    pub fn with_special_tokens(mut self, special_tokens: SpecialTokens) -> ChatTemplate {
        self.special_tokens = special_tokens;
        self
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    /// Makes `strftime_now` report `now` instead of the local time (reproducible prompts, tests).
    pub fn with_now(mut self, now: NaiveDateTime) -> ChatTemplate {
        set_clock(&mut self.env, Clock::Fixed(now));
        self.clock = Clock::Fixed(now);
        self
    }

    /// [`Self::with_now`] at midnight of `date`.
    pub fn with_date(self, date: NaiveDate) -> ChatTemplate {
        self.with_now(date.and_time(chrono::NaiveTime::MIN))
    }

    /// The prompt text for `conversation`; with `add_generation_prompt` it ends where the assistant's reply
    /// begins (for Granite: `<|start_of_role|>assistant<|end_of_role|>`, no newline). A template that
    /// [`Self::renders_isolated`] takes a process start longer (milliseconds) and may take up to
    /// [`super::template_sandbox::WALL_SECONDS`] before it is refused.
    pub fn render(
        &self,
        conversation: &Conversation,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        match super::template_sandbox::renderer() {
            Some(exe) if !self.trusted => {
                // Checked before it is handed over: one that sets a reserved variable does not even serialize.
                self.check(conversation)?;
                super::template_sandbox::render_isolated(
                    exe,
                    self,
                    conversation,
                    add_generation_prompt,
                )
            }
            _ => self.render_in_process(conversation, add_generation_prompt),
        }
    }

    /// `conversation` as a template may be given it, or why not.
    fn check(&self, conversation: &Conversation) -> Result<(), ChatTemplateError> {
        conversation
            .check()
            .map_err(|problem| ChatTemplateError::Conversation {
                origin: self.origin.clone(),
                problem,
            })
    }

    /// The moment `strftime_now` reports, if fixed ([`Self::with_now`]); none for the local time.
    pub(crate) fn fixed_now(&self) -> Option<NaiveDateTime> {
        match self.clock {
            Clock::Local => None,
            Clock::Fixed(now) => Some(now),
        }
    }

    /// [`Self::render`] in this process, whatever the template: what the renderer child runs, and what tests
    /// compare the isolated render with.
    pub fn render_in_process(
        &self,
        conversation: &Conversation,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.check(conversation)?;
        let special = &self.special_tokens;
        let mut context: Vec<(&str, Value)> = vec![
            ("messages", Value::from(Serde(&conversation.messages))),
            ("tools", Value::from(Serde(&conversation.tools))),
            ("documents", Value::from(Serde(&conversation.documents))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        for (name, text) in [
            ("bos_token", &special.bos),
            ("eos_token", &special.eos),
            ("unk_token", &special.unk),
            ("pad_token", &special.pad),
        ] {
            if let Some(text) = text {
                context.push((name, Value::from(text.as_str())));
            }
        }
        for (name, value) in &conversation.extra {
            context.push((name, Value::from(Serde(value))));
        }
        let mut out = BoundedText::default();
        let rendered = self.env.get_template(TEMPLATE_NAME).and_then(|template| {
            template
                .render_captured_to(Value::from_pairs(context), &mut out)
                .map(drop)
        });
        if out.overflowed {
            return Err(ChatTemplateError::Render {
                origin: self.origin.clone(),
                detail: format!(
                    "the prompt it writes would be longer than {} MiB; the template (or the conversation) is not one a model can read",
                    MAX_RENDERED_BYTES >> 20
                ),
            });
        }
        if let Err(e) = &rendered
            && e.kind() == minijinja::ErrorKind::OutOfFuel
        {
            return Err(ChatTemplateError::Render {
                origin: self.origin.clone(),
                detail: format!(
                    "it runs more than {RENDER_FUEL} steps (a loop without a useful bound?); a chat template renders a conversation in far fewer"
                ),
            });
        }
        let rendered = rendered.map(|_| String::from_utf8_lossy(&out.bytes).into_owned());
        rendered.map_err(|e| match raised_message(&e) {
            Some(message) => ChatTemplateError::Raised {
                origin: self.origin.clone(),
                message,
            },
            None => ChatTemplateError::Render {
                origin: self.origin.clone(),
                detail: describe(&e),
            },
        })
    }
}

/// Template instructions one render may run. Granite's templates render a long conversation with tools in well
/// under a million; a hostile one (`{% for i in range(100000) %}{% for j in range(100000) %}`) stops here, after
/// about a second, instead of never.
const RENDER_FUEL: u64 = 20_000_000;

/// Items a sequence may have when a filter reads it whole. A template can make a sequence of any length for
/// nothing (`[1] * 10**8`: minijinja keeps it lazy, and caps only beyond that), and a filter that reads it
/// (`sort`, `list`, `join`, ...) runs in Rust, where fuel is not counted: one `{{ ([1] * 10**12) | sort }}` ran
/// for hours. Granite's templates read the conversation's messages and tools, far below this.
const MAX_FILTERED_ITEMS: usize = 1 << 20;

/// The builtin filters that read a whole sequence, each replaced by one that refuses a sequence longer than
/// [`MAX_FILTERED_ITEMS`] and otherwise calls the builtin, kept under a name no template can write (it holds a
/// space).
fn bound_sequence_filters(env: &mut Environment<'static>) {
    use minijinja::filters;
    macro_rules! bounded {
        ($($name:ident),* $(,)?) => {$(
            env.add_filter(concat!("builtin ", stringify!($name)), filters::$name);
            env.add_filter(
                stringify!($name),
                |state: &mut minijinja::State, value: Value, args: Rest<ValueOrKwargs>| -> Result<Value, Error> {
                    check_filtered_len(&value, stringify!($name))?;
                    let mut all = Vec::with_capacity(args.len() + 1);
                    all.push(value);
                    all.extend(args.0.into_iter().map(Value::from));
                    state.apply_filter(concat!("builtin ", stringify!($name)), &all)
                },
            );
        )*};
    }
    bounded!(
        batch, groupby, items, join, last, list, map, max, min, reject, rejectattr, reverse,
        select, selectattr, slice, sort, string, sum, unique,
    );
}

fn check_filtered_len(value: &Value, filter: &str) -> Result<(), Error> {
    check_item_count(value, &format!("`{filter}` was given"))
}

/// Refuses a value that holds, counting every sequence and map nested in it, more than [`MAX_FILTERED_ITEMS`]
/// items, or that nests deeper than [`MAX_NESTING`]: Rust code walking it (a filter, or printing it with
/// `{{ x }}`, which writes `[1, 1, ...]`) counts no fuel. `{{ [[1] * 10**12] }}` hides the huge sequence one
/// level down, hence the walk; it stops as soon as the count is over, so it costs at most that many steps.
fn check_item_count(value: &Value, what: &str) -> Result<(), Error> {
    let mut budget = MAX_FILTERED_ITEMS;
    if within_item_budget(value, &mut budget, 0) {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!(
            "{what} a value holding more than {MAX_FILTERED_ITEMS} items (or nested deeper than {MAX_NESTING}); a chat template works on far fewer"
        ),
    ))
}

/// Nesting [`check_item_count`] follows: deeper than any conversation or tool schema.
const MAX_NESTING: usize = 256;

/// Takes the items of `value` and of everything inside it from `budget`; false once they are more than it
/// holds. An iterable of unknown length is left alone: it is one a filter made from a bounded sequence (minijinja
/// refuses to repeat one), and walking it could use it up.
fn within_item_budget(value: &Value, budget: &mut usize, depth: usize) -> bool {
    let is_map = match value.kind() {
        ValueKind::Map => true,
        ValueKind::Seq | ValueKind::Iterable => false,
        _ => return true,
    };
    let Some(n) = value.len() else {
        return true;
    };
    if n > *budget || depth > MAX_NESTING {
        return false;
    }
    *budget -= n;
    let Ok(items) = value.try_iter() else {
        return true;
    };
    for item in items {
        let inner = if is_map {
            value.get_item(&item).unwrap_or_default()
        } else {
            item
        };
        if !within_item_budget(&inner, budget, depth + 1) {
            return false;
        }
    }
    true
}

/// Bytes one render may write: a prompt longer than any context by far.
pub(crate) const MAX_RENDERED_BYTES: usize = 64 << 20;

/// The rendered prompt, refusing to grow past [`MAX_RENDERED_BYTES`].
#[derive(Default)]
struct BoundedText {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for BoundedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// minijinja's message, with the template line it points at instead of the internal template name.
fn describe(e: &Error) -> String {
    let what = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    match e.line() {
        Some(line) => format!("{what} (line {line})"),
        None => what,
    }
}

fn set_clock(env: &mut Environment<'static>, clock: Clock) {
    env.add_function("strftime_now", move |format: &str| {
        strftime_now(clock, format)
    });
}

/// transformers' `strftime_now(format)`: `datetime.now().strftime(format)`.
fn strftime_now(clock: Clock, format: &str) -> Result<String, Error> {
    let now = match clock {
        Clock::Local => chrono::Local::now().naive_local(),
        Clock::Fixed(now) => now,
    };
    let mut text = String::new();
    // chrono reports an unknown directive as a formatting error (`to_string` would panic on it).
    write!(text, "{}", now.format(format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported format {format:?}"),
        )
    })?;
    Ok(text)
}

/// Marks an error raised by the template's own `raise_exception`, so [`ChatTemplate::render`] can tell it from
/// a template bug.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RaisedByTemplate(String);

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedByTemplate(message)))
}

fn raised_message(e: &Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cause {
        if let Some(raised) = err.downcast_ref::<RaisedByTemplate>() {
            return Some(raised.0.clone());
        }
        cause = err.source();
    }
    None
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, which is
/// Python's `json.dumps` with those arguments; each may be given by position or by name.
fn tojson(value: &Value, positional: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    check_filtered_len(value, "tojson")?;
    const PARAMETERS: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if positional.len() > PARAMETERS.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments (ensure_ascii, indent, separators, sort_keys)",
        ));
    }
    let arg = |name: &str| -> Result<Option<Value>, Error> {
        let index = PARAMETERS
            .iter()
            .position(|p| *p == name)
            .unwrap_or(usize::MAX);
        let by_position = positional
            .get(index)
            .filter(|v| !v.is_none() && !v.is_undefined());
        match (by_position, kwargs.get::<Option<Value>>(name)?) {
            (Some(_), Some(_)) => Err(Error::new(
                ErrorKind::TooManyArguments,
                format!("tojson got argument {name:?} twice"),
            )),
            (a, b) => Ok(a.cloned().or(b)),
        }
    };
    let ensure_ascii = arg("ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg("indent")? {
        None => None,
        Some(v) => Some(if let Some(s) = v.as_str() {
            s.to_string()
        } else {
            // Python repeats a space `indent` times (none when negative); a template asking for more than
            // MAX_INDENT is broken or hostile, and would only make a huge allocation.
            const MAX_INDENT: i64 = 64;
            match i64::try_from(v.clone()) {
                Ok(width) if width <= MAX_INDENT => " ".repeat(usize::try_from(width).unwrap_or(0)),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!(
                            "tojson: indent must be a string or a number up to {MAX_INDENT}, not {v}"
                        ),
                    ));
                }
            }
        }),
    };
    let (item_separator, key_separator) = match arg("separators")? {
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
        Some(v) => {
            let pair: Vec<Value> = v.try_iter()?.collect();
            match pair.as_slice() {
                [item, key] if item.as_str().is_some() && key.as_str().is_some() => {
                    (item.to_string(), key.to_string())
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ));
                }
            }
        }
    };
    let sort_keys = arg("sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let dumper = JsonDumper {
        ensure_ascii,
        indent,
        item_separator,
        key_separator,
        sort_keys,
    };
    let mut out = String::new();
    dumper.write_value(&mut out, value, 0)?;
    Ok(Value::from(out))
}

/// Python's `json.dumps` over template values: same separators, same indentation, same string escapes, same
/// float spelling (`repr`), keys in their own order unless sorted.
struct JsonDumper {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

impl JsonDumper {
    fn write_value(&self, out: &mut String, value: &Value, depth: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&python_number(value)?),
            ValueKind::String => self.write_string(out, value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(out, ('[', ']'), &items, depth, |out, item, depth| {
                    self.write_value(out, item, depth)
                })?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    entries.push((python_key(&key)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(
                    out,
                    ('{', '}'),
                    &entries,
                    depth,
                    |out, (key, item), depth| {
                        self.write_string(out, key);
                        out.push_str(&self.key_separator);
                        self.write_value(out, item, depth)
                    },
                )?;
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {} value is not JSON serializable", value.kind()),
                ));
            }
        }
        Ok(())
    }

    fn write_container<T>(
        &self,
        out: &mut String,
        (open, close): (char, char),
        items: &[T],
        depth: usize,
        write_item: impl Fn(&mut String, &T, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, depth: usize| {
            if let Some(indent) = &self.indent {
                out.push('\n');
                for _ in 0..depth {
                    out.push_str(indent);
                }
            }
        };
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_separator);
            }
            newline(out, depth + 1);
            write_item(out, item, depth + 1)?;
        }
        newline(out, depth);
        out.push(close);
        Ok(())
    }

    fn write_string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if c < ' ' || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A dict key as `json.dumps` writes it: strings as they are; numbers, booleans and None converted.
fn python_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::Number => python_number(key),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::None => Ok("null".to_string()),
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

fn python_number(value: &Value) -> Result<String, Error> {
    if value.is_integer() {
        let int = i128::try_from(value.clone())?;
        return Ok(int.to_string());
    }
    let float = f64::try_from(value.clone())?;
    Ok(python_float_repr(float))
}

/// Python's `repr(float)`, as `json.dumps` writes floats: the shortest digits that read back exactly, in
/// positional notation for exponents -4..16 (always with a fractional part) and as `d.ddde±XX` outside it.
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits, as `D.DDDDeN`.
    let scientific = format!("{:e}", x.abs());
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        format!(
            "{sign}{first}{fraction}e{exponent_sign}{:02}",
            exponent.unsigned_abs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, conversation: &Conversation) -> Result<String, ChatTemplateError> {
        ChatTemplate::new(source, "test template")?.render(conversation, true)
    }

    fn tojson_of(json: &str, args: &str) -> String {
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        let mut conversation = Conversation::default();
        conversation.extra.insert("x".into(), value);
        render(&format!("{{{{ x | tojson({args}) }}}}"), &conversation).unwrap()
    }

    #[test]
    fn templates_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<ChatTemplate>();
        shareable::<crate::text::tokenizer::Tokenizer>();
    }

    #[test]
    fn float_repr_matches_python() {
        // Expected strings are Python 3.11's repr() of the same floats.
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (108.25, "108.25"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (123456.789, "123456.789"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (-2.5, "-2.5"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        // Expected strings are Python's json.dumps(x, ensure_ascii=False, ...) of the same values.
        let x =
            r#"{"z": 1, "a": [1.5, true, null, "<&'>"], "é": {}, "q": "a\"b\\c\n\u0001\u007f"}"#;
        assert_eq!(
            tojson_of(x, ""),
            r#"{"z": 1, "a": [1.5, true, null, "<&'>"], "é": {}, "q": "a\"b\\c\n\u0001"#
                .to_string()
                + "\u{7f}\"}"
        );
        assert_eq!(
            tojson_of(x, "indent=2"),
            "{\n  \"z\": 1,\n  \"a\": [\n    1.5,\n    true,\n    null,\n    \"<&'>\"\n  ],\n  \"é\": {},\n  \
             \"q\": \"a\\\"b\\\\c\\n\\u0001\u{7f}\"\n}"
        );
        assert_eq!(
            tojson_of(x, "sort_keys=true, separators=[',', ':']"),
            "{\"a\":[1.5,true,null,\"<&'>\"],\"q\":\"a\\\"b\\\\c\\n\\u0001\u{7f}\",\"z\":1,\"é\":{}}"
        );
        assert_eq!(
            tojson_of(r#"["é🎉"]"#, "ensure_ascii=true"),
            r#"["\u00e9\ud83c\udf89"]"#
        );
        assert_eq!(tojson_of(r#"[[], {}]"#, "indent=0"), "[\n[],\n{}\n]");
        assert_eq!(tojson_of(r#"[1]"#, "indent='\t'"), "[\n\t1\n]");
        assert_eq!(tojson_of(r#"[1]"#, "false, 1"), "[\n 1\n]");
        assert_eq!(tojson_of(r#"[1]"#, "indent=-2"), "[\n1\n]");
    }

    /// Found by the chat_template fuzz target: a sequence repeated 333 billion times, then sorted, ran for
    /// hours (minijinja 3.1 now caps a repeat at 10^8 items, still far too many to sort). Every filter that
    /// reads a whole sequence refuses one that long, at once; short ones still work.
    #[test]
    fn filters_refuse_sequences_a_template_made_enormous() {
        let c = Conversation::default();
        for filter in [
            "sort",
            "list",
            "join",
            "unique",
            "last",
            "string",
            "tojson",
            "sum",
            "map('abs')",
        ] {
            let started = std::time::Instant::now();
            let err = render(&format!("{{{{ ([1] * 99999999) | {filter} }}}}"), &c).unwrap_err();
            assert!(
                err.to_string()
                    .contains("was given a value holding more than 1048576 items"),
                "{filter}: {err}"
            );
            assert!(started.elapsed().as_secs() < 2, "{filter}");
        }
        // Printed, or hidden inside another sequence or a map (found by fuzzing as
        // `{{ 333333333333 * ['c'] | sort }}`: it filters first, then prints the repeat).
        for expression in [
            "99999999 * ['c'] | sort",
            "[1] * 99999999",
            "[[1] * 99999999]",
            "{'a': [[1] * 600000, [1] * 600000]}",
        ] {
            let started = std::time::Instant::now();
            let err = render(&format!("{{{{ {expression} }}}}"), &c).unwrap_err();
            assert!(
                err.to_string()
                    .contains("the template prints a value holding more than 1048576 items"),
                "{expression}: {err}"
            );
            assert!(started.elapsed().as_secs() < 2, "{expression}");
        }
        // minijinja 3.1 refuses a repeat past 10^8 items itself; up to that it is still lazy and free.
        let err = render("{{ [1] * 333333333333 }}", &c).unwrap_err();
        assert!(
            err.to_string().contains("repeated sequence is too large"),
            "{err}"
        );
        let err = render("{{ [[[1] * 99999999]] | sort }}", &c).unwrap_err();
        assert!(err.to_string().contains("more than 1048576 items"), "{err}");
        assert_eq!(
            render("{{ [1, [2, 3]] * 2 }}", &c).unwrap(),
            "[1, [2, 3], 1, [2, 3]]"
        );
        assert_eq!(
            render("{{ [3, 1, 2] | sort | join(',') }}", &c).unwrap(),
            "1,2,3"
        );
        assert_eq!(
            render("{{ ([1, 2] * 2) | sort(reverse=true) | list }}", &c).unwrap(),
            "[2, 2, 1, 1]"
        );
        assert_eq!(
            render("{{ [{'a': 2}, {'a': 1}] | map(attribute='a') | max }}", &c).unwrap(),
            "2"
        );
    }

    #[test]
    fn tojson_rejects_what_python_rejects() {
        let err = render("{{ nothing | tojson }}", &Conversation::default()).unwrap_err();
        assert!(err.to_string().contains("not JSON serializable"), "{err}");
        let err = render("{{ [1] | tojson(colour=1) }}", &Conversation::default()).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render { .. }), "{err}");
        let err = render(
            "{{ [1] | tojson(indent=10**12) }}",
            &Conversation::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("indent must be"), "{err}");
    }

    #[test]
    fn strftime_now_uses_the_injected_date() {
        let date = NaiveDate::from_ymd_opt(2025, 3, 7).unwrap();
        let template = ChatTemplate::new(
            "{{ strftime_now('%B %d, %Y') }}|{{ strftime_now('%-d %b') }}",
            "t",
        )
        .unwrap()
        .with_date(date);
        assert_eq!(
            template.render(&Conversation::default(), false).unwrap(),
            "March 07, 2025|7 Mar"
        );
        let bad = ChatTemplate::new("{{ strftime_now('%Q') }}", "t").unwrap();
        let err = bad
            .render(&Conversation::default(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported format"), "{err}");
    }

    #[test]
    fn raise_exception_is_a_typed_error() {
        let template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Only user messages, please') }}{% endif %}ok";
        let conversation = Conversation::from_messages(vec![Message::new("system", "x")]);
        match render(template, &conversation) {
            Err(ChatTemplateError::Raised { origin, message }) => {
                assert_eq!(
                    (origin.as_str(), message.as_str()),
                    ("test template", "Only user messages, please")
                );
            }
            other => panic!("{other:?}"),
        }
        let conversation = Conversation::from_messages(vec![Message::new("user", "x")]);
        assert_eq!(render(template, &conversation).unwrap(), "ok");
    }

    #[test]
    fn malformed_templates_name_the_problem() {
        let err =
            ChatTemplate::new("{% for m in messages %}{{ m.content }}", "bad.json").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ChatTemplateError::Syntax { .. }), "{text}");
        assert!(
            text.starts_with("bad.json: the chat template does not compile: "),
            "{text}"
        );
        assert!(
            text.contains("endfor") || text.contains("end of input"),
            "{text}"
        );
        let err = ChatTemplate::new("{{ messages[0] + }}", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn python_string_methods_work() {
        let conversation = Conversation::from_messages(vec![Message::new("user", "  Hi there  ")]);
        let out = render(
            "{{ messages[0].content.strip() }}|{{ messages[0].content.split() | join(',') }}|\
             {{ messages[0].content.strip().startswith('Hi') }}|{% for k, v in messages[0].items() %}{{ k }}{% endfor %}",
            &conversation,
        )
        .unwrap();
        assert_eq!(out, "Hi there|Hi,there|True|rolecontent");
    }

    #[test]
    fn parses_both_conversation_shapes() {
        let list =
            Conversation::from_json_str(r#"[{"role": "user", "content": "hi", "name": "x"}]"#)
                .unwrap();
        assert_eq!(list.messages.len(), 1);
        assert_eq!(
            list.messages[0].0.keys().collect::<Vec<_>>(),
            ["role", "content", "name"]
        );
        let full = Conversation::from_json_str(
            r#"{"messages": [{"content": "hi", "role": "user"}], "tools": [{"b": 1, "a": 2}], "documents": null,
                "controls": {"citations": true}}"#,
        )
        .unwrap();
        assert_eq!(
            full.messages[0].0.keys().collect::<Vec<_>>(),
            ["content", "role"]
        );
        assert_eq!(full.tools.as_ref().map(Vec::len), Some(1));
        assert_eq!(full.documents, None);
        assert!(full.extra.contains_key("controls"));
        for (bad, why) in [
            ("{\"message\": []}", "expected a list of messages"),
            ("[{\"content\": \"x\"}]", "message 0 has no string \"role\""),
            ("[1]", "message 0 must be an object"),
            (
                "{\"messages\": [], \"add_generation_prompt\": true}",
                "set by the renderer",
            ),
            (
                "{\"messages\": [], \"tools\": 3}",
                "\"tools\" must be a list, not 3",
            ),
            ("[", "invalid JSON"),
        ] {
            let err = Conversation::from_json_str(bad).unwrap_err().to_string();
            assert!(
                err.starts_with("conversation JSON: not a usable conversation: "),
                "{err}"
            );
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
