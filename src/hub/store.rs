//! The model store: converted models under `$QUARRY_HOME`, each a GGUF file with a manifest saying where it came
//! from, and the resolution of a MODEL argument (a file, an installed name, or a registry name) to a file.
//!
//! Layout of the store folder:
//!
//! ```text
//! models/NAME/model.gguf       the converted model
//! models/NAME/manifest.json    what it is and where it came from (Manifest)
//! downloads/ORG--REPO@REV/     files being downloaded by `pull` (kept after an interruption so the next pull resumes)
//! staging/                     conversions in progress; renamed into models/ only when complete
//! locks/                       one file per download or model being worked on, while it is (see Store::lock)
//! history.txt                  the chat's input history
//! ```
//!
//! A model appears in `models/` by one directory rename, after its GGUF and manifest are complete and synced, so a
//! crash or a full disk never leaves a half-written model where `list`, `run` or `chat` would find it.
//!
//! What a killed process leaves, and who removes it: a conversion's `staging/NAME.PID.N` folder, a replaced
//! model's `staging/.old.NAME.N` and a removal's `staging/.rm.NAME.N` are cleaned by the next install or removal
//! of the same NAME, which holds that name's lock and so knows no live process owns them (an `.old` folder whose
//! model is missing from `models/` is put back first); lock files are removed by whoever next takes the lock;
//! `downloads/` keeps its `*.partial` files on purpose, out of `list`'s sight, and the next `pull` of the same
//! repo and revision resumes them (see [`pull`](super::pull)). Anything else in `staging/` goes after six hours.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use quarry_quantize::{ConvertError, ConvertOptions, TargetType, convert};
use serde::{Deserialize, Serialize};

use crate::hub::registry::Registry;

/// Environment variable naming the store folder.
pub const HOME_ENV: &str = "QUARRY_HOME";
const MODEL_FILE: &str = "model.gguf";
const MANIFEST_FILE: &str = "manifest.json";
/// Staging folders older than this are left over from a killed conversion and are removed.
const STALE_STAGING: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "no folder for the model store: set {HOME_ENV} to a writable folder (there is no user cache folder here)"
    )]
    NoHome,
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("'{name}' cannot be a model name: {problem}")]
    BadName { name: String, problem: &'static str },
    #[error(
        "{}: unreadable manifest ({problem}); remove that folder (`quarry rm {name}`) and pull or import the model again",
        path.display()
    )]
    BadManifest {
        name: String,
        path: PathBuf,
        problem: String,
    },
    #[error("no installed model is named '{name}'; `quarry list` shows the installed ones")]
    NotInstalled { name: String },
    #[error(
        "another quarry is working on {} (it holds {}); wait for it to finish",
        what,
        lock.display()
    )]
    Busy { what: String, lock: PathBuf },
    #[error(
        "{}: the model store cannot be written here (set {HOME_ENV} to a writable folder): {source}",
        root.display()
    )]
    NotWritable { root: PathBuf, source: io::Error },
    #[error(
        "'{name}' is already installed ({what}); pass --force to replace it, or --name NAME to install beside it"
    )]
    AlreadyInstalled { name: String, what: String },
    #[error("{}: not a model quarry can run: {problem}", path.display())]
    NotAModel { path: PathBuf, problem: String },
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

impl StoreError {
    fn io<'p>(path: &'p Path, action: &'static str) -> impl FnOnce(io::Error) -> StoreError + 'p {
        move |source| StoreError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    }
}

