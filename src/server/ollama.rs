//! ollama's API, so ollama clients work unchanged: `/api/chat` and `/api/generate` (NDJSON streaming by
//! default, `"stream": false` for one object), `/api/tags`, `/api/show`, `/api/ps`, `/api/version`.
//!
//! `format` (`"json"` or a JSON schema) is enforced by a grammar on every sampled token; a schema that cannot be
//! enforced is a 400, never ignored.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::generation::{Generation, Step, streamed_response};
use super::openai::{chat_messages, encode, integer, log, parse_body, render_prompt, sampling};
use super::tools::{self, ParsedCall, Tool};
use super::{ApiError, AppState, compile_schema};
use crate::sampling::{SamplingParams, TokenConstraint};
use crate::text::chat_template::{Conversation, Message};

pub async fn chat(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let prepared = async {
        let body = parse_body(body)?;
        let messages = chat_messages(&body)?;
        let (tools, _) = tools::parse_tools(&body)?;
        let mut opts = Options::parse(&state, &body)?;
        opts.read_tool_calls = !tools.is_empty();
        let prompt = render(&state, messages, &tools).await?;
        Ok::<_, ApiError>((opts, prompt))
    }
    .await;
    match prepared {
        Ok((opts, prompt)) => reply(state, "/api/chat", true, opts, prompt, started).await,
        Err(e) => e.into_response(),
    }
}

pub async fn generate(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let prepared = async {
        let body = parse_body(body)?;
        let Some(text) = body.get("prompt").and_then(Value::as_str) else {
            return Err(ApiError::bad_request("\"prompt\" must be a string"));
        };
        let raw = body.get("raw").and_then(Value::as_bool).unwrap_or(false);
        let prompt = if raw {
            encode(&state, text)?
        } else {
            let mut messages = Vec::new();
            if let Some(system) = body.get("system").and_then(Value::as_str) {
                messages.push(Message::new("system", system));
            }
            messages.push(Message::new("user", text));
            render(&state, messages, &[]).await?
        };
        Ok::<_, ApiError>((Options::parse(&state, &body)?, prompt))
    }
    .await;
    match prepared {
        Ok((opts, prompt)) => reply(state, "/api/generate", false, opts, prompt, started).await,
        Err(e) => e.into_response(),
    }
}

/// The prompt of `messages` (tool turns in Granite's roles) with `tools` offered.
async fn render(
    state: &Arc<AppState>,
    messages: Vec<Message>,
    tools: &[Tool],
) -> Result<Vec<u32>, ApiError> {
    let template = state.engine.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "the model has no chat template; use /api/generate with \"raw\": true",
        )
    })?;
    let mut conversation =
        Conversation::from_messages(tools::granite_messages(messages, template.source()));
    if !tools.is_empty() {
        conversation.tools = Some(tools.iter().map(|t| t.definition.clone()).collect());
    }
    let text = render_prompt(state, conversation).await?;
    encode(state, &text)
}

struct Options {
    stream: bool,
    params: SamplingParams,
    max_tokens: Option<usize>,
    stops: Vec<String>,
    model: Option<String>,
    /// `format`'s grammar.
    constraint: Option<Box<dyn TokenConstraint>>,
    /// Tools were offered: what follows `<|tool_call|>` is read as calls.
    read_tool_calls: bool,
}

