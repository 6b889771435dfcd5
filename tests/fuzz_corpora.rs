//! Every input committed under `fuzz/corpus/TARGET/` (the seeds and what fuzzing kept) and
//! `fuzz/regressions/TARGET/` (each crash a fuzzer found, kept after its fix) through the same target body
//! `cargo fuzz` runs (`fuzz/harness.rs`), so CI guards them on the stable toolchain. A target whose folders hold
//! no input fails: an empty replay would pass without checking anything.

mod support;

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

/// The committed inputs of `target`, corpus and regressions.
fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files: Vec<PathBuf> = ["corpus", "regressions"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(fuzz.join(kind).join(target)).ok())
        .flatten()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "fuzz/corpus/{target} and fuzz/regressions/{target} hold no input"
    );
    files
}

/// Runs `body` on every input of `target`, naming the input that fails.
fn replay(target: &str, body: impl Fn(&[u8])) {
    // Panics the runtime contains (a dependency's, turned into errors) stay quiet, as in the binary.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(quarry::contain::quiet_hook);
    for path in inputs(target) {
        let data = std::fs::read(&path).unwrap();
        let _watch = Watchdog::start(target, &path);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&data)));
        assert!(
            outcome.is_ok(),
            "fuzz target {target} fails on {}",
            path.display()
        );
    }
}

/// Seconds one input may take. Each runs in well under one; a hang (what the chat-template fuzzer found) would
/// otherwise hold CI until its limit without naming the input.
const INPUT_SECONDS: u64 = 120;

/// Ends the whole test process, naming the input, if it is not dropped within [`INPUT_SECONDS`]: a hung body
/// cannot be stopped from outside its thread.
struct Watchdog {
    _done: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    fn start(target: &str, path: &Path) -> Watchdog {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let what = format!("fuzz target {target} hangs on {}", path.display());
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                wait.recv_timeout(std::time::Duration::from_secs(INPUT_SECONDS))
            {
                eprintln!("{what}: still running after {INPUT_SECONDS} s");
                std::process::exit(101);
            }
        });
        Watchdog { _done: done }
    }
}

#[test]
fn gguf_inputs_replay_cleanly() {
    replay("gguf", harness::gguf);
}

#[test]
fn convert_inputs_replay_cleanly() {
    let scratch = support::temp_dir("fuzz-convert");
    replay("convert", |data| harness::convert(data, &scratch));
}

#[test]
fn chat_template_inputs_replay_cleanly() {
    let shared = support::shared();
    let template = shared.join("granite-3.0-1b-a400m-instruct/tokenizer_config.json");
    if !template.exists() {
        return support::skip::skipped("the chat-template fuzz inputs", &template);
    }
    let real = harness::RealTemplates::load(&shared);
    // As in the binary: a template that is not Granite's own renders in a child process with CPU and memory
    // limits, which is what bounds the inputs fuel cannot (regressions/chat_template/list-doubling-*).
    quarry::text::template_sandbox::isolate_untrusted_templates(
        env!("CARGO_BIN_EXE_quarry").into(),
    );
    replay("chat_template", |data| harness::chat_template(data, &real));
}

#[test]
fn tool_reply_inputs_replay_cleanly() {
    replay("tool_reply", harness::tool_reply);
}

#[test]
fn request_inputs_replay_cleanly() {
    let server = harness::LocalServer::start(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf/dev-2-q8_0.gguf"),
    );
    replay("request", |data| harness::request(data, &server));
}
