//! Quarry runtime: loads a Granite GGUF by memory map and generates text from it on the CPU.
//!
//! Layers, bottom up: [`kernels`] (matrix products over ggml blocks, scalar and SIMD), [`model`] (the Granite
//! network and its forward pass), [`text`] (text in and out: [`text::tokenizer`] and [`text::chat_template`]),
//! [`sampling`], [`generate`] (prompt processing and the decode loop), [`engine`] (a model file opened for use),
//! [`bench`], [`perplexity`] (what a quantization costs: perplexity and KL divergence from a base model);
//! [`text::chat`] (a conversation over a session: turns, context trimming, REPL commands), [`registry`]
//! (models.toml), [`store`] (installed models) and [`pull`] (downloading and importing them).

pub mod bench;
pub mod engine;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod npy;
pub mod perplexity;
pub mod pull;
pub mod registry;
pub mod sampling;
pub mod store;
pub mod text;

pub use quarry_quantize::gguf;
