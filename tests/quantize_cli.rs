//! `quarry quantize` through the command line for the k-quant types and GGUF inputs (requantizing): the summary,
//! the refusal of already-quantized inputs and `--allow-requantize`. The converter and `requantize` themselves are
//! tested in `quantize/tests/`.

mod support;

use support::*;

#[test]
fn requantizes_a_gguf_file_and_converts_to_k_quants() {
    let dir = fixture_dir("granitemoe-kquant-dev").unwrap();
    let f32_file = gguf("granitemoe-kquant-dev", &dir, "f32");
    let tmp = temp_dir("quantize-cli");
    let out = |name: &str| tmp.join(name).to_str().unwrap().to_string();

    // a folder straight to Q4_K_M, and the F32 file requantized to Q4_K_M: the same file
    let direct = out("direct.gguf");
    let summary = quarry_ok(
        "scalar",
        &[
            "quantize",
            dir.to_str().unwrap(),
            "-o",
            &direct,
            "--type",
            "q4_k_m",
        ],
    );
    assert!(
        summary.contains("(granitemoe, q4_k_m): 22 tensors (3 q6_K, 7 f32, 12 q4_K)"),
        "{summary}"
    );
    let requantized = out("requantized.gguf");
    let summary = quarry_ok(
        "scalar",
        &[
            "quantize",
            f32_file.to_str().unwrap(),
            "-o",
            &requantized,
            "--type",
            "Q4_K_M",
        ],
    );
    assert!(summary.contains("wrote"), "{summary}");
    assert!(std::fs::read(&direct).unwrap() == std::fs::read(&requantized).unwrap());

    // an already-quantized input is refused, naming the file, the tensor and the way out
    let q6 = out("q6.gguf");
    quarry_ok(
        "scalar",
        &[
            "quantize",
            f32_file.to_str().unwrap(),
            "-o",
            &q6,
            "--type",
            "q6_k",
        ],
    );
    let refused = quarry(
        "scalar",
        &["quantize", &q6, "-o", &out("x.gguf"), "--type", "q4_k_m"],
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains(&q6)
            && err.contains("already quantized")
            && err.contains("--allow-requantize"),
        "{err}"
    );
    assert!(!tmp.join("x.gguf").exists() && !tmp.join("x.gguf.part").exists());

    // ... and allowed with --allow-requantize, with warnings on stderr
    let allowed = quarry(
        "scalar",
        &[
            "quantize",
            &q6,
            "-o",
            &out("x.gguf"),
            "--type",
            "q4_k_m",
            "--allow-requantize",
        ],
    );
    let err = String::from_utf8_lossy(&allowed.stderr);
    assert!(allowed.status.success(), "{err}");
    assert!(
        err.contains("were already quantized and were dequantized first"),
        "{err}"
    );

    // --allow-requantize means nothing for a folder
    let folder = quarry(
        "scalar",
        &[
            "quantize",
            dir.to_str().unwrap(),
            "-o",
            &out("y.gguf"),
            "--allow-requantize",
        ],
    );
    assert!(!folder.status.success());
    assert!(String::from_utf8_lossy(&folder.stderr).contains("applies to a GGUF input"));

    // a missing .gguf path is reported by the GGUF reader, not as a folder without config.json
    let missing = out("missing.gguf");
    let gone = quarry("scalar", &["quantize", &missing, "-o", &out("z.gguf")]);
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(
        err.contains(&missing) && err.contains("cannot open"),
        "{err}"
    );
}

#[test]
fn fallbacks_are_listed() {
    // dev-1's rows are 64 and 16 wide: no k-quant block fits
    let dir = fixture_dir("granitemoe-dev-1").unwrap();
    let tmp = temp_dir("quantize-cli-fallback");
    let out = tmp.join("q4km.gguf");
    let summary = quarry_ok(
        "scalar",
        &[
            "quantize",
            dir.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--type",
            "q4_k_m",
        ],
    );
    assert!(
        summary.contains("written at another type because their rows are not whole blocks"),
        "{summary}"
    );
    assert!(
        summary.contains(": q8_0 (q4_K needs rows of a multiple of 256)"),
        "{summary}"
    );
    assert!(
        summary.contains(": f16 (q4_K needs rows of a multiple of 256)"),
        "{summary}"
    );
}