/// Why a MODEL argument names no usable file.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "'{name}' is in the model registry but not installed: download it with `quarry pull {name}` \
         (or, without network access, `quarry import DIR --name {name}` from a copy of its folder)"
    )]
    NotPulled { name: String },
    #[error(
        "'{repo}' is not installed: download and convert it with `quarry pull {repo}` (or, without network access, \
         `quarry import DIR --name NAME` from a copy of its folder, then use NAME)"
    )]
    RepoNotPulled { repo: String },
    #[error(
        "{}: a Hugging Face model folder, not a GGUF file: convert it once with `quarry import {} --name NAME` \
         (or `quarry quantize`), then use NAME",
        path.display(),
        path.display()
    )]
    SnapshotFolder { path: PathBuf },
    #[error("{}: No such file or directory", path.display())]
    MissingFile { path: PathBuf },
    #[error(
        "'{arg}' is neither a GGUF file nor an installed model; `quarry list` shows the installed and downloadable ones"
    )]
    Unknown { arg: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One file the model was made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// What an installed model is and where it came from (`models/NAME/manifest.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    /// Hugging Face repo id, for pulled models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The commit the revision pointed to when pulled (the Hub's `X-Repo-Commit`), when the server said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The folder an imported model was converted from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_from: Option<PathBuf>,
    /// `q4_0`, `q8_0`, `f16` or `f32`.
    #[serde(rename = "type")]
    pub quant_type: String,
    /// `granitemoe` or `granite`.
    pub architecture: String,
    pub parameters: u64,
    /// Bytes of the GGUF file.
    pub size: u64,
    pub files: Vec<SourceFile>,
    /// RFC 3339, local time.
    pub installed: String,
}

/// A model in the store.
#[derive(Clone, Debug)]
pub struct InstalledModel {
    pub manifest: Manifest,
    pub dir: PathBuf,
}

impl InstalledModel {
    pub fn gguf(&self) -> PathBuf {
        self.dir.join(MODEL_FILE)
    }

    /// `org/repo@revision` for a pulled model, the folder for an imported one.
    pub fn origin(&self) -> String {
        match (&self.manifest.repo, &self.manifest.imported_from) {
            (Some(repo), _) => format!(
                "{repo}@{}",
                self.manifest.revision.as_deref().unwrap_or("main")
            ),
            (None, Some(dir)) => dir.display().to_string(),
            (None, None) => String::from("-"),
        }
    }
}

/// What to convert and how to describe it.
#[derive(Clone, Debug)]
pub struct InstallRequest {
    pub name: String,
    pub target: TargetType,
    pub repo: Option<String>,
    pub revision: Option<String>,
    pub commit: Option<String>,
    pub imported_from: Option<PathBuf>,
    pub files: Vec<SourceFile>,
    /// Draw the converter's progress bar.
    pub progress: bool,
    pub threads: Option<usize>,
}

