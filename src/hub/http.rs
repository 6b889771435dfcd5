//! A client of the Hugging Face Hub's file endpoints: which files a repo holds at a revision, and one file's
//! bytes into a local file, resumed and retried, with what the Hub says about it (checksum headers, commit).
//!
//! Files come from `{endpoint}/{repo}/resolve/{revision}/{file}`, the endpoint being `HF_ENDPOINT` or
//! `https://huggingface.co`; `HF_TOKEN` is sent as a bearer token to that host only (never to the CDN the Hub
//! redirects large files to). An interrupted transfer continues from the bytes already written with an HTTP range
//! request, a few times within one call before it is reported (the bytes stay for a later call to continue).
//!
//! A server that stops sending in the middle of an answer is given up after [`READ_TIMEOUT_ENV`] seconds without a
//! byte (default 60), reported as a stall, and asked again for the rest; if it stalls on every attempt the error
//! says so ([`HttpError::Stalled`]).
//!
//! Nothing here knows what a model is: which files to fetch, how to check them and what becomes of them is
//! [`pull`](super::pull)'s.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where models come from unless `HF_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Attempts per file before a broken transfer is reported (the partial file stays for the next run).
const ATTEMPTS: u32 = 4;
/// A stalled connection is given up after this long without data, unless [`READ_TIMEOUT_ENV`] says otherwise.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Seconds (a positive number, fractions allowed) a transfer may go without receiving a byte before it counts as
/// stalled and is retried: for a slow or flaky link (longer), or tests (shorter). Read by [`Hub::from_env`].
pub const READ_TIMEOUT_ENV: &str = "QUARRY_PULL_READ_TIMEOUT_SECS";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
const MAX_REDIRECTS: usize = 10;

/// Why a request to the Hub failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "cannot reach {url}: {detail}. Without network access, copy the model's folder (config.json, *.safetensors, \
         tokenizer files) to this machine and run `quarry import DIR --name NAME`"
    )]
    Unreachable { url: String, detail: String },
    #[error("{url}: not found (HTTP 404); {hint}")]
    NotFound { url: String, hint: &'static str },
    #[error(
        "{url}: access refused (HTTP {status}); the repository may not exist, or be private or gated: set HF_TOKEN to \
         a token that can read it"
    )]
    Denied { url: String, status: u16 },
    #[error("{url}: the server answered HTTP {status}{}", if reason.is_empty() { String::new() } else { format!(" ({reason})") })]
    Http {
        url: String,
        status: u16,
        reason: String,
    },
    #[error(
        "{url}: the transfer broke off {attempts} times ({detail}); {done} bytes are kept, run the same command again to resume"
    )]
    Interrupted {
        url: String,
        attempts: u32,
        detail: String,
        done: u64,
    },
    #[error(
        "{url}: the server stopped sending data ({} without a byte) on each of {attempts} attempts; {done} bytes are \
         kept: run the same command again to resume, later or over another network (a slow link can be given more \
         time with {READ_TIMEOUT_ENV}=SECONDS)",
        seconds(*timeout)
    )]
    Stalled {
        url: String,
        attempts: u32,
        timeout: Duration,
        done: u64,
    },
    #[error("{url}: unexpected answer: {problem}")]
    BadResponse { url: String, problem: String },
    #[error("{name}={value:?}: expected {expected}")]
    BadSetting {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
}

/// `org/name` with an optional `@revision` (a branch, tag or commit; default `main`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoRef {
    pub repo: String,
    pub revision: String,
}

