//! Which GGUF tensors a Granite model becomes: names, ggml shapes, element types, and which rows of which
//! checkpoint tensor feed each of them (in output order). The plan depends on the config alone, so the converter
//! (which checks it against the checkpoint before writing a byte) and `synth` (which has no checkpoint) write
//! exactly the same layout.

use std::ops::Range;

use super::TargetType;
use crate::blocks::{BLOCK_LEN, QK_K};
use crate::error::ConvertError;
use crate::gguf::GgmlType;
use crate::hf::HfConfig;
use crate::safetensors::Checkpoint;

/// What a tensor is for, which decides its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `token_embd` of an untied model: only looked up, row by row.
    InputEmbedding,
    /// The tensor the logits are computed with: `output.weight`, or `token_embd` when tied. The most
    /// precision-sensitive matrix, so a Q4_0 file keeps it at Q8_0 by default.
    OutputHead,
    /// RMSNorm weights: 1-D, always F32 (llama.cpp requires it).
    Norm,
    /// `ffn_gate_inp`: the router picks experts from small logit differences; llama.cpp keeps it F32.
    Router,
    /// Every other matrix.
    Weight,
}

/// One tensor of the output file.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    /// GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// The checkpoint tensor it is made from.
    pub source: String,
    /// The torch shape `source` must have (for the expert halves, the whole `[E, 2I, H]` tensor).
    pub source_shape: Vec<usize>,
    /// What the tensor is for; its type was chosen from it, and synthetic values are drawn by it.
    pub role: Role,
    /// ggml order: contiguous dimension first.
    pub dims: Vec<u64>,
    /// The type written.
    pub ty: GgmlType,
    /// The type the recipe asked for when it could not be used (rows not whole blocks of it): `ty` is then Q8_0
    /// or F16.
    pub fell_back_from: Option<GgmlType>,
    /// Rows of the source viewed as `[rows, row_len]`, concatenated in output order.
    pub source_rows: Vec<Range<usize>>,
    /// When set, rows are reordered within each group of this many (one attention head) from HF's rotate-half
    /// RoPE layout to llama.cpp's adjacent pairs: output row `2i + j` of a head is input row `j * hd/2 + i`.
    pub rope_head_dim: Option<usize>,
}

impl PlannedTensor {
    pub fn row_len(&self) -> usize {
        self.dims.first().map_or(1, |&d| d as usize)
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The type recipe: which ggml type each tensor of a file of `target` gets.
///
/// * Norms and routers: F32 always (llama.cpp requires F32 norms and never quantizes routers).
/// * The output head (`output.weight`, or the tied `token_embd`): `embedding_type` when given; else Q8_0 in a Q4_0
///   file (Quarry's choice: llama.cpp would use Q6_K), Q6_K in a k-quant or IQ4 file (Q8_0 when its rows are not a
///   multiple of 256, as llama.cpp), the target type otherwise. An untied input embedding gets `embedding_type`
///   or the target's base type (llama.cpp too: IQ4_NL / IQ4_XS for an IQ4 file).
/// * Other matrices: the target's base type, except in llama.cpp's mixes, which follow `llama_tensor_get_type`
///   (`src/llama-quant.cpp`: the k-quant rules as of b4748, the IQ4 rules as of libllama 0.0.9749, whose k-quant
///   branches for these tensors are still b4748's) for these architectures, by tensor name like llama.cpp:
///   * k-quants: in Q4_K_M and Q5_K_M, `attn_v` and `ffn_down`/`ffn_down_exps` get Q6_K in the layers
///     [`use_more_bits`] picks; in a model with exactly 8 experts, `attn_v` and `attn_k` get Q8_0 (any k-quant
///     mix) and in Q4_K_M `attn_output` gets Q5_K.
///   * IQ4_NL and IQ4_XS (llama-quantize without an importance matrix, as Quarry always is): `attn_v` gets Q5_K
///     when 4 or more query heads share each KV head (`n_gqa() >= 4`); `ffn_down`/`ffn_down_exps` get Q5_K in
///     the first eighth of the layers (none below 8 layers); with exactly 8 experts `attn_v` and `attn_k` get Q8_0
///     and `attn_output` Q5_K. Of the models in `models.toml`, the MoE ones (32 or 40 experts, 2 or 3 query heads
///     per KV head) get only the `ffn_down_exps` rule; the dense 2B and 8B (32 query heads over 8 KV heads) get
///     Q5_K `attn_v` too.
/// * Rows that are not whole blocks of the chosen type fall back (see [`Recipe::choose`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recipe {
    pub target: TargetType,
    pub embedding_type: Option<TargetType>,
    /// Layers of the model (`{arch}.block_count`): [`use_more_bits`] spreads the Q6_K tensors over them.
    pub n_layers: usize,
    /// Experts per layer, 0 for a dense model: llama.cpp treats 8-expert models specially.
    pub n_experts: usize,
    /// Query heads per KV head, llama.cpp's `n_gqa()` (`head_count / head_count_kv`, rounded down; 0 when
    /// `head_count_kv` is 0): the IQ4 recipes give `attn_v` more bits when it is 4 or more, since each of its rows
    /// then serves that many heads.
    pub n_gqa: usize,
}

/// llama.cpp's `use_more_bits(i_layer, n_layers)`: the first and last eighth of the layers and every third layer
/// in between (for 24 layers: 0-2, 5, 8, 11, 14, 17, 20, 21-23).
pub fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2
}

