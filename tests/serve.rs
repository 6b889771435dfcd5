//! `quarry serve` driven over plain HTTP as any OpenAI client drives it, on the real-vocabulary fixture (the
//! real Granite tokenizer and chat template): greedy replies equal `quarry run`, a streamed reply adds up to the
//! same text in OpenAI's framing, concurrent requests each get their solo reply, stop strings cut the reply,
//! every bad request gets a 4xx with an error object and the server stays up, and an API key is enforced.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::serve::{Server, chat, model};

/// The content deltas of a stream's events, joined.
fn streamed_content(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

fn content(v: &Value) -> &str {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
}

/// `quarry run`'s greedy reply, as JSON.
fn run_reference(model: &Path, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_quarry"))
        .arg("run")
        .arg(model)
        .args(args)
        .args(["--temperature", "0", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const PROMPTS: [&str; 5] = [
    "Hello",
    "Write a haiku about granite.",
    "Wie spät ist es?",
    "def fib(n):",
    "Summarize: the cat sat on the mat.",
];

#[test]
fn openai_chat_and_completions_equal_quarry_run() {
    let Some(model) = model() else { return };
    let srv = Server::start(&model, &["--parallel", "4", "--ctx-size", "512"]);

    let (st, models) = srv.get("/v1/models");
    assert_eq!(st, 200);
    assert_eq!(models["data"][0]["object"], "model");

    // Non-streamed chat equals `quarry run` on the same message, with the same usage.
    let want = run_reference(&model, &["--prompt", PROMPTS[1], "-n", "12"]);
    let (st, got) = srv.post("/v1/chat/completions", &chat(PROMPTS[1], 12));
    assert_eq!(st, 200, "{got}");
    assert_eq!(content(&got), want["text"].as_str().unwrap());
    assert_eq!(got["object"], "chat.completion");
    assert_eq!(got["choices"][0]["finish_reason"], "length");
    assert_eq!(
        got["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        want["prompt_ids"].as_array().unwrap().len()
    );
    assert_eq!(got["usage"]["completion_tokens"], 12);
    assert_eq!(
        got["usage"]["total_tokens"],
        got["usage"]["prompt_tokens"].as_u64().unwrap() + 12
    );

    // Streamed: a role delta first, content deltas adding up to the same text, one finish_reason, a usage
    // chunk with no choices, then [DONE].
    let mut body = chat(PROMPTS[1], 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (st, ctype, events) = srv.stream("/v1/chat/completions", &body);
    assert_eq!(st, 200);
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, content(&got));
    let finishes: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).map(|ch| &ch["finish_reason"]))
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("length")]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], got["usage"]);

    // Plain completions continue the text as `quarry run --raw` does.
    let want = run_reference(
        &model,
        &["--raw", "--prompt", "Once upon a time", "-n", "8"],
    );
    let (st, got) = srv.post(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "temperature": 0, "max_tokens": 8}),
    );
    assert_eq!(st, 200, "{got}");
    assert_eq!(got["choices"][0]["text"], want["text"]);
    assert_eq!(got["object"], "text_completion");
}

