//! Synthesized models in the runtime: every fixture's shape at every type opens, runs with finite logits and
//! varied routing, and its synthetic tokenizer agrees with its `tokenizer.ggml.*` keys; `quarry synth` refuses
//! unknown model names with the list of known ones.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use quarry::engine::Engine;
use quarry::generate::Session;
use quarry::gguf::{Array, Value};
use quarry_quantize::hf::HfConfig;
use quarry_quantize::{SynthOptions, TargetType, synthesize};

const MODELS: [&str; 4] = [
    "granitemoe-dev-1",
    "granitemoe-dev-2",
    "granite-dense-dev",
    "granitemoe-kquant-dev",
];

/// A fresh folder under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("quarry-synth-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture_config(model: &str) -> HfConfig {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(model);
    HfConfig::load(&dir).unwrap()
}

#[test]
fn every_fixture_shape_at_every_type_runs_with_finite_logits_and_varied_routing() {
    let tmp = TempDir::new("run");
    for model in MODELS {
        let config = fixture_config(model);
        for target in TargetType::ALL {
            let what = format!("{model} {target}");
            let path = tmp.0.join(format!("{model}-{target}.gguf"));
            synthesize(&SynthOptions::new(config.clone(), &path, target)).unwrap();
            let engine = Engine::open_for_text(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
            let tokenizer = engine.tokenizer();
            let prompt = tokenizer.encode("Hello world, 123  go!").unwrap();
            assert!(prompt.len() > 3, "{what}: {prompt:?}");

            // the whole prompt at once, then one token at a time
            let mut session = Session::new(&engine.model, 64, 16);
            let logits = session.feed(&prompt).unwrap();
            assert_eq!(logits.len(), config.vocab_size, "{what}");
            assert!(
                logits.iter().all(|l| l.is_finite()),
                "{what}: prompt logits"
            );
            for id in (1..=255).step_by(17) {
                let logits = session.feed(&[id]).unwrap();
                assert!(logits.iter().all(|l| l.is_finite()), "{what}: token {id}");
                let spread = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l))
                    - logits.iter().fold(f32::INFINITY, |m, &l| m.min(l));
                assert!(spread > 1e-3, "{what}: flat logits after token {id}");
            }
            if let Some(moe) = config.moe {
                for (layer, reads) in session.expert_reads().iter().enumerate() {
                    let touched = reads.iter().filter(|&&n| n > 0).count();
                    assert!(
                        touched > moe.num_experts_per_tok
                            || moe.num_experts_per_tok == moe.num_local_experts,
                        "{what}: layer {layer} always routes to the same {touched} experts"
                    );
                }
            }
        }
    }
}

#[test]
fn the_synthetic_tokenizer_matches_its_ggml_metadata_and_round_trips() {
    let tmp = TempDir::new("tokenizer");
    let config = fixture_config("granitemoe-dev-1");
    let path = tmp.0.join("m.gguf");
    synthesize(&SynthOptions::new(config.clone(), &path, TargetType::Q8_0)).unwrap();
    let engine = Engine::open_for_text(&path).unwrap();
    let tokenizer = engine.tokenizer();
    assert_eq!(tokenizer.vocab_size(), config.vocab_size);
    assert_eq!(tokenizer.eos_id(), 0);
    let tokens = match engine.file.get("tokenizer.ggml.tokens") {
        Some(Value::Array(Array::String(tokens))) => tokens.clone(),
        other => panic!("{other:?}"),
    };
    for (id, token) in tokens.iter().enumerate() {
        assert_eq!(
            tokenizer.id_to_token(id as u32).as_deref(),
            Some(token.as_str()),
            "id {id}"
        );
    }
    for id in [0, config.vocab_size - 3, config.vocab_size - 1] {
        assert!(tokenizer.is_special(id as u32), "{id}");
    }
    for text in [
        "Hello world",
        "x  123\n\tend",
        "émoji 😀 and 你好",
        "<|end_of_text|>",
    ] {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    }
    // merges make common text shorter than its bytes
    assert!(tokenizer.encode("the cat sat on the mat").unwrap().len() < 22);
    // the chat template uses the role tokens
    let template = engine.chat_template.as_ref().expect("a chat template");
    let conversation = quarry::text::chat_template::Conversation::from_messages(vec![
        quarry::text::chat_template::Message::new("user", "hi"),
    ]);
    let rendered = template.render(&conversation, true).unwrap();
    assert_eq!(
        rendered,
        "<|start_of_role|>user<|end_of_role|>hi<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
    );
    let ids = tokenizer.encode(&rendered).unwrap();
    assert_eq!(ids.first(), Some(&(config.vocab_size as u32 - 3)));
}

#[test]
fn unknown_model_names_are_refused_with_the_known_ones() {
    let tmp = TempDir::new("cli");
    let out = tmp.0.join("x.gguf");
    let run = Command::new(env!("CARGO_BIN_EXE_quarry"))
        .args(["synth", "granite-9b-nope", "--type", "q8_0", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    for name in [
        "granite-9b-nope",
        "granite-3.0-1b-a400m-instruct",
        "granite-3.1-1b-a400m-instruct",
    ] {
        assert!(stderr.contains(name), "{name} not in: {stderr}");
    }
    let left: HashSet<_> = std::fs::read_dir(&tmp.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