impl RepoRef {
    /// `None` unless `text` has exactly the shape of a repo id; the parts become URL path segments, so anything
    /// that could escape them (`..`, `?`, `#`, spaces) is refused here.
    pub fn parse(text: &str) -> Option<RepoRef> {
        let (repo, revision) = match text.split_once('@') {
            Some((r, v)) => (r, v),
            None => (text, "main"),
        };
        let part_ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && !p.contains("..")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let (owner, name) = repo.split_once('/')?;
        let revision_ok = !revision.is_empty()
            && !revision.contains("..")
            && !revision.starts_with('/')
            && revision
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        (part_ok(owner) && part_ok(name) && revision_ok).then(|| RepoRef {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

impl std::fmt::Display for RepoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// What a transfer reports as it goes, for a progress display; every method has a silent default.
pub trait TransferProgress {
    fn file_start(&mut self, _name: &str, _size: Option<u64>, _resumed_from: u64) {}
    fn file_bytes(&mut self, _n: u64) {}
    fn retry(&mut self, _name: &str, _attempt: u32, _detail: &str) {}
}

/// A client of the Hugging Face file endpoints.
pub struct Hub {
    endpoint: String,
    read_timeout: Duration,
    token: Option<String>,
    agent: ureq::Agent,
}

/// What the server said about a file besides its bytes.
#[derive(Debug, Default)]
pub struct FileHeaders {
    /// ETag (or X-Linked-Etag) of the Hub's own response, unquoted: the sha256 of an LFS file, or the git blob sha1
    /// of a small one.
    pub etag: Option<String>,
    /// `X-Linked-Size`: the size of an LFS file.
    pub linked_size: Option<u64>,
    /// The whole file's size as the final response gives it (Content-Length, Content-Range).
    pub total_size: Option<u64>,
    /// `X-Repo-Commit`: the commit the revision resolved to.
    pub commit: Option<String>,
}

/// A file of a repo as the Hub's model API lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// Its path in the repo.
    pub name: String,
    pub size: Option<u64>,
    /// The sha256 the Hub records for LFS files.
    pub sha256: Option<String>,
}

/// Why one attempt at a file failed: worth another try, or not.
enum Attempt {
    Retry(String),
    /// No byte arrived for the read timeout: worth another try, and reported as a stall if it is the last.
    Stalled(String),
    Fail(HttpError),
}

#[derive(Deserialize)]
struct ApiModel {
    #[serde(default)]
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<ApiSibling>,
}

#[derive(Deserialize)]
struct ApiSibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<ApiLfs>,
}

#[derive(Deserialize)]
struct ApiLfs {
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    size: Option<u64>,
}

impl Hub {
    /// `HF_ENDPOINT` (default the Hugging Face Hub), `HF_TOKEN` and [`READ_TIMEOUT_ENV`] (a value that is not a
    /// positive number of seconds is refused naming it).
    pub fn from_env() -> Result<Hub, HttpError> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty());
        let read_timeout = match std::env::var(READ_TIMEOUT_ENV) {
            Ok(text) if !text.trim().is_empty() => {
                parse_seconds(&text).ok_or_else(|| HttpError::BadSetting {
                    name: READ_TIMEOUT_ENV,
                    value: text.clone(),
                    expected: "a positive number of seconds",
                })?
            }
            _ => READ_TIMEOUT,
        };
        Ok(Hub::with_read_timeout(&endpoint, token, read_timeout))
    }

    /// A client with the default read timeout (60 s).
    pub fn new(endpoint: &str, token: Option<String>) -> Hub {
        Hub::with_read_timeout(endpoint, token, READ_TIMEOUT)
    }

    /// A client that counts a transfer as stalled after `read_timeout` without a byte.
    pub fn with_read_timeout(endpoint: &str, token: Option<String>, read_timeout: Duration) -> Hub {
        let config = ureq::Agent::config_builder()
            // Redirects are followed by hand: the Hub's own first answer carries the checksum headers, and the
            // token must not follow a redirect to another host.
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(read_timeout))
            .user_agent(concat!("quarry/", env!("CARGO_PKG_VERSION")))
            .build();
        Hub {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: token.map(|t| t.trim().to_string()),
            read_timeout,
            agent: ureq::Agent::new_with_config(config),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn file_url(&self, repo: &RepoRef, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint, repo.repo, repo.revision, file
        )
    }

    fn api_url(&self, repo: &RepoRef) -> String {
        format!(
            "{}/api/models/{}/revision/{}?blobs=true",
            self.endpoint, repo.repo, repo.revision
        )
    }

