//! `synth`: random-weight files whose layout and metadata are the converter's for the same config, deterministic
//! by seed, with sane values, and the same failure behaviour (no `.part` left behind).

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use quarry_quantize::blocks::{
    BlockIQ4NL, BlockIQ4XS, BlockQ4_0, BlockQ5K, BlockQ6K, BlockQ8_0, quantize_iq4_nl,
    quantize_iq4_xs, quantize_q5_k, quantize_q6_k,
};
use quarry_quantize::gguf::{Array, GgmlType, GgufFile, Value};
use quarry_quantize::hf::HfConfig;
use quarry_quantize::{
    ConvertError, ConvertOptions, SynthOptions, TargetType, convert, synthesize,
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

fn config_of(dir: &Path) -> HfConfig {
    HfConfig::load(dir).unwrap()
}

fn synth(options: &SynthOptions) -> GgufFile {
    let report = synthesize(options).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.output, options.output);
    assert_eq!(
        report.file_bytes,
        std::fs::metadata(&options.output).unwrap().len()
    );
    GgufFile::open(&options.output).unwrap()
}

/// (name, ggml dims, type, offset in the data section) of every tensor, in file order.
fn tensor_layout(file: &GgufFile) -> Vec<(String, Vec<u64>, GgmlType, u64)> {
    let data_start = file.tensors().iter().map(|t| t.offset).min().unwrap_or(0);
    file.tensors()
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone(), t.ty, t.offset - data_start))
        .collect()
}

fn keys(file: &GgufFile) -> Vec<&str> {
    file.metadata().iter().map(|(k, _)| k.as_str()).collect()
}

#[test]
fn with_the_real_tokenizer_only_the_values_differ_from_a_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    for model in MODELS {
        let dir = model_dir(model);
        for target in TargetType::ALL {
            let what = format!("{model} {target}");
            let converted = tmp.path().join(format!("{model}-{target}.gguf"));
            convert(&ConvertOptions::new(&dir, &converted, target)).unwrap();
            let converted = GgufFile::open(&converted).unwrap();
            let synthetic = synth(&SynthOptions {
                tokenizer: Some(dir.clone()),
                model_name: model.to_string(),
                ..SynthOptions::new(
                    config_of(&dir),
                    tmp.path().join(format!("{model}-{target}-synth.gguf")),
                    target,
                )
            });
            // every key, in order, with the same value; every tensor at the same place with the same shape and type
            assert!(
                converted.metadata() == synthetic.metadata(),
                "{what}: metadata differs"
            );
            let absolute =
                |f: &GgufFile| -> Vec<u64> { f.tensors().iter().map(|t| t.offset).collect() };
            assert_eq!(absolute(&converted), absolute(&synthetic), "{what}");
            assert_eq!(
                tensor_layout(&converted),
                tensor_layout(&synthetic),
                "{what}"
            );
            assert_eq!(converted.file_len(), synthetic.file_len(), "{what}");
            // and the values are not the checkpoint's
            let embedding = |f: &GgufFile| {
                f.tensor_data(f.tensor("token_embd.weight").unwrap())
                    .to_vec()
            };
            assert_ne!(embedding(&converted), embedding(&synthetic), "{what}");
        }
    }
}