impl Options {
    fn parse(state: &AppState, body: &Map<String, Value>) -> Result<Options, ApiError> {
        let constraint = match body.get("format") {
            None | Some(Value::Null) => None,
            Some(Value::String(f)) if f.is_empty() => None,
            Some(Value::String(f)) if f == "json" => {
                Some(compile_schema(state, &json!({"type": "object"}), "format")?)
            }
            Some(schema @ Value::Object(_)) => Some(compile_schema(state, schema, "format")?),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "\"format\" must be \"json\" or a JSON schema object, not {other}"
                )));
            }
        };
        let empty = Map::new();
        let options = match body.get("options") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(o)) => o,
            Some(_) => return Err(ApiError::bad_request("\"options\" must be an object")),
        };
        // ollama's num_predict: -1 (or absent) for no limit but the context.
        let max_tokens = match options.get("num_predict") {
            None | Some(Value::Null) => None,
            Some(v) if v.as_i64().is_some_and(|n| n < 0) => None,
            Some(_) => match integer(options, "num_predict")? {
                Some(0) => return Err(ApiError::bad_request("\"num_predict\" must not be 0")),
                n => n.map(|n| n as usize),
            },
        };
        let stops = match options.get("stop") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .filter(|s| !s.is_empty() && s.len() <= 256)
                        .map(str::to_string)
                        .ok_or_else(|| {
                            ApiError::bad_request("\"stop\" must be a list of non-empty strings")
                        })
                })
                .collect::<Result<_, _>>()?,
            Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
            Some(_) => return Err(ApiError::bad_request("\"stop\" must be a list of strings")),
        };
        Ok(Options {
            stream: body.get("stream").and_then(Value::as_bool).unwrap_or(true),
            params: sampling(options)?,
            max_tokens,
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

/// One reply: an NDJSON line per piece and a last one with `"done": true` and the counts, or one object.
async fn reply(
    state: Arc<AppState>,
    path: &'static str,
    is_chat: bool,
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
    let model = opts
        .model
        .clone()
        .unwrap_or_else(|| state.cfg.model_name.clone());
    let piece = move |text: &str, done: bool| -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("model".into(), json!(model));
        m.insert("created_at".into(), json!(now_rfc3339()));
        if is_chat {
            m.insert(
                "message".into(),
                json!({"role": "assistant", "content": text}),
            );
        } else {
            m.insert("response".into(), json!(text));
        }
        m.insert("done".into(), json!(done));
        m
    };
    let last = move |m: &mut Map<String, Value>, why: &str, prompt: usize, completion: usize| {
        let total = started.elapsed().as_nanos() as u64;
        m.insert("done_reason".into(), json!(why));
        m.insert("total_duration".into(), json!(total));
        m.insert("load_duration".into(), json!(0));
        m.insert("prompt_eval_count".into(), json!(prompt));
        m.insert("eval_count".into(), json!(completion));
        m.insert("eval_duration".into(), json!(total));
    };
    if !opts.stream {
        return match generation.collect().await {
            Ok(w) => {
                log(path, 200, w.prompt_tokens, w.completion_tokens, started);
                let mut m = piece(&w.text, true);
                if !w.calls.is_empty() {
                    m["message"]["tool_calls"] = w.calls.iter().map(ollama_call).collect();
                }
                last(
                    &mut m,
                    w.finish_reason,
                    w.prompt_tokens,
                    w.completion_tokens,
                );
                axum::Json(Value::Object(m)).into_response()
            }
            Err(e) => {
                log(path, e.status.as_u16(), prompt_tokens, 0, started);
                e.into_response()
            }
        };
    }
    let first = generation.next().await;
    if let Some(Err(e)) = first {
        log(path, e.status.as_u16(), prompt_tokens, 0, started);
        return e.into_response();
    }
    let (tx, response) = streamed_response("application/x-ndjson");
    let line = |m: Map<String, Value>| Bytes::from(format!("{}\n", Value::Object(m)));
    tokio::spawn(async move {
        let mut step = first;
        loop {
            match step {
                Some(Ok(Step::Text(t))) => {
                    if tx.send(line(piece(&t, false))).await.is_err() {
                        log(path, 499, prompt_tokens, 0, started);
                        return;
                    }
                }
                Some(Ok(Step::ToolCall(call))) => {
                    // ollama sends each call whole, in a message of its own.
                    let mut m = piece("", false);
                    m["message"]["tool_calls"] = json!([ollama_call(&call)]);
                    if tx.send(line(m)).await.is_err() {
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
                    let mut m = piece("", true);
                    last(&mut m, finish_reason, prompt_tokens, completion_tokens);
                    let _ = tx.send(line(m)).await;
                    return;
                }
                Some(Err(e)) => {
                    log(path, e.status.as_u16(), prompt_tokens, 0, started);
                    let _ = tx
                        .send(Bytes::from(format!("{}\n", json!({"error": e.message}))))
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

/// A call as ollama writes it: `arguments` an object, not a string.
fn ollama_call(call: &ParsedCall) -> Value {
    let arguments: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
    json!({"function": {"name": call.name, "arguments": arguments}})
}

/// The model as `/api/tags` and `/api/ps` describe it.
fn model_entry(state: &AppState) -> Value {
    let file = &state.engine.file;
    let arch = state.engine.model.config.arch.gguf_name();
    let quantization = file
        .get("general.file_type")
        .and_then(|v| v.as_u64())
        .and_then(crate::gguf::file_type_name)
        .unwrap_or("unknown");
    let params: u64 = file.tensors().iter().map(|t| t.n_elements()).sum();
    json!({
        "name": state.cfg.model_name,
        "model": state.cfg.model_name,
        "modified_at": now_rfc3339(),
        "size": file.file_len(),
        "digest": "",
        "details": {
            "format": "gguf",
            "family": arch,
            "families": [arch],
            "parameter_size": format!("{:.2}B", params as f64 / 1e9),
            "quantization_level": quantization,
        },
    })
}

pub async fn tags(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    axum::Json(json!({"models": [model_entry(&state)]}))
}

pub async fn ps(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let mut m = model_entry(&state);
    m["size_vram"] = json!(0);
    m["expires_at"] = json!("9999-12-31T00:00:00Z");
    axum::Json(json!({"models": [m]}))
}

pub async fn show(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let m = model_entry(&state);
    let cfg = &state.engine.model.config;
    axum::Json(json!({
        "modelfile": "",
        "parameters": "",
        "template": state.engine.file.get("tokenizer.chat_template").and_then(|v| v.as_str()).unwrap_or(""),
        "details": m["details"],
        "model_info": {
            "general.architecture": cfg.arch.gguf_name(),
            "context_length": cfg.context_length,
            "embedding_length": cfg.n_embd,
            "block_count": cfg.n_layer,
        },
        "capabilities": ["completion"],
    }))
}

pub async fn version() -> impl IntoResponse {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
