//! The tokenizer metadata of the GGUF file, from the snapshot's `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json` (and `chat_template.jinja` when present), laid out as llama.cpp's converter writes it
//! for a byte-level BPE ("gpt2") tokenizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::ConvertError;
use crate::gguf::{Array, Value as GgufValue};

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub const TOKEN_NORMAL: i32 = 1;
/// Ids the config's vocabulary has but the tokenizer does not define (written as `[PAD{id}]`).
pub const TOKEN_UNUSED: i32 = 5;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;

/// Everything the tokenizer contributes to the GGUF metadata.
#[derive(Debug)]
pub struct Vocab {
    /// One entry per id `0..vocab_size`.
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// `"left right"` pairs in rank order.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.pre`; see [`pre_tokenizer_name`].
    pub pre: &'static str,
    /// (GGUF key suffix, id): `bos`, `eos`, `unknown`, `padding`.
    pub special_ids: Vec<(&'static str, u32)>,
    pub add_bos_token: bool,
    pub add_eos_token: Option<bool>,
    pub add_space_prefix: Option<bool>,
    /// The default chat template.
    pub chat_template: Option<String>,
    /// Other named templates of a `chat_template` list, by name.
    pub named_chat_templates: Vec<(String, String)>,
    /// The whole tokenizer.json, for runtimes that load the exact HF tokenizer from the GGUF.
    pub tokenizer_json: String,
}

/// The tokenizer files a [`Vocab`] is made from: read from a snapshot folder by [`TokenizerSources::read`], or
/// made up in memory (`synth`'s byte-level vocabulary), so both go through the same checks and layout.
#[derive(Clone, Debug)]
pub struct TokenizerSources {
    /// Where `tokenizer_json` came from; errors name it.
    pub tokenizer_path: PathBuf,
    /// The text of `tokenizer.json`, embedded as is.
    pub tokenizer_json: String,
    /// Where `tokenizer_config` came from; errors name it.
    pub tokenizer_config_path: PathBuf,
    /// `tokenizer_config.json` (empty when absent).
    pub tokenizer_config: Map<String, Value>,
    /// `generation_config.json` (empty when absent): a fallback for the special token ids.
    pub generation_config: Map<String, Value>,
    /// `config.json` (empty when absent): the last fallback for the special token ids.
    pub model_config: Map<String, Value>,
    /// `chat_template.jinja`, which newer transformers write instead of `chat_template` in tokenizer_config.json.
    pub chat_template_jinja: Option<String>,
}

impl TokenizerSources {
    /// Reads the tokenizer files of a snapshot folder; only `tokenizer.json` is required.
    pub fn read(dir: &Path) -> Result<TokenizerSources, ConvertError> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_json = std::fs::read_to_string(&tokenizer_path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ConvertError::MissingFile {
                path: tokenizer_path.clone(),
                hint: "the GGUF file needs the model's tokenizer: download tokenizer.json with the weights",
            },
            _ => ConvertError::read(&tokenizer_path, e),
        })?;
        let tokenizer_config_path = dir.join("tokenizer_config.json");
        let jinja = dir.join("chat_template.jinja");
        let chat_template_jinja = match std::fs::read_to_string(&jinja) {
            Ok(template) => Some(template),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ConvertError::read(jinja, e)),
        };
        Ok(TokenizerSources {
            tokenizer_path,
            tokenizer_json,
            tokenizer_config: read_optional_object(&tokenizer_config_path)?.unwrap_or_default(),
            tokenizer_config_path,
            generation_config: read_optional_object(&dir.join("generation_config.json"))?
                .unwrap_or_default(),
            model_config: read_optional_object(&dir.join("config.json"))?.unwrap_or_default(),
            chat_template_jinja,
        })
    }
}

impl Vocab {
    /// Reads the tokenizer files of `dir` for a model whose embedding has `vocab_size` rows.
    pub fn load(dir: &Path, vocab_size: usize) -> Result<Vocab, ConvertError> {
        Vocab::from_sources(TokenizerSources::read(dir)?, vocab_size)
    }

