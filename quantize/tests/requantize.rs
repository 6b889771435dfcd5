//! `requantize`: a GGUF file to the same model at another type, with the converter's type recipe.
//!
//! The strongest check is that requantizing an F32 conversion gives, byte for byte, the file converting straight to
//! the target gives; then the float inputs (F16, BF16), the metadata carried over, quantized inputs (refused, or
//! dequantized with `allow_requantize`), llama.cpp's own files, and every kind of bad input.

mod support;

use std::path::{Path, PathBuf};

use quarry_quantize::blocks::{
    BlockIQ4NL, BlockIQ4XS, BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, dequantize_iq4_nl,
    dequantize_iq4_xs, dequantize_q6_k, quantize_iq4_nl, quantize_iq4_xs, quantize_q4_0,
    quantize_q4_k, quantize_q5_k, quantize_q6_k, quantize_q8_0,
};
use quarry_quantize::gguf::{GgmlType, GgufFile, GgufWriter, TensorSpec, Value};
use quarry_quantize::{
    ConvertError, ConvertOptions, RequantizeOptions, TargetType, convert, requantize,
};

const MODELS: [&str; 4] = [
    "granitemoe-dev-1",
    "granitemoe-dev-2",
    "granite-dense-dev",
    "granitemoe-kquant-dev",
];

fn model_dir(name: &str) -> PathBuf {
    support::fixtures().join(name)
}

/// Converts fixture `model` to `target` into `dir/name`.
fn converted(model: &str, target: TargetType, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    convert(&ConvertOptions::new(model_dir(model), &out, target)).unwrap();
    out
}

fn values_of(file: &GgufFile, name: &str) -> Vec<f32> {
    let info = file.tensor(name).unwrap();
    let bytes = file.tensor_data(info);
    match info.ty {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
        GgmlType::Q6_K => {
            let blocks: Vec<BlockQ6K> = bytes
                .chunks_exact(210)
                .map(bytemuck::pod_read_unaligned)
                .collect();
            let mut out = vec![0.0; blocks.len() * 256];
            dequantize_q6_k(&blocks, &mut out);
            out
        }
        GgmlType::IQ4_NL => {
            let blocks: Vec<BlockIQ4NL> = bytes
                .chunks_exact(18)
                .map(bytemuck::pod_read_unaligned)
                .collect();
            let mut out = vec![0.0; blocks.len() * 32];
            dequantize_iq4_nl(&blocks, &mut out);
            out
        }
        GgmlType::IQ4_XS => {
            let blocks: Vec<BlockIQ4XS> = bytes
                .chunks_exact(136)
                .map(bytemuck::pod_read_unaligned)
                .collect();
            let mut out = vec![0.0; blocks.len() * 256];
            dequantize_iq4_xs(&blocks, &mut out);
            out
        }
        other => panic!("{name}: {other}"),
    }
}

/// The bytes of `x` in type `ty`, by the reference quantizers.
fn encode(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    fn blocks<B: bytemuck::Pod>(x: &[f32], len: usize, q: fn(&[f32], &mut [B])) -> Vec<u8> {
        let mut b = vec![B::zeroed(); x.len() / len];
        q(x, &mut b);
        bytemuck::cast_slice(&b).to_vec()
    }
    match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => blocks::<BlockQ8_0>(x, 32, quantize_q8_0),
        GgmlType::Q4_0 => blocks::<BlockQ4_0>(x, 32, quantize_q4_0),
        GgmlType::Q4_K => blocks::<BlockQ4K>(x, 256, quantize_q4_k),
        GgmlType::Q5_K => blocks::<BlockQ5K>(x, 256, quantize_q5_k),
        GgmlType::Q6_K => blocks::<BlockQ6K>(x, 256, quantize_q6_k),
        GgmlType::IQ4_NL => blocks::<BlockIQ4NL>(x, 32, quantize_iq4_nl),
        GgmlType::IQ4_XS => blocks::<BlockIQ4XS>(x, 256, quantize_iq4_xs),
        other => panic!("{other}"),
    }
}