/// The store folder.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// `$QUARRY_HOME`, else `quarry` in the platform's cache folder (`~/.cache/quarry` on Linux): models are
    /// re-creatable downloads, which is what cache folders are for.
    pub fn from_env() -> Result<Store, StoreError> {
        match std::env::var_os(HOME_ENV) {
            Some(dir) if !dir.is_empty() => Ok(Store::at(dir)),
            _ => dirs::cache_dir()
                .map(|d| Store::at(d.join("quarry")))
                .ok_or(StoreError::NoHome),
        }
    }

    pub fn at(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    pub fn history_file(&self) -> PathBuf {
        self.root.join("history.txt")
    }

    /// Where `pull` keeps the files of `repo@revision` while downloading.
    pub fn download_dir(&self, repo: &str, revision: &str) -> PathBuf {
        let slug: String = format!("{}@{revision}", repo.replace('/', "--"))
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.@".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.root.join("downloads").join(slug)
    }

    fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// Checks that the model `name` can be installed here, before any long work: creates the store's staging
    /// folder and a probe file in it (`.probe.NAME.N`, which an install of `name` cleans up if a kill left it), and
    /// removes the probe.
    pub fn check_writable(&self, name: &str) -> Result<(), StoreError> {
        let not_writable = |source| StoreError::NotWritable {
            root: self.root.clone(),
            source,
        };
        let staging = self.staging_dir();
        fs::create_dir_all(&staging).map_err(not_writable)?;
        let probe = staging.join(format!(".probe.{name}.{}", unique_suffix()));
        fs::File::create(&probe).map_err(not_writable)?;
        match fs::remove_file(&probe) {
            // An install of the same name cleaned it up already.
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(not_writable(e)),
            _ => Ok(()),
        }
    }

    /// Creates a folder (and the store's own folders above it).
    pub fn create_dir(&self, dir: &Path) -> Result<(), StoreError> {
        fs::create_dir_all(dir).map_err(StoreError::io(dir, "create the folder"))
    }

    /// Every installed model, by name. A folder whose manifest cannot be read is listed as an error, so that `list`
    /// shows it and `rm` can remove it.
    pub fn installed(&self) -> Result<Vec<Result<InstalledModel, StoreError>>, StoreError> {
        let dir = self.models_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io(&dir, "read the folder")(e)),
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names.iter().map(|n| self.load(n)).collect())
    }

    fn load(&self, name: &str) -> Result<InstalledModel, StoreError> {
        let dir = self.models_dir().join(name);
        let path = dir.join(MANIFEST_FILE);
        let bad = |problem: String| StoreError::BadManifest {
            name: name.to_string(),
            path: path.clone(),
            problem,
        };
        let text = fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if manifest.name != name {
            return Err(bad(format!("it names the model '{}'", manifest.name)));
        }
        Ok(InstalledModel { manifest, dir })
    }

    /// The installed model called `name`, or pulled from the repo id `name` (`org/repo` or `org/repo@revision`).
    pub fn find(&self, name: &str) -> Result<Option<InstalledModel>, StoreError> {
        if validate_name(name).is_ok() && self.models_dir().join(name).is_dir() {
            return self.load(name).map(Some);
        }
        if !name.contains('/') {
            return Ok(None);
        }
        let (repo, revision) = match name.split_once('@') {
            Some((r, v)) => (r, Some(v)),
            None => (name, None),
        };
        let mut matches: Vec<InstalledModel> = self
            .installed()?
            .into_iter()
            .flatten()
            .filter(|m| {
                m.manifest
                    .repo
                    .as_deref()
                    .is_some_and(|r| r.eq_ignore_ascii_case(repo))
                    && revision.is_none_or(|v| m.manifest.revision.as_deref() == Some(v))
            })
            .collect();
        // Several conversions of one repo: the most recently installed is the one meant.
        matches.sort_by(|a, b| a.manifest.installed.cmp(&b.manifest.installed));
        Ok(matches.pop())
    }

    /// Refuses to replace the installed model `name` unless `force`: a pull or import under a name already in
    /// use would otherwise silently swap one model for another. Checked before any download or conversion.
    pub fn check_replace(&self, name: &str, force: bool) -> Result<(), StoreError> {
        if force || !self.models_dir().join(name).is_dir() {
            return Ok(());
        }
        let what = match self.load(name) {
            Ok(m) => format!(
                "{}, {:.1} MiB, from {}, installed {}",
                m.manifest.quant_type,
                m.manifest.size as f64 / (1024.0 * 1024.0),
                m.origin(),
                m.manifest.installed
            ),
            Err(_) => "with an unreadable manifest".to_string(),
        };
        Err(StoreError::AlreadyInstalled {
            name: name.to_string(),
            what,
        })
    }

    /// Installs the GGUF file `file` as it is (no conversion), as `ollama create` does from one: copied into the
    /// staging folder, checked to be a model quarry runs, then renamed into place as [`Store::install`] does.
    /// `files` describes the source (its size and sha256) for the manifest.
    pub fn install_gguf(
        &self,
        file: &Path,
        name: &str,
        files: Vec<SourceFile>,
    ) -> Result<InstalledModel, StoreError> {
        validate_name(name)?;
        let _lock = self.lock(&format!("model {name}"))?;
        let staging_root = self.staging_dir();
        self.create_dir(&staging_root)?;
        self.create_dir(&self.models_dir())?;
        self.clean_after_killed(&staging_root, name);
        remove_stale(&staging_root);
        let staging = TempDir::new(staging_root.join(format!(
            "{name}.{}.{}",
            std::process::id(),
            unique_suffix()
        )))?;
        let gguf = staging.path().join(MODEL_FILE);
        fs::copy(file, &gguf).map_err(StoreError::io(file, "copy"))?;
        let not_a_model = |problem: String| StoreError::NotAModel {
            path: file.to_path_buf(),
            problem,
        };
        let opened = crate::gguf::GgufFile::open(&gguf).map_err(|e| not_a_model(e.to_string()))?;
        let config = crate::model::ModelConfig::from_gguf(&opened)
            .map_err(|e| not_a_model(e.to_string()))?;
        let tallies = opened.type_tallies();
        let quant_type = opened
            .get("general.file_type")
            .and_then(|v| v.as_u64())
            .and_then(|t| match t {
                0 => Some("f32"),
                1 => Some("f16"),
                2 => Some("q4_0"),
                7 => Some("q8_0"),
                15 => Some("q4_k_m"),
                17 => Some("q5_k_m"),
                18 => Some("q6_k"),
                _ => None,
            })
            .map(str::to_string)
            .or_else(|| {
                tallies
                    .iter()
                    .max_by_key(|t| t.elements)
                    .map(|t| t.ty.name().to_ascii_lowercase())
            })
            .unwrap_or_else(|| "?".to_string());
        let manifest = Manifest {
            name: name.to_string(),
            repo: None,
            revision: None,
            commit: None,
            imported_from: Some(file.canonicalize().unwrap_or_else(|_| file.to_path_buf())),
            quant_type,
            architecture: config.arch.gguf_name().to_string(),
            parameters: tallies.iter().map(|t| t.elements).sum(),
            size: opened.file_len(),
            files,
            installed: chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        };
        drop(opened);
        self.put_in_place(staging, &staging_root, manifest)
    }

    /// Converts the snapshot folder `snapshot` and installs it as `request.name`, replacing an installed model of
    /// that name only once the new one is complete.
    pub fn install(
        &self,
        snapshot: &Path,
        request: &InstallRequest,
    ) -> Result<InstalledModel, StoreError> {
        validate_name(&request.name)?;
        let _lock = self.lock(&format!("model {}", request.name))?;
        let staging_root = self.staging_dir();
        self.create_dir(&staging_root)?;
        self.create_dir(&self.models_dir())?;
        self.clean_after_killed(&staging_root, &request.name);
        remove_stale(&staging_root);
        let staging = TempDir::new(staging_root.join(format!(
            "{}.{}.{}",
            request.name,
            std::process::id(),
            unique_suffix()
        )))?;

        let gguf = staging.path().join(MODEL_FILE);
        let options = ConvertOptions {
            progress: request.progress,
            threads: request.threads,
            model_name: Some(request.name.clone()),
            ..ConvertOptions::new(snapshot, &gguf, request.target)
        };
        let report = convert(&options)?;
        let manifest = Manifest {
            name: request.name.clone(),
            repo: request.repo.clone(),
            revision: request.revision.clone(),
            commit: request.commit.clone(),
            imported_from: request.imported_from.clone(),
            quant_type: request.target.to_string(),
            architecture: report.architecture.gguf_name().to_string(),
            parameters: report.parameters,
            size: report.file_bytes,
            files: request.files.clone(),
            installed: chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        };
        self.put_in_place(staging, &staging_root, manifest)
    }

    /// Writes the manifest beside the staged GGUF and renames the staging folder to `models/NAME`, an installed
    /// model of that name moved aside first and deleted only once the new one is in place.
    fn put_in_place(
        &self,
        staging: TempDir,
        staging_root: &Path,
        manifest: Manifest,
    ) -> Result<InstalledModel, StoreError> {
        let manifest_path = staging.path().join(MANIFEST_FILE);
        write_synced(&manifest_path, |out| {
            serde_json::to_writer_pretty(&mut *out, &manifest).map_err(io::Error::other)?;
            out.write_all(b"\n")
        })
        .map_err(StoreError::io(&manifest_path, "write"))?;
        sync_dir(staging.path());

        let target = self.models_dir().join(&manifest.name);
        // An older install of the same name moves aside first; it is deleted only after the new one is in place.
        let old = staging_root.join(format!(".old.{}.{}", manifest.name, unique_suffix()));
        let had_old = target.exists();
        if had_old {
            fs::rename(&target, &old).map_err(StoreError::io(&target, "move aside"))?;
        }
        if let Err(e) = fs::rename(staging.path(), &target) {
            if had_old {
                let _ = fs::rename(&old, &target);
            }
            return Err(StoreError::io(&target, "install")(e));
        }
        staging.keep();
        sync_dir(&self.models_dir());
        if had_old {
            let _ = fs::remove_dir_all(&old);
        }
        Ok(InstalledModel {
            manifest,
            dir: target,
        })
    }

    /// Removes an installed model (by name or repo id). The folder leaves `models/` in one rename before it is
    /// deleted, so an interrupted removal never leaves half a model installed.
    pub fn remove(&self, name: &str) -> Result<PathBuf, StoreError> {
        let dir = match self.find(name) {
            Ok(Some(m)) => m.dir,
            // A model with a broken manifest can still be removed by its folder name.
            Ok(None) | Err(StoreError::BadManifest { .. })
                if validate_name(name).is_ok() && self.models_dir().join(name).is_dir() =>
            {
                self.models_dir().join(name)
            }
            Ok(None) => {
                return Err(StoreError::NotInstalled {
                    name: name.to_string(),
                });
            }
            Err(e) => return Err(e),
        };
        let folder = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let _lock = self.lock(&format!("model {folder}"))?;
        let staging_root = self.staging_dir();
        self.create_dir(&staging_root)?;
        self.clean_after_killed(&staging_root, &folder);
        let trash = staging_root.join(format!(".rm.{folder}.{}", unique_suffix()));
        let download = self.load(&folder).ok().and_then(|m| {
            let revision = m.manifest.revision.as_deref().unwrap_or("main").to_string();
            m.manifest
                .repo
                .map(|repo| format!("download {repo}@{revision}"))
        });
        fs::rename(&dir, &trash).map_err(StoreError::io(&dir, "remove"))?;
        fs::remove_dir_all(&trash).map_err(StoreError::io(&trash, "delete"))?;
        // The model's lock files go too: its download's (taken and released, which deletes the file, unless a pull
        // holds it now), and its own when this guard is dropped; then the store's folders if nothing else is in them.
        if let Some(download) = download {
            drop(self.lock(&download));
        }
        drop(_lock);
        for dir in [self.root.join("locks"), staging_root] {
            let _ = fs::remove_dir(dir);
        }
        Ok(dir)
    }

    /// Removes what a killed install or removal of `name` left in `staging_root`: its conversion folders
    /// (`NAME.PID.N`), trash (`.rm.NAME.N`), write probes (`.probe.NAME.N`) and a replaced model moved aside (`.old.NAME.N`), which goes back to
    /// `models/NAME` if the kill came before the new model was put there. The caller holds `name`'s lock, so no
    /// live process owns any of them.
    fn clean_after_killed(&self, staging_root: &Path, name: &str) {
        let Ok(entries) = fs::read_dir(staging_root) else {
            return;
        };
        let target = self.models_dir().join(name);
        for e in entries.flatten() {
            let Some(file_name) = e.file_name().to_str().map(String::from) else {
                continue;
            };
            let path = e.path();
            if let Some(rest) = file_name.strip_prefix(".old.")
                && strip_numbers(rest, 1) == Some(name)
            {
                if !target.exists() && fs::rename(&path, &target).is_ok() {
                    continue;
                }
                let _ = fs::remove_dir_all(&path);
            } else if [".rm.", ".probe."].iter().any(|prefix| {
                file_name
                    .strip_prefix(prefix)
                    .is_some_and(|rest| strip_numbers(rest, 1) == Some(name))
            }) || strip_numbers(&file_name, 2) == Some(name)
            {
                remove_any(&path);
            }
        }
    }

    /// An exclusive lock on `what` (a download or an install) held until the guard is dropped; the OS releases it
    /// if the process dies, so a crash leaves no stale lock. The guard deletes the lock file while still holding
    /// it; the file a killed process left is taken over by the next one and deleted in turn.
    pub fn lock(&self, what: &str) -> Result<StoreLock, StoreError> {
        let dir = self.root.join("locks");
        self.create_dir(&dir)?;
        let file_name: String = what
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(file_name);
        loop {
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(StoreError::io(&path, "create the lock file"))?;
            match file.try_lock() {
                // The holder that just released it may have deleted the file after this one opened it: then this
                // lock guards nothing, and the path is opened again.
                Ok(()) if !same_file(&file, &path) => continue,
                Ok(()) => return Ok(StoreLock { file, path }),
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::Busy {
                        what: what.to_string(),
                        lock: path,
                    });
                }
                Err(fs::TryLockError::Error(e)) => return Err(StoreError::io(&path, "lock")(e)),
            }
        }
    }
}

