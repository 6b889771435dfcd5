//! A `quarry serve` child process on a free loopback port, and the requests the server tests send it.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{SHARED_MODEL, fixture_dir, gguf};

/// A running `quarry serve`, killed when dropped.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub agent: ureq::Agent,
}

/// An HTTP client that reports 4xx and 5xx as responses, not errors.
pub fn new_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `quarry serve MODEL` on `port`, its output discarded, without waiting for it to be ready.
pub fn spawn(model: &Path, port: u16, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_quarry"))
        .arg("serve")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(extra)
        .env_remove("QUARRY_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("quarry serve starts")
}

impl Server {
    /// Starts the server and waits (up to 60 s) until `/health` answers 200.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let port = free_port();
        let mut server = Server {
            child: spawn(model, port, extra),
            base: format!("http://127.0.0.1:{port}"),
            agent: new_agent(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("quarry serve exited early: {status}");
            }
            if server.get("/health").0 == 200 {
                return server;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("quarry serve did not become healthy in 60 s");
    }

    /// `127.0.0.1:PORT`, for raw sockets.
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Status and JSON body (null when not JSON); status 0 when the request could not be sent.
    pub fn get(&self, path: &str) -> (u16, Value) {
        match self.agent.get(format!("{}{path}", self.base)).call() {
            Ok(mut r) => (
                r.status().as_u16(),
                serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default())
                    .unwrap_or(Value::Null),
            ),
            Err(_) => (0, Value::Null),
        }
    }

    /// Posts `body` as JSON, with `Authorization: Bearer KEY` when a key is given.
    pub fn post_raw(&self, path: &str, body: &[u8], key: Option<&str>) -> (u16, Value) {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut r = req.send(body).expect("the server answers");
        let text = r.body_mut().read_to_string().unwrap();
        (
            r.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string().as_bytes(), None)
    }

    /// A streamed request's status, `Content-Type` and `data:` payloads, in order.
    pub fn stream(&self, path: &str, body: &Value) -> (u16, String, Vec<String>) {
        stream_events(&self.agent, &self.base, path, body)
    }

    /// A Prometheus value of `/metrics` (`quarry_NAME`).
    pub fn metric(&self, name: &str) -> f64 {
        let mut r = self
            .agent
            .get(format!("{}/metrics", self.base))
            .call()
            .expect("metrics");
        let text = r.body_mut().read_to_string().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("quarry_{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    }

    pub fn assert_healthy(&self, after: &str) {
        assert_eq!(self.get("/health").0, 200, "/health after {after}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`Server::stream`] from any thread, given the server's agent and base address.
pub fn stream_events(
    agent: &ureq::Agent,
    base: &str,
    path: &str,
    body: &Value,
) -> (u16, String, Vec<String>) {
    let mut r = agent
        .post(format!("{base}{path}"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .expect("the server answers");
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let status = r.status().as_u16();
    let events = BufReader::new(r.body_mut().as_reader())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect();
    (status, content_type, events)
}

/// The shared real-vocabulary fixture in Q8_0, or None (the caller skips) when `../shared` lacks it.
pub fn model() -> Option<PathBuf> {
    let dir = fixture_dir(SHARED_MODEL)?;
    Some(gguf(SHARED_MODEL, &dir, "q8_0"))
}

/// A greedy chat request with one user message.
pub fn chat(prompt: &str, max_tokens: usize) -> Value {
    json!({
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}