/// Writes a copy of `src` with edited metadata and, for the tensors `retype` returns `Some` for, another type and
/// data.
fn rewrite(
    src: &GgufFile,
    out: &Path,
    edit: impl Fn(&mut Vec<(String, Value)>),
    retype: impl Fn(&str) -> Option<(GgmlType, Vec<u8>)>,
) {
    let mut metadata = src.metadata().to_vec();
    edit(&mut metadata);
    let mut specs = Vec::new();
    let mut data = Vec::new();
    for t in src.tensors() {
        let (ty, bytes) = retype(&t.name).unwrap_or_else(|| (t.ty, src.tensor_data(t).to_vec()));
        specs.push(TensorSpec::new(t.name.clone(), &t.dims, ty));
        data.push((t.name.clone(), bytes));
    }
    let mut w = GgufWriter::new(Vec::new(), &metadata, specs).unwrap();
    for (name, bytes) in &data {
        w.write_tensor(name, bytes).unwrap();
    }
    std::fs::write(out, w.finish().unwrap()).unwrap();
}

fn set(metadata: &mut [(String, Value)], key: &str, value: Value) {
    metadata.iter_mut().find(|(k, _)| k == key).unwrap().1 = value;
}

#[test]
fn requantizing_an_f32_conversion_equals_converting_directly() {
    let tmp = tempfile::tempdir().unwrap();
    for model in MODELS {
        let f32_file = converted(
            model,
            TargetType::F32,
            tmp.path(),
            &format!("{model}-f32.gguf"),
        );
        for target in TargetType::ALL {
            let direct = converted(model, target, tmp.path(), "direct.gguf");
            let out = tmp.path().join("requantized.gguf");
            let report = requantize(&RequantizeOptions::new(&f32_file, &out, target)).unwrap();
            assert!(
                std::fs::read(&out).unwrap() == std::fs::read(&direct).unwrap(),
                "{model} {target}: requantized file differs from the conversion"
            );
            assert!(report.dequantized.is_empty());
            assert_eq!(report.file_bytes, std::fs::metadata(&out).unwrap().len());
            assert_eq!(report.target, target);
            assert!(
                !support::files_in(tmp.path())
                    .iter()
                    .any(|f| f.ends_with(".part"))
            );
        }
    }
}

#[test]
fn f16_and_bf16_inputs_are_quantized_from_their_values() {
    let tmp = tempfile::tempdir().unwrap();
    let f16_path = converted(
        "granitemoe-kquant-dev",
        TargetType::F16,
        tmp.path(),
        "f16.gguf",
    );
    let f16_file = GgufFile::open(&f16_path).unwrap();
    // a BF16 file of the same model: every F16 tensor as bf16 (truncated), the F32 ones kept
    let bf16_path = tmp.path().join("bf16.gguf");
    rewrite(
        &f16_file,
        &bf16_path,
        |_| {},
        |name| {
            let info = f16_file.tensor(name).unwrap();
            (info.ty == GgmlType::F16).then(|| {
                let bytes = values_of(&f16_file, name)
                    .iter()
                    .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
                    .collect();
                (GgmlType::BF16, bytes)
            })
        },
    );
    let bf16_file = GgufFile::open(&bf16_path).unwrap();
    for (input, file) in [(&f16_path, &f16_file), (&bf16_path, &bf16_file)] {
        for target in [TargetType::Q4_K_M, TargetType::Q8_0, TargetType::F16] {
            let out = tmp.path().join("out.gguf");
            requantize(&RequantizeOptions::new(input, &out, target)).unwrap();
            let result = GgufFile::open(&out).unwrap();
            let direct = GgufFile::open(converted(
                "granitemoe-kquant-dev",
                target,
                tmp.path(),
                "direct.gguf",
            ))
            .unwrap();
            for t in result.tensors() {
                // same types as a conversion, and the bytes of quantizing the input's values
                assert_eq!(
                    t.ty,
                    direct.tensor(&t.name).unwrap().ty,
                    "{target} {}",
                    t.name
                );
                let want = encode(t.ty, &values_of(file, &t.name));
                assert!(
                    *result.tensor_data(t) == *want,
                    "{} -> {target}: {}",
                    input.display(),
                    t.name
                );
            }
        }
    }
}

