//! Q8_0 weights (32 x i8 + an f16 scale) against Q8_0-quantized activations: the scalar reference. The SIMD
//! versions are in `portable.rs` and `x86/` (one loop structure for both quantized formats there).

use half::f16;
use quarry_quantize::blocks::BlockQ8_0;

/// Quantizes an activation row to Q8_0. Unlike ggml's file quantizer this rounds half to even, which is what
/// the SIMD versions do natively (`cvtps2dq`); only the scalar/SIMD agreement matters for activations.
/// Quants are always in -127..=127; NaN becomes 0.
pub fn quantize_activations_scalar(x: &[f32], out: &mut [BlockQ8_0]) {
    for (xs, block) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            // The clamp only matters when `1 / d` overflows for a block of denormals (and `d` rounds to 0 as
            // f16): it keeps every quant in -127..=127, which the products rely on.
            *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
}

/// Reference dot product: per block, the exact integer sum scaled by both f16 scales.
pub fn dot_scalar(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (bw, ba) in w.iter().zip(a) {
        let isum: i32 = bw
            .qs
            .iter()
            .zip(&ba.qs)
            .map(|(&x, &y)| x as i32 * y as i32)
            .sum();
        sum += bw.d.to_f32() * ba.d.to_f32() * isum as f32;
    }
    sum
}
