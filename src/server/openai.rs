//! The OpenAI API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, non-streamed and as server-sent
//! events framed as OpenAI frames them.
//!
//! Tools and `tool_choice` follow Granite's conventions ([`super::tools`]); `response_format` (`json_object`,
//! `json_schema`) and forced tool calls are enforced by a grammar on every sampled token. Fields that change what
//! a reply is and that this server cannot honour (presence/frequency penalties, `n > 1`, logprobs) are refused
//! with a 400 naming the field, never ignored.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::generation::{Generation, Step, streamed_response};
use super::tools::{self, ParsedCall, Tool, ToolChoice};
use super::{ApiError, AppState, compile_schema};
use crate::sampling::{SamplingParams, TokenConstraint};
use crate::text::chat_template::{Conversation, Message};

pub async fn models(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.cfg.model_name,
            "object": "model",
            "created": unix_now(),
            "owned_by": "quarry",
        }],
    }))
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let body = parse_body(body)?;
        let messages = chat_messages(&body)?;
        let template = state.engine.chat_template.as_ref().ok_or_else(|| {
            ApiError::bad_request(
                "the model has no chat template; use /v1/completions with a prompt instead",
            )
        })?;
        let mut opts = Options::parse(&state, &body)?;
        let (tools, choice) = tools::parse_tools(&body)?;
        let mut conversation =
            Conversation::from_messages(tools::granite_messages(messages, template.source()));
        if !tools.is_empty() && choice != ToolChoice::None {
            conversation.tools = Some(tools.iter().map(|t| t.definition.clone()).collect());
            opts.read_tool_calls = true;
        }
        let forced = match &choice {
            ToolChoice::Required => Some(None),
            ToolChoice::Function(name) => Some(Some(name.as_str())),
            ToolChoice::None | ToolChoice::Auto => None,
        };
        if let Some(only) = forced {
            if opts.constraint.is_some() {
                return Err(ApiError::bad_request(
                    "\"response_format\" and a forced \"tool_choice\" cannot both shape one reply; send one of them",
                ));
            }
            opts.constraint = Some(force_call(&state, &tools, only, &body)?);
        }
        let text = render_prompt(&state, conversation).await?;
        let prompt = encode(&state, &text)?;
        Ok::<_, ApiError>((opts, prompt))
    }
    .await;
    match result {
        Ok((opts, prompt)) => reply(state, Kind::Chat, opts, prompt, started).await,
        Err(e) => e.into_response(),
    }
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = (|| {
        let body = parse_body(body)?;
        let prompt = match body.get("prompt") {
            Some(Value::String(s)) => encode(&state, s)?,
            Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                encode(&state, items[0].as_str().unwrap_or_default())?
            }
            Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_u64) => {
                items
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .and_then(|id| u32::try_from(id).ok())
                            .ok_or_else(|| {
                                ApiError::bad_request("prompt token ids must fit in 32 bits")
                            })
                    })
                    .collect::<Result<Vec<u32>, ApiError>>()?
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "\"prompt\" must be a string, a list of one string, or a list of token ids",
                ));
            }
            None => return Err(ApiError::bad_request("\"prompt\" is required")),
        };
        let opts = Options::parse(&state, &body)?;
        Ok::<_, ApiError>((opts, prompt))
    })();
    match result {
        Ok((opts, prompt)) => reply(state, Kind::Completion, opts, prompt, started).await,
        Err(e) => e.into_response(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    /// The `object` of a response or of a stream chunk.
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }
}

/// The generation settings of a request.
struct Options {
    stream: bool,
    include_usage: bool,
    params: SamplingParams,
    max_tokens: Option<usize>,
    stops: Vec<String>,
    model: Option<String>,
    /// `response_format`'s grammar, or the one forcing a tool call.
    constraint: Option<Box<dyn TokenConstraint>>,
    /// Tools were offered: what follows `<|tool_call|>` is read as calls.
    read_tool_calls: bool,
}

