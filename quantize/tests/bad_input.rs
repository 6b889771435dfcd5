//! Broken snapshots: each must give an error that names the file and says what is wrong, and must leave neither
//! the output nor its `.part` file behind.

mod support;

use std::path::Path;

use quarry_quantize::{ConvertError, ConvertOptions, TargetType, convert};

/// A writable copy of the smallest fixture (bf16, untied, MoE).
fn snapshot() -> tempfile::TempDir {
    support::copy_fixture(&support::fixtures().join("granitemoe-dev-2"))
}

/// Converts `input`, expects failure, checks nothing was left in the output folder, returns the message.
fn failure(input: &Path) -> (ConvertError, String) {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("model.gguf");
    let err = match convert(&ConvertOptions::new(input, &out, TargetType::Q4_0)) {
        Ok(_) => panic!("{} converted", input.display()),
        Err(e) => e,
    };
    assert_eq!(
        support::files_in(out_dir.path()),
        Vec::<String>::new(),
        "output or .part left behind"
    );
    let message = err.to_string();
    (err, message)
}

fn assert_names(message: &str, path: &Path, phrases: &[&str]) {
    assert!(
        message.contains(&path.display().to_string()),
        "does not name {}: {message}",
        path.display()
    );
    for phrase in phrases {
        assert!(message.contains(phrase), "lacks {phrase:?}: {message}");
    }
}

#[test]
fn truncated_safetensors() {
    let dir = snapshot();
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let (err, message) = failure(dir.path());
    assert!(
        matches!(err, ConvertError::CorruptSafetensors { .. }),
        "{err:?}"
    );
    assert_names(
        &message,
        &weights,
        &["do not add up", "truncated or corrupt", "re-download"],
    );
}

#[test]
fn corrupt_safetensors_header() {
    let dir = snapshot();
    let weights = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&weights, &bytes).unwrap();
    let (err, message) = failure(dir.path());
    assert!(
        matches!(err, ConvertError::CorruptSafetensors { .. }),
        "{err:?}"
    );
    assert_names(
        &message,
        &weights,
        &["header is not valid safetensors JSON", "re-download"],
    );
}

#[test]
fn tensor_of_unexpected_dtype() {
    let dir = snapshot();
    let weights = dir.path().join("model.safetensors");
    let mut tensors = support::read_safetensors(&weights);
    let norm = tensors
        .iter_mut()
        .find(|t| t.0 == "model.norm.weight")
        .unwrap();
    norm.1 = "I16".into(); // same width as bf16, so the file stays consistent
    support::write_safetensors(&weights, &tensors);
    let (err, message) = failure(dir.path());
    assert!(matches!(err, ConvertError::TensorDtype { .. }), "{err:?}");
    assert_names(
        &message,
        &weights,
        &["'model.norm.weight' is I16", "only BF16, F16 and F32"],
    );
}

/// A NaN (bf16 0x7fc0) in the third row of an expert tensor, and an infinity in the first row of a norm: each
/// is refused naming the tensor and the row.
#[test]
fn weights_that_are_not_finite_numbers() {
    for (tensor, value, row, shown) in [
        (
            "model.layers.1.block_sparse_moe.output_linear.weight",
            [0xc0, 0x7f],
            2,
            "NaN",
        ),
        (
            "model.layers.0.input_layernorm.weight",
            [0x80, 0x7f],
            0,
            "inf",
        ),
    ] {
        let dir = snapshot();
        let weights = dir.path().join("model.safetensors");
        let mut tensors = support::read_safetensors(&weights);
        let t = tensors.iter_mut().find(|t| t.0 == tensor).unwrap();
        let row_len = *t.2.last().unwrap();
        let at = (row * row_len + 3) * 2;
        t.3[at..at + 2].copy_from_slice(&value);
        support::write_safetensors(&weights, &tensors);
        let (err, message) = failure(dir.path());
        assert!(matches!(err, ConvertError::NonFinite { .. }), "{err:?}");
        assert_names(
            &message,
            &weights,
            &[
                &format!("'{tensor}' holds {shown} in row {row}"),
                "finite number",
            ],
        );
    }
}

#[test]
fn tensor_of_unexpected_shape() {
    let dir = snapshot();
    let config_path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace("\"intermediate_size\": 16", "\"intermediate_size\": 8"),
    )
    .unwrap();
    let (err, message) = failure(dir.path());
    assert!(matches!(err, ConvertError::Checkpoint { .. }), "{err:?}");
    assert_names(
        &message,
        &dir.path().join("model.safetensors"),
        &[
            "input_linear.weight' has shape [4, 32, 32], but config.json implies [4, 16, 32]",
            "do not match",
        ],
    );
}

#[test]
fn missing_config() {
    let dir = snapshot();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let (err, message) = failure(dir.path());
    assert!(matches!(err, ConvertError::MissingFile { .. }), "{err:?}");
    assert_names(
        &message,
        &dir.path().join("config.json"),
        &["missing", "needs its config.json"],
    );
}

