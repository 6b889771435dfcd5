//! IQ4_XS weights (256-weight super-blocks: an f16 scale, a 6-bit scale per 32 weights, 16-level nibbles)
//! against Q8_0-quantized activations: the scalar reference, and the interleaved layout of AVX-512.
//!
//! The activations are Q8_0, not Q8_K as in ggml: each 32-weight sub-block has its own scale
//! `d * (ls - 32)`, so a Q8_0 block lines up with it and the product is the 32-block products' (exact integer
//! dot per sub-block, scaled by `dw * da`), with the Q4_0/IQ4_NL machinery for the nibbles (levels looked up).
//! Q8_0's per-32 activation scale is also finer than Q8_K's per-256 one.

use bytemuck::Zeroable;
use quarry_quantize::blocks::{BlockIQ4XS, BlockQ8_0, IQ4_VALUES, QK_K};

/// 32-weight sub-blocks per super-block (Q8_0 activation blocks per IQ4_XS block).
pub const SUB_BLOCKS: usize = QK_K / 32;

/// The f32 scale of sub-block `ib` of `w`: `f32(d) * f32(ls - 32)`, exact in f32 (11 + 6 bits).
#[inline]
pub fn sub_scale(w: &BlockIQ4XS, ib: usize) -> f32 {
    w.d.to_f32() * w.scale(ib) as f32
}

/// Reference dot product of one row's super-blocks `w` with `8 * w.len()` activation blocks.
pub fn dot_scalar(w: &[BlockIQ4XS], a: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (bw, acts) in w.iter().zip(a.chunks_exact(SUB_BLOCKS)) {
        for (ib, ba) in acts.iter().enumerate() {
            let qs = &bw.qs[16 * ib..16 * ib + 16];
            let mut isum = 0i32;
            for j in 0..16 {
                let lo = IQ4_VALUES[(qs[j] & 0x0f) as usize] as i32;
                let hi = IQ4_VALUES[(qs[j] >> 4) as usize] as i32;
                isum += lo * ba.qs[j] as i32 + hi * ba.qs[j + 16] as i32;
            }
            sum += sub_scale(bw, ib) * ba.d.to_f32() * isum as f32;
        }
    }
    sum
}

/// Rows per group of the interleaved layout ([`interleave`]): the model's one group height.
pub const GROUP_ROWS: usize = super::INTERLEAVE_ROWS;

/// Bytes of one super-block of a group: 8 sub-blocks of 16 rows' nibbles (256 bytes each), then the 16 rows'
/// headers (128 bytes). As many as the 16 rows' super-blocks take in the file.
pub const GROUP_BLOCK_BYTES: usize = GROUP_ROWS * size_of::<BlockIQ4XS>();

/// Rewrites rows of IQ4_XS super-blocks (a multiple of [`GROUP_ROWS`] rows of `spr` super-blocks each) into
/// groups of 16 rows, super-block after super-block: per super-block, each sub-block's nibbles in the layout of
/// `q4_0::interleave` (4 runs of 64 bytes, run `k` holding bytes `4k..4k + 4` of the sub-block's 16 bytes of
/// rows 0..16), then the 16 `d` (f16), the 16 `scales_h` (u16) and the 16 `scales_l` (4 bytes each). The same
/// bytes in another order: a share of whole groups is a byte range, as a share of rows is.
///
/// # Panics
/// When `src` is not whole groups of whole rows, or `dst` is not exactly its size.
pub fn interleave(src: &[BlockIQ4XS], spr: usize, dst: &mut [u8]) {
    assert!(spr > 0 && src.len().is_multiple_of(GROUP_ROWS * spr));
    assert_eq!(dst.len(), size_of_val(src));
    for (rows, out) in src
        .chunks_exact(GROUP_ROWS * spr)
        .zip(dst.chunks_exact_mut(GROUP_ROWS * spr * size_of::<BlockIQ4XS>()))
    {
        for (s, sb) in out.chunks_exact_mut(GROUP_BLOCK_BYTES).enumerate() {
            let (qs, header) = sb.split_at_mut(SUB_BLOCKS * 256);
            let (d, rest) = header.split_at_mut(32);
            let (sh, sl) = rest.split_at_mut(32);
            for r in 0..GROUP_ROWS {
                let blk = &rows[r * spr + s];
                for (ib, q) in qs.chunks_exact_mut(256).enumerate() {
                    for (k, run) in q.chunks_exact_mut(64).enumerate() {
                        run[4 * r..4 * r + 4]
                            .copy_from_slice(&blk.qs[16 * ib + 4 * k..16 * ib + 4 * k + 4]);
                    }
                }
                d[2 * r..2 * r + 2].copy_from_slice(&blk.d.to_bits().to_le_bytes());
                sh[2 * r..2 * r + 2].copy_from_slice(&blk.scales_h.to_le_bytes());
                sl[4 * r..4 * r + 4].copy_from_slice(&blk.scales_l);
            }
        }
    }
}

/// Super-block `s` of row `r` of an interleaved matrix: [`interleave`] undone, for the reference product and the
/// embedding lookup.
pub fn interleaved_block(data: &[u8], spr: usize, r: usize, s: usize) -> BlockIQ4XS {
    let group_bytes = GROUP_ROWS * spr * size_of::<BlockIQ4XS>();
    let sb = &data[r / GROUP_ROWS * group_bytes + s * GROUP_BLOCK_BYTES..][..GROUP_BLOCK_BYTES];
    let i = r % GROUP_ROWS;
    let mut blk = BlockIQ4XS::zeroed();
    for ib in 0..SUB_BLOCKS {
        for k in 0..4 {
            let o = ib * 256 + k * 64 + i * 4;
            blk.qs[16 * ib + 4 * k..16 * ib + 4 * k + 4].copy_from_slice(&sb[o..o + 4]);
        }
    }
    let h = SUB_BLOCKS * 256;
    blk.d = half::f16::from_bits(u16::from_le_bytes([sb[h + 2 * i], sb[h + 2 * i + 1]]));
    blk.scales_h = u16::from_le_bytes([sb[h + 32 + 2 * i], sb[h + 32 + 2 * i + 1]]);
    blk.scales_l
        .copy_from_slice(&sb[h + 64 + 4 * i..h + 64 + 4 * i + 4]);
    blk
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every super-block comes back from where `interleave` put it, and a group is exactly its rows' bytes.
    #[test]
    fn interleaving_moves_every_byte_and_loses_none() {
        crate::kernels::check_interleave_round_trip(
            |i| BlockIQ4XS {
                d: half::f16::from_bits(i as u16 ^ 0x3c00),
                scales_h: (i * 7919) as u16,
                scales_l: std::array::from_fn(|j| (i * 13 + j * 3) as u8),
                qs: std::array::from_fn(|j| (i * 31 + j * 7) as u8),
            },
            interleave,
            interleaved_block,
        );
    }
}
