//! `quarry bench MODEL -p 512 -n 128 -t 1,2 -r 3 [-o json]`: speed in llama-bench's terms and output formats;
//! `--depth N` (llama-bench's `-d`) and `--parallel B` (llama-batched-bench's `-npl`) for long contexts and
//! many sequences.

use std::path::PathBuf;

use anyhow::Context;
use quarry::engine::Engine;
use quarry::measure::bench::{BenchResult, run_parallel_test, run_test};
use serde_json::json;

use super::format::human_bytes;

/// Measure prompt processing (pp) and generation (tg) speed like llama-bench, whose output formats it shares.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF model file, or an installed model: its name (`quarry list`) or the Hugging Face repo id it was
    /// pulled from (org/name).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// Prompt lengths to test, comma-separated (0 skips the prompt test).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Generation lengths to test, comma-separated (0 skips the generation test).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Thread counts to test, comma-separated (default: all cores).
    #[arg(short = 't', long = "threads", value_delimiter = ',', value_parser = super::common::parse_threads)]
    pub threads: Vec<usize>,
    /// Repetitions of each test (after one warm-up run).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub reps: usize,
    /// Prompt tokens per forward pass.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch: usize,
    /// Tokens already in the context before each test, comma-separated (llama-bench's -d): the speed of a long
    /// conversation.
    #[arg(
        short = 'd',
        long = "depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub depth: Vec<usize>,
    /// Sequences run together, comma-separated (llama-batched-bench's -npl): each reads its own -p prompt, then
    /// all generate -n tokens together; t/s counts every sequence's tokens.
    #[arg(long = "parallel", value_delimiter = ',', value_name = "B")]
    pub parallel: Vec<usize>,
    /// How the KV cache stores keys and values: f32, f16 or q8_0 (default f16 for a quantized
    /// model, f32 for a float one).
    #[arg(long = "cache-type", short = 'k', value_name = "TYPE")]
    pub cache_type: Option<quarry::model::KvType>,
    /// Also measure memory read bandwidth and print the decode ceiling it implies (bandwidth / weight bytes read
    /// per token).
    #[arg(long)]
    pub bandwidth: bool,
    /// Output format: md (a table, default) or json (llama-bench's JSON array of records).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = BenchFormat::Md)]
    pub output: BenchFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchFormat {
    Md,
    Json,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    check_args(&args)?;
    let engine = Engine::open(&args.model)?;
    let ctx = engine.model.config.context_length;
    let cache = args
        .cache_type
        .unwrap_or_else(|| engine.default_cache_type());
    for &d in &args.depth {
        for &p in &args.n_prompt {
            for &g in &args.n_gen {
                anyhow::ensure!(
                    d + p + g <= ctx,
                    "-d {d} -p {p} -n {g} needs {} positions but the model's context is {ctx}",
                    d + p + g
                );
            }
        }
    }
    let model = &engine.model;
    let threads = if args.threads.is_empty() {
        vec![std::thread::available_parallelism().map_or(1, |n| n.get())]
    } else {
        args.threads.clone()
    };
    let model_size: u64 = engine.file.tensors().iter().map(|t| t.size).sum();
    let n_params: u64 = engine.file.tensors().iter().map(|t| t.n_elements()).sum();
    let model_type = format!(
        "{} {} {}",
        model.config.arch.gguf_name(),
        size_label(n_params),
        engine
            .file
            .get("general.file_type")
            .and_then(|v| v.as_u64())
            .and_then(quarry::gguf::file_type_name)
            .unwrap_or("?")
    );
    let kernels = engine.model.kernels().name;
    let mut results: Vec<BenchResult> = Vec::new();
    if args.output == BenchFormat::Md {
        println!("| model | size | params | backend | threads | test | t/s |");
        println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    }
    for &t in &threads {
        anyhow::ensure!(t > 0, "thread counts must be at least 1");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .context("starting worker threads")?;
        let mut run_one = |r: BenchResult| {
            if args.output == BenchFormat::Md {
                println!(
                    "| {model_type} | {} | {:.2} B | CPU ({kernels}) | {t} | {} | {:.2} ± {:.2} |",
                    human_bytes(model_size, 2),
                    n_params as f64 / 1e9,
                    test_label(&r),
                    r.avg_ts(),
                    r.stddev_ts()
                );
            }
            results.push(r);
        };
        if args.parallel.is_empty() {
            for &d in &args.depth {
                let tests = args
                    .n_prompt
                    .iter()
                    .filter(|&&p| p > 0)
                    .map(|&p| (p, 0))
                    .chain(args.n_gen.iter().filter(|&&g| g > 0).map(|&g| (0, g)));
                for (p, g) in tests {
                    run_one(
                        pool.install(|| run_test(model, p, g, d, args.batch, args.reps, cache))?,
                    );
                }
            }
        } else {
            for &b in &args.parallel {
                for &p in &args.n_prompt {
                    for &g in &args.n_gen {
                        let (pp, tg) = pool.install(|| {
                            run_parallel_test(model, b, p.max(1), g, args.batch, args.reps, cache)
                        })?;
                        if p > 0 {
                            run_one(pp);
                        }
                        if g > 0 {
                            run_one(tg);
                        }
                    }
                }
            }
        }
        if args.bandwidth {
            let bw = pool.install(quarry::measure::bench::read_bandwidth);
            let per_token = quarry::measure::bench::weight_bytes_per_token(model);
            eprintln!(
                "threads {t}: memory read bandwidth {:.1} GB/s; {} of weights per token -> decode ceiling {:.1} tok/s",
                bw / 1e9,
                human_bytes(per_token, 2),
                bw / per_token as f64
            );
        }
    }
    if args.output == BenchFormat::Json {
        let records: Vec<_> = results
            .iter()
            .map(|r| {
                json!({
                    "build_commit": env!("CARGO_PKG_VERSION"),
                    "build_number": 0,
                    "cpu_info": cpu_name(),
                    "gpu_info": "",
                    "backends": format!("CPU ({kernels})"),
                    "model_filename": args.model,
                    "model_type": model_type,
                    "model_size": model_size,
                    "model_n_params": n_params,
                    "n_batch": r.n_batch,
                    "n_ubatch": r.n_batch,
                    "n_threads": r.n_threads,
                    "type_k": cache.name(),
                    "type_v": cache.name(),
                    "n_gpu_layers": 0,
                    "use_mmap": true,
                    "n_prompt": r.n_prompt,
                    "n_gen": r.n_gen,
                    "n_depth": r.n_depth,
                    "n_parallel": r.n_parallel,
                    "avg_ns": r.avg_ns() as u64,
                    "stddev_ns": r.stddev_ns() as u64,
                    "avg_ts": r.avg_ts(),
                    "stddev_ts": r.stddev_ts(),
                    "samples_ns": r.samples_ns,
                    "samples_ts": r.samples_ts(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&records)?);
    }
    Ok(())
}

/// Refuses arguments that would measure nothing or something else, before any work.
fn check_args(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.reps > 0, "-r must be at least 1");
    anyhow::ensure!(args.batch > 0, "-b must be at least 1");
    anyhow::ensure!(
        args.parallel.iter().all(|&b| b > 0),
        "--parallel counts must be at least 1"
    );
    anyhow::ensure!(
        args.parallel.is_empty() || args.depth.iter().all(|&d| d == 0),
        "--depth and --parallel measure different things; give one of them"
    );
    anyhow::ensure!(
        args.n_prompt.iter().any(|&p| p > 0) || args.n_gen.iter().any(|&g| g > 0),
        "-p and -n are both 0: there is nothing to measure"
    );
    Ok(())
}

/// llama-bench's test names (`pp512`, `tg128 @ d3500`), with the sequence count of a parallel test.
fn test_label(r: &BenchResult) -> String {
    let mut name = r.test_name();
    if r.n_depth > 0 {
        name.push_str(&format!(" @ d{}", r.n_depth));
    }
    if r.n_parallel > 1 {
        name.push_str(&format!(" x{}", r.n_parallel));
    }
    name
}

/// "1B", "3B", "350M": llama.cpp's coarse size label from the parameter count.
fn size_label(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{}B", (n as f64 / 1e9).round().max(1.0))
    } else {
        format!("{}M", (n as f64 / 1e6).round())
    }
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default()
}
