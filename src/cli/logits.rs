//! `quarry logits MODEL --prompt-ids 1,2,3 --out logits.npy`

use std::path::PathBuf;

use anyhow::{Context, bail};
use quarry::engine::Engine;
use quarry::generate::Session;

use super::common::{ModelArgs, parse_ids, write_atomically};

/// Write the logits of every prompt position as a float32 .npy of shape [tokens, vocab] (already divided by the
/// model's logit scale), for comparing engines.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token ids, comma-separated (e.g. 1,2,3).
    #[arg(long, value_name = "IDS")]
    pub prompt_ids: String,
    /// Output .npy file.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: PathBuf,
    /// Feed the prompt one token at a time through the KV cache instead of in batches (same numbers up to
    /// rounding; a check of the decode path).
    #[arg(long)]
    pub one_by_one: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ids = parse_ids(&args.prompt_ids)?;
    if ids.is_empty() {
        bail!("--prompt-ids is empty: give at least one token id");
    }
    let engine = Engine::open(&args.model.model)?;
    let ctx = args
        .model
        .ctx_size
        .unwrap_or_else(|| engine.default_context())
        .max(ids.len());
    let cache = args.model.cache_type.unwrap_or(quarry::model::KvType::F32);
    let mut session = Session::with_cache(&engine.model, ctx, args.model.batch, cache);
    let logits = if args.one_by_one {
        let mut all = Vec::with_capacity(ids.len() * engine.model.config.n_vocab);
        for &id in &ids {
            all.extend_from_slice(session.feed(&[id])?);
        }
        all
    } else {
        session.feed_all_logits(&ids)?
    };
    let shape = [ids.len(), engine.model.config.n_vocab];
    write_atomically(&args.out, |f| {
        quarry::measure::npy::write_f32(f, &shape, &logits)
    })
    .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} logits [{} x {}] to {}",
        logits.len(),
        shape[0],
        shape[1],
        args.out.display()
    );
    Ok(())
}
