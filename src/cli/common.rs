//! Options and helpers shared by several subcommands.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Which model file and how much room to give it.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF model file.
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long, short = 'c', value_name = "N")]
    pub ctx_size: Option<usize>,
    /// Prompt tokens per forward pass.
    #[arg(long, short = 'b', value_name = "N", default_value_t = quarry::generate::DEFAULT_BATCH)]
    pub batch: usize,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't', value_name = "N")]
    pub threads: Option<usize>,
}

/// Parses `1,2,3` (spaces allowed) into token ids.
pub fn parse_ids(text: &str) -> anyhow::Result<Vec<u32>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("'{s}' is not a token id (expected e.g. 1,2,3)"))
        })
        .collect()
}

/// Writes `path` through a temporary file in the same folder, renamed over it only when complete, so that an
/// error or a kill never leaves a partial file under the real name.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let Some(name) = path.file_name() else {
        bail!("{} is not a file path", path.display())
    };
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".part");
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let result = (|| {
        let mut out = BufWriter::new(File::create(&tmp)?);
        write(&mut out)?;
        out.flush()?;
        out.get_ref().sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(())
}

/// How a command prints its result: for people, or one JSON object for scripts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Sizes rayon's global pool once, before any work: `--threads`, else every core.
pub fn init_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        builder = builder.num_threads(n);
    }
    builder
        .build_global()
        .context("starting the worker threads")
}
