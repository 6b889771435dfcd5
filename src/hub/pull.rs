//! Getting a model into the store: `pull` downloads a Hugging Face snapshot (resuming, verifying every file) and
//! converts it; `import` converts a folder already on the machine (the air-gapped path).
//!
//! The talking to the Hub (requests, redirects, the token, range requests and retries) is [`http`](super::http)'s;
//! this module decides which files a snapshot needs, checks each, and converts and installs the result. Each file
//! is written to `NAME.partial` in the store's download folder and renamed to its name only once its size and
//! checksum are right; an interrupted transfer continues from the partial file, in the same run (a few retries)
//! or the next one.
//!
//! A killed pull (a signal, a power cut) leaves its download folder (`downloads/ORG--REPO@REV/`, with finished
//! files and at most one `*.partial`) on purpose: `list` never looks there, and the next pull of the same repo
//! and revision takes the download lock, rechecks the finished files, resumes the partial one from its length and,
//! once the model is installed, deletes the whole folder. What a kill during the conversion leaves in `staging/`
//! is removed by that next install (see [`store`](super::store)).
//!
//! What a file is checked against, first found wins: the registry's sha256 (models.toml), the sha256 the Hub's
//! model API lists for LFS files, the Hub's `X-Linked-Etag` / `ETag` header (the sha256 of an LFS file, or the
//! git blob sha1 of a small file), and always the expected size when one is known.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use quarry_quantize::hf::HfConfig;
use quarry_quantize::{ConvertError, TargetType};
use sha2::Digest;

use crate::hub::http::{
    FileHeaders, HttpError, Hub, RemoteFile, RepoRef, TransferProgress, is_hex,
};
use crate::hub::registry::{Registry, RegistryModel};
use crate::hub::store::{
    InstallRequest, InstalledModel, SourceFile, Store, StoreError, validate_name,
};

