//! One request's reply as text: tokens from the inference thread decoded as they arrive, held back only while
//! they might be the start of a stop string, and ended at the first stop string (which is not part of the reply).
//! With tools, what follows Granite's `<|tool_call|>` token is read as calls instead, each handed out as soon as
//! its JSON object is complete.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc::{self, UnboundedReceiver};

use super::tools::{self, ParsedCall, TOOL_CALL_MARKER};
use super::worker::Output;
use super::{ApiError, AppState};
use crate::engine::Engine;
use crate::engine::scheduler::{FinishReason, Request};
use crate::sampling::{SamplingParams, TokenConstraint};

/// What the reply did next.
#[derive(Debug)]
pub enum Step {
    /// More text (never empty).
    Text(String),
    /// A whole tool call (only with [`Generation::read_tool_calls`]).
    ToolCall(ParsedCall),
    /// The end: why, and the token counts for `usage`.
    End {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// A whole reply.
pub struct Whole {
    pub text: String,
    pub calls: Vec<ParsedCall>,
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// A response streamed from a channel: what is sent into the returned sender goes out as it comes. A client that
/// goes away drops the body, so the next send fails and the sending task can stop (dropping its generation,
/// which cancels the sequence).
pub fn streamed_response(content_type: &'static str) -> (mpsc::Sender<Bytes>, Response) {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    (tx, response)
}

pub struct Generation {
    engine: Arc<Engine>,
    rx: UnboundedReceiver<Output>,
    stops: Vec<String>,
    /// Every token generated (the end-of-text token not among them).
    ids: Vec<u32>,
    /// The text of `ids` so far, and how much of it has been handed out.
    text: String,
    sent: usize,
    prompt_tokens: usize,
    /// Steps worked out but not yet handed out.
    queue: VecDeque<Step>,
    done: bool,
    /// The id of `<|tool_call|>` when the reply is read for tool calls.
    tool_call_id: Option<u32>,
    /// Where the calls start in `ids` (just after the marker), once it came.
    calls_from: Option<usize>,
    calls_sent: usize,
}

impl Generation {
    /// Checks that the prompt fits a sequence's context, clips `max_tokens` to what fits after it (as
    /// llama-server and vLLM do), and queues the request.
    pub fn start(
        state: &AppState,
        prompt: Vec<u32>,
        params: SamplingParams,
        max_tokens: Option<usize>,
        stops: Vec<String>,
        constraint: Option<Box<dyn TokenConstraint>>,
    ) -> Result<Generation, ApiError> {
        let context = state.scheduler.context;
        if prompt.is_empty() {
            return Err(ApiError::bad_request(
                "the prompt is empty: there is nothing to continue",
            ));
        }
        if prompt.len() >= context {
            return Err(ApiError::bad_request(format!(
                "the prompt has {} tokens but a sequence's context holds {context} (one more is needed for the reply); shorten the messages or start the server with a larger --ctx-size",
                prompt.len()
            )));
        }
        let load = &state.worker.load;
        let limit = state.scheduler.max_running + state.cfg.max_queue;
        if load.in_flight.load(std::sync::atomic::Ordering::SeqCst) >= limit {
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "the server is busy: {} requests running and {} waiting (--max-queue); retry shortly",
                    state.scheduler.max_running, state.cfg.max_queue
                ),
            });
        }
        let room = context - prompt.len();
        let prompt_tokens = prompt.len();
        let rx = state.worker.submit(Request {
            prompt,
            params,
            max_tokens: max_tokens.unwrap_or(room).min(room),
            stop: vec![state.engine.tokenizer().eos_id()],
            constraint,
        });
        Ok(Generation::new(
            state.engine.clone(),
            rx,
            stops,
            prompt_tokens,
        ))
    }

    fn new(
        engine: Arc<Engine>,
        rx: UnboundedReceiver<Output>,
        stops: Vec<String>,
        prompt_tokens: usize,
    ) -> Generation {
        Generation {
            engine,
            rx,
            stops,
            ids: Vec::new(),
            text: String::new(),
            sent: 0,
            prompt_tokens,
            queue: VecDeque::new(),
            done: false,
            tool_call_id: None,
            calls_from: None,
            calls_sent: 0,
        }
    }

    /// Reads what follows `<|tool_call|>` (a special token, which decoding would drop) as tool calls. A
    /// tokenizer without that token has no calls to read.
    pub fn read_tool_calls(&mut self) {
        self.tool_call_id = self.engine.tokenizer().token_to_id(TOOL_CALL_MARKER);
    }

    /// The whole reply, waited for.
    pub async fn collect(mut self) -> Result<Whole, ApiError> {
        let mut text = String::new();
        let mut calls = Vec::new();
        loop {
            match self.next().await {
                Some(Ok(Step::Text(t))) => text.push_str(&t),
                Some(Ok(Step::ToolCall(c))) => calls.push(c),
                Some(Ok(Step::End {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                })) => {
                    return Ok(Whole {
                        text,
                        calls,
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                    });
                }
                Some(Err(e)) => return Err(e),
                None => return Err(self.fail("the reply ended twice".into())),
            }
        }
    }

