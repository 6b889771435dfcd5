//! The tokenizer rebuilt from `tokenizer.ggml.*` metadata (GGUF files without `tokenizer.huggingface.json`, as
//! llama.cpp writes them) against the real Hugging Face tokenizer and its recorded references.
//!
//! Rebuilt tokenizers under test: the three llama.cpp-made real-vocabulary files (`tokenizer.ggml.pre = refact`),
//! the real-vocabulary fixture converted by `quarry_quantize::convert` with the embedded JSON removed (`gpt-2`),
//! the llama.cpp-made k-quant files (`gpt-2`, a trained 400-token vocabulary) and the committed k-quant fixture
//! converted with the JSON removed. Whatever needs `../shared` says SKIPPED on stderr and returns when it is
//! absent (and fails in CI: see `support/skip.rs`); the committed fixture's tests always run.

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use quarry::gguf::{GgufFile, GgufWriter, Value as GgufValue};
use quarry::text::tokenizer::{GGUF_GGML_PRE_KEY, GGUF_HF_JSON_KEY, Tokenizer};
use serde_json::Value;
use support::{fixture_dir, gguf, kernel_sets, quarry_ok, shared, skipped};

const GRANITE_30: &str = "granite-3.0-1b-a400m-instruct";
const GRANITE_31: &str = "granite-3.1-1b-a400m-instruct";
const REALVOCAB: &str = "granitemoe-realvocab-dev";
const KQUANT: &str = "granitemoe-kquant-dev";
const REALVOCAB_LLAMACPP_FILES: [&str; 3] = [
    "granitemoe-realvocab-dev.f16.gguf",
    "granitemoe-realvocab-dev.q8_0.gguf",
    "granitemoe-realvocab-dev.q4_0.gguf",
];
const KQUANT_LLAMACPP_FILES: [&str; 3] = [
    "granitemoe-kquant-dev.q4_k_m.gguf",
    "granitemoe-kquant-dev.q6_k.gguf",
    "granitemoe-kquant-dev.q8_0.gguf",
];

/// `../shared/<relative>`, or `None` after saying SKIPPED.
fn shared_path(relative: &str) -> Option<PathBuf> {
    let path = shared().join(relative);
    if path.exists() {
        Some(path)
    } else {
        skipped(relative, &path);
        None
    }
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids_of(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("ids {v}: {e}"))
}

fn str_of<'a>(case: &'a Value, key: &str) -> &'a str {
    case[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {case}"))
}

/// The real Granite tokenizer as Hugging Face ships it, loaded once.
fn hf_granite() -> Option<&'static Tokenizer> {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    let path = shared_path(&format!("{GRANITE_30}/tokenizer.json"))?;
    Some(TOKENIZER.get_or_init(|| Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{e}"))))
}

/// A metadata-only GGUF in memory holding `file`'s metadata, changed by `edit`.
fn edited(
    file: &GgufFile,
    label: &str,
    edit: impl FnOnce(&mut Vec<(String, GgufValue)>),
) -> GgufFile {
    let mut metadata = file.metadata().to_vec();
    edit(&mut metadata);
    let bytes = GgufWriter::new(Vec::new(), &metadata, Vec::new())
        .and_then(GgufWriter::finish)
        .unwrap_or_else(|e| panic!("{e}"));
    GgufFile::from_bytes(label, bytes).unwrap_or_else(|e| panic!("{e}"))
}

fn set(metadata: &mut Vec<(String, GgufValue)>, key: &str, value: GgufValue) {
    metadata.retain(|(k, _)| k != key);
    metadata.push((key.to_string(), value));
}

/// What `quarry quantize` writes for a fixture, with the embedded `tokenizer.json` taken out, so only the
/// `tokenizer.ggml.*` keys our own converter writes are left.
fn converter_file_without_hf_json(fixture: &str) -> Option<GgufFile> {
    let dir = fixture_dir(fixture)?;
    let path = gguf(fixture, &dir, "f32");
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(file.get(GGUF_HF_JSON_KEY).is_some());
    let label = format!("{fixture} (quarry converter, {GGUF_HF_JSON_KEY} removed)");
    Some(edited(&file, &label, |m| {
        m.retain(|(k, _)| k != GGUF_HF_JSON_KEY)
    }))
}

fn llamacpp_file(name: &str) -> Option<GgufFile> {
    let path = shared_path(&format!("fixtures/llamacpp-gguf/{name}"))?;
    Some(GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}")))
}

fn pre_of(file: &GgufFile) -> &str {
    file.get(GGUF_GGML_PRE_KEY)
        .and_then(GgufValue::as_str)
        .unwrap_or_default()
}

/// Every tokenizer rebuilt from Granite's real vocabulary: the llama.cpp files (`refact`) and our converter's
/// file without its JSON (`gpt-2`). Empty when `../shared` is absent.
fn rebuilt_granite() -> &'static [(String, Tokenizer)] {
    static REBUILT: OnceLock<Vec<(String, Tokenizer)>> = OnceLock::new();
    REBUILT.get_or_init(|| {
        let mut files: Vec<GgufFile> = REALVOCAB_LLAMACPP_FILES
            .iter()
            .filter_map(|name| llamacpp_file(name))
            .inspect(|f| assert_eq!(pre_of(f), "refact", "{}", f.path().display()))
            .collect();
        if shared().join("fixtures").join(REALVOCAB).is_dir() {
            files.extend(converter_file_without_hf_json(REALVOCAB));
        }
        files
            .iter()
            .map(|file| {
                assert!(file.get(GGUF_HF_JSON_KEY).is_none());
                let tokenizer = Tokenizer::from_gguf(file).unwrap_or_else(|e| panic!("{e}"));
                assert!(tokenizer.origin().ends_with("(tokenizer.ggml.*)"));
                (
                    format!("{} [pre {}]", file.path().display(), pre_of(file)),
                    tokenizer,
                )
            })
            .collect()
    })
}

