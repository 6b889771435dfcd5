//! `quarry quantize DIR -o OUT.gguf [--type q4_0]`: a Hugging Face Granite folder to one GGUF file; and
//! `quarry quantize MODEL.gguf -o OUT.gguf --type T`: a GGUF file requantized with the same type recipe.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use quarry_quantize::{
    ConvertOptions, ConvertReport, RequantizeOptions, TargetType, convert, requantize,
};

use super::common::parse_type;
use super::format::{count, plural, type_counts};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face snapshot folder (config.json, model.safetensors or shards + index, tokenizer files), or a
    /// GGUF file to requantize (a file, or any path ending in .gguf). A GGUF input keeps its metadata; its tensors
    /// should be F32, F16 or BF16 (see --allow-requantize).
    #[arg(value_name = "DIR|MODEL.gguf")]
    pub input: PathBuf,

    /// The GGUF file to write. It appears only when complete (written as OUT.part, then renamed).
    #[arg(short, long, value_name = "OUT.gguf")]
    pub output: PathBuf,

    /// Weight type: q4_0 (default: the smallest and fastest, output head kept at q8_0), q4_k_m (llama.cpp's
    /// Q4_K_M: q4_K, with q6_K for the output head and attn_v/ffn_down in half the layers), q5_k_m (the same
    /// over q5_K), q6_k, iq4_nl / iq4_xs (llama.cpp's 4.5 / 4.25-bit non-linear types, q6_K head, q5_K for
    /// ffn_down in the first eighth of the layers), q8_0 (near-lossless), f16, or f32 (exact). Norms and expert
    /// routers always stay f32. Rows that are not whole blocks of the type fall back (k-quants to q8_0, iq4_xs to
    /// iq4_nl, else f16) and are listed.
    #[arg(long = "type", value_name = "TYPE", default_value = "q4_0", value_parser = parse_type)]
    pub target: TargetType,

    /// Type of the output head (the tied token embedding, or output.weight) and of an untied input embedding.
    /// Default: q8_0 for a q4_0 file, q6_K for the k-quant and iq4 types, else the --type. A mix stands for its
    /// base type (q4_k_m: q4_K).
    #[arg(long, value_name = "TYPE", value_parser = parse_type)]
    pub embedding_type: Option<TargetType>,

    /// GGUF input only: dequantize tensors that are already quantized (q8_0, q4_0, q4_K, q5_K, q6_K, iq4_nl,
    /// iq4_xs) and quantize them again, instead of refusing. Each rounding adds its error: prefer an F16/BF16/F32 input.
    #[arg(long)]
    pub allow_requantize: bool,

    /// Worker threads (default: one per core).
    #[arg(long, short = 't', value_name = "N", value_parser = super::common::parse_threads)]
    pub threads: Option<usize>,

    /// general.name written in the file (default: the folder's or repository's name; a GGUF input's own name).
    #[arg(long)]
    pub name: Option<String>,
}

/// A GGUF input rather than a checkpoint folder: an existing file, or a path ending in `.gguf` (so a mistyped file
/// name gets the GGUF reader's "cannot open" rather than a complaint about a folder's config.json).
fn is_gguf_input(path: &Path) -> bool {
    path.is_file()
        || path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let progress = std::io::stderr().is_terminal();
    let threads = args.threads;
    let report = if is_gguf_input(&args.input) {
        if args.allow_requantize {
            eprintln!(
                "warning: --allow-requantize: tensors that are already quantized will be dequantized and \
                 quantized again, which adds their errors"
            );
        }
        let options = RequantizeOptions {
            embedding_type: args.embedding_type,
            allow_requantize: args.allow_requantize,
            model_name: args.name,
            progress,
            threads,
            ..RequantizeOptions::new(&args.input, &args.output, args.target)
        };
        requantize(&options)
            .with_context(|| format!("requantize {} failed", args.input.display()))?
    } else {
        if args.allow_requantize {
            anyhow::bail!(
                "--allow-requantize applies to a GGUF input; {} is a checkpoint folder",
                args.input.display()
            );
        }
        quarry::text::check_snapshot(&args.input)
            .with_context(|| format!("quantize {} refused", args.input.display()))?;
        let options = ConvertOptions {
            embedding_type: args.embedding_type,
            progress,
            threads,
            model_name: args.name,
            ..ConvertOptions::new(&args.input, &args.output, args.target)
        };
        convert(&options).with_context(|| format!("quantize {} failed", args.input.display()))?
    };
    print_report(&report);
    Ok(())
}

fn print_report(report: &ConvertReport) {
    println!(
        "wrote {} ({}, {}): {} ({}), {} parameters, {:.1} MiB in {:.1} s",
        report.output.display(),
        report.architecture.gguf_name(),
        report.target,
        plural(report.tensors.len(), "tensor", "tensors"),
        type_counts(&report.type_counts()),
        count(report.parameters),
        report.file_bytes as f64 / (1024.0 * 1024.0),
        report.elapsed.as_secs_f64(),
    );
    let fallbacks: Vec<_> = report.fallbacks().collect();
    if !fallbacks.is_empty() {
        println!(
            "{} written at another type because {} not whole blocks of the recipe's:",
            plural(fallbacks.len(), "tensor", "tensors"),
            if fallbacks.len() == 1 {
                "its rows are"
            } else {
                "their rows are"
            }
        );
        for t in fallbacks {
            let wanted = t
                .fell_back_from
                .map(|ty| format!("{ty} needs rows of a multiple of {}", ty.block_len()))
                .unwrap_or_default();
            println!("  {} {:?}: {} ({wanted})", t.name, t.dims, t.ty);
        }
    }
    if !report.dequantized.is_empty() {
        let list: Vec<String> = report
            .dequantized
            .iter()
            .map(|(name, ty)| format!("{name} ({ty})"))
            .collect();
        eprintln!(
            "warning: {} already quantized and {} dequantized first: {}",
            plural(list.len(), "tensor was", "tensors were"),
            if list.len() == 1 { "was" } else { "were" },
            list.join(", ")
        );
    }
    if !report.unused_source_tensors.is_empty() {
        println!(
            "not converted (no GGUF counterpart): {}",
            report.unused_source_tensors.join(", ")
        );
    }
}
