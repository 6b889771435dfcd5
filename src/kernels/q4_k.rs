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

/// Rows per group of the interleaved layout ([`interleave`]): the model's one group height.
pub const GROUP_ROWS: usize = super::INTERLEAVE_ROWS;

/// Bytes of one 256-block of a group: 32 runs of 64 bytes of quants, then the 16 rows' `d` (f16), their 16
/// `dmin`, and 3 runs of 64 bytes of packed scales. As many as the 16 rows' blocks take in the file.
pub const GROUP_BLOCK_BYTES: usize = GROUP_ROWS * size_of::<BlockQ4K>();

/// Offsets in a group's block of the `d`, `dmin` and packed scale runs (after the 2048 bytes of quants).
pub const D_AT: usize = 32 * 64;
pub const DMIN_AT: usize = D_AT + 32;
pub const SCALES_AT: usize = DMIN_AT + 32;

/// Rewrites rows of Q4_K blocks (a multiple of [`GROUP_ROWS`] rows of `bpr` blocks each) into groups of 16 rows
/// that a kernel with one vector lane per row loads without rearranging, block after block: per block, run `j`
/// (64 bytes) holds dword `j` of the quants of rows 0..16 (so its low nibbles are weights `64c + 4k..+4` and its
/// high nibbles weights `64c + 32 + 4k..+4` of each row, `j = 8c + k`), then the 16 `d`, the 16 `dmin`, and run
/// `i` of the scales holding dword `i` of each row's 12 packed scale bytes. The same bytes in another order: a
/// share of whole groups is a byte range, as a share of rows is.
///
/// # Panics
/// When `src` is not whole groups of whole rows, or `dst` is not exactly its size.
pub fn interleave(src: &[BlockQ4K], bpr: usize, dst: &mut [u8]) {
    assert!(bpr > 0 && src.len().is_multiple_of(GROUP_ROWS * bpr));
    assert_eq!(dst.len(), size_of_val(src));
    for (rows, out) in src
        .chunks_exact(GROUP_ROWS * bpr)
        .zip(dst.chunks_exact_mut(GROUP_ROWS * bpr * size_of::<BlockQ4K>()))
    {
        for (b, gb) in out.chunks_exact_mut(GROUP_BLOCK_BYTES).enumerate() {
            for r in 0..GROUP_ROWS {
                let blk = &rows[r * bpr + b];
                for j in 0..32 {
                    gb[64 * j + 4 * r..][..4].copy_from_slice(&blk.qs[4 * j..4 * j + 4]);
                }
                gb[D_AT + 2 * r..][..2].copy_from_slice(&blk.d.to_bits().to_le_bytes());
                gb[DMIN_AT + 2 * r..][..2].copy_from_slice(&blk.dmin.to_bits().to_le_bytes());
                for i in 0..3 {
                    gb[SCALES_AT + 64 * i + 4 * r..][..4]
                        .copy_from_slice(&blk.scales[4 * i..4 * i + 4]);
                }
            }
        }
    }
}

/// Block `b` of row `r` of an interleaved matrix: [`interleave`] undone, for the embedding lookup.
pub fn interleaved_block(data: &[u8], bpr: usize, r: usize, b: usize) -> BlockQ4K {
    let group_bytes = GROUP_ROWS * bpr * size_of::<BlockQ4K>();
    let gb = &data[r / GROUP_ROWS * group_bytes + b * GROUP_BLOCK_BYTES..][..GROUP_BLOCK_BYTES];
    let i = r % GROUP_ROWS;
    let half =
        |at: usize| half::f16::from_bits(u16::from_le_bytes([gb[at + 2 * i], gb[at + 2 * i + 1]]));
    BlockQ4K {
        d: half(D_AT),
        dmin: half(DMIN_AT),
        scales: std::array::from_fn(|k| gb[SCALES_AT + 64 * (k / 4) + 4 * i + k % 4]),
        qs: std::array::from_fn(|k| gb[64 * (k / 4) + 4 * i + k % 4]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block comes back from where `interleave` put it, and a group is exactly its rows' bytes.
    #[test]
    fn interleaving_moves_every_byte_and_loses_none() {
        crate::kernels::check_interleave_round_trip(
            |i| BlockQ4K {
                d: half::f16::from_bits(i as u16 ^ 0x3c00),
                dmin: half::f16::from_bits((i * 7919) as u16),
                scales: std::array::from_fn(|j| (i * 13 + j * 3) as u8),
                qs: std::array::from_fn(|j| (i * 31 + j * 7) as u8),
            },
            interleave,
            interleaved_block,
        );
    }
}
