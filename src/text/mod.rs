//! Text in and out: everything that deals in words rather than logits.
//!
//! The network below this layer sees only token ids; people type and read text. This layer is where the two meet,
//! and it keeps the model's own conventions in one place: [`tokenizer`] turns text into ids and back with the
//! vocabulary the GGUF file carries, [`chat_template`] renders a conversation into prompt text with the model's own
//! Jinja template, and [`chat`] holds a conversation over a generation session (turns, context trimming, the REPL's
//! commands and multi-line input), free of any terminal so that tests can drive it.

pub mod chat;
pub mod chat_template;
pub mod input;
pub mod template_sandbox;
pub mod tokenizer;

use std::path::Path;

/// Why a Hugging Face snapshot's text side would not load once converted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotTextError {
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Template(#[from] chat_template::ChatTemplateError),
    #[error(transparent)]
    Input(#[from] input::InputError),
}

/// The largest tokenizer or template file read (Granite's `tokenizer.json` is 2 MB).
const MAX_SNAPSHOT_TEXT_BYTES: u64 = 256 << 20;

/// Loads a snapshot's `tokenizer.json` and compiles its chat template (`chat_template.jinja`, else
/// `tokenizer_config.json`'s `chat_template`) the way the runtime loads them from the converted file, so that
/// `quantize` refuses a folder whose GGUF would convert but never run (a template that does not compile, a
/// tokenizer the library cannot load), before minutes of conversion. A missing file is left for the converter,
/// whose error says what to download.
pub fn check_snapshot(dir: &Path) -> Result<(), SnapshotTextError> {
    let tokenizer_json = dir.join("tokenizer.json");
    if tokenizer_json.exists() {
        let text = input::read_text(&tokenizer_json, MAX_SNAPSHOT_TEXT_BYTES, "tokenizer file")?;
        tokenizer::Tokenizer::from_json_str_labelled(&text, tokenizer_json.display().to_string())?;
    }
    let jinja = dir.join("chat_template.jinja");
    let config = dir.join("tokenizer_config.json");
    if jinja.exists() {
        let source = input::read_text(&jinja, MAX_SNAPSHOT_TEXT_BYTES, "chat template")?;
        chat_template::ChatTemplate::new(&source, &jinja.display().to_string())?;
    } else if config.exists() {
        let text = input::read_text(&config, MAX_SNAPSHOT_TEXT_BYTES, "tokenizer config")?;
        match chat_template::ChatTemplate::from_tokenizer_config(
            &text,
            &config.display().to_string(),
        ) {
            Ok(_) | Err(chat_template::ChatTemplateError::Missing { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