/// `(case name, text, ids)` of every reference encoding of real Granite text: the tokenizer references, the
/// rendered 3.0 and 3.1 chats, and the real-vocabulary fixture's prompts.
fn reference_encodings() -> Vec<(String, String, Vec<u32>)> {
    let mut out = Vec::new();
    let reference = read_json(&shared().join(GRANITE_30).join("tokenizer-reference.json"));
    for case in reference["encode"].as_array().into_iter().flatten() {
        let name = format!("encode/{}", str_of(case, "name"));
        out.push((name, str_of(case, "text").into(), ids_of(&case["ids"])));
    }
    for case in reference["chat"].as_array().into_iter().flatten() {
        let name = format!("3.0 chat/{}", str_of(case, "name"));
        out.push((name, str_of(case, "rendered").into(), ids_of(&case["ids"])));
    }
    let chat_31 = read_json(&shared().join(GRANITE_31).join("chat-reference.json"));
    for case in chat_31["chat"].as_array().into_iter().flatten() {
        let name = format!("3.1 chat/{}", str_of(case, "name"));
        out.push((name, str_of(case, "rendered").into(), ids_of(&case["ids"])));
    }
    let fixture = read_json(
        &shared()
            .join("fixtures")
            .join(REALVOCAB)
            .join("reference.json"),
    );
    for prompt in fixture["prompts"].as_array().into_iter().flatten() {
        let name = format!("{REALVOCAB}/{}", str_of(prompt, "name"));
        out.push((
            name,
            str_of(prompt, "text").into(),
            ids_of(&prompt["input_ids"]),
        ));
    }
    out
}

fn have_granite_references() -> bool {
    [
        format!("{GRANITE_30}/tokenizer-reference.json"),
        format!("{GRANITE_31}/chat-reference.json"),
        format!("fixtures/{REALVOCAB}/reference.json"),
    ]
    .iter()
    .all(|p| shared_path(p).is_some())
}

