//! Quarry runtime: loads a Granite GGUF by memory map and generates text from it on the CPU.
//!
//! Layers, bottom up: [`kernels`] (matrix products over ggml blocks, scalar and SIMD), [`model`] (the Granite
//! network and its forward pass), [`sampling`], [`generate`] (prompt processing and the decode loop).

pub mod kernels;
pub mod model;

pub use quarry_quantize::gguf;
pub mod bench;
pub mod engine;
pub mod generate;
pub mod npy;
pub mod sampling;
