//! `quarry serve`: an OpenAI- and ollama-compatible HTTP server over the multi-sequence engine.
//!
//! One inference thread ([`worker`]) owns the scheduler and runs every request's sequence in shared forward
//! passes; the HTTP side (axum on a small tokio runtime) parses requests, renders and tokenizes prompts, and
//! turns each request's tokens into text as they arrive ([`openai`]). Errors always have OpenAI's shape,
//! `{"error": {"message", "type", "code"}}`, with a 4xx status for the client's mistakes.

mod conn;
mod generation;
mod ollama;
mod openai;
pub mod tools;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tower::ServiceExt;

use crate::engine::Engine;
use crate::engine::scheduler::SchedulerConfig;
use worker::Worker;

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// Requests must carry `Authorization: Bearer KEY` (all but `/health`).
    pub api_key: Option<String>,
    /// The id `/v1/models` reports.
    pub model_name: String,
    /// Requests that may wait for a slot beyond those running; more get a 503 with `Retry-After`.
    pub max_queue: usize,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// How long running replies may take to finish after SIGINT/SIGTERM before the process exits anyway.
    pub shutdown_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} (is another server using the port? pick another with --port)")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Load(Box<dyn std::error::Error + Send + Sync>),
    #[error("the server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Limits on each connection, below HTTP (a separate struct from [`ServeConfig`] so that adding one does not
/// change how a `ServeConfig` is built).
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// How long a client may take to send a request's header, from its first byte (from connecting, for the
    /// first request); the connection is closed beyond. Without it, idle and slow-header clients could hold
    /// connections, and file descriptors, for ever.
    pub header_timeout: Duration,
    /// How long a kept-alive connection may send nothing after its last reply before it is closed (longer than
    /// common clients keep an idle connection: 5 s for httpx, 15 s for ureq; nginx uses 75 s).
    pub idle_timeout: Duration,
    /// How long a request's body may take to arrive once its header has; 408 beyond. Every route reads its
    /// body whole (at most the body limit), so a client trickling one in would otherwise hold a request open
    /// for ever.
    pub body_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
        }
    }
}

/// What [`serve`]'s loader hands over once the model is ready.
pub struct Loaded {
    pub engine: Engine,
    /// Sequences at a time, each one's context and the KV pool: they depend on the model, so the loader decides.
    pub scheduler: SchedulerConfig,
}

/// What every handler shares.
pub(crate) struct AppState {
    pub engine: Arc<Engine>,
    pub worker: Worker,
    pub cfg: ServeConfig,
    pub scheduler: SchedulerConfig,
    pub next_id: AtomicU64,
}

/// The grammar of a JSON schema from a request (`what` names the field); a schema that cannot be enforced is a
/// 400, never a reply left unconstrained.
pub(crate) fn compile_schema(
    state: &AppState,
    schema: &serde_json::Value,
    what: &str,
) -> Result<Box<dyn crate::sampling::TokenConstraint>, ApiError> {
    let grammars = state.engine.grammars().map_err(ApiError::internal)?;
    let grammar = grammars.json_schema(schema).map_err(|e| {
        ApiError::bad_request(format!(
            "\"{what}\": the JSON schema cannot be enforced: {e}"
        ))
    })?;
    Ok(Box::new(grammar))
}

/// An error response in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "server_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "code": self.status.as_u16(),
        }});
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// Listens at once, then runs `load` (opening a model takes a while; meanwhile `/health` answers 503 and every
/// other route a 503 with `Retry-After`, as llama-server does), then serves until SIGINT or SIGTERM: then stops
/// accepting, lets running replies finish for up to `shutdown_grace`, and returns. A failed `load` ends the
/// server with its error.
pub fn serve<L, E>(cfg: ServeConfig, load: L) -> Result<(), ServeError>
where
    L: FnOnce() -> Result<Loaded, E> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    serve_with(cfg, ConnectionLimits::default(), load)
}

