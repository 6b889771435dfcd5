//! The bodies of the fuzz targets, shared by `cargo fuzz` (`fuzz/fuzz_targets/*.rs`) and the stable replay test
//! (`tests/fuzz_corpora.rs`, which runs every committed corpus input and crash regression through them).
//!
//! Each function takes arbitrary bytes and drives one parser the way a hostile file or request would reach it,
//! then keeps going with whatever it accepted, so the layers behind the parser (tensor views, the forward pass,
//! rendering, tokenizing) see the accepted values too. An `Err` anywhere is the right outcome for bad input; a
//! panic, an abort, a hang or an allocation past libFuzzer's `-rss_limit_mb` is a defect. The few `assert!`s
//! are properties that hold for every input (what the converter writes, the loader reads).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use quarry::generate::Session;
use quarry::gguf::GgufFile;
use quarry::model::Model;
use quarry::text::chat_template::{ChatTemplate, Conversation, Message};
use quarry::text::tokenizer::Tokenizer;
use quarry_quantize::{ConvertOptions, TargetType};

/// Positions a fuzzed model is run for: enough to go through the KV cache once.
const FORWARD_TOKENS: usize = 2;

/// A GGUF file: the header, every tensor's bytes, the model built from it and two tokens through its forward
/// pass, its tokenizer (encoding and decoding a text with special tokens) and its chat template (rendered).
pub fn gguf(data: &[u8]) {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    let mut checksum = 0u8;
    for t in file.tensors() {
        let bytes = file.tensor_data(t);
        checksum ^= bytes.first().copied().unwrap_or(0) ^ bytes.last().copied().unwrap_or(0);
    }
    std::hint::black_box(checksum);
    for (_, v) in file.metadata() {
        std::hint::black_box(v.summary());
    }
    if let Ok(tokenizer) = Tokenizer::from_gguf(&file) {
        tokenize(&tokenizer, "Hello <|end_of_text|> wörld 123\n");
    }
    if let Ok(template) = ChatTemplate::from_gguf(&file) {
        let conversation = Conversation::from_messages(vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
        ]);
        std::hint::black_box(template.render(&conversation, true).ok());
    }
    if let Ok(model) = Model::from_gguf(&file) {
        let n_vocab = model.config.n_vocab as u32;
        let mut session = Session::new(&model, FORWARD_TOKENS, FORWARD_TOKENS);
        for id in [0, n_vocab.saturating_sub(1)] {
            if session.feed(&[id]).is_err() {
                break;
            }
        }
    }
}

fn tokenize(tokenizer: &Tokenizer, text: &str) {
    if let Ok(ids) = tokenizer.encode(text) {
        std::hint::black_box(tokenizer.decode(&ids, false).ok());
        let mut stream = tokenizer.stream(true);
        for &id in &ids {
            if stream.push(id).is_err() {
                break;
            }
        }
    }
    let last = tokenizer.vocab_size().saturating_sub(1) as u32;
    std::hint::black_box(tokenizer.decode(&[0, last], false).ok());
}

/// Where [`convert`]'s input is split into the snapshot's files, in [`SNAPSHOT_FILES`] order.
pub const CONVERT_SEPARATOR: &[u8] = b"\n#--quarry-fuzz--#\n";
pub const SNAPSHOT_FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// A Hugging Face snapshot (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`, cut
/// from the input at [`CONVERT_SEPARATOR`]) converted to Q8_0. Whatever the converter accepts it writes as a
/// GGUF file the runtime opens, and the model in it loads and runs.
pub fn convert(data: &[u8], scratch: &Path) {
    let _ = std::fs::remove_dir_all(scratch);
    let input = scratch.join("snapshot");
    if std::fs::create_dir_all(&input).is_err() {
        return;
    }
    for (name, bytes) in SNAPSHOT_FILES.iter().zip(split(data, CONVERT_SEPARATOR)) {
        std::fs::write(input.join(name), bytes).expect("the scratch folder is writable");
    }
    let output = scratch.join("out.gguf");
    let mut opts = ConvertOptions::new(&input, &output, TargetType::Q8_0);
    opts.threads = Some(1);
    if quarry_quantize::convert(&opts).is_err() {
        assert!(
            !output.exists(),
            "a failed conversion left its output behind"
        );
        return;
    }
    let file = GgufFile::open(&output).expect("the converter's output opens");
    Model::from_gguf(&file).expect("the converter's output loads");
    gguf(&std::fs::read(&output).expect("the output is readable"));
}

fn split<'a>(data: &'a [u8], separator: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(separator.len()).position(|w| w == separator) {
        parts.push(&rest[..at]);
        rest = &rest[at + separator.len()..];
    }
    parts.push(rest);
    parts
}

/// The templates [`chat_template`] renders hostile conversations with: Granite 3.0's and 3.1's, as shipped.
pub struct RealTemplates(pub Vec<ChatTemplate>);

impl RealTemplates {
    /// Reads them from `shared` (the folder holding `granite-3.*-1b-a400m-instruct/`).
    pub fn load(shared: &Path) -> RealTemplates {
        let templates = [
            "granite-3.0-1b-a400m-instruct",
            "granite-3.1-1b-a400m-instruct",
        ]
        .iter()
        .map(|model| {
            let path: PathBuf = shared.join(model).join("tokenizer_config.json");
            let json = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            ChatTemplate::from_tokenizer_config(&json, &path.display().to_string())
                .expect("the real template compiles")
        })
        .collect();
        RealTemplates(templates)
    }
}

