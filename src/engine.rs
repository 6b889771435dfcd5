//! A model file opened for use: the memory map, the network, and (when present) its tokenizer and chat template.

use std::path::Path;

use quarry_quantize::gguf::GgufFile;

use crate::model::{Model, ModelError};

/// Everything `run`, `chat`, `logits` and `bench` need from one GGUF file.
pub struct Engine {
    pub file: GgufFile,
    pub model: Model,
}

impl Engine {
    /// Maps the file, checks its header and every tensor the architecture needs. Nothing is copied: the weights
    /// stay in the page cache and are read where they lie.
    pub fn open(path: &Path) -> Result<Engine, ModelError> {
        let file = GgufFile::open(path)?;
        let model = Model::from_gguf(&file)?;
        Ok(Engine { file, model })
    }

    /// The context a session gets by default: the model's own, capped so that the f32 KV cache of a long-context
    /// model (Granite 3.1: 128k positions) does not reserve gigabytes nobody asked for.
    pub fn default_context(&self) -> usize {
        self.model.config.context_length.min(4096)
    }
}
