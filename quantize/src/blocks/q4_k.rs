//! Q4_K: 256 weights in 144 bytes (4.5 bits per weight). Eight groups of 32 weights, each with its own 6-bit scale
//! and 6-bit min; weight = `d * scale_j * q - dmin * min_j` with `q` in 0..=15.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::kquant::{quantize_asymmetric_block, unpack_scale_min};
use super::{QK_K, check_block_lengths};

/// One Q4_K block as ggml lays it out (`block_q4_K`), little-endian:
///
/// ```text
/// offset   0..2    d       f16  super-scale of the 6-bit group scales
/// offset   2..4    dmin    f16  super-scale of the 6-bit group mins
/// offset   4..16   scales  8 scales + 8 mins, 6 bits each (see `scale_min`)
/// offset  16..144  qs      4-bit quants: byte 32*c + l holds weight 64*c + l in its low nibble and
///                          weight 64*c + 32 + l in its high nibble (c = 0..4, l = 0..32)
/// ```
///
/// Group `j` (weights `32*j .. 32*j + 32`) dequantizes as `f32(d) * sc_j * q - f32(dmin) * m_j`, each product and
/// the difference rounded in f32 (`dequantize_row_q4_K`). 4.5 bits per weight: 4 for the quant, 0.375 for the
/// group scale and min, and the two f16 per 256.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    /// Scales and mins of the eight groups, packed as ggml's `get_scale_min_k4` reads them: bytes 0..4 are scales
    /// 0..4 (low 6 bits), bytes 4..8 mins 0..4; byte 8 + k holds the low nibbles of scale 4 + k (low) and min
    /// 4 + k (high), whose two high bits are the top bits of bytes k and 4 + k.
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::align_of::<BlockQ4K>() == 2);

impl BlockQ4K {
    /// The 6-bit scale and min of group `j` (0..8), as ggml's `get_scale_min_k4`.
    ///
    /// Panics if `j >= 8`.
    #[inline]
    pub fn scale_min(&self, j: usize) -> (u8, u8) {
        assert!(j < 8, "Q4_K has 8 groups");
        unpack_scale_min(j, &self.scales)
    }
}

/// ggml's `quantize_row_q4_K_ref`: what `llama-quantize` writes for Q4_K tensors when no importance matrix is given
/// (`quantize_q4_K` calls it directly in that case).
///
/// Per group of 32 a min/scale fit (`make_qkx2_quants` with 15 levels, weights `rms(group) + |x|`, 21 candidate
/// scales), then the group scales and mins are quantized to 6 bits relative to the largest of each (`d` and `dmin`
/// are those largest divided by 63, rounded to f16), and finally every quant is recomputed as
/// `nearest_int((x + dmin*m) / (d*sc))` with the stored values, so rounding of the scales is compensated. A group
/// whose stored scale is 0 keeps the quants of its fit. Bit-for-bit as the C code on x86-64 (see
/// `blocks::kquant` for the float rules).
///
/// Panics if `x.len() != out.len() * 256`.
pub fn quantize_q4_k(x: &[f32], out: &mut [BlockQ4K]) {
    check_block_lengths("Q4_K", x.len(), out.len(), QK_K);
    for (values, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (d, dmin, scales, l) = quantize_asymmetric_block(values, 15, -1.0, 20);
        block.d = d;
        block.dmin = dmin;
        block.scales = scales;
        for (c, bytes) in block.qs.chunks_exact_mut(32).enumerate() {
            for (i, byte) in bytes.iter_mut().enumerate() {
                *byte = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
            }
        }
    }
}

/// ggml's `dequantize_row_q4_K`.
///
/// Panics if `out.len() != blocks.len() * 256`.
pub fn dequantize_q4_k(blocks: &[BlockQ4K], out: &mut [f32]) {
    check_block_lengths("Q4_K", out.len(), blocks.len(), QK_K);
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = block.d.to_f32();
        let dmin = block.dmin.to_f32();
        for (c, (bytes, values)) in block
            .qs
            .chunks_exact(32)
            .zip(values.chunks_exact_mut(64))
            .enumerate()
        {
            let (sc1, m1) = block.scale_min(2 * c);
            let (sc2, m2) = block.scale_min(2 * c + 1);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            let (low, high) = values.split_at_mut(32);
            for ((&byte, lo), hi) in bytes.iter().zip(low).zip(high) {
                *lo = d1 * (byte & 0x0F) as f32 - m1;
                *hi = d2 * (byte >> 4) as f32 - m2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_give_a_zero_block() {
        let x = [0.0f32; 256];
        let mut b = [BlockQ4K::zeroed()];
        quantize_q4_k(&x, &mut b);
        assert_eq!(b[0], BlockQ4K::zeroed());
        let mut back = [1.0f32; 256];
        dequantize_q4_k(&b, &mut back);
        assert!(back.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn a_ramp_is_reproduced_closely() {
        let x: Vec<f32> = (0..256).map(|i| (i as f32 - 100.0) / 64.0).collect();
        let mut b = [BlockQ4K::zeroed()];
        quantize_q4_k(&x, &mut b);
        let mut back = [0.0f32; 256];
        dequantize_q4_k(&b, &mut back);
        for (i, (a, b)) in x.iter().zip(&back).enumerate() {
            // All-positive groups have no offset (min is clamped to 0), so their step is up to 2/15; ggml's own
            // largest error on this ramp is 0.0752.
            assert!((a - b).abs() < 0.08, "{i}: {a} vs {b}");
        }
    }
}