#[test]
fn the_synthetic_vocabulary_keeps_the_key_set_and_every_other_value() {
    let tmp = tempfile::tempdir().unwrap();
    for model in MODELS {
        let dir = model_dir(model);
        let config = config_of(&dir);
        for target in [TargetType::Q4_0, TargetType::F16] {
            let what = format!("{model} {target}");
            let converted = tmp.path().join(format!("{model}-{target}.gguf"));
            convert(&ConvertOptions::new(&dir, &converted, target)).unwrap();
            let converted = GgufFile::open(&converted).unwrap();
            let synthetic = synth(&SynthOptions {
                model_name: model.to_string(),
                ..SynthOptions::new(
                    config.clone(),
                    tmp.path().join(format!("{model}-{target}-synth.gguf")),
                    target,
                )
            });
            assert_eq!(keys(&converted), keys(&synthetic), "{what}");
            assert_eq!(
                tensor_layout(&converted),
                tensor_layout(&synthetic),
                "{what}"
            );
            for (key, value) in converted.metadata() {
                let ours = synthetic.get(key).unwrap();
                if key.starts_with("tokenizer.") {
                    assert_eq!(ours.value_type(), value.value_type(), "{what} {key}");
                } else {
                    assert!(ours == value, "{what} {key}: {}", ours.summary());
                }
            }
            let tokens = match synthetic.get("tokenizer.ggml.tokens") {
                Some(Value::Array(Array::String(tokens))) => tokens,
                other => panic!("{other:?}"),
            };
            assert_eq!(tokens.len(), config.vocab_size);
            assert_eq!(tokens[0], "<|end_of_text|>");
            assert_eq!(tokens[1 + usize::from(b'a')], "a");
            assert_eq!(tokens[config.vocab_size - 3], "<|start_of_role|>");
            let merges = synthetic
                .get("tokenizer.ggml.merges")
                .and_then(Value::as_array)
                .unwrap();
            assert_eq!(
                merges.len(),
                config.vocab_size - 260,
                "every filler token is a merge"
            );
            let pre = synthetic.get("tokenizer.ggml.pre").and_then(Value::as_str);
            assert_eq!(pre, Some("gpt-2"));
        }
    }
}

#[test]
fn embedding_type_and_untied_heads_follow_the_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir("granitemoe-dev-2"); // untied
    for embedding_type in [None, Some(TargetType::F16), Some(TargetType::Q4_0)] {
        let out = tmp.path().join("converted.gguf");
        convert(&ConvertOptions {
            embedding_type,
            ..ConvertOptions::new(&dir, &out, TargetType::Q4_0)
        })
        .unwrap();
        let converted = GgufFile::open(&out).unwrap();
        let synthetic = synth(&SynthOptions {
            embedding_type,
            ..SynthOptions::new(
                config_of(&dir),
                tmp.path().join("synth.gguf"),
                TargetType::Q4_0,
            )
        });
        assert_eq!(
            tensor_layout(&converted),
            tensor_layout(&synthetic),
            "{embedding_type:?}"
        );
    }
}

#[test]
fn same_seed_same_bytes_whatever_the_threads_other_seed_other_values() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config_of(&model_dir("granitemoe-kquant-dev"));
    for target in TargetType::ALL {
        let file = |name: &str, seed: u64, threads: Option<usize>| {
            synth(&SynthOptions {
                seed,
                threads,
                ..SynthOptions::new(config.clone(), tmp.path().join(name), target)
            })
        };
        let a = file("a.gguf", 7, None);
        let b = file("b.gguf", 7, Some(1));
        let c = file("c.gguf", 8, Some(2));
        assert!(a.bytes() == b.bytes(), "{target}: seed 7 twice");
        assert_eq!(tensor_layout(&a), tensor_layout(&c));
        for t in a.tensors() {
            let other = c.tensor(&t.name).unwrap();
            assert!(
                *a.tensor_data(t) != *c.tensor_data(other),
                "{target} {}: seed 7 = seed 8",
                t.name
            );
        }
        // tensors of the same shape get different values too
        let gate = a.tensor_data(a.tensor("blk.0.ffn_gate_exps.weight").unwrap());
        let up = a.tensor_data(a.tensor("blk.0.ffn_up_exps.weight").unwrap());
        assert!(*gate != *up, "{target}");
    }
}

