//! The real Granite 3.x tokenizer and chat templates against the references recorded with Hugging Face
//! `tokenizers` 0.23.3 and transformers 5.24.0 (`../shared/granite-3.*-1b-a400m-instruct/`).
//!
//! The real tokenizer files are not committed to this project; each test that needs them says SKIPPED on
//! stderr and returns when `../shared` is absent (and fails in CI: see `support/skip.rs`).

mod support;

use std::path::PathBuf;
use std::sync::OnceLock;

use chrono::NaiveDate;
use quarry::text::chat_template::{ChatTemplate, Conversation};
use quarry::text::tokenizer::{GGUF_EOS_KEY, GGUF_HF_JSON_KEY, Tokenizer};
use quarry_quantize::gguf::{GgufFile, GgufWriter, Value as GgufValue};
use serde_json::Value;

const GRANITE_30: &str = "granite-3.0-1b-a400m-instruct";
const GRANITE_31: &str = "granite-3.1-1b-a400m-instruct";

/// `../shared/<relative>`, or `None` after [`support::skipped`].
fn shared_path(relative: &str) -> Option<PathBuf> {
    let path = support::shared().join(relative);
    if path.exists() {
        Some(path)
    } else {
        support::skipped("the real Granite tokenizer's files", &path);
        None
    }
}

fn read_json(relative: &str) -> Option<Value> {
    let path = shared_path(relative)?;
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// The real tokenizer, parsed once per test process (3.5 MB of JSON; every test here shares it).
fn granite_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = support::shared().join(GRANITE_30).join("tokenizer.json");
        Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{e}"))
    })
}

fn template_of(model: &str) -> Option<ChatTemplate> {
    let path = shared_path(&format!("{model}/tokenizer_config.json"))?;
    let json = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Some(
        ChatTemplate::from_tokenizer_config(&json, &path.display().to_string())
            .unwrap_or_else(|e| panic!("{e}")),
    )
}

fn str_of<'a>(case: &'a Value, key: &str) -> &'a str {
    case[key]
        .as_str()
        .unwrap_or_else(|| panic!("reference case without string {key:?}: {case}"))
}

fn ids_of(case: &Value, key: &str) -> Vec<u32> {
    serde_json::from_value(case[key].clone())
        .unwrap_or_else(|e| panic!("{key} of {}: {e}", case["name"]))
}

fn cases<'a>(reference: &'a Value, key: &str) -> &'a [Value] {
    let list = reference[key]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    assert!(!list.is_empty(), "the reference has no {key:?} cases");
    list
}

/// Fails listing every mismatch, so one run shows them all.
fn assert_no_failures(what: &str, checked: usize, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} of {checked} {what} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn encode_matches_every_reference_case() {
    let Some(reference) = read_json(&format!("{GRANITE_30}/tokenizer-reference.json")) else {
        return;
    };
    let tokenizer = granite_tokenizer();
    let mut failures = Vec::new();
    let encode_cases = cases(&reference, "encode");
    for case in encode_cases {
        let (name, text) = (str_of(case, "name"), str_of(case, "text"));
        let want = ids_of(case, "ids");
        let got = tokenizer
            .encode(text)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if got != want {
            failures.push(format!(
                "{name}: encode {text:?} gave {got:?}, want {want:?}"
            ));
            continue;
        }
        if let Some(tokens) = case["tokens"].as_array() {
            let got: Vec<Option<String>> =
                want.iter().map(|&id| tokenizer.id_to_token(id)).collect();
            let want: Vec<Option<String>> = tokens
                .iter()
                .map(|t| t.as_str().map(str::to_string))
                .collect();
            if got != want {
                failures.push(format!("{name}: tokens {got:?}, want {want:?}"));
            }
            for (id, token) in ids_of(case, "ids").iter().zip(tokens) {
                if tokenizer.token_to_id(token.as_str().unwrap_or_default()) != Some(*id) {
                    failures.push(format!("{name}: token_to_id({token}) is not {id}"));
                }
            }
        }
        if let Some(decoded) = case["decode"].as_str() {
            let got = tokenizer
                .decode(&want, false)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            if got != decoded {
                failures.push(format!("{name}: decode gave {got:?}, want {decoded:?}"));
            }
        }
        let positions: Vec<usize> =
            serde_json::from_value(case["special_token_positions"].clone()).unwrap_or_default();
        let specials: Vec<usize> = (0..want.len())
            .filter(|&i| tokenizer.is_special(want[i]))
            .collect();
        if specials != positions {
            failures.push(format!(
                "{name}: special tokens at {specials:?}, want {positions:?}"
            ));
        }
    }
    assert_no_failures("encode cases", encode_cases.len(), &failures);
}

