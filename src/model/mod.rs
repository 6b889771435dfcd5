//! The Granite network: hyper-parameters, weights borrowed from the GGUF file, the KV cache, and the forward pass.

mod config;
mod forward;
mod kv;
mod weights;

use std::path::PathBuf;

pub use config::{Architecture, ModelConfig};
pub(crate) use forward::{ForwardBuffers, Logits, SeqSpan, reserve_thread_scratch};
pub use kv::{BlockId, KV_BLOCK_TOKENS, KvCache, KvPool, KvType, PoolExhausted, SeqKv};
pub(crate) use weights::{ExpertMatrices, FeedForward, Matrix, ModelWeights};

use quarry_quantize::gguf::{GgmlType, GgufError, GgufFile};

use crate::kernels::{self, Kernels};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(
        "{}: architecture '{arch}' is not supported (quarry runs 'granitemoe' and 'granite'; convert a Granite 3.x checkpoint with `quarry quantize`)",
        path.display()
    )]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error(
        "{}: tensor '{tensor}' is stored as {ty}, which quarry cannot compute with (supported: f32, f16, bf16, q8_0, q4_0, q4_K, q5_K, q6_K); re-quantize the model with `quarry quantize`",
        path.display()
    )]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        ty: GgmlType,
    },
    #[error("token id {id} is outside the vocabulary of {n_vocab} tokens")]
    TokenOutOfRange { id: u32, n_vocab: usize },
    #[error(
        "the context is full: {needed} tokens needed but the context holds {capacity}; shorten the prompt or raise --ctx-size (the model supports {model_max})"
    )]
    ContextFull {
        needed: usize,
        capacity: usize,
        model_max: usize,
    },
}

/// A loaded model: its hyper-parameters, its weights, and the kernel set its forward pass runs on. Sequences
/// keep their own [`KvCache`] and [`ForwardBuffers`], so one model can serve several.
pub struct Model {
    pub config: ModelConfig,
    pub(crate) weights: ModelWeights,
    kernels: &'static Kernels,
}

impl Model {
    /// The model of a GGUF file, on the process's kernel set ([`kernels::selected`]: the best this CPU has, or
    /// `QUARRY_KERNEL`).
    pub fn from_gguf(file: &GgufFile) -> Result<Model, ModelError> {
        let config = ModelConfig::from_gguf(file)?;
        let mut weights = ModelWeights::from_gguf(file, &config)?;
        let kernels = kernels::selected();
        weights.pack_for(kernels);
        Ok(Model {
            config,
            weights,
            kernels,
        })
    }

    /// The kernel set the forward pass runs on.
    pub fn kernels(&self) -> &'static Kernels {
        self.kernels
    }

    /// Runs the forward pass on another kernel set (one of [`kernels::available`]), e.g. to compare them; the
    /// weights are re-laid for it.
    pub fn set_kernels(&mut self, kernels: &'static Kernels) {
        self.weights.pack_for(kernels);
        self.kernels = kernels;
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("weights", &self.weights)
            .field("kernels", &self.kernels.name)
            .finish()
    }
}