#[test]
fn rebuilt_tokenizers_encode_every_reference_case() {
    if !have_granite_references() {
        return;
    }
    let cases = reference_encodings();
    assert!(cases.len() >= 34 + 7 + 4, "{} cases", cases.len());
    let rebuilt = rebuilt_granite();
    assert_eq!(rebuilt.len(), 4);
    let mut failures = Vec::new();
    for (label, tokenizer) in rebuilt {
        for (name, text, want) in &cases {
            let got = tokenizer.encode(text).unwrap_or_else(|e| panic!("{e}"));
            if &got != want {
                failures.push(format!("{label}: {name}: {got:?}, want {want:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rebuilt_tokenizers_decode_every_reference_case() {
    let Some(path) = shared_path(&format!("{GRANITE_30}/tokenizer-reference.json")) else {
        return;
    };
    let reference = read_json(&path);
    let mut checked = 0;
    for (label, tokenizer) in rebuilt_granite() {
        for case in reference["encode"].as_array().into_iter().flatten() {
            let ids = ids_of(&case["ids"]);
            if let Some(want) = case["decode"].as_str() {
                assert_eq!(tokenizer.decode(&ids, false).unwrap(), want, "{label}");
                checked += 1;
            }
            let positions: Vec<usize> =
                serde_json::from_value(case["special_token_positions"].clone()).unwrap_or_default();
            let specials: Vec<usize> = (0..ids.len())
                .filter(|&i| tokenizer.is_special(ids[i]))
                .collect();
            assert_eq!(specials, positions, "{label}: {}", case["name"]);
            // Streamed one id at a time, the pieces add up to the whole decode.
            let mut stream = tokenizer.stream(false);
            let mut streamed = String::new();
            for &id in &ids {
                streamed += &stream.push(id).unwrap();
            }
            streamed += &stream.finish().unwrap();
            assert_eq!(streamed, tokenizer.decode(&ids, false).unwrap(), "{label}");
        }
        for case in reference["decode"].as_array().into_iter().flatten() {
            let skip = case["skip_special_tokens"].as_bool().unwrap();
            let got = tokenizer.decode(&ids_of(&case["ids"]), skip).unwrap();
            assert_eq!(got, str_of(case, "text"), "{label}: {}", case["name"]);
            checked += 1;
        }
    }
    if !rebuilt_granite().is_empty() {
        assert!(checked > 4 * 12, "only {checked} decode checks");
    }
}

/// The same ids for the same strings, the same special tokens, the same end-of-text id as the HF tokenizer.
#[test]
fn rebuilt_vocabulary_is_the_hf_vocabulary() {
    let Some(hf) = hf_granite() else { return };
    for (label, tokenizer) in rebuilt_granite() {
        assert_eq!(tokenizer.vocab_size(), hf.vocab_size(), "{label}");
        assert_eq!(tokenizer.eos_id(), 0, "{label}");
        for id in 0..hf.vocab_size() as u32 {
            assert_eq!(
                tokenizer.id_to_token(id),
                hf.id_to_token(id),
                "{label}: id {id}"
            );
            assert_eq!(
                tokenizer.is_special(id),
                hf.is_special(id),
                "{label}: id {id}"
            );
        }
        assert!(tokenizer.decode(&[hf.vocab_size() as u32], false).is_err());
    }
}

/// Texts chosen to hit every way two pre-tokenizer splits can differ: whitespace runs of every kind before
/// digits, letters and punctuation, non-ASCII numerals (`²`, `½`, Arabic-Indic and full-width digits, Roman
/// numerals) with and without a space before them, contractions, and special-token lookalikes.
fn stress_texts() -> Vec<String> {
    let mut texts: Vec<String> = [
        "x  123",
        "x   1",
        "a \t 7",
        "\n\n42\n",
        "  1",
        " 1",
        "1  2   3    4",
        "x ² y ½ z ³",
        "x  ²",
        "٣٤٥ and ١٢",
        "１２３ full width",
        "Ⅻ o'clock ⅻ",
        "it's 2024's best; they'll've 3'd",
        "price:  $ 1,000.50\t\t(approx. 99 %)",
        "tabs\t\t\t9 and\r\n\r\n 8",
        "<|end_of_text|> 5 <|end_of_text|>  6",
        "    return 0\n        x = [1, 2,  3]\n",
        "\u{a0}1 \u{2003}2 \u{3000}3",
        "",
    ]
    .map(String::from)
    .to_vec();
    // Every numeric character of the Basic Multilingual Plane after every kind of whitespace run.
    let numerals: String = (0x80u32..0x10000)
        .filter_map(char::from_u32)
        .filter(|c| c.is_numeric())
        .collect();
    for (i, chunk) in numerals.chars().collect::<Vec<_>>().chunks(16).enumerate() {
        let prefix = ["", " ", "  ", "\t", "a "][i % 5];
        texts.push(chunk.iter().map(|c| format!("{prefix}{c}x")).collect());
    }
    texts
}

/// Beyond the references: on texts made to find where splits differ, every rebuilt tokenizer gives exactly the
/// HF ids, and `x  123` comes out as Hugging Face tokenizes it (`Ġ Ġ 1 2 3`), not as llama.cpp's refact
/// split (`ĠĠ 1 2 3`).
#[test]
fn rebuilt_tokenizers_match_hf_where_llamacpp_refact_differs() {
    let Some(hf) = hf_granite() else { return };
    let texts = stress_texts();
    assert!(texts.len() > 60);
    for (label, tokenizer) in rebuilt_granite() {
        for text in &texts {
            assert_eq!(
                tokenizer.encode(text).unwrap(),
                hf.encode(text).unwrap(),
                "{label}: {text:?}"
            );
            assert_eq!(
                tokenizer.encode_as_text(text).unwrap(),
                hf.encode_as_text(text).unwrap(),
                "{label}: {text:?}"
            );
        }
    }
    let pieces = |t: &Tokenizer, text: &str| -> Vec<String> {
        let ids = t.encode(text).unwrap();
        ids.iter().map(|&id| t.id_to_token(id).unwrap()).collect()
    };
    assert_eq!(pieces(hf, "x  123"), ["x", "Ġ", "Ġ", "1", "2", "3"]);
}

/// The same metadata read with llama.cpp's own refact split (`starcoder` here: every digit alone, then the
/// GPT-2 regex) agrees with HF on every reference case, which is why the references alone cannot tell the two
/// apart, and differs only where whitespace runs come before a number.
#[test]
fn llamacpp_refact_split_differs_from_hf_only_before_numbers() {
    if !have_granite_references() {
        return;
    }
    let (Some(hf), Some(file)) = (hf_granite(), llamacpp_file(REALVOCAB_LLAMACPP_FILES[0])) else {
        return;
    };
    let as_llamacpp = edited(&file, "refact-as-llama.cpp.gguf", |m| {
        set(m, GGUF_GGML_PRE_KEY, GgufValue::String("starcoder".into()))
    });
    let llamacpp = Tokenizer::from_gguf(&as_llamacpp).unwrap();
    for (name, text, want) in reference_encodings() {
        assert_eq!(llamacpp.encode(&text).unwrap(), want, "{name}");
    }
    let pieces = |text: &str| -> Vec<String> {
        let ids = llamacpp.encode(text).unwrap();
        ids.iter()
            .map(|&id| llamacpp.id_to_token(id).unwrap())
            .collect()
    };
    assert_eq!(pieces("x  123"), ["x", "ĠĠ", "1", "2", "3"]);
    let differing: Vec<String> = stress_texts()
        .into_iter()
        .filter(|t| llamacpp.encode(t).unwrap() != hf.encode(t).unwrap())
        .collect();
    assert!(!differing.is_empty());
    for text in &differing {
        let chars: Vec<char> = text.chars().collect();
        let whitespace_before_number = chars
            .windows(2)
            .any(|w| w[0].is_whitespace() && w[1].is_numeric());
        assert!(whitespace_before_number, "{text:?}");
    }
}

/// The llama.cpp k-quant files (`gpt-2`, a trained 400-token vocabulary with the Granite special tokens) and our
/// converter's file of the same fixture, without its JSON, encode every fixture prompt to the HF `input_ids`.
#[test]
fn kquant_files_encode_every_fixture_prompt() {
    let Some(dir) = fixture_dir(KQUANT) else {
        return;
    };
    let reference = read_json(&dir.join("reference.json"));
    let prompts = reference["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 4);
    let mut files: Vec<GgufFile> = converter_file_without_hf_json(KQUANT).into_iter().collect();
    files.extend(
        KQUANT_LLAMACPP_FILES
            .iter()
            .filter_map(|n| llamacpp_file(n)),
    );
    for file in &files {
        assert_eq!(pre_of(file), "gpt-2");
        let tokenizer = Tokenizer::from_gguf(file).unwrap_or_else(|e| panic!("{e}"));
        let label = file.path().display();
        assert_eq!(tokenizer.vocab_size(), 400, "{label}");
        for prompt in prompts {
            let text = str_of(prompt, "text");
            let ids = tokenizer.encode(text).unwrap();
            assert_eq!(
                ids,
                ids_of(&prompt["input_ids"]),
                "{label}: {}",
                prompt["name"]
            );
            assert_eq!(tokenizer.decode(&ids, false).unwrap(), text, "{label}");
        }
    }
}

/// Unknown tokenizer families and pre-tokenizers are refused with the file, the key and the value named.
#[test]
fn unsupported_ggml_tokenizers_are_clear_errors() {
    let Some(file) = converter_file_without_hf_json(KQUANT) else {
        return;
    };
    let error = |key: &str, value: GgufValue| {
        let gguf = edited(&file, "edited.gguf", |m| set(m, key, value));
        Tokenizer::from_gguf(&gguf).unwrap_err().to_string()
    };
    let err = error(GGUF_GGML_PRE_KEY, GgufValue::String("llama3".into()));
    assert!(
        err.starts_with("edited.gguf: metadata `tokenizer.ggml.pre` = \"llama3\" is not supported"),
        "{err}"
    );
    assert!(err.contains("refact"), "{err}");
    let err = error("tokenizer.ggml.model", GgufValue::String("llama".into()));
    assert!(
        err.starts_with(
            "edited.gguf: metadata `tokenizer.ggml.model` = \"llama\" is not supported"
        ),
        "{err}"
    );
    let err = error("tokenizer.ggml.add_bos_token", GgufValue::Bool(true));
    assert!(
        err.contains("`tokenizer.ggml.add_bos_token` = \"true\""),
        "{err}"
    );
    let err = error(
        "tokenizer.ggml.merges",
        GgufValue::Array(quarry::gguf::Array::String(vec!["Ġt".into()])),
    );
    assert!(err.contains("entry 0 (\"Ġt\") is not two tokens"), "{err}");
    let err = error(
        "tokenizer.ggml.token_type",
        GgufValue::Array(quarry::gguf::Array::I32(vec![1; 3])),
    );
    assert!(
        err.contains("not one integer per token (400 tokens)"),
        "{err}"
    );
    let gguf = edited(&file, "edited.gguf", |m| {
        m.retain(|(k, _)| k != GGUF_GGML_PRE_KEY)
    });
    let err = Tokenizer::from_gguf(&gguf).unwrap_err().to_string();
    assert!(err.contains("`tokenizer.ggml.pre` is missing"), "{err}");
}

/// `quarry run` on a file made by llama.cpp: the prompt is tokenized from the file's own metadata into the HF
/// ids, and the F16 file continues it greedily exactly as the HF reference does (the smallest top-1 margin of
/// these continuations is 0.028; the F16 engine is within 1e-3 of the reference logits).
#[test]
fn quarry_runs_a_llamacpp_file() {
    let (Some(_), Some(dir)) = (
        llamacpp_file(REALVOCAB_LLAMACPP_FILES[0]),
        fixture_dir(REALVOCAB),
    ) else {
        return;
    };
    let model = shared()
        .join("fixtures/llamacpp-gguf")
        .join(REALVOCAB_LLAMACPP_FILES[0]);
    let model = model.to_str().unwrap();
    let kernel = kernel_sets().last().copied().unwrap();
    let reference = read_json(&dir.join("reference.json"));
    for prompt in reference["prompts"].as_array().unwrap() {
        let want_prompt = ids_of(&prompt["input_ids"]);
        let want_greedy = ids_of(&prompt["greedy_new_ids"]);
        let n = want_greedy.len().to_string();
        let mut args = vec![
            "run",
            model,
            "--temperature",
            "0",
            "-n",
            &n,
            "--format",
            "json",
        ];
        let messages = prompt["messages"].as_array();
        let (system, user);
        match messages.map(Vec::as_slice) {
            Some([s, u]) if s["role"] == "system" && u["role"] == "user" => {
                (system, user) = (str_of(s, "content"), str_of(u, "content"));
                args.extend(["--system", system, "--prompt", user]);
            }
            Some(_) => continue,
            None => args.extend(["--raw", "--prompt", str_of(prompt, "text")]),
        }
        let out: Value = serde_json::from_str(quarry_ok(kernel, &args).trim()).unwrap();
        assert_eq!(
            ids_of(&out["prompt_ids"]),
            want_prompt,
            "{}",
            prompt["name"]
        );
        assert_eq!(
            ids_of(&out["generated_ids"]),
            want_greedy,
            "{}",
            prompt["name"]
        );
    }
}
