//! The f32 operations around the matrix products: normalisation, rotary embedding, softmax, SiLU.
//!
//! Each is written once, in plain Rust shaped for the auto-vectoriser (branch-free element maps; sums and
//! maxima over 16 explicit partial lanes, since LLVM will not reassociate a float reduction by itself), and
//! compiled three times: for the baseline target, with AVX2 + FMA, and with AVX-512. The copy matching the
//! selected kernel set runs (`QUARRY_KERNEL=scalar` runs the `scalar` references below). The arithmetic is the
//! same IEEE operations in every copy (Rust never fuses a multiply and an add by itself), so every copy gives the
//! same bits; against the references, `rope_adjacent_pairs` is bit-identical, `rms_norm` differs in the order
//! of the mean-square sum, and `softmax` / `silu_mul` use a polynomial `exp` within about 2 ulp of `f32::exp`,
//! which keeps them within 1e-6 relative of the references (`tests/kernels.rs`).

use std::sync::OnceLock;

/// RMSNorm as Granite computes it: `x / sqrt(mean(x^2) + eps)`, then times the learned weight.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    (table().rms_norm)(x, weight, eps, out)
}

/// Rotary embedding on adjacent pairs `(2i, 2i + 1)` of each head: the GGUF converter permuted the Q/K rows so
/// that this equals Hugging Face's rotate-half pairing `(i, i + head_dim / 2)`.
/// `cos_sin` holds `(cos, sin)` of `position * inv_freq[i]` for each pair `i`.
pub fn rope_adjacent_pairs(x: &mut [f32], head_dim: usize, cos_sin: &[(f32, f32)]) {
    (table().rope)(x, head_dim, cos_sin)
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    (table().softmax)(x)
}

/// `gate <- silu(gate) * up`, the SwiGLU combination of both the dense MLP and every expert.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    (table().silu_mul)(gate, up)
}

/// One query head attending over `len` cached positions: `scores[s] = scale * q . k_s`, softmax over them, then
/// `out = sum_s p_s v_s`. Keys come transposed (`kt[d * kt_stride + s]`) and values row-major
/// (`v[s * head_dim + d]`), so both loops run along contiguous memory without per-position reductions.
/// `scores` must hold at least `len` values; it is left holding the probabilities.
#[allow(clippy::too_many_arguments)]
pub fn attend_head(
    q: &[f32],
    kt: &[f32],
    kt_stride: usize,
    v: &[f32],
    len: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    (table().attend)(q, kt, kt_stride, v, len, scale, scores, out)
}

type RopeFn = fn(&mut [f32], usize, &[(f32, f32)]);
type AttendFn = fn(&[f32], &[f32], usize, &[f32], usize, f32, &mut [f32], &mut [f32]);

/// One compiled copy of the operations.
#[doc(hidden)]
#[derive(Clone, Copy)]
pub struct Table {
    pub rms_norm: fn(&[f32], &[f32], f32, &mut [f32]),
    pub rope: RopeFn,
    pub softmax: fn(&mut [f32]),
    pub silu_mul: fn(&mut [f32], &[f32]),
    pub attend: AttendFn,
}

const BASELINE: Table = Table {
    rms_norm: body::rms_norm,
    rope: body::rope,
    softmax: body::softmax,
    silu_mul: body::silu_mul,
    attend: body::attend,
};

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| match super::selected().name {
        "scalar" => Table {
            rms_norm: scalar::rms_norm,
            rope: scalar::rope_adjacent_pairs,
            softmax: scalar::softmax,
            silu_mul: scalar::silu_mul,
            attend: scalar::attend_head,
        },
        #[cfg(target_arch = "x86_64")]
        "avx512vnni" => x86::AVX512,
        #[cfg(target_arch = "x86_64")]
        "avx2" | "avxvnni" => x86::AVX2,
        _ => BASELINE,
    })
}

/// The one definition of each operation, inlined into each compiled copy.
mod body {
    /// Partial lanes for sums and maxima: a whole zmm, two ymm, four xmm.
    const L: usize = 16;