#[test]
fn metadata_is_carried_over_with_the_new_file_type() {
    let tmp = tempfile::tempdir().unwrap();
    let src = converted("granitemoe-dev-1", TargetType::F16, tmp.path(), "f16.gguf");
    let f16 = GgufFile::open(&src).unwrap();
    // an extra key, a split key of a one-part file, and no quantization version: what other tools write
    let edited = tmp.path().join("edited.gguf");
    rewrite(
        &f16,
        &edited,
        |m| {
            m.retain(|(k, _)| k != "general.quantization_version");
            m.push(("general.license".into(), Value::String("apache-2.0".into())));
            m.push(("split.count".into(), Value::U16(1)));
        },
        |_| None,
    );
    let out = tmp.path().join("q6.gguf");
    let report = requantize(&RequantizeOptions {
        model_name: Some("renamed".into()),
        ..RequantizeOptions::new(&edited, &out, TargetType::Q6_K)
    })
    .unwrap();
    assert_eq!(report.target, TargetType::Q6_K);
    let q6 = GgufFile::open(&out).unwrap();
    let get = |k: &str| q6.get(k).cloned();
    assert_eq!(get("general.file_type"), Some(Value::U32(18)));
    assert_eq!(get("general.quantization_version"), Some(Value::U32(2)));
    assert_eq!(get("general.name"), Some(Value::String("renamed".into())));
    assert_eq!(
        get("general.license"),
        Some(Value::String("apache-2.0".into()))
    );
    assert_eq!(get("split.count"), None);
    // everything else as in the input, in the input's order
    let keys = |f: &GgufFile| -> Vec<String> {
        f.metadata()
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| k != "split.count" && k != "general.quantization_version")
            .collect()
    };
    assert_eq!(keys(&q6), keys(&GgufFile::open(&edited).unwrap()));
    for (k, v) in f16.metadata() {
        if !["general.file_type", "general.name"].contains(&k.as_str()) {
            assert!(q6.get(k) == Some(v), "{k}");
        }
    }
    // dev-1's rows are 64 wide (16 for ffn_down): every k-quant matrix fell back to Q8_0 (F16 for the 16-wide
    // rows), and the report says so
    assert!(report.fallbacks().any(|t| t.ty == GgmlType::Q8_0));
    assert!(report.fallbacks().all(|t| {
        let fits_32 = t.dims[0] % 32 == 0;
        t.fell_back_from == Some(GgmlType::Q6_K)
            && t.ty
                == if fits_32 {
                    GgmlType::Q8_0
                } else {
                    GgmlType::F16
                }
    }));
}

#[test]
fn quantized_inputs_are_refused_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let q6_path = converted(
        "granitemoe-kquant-dev",
        TargetType::Q6_K,
        tmp.path(),
        "q6.gguf",
    );
    let out = tmp.path().join("out.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    let err = requantize(&RequantizeOptions::new(&q6_path, &out, TargetType::Q4_K_M)).unwrap_err();
    assert!(
        matches!(&err, ConvertError::AlreadyQuantized { tensor, ty: GgmlType::Q6_K, .. } if tensor == "blk.0.attn_q.weight"),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&q6_path.display().to_string()) && message.contains("--allow-requantize"),
        "{message}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me", "OUT was touched");
    assert!(!tmp.path().join("out.gguf.part").exists());

    // The same type is a copy, quantized or not: Q6_K -> Q6_K needs no permission and changes nothing.
    let same = tmp.path().join("same.gguf");
    requantize(&RequantizeOptions::new(&q6_path, &same, TargetType::Q6_K)).unwrap();
    assert!(std::fs::read(&same).unwrap() == std::fs::read(&q6_path).unwrap());

    // Allowed: dequantized, then quantized like any float input; the tensors are listed.
    let report = requantize(&RequantizeOptions {
        allow_requantize: true,
        ..RequantizeOptions::new(&q6_path, &out, TargetType::Q4_K_M)
    })
    .unwrap();
    let q6 = GgufFile::open(&q6_path).unwrap();
    let q4 = GgufFile::open(&out).unwrap();
    let mut listed: Vec<&str> = report.dequantized.iter().map(|(n, _)| n.as_str()).collect();
    listed.sort();
    let mut changed: Vec<&str> = q4
        .tensors()
        .iter()
        .filter(|t| t.ty != q6.tensor(&t.name).unwrap().ty)
        .map(|t| t.name.as_str())
        .collect();
    changed.sort();
    assert_eq!(listed, changed);
    assert_eq!(
        listed.len(),
        12,
        "all but the 3 tensors Q4_K_M keeps at Q6_K"
    );
    assert!(
        report
            .dequantized
            .iter()
            .all(|(_, ty)| *ty == GgmlType::Q6_K)
    );
    for t in q4.tensors() {
        let source = q6.tensor(&t.name).unwrap();
        let want = if source.ty == t.ty {
            q6.tensor_data(source).to_vec()
        } else {
            encode(t.ty, &values_of(&q6, &t.name))
        };
        assert!(*q4.tensor_data(t) == *want, "{}", t.name);
    }
}