#[test]
fn concurrent_requests_each_get_their_solo_reply_and_stop_strings_cut() {
    let Some(model) = model() else { return };
    let srv = Server::start(&model, &["--parallel", "3", "--ctx-size", "512"]);
    let solo: Vec<String> = PROMPTS
        .iter()
        .map(|p| {
            let (st, v) = srv.post("/v1/chat/completions", &chat(p, 16));
            assert_eq!(st, 200, "{v}");
            content(&v).to_string()
        })
        .collect();
    // All at once (more than --parallel, so some wait for a slot), each twice.
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = PROMPTS
            .iter()
            .chain(PROMPTS.iter())
            .map(|p| {
                let srv = &srv;
                s.spawn(move || {
                    let (st, v) = srv.post("/v1/chat/completions", &chat(p, 16));
                    assert_eq!(st, 200, "{v}");
                    content(&v).to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, got) in together.iter().enumerate() {
        assert_eq!(got, &solo[i % PROMPTS.len()], "request {i} among others");
    }

    // A stop string from the middle of a reply ends it just before, streamed or not.
    let full = &solo[1];
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    let (at, _) = chars[chars.len() / 2];
    let stop: String = full[at..].chars().take(3).collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let mut body = chat(PROMPTS[1], 16);
    body["stop"] = json!([stop]);
    let (st, got) = srv.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{got}");
    assert_eq!(content(&got), cut, "stop {stop:?}");
    assert_eq!(got["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let (_, _, events) = srv.stream("/v1/chat/completions", &body);
    let text = streamed_content(&events);
    assert_eq!(text, cut);
}

#[test]
fn bad_requests_get_4xx_error_objects_and_the_server_stays_up() {
    let Some(model) = model() else { return };
    let srv = Server::start(&model, &["--parallel", "2", "--ctx-size", "64"]);
    let long = "granite ".repeat(200);
    // 7 MB, under the body limit: refused by its length before it is tokenized.
    let huge = "granite ".repeat(7 << 17);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": huge}]}).to_string(),
            400,
            "more than 64 tokens can hold",
        ),
        (
            "/api/generate",
            json!({"model": "m", "prompt": huge, "stream": false}).to_string(),
            400,
            "more than 64 tokens can hold",
        ),
        (
            "/v1/chat/completions",
            "{not json".into(),
            400,
            "not valid JSON",
        ),
        ("/v1/chat/completions", "[1, 2]".into(), 400, "JSON object"),
        (
            "/v1/chat/completions",
            json!({"model": "m"}).to_string(),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}).to_string(),
            400,
            "empty",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "hi"}]}).to_string(),
            400,
            "wizard",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": 7}]}).to_string(),
            400,
            "content",
        ),
        (
            "/v1/chat/completions",
            chat(&long, 4).to_string(),
            400,
            "tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})
                .to_string(),
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}).to_string(),
            400,
            "\"n\"",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "response_format": {"type": "json_schema", "schema": {}}})
            .to_string(),
            400,
            "response_format",
        ),
        (
            "/v1/completions",
            json!({"prompt": 5}).to_string(),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"prompt": [4_294_967_296u64]}).to_string(),
            400,
            "32 bits",
        ),
        ("/v1/nothing", "{}".into(), 404, "no route"),
    ];
    for (path, body, status, needle) in &cases {
        let (st, v) = srv.post_raw(path, body.as_bytes(), None);
        assert_eq!(st, *status, "{path} {body}: {v}");
        let message = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"));
        assert!(message.contains(needle), "{path} {body}: {message}");
        assert!(v["error"]["type"].is_string());
    }
    // A body just over the 8 MiB limit: refused once the limit is passed (the rest may be left unsent).
    {
        use std::io::{Read, Write};
        let body = format!("{{\"prompt\": \"{}\"}}", "a".repeat((8 << 20) + (16 << 10)));
        let mut sock =
            std::net::TcpStream::connect(srv.base.trim_start_matches("http://")).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let request = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = sock.write_all(request.as_bytes());
        let mut reply = Vec::new();
        let _ = sock.read_to_end(&mut reply);
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
        assert!(reply.contains("\"error\""), "{reply}");
    }
    // Still serving.
    assert_eq!(srv.get("/health").0, 200);
    let (st, v) = srv.post("/v1/chat/completions", &chat("Hello", 4));
    assert_eq!(st, 200, "{v}");
    // A request asking for more than fits is clipped to the context, not refused.
    let (st, v) = srv.post("/v1/chat/completions", &chat("Hello", 100_000));
    assert_eq!(st, 200, "{v}");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() <= 64);
}

