//! `quarry perplexity` and `quarry::measure::perplexity` on the committed k-quant fixture (2 layers, hidden 256, 4
//! experts, a trained 400-token vocabulary), converted to F32, Q8_0 and Q4_0 by the project's converter.
//!
//! The fixture has random weights, so its perplexity is large (the model is confidently wrong about real text)
//! and KL figures only compare quantization types with each other.

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use quarry::engine::Engine;
use quarry::generate::Session;
use quarry::measure::perplexity::{PerplexityError, Report, check_same_vocabulary, evaluate};
use serde_json::Value;
use support::{engine_on, fixture_dir, gguf, kernel_sets, quarry, quarry_ok, temp_dir};

const FIXTURE: &str = "granitemoe-kquant-dev";
const CTX: usize = 64;

fn model(ty: &str) -> PathBuf {
    let dir = fixture_dir(FIXTURE).expect("the k-quant fixture is committed");
    gguf(FIXTURE, &dir, ty)
}

/// English text for the fixture's vocabulary: its reference prompts, twice (about 1060 tokens, 16 chunks of 64).
fn text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let dir = fixture_dir(FIXTURE).expect("the k-quant fixture is committed");
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let prompts: Vec<&str> = reference["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["text"].as_str().unwrap())
            .collect();
        let once = prompts.join("\n\n");
        format!("{once}\n\n{once}")
    })
}

fn text_file() -> PathBuf {
    let path = temp_dir("perplexity").join("text.txt");
    std::fs::write(&path, text()).unwrap();
    path
}

fn tokens(engine: &Engine) -> Vec<u32> {
    engine.tokenizer().encode_as_text(text()).unwrap()
}

/// `evaluate` of `ty` over the fixture text, against `base` when given.
fn measure(ty: &str, base: Option<&str>) -> Report {
    measure_on(kernel(), ty, base)
}

/// [`measure`] with the kernel set called `kernel`.
fn measure_on(kernel: &str, ty: &str, base: Option<&str>) -> Report {
    let engine = engine_on(kernel, &model(ty), true);
    let ids = tokens(&engine);
    let mut session = Session::new(&engine.model, CTX, 256);
    let base_engine = base.map(|b| engine_on(kernel, &model(b), true));
    let mut base_session = base_engine
        .as_ref()
        .map(|b| Session::new(&b.model, CTX, 256));
    let mut seen = 0;
    let report = evaluate(&mut session, base_session.as_mut(), &ids, CTX, |r| {
        seen += 1;
        assert_eq!(r.chunks, seen);
    })
    .unwrap();
    assert_eq!(seen, report.chunks_total);
    report
}

