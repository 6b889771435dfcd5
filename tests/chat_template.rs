//! Chat templates and tokenizers of the developer fixtures, and the chat-template edge cases.
//!
//! Fixtures are read from `tests/fixtures/<name>/` when the project carries a copy, else from
//! `../shared/fixtures/<name>/`; a test whose fixture is in neither place says SKIPPED on stderr and returns (and
//! fails in CI: see `support/skip.rs`).
//! `granitemoe-realvocab-dev` holds the real Granite tokenizer, which is never copied into the project.

mod support;

use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use quarry::text::chat_template::{ChatTemplate, ChatTemplateError, Conversation, Message};
use quarry::text::tokenizer::Tokenizer;
use quarry_quantize::gguf::{GgufFile, GgufWriter, Value as GgufValue};
use serde_json::Value;

fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the fixture `name` is: the project's copy first, then `../shared`.
fn fixture_dir(name: &str) -> Option<PathBuf> {
    let own = crate_root().join("tests/fixtures").join(name);
    let shared = crate_root().join("../shared/fixtures").join(name);
    if own.join("reference.json").exists() {
        Some(own)
    } else if shared.join("reference.json").exists() {
        Some(shared)
    } else {
        support::skipped(
            &format!("fixture {name} (not in tests/fixtures/ either)"),
            &shared,
        );
        None
    }
}

fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&read_text(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn template_in(dir: &Path) -> ChatTemplate {
    let path = dir.join("tokenizer_config.json");
    ChatTemplate::from_tokenizer_config(&read_text(&path), &path.display().to_string())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn ids(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{value}: {e}"))
}

/// Every prompt of a fixture: `encode(text)` is `input_ids` (with the recorded tokens), the ids decode and
/// stream back to the text, and the chat prompt is the fixture's messages rendered by its own template.
fn check_fixture(name: &str) {
    let Some(dir) = fixture_dir(name) else {
        return;
    };
    let reference = read_json(&dir.join("reference.json"));
    let tokenizer =
        Tokenizer::from_file(dir.join("tokenizer.json")).unwrap_or_else(|e| panic!("{e}"));
    let template = template_in(&dir);
    for (token, id) in reference["special_token_ids"]
        .as_object()
        .into_iter()
        .flatten()
    {
        assert_eq!(
            tokenizer.token_to_id(token),
            id.as_u64().map(|id| id as u32),
            "{name}: {token}"
        );
    }
    assert_eq!(
        Some(u64::from(tokenizer.eos_id())),
        reference["eos_token_id"].as_u64()
    );
    let prompts = reference["prompts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    assert!(!prompts.is_empty(), "{name}: no prompts");
    let mut saw_chat = false;
    for prompt in prompts {
        let label = format!("{name}/{}", prompt["name"]);
        let text = prompt["text"]
            .as_str()
            .unwrap_or_else(|| panic!("{label}: no text"));
        let want = ids(&prompt["input_ids"]);
        let got = tokenizer
            .encode(text)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(got, want, "{label}: encode");
        let tokens: Vec<Option<String>> = got.iter().map(|&id| tokenizer.id_to_token(id)).collect();
        let want_tokens: Vec<Option<String>> =
            serde_json::from_value(prompt["input_tokens"].clone())
                .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(tokens, want_tokens, "{label}: tokens");
        assert_eq!(
            tokenizer
                .decode(&got, false)
                .unwrap_or_else(|e| panic!("{label}: {e}")),
            text,
            "{label}: decode"
        );
        let mut stream = tokenizer.stream(false);
        let mut streamed = String::new();
        for &id in &got {
            streamed += &stream.push(id).unwrap_or_else(|e| panic!("{label}: {e}"));
        }
        streamed += &stream.finish().unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(streamed, text, "{label}: streamed decode");
        if let Some(messages) = prompt.get("messages") {
            saw_chat = true;
            let conversation = Conversation::from_json_str(&messages.to_string())
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let add_generation_prompt = prompt["add_generation_prompt"]
                .as_bool()
                .unwrap_or_else(|| panic!("{label}"));
            let rendered = template
                .render(&conversation, add_generation_prompt)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(rendered, text, "{label}: rendered chat");
            assert_eq!(
                rendered,
                read_text(&dir.join("chat_rendered.txt")),
                "{label}: chat_rendered.txt"
            );
        }
    }
    assert!(saw_chat, "{name}: no chat prompt with messages");
}

#[test]
fn fixture_granitemoe_dev_1() {
    check_fixture("granitemoe-dev-1");
}

#[test]
fn fixture_granitemoe_dev_2_granite_3_1_template() {
    check_fixture("granitemoe-dev-2");
}

#[test]
fn fixture_granite_dense_dev() {
    check_fixture("granite-dense-dev");
}

#[test]
fn fixture_granitemoe_kquant_dev() {
    check_fixture("granitemoe-kquant-dev");
}

#[test]
fn fixture_granitemoe_realvocab_dev_real_tokenizer() {
    check_fixture("granitemoe-realvocab-dev");
}

/// A GGUF made by llama.cpp: its chat template (and special-token texts) read from `tokenizer.*` metadata; it
/// embeds no `tokenizer.json`, so the tokenizer is rebuilt from `tokenizer.ggml.*`.
#[test]
fn llama_cpp_gguf_template_renders_the_fixture_chat() {
    let path =
        crate_root().join("../shared/fixtures/llamacpp-gguf/granitemoe-realvocab-dev.f16.gguf");
    if !path.exists() {
        support::skipped("llama.cpp's realvocab F16 file", &path);
        return;
    }
    let Some(dir) = fixture_dir("granitemoe-realvocab-dev") else {
        return;
    };
    let gguf = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let template = ChatTemplate::from_gguf(&gguf).unwrap_or_else(|e| panic!("{e}"));
    let reference = read_json(&dir.join("reference.json"));
    let chat = &reference["prompts"][0];
    let conversation = Conversation::from_json_str(&chat["messages"].to_string())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        template
            .render(&conversation, true)
            .unwrap_or_else(|e| panic!("{e}")),
        read_text(&dir.join("chat_rendered.txt"))
    );
    let end_of_text = Some("<|end_of_text|>".to_string());
    let special = template.special_tokens();
    assert_eq!(
        (&special.bos, &special.eos, &special.unk),
        (&end_of_text, &end_of_text, &end_of_text)
    );
    // No embedded tokenizer.json: the tokenizer is rebuilt from `tokenizer.ggml.*` and gives the HF ids.
    assert!(gguf.get("tokenizer.huggingface.json").is_none());
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<u32> = serde_json::from_value(chat["input_ids"].clone()).unwrap();
    assert_eq!(
        tokenizer
            .encode(&read_text(&dir.join("chat_rendered.txt")))
            .unwrap(),
        ids
    );
}

fn gguf_in_memory(metadata: Vec<(String, GgufValue)>) -> GgufFile {
    let bytes = GgufWriter::new(Vec::new(), &metadata, Vec::new())
        .and_then(GgufWriter::finish)
        .unwrap_or_else(|e| panic!("{e}"));
    GgufFile::from_bytes("chat.gguf", bytes).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn gguf_special_tokens_reach_the_template() {
    let tokens = ["<|end_of_text|>", "a", "<s>", "<unk>"]
        .map(String::from)
        .to_vec();
    let gguf = gguf_in_memory(vec![
        (
            "tokenizer.chat_template".into(),
            GgufValue::String("{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ messages[0]['content'] }}".into()),
        ),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(quarry_quantize::gguf::Array::String(tokens))),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(2)),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(0)),
        ("tokenizer.ggml.unknown_token_id".into(), GgufValue::U32(3)),
    ]);
    let template = ChatTemplate::from_gguf(&gguf).unwrap_or_else(|e| panic!("{e}"));
    let conversation = Conversation::from_messages(vec![Message::new("user", "hi")]);
    assert_eq!(
        template
            .render(&conversation, true)
            .unwrap_or_else(|e| panic!("{e}")),
        "<s>|<|end_of_text|>|<unk>||hi"
    );
}

