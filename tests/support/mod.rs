//! Shared helpers of the runtime's integration tests: the fixture models, converted once per test process; the
//! model run in this process on a chosen kernel set; and the `quarry` binary driven the way users drive it.
#![allow(dead_code)] // each test binary uses a different subset

pub mod serve;
pub mod skip;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use quarry_quantize::{ConvertOptions, TargetType, convert};
use serde_json::Value;
pub use skip::skipped;

/// The model fixtures committed with the project (tiny random-weight Granite checkpoints with HF references).
pub const COMMITTED_MODELS: [&str; 4] = [
    "granitemoe-dev-1",
    "granitemoe-dev-2",
    "granite-dense-dev",
    "granitemoe-kquant-dev",
];
/// Carries the real Granite tokenizer, which must not be committed: read from `../shared` when present.
pub const SHARED_MODEL: &str = "granitemoe-realvocab-dev";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn shared() -> PathBuf {
    root().join("../shared")
}

/// The folder of a model fixture: committed ones from `tests/fixtures`, the real-vocabulary one from
/// `../shared/fixtures`; `None`, after [`skipped`], when that is absent.
pub fn fixture_dir(name: &str) -> Option<PathBuf> {
    let committed = root().join("tests/fixtures").join(name);
    if committed.is_dir() {
        return Some(committed);
    }
    let shared = shared().join("fixtures").join(name);
    if shared.is_dir() {
        return Some(shared);
    }
    skipped(&format!("fixture {name}"), &shared);
    None
}

/// Every model fixture available here.
pub fn all_fixtures() -> Vec<(String, PathBuf)> {
    COMMITTED_MODELS
        .iter()
        .chain([&SHARED_MODEL])
        .filter_map(|n| fixture_dir(n).map(|d| (n.to_string(), d)))
        .collect()
}

pub fn reference(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

/// `(name, input ids, logits file, greedy ids)` of each reference prompt.
pub fn prompts(reference: &Value) -> Vec<(String, Vec<u32>, String, Vec<u32>)> {
    let ids = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect::<Vec<_>>()
    };
    reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                ids(&p["input_ids"]),
                p["logits_file"].as_str().unwrap().to_string(),
                ids(&p["greedy_new_ids"]),
            )
        })
        .collect()
}

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Under cargo's per-project scratch folder; folders of earlier runs older than an hour are removed.
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                if e.file_name().to_string_lossy().starts_with("run-")
                    && old.is_some_and(|a| a.as_secs() > 3600)
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let d = base.join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// A fresh temporary folder for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let d = scratch().join(format!(
        "{tag}-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The fixture converted to `ty` (`f32`, `f16`, `q8_0`, `q4_0`), once per process.
pub fn gguf(name: &str, dir: &Path, ty: &str) -> PathBuf {
    static DONE: OnceLock<Mutex<HashMap<(String, String), PathBuf>>> = OnceLock::new();
    let done = DONE.get_or_init(Default::default);
    let key = (name.to_string(), ty.to_string());
    // Held while converting, so two tests wanting the same file do not write it at once.
    let mut done = done.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(p) = done.get(&key) {
        return p.clone();
    }
    let out = scratch().join(format!("{name}-{ty}.gguf"));
    let target: TargetType = ty.parse().unwrap();
    convert(&ConvertOptions::new(dir, &out, target))
        .unwrap_or_else(|e| panic!("converting {name} to {ty}: {e}"));
    done.insert(key, out.clone());
    out
}

/// Runs the `quarry` binary with `QUARRY_KERNEL` set to `kernel`.
pub fn quarry(kernel: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quarry"))
        .env("QUARRY_KERNEL", kernel)
        .args(args)
        .output()
        .expect("quarry runs")
}

