//! Quarry runtime: loads a Granite GGUF by memory map and generates text from it on the CPU.
//!
//! Layers, bottom up, one folder or file each:
//!
//! * [`gguf`] and the other file formats live in the `quarry-quantize` crate, which the runtime reads them from.
//! * [`kernels`]: matrix products over ggml blocks, scalar and SIMD.
//! * [`model`]: the Granite network and its forward pass.
//! * [`sampling`], [`generate`]: choosing tokens; prompt processing and the decode loop.
//! * [`text`]: text in and out. [`text::tokenizer`] and [`text::chat_template`] need nothing but the GGUF file;
//!   [`text::chat`] (a conversation: turns, context trimming, REPL commands) runs over an [`engine`] and a
//!   [`generate`] session, the one part of the folder above them.
//! * [`engine`]: a model file opened for use: the network with its tokenizer and chat template.
//! * [`measure`]: [`measure::bench`] (llama-bench's speed tests), [`measure::perplexity`] (what a quantization
//!   costs: perplexity and KL divergence from a base model), [`measure::npy`] (logits for other tools).
//! * [`hub`]: [`hub::registry`] (models.toml), [`hub::store`] (installed models), [`hub::pull`] (downloading
//!   and importing them) and [`hub::http`] (the Hugging Face client it downloads with).
//! * [`contain`]: a dependency's panic on hostile data, turned into an error naming the data.

pub mod contain;
pub mod engine;
pub mod generate;
pub mod hub;
pub mod kernels;
pub mod measure;
pub mod model;
pub mod sampling;
pub mod server;
pub mod text;

pub use quarry_quantize::gguf;
