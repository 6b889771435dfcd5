//! Which GGUF tensors a Granite model becomes: names, ggml shapes, element types, and which rows of which
//! checkpoint tensor feed each of them (in output order). The plan depends on the config alone, so the converter
//! (which checks it against the checkpoint before writing a byte) and `synth` (which has no checkpoint) write
//! exactly the same layout.

use std::ops::Range;

use super::TargetType;
use crate::blocks::BLOCK_LEN;
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
    /// The type the recipe asked for when it could not be used (rows not a multiple of 32): `ty` is then F16.
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

/// The type recipe: norms and routers F32; the output head (tied embedding or `output.weight`) at Q8_0 in a Q4_0
/// file unless `embedding_type` says otherwise; `embedding_type` also sets an untied input embedding; every other
/// matrix at the target type. Block types need rows that are whole 32-blocks; other rows fall back to F16.
pub fn choose_type(
    role: Role,
    row_len: usize,
    target: TargetType,
    embedding_type: Option<TargetType>,
) -> (GgmlType, Option<GgmlType>) {
    let wanted = match role {
        Role::Norm | Role::Router => TargetType::F32,
        Role::OutputHead => embedding_type.unwrap_or(match target {
            TargetType::Q4_0 => TargetType::Q8_0,
            other => other,
        }),
        Role::InputEmbedding => embedding_type.unwrap_or(target),
        Role::Weight => target,
    }
    .ggml_type();
    if wanted.block_len() == BLOCK_LEN && !row_len.is_multiple_of(BLOCK_LEN) {
        (GgmlType::F16, Some(wanted))
    } else {
        (wanted, None)
    }
}

/// Plans every tensor of the output file, in file order.
pub fn plan(
    config: &HfConfig,
    target: TargetType,
    embedding_type: Option<TargetType>,
) -> Vec<PlannedTensor> {
    let mut planner = Planner {
        target,
        embedding_type,
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
    target: TargetType,
    embedding_type: Option<TargetType>,
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
        let (ty, fell_back_from) = choose_type(role, row_len, self.target, self.embedding_type);
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

    #[test]
    fn type_recipe() {
        use GgmlType::*;
        use TargetType as T;
        let t = |role, row, target, emb| choose_type(role, row, target, emb);
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
    }
}