#[test]
fn malformed_config() {
    let dir = snapshot();
    std::fs::write(
        dir.path().join("config.json"),
        "{\"architectures\": [\"GraniteMoeForCausalLM\",",
    )
    .unwrap();
    let (err, message) = failure(dir.path());
    assert!(matches!(err, ConvertError::Json { .. }), "{err:?}");
    assert_names(
        &message,
        &dir.path().join("config.json"),
        &["not valid JSON"],
    );
}

#[test]
fn unsupported_architecture() {
    let dir = snapshot();
    let config_path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let llama = config
        .replace("GraniteMoeForCausalLM", "LlamaForCausalLM")
        .replace("\"granitemoe\"", "\"llama\"");
    std::fs::write(&config_path, llama).unwrap();
    let (err, message) = failure(dir.path());
    assert!(
        matches!(err, ConvertError::UnsupportedArchitecture { .. }),
        "{err:?}"
    );
    assert_names(
        &message,
        &config_path,
        &[
            "LlamaForCausalLM (model_type llama) is not supported",
            "GraniteMoeForCausalLM",
            "GraniteForCausalLM",
        ],
    );
}

#[test]
fn missing_tokenizer() {
    let dir = snapshot();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let (err, message) = failure(dir.path());
    assert!(matches!(err, ConvertError::MissingFile { .. }), "{err:?}");
    assert_names(
        &message,
        &dir.path().join("tokenizer.json"),
        &["missing", "download tokenizer.json"],
    );
}

/// A pre-tokenizer llama.cpp has no exact equivalent for would make a GGUF that tokenizes differently there.
#[test]
fn pre_tokenizer_without_a_llama_cpp_equivalent() {
    let dir = snapshot();
    let path = dir.path().join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    tokenizer["pre_tokenizer"]["use_regex"] = false.into();
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let (err, message) = failure(dir.path());
    assert!(matches!(err, ConvertError::Tokenizer { .. }), "{err:?}");
    assert_names(
        &message,
        &path,
        &["\"use_regex\":false", "only ByteLevel with use_regex true"],
    );
}

#[test]
fn missing_shard() {
    let dir = snapshot();
    let shard = "model-00001-of-00002.safetensors";
    std::fs::rename(dir.path().join("model.safetensors"), dir.path().join(shard)).unwrap();
    let tensors = support::read_safetensors(&dir.path().join(shard));
    let weight_map: serde_json::Map<String, serde_json::Value> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let file = if i % 2 == 0 {
                shard
            } else {
                "model-00002-of-00002.safetensors"
            };
            (t.0.clone(), file.into())
        })
        .collect();
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        serde_json::json!({ "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    let (err, message) = failure(dir.path());
    assert!(matches!(err, ConvertError::MissingShard { .. }), "{err:?}");
    assert_names(
        &message,
        &index,
        &[
            "model-00002-of-00002.safetensors, which is missing",
            "download every shard",
        ],
    );
}

#[test]
fn no_weights_at_all() {
    let dir = snapshot();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let (err, message) = failure(dir.path());
    assert!(matches!(err, ConvertError::MissingFile { .. }), "{err:?}");
    assert_names(
        &message,
        &dir.path().join("model.safetensors"),
        &["neither model.safetensors nor"],
    );
}

/// A failure after the whole file was written (the final rename): the finished `.part` must still go.
#[test]
fn output_that_cannot_be_replaced_leaves_no_part_file() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("model.gguf");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"not ours").unwrap();
    let input = support::fixtures().join("granitemoe-dev-2");
    let err = convert(&ConvertOptions::new(&input, &out, TargetType::Q8_0)).unwrap_err();
    assert!(matches!(err, ConvertError::Write { .. }), "{err:?}");
    assert_names(&err.to_string(), &out, &["cannot write the output"]);
    assert_eq!(support::files_in(out_dir.path()), vec!["model.gguf"]);
    assert_eq!(support::files_in(&out), vec!["keep"]);
}

/// A stale `.part` from an interrupted run is replaced, and a good output is only replaced when the new one is done.
#[test]
fn stale_part_file_is_overwritten_and_removed() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("model.gguf");
    std::fs::write(out_dir.path().join("model.gguf.part"), b"stale").unwrap();
    std::fs::write(&out, b"previous model").unwrap();
    let input = snapshot();
    std::fs::remove_file(input.path().join("tokenizer.json")).unwrap();
    assert!(convert(&ConvertOptions::new(input.path(), &out, TargetType::Q8_0)).is_err());
    assert_eq!(
        std::fs::read(&out).unwrap(),
        b"previous model",
        "a failed run must not touch the output"
    );
    let good = support::fixtures().join("granitemoe-dev-2");
    convert(&ConvertOptions::new(&good, &out, TargetType::Q8_0)).unwrap();
    assert_eq!(support::files_in(out_dir.path()), vec!["model.gguf"]);
    assert_eq!(&std::fs::read(&out).unwrap()[..4], b"GGUF");
}