/// The grammar of `response_format`: none for `text`, any JSON object for `json_object`, the schema's values for
/// `json_schema`. An unknown type or a schema the grammar engine cannot enforce is a 400.
fn response_format(
    state: &AppState,
    body: &Map<String, Value>,
) -> Result<Option<Box<dyn TokenConstraint>>, ApiError> {
    let Some(rf) = body.get("response_format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let schema = match rf.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => json!({"type": "object"}),
        Some("json_schema") => rf
            .get("json_schema")
            .and_then(|j| j.get("schema"))
            .cloned()
            .ok_or_else(|| {
                ApiError::bad_request(
                    "\"response_format\" json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                )
            })?,
        other => {
            return Err(ApiError::bad_request(format!(
                "\"response_format\" type {} is not one of text, json_object, json_schema",
                other.map_or("(missing)".to_string(), |t| format!("\"{t}\""))
            )));
        }
    };
    compile_schema(state, &schema, "response_format").map(Some)
}

/// The grammar that makes the reply a call of `tools` (of `only` when named); `parallel_tool_calls: true` lets
/// it be several calls.
fn force_call(
    state: &AppState,
    tools: &[Tool],
    only: Option<&str>,
    body: &Map<String, Value>,
) -> Result<Box<dyn TokenConstraint>, ApiError> {
    let parallel = body
        .get("parallel_tool_calls")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let grammars = state.engine.grammars().map_err(ApiError::internal)?;
    let grammar = grammars
        .lark(&tools::call_grammar(tools, only, parallel))
        .map_err(|e| {
            ApiError::bad_request(format!(
                "the tools' parameter schemas cannot be enforced: {e}"
            ))
        })?;
    Ok(Box::new(grammar))
}

impl Options {
    fn parse(state: &AppState, body: &Map<String, Value>) -> Result<Options, ApiError> {
        let constraint = response_format(state, body)?;
        for field in ["presence_penalty", "frequency_penalty"] {
            if let Some(v) = body.get(field).filter(|v| !v.is_null())
                && v.as_f64() != Some(0.0)
            {
                return Err(ApiError::bad_request(format!(
                    "\"{field}\" other than 0 is not supported by this server yet"
                )));
            }
        }
        if body
            .get("logprobs")
            .is_some_and(|v| v.as_bool() == Some(true))
        {
            return Err(ApiError::bad_request("\"logprobs\" is not supported"));
        }
        if let Some(n) = body.get("n").filter(|v| !v.is_null())
            && n.as_u64() != Some(1)
        {
            return Err(ApiError::bad_request("only \"n\": 1 is supported"));
        }
        let params = sampling(body)?;
        let max_tokens = match integer(body, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => integer(body, "max_tokens")?,
        };
        if max_tokens == Some(0) {
            return Err(ApiError::bad_request("\"max_tokens\" must be at least 1"));
        }
        let stops = match body.get("stop") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::bad_request("\"stop\" must be a string or a list of strings")
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "\"stop\" must be a string or a list of strings",
                ));
            }
        };
        if stops.len() > 16 || stops.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(ApiError::bad_request(
                "\"stop\" takes at most 16 non-empty strings of at most 256 bytes",
            ));
        }
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::bad_request("\"stream\" must be true or false")),
        };
        let include_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Options {
            stream,
            include_usage,
            params,
            max_tokens: max_tokens.map(|n| n as usize),
            stops,
            model: body
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string),
            constraint,
            read_tool_calls: false,
        })
    }
}

