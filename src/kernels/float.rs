//! Unquantized weights (F32, F16, BF16) against f32 activations: the exact path the fixtures' 1e-3 logits
//! tolerance is checked on, so activations are not rounded.

use half::{bf16, f16};

pub fn dot_f32_scalar(w: &[f32], x: &[f32]) -> f32 {
    // Four partial sums: fewer dependent adds (the SIMD sets use 8 or 16 lanes and agree to rounding).
    let mut acc = [0.0f32; 4];
    let chunks = w.len() / 4 * 4;
    for (wc, xc) in w[..chunks].chunks_exact(4).zip(x[..chunks].chunks_exact(4)) {
        for i in 0..4 {
            acc[i] += wc[i] * xc[i];
        }
    }
    let mut sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (a, b) in w[chunks..].iter().zip(&x[chunks..]) {
        sum += a * b;
    }
    sum
}

/// `y += alpha * x`.
pub fn axpy_f32_scalar(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (acc, &v) in y.iter_mut().zip(x) {
        *acc += alpha * v;
    }
}

pub fn dot_f16_scalar(w: &[f16], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
}

pub fn dot_bf16_scalar(w: &[bf16], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
}