/// exp of the mean negative log-likelihood of the second half of each chunk, computed here from
/// `Session::feed_all_logits` over whole chunks, independently of `quarry::measure::perplexity`.
fn perplexity_by_hand(kernel: &str, path: &Path) -> (f64, usize) {
    let engine = engine_on(kernel, path, true);
    let ids = tokens(&engine);
    let vocab = engine.model.config.n_vocab;
    let (mut nll, mut count) = (0.0f64, 0usize);
    for chunk in ids.chunks_exact(CTX) {
        let mut session = Session::new(&engine.model, CTX, 256);
        let logits = session.feed_all_logits(chunk).unwrap();
        for pos in CTX / 2..CTX - 1 {
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            let max = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let log_sum = max
                + row
                    .iter()
                    .map(|&v| (f64::from(v) - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += log_sum - f64::from(row[chunk[pos + 1] as usize]);
            count += 1;
        }
    }
    ((nll / count as f64).exp(), count)
}

/// `evaluate` feeds each chunk's context half without logits and then the scored half, so the tokens reach the
/// kernels in other batches than in one whole-chunk pass. The portable set's products do not depend on how tokens
/// are batched, so there the two computations must agree exactly; the x86 sets add a row's block sums in another
/// order for a whole vector of tokens than for a few, and on these tiny random networks (router gaps down to
/// 0.002) that rounding can flip an expert: measured relative differences on AVX-512 Q4_0 1.9e-6 (F32 and Q8_0
/// bit-identical), on AVX2 Q8_0 3.3e-5 and Q4_0 2.8e-4, hence the bound of 1e-3 for them.
#[test]
fn perplexity_equals_an_independent_computation() {
    for kernel in ["portable", kernel()] {
        for ty in ["f32", "q8_0", "q4_0"] {
            let report = measure_on(kernel, ty, None);
            let (want, count) = perplexity_by_hand(kernel, &model(ty));
            assert!(report.tokens >= 16 * CTX, "{} tokens", report.tokens);
            assert_eq!(report.chunks, report.tokens / CTX);
            assert_eq!(report.scored, count);
            assert_eq!(report.scored, report.chunks * (CTX - 1 - CTX / 2));
            let got = report.perplexity.value;
            eprintln!(
                "{kernel} {ty}: perplexity {got}, by hand {want}, relative {:.1e}",
                (got - want).abs() / want
            );
            let bound = if kernel == "portable" { 0.0 } else { 1e-3 };
            assert!(
                (got - want).abs() <= bound * want,
                "{kernel} {ty}: perplexity {got}, by hand {want}"
            );
            assert!(report.perplexity.uncertainty > 0.0);
            assert!(report.divergence.is_none());
        }
    }
}

#[test]
fn a_model_does_not_diverge_from_itself() {
    let report = measure("q4_0", Some("q4_0"));
    let d = report.divergence.unwrap();
    assert_eq!(d.kl_mean.value, 0.0);
    assert_eq!((d.kl_max, d.kl_p99, d.kl_median), (0.0, 0.0, 0.0));
    assert_eq!(d.same_top.value, 1.0);
    assert_eq!(d.delta_p_rms.value, 0.0);
    assert_eq!(d.base_perplexity, report.perplexity);
    assert_eq!(d.ln_perplexity_ratio.value, 0.0);
}

/// Q4_0 rounds weights about 16 times more coarsely than Q8_0, so it must be further from F32.
#[test]
fn coarser_quantization_diverges_more() {
    let q8 = measure("q8_0", Some("f32")).divergence.unwrap();
    let q4 = measure("q4_0", Some("f32")).divergence.unwrap();
    eprintln!(
        "kquant fixture vs F32: Q8_0 KL {:.5} top-1 {:.4}; Q4_0 KL {:.5} top-1 {:.4}",
        q8.kl_mean.value, q8.same_top.value, q4.kl_mean.value, q4.same_top.value
    );
    assert!(q8.kl_mean.value > 0.0);
    assert!(
        q4.kl_mean.value
            > q8.kl_mean.value + 3.0 * (q4.kl_mean.uncertainty + q8.kl_mean.uncertainty),
        "Q4_0 {:?} vs Q8_0 {:?}",
        q4.kl_mean,
        q8.kl_mean
    );
    assert!(q4.same_top.value < q8.same_top.value);
    assert!(q4.kl_p99 > q8.kl_p99 && q8.kl_p99 > 0.0);
    assert!(q4.delta_p_rms.value > q8.delta_p_rms.value);
}

#[test]
fn library_errors() {
    let engine = Engine::open_for_text(&model("f32")).unwrap();
    let ids = tokens(&engine);
    let mut session = Session::new(&engine.model, CTX, 256);
    let err = evaluate(&mut session, None, &ids[..2 * CTX - 1], CTX, |_| {}).unwrap_err();
    assert!(
        matches!(err, PerplexityError::TooFewTokens { tokens, ctx: CTX, needed } if tokens == 2 * CTX - 1 && needed == 2 * CTX),
        "{err}"
    );
    assert!(evaluate(&mut session, None, &ids[..2 * CTX], CTX, |_| {}).is_ok());
    let err = evaluate(&mut session, None, &ids, CTX + 1, |_| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "a context of {} tokens does not fit: the model's context holds at most {CTX}",
            CTX + 1
        )
    );
    // A model with another output width, and one whose 400 tokens are different ones.
    let dev2 = Engine::open_for_text(&gguf(
        "granitemoe-dev-2",
        &fixture_dir("granitemoe-dev-2").unwrap(),
        "f32",
    ))
    .unwrap();
    let mut other = Session::new(&dev2.model, CTX, 256);
    let err = evaluate(&mut session, Some(&mut other), &ids, CTX, |_| {}).unwrap_err();
    assert!(
        err.to_string()
            .contains("the model has 400 output logits and the base model 300"),
        "{err}"
    );
    let dev1 = Engine::open_for_text(&gguf(
        "granitemoe-dev-1",
        &fixture_dir("granitemoe-dev-1").unwrap(),
        "f32",
    ))
    .unwrap();
    let err = check_same_vocabulary(engine.tokenizer(), dev1.tokenizer())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("the base model cannot be compared with this one: token "),
        "{err}"
    );
    assert!(check_same_vocabulary(engine.tokenizer(), engine.tokenizer()).is_ok());
}

/// The best kernel set here, the one `quarry perplexity` runs on.
fn kernel() -> &'static str {
    kernel_sets().last().copied().unwrap()
}

