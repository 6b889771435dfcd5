//! `quarry perplexity MODEL --file TEXT [--ctx N] [--kl-base BASE.gguf]`

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use quarry::engine::Engine;
use quarry::generate::{DEFAULT_BATCH, Session};
use quarry::measure::perplexity::{
    DEFAULT_CTX, Estimate, Report, check_same_vocabulary, chunk_count, evaluate,
};

use super::common::OutputFormat;

/// Measure perplexity over a text file as llama-perplexity does: the tokens are cut into chunks of --ctx, each
/// evaluated from an empty cache, and the second half of each chunk is scored. With --kl-base, also the KL
/// divergence from a base model, top-1 agreement and RMS of probability differences on the same positions, as
/// llama-perplexity --kl-divergence reports them. Progress goes to stderr, the result to stdout.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF model file, or an installed model: its name (`quarry list`) or the Hugging Face repo id it was
    /// pulled from (org/name).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// The text to score (UTF-8). Special-token strings in it, like <|end_of_text|>, are read as plain text, as
    /// llama-perplexity reads them. It must give at least two chunks of tokens.
    #[arg(long, short = 'f', value_name = "TEXT")]
    pub file: PathBuf,
    /// Tokens per chunk; the first half is context, the second half is scored [default: 512, at most the
    /// model's context].
    #[arg(long, short = 'c', visible_alias = "ctx-size", value_name = "N")]
    pub ctx: Option<usize>,
    /// Evaluate at most N chunks, from the start of the text (default: every whole chunk).
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// Tokens per forward pass.
    #[arg(long, short = 'b', value_name = "N", default_value_t = DEFAULT_BATCH)]
    pub batch: usize,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't', value_name = "N", value_parser = super::common::parse_threads)]
    pub threads: Option<usize>,
    /// A base model with the same vocabulary (the F16 file, say; a file or an installed model's name): also report
    /// the KL divergence from it.
    #[arg(long, value_name = "BASE.gguf")]
    pub kl_base: Option<PathBuf>,
    /// text: llama-perplexity's figures; json: one object with every figure and its uncertainty.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(limit) = args.chunks
        && limit < 2
    {
        bail!("--chunks {limit}: at least two chunks are evaluated, as llama-perplexity requires");
    }
    let text = quarry::text::input::read_text(
        &args.file,
        quarry::text::input::MAX_SCORED_TEXT_BYTES,
        "text to score",
    )?;
    let engine = Engine::open_for_text(&args.model)?;
    let base = match &args.kl_base {
        Some(path) => Some(Engine::open_for_text(path)?),
        None => None,
    };
    if let Some(base) = &base {
        check_same_vocabulary(engine.tokenizer(), base.tokenizer())?;
    }
    let mut max_ctx = vec![(&args.model, engine.model.config.context_length)];
    if let (Some(path), Some(base)) = (&args.kl_base, &base) {
        max_ctx.push((path, base.model.config.context_length));
    }
    let ctx = args.ctx.unwrap_or_else(|| {
        max_ctx
            .iter()
            .map(|&(_, max)| max)
            .fold(DEFAULT_CTX, usize::min)
    });
    for (path, max) in max_ctx {
        if ctx > max {
            bail!(
                "--ctx {ctx} is more than the {max} tokens {} was trained for",
                path.display()
            );
        }
    }

    let mut tokens = engine.tokenizer().encode_as_text(&text)?;
    let in_text = tokens.len();
    let mut chunks = chunk_count(in_text, ctx)?;
    if let Some(limit) = args.chunks {
        chunks = chunks.min(limit);
        tokens.truncate(chunks * ctx);
    }
    eprintln!(
        "{}: {in_text} tokens; {} of {ctx} evaluated ({} tokens left out), the last {} of each \
         chunk scored",
        args.file.display(),
        super::format::plural(chunks, "chunk", "chunks"),
        in_text - chunks * ctx,
        ctx - 1 - ctx / 2,
    );
    let mut session = Session::new(&engine.model, ctx, args.batch);
    let mut base_session = base
        .as_ref()
        .map(|b| Session::new(&b.model, ctx, args.batch));
    let start = Instant::now();
    let report = evaluate(&mut session, base_session.as_mut(), &tokens, ctx, |r| {
        let per_chunk = start.elapsed().as_secs_f64() / r.chunks as f64;
        let mut line = format!(
            "[{}/{}] PPL {:.4}",
            r.chunks, r.chunks_total, r.perplexity.value
        );
        if let Some(d) = &r.divergence {
            line += &format!(
                ", KLD {:.6}, same top {:.2} %",
                d.kl_mean.value,
                100.0 * d.same_top.value
            );
        }
        eprintln!(
            "{line} ({per_chunk:.1} s per chunk, {:.0} s to go)",
            per_chunk * (r.chunks_total - r.chunks) as f64
        );
    })?;

    match args.format {
        OutputFormat::Json => {
            let mut v = serde_json::to_value(&report)?;
            v["model"] = args.model.display().to_string().into();
            v["file"] = args.file.display().to_string().into();
            v["text_tokens"] = in_text.into();
            v["kl_base"] = args
                .kl_base
                .as_deref()
                .map(|p| p.display().to_string())
                .into();
            v["seconds"] = start.elapsed().as_secs_f64().into();
            println!("{v}");
        }
        OutputFormat::Text => print_text(&report, &args.model, args.kl_base.as_deref()),
    }
    Ok(())
}

/// llama-perplexity's labels and layout, so the two tools' outputs read the same; values below 0.001 (a KL
/// divergence of 1e-6 between nearly identical files) are written in scientific notation, where fixed decimals
/// would show a zero or a single digit.
fn print_text(report: &Report, model: &Path, base: Option<&Path>) {
    let number = |v: f64, digits: usize| {
        if v != 0.0 && v.abs() < 1e-3 {
            format!("{v:>w$.3e}", w = digits + 4)
        } else {
            format!("{v:>w$.digits$}", w = digits + 4)
        }
    };
    let pm = |e: Estimate, digits: usize| {
        format!(
            "{} ± {}",
            number(e.value, digits),
            number(e.uncertainty, digits)
        )
    };
    let percent = |e: Estimate| {
        pm(
            Estimate {
                value: 100.0 * e.value,
                uncertainty: 100.0 * e.uncertainty,
            },
            3,
        ) + " %"
    };
    println!(
        "{}: {} of {} tokens, {} tokens scored",
        model.display(),
        super::format::plural(report.chunks, "chunk", "chunks"),
        report.ctx,
        report.scored
    );
    let Some(d) = &report.divergence else {
        println!("Final estimate: PPL = {}", pm(report.perplexity, 4));
        return;
    };
    if let Some(base) = base {
        println!("base: {}", base.display());
    }
    println!("====== Perplexity statistics ======");
    println!(
        "Mean PPL(Q)                   : {}",
        pm(report.perplexity, 6)
    );
    println!(
        "Mean PPL(base)                : {}",
        pm(d.base_perplexity, 6)
    );
    println!(
        "Mean ln(PPL(Q)/PPL(base))     : {}",
        pm(d.ln_perplexity_ratio, 6)
    );
    println!("====== KL divergence statistics ======");
    println!("Mean    KLD: {}", pm(d.kl_mean, 6));
    println!("Maximum KLD: {}", number(d.kl_max, 6));
    println!("99.0%   KLD: {}", number(d.kl_p99, 6));
    println!("Median  KLD: {}", number(d.kl_median, 6));
    println!("====== Token probability statistics ======");
    println!("RMS Δp    : {}", percent(d.delta_p_rms));
    println!("Same top p: {}", percent(d.same_top));
}
