//! `quarry chat` driven through a pseudo-terminal, as a person at a terminal drives it: a streamed reply, every
//! slash command, multi-line input, Ctrl-C at the prompt and during a reply, the history file, and a context that
//! overflows. Plus the non-terminal cases: piped input, and a missing model.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_pty::{Child, CommandBuilder, MasterPty, PtySize, native_pty_system};
use support::{fixture_dir, gguf, temp_dir};

/// A chat running in a pseudo-terminal, with everything it wrote.
struct Repl {
    writer: Box<dyn Write + Send>,
    output: Arc<Mutex<Vec<u8>>>,
    child: Box<dyn Child + Send + Sync>,
    _master: Box<dyn MasterPty + Send>,
}

impl Repl {
    fn start(home: &Path, args: &[&str]) -> Repl {
        Repl::start_with(home, args, &[])
    }

    /// [`Repl::start`] with extra environment variables.
    fn start_with(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Repl {
        Repl::start_command(home, &[&["chat"], args].concat(), env)
    }

    /// `quarry ARGS` in the terminal.
    fn start_command(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Repl {
        let pty = native_pty_system();
        let pair = pty
            .openpty(PtySize {
                rows: 50,
                cols: 200,
                pixel_width: 0,
                pixel_height: 0,
            })
            .expect("a pseudo-terminal");
        let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_quarry"));
        cmd.args(args);
        cmd.env("QUARRY_HOME", home);
        cmd.env("HOME", home);
        cmd.env("TERM", "xterm");
        cmd.env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = pair.slave.spawn_command(cmd).expect("quarry starts");
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = reader.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        let writer = pair.master.take_writer().unwrap();
        Repl {
            writer,
            output,
            child,
            _master: pair.master,
        }
    }

    /// Bytes written so far: a mark to read from.
    fn mark(&self) -> usize {
        self.output.lock().unwrap().len()
    }

    /// What was written after `mark`, without terminal escapes and carriage returns.
    fn since(&self, mark: usize) -> String {
        let out = self.output.lock().unwrap();
        strip_escapes(&String::from_utf8_lossy(&out[mark.min(out.len())..]))
    }

    /// Waits until what was written after `mark` satisfies `done`; returns it.
    fn wait(&self, mark: usize, what: &str, done: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let text = self.since(mark);
            if done(&text) {
                return text;
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "timed out waiting for {what}; the terminal shows:\n{}",
                    self.since(0)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn type_text(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
        self.writer.flush().unwrap();
    }

    /// Types a line and Enter; returns the mark from before it.
    fn line(&mut self, text: &str) -> usize {
        let mark = self.mark();
        self.type_text(text);
        self.type_text("\r");
        mark
    }

    /// Sends a line and waits until `needle` follows its echo and the next prompt is up (typing before the prompt
    /// is there would race the line editor).
    fn expect(&mut self, line: &str, needle: &str) -> String {
        let mark = self.line(line);
        let echo = line.lines().last().unwrap_or(line);
        self.wait(mark, needle, |t| {
            t.find(echo)
                .map(|i| &t[i + echo.len()..])
                .and_then(|after| after.find(needle).map(|j| &after[j..]))
                .is_some_and(|rest| rest.contains("\n>>> "))
        })
    }

    /// Sends a message and waits for the next prompt after the reply.
    fn message(&mut self, text: &str) -> String {
        let mark = self.line(text);
        self.wait(mark, "the reply and a new prompt", |t| {
            t.find(text.lines().last().unwrap_or(text))
                .is_some_and(|i| t[i..].contains("\n>>> "))
        })
    }

    fn ctrl_c(&mut self) {
        self.type_text("\x03");
    }

    fn wait_exit(&mut self) -> portable_pty::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                panic!("chat did not exit; it shows:\n{}", self.since(0));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Repl {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
    }
}

/// Removes CSI / OSC escape sequences and carriage returns, which rustyline writes around the input line.
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    for c in chars.by_ref() {
                        if c == '\x07' {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

fn model(name: &str) -> Option<PathBuf> {
    let dir = fixture_dir(name)?;
    Some(gguf(name, &dir, "q8_0"))
}

/// The "N new, M cached" of a speed line.
fn cached_tokens(text: &str) -> usize {
    let i = text.rfind(" cached").expect("a speed line");
    text[..i]
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number before 'cached'")
}

#[test]
fn a_session_with_every_command() {
    let model = model("granitemoe-dev-1").unwrap();
    let home = temp_dir("chat-repl");
    let mut repl = Repl::start(
        &home,
        &[
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "16",
            "--system",
            "You are terse.",
        ],
    );
    repl.wait(0, "the banner and prompt", |t| {
        t.contains("/help for commands") && t.contains(">>> ")
    });

    // A reply streams, then the speed line.
    let first = repl.message("Hello there");
    assert!(first.contains("tok/s"), "{first}");
    let reply = first
        .split("Hello there\n")
        .nth(1)
        .and_then(|r| r.split("\n16 tokens").next())
        .unwrap_or("");
    assert!(!reply.trim().is_empty(), "no reply text in {first:?}");

    let stats = repl.expect("/stats", "session:");
    assert!(stats.contains("last reply: 16 tokens"), "{stats}");
    assert!(
        stats.contains("tok/s") && stats.contains("reused"),
        "{stats}"
    );

    // The second turn reuses the first from the cache.
    let second = repl.message("And then?");
    assert!(cached_tokens(&second) > 10, "{second}");

    assert!(repl.expect("/system", "system:").contains("You are terse."));
    repl.expect("/system Be brief.", "system message set");
    assert!(repl.expect("/system", "system:").contains("Be brief."));

    repl.expect("/set temperature 0.5", "temperature set to 0.5");
    repl.expect("/set top_k 7", "top_k set to 7");
    repl.expect("/set top_p 0.9", "top_p set to 0.9");
    repl.expect("/set min_p 0.1", "min_p set to 0.1");
    repl.expect("/set repeat_penalty 1.1", "repeat_penalty set to 1.1");
    repl.expect("/set seed 5", "seed set to 5");
    repl.expect("/set max_tokens 8", "max_tokens set to 8");
    repl.expect("/set top_p 2", "not changed");
    repl.expect("/set colour red", "unknown setting");
    let all = repl.expect("/set", "verbose on");
    assert!(
        all.contains("temperature 0.5") && all.contains("top_k 7") && all.contains("max_tokens 8"),
        "{all}"
    );

    // Without the speed line.
    repl.expect("/set verbose off", "verbose off");
    let quiet = repl.message("One more");
    assert!(!quiet.contains("tok/s"), "{quiet}");
    repl.expect("/set verbose on", "verbose on");

    let show = repl.expect("/show", "settings:");
    for needle in [
        "model:",
        "granitemoe",
        "context:",
        "system: Be brief.",
        "conversation: 6 messages",
    ] {
        assert!(show.contains(needle), "/show lacks {needle:?}: {show}");
    }

    // Multi-line input: a """ block and a trailing backslash.
    let m = repl.line("\"\"\"");
    repl.wait(m, "a continuation prompt", |t| t.contains("... "));
    let m = repl.line("first line");
    repl.wait(m, "a continuation prompt", |t| t.contains("... "));
    let m = repl.line("second line\"\"\"");
    repl.wait(m, "the reply", |t| t.contains("tok/s"));
    let m = repl.line("top \\");
    repl.wait(m, "a continuation prompt", |t| t.contains("... "));
    let m = repl.line("bottom");
    repl.wait(m, "the reply", |t| t.contains("tok/s"));

    let saved = home.join("conv.json");
    let out = repl.expect(&format!("/save {}", saved.display()), "saved");
    assert!(out.contains("saved 11 messages"), "{out}");
    let conv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    let contents: Vec<&str> = conv["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(contents[0], "Be brief.");
    assert!(
        contents.contains(&"first line\nsecond line"),
        "{contents:?}"
    );
    assert!(contents.contains(&"top \nbottom"), "{contents:?}");

    repl.expect("/clear", "conversation cleared");
    assert!(
        repl.expect("/show", "settings:")
            .contains("conversation: 0 messages")
    );
    repl.expect(&format!("/open {}", saved.display()), "opened 11 messages");
    assert!(
        repl.expect("/show", "settings:")
            .contains("conversation: 10 messages")
    );
    repl.expect("/open /no/such/file.json", "cannot read");
    // /load is ollama's: a model; a saved conversation given to it is pointed to /open.
    repl.expect(&format!("/load {}", saved.display()), "/open");

    repl.expect("/help", "/set KEY VALUE");
    repl.expect("/frobnicate", "unknown command /frobnicate");

    // Ctrl-C at the prompt throws the typed line away and keeps the session.
    let m = repl.mark();
    repl.type_text("this is never sent");
    repl.wait(m, "the typed text", |t| t.contains("never sent"));
    let m = repl.mark();
    repl.ctrl_c();
    repl.wait(m, "a fresh prompt", |t| t.contains(">>> "));
    assert!(
        repl.expect("/show", "settings:")
            .contains("conversation: 10 messages")
    );
    assert!(repl.alive());

    let m = repl.line("/bye");
    assert!(repl.wait_exit().success(), "{}", repl.since(m));

    // The history file holds what was typed, for the next session.
    let history = std::fs::read_to_string(home.join("history.txt")).expect("history.txt written");
    for entry in [
        "Hello there",
        "/stats",
        "/set temperature 0.5",
        "first line\nsecond line",
    ] {
        assert!(
            history.contains(&entry.replace('\n', "\\n")) || history.contains(entry),
            "history lacks {entry:?}: {history}"
        );
    }
    assert!(!history.contains("this is never sent"));

    // A new session offers the previous entries (Up arrow recalls the last one).
    let mut again = Repl::start(&home, &[model.to_str().unwrap(), "--max-tokens", "4"]);
    again.wait(0, "the prompt", |t| t.contains(">>> "));
    let m = again.mark();
    again.type_text("\x1b[A");
    again.wait(m, "the recalled entry", |t| t.contains("/bye"));
    again.type_text("\r");
    assert!(again.wait_exit().success());
}

#[test]
fn ctrl_c_stops_a_streaming_reply_and_the_session_goes_on() {
    // A reply long enough to be still streaming when Ctrl-C arrives needs a model that does not stop early: the
    // real-vocabulary fixture writes 4000 tokens (about two seconds) without an end-of-text token.
    let Some(model) = model("granitemoe-realvocab-dev") else {
        return;
    };
    let home = temp_dir("chat-ctrl-c");
    let mut repl = Repl::start(
        &home,
        &[
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "4000",
        ],
    );
    repl.wait(0, "the prompt", |t| t.contains(">>> "));
    let prompt = "Tell me a long story about granite quarries.";
    let mark = repl.line(prompt);
    repl.wait(mark, "a reply being streamed", |t| {
        t.find(prompt)
            .is_some_and(|i| t.len() > i + prompt.len() + 80)
    });
    repl.ctrl_c();
    let stopped = repl.wait(mark, "the stop", |t| t.contains("(stopped)"));
    assert!(repl.alive(), "Ctrl-C ended the chat: {stopped}");

    let stats = repl.expect("/stats", "session:");
    assert!(stats.contains("stopped with Ctrl-C"), "{stats}");
    let generated: usize = stats
        .split("last reply: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(generated < 4000, "the reply ran to its end: {stats}");

    // The partial reply stays in the conversation and in the cache.
    let next = repl.message("Go on.");
    assert!(cached_tokens(&next) > generated / 2, "{next}");
    assert!(
        repl.expect("/show", "settings:")
            .contains("conversation: 4 messages")
    );
    repl.line("/bye");
    assert!(repl.wait_exit().success());
}

#[test]
fn a_small_context_drops_the_oldest_turns_and_refuses_a_message_that_cannot_fit() {
    let model = model("granitemoe-dev-1").unwrap();
    let home = temp_dir("chat-overflow");
    let mut repl = Repl::start(
        &home,
        &[
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "16",
            "--ctx-size",
            "96",
            "--system",
            "Short.",
        ],
    );
    repl.wait(0, "the prompt", |t| t.contains(">>> "));
    let mut transcript = String::new();
    for i in 0..6 {
        transcript.push_str(&repl.message(&format!("message {i} here")));
    }
    assert!(
        transcript.contains("oldest turn"),
        "no turn was dropped in 96 tokens: {transcript}"
    );
    let long = "word ".repeat(150);
    // (A line this long wraps on the terminal, so its echo is not searched for.)
    let m = repl.line(long.trim());
    let refused = repl.wait(m, "the refusal", |t| {
        t.find("shorten it")
            .is_some_and(|i| t[i..].contains("\n>>> "))
    });
    assert!(refused.contains("--ctx-size"), "{refused}");
    assert!(repl.alive());
    let stats = repl.expect("/stats", "session:");
    assert!(stats.contains("of 96 tokens used"), "{stats}");
    let show = repl.expect("/show", "settings:");
    assert!(show.contains("system: Short."), "{show}");
    repl.line("/bye");
    assert!(repl.wait_exit().success());
}

/// `quarry chat` on the first fixture with `home` as `QUARRY_HOME`, greedy with at most `max_tokens` per reply,
/// reading `input` from a pipe to its end: its standard output, after checking that it exited successfully.
fn piped_chat(home: &std::path::Path, max_tokens: usize, input: &[u8]) -> String {
    let model = model("granitemoe-dev-1").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_quarry"))
        .args([
            "chat",
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            &max_tokens.to_string(),
        ])
        .env("QUARRY_HOME", home)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn piped_input_works_as_a_script() {
    let stdout = piped_chat(&temp_dir("chat-piped"), 8, b"Hello\n/stats\n");
    assert!(stdout.contains("8 tokens"), "{stdout}");
    assert!(stdout.contains("last reply: 8 tokens"), "{stdout}");
}

#[test]
fn a_missing_default_model_names_the_pull_command() {
    let home = temp_dir("chat-missing");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quarry"))
        .arg("chat")
        .env("QUARRY_HOME", &home)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("quarry pull granite-3.0-1b-a400m-instruct"),
        "{err}"
    );
    assert!(err.contains("quarry import"), "{err}");
    // Nothing was downloaded without asking.
    assert!(!home.join("downloads").exists());
}

#[test]
fn ctrl_c_while_a_long_prompt_is_processed_cancels_it_and_keeps_the_session() {
    // The fixture reads a prompt in well under a second; 4-token chunks with a pause after each (a test-only
    // setting) make the long message below take several seconds, as a long paste does on a real model.
    let model = model("granitemoe-dev-1").unwrap();
    let home = temp_dir("chat-cancel-prompt");
    let mut repl = Repl::start_with(
        &home,
        &[
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--batch",
            "4",
        ],
        &[("QUARRY_TEST_SLOW_PROMPT_MS", "50")],
    );
    repl.wait(0, "the prompt", |t| t.contains(">>> "));
    let first = repl.message("Hello there");
    assert!(first.contains("8 tokens"), "{first}");
    let show = repl.expect("/show", "settings:");
    assert!(show.contains("conversation: 2 messages"), "{show}");
    let used = |show: &str| -> usize {
        show.split("tokens (")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no context in {show}"))
    };
    let used_before = used(&show);

    let long = "word ".repeat(120);
    let m = repl.line(long.trim());
    let progress = repl.wait(m, "the progress line", |t| {
        t.contains("processing the prompt: ")
    });
    assert!(progress.contains(" tokens ("), "{progress}");
    repl.ctrl_c();
    let cancelled = repl.wait(m, "the cancellation and a new prompt", |t| {
        t.find("the message was not sent")
            .is_some_and(|i| t[i..].contains("\n>>> "))
    });
    assert!(repl.alive(), "Ctrl-C ended the chat: {cancelled}");
    assert!(
        !cancelled.contains("tok/s"),
        "a reply was written: {cancelled}"
    );

    // The cancelled message is not in the conversation, nor in the context in use; the first turn is, and the
    // chat goes on from it.
    let show = repl.expect("/show", "settings:");
    assert!(show.contains("conversation: 2 messages"), "{show}");
    // (The reply's last token, sampled but not yet fed, is computed with the next prompt: one more.)
    let used_after = used(&show);
    assert!(
        (used_before..=used_before + 1).contains(&used_after),
        "the context in use went from {used_before} to {used_after}: {show}"
    );
    let stats = repl.expect("/stats", "session:");
    assert!(stats.contains("session: 1 reply,"), "{stats}");
    let next = repl.message("And then?");
    assert!(next.contains("8 tokens"), "{next}");
    assert!(
        cached_tokens(&next) > 10,
        "the first turn was not reused: {next}"
    );
    assert!(
        repl.expect("/show", "settings:")
            .contains("conversation: 4 messages")
    );

    // Ctrl-C twice at an empty prompt leaves, and says where the conversation was kept.
    let m = repl.mark();
    repl.ctrl_c();
    repl.wait(m, "the hint", |t| t.contains("Ctrl-C again"));
    repl.ctrl_c();
    assert!(repl.wait_exit().success());
    let kept = home.join("last-chat.json");
    let text = repl.since(m);
    assert!(
        text.contains("4 messages") && text.contains(&format!("/open {}", kept.display())),
        "{text}"
    );
    let conv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&kept).unwrap()).unwrap();
    assert_eq!(conv["messages"].as_array().unwrap().len(), 4);
    assert!(
        !std::fs::read_to_string(&kept)
            .unwrap()
            .contains("word word")
    );
}

#[test]
fn a_message_starting_with_a_slash_is_recalled_as_a_message() {
    let model = model("granitemoe-dev-1").unwrap();
    let home = temp_dir("chat-leading-space");
    let args = [
        model.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        "4",
    ];
    let mut repl = Repl::start(&home, &args);
    repl.wait(0, "the prompt", |t| t.contains(">>> "));
    let sent = repl.message(" /etc/hosts is what?");
    assert!(sent.contains("tok/s"), "not sent as a message: {sent}");
    // Up recalls it; Enter sends it again, as a message, not as an unknown command.
    let m = repl.mark();
    repl.type_text("\x1b[A");
    repl.wait(m, "the recalled entry", |t| {
        t.contains("/etc/hosts is what?")
    });
    repl.type_text("\r");
    let again = repl.wait(m, "the reply", |t| {
        t.contains("tok/s") || t.contains("unknown command")
    });
    assert!(!again.contains("unknown command"), "{again}");
    repl.wait(m, "a new prompt", |t| {
        t.find("tok/s").is_some_and(|i| t[i..].contains(">>> "))
    });
    assert!(
        repl.expect("/show", "settings:")
            .contains("conversation: 4 messages")
    );
    // With no system message, /clear leaves the context empty at once.
    repl.expect("/clear", "context 0/");
    assert!(
        repl.expect("/stats", "session:")
            .contains("context: 0 of 1024 tokens used")
    );
    repl.line("/bye");
    assert!(repl.wait_exit().success());

    // Through the history file, in a new session: Up passes the commands and reaches the message.
    let mut next = Repl::start(&home, &args);
    next.wait(0, "the prompt", |t| t.contains(">>> "));
    for entry in ["/bye", "/stats", "/clear", "/show"] {
        let m = next.mark();
        next.type_text("\x1b[A");
        next.wait(m, entry, |t| t.contains(entry));
    }
    let m = next.mark();
    next.type_text("\x1b[A");
    next.wait(m, "the recalled message", |t| {
        t.contains("/etc/hosts is what?")
    });
    next.type_text("\r");
    let reply = next.wait(m, "the reply", |t| {
        t.contains("tok/s") || t.contains("unknown command")
    });
    assert!(!reply.contains("unknown command"), "{reply}");
    next.wait(m, "a new prompt", |t| {
        t.find("tok/s").is_some_and(|i| t[i..].contains(">>> "))
    });
    next.line("/bye");
    assert!(next.wait_exit().success());
}

#[test]
fn ollama_commands_and_clear_empties_the_context() {
    let model = model("granitemoe-dev-1").unwrap();
    let other = support::gguf(
        "granitemoe-dev-2",
        &fixture_dir("granitemoe-dev-2").unwrap(),
        "q8_0",
    );
    let home = temp_dir("chat-ollama-commands");
    let mut repl = Repl::start(
        &home,
        &[
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "6",
        ],
    );
    repl.wait(0, "the prompt", |t| t.contains(">>> "));
    repl.expect("/set parameter temperature 0.4", "temperature set to 0.4");
    repl.expect("/set parameter num_predict 5", "max_tokens set to 5");
    repl.expect("/set parameter repeat_last_n 16", "repeat_last_n set to 16");
    repl.expect("/set parameter num_ctx 99", "--ctx-size");
    repl.expect("/set system Answer in French.", "system message set");
    assert!(
        repl.expect("/show system", "French")
            .contains("Answer in French.")
    );
    let info = repl.expect("/show info", "settings:");
    assert!(
        info.contains("temperature 0.4") && info.contains("max_tokens 5"),
        "{info}"
    );
    assert!(info.contains("system: Answer in French."), "{info}");
    let template = repl.expect("/show template", "(from ");
    assert!(template.contains("{%"), "no Jinja in {template}");
    repl.expect("/show parameters", "repeat_last_n 16");

    // Greedy again, so that the reply runs to its limit whatever the sampler would draw: at 0.4 it could end
    // on the end-of-text token before 5 tokens.
    repl.expect("/set parameter temperature 0", "temperature set to 0");
    let first = repl.message("Hello");
    assert!(first.contains("5 tokens"), "{first}");
    let used = |stats: &str| -> usize {
        stats
            .split("context: ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no context line in {stats}"))
    };
    let before = used(&repl.expect("/stats", "session:"));

    // /clear drops the turns from the context at once: what is left is the system message alone.
    let cleared = repl.expect("/clear", "conversation cleared");
    let stats = repl.expect("/stats", "session:");
    let after = used(&stats);
    assert!(
        after > 0 && after + 5 < before,
        "{before} -> {after}: {stats}"
    );
    assert!(cleared.contains(&format!("context {after}/")), "{cleared}");
    assert!(stats.contains("no reply yet"), "{stats}");
    assert!(stats.contains("session: 1 reply,"), "{stats}");

    // /load MODEL switches models; the conversation and the settings go along.
    repl.message("Bonjour");
    let m = repl.line(&format!("/load {}", other.display()));
    repl.wait(m, "the new model's banner", |t| {
        t.contains("loading ") && t.contains("/help for commands") && t.contains(">>> ")
    });
    let show = repl.expect("/show", "settings:");
    assert!(show.contains("granitemoe-dev-2"), "{show}");
    assert!(show.contains("conversation: 2 messages"), "{show}");
    assert!(show.contains("temperature 0,"), "{show}");
    repl.expect(
        "/load no-such-model",
        "neither a GGUF file nor an installed model",
    );
    let reply = repl.message("Encore");
    assert!(reply.contains("tok/s"), "{reply}");
    repl.line("/bye");
    assert!(repl.wait_exit().success());
}

#[test]
fn end_of_input_inside_a_block_sends_it() {
    let home = temp_dir("chat-eof-block");
    let stdout = piped_chat(&home, 3, b"\"\"\"first line\nsecond line\n");
    assert!(
        stdout.contains("3 tokens"),
        "the block was not sent: {stdout}"
    );
    let kept: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(home.join("last-chat.json")).expect("the conversation is kept"),
    )
    .unwrap();
    assert_eq!(
        kept["messages"][0]["content"].as_str(),
        Some("first line\nsecond line")
    );
}

#[test]
fn run_without_a_prompt_at_a_terminal_opens_the_chat() {
    let model = model("granitemoe-dev-1").unwrap();
    let home = temp_dir("run-chat");
    let mut repl = Repl::start_command(
        &home,
        &[
            "run",
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "-n",
            "3",
            "--system",
            "Be terse.",
        ],
        &[],
    );
    repl.wait(0, "the banner and prompt", |t| {
        t.contains("/help for commands") && t.contains(">>> ")
    });
    let reply = repl.message("Hello");
    assert!(
        reply.contains("3 tokens"),
        "run's -n did not reach the chat: {reply}"
    );
    assert!(repl.expect("/show system", "terse").contains("Be terse."));
    repl.line("/bye");
    assert!(repl.wait_exit().success());
}