/// IQ4 inputs (llama.cpp's or ours) are read back through the reference dequantizers: refused by default, and
/// with `allow_requantize` each tensor becomes the target type's encoding of its dequantized values.
#[test]
fn iq4_inputs_are_dequantized_when_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    // kquant-dev at IQ4_XS holds IQ4_XS matrices; dev-1 at IQ4_XS holds IQ4_NL ones (64-wide rows) and F16 ones
    for (model, input_types) in [
        ("granitemoe-kquant-dev", GgmlType::IQ4_XS),
        ("granitemoe-dev-1", GgmlType::IQ4_NL),
    ] {
        let src = converted(model, TargetType::IQ4_XS, tmp.path(), "iq4.gguf");
        let out = tmp.path().join("q8.gguf");
        let err = requantize(&RequantizeOptions::new(&src, &out, TargetType::Q8_0)).unwrap_err();
        assert!(
            matches!(&err, ConvertError::AlreadyQuantized { .. }),
            "{model}: {err:?}"
        );
        let report = requantize(&RequantizeOptions {
            allow_requantize: true,
            ..RequantizeOptions::new(&src, &out, TargetType::Q8_0)
        })
        .unwrap();
        assert!(
            report.dequantized.iter().any(|(_, ty)| *ty == input_types),
            "{model}: {:?}",
            report.dequantized
        );
        let (iq4, q8) = (GgufFile::open(&src).unwrap(), GgufFile::open(&out).unwrap());
        for t in q8.tensors() {
            let source = iq4.tensor(&t.name).unwrap();
            let want = if source.ty == t.ty {
                iq4.tensor_data(source).to_vec()
            } else {
                encode(t.ty, &values_of(&iq4, &t.name))
            };
            assert!(*q8.tensor_data(t) == *want, "{model} {}", t.name);
        }
    }
}

#[test]
fn one_thread_writes_the_same_bytes_as_the_pool() {
    let tmp = tempfile::tempdir().unwrap();
    let src = converted(
        "granitemoe-kquant-dev",
        TargetType::F16,
        tmp.path(),
        "f16.gguf",
    );
    let one = tmp.path().join("one.gguf");
    let pool = tmp.path().join("pool.gguf");
    requantize(&RequantizeOptions {
        threads: Some(1),
        ..RequantizeOptions::new(&src, &one, TargetType::Q4_K_M)
    })
    .unwrap();
    requantize(&RequantizeOptions::new(&src, &pool, TargetType::Q4_K_M)).unwrap();
    assert!(std::fs::read(&one).unwrap() == std::fs::read(&pool).unwrap());
}

#[test]
fn the_output_may_replace_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    let path = converted("granite-dense-dev", TargetType::F32, tmp.path(), "m.gguf");
    let want = converted("granite-dense-dev", TargetType::Q8_0, tmp.path(), "q8.gguf");
    requantize(&RequantizeOptions::new(&path, &path, TargetType::Q8_0)).unwrap();
    assert!(std::fs::read(&path).unwrap() == std::fs::read(&want).unwrap());
}