#[test]
fn gguf_without_a_template_is_a_clear_error() {
    let err = ChatTemplate::from_gguf(&gguf_in_memory(Vec::new())).unwrap_err();
    assert!(matches!(err, ChatTemplateError::Missing { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "chat.gguf: no chat template (`tokenizer.chat_template` is missing)"
    );
    let err = ChatTemplate::from_gguf(&gguf_in_memory(vec![(
        "tokenizer.chat_template".into(),
        GgufValue::U8(1),
    )]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("is a U8, not a string"), "{err}");
}

/// Conversations rendered with the Granite 3.0 and 3.1 templates by jinja2 3.1.6 set up as transformers sets it
/// up for `apply_chat_template` (sandboxed, trim_blocks, lstrip_blocks, tojson = json.dumps(ensure_ascii=False),
/// strftime_now at 2025-03-07). Each checks one thing the references do not: non-ASCII and control characters
/// in messages, nested tool schemas whose keys are not in sorted order (with floats, negatives, null, empty
/// containers), extra message keys, the 3.1 `controls` variable, roles the 3.0 template ignores, no messages.
const EDGE_CASES: &str = r#"[
 {
  "name": "unicode_message",
  "template": "granite-3.0",
  "conversation": {
   "messages": [
    {
     "role": "system",
     "content": "Réponds en français."
    },
    {
     "role": "user",
     "content": "Grüße 👋 — 日本語\ttab \"q\" <b> & 'x'\n2nd line"
    }
   ]
  },
  "add_generation_prompt": true,
  "rendered": "<|start_of_role|>system<|end_of_role|>Réponds en français.<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Grüße 👋 — 日本語\ttab \"q\" <b> & 'x'\n2nd line<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
 },
 {
  "name": "unicode_message",
  "template": "granite-3.1",
  "conversation": {
   "messages": [
    {
     "role": "system",
     "content": "Réponds en français."
    },
    {
     "role": "user",
     "content": "Grüße 👋 — 日本語\ttab \"q\" <b> & 'x'\n2nd line"
    }
   ]
  },
  "add_generation_prompt": true,
  "rendered": "<|start_of_role|>system<|end_of_role|>Réponds en français.<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Grüße 👋 — 日本語\ttab \"q\" <b> & 'x'\n2nd line<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
 },
 {
  "name": "nested_tool_keys_kept",
  "template": "granite-3.0",
  "conversation": {
   "messages": [
    {
     "role": "user",
     "content": "Look it up.",
     "name": "alice"
    }
   ],
   "tools": [
    {
     "type": "function",
     "function": {
      "name": "lookup",
      "parameters": {
       "type": "object",
       "required": [
        "zeta",
        "alpha"
       ],
       "properties": {
        "zeta": {
         "type": "integer",
         "minimum": -3,
         "default": 1.5e-07
        },
        "alpha": {
         "type": "object",
         "properties": {
          "inner": {
           "enum": [
            true,
            null,
            "ü"
           ]
          },
          "empty": {},
          "list": []
         }
        }
       }
      }
     }
    }
   ]
  },
  "add_generation_prompt": true,
  "rendered": "<|start_of_role|>available_tools<|end_of_role|>\n{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"lookup\",\n        \"parameters\": {\n            \"type\": \"object\",\n            \"required\": [\n                \"zeta\",\n                \"alpha\"\n            ],\n            \"properties\": {\n                \"zeta\": {\n                    \"type\": \"integer\",\n                    \"minimum\": -3,\n                    \"default\": 1.5e-07\n                },\n                \"alpha\": {\n                    \"type\": \"object\",\n                    \"properties\": {\n                        \"inner\": {\n                            \"enum\": [\n                                true,\n                                null,\n                                \"ü\"\n                            ]\n                        },\n                        \"empty\": {},\n                        \"list\": []\n                    }\n                }\n            }\n        }\n    }\n}<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Look it up.<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
 },
 {
  "name": "nested_tool_keys_kept",
  "template": "granite-3.1",
  "conversation": {
   "messages": [
    {
     "role": "user",
     "content": "Look it up.",
     "name": "alice"
    }
   ],
   "tools": [
    {
     "type": "function",
     "function": {
      "name": "lookup",
      "parameters": {
       "type": "object",
       "required": [
        "zeta",
        "alpha"
       ],
       "properties": {
        "zeta": {
         "type": "integer",
         "minimum": -3,
         "default": 1.5e-07
        },
        "alpha": {
         "type": "object",
         "properties": {
          "inner": {
           "enum": [
            true,
            null,
            "ü"
           ]
          },
          "empty": {},
          "list": []
         }
        }
       }
      }
     }
    }
   ]
  },
  "add_generation_prompt": true,
  "rendered": "<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024.\nToday's Date: March 07, 2025.\nYou are Granite, developed by IBM. You are a helpful AI assistant with access to the following tools. When a tool is required to answer the user's query, respond with <|tool_call|> followed by a JSON list of tools used. If a tool does not exist in the provided list of tools, notify the user that you do not have the ability to fulfill the request.<|end_of_text|>\n<|start_of_role|>tools<|end_of_role|>[\n    {\n        \"type\": \"function\",\n        \"function\": {\n            \"name\": \"lookup\",\n            \"parameters\": {\n                \"type\": \"object\",\n                \"required\": [\n                    \"zeta\",\n                    \"alpha\"\n                ],\n                \"properties\": {\n                    \"zeta\": {\n                        \"type\": \"integer\",\n                        \"minimum\": -3,\n                        \"default\": 1.5e-07\n                    },\n                    \"alpha\": {\n                        \"type\": \"object\",\n                        \"properties\": {\n                            \"inner\": {\n                                \"enum\": [\n                                    true,\n                                    null,\n                                    \"ü\"\n                                ]\n                            },\n                            \"empty\": {},\n                            \"list\": []\n                        }\n                    }\n                }\n            }\n        }\n    }\n]<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Look it up.<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
 },
 {
  "name": "controls_tools_documents_no_system",
  "template": "granite-3.1",
  "conversation": {
   "messages": [
    {
     "role": "user",
     "content": "Q?"
    }
   ],
   "tools": [
    {
     "type": "function",
     "function": {
      "name": "lookup",
      "parameters": {
       "type": "object",
       "required": [
        "zeta",
        "alpha"
       ],
       "properties": {
        "zeta": {
         "type": "integer",
         "minimum": -3,
         "default": 1.5e-07
        },
        "alpha": {
         "type": "object",
         "properties": {
          "inner": {
           "enum": [
            true,
            null,
            "ü"
           ]
          },
          "empty": {},
          "list": []
         }
        }
       }
      }
     }
    }
   ],
   "documents": [
    {
     "text": "Doc A text.",
     "title": "A"
    },
    {
     "text": "Doc B."
    }
   ],
   "controls": {
    "citations": true,
    "hallucinations": true,
    "length": "short"
   }
  },
  "add_generation_prompt": true,
  "rendered": "<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024.\nToday's Date: March 07, 2025.\nYou are Granite, developed by IBM. You are a helpful AI assistant with access to the following tools. When a tool is required to answer the user's query, respond with <|tool_call|> followed by a JSON list of tools used. If a tool does not exist in the provided list of tools, notify the user that you do not have the ability to fulfill the request.\n\nWrite the response to the user's input by strictly aligning with the facts in the provided documents. If the information needed to answer the question is not available in the documents, inform the user that the question cannot be answered based on the available data.\n\nIn your response, use the symbols <co> and </co> to indicate when a fact comes from a document in the search result, e.g <co>0</co> for a fact from document 0. Afterwards, list all the citations with their corresponding documents in an ordered list.\n\nFinally, after the response is written, include a numbered list of sentences from the response that are potentially hallucinated and not based in the documents.<|end_of_text|>\n<|start_of_role|>tools<|end_of_role|>[\n    {\n        \"type\": \"function\",\n        \"function\": {\n            \"name\": \"lookup\",\n            \"parameters\": {\n                \"type\": \"object\",\n                \"required\": [\n                    \"zeta\",\n                    \"alpha\"\n                ],\n                \"properties\": {\n                    \"zeta\": {\n                        \"type\": \"integer\",\n                        \"minimum\": -3,\n                        \"default\": 1.5e-07\n                    },\n                    \"alpha\": {\n                        \"type\": \"object\",\n                        \"properties\": {\n                            \"inner\": {\n                                \"enum\": [\n                                    true,\n                                    null,\n                                    \"ü\"\n                                ]\n                            },\n                            \"empty\": {},\n                            \"list\": []\n                        }\n                    }\n                }\n            }\n        }\n    }\n]<|end_of_text|>\n<|start_of_role|>documents<|end_of_role|>Document 0\nDoc A text.\n\nDocument 1\nDoc B.<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Q?<|end_of_text|>\n<|start_of_role|>assistant {\"citations\": true, \"hallucinations\": true, \"length\": \"short\"}<|end_of_role|>"
 },
 {
  "name": "documents_no_generation_prompt",
  "template": "granite-3.1",
  "conversation": {
   "messages": [
    {
     "role": "user",
     "content": "Q?"
    }
   ],
   "documents": [
    {
     "text": "Doc A text.",
     "title": "A"
    },
    {
     "text": "Doc B."
    }
   ]
  },
  "add_generation_prompt": false,
  "rendered": "<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024.\nToday's Date: March 07, 2025.\nYou are Granite, developed by IBM. Write the response to the user's input by strictly aligning with the facts in the provided documents. If the information needed to answer the question is not available in the documents, inform the user that the question cannot be answered based on the available data.<|end_of_text|>\n<|start_of_role|>documents<|end_of_role|>Document 0\nDoc A text.\n\nDocument 1\nDoc B.<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Q?<|end_of_text|>\n"
 },
 {
  "name": "unknown_role_skipped",
  "template": "granite-3.0",
  "conversation": {
   "messages": [
    {
     "role": "developer",
     "content": "ignored"
    },
    {
     "role": "user",
     "content": "hi"
    }
   ]
  },
  "add_generation_prompt": false,
  "rendered": "<|start_of_role|>user<|end_of_role|>hi<|end_of_text|>\n"
 },
 {
  "name": "empty_messages",
  "template": "granite-3.0",
  "conversation": {
   "messages": []
  },
  "add_generation_prompt": true,
  "rendered": ""
 }
]"#;

#[test]
fn edge_cases_render_like_transformers() {
    let (Some(dir_30), Some(dir_31)) = (
        fixture_dir("granitemoe-dev-1"),
        fixture_dir("granitemoe-dev-2"),
    ) else {
        return;
    };
    let date = NaiveDate::from_ymd_opt(2025, 3, 7).unwrap_or_default();
    let template_30 = template_in(&dir_30).with_date(date);
    let template_31 = template_in(&dir_31).with_date(date);
    let cases: Vec<Value> = serde_json::from_str(EDGE_CASES).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cases.len(), 8);
    for case in &cases {
        let label = format!("{} ({})", case["name"], case["template"]);
        let template = match case["template"].as_str() {
            Some("granite-3.0") => &template_30,
            Some("granite-3.1") => &template_31,
            other => panic!("{label}: unknown template {other:?}"),
        };
        let conversation = Conversation::from_json_str(&case["conversation"].to_string())
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let add_generation_prompt = case["add_generation_prompt"]
            .as_bool()
            .unwrap_or_else(|| panic!("{label}"));
        let rendered = template
            .render(&conversation, add_generation_prompt)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap_or_default(),
            "{label}"
        );
    }
}

