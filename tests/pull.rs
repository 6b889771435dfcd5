//! `quarry pull` against a local stand-in for the Hugging Face endpoints (tests/pull_server): a clean pull, a
//! download cut off half way (resumed in the same run, and in the next run), a server that stalls mid-body (retried
//! after the read timeout and resumed; or failing on every attempt), a corrupted file, a registry checksum mismatch,
//! HTTP 404, a refused connection; after every failure nothing half-written is installed.

mod pull_server;
mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use pull_server::{COMMIT, Fault, STALL_LIMIT, Server, refused_url};
use support::{files_under, fixture_dir, hub_command, temp_dir};

const REPO: &str = "example-org/tiny-moe";

fn fixture() -> PathBuf {
    fixture_dir("granitemoe-dev-1").expect("committed fixture")
}

/// Runs quarry with its store in `home` and the Hub at `endpoint`.
fn quarry(home: &Path, endpoint: &str, args: &[&str]) -> Output {
    quarry_with(home, endpoint, None, args)
}

fn quarry_with(home: &Path, endpoint: &str, token: Option<&str>, args: &[&str]) -> Output {
    quarry_env(home, endpoint, token, &[], args)
}

fn quarry_env(
    home: &Path,
    endpoint: &str,
    token: Option<&str>,
    env: &[(&str, &str)],
    args: &[&str],
) -> Output {
    let mut cmd = hub_command(home, endpoint, args);
    if let Some(t) = token {
        cmd.env("HF_TOKEN", t);
    }
    cmd.env_remove("QUARRY_PULL_READ_TIMEOUT_SECS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("quarry runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "quarry failed: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A clean failure: exit 1 (not a panic's 101, not a signal), an error naming every needle.
fn fails(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected a clean failure: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "error does not mention {n:?}: {err}");
    }
    err
}

/// Nothing installed, and no conversion left behind.
fn nothing_installed(home: &Path) {
    assert!(
        files_under(&home.join("models")).is_empty(),
        "models/ holds {:?}",
        files_under(&home.join("models"))
    );
    assert!(
        files_under(&home.join("staging")).is_empty(),
        "staging/ holds {:?}",
        files_under(&home.join("staging"))
    );
}