/// Runs the request and answers it, whole or streamed.
async fn reply(
    state: Arc<AppState>,
    kind: Kind,
    mut opts: Options,
    prompt: Vec<u32>,
    started: Instant,
) -> Response {
    let prompt_tokens = prompt.len();
    let mut generation = match Generation::start(
        &state,
        prompt,
        opts.params.clone(),
        opts.max_tokens,
        opts.stops.clone(),
        opts.constraint.take(),
    ) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    if opts.read_tool_calls {
        generation.read_tool_calls();
    }
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{n}"),
        Kind::Completion => format!("cmpl-{n}"),
    };
    let model = opts
        .model
        .clone()
        .unwrap_or_else(|| state.cfg.model_name.clone());
    let path = match kind {
        Kind::Chat => "/v1/chat/completions",
        Kind::Completion => "/v1/completions",
    };
    if !opts.stream {
        let whole = match generation.collect().await {
            Ok(w) => w,
            Err(e) => {
                log(path, e.status.as_u16(), prompt_tokens, 0, started);
                return e.into_response();
            }
        };
        log(
            path,
            200,
            whole.prompt_tokens,
            whole.completion_tokens,
            started,
        );
        let choice = match kind {
            Kind::Chat if !whole.calls.is_empty() => json!({
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": if whole.text.is_empty() { Value::Null } else { json!(whole.text) },
                    "tool_calls": whole.calls.iter().enumerate()
                        .map(|(i, c)| tool_call_json(&id, i, c)).collect::<Vec<_>>(),
                },
                "finish_reason": whole.finish_reason,
            }),
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": whole.text},
                "finish_reason": whole.finish_reason,
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": whole.text,
                "logprobs": null,
                "finish_reason": whole.finish_reason,
            }),
        };
        return axum::Json(json!({
            "id": id,
            "object": kind.object(false),
            "created": unix_now(),
            "model": model,
            "choices": [choice],
            "usage": usage(whole.prompt_tokens, whole.completion_tokens),
        }))
        .into_response();
    }

    // Streaming: the first step decides the status (a refused request is still a plain 4xx); after that,
    // events. The body reads from a channel fed by a task, so a client that goes away drops the channel,
    // the task stops, and dropping its generation cancels the sequence.
    let first = generation.next().await;
    if let Some(Err(e)) = first {
        log(path, e.status.as_u16(), prompt_tokens, 0, started);
        return e.into_response();
    }
    let (tx, response) = streamed_response("text/event-stream");
    let created = unix_now();
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Value| -> Bytes {
            let choice = match kind {
                Kind::Chat => json!({"index": 0, "delta": delta, "finish_reason": finish}),
                Kind::Completion => json!({
                    "index": 0,
                    "text": delta.get("content").and_then(Value::as_str).unwrap_or(""),
                    "logprobs": null,
                    "finish_reason": finish,
                }),
            };
            event(&json!({
                "id": id, "object": kind.object(true), "created": created, "model": model, "choices": [choice],
            }))
        };
        if kind == Kind::Chat
            && tx
                .send(chunk(
                    json!({"role": "assistant", "content": null}),
                    Value::Null,
                ))
                .await
                .is_err()
        {
            return;
        }
        let mut step = first;
        let mut calls = 0;
        loop {
            match step {
                Some(Ok(Step::ToolCall(call))) => {
                    // OpenAI's framing: the id, type and name first, then the arguments in pieces.
                    let mut head = tool_call_json(&id, calls, &call);
                    head["function"]["arguments"] = json!("");
                    let mut deltas = vec![json!({"tool_calls": [head]})];
                    for piece in fragments(&call.arguments, 24) {
                        deltas.push(json!({"tool_calls": [
                            {"index": calls, "function": {"arguments": piece}}
                        ]}));
                    }
                    calls += 1;
                    for d in deltas {
                        if tx.send(chunk(d, Value::Null)).await.is_err() {
                            log(path, 499, prompt_tokens, 0, started);
                            return;
                        }
                    }
                }
                Some(Ok(Step::Text(t))) => {
                    if tx
                        .send(chunk(json!({"content": t}), Value::Null))
                        .await
                        .is_err()
                    {
                        log(path, 499, prompt_tokens, 0, started);
                        return;
                    }
                }
                Some(Ok(Step::End {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                })) => {
                    log(path, 200, prompt_tokens, completion_tokens, started);
                    let _ = tx.send(chunk(json!({}), json!(finish_reason))).await;
                    if opts.include_usage {
                        let _ = tx
                            .send(event(&json!({
                                "id": id,
                                "object": kind.object(true),
                                "created": created,
                                "model": model,
                                "choices": [],
                                "usage": usage(prompt_tokens, completion_tokens),
                            })))
                            .await;
                    }
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    return;
                }
                Some(Err(e)) => {
                    log(path, e.status.as_u16(), prompt_tokens, 0, started);
                    let _ = tx
                        .send(event(&json!({"error": {
                            "message": e.message, "type": "server_error", "code": e.status.as_u16(),
                        }})))
                        .await;
                    return;
                }
                None => return,
            }
            step = generation.next().await;
        }
    });
    response
}

/// A call as OpenAI writes it, its id made from the response's.
fn tool_call_json(response_id: &str, index: usize, call: &ParsedCall) -> Value {
    let tail = response_id.rsplit('-').next().unwrap_or("0");
    json!({
        "index": index,
        "id": format!("call_{tail}_{index}"),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    })
}

