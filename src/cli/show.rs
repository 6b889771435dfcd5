//! `quarry show MODEL`: what `ollama show` tells about a model: its parameters, sizes, chat template and license.

use std::path::PathBuf;

use quarry::engine::Engine;
use quarry::hub::store::Store;
use quarry::text::chat_template::GGUF_CHAT_TEMPLATE_KEY;

use super::format::{human_bytes, human_count, plural, shown};

/// Show a model's parameters (count and shape, and the generation settings `run` and `chat` start from), its
/// sizes, where it was installed from, its chat template and its license (as `ollama show`). `quarry info`
/// has the file-level detail.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF model file, or an installed model: its name (`quarry list`) or the Hugging Face repo id it was
    /// pulled from (org/name).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// Print only the chat template.
    #[arg(long, conflicts_with = "license")]
    pub template: bool,
    /// Print only the license.
    #[arg(long)]
    pub license: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let engine = Engine::open(&args.model)?;
    let file = &engine.file;
    let template = file.get(GGUF_CHAT_TEMPLATE_KEY).and_then(|v| v.as_str());
    let license = file.get("general.license").and_then(|v| v.as_str());
    if args.template {
        match template {
            Some(t) => println!("{}", shown(t.trim_end(), true)),
            None => anyhow::bail!(
                "{} has no chat template ({GGUF_CHAT_TEMPLATE_KEY}); `quarry run --raw` continues plain text",
                args.model.display()
            ),
        }
        return Ok(());
    }
    if args.license {
        match license {
            Some(l) => println!("{}", shown(l.trim_end(), true)),
            None => println!("the model file names no license (general.license)"),
        }
        return Ok(());
    }

    let cfg = &engine.model.config;
    let by_type = file.type_tallies();
    let params: u64 = by_type.iter().map(|t| t.elements).sum();
    let main_type = by_type
        .iter()
        .max_by_key(|t| t.elements)
        .map(|t| t.ty.name())
        .unwrap_or("?");
    println!("  Model");
    let row = |k: &str, v: String| println!("    {k:<20}{v}");
    row(
        "name",
        shown(cfg.name.as_deref().unwrap_or("unnamed"), false).into_owned(),
    );
    row("architecture", cfg.arch.gguf_name().to_string());
    row(
        "parameters",
        format!(
            "{} ({} active per token)",
            human_count(params),
            human_count(super::info::active_params(&engine))
        ),
    );
    row("context length", cfg.context_length.to_string());
    row("embedding length", cfg.n_embd.to_string());
    row("layers", cfg.n_layer.to_string());
    row(
        "attention heads",
        format!("{} ({} for keys and values)", cfg.n_head, cfg.n_head_kv),
    );
    if cfg.n_expert > 0 {
        row(
            "experts",
            format!(
                "{} per layer, {} used per token",
                cfg.n_expert, cfg.n_expert_used
            ),
        );
    }
    row("vocabulary", plural(cfg.n_vocab, "token", "tokens"));
    row("quantization", format!("mostly {main_type}"));
    println!();
    println!("  Parameters (what run and chat start from; their options change them)");
    let p = quarry::sampling::SamplingParams::default();
    row("temperature", p.temperature.to_string());
    row("top_k", p.top_k.to_string());
    row("top_p", p.top_p.to_string());
    row("min_p", p.min_p.to_string());
    row(
        "repeat_penalty",
        format!(
            "{} over the last {} tokens",
            p.repeat_penalty, p.repeat_last_n
        ),
    );
    row("stop", "the end-of-text token".to_string());
    println!();
    println!("  Sizes");
    row("file", human_bytes(file.file_len(), 2));
    for t in &by_type {
        row(
            &format!("{} weights", t.ty.name()),
            format!(
                "{} in {}",
                human_bytes(t.bytes, 2),
                plural(t.tensors, "tensor", "tensors")
            ),
        );
    }
    let ctx = engine.default_context();
    row(
        "KV cache",
        format!(
            "{} per token, {} at {ctx} tokens (f32; half that as f16)",
            human_bytes(cfg.kv_bytes_per_token() as u64, 2),
            human_bytes(cfg.kv_bytes_per_token() as u64 * ctx as u64, 2)
        ),
    );
    if let Ok(store) = Store::from_env()
        && let Ok(root) = store.models_dir().canonicalize()
        && let Some(dir) = args
            .model
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
        && dir.parent() == Some(root.as_path())
        && let Some(name) = dir.file_name().and_then(|n| n.to_str())
        && let Ok(Some(installed)) = store.find(name)
    {
        println!();
        println!("  Installed");
        row("name", shown(&installed.manifest.name, false).into_owned());
        row("from", shown(&installed.origin(), false).into_owned());
        row("type", installed.manifest.quant_type.clone());
        row("installed", installed.manifest.installed.clone());
    }
    println!();
    println!("  Chat template");
    match template {
        Some(t) => {
            for line in t.trim_end().lines() {
                println!("    {}", shown(line, false));
            }
        }
        None => println!("    none (`quarry run --raw` continues plain text)"),
    }
    println!();
    println!("  License");
    match license {
        Some(l) => {
            for line in l.trim_end().lines() {
                println!("    {}", shown(line, false));
            }
        }
        None => println!("    the model file names none (general.license)"),
    }
    Ok(())
}