/// jinja2 raises "list object has no element 0" for the 3.1 template's `messages[0]['role']` when there are no
/// messages (transformers never renders that); here it is a typed render error, not a panic or an empty prompt.
#[test]
fn granite_3_1_template_with_no_messages_is_an_error() {
    let Some(dir) = fixture_dir("granitemoe-dev-2") else {
        return;
    };
    match template_in(&dir).render(&Conversation::default(), true) {
        Err(ChatTemplateError::Render { origin, detail }) => {
            assert!(origin.ends_with("tokenizer_config.json"), "{origin}");
            assert!(detail.contains("line 1"), "{detail}");
        }
        other => panic!("expected a render error, got {other:?}"),
    }
}

#[test]
fn template_exception_is_a_typed_error() {
    let source = "{%- for message in messages %}{%- if message['role'] not in ['user', 'assistant'] %}\
                  {{- raise_exception('Unknown role: ' + message['role']) }}{%- endif %}{{- message['content'] }}\
                  {%- endfor %}";
    let template = ChatTemplate::new(source, "strict.jinja").unwrap_or_else(|e| panic!("{e}"));
    let conversation = Conversation::from_json_str(
        r#"[{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let err = template.render(&conversation, true).unwrap_err();
    assert_eq!(
        err.to_string(),
        "strict.jinja: the chat template rejects this conversation: Unknown role: robot"
    );
    assert!(
        matches!(err, ChatTemplateError::Raised { ref message, .. } if message == "Unknown role: robot")
    );
}

#[test]
fn malformed_template_error_names_the_problem() {
    let err = ChatTemplate::new(
        "{% for message in messages %}\n{{ message['content'] }\n{% endfor %}",
        "broken.json",
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ChatTemplateError::Syntax { .. }), "{text}");
    assert!(
        text.starts_with("broken.json: the chat template does not compile: "),
        "{text}"
    );
    assert!(text.contains("line 2"), "{text}");
    let err = ChatTemplate::from_tokenizer_config(r#"{"chat_template": "{% if %}"}"#, "cfg.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("cfg.json: the chat template does not compile: "),
        "{err}"
    );
    let err = ChatTemplate::from_tokenizer_config(r#"{"bos_token": "<s>"}"#, "cfg.json")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "cfg.json: no chat template (`chat_template` is missing)"
    );
}