/// llama.cpp's `n_gqa()`: query heads per KV head, rounded down, 0 for no KV heads.
pub fn gqa(n_head: usize, n_head_kv: usize) -> usize {
    n_head.checked_div(n_head_kv).unwrap_or(0)
}

/// The layer of a `blk.N.*` tensor.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

impl Recipe {
    /// The recipe of a model with `config`'s layers and experts.
    pub fn for_config(
        config: &HfConfig,
        target: TargetType,
        embedding_type: Option<TargetType>,
    ) -> Recipe {
        Recipe {
            target,
            embedding_type,
            n_layers: config.num_hidden_layers,
            n_experts: config.moe.map_or(0, |m| m.num_local_experts),
            n_gqa: gqa(config.num_attention_heads, config.num_key_value_heads),
        }
    }

    /// The type of tensor `name` (GGUF name) of `role` with rows of `row_len` weights, and the type the recipe
    /// wanted when it had to fall back: rows that are not whole blocks of IQ4_XS fall back to IQ4_NL (as
    /// llama.cpp's `tensor_type_fallback`) when they are whole 32-blocks; rows that are not whole blocks of Q4_K,
    /// Q5_K or Q6_K fall back to Q8_0 when they are whole 32-blocks; anything else that does not fit falls back to
    /// F16. llama.cpp falls back from Q4_K to Q5_0 and from Q5_K to Q5_1, which Quarry's runtime does not run, and
    /// it refuses rows that fit no 32-block of Q8_0 (or of the head's Q8_0 in an IQ4_NL file) at all.
    pub fn choose(&self, name: &str, role: Role, row_len: usize) -> (GgmlType, Option<GgmlType>) {
        let wanted = self.wanted(name, role, row_len);
        if row_len.is_multiple_of(wanted.block_len()) {
            return (wanted, None);
        }
        let instead = match wanted {
            GgmlType::IQ4_XS if row_len.is_multiple_of(BLOCK_LEN) => GgmlType::IQ4_NL,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K
                if row_len.is_multiple_of(BLOCK_LEN) =>
            {
                GgmlType::Q8_0
            }
            _ => GgmlType::F16,
        };
        (instead, Some(wanted))
    }

