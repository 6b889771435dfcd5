//! Q5_K weights (Q4_K's groups, scales and mins with a fifth quant bit) against Q8_K-quantized activations: the
//! scalar reference. The SIMD versions are in `portable.rs` and `x86/`.

use quarry_quantize::blocks::{BlockQ5K, BlockQ8K};

/// Reference dot product, as [`super::q4_k::dot_scalar`] with quants `low | high << 4` in 0..=31: bit `2c` of
/// `qh[l]` is the high bit of weight `64c + l`, bit `2c + 1` that of weight `64c + 32 + l`.
pub fn dot_scalar(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (bw, ba) in w.iter().zip(a) {
        let (mut dots, mut mins) = (0i32, 0i32);
        for c in 0..4 {
            let (sc_lo, m_lo) = bw.scale_min(2 * c);
            let (sc_hi, m_hi) = bw.scale_min(2 * c + 1);
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let (byte, h) = (bw.qs[32 * c + l], bw.qh[l] >> (2 * c));
                let q_lo = (byte & 0x0f) | ((h & 1) << 4);
                let q_hi = (byte >> 4) | (((h >> 1) & 1) << 4);
                lo += q_lo as i32 * ba.qs[64 * c + l] as i32;
                hi += q_hi as i32 * ba.qs[64 * c + 32 + l] as i32;
            }
            dots += sc_lo as i32 * lo + sc_hi as i32 * hi;
            let bs = &ba.bsums[4 * c..4 * c + 4];
            mins += m_lo as i32 * (bs[0] as i32 + bs[1] as i32)
                + m_hi as i32 * (bs[2] as i32 + bs[3] as i32);
        }
        sum += bw.d.to_f32() * ba.d * dots as f32 - bw.dmin.to_f32() * ba.d * mins as f32;
    }
    sum
}
