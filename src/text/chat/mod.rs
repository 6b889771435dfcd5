//! A conversation with a model over one [`Session`]: the REPL's logic, kept free of any terminal so that tests can
//! drive it.
//!
//! * [`ChatSession`] holds the messages, renders them with the model's chat template, keeps the KV cache across
//!   turns (a new turn computes only its new tokens), drops the oldest turns when the context would overflow, and
//!   streams a reply that a flag can stop.
//! * [`command`] parses the slash commands, [`input`] assembles multi-line input.

pub mod command;
pub mod input;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::engine::Engine;
use crate::generate::{GenerationStats, Session, StopReason, generate_observed};
use crate::model::ModelError;
use crate::sampling::{Sampler, SamplingParams};
use crate::text::chat_template::{ChatTemplate, ChatTemplateError, Conversation, Message};
use crate::text::tokenizer::{Tokenizer, TokenizerError};

use self::command::Setting;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(
        "the model file has no chat template (tokenizer.chat_template), which chat needs; `quarry run --raw` continues plain text"
    )]
    NoTemplate,
    #[error(
        "this message needs {needed} tokens with the system message and room for a {reserve}-token reply, but the \
         context holds {context}: shorten it{hint}"
    )]
    MessageTooLong {
        needed: usize,
        reserve: usize,
        context: usize,
        hint: String,
    },
    #[error(transparent)]
    Template(#[from] ChatTemplateError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Ctrl-C while the prompt was being processed: the message was not sent and the conversation is as it was
    /// before it.
    #[error(
        "cancelled after {done} of {total} prompt tokens: the message was not sent; the conversation is as it was"
    )]
    PromptCancelled { done: usize, total: usize },
    #[error("{}: cannot write it: {source}", path.display())]
    Save {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How replies are generated; `/set` changes them.
#[derive(Clone, Debug)]
pub struct ChatSettings {
    pub sampling: SamplingParams,
    /// Most tokens per reply (`None`: until the end-of-text token or a full context).
    pub max_tokens: Option<usize>,
    /// Show the speed line after each reply.
    pub verbose: bool,
}

/// A user message accepted into the conversation, ready for [`ChatSession::reply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// Oldest turns dropped so that the conversation and a reply fit the context.
    pub dropped_turns: usize,
    pub prompt_tokens: usize,
}

/// What one reply cost.
#[derive(Clone, Debug)]
pub struct TurnStats {
    pub generation: GenerationStats,
    /// Prompt tokens whose keys and values were already cached from earlier turns.
    pub reused_tokens: usize,
    pub dropped_turns: usize,
    /// Tokens in the cache after the reply.
    pub context_used: usize,
}

/// Sums over the whole session.
#[derive(Clone, Debug, Default)]
pub struct ChatTotals {
    pub turns: usize,
    pub generated_tokens: usize,
    pub generation_time: Duration,
    pub prompt_tokens_computed: usize,
    pub prompt_tokens_reused: usize,
    pub prompt_time: Duration,
}

/// A conversation with one model. See the module documentation.
pub struct ChatSession<'e> {
    tokenizer: &'e Tokenizer,
    template: &'e ChatTemplate,
    session: Session<'e>,
    sampler: Sampler,
    settings: ChatSettings,
    system: Option<String>,
    /// The turns after the system message.
    messages: Vec<Message>,
    /// The text and ids of the last prompt plus the reply the model generated to it: the ids are the model's own
    /// (a reply re-tokenized from its text can come out as different ids), so a next prompt that extends this text
    /// reuses them and, through the KV cache, computes only what is new.
    transcript_text: String,
    transcript_ids: Vec<u32>,
    /// The prompt [`ChatSession::submit`] prepared.
    prompt_text: String,
    prompt_ids: Vec<u32>,
    dropped_turns: usize,
    /// The turns as they were before [`ChatSession::submit`] dropped any to make room: what a cancelled message
    /// restores.
    before_submit: Vec<Message>,
    reply_ids: Vec<u32>,
    last: Option<TurnStats>,
    totals: ChatTotals,
}

