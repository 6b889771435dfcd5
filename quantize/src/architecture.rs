//! Which Granite network a checkpoint or a GGUF file holds: one enum for the converter, which reads it from
//! `config.json` and writes it as `general.architecture`, and for the runtime, which reads it back.

/// The two Granite 3.x families, named as llama.cpp names them in `general.architecture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `granitemoe`, `GraniteMoeForCausalLM`: a sparse mixture-of-experts feed-forward in every layer
    /// (granite-3.x-1b-a400m, 3b-a800m).
    GraniteMoe,
    /// `granite`, `GraniteForCausalLM`: a dense SwiGLU MLP (granite-3.x-2b, 8b).
    Granite,
}

impl Architecture {
    pub const ALL: [Architecture; 2] = [Architecture::GraniteMoe, Architecture::Granite];

    /// The `general.architecture` value and prefix of the model's GGUF keys (also the `model_type` of its
    /// config.json).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::GraniteMoe => "granitemoe",
            Architecture::Granite => "granite",
        }
    }

    /// The transformers class of the checkpoint (`architectures[0]` in config.json).
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::GraniteMoe => "GraniteMoeForCausalLM",
            Architecture::Granite => "GraniteForCausalLM",
        }
    }

    /// The architecture whose [`gguf_name`](Architecture::gguf_name) is `name`.
    pub fn from_gguf_name(name: &str) -> Option<Architecture> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.gguf_name() == name)
    }

    /// The architecture whose [`hf_class`](Architecture::hf_class) is `class`.
    pub fn from_hf_class(class: &str) -> Option<Architecture> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.hf_class() == class)
    }
}
