//! The f32 operations around the matrix products: normalisation, rotary embedding, softmax, SiLU.
//!
//! Vectorised with `wide` (SSE2 / NEON chosen at compile time: these passes touch a few KiB per token, so the
//! width matters less than not calling libm's `expf` once per element). The `*_scalar` functions are the
//! references they are tested against: `rope_adjacent_pairs` gives their exact bits, `rms_norm` differs only in
//! the summation order of the mean square, `softmax` and `silu_mul` use a polynomial `exp` within about 2 ulp
//! of `f32::exp`, which keeps their results within 1e-6 relative of the references.

use wide::{f32x8, i32x8};

fn load8(x: &[f32]) -> f32x8 {
    f32x8::new(x[..8].try_into().unwrap())
}

fn store8(x: &mut [f32], v: f32x8) {
    x[..8].copy_from_slice(&v.to_array());
}

/// RMSNorm as Granite computes it: `x / sqrt(mean(x^2) + eps)`, then times the learned weight.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let len = x.len().min(weight.len()).min(out.len());
    let body = len / 8 * 8;
    let mut acc = f32x8::ZERO;
    for i in (0..body).step_by(8) {
        let v = load8(&x[i..]);
        acc = v.mul_add(v, acc);
    }
    let mut sq = acc.reduce_add();
    for v in &x[body..] {
        sq += v * v;
    }
    let scale = 1.0 / (sq / x.len() as f32 + eps).sqrt();
    let sv = f32x8::splat(scale);
    for i in (0..body).step_by(8) {
        store8(&mut out[i..], load8(&x[i..]) * sv * load8(&weight[i..]));
    }
    for i in body..len {
        out[i] = x[i] * scale * weight[i];
    }
}

/// Rotary embedding on adjacent pairs `(2i, 2i + 1)` of each head: the GGUF converter permuted the Q/K rows so
/// that this equals Hugging Face's rotate-half pairing `(i, i + head_dim / 2)`.
/// `cos_sin` holds `(cos, sin)` of `position * inv_freq[i]` for each pair `i`.
///
/// Four pairs at a time as `x * (c, c) + swap(x) * (-s, s)`: the same two rounded products and one rounded sum
/// per value as the scalar formula, so the same bits.
pub fn rope_adjacent_pairs(x: &mut [f32], head_dim: usize, cos_sin: &[(f32, f32)]) {
    let pairs = (head_dim / 2).min(cos_sin.len());
    let body = pairs / 4 * 4;
    for head in x.chunks_exact_mut(head_dim) {
        for p in (0..body).step_by(4) {
            let cs = &cos_sin[p..p + 4];
            let c = f32x8::new(std::array::from_fn(|j| cs[j / 2].0));
            let s = f32x8::new(std::array::from_fn(|j| {
                if j % 2 == 0 {
                    -cs[j / 2].1
                } else {
                    cs[j / 2].1
                }
            }));
            let v = &mut head[2 * p..2 * p + 8];
            let xv = load8(v);
            let sw = f32x8::new(std::array::from_fn(|j| v[j ^ 1]));
            store8(v, xv * c + sw * s);
        }
        for (pair, &(cos, sin)) in head[2 * body..]
            .chunks_exact_mut(2)
            .zip(&cos_sin[body..pairs])
        {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = a * sin + b * cos;
        }
    }
}

/// `e^x` for 8 lanes: `x = n ln2 + r` with |r| <= ln2 / 2 (ln2 split in two so `r` is exact), a degree-6
/// polynomial for `e^r` (the classic Cephes `expf` coefficients, about 1 ulp), and `2^n` applied as two
/// factors so that results near overflow and in the subnormal range are formed without an intermediate
/// overflow. Inputs are clamped to where `e^x` is 0 or infinite anyway.
#[inline]
fn exp8(x: f32x8) -> f32x8 {
    let x = x.max(f32x8::splat(-105.0)).min(f32x8::splat(89.0));
    let magic = f32x8::splat(12_582_912.0);
    let n = (x * f32x8::splat(std::f32::consts::LOG2_E) + magic) - magic;
    let r = x - n * f32x8::splat(0.693_359_4) - n * f32x8::splat(-2.121_944_4e-4);
    let mut p = f32x8::splat(1.987_569_1e-4);
    p = p.mul_add(r, f32x8::splat(1.398_199_9e-3));
    p = p.mul_add(r, f32x8::splat(8.333_452e-3));
    p = p.mul_add(r, f32x8::splat(4.166_579_6e-2));
    p = p.mul_add(r, f32x8::splat(1.666_666_5e-1));
    p = p.mul_add(r, f32x8::splat(0.5));
    let p = p * (r * r) + r + f32x8::splat(1.0);
    let ni = n.round_int();
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let pow = |k: i32x8| -> f32x8 { bytemuck::cast((k + i32x8::splat(127)) << 23) };
    p * pow(n1) * pow(n2)
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let body = x.len() / 8 * 8;
    let mut m = f32x8::splat(f32::NEG_INFINITY);
    for i in (0..body).step_by(8) {
        m = m.max(load8(&x[i..]));
    }
    let max = x[body..]
        .iter()
        .chain(&m.to_array())
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mv = f32x8::splat(max);
    let mut sv = f32x8::ZERO;
    for i in (0..body).step_by(8) {
        let e = exp8(load8(&x[i..]) - mv);
        sv += e;
        store8(&mut x[i..], e);
    }
    let mut sum = sv.reduce_add();
    for v in &mut x[body..] {
        *v = exp1(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    let iv = f32x8::splat(inv);
    for i in (0..body).step_by(8) {
        let v = load8(&x[i..]) * iv;
        store8(&mut x[i..], v);
    }
    for v in &mut x[body..] {
        *v *= inv;
    }
}

/// `exp8` on one value, for tails, so a value's result does not depend on its position.
fn exp1(x: f32) -> f32 {
    exp8(f32x8::splat(x)).to_array()[0]
}

/// `gate <- silu(gate) * up`, the SwiGLU combination of both the dense MLP and every expert.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let len = gate.len().min(up.len());
    let body = len / 8 * 8;
    let one = f32x8::splat(1.0);
    for i in (0..body).step_by(8) {
        let g = load8(&gate[i..]);
        store8(&mut gate[i..], g / (one + exp8(-g)) * load8(&up[i..]));
    }
    for i in body..len {
        let g = gate[i];
        gate[i] = g / (1.0 + exp1(-g)) * up[i];
    }
}

/// The references the vectorised versions are tested against.
pub mod scalar {
    pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = v * scale * w;
        }
    }

    pub fn rope_adjacent_pairs(x: &mut [f32], head_dim: usize, cos_sin: &[(f32, f32)]) {
        for head in x.chunks_exact_mut(head_dim) {
            for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(cos_sin) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos - b * sin;
                pair[1] = a * sin + b * cos;
            }
        }
    }

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

    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    }
}
