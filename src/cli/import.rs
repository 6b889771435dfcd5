//! `quarry import DIR|FILE.gguf [--name NAME]`: install a model from a Hugging Face folder or a GGUF file on this
//! machine (air-gapped).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use quarry::hub::pull::{ImportRequest, import};
use quarry::hub::registry::Registry;
use quarry::hub::store::Store;
use quarry_quantize::TargetType;

use super::common::parse_type;
use super::pull::{Bars, print_installed};

/// Convert a Hugging Face snapshot folder already on this machine (config.json, *.safetensors, tokenizer files,
/// copied from a machine with network access) and install it under `$QUARRY_HOME`, as `pull` would; or install a
/// GGUF file as it is (as `ollama create` does from one). The source is only read. Under a registry name, the
/// folder's config.json must describe that model. An installed model of the same name is replaced only with
/// --force.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The snapshot folder, or a GGUF file.
    #[arg(value_name = "DIR|FILE.gguf")]
    pub dir: PathBuf,
    /// Name to install it under (default: the folder's name, or the file's without .gguf).
    #[arg(long)]
    pub name: Option<String>,
    /// Replace a model installed under the same name; install under a registry name a folder whose config.json
    /// is not that model's.
    #[arg(long)]
    pub force: bool,
    /// Weight type, with `quarry quantize`'s recipes: q4_0, q4_k_m, q5_k_m, q6_k, q8_0, f16 or f32 (default: the
    /// registry's type for NAME, else q4_0).
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_type)]
    pub target: Option<TargetType>,
    /// Worker threads for the conversion (default: one per core).
    #[arg(long, short = 't', value_name = "N", value_parser = super::common::parse_threads)]
    pub threads: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let store = Store::from_env()?;
    let request = ImportRequest {
        dir: args.dir.clone(),
        name: args.name,
        target: args.target,
        threads: args.threads,
        progress_bars: std::io::stderr().is_terminal(),
        force: args.force,
    };
    let model = import(&store, &Registry::builtin(), &request, &mut Bars::default())
        .with_context(|| format!("quarry import {} failed", args.dir.display()))?;
    print_installed(&model);
    Ok(())
}
