//! Q4_0: 32 weights in 18 bytes, one f16 scale and 16 bytes of 4-bit quants; weight = (q - 8) * d.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::{BLOCK_LEN, check_lengths};

/// One Q4_0 block as ggml lays it out (`block_q4_0`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ4_0 {
    /// Scale, stored as IEEE binary16 (negative when the block's largest-magnitude weight is positive).
    pub d: f16,
    /// Byte `j` holds weight `j` in its low nibble and weight `j + 16` in its high nibble.
    pub qs: [u8; BLOCK_LEN / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

/// ggml's `quantize_row_q4_0_ref`, the quantizer llama-quantize uses for model files.
///
/// The scale comes from the signed weight of largest magnitude (the first one on ties), divided by -8, so that
/// weight lands exactly on quant 0 and the full 16 levels are used. Kept exactly as ggml computes it so files are
/// byte-identical: `x * id` and `+ 8.5` are two separately rounded f32 operations (never `mul_add`; fusing them
/// changes about one block in 230 of bf16-valued weights), truncation then clamps to 15. An all-zero block gets
/// `d = +0.0 / -8 = -0.0`, as in ggml's C code, whatever the sign of its zeros.
///
/// Panics if `x.len() != out.len() * 32`.
pub fn quantize_q4_0(x: &[f32], out: &mut [BlockQ4_0]) {
    check_lengths("Q4_0", x.len(), out.len());
    for (values, block) in x.chunks_exact(BLOCK_LEN).zip(out.iter_mut()) {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in values {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        let (low, high) = values.split_at(BLOCK_LEN / 2);
        for ((byte, &lo), &hi) in block.qs.iter_mut().zip(low).zip(high) {
            *byte = nibble(lo * id) | (nibble(hi * id) << 4);
        }
    }
}

/// `MIN(15, (int8_t)(scaled + 8.5f))` from ggml. `scaled` lies in [-8, 8] for finite input, so the sum is
/// positive and truncation is a floor; the clamp at 0 only guards against NaN-free but out-of-contract input.
fn nibble(scaled: f32) -> u8 {
    let shifted = scaled + 8.5;
    (shifted as i32).clamp(0, 15) as u8
}

/// ggml's `dequantize_row_q4_0`: weight = `f32(nibble - 8) * f32(d)`.
///
/// Panics if `out.len() != blocks.len() * 32`.
pub fn dequantize_q4_0(blocks: &[BlockQ4_0], out: &mut [f32]) {
    check_lengths("Q4_0", out.len(), blocks.len());
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(BLOCK_LEN)) {
        let d = block.d.to_f32();
        let (low, high) = values.split_at_mut(BLOCK_LEN / 2);
        for ((&byte, lo), hi) in block.qs.iter().zip(low).zip(high) {
            *lo = f32::from(i16::from(byte & 0x0F) - 8) * d;
            *hi = f32::from(i16::from(byte >> 4) - 8) * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_magnitude_maps_to_zero_and_its_negation_clamps() {
        let mut x = [0.0f32; 32];
        x[0] = 8.0; // d = -1, id = -1: 8 -> -8 + 8.5 -> 0
        x[1] = -8.0; // -> 16.5 -> 16 -> clamped to 15
        x[16] = 0.5; // -> -0.5 + 8.5 = 8
        let mut b = [BlockQ4_0::zeroed()];
        quantize_q4_0(&x, &mut b);
        assert_eq!(b[0].d, f16::from_f32(-1.0));
        assert_eq!(b[0].qs[0], 0x80);
        assert_eq!(b[0].qs[1] & 0x0F, 15);
    }

    #[test]
    fn all_zero_block_has_negative_zero_scale() {
        let mut x = [0.0f32; 32];
        x[0] = -0.0;
        let mut b = [BlockQ4_0::zeroed()];
        quantize_q4_0(&x, &mut b);
        assert_eq!(b[0].d.to_bits(), 0x8000);
        assert!(b[0].qs.iter().all(|&q| q == 0x88));
    }
}