/// A lock taken by [`Store::lock`]; its file is deleted when the guard is dropped.
#[derive(Debug)]
pub struct StoreLock {
    file: fs::File,
    path: PathBuf,
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        // Deleted while held, then released by closing: a process waiting on the old file sees that the path no
        // longer names it (`same_file`) and starts over.
        if cfg!(unix) {
            let _ = fs::remove_file(&self.path);
        }
        let _ = self.file.unlock();
    }
}

/// Whether `path` still names the open `file`.
#[cfg(unix)]
fn same_file(file: &fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &fs::File, _path: &Path) -> bool {
    true
}

/// `text` without its last `n` dot-separated all-digit parts (`name.123.456` with 2: `name`), if it has them.
fn strip_numbers(text: &str, n: usize) -> Option<&str> {
    let mut rest = text;
    for _ in 0..n {
        let (head, tail) = rest.rsplit_once('.')?;
        if tail.is_empty() || !tail.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        rest = head;
    }
    Some(rest)
}

/// Model names are folder names: letters, digits, `.`, `-`, `_`, not starting with a dot.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let bad = |problem| {
        Err(StoreError::BadName {
            name: name.to_string(),
            problem,
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("it must have 1 to 128 characters");
    }
    if name.starts_with('.') {
        return bad("it must not start with a dot");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return bad("use only letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

/// A MODEL argument as the user typed it, to a GGUF file: an existing path, an installed model's name or repo id;
/// a registry name or repo id that is not installed yet gets an error saying which `quarry pull` to run.
pub fn resolve_model(
    arg: &Path,
    store: Option<&Store>,
    registry: &Registry,
) -> Result<PathBuf, ResolveError> {
    if arg.is_file() {
        return Ok(arg.to_path_buf());
    }
    if arg.is_dir() {
        if arg.join("config.json").is_file() {
            return Err(ResolveError::SnapshotFolder {
                path: arg.to_path_buf(),
            });
        }
        return Err(ResolveError::Unknown {
            arg: arg.display().to_string(),
        });
    }
    let Some(text) = arg.to_str() else {
        return Err(ResolveError::MissingFile {
            path: arg.to_path_buf(),
        });
    };
    if let Some(store) = store
        && let Some(model) = store.find(text)?
    {
        return Ok(model.gguf());
    }
    if registry.find(text).is_some() {
        return Err(ResolveError::NotPulled {
            name: text.to_string(),
        });
    }
    let looks_like_path = text.ends_with(".gguf")
        || text.starts_with('.')
        || text.starts_with('/')
        || text.starts_with('~')
        || text.contains('\\');
    if !looks_like_path && crate::hub::http::RepoRef::parse(text).is_some() {
        return Err(ResolveError::RepoNotPulled {
            repo: text.to_string(),
        });
    }
    if looks_like_path || text.contains('/') {
        return Err(ResolveError::MissingFile {
            path: arg.to_path_buf(),
        });
    }
    Err(ResolveError::Unknown {
        arg: text.to_string(),
    })
}

/// A folder removed when dropped unless [`TempDir::keep`] is called: what a failed or interrupted install leaves.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn new(path: PathBuf) -> Result<TempDir, StoreError> {
        fs::create_dir_all(&path).map_err(StoreError::io(&path, "create the folder"))?;
        Ok(TempDir { path, keep: false })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn unique_suffix() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// Removes what killed conversions left in `dir`.
fn remove_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a > STALE_STAGING) {
            remove_any(&e.path());
        }
    }
}

