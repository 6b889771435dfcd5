//! The f32 operations around the matrix products: normalisation, rotary embedding, softmax, SiLU.

/// RMSNorm as Granite computes it: `x / sqrt(mean(x^2) + eps)`, then times the learned weight.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// Rotary embedding on adjacent pairs `(2i, 2i + 1)` of each head: the GGUF converter permuted the Q/K rows so
/// that this equals Hugging Face's rotate-half pairing `(i, i + head_dim / 2)`.
/// `cos_sin` holds `(cos, sin)` of `position * inv_freq[i]` for each pair `i`.
pub fn rope_adjacent_pairs(x: &mut [f32], head_dim: usize, cos_sin: &[(f32, f32)]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(cos_sin) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = a * sin + b * cos;
        }
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `gate <- silu(gate) * up`, the SwiGLU combination of both the dense MLP and every expert.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}
