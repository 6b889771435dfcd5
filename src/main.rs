//! The `quarry` command line: parses arguments and hands them to the library; nothing else lives here.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    quarry::contain::quiet_hook();
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