#[test]
fn tools_keep_their_key_order() {
    let template = ChatTemplate::new(
        "{{ tools | tojson }}\n{{ tools[0] | tojson(indent=1) }}",
        "t",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let conversation = Conversation::from_json_str(
        r#"{"messages": [], "tools": [{"zulu": {"yankee": [1, {"x": null, "b": 2.50}]}, "alpha": "é<&>"}]}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        template
            .render(&conversation, true)
            .unwrap_or_else(|e| panic!("{e}")),
        "[{\"zulu\": {\"yankee\": [1, {\"x\": null, \"b\": 2.5}]}, \"alpha\": \"é<&>\"}]\n\
         {\n \"zulu\": {\n  \"yankee\": [\n   1,\n   {\n    \"x\": null,\n    \"b\": 2.5\n   }\n  ]\n },\n \"alpha\": \"é<&>\"\n}"
    );
}

#[test]
fn conversation_file_is_read_and_named_in_errors() {
    let dir = std::env::temp_dir().join(format!("quarry-chat-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let good = dir.join("chat.json");
    std::fs::write(
        &good,
        r#"{"messages": [{"role": "user", "content": "Hi 👋"}], "documents": [{"text": "d"}]}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let conversation = Conversation::from_file(&good).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conversation.messages[0].content(), Some("Hi 👋"));
    assert_eq!(conversation.documents.as_ref().map(Vec::len), Some(1));
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"messages": {"role": "user"}}"#).unwrap_or_else(|e| panic!("{e}"));
    let err = Conversation::from_file(&bad).unwrap_err().to_string();
    assert!(err.starts_with(&bad.display().to_string()), "{err}");
    assert!(err.contains("\"messages\" must be a list"), "{err}");
    let err = Conversation::from_file(dir.join("absent.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read") && err.contains("absent.json: No such file"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rendering is bounded: a template whose loops run without a useful bound stops with an error after a fixed
/// number of steps (about a second), one that writes more than any prompt could be stops at 64 MiB, while the
/// real Granite templates render a conversation of 4,000 messages with tools well within both bounds.
#[test]
fn rendering_is_bounded_in_steps_and_output() {
    use quarry::text::chat_template::Message;
    let conversation = Conversation::from_messages(vec![Message::new("user", "hi")]);
    let loops = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        "loops",
    )
    .unwrap();
    let start = std::time::Instant::now();
    let err = loops.render(&conversation, true).unwrap_err().to_string();
    assert!(err.contains("runs more than 20000000 steps"), "{err}");
    eprintln!("the runaway template stopped after {:?}", start.elapsed());
    let wide = ChatTemplate::new(
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
        "wide",
    )
    .unwrap();
    let err = wide.render(&conversation, true).unwrap_err().to_string();
    assert!(err.contains("longer than 64 MiB"), "{err}");

    for version in ["3.0", "3.1"] {
        let dir = crate_root().join(format!("../shared/granite-{version}-1b-a400m-instruct"));
        if !dir.join("tokenizer_config.json").exists() {
            support::skipped("the real Granite templates", &dir);
            return;
        }
        let template = template_in(&dir);
        let mut messages = vec![Message::new("system", "You are terse.")];
        for i in 0..2000 {
            messages.push(Message::new("user", &format!("question {i}")));
            messages.push(Message::new("assistant", &format!("answer {i}")));
        }
        let mut long = Conversation::from_messages(messages);
        long.tools = Some(vec![
            serde_json::json!({"type": "function", "function": {"name": "f", "parameters": {}}}),
        ]);
        let text = template
            .render(&long, true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(text.contains("answer 1999"));
    }
}