#[test]
fn an_api_key_is_required_everywhere_but_health() {
    let Some(model) = model() else { return };
    let srv = Server::start(&model, &["--ctx-size", "128", "--api-key", "sesame"]);
    assert_eq!(srv.get("/health").0, 200);
    let body = chat("Hello", 2).to_string();
    for key in [None, Some("wrong"), Some("sesam")] {
        let (st, v) = srv.post_raw("/v1/chat/completions", body.as_bytes(), key);
        assert_eq!(st, 401, "{key:?}: {v}");
        assert_eq!(v["error"]["type"], "authentication_error");
    }
    assert_eq!(srv.get("/v1/models").0, 401);
    let (st, v) = srv.post_raw("/v1/chat/completions", body.as_bytes(), Some("sesame"));
    assert_eq!(st, 200, "{v}");
}

#[test]
fn a_client_that_vanishes_mid_stream_frees_its_slot() {
    use std::io::Read;
    let Some(model) = model() else { return };
    let srv = Server::start(&model, &["--parallel", "1", "--ctx-size", "4096"]);
    // The random-weight model writes thousands of tokens without an end-of-text token.
    let mut sock = open_stream(&srv, 3000);
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while seen.windows(6).filter(|w| w == b"data: ").count() < 4 {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(sock);
    wait_for(&srv, "the vanished client's sequence to stop", |s| {
        s.metric("requests_processing") + s.metric("requests_deferred") == 0.0
    });
    assert!(
        srv.metric("tokens_predicted_total") < 3000.0,
        "the sequence ran to its end instead of being cancelled"
    );
    assert_eq!(srv.metric("requests_total"), 1.0);
    // The one slot serves the next request.
    let (st, v) = srv.post("/v1/chat/completions", &chat("Hello", 4));
    assert_eq!(st, 200, "{v}");
}

#[test]
fn the_ollama_api_gives_the_same_replies() {
    let Some(model) = model() else { return };
    let srv = Server::start(&model, &["--parallel", "2", "--ctx-size", "512"]);
    let (st, openai) = srv.post("/v1/chat/completions", &chat(PROMPTS[1], 12));
    assert_eq!(st, 200, "{openai}");
    let want = content(&openai);
    let body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": PROMPTS[1]}],
        "options": {"temperature": 0, "num_predict": 12},
    });
    // Streamed by default, as NDJSON: pieces, then a last line with done and the counts.
    let mut r = srv
        .agent
        .post(format!("{}/api/chat", srv.base))
        .send(body.to_string())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ctype = r.headers()["content-type"].to_str().unwrap().to_string();
    assert_eq!(ctype, "application/x-ndjson");
    let lines: Vec<Value> = r
        .body_mut()
        .read_to_string()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, want);
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "length");
    assert_eq!(last["eval_count"], 12);
    assert_eq!(last["prompt_eval_count"], openai["usage"]["prompt_tokens"]);
    assert!(lines[..lines.len() - 1].iter().all(|l| l["done"] == false));

    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let (st, v) = srv.post("/api/chat", &whole);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["message"]["content"], want);
    assert_eq!(v["done"], true);

    let reference = run_reference(
        &model,
        &["--raw", "--prompt", "Once upon a time", "-n", "8"],
    );
    let (st, v) = srv.post(
        "/api/generate",
        &json!({"prompt": "Once upon a time", "raw": true, "stream": false,
                "options": {"temperature": 0, "num_predict": 8}}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["response"], reference["text"]);
    // Without raw the prompt is a user message through the chat template, as in /api/chat.
    let (st, v) = srv.post(
        "/api/generate",
        &json!({"prompt": PROMPTS[1], "stream": false, "options": {"temperature": 0, "num_predict": 12}}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["response"], want);

    let (st, tags) = srv.get("/api/tags");
    assert_eq!(st, 200);
    assert_eq!(tags["models"][0]["details"]["format"], "gguf");
    assert_eq!(tags["models"][0]["details"]["quantization_level"], "Q8_0");
    assert_eq!(srv.get("/api/ps").0, 200);
    assert!(srv.get("/api/version").1["version"].is_string());
    let (st, show) = srv.post("/api/show", &json!({"model": "m"}));
    assert_eq!(st, 200);
    assert!(show["template"].as_str().unwrap().contains("start_of_role"));

    // `format`: a schema is followed; one that cannot be enforced is refused, not ignored.
    let mut fmt = whole.clone();
    fmt["format"] = person_schema();
    fmt["options"]["num_predict"] = json!(96);
    let (st, v) = srv.post("/api/chat", &fmt);
    assert_eq!(st, 200, "{v}");
    assert_person(v["message"]["content"].as_str().unwrap());
    fmt["format"] = json!({"type": "bogus"});
    let (st, v) = srv.post("/api/chat", &fmt);
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("format"));
}

