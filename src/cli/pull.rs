//! `quarry pull NAME|org/repo[@revision]`: download from Hugging Face, verify, convert, install.

use std::io::IsTerminal;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use quarry::hub::http::{Hub, TransferProgress};
use quarry::hub::pull::{PullProgress, PullRequest, Verification, pull};
use quarry::hub::registry::Registry;
use quarry::hub::store::{InstalledModel, Store};
use quarry_quantize::TargetType;

use super::common::parse_type;
use super::format::human_bytes;

/// Download a model, verify every file, convert it and install it under `$QUARRY_HOME`. NAME is a model of the
/// registry (`quarry list`) or any Hugging Face repo id of a Granite 3.x model: `org/name` or
/// `org/name@revision`. HF_ENDPOINT sets the host (default https://huggingface.co) and HF_TOKEN is sent as a bearer
/// token when set. A transfer that receives nothing for QUARRY_PULL_READ_TIMEOUT_SECS (default 60) counts as
/// stalled and is retried from where it stopped, a few times. An interrupted download resumes where it stopped when
/// the same command is run again.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A registry model or a Hugging Face repo id (org/name[@revision]).
    #[arg(value_name = "NAME")]
    pub model: String,
    /// Weight type, with `quarry quantize`'s recipes: q4_0, q4_k_m, q5_k_m, q6_k, q8_0, f16 or f32 (default: the
    /// registry's, else q4_0).
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_type)]
    pub target: Option<TargetType>,
    /// Name to install it under (default: the registry name, or the repository's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Worker threads for the conversion (default: one per core).
    #[arg(long, short = 't', value_name = "N", value_parser = super::common::parse_threads)]
    pub threads: Option<usize>,
    /// Replace a model installed under the same name (without it, that is refused before any download).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = pull_model(
        &args.model,
        args.name,
        args.target,
        args.threads,
        args.force,
    )?;
    print_installed(&model);
    Ok(())
}

/// Pulls `what` with progress on stderr (also used by `chat` when the user agrees to download a missing model).
pub fn pull_model(
    what: &str,
    name: Option<String>,
    target: Option<TargetType>,
    threads: Option<usize>,
    force: bool,
) -> anyhow::Result<InstalledModel> {
    let store = Store::from_env()?;
    let hub = Hub::from_env()?;
    let request = PullRequest {
        what: what.to_string(),
        name,
        target,
        threads,
        progress_bars: std::io::stderr().is_terminal(),
        force,
    };
    let mut progress = Bars::default();
    let model = pull(&store, &hub, &Registry::builtin(), &request, &mut progress)
        .with_context(|| format!("quarry pull {what} failed"))?;
    Ok(model)
}

pub(super) fn print_installed(model: &InstalledModel) {
    let m = &model.manifest;
    println!(
        "installed {} ({}, {}, {}) from {}; chat with it: quarry chat {}",
        m.name,
        m.architecture,
        m.quant_type,
        human_bytes(m.size, 1),
        model.origin(),
        m.name
    );
}

/// Progress of a pull or import on stderr: a bar per file on a terminal, one line per file otherwise.
#[derive(Default)]
pub(super) struct Bars {
    bar: Option<ProgressBar>,
}

impl Bars {
    fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

impl PullProgress for Bars {
    fn step(&mut self, message: &str) {
        self.say(message);
    }

    fn file_done(&mut self, name: &str, size: u64, check: Verification) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!("  {name:32} {:>10}  ok: {check}", human_bytes(size, 1));
    }
}

impl TransferProgress for Bars {
    fn file_start(&mut self, name: &str, size: Option<u64>, resumed_from: u64) {
        if let Some(old) = self.bar.take() {
            old.finish_and_clear();
        }
        if !std::io::stderr().is_terminal() {
            // One line per file (when it is done), plus one when a transfer continues an earlier one.
            if resumed_from > 0 {
                let size = size
                    .map(|s| human_bytes(s, 1))
                    .unwrap_or_else(|| "?".into());
                eprintln!(
                    "  {name}: resuming after {} of {size}",
                    human_bytes(resumed_from, 1)
                );
            }
            return;
        }
        let bar = match size {
            Some(total) => ProgressBar::new(total).with_style(
                ProgressStyle::with_template(
                    "  {msg:32!} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta:>4}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner(),
        };
        bar.set_message(name.to_string());
        bar.set_position(resumed_from);
        self.bar = Some(bar);
    }

    fn file_bytes(&mut self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    fn retry(&mut self, name: &str, attempt: u32, detail: &str) {
        self.say(&format!(
            "  {name}: {detail}; retrying, resuming from what arrived (attempt {})",
            attempt + 1
        ));
    }
}