/// Runs `quarry`, insisting on success, and returns its stdout.
pub fn quarry_ok(kernel: &str, args: &[&str]) -> String {
    let out = quarry(kernel, args);
    assert!(
        out.status.success(),
        "quarry {args:?} (kernel {kernel}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The names of the kernel sets this CPU can run.
pub fn kernel_sets() -> Vec<&'static str> {
    quarry::kernels::available()
        .iter()
        .map(|k| k.name)
        .collect()
}

pub fn ids_arg(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The kernel set called `name` (one of [`kernel_sets`]).
pub fn kernel_set(name: &str) -> &'static quarry::kernels::Kernels {
    quarry::kernels::available()
        .into_iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| panic!("kernel set {name} is not available on this CPU"))
}

/// `model` opened in this process, computing on the kernel set called `kernel`.
pub fn engine_on(kernel: &str, model: &Path, for_text: bool) -> quarry::engine::Engine {
    use quarry::engine::Engine;
    let mut engine = if for_text {
        Engine::open_for_text(model)
    } else {
        Engine::open(model)
    }
    .unwrap_or_else(|e| panic!("opening {}: {e}", model.display()));
    engine.model.set_kernels(kernel_set(kernel));
    engine
}

/// The logits of every position of `ids` with the given kernel set, `[tokens][vocab]`, computed as
/// `quarry logits` computes them (prompt batches of the default size; `--one-by-one` feeds one token at a time
/// through the KV cache), in this process.
pub fn logits(kernel: &str, model: &Path, ids: &[u32], extra: &[&str]) -> (Vec<usize>, Vec<f32>) {
    use quarry::generate::{DEFAULT_BATCH, Session};
    let one_by_one = match extra {
        [] => false,
        ["--one-by-one"] => true,
        other => panic!("logits: unexpected options {other:?}"),
    };
    let engine = engine_on(kernel, model, false);
    let ctx = engine.default_context().max(ids.len());
    let mut session = Session::new(&engine.model, ctx, DEFAULT_BATCH);
    let logits = if one_by_one {
        let mut all = vec![];
        for &id in ids {
            all.extend_from_slice(session.feed(&[id]).unwrap());
        }
        all
    } else {
        session.feed_all_logits(ids).unwrap()
    };
    (vec![ids.len(), engine.model.config.n_vocab], logits)
}

/// `quarry logits` itself, through the binary with `QUARRY_KERNEL=kernel`: `[tokens][vocab]`.
pub fn logits_cli(kernel: &str, model: &Path, ids: &[u32]) -> (Vec<usize>, Vec<f32>) {
    let out = temp_dir("logits").join("l.npy");
    let ids_text = ids_arg(ids);
    let args = [
        "logits",
        model.to_str().unwrap(),
        "--prompt-ids",
        &ids_text,
        "--out",
        out.to_str().unwrap(),
    ];
    quarry_ok(kernel, &args);
    read_npy(&out)
}

pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    quarry::measure::npy::read_f32(std::fs::File::open(path).unwrap()).unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

/// Mean KL(reference || got) over positions, and top-1 agreement, of two `[positions][vocab]` logit arrays.
pub fn kl_and_top1(reference: &[f32], got: &[f32], vocab: usize) -> (f64, f64) {
    let softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect()
    };
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .fold(0, |b, (i, &v)| if v > row[b] { i } else { b })
    };
    let n = reference.len() / vocab;
    let (mut kl, mut agree) = (0.0, 0usize);
    for (r, g) in reference.chunks_exact(vocab).zip(got.chunks_exact(vocab)) {
        let (p, q) = (softmax(r), softmax(g));
        kl += p
            .iter()
            .zip(&q)
            .filter(|(p, _)| **p > 0.0)
            .map(|(p, q)| p * (p.ln() - q.max(1e-30).ln()))
            .sum::<f64>();
        agree += usize::from(argmax(r) == argmax(g));
    }
    (kl / n as f64, agree as f64 / n as f64)
}