fn manifest(home: &Path, name: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(home.join("models").join(name).join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn pull_verifies_converts_and_installs_a_repo_that_then_runs_by_name() {
    let server = Server::start(&fixture(), REPO);
    let home = temp_dir("pull-ok");
    let out = ok(quarry_with(
        &home,
        &server.url,
        Some("hf_secret"),
        &["pull", REPO, "--type", "q8_0"],
    ));
    assert!(out.contains("installed tiny-moe"), "{out}");

    let m = manifest(&home, "tiny-moe");
    assert_eq!(m["repo"], REPO);
    assert_eq!(m["revision"], "main");
    assert_eq!(m["commit"], COMMIT);
    assert_eq!(m["type"], "q8_0");
    assert_eq!(m["architecture"], "granitemoe");
    let files: Vec<&str> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(files.contains(&"model.safetensors") && files.contains(&"tokenizer.json"));
    assert!(
        !files
            .iter()
            .any(|f| f.ends_with(".npy") || *f == "reference.json"),
        "only what a conversion reads is downloaded: {files:?}"
    );
    let config = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "config.json")
        .unwrap();
    assert_eq!(config["sha256"], server.sha256("config.json"));
    let gguf = home.join("models/tiny-moe/model.gguf");
    assert_eq!(
        std::fs::metadata(&gguf).unwrap().len(),
        m["size"].as_u64().unwrap()
    );
    assert!(
        !home
            .join("downloads")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "the downloaded snapshot is removed once converted"
    );

    // The token goes to the endpoint with every request; nothing is fetched twice.
    let log = server.log();
    assert!(!log.is_empty());
    assert!(
        log.iter()
            .all(|l| l.authorization.as_deref() == Some("Bearer hf_secret")),
        "{log:?}"
    );
    assert_eq!(server.gets_of("model.safetensors").len(), 1);

    // The installed model runs by its name and by its repo id, and `list` shows it.
    for name in ["tiny-moe", REPO] {
        let text = ok(quarry(
            &home,
            &server.url,
            &[
                "run",
                name,
                "--raw",
                "--prompt",
                "Hello",
                "-n",
                "4",
                "--temperature",
                "0",
            ],
        ));
        assert!(!text.trim().is_empty());
    }
    let list = ok(quarry(&home, &server.url, &["list"]));
    assert!(
        list.contains("tiny-moe") && list.contains("q8_0") && list.contains("just now"),
        "{list}"
    );
    let available = ok(quarry(&home, &server.url, &["list", "--available"]));
    assert!(
        available.contains("granite-3.0-1b-a400m-instruct"),
        "{available}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(quarry(
        &home,
        &server.url,
        &["list", "--format", "json"],
    )))
    .unwrap();
    assert_eq!(json["installed"][0]["name"], "tiny-moe");
    assert_eq!(json["default"], "granite-3.0-1b-a400m-instruct");

    // Pulling again is refused before any download, naming --force; with it, the installed model is replaced
    // (here with another type) in one step.
    fails(
        &quarry(&home, &server.url, &["pull", REPO, "--type", "q4_0"]),
        &["'tiny-moe' is already installed", "--force"],
    );
    assert_eq!(manifest(&home, "tiny-moe")["type"], "q8_0");
    ok(quarry(
        &home,
        &server.url,
        &["pull", REPO, "--type", "q4_0", "--force"],
    ));
    assert_eq!(manifest(&home, "tiny-moe")["type"], "q4_0");
    assert_eq!(files_under(&home.join("models")).len(), 2);

    // A lock file a killed pull left behind goes with the model.
    let lock_name: String = format!("download {REPO}@main")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    std::fs::create_dir_all(home.join("locks")).unwrap();
    std::fs::write(home.join("locks").join(&lock_name), b"").unwrap();
    ok(quarry(&home, &server.url, &["rm", "tiny-moe"]));
    nothing_installed(&home);
    assert!(
        !home.join("locks").exists(),
        "rm left lock files: {:?}",
        files_under(&home.join("locks"))
    );
    let gone = quarry(&home, &server.url, &["run", "tiny-moe", "--prompt", "Hi"]);
    fails(&gone, &["tiny-moe", "quarry list"]);
    let gone = quarry(&home, &server.url, &["run", REPO, "--prompt", "Hi"]);
    fails(&gone, &[&format!("quarry pull {REPO}")]);
    fails(
        &quarry(&home, &server.url, &["rm", "tiny-moe"]),
        &["no installed model"],
    );
}