    /// The next step; `None` after `End`. An error before any text is the request's (a 4xx) or the model's.
    pub async fn next(&mut self) -> Option<Result<Step, ApiError>> {
        if let Some(step) = self.queue.pop_front() {
            return Some(Ok(step));
        }
        if self.done {
            return None;
        }
        loop {
            let Some(out) = self.rx.recv().await else {
                self.done = true;
                return Some(Err(ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: "the inference thread stopped".into(),
                }));
            };
            match out {
                Output::Token(id) => {
                    let tokenizer = self.engine.tokenizer();
                    if id == tokenizer.eos_id() {
                        continue;
                    }
                    self.ids.push(id);
                    if let Some(from) = self.calls_from {
                        if let Err(e) = self.read_calls(from) {
                            return Some(Err(e));
                        }
                        if let Some(step) = self.queue.pop_front() {
                            return Some(Ok(step));
                        }
                        continue;
                    }
                    if Some(id) == self.tool_call_id {
                        // The content is complete: all of it goes out, stop strings aside.
                        self.calls_from = Some(self.ids.len());
                        if self.sent < self.text.len() {
                            let piece = self.text[self.sent..].to_string();
                            self.sent = self.text.len();
                            return Some(Ok(Step::Text(piece)));
                        }
                        continue;
                    }
                    // The whole text decoded again: exactly what a decode of all the ids gives (as `quarry run`
                    // prints), whatever a token's bytes look like alone.
                    self.text = match tokenizer.decode(&self.ids, true) {
                        Ok(t) => t,
                        Err(e) => return Some(Err(self.fail(format!("decoding the reply: {e}")))),
                    };
                    if let Some(at) = self.stop_at() {
                        self.text.truncate(at);
                        // Dropping the receiver cancels the sequence.
                        self.rx.close();
                        return Some(Ok(self.flush_then_end("stop")));
                    }
                    let safe = self.safe_len();
                    if safe > self.sent {
                        let piece = self.text[self.sent..safe].to_string();
                        self.sent = safe;
                        return Some(Ok(Step::Text(piece)));
                    }
                }
                Output::Done { reason, .. } => {
                    if let Some(from) = self.calls_from {
                        return Some(self.end_calls(from, reason));
                    }
                    return Some(Ok(self.flush_then_end(reason.name())));
                }
                Output::Refused(message) => {
                    self.done = true;
                    return Some(Err(ApiError::bad_request(message)));
                }
                Output::Failed(message) => return Some(Err(self.fail(message))),
            }
        }
    }

    fn fail(&mut self, message: String) -> ApiError {
        self.done = true;
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message,
        }
    }

    /// What is left of the text, then the end (the caller gets the end on its next call).
    fn flush_then_end(&mut self, finish_reason: &'static str) -> Step {
        if self.sent < self.text.len() {
            let piece = self.text[self.sent..].to_string();
            self.sent = self.text.len();
            let end = self.end(finish_reason);
            self.queue.push_back(end);
            return Step::Text(piece);
        }
        self.end(finish_reason)
    }

    /// The text after the marker.
    fn call_text(&self, from: usize) -> Result<String, ApiError> {
        self.engine
            .tokenizer()
            .decode(&self.ids[from..], true)
            .map_err(|e| ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("decoding the reply: {e}"),
            })
    }

    /// Queues the calls completed since the last look. An item that is not a call stops the reading: what was
    /// written stays as it is and, if no call went out, the reply ends as text.
    fn read_calls(&mut self, from: usize) -> Result<(), ApiError> {
        let text = self.call_text(from)?;
        let items = tools::complete_items(&text);
        while self.calls_sent < items.len() {
            let parsed = serde_json::from_str(items[self.calls_sent])
                .ok()
                .and_then(|v| tools::parse_call(&v));
            let Some(call) = parsed else {
                break;
            };
            self.calls_sent += 1;
            self.queue.push_back(Step::ToolCall(call));
        }
        Ok(())
    }

    /// The end of a reply that wrote the marker: `tool_calls` if calls went out; otherwise the marker and what
    /// followed it go out as text, since they were not a call.
    fn end_calls(&mut self, from: usize, reason: FinishReason) -> Result<Step, ApiError> {
        self.read_calls(from)?;
        if self.calls_sent == 0 {
            // Not a list read item by item; the whole text may still be a call (one object without its list).
            let rest = format!("{TOOL_CALL_MARKER}{}", self.call_text(from)?);
            let whole = tools::parse_reply(&rest);
            if whole.calls.is_empty() {
                self.queue.push_back(Step::Text(rest));
            }
            self.calls_sent = whole.calls.len();
            self.queue
                .extend(whole.calls.into_iter().map(Step::ToolCall));
        }
        let why = match reason {
            FinishReason::Stop if self.calls_sent > 0 => "tool_calls",
            other => other.name(),
        };
        let end = self.end(why);
        self.queue.push_back(end);
        Ok(self.queue.pop_front().expect("just queued"))
    }

    fn end(&mut self, finish_reason: &'static str) -> Step {
        self.done = true;
        Step::End {
            finish_reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.ids.len(),
        }
    }

    /// Where the first stop string starts, searching only where a new one can be.
    fn stop_at(&self) -> Option<usize> {
        let longest = self.stops.iter().map(|s| s.len()).max()?;
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }

    /// How much of the text can go out: all but a tail that may be the start of a stop string, and all but a
    /// trailing replacement character (a multi-byte character whose other tokens have not come yet).
    fn safe_len(&self) -> usize {
        let mut safe = self.text.len();
        if self.text.ends_with('\u{fffd}') {
            safe -= '\u{fffd}'.len_utf8();
        }
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.text[..safe].ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        (safe - hold).max(self.sent)
    }
}
