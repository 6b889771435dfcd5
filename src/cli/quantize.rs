//! `quarry quantize DIR -o OUT --type q4_0`

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face snapshot folder: config.json, model.safetensors (or shards + index), tokenizer files.
    pub dir: PathBuf,
}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("quantize is not implemented yet")
}