#[test]
fn a_download_cut_off_half_way_resumes_instead_of_restarting() {
    let server = Server::start(&fixture(), REPO);
    let size = server.file_len("model.safetensors");
    let half = size / 2;
    server.fault("model.safetensors", Fault::CutAt { at: half, times: 1 });
    let home = temp_dir("pull-resume");
    let out = quarry(&home, &server.url, &["pull", REPO, "--type", "q8_0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));

    let gets = server.gets_of("model.safetensors");
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range, None);
    assert_eq!(gets[0].sent, half);
    assert_eq!(
        gets[1].range.as_deref(),
        Some(format!("bytes={half}-").as_str()),
        "the second request asks only for the rest"
    );
    assert_eq!(gets[0].sent + gets[1].sent, size, "no byte is sent twice");
    assert!(home.join("models/tiny-moe/model.gguf").is_file());
}

#[test]
fn an_interrupted_pull_keeps_its_partial_file_and_the_next_pull_resumes_it() {
    let server = Server::start(&fixture(), REPO);
    let size = server.file_len("model.safetensors");
    let half = size / 2;
    // Every attempt stops at the same byte: this run cannot finish.
    server.fault(
        "model.safetensors",
        Fault::CutAt {
            at: half,
            times: 1000,
        },
    );
    let home = temp_dir("pull-interrupted");
    let out = quarry(&home, &server.url, &["pull", REPO]);
    fails(
        &out,
        &[
            "model.safetensors",
            &server.url,
            "run the same command again to resume",
        ],
    );
    nothing_installed(&home);
    let kept: Vec<String> = files_under(&home.join("downloads"))
        .into_iter()
        .filter(|f| f.ends_with(".partial"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let partial = home.join("downloads").join(&kept[0]);
    assert_eq!(std::fs::metadata(&partial).unwrap().len() as usize, half);

    server.clear_faults();
    server.clear_log();
    ok(quarry(&home, &server.url, &["pull", REPO]));
    let gets = server.gets_of("model.safetensors");
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(
        gets[0].range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    assert_eq!(gets[0].sent, size - half);
    // Files completed in the first run are not fetched again.
    assert!(server.gets_of("config.json").is_empty());
    assert!(home.join("models/tiny-moe/model.gguf").is_file());
    assert!(!partial.exists());
}

#[test]
fn a_corrupted_file_is_rejected_by_its_checksum_and_nothing_is_installed() {
    let server = Server::start(&fixture(), REPO);
    server.fault("model.safetensors", Fault::Corrupt);
    let home = temp_dir("pull-corrupt");
    let out = quarry(&home, &server.url, &["pull", REPO]);
    fails(
        &out,
        &[
            "corrupt",
            "sha256",
            &format!("{}/{REPO}/resolve/main/model.safetensors", server.url),
            "nothing was installed",
        ],
    );
    nothing_installed(&home);
    assert!(
        !files_under(&home.join("downloads"))
            .iter()
            .any(|f| f.contains("model.safetensors")),
        "the corrupt download is deleted: {:?}",
        files_under(&home.join("downloads"))
    );
}

#[test]
fn registry_checksums_are_enforced() {
    // The stand-in serves the tiny fixture under the real 1B model's repo: its config.json is not the file whose
    // sha256 models.toml records, so the pull must refuse it before converting anything.
    let server = Server::start(&fixture(), "ibm-granite/granite-3.0-1b-a400m-instruct");
    let home = temp_dir("pull-registry");
    let out = quarry(
        &home,
        &server.url,
        &["pull", "granite-3.0-1b-a400m-instruct"],
    );
    fails(&out, &["config.json", "corrupt", "models.toml"]);
    nothing_installed(&home);
    assert!(
        server.gets_of("model.safetensors").is_empty(),
        "no weights are fetched after a bad config.json"
    );
}

#[test]
fn http_404_gives_a_clear_error() {
    let server = Server::start(&fixture(), REPO);
    let home = temp_dir("pull-404");
    let out = quarry(&home, &server.url, &["pull", "nobody/nothing"]);
    fails(
        &out,
        &["404", "nobody/nothing", &server.url, "check the name"],
    );
    nothing_installed(&home);
    assert!(files_under(&home.join("downloads")).is_empty());

    let out = quarry(&home, &server.url, &["pull", "not-a-model"]);
    fails(&out, &["not-a-model", "registry", "org/name"]);
}

#[test]
fn a_refused_connection_points_to_import() {
    let home = temp_dir("pull-refused");
    let url = refused_url();
    let out = quarry(&home, &url, &["pull", REPO]);
    fails(&out, &["cannot reach", &url, "quarry import"]);
    nothing_installed(&home);
}

/// The server's log of `file`'s GETs once it holds `n` of them (a stalled request is logged when the client has
/// dropped it, which the server notices a moment later).
fn wait_for_gets(server: &Server, file: &str, n: usize) -> Vec<pull_server::Logged> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let gets = server.gets_of(file);
        if gets.len() >= n || Instant::now() > deadline {
            return gets;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The read timeout the stall tests give quarry (the default is 60 s).
const STALL_TIMEOUT: (&str, &str) = ("QUARRY_PULL_READ_TIMEOUT_SECS", "1");

#[test]
fn a_server_that_stalls_mid_body_is_retried_after_the_read_timeout_and_resumed() {
    let server = Server::start(&fixture(), REPO);
    let size = server.file_len("model.safetensors");
    let third = size / 3;
    server.fault(
        "model.safetensors",
        Fault::StallAt {
            at: third,
            times: 1,
        },
    );
    let home = temp_dir("pull-stall");
    let started = Instant::now();
    let out = quarry_env(
        &home,
        &server.url,
        None,
        &[STALL_TIMEOUT],
        &["pull", REPO, "--type", "q8_0"],
    );
    let took = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "model.safetensors: the server stopped sending data (1 s without a byte) after {third} bytes; retrying"
        )),
        "the stall is named, with the retry: {err}"
    );
    // Given up after the 1 s timeout, not after the server's own limit.
    assert!(took < STALL_LIMIT / 2, "took {took:?}");

    let gets = wait_for_gets(&server, "model.safetensors", 2);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range, None);
    assert_eq!(gets[0].sent, third);
    assert_eq!(
        gets[1].range.as_deref(),
        Some(format!("bytes={third}-").as_str()),
        "the retry asks only for the rest"
    );
    assert_eq!(gets[1].sent, size - third);
    let m = manifest(&home, "tiny-moe");
    let weights = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "model.safetensors")
        .unwrap();
    assert_eq!(weights["sha256"], server.sha256("model.safetensors"));
    assert!(home.join("models/tiny-moe/model.gguf").is_file());
    ok(quarry(&home, &server.url, &["info", "tiny-moe"]));
}

