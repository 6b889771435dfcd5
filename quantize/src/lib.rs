//! Quarry's converter, and the owner of every model file format.
//!
//! The GGUF reader and writer, safetensors, the Hugging Face config and the ggml block codecs all live here, as does
//! the conversion between them: the runtime (the `quarry` crate) has no model-format code of its own and reads its
//! GGUF files, their metadata and the layout of their blocks from this crate.
//!
//! * [`gguf`]: the GGUF container, read (zero-copy over a memory map) and written (streamed).
//! * [`blocks`]: the ggml block formats (Q8_0, Q4_0, ...): one struct per format with its reference quantizer.
//! * [`safetensors`]: reading Hugging Face checkpoints (single file or shards; bf16, f16, f32).
//! * [`hf`]: the checked `config.json` of a Granite checkpoint.
//! * [`Architecture`]: which Granite network a checkpoint or GGUF file holds, under its config.json and GGUF names.
//! * [`convert`](mod@convert): the Granite checkpoint -> GGUF conversion ([`convert()`], [`ConvertOptions`], [`ConvertReport`]),
//!   and GGUF -> GGUF at another type ([`requantize()`], [`RequantizeOptions`]).
//! * [`synth`]: random-weight files with exactly the converter's layout for a config ([`synthesize`], [`SynthOptions`]).
//! * [`error`]: [`ConvertError`], the one error type of all of the above except the GGUF reader's own.

pub mod architecture;
pub mod blocks;
pub mod convert;
pub mod error;
pub mod gguf;
pub mod hf;
pub mod safetensors;
pub mod synth;

pub use architecture::Architecture;
pub use convert::{
    ConvertOptions, ConvertReport, RequantizeOptions, TargetType, TensorReport, convert, requantize,
};
pub use error::ConvertError;
pub use synth::{SynthOptions, synthesize};