// ---- bad input: each error names the file and what is wrong; nothing is left behind ----

/// Requantizes `input`, expects failure, checks the output folder stayed empty, returns the error.
fn failure(input: &Path, target: TargetType) -> (ConvertError, String) {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.gguf");
    let err = match requantize(&RequantizeOptions::new(input, &out, target)) {
        Ok(_) => panic!("{} requantized", input.display()),
        Err(e) => e,
    };
    assert_eq!(
        support::files_in(out_dir.path()),
        Vec::<String>::new(),
        "output or .part left behind"
    );
    let message = err.to_string();
    assert!(
        message.contains(&input.display().to_string()),
        "does not name {}: {message}",
        input.display()
    );
    (err, message)
}

#[test]
fn bad_inputs_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let good = converted("granitemoe-dev-1", TargetType::F16, tmp.path(), "good.gguf");
    let file = GgufFile::open(&good).unwrap();

    let missing = tmp.path().join("missing.gguf");
    let (err, msg) = failure(&missing, TargetType::Q8_0);
    assert!(matches!(err, ConvertError::Gguf(_)), "{err:?}");
    assert!(msg.contains("cannot open"), "{msg}");

    let not_gguf = tmp.path().join("model.safetensors");
    std::fs::copy(
        model_dir("granitemoe-dev-1").join("model.safetensors"),
        &not_gguf,
    )
    .unwrap();
    let (_, msg) = failure(&not_gguf, TargetType::Q8_0);
    assert!(msg.contains("not a GGUF file"), "{msg}");

    let truncated = tmp.path().join("truncated.gguf");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let (_, msg) = failure(&truncated, TargetType::Q8_0);
    assert!(msg.contains("truncated"), "{msg}");

    let llama = tmp.path().join("llama.gguf");
    rewrite(
        &file,
        &llama,
        |m| set(m, "general.architecture", Value::String("llama".into())),
        |_| None,
    );
    let (err, msg) = failure(&llama, TargetType::Q8_0);
    assert!(matches!(err, ConvertError::GgufInput { .. }), "{err:?}");
    assert!(
        msg.contains("architecture llama is not supported") && msg.contains("granitemoe"),
        "{msg}"
    );

    let no_layers = tmp.path().join("no-layers.gguf");
    rewrite(
        &file,
        &no_layers,
        |m| m.retain(|(k, _)| k != "granitemoe.block_count"),
        |_| None,
    );
    let (_, msg) = failure(&no_layers, TargetType::Q4_K_M);
    assert!(msg.contains("granitemoe.block_count is missing"), "{msg}");

    let no_heads = tmp.path().join("no-heads.gguf");
    rewrite(
        &file,
        &no_heads,
        |m| m.retain(|(k, _)| k != "granitemoe.attention.head_count"),
        |_| None,
    );
    let (_, msg) = failure(&no_heads, TargetType::IQ4_XS);
    assert!(
        msg.contains("granitemoe.attention.head_count is missing"),
        "{msg}"
    );

    let bad_count = tmp.path().join("bad-count.gguf");
    rewrite(
        &file,
        &bad_count,
        |m| set(m, "granitemoe.expert_count", Value::String("four".into())),
        |_| None,
    );
    let (_, msg) = failure(&bad_count, TargetType::Q4_K_M);
    assert!(
        msg.contains("granitemoe.expert_count") && msg.contains("not a count"),
        "{msg}"
    );

    let split = tmp.path().join("split-00001-of-00002.gguf");
    rewrite(
        &file,
        &split,
        |m| m.push(("split.count".into(), Value::U16(2))),
        |_| None,
    );
    let (_, msg) = failure(&split, TargetType::Q8_0);
    assert!(
        msg.contains("split into 2 files") && msg.contains("--merge"),
        "{msg}"
    );

    // a tensor type quarry cannot read (Q4_1: same size as... any bytes of the right length)
    let q4_1 = tmp.path().join("q4_1.gguf");
    rewrite(
        &file,
        &q4_1,
        |_| {},
        |name| {
            (name == "blk.0.attn_q.weight").then(|| {
                let info = file.tensor(name).unwrap();
                let n = info.n_elements() as usize;
                (GgmlType::Q4_1, vec![0u8; n / 32 * 20])
            })
        },
    );
    let (_, msg) = failure(&q4_1, TargetType::Q8_0);
    assert!(
        msg.contains("'blk.0.attn_q.weight' is q4_1, which quarry cannot read"),
        "{msg}"
    );
}