/// A schema whose strings are bounded, so that even random weights close the object within the reply's tokens.
fn person_schema() -> Value {
    json!({"type": "object",
           "properties": {"name": {"type": "string", "maxLength": 16},
                          "age": {"type": "integer", "minimum": 0, "maximum": 150}},
           "required": ["name", "age"], "additionalProperties": false})
}

/// `text` is one JSON object valid against [`person_schema`].
fn assert_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {text}"));
    assert_eq!(o.len(), 2, "{text}");
    assert!(o["name"].as_str().unwrap().chars().count() <= 16, "{text}");
    let age = o["age"].as_i64().unwrap_or_else(|| panic!("age: {text}"));
    assert!((0..=150).contains(&age), "{text}");
}

#[test]
fn structured_output_follows_its_schema() {
    let Some(model) = model() else { return };
    let srv = Server::start(&model, &["--parallel", "2", "--ctx-size", "512"]);
    let mut body = chat("Invent a person.", 96);
    body["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "p", "schema": person_schema()}});
    let (st, v) = srv.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let whole = content(&v).to_string();
    assert_person(&whole);
    // Streamed, the same reply; sampled with a seed, still valid.
    body["stream"] = json!(true);
    let (st, _, events) = srv.stream("/v1/chat/completions", &body);
    assert_eq!(st, 200);
    let streamed = streamed_content(&events);
    assert_eq!(streamed, whole);
    body["stream"] = json!(false);
    for seed in 1..4 {
        body["temperature"] = json!(1.0);
        body["seed"] = json!(seed);
        let (st, v) = srv.post("/v1/chat/completions", &body);
        assert_eq!(st, 200, "{v}");
        assert_person(content(&v));
    }

    // json_object: any object; cut by the length limit, the start of one.
    let mut body = chat("JSON please.", 64);
    body["response_format"] = json!({"type": "json_object"});
    let (st, v) = srv.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    let text = content(&v);
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    } else {
        assert!(text.starts_with('{'), "{text}");
    }

    // Schemas that cannot be enforced, and formats that do not exist, are refused by name.
    for (format, needle) in [
        (
            json!({"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}),
            "bogus",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"schema": 3}}),
            "schema",
        ),
        (json!({"type": "json_schema"}), "json_schema"),
        (json!({"type": "yaml"}), "yaml"),
    ] {
        let mut body = chat("hi", 8);
        body["response_format"] = format.clone();
        let (st, v) = srv.post("/v1/chat/completions", &body);
        assert_eq!(st, 400, "{format}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{format}: {message}");
    }
    assert_eq!(srv.get("/health").0, 200);
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
         "parameters": {"type": "object",
                        "properties": {"location": {"type": "string", "maxLength": 24},
                                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                        "required": ["location"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone",
         "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 24}},
                        "required": ["timezone"], "additionalProperties": false}}}
    ])
}