    fn wanted(&self, name: &str, role: Role, row_len: usize) -> GgmlType {
        let base = self.target.ggml_type();
        match role {
            Role::Norm | Role::Router => GgmlType::F32,
            Role::OutputHead => match (self.embedding_type, self.target) {
                (Some(t), _) => t.ggml_type(),
                (None, TargetType::Q4_0) => GgmlType::Q8_0,
                // llama.cpp: Q8_0 when the rows are not whole blocks of the file's base type, else Q6_K, which
                // falls back to Q8_0 unless they are whole 256-blocks: Q6_K or Q8_0 either way.
                (None, t) if t.is_k_quant() || t.is_iq4() => {
                    if row_len.is_multiple_of(QK_K) {
                        GgmlType::Q6_K
                    } else {
                        GgmlType::Q8_0
                    }
                }
                (None, _) => base,
            },
            Role::InputEmbedding => self.embedding_type.map_or(base, TargetType::ggml_type),
            Role::Weight if self.target.is_k_quant() => self.k_quant_weight(name, base),
            Role::Weight if self.target.is_iq4() => self.iq4_weight(name, base),
            Role::Weight => base,
        }
    }

    /// `llama_tensor_get_type`'s rules for Q4_K_M, Q5_K_M and Q6_K, as far as Granite's tensors go.
    fn k_quant_weight(&self, name: &str, base: GgmlType) -> GgmlType {
        let mixed = matches!(self.target, TargetType::Q4_K_M | TargetType::Q5_K_M);
        let more_bits = || mixed && layer_of(name).is_some_and(|l| use_more_bits(l, self.n_layers));
        let eight_experts = self.n_experts == 8;
        if name.contains("attn_v.weight") {
            if eight_experts {
                GgmlType::Q8_0
            } else if more_bits() {
                GgmlType::Q6_K
            } else {
                base
            }
        } else if name.contains("attn_k.weight") {
            if eight_experts { GgmlType::Q8_0 } else { base }
        } else if name.contains("ffn_down") {
            if more_bits() { GgmlType::Q6_K } else { base }
        } else if name.contains("attn_output.weight") {
            if eight_experts && self.target == TargetType::Q4_K_M {
                GgmlType::Q5_K
            } else {
                base
            }
        } else {
            base
        }
    }

    /// `llama_tensor_get_type`'s rules for IQ4_NL and IQ4_XS without an importance matrix, as far as Granite's
    /// tensors go (its attention-V, attention-K, FFN-down and attention-output branches; the Falcon and 70B
    /// special cases cannot apply to Granite).
    fn iq4_weight(&self, name: &str, base: GgmlType) -> GgmlType {
        let eight_experts = self.n_experts == 8;
        if name.contains("attn_v.weight") {
            if eight_experts {
                GgmlType::Q8_0
            } else if self.n_gqa >= 4 {
                GgmlType::Q5_K
            } else {
                base
            }
        } else if name.contains("attn_k.weight") {
            if eight_experts { GgmlType::Q8_0 } else { base }
        } else if name.contains("ffn_down") {
            // llama.cpp skips this with an importance matrix, which Quarry never has.
            if layer_of(name).is_some_and(|l| l < self.n_layers / 8) {
                GgmlType::Q5_K
            } else {
                base
            }
        } else if name.contains("attn_output.weight") {
            if eight_experts { GgmlType::Q5_K } else { base }
        } else {
            base
        }
    }
}

/// The role of a tensor of a GGUF file from its name and dimensions, as llama-quantize decides what to quantize:
/// 1-D tensors and `*_norm.weight` are norms, `ffn_gate_inp` the router, `output.weight` (or `token_embd` when the
/// file has no `output.weight`) the output head.
pub fn role_of_gguf_tensor(name: &str, n_dims: usize, has_output: bool) -> Role {
    if n_dims < 2 || name.ends_with("_norm.weight") {
        Role::Norm
    } else if name.contains("ffn_gate_inp.weight") {
        Role::Router
    } else if name == "output.weight" || (name == "token_embd.weight" && !has_output) {
        Role::OutputHead
    } else if name == "token_embd.weight" {
        Role::InputEmbedding
    } else {
        Role::Weight
    }
}

