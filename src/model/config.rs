//! The model's hyper-parameters, read from the GGUF metadata and checked before any buffer is sized by them.

use quarry_quantize::gguf::{GgufFile, GgufProblem, Value};

use super::ModelError;

// Which Granite network the file holds: one enum with the converter, in the crate that owns its GGUF names.
pub use quarry_quantize::Architecture;

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub name: Option<String>,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Expert intermediate width (MoE) or MLP width (dense).
    pub n_ff: usize,
    /// Experts per layer and experts used per token (0 and 0 for the dense model).
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// Granite's four scalars: input embeddings are multiplied by `embedding_scale`, attention scores by
    /// `attention_scale` (instead of 1/sqrt(head_dim)), each residual branch by `residual_scale`, and the
    /// logits divided by `logit_scale`.
    pub embedding_scale: f32,
    pub attention_scale: f32,
    pub residual_scale: f32,
    pub logit_scale: f32,
}

/// Sizes beyond these are refused: they are far past any Granite model and would only come from a corrupt file.
const MAX_DIM: usize = 1 << 20;
const MAX_LAYERS: usize = 1024;

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
        let bad = |msg: String| ModelError::Gguf(file.error(GgufProblem::Corrupt(msg)));
        let arch_name = file
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no general.architecture key: this is not a model file".into()))?;
        let arch = Architecture::from_gguf_name(arch_name).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                path: file.path().to_path_buf(),
                arch: arch_name.to_string(),
            }
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let uint = |k: &str| -> Result<usize, ModelError> {
            let v = file
                .get(&key(k))
                .ok_or_else(|| bad(format!("missing key {}", key(k))))?;
            let n = v.as_u64().ok_or_else(|| {
                bad(format!(
                    "{} = {} is not a non-negative integer",
                    key(k),
                    v.summary()
                ))
            })?;
            usize::try_from(n).map_err(|_| bad(format!("{} = {n} is too large", key(k))))
        };
        let float = |k: &str| -> Result<f32, ModelError> {
            let v = file
                .get(&key(k))
                .ok_or_else(|| bad(format!("missing key {}", key(k))))?;
            let x = v
                .as_f64()
                .ok_or_else(|| bad(format!("{} = {} is not a number", key(k), v.summary())))?;
            if x.is_finite() {
                Ok(x as f32)
            } else {
                Err(bad(format!("{} = {x} is not finite", key(k))))
            }
        };
        let n_embd = uint("embedding_length")?;
        let n_head = uint("attention.head_count")?;
        let n_head_kv = match file.get(&key("attention.head_count_kv")) {
            Some(_) => uint("attention.head_count_kv")?,
            None => n_head,
        };
        let (n_expert, n_expert_used) = match arch {
            Architecture::GraniteMoe => (uint("expert_count")?, uint("expert_used_count")?),
            Architecture::Granite => (0, 0),
        };
        let n_vocab = match file.get(&key("vocab_size")) {
            Some(_) => uint("vocab_size")?,
            None => file
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(|a| a.len())
                .ok_or_else(|| {
                    bad(format!(
                        "missing key {} and no tokenizer.ggml.tokens",
                        key("vocab_size")
                    ))
                })?,
        };
        let cfg = ModelConfig {
            arch,
            name: file
                .get("general.name")
                .and_then(Value::as_str)
                .map(str::to_string),
            n_vocab,
            n_embd,
            n_layer: uint("block_count")?,
            n_head,
            n_head_kv,
            head_dim: n_embd.checked_div(n_head).unwrap_or(0),
            n_ff: uint("feed_forward_length")?,
            n_expert,
            n_expert_used,
            context_length: uint("context_length")?,
            // Missing means llama.cpp's default; present, it must be a usable base (NaN, infinite, 0 or
            // negative would make every rotation angle meaningless).
            rope_theta: match file.get(&key("rope.freq_base")) {
                None => 10_000.0,
                Some(_) => {
                    let theta = float("rope.freq_base")?;
                    if theta <= 0.0 {
                        return Err(bad(format!(
                            "{} = {theta} must be a positive number",
                            key("rope.freq_base")
                        )));
                    }
                    theta
                }
            },
            rms_eps: float("attention.layer_norm_rms_epsilon")?,
            embedding_scale: float("embedding_scale")?,
            attention_scale: float("attention.scale")?,
            residual_scale: float("residual_scale")?,
            logit_scale: float("logit_scale")?,
        };
        if let Some(v) = file.get(&key("rope.dimension_count"))
            && v.as_u64() != Some(cfg.head_dim as u64)
        {
            return Err(bad(format!(
                "{} = {} but embedding_length / head_count = {}; only full-head rotary embedding is supported",
                key("rope.dimension_count"),
                v.summary(),
                cfg.head_dim
            )));
        }
        cfg.check().map_err(bad)?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        let dims = [
            ("vocab_size", self.n_vocab),
            ("embedding_length", self.n_embd),
            ("attention.head_count", self.n_head),
            ("attention.head_count_kv", self.n_head_kv),
            ("feed_forward_length", self.n_ff),
            ("context_length", self.context_length),
        ];
        for (name, v) in dims {
            if v == 0 || v > MAX_DIM {
                return Err(format!("{name} = {v} is out of range (1 to {MAX_DIM})"));
            }
        }
        if self.n_layer == 0 || self.n_layer > MAX_LAYERS {
            return Err(format!(
                "block_count = {} is out of range (1 to {MAX_LAYERS})",
                self.n_layer
            ));
        }
        if !self.n_embd.is_multiple_of(self.n_head) || !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "embedding_length {} is not an even head size times head_count {}",
                self.n_embd, self.n_head
            ));
        }
        if self.head_dim > crate::kernels::ops::MAX_HEAD_DIM {
            return Err(format!(
                "head size {} (embedding_length / head_count) is over the {} attention supports",
                self.head_dim,
                crate::kernels::ops::MAX_HEAD_DIM
            ));
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return Err(format!(
                "head_count {} is not a multiple of head_count_kv {}",
                self.n_head, self.n_head_kv
            ));
        }
        if self.arch == Architecture::GraniteMoe
            && (self.n_expert == 0
                || self.n_expert > 4096
                || self.n_expert_used == 0
                || self.n_expert_used > self.n_expert)
        {
            return Err(format!(
                "expert_used_count {} / expert_count {} is not a valid routing",
                self.n_expert_used, self.n_expert
            ));
        }
        if self.rms_eps <= 0.0 || self.logit_scale == 0.0 {
            return Err(format!(
                "layer_norm_rms_epsilon {} / logit_scale {} are invalid",
                self.rms_eps, self.logit_scale
            ));
        }
        Ok(())
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Bytes of f32 K and V cache per token of context.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.n_layer * self.kv_dim() * std::mem::size_of::<f32>()
    }
}