/// A call of one of [`weather_tools`] with arguments valid against its schema; returns (name, arguments).
fn assert_valid_call(call: &Value) -> (String, Value) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(
        call["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{call}"
    );
    let name = call["function"]["name"].as_str().unwrap().to_string();
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    let o = args.as_object().unwrap();
    match name.as_str() {
        "get_weather" => {
            assert!(o["location"].as_str().unwrap().chars().count() <= 24);
            assert!(o.keys().all(|k| k == "location" || k == "unit"), "{args}");
            if let Some(u) = o.get("unit") {
                assert!(u == "celsius" || u == "fahrenheit", "{args}");
            }
        }
        "get_time" => {
            assert!(o["timezone"].is_string());
            assert_eq!(o.len(), 1, "{args}");
        }
        other => panic!("called an unknown tool {other}"),
    }
    (name, args)
}

#[test]
fn forced_tool_calls_are_valid_calls_streamed_as_deltas() {
    let Some(model) = model() else { return };
    let srv = Server::start(&model, &["--parallel", "2", "--ctx-size", "1024"]);
    let mut body = chat("What is the weather in Boston?", 96);
    body["tools"] = weather_tools();
    body["tool_choice"] = json!("required");
    let (st, v) = srv.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "one call unless parallel_tool_calls: {v}");
    let (name, args) = assert_valid_call(&calls[0]);

    // Streamed: id and name first, then argument pieces that add up to the same call.
    body["stream"] = json!(true);
    let (st, _, events) = srv.stream("/v1/chat/completions", &body);
    assert_eq!(st, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let deltas: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .flat_map(|c| {
            c["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert!(deltas.len() >= 2, "{deltas:?}");
    assert_eq!(deltas[0]["function"]["name"], name.as_str());
    assert!(deltas[0]["id"].is_string());
    assert!(
        deltas[1..]
            .iter()
            .all(|d| d.get("id").is_none() && d["index"] == 0)
    );
    let joined: String = deltas
        .iter()
        .filter_map(|d| d["function"]["arguments"].as_str())
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&joined).unwrap(), args);
    let finish: Vec<&str> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["finish_reason"]
                .as_str()
                .map(str::to_string)
        })
        .map(|s| {
            if s == "tool_calls" {
                "tool_calls"
            } else {
                "other"
            }
        })
        .collect();
    assert_eq!(finish, ["tool_calls"]);
    body["stream"] = json!(false);

    // A named function is the one called.
    body["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    let (st, v) = srv.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    let (named, _) = assert_valid_call(&v["choices"][0]["message"]["tool_calls"][0]);
    assert_eq!(named, "get_time");

    // With parallel calls allowed, every call is still valid.
    body["tool_choice"] = json!("required");
    body["parallel_tool_calls"] = json!(true);
    body["max_tokens"] = json!(200);
    let (st, v) = srv.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    if v["choices"][0]["finish_reason"] == "tool_calls" {
        for c in v["choices"][0]["message"]["tool_calls"].as_array().unwrap() {
            assert_valid_call(c);
        }
    }

    // The call and its result go back through the template; the next turn is answered.
    let follow = json!({"model": "m", "temperature": 0, "max_tokens": 8, "tools": weather_tools(),
        "messages": [{"role": "user", "content": "What is the weather in Boston?"},
                     {"role": "assistant", "content": null, "tool_calls": [calls[0].clone()]},
                     {"role": "tool", "tool_call_id": calls[0]["id"], "content": "{\"temperature\": 21}"}]});
    let (st, v) = srv.post("/v1/chat/completions", &follow);
    assert_eq!(st, 200, "{v}");
    assert!(
        v["choices"][0]["message"]["content"].is_string()
            || v["choices"][0]["message"]["tool_calls"].is_array()
    );

    // Refused by name: an unknown function, a forced call without tools, a malformed tool.
    for (patch, needle) in [
        (
            json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "nope",
        ),
        (json!({"tool_choice": "required"}), "no \"tools\""),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}),
            "parameters",
        ),
        (
            json!({"tools": weather_tools(), "tool_choice": "required",
                "response_format": {"type": "json_object"}}),
            "response_format",
        ),
    ] {
        let mut body = chat("hi", 8);
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (st, v) = srv.post("/v1/chat/completions", &body);
        assert_eq!(st, 400, "{patch}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{patch}: {message}");
    }
    assert_eq!(srv.get("/health").0, 200);
}

