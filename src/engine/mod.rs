//! A model file opened for use ([`Engine`]: the memory map, the network, and for commands that handle text its
//! tokenizer and chat template), and the multi-sequence scheduler that runs many requests on it ([`scheduler`]).

pub mod scheduler;

use std::path::Path;
use std::sync::OnceLock;

use quarry_quantize::gguf::GgufFile;

use crate::model::{Model, ModelError};
use crate::sampling::grammar::GrammarCompiler;
use crate::text::chat_template::{ChatTemplate, ChatTemplateError, GGUF_CHAT_TEMPLATE_KEY};
use crate::text::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
}

/// Everything `run`, `chat`, `logits` and `bench` need from one GGUF file.
pub struct Engine {
    pub file: GgufFile,
    pub model: Model,
    /// Loaded by [`Engine::open_for_text`].
    pub tokenizer: Option<Tokenizer>,
    /// The file's own Jinja chat template, when it has one.
    pub chat_template: Option<ChatTemplate>,
    /// Built on first use by [`Engine::grammars`].
    grammars: OnceLock<Result<GrammarCompiler, String>>,
}

impl Engine {
    /// Maps the file, checks its header and every tensor the architecture needs. Nothing is copied: the weights
    /// stay in the page cache and are read where they lie.
    pub fn open(path: &Path) -> Result<Engine, EngineError> {
        let file = GgufFile::open(path).map_err(ModelError::from)?;
        let model = Model::from_gguf(&file)?;
        file.advise_will_need();
        Ok(Engine {
            file,
            model,
            tokenizer: None,
            chat_template: None,
            grammars: OnceLock::new(),
        })
    }

    /// [`Engine::open`], plus the tokenizer (required) and the chat template (if the file has one).
    pub fn open_for_text(path: &Path) -> Result<Engine, EngineError> {
        let mut engine = Self::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&engine.file)?;
        // Fewer tokens than logits would let the model choose an id the tokenizer cannot write, mid-reply.
        if tokenizer.vocab_size() != engine.model.config.n_vocab {
            return Err(TokenizerError::BadMetadata {
                origin: path.display().to_string(),
                key: "tokenizer.huggingface.json",
                problem: format!(
                    "has {} tokens but the model's output has {}; the file is inconsistent",
                    tokenizer.vocab_size(),
                    engine.model.config.n_vocab
                ),
            }
            .into());
        }
        engine.tokenizer = Some(tokenizer);
        if engine.file.get(GGUF_CHAT_TEMPLATE_KEY).is_some() {
            engine.chat_template = Some(ChatTemplate::from_gguf(&engine.file)?);
        }
        Ok(engine)
    }

    /// The tokenizer of an engine opened with [`Engine::open_for_text`].
    pub fn tokenizer(&self) -> &Tokenizer {
        self.tokenizer
            .as_ref()
            .expect("open_for_text loads the tokenizer")
    }

    /// The grammar compiler over this model's vocabulary (for structured output), built on first use: building
    /// its token trie costs tens of milliseconds, which requests without a grammar never pay.
    pub fn grammars(&self) -> Result<&GrammarCompiler, String> {
        self.grammars
            .get_or_init(|| {
                GrammarCompiler::new(self.tokenizer(), self.model.config.n_vocab)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The KV cache type commands use unless told otherwise: f16 for a quantized file, whose weights' own
    /// error is far above f16's (the README's cache table: KL to the f32 cache at most 8.5e-4, the same greedy
    /// ids), and which is faster after a long prompt since attention reads half the bytes; f32 for a float
    /// file, the exact reference that outputs are compared with transformers on.
    pub fn default_cache_type(&self) -> crate::model::KvType {
        use quarry_quantize::gguf::GgmlType;
        let quantized = self
            .file
            .tensors()
            .iter()
            .any(|t| !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16));
        if quantized {
            crate::model::KvType::F16
        } else {
            crate::model::KvType::F32
        }
    }

    /// The context a session gets by default: the model's own, capped so that the f32 KV cache of a long-context
    /// model (Granite 3.1: 128k positions) does not reserve gigabytes nobody asked for.
    pub fn default_context(&self) -> usize {
        self.model.config.context_length.min(4096)
    }
}
