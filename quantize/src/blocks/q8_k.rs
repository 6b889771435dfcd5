//! Q8_K: the activation format the k-quant dot products multiply with (never stored in model files). 256 values,
//! one f32 scale, 256 signed bytes, and the sums of each 16 quants.

use bytemuck::{Pod, Zeroable};

use super::kquant::nearest_int;
use super::{QK_K, check_block_lengths};

/// One Q8_K block as ggml lays it out (`block_q8_K`), 292 bytes:
///
/// ```text
/// offset   0..4    d      f32 scale (not f16: activations vary too much within a row)
/// offset   4..260  qs     i8 quants, value[i] = d * qs[i]
/// offset 260..292  bsums  i16 sum of qs[16*j .. 16*j + 16] for j = 0..16
/// ```
///
/// `bsums` let a Q4_K/Q5_K dot product apply the per-group mins without touching the quants again
/// (`sum(x * (d*sc*q - dmin*m)) = d*sc*sum(x*q) - dmin*m*sum(x)` per group), and Q6_K fold its `- 32` offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);
const _: () = assert!(std::mem::align_of::<BlockQ8K>() == 4);

/// ggml's `quantize_row_q8_K_ref`, which is also what ggml-cpu's `quantize_row_q8_K` runs on x86-64 and ARM (it
/// has no SIMD version there, unlike Q8_0), so activations quantized with this function are exactly llama.cpp's.
///
/// The signed value of largest magnitude (the first on ties) gets quant -127 with `iscale = -127 / max`; every
/// quant is `min(127, nearest_int(iscale * x))` (half to even), `d = 1 / iscale` stays f32. An all-zero block
/// gets `d = 0`, zero quants and zero sums (ggml leaves the sums of such a block unwritten; zero is their value).
///
/// Panics if `x.len() != out.len() * 256`.
pub fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    check_block_lengths("Q8_K", x.len(), out.len(), QK_K);
    for (values, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut max = 0.0f32;
        let mut amax = 0.0f32;
        for &v in values {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *block = BlockQ8K::zeroed();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in block.qs.iter_mut().zip(values) {
            // -127..=127 for finite input; `as i8` wraps like C's conversion otherwise.
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (sum, group) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = group.iter().map(|&q| i16::from(q)).sum();
        }
        block.d = 1.0 / iscale;
    }
}

/// ggml's `dequantize_row_q8_K`: `d * q` in f32.
///
/// Panics if `out.len() != blocks.len() * 256`.
pub fn dequantize_q8_k(blocks: &[BlockQ8K], out: &mut [f32]) {
    check_block_lengths("Q8_K", out.len(), blocks.len(), QK_K);
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        for (v, &q) in values.iter_mut().zip(&block.qs) {
            *v = block.d * f32::from(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_magnitude_maps_to_minus_127_and_sums_match() {
        let mut x = [0.0f32; 256];
        x[5] = 2.0;
        x[6] = -2.0; // a tie: the first (positive) one decides the sign of iscale
        x[17] = 1.0;
        let mut b = [BlockQ8K::zeroed()];
        quantize_q8_k(&x, &mut b);
        assert_eq!((b[0].qs[5], b[0].qs[6], b[0].qs[17]), (-127, 127, -64)); // -63.5 -> -64 (half to even)
        assert_eq!(b[0].d, 1.0 / (-127.0 / 2.0));
        assert_eq!(b[0].bsums[0], 0);
        assert_eq!(b[0].bsums[1], -64);
    }
}
