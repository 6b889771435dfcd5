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
pub mod tokenizer;
