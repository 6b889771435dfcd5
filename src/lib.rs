//! Quarry runtime: loads a Granite GGUF by memory map and generates text from it on the CPU.
//!
//! Layers, bottom up: [`kernels`] (matrix products over ggml blocks, scalar and SIMD), [`model`] (the Granite
//! network and its forward pass), [`text`] (text in and out: [`text::tokenizer`] and [`text::chat_template`]),
//! [`sampling`], [`generate`] (prompt processing and the decode loop), [`engine`] (a model file opened for use),
//! [`measure`] ([`measure::bench`], [`measure::perplexity`]: what a quantization costs, in perplexity and KL
//! divergence from a base model; [`measure::npy`]: logits for other tools);
//! [`text::chat`] (a conversation over a session: turns, context trimming, REPL commands), [`registry`]
//! (models.toml), [`store`] (installed models) and [`pull`] (downloading and importing them).

pub mod engine;
pub mod generate;
pub mod kernels;
pub mod measure;
pub mod model;
pub mod pull;
pub mod registry;
pub mod sampling;
pub mod store;
pub mod text;

pub use quarry_quantize::gguf;
