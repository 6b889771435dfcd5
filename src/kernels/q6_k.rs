//! Q6_K weights (16 groups of 16 six-bit quants with signed 8-bit scales per 256, offset 32) against
//! Q8_K-quantized activations: the scalar reference. The SIMD versions are in `portable.rs` and `x86/`.

use quarry_quantize::blocks::{BlockQ6K, BlockQ8K};

/// Reference dot product: per block the exact integer sum of `scale_g * (q - 32) * a` over the 16 groups, then
/// `d * da * sum` in f32. Equal to `sum(scale_g * q * a) - 32 * sum(scale_g * bsum_g)`, the form SIMD versions
/// use to keep the quants unsigned.
pub fn dot_scalar(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (bw, ba) in w.iter().zip(a) {
        let mut isum = 0i32;
        for (g, &scale) in bw.scales.iter().enumerate() {
            let group: i32 = (16 * g..16 * g + 16)
                .map(|i| (bw.quant(i) as i32 - 32) * ba.qs[i] as i32)
                .sum();
            isum += scale as i32 * group;
        }
        sum += bw.d.to_f32() * ba.d * isum as f32;
    }
    sum
}