fn f32_values(file: &GgufFile, name: &str) -> Vec<f32> {
    let info = file.tensor(name).unwrap();
    assert_eq!(info.ty, GgmlType::F32, "{name}");
    file.tensor_data(info)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn std_dev(values: &[f32]) -> f32 {
    let n = values.len() as f32;
    let mean = values.iter().sum::<f32>() / n;
    (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n).sqrt()
}

#[test]
fn values_are_finite_with_the_intended_scales() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config_of(&model_dir("granitemoe-kquant-dev"));
    let f32_file = synth(&SynthOptions::new(
        config.clone(),
        tmp.path().join("f32.gguf"),
        TargetType::F32,
    ));
    for t in f32_file.tensors() {
        let values = f32_values(&f32_file, &t.name);
        assert!(values.iter().all(|v| v.is_finite()), "{}", t.name);
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        let (want_mean, want_std) = if t.name.ends_with("_norm.weight") {
            (1.0, 0.02)
        } else if t.name.contains("ffn_gate_inp") {
            (0.0, 1.0 / (config.hidden_size as f32).sqrt())
        } else {
            (0.0, 0.02)
        };
        let tolerance = 4.0 * want_std / (values.len() as f32).sqrt();
        assert!(
            (mean - want_mean).abs() < tolerance.max(1e-3),
            "{} mean {mean}",
            t.name
        );
        let std = std_dev(&values);
        assert!((std / want_std - 1.0).abs() < 0.2, "{} std {std}", t.name);
    }
    // quantized files: every block scale a finite, non-zero (normal) f16
    for target in [TargetType::Q8_0, TargetType::Q4_0] {
        let file = synth(&SynthOptions::new(
            config.clone(),
            tmp.path().join("q.gguf"),
            target,
        ));
        let mut blocks = 0;
        for t in file.tensors() {
            let data = file.tensor_data(t);
            let block_bytes = match t.ty {
                GgmlType::Q8_0 => size_of::<BlockQ8_0>(),
                GgmlType::Q4_0 => size_of::<BlockQ4_0>(),
                _ => continue,
            };
            // each block starts with its f16 scale
            let scales: Vec<half::f16> = data
                .chunks_exact(block_bytes)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
                .collect();
            blocks += scales.len();
            assert!(
                scales.iter().all(|d| d.to_f32().is_normal()),
                "{target} {}",
                t.name
            );
        }
        assert!(blocks > 1000, "{target}: {blocks} blocks");
    }
}

/// Top-`k` expert indices of `logits`.
fn top_k(logits: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(k);
    order.sort_unstable();
    order
}

/// The router of a Granite-1B-like layer (hidden 1024, 32 experts, top 8), applied to the normalised embeddings of
/// many tokens, picks many different expert sets and uses every expert.
#[test]
fn routing_varies_from_token_to_token() {
    let config = HfConfig::parse(
        Path::new("granite-like config.json"),
        r#"{"architectures": ["GraniteMoeForCausalLM"], "model_type": "granitemoe", "vocab_size": 300,
            "hidden_size": 1024, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 16,
            "num_key_value_heads": 8, "num_local_experts": 32, "num_experts_per_tok": 8,
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
            "embedding_multiplier": 12.0, "attention_multiplier": 0.015625, "residual_multiplier": 0.22,
            "logits_scaling": 6.0, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = synth(&SynthOptions::new(
        config,
        tmp.path().join("m.gguf"),
        TargetType::F32,
    ));
    let embedding = f32_values(&file, "token_embd.weight");
    let norm = f32_values(&file, "blk.0.ffn_norm.weight");
    let router = f32_values(&file, "blk.0.ffn_gate_inp.weight");
    let (hidden, experts) = (1024, 32);
    let mut sets = HashSet::new();
    let mut used = HashSet::new();
    for token in 0..64 {
        let x = &embedding[token * hidden..(token + 1) * hidden];
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / hidden as f32 + 1e-6).sqrt();
        let h: Vec<f32> = x.iter().zip(&norm).map(|(v, g)| v / rms * g).collect();
        let logits: Vec<f32> = (0..experts)
            .map(|e| {
                router[e * hidden..(e + 1) * hidden]
                    .iter()
                    .zip(&h)
                    .map(|(w, v)| w * v)
                    .sum()
            })
            .collect();
        let spread = std_dev(&logits);
        assert!(
            (0.6..1.6).contains(&spread),
            "router logits spread {spread}"
        );
        let chosen = top_k(&logits, 8);
        used.extend(chosen.iter().copied());
        sets.insert(chosen);
    }
    assert!(
        sets.len() >= 60,
        "only {} different expert sets for 64 tokens",
        sets.len()
    );
    assert_eq!(used.len(), experts, "some experts are never chosen");
}

