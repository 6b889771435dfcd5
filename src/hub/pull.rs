//! Getting a model into the store: `pull` downloads a Hugging Face snapshot (resuming, verifying every file) and
//! converts it; `import` converts a folder already on the machine (the air-gapped path).
//!
//! Files come from `{endpoint}/{repo}/resolve/{revision}/{file}`, the endpoint being `HF_ENDPOINT` or
//! `https://huggingface.co`; `HF_TOKEN` is sent as a bearer token to that host only (never to the CDN the Hub
//! redirects large files to). Each file is written to `NAME.partial` in the store's download folder and renamed to
//! its name only once its size and checksum are right; an interrupted transfer continues from the partial file with
//! an HTTP range request, in the same run (a few retries) or the next one.
//!
//! What a file is checked against, first found wins: the registry's sha256 (models.toml), the sha256 the Hub's
//! model API lists for LFS files, the Hub's `X-Linked-Etag` / `ETag` header (the sha256 of an LFS file, or the
//! git blob sha1 of a small file), and always the expected size when one is known.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use quarry_quantize::hf::HfConfig;
use quarry_quantize::{ConvertError, TargetType};
use serde::Deserialize;
use sha2::Digest;

use crate::hub::registry::{Registry, RegistryModel};
use crate::hub::store::{
    InstallRequest, InstalledModel, SourceFile, Store, StoreError, validate_name,
};

/// Where models come from unless `HF_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Attempts per file before a broken transfer is reported (the partial file stays for the next run).
const ATTEMPTS: u32 = 4;
/// A stalled connection is given up after this long without data.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
const MAX_REDIRECTS: usize = 10;
/// The tokenizer and config files a conversion reads; weights are `*.safetensors` (with the shard index).
const SNAPSHOT_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "model.safetensors.index.json",
];

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(
        "'{what}' is neither a model of the registry ({known}) nor a Hugging Face repo id (org/name or org/name@revision)"
    )]
    UnknownModel { what: String, known: String },
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
        "{url}: the downloaded file is corrupt ({problem}); it was deleted and nothing was installed: run the pull again"
    )]
    Corrupt { url: String, problem: String },
    #[error("{url}: unexpected answer: {problem}")]
    BadResponse { url: String, problem: String },
    #[error(
        "{source_desc} has no {what}; quarry converts Granite checkpoints made of config.json, *.safetensors weights and tokenizer.json"
    )]
    MissingFiles {
        source_desc: String,
        what: &'static str,
    },
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

fn io_error<'p>(path: &'p Path, action: &'static str) -> impl FnOnce(io::Error) -> PullError + 'p {
    move |source| PullError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
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

/// How a downloaded file was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// sha256 from models.toml.
    RegistrySha256,
    /// sha256 from the Hub (its model API or the LFS ETag).
    HubSha256,
    /// The git blob sha1 the Hub gives as ETag of files not stored in LFS.
    HubGitSha1,
    /// Nothing but the size was known.
    SizeOnly,
    /// Complete from an earlier, interrupted pull (checked then).
    Earlier,
}

impl std::fmt::Display for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verification::RegistrySha256 => "sha256 as in models.toml",
            Verification::HubSha256 => "sha256 as the Hub lists it",
            Verification::HubGitSha1 => "git sha1 as the Hub lists it",
            Verification::SizeOnly => "size only: the server gave no checksum",
            Verification::Earlier => "verified by an earlier pull",
        })
    }
}

/// Progress of a pull, for the command line to draw; every method has a silent default.
pub trait PullProgress {
    fn step(&mut self, _message: &str) {}
    fn file_start(&mut self, _name: &str, _size: Option<u64>, _resumed_from: u64) {}
    fn file_bytes(&mut self, _n: u64) {}
    fn file_done(&mut self, _name: &str, _size: u64, _check: Verification) {}
    fn retry(&mut self, _name: &str, _attempt: u32, _detail: &str) {}
}

/// A [`PullProgress`] that shows nothing.
pub struct Quiet;
impl PullProgress for Quiet {}

/// A client of the Hugging Face file endpoints.
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// A file to fetch and what it should be.
#[derive(Clone, Debug, Default)]
struct WantedFile {
    name: String,
    size: Option<u64>,
    sha256: Option<String>,
    /// models.toml gave the size or the checksum (errors then say so).
    from_registry: bool,
    /// `sha256` is the registry's (not the Hub's).
    sha256_from_registry: bool,
}

