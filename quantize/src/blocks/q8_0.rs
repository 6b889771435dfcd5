//! Q8_0: 32 weights in 34 bytes, one f16 scale and 32 signed bytes; weight = q * d.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::{BLOCK_LEN, check_lengths};

/// One Q8_0 block as ggml lays it out (`block_q8_0`): the scale, then the 32 quants.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// Scale, stored as IEEE binary16.
    pub d: f16,
    /// Quants of weights 0..32 in order.
    pub qs: [i8; BLOCK_LEN],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// ggml's `quantize_row_q8_0_ref`, the quantizer llama-quantize uses for model files.
///
/// Its quirks are kept on purpose so files are byte-identical to llama.cpp's: the scale's reciprocal is taken once
/// and multiplied (dividing by `d` rounds differently), `round` goes half away from zero like C's `roundf`, and
/// the f16 scale is rounded from the f32 one *after* the quants were computed with the f32 value.
///
/// Panics if `x.len() != out.len() * 32`.
pub fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    check_lengths("Q8_0", x.len(), out.len());
    for (values, block) in x.chunks_exact(BLOCK_LEN).zip(out.iter_mut()) {
        let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        for (q, &v) in block.qs.iter_mut().zip(values) {
            // |v * id| <= 127 up to rounding, so the cast never saturates on finite input.
            *q = (v * id).round() as i8;
        }
    }
}

/// ggml's `dequantize_row_q8_0`: each weight is `f32(q) * f32(d)`, exact f16 to f32 conversion.
///
/// Panics if `out.len() != blocks.len() * 32`.
pub fn dequantize_q8_0(blocks: &[BlockQ8_0], out: &mut [f32]) {
    check_lengths("Q8_0", out.len(), blocks.len());
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(BLOCK_LEN)) {
        let d = block.d.to_f32();
        for (v, &q) in values.iter_mut().zip(&block.qs) {
            *v = f32::from(q) * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_away_from_zero_with_unit_scale() {
        // amax 127 gives d = 1 and id = 1 exactly, so the quants are the rounded inputs.
        let mut x = [0.0f32; 32];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = -0.5;
        x[3] = 2.5;
        x[4] = -2.5;
        x[5] = 0.499_999_97;
        let mut b = [BlockQ8_0::zeroed()];
        quantize_q8_0(&x, &mut b);
        assert_eq!(b[0].d, f16::ONE);
        assert_eq!(&b[0].qs[..6], &[127, 1, -1, 3, -3, 0]);
    }
}