    /// The metadata of tokenizer files for a model whose embedding has `vocab_size` rows.
    pub fn from_sources(
        sources: TokenizerSources,
        vocab_size: usize,
    ) -> Result<Vocab, ConvertError> {
        let TokenizerSources {
            tokenizer_path,
            tokenizer_json,
            tokenizer_config_path,
            tokenizer_config,
            generation_config,
            model_config,
            chat_template_jinja,
        } = sources;
        let tokenizer = parse_object(&tokenizer_path, &tokenizer_json)?;
        let problem = |problem: String| ConvertError::Tokenizer {
            path: tokenizer_path.clone(),
            problem,
        };
        let pre = pre_tokenizer_name(tokenizer.get("pre_tokenizer")).map_err(problem)?;

        let model = tokenizer
            .get("model")
            .and_then(Value::as_object)
            .ok_or_else(|| problem("it has no \"model\" object".into()))?;
        match model.get("type").and_then(Value::as_str) {
            None | Some("BPE") => {}
            Some(other) => {
                return Err(problem(format!(
                    "tokenizer model {other:?} is not supported (Granite uses byte-level BPE)"
                )));
            }
        }

        let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
        let mut token_types = vec![TOKEN_UNUSED; vocab_size];
        let vocab = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| problem("its model has no \"vocab\" object".into()))?;
        for (text, id) in vocab {
            let id = token_id(id, vocab_size)
                .map_err(|why| problem(format!("vocab entry {text:?}: {why}")))?;
            if let Some(other) = &tokens[id] {
                return Err(problem(format!(
                    "id {id} is given to both {other:?} and {text:?}"
                )));
            }
            tokens[id] = Some(text.clone());
            token_types[id] = TOKEN_NORMAL;
        }
        let mut added_ids = HashMap::new();
        for entry in tokenizer
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let content = entry.get("content").and_then(Value::as_str);
            let id = entry
                .get("id")
                .ok_or("has no id")
                .and_then(|id| token_id(id, vocab_size));
            let (Some(content), Ok(id)) = (content, id) else {
                return Err(problem(format!(
                    "added token {entry} has no content or an id outside 0..{vocab_size}"
                )));
            };
            // An added token replaces the vocab entry of its id, as in the HF tokenizer.
            tokens[id] = Some(content.to_string());
            let special = entry
                .get("special")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            token_types[id] = if special {
                TOKEN_CONTROL
            } else {
                TOKEN_USER_DEFINED
            };
            added_ids.entry(content.to_string()).or_insert(id);
        }
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(id, t)| t.unwrap_or_else(|| format!("[PAD{id}]")))
            .collect();

        let merges = match model.get("merges") {
            Some(Value::Array(list)) => list
                .iter()
                .map(merge_string)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                problem("a merge is neither \"a b\" nor a pair of strings".into())
            })?,
            _ => return Err(problem("its BPE model has no \"merges\" list".into())),
        };

        let mut special_ids = Vec::new();
        for (hf, gguf) in [
            ("bos", "bos"),
            ("eos", "eos"),
            ("unk", "unknown"),
            ("pad", "padding"),
        ] {
            let by_content = match tokenizer_config.get(&format!("{hf}_token")) {
                Some(Value::String(s)) => added_ids.get(s.as_str()).copied(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .and_then(|s| added_ids.get(s).copied()),
                _ => None,
            };
            let key = format!("{hf}_token_id");
            let id = by_content
                .or_else(|| first_id(generation_config.get(&key)))
                .or_else(|| first_id(model_config.get(&key)))
                .filter(|&id| id < vocab_size);
            if let Some(id) = id {
                special_ids.push((gguf, id as u32));
            }
        }

        let flag = |key: &str| tokenizer_config.get(key).and_then(Value::as_bool);
        let (chat_template, named_chat_templates) = chat_templates(
            chat_template_jinja,
            &tokenizer_config_path,
            &tokenizer_config,
        )?;
        Ok(Vocab {
            tokens,
            token_types,
            merges,
            pre,
            special_ids,
            // Granite prepends nothing; HF's GPT-2 tokenizer class does not either when the flag is absent.
            add_bos_token: flag("add_bos_token").unwrap_or(false),
            add_eos_token: flag("add_eos_token"),
            add_space_prefix: flag("add_prefix_space"),
            chat_template,
            named_chat_templates,
            tokenizer_json,
        })
    }

    /// The `tokenizer.*` keys, in the order llama.cpp writes them.
    pub fn metadata(&self) -> Vec<(String, GgufValue)> {
        let mut kv = vec![
            (
                "tokenizer.ggml.model".to_string(),
                GgufValue::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                GgufValue::String(self.pre.into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                GgufValue::Array(Array::String(self.tokens.clone())),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                GgufValue::Array(Array::I32(self.token_types.clone())),
            ),
            (
                "tokenizer.ggml.merges".to_string(),
                GgufValue::Array(Array::String(self.merges.clone())),
            ),
        ];
        for (name, id) in &self.special_ids {
            kv.push((
                format!("tokenizer.ggml.{name}_token_id"),
                GgufValue::U32(*id),
            ));
        }
        kv.push((
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(self.add_bos_token),
        ));
        if let Some(add_eos) = self.add_eos_token {
            kv.push((
                "tokenizer.ggml.add_eos_token".into(),
                GgufValue::Bool(add_eos),
            ));
        }
        for (name, template) in &self.named_chat_templates {
            kv.push((
                format!("tokenizer.chat_template.{name}"),
                GgufValue::String(template.clone()),
            ));
        }
        if !self.named_chat_templates.is_empty() {
            let names = self
                .named_chat_templates
                .iter()
                .map(|(n, _)| n.clone())
                .collect();
            kv.push((
                "tokenizer.chat_templates".into(),
                GgufValue::Array(Array::String(names)),
            ));
        }
        if let Some(template) = &self.chat_template {
            kv.push((
                "tokenizer.chat_template".into(),
                GgufValue::String(template.clone()),
            ));
        }
        if let Some(add_space_prefix) = self.add_space_prefix {
            kv.push((
                "tokenizer.ggml.add_space_prefix".into(),
                GgufValue::Bool(add_space_prefix),
            ));
        }
        kv.push((
            "tokenizer.huggingface.json".into(),
            GgufValue::String(self.tokenizer_json.clone()),
        ));
        kv
    }
}

