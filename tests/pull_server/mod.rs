//! A small stand-in for the Hugging Face file endpoints on 127.0.0.1, for the `pull` tests: it serves one folder as
//! one repo (`/{repo}/resolve/{rev}/{file}` with Range and the Hub's ETag / X-Repo-Commit headers, and
//! `/api/models/{repo}/revision/{rev}`), logs every request, and can misbehave on purpose: cut a file off part way,
//! stall part way (keep the connection open and send nothing more), serve a corrupted copy, or refuse files. Anything else is a 404. Threads and std::net only.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::Digest;

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// The longest a [`Fault::StallAt`] connection is held open.
pub const STALL_LIMIT: Duration = Duration::from_secs(30);

/// How to misbehave for one file.
#[derive(Clone, Debug)]
pub enum Fault {
    /// The first `times` GETs send headers for the whole answer but stop after `at` bytes of the file (absolute
    /// offset) and close the connection.
    CutAt { at: usize, times: usize },
    /// The first `times` GETs send headers for the whole answer and the bytes up to `at` (absolute offset), then
    /// send nothing more and keep the connection open until the client gives up (closes it), or [`STALL_LIMIT`].
    StallAt { at: usize, times: usize },
    /// Serve these bytes instead (same length), with the ETag of the real file.
    Corrupt,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
    /// Body bytes actually written.
    pub sent: usize,
}

struct State {
    repo: String,
    files: HashMap<String, Vec<u8>>,
    faults: Mutex<HashMap<String, Fault>>,
    log: Mutex<Vec<Logged>>,
}

pub struct Server {
    pub url: String,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    port: u16,
}

impl Server {
    /// Serves every top-level file of `folder` as repo `repo`.
    pub fn start(folder: &Path, repo: &str) -> Server {
        let mut files = HashMap::new();
        for e in std::fs::read_dir(folder).unwrap().flatten() {
            if e.path().is_file() {
                files.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                );
            }
        }
        let state = Arc::new(State {
            repo: repo.to_string(),
            files,
            faults: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = Arc::clone(&state);
                    std::thread::spawn(move || handle(conn, &state));
                }
            })
        };
        Server {
            url: format!("http://127.0.0.1:{port}"),
            state,
            stop,
            thread: Some(thread),
            port,
        }
    }

    pub fn fault(&self, file: &str, fault: Fault) {
        self.state
            .faults
            .lock()
            .unwrap()
            .insert(file.to_string(), fault);
    }

    pub fn clear_faults(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.state.log.lock().unwrap().clear();
    }

    /// The GETs of one file.
    pub fn gets_of(&self, file: &str) -> Vec<Logged> {
        let suffix = format!("/{file}");
        self.log()
            .into_iter()
            .filter(|l| {
                l.method == "GET" && l.path.ends_with(&suffix) && l.path.contains("/resolve/")
            })
            .collect()
    }

    pub fn file_len(&self, file: &str) -> usize {
        self.state.files[file].len()
    }

    pub fn sha256(&self, file: &str) -> String {
        format!("{:x}", sha2::Sha256::digest(&self.state.files[file]))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A port on which nothing listens (bound, then closed).
pub fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

fn handle(mut conn: TcpStream, state: &State) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut logged = Logged {
        method: method.clone(),
        path: path.clone(),
        range: headers.get("range").cloned(),
        authorization: headers.get("authorization").cloned(),
        sent: 0,
    };
    let path_only = path.split('?').next().unwrap_or("");
    let resolve = format!("/{}/resolve/", state.repo);
    let api = format!("/api/models/{}", state.repo);
    if let Some(rest) = path_only.strip_prefix(&resolve) {
        let file = rest.split_once('/').map(|(_, f)| f).unwrap_or("");
        match state.files.get(file) {
            Some(data) => {
                logged.sent = serve_file(&mut conn, state, file, data, &headers, method == "HEAD");
            }
            None => respond(&mut conn, "404 Not Found", &[], b"not found"),
        }
    } else if path_only == api || path_only.starts_with(&format!("{api}/revision/")) {
        let mut names: Vec<&String> = state.files.keys().collect();
        names.sort();
        let siblings: Vec<serde_json::Value> = names
            .iter()
            .map(|n| serde_json::json!({"rfilename": n, "size": state.files[*n].len()}))
            .collect();
        let body =
            serde_json::json!({"id": state.repo, "sha": COMMIT, "siblings": siblings}).to_string();
        respond(
            &mut conn,
            "200 OK",
            &[("Content-Type", "application/json".to_string())],
            body.as_bytes(),
        );
    } else {
        respond(&mut conn, "404 Not Found", &[], b"not found");
    }
    state.log.lock().unwrap().push(logged);
    let _ = conn.shutdown(Shutdown::Both);
    // Drain what the client may still send, so the close is clean.
    let _ = reader.read(&mut [0u8; 64]);
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body);
}

/// Writes the file (or the asked range) and returns the body bytes sent.
fn serve_file(
    conn: &mut TcpStream,
    state: &State,
    name: &str,
    data: &[u8],
    headers: &HashMap<String, String>,
    head_only: bool,
) -> usize {
    let etag = format!("\"{:x}\"", sha2::Sha256::digest(data));
    let size = data.len();
    let mut start = 0;
    let mut partial = false;
    if let Some(r) = headers.get("range").and_then(|r| r.strip_prefix("bytes="))
        && let Some((a, b)) = r.split_once('-')
        && let Ok(a) = a.trim().parse::<usize>()
        && b.trim().is_empty()
    {
        if a >= size {
            respond(
                conn,
                "416 Range Not Satisfiable",
                &[("Content-Range", format!("bytes */{size}"))],
                b"",
            );
            return 0;
        }
        start = a;
        partial = true;
    }
    let mut body: Vec<u8> = data[start..].to_vec();
    let mut cut_at = None;
    let mut stall = false;
    if !head_only {
        let mut faults = state.faults.lock().unwrap();
        match faults.get_mut(name) {
            Some(Fault::Corrupt) => {
                let middle = body.len() / 2;
                if let Some(b) = body.get_mut(middle) {
                    *b ^= 0x55;
                }
            }
            Some(Fault::CutAt { at, times }) if *times > 0 => {
                *times -= 1;
                cut_at = Some(at.saturating_sub(start).min(body.len()));
            }
            Some(Fault::StallAt { at, times }) if *times > 0 => {
                *times -= 1;
                cut_at = Some(at.saturating_sub(start).min(body.len()));
                stall = true;
            }
            _ => {}
        }
    }
    let mut extra = vec![
        ("ETag", etag),
        ("X-Repo-Commit", COMMIT.to_string()),
        ("Accept-Ranges", "bytes".to_string()),
    ];
    let status = if partial {
        extra.push((
            "Content-Range",
            format!("bytes {start}-{}/{size}", size - 1),
        ));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in &extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    if conn.write_all(head.as_bytes()).is_err() || head_only {
        return 0;
    }
    let n = cut_at.unwrap_or(body.len());
    body.truncate(n);
    if conn.write_all(&body).is_err() {
        return 0;
    }
    let _ = conn.flush();
    if stall {
        hold_until_closed(conn);
    }
    n
}

/// Sends nothing and waits for the client to close the connection (or [`STALL_LIMIT`]).
fn hold_until_closed(conn: &mut TcpStream) {
    let started = Instant::now();
    let _ = conn.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = [0u8; 256];
    while started.elapsed() < STALL_LIMIT {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}