/// `text` in pieces of at most `n` characters.
fn fragments(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(n.max(1)).map(|c| c.iter().collect()).collect()
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// One line per request on stderr.
pub(super) fn log(path: &str, status: u16, prompt: usize, completion: usize, started: Instant) {
    eprintln!(
        "POST {path} {status} prompt {prompt} completion {completion} {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
}

pub(super) fn parse_body(
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let body = body.map_err(|e| ApiError {
        status: e.status(),
        message: format!("reading the request body: {}", e.body_text()),
    })?;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// The request's messages as the chat template takes them; content given as text parts is joined.
pub(super) fn chat_messages(body: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let Some(Value::Array(items)) = body.get("messages") else {
        return Err(ApiError::bad_request(
            "\"messages\" must be a list of messages",
        ));
    };
    if items.is_empty() {
        return Err(ApiError::bad_request("\"messages\" is empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let bad = |what: &str| ApiError::bad_request(format!("messages[{i}]: {what}"));
            let Some(m) = m.as_object() else {
                return Err(bad("must be an object with \"role\" and \"content\""));
            };
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("\"role\" must be a string"))?;
            if !matches!(role, "system" | "user" | "assistant" | "developer" | "tool") {
                return Err(bad(&format!(
                    "role \"{role}\" is not supported (system, developer, user, assistant, tool)"
                )));
            }
            let tool_calls = match m.get("tool_calls") {
                None | Some(Value::Null) => None,
                Some(Value::Array(calls)) if role == "assistant" => {
                    for (k, c) in calls.iter().enumerate() {
                        let f = c.get("function");
                        if f.and_then(|f| f.get("name")).and_then(Value::as_str).is_none() {
                            return Err(bad(&format!(
                                "tool_calls[{k}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}"
                            )));
                        }
                    }
                    Some(Value::Array(calls.clone()))
                }
                Some(_) => {
                    return Err(bad("\"tool_calls\" must be a list, on an assistant message"));
                }
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(bad(&format!(
                                    "content part of type {} is not supported (only text)",
                                    kind.unwrap_or("?")
                                )));
                            }
                        }
                    }
                    text
                }
                None | Some(Value::Null) if role == "assistant" => String::new(),
                _ => return Err(bad("\"content\" must be a string or a list of text parts")),
            };
            let role = if role == "developer" { "system" } else { role };
            let mut message = Message::new(role, &content);
            if let Some(calls) = tool_calls {
                message.0.insert("tool_calls".into(), calls);
            }
            Ok(message)
        })
        .collect()
}

/// The prompt text of `conversation`, ending with the assistant's turn. A template that is not Granite's own
/// renders in a child process, which can take seconds before a hostile one is refused: that wait is on a blocking
/// thread, never on the one that serves every connection.
pub(super) async fn render_prompt(
    state: &Arc<AppState>,
    conversation: Conversation,
) -> Result<String, ApiError> {
    let no_template = || ApiError::bad_request("the model has no chat template");
    let template = state
        .engine
        .chat_template
        .as_ref()
        .ok_or_else(no_template)?;
    let rendered = if template.renders_isolated() {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let template = state
                .engine
                .chat_template
                .as_ref()
                .ok_or_else(no_template)?;
            Ok(template.render(&conversation, true))
        })
        .await
        .map_err(|e| ApiError::internal(format!("rendering the messages: {e}")))??
    } else {
        template.render(&conversation, true)
    };
    rendered.map_err(|e| ApiError::bad_request(format!("rendering the messages: {e}")))
}

pub(super) fn encode(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    state
        .engine
        .tokenizer()
        .encode_at_most(text, state.scheduler.context)
        .map_err(|e| ApiError::bad_request(format!("the prompt: {e}")))
}

/// `temperature`, `top_p`, `top_k` and `seed` of a request (OpenAI's top level, ollama's `options`), the rest as
/// `quarry run` has them; without a seed, a fresh one.
pub(super) fn sampling(fields: &Map<String, Value>) -> Result<SamplingParams, ApiError> {
    let defaults = SamplingParams::default();
    let top_p = number(fields, "top_p", 0.0, 1.0)?.unwrap_or(defaults.top_p);
    if top_p == 0.0 {
        return Err(ApiError::bad_request("\"top_p\" must be above 0"));
    }
    let seed = match fields.get("seed").filter(|v| !v.is_null()) {
        None => crate::sampling::fresh_seed(),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|i| i as u64))
            .ok_or_else(|| ApiError::bad_request("\"seed\" must be an integer"))?,
    };
    Ok(SamplingParams {
        temperature: number(fields, "temperature", 0.0, 2.0)?.unwrap_or(defaults.temperature),
        top_p,
        top_k: integer(fields, "top_k")?.map_or(defaults.top_k, |k| k as usize),
        seed,
        ..defaults
    })
}

pub(super) fn number(
    body: &Map<String, Value>,
    field: &str,
    lo: f64,
    hi: f64,
) -> Result<Option<f32>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x as f32)),
            _ => Err(ApiError::bad_request(format!(
                "\"{field}\" must be a number from {lo} to {hi}"
            ))),
        },
    }
}

pub(super) fn integer(body: &Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad_request(format!("\"{field}\" must be a non-negative integer"))
        }),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