/// The tokenizer and config files a conversion reads; weights are `*.safetensors` (with the shard index).
/// `chat_template.jinja` is where newer transformers save the chat template, which the converter then prefers.
const SNAPSHOT_FILES: &[&str] = &[
    "config.json",
    "chat_template.jinja",
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
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(
        "{url}: the downloaded file is corrupt ({problem}); it was deleted and nothing was installed: run the pull again"
    )]
    Corrupt { url: String, problem: String },
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
    #[error(
        "'{name}' is a registry model, but {}'s config.json is not that model ({differences}); import it under \
         another --name, or pass --force to install it as '{name}' anyway",
        dir.display()
    )]
    NotTheRegistryModel {
        name: String,
        dir: PathBuf,
        differences: String,
    },
    #[error(
        "{}: a GGUF file is installed as it is; convert it first (`quarry quantize {} -o OUT.gguf --type TYPE`) \
         and import OUT.gguf",
        path.display(),
        path.display()
    )]
    TypeOfGguf { path: PathBuf },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Snapshot(#[from] crate::text::SnapshotTextError),
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

/// Progress of a pull, for the command line to draw: the transfers' own, and the steps around them; every method
/// has a silent default.
pub trait PullProgress: TransferProgress {
    fn step(&mut self, _message: &str) {}
    fn file_done(&mut self, _name: &str, _size: u64, _check: Verification) {}
}

/// A [`PullProgress`] that shows nothing.
pub struct Quiet;
impl TransferProgress for Quiet {}
impl PullProgress for Quiet {}

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

/// Downloads one file into `dir` (resuming `NAME.partial`), verifies it and renames it to its name.
fn download(
    hub: &Hub,
    repo: &RepoRef,
    file: &WantedFile,
    dir: &Path,
    progress: &mut dyn PullProgress,
    commit: &mut Option<String>,
) -> Result<SourceFile, PullError> {
    let url = hub.file_url(repo, &file.name);
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
    let headers = hub.fetch_file(&url, &partial, &file.name, file.size, progress)?;
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

/// Files of a snapshot that a conversion reads (top level only).
pub fn is_snapshot_file(name: &str) -> bool {
    !name.contains('/') && (SNAPSHOT_FILES.contains(&name) || name.ends_with(".safetensors"))
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
    /// Replace a model installed under the same name.
    pub force: bool,
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
    store.check_replace(&name, request.force)?;
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
        Ok((commit, files)) => (
            commit,
            with_registry_checksums(snapshot_files(files), entry),
        ),
        // The registry's own list stands in for an endpoint without the model API (a plain file mirror).
        Err(HttpError::BadResponse { .. } | HttpError::Http { .. }) if entry.is_some() => {
            (None, registry_files(entry))
        }
        Err(e) => return Err(e.into()),
    };
    let source_desc = format!("{repo} on {}", hub.endpoint());
    require_files(files.iter().map(|f| f.name.as_str()), &source_desc)?;

    store.check_writable(&name)?;
    let dir = store.download_dir(&repo.repo, &repo.revision);
    let _lock = store.lock(&format!("download {repo}"))?;
    store.create_dir(&dir)?;
    let result = download_all(hub, &repo, files, &dir, progress, &mut commit).and_then(|sources| {
        // The runtime must be able to load the tokenizer and compile the chat template it will be given.
        crate::text::check_snapshot(&dir)?;
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
        sources.push(download(hub, repo, file, dir, progress, commit)?);
        if file.name == "config.json" {
            HfConfig::load(dir)?;
        }
    }
    Ok(sources)
}

/// The files of a repo's listing that a conversion reads, with the Hub's size and checksum.
fn snapshot_files(files: Vec<RemoteFile>) -> Vec<WantedFile> {
    files
        .into_iter()
        .filter(|f| is_snapshot_file(&f.name))
        .map(|f| WantedFile {
            name: f.name,
            size: f.size,
            sha256: f.sha256,
            from_registry: false,
            sha256_from_registry: false,
        })
        .collect()
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
    /// Replace a model installed under the same name, and install under a registry name a folder whose config.json
    /// differs from that model's.
    pub force: bool,
}

/// How `config` differs from the registry entry `entry` in what fixes the network's shape; empty when it does
/// not. Comparing the architecture summary catches a folder imported under the wrong registry name, which would
/// otherwise be installed, listed and chatted with under a name that misleads.
fn registry_differences(config: &HfConfig, entry: &RegistryModel) -> String {
    let origin = PathBuf::from(format!("models.toml[{}]", entry.name));
    let Ok(want) = HfConfig::parse(&origin, &entry.config_json()) else {
        return String::new();
    };
    let mut out = Vec::new();
    let mut check = |what: &str, got: String, want: String| {
        if got != want {
            out.push(format!("{what} {got}, the registry's {want}"));
        }
    };
    check(
        "architecture",
        config.architecture.gguf_name().to_string(),
        want.architecture.gguf_name().to_string(),
    );
    check(
        "hidden size",
        config.hidden_size.to_string(),
        want.hidden_size.to_string(),
    );
    check(
        "layers",
        config.num_hidden_layers.to_string(),
        want.num_hidden_layers.to_string(),
    );
    check(
        "FFN width",
        config.intermediate_size.to_string(),
        want.intermediate_size.to_string(),
    );
    check(
        "attention heads",
        format!(
            "{}/{}",
            config.num_attention_heads, config.num_key_value_heads
        ),
        format!("{}/{}", want.num_attention_heads, want.num_key_value_heads),
    );
    check(
        "vocabulary",
        config.vocab_size.to_string(),
        want.vocab_size.to_string(),
    );
    let experts = |c: &HfConfig| {
        c.moe.map_or("none".to_string(), |m| {
            format!(
                "{} ({} per token)",
                m.num_local_experts, m.num_experts_per_tok
            )
        })
    };
    check("experts", experts(config), experts(&want));
    check(
        "context",
        config.max_position_embeddings.to_string(),
        want.max_position_embeddings.to_string(),
    );
    out.join("; ")
}

/// Installs the GGUF file `file` as it is, recording its size and sha256 (`quarry import FILE.gguf`).
fn import_gguf(
    store: &Store,
    request: &ImportRequest,
    progress: &mut dyn PullProgress,
) -> Result<InstalledModel, PullError> {
    let file = &request.dir;
    if request.target.is_some() {
        return Err(PullError::TypeOfGguf { path: file.clone() });
    }
    let stem = file
        .file_stem()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .to_string();
    let name = request.name.clone().unwrap_or(stem);
    validate_name(&name)?;
    store.check_replace(&name, request.force)?;
    store.check_writable(&name)?;
    progress.step(&format!("checksumming {}", file.display()));
    let (sha256, _) = hash_file(file)?;
    let size = fs::metadata(file).map_err(io_error(file, "read"))?.len();
    let source = SourceFile {
        name: file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string(),
        size,
        sha256,
    };
    progress.step(&format!("installing it as {name}"));
    Ok(store.install_gguf(file, &name, vec![source])?)
}

/// Converts and installs a snapshot folder already on this machine, recording each file's sha256. Before any of
/// that, the folder's text files are checked as the runtime will load them ([`check_snapshot`]) and the store is
/// checked to be writable, so neither problem shows only after a long conversion.
///
/// [`check_snapshot`]: crate::text::check_snapshot
pub fn import(
    store: &Store,
    registry: &Registry,
    request: &ImportRequest,
    progress: &mut dyn PullProgress,
) -> Result<InstalledModel, PullError> {
    let dir = &request.dir;
    if dir.is_file() {
        return import_gguf(store, request, progress);
    }
    let entries = fs::read_dir(dir).map_err(io_error(dir, "read the folder"))?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| is_snapshot_file(n))
        .collect();
    names.sort();
    require_files(names.iter().map(String::as_str), &dir.display().to_string())?;
    let config = HfConfig::load(dir)?;
    crate::text::check_snapshot(dir)?;
    let folder_name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().and_then(|n| n.to_str()).map(String::from))
        .unwrap_or_else(|| "model".to_string());
    let name = request.name.clone().unwrap_or(folder_name);
    validate_name(&name)?;
    if let Some(entry) = registry.find(&name)
        && !request.force
    {
        let differences = registry_differences(&config, entry);
        if !differences.is_empty() {
            return Err(PullError::NotTheRegistryModel {
                name,
                dir: dir.clone(),
                differences,
            });
        }
    }
    store.check_replace(&name, request.force)?;
    store.check_writable(&name)?;
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
    fn snapshot_files() {
        for ok in [
            "config.json",
            "chat_template.jinja",
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
}