/// The greedy continuation of `ids` (at most `n` tokens, ending with the end-of-text id where generation stopped
/// on it), decoded token by token through the KV cache as `quarry run --temperature 0` decodes it, in this
/// process with the given kernel set.
pub fn greedy(kernel: &str, model: &Path, ids: &[u32], n: usize) -> Vec<u32> {
    use quarry::generate::{DEFAULT_BATCH, Session, generate};
    use quarry::sampling::{Sampler, SamplingParams};
    let engine = engine_on(kernel, model, true);
    let ctx = engine.default_context();
    let mut session = Session::new(&engine.model, ctx, DEFAULT_BATCH);
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let mut out = vec![];
    let eos = engine.tokenizer().eos_id();
    generate(&mut session, ids, &mut sampler, n, &[eos], |id| {
        out.push(id);
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    out
}

/// `quarry run --prompt-ids ... --temperature 0 --format json` itself, through the binary with
/// `QUARRY_KERNEL=kernel`: the greedy continuation's ids.
pub fn greedy_cli(kernel: &str, model: &Path, ids: &[u32], n: usize) -> Vec<u32> {
    let ids_text = ids_arg(ids);
    let n_text = n.to_string();
    let out = quarry_ok(
        kernel,
        &[
            "run",
            model.to_str().unwrap(),
            "--prompt-ids",
            &ids_text,
            "--temperature",
            "0",
            "-n",
            &n_text,
            "--format",
            "json",
        ],
    );
    let v: Value =
        serde_json::from_str(out.trim()).expect("run --format json prints one JSON object");
    v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A copy of `model` with every tensor dequantized to F32 and the same metadata: the exact math of the
/// quantized weights, for telling weight rounding apart from the engine's own arithmetic.
pub fn dequantized_copy(model: &Path) -> PathBuf {
    use quarry::gguf::{GgmlType, GgufFile, GgufWriter, TensorSpec};
    let file = GgufFile::open(model).unwrap();
    let specs: Vec<TensorSpec> = file
        .tensors()
        .iter()
        .map(|t| TensorSpec::new(&t.name, &t.dims, GgmlType::F32))
        .collect();
    let meta: Vec<_> = file
        .metadata()
        .iter()
        .filter(|(k, _)| k != "general.file_type")
        .cloned()
        .chain([("general.file_type".to_string(), quarry::gguf::Value::U32(0))])
        .collect();
    let out_path = temp_dir("dequantized").join("f32.gguf");
    let mut w = GgufWriter::new(
        std::io::BufWriter::new(std::fs::File::create(&out_path).unwrap()),
        &meta,
        specs,
    )
    .unwrap();
    for t in file.tensors() {
        let data = file.tensor_data(t);
        let mut values = vec![0.0f32; t.n_elements() as usize];
        quarry_quantize::convert::decode_values(t.ty, &data, &mut values);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_tensor(&t.name, &bytes).unwrap();
    }
    w.finish().unwrap();
    out_path
}

/// xorshift64: pseudo-random numbers that are the same on every run, without a dependency.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// In [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Every file under `dir`, relative to it, sorted (folders only through their files).
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// `quarry ARGS` with its store in `home` and the Hugging Face endpoint at `endpoint` (a test server), with no
/// token and no proxy from the caller's environment.
pub fn hub_command(home: &Path, endpoint: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quarry"));
    cmd.args(args)
        .env("QUARRY_HOME", home)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN");
    for proxy in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(proxy);
    }
    cmd
}

/// `good` with metadata `key` set to the string `value`, everything else (tensors included) as it was.
pub fn with_string_metadata(good: &quarry::gguf::GgufFile, key: &str, value: &str) -> Vec<u8> {
    use quarry::gguf::{GgufWriter, TensorSpec, Value};
    let mut metadata = good.metadata().to_vec();
    let slot = metadata.iter_mut().find(|(k, _)| k == key).unwrap();
    slot.1 = Value::String(value.to_string());
    let specs = good
        .tensors()
        .iter()
        .map(|t| TensorSpec::new(t.name.clone(), &t.dims, t.ty))
        .collect();
    let mut w = GgufWriter::new(Vec::new(), &metadata, specs).unwrap();
    for t in good.tensors() {
        w.write_tensor(&t.name, &good.tensor_data(t)).unwrap();
    }
    w.finish().unwrap()
}