    /// GET `url`, following redirects by hand; returns the final response and the first (the Hub's) headers.
    fn get(
        &self,
        url: &str,
        range_from: u64,
    ) -> Result<(ureq::http::Response<ureq::Body>, FileHeaders), Attempt> {
        let mut current = url.to_string();
        let mut first: Option<FileHeaders> = None;
        for _ in 0..=MAX_REDIRECTS {
            let mut request = self.agent.get(&current);
            if range_from > 0 {
                request = request.header("Range", format!("bytes={range_from}-"));
            }
            if let Some(token) = &self.token
                && same_origin(&current, &self.endpoint)
            {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            let response = request
                .call()
                .map_err(|e| connect_error(url, &current, e, self.read_timeout))?;
            let headers = response_headers(&response);
            let status = response.status().as_u16();
            if (300..400).contains(&status) && status != 304 {
                let Some(location) = header(&response, "location") else {
                    return Err(Attempt::Fail(HttpError::BadResponse {
                        url: current,
                        problem: format!("HTTP {status} without a Location header"),
                    }));
                };
                current = join_url(&current, &location);
                first.get_or_insert(headers);
                continue;
            }
            let first = match first {
                Some(mut f) => {
                    f.total_size = headers.total_size;
                    f
                }
                None => headers,
            };
            return Ok((response, first));
        }
        Err(Attempt::Fail(HttpError::BadResponse {
            url: url.to_string(),
            problem: format!("more than {MAX_REDIRECTS} redirects"),
        }))
    }

    /// The repo's files at the revision (`/api/models/{repo}/revision/{rev}`) and the commit it resolves to.
    pub fn list_files(
        &self,
        repo: &RepoRef,
    ) -> Result<(Option<String>, Vec<RemoteFile>), HttpError> {
        let url = self.api_url(repo);
        let (response, _) = self.get(&url, 0).map_err(|a| match a {
            Attempt::Fail(e) => e,
            Attempt::Retry(detail) | Attempt::Stalled(detail) => HttpError::BadResponse {
                url: url.clone(),
                problem: detail,
            },
        })?;
        check_status(
            &url,
            &response,
            "no such repository or revision on this endpoint; check the name (private and gated repos need HF_TOKEN)",
        )?;
        let body = response
            .into_body()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| HttpError::BadResponse {
                url: url.clone(),
                problem: e.to_string(),
            })?;
        let model: ApiModel = serde_json::from_str(&body).map_err(|e| HttpError::BadResponse {
            url: url.clone(),
            problem: format!("not the Hub's model JSON ({e})"),
        })?;
        let files = model
            .siblings
            .into_iter()
            .map(|s| {
                let lfs = s.lfs.as_ref();
                RemoteFile {
                    size: lfs.and_then(|l| l.size).or(s.size),
                    sha256: lfs.and_then(|l| l.sha256.clone()).filter(|h| is_hex(h, 64)),
                    name: s.rfilename,
                }
            })
            .collect();
        Ok((model.sha, files))
    }

