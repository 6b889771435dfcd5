//! IQ4_NL weights (32 nibbles indexing 16 non-linear levels + an f16 scale) against Q8_0-quantized activations:
//! the scalar reference. The block has Q4_0's layout with a lookup in place of Q4_0's `- 8`, so the SIMD sets
//! run it on Q4_0's machinery: the nibbles looked up (`pshufb`) as `level + 128`, unsigned, and corrected by
//! `-128 * sum(activation block)` as Q8_0 is; AVX2 without VNNI moves the level's sign onto the activation.

use quarry_quantize::blocks::{BlockIQ4NL, BlockQ4_0, BlockQ8_0, IQ4_VALUES};

/// Reference dot product. Byte j of a block holds weight j's level (low nibble) and weight j + 16's (high).
pub fn dot_scalar(w: &[BlockIQ4NL], a: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (bw, ba) in w.iter().zip(a) {
        let mut isum = 0i32;
        for j in 0..16 {
            let lo = IQ4_VALUES[(bw.qs[j] & 0x0f) as usize] as i32;
            let hi = IQ4_VALUES[(bw.qs[j] >> 4) as usize] as i32;
            isum += lo * ba.qs[j] as i32 + hi * ba.qs[j + 16] as i32;
        }
        sum += bw.d.to_f32() * ba.d.to_f32() * isum as f32;
    }
    sum
}

/// [`super::q4_0::interleave`] on IQ4_NL rows: the blocks are laid out alike, nibbles and scale.
pub fn interleave(src: &[BlockIQ4NL], bpr: usize, dst: &mut [u8]) {
    super::q4_0::interleave(as_q4_0(src), bpr, dst)
}

/// IQ4_NL blocks as Q4_0 blocks of the same bytes, for the layout code the two share.
pub fn as_q4_0(blocks: &[BlockIQ4NL]) -> &[BlockQ4_0] {
    bytemuck::cast_slice(blocks)
}

/// The 16 levels as `level + 128`, unsigned: the bytes the VNNI sets multiply.
pub(crate) const LEVELS_PLUS_128: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (IQ4_VALUES[i] as i16 + 128) as u8;
        i += 1;
    }
    t
};