/// What the server said about a file besides its bytes.
#[derive(Debug, Default)]
struct FileHeaders {
    /// ETag (or X-Linked-Etag) of the Hub's own response, unquoted.
    etag: Option<String>,
    linked_size: Option<u64>,
    total_size: Option<u64>,
    commit: Option<String>,
}

/// Why one attempt at a file failed: worth another try, or not.
enum Attempt {
    Retry(String),
    Fail(PullError),
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
    /// `HF_ENDPOINT` (default the Hugging Face Hub) and `HF_TOKEN`.
    pub fn from_env() -> Hub {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty());
        Hub::new(&endpoint, token)
    }

    pub fn new(endpoint: &str, token: Option<String>) -> Hub {
        let config = ureq::Agent::config_builder()
            // Redirects are followed by hand: the Hub's own first answer carries the checksum headers, and the
            // token must not follow a redirect to another host.
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT))
            .user_agent(concat!("quarry/", env!("CARGO_PKG_VERSION")))
            .build();
        Hub {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: token.map(|t| t.trim().to_string()),
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
                .map_err(|e| connect_error(url, &current, e))?;
            let headers = response_headers(&response);
            let status = response.status().as_u16();
            if (300..400).contains(&status) && status != 304 {
                let Some(location) = header(&response, "location") else {
                    return Err(Attempt::Fail(PullError::BadResponse {
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
        Err(Attempt::Fail(PullError::BadResponse {
            url: url.to_string(),
            problem: format!("more than {MAX_REDIRECTS} redirects"),
        }))
    }

    /// The repo's files at the revision (`/api/models/{repo}/revision/{rev}`) and the commit it resolves to.
    fn list_files(&self, repo: &RepoRef) -> Result<(Option<String>, Vec<WantedFile>), PullError> {
        let url = self.api_url(repo);
        let (response, _) = self.get(&url, 0).map_err(|a| match a {
            Attempt::Fail(e) => e,
            Attempt::Retry(detail) => PullError::BadResponse {
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
            .map_err(|e| PullError::BadResponse {
                url: url.clone(),
                problem: e.to_string(),
            })?;
        let model: ApiModel = serde_json::from_str(&body).map_err(|e| PullError::BadResponse {
            url: url.clone(),
            problem: format!("not the Hub's model JSON ({e})"),
        })?;
        let files = model
            .siblings
            .into_iter()
            .filter(|s| is_snapshot_file(&s.rfilename))
            .map(|s| {
                let lfs = s.lfs.as_ref();
                WantedFile {
                    size: lfs.and_then(|l| l.size).or(s.size),
                    sha256: lfs.and_then(|l| l.sha256.clone()).filter(|h| is_hex(h, 64)),
                    name: s.rfilename,
                    from_registry: false,
                    sha256_from_registry: false,
                }
            })
            .collect();
        Ok((model.sha, files))
    }

    /// Downloads one file into `dir` (resuming `NAME.partial`), verifies it and renames it to its name.
    fn download(
        &self,
        repo: &RepoRef,
        file: &WantedFile,
        dir: &Path,
        progress: &mut dyn PullProgress,
        commit: &mut Option<String>,
    ) -> Result<SourceFile, PullError> {
        let url = self.file_url(repo, &file.name);
        let done_path = dir.join(&file.name);
        let partial = dir.join(format!("{}.partial", file.name));
        // A file renamed into place was verified by an earlier run.
        if let Ok(meta) = fs::metadata(&done_path)
            && file.size.is_none_or(|s| s == meta.len())
        {
            let (sha256, _) = hash_file(&done_path)?;
            if file
                .sha256
                .as_ref()
                .is_none_or(|s| s.eq_ignore_ascii_case(&sha256))
            {
                progress.file_start(&file.name, Some(meta.len()), meta.len());
                progress.file_done(&file.name, meta.len(), Verification::Earlier);
                return Ok(SourceFile {
                    name: file.name.clone(),
                    size: meta.len(),
                    sha256,
                });
            }
        }
        let mut attempt = 0;
        let headers = loop {
            attempt += 1;
            let have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            match self.fetch(&url, &partial, have, file, progress) {
                Ok(h) => break h,
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry(detail)) if attempt < ATTEMPTS => {
                    progress.retry(&file.name, attempt, &detail);
                    std::thread::sleep(Duration::from_millis(250 << (attempt - 1)));
                }
                Err(Attempt::Retry(detail)) => {
                    return Err(PullError::Interrupted {
                        url,
                        attempts: attempt,
                        detail,
                        done: fs::metadata(&partial).map(|m| m.len()).unwrap_or(0),
                    });
                }
            }
        };
        if commit.is_none() {
            commit.clone_from(&headers.commit);
        }
        let check = verify(&partial, file, &headers).inspect_err(|_| {
            let _ = fs::remove_file(&partial);
        });
        let (size, sha256, how) = check.map_err(|problem| PullError::Corrupt {
            url: url.clone(),
            problem,
        })?;
        fs::rename(&partial, &done_path).map_err(io_error(&done_path, "rename the download"))?;
        progress.file_done(&file.name, size, how);
        Ok(SourceFile {
            name: file.name.clone(),
            size,
            sha256,
        })
    }

    /// One attempt: request the bytes after `have` and append them to `partial`.
    fn fetch(
        &self,
        url: &str,
        partial: &Path,
        have: u64,
        file: &WantedFile,
        progress: &mut dyn PullProgress,
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
                            Attempt::Fail(PullError::BadResponse {
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
                    if matches!(&e, PullError::Http { status, .. } if *status >= 500 || *status == 429) {
                        Attempt::Retry(e.to_string())
                    } else {
                        Attempt::Fail(e)
                    }
                })?;
                return Err(Attempt::Fail(PullError::BadResponse {
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
                .or(file.size);
        }
        let mut out = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(start == 0)
            .append(start > 0)
            .open(partial)
            .map_err(|e| Attempt::Fail(io_error(partial, "write")(e)))?;
        progress.file_start(
            partial_name(partial),
            headers.total_size.or(file.size),
            start,
        );
        let mut body = response.into_body().into_reader();
        let mut buf = vec![0u8; 256 * 1024];
        let mut received = start;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = out.flush();
                    return Err(Attempt::Retry(format!("{e} after {received} bytes")));
                }
            };
            out.write_all(&buf[..n])
                .map_err(|e| Attempt::Fail(io_error(partial, "write")(e)))?;
            received += n as u64;
            progress.file_bytes(n as u64);
        }
        out.flush()
            .and_then(|_| out.sync_all())
            .map_err(|e| Attempt::Fail(io_error(partial, "write")(e)))?;
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

fn partial_name(partial: &Path) -> &str {
    partial
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".partial"))
        .unwrap_or("")
}

/// Size, then the best checksum known. Returns the size, the sha256 (for the manifest) and how it was checked.
fn verify(
    path: &Path,
    file: &WantedFile,
    headers: &FileHeaders,
) -> Result<(u64, String, Verification), String> {
    let size = fs::metadata(path).map_err(|e| e.to_string())?.len();
    let registry_note = if file.from_registry {
        "; models.toml records the file this way: if this happens again, the file on the Hub has changed since"
    } else {
        ""
    };
    let expected_size = file.size.or(headers.linked_size).or(headers.total_size);
    if let Some(expected) = expected_size
        && expected != size
    {
        return Err(format!(
            "{size} bytes where {expected} were expected{registry_note}"
        ));
    }
    let (sha256, git_sha1) = hash_file(path).map_err(|e| e.to_string())?;
    let etag = headers.etag.as_deref();
    let (expected, how) = match (&file.sha256, etag) {
        (Some(s), _) if file.sha256_from_registry => {
            (Some(s.as_str()), Verification::RegistrySha256)
        }
        (Some(s), _) => (Some(s.as_str()), Verification::HubSha256),
        (None, Some(tag)) if is_hex(tag, 64) => (Some(tag), Verification::HubSha256),
        (None, Some(tag)) if is_hex(tag, 40) => {
            return if tag.eq_ignore_ascii_case(&git_sha1) {
                Ok((size, sha256, Verification::HubGitSha1))
            } else {
                Err(format!("git sha1 {git_sha1}, the Hub lists {tag}"))
            };
        }
        _ => (None, Verification::SizeOnly),
    };
    match expected {
        Some(e) if !e.eq_ignore_ascii_case(&sha256) => Err(format!(
            "sha256 {sha256}, expected {e} ({how}){registry_note}"
        )),
        _ => Ok((size, sha256, how)),
    }
}

/// The sha256 of a file and its git blob sha1 (what the Hub reports for files outside LFS).
fn hash_file(path: &Path) -> Result<(String, String), PullError> {
    let len = fs::metadata(path).map_err(io_error(path, "read"))?.len();
    let mut f = fs::File::open(path).map_err(io_error(path, "read"))?;
    let mut sha256 = sha2::Sha256::new();
    let mut sha1 = sha1::Sha1::new();
    sha1.update(format!("blob {len}\0").as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_error(path, "read"))?;
        if n == 0 {
            break;
        }
        sha256.update(&buf[..n]);
        sha1.update(&buf[..n]);
    }
    Ok((
        format!("{:x}", sha256.finalize()),
        format!("{:x}", sha1.finalize()),
    ))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Files of a snapshot that a conversion reads (top level only).
pub fn is_snapshot_file(name: &str) -> bool {
    !name.contains('/') && (SNAPSHOT_FILES.contains(&name) || name.ends_with(".safetensors"))
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
) -> Result<(), PullError> {
    let status = response.status().as_u16();
    match status {
        200..=299 => Ok(()),
        404 => Err(PullError::NotFound {
            url: url.to_string(),
            hint: not_found_hint,
        }),
        401 | 403 => Err(PullError::Denied {
            url: url.to_string(),
            status,
        }),
        _ => Err(PullError::Http {
            url: url.to_string(),
            status,
            reason: header(response, "x-error-message").unwrap_or_default(),
        }),
    }
}

fn connect_error(url: &str, current: &str, e: ureq::Error) -> Attempt {
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
        ureq::Error::Timeout(_) => Attempt::Retry(format!("timed out ({detail})")),
        ureq::Error::BadUri(_) => Attempt::Fail(PullError::BadResponse {
            url: url.to_string(),
            problem: format!("not a usable URL ({detail}); check HF_ENDPOINT"),
        }),
        _ => Attempt::Fail(PullError::Unreachable {
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

/// What `quarry pull` was asked for.
#[derive(Clone, Debug)]
pub struct PullRequest {
    /// A registry name, or `org/name[@revision]`.
    pub what: String,
    /// The installed name (default: the registry name, or the repo's name).
    pub name: Option<String>,
    /// Default: the registry's type, else q4_0.
    pub target: Option<TargetType>,
    pub threads: Option<usize>,
    /// Let the converter draw its progress bar.
    pub progress_bars: bool,
}

/// Downloads, verifies, converts and installs a model; see the module documentation.
pub fn pull(
    store: &Store,
    hub: &Hub,
    registry: &Registry,
    request: &PullRequest,
    progress: &mut dyn PullProgress,
) -> Result<InstalledModel, PullError> {
    let (repo, entry): (RepoRef, Option<&RegistryModel>) = match registry.find(&request.what) {
        Some(m) => (
            RepoRef {
                repo: m.repo.clone(),
                revision: m.revision.clone(),
            },
            Some(m),
        ),
        None => {
            let repo = RepoRef::parse(&request.what).ok_or_else(|| PullError::UnknownModel {
                what: request.what.clone(),
                known: registry
                    .models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
            let entry = registry
                .find_repo(&repo.repo)
                .filter(|m| m.revision == repo.revision);
            (repo, entry)
        }
    };
    let name = match (&request.name, entry) {
        (Some(n), _) => n.clone(),
        (None, Some(m)) => m.name.clone(),
        (None, None) => repo
            .repo
            .rsplit('/')
            .next()
            .unwrap_or(&repo.repo)
            .to_string(),
    };
    validate_name(&name)?;
    let target = match (request.target, entry) {
        (Some(t), _) => t,
        (None, Some(m)) => m.default_type.parse().unwrap_or(TargetType::Q4_0),
        (None, None) => TargetType::Q4_0,
    };

    progress.step(&format!(
        "listing the files of {repo} at {}",
        hub.endpoint()
    ));
    let (mut commit, files) = match hub.list_files(&repo) {
        Ok((commit, files)) => (commit, with_registry_checksums(files, entry)),
        // The registry's own list stands in for an endpoint without the model API (a plain file mirror).
        Err(PullError::BadResponse { .. } | PullError::Http { .. }) if entry.is_some() => {
            (None, registry_files(entry))
        }
        Err(e) => return Err(e),
    };
    let source_desc = format!("{repo} on {}", hub.endpoint());
    require_files(files.iter().map(|f| f.name.as_str()), &source_desc)?;

    let dir = store.download_dir(&repo.repo, &repo.revision);
    let _lock = store.lock(&format!("download {repo}"))?;
    store.create_dir(&dir)?;
    let result = download_all(hub, &repo, files, &dir, progress, &mut commit).and_then(|sources| {
        progress.step(&format!("converting to {target} as {name}"));
        let installed = store.install(
            &dir,
            &InstallRequest {
                name: name.clone(),
                target,
                repo: Some(repo.repo.clone()),
                revision: Some(repo.revision.clone()),
                commit: commit.clone(),
                imported_from: None,
                files: sources,
                progress: request.progress_bars,
                threads: request.threads,
            },
        )?;
        Ok(installed)
    });
    match &result {
        // The converted model holds everything; the downloaded snapshot is not needed any more.
        Ok(_) => {
            let _ = fs::remove_dir_all(&dir);
        }
        // Partial files stay for the next attempt to resume; a folder with nothing worth keeping goes.
        Err(_) => {
            let _ = fs::remove_dir(&dir);
        }
    }
    result
}

fn download_all(
    hub: &Hub,
    repo: &RepoRef,
    mut files: Vec<WantedFile>,
    dir: &Path,
    progress: &mut dyn PullProgress,
    commit: &mut Option<String>,
) -> Result<Vec<SourceFile>, PullError> {
    // config.json first, checked before any weights are fetched: an unsupported model fails in a second.
    files.sort_by_key(|f| {
        (
            f.name != "config.json",
            f.name.ends_with(".safetensors"),
            f.name.clone(),
        )
    });
    let mut sources = Vec::with_capacity(files.len());
    for file in &files {
        sources.push(hub.download(repo, file, dir, progress, commit)?);
        if file.name == "config.json" {
            HfConfig::load(dir)?;
        }
    }
    Ok(sources)
}

fn with_registry_checksums(
    files: Vec<WantedFile>,
    entry: Option<&RegistryModel>,
) -> Vec<WantedFile> {
    files
        .into_iter()
        .map(|mut f| {
            if let Some(known) = entry.and_then(|m| m.file(&f.name)) {
                if let Some(sha) = &known.sha256 {
                    f.sha256 = Some(sha.to_ascii_lowercase());
                    f.from_registry = true;
                    f.sha256_from_registry = true;
                }
                if known.size.is_some() {
                    f.size = known.size;
                    f.from_registry = true;
                }
            }
            f
        })
        .collect()
}

fn registry_files(entry: Option<&RegistryModel>) -> Vec<WantedFile> {
    entry
        .map(|m| {
            m.files
                .iter()
                .map(|f| WantedFile {
                    name: f.name.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                    from_registry: f.sha256.is_some() || f.size.is_some(),
                    sha256_from_registry: f.sha256.is_some(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn require_files<'a>(
    names: impl Iterator<Item = &'a str> + Clone,
    source_desc: &str,
) -> Result<(), PullError> {
    let missing = |what| PullError::MissingFiles {
        source_desc: source_desc.to_string(),
        what,
    };
    if !names.clone().any(|n| n == "config.json") {
        return Err(missing("config.json"));
    }
    if !names.clone().any(|n| n.ends_with(".safetensors")) {
        return Err(missing("*.safetensors weights"));
    }
    if !names.clone().any(|n| n == "tokenizer.json") {
        return Err(missing("tokenizer.json"));
    }
    Ok(())
}

/// What `quarry import` was asked for.
#[derive(Clone, Debug)]
pub struct ImportRequest {
    pub dir: PathBuf,
    /// Default: the folder's name.
    pub name: Option<String>,
    /// Default: the registry's type for that name, else q4_0.
    pub target: Option<TargetType>,
    pub threads: Option<usize>,
    pub progress_bars: bool,
}

/// Converts and installs a snapshot folder already on this machine, recording each file's sha256.
pub fn import(
    store: &Store,
    registry: &Registry,
    request: &ImportRequest,
    progress: &mut dyn PullProgress,
) -> Result<InstalledModel, PullError> {
    let dir = &request.dir;
    let entries = fs::read_dir(dir).map_err(io_error(dir, "read the folder"))?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| is_snapshot_file(n))
        .collect();
    names.sort();
    require_files(names.iter().map(String::as_str), &dir.display().to_string())?;
    HfConfig::load(dir)?;
    let folder_name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().and_then(|n| n.to_str()).map(String::from))
        .unwrap_or_else(|| "model".to_string());
    let name = request.name.clone().unwrap_or(folder_name);
    validate_name(&name)?;
    let target = match (request.target, registry.find(&name)) {
        (Some(t), _) => t,
        (None, Some(m)) => m.default_type.parse().unwrap_or(TargetType::Q4_0),
        (None, None) => TargetType::Q4_0,
    };
    progress.step(&format!("checksumming {} files", names.len()));
    let mut files = Vec::with_capacity(names.len());
    for n in &names {
        let path = dir.join(n);
        let (sha256, _) = hash_file(&path)?;
        let size = fs::metadata(&path).map_err(io_error(&path, "read"))?.len();
        files.push(SourceFile {
            name: n.clone(),
            size,
            sha256,
        });
    }
    progress.step(&format!("converting to {target} as {name}"));
    Ok(store.install(
        dir,
        &InstallRequest {
            name,
            target,
            repo: None,
            revision: None,
            commit: None,
            imported_from: Some(dir.canonicalize().unwrap_or_else(|_| dir.clone())),
            files,
            progress: request.progress_bars,
            threads: request.threads,
        },
    )?)
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
    fn snapshot_files() {
        for ok in [
            "config.json",
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "tokenizer.json",
        ] {
            assert!(is_snapshot_file(ok), "{ok}");
        }
        for no in [
            "README.md",
            "logits_chat.npy",
            "onnx/model.safetensors",
            "pytorch_model.bin",
        ] {
            assert!(!is_snapshot_file(no), "{no}");
        }
    }

    #[test]
    fn verification_against_each_kind_of_checksum() {
        let dir = std::env::temp_dir().join(format!("quarry-verify-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        fs::write(&path, b"hello\n").unwrap();
        // `git hash-object` of "hello\n", and its sha256.
        let git = "ce013625030ba8dba906f756967f9e9ca394464a";
        let sha = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        let file = |sha256: Option<&str>, registry: bool| WantedFile {
            name: "f".into(),
            size: Some(6),
            sha256: sha256.map(String::from),
            from_registry: registry,
            sha256_from_registry: registry,
        };
        let etag = |t: &str| FileHeaders {
            etag: Some(t.into()),
            ..FileHeaders::default()
        };
        let none = FileHeaders::default();
        assert_eq!(
            verify(&path, &file(Some(sha), true), &none).unwrap().2,
            Verification::RegistrySha256
        );
        assert_eq!(
            verify(&path, &file(Some(sha), false), &none).unwrap().2,
            Verification::HubSha256
        );
        assert_eq!(
            verify(&path, &file(None, false), &etag(sha)).unwrap().2,
            Verification::HubSha256
        );
        assert_eq!(
            verify(&path, &file(None, false), &etag(git)).unwrap().2,
            Verification::HubGitSha1
        );
        assert_eq!(
            verify(&path, &file(None, false), &etag("xyz")).unwrap().2,
            Verification::SizeOnly
        );
        let wrong_sha = "0".repeat(64);
        let wrong_git = "0".repeat(40);
        assert!(
            verify(&path, &file(Some(&wrong_sha), true), &none)
                .unwrap_err()
                .contains("models.toml")
        );
        assert!(verify(&path, &file(None, false), &etag(&wrong_sha)).is_err());
        assert!(verify(&path, &file(None, false), &etag(&wrong_git)).is_err());
        let mut long = file(None, false);
        long.size = Some(7);
        assert!(
            verify(&path, &long, &none)
                .unwrap_err()
                .contains("6 bytes where 7")
        );
        let _ = fs::remove_dir_all(&dir);
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