/// llama.cpp's name for the pre-tokenizer (the regex split before BPE) that reproduces the `pre_tokenizer` of a
/// tokenizer.json: `"gpt-2"` for Hugging Face's `ByteLevel` with `use_regex` (the GPT-2 regex, Granite's), the one
/// kind a byte-level BPE GGUF can promise to tokenize exactly as the original; anything else is refused.
///
/// Why not `"refact"`, which llama.cpp's own converter writes for Granite (it recognises the tokenizer by a hash of
/// its output on a test text, and Granite's hashes like Refact's): refact's regex first cuts every digit out on its
/// own, which gives the same digits as the GPT-2 split for Granite's vocabulary (no token joins a digit to anything
/// else) but splits whitespace before a digit differently: for `"x  123"` HF gives `Ġ Ġ 1 2 3` and llama.cpp with
/// refact `ĠĠ 1 2 3`. With `"gpt-2"` llama.cpp runs the exact HF regex.
///
/// `add_prefix_space` must be false: llama.cpp's `gpt-2` never adds a leading space.
pub fn pre_tokenizer_name(pre_tokenizer: Option<&Value>) -> Result<&'static str, String> {
    let refuse = |found: String| {
        Err(format!(
            "its pre_tokenizer is {found}; only ByteLevel with use_regex true and add_prefix_space false \
             (the GPT-2 split that Granite uses) has an exact llama.cpp equivalent"
        ))
    };
    let Some(Value::Object(pre)) = pre_tokenizer else {
        return refuse(pre_tokenizer.map_or("missing".into(), |v| v.to_string()));
    };
    // The tokenizers library defaults both flags when they are absent: use_regex to true, add_prefix_space to true.
    let flag = |key: &str, default: bool| pre.get(key).and_then(Value::as_bool).unwrap_or(default);
    let byte_level = pre.get("type").and_then(Value::as_str) == Some("ByteLevel");
    if byte_level && flag("use_regex", true) && !flag("add_prefix_space", true) {
        Ok("gpt-2")
    } else {
        refuse(Value::Object(pre.clone()).to_string())
    }
}

fn token_id(id: &Value, vocab_size: usize) -> Result<usize, &'static str> {
    match id.as_u64() {
        Some(id) if (id as u128) < vocab_size as u128 => Ok(id as usize),
        Some(_) => Err("its id is not below config.json's vocab_size"),
        None => Err("its id is not a non-negative integer"),
    }
}