#[test]
fn failures_leave_no_part_file() {
    let config = config_of(&model_dir("granitemoe-dev-2"));
    // after the whole file was written: the output is a folder, so the final rename fails
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("model.gguf");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"not ours").unwrap();
    let err = synthesize(&SynthOptions::new(config.clone(), &out, TargetType::Q8_0)).unwrap_err();
    assert!(matches!(err, ConvertError::Write { .. }), "{err:?}");
    assert_eq!(support::files_in(out_dir.path()), vec!["model.gguf"]);
    assert_eq!(support::files_in(&out), vec!["keep"]);

    // before anything is written: a tokenizer folder without tokenizer.json
    let out = out_dir.path().join("other.gguf");
    let empty = tempfile::tempdir().unwrap();
    let err = synthesize(&SynthOptions {
        tokenizer: Some(empty.path().to_path_buf()),
        ..SynthOptions::new(config.clone(), &out, TargetType::Q8_0)
    })
    .unwrap_err();
    assert!(matches!(err, ConvertError::MissingFile { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    assert_eq!(support::files_in(out_dir.path()), vec!["model.gguf"]);
}

#[test]
fn vocabularies_that_do_not_fit_the_config_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    // a real tokenizer with ids beyond the config's vocab_size (dev-2 has 300; dev-1's tokenizer has 400 ids)
    let config = config_of(&model_dir("granitemoe-dev-2"));
    let err = synthesize(&SynthOptions {
        tokenizer: Some(model_dir("granitemoe-dev-1")),
        ..SynthOptions::new(config.clone(), &out, TargetType::Q8_0)
    })
    .unwrap_err();
    assert!(err.to_string().contains("vocab_size"), "{err}");
    // a vocab_size too small for 256 bytes and the special tokens
    let small = HfConfig {
        vocab_size: 259,
        ..config
    };
    let err = synthesize(&SynthOptions::new(small, &out, TargetType::Q8_0)).unwrap_err();
    assert!(
        matches!(err, ConvertError::SyntheticVocab { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("--tokenizer DIR"), "{err}");
    assert!(support::files_in(tmp.path()).is_empty());
}

/// A config for the IQ4 recipe's shape-dependent rules, which no fixture reaches: 8 layers (so layer 0 is the first
/// eighth), `heads` query heads over 2 KV heads, `experts` experts (0: dense), 256-wide rows throughout.
fn iq4_rule_config(heads: usize, experts: usize, tied: bool) -> HfConfig {
    let (arch, model_type, moe) = if experts > 0 {
        (
            "GraniteMoeForCausalLM",
            "granitemoe",
            format!(r#""num_local_experts": {experts}, "num_experts_per_tok": 2,"#),
        )
    } else {
        ("GraniteForCausalLM", "granite", String::new())
    };
    HfConfig::parse(
        Path::new("iq4-rules config.json"),
        &format!(
            r#"{{"architectures": ["{arch}"], "model_type": "{model_type}", "vocab_size": 300,
            "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 8, "num_attention_heads": {heads},
            "num_key_value_heads": 2, {moe} "max_position_embeddings": 4096, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6, "embedding_multiplier": 12.0, "attention_multiplier": 0.015625,
            "residual_multiplier": 0.22, "logits_scaling": 6.0, "tie_word_embeddings": {tied}}}"#
        ),
    )
    .unwrap()
}

/// llama-quantize's IQ4_NL / IQ4_XS rules, stated tensor by tensor for three shapes of model, and the synthetic
/// file's bytes are the reference quantizers' of the values an F32 file of the same seed holds.
#[test]
fn iq4_files_give_the_recipes_matrices_more_bits() {
    use GgmlType::*;
    let tmp = tempfile::tempdir().unwrap();
    // (config, what attn_v, attn_k and attn_output get, beyond the base type)
    let shapes = [
        // 8 experts: llama.cpp's Mixtral rules (Q8_0 over the grouping rule)
        (
            iq4_rule_config(8, 8, true),
            "8 experts",
            Some(Q8_0),
            Some(Q8_0),
            Some(Q5_K),
        ),
        // 4 query heads per KV head: attn_v Q5_K
        (
            iq4_rule_config(8, 16, false),
            "gqa 4",
            Some(Q5_K),
            None,
            None,
        ),
        // dense, 2 per KV head: only ffn_down
        (iq4_rule_config(4, 0, true), "dense", None, None, None),
    ];
    for (config, shape, attn_v, attn_k, attn_output) in shapes {
        let f32_file = synth(&SynthOptions::new(
            config.clone(),
            tmp.path().join("f32.gguf"),
            TargetType::F32,
        ));
        for target in [TargetType::IQ4_NL, TargetType::IQ4_XS] {
            let base = target.ggml_type();
            let file = synth(&SynthOptions::new(
                config.clone(),
                tmp.path().join(format!("{target}.gguf")),
                target,
            ));
            assert_eq!(
                file.get("general.file_type").and_then(Value::as_u64),
                Some(target.file_type().into())
            );
            for t in file.tensors() {
                let n = t.name.as_str();
                let want = if n.ends_with("_norm.weight") || n.contains("ffn_gate_inp") {
                    F32
                } else if n == "output.weight"
                    || (config.tie_word_embeddings && n == "token_embd.weight")
                {
                    Q6_K
                } else if n.contains("attn_v.") {
                    attn_v.unwrap_or(base)
                } else if n.contains("attn_k.") {
                    attn_k.unwrap_or(base)
                } else if n.contains("attn_output.") {
                    attn_output.unwrap_or(base)
                } else if n.starts_with("blk.0.ffn_down") {
                    Q5_K
                } else {
                    base
                };
                assert_eq!(t.ty, want, "{shape} {target} {n}");
                if t.ty == F32 || t.ty == Q8_0 {
                    continue; // Q8_0 blocks are drawn directly, not quantized from the floats
                }
                let x = f32_values(&f32_file, n);
                let encoded: Vec<u8> = match t.ty {
                    IQ4_NL => {
                        let mut b = vec![bytemuck::Zeroable::zeroed(); x.len() / 32];
                        quantize_iq4_nl(&x, &mut b);
                        bytemuck::cast_slice::<BlockIQ4NL, u8>(&b).to_vec()
                    }
                    IQ4_XS => {
                        let mut b = vec![bytemuck::Zeroable::zeroed(); x.len() / 256];
                        quantize_iq4_xs(&x, &mut b);
                        bytemuck::cast_slice::<BlockIQ4XS, u8>(&b).to_vec()
                    }
                    Q5_K => {
                        let mut b = vec![bytemuck::Zeroable::zeroed(); x.len() / 256];
                        quantize_q5_k(&x, &mut b);
                        bytemuck::cast_slice::<BlockQ5K, u8>(&b).to_vec()
                    }
                    Q6_K => {
                        let mut b = vec![bytemuck::Zeroable::zeroed(); x.len() / 256];
                        quantize_q6_k(&x, &mut b);
                        bytemuck::cast_slice::<BlockQ6K, u8>(&b).to_vec()
                    }
                    other => panic!("{shape} {target} {n}: {other}"),
                };
                assert!(
                    *file.tensor_data(t) == *encoded,
                    "{shape} {target} {n}: bytes"
                );
            }
        }
    }
}
