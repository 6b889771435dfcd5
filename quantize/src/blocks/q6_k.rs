//! Q6_K: 256 weights in 210 bytes (6.5625 bits per weight). Sixteen groups of 16 weights, each with a signed 8-bit
//! scale; weight = `d * scale_j * (q - 32)` with `q` in 0..=63.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::kquant::{GROUP_MAX_EPS, make_qx_quants, nearest_int};
use super::{QK_K, check_block_lengths};

/// One Q6_K block as ggml lays it out (`block_q6_K`), little-endian. Unlike the other k-quants the scale comes
/// last:
///
/// ```text
/// offset   0..128  ql      low 4 bits. For half h = 0..2 (weights 128*h ..) and l = 0..32:
///                          byte 64*h + l      = low(w[128h + l])      | low(w[128h + 64 + l]) << 4
///                          byte 64*h + 32 + l = low(w[128h + 32 + l]) | low(w[128h + 96 + l]) << 4
/// offset 128..192  qh      high 2 bits: byte 32*h + l holds the high bits of weights 128h + l, + 32, + 64, + 96
///                          at bits 0-1, 2-3, 4-5, 6-7
/// offset 192..208  scales  i8 scale of each 16-weight group (weights 16*j .. 16*j + 16)
/// offset 208..210  d       f16 super-scale
/// ```
///
/// Weight `i` dequantizes as `(f32(d) * scales[i / 16]) * (q - 32)` (two f32 products, in that order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::align_of::<BlockQ6K>() == 2);

impl BlockQ6K {
    /// Quant `i` (0..256) of the block, in 0..=63 (subtract 32 for the signed value).
    ///
    /// Panics if `i >= 256`.
    #[inline]
    pub fn quant(&self, i: usize) -> u8 {
        let (h, r) = (i / 128, i % 128);
        let (quarter, l) = (r / 32, r % 32);
        let low_byte = self.ql[64 * h + 32 * (quarter & 1) + l];
        let low = if quarter < 2 {
            low_byte & 0x0F
        } else {
            low_byte >> 4
        };
        let high = (self.qh[32 * h + l] >> (2 * quarter)) & 3;
        low | (high << 4)
    }
}

/// ggml's `quantize_row_q6_K_ref` (what `llama-quantize` writes for Q6_K without an importance matrix).
///
/// Each 16-weight group gets a symmetric scale from `make_qx_quants` (32 levels each side, weighted by `x^2`);
/// the group scale of largest magnitude (signed, the first on ties) becomes -128 in 8 bits, `d = 1/iscale` is
/// rounded to f16, the others are `min(127, nearest_int(iscale * scale))`, and the quants are recomputed as
/// `nearest_int(x / (d * scale_j))` clamped to -32..=31. A block whose group scales are all below 1e-15 is
/// all zero bytes; a group whose stored scale is 0 keeps the quants of its fit.
///
/// Panics if `x.len() != out.len() * 256`.
pub fn quantize_q6_k(x: &[f32], out: &mut [BlockQ6K]) {
    check_block_lengths("Q6_K", x.len(), out.len(), QK_K);
    for (values, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut l = [0u8; QK_K];
        let mut scales = [0.0f32; QK_K / 16];
        let mut max_scale = 0.0f32;
        let mut max_abs_scale = 0.0f32;
        for (ib, group) in values.chunks_exact(16).enumerate() {
            let scale = make_qx_quants(32, group, &mut l[16 * ib..16 * ib + 16]);
            scales[ib] = scale;
            if scale.abs() > max_abs_scale {
                max_abs_scale = scale.abs();
                max_scale = scale;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            *block = BlockQ6K::zeroed();
            continue;
        }
        let iscale = -128.0 / max_scale;
        block.d = f16::from_f32(1.0 / iscale);
        for (stored, &scale) in block.scales.iter_mut().zip(&scales) {
            // In range -128..=127 for finite input; `as i8` wraps like C's conversion otherwise.
            *stored = nearest_int(iscale * scale).min(127) as i8;
        }
        let d = block.d.to_f32();
        for (j, group) in values.chunks_exact(16).enumerate() {
            let dj = d * block.scales[j] as f32;
            if dj == 0.0 {
                continue;
            }
            for (q, &v) in l[16 * j..16 * j + 16].iter_mut().zip(group) {
                *q = (nearest_int(v / dj).clamp(-32, 31) + 32) as u8;
            }
        }
        for h in 0..2 {
            let l = &l[128 * h..128 * h + 128];
            for i in 0..32 {
                let (q1, q2, q3, q4) = (l[i], l[i + 32], l[i + 64], l[i + 96]);
                block.ql[64 * h + i] = (q1 & 0x0F) | ((q3 & 0x0F) << 4);
                block.ql[64 * h + 32 + i] = (q2 & 0x0F) | ((q4 & 0x0F) << 4);
                block.qh[32 * h + i] =
                    (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
    }
}

/// ggml's `dequantize_row_q6_K`.
///
/// Panics if `out.len() != blocks.len() * 256`.
pub fn dequantize_q6_k(blocks: &[BlockQ6K], out: &mut [f32]) {
    check_block_lengths("Q6_K", out.len(), blocks.len(), QK_K);
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = block.d.to_f32();
        for (i, v) in values.iter_mut().enumerate() {
            let q = block.quant(i) as i32 - 32;
            *v = d * block.scales[i / 16] as f32 * q as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_and_tiny_values_give_an_all_zero_block() {
        for v in [0.0f32, -0.0, 1e-20] {
            let x = [v; 256];
            let mut b = [BlockQ6K::zeroed()];
            b[0].ql[3] = 7;
            quantize_q6_k(&x, &mut b);
            assert_eq!(b[0], BlockQ6K::zeroed(), "{v}");
        }
    }

    #[test]
    fn quants_round_trip_through_the_packing() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 64) as f32 - 32.0) * 0.25)
            .collect();
        let mut b = [BlockQ6K::zeroed()];
        quantize_q6_k(&x, &mut b);
        let mut back = [0.0f32; 256];
        dequantize_q6_k(&b, &mut back);
        for (i, (a, b)) in x.iter().zip(&back).enumerate() {
            assert!((a - b).abs() < 0.2, "{i}: {a} vs {b}"); // a step is about 8/32
        }
    }
}