#[test]
fn cli_prints_the_library_figures() {
    let (f32_path, q4_path, file) = (model("f32"), model("q4_0"), text_file());
    let (f32_path, q4_path, file) = (
        f32_path.to_str().unwrap(),
        q4_path.to_str().unwrap(),
        file.to_str().unwrap(),
    );
    let ctx = CTX.to_string();
    let out = quarry_ok(
        kernel(),
        &[
            "perplexity",
            q4_path,
            "--file",
            file,
            "--ctx",
            &ctx,
            "--kl-base",
            f32_path,
            "--format",
            "json",
        ],
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let report = measure("q4_0", Some("f32"));
    let d = report.divergence.as_ref().unwrap();
    let close = |json: &Value, want: f64| {
        let got = json.as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    };
    close(&v["perplexity"]["value"], report.perplexity.value);
    close(&v["divergence"]["kl_mean"]["value"], d.kl_mean.value);
    close(&v["divergence"]["same_top"]["value"], d.same_top.value);
    close(&v["divergence"]["kl_p99"], d.kl_p99);
    assert_eq!(v["chunks"], report.chunks);
    assert_eq!(v["kl_base"], f32_path);

    let text = quarry_ok(
        kernel(),
        &[
            "perplexity",
            q4_path,
            "-f",
            file,
            "-c",
            &ctx,
            "--kl-base",
            f32_path,
        ],
    );
    for label in [
        "Mean PPL(Q)                   :",
        "Mean    KLD:",
        "99.0%   KLD:",
        "RMS Δp    :",
        "Same top p:",
    ] {
        assert!(text.contains(label), "{label} missing from\n{text}");
    }
    let text = quarry_ok(kernel(), &["perplexity", q4_path, "-f", file, "-c", &ctx]);
    let want = format!(
        "Final estimate: PPL = {:.4} ±",
        measure("q4_0", None).perplexity.value
    );
    assert!(text.contains(want.trim_start()), "{want} not in\n{text}");
}

/// Runs `quarry perplexity` expecting failure, and returns its stderr.
fn cli_error(args: &[&str]) -> String {
    let mut all = vec!["perplexity"];
    all.extend_from_slice(args);
    let out = quarry(kernel(), &all);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cli_bad_inputs_are_clear_errors() {
    let (f32_path, file) = (model("f32"), text_file());
    let (m, f) = (f32_path.to_str().unwrap(), file.to_str().unwrap());
    let err = cli_error(&[m, "--file", "/nonexistent/text.txt"]);
    assert!(
        err.contains("cannot read /nonexistent/text.txt: No such file"),
        "{err}"
    );

    let short = temp_dir("perplexity").join("short.txt");
    std::fs::write(&short, "Rust code compiles to fast native programs.").unwrap();
    let err = cli_error(&[m, "--file", short.to_str().unwrap(), "--ctx", "64"]);
    assert!(
        err.contains("but perplexity over chunks of 64 tokens needs at least 128 (two chunks"),
        "{err}"
    );
    assert!(err.contains("or a context of at most"), "{err}");
    // The default context is 512 tokens: the ~1060-token text gives two chunks.
    assert!(quarry_ok(kernel(), &["perplexity", m, "--file", f]).contains("2 chunks of 512"));

    let out = quarry_ok(
        kernel(),
        &["perplexity", m, "--file", f, "--ctx", "64", "--chunks", "3"],
    );
    assert!(
        out.contains("3 chunks of 64 tokens, 93 tokens scored"),
        "{out}"
    );
    let err = cli_error(&[m, "--file", f, "--chunks", "1"]);
    assert!(err.contains("--chunks 1: at least two chunks"), "{err}");
    let err = cli_error(&[m, "--file", f, "--ctx", "2000"]);
    assert!(
        err.contains("--ctx 2000 is more than the 1024 tokens"),
        "{err}"
    );
    let err = cli_error(&[m, "--file", f, "--ctx", "2"]);
    assert!(err.contains("a context of 2 tokens is too short"), "{err}");

    let binary = temp_dir("perplexity").join("binary.txt");
    std::fs::write(&binary, [b'a', 0xff, b'b']).unwrap();
    let err = cli_error(&[m, "--file", binary.to_str().unwrap()]);
    assert!(
        err.contains("is not UTF-8 text (a text to score must be): invalid byte at offset 1"),
        "{err}"
    );

    let dev1 = gguf(
        "granitemoe-dev-1",
        &fixture_dir("granitemoe-dev-1").unwrap(),
        "f32",
    );
    let err = cli_error(&[
        m,
        "--file",
        f,
        "--ctx",
        "64",
        "--kl-base",
        dev1.to_str().unwrap(),
    ]);
    assert!(
        err.contains("the base model cannot be compared with this one: token"),
        "{err}"
    );
    let err = cli_error(&[m, "--file", f, "--kl-base", "/nonexistent/base.gguf"]);
    assert!(err.contains("/nonexistent/base.gguf"), "{err}");
}