// ---- llama.cpp's own files (../shared/fixtures/llamacpp-gguf) ----

/// Every tensor of `theirs` is in `ours` with the same type and bytes, and every key-value of `theirs` is in ours
/// with the same value, except `may_differ`; ours has no other keys but `only_ours`.
fn assert_same_as_llama_cpp(
    ours: &GgufFile,
    theirs: &GgufFile,
    may_differ: &[&str],
    only_ours: &[&str],
    what: &str,
) {
    assert_eq!(ours.tensors().len(), theirs.tensors().len(), "{what}");
    for t in theirs.tensors() {
        let mine = ours.tensor(&t.name).unwrap();
        assert_eq!((&mine.dims, mine.ty), (&t.dims, t.ty), "{what} {}", t.name);
        assert!(
            *ours.tensor_data(mine) == *theirs.tensor_data(t),
            "{what} {}: bytes differ",
            t.name
        );
    }
    assert_eq!(
        ours.metadata().len(),
        theirs.metadata().len() + only_ours.len(),
        "{what}"
    );
    for key in only_ours {
        assert!(ours.get(key).is_some(), "{what}: {key}");
    }
    for (key, value) in theirs.metadata() {
        if !may_differ.contains(&key.as_str()) {
            assert!(ours.get(key) == Some(value), "{what}: {key}");
        }
    }
}

/// llama-quantize's kquant Q4_K_M / Q6_K files were made from an F32 GGUF of the f32 fixture; ours of the same
/// fixture, requantized, gives the same tensors and key-values (the name aside: llama.cpp title-cases it; and we
/// also embed the whole tokenizer.json).
#[test]
fn requantized_f32_conversion_gives_llama_quantize_files() {
    let Some(shared) = support::shared_fixtures("requantize vs llama-quantize's kquant files")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let f32_path = converted(
        "granitemoe-kquant-dev",
        TargetType::F32,
        tmp.path(),
        "f32.gguf",
    );
    for (target, name) in [
        (TargetType::Q4_K_M, "granitemoe-kquant-dev.q4_k_m.gguf"),
        (TargetType::Q6_K, "granitemoe-kquant-dev.q6_k.gguf"),
        (TargetType::Q8_0, "granitemoe-kquant-dev.q8_0.gguf"),
    ] {
        let out = tmp.path().join(name);
        requantize(&RequantizeOptions::new(&f32_path, &out, target)).unwrap();
        let theirs = GgufFile::open(shared.join("llamacpp-gguf").join(name)).unwrap();
        assert_same_as_llama_cpp(
            &GgufFile::open(&out).unwrap(),
            &theirs,
            &["general.name"],
            &["tokenizer.huggingface.json"],
            name,
        );
    }
}

/// llama.cpp's real-vocabulary F16 file requantized to Q8_0 is llama-quantize's Q8_0 file, tensor for tensor
/// and key for key. (Its Q4_0 file differs by design: Quarry keeps attn_k/attn_v of 8-expert models at Q4_0.)
#[test]
fn requantized_llama_cpp_f16_file_gives_llama_quantize_q8_0() {
    let Some(shared) =
        support::shared_fixtures("requantize of llama.cpp's real-vocabulary F16 file")
    else {
        return;
    };
    let dir = shared.join("llamacpp-gguf");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q8.gguf");
    requantize(&RequantizeOptions::new(
        dir.join("granitemoe-realvocab-dev.f16.gguf"),
        &out,
        TargetType::Q8_0,
    ))
    .unwrap();
    let theirs = GgufFile::open(dir.join("granitemoe-realvocab-dev.q8_0.gguf")).unwrap();
    assert_same_as_llama_cpp(
        &GgufFile::open(&out).unwrap(),
        &theirs,
        &[],
        &[],
        "realvocab q8_0",
    );
}