    /// Fetches `url` into `partial`, continuing after the bytes it already holds, in up to a few attempts (a
    /// broken transfer is resumed with a range request after a short pause). `name` labels the progress; `size`,
    /// when known, is what the file should come to if the server does not say. On success `partial` holds the
    /// whole file, unchecked; on failure whatever arrived is kept for the next call to continue.
    pub fn fetch_file(
        &self,
        url: &str,
        partial: &Path,
        name: &str,
        size: Option<u64>,
        progress: &mut dyn TransferProgress,
    ) -> Result<FileHeaders, HttpError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
            match self.fetch(url, partial, have, name, size, progress) {
                Ok(h) => return Ok(h),
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry(detail) | Attempt::Stalled(detail)) if attempt < ATTEMPTS => {
                    progress.retry(name, attempt, &detail);
                    std::thread::sleep(Duration::from_millis(250 << (attempt - 1)));
                }
                Err(Attempt::Stalled(_)) => {
                    return Err(HttpError::Stalled {
                        url: url.to_string(),
                        attempts: attempt,
                        timeout: self.read_timeout,
                        done: fs::metadata(partial).map(|m| m.len()).unwrap_or(0),
                    });
                }
                Err(Attempt::Retry(detail)) => {
                    return Err(HttpError::Interrupted {
                        url: url.to_string(),
                        attempts: attempt,
                        detail,
                        done: fs::metadata(partial).map(|m| m.len()).unwrap_or(0),
                    });
                }
            }
        }
    }

    /// One attempt: request the bytes after `have` and append them to `partial`.
    fn fetch(
        &self,
        url: &str,
        partial: &Path,
        have: u64,
        name: &str,
        size: Option<u64>,
        progress: &mut dyn TransferProgress,
    ) -> Result<FileHeaders, Attempt> {
        let (response, mut headers) = self.get(url, have)?;
        let status = response.status().as_u16();
        let mut start = have;
        match status {
            200 => start = 0, // the whole file, whatever was asked
            206 => {
                let range = header(&response, "content-range");
                let (first, total) =
                    range
                        .as_deref()
                        .and_then(parse_content_range)
                        .ok_or_else(|| {
                            Attempt::Fail(HttpError::BadResponse {
                                url: url.to_string(),
                                problem: format!(
                                    "HTTP 206 with an unusable Content-Range {range:?}"
                                ),
                            })
                        })?;
                if first != have {
                    // Not the range asked for: start over rather than splice mismatched bytes.
                    let _ = fs::remove_file(partial);
                    return Err(Attempt::Retry(format!(
                        "the server resumed at byte {first} instead of {have}"
                    )));
                }
                headers.total_size = total;
            }
            416 => {
                // Asked past the end: either the partial file is already complete or it is longer than the file.
                let total = header(&response, "content-range").and_then(|r| {
                    r.rsplit('/')
                        .next()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                });
                if total == Some(have) {
                    headers.total_size = total;
                    return Ok(headers);
                }
                let _ = fs::remove_file(partial);
                return Err(Attempt::Retry(format!(
                    "the kept {have} bytes do not fit the file on the server; starting over"
                )));
            }
            _ => {
                check_status(url, &response, "no such file in this repository and revision").map_err(|e| {
                    if matches!(&e, HttpError::Http { status, .. } if *status >= 500 || *status == 429) {
                        Attempt::Retry(e.to_string())
                    } else {
                        Attempt::Fail(e)
                    }
                })?;
                return Err(Attempt::Fail(HttpError::BadResponse {
                    url: url.to_string(),
                    problem: format!("HTTP {status} where the file was expected"),
                }));
            }
        }
        if status == 200 {
            headers.total_size = response
                .body()
                .content_length()
                .or(headers.linked_size)
                .or(size);
        }
        let mut out = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(start == 0)
            .append(start > 0)
            .open(partial)
            .map_err(|e| Attempt::Fail(write_error(partial, e)))?;
        progress.file_start(name, headers.total_size.or(size), start);
        let mut body = response.into_body().into_reader();
        let mut buf = vec![0u8; 256 * 1024];
        let mut received = start;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => {
                    let _ = out.flush();
                    return Err(Attempt::Stalled(format!(
                        "the server stopped sending data ({} without a byte) after {received} bytes",
                        seconds(self.read_timeout)
                    )));
                }
                Err(e) => {
                    let _ = out.flush();
                    return Err(Attempt::Retry(format!("{e} after {received} bytes")));
                }
            };
            out.write_all(&buf[..n])
                .map_err(|e| Attempt::Fail(write_error(partial, e)))?;
            received += n as u64;
            progress.file_bytes(n as u64);
        }
        out.flush()
            .and_then(|_| out.sync_all())
            .map_err(|e| Attempt::Fail(write_error(partial, e)))?;
        if let Some(total) = headers.total_size
            && received < total
        {
            return Err(Attempt::Retry(format!(
                "the connection closed after {received} of {total} bytes"
            )));
        }
        Ok(headers)
    }
}

/// Whether a read failed for want of data within the read timeout.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    ) || e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ureq::Error>())
        .is_some_and(|u| match u {
            ureq::Error::Timeout(_) => true,
            ureq::Error::Io(io) => is_timeout(io),
            _ => false,
        })
}

/// `1.5` or `60` (seconds, positive and finite).
fn parse_seconds(text: &str) -> Option<Duration> {
    let secs: f64 = text.trim().parse().ok()?;
    (secs.is_finite() && secs > 0.0 && secs < 1e9).then(|| Duration::from_secs_f64(secs))
}

/// `60 s`, `0.5 s`.
fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

fn write_error(path: &Path, source: io::Error) -> HttpError {
    HttpError::Io {
        path: path.to_path_buf(),
        action: "write",
        source,
    }
}

/// A checksum's shape: `len` hex digits.
pub(super) fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn header(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
}

fn response_headers(response: &ureq::http::Response<ureq::Body>) -> FileHeaders {
    let unquote = |t: String| {
        t.trim_start_matches("W/")
            .trim_matches('"')
            .to_ascii_lowercase()
    };
    FileHeaders {
        etag: header(response, "x-linked-etag")
            .or_else(|| header(response, "etag"))
            .map(unquote),
        linked_size: header(response, "x-linked-size").and_then(|s| s.parse().ok()),
        total_size: None,
        commit: header(response, "x-repo-commit"),
    }
}

