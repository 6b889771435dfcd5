//! The command line as a new user meets it: `run` as `ollama run` takes its prompt (words, piped stdin, Ctrl-C),
//! `-n 0` refused alike everywhere, and the small things (plurals, refusals before any output, `--help` texts,
//! error messages) that read as care or as carelessness.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{fixture_dir, gguf, temp_dir};

fn model() -> PathBuf {
    gguf(
        "granitemoe-dev-1",
        &fixture_dir("granitemoe-dev-1").unwrap(),
        "q8_0",
    )
}

/// `quarry ARGS` with its store in a fresh folder and stdin from `stdin` (none: /dev/null).
fn quarry_in(home: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quarry"))
        .args(args)
        .env("QUARRY_HOME", home)
        .env_remove("QUARRY_KERNEL")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("quarry starts");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn quarry(args: &[&str]) -> Output {
    quarry_in(&temp_dir("cli"), args, None)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

const GREEDY: [&str; 6] = ["--temperature", "0", "-n", "6", "--format", "json"];

#[test]
fn run_takes_the_prompt_as_words_after_the_model() {
    let m = model();
    let m = m.to_str().unwrap();
    let words = json_of(&quarry(
        &[&["run", m, "Hello", "there"], &GREEDY[..]].concat(),
    ));
    let option = json_of(&quarry(
        &[&["run", m, "--prompt", "Hello there"], &GREEDY[..]].concat(),
    ));
    assert_eq!(words["prompt_ids"], option["prompt_ids"]);
    assert_eq!(words["generated_ids"], option["generated_ids"]);
    // Both forms at once is a mistake, named.
    let both = quarry(&["run", m, "Hello", "--prompt", "there"]);
    assert_eq!(both.status.code(), Some(2));
    assert!(stderr(&both).contains("--prompt"), "{}", stderr(&both));
}

#[test]
fn piped_stdin_comes_first_then_the_words() {
    let m = model();
    let m = m.to_str().unwrap();
    let home = temp_dir("cli-piped");
    let joined = json_of(&quarry_in(
        &home,
        &[&["run", m, "Summarise", "this."], &GREEDY[..]].concat(),
        Some("The quarry is deep.\n"),
    ));
    let expected = json_of(&quarry(
        &[
            &[
                "run",
                m,
                "--prompt",
                "The quarry is deep.\n\nSummarise this.",
            ],
            &GREEDY[..],
        ]
        .concat(),
    ));
    assert_eq!(joined["prompt_ids"], expected["prompt_ids"]);
    // Piped alone, it is the whole prompt; --prompt leaves stdin unread.
    let piped = json_of(&quarry_in(
        &home,
        &[&["run", m], &GREEDY[..]].concat(),
        Some("Hi\n"),
    ));
    let flag = json_of(&quarry_in(
        &home,
        &[&["run", m, "--prompt", "Hi"], &GREEDY[..]].concat(),
        Some("ignored"),
    ));
    assert_eq!(piped["prompt_ids"], flag["prompt_ids"]);
    let empty = quarry_in(&home, &["run", m], Some(""));
    assert_eq!(empty.status.code(), Some(1));
    assert!(
        stderr(&empty).contains("stdin was empty"),
        "{}",
        stderr(&empty)
    );
}

#[test]
fn zero_max_tokens_is_refused_the_same_way_everywhere() {
    let m = model();
    let m = m.to_str().unwrap();
    for args in [
        vec!["run", m, "hi", "-n", "0"],
        vec!["run", m, "--prompt", "hi", "--max-tokens", "0"],
        vec!["chat", m, "-n", "0"],
    ] {
        let out = quarry(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            stderr(&out).contains("0 would generate nothing; leave -n out for no limit"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// Runs `quarry ARGS`, sends it SIGINT once `ready` holds for what it printed to stdout (or after `delay`), and
/// returns its output.
fn interrupted(args: &[&str], env: &[(&str, &str)], ready: impl Fn(&[u8]) -> bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quarry"));
    cmd.args(args)
        .env("QUARRY_HOME", temp_dir("cli-int"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            let _ = tx.send(all.clone());
        }
        all
    });
    let start = Instant::now();
    let mut seen = Vec::new();
    while !ready(&seen) {
        if let Ok(s) = rx.recv_timeout(Duration::from_millis(20)) {
            seen = s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never ready");
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut err = Vec::new();
    child.stderr.take().unwrap().read_to_end(&mut err).unwrap();
    let status = child.wait().unwrap();
    Output {
        status,
        stdout: reader.join().unwrap(),
        stderr: err,
    }
}

#[test]
fn ctrl_c_while_run_reads_the_prompt_still_prints_the_json_and_the_speed() {
    // 2-token chunks with a pause after each (a test-only setting) make the prompt last seconds.
    let m = model();
    let start = Instant::now();
    let out = interrupted(
        &[
            "run",
            m.to_str().unwrap(),
            &"word ".repeat(60),
            "-b",
            "2",
            "--format",
            "json",
            "-v",
        ],
        &[("QUARRY_TEST_SLOW_PROMPT_MS", "50")],
        |_| start.elapsed() > Duration::from_millis(700),
    );
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("the JSON object");
    assert_eq!(v["stop_reason"], "interrupted");
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 0);
    let err = stderr(&out);
    assert!(
        err.contains("interrupted while processing the prompt"),
        "{err}"
    );
    assert!(
        err.contains("prompt: ") && err.contains("generation: 0 tokens"),
        "{err}"
    );
}

#[test]
fn ctrl_c_while_run_generates_prints_what_was_generated() {
    // A reply still streaming when Ctrl-C arrives needs a model that does not stop early: the real-vocabulary
    // fixture writes 4000 tokens (about two seconds) without an end-of-text token.
    let Some(dir) = fixture_dir("granitemoe-realvocab-dev") else {
        return;
    };
    let m = gguf("granitemoe-realvocab-dev", &dir, "q8_0");
    let out = interrupted(
        &[
            "run",
            m.to_str().unwrap(),
            "Tell me a long story.",
            "--temperature",
            "0",
            "-n",
            "4000",
            "-v",
        ],
        &[],
        |seen| seen.len() > 80,
    );
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.len() > 80, "{text}");
    let err = stderr(&out);
    assert!(err.contains("(interrupted)"), "{err}");
    let generated: usize = err
        .split("generation: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no speed line in {err}"));
    assert!(generated > 0 && generated < 4000, "{err}");
}

#[test]
fn counts_agree_with_their_nouns() {
    let m = model();
    let out = quarry(&[
        "run",
        m.to_str().unwrap(),
        "hi",
        "-n",
        "1",
        "-v",
        "--temperature",
        "0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("generation: 1 token,"),
        "{}",
        stderr(&out)
    );
    // One tensor of a type is "1 tensor" in `info`.
    let info = stdout(&quarry(&["info", m.to_str().unwrap()]));
    for line in info.lines().filter(|l| l.contains(" tensor")) {
        let n: Option<usize> = line.split_whitespace().nth(1).and_then(|n| n.parse().ok());
        if n == Some(1) {
            assert!(
                line.contains(" tensor ") && !line.contains("tensors"),
                "{line}"
            );
        } else if n.is_some() {
            assert!(line.contains(" tensors"), "{line}");
        }
    }
}

#[test]
fn bench_refuses_nothing_to_measure_before_printing_anything() {
    let m = model();
    let m = m.to_str().unwrap();
    for (args, says) in [
        (vec!["bench", m, "-p", "0", "-n", "0"], "nothing to measure"),
        (vec!["bench", m, "-t", "0"], "0 threads is outside"),
        (
            vec!["bench", m, "-p", "0", "-n", "0", "-o", "json"],
            "nothing to measure",
        ),
    ] {
        let out = quarry(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?} printed {}", stdout(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn an_unknown_kernel_set_is_named_as_such() {
    let m = model();
    let out = Command::new(env!("CARGO_BIN_EXE_quarry"))
        .args(["info", m.to_str().unwrap()])
        .env("QUARRY_KERNEL", "bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(
        err.contains("QUARRY_KERNEL=bogus is not a kernel set")
            && err.contains("scalar, portable, avx2, avxvnni, avx512vnni"),
        "{err}"
    );
}

#[test]
fn help_texts_are_complete() {
    let help = |args: &[&str]| stdout(&quarry(&[args, &["--help"][..]].concat()));
    let top = help(&[]);
    let commands: Vec<&str> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .filter_map(|l| l.strip_prefix("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(commands.first(), Some(&"chat"), "{top}");

    let rm = help(&["rm"]);
    assert!(rm.contains("repo id"), "{rm}");
    let info = help(&["info"]);
    assert!(
        info.contains("--format") && info.contains("json: one object"),
        "{info}"
    );
    for cmd in [
        "run",
        "info",
        "bench",
        "tokenize",
        "perplexity",
        "logits",
        "chat",
        "batch",
    ] {
        let text = help(&[cmd]);
        assert!(
            text.contains("org/name"),
            "`{cmd} --help` does not say MODEL may be a repo id: {text}"
        );
    }
    for cmd in ["import", "pull"] {
        let text = help(&[cmd]);
        assert!(
            text.contains("q4_k_m") && text.contains("q6_k"),
            "{cmd}: {text}"
        );
    }
    let synth = help(&["synth"]);
    assert!(synth.contains("q6_k in a k-quant mix"), "{synth}");
    let run = help(&["run"]);
    assert!(run.contains("[PROMPT]..."), "{run}");
}

#[test]
fn a_repo_id_not_installed_offers_import_as_a_registry_name_does() {
    let m = model();
    let _ = m;
    for what in [
        "ibm-granite/granite-3.0-1b-a400m-instruct",
        "granite-3.0-1b-a400m-instruct",
        "someorg/some-model",
    ] {
        let out = quarry(&["info", what]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("quarry pull {what}")) && err.contains("quarry import DIR"),
            "{what}: {err}"
        );
    }
}

#[test]
fn a_quoted_cause_is_printed_once() {
    let dir = temp_dir("cli-bad-json").join("snapshot");
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = fixture_dir("granitemoe-dev-1").unwrap();
    for e in std::fs::read_dir(&fixture).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    std::fs::write(dir.join("config.json"), "{ nope").unwrap();
    let out = quarry(&[
        "quantize",
        dir.to_str().unwrap(),
        "-o",
        dir.join("x.gguf").to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("line 1 column 3").count(), 1, "{err}");
    // And an OS error quoted at the end of a message.
    let out = quarry(&["tokenize", "/no/such/model.gguf", "--text", "x"]);
    let err = stderr(&out);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn a_closed_pipe_ends_quietly() {
    // `quarry show MODEL | head -1`: the reader goes away before the output is written.
    let m = model();
    for args in [
        vec!["show", m.to_str().unwrap()],
        vec!["list", "--available"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_quarry"))
            .args(&args)
            .env("QUARRY_HOME", temp_dir("cli-pipe"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            matches!(out.status.code(), Some(0 | 141)),
            "{args:?}: {:?} {err}",
            out.status
        );
    }
}
