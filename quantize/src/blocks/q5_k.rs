//! Q5_K: 256 weights in 176 bytes (5.5 bits per weight). Q4_K's groups, scales and mins with a fifth quant bit;
//! weight = `d * scale_j * q - dmin * min_j` with `q` in 0..=31.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::kquant::{quantize_asymmetric_block, unpack_scale_min};
use super::{QK_K, check_block_lengths};

/// One Q5_K block as ggml lays it out (`block_q5_K`), little-endian:
///
/// ```text
/// offset   0..2    d       f16  super-scale of the 6-bit group scales
/// offset   2..4    dmin    f16  super-scale of the 6-bit group mins
/// offset   4..16   scales  8 scales + 8 mins, 6 bits each, packed as in Q4_K
/// offset  16..48   qh      high (fifth) bits: bit 2c of byte l is the high bit of weight 64*c + l,
///                          bit 2c + 1 that of weight 64*c + 32 + l (c = 0..4, l = 0..32)
/// offset  48..176  qs      low 4 bits, arranged exactly like Q4_K's quants
/// ```
///
/// Group `j` dequantizes as `f32(d) * sc_j * q - f32(dmin) * m_j` with `q = low | high << 4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    /// As [`BlockQ4K::scales`](super::BlockQ4K::scales).
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::align_of::<BlockQ5K>() == 2);

impl BlockQ5K {
    /// The 6-bit scale and min of group `j` (0..8), as ggml's `get_scale_min_k4`.
    ///
    /// Panics if `j >= 8`.
    #[inline]
    pub fn scale_min(&self, j: usize) -> (u8, u8) {
        assert!(j < 8, "Q5_K has 8 groups");
        unpack_scale_min(j, &self.scales)
    }
}

/// ggml's `quantize_row_q5_K_ref` (what `llama-quantize` writes for Q5_K without an importance matrix): Q4_K's
/// algorithm with 31 levels and 16 candidate scales (`rmin = -0.5`, `nstep = 15`).
///
/// Panics if `x.len() != out.len() * 256`.
pub fn quantize_q5_k(x: &[f32], out: &mut [BlockQ5K]) {
    check_block_lengths("Q5_K", x.len(), out.len(), QK_K);
    for (values, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (d, dmin, scales, l) = quantize_asymmetric_block(values, 31, -0.5, 15);
        block.d = d;
        block.dmin = dmin;
        block.scales = scales;
        block.qh = [0; QK_K / 8];
        for (c, bytes) in block.qs.chunks_exact_mut(32).enumerate() {
            for (i, byte) in bytes.iter_mut().enumerate() {
                let (q1, q2) = (l[64 * c + i], l[64 * c + 32 + i]);
                block.qh[i] |= ((q1 >> 4) << (2 * c)) | ((q2 >> 4) << (2 * c + 1));
                *byte = (q1 & 0x0F) | ((q2 & 0x0F) << 4);
            }
        }
    }
}

/// ggml's `dequantize_row_q5_K`.
///
/// Panics if `out.len() != blocks.len() * 256`.
pub fn dequantize_q5_k(blocks: &[BlockQ5K], out: &mut [f32]) {
    check_block_lengths("Q5_K", out.len(), blocks.len(), QK_K);
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
            for (i, (lo, hi)) in low.iter_mut().zip(high).enumerate() {
                let (byte, h) = (bytes[i], block.qh[i] >> (2 * c));
                let q1 = (byte & 0x0F) | ((h & 1) << 4);
                let q2 = (byte >> 4) | (((h >> 1) & 1) << 4);
                *lo = d1 * q1 as f32 - m1;
                *hi = d2 * q2 as f32 - m2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ramp_is_reproduced_closely_and_uses_the_fifth_bit() {
        let x: Vec<f32> = (0..256).map(|i| (i as f32 - 100.0) / 64.0).collect();
        let mut b = [BlockQ5K::zeroed()];
        quantize_q5_k(&x, &mut b);
        assert!(b[0].qh.iter().any(|&h| h != 0));
        let mut back = [0.0f32; 256];
        dequantize_q5_k(&b, &mut back);
        for (i, (a, b)) in x.iter().zip(&back).enumerate() {
            // All-positive groups have no offset (min is clamped to 0), so their step is up to 1.6/31.
            assert!((a - b).abs() < 0.035, "{i}: {a} vs {b}");
        }
    }
}
