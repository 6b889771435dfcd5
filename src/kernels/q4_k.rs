//! Q4_K weights (8 groups of 32 four-bit quants with 6-bit scales and mins per 256) against Q8_K-quantized
//! activations: the scalar reference. The SIMD versions are in `portable.rs` and `x86/`.

use quarry_quantize::blocks::{BlockQ4K, BlockQ8K};

/// Reference dot product. Per block two exact integer sums: the quants times the activation bytes weighted by
/// the group scales, and the group mins times the activation group sums (`bsums`, so the `- dmin * m` term
/// never touches the quants), then `d * da * dots - dmin * da * mins` in f32.
pub fn dot_scalar(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (bw, ba) in w.iter().zip(a) {
        let (mut dots, mut mins) = (0i32, 0i32);
        for c in 0..4 {
            let (sc_lo, m_lo) = bw.scale_min(2 * c);
            let (sc_hi, m_hi) = bw.scale_min(2 * c + 1);
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let byte = bw.qs[32 * c + l];
                lo += (byte & 0x0f) as i32 * ba.qs[64 * c + l] as i32;
                hi += (byte >> 4) as i32 * ba.qs[64 * c + 32 + l] as i32;
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

/// The 6-bit scales and mins of a Q4_K/Q5_K block, one byte per group (byte `g` of each word is group `g`): the
/// layout of `BlockQ4K::scales` undone on three words at once instead of per group.
#[inline(always)]
pub(crate) fn q4k_scales_mins(p: &[u8; 12]) -> (u64, u64) {
    let lo = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
    let mid = u32::from_le_bytes([p[4], p[5], p[6], p[7]]);
    let hi = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    let sc_hi = (hi & 0x0f0f_0f0f) | ((lo >> 2) & 0x3030_3030);
    let m_hi = ((hi >> 4) & 0x0f0f_0f0f) | ((mid >> 2) & 0x3030_3030);
    (
        (lo & 0x3f3f_3f3f) as u64 | (sc_hi as u64) << 32,
        (mid & 0x3f3f_3f3f) as u64 | (m_hi as u64) << 32,
    )
}