    #[inline(always)]
    pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let body = x.len() / L * L;
        let mut acc = [0.0f32; L];
        for c in x[..body].chunks_exact(L) {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v * v;
            }
        }
        let mut sq = pairwise(acc);
        for v in &x[body..] {
            sq += v * v;
        }
        let scale = 1.0 / (sq / x.len() as f32 + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = v * scale * w;
        }
    }

    #[inline(always)]
    pub fn rope(x: &mut [f32], head_dim: usize, cos_sin: &[(f32, f32)]) {
        for head in x.chunks_exact_mut(head_dim) {
            for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(cos_sin) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos - b * sin;
                pair[1] = a * sin + b * cos;
            }
        }
    }

    #[inline(always)]
    pub fn softmax(x: &mut [f32]) {
        let body = x.len() / L * L;
        let mut m = [f32::NEG_INFINITY; L];
        for c in x[..body].chunks_exact(L) {
            for (mi, &v) in m.iter_mut().zip(c) {
                *mi = mi.max(v);
            }
        }
        let max = x[body..]
            .iter()
            .chain(&m)
            .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let mut acc = [0.0f32; L];
        for c in x[..body].chunks_exact_mut(L) {
            for (a, v) in acc.iter_mut().zip(c) {
                *v = exp(*v - max);
                *a += *v;
            }
        }
        let mut sum = pairwise(acc);
        for v in &mut x[body..] {
            *v = exp(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in x.iter_mut() {
            *v *= inv;
        }
    }

    #[inline(always)]
    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp(-*g)) * u;
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        q: &[f32],
        kt: &[f32],
        kt_stride: usize,
        v: &[f32],
        len: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = q.len();
        let scores = &mut scores[..len];
        scores.fill(0.0);
        for (d, &qd) in q.iter().enumerate() {
            let a = qd * scale;
            for (s, &k) in scores
                .iter_mut()
                .zip(&kt[d * kt_stride..d * kt_stride + len])
            {
                *s += a * k;
            }
        }
        softmax(scores);
        // Four positions per pass over `out`: one load and store of `out` per four values instead of per value,
        // which would chain every position's add through a store-to-load round trip.
        out.fill(0.0);
        let v = &v[..len * hd];
        let mut rows = v.chunks_exact(4 * hd);
        let mut probs = scores.chunks_exact(4);
        for (p, r) in (&mut probs).zip(&mut rows) {
            let (r0, rest) = r.split_at(hd);
            let (r1, rest) = rest.split_at(hd);
            let (r2, r3) = rest.split_at(hd);
            for d in 0..hd {
                out[d] += (p[0] * r0[d] + p[1] * r1[d]) + (p[2] * r2[d] + p[3] * r3[d]);
            }
        }
        for (&p, row) in probs
            .remainder()
            .iter()
            .zip(rows.remainder().chunks_exact(hd))
        {
            for (o, &x) in out.iter_mut().zip(row) {
                *o += p * x;
            }
        }
    }

    #[inline(always)]
    fn pairwise(mut a: [f32; L]) -> f32 {
        let mut n = L;
        while n > 1 {
            n /= 2;
            for i in 0..n {
                a[i] += a[i + n];
            }
        }
        a[0]
    }

    /// `e^x`: `x = n ln2 + r` with |r| <= ln2 / 2 (ln2 split in two so `r` is exact), a degree-6 polynomial for
    /// `e^r` (the classic Cephes `expf` coefficients, about 1 ulp), and `2^n` applied as two factors so that
    /// results near overflow and in the subnormal range form without an intermediate overflow. Inputs are
    /// clamped to where `e^x` is 0 or infinite anyway. Branch-free, so loops over it vectorise.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to an integer
        let x = x.clamp(-105.0, 89.0);
        let y = x * std::f32::consts::LOG2_E + MAGIC;
        let n = y - MAGIC;
        // n as an integer, from the bits of y = 1.5 * 2^23 + n (a float-to-int cast would not vectorise:
        // its saturation is done lane by lane).
        let ni = y.to_bits() as i32 - MAGIC.to_bits() as i32;
        let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let mut p = 1.987_569_1e-4;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 0.5;
        let p = p * (r * r) + r + 1.0;
        let n1 = ni >> 1;
        let pow = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
        p * pow(n1) * pow(ni - n1)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Table, body};

    // The `_tf` copies are compiled with the named features. SAFETY (every wrapper): the tables are only chosen
    // in `super::table` when the selected kernel set is the matching x86 set, which `kernels::available` lists
    // only after detecting these features (the avx512vnni set requires AVX-512F, the avx2 / avxvnni sets AVX2
    // and FMA); the bodies are safe code.
    #[target_feature(enable = "avx2,fma")]
    fn rms_norm_avx2(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        body::rms_norm(x, w, eps, out)
    }
    #[target_feature(enable = "avx2,fma")]
    fn rope_avx2(x: &mut [f32], hd: usize, cs: &[(f32, f32)]) {
        body::rope(x, hd, cs)
    }
    #[target_feature(enable = "avx2,fma")]
    fn softmax_avx2(x: &mut [f32]) {
        body::softmax(x)
    }
    #[target_feature(enable = "avx2,fma")]
    fn silu_mul_avx2(g: &mut [f32], u: &[f32]) {
        body::silu_mul(g, u)
    }
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn attend_avx2(
        q: &[f32],
        kt: &[f32],
        ks: usize,
        v: &[f32],
        len: usize,
        sc: f32,
        s: &mut [f32],
        o: &mut [f32],
    ) {
        body::attend(q, kt, ks, v, len, sc, s, o)
    }
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn attend_avx512(
        q: &[f32],
        kt: &[f32],
        ks: usize,
        v: &[f32],
        len: usize,
        sc: f32,
        s: &mut [f32],
        o: &mut [f32],
    ) {
        body::attend(q, kt, ks, v, len, sc, s, o)
    }
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn rms_norm_avx512(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        body::rms_norm(x, w, eps, out)
    }
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn rope_avx512(x: &mut [f32], hd: usize, cs: &[(f32, f32)]) {
        body::rope(x, hd, cs)
    }
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn softmax_avx512(x: &mut [f32]) {
        body::softmax(x)
    }
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn silu_mul_avx512(g: &mut [f32], u: &[f32]) {
        body::silu_mul(g, u)
    }

    pub(super) const AVX2: Table = Table {
        rms_norm: |x, w, eps, out| unsafe { rms_norm_avx2(x, w, eps, out) },
        rope: |x, hd, cs| unsafe { rope_avx2(x, hd, cs) },
        softmax: |x| unsafe { softmax_avx2(x) },
        silu_mul: |g, u| unsafe { silu_mul_avx2(g, u) },
        attend: |q, kt, ks, v, len, sc, s, o| unsafe { attend_avx2(q, kt, ks, v, len, sc, s, o) },
    };

    pub(super) const AVX512: Table = Table {
        rms_norm: |x, w, eps, out| unsafe { rms_norm_avx512(x, w, eps, out) },
        rope: |x, hd, cs| unsafe { rope_avx512(x, hd, cs) },
        softmax: |x| unsafe { softmax_avx512(x) },
        silu_mul: |g, u| unsafe { silu_mul_avx512(g, u) },
        attend: |q, kt, ks, v, len, sc, s, o| unsafe { attend_avx512(q, kt, ks, v, len, sc, s, o) },
    };
}

