//! Q4_0 weights (32 nibbles + an f16 scale, offset 8) against Q8_0-quantized activations: the scalar reference.
//! The SIMD versions are in `portable.rs` and `x86/`.

use quarry_quantize::blocks::{BlockQ4_0, BlockQ8_0};

/// Reference dot product. Byte j of a Q4_0 block holds weight j (low nibble) and weight j + 16 (high nibble).
pub fn dot_scalar(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (bw, ba) in w.iter().zip(a) {
        let mut isum = 0i32;
        for j in 0..16 {
            let lo = (bw.qs[j] & 0x0f) as i32 - 8;
            let hi = (bw.qs[j] >> 4) as i32 - 8;
            isum += lo * ba.qs[j] as i32 + hi * ba.qs[j + 16] as i32;
        }
        sum += bw.d.to_f32() * ba.d.to_f32() * isum as f32;
    }
    sum
}