/// `"a b"` as is; `["a", "b"]` (tokenizers >= 0.20) joined with a space, spaces inside a part written as U+0120
/// the way llama.cpp's converter does, so the pair stays splittable.
fn merge_string(merge: &Value) -> Option<String> {
    match merge {
        Value::String(s) => Some(s.clone()),
        Value::Array(pair) => match pair.as_slice() {
            [Value::String(a), Value::String(b)] => {
                let escape = |s: &str| s.replace(' ', "\u{0120}");
                Some(format!("{} {}", escape(a), escape(b)))
            }
            _ => None,
        },
        _ => None,
    }
}

/// The first id of a `*_token_id` field (an int, or a list of ints for several end tokens).
fn first_id(value: Option<&Value>) -> Option<usize> {
    let value = match value? {
        Value::Array(list) => list.first()?,
        other => other,
    };
    value.as_u64().and_then(|v| usize::try_from(v).ok())
}

fn parse_object(path: &Path, text: &str) -> Result<Map<String, Value>, ConvertError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ConvertError::Tokenizer {
            path: path.to_path_buf(),
            problem: "the top level is not a JSON object".into(),
        }),
        Err(source) => Err(ConvertError::Json {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn read_optional_object(path: &Path) -> Result<Option<Map<String, Value>>, ConvertError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_object(path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConvertError::read(path, e)),
    }
}

type ChatTemplates = (Option<String>, Vec<(String, String)>);

/// `chat_template.jinja` (where newer transformers save the template) wins; else `chat_template` of
/// tokenizer_config.json, a string or a list of `{name, template}` whose `default` becomes the main template.
fn chat_templates(
    jinja: Option<String>,
    config_path: &Path,
    config: &Map<String, Value>,
) -> Result<ChatTemplates, ConvertError> {
    if let Some(template) = jinja {
        return Ok((Some(template), Vec::new()));
    }
    let bad = || ConvertError::Tokenizer {
        path: config_path.to_path_buf(),
        problem: "chat_template is neither a string nor a list of {\"name\", \"template\"} objects"
            .into(),
    };
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok((None, Vec::new())),
        Some(Value::String(template)) => Ok((Some(template.clone()), Vec::new())),
        Some(Value::Array(list)) => {
            let mut default = None;
            let mut named = Vec::new();
            for entry in list {
                let name = entry.get("name").and_then(Value::as_str).ok_or_else(bad)?;
                let template = entry
                    .get("template")
                    .and_then(Value::as_str)
                    .ok_or_else(bad)?;
                // llama.cpp keeps template names to letters, digits and '_'.
                let name: String = name
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                if name == "default" {
                    default = Some(template.to_string());
                } else {
                    named.push((name, template.to_string()));
                }
            }
            Ok((default, named))
        }
        Some(_) => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizer_rule() {
        use serde_json::json;
        let name = |v: Value| pre_tokenizer_name(Some(&v));
        let granite = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        assert_eq!(name(granite), Ok("gpt-2"));
        // use_regex defaults to true in the tokenizers library
        assert_eq!(
            name(json!({"type": "ByteLevel", "add_prefix_space": false})),
            Ok("gpt-2")
        );
        for refused in [
            json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}),
            json!({"type": "ByteLevel", "add_prefix_space": true, "use_regex": true}),
            json!({"type": "ByteLevel", "use_regex": true}),
            json!({"type": "Metaspace", "replacement": "\u{2581}"}),
            json!({"type": "Sequence", "pretokenizers": [{"type": "ByteLevel", "add_prefix_space": false}]}),
            json!(null),
        ] {
            let err = name(refused.clone()).unwrap_err();
            assert!(
                err.contains("only ByteLevel with use_regex true"),
                "{refused}: {err}"
            );
        }
        assert!(pre_tokenizer_name(None).unwrap_err().contains("missing"));
    }

    #[test]
    fn merges_in_both_layouts() {
        assert_eq!(
            merge_string(&serde_json::json!("a b")).as_deref(),
            Some("a b")
        );
        assert_eq!(
            merge_string(&serde_json::json!(["a", "b c"])).as_deref(),
            Some("a b\u{0120}c")
        );
        assert_eq!(merge_string(&serde_json::json!(["a"])), None);
    }
}