#[test]
fn a_server_that_stalls_on_every_attempt_fails_clearly_and_installs_nothing() {
    let server = Server::start(&fixture(), REPO);
    let size = server.file_len("model.safetensors");
    let half = size / 2;
    server.fault(
        "model.safetensors",
        Fault::StallAt {
            at: half,
            times: 1000,
        },
    );
    let home = temp_dir("pull-stall-always");
    let out = quarry_env(&home, &server.url, None, &[STALL_TIMEOUT], &["pull", REPO]);
    let err = fails(
        &out,
        &[
            &format!("{}/{REPO}/resolve/main/model.safetensors", server.url),
            "the server stopped sending data (1 s without a byte) on each of 4 attempts",
            &format!("{half} bytes are kept"),
            "run the same command again to resume",
            "QUARRY_PULL_READ_TIMEOUT_SECS",
        ],
    );
    assert_eq!(err.matches("; retrying").count(), 3, "{err}");
    nothing_installed(&home);
    let list = ok(quarry(&home, &server.url, &["list", "--format", "json"]));
    let json: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(json["installed"], serde_json::json!([]), "{list}");
    let gets = wait_for_gets(&server, "model.safetensors", 4);
    assert_eq!(gets.len(), 4, "{gets:?}");
    for g in &gets[1..] {
        assert_eq!(g.range.as_deref(), Some(format!("bytes={half}-").as_str()));
        assert_eq!(g.sent, 0);
    }

    // A bad setting is refused by name rather than ignored.
    let out = quarry_env(
        &home,
        &server.url,
        None,
        &[("QUARRY_PULL_READ_TIMEOUT_SECS", "soon")],
        &["pull", REPO],
    );
    fails(
        &out,
        &[
            "QUARRY_PULL_READ_TIMEOUT_SECS=\"soon\"",
            "positive number of seconds",
        ],
    );
}

/// A repo that keeps its chat template in `chat_template.jinja` (as newer transformers save it): the file is
/// downloaded and recorded with the others, and a template that does not compile is refused before conversion,
/// naming the file, with nothing installed.
#[test]
fn chat_template_jinja_is_pulled_and_a_broken_one_is_refused() {
    let copy = |template: &str| {
        let dir = temp_dir("pull-jinja-src").join("repo");
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(fixture()).unwrap().flatten() {
            if e.path().is_file() {
                std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
            }
        }
        std::fs::write(dir.join("chat_template.jinja"), template).unwrap();
        dir
    };
    let broken = Server::start(&copy("{% for m in messages %}{{ m.content }"), REPO);
    let home = temp_dir("pull-jinja");
    let out = quarry(&home, &broken.url, &["pull", REPO]);
    fails(&out, &["chat_template.jinja", "does not compile"]);
    nothing_installed(&home);
    drop(broken);

    let good = Server::start(
        &copy("{% for m in messages %}{{ m.content }}{% endfor %}"),
        REPO,
    );
    let home = temp_dir("pull-jinja-ok");
    ok(quarry(&home, &good.url, &["pull", REPO]));
    let m = manifest(&home, "tiny-moe");
    let jinja = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "chat_template.jinja")
        .unwrap_or_else(|| panic!("chat_template.jinja is not among the pulled files: {m}"));
    assert_eq!(jinja["sha256"], good.sha256("chat_template.jinja"));
}