/// Plans every tensor of the output file, in file order.
pub fn plan(
    config: &HfConfig,
    target: TargetType,
    embedding_type: Option<TargetType>,
) -> Vec<PlannedTensor> {
    let mut planner = Planner {
        recipe: Recipe::for_config(config, target, embedding_type),
        tensors: Vec::new(),
    };
    let (v, h, i) = (
        config.vocab_size,
        config.hidden_size,
        config.intermediate_size,
    );
    let (q_dim, kv_dim, hd) = (
        config.num_attention_heads * config.head_dim(),
        config.kv_dim(),
        config.head_dim(),
    );

    let embedding_role = if config.tie_word_embeddings {
        Role::OutputHead
    } else {
        Role::InputEmbedding
    };
    planner.matrix(
        "token_embd.weight",
        "model.embed_tokens.weight",
        &[v, h],
        embedding_role,
    );
    for layer in 0..config.num_hidden_layers {
        let hf = |name: &str| format!("model.layers.{layer}.{name}");
        let gguf = |name: &str| format!("blk.{layer}.{name}.weight");
        planner.matrix(
            &gguf("attn_norm"),
            &hf("input_layernorm.weight"),
            &[h],
            Role::Norm,
        );
        planner.permuted(
            &gguf("attn_q"),
            &hf("self_attn.q_proj.weight"),
            &[q_dim, h],
            hd,
        );
        planner.permuted(
            &gguf("attn_k"),
            &hf("self_attn.k_proj.weight"),
            &[kv_dim, h],
            hd,
        );
        planner.matrix(
            &gguf("attn_v"),
            &hf("self_attn.v_proj.weight"),
            &[kv_dim, h],
            Role::Weight,
        );
        planner.matrix(
            &gguf("attn_output"),
            &hf("self_attn.o_proj.weight"),
            &[h, q_dim],
            Role::Weight,
        );
        planner.matrix(
            &gguf("ffn_norm"),
            &hf("post_attention_layernorm.weight"),
            &[h],
            Role::Norm,
        );
        match config.moe {
            Some(moe) => {
                let e = moe.num_local_experts;
                let router = hf("block_sparse_moe.router.layer.weight");
                planner.matrix(&gguf("ffn_gate_inp"), &router, &[e, h], Role::Router);
                // input_linear [E, 2I, H] holds each expert's gate rows, then its up rows.
                let input = hf("block_sparse_moe.input_linear.weight");
                planner.expert_halves(
                    &gguf("ffn_gate_exps"),
                    &gguf("ffn_up_exps"),
                    &input,
                    e,
                    i,
                    h,
                );
                let output = hf("block_sparse_moe.output_linear.weight");
                planner.matrix(&gguf("ffn_down_exps"), &output, &[e, h, i], Role::Weight);
            }
            None => {
                planner.matrix(
                    &gguf("ffn_gate"),
                    &hf("mlp.gate_proj.weight"),
                    &[i, h],
                    Role::Weight,
                );
                planner.matrix(
                    &gguf("ffn_up"),
                    &hf("mlp.up_proj.weight"),
                    &[i, h],
                    Role::Weight,
                );
                planner.matrix(
                    &gguf("ffn_down"),
                    &hf("mlp.down_proj.weight"),
                    &[h, i],
                    Role::Weight,
                );
            }
        }
    }
    planner.matrix("output_norm.weight", "model.norm.weight", &[h], Role::Norm);
    if !config.tie_word_embeddings {
        planner.matrix("output.weight", "lm_head.weight", &[v, h], Role::OutputHead);
    }
    planner.tensors
}

/// Checks that every source tensor of the plan is in the checkpoint with the shape the config implies (and a dtype
/// the converter reads), in plan order, so the first problem reported is the first tensor that would fail.
pub fn check_sources(
    tensors: &[PlannedTensor],
    checkpoint: &Checkpoint,
) -> Result<(), ConvertError> {
    for tensor in tensors {
        checkpoint
            .tensor(&tensor.source)?
            .expect_shape(&tensor.source_shape)?;
    }
    Ok(())
}