/// `bytes FIRST-LAST/TOTAL` to (FIRST, TOTAL); TOTAL may be `*`.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim();
    let (range, total) = rest.split_once('/')?;
    let (first, _) = range.split_once('-')?;
    Some((first.trim().parse().ok()?, total.trim().parse().ok()))
}

fn check_status(
    url: &str,
    response: &ureq::http::Response<ureq::Body>,
    not_found_hint: &'static str,
) -> Result<(), HttpError> {
    let status = response.status().as_u16();
    match status {
        200..=299 => Ok(()),
        404 => Err(HttpError::NotFound {
            url: url.to_string(),
            hint: not_found_hint,
        }),
        401 | 403 => Err(HttpError::Denied {
            url: url.to_string(),
            status,
        }),
        _ => Err(HttpError::Http {
            url: url.to_string(),
            status,
            reason: header(response, "x-error-message").unwrap_or_default(),
        }),
    }
}

fn connect_error(url: &str, current: &str, e: ureq::Error, read_timeout: Duration) -> Attempt {
    let detail = match &e {
        ureq::Error::Io(io) => io.to_string(),
        ureq::Error::HostNotFound => "the host name does not resolve".to_string(),
        other => other.to_string(),
    };
    match e {
        ureq::Error::Io(ref io)
            if matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            Attempt::Retry(detail)
        }
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => {
            Attempt::Retry(format!("timed out ({detail})"))
        }
        // Connected, and the server then went quiet before its answer was complete.
        ureq::Error::Timeout(_) => Attempt::Stalled(format!(
            "the server stopped sending data ({} without a byte) before its answer",
            seconds(read_timeout)
        )),
        ureq::Error::Io(ref io) if is_timeout(io) => Attempt::Stalled(format!(
            "the server stopped sending data ({} without a byte) before its answer",
            seconds(read_timeout)
        )),
        ureq::Error::BadUri(_) => Attempt::Fail(HttpError::BadResponse {
            url: url.to_string(),
            problem: format!("not a usable URL ({detail}); check HF_ENDPOINT"),
        }),
        _ => Attempt::Fail(HttpError::Unreachable {
            url: current.to_string(),
            detail,
        }),
    }
}

/// Scheme and host (with port) of a URL, for deciding where the token may go.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[after_scheme..]
        .find('/')
        .map(|i| after_scheme + i)
        .unwrap_or(url.len());
    &url[..end]
}

fn same_origin(a: &str, b: &str) -> bool {
    origin(a).eq_ignore_ascii_case(origin(b))
}

/// A Location header against the URL it came from.
fn join_url(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let dir = base.rsplit_once('/').map(|(d, _)| d).unwrap_or(base);
        format!("{dir}/{location}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_refs() {
        assert_eq!(
            RepoRef::parse("ibm-granite/granite-3.0-2b-instruct"),
            Some(RepoRef {
                repo: "ibm-granite/granite-3.0-2b-instruct".into(),
                revision: "main".into()
            })
        );
        assert_eq!(
            RepoRef::parse("a/b@v1.0").map(|r| r.revision),
            Some("v1.0".into())
        );
        for bad in [
            "a", "a/b/c", "/a/b", "a/../b", "../a/b", "a/b@", "a/b@x?y", "a /b", "a/b@../x",
        ] {
            assert_eq!(RepoRef::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            origin("https://huggingface.co/a/b"),
            "https://huggingface.co"
        );
        assert_eq!(origin("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert!(same_origin("https://HF.co/x", "https://hf.co"));
        assert!(!same_origin("https://cdn.hf.co/x", "https://hf.co"));
        assert_eq!(join_url("http://h:1/a/b/c", "/x/y"), "http://h:1/x/y");
        assert_eq!(join_url("http://h:1/a/b/c", "d"), "http://h:1/a/b/d");
        assert_eq!(join_url("http://h/a", "https://cdn/z"), "https://cdn/z");
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 0-9/*"), Some((0, None)));
        assert_eq!(parse_content_range("items 0-9/10"), None);
    }
}
