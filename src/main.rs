//! The `quarry` command line: parses arguments and hands them to the library; nothing else lives here.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    use quarry::text::template_sandbox;
    quarry::contain::quiet_hook();
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