#[test]
fn decode_matches_every_reference_case() {
    let Some(reference) = read_json(&format!("{GRANITE_30}/tokenizer-reference.json")) else {
        return;
    };
    let tokenizer = granite_tokenizer();
    let mut failures = Vec::new();
    let decode_cases = cases(&reference, "decode");
    for case in decode_cases {
        let name = str_of(case, "name");
        let skip_special = case["skip_special_tokens"]
            .as_bool()
            .unwrap_or_else(|| panic!("{name}: no skip_special_tokens"));
        let got = tokenizer
            .decode(&ids_of(case, "ids"), skip_special)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if got != str_of(case, "text") {
            failures.push(format!(
                "{name}: decode gave {got:?}, want {:?}",
                str_of(case, "text")
            ));
        }
    }
    assert_no_failures("decode cases", decode_cases.len(), &failures);
}

#[test]
fn granite_vocabulary_facts() {
    if shared_path(&format!("{GRANITE_30}/tokenizer.json")).is_none() {
        return;
    }
    let tokenizer = granite_tokenizer();
    assert_eq!(tokenizer.vocab_size(), 49155);
    assert_eq!(tokenizer.eos_id(), 0);
    assert_eq!(tokenizer.token_to_id("<|end_of_text|>"), Some(0));
    assert_eq!(tokenizer.token_to_id("<|tool_call|>"), Some(49154));
    let specials: Vec<u32> = (0..49155).filter(|&id| tokenizer.is_special(id)).collect();
    assert_eq!(specials, (0..19).chain(49152..49155).collect::<Vec<u32>>());
    assert!(tokenizer.decode(&[49155], false).is_err());
}

/// The text a stream returns for each id, and what `finish` returns after the last.
fn stream_one_at_a_time(
    tokenizer: &Tokenizer,
    ids: &[u32],
    skip_special: bool,
) -> (Vec<String>, String) {
    let mut stream = tokenizer.stream(skip_special);
    let pieces = ids
        .iter()
        .map(|&id| stream.push(id).unwrap_or_else(|e| panic!("{ids:?}: {e}")))
        .collect();
    let rest = stream.finish().unwrap_or_else(|e| panic!("{ids:?}: {e}"));
    (pieces, rest)
}

/// Output streamed one id at a time must add up to the full decode, and a valid text must never show U+FFFD,
/// even though many of these cases (emoji, CJK, accents) have tokens that end inside a character.
#[test]
fn streaming_decode_adds_up_to_the_full_decode() {
    let Some(reference) = read_json(&format!("{GRANITE_30}/tokenizer-reference.json")) else {
        return;
    };
    let tokenizer = granite_tokenizer();
    let mut failures = Vec::new();
    let mut held_back = 0;
    let encode_cases = cases(&reference, "encode");
    for case in encode_cases {
        let name = str_of(case, "name");
        let ids = ids_of(case, "ids");
        for skip_special in [false, true] {
            let (pieces, rest) = stream_one_at_a_time(tokenizer, &ids, skip_special);
            if let Some(piece) = pieces.iter().find(|p| p.contains('\u{FFFD}')) {
                failures.push(format!("{name}: streamed piece {piece:?} has U+FFFD"));
            }
            held_back += pieces.iter().filter(|p| p.is_empty()).count();
            let streamed = pieces.concat() + &rest;
            let full = tokenizer
                .decode(&ids, skip_special)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            if streamed != full {
                failures.push(format!(
                    "{name} (skip_special {skip_special}): streamed {streamed:?}, decode {full:?}"
                ));
            }
        }
    }
    assert_no_failures("streamed encode cases", encode_cases.len(), &failures);
    assert!(
        held_back > 0,
        "no token was ever held back: the partial-character path went untested"
    );
}

/// What a model may emit: arbitrary ids, many of them byte pieces that do not form valid UTF-8. The stream must
/// not fail and must add up to decoding everything at once (specials kept or skipped).
#[test]
fn streaming_arbitrary_ids_adds_up_to_the_full_decode() {
    if shared_path(&format!("{GRANITE_30}/tokenizer.json")).is_none() {
        return;
    }
    let tokenizer = granite_tokenizer();
    let mut state = 0x5eed_u64;
    let mut next = |below: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % below) as u32
    };
    for case in 0..200 {
        // Half the ids from the low range, where the single-byte and special tokens are.
        let ids: Vec<u32> = (0..1 + case % 30)
            .map(|_| if next(2) == 0 { next(600) } else { next(49155) })
            .collect();
        for skip_special in [false, true] {
            let (pieces, rest) = stream_one_at_a_time(tokenizer, &ids, skip_special);
            let streamed = pieces.concat() + &rest;
            let full = tokenizer
                .decode(&ids, skip_special)
                .unwrap_or_else(|e| panic!("{ids:?}: {e}"));
            assert_eq!(streamed, full, "{ids:?} (skip_special {skip_special})");
        }
    }
}