struct Planner {
    recipe: Recipe,
    tensors: Vec<PlannedTensor>,
}

impl Planner {
    /// Adds one output tensor of torch shape `torch_shape` made from `rows` of `source` (of shape `source_shape`).
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        name: &str,
        source: &str,
        source_shape: &[usize],
        torch_shape: &[usize],
        role: Role,
        rows: Vec<Range<usize>>,
        rope: Option<usize>,
    ) {
        let dims: Vec<u64> = torch_shape.iter().rev().map(|&d| d as u64).collect();
        let row_len = torch_shape.last().copied().unwrap_or(1);
        let (ty, fell_back_from) = self.recipe.choose(name, role, row_len);
        self.tensors.push(PlannedTensor {
            name: name.to_string(),
            source: source.to_string(),
            source_shape: source_shape.to_vec(),
            role,
            dims,
            ty,
            fell_back_from,
            source_rows: rows,
            rope_head_dim: rope,
        });
    }

    /// A tensor copied as is (ggml dims are the torch shape reversed, so the bytes keep their order).
    fn matrix(&mut self, name: &str, source: &str, torch_shape: &[usize], role: Role) {
        self.with_rows(name, source, torch_shape, role, None);
    }

    /// q_proj / k_proj: rows reordered within each head for llama.cpp's RoPE.
    fn permuted(&mut self, name: &str, source: &str, torch_shape: &[usize], head_dim: usize) {
        self.with_rows(name, source, torch_shape, Role::Weight, Some(head_dim));
    }

    fn with_rows(
        &mut self,
        name: &str,
        source: &str,
        torch_shape: &[usize],
        role: Role,
        rope: Option<usize>,
    ) {
        let rows = torch_shape.iter().rev().skip(1).product();
        let all_rows = std::iter::once(0..rows).collect();
        self.push(name, source, torch_shape, torch_shape, role, all_rows, rope);
    }

    /// Splits `[E, 2I, H]` into gate `{H, I, E}` (rows `0..I` of each expert) and up (rows `I..2I`).
    fn expert_halves(
        &mut self,
        gate: &str,
        up: &str,
        source: &str,
        experts: usize,
        intermediate: usize,
        hidden: usize,
    ) {
        let source_shape = [experts, 2 * intermediate, hidden];
        let half = |offset: usize| -> Vec<Range<usize>> {
            (0..experts)
                .map(|e| {
                    let start = e * 2 * intermediate + offset;
                    start..start + intermediate
                })
                .collect()
        };
        let shape = [experts, intermediate, hidden];
        for (name, offset) in [(gate, 0), (up, intermediate)] {
            self.push(
                name,
                source,
                &source_shape,
                &shape,
                Role::Weight,
                half(offset),
                None,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(
        target: TargetType,
        emb: Option<TargetType>,
        layers: usize,
        experts: usize,
    ) -> Recipe {
        Recipe {
            target,
            embedding_type: emb,
            n_layers: layers,
            n_experts: experts,
            n_gqa: 2,
        }
    }

    #[test]
    fn type_recipe() {
        use GgmlType::*;
        use TargetType as T;
        let t = |role, row, target, emb| {
            recipe(target, emb, 2, 0).choose("blk.0.attn_q.weight", role, row)
        };
        assert_eq!(t(Role::Weight, 64, T::Q4_0, None), (Q4_0, None));
        assert_eq!(t(Role::Weight, 24, T::Q4_0, None), (F16, Some(Q4_0)));
        assert_eq!(t(Role::Weight, 24, T::F32, None), (F32, None));
        assert_eq!(t(Role::Norm, 64, T::Q8_0, None), (F32, None));
        assert_eq!(t(Role::Router, 64, T::F16, None), (F32, None));
        assert_eq!(t(Role::Weight, 64, T::F16, None), (F16, None));
        assert_eq!(t(Role::OutputHead, 64, T::Q4_0, None), (Q8_0, None));
        assert_eq!(
            t(Role::OutputHead, 64, T::Q4_0, Some(T::Q4_0)),
            (Q4_0, None)
        );
        assert_eq!(t(Role::OutputHead, 64, T::Q8_0, None), (Q8_0, None));
        assert_eq!(t(Role::OutputHead, 16, T::Q8_0, None), (F16, Some(Q8_0)));
        assert_eq!(t(Role::InputEmbedding, 64, T::Q4_0, None), (Q4_0, None));
        assert_eq!(
            t(Role::InputEmbedding, 64, T::Q4_0, Some(T::F16)),
            (F16, None)
        );
        // k-quants: base types, fallbacks, the head
        assert_eq!(t(Role::Weight, 512, T::Q4_K_M, None), (Q4_K, None));
        assert_eq!(t(Role::Weight, 512, T::Q5_K_M, None), (Q5_K, None));
        assert_eq!(t(Role::Weight, 512, T::Q6_K, None), (Q6_K, None));
        assert_eq!(t(Role::Weight, 96, T::Q4_K_M, None), (Q8_0, Some(Q4_K)));
        assert_eq!(t(Role::Weight, 96, T::Q6_K, None), (Q8_0, Some(Q6_K)));
        assert_eq!(t(Role::Weight, 40, T::Q5_K_M, None), (F16, Some(Q5_K)));
        assert_eq!(t(Role::OutputHead, 512, T::Q4_K_M, None), (Q6_K, None));
        assert_eq!(t(Role::OutputHead, 96, T::Q4_K_M, None), (Q8_0, None));
        assert_eq!(t(Role::OutputHead, 40, T::Q6_K, None), (F16, Some(Q8_0)));
        assert_eq!(
            t(Role::OutputHead, 512, T::Q6_K, Some(T::Q8_0)),
            (Q8_0, None)
        );
        assert_eq!(
            t(Role::OutputHead, 512, T::Q8_0, Some(T::Q4_K_M)),
            (Q4_K, None)
        );
        assert_eq!(t(Role::InputEmbedding, 512, T::Q4_K_M, None), (Q4_K, None));
        assert_eq!(t(Role::Norm, 512, T::Q6_K, None), (F32, None));
        // IQ4: base types, IQ4_XS -> IQ4_NL -> F16 as llama.cpp, the head as in a k-quant file
        assert_eq!(t(Role::Weight, 512, T::IQ4_XS, None), (IQ4_XS, None));
        assert_eq!(t(Role::Weight, 96, T::IQ4_XS, None), (IQ4_NL, Some(IQ4_XS)));
        assert_eq!(t(Role::Weight, 40, T::IQ4_XS, None), (F16, Some(IQ4_XS)));
        assert_eq!(t(Role::Weight, 96, T::IQ4_NL, None), (IQ4_NL, None));
        assert_eq!(t(Role::Weight, 40, T::IQ4_NL, None), (F16, Some(IQ4_NL)));
        assert_eq!(t(Role::OutputHead, 512, T::IQ4_NL, None), (Q6_K, None));
        assert_eq!(t(Role::OutputHead, 512, T::IQ4_XS, None), (Q6_K, None));
        assert_eq!(t(Role::OutputHead, 96, T::IQ4_NL, None), (Q8_0, None));
        assert_eq!(t(Role::OutputHead, 96, T::IQ4_XS, None), (Q8_0, None));
        assert_eq!(t(Role::OutputHead, 40, T::IQ4_NL, None), (F16, Some(Q8_0)));
        assert_eq!(
            t(Role::OutputHead, 512, T::IQ4_XS, Some(T::IQ4_NL)),
            (IQ4_NL, None)
        );
        assert_eq!(
            t(Role::OutputHead, 512, T::Q4_0, Some(T::IQ4_XS)),
            (IQ4_XS, None)
        );
        assert_eq!(
            t(Role::InputEmbedding, 512, T::IQ4_XS, None),
            (IQ4_XS, None)
        );
        assert_eq!(
            t(Role::InputEmbedding, 64, T::IQ4_XS, None),
            (IQ4_NL, Some(IQ4_XS))
        );
        assert_eq!(t(Role::Router, 512, T::IQ4_NL, None), (F32, None));
        assert_eq!(t(Role::Norm, 512, T::IQ4_XS, None), (F32, None));
    }

    #[test]
    fn iq4_mixes_by_name_layer_and_grouping() {
        use GgmlType::*;
        use TargetType as T;
        let ty = |target, layers, experts, n_gqa, name: &str| {
            Recipe {
                n_gqa,
                ..recipe(target, None, layers, experts)
            }
            .choose(name, Role::Weight, 1024)
            .0
        };
        for target in [T::IQ4_NL, T::IQ4_XS] {
            let base = target.ggml_type();
            // ffn_down: Q5_K in the first eighth of the layers (0..3 of 24), whatever the experts
            for (name, want) in [
                ("blk.0.ffn_down_exps.weight", Q5_K),
                ("blk.2.ffn_down_exps.weight", Q5_K),
                ("blk.3.ffn_down_exps.weight", base),
                ("blk.23.ffn_down_exps.weight", base),
                ("blk.1.ffn_down.weight", Q5_K),
                ("blk.20.ffn_down.weight", base),
            ] {
                assert_eq!(ty(target, 24, 32, 2, name), want, "{target} {name}");
                assert_eq!(ty(target, 24, 0, 2, name), want, "{target} {name}");
            }
            // fewer than 8 layers: no first eighth
            assert_eq!(ty(target, 7, 32, 2, "blk.0.ffn_down_exps.weight"), base);
            assert_eq!(ty(target, 8, 32, 2, "blk.0.ffn_down_exps.weight"), Q5_K);
            // attn_v: Q5_K from 4 query heads per KV head
            assert_eq!(ty(target, 24, 32, 3, "blk.9.attn_v.weight"), base);
            assert_eq!(ty(target, 24, 32, 4, "blk.9.attn_v.weight"), Q5_K);
            assert_eq!(ty(target, 24, 0, 8, "blk.9.attn_v.weight"), Q5_K);
            // no use_more_bits spread, unlike Q4_K_M
            assert_eq!(ty(target, 24, 32, 2, "blk.0.attn_v.weight"), base);
            for name in [
                "blk.0.attn_q.weight",
                "blk.0.attn_k.weight",
                "blk.0.attn_output.weight",
                "blk.0.ffn_gate_exps.weight",
                "blk.0.ffn_up_exps.weight",
                "blk.0.ffn_up.weight",
            ] {
                assert_eq!(ty(target, 24, 32, 4, name), base, "{target} {name}");
            }
            // 8 experts: llama.cpp's Mixtral rules, Q8_0 even over the grouping rule
            assert_eq!(ty(target, 24, 8, 4, "blk.9.attn_v.weight"), Q8_0);
            assert_eq!(ty(target, 24, 8, 2, "blk.9.attn_k.weight"), Q8_0);
            assert_eq!(ty(target, 24, 8, 2, "blk.9.attn_output.weight"), Q5_K);
            assert_eq!(ty(target, 24, 8, 2, "blk.9.attn_q.weight"), base);
            // the Q5_K picks fall back to Q8_0 when rows are not whole 256-blocks (llama.cpp: Q5_1)
            let r = Recipe {
                n_gqa: 4,
                ..recipe(target, None, 24, 32)
            };
            assert_eq!(
                r.choose("blk.9.attn_v.weight", Role::Weight, 96),
                (Q8_0, Some(Q5_K))
            );
        }
        assert_eq!(gqa(16, 8), 2);
        assert_eq!(gqa(24, 8), 3);
        assert_eq!(gqa(32, 8), 4);
        assert_eq!(gqa(8, 0), 0);
    }

    #[test]
    fn use_more_bits_matches_llama_cpp() {
        let picked = |n: usize| (0..n).filter(|&l| use_more_bits(l, n)).collect::<Vec<_>>();
        assert_eq!(picked(2), vec![1]);
        assert_eq!(picked(24), vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
        assert_eq!(
            picked(40),
            vec![
                0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 35, 36, 37, 38, 39
            ]
        );
        assert_eq!(picked(1), vec![0]);
    }

    #[test]
    fn k_quant_mixes_by_name_and_layer() {
        use GgmlType::*;
        use TargetType as T;
        let ty = |target, experts, name: &str| {
            recipe(target, None, 24, experts)
                .choose(name, Role::Weight, 1024)
                .0
        };
        for (name, more, less) in [
            ("blk.0.attn_v.weight", Q6_K, Q4_K),
            ("blk.5.ffn_down_exps.weight", Q6_K, Q4_K),
            ("blk.23.ffn_down.weight", Q6_K, Q4_K),
        ] {
            assert_eq!(ty(T::Q4_K_M, 32, name), more, "{name}");
            let other = name
                .replace(|c: char| c.is_ascii_digit(), "")
                .replace("blk..", "blk.4.");
            assert_eq!(ty(T::Q4_K_M, 32, &other), less, "{other}");
            assert_eq!(ty(T::Q5_K_M, 0, name), Q6_K, "{name}");
            assert_eq!(ty(T::Q5_K_M, 0, &other), Q5_K, "{other}");
            assert_eq!(ty(T::Q6_K, 32, name), Q6_K, "{name}");
        }
        for name in [
            "blk.0.attn_q.weight",
            "blk.0.attn_k.weight",
            "blk.0.attn_output.weight",
            "blk.0.ffn_gate_exps.weight",
            "blk.0.ffn_up.weight",
        ] {
            assert_eq!(ty(T::Q4_K_M, 32, name), Q4_K, "{name}");
        }
        // 8 experts: llama.cpp's Mixtral rules
        assert_eq!(ty(T::Q4_K_M, 8, "blk.0.attn_v.weight"), Q8_0);
        assert_eq!(ty(T::Q4_K_M, 8, "blk.4.attn_k.weight"), Q8_0);
        assert_eq!(ty(T::Q6_K, 8, "blk.4.attn_k.weight"), Q8_0);
        assert_eq!(ty(T::Q4_K_M, 8, "blk.4.attn_output.weight"), Q5_K);
        assert_eq!(ty(T::Q5_K_M, 8, "blk.4.attn_output.weight"), Q5_K);
        assert_eq!(ty(T::Q6_K, 8, "blk.4.attn_output.weight"), Q6_K);
        // the non-k-quant recipes do not look at names
        assert_eq!(
            recipe(T::Q4_0, None, 24, 8)
                .choose("blk.0.attn_v.weight", Role::Weight, 64)
                .0,
            Q4_0
        );
    }

    #[test]
    fn roles_of_gguf_tensors() {
        assert_eq!(
            role_of_gguf_tensor("token_embd.weight", 2, false),
            Role::OutputHead
        );
        assert_eq!(
            role_of_gguf_tensor("token_embd.weight", 2, true),
            Role::InputEmbedding
        );
        assert_eq!(
            role_of_gguf_tensor("output.weight", 2, true),
            Role::OutputHead
        );
        assert_eq!(
            role_of_gguf_tensor("blk.0.attn_norm.weight", 1, true),
            Role::Norm
        );
        assert_eq!(
            role_of_gguf_tensor("blk.0.ffn_gate_inp.weight", 2, true),
            Role::Router
        );
        assert_eq!(
            role_of_gguf_tensor("blk.0.ffn_down_exps.weight", 3, true),
            Role::Weight
        );
        assert_eq!(role_of_gguf_tensor("blk.0.some_bias", 1, true), Role::Norm);
    }
}