/// The references the compiled copies are tested against.
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

    /// Attention of one head the textbook way: a dot product per position, softmax, weighted sum of values.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_head(
        q: &[f32],
        kt: &[f32],
        kt_stride: usize,
        v: &[f32],
        len: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = q.len();
        for (s, score) in scores[..len].iter_mut().enumerate() {
            *score = q
                .iter()
                .enumerate()
                .map(|(d, &qd)| qd * kt[d * kt_stride + s])
                .sum::<f32>()
                * scale;
        }
        softmax(&mut scores[..len]);
        out.fill(0.0);
        for (s, &p) in scores[..len].iter().enumerate() {
            for (d, o) in out.iter_mut().enumerate() {
                *o += p * v[s * hd + d];
            }
        }
    }
}

/// Every compiled copy this CPU can run, by name, for the tests and benchmarks (the model uses the free
/// functions above, which run the copy of the selected kernel set).
#[doc(hidden)]
pub fn copies() -> Vec<(&'static str, Table)> {
    #[allow(unused_mut)]
    let mut v = vec![("baseline", BASELINE)];
    #[cfg(target_arch = "x86_64")]
    for k in super::available() {
        match k.name {
            "avx2" => v.push(("avx2", x86::AVX2)),
            "avx512vnni" => v.push(("avx512", x86::AVX512)),
            _ => {}
        }
    }
    v
}