/// Removes a folder with its contents, or a file.
fn remove_any(path: &Path) {
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        let _ = fs::remove_dir_all(path);
    } else {
        let _ = fs::remove_file(path);
    }
}

/// Writes `path` and syncs it to disk, so that a later rename cannot publish an empty file after a crash.
pub(crate) fn write_synced(
    path: &Path,
    write: impl FnOnce(&mut io::BufWriter<fs::File>) -> io::Result<()>,
) -> io::Result<()> {
    let mut out = io::BufWriter::new(fs::File::create(path)?);
    write(&mut out)?;
    out.flush()?;
    out.get_ref().sync_all()
}

/// Makes renames inside `dir` durable where the platform allows it.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("granite-3.0-1b-a400m-instruct").is_ok());
        assert!(validate_name("my_model.v2").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", "../x", "ü"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn leftover_names() {
        assert_eq!(strip_numbers("a.b.12.34", 2), Some("a.b"));
        assert_eq!(strip_numbers("a.b.12.34", 1), Some("a.b.12"));
        assert_eq!(strip_numbers("a.b.12", 2), None);
        assert_eq!(strip_numbers("a.x1.2", 2), None);
        assert_eq!(strip_numbers("a..2", 2), None);
    }

    #[test]
    fn download_dirs_are_one_level_and_distinct() {
        let s = Store::at("/s");
        let a = s.download_dir("ibm-granite/granite-3.0-2b-instruct", "main");
        assert_eq!(
            a,
            Path::new("/s/downloads/ibm-granite--granite-3.0-2b-instruct@main")
        );
        let b = s.download_dir("../../etc", "x/../y");
        assert_eq!(b.parent(), Some(Path::new("/s/downloads")));
    }

    #[test]
    fn resolution_of_names_that_are_not_installed() {
        let registry = Registry::builtin();
        let store = Store::at(std::env::temp_dir().join("quarry-store-test-empty"));
        let r = |a: &str| resolve_model(Path::new(a), Some(&store), &registry).unwrap_err();
        assert!(matches!(
            r("granite-3.0-1b-a400m-instruct"),
            ResolveError::NotPulled { .. }
        ));
        assert!(
            r("granite-3.0-1b-a400m-instruct")
                .to_string()
                .contains("quarry pull granite-3.0-1b-a400m-instruct")
        );
        assert!(matches!(
            r("some-org/some-model"),
            ResolveError::RepoNotPulled { .. }
        ));
        assert!(matches!(r("nope.gguf"), ResolveError::MissingFile { .. }));
        assert!(matches!(r("./x/y"), ResolveError::MissingFile { .. }));
        assert!(matches!(r("nothing"), ResolveError::Unknown { .. }));
    }
}
