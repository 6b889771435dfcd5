//! `quarry info MODEL [--format json]`

use std::path::PathBuf;

use quarry::engine::Engine;
use quarry::model::Architecture;
use serde_json::json;

use super::common::OutputFormat;
use super::format::{human_bytes, human_count, shown};

/// Show a model file's architecture, sizes, tensor types, metadata and the memory it needs.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF model file, or an installed model: its name (`quarry list`) or the Hugging Face repo id it was
    /// pulled from (org/name).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// text: for people; json: one object for scripts (architecture, sizes, tensor types, memory, kernels).
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// Also list every tensor and every metadata key.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let engine = Engine::open(&args.model)?;
    let (file, cfg) = (&engine.file, &engine.model.config);
    let mut by_type = file.type_tallies();
    by_type.sort_by_key(|t| t.ty.name());
    let params: u64 = by_type.iter().map(|t| t.elements).sum();
    let weight_bytes: u64 = file.tensors().iter().map(|t| t.size).sum();
    let ctx = engine.default_context();
    let kv_bytes = cfg.kv_bytes_per_token() as u64 * ctx as u64;
    let active = active_params(&engine);
    let kernels = engine.model.kernels().name;
    match args.format {
        OutputFormat::Json => {
            let mut v = json!({
                "file": file.path(),
                "file_size": file.file_len(),
                "gguf_version": file.version,
                "architecture": cfg.arch.gguf_name(),
                "name": cfg.name,
                "file_type": file.get("general.file_type").and_then(|v| v.as_u64()),
                "parameters": params,
                "active_parameters_per_token": active,
                "vocab_size": cfg.n_vocab,
                "context_length": cfg.context_length,
                "embedding_length": cfg.n_embd,
                "block_count": cfg.n_layer,
                "head_count": cfg.n_head,
                "head_count_kv": cfg.n_head_kv,
                "head_dim": cfg.head_dim,
                "feed_forward_length": cfg.n_ff,
                "expert_count": cfg.n_expert,
                "expert_used_count": cfg.n_expert_used,
                "rope_freq_base": cfg.rope_theta,
                "rms_norm_eps": cfg.rms_eps,
                "embedding_scale": cfg.embedding_scale,
                "attention_scale": cfg.attention_scale,
                "residual_scale": cfg.residual_scale,
                "logit_scale": cfg.logit_scale,
                "tensor_types": by_type.iter().map(|t| (t.ty.name().to_string(), json!({"tensors": t.tensors, "bytes": t.bytes}))).collect::<serde_json::Map<_, _>>(),
                "weight_bytes": weight_bytes,
                "kv_cache_bytes_per_token": cfg.kv_bytes_per_token(),
                "default_context": ctx,
                "kv_cache_bytes_at_default_context": kv_bytes,
                "kernels": kernels,
            });
            if args.verbose {
                v["tensors"] = file
                    .tensors()
                    .iter()
                    .map(|t| json!({"name": t.name, "type": t.ty.name(), "dims": t.dims, "bytes": t.size}))
                    .collect();
                v["metadata"] = file
                    .metadata()
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v.summary())))
                    .collect();
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Text => {
            println!(
                "file:          {} ({})",
                shown(&file.path().display().to_string(), false),
                human_bytes(file.file_len(), 2)
            );
            println!(
                "architecture:  {} ({})",
                cfg.arch.gguf_name(),
                shown(cfg.name.as_deref().unwrap_or("unnamed"), false)
            );
            println!(
                "parameters:    {} total, {} active per token",
                human_count(params),
                human_count(active)
            );
            println!(
                "shape:         {} layers, hidden {}, {} heads / {} kv heads (head dim {}), vocab {}",
                cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_vocab
            );
            match cfg.arch {
                Architecture::GraniteMoe => println!(
                    "experts:       {} per layer, {} used per token, intermediate {}",
                    cfg.n_expert, cfg.n_expert_used, cfg.n_ff
                ),
                Architecture::Granite => {
                    println!("mlp:           dense SwiGLU, intermediate {}", cfg.n_ff)
                }
            }
            println!(
                "context:       {} (rope theta {})",
                cfg.context_length, cfg.rope_theta
            );
            println!(
                "scalars:       embedding x{}, attention x{}, residual x{}, logits /{}",
                cfg.embedding_scale, cfg.attention_scale, cfg.residual_scale, cfg.logit_scale
            );
            println!("tensor types:");
            for t in &by_type {
                println!(
                    "  {:<6} {:>5} {} {:>12}",
                    t.ty.name(),
                    t.tensors,
                    if t.tensors == 1 { "tensor " } else { "tensors" },
                    human_bytes(t.bytes, 2)
                );
            }
            println!(
                "memory:        weights {} (memory-mapped), KV cache {} per token, {} at context {ctx}",
                human_bytes(weight_bytes, 2),
                human_bytes(cfg.kv_bytes_per_token() as u64, 2),
                human_bytes(kv_bytes, 2)
            );
            println!("kernels:       {kernels}");
            if args.verbose {
                println!("metadata:");
                for (k, v) in file.metadata() {
                    println!("  {} = {}", shown(k, false), shown(&v.summary(), false));
                }
                println!("tensors:");
                for t in file.tensors() {
                    println!(
                        "  {:<32} {:<6} {:?}",
                        shown(&t.name, false),
                        t.ty.name(),
                        t.dims
                    );
                }
            }
        }
    }
    Ok(())
}

/// Parameters one token's forward pass multiplies with: everything except the experts it does not choose
/// (the embedding counts once, as the output head).
pub(super) fn active_params(engine: &Engine) -> u64 {
    let cfg = &engine.model.config;
    let mut n = 0u64;
    for t in engine.file.tensors() {
        let e = t.n_elements();
        n += if t.name.contains("_exps") && cfg.n_expert > 0 {
            e / cfg.n_expert as u64 * cfg.n_expert_used as u64
        } else {
            e
        };
    }
    n
}
