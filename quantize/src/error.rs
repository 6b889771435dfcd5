//! The converter's one error type. Every message names the file it is about, says what is wrong with it, and says
//! what the user can do, because the usual reader is someone at a terminal with a half-downloaded snapshot.

use std::io;
use std::path::PathBuf;

use crate::gguf::{GgmlType, GgufError};
use crate::hf::SUPPORTED_ARCHITECTURES;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{}: cannot read it: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },

    #[error("{}: missing; {hint}", path.display())]
    MissingFile { path: PathBuf, hint: &'static str },

    #[error("{}: not valid JSON ({source}); re-download the file", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("{}: {problem}; fix config.json or use the checkpoint's original one", path.display())]
    Config { path: PathBuf, problem: String },

    #[error(
        "{}: architecture {architecture} is not supported; quarry converts {SUPPORTED_ARCHITECTURES}",
        path.display()
    )]
    UnsupportedArchitecture { path: PathBuf, architecture: String },

    #[error("{}: {problem}; the file is truncated or corrupt: re-download it", path.display())]
    CorruptSafetensors { path: PathBuf, problem: String },

    #[error(
        "{}: names shard {shard}, which is missing from the folder; download every shard of the checkpoint",
        index.display()
    )]
    MissingShard { index: PathBuf, shard: String },

    #[error("{}: {problem}; the weights do not match config.json: re-download the checkpoint", path.display())]
    Checkpoint { path: PathBuf, problem: String },

    #[error(
        "{}: tensor '{name}' is {dtype}; only BF16, F16 and F32 checkpoints can be converted",
        path.display()
    )]
    TensorDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },

    #[error(
        "{}: tensor '{tensor}' holds {value} in row {row}: a weight must be a finite number (the checkpoint was \
         broken in training or export); re-download it or use another checkpoint",
        path.display()
    )]
    NonFinite {
        path: PathBuf,
        tensor: String,
        row: usize,
        value: f32,
    },

    #[error("{}: {problem}; re-download the tokenizer files", path.display())]
    Tokenizer { path: PathBuf, problem: String },

    #[error("{}: cannot write the output: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },

    #[error(
        "vocab_size {vocab_size} cannot hold a synthetic byte-level vocabulary ({min} to {max} tokens: \
         256 bytes, 4 special tokens and two-byte merges); pass the model's tokenizer folder with --tokenizer DIR"
    )]
    SyntheticVocab {
        vocab_size: usize,
        min: usize,
        max: usize,
    },

    /// A GGUF input (of `quarry quantize MODEL.gguf`) that cannot be read; the message names the file.
    #[error(transparent)]
    Gguf(#[from] GgufError),

    #[error("{}: {problem}", path.display())]
    GgufInput { path: PathBuf, problem: String },

    #[error(
        "{}: tensor '{tensor}' is already quantized ({ty}); quantizing it again adds a second rounding error to the \
         first: requantize an F16, BF16 or F32 file (or convert the Hugging Face folder), or pass \
         --allow-requantize to dequantize it first",
        path.display()
    )]
    AlreadyQuantized {
        path: PathBuf,
        tensor: String,
        ty: GgmlType,
    },

    #[error("cannot start {threads} worker threads ({problem}); try a smaller --threads")]
    Threads { threads: usize, problem: String },
}

impl ConvertError {
    pub(crate) fn read(path: impl Into<PathBuf>, source: io::Error) -> ConvertError {
        let path = path.into();
        ConvertError::Read { path, source }
    }
}
