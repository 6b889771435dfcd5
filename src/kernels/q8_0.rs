//! Q8_0 weights (32 x i8 + an f16 scale) against Q8_0-quantized activations: the scalar reference. The SIMD
//! versions are in `portable.rs` and `x86/` (one loop structure for both quantized formats there).

use half::f16;
use quarry_quantize::blocks::BlockQ8_0;

/// Quantizes an activation row to Q8_0. Unlike ggml's file quantizer this rounds half to even, which is what
/// the SIMD versions do natively (`cvtps2dq`); only the scalar/SIMD agreement matters for activations.
/// Quants are always in -127..=127; NaN becomes 0.
pub fn quantize_activations_scalar(x: &[f32], out: &mut [BlockQ8_0]) {
    for (xs, block) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            // The clamp only matters when `1 / d` overflows for a block of denormals (and `d` rounds to 0 as
            // f16): it keeps every quant in -127..=127, which the products rely on.
            *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
}

/// Reference dot product: per block, the exact integer sum scaled by both f16 scales.
pub fn dot_scalar(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (bw, ba) in w.iter().zip(a) {
        let isum: i32 = bw
            .qs
            .iter()
            .zip(&ba.qs)
            .map(|(&x, &y)| x as i32 * y as i32)
            .sum();
        sum += bw.d.to_f32() * ba.d.to_f32() * isum as f32;
    }
    sum
}

/// Rows per group of the interleaved layout ([`interleave`]): the model's one group height.
pub const GROUP_ROWS: usize = super::INTERLEAVE_ROWS;

/// Bytes of one group of [`GROUP_ROWS`] rows of `bpr` blocks: as many as the rows take in the file.
pub const fn group_bytes(bpr: usize) -> usize {
    GROUP_ROWS * bpr * size_of::<BlockQ8_0>()
}

/// Rewrites rows of Q8_0 blocks (a multiple of [`GROUP_ROWS`] of them, `bpr` blocks each) into groups of 16
/// rows that a kernel with one vector lane per row loads without rearranging: per group, first the quants of
/// each block in turn (512 bytes: 8 runs of 64, run `k` holding bytes `4k..4k + 4` of rows 0..16, each stored
/// plus 128 as an unsigned byte, the operand `vpdpbusd` takes), then the 16 f16 scales of each block in turn (32
/// bytes). The same number of bytes as the rows, so a share of whole groups is a byte range, as a share of rows is.
///
/// # Panics
/// When `src` is not whole groups of whole rows, or `dst` is not exactly its size.
pub fn interleave(src: &[BlockQ8_0], bpr: usize, dst: &mut [u8]) {
    assert!(bpr > 0 && src.len().is_multiple_of(GROUP_ROWS * bpr));
    assert_eq!(dst.len(), size_of_val(src));
    for (rows, out) in src
        .chunks_exact(GROUP_ROWS * bpr)
        .zip(dst.chunks_exact_mut(group_bytes(bpr)))
    {
        let (qs, scales) = out.split_at_mut(bpr * 512);
        // Written in order, 16 rows read at a time.
        for (b, (q, d)) in qs
            .chunks_exact_mut(512)
            .zip(scales.chunks_exact_mut(32))
            .enumerate()
        {
            for r in 0..GROUP_ROWS {
                let blk = &rows[r * bpr + b];
                for (k, run) in q.chunks_exact_mut(64).enumerate() {
                    for (o, &x) in run[4 * r..4 * r + 4]
                        .iter_mut()
                        .zip(&blk.qs[4 * k..4 * k + 4])
                    {
                        *o = x as u8 ^ 0x80;
                    }
                }
                d[2 * r..2 * r + 2].copy_from_slice(&blk.d.to_bits().to_le_bytes());
            }
        }
    }
}

/// Block `b` of row `r` of an interleaved matrix: [`interleave`] undone.
pub fn interleaved_block(data: &[u8], bpr: usize, r: usize, b: usize) -> BlockQ8_0 {
    let group = &data[r / GROUP_ROWS * group_bytes(bpr)..][..group_bytes(bpr)];
    let i = r % GROUP_ROWS;
    let mut qs = [0i8; 32];
    for k in 0..8 {
        let o = b * 512 + k * 64 + i * 4;
        for (q, &x) in qs[4 * k..4 * k + 4].iter_mut().zip(&group[o..o + 4]) {
            *q = (x ^ 0x80) as i8;
        }
    }
    let o = bpr * 512 + b * 32 + i * 2;
    BlockQ8_0 {
        d: f16::from_bits(u16::from_le_bytes([group[o], group[o + 1]])),
        qs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block comes back from where `interleave` put it, scale and quants (-128 and 127 included).
    #[test]
    fn interleaving_moves_every_byte_and_loses_none() {
        for bpr in [1, 3, 32] {
            let rows = 32;
            let blocks: Vec<BlockQ8_0> = (0..rows * bpr)
                .map(|i| BlockQ8_0 {
                    d: f16::from_bits(i as u16 ^ 0x3c00),
                    qs: std::array::from_fn(|j| (i * 31 + j * 7) as u8 as i8),
                })
                .collect();
            let mut packed = vec![0u8; size_of_val(blocks.as_slice())];
            interleave(&blocks, bpr, &mut packed);
            for r in 0..rows {
                for b in 0..bpr {
                    let got = interleaved_block(&packed, bpr, r, b);
                    let want = blocks[r * bpr + b];
                    assert_eq!(
                        (got.d.to_bits(), got.qs),
                        (want.d.to_bits(), want.qs),
                        "row {r}, block {b}"
                    );
                }
            }
        }
    }
}
