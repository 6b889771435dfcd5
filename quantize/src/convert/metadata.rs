//! The `general.*` and `<arch>.*` keys, as llama.cpp's converter writes them for `granitemoe` and `granite`.

use super::TargetType;
use super::plan::PlannedTensor;
use super::vocab::Vocab;
use crate::gguf::Value;
use crate::hf::HfConfig;

/// ggml's `GGML_QNT_VERSION`: the Q4_0/Q8_0 layout generation readers check.
pub const QUANTIZATION_VERSION: u32 = 2;

/// Every metadata key-value, in llama.cpp's order.
pub fn build(
    config: &HfConfig,
    vocab: &Vocab,
    tensors: &[PlannedTensor],
    target: TargetType,
    name: &str,
) -> Vec<(String, Value)> {
    let arch = config.architecture.gguf_name();
    let key = |suffix: &str| format!("{arch}.{suffix}");
    // Sizes were validated to be at most 2^24, so they fit the u32 keys llama.cpp reads.
    let size = |n: usize| Value::U32(n as u32);
    let mut kv = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.type".to_string(), Value::String("model".into())),
        ("general.name".to_string(), Value::String(name.into())),
        (
            "general.size_label".to_string(),
            Value::String(size_label(config, tensors)),
        ),
        (key("block_count"), size(config.num_hidden_layers)),
        (key("context_length"), size(config.max_position_embeddings)),
        (key("embedding_length"), size(config.hidden_size)),
        (key("feed_forward_length"), size(config.intermediate_size)),
        (
            key("attention.head_count"),
            size(config.num_attention_heads),
        ),
        (
            key("attention.head_count_kv"),
            size(config.num_key_value_heads),
        ),
        (key("rope.freq_base"), Value::F32(config.rope_theta)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps),
        ),
    ];
    if let Some(moe) = config.moe {
        kv.push((key("expert_count"), size(moe.num_local_experts)));
        kv.push((key("expert_used_count"), size(moe.num_experts_per_tok)));
    }
    kv.extend([
        (
            "general.file_type".to_string(),
            Value::U32(target.file_type()),
        ),
        (key("vocab_size"), size(config.vocab_size)),
        (key("rope.dimension_count"), size(config.head_dim())),
        (
            key("attention.scale"),
            Value::F32(config.attention_multiplier),
        ),
        (
            key("embedding_scale"),
            Value::F32(config.embedding_multiplier),
        ),
        (
            key("residual_scale"),
            Value::F32(config.residual_multiplier),
        ),
        (key("logit_scale"), Value::F32(config.logits_scaling)),
    ]);
    kv.extend(vocab.metadata());
    kv.push((
        "general.quantization_version".to_string(),
        Value::U32(QUANTIZATION_VERSION),
    ));
    kv
}

/// `general.size_label` as gguf-py computes it: total weights rounded to at least two significant digits with a
/// K/M/B/T suffix; for MoE `"{experts}x{shared weights + one expert's}"`, e.g. `8x1.6M`.
pub fn size_label(config: &HfConfig, tensors: &[PlannedTensor]) -> String {
    let experts = config.moe.map_or(0, |m| m.num_local_experts as u64);
    let (mut shared, mut per_expert) = (0u64, 0u64);
    for t in tensors {
        if experts > 0 && t.name.contains("_exps.") {
            per_expert += t.n_elements() / experts;
        } else {
            shared += t.n_elements();
        }
    }
    let rounded = rounded_count(shared + per_expert);
    if experts > 0 {
        format!("{experts}x{rounded}")
    } else {
        rounded
    }
}

/// gguf-py's `model_weight_count_rounded_notation(n, min_digits=2)`.
fn rounded_count(n: u64) -> String {
    let n = n as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    // Python: len(str(round(scaled)).lstrip('0')), with round() taking halves to even.
    let integer_digits = match scaled.round_ties_even() as u64 {
        0 => 0,
        whole => whole.to_string().len(),
    };
    let decimals = 2usize.saturating_sub(integer_digits);
    format!("{scaled:.decimals$}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounded_counts_match_gguf_py() {
        assert_eq!(rounded_count(1_585_920), "1.6M");
        assert_eq!(rounded_count(891_904), "892K");
        assert_eq!(rounded_count(1_330_000_000), "1.3B");
        assert_eq!(rounded_count(400), "0.40K");
        assert_eq!(rounded_count(12_000_000), "12M");
    }
}
