//! `quarry quantize DIR -o OUT.gguf [--type q4_0]`: a Hugging Face Granite folder to one GGUF file.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use quarry_quantize::{ConvertOptions, TargetType, convert};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face snapshot folder: config.json, model.safetensors (or shards + index), tokenizer files.
    pub dir: PathBuf,

    /// The GGUF file to write. It appears only when complete (written as OUT.part, then renamed).
    #[arg(short, long, value_name = "OUT.gguf")]
    pub output: PathBuf,

    /// Weight type: q4_0 (default: the smallest and fastest, output head kept at q8_0), q8_0 (near-lossless),
    /// f16, or f32 (exact). Norms and expert routers always stay f32; tensors whose rows are not a multiple of
    /// 32 weights cannot be block-quantized and are written as f16 (listed in the summary).
    #[arg(long = "type", value_name = "TYPE", default_value = "q4_0", value_parser = parse_type)]
    pub target: TargetType,

    /// Type of the output head (the tied token embedding, or output.weight) and of an untied input embedding.
    /// Default: q8_0 for a q4_0 file, else the --type.
    #[arg(long, value_name = "TYPE", value_parser = parse_type)]
    pub embedding_type: Option<TargetType>,

    /// Worker threads (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,

    /// general.name written in the file (default: the folder's or repository's name).
    #[arg(long)]
    pub name: Option<String>,
}

fn parse_type(s: &str) -> Result<TargetType, String> {
    s.parse()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let options = ConvertOptions {
        embedding_type: args.embedding_type,
        progress: std::io::stderr().is_terminal(),
        threads: args.threads.map(usize::from),
        model_name: args.name,
        ..ConvertOptions::new(&args.dir, &args.output, args.target)
    };
    let report =
        convert(&options).with_context(|| format!("quantize {} failed", args.dir.display()))?;

    let types: Vec<String> = report
        .type_counts()
        .iter()
        .map(|(ty, n)| format!("{n} {ty}"))
        .collect();
    println!(
        "wrote {} ({}, {}): {} tensors ({}), {} parameters, {:.1} MiB in {:.1} s",
        report.output.display(),
        report.architecture.gguf_name(),
        report.target,
        report.tensors.len(),
        types.join(", "),
        count(report.parameters),
        report.file_bytes as f64 / (1024.0 * 1024.0),
        report.elapsed.as_secs_f64(),
    );
    let fallbacks: Vec<_> = report.fallbacks().collect();
    if !fallbacks.is_empty() {
        println!(
            "{} tensors written as f16 because their rows are not a multiple of 32 weights:",
            fallbacks.len()
        );
        for t in fallbacks {
            let wanted = t
                .fell_back_from
                .map(|ty| ty.to_string())
                .unwrap_or_default();
            println!("  {} {:?} (instead of {wanted})", t.name, t.dims);
        }
    }
    if !report.unused_source_tensors.is_empty() {
        println!(
            "not converted (no GGUF counterpart): {}",
            report.unused_source_tensors.join(", ")
        );
    }
    Ok(())
}

/// 1.33 B, 412.3 M, 49.2 K.
fn count(n: u64) -> String {
    let n = n as f64;
    match n {
        _ if n >= 1e9 => format!("{:.2} B", n / 1e9),
        _ if n >= 1e6 => format!("{:.1} M", n / 1e6),
        _ => format!("{:.1} K", n / 1e3),
    }
}
