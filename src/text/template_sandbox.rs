//! Chat templates that are not Granite's own, rendered in a child process with CPU-time, memory and wall-clock
//! limits.
//!
//! A chat template is a program that comes with a downloaded file. minijinja's fuel, the output cap and the
//! item bounds of [`super::chat_template`] stop loops, huge prompts and filters over huge sequences, but not every
//! operator: `ns.s = ns.s + ns.s` sixty times builds a lazy 2^60-item list in sixty steps, and `2 in ns.s` then
//! walks it inside minijinja, where no hook sees it (found by fuzzing). No in-process bound reaches that, and a
//! thread cannot be stopped from outside, so a template that is not one of Granite's own (recognised by its
//! SHA-256) renders in a fresh copy of the running binary (`quarry __render-chat-template`), which the kernel stops
//! after [`CPU_SECONDS`] of CPU time or [`MEMORY_BYTES`] of address space, and which the parent kills after
//! [`WALL_SECONDS`]. A benign template gives exactly what it gives in-process (the child renders with the same
//! code); a hostile one costs one refused request, never the server.
//!
//! Only the binary turns this on ([`isolate_untrusted_templates`]): a library caller has no binary to run, and
//! renders in-process as before.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};

use super::chat_template::{ChatTemplate, ChatTemplateError, Conversation, SpecialTokens};

/// The hidden first argument that makes the binary a template renderer ([`child_main`]).
pub const CHILD_ARGUMENT: &str = "__render-chat-template";

/// CPU time a child may use: Granite's templates render in milliseconds, and fuel stops a loop after about a
/// second, so only the walks fuel does not see reach this.
pub const CPU_SECONDS: u64 = 5;
/// Address space a child may map: the 64 MiB prompt cap, a conversation and the binary fit many times over.
pub const MEMORY_BYTES: u64 = 1 << 30;
/// Wall-clock time before the parent kills a child: CPU time runs slower than the clock on a loaded machine.
pub const WALL_SECONDS: u64 = 20;
/// Children rendering at once; more renders wait for one to end. A server sent a hundred requests at a hostile
/// template so holds at most this many times [`MEMORY_BYTES`], and leaves the other cores to inference.
pub const MAX_CHILDREN: usize = 2;

/// The SHA-256 of the chat templates Quarry's registry models ship (Granite 3.0 and 3.1, 1B-A400M Instruct):
/// these render in-process, with no process per request.
const TRUSTED_TEMPLATE_SHA256: &[&str] = &[
    "09d68eeb5c0eaa551adea6cc088a05c7298966f395f203126e76b74f5a77a8ff",
    "08962c2f15d56767854b46dfc4070b37f4c443551833bba65b417191735f3187",
];

/// Whether `source` is one of the templates in [`TRUSTED_TEMPLATE_SHA256`].
pub fn is_trusted(source: &str) -> bool {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(source.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    TRUSTED_TEMPLATE_SHA256.contains(&hex.as_str())
}

static RENDERER: OnceLock<PathBuf> = OnceLock::new();

/// From now on, templates that are not trusted render in `exe CHILD_ARGUMENT` (the binary passes itself). The
/// first call decides; later ones are ignored.
pub fn isolate_untrusted_templates(exe: PathBuf) {
    let _ = RENDERER.set(exe);
}

/// The renderer binary, if isolation is on.
pub(crate) fn renderer() -> Option<&'static Path> {
    RENDERER.get().map(PathBuf::as_path)
}

/// What the parent sends the child on its standard input, as JSON.
#[derive(Serialize, Deserialize)]
struct RenderRequest {
    source: String,
    origin: String,
    special_tokens: SpecialTokens,
    /// The fixed `strftime_now` moment (`%Y-%m-%dT%H:%M:%S%.f`), or none for the local time.
    now: Option<String>,
    conversation: Conversation,
    add_generation_prompt: bool,
}

const NOW_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.f";

/// The child's reply on its standard output: one tag byte, then the text as it is (a prompt may be 64 MiB;
/// JSON-escaping it could grow it sixfold).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Reply {
    Rendered = b'R' as isize,
    Raised = b'X' as isize,
    Conversation = b'C' as isize,
    Syntax = b'S' as isize,
    Failed = b'F' as isize,
}

impl Reply {
    fn from_tag(tag: u8) -> Option<Reply> {
        [
            Reply::Rendered,
            Reply::Raised,
            Reply::Conversation,
            Reply::Syntax,
            Reply::Failed,
        ]
        .into_iter()
        .find(|r| *r as u8 == tag)
    }
}