/// [`serve`] with `limits` on each connection.
pub fn serve_with<L, E>(
    cfg: ServeConfig,
    limits: ConnectionLimits,
    load: L,
) -> Result<(), ServeError>
where
    L: FnOnce() -> Result<Loaded, E> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("quarry-http")
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let local: SocketAddr = listener.local_addr()?;
        let listener = conn::HeaderDeadlineListener {
            inner: listener,
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
        };
        let grace = cfg.shutdown_grace;
        let ready: Arc<OnceLock<Router>> = Arc::new(OnceLock::new());
        let app = until_ready(ready.clone(), cfg.max_body_bytes, limits.body_timeout);
        eprintln!("listening on http://{local} (OpenAI API at http://{local}/v1); loading the model");

        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<ServeError>();
        tokio::spawn(async move {
            let loaded = match tokio::task::spawn_blocking(load).await {
                Ok(Ok(loaded)) => loaded,
                Ok(Err(e)) => return drop(failed_tx.send(ServeError::Load(e.into()))),
                Err(e) => return drop(failed_tx.send(ServeError::Load(e.into()))),
            };
            let engine = Arc::new(loaded.engine);
            let worker = match Worker::start(engine.clone(), loaded.scheduler) {
                Ok(worker) => worker,
                Err(e) => return drop(failed_tx.send(ServeError::Io(e))),
            };
            let state = Arc::new(AppState {
                engine,
                worker,
                cfg,
                scheduler: loaded.scheduler,
                next_id: AtomicU64::new(1),
            });
            let _ = ready.set(router(state));
            eprintln!("ready: serving {}", local);
        });

        let failure: Arc<Mutex<Option<ServeError>>> = Arc::default();
        let (stopping, mut stopped) = tokio::sync::watch::channel(false);
        let app = app.into_make_service_with_connect_info::<conn::Peer>();
        let server = axum::serve(listener, app).with_graceful_shutdown({
            let failure = failure.clone();
            async move {
                tokio::select! {
                    _ = shutdown_signal() => {
                        eprintln!("stopping: no new requests; waiting for running replies");
                    }
                    Ok(e) = failed_rx => *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e),
                }
                let _ = stopping.send(true);
            }
        });
        tokio::select! {
            r = server => r?,
            _ = async {
                let _ = stopped.wait_for(|&s| s).await;
                tokio::time::sleep(grace).await;
            } => eprintln!("replies still running after {} s; exiting", grace.as_secs()),
        }
        match failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    });
    // Not a plain drop: dropping a runtime waits for its blocking tasks, and the model's load is one, so a
    // SIGTERM while a large model loads would wait for the whole load before exiting.
    runtime.shutdown_background();
    result
}

/// The router that answers [`still_loading`] until `ready` holds the real one, then hands every request to it,
/// its body read whole within `body_timeout` first. Each reply is counted on its connection until its body is
/// dropped, so the connection knows when it is idle (`conn`).
fn until_ready(
    ready: Arc<OnceLock<Router>>,
    max_body_bytes: usize,
    body_timeout: Duration,
) -> Router {
    Router::new().fallback(move |req: Request| async move {
        let guard = req
            .extensions()
            .get::<axum::extract::ConnectInfo<conn::Peer>>()
            .map(|peer| conn::ReplyGuard::new(&peer.0));
        let response = 'reply: {
            if let Some(refused) = missing_host(&req).or_else(|| too_large(&req, max_body_bytes)) {
                break 'reply refused;
            }
            let req = match read_body(req, max_body_bytes, body_timeout).await {
                Ok(req) => req,
                Err(refused) => break 'reply refused,
            };
            match ready.get() {
                Some(app) => match app.clone().oneshot(req).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                },
                None => still_loading(&req),
            }
        };
        match guard {
            Some(guard) => response.map(|body| Body::new(conn::GuardedBody::new(body, guard))),
            None => response,
        }
    })
}

/// `req` with its body read into memory: a 408 if it has not all arrived within `timeout`, a 413 past
/// `max_body_bytes` (a chunked body announces no length), a 400 if the connection failed mid-body.
async fn read_body(
    req: Request,
    max_body_bytes: usize,
    timeout: Duration,
) -> Result<Request, Response> {
    use futures_util::StreamExt;
    let (parts, body) = req.into_parts();
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request(format!("the request body could not be read: {e}"))
            })?;
            if bytes.len() + chunk.len() > max_body_bytes {
                return Err(ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    message: format!(
                        "the request body is over the limit of {max_body_bytes} bytes"
                    ),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => Ok(Request::from_parts(parts, Body::from(bytes))),
        Ok(Err(refused)) => Err(refused.into_response()),
        Err(_) => Err(ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "the request body did not arrive within {} s of its header; send it whole, or raise --body-timeout",
                timeout.as_secs_f64()
            ),
        }
        .into_response()),
    }
}

/// A 400 for an HTTP/1.1 request without a `Host` header, as RFC 9112 (3.2) requires of a server; hyper
/// itself lets such a request through. (HTTP/1.0 has no such rule, and an absolute URI names the host.)
fn missing_host(req: &Request) -> Option<Response> {
    let lacks = req.version() == axum::http::Version::HTTP_11
        && !req.headers().contains_key(header::HOST)
        && req.uri().authority().is_none();
    lacks.then(|| ApiError::bad_request("an HTTP/1.1 request needs a Host header").into_response())
}

/// A 413 for a request whose `Content-Length` is over the body limit, before reading any of it: the body limit
/// alone only fails once that much has arrived, so a client announcing a huge body and sending a few bytes held
/// its request open, waiting, for ever.
fn too_large(req: &Request, max_body_bytes: usize) -> Option<Response> {
    let length = req.headers().get(header::CONTENT_LENGTH)?;
    let length: u64 = length.to_str().ok()?.trim().parse().ok()?;
    (length > max_body_bytes as u64).then(|| {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "the request body ({length} bytes) is over the limit of {max_body_bytes} bytes"
            ),
        }
        .into_response()
    })
}

