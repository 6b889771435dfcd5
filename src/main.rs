//! The `quarry` command line: parses arguments and hands them to the library; nothing else lives here.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    use quarry::text::template_sandbox;
    quarry::contain::quiet_hook();
    quiet_broken_pipe();
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == template_sandbox::CHILD_ARGUMENT)
    {
        return template_sandbox::child_main();
    }
    // A chat template that is not Granite's own renders in a copy of this binary, with CPU and memory limits.
    // /proc/self/exe is this very binary even if its file has since been replaced (a rebuild under a server).
    let this = std::path::Path::new("/proc/self/exe");
    let exe = match this.exists() {
        true => Some(this.to_path_buf()),
        false => std::env::current_exe().ok(),
    };
    if let Some(exe) = exe {
        template_sandbox::isolate_untrusted_templates(exe);
    }
    let args = cli::Cli::parse();
    match cli::dispatch(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Messages quote file names, metadata keys and tensor names: nothing in them reaches the terminal raw.
            eprintln!(
                "error: {}",
                cli::format::shown(&cli::format::error_chain(&e), true)
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// `quarry list | head`: `println!` panics once the reader has gone (Rust ignores SIGPIPE, so a write to a closed
/// pipe is an error, and `println!` turns that into a panic with a backtrace). End quietly instead, with the
/// status of a process killed by SIGPIPE, as the other tools of a pipeline do.
fn quiet_broken_pipe() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        report(info);
    }));
}