/// Renders each recorded conversation with `template`, then checks the text and its token ids.
fn check_chat_cases(template: &ChatTemplate, chat_cases: &[Value]) -> Vec<String> {
    let tokenizer = granite_tokenizer();
    let mut failures = Vec::new();
    for case in chat_cases {
        let name = str_of(case, "name");
        let mut body = serde_json::Map::new();
        for key in ["messages", "tools", "documents"] {
            if let Some(value) = case.get(key) {
                body.insert(key.to_string(), value.clone());
            }
        }
        let conversation = Conversation::from_json_str(&Value::Object(body).to_string())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let add_generation_prompt = case["add_generation_prompt"]
            .as_bool()
            .unwrap_or_else(|| panic!("{name}: no add_generation_prompt"));
        let rendered = template
            .render(&conversation, add_generation_prompt)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if rendered != str_of(case, "rendered") {
            failures.push(format!(
                "{name}: rendered\n{rendered:?}\nwant\n{:?}",
                str_of(case, "rendered")
            ));
            continue;
        }
        let ids = tokenizer
            .encode(&rendered)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if ids != ids_of(case, "ids") {
            failures.push(format!(
                "{name}: ids {ids:?}, want {:?}",
                ids_of(case, "ids")
            ));
        }
    }
    failures
}

#[test]
fn granite_3_0_template_renders_every_reference_conversation() {
    let Some(reference) = read_json(&format!("{GRANITE_30}/tokenizer-reference.json")) else {
        return;
    };
    let Some(template) = template_of(GRANITE_30) else {
        return;
    };
    let chat_cases = cases(&reference, "chat");
    assert!(
        chat_cases
            .iter()
            .any(|c| c["add_generation_prompt"] == false)
    );
    assert!(chat_cases.iter().any(|c| c.get("tools").is_some()));
    assert_no_failures(
        "3.0 chat cases",
        chat_cases.len(),
        &check_chat_cases(&template, chat_cases),
    );
}

#[test]
fn granite_3_1_template_renders_every_reference_conversation_on_the_recorded_date() {
    let Some(reference) = read_json(&format!("{GRANITE_31}/chat-reference.json")) else {
        return;
    };
    let Some(template) = template_of(GRANITE_31) else {
        return;
    };
    let date_fixed = &reference["date_fixed"];
    let date = NaiveDate::parse_from_str(str_of(date_fixed, "date"), "%Y-%m-%d")
        .unwrap_or_else(|e| panic!("{e}"));
    let template = template.with_date(date);
    let chat_cases = cases(&reference, "chat");
    assert!(chat_cases.iter().any(|c| c.get("documents").is_some()));
    assert!(
        chat_cases
            .iter()
            .any(|c| str_of(c, "rendered").contains(str_of(date_fixed, "rendered_as")))
    );
    assert_no_failures(
        "3.1 chat cases",
        chat_cases.len(),
        &check_chat_cases(&template, chat_cases),
    );
}

/// The path `quarry` takes: tokenizer and template both read from one GGUF file.
#[test]
fn gguf_with_the_embedded_real_tokenizer_encodes_a_rendered_chat() {
    let Some(reference) = read_json(&format!("{GRANITE_30}/tokenizer-reference.json")) else {
        return;
    };
    let Some(tokenizer_json) = shared_path(&format!("{GRANITE_30}/tokenizer.json")) else {
        return;
    };
    let Some(config) = read_json(&format!("{GRANITE_30}/tokenizer_config.json")) else {
        return;
    };
    let text = |v: &Value| GgufValue::String(v.as_str().unwrap_or_default().to_string());
    let metadata = vec![
        (
            GGUF_HF_JSON_KEY.to_string(),
            GgufValue::String(
                std::fs::read_to_string(tokenizer_json).unwrap_or_else(|e| panic!("{e}")),
            ),
        ),
        (
            "tokenizer.chat_template".to_string(),
            text(&config["chat_template"]),
        ),
        (GGUF_EOS_KEY.to_string(), GgufValue::U32(0)),
        ("tokenizer.ggml.bos_token_id".to_string(), GgufValue::U32(0)),
    ];
    let bytes = GgufWriter::new(Vec::new(), &metadata, Vec::new())
        .and_then(GgufWriter::finish)
        .unwrap_or_else(|e| panic!("{e}"));
    let gguf =
        GgufFile::from_bytes("granite-tokenizer.gguf", bytes).unwrap_or_else(|e| panic!("{e}"));
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{e}"));
    let template = ChatTemplate::from_gguf(&gguf).unwrap_or_else(|e| panic!("{e}"));
    let case = &cases(&reference, "chat")[0];
    let conversation: Conversation = Conversation::from_json_str(&case["messages"].to_string())
        .unwrap_or_else(|e| panic!("{e}"));
    let rendered = template
        .render(&conversation, true)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rendered, str_of(case, "rendered"));
    assert_eq!(
        tokenizer
            .encode(&rendered)
            .unwrap_or_else(|e| panic!("{e}")),
        ids_of(case, "ids")
    );
    assert_eq!((tokenizer.eos_id(), tokenizer.vocab_size()), (0, 49155));
}