/// Any request before the model is ready: `/health` says so, every other route asks to retry.
fn still_loading(req: &Request) -> Response {
    if req.uri().path() == "/health" {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading model"})),
        )
            .into_response();
    }
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the model is still loading; retry shortly".into(),
    }
    .into_response()
}

fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/metrics", get(metrics))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .route("/health", get(health))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// Prometheus text: request and token counters, the load, and KV pool use.
async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let l = &state.worker.load;
    let (running, in_flight) = (l.running.load(Relaxed), l.in_flight.load(Relaxed));
    let (used, total) = (
        l.kv_blocks_used.load(Relaxed),
        l.kv_blocks_total.load(Relaxed),
    );
    let cached = l.kv_blocks_cached.load(Relaxed);
    let generated = l.generated_tokens_total.load(Relaxed);
    let busy = l.busy_micros_total.load(Relaxed) as f64 / 1e6;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP quarry_{name} {help}\n# TYPE quarry_{name} {kind}\nquarry_{name} {value}"
        );
    };
    metric(
        "requests_total",
        "counter",
        "Requests finished.",
        l.requests_total.load(Relaxed) as f64,
    );
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens of finished requests.",
        l.prompt_tokens_total.load(Relaxed) as f64,
    );
    metric(
        "prompt_tokens_reused_total",
        "counter",
        "Prompt tokens taken from the prefix cache.",
        l.reused_tokens_total.load(Relaxed) as f64,
    );
    metric(
        "tokens_predicted_total",
        "counter",
        "Tokens generated.",
        generated as f64,
    );
    metric(
        "busy_seconds_total",
        "counter",
        "Time spent in forward steps.",
        busy,
    );
    metric(
        "predicted_tokens_seconds",
        "gauge",
        "Average generation throughput while busy (tokens per second).",
        if busy > 0.0 {
            generated as f64 / busy
        } else {
            0.0
        },
    );
    metric(
        "requests_processing",
        "gauge",
        "Sequences running.",
        running as f64,
    );
    metric(
        "requests_deferred",
        "gauge",
        "Requests waiting for a slot.",
        in_flight.saturating_sub(running) as f64,
    );
    metric(
        "kv_cache_usage_ratio",
        "gauge",
        "Share of the KV pool's blocks in use (prefix cache included).",
        if total > 0 {
            used as f64 / total as f64
        } else {
            0.0
        },
    );
    metric(
        "kv_cache_blocks_in_use",
        "gauge",
        "KV pool blocks held by sequences alone (in use, less those the prefix cache holds): 0 when idle.",
        used.saturating_sub(cached) as f64,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

async fn not_found(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "no route {} {} (see the README's table of endpoints)",
            req.method(),
            req.uri().path()
        ),
    }
}

/// A known route with another method: a 405 in OpenAI's error shape (axum's own has an empty body).
async fn method_not_allowed(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!(
            "{} is not a method of {} (see the README's table of endpoints)",
            req.method(),
            req.uri().path()
        ),
    }
}

/// With an API key, every route but `/health` needs `Authorization: Bearer KEY`.
async fn authorize(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.cfg.api_key
        && !bearer_matches(req.headers(), key)
    {
        return ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong API key: send `Authorization: Bearer KEY`".into(),
        }
        .into_response();
    }
    next.run(req).await
}

fn bearer_matches(headers: &HeaderMap, key: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(given) = value.strip_prefix("Bearer ") else {
        return false;
    };
    // Compared in constant time, so the key cannot be guessed byte by byte from response times.
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    async fn call(app: &Router, path: &str) -> (StatusCode, Option<String>, serde_json::Value) {
        // An HTTP/1.1 request (the builder's default) must name its host, or it is refused with a 400.
        let req = Request::builder()
            .uri(path)
            .header(header::HOST, "localhost")
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, retry, serde_json::from_slice(&bytes).unwrap())
    }

    #[test]
    fn requests_get_503_until_the_model_is_ready_then_reach_it() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let ready = Arc::new(OnceLock::new());
            let app = until_ready(ready.clone(), 1 << 20, Duration::from_secs(5));
            let (st, _, body) = call(&app, "/health").await;
            assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(body["status"], "loading model");
            let (st, retry, body) = call(&app, "/v1/models").await;
            assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(retry.as_deref(), Some("1"));
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("still loading"),
                "{body}"
            );
            assert_eq!(body["error"]["code"], 503);

            let loaded = Router::new().route("/health", get(health));
            ready.set(loaded).unwrap();
            let (st, _, body) = call(&app, "/health").await;
            assert_eq!(st, StatusCode::OK);
            assert_eq!(body["status"], "ok");
        });
    }
}