/// The most a reply may be: the prompt cap and an error message.
const MAX_REPLY_BYTES: u64 = super::chat_template::MAX_RENDERED_BYTES as u64 + (1 << 20);
/// The most a request may be, for a renderer started by hand.
const MAX_REQUEST_BYTES: u64 = 1 << 30;

/// Renders `conversation` with `template` in a child process of `exe`.
pub(crate) fn render_isolated(
    exe: &Path,
    template: &ChatTemplate,
    conversation: &Conversation,
    add_generation_prompt: bool,
) -> Result<String, ChatTemplateError> {
    let origin = template.origin().to_string();
    let failed = |detail: String| ChatTemplateError::Render {
        origin: origin.clone(),
        detail,
    };
    let request = RenderRequest {
        source: template.source().to_string(),
        origin: origin.clone(),
        special_tokens: template.special_tokens().clone(),
        now: template
            .fixed_now()
            .map(|t| t.format(NOW_FORMAT).to_string()),
        conversation: conversation.clone(),
        add_generation_prompt,
    };
    let request = serde_json::to_vec(&request).map_err(|e| {
        failed(format!(
            "the conversation cannot be handed to the renderer: {e}"
        ))
    })?;
    let _slot = ChildSlot::take();
    let mut command = Command::new(exe);
    command
        .arg(CHILD_ARGUMENT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    limit_child(&mut command);
    let mut child = command.spawn().map_err(|e| {
        failed(format!(
            "cannot start the template renderer {}: {e}",
            exe.display()
        ))
    })?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let (done, outcome) = std::sync::mpsc::channel();
    // The child reads its whole request before it writes, so the request goes first and the reply is read after;
    // both on one thread, which the deadline below leaves behind if the child never ends.
    let io = std::thread::Builder::new()
        .name("template-renderer-io".into())
        .spawn(move || {
            // A child that dies early closes its end: the write fails, and its exit status says why.
            let _ = stdin.write_all(&request);
            drop(stdin);
            let mut reply = Vec::new();
            let read = (&mut stdout)
                .take(MAX_REPLY_BYTES + 1)
                .read_to_end(&mut reply);
            let _ = done.send(read.map(|_| reply));
        });
    if let Err(e) = io {
        let _ = child.kill();
        let _ = child.wait();
        return Err(failed(format!(
            "cannot start a thread to talk to the template renderer: {e}"
        )));
    }
    let reply = outcome.recv_timeout(Duration::from_secs(WALL_SECONDS));
    let timed_out = reply.is_err();
    if timed_out {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| failed(format!("waiting for the template renderer: {e}")))?;
    if timed_out {
        return Err(failed(format!(
            "it did not finish within {WALL_SECONDS} s; a chat template renders a conversation in milliseconds"
        )));
    }
    let reply = match reply {
        Ok(Ok(reply)) if status.success() => reply,
        _ => return Err(failed(why_the_child_failed(status))),
    };
    if reply.len() as u64 > MAX_REPLY_BYTES {
        return Err(failed("the template renderer's reply is too long".into()));
    }
    let Some((&tag, text)) = reply.split_first() else {
        return Err(failed("the template renderer replied nothing".into()));
    };
    let text = String::from_utf8_lossy(text).into_owned();
    match Reply::from_tag(tag) {
        Some(Reply::Rendered) => Ok(text),
        Some(Reply::Raised) => Err(ChatTemplateError::Raised {
            origin,
            message: text,
        }),
        Some(Reply::Conversation) => Err(ChatTemplateError::Conversation {
            origin,
            problem: text,
        }),
        Some(Reply::Syntax) => Err(ChatTemplateError::Syntax {
            origin,
            detail: text,
        }),
        Some(Reply::Failed) => Err(failed(text)),
        None => Err(failed(format!(
            "the template renderer's reply starts with an unknown tag {tag:#04x}"
        ))),
    }
}

/// One of the [`MAX_CHILDREN`] places for a running child, held until it is dropped.
struct ChildSlot;

static RUNNING_CHILDREN: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

impl ChildSlot {
    fn take() -> ChildSlot {
        let (running, freed) = &RUNNING_CHILDREN;
        let mut running = running.lock().unwrap_or_else(|e| e.into_inner());
        while *running >= MAX_CHILDREN {
            running = freed.wait(running).unwrap_or_else(|e| e.into_inner());
        }
        *running += 1;
        ChildSlot
    }
}

impl Drop for ChildSlot {
    fn drop(&mut self) {
        let (running, freed) = &RUNNING_CHILDREN;
        *running.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        freed.notify_one();
    }
}

/// The child's limits, set between fork and exec.
fn limit_child(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let limits = [
        (libc::RLIMIT_CPU, CPU_SECONDS, CPU_SECONDS + 1),
        (libc::RLIMIT_AS, MEMORY_BYTES, MEMORY_BYTES),
        // An abort from a failed allocation writes no core file.
        (libc::RLIMIT_CORE, 0, 0),
    ];
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe, on a stack value; it allocates
    // nothing and touches no lock, as code between fork and exec must.
    unsafe {
        command.pre_exec(move || {
            for (resource, soft, hard) in limits {
                let limit = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// What a child's exit status says about the template.
fn why_the_child_failed(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(libc::SIGXCPU) | Some(libc::SIGKILL) => format!(
            "it ran for more than {CPU_SECONDS} s of CPU time (a loop or a sequence without a useful bound?); a chat template renders a conversation in milliseconds"
        ),
        Some(libc::SIGABRT) | Some(libc::SIGSEGV) => format!(
            "it needed more than {} MiB of memory, or recursed too deeply (a sequence or a macro without a useful bound?); a chat template needs far less",
            MEMORY_BYTES >> 20
        ),
        Some(signal) => format!("the template renderer was stopped by signal {signal}"),
        None => format!("the template renderer failed ({status})"),
    }
}

/// The body of `quarry __render-chat-template`: reads a [`RenderRequest`] from standard input, renders it
/// in-process, and writes the [`Reply`] to standard output.
pub fn child_main() -> ExitCode {
    let mut request = Vec::new();
    let read = std::io::stdin()
        .take(MAX_REQUEST_BYTES)
        .read_to_end(&mut request);
    let request: RenderRequest = match read
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_slice(&request).map_err(|e| e.to_string()))
    {
        Ok(request) => request,
        Err(e) => {
            eprintln!(
                "error: {CHILD_ARGUMENT} is Quarry's own template renderer, started by quarry itself with a request on its standard input; this one is not readable: {e}"
            );
            return ExitCode::from(2);
        }
    };
    let (tag, text) = match render_here(&request) {
        Ok(text) => (Reply::Rendered, text),
        Err(ChatTemplateError::Raised { message, .. }) => (Reply::Raised, message),
        Err(ChatTemplateError::Conversation { problem, .. }) => (Reply::Conversation, problem),
        Err(ChatTemplateError::Syntax { detail, .. }) => (Reply::Syntax, detail),
        Err(ChatTemplateError::Render { detail, .. }) => (Reply::Failed, detail),
        Err(other) => (Reply::Failed, other.to_string()),
    };
    let mut out = std::io::stdout().lock();
    match out
        .write_all(&[tag as u8])
        .and_then(|()| out.write_all(text.as_bytes()))
        .and_then(|()| out.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

fn render_here(request: &RenderRequest) -> Result<String, ChatTemplateError> {
    let mut template = ChatTemplate::new(&request.source, &request.origin)?
        .with_special_tokens(request.special_tokens.clone());
    if let Some(now) = &request.now {
        let now = NaiveDateTime::parse_from_str(now, NOW_FORMAT).map_err(|e| {
            ChatTemplateError::Render {
                origin: request.origin.clone(),
                detail: format!("the renderer was given an unreadable time {now:?}: {e}"),
            }
        })?;
        template = template.with_now(now);
    }
    let rendered = crate::contain::contain(|| {
        template.render_in_process(&request.conversation, request.add_generation_prompt)
    });
    rendered.unwrap_or_else(|panic| {
        Err(ChatTemplateError::Render {
            origin: request.origin.clone(),
            detail: format!("the renderer failed: {panic}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;

    #[test]
    fn a_childs_death_names_the_limit_it_hit() {
        let why = |raw| why_the_child_failed(ExitStatus::from_raw(raw));
        assert!(why(libc::SIGXCPU).contains("5 s of CPU time"));
        assert!(why(libc::SIGKILL).contains("5 s of CPU time"));
        assert!(why(libc::SIGABRT).contains("1024 MiB of memory"));
        assert!(why(libc::SIGHUP).contains("stopped by signal 1"));
        assert!(
            why(2 << 8).contains("failed (exit status: 2)"),
            "{}",
            why(2 << 8)
        );
    }

    #[test]
    fn reply_tags_round_trip() {
        for reply in [
            Reply::Rendered,
            Reply::Raised,
            Reply::Conversation,
            Reply::Syntax,
            Reply::Failed,
        ] {
            assert_eq!(Reply::from_tag(reply as u8), Some(reply));
        }
        assert_eq!(Reply::from_tag(b'?'), None);
    }
}
