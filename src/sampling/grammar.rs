//! Grammars that decide which tokens may come next, by llguidance: JSON schemas (`response_format`, ollama's
//! `format`) and Lark grammars (a forced tool call: `<|tool_call|>` followed by a JSON list of calls).
//!
//! llguidance matches token *bytes* against the grammar, so it is built over the vocabulary's bytes
//! ([`Tokenizer::token_bytes`]) rather than through the `tokenizers` crate (its own bridge pins an older
//! `tokenizers`). Building the token trie takes a few tens of milliseconds for Granite's 49k ids, so one
//! [`GrammarCompiler`] serves a model's whole life; compiling a grammar is per request; a mask is per token
//! (~0.1-0.2 ms for a JSON schema over Granite's vocabulary, `../shared/docs/crates.md`).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use super::TokenConstraint;
use crate::text::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("building the grammar engine over the vocabulary: {0}")]
    Vocabulary(String),
    #[error("{0}")]
    Compile(String),
}

/// Compiles grammars against one model's vocabulary.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler").finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// Over a model's `n_vocab` ids (its output rows; ids past the tokenizer's vocabulary are never allowed).
    /// Special tokens are known by their names (`<|tool_call|>`), which a Lark grammar may name.
    pub fn new(tokenizer: &Tokenizer, n_vocab: usize) -> Result<GrammarCompiler, GrammarError> {
        let bytes = tokenizer.token_bytes();
        let words: Vec<Vec<u8>> = (0..n_vocab)
            .map(|id| match bytes.get(id) {
                Some(Some(b)) => b.clone(),
                Some(None) => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(
                        tokenizer
                            .id_to_token(id as u32)
                            .unwrap_or_default()
                            .as_bytes(),
                    );
                    w
                }
                None => Vec::new(),
            })
            .collect();
        let info = TokRxInfo::new(n_vocab as u32, tokenizer.eos_id());
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        // Errors come back as values; nothing is printed.
        factory.set_stderr_log_level(0);
        Ok(GrammarCompiler { factory })
    }

    /// Output that is one JSON value valid against `schema` (llguidance's JSON Schema subset; a keyword it
    /// cannot enforce is an error, not ignored). Unless the schema says otherwise (`x-guidance`), the JSON is
    /// written compactly: with free whitespace a weak model can fill the whole reply with spaces.
    pub fn json_schema(&self, schema: &Value) -> Result<Grammar, GrammarError> {
        let schema = compact_json(schema)?;
        self.compile(TopLevelGrammar::from_json_schema(schema))
    }

    /// Output matching a Lark grammar (llguidance's dialect: `%json {schema}` embeds a JSON schema, `<|name|>`
    /// is a special token).
    pub fn lark(&self, source: &str) -> Result<Grammar, GrammarError> {
        self.compile(TopLevelGrammar::from_lark(source.to_string()))
    }

    fn compile(&self, grammar: TopLevelGrammar) -> Result<Grammar, GrammarError> {
        // The grammar comes from a request (a JSON schema, tool definitions): a panic of the grammar library on
        // it is that request's error, not the server's end.
        let matcher = crate::contain::contain(|| {
            self.factory
                .create_parser(grammar)
                .map(|parser| Matcher::new(Ok(parser)))
        })
        .map_err(|panic| GrammarError::Compile(format!("the grammar library failed ({panic})")))?
        .map_err(|e| GrammarError::Compile(e.to_string()))?;
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Compile(e));
        }
        Ok(Grammar { matcher })
    }
}

/// `schema` with `x-guidance` asking for compact JSON, unless it already says how to lay JSON out.
fn compact_json(schema: &Value) -> Result<Value, GrammarError> {
    let mut schema = match schema {
        Value::Object(m) => m.clone(),
        Value::Bool(true) => serde_json::Map::new(),
        other => {
            return Err(GrammarError::Compile(format!(
                "a JSON schema must be an object, not {other}"
            )));
        }
    };
    schema
        .entry("x-guidance")
        .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    Ok(Value::Object(schema))
}

/// A compiled grammar, following one sequence's output.
pub struct Grammar {
    matcher: Matcher,
}

impl TokenConstraint for Grammar {
    fn accept(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    fn allowed(&mut self, allowed: &mut [u32]) -> Result<(), String> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        let words = mask.as_slice();
        let n = allowed.len().min(words.len());
        allowed[..n].copy_from_slice(&words[..n]);
        allowed[n..].fill(0);
        if allowed.iter().all(|&w| w == 0) {
            return Err("the grammar allows no token here".into());
        }
        Ok(())
    }
}