/// Sends a streamed chat request over its own connection and leaves it open.
fn open_stream(srv: &Server, max_tokens: usize) -> std::net::TcpStream {
    use std::io::Write;
    let mut body = chat("Hello", max_tokens);
    body["stream"] = json!(true);
    let body = body.to_string();
    let mut sock = std::net::TcpStream::connect(srv.base.trim_start_matches("http://")).unwrap();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    sock
}

fn wait_for(srv: &Server, what: &str, ok: impl Fn(&Server) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok(srv) {
        assert!(Instant::now() < deadline, "waited 60 s for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let Some(model) = model() else { return };
    let srv = Server::start(
        &model,
        &["--parallel", "1", "--max-queue", "1", "--ctx-size", "4096"],
    );
    let running = open_stream(&srv, 3000);
    wait_for(&srv, "the first request to run", |s| {
        s.metric("requests_processing") == 1.0
    });
    let waiting = open_stream(&srv, 3000);
    wait_for(&srv, "the second request to wait", |s| {
        s.metric("requests_deferred") == 1.0
    });
    let mut r = srv
        .agent
        .post(format!("{}/v1/chat/completions", srv.base))
        .send(chat("Hello", 4).to_string())
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("busy"),
        "{v}"
    );
    drop((running, waiting));
    wait_for(&srv, "both to be cancelled", |s| {
        s.metric("requests_processing") + s.metric("requests_deferred") == 0.0
    });
    let (st, v) = srv.post("/v1/chat/completions", &chat("Hello", 4));
    assert_eq!(st, 200, "{v}");
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let Some(model) = model() else { return };
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_quarry"))
        .arg("serve")
        .arg(&model)
        .args(["--host", "127.0.0.1", "--port", &port])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("--port"), "{err}");
}

/// The server listens before it opens the model; a model it cannot serve (here a context larger than the
/// model's) still ends the process with the reason, not a server that never becomes healthy.
#[test]
fn a_model_that_cannot_be_served_ends_the_server_with_its_reason() {
    let Some(model) = model() else { return };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_quarry"))
        .arg("serve")
        .arg(&model)
        .args(["--port", &port, "--ctx-size", "100000000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ctx-size 100000000 is outside"), "{err}");
}

/// A virtual environment under `target/` with the official `openai` client from PyPI, made once; its python.
fn openai_python() -> std::path::PathBuf {
    let venv = support::root().join("target").join("py-openai");
    let python = venv.join("bin").join("python");
    let ready = |p: &Path| {
        Command::new(p)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is needed for the openai client test");
        assert!(made.success(), "python3 -m venv {}", venv.display());
        let pip = Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "openai>=1.50,<2"])
            .status()
            .expect("pip runs");
        assert!(pip.success(), "pip install openai (from PyPI) failed");
    }
    assert!(
        ready(&python),
        "openai is not importable in {}",
        venv.display()
    );
    python
}

#[test]
fn the_official_openai_client_works_unchanged() {
    let Some(model) = model() else { return };
    let python = openai_python();
    let srv = Server::start(&model, &["--parallel", "4", "--ctx-size", "1024"]);
    let want = run_reference(&model, &["--prompt", PROMPTS[1], "-n", "12"]);
    let out = Command::new(python)
        .arg(support::root().join("tests/python/openai_client.py"))
        .env("QUARRY_BASE_URL", &srv.base)
        .env("QUARRY_RUN_TEXT", want["text"].as_str().unwrap())
        .env("QUARRY_PROMPT", PROMPTS[1])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(srv.get("/health").0, 200);
}