/// Chat-template rendering. An input starting with `{` is a conversation (the JSON of `--chat` files and of
/// `/load`: messages, tools, documents, extra variables) rendered by the real Granite templates; anything
/// else is a template (as a GGUF file or `tokenizer_config.json` may carry) rendering a fixed conversation
/// with tools, within the renderer's instruction and output bounds.
pub fn chat_template(data: &[u8], real: &RealTemplates) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.starts_with('{') {
        let Ok(conversation) = Conversation::from_json_str(text) else {
            return;
        };
        for template in &real.0 {
            for add_generation_prompt in [false, true] {
                std::hint::black_box(template.render(&conversation, add_generation_prompt).ok());
            }
        }
        return;
    }
    let Ok(template) = ChatTemplate::new(text, "fuzz template") else {
        return;
    };
    let mut conversation = Conversation::from_messages(vec![
        Message::new("system", "Be brief."),
        Message::new("user", "What is the weather in Paris?"),
        Message::new("assistant", "Sunny."),
    ]);
    conversation.tools = Some(vec![serde_json::json!({
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    })]);
    std::hint::black_box(template.render(&conversation, true).ok());
}

/// Granite's tool-call replies as the server reads them (`<|tool_call|>[{"name": ..., "arguments": ...}]`),
/// whole and as a stream's growing prefix, and a request's `tools` / `tool_choice` fields.
pub fn tool_reply(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let reply = quarry::server::tools::parse_reply(text);
    for call in &reply.calls {
        assert!(!call.name.is_empty(), "a call without a name was accepted");
        serde_json::from_str::<serde_json::Value>(&call.arguments)
            .expect("a call's arguments are JSON");
    }
    for end in (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .step_by(7)
    {
        for item in quarry::server::tools::complete_items(&text[..end]) {
            std::hint::black_box(item);
        }
    }
    if let Ok(serde_json::Value::Object(body)) = serde_json::from_str::<serde_json::Value>(text) {
        std::hint::black_box(quarry::server::tools::parse_tools(&body).is_ok());
    }
}

/// A `quarry serve` running in this process on a loopback port, over the tiny `dev-2` model of the fuzz corpus
/// (its own chat template and byte-level tokenizer), for [`request`].
pub struct LocalServer {
    pub addr: std::net::SocketAddr,
}

impl LocalServer {
    /// Starts the server on a thread of its own and waits until `/health` answers 200.
    pub fn start(model: &Path) -> LocalServer {
        use quarry::engine::Engine;
        use quarry::engine::scheduler::SchedulerConfig;
        use quarry::server::{Loaded, ServeConfig, serve};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let cfg = ServeConfig {
            host: "127.0.0.1".into(),
            port,
            api_key: None,
            model_name: "fuzz".into(),
            max_queue: 4,
            max_body_bytes: 1 << 20,
            shutdown_grace: std::time::Duration::from_secs(1),
        };
        let model = model.to_path_buf();
        std::thread::spawn(move || {
            let load = move || {
                Engine::open_for_text(&model).map(|engine| Loaded {
                    engine,
                    scheduler: SchedulerConfig::new(2, 256),
                })
            };
            serve(cfg, load).expect("the fuzz server runs");
        });
        let server = LocalServer {
            addr: ([127, 0, 0, 1], port).into(),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if server
                .send("GET", "/health", b"")
                .is_some_and(|(status, _)| status == 200)
            {
                return server;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the fuzz server did not become healthy");
    }

    /// One request on a fresh connection (`Connection: close`); the status and body, or `None` when the
    /// server closed the connection without an answer.
    fn send(&self, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.addr).ok()?;
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).ok()?;
        stream.write_all(body).ok()?;
        let mut response = Vec::new();
        if let Err(e) = stream.read_to_end(&mut response) {
            assert!(
                e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut,
                "the server took more than 30 s to answer {path}"
            );
        }
        let text = String::from_utf8_lossy(&response);
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, response))
    }
}

/// The API routes [`request`] sends bodies to; the input's first byte picks one.
pub const REQUEST_ROUTES: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/api/chat",
    "/api/generate",
];

/// A request body (after the first byte, which picks a route of [`REQUEST_ROUTES`]) posted to the server. A
/// JSON object has its generation cut to 2 tokens (`max_tokens`, ollama's `options.num_predict`), so the time
/// goes to parsing, rendering, tokenizing and grammar compiling, not to decoding. Every request gets an answer
/// that is not a server error (a 503 for a full queue excepted), and the server answers `/health` after it.
pub fn request(data: &[u8], server: &LocalServer) {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let path = REQUEST_ROUTES[route as usize % REQUEST_ROUTES.len()];
    let body = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut o)) => {
            o.insert("max_tokens".into(), 2.into());
            let options = o.entry("options").or_insert_with(|| serde_json::json!({}));
            if let Some(options) = options.as_object_mut() {
                options.insert("num_predict".into(), 2.into());
            }
            serde_json::Value::Object(o).to_string().into_bytes()
        }
        _ => body.to_vec(),
    };
    let (status, response) = server
        .send("POST", path, &body)
        .unwrap_or_else(|| panic!("{path}: the server closed the connection without answering"));
    assert!(
        status < 500 || status == 503,
        "{path}: status {status}: {}",
        String::from_utf8_lossy(&response)
    );
    let health = server.send("GET", "/health", b"").map(|(s, _)| s);
    assert_eq!(health, Some(200), "/health after a request to {path}");
}