impl<'e> ChatSession<'e> {
    /// A conversation over `engine` (opened with [`Engine::open_for_text`]) with room for `context` tokens in
    /// an f32 cache.
    pub fn new(
        engine: &'e Engine,
        context: usize,
        batch: usize,
        settings: ChatSettings,
    ) -> Result<ChatSession<'e>, ChatError> {
        Self::with_cache(engine, context, batch, crate::model::KvType::F32, settings)
    }

    /// [`ChatSession::new`] with keys and values stored as `cache`.
    pub fn with_cache(
        engine: &'e Engine,
        context: usize,
        batch: usize,
        cache: crate::model::KvType,
        settings: ChatSettings,
    ) -> Result<ChatSession<'e>, ChatError> {
        let template = engine.chat_template.as_ref().ok_or(ChatError::NoTemplate)?;
        let tokenizer = engine.tokenizer.as_ref().ok_or(ChatError::NoTemplate)?;
        let session = Session::with_cache(&engine.model, context, batch, cache);
        Ok(ChatSession {
            tokenizer,
            template,
            session,
            sampler: Sampler::new(settings.sampling.clone()),
            reply_ids: Vec::with_capacity(settings.max_tokens.unwrap_or(context).min(context)),
            settings,
            system: None,
            messages: Vec::new(),
            transcript_text: String::new(),
            transcript_ids: Vec::new(),
            prompt_text: String::new(),
            prompt_ids: Vec::new(),
            dropped_turns: 0,
            before_submit: Vec::new(),
            last: None,
            totals: ChatTotals::default(),
        })
    }

    pub fn settings(&self) -> &ChatSettings {
        &self.settings
    }

    pub fn system(&self) -> Option<&str> {
        self.system.as_deref()
    }

    /// Replaces the system message (`None`: the template's default, if it has one).
    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system.filter(|s| !s.trim().is_empty());
    }

    /// The turns after the system message.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Forgets the turns and drops them from the KV cache at once, so that the context in use is what the system
    /// message takes (which stays, and stays cached for the next message).
    pub fn clear(&mut self) {
        self.messages.clear();
        self.transcript_text.clear();
        self.transcript_ids.clear();
        self.last = None;
        let system_ids = self
            .template
            .render(&self.conversation(), false)
            .ok()
            .and_then(|text| self.tokenizer.encode(&text).ok())
            .unwrap_or_default();
        let keep = self
            .session
            .history()
            .iter()
            .zip(&system_ids)
            .take_while(|(a, b)| a == b)
            .count();
        self.session.truncate(keep);
    }

    /// The model's chat template (for `/show template`).
    pub fn template(&self) -> &ChatTemplate {
        self.template
    }

    pub fn context_size(&self) -> usize {
        self.session.context_size()
    }

    /// Tokens now in the KV cache.
    pub fn context_used(&self) -> usize {
        self.session.history().len()
    }

    /// The prompt [`ChatSession::submit`] prepared (for tests and `tokenize`-style inspection).
    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt_ids
    }

    pub fn last_turn(&self) -> Option<&TurnStats> {
        self.last.as_ref()
    }

    pub fn totals(&self) -> &ChatTotals {
        &self.totals
    }

    /// The whole conversation, system message first, as `/save` writes it.
    pub fn conversation(&self) -> Conversation {
        let mut messages = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = &self.system {
            messages.push(Message::new("system", system));
        }
        messages.extend(self.messages.iter().cloned());
        Conversation::from_messages(messages)
    }

    /// Replaces the conversation (a leading system message becomes the system message).
    pub fn load(&mut self, conversation: Conversation) {
        let mut messages = conversation.messages;
        self.system = None;
        if messages.first().and_then(Message::role) == Some("system")
            && let Some(content) = messages.first().and_then(Message::content)
        {
            self.system = Some(content.to_string());
            messages.remove(0);
        }
        self.messages = messages;
    }

    /// Writes the conversation as JSON (`{"messages": [...]}`, which `/load`, `quarry tokenize --chat` and
    /// transformers' `apply_chat_template` read), through a temporary file so a failed write leaves no torn file.
    pub fn save(&self, path: &Path) -> Result<usize, ChatError> {
        let conversation = self.conversation();
        let mut text =
            serde_json::to_string_pretty(&conversation).map_err(|e| ChatError::Save {
                path: path.to_path_buf(),
                source: std::io::Error::other(e),
            })?;
        text.push('\n');
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".part");
        let tmp = PathBuf::from(tmp);
        let result = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path));
        if let Err(source) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(ChatError::Save {
                path: path.to_path_buf(),
                source,
            });
        }
        Ok(conversation.messages.len())
    }

    /// Applies a `/set`; the error says why a value is refused.
    pub fn apply(&mut self, setting: Setting) -> Result<(), String> {
        let mut params = self.sampler.params.clone();
        match setting {
            Setting::Temperature(v) => params.temperature = v,
            Setting::TopK(v) => params.top_k = v,
            Setting::TopP(v) => params.top_p = v,
            Setting::MinP(v) => params.min_p = v,
            Setting::RepeatPenalty(v) => params.repeat_penalty = v,
            Setting::RepeatLastN(v) => params.repeat_last_n = v,
            Setting::Seed(v) => params.seed = v,
            Setting::MaxTokens(v) => {
                self.settings.max_tokens = v;
                return Ok(());
            }
            Setting::Verbose(v) => {
                self.settings.verbose = v;
                return Ok(());
            }
        }
        params.validate()?;
        if matches!(setting, Setting::Seed(_)) {
            // A new seed restarts the random sequence, so that `/set seed N` makes the next replies repeatable.
            self.sampler = Sampler::new(params.clone());
        } else {
            self.sampler.params = params.clone();
        }
        self.settings.sampling = params;
        Ok(())
    }

    /// Tokens kept free for the reply when deciding whether the conversation fits: the reply limit, at most a
    /// quarter of the context, so that a long limit does not throw away the whole conversation.
    fn reply_reserve(&self) -> usize {
        let ctx = self.context_size();
        self.settings
            .max_tokens
            .unwrap_or(usize::MAX)
            .min(ctx / 4)
            .max(1)
    }

    /// Adds a user message and prepares the prompt, dropping the oldest turns (never the system message) until the
    /// conversation and room for a reply fit the context. A message that cannot fit even alone is refused and the
    /// conversation is left as it was.
    pub fn submit(&mut self, text: &str) -> Result<Prepared, ChatError> {
        let message = Message::new("user", text);
        let context = self.context_size();
        let reserve = self.reply_reserve();
        // First the message with nothing but the system message: if that does not fit, no turn is dropped for it.
        let mut alone = self.conversation();
        alone.messages.truncate(usize::from(self.system.is_some()));
        alone.messages.push(message.clone());
        let needed = self
            .tokenizer
            .encode(&self.template.render(&alone, true)?)?
            .len()
            + reserve;
        if needed > context {
            let model_max = self.session.model().config.context_length;
            let hint = if context < model_max {
                format!(", or start the chat with a larger --ctx-size (up to {model_max})")
            } else {
                String::new()
            };
            return Err(ChatError::MessageTooLong {
                needed,
                reserve,
                context,
                hint,
            });
        }
        self.before_submit.clone_from(&self.messages);
        self.messages.push(message);
        let mut dropped = 0;
        loop {
            if let Err(e) = self.render_prompt() {
                self.messages.pop();
                return Err(e);
            }
            // The message alone fits (checked above), so this ends by the time only it is left.
            if self.prompt_ids.len() + reserve <= context || self.messages.len() <= 1 {
                break;
            }
            self.drop_oldest_turn();
            dropped += 1;
        }
        self.dropped_turns = dropped;
        Ok(Prepared {
            dropped_turns: dropped,
            prompt_tokens: self.prompt_ids.len(),
        })
    }

    /// Removes the first message and everything up to the next user message: one exchange.
    fn drop_oldest_turn(&mut self) {
        let next_user = self
            .messages
            .iter()
            .skip(1)
            .position(|m| m.role() == Some("user"))
            .map_or(1, |i| i + 1);
        self.messages
            .drain(..next_user.min(self.messages.len() - 1).max(1));
    }

    /// Renders the conversation and tokenizes it into `prompt_ids`, reusing the transcript's ids for the part of
    /// the text that has not changed since the last reply.
    fn render_prompt(&mut self) -> Result<(), ChatError> {
        let text = self.template.render(&self.conversation(), true)?;
        self.prompt_ids.clear();
        match text.strip_prefix(self.transcript_text.as_str()) {
            // The boundary falls right after the reply's last token (in Granite's format, before the special
            // `<|end_of_text|>` or role marker that follows), so tokenizing the rest alone splits it as a whole would.
            Some(rest) if !self.transcript_ids.is_empty() => {
                self.prompt_ids.extend_from_slice(&self.transcript_ids);
                self.prompt_ids.extend(self.tokenizer.encode(rest)?);
            }
            _ => self.prompt_ids.extend(self.tokenizer.encode(&text)?),
        }
        self.prompt_text = text;
        Ok(())
    }

    /// Generates the reply to the message [`ChatSession::submit`] accepted, giving each piece of text to `on_text`
    /// as it is decoded. `stop` is checked after every token: set it (from a SIGINT handler) to end the reply
    /// early; the partial reply is kept in the conversation. The caller clears it before the turn.
    pub fn reply(
        &mut self,
        stop: &AtomicBool,
        on_text: impl FnMut(&str) + Send,
    ) -> Result<&TurnStats, ChatError> {
        self.reply_observed(stop, |_, _| {}, on_text)
    }

    /// [`ChatSession::reply`] that also tells `on_prompt` (prompt tokens computed, tokens to compute) between the
    /// prompt's chunks, so a long message can show its progress. `stop` set while the prompt is being processed
    /// cancels the message: [`ChatError::PromptCancelled`], and the conversation, and the cache, are what they were
    /// before [`ChatSession::submit`].
    pub fn reply_observed(
        &mut self,
        stop: &AtomicBool,
        mut on_prompt: impl FnMut(usize, usize) + Send,
        mut on_text: impl FnMut(&str) + Send,
    ) -> Result<&TurnStats, ChatError> {
        let tokenizer = self.tokenizer;
        let eos = tokenizer.eos_id();
        let max_tokens = self.settings.max_tokens.unwrap_or(usize::MAX);
        let reply_ids = &mut self.reply_ids;
        reply_ids.clear();
        let mut stream = tokenizer.stream(true);
        let mut decode_error = None;
        let mut cancelled_at = (0, 0);
        let generated = generate_observed(
            &mut self.session,
            &self.prompt_ids,
            &mut self.sampler,
            max_tokens,
            &[eos],
            |done, total| {
                cancelled_at = (done, total);
                if stop.load(Ordering::Relaxed) {
                    return ControlFlow::Break(());
                }
                on_prompt(done, total);
                ControlFlow::Continue(())
            },
            |id| {
                reply_ids.push(id);
                match stream.push(id) {
                    Ok(piece) if !piece.is_empty() => on_text(&piece),
                    Ok(_) => {}
                    Err(e) => {
                        decode_error = Some(e);
                        return ControlFlow::Break(());
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        );
        let stats = match (generated, decode_error) {
            (Ok(stats), None) if !stats.prompt_done => {
                std::mem::swap(&mut self.messages, &mut self.before_submit);
                // The cache goes back to what the conversation holds, so that the context in use reads as before.
                let keep = self
                    .session
                    .history()
                    .iter()
                    .zip(&self.transcript_ids)
                    .take_while(|(a, b)| a == b)
                    .count();
                self.session.truncate(keep);
                let (done, total) = cancelled_at;
                return Err(ChatError::PromptCancelled { done, total });
            }
            (Ok(stats), None) => stats,
            (Err(e), _) => {
                self.messages.pop();
                return Err(e.into());
            }
            (Ok(_), Some(e)) => {
                self.messages.pop();
                return Err(e.into());
            }
        };
        let rest = stream.finish()?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        let content_ids = match self.reply_ids.last() {
            Some(&last) if last == eos => &self.reply_ids[..self.reply_ids.len() - 1],
            _ => &self.reply_ids[..],
        };
        let content = tokenizer.decode(content_ids, true)?;
        self.messages.push(Message::new("assistant", &content));
        self.transcript_text = std::mem::take(&mut self.prompt_text);
        self.transcript_text
            .push_str(&tokenizer.decode(&self.reply_ids, false)?);
        self.transcript_ids.clear();
        self.transcript_ids.extend_from_slice(&self.prompt_ids);
        self.transcript_ids.extend_from_slice(&self.reply_ids);

        let reused = stats.prompt_tokens - stats.prompt_tokens_computed;
        let t = &mut self.totals;
        t.turns += 1;
        t.generated_tokens += stats.generated_tokens;
        t.generation_time += stats.generation_time;
        t.prompt_tokens_computed += stats.prompt_tokens_computed;
        t.prompt_tokens_reused += reused;
        t.prompt_time += stats.prompt_time;
        Ok(self.last.insert(TurnStats {
            generation: stats,
            reused_tokens: reused,
            dropped_turns: self.dropped_turns,
            context_used: self.session.history().len(),
        }))
    }

    /// Whether the last reply ended because the context filled up (the next message will drop old turns).
    pub fn last_reply_hit_context(&self) -> bool {
        self.last
            .as_ref()
            .is_some_and(|t| t.generation.stop == StopReason::ContextFull)
    }
}
