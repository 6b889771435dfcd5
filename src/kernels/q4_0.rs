//! Q4_0 weights (32 nibbles + an f16 scale, offset 8) against Q8_0-quantized activations: the scalar reference.
//! The SIMD versions are in `portable.rs` and `x86/`.

use quarry_quantize::blocks::{BlockQ4_0, BlockQ8_0};

/// Reference dot product. Byte j of a Q4_0 block holds weight j (low nibble) and weight j + 16 (high nibble).
pub fn dot_scalar(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (bw, ba) in w.iter().zip(a) {
        let mut isum = 0i32;
        for j in 0..16 {
            let lo = (bw.qs[j] & 0x0f) as i32 - 8;
            let hi = (bw.qs[j] >> 4) as i32 - 8;
            isum += lo * ba.qs[j] as i32 + hi * ba.qs[j + 16] as i32;
        }
        sum += bw.d.to_f32() * ba.d.to_f32() * isum as f32;
    }
    sum
}

/// Rows per group of the interleaved layout ([`interleave`]): the model's one group height.
pub const GROUP_ROWS: usize = super::INTERLEAVE_ROWS;

/// Bytes of one group of [`GROUP_ROWS`] rows of `bpr` blocks: as many as the rows take in the file.
pub const fn group_bytes(bpr: usize) -> usize {
    GROUP_ROWS * bpr * size_of::<BlockQ4_0>()
}

/// Rewrites rows of Q4_0 blocks (a multiple of [`GROUP_ROWS`] of them, `bpr` blocks each) into groups of 16
/// rows that a kernel with one vector lane per row loads without rearranging: per group, first the nibbles of
/// each block in turn (256 bytes: 4 runs of 64, run `k` holding bytes `4k..4k + 4` of rows 0..16), then the 16
/// f16 scales of each block in turn (32 bytes). The same bytes as the rows, in another order, so the matrix
/// takes no more memory and a share of whole groups is a byte range, as a share of rows is.
///
/// # Panics
/// When `src` is not whole groups of whole rows, or `dst` is not exactly its size.
pub fn interleave(src: &[BlockQ4_0], bpr: usize, dst: &mut [u8]) {
    assert!(bpr > 0 && src.len().is_multiple_of(GROUP_ROWS * bpr));
    assert_eq!(dst.len(), size_of_val(src));
    let gb = group_bytes(bpr);
    for (rows, out) in src
        .chunks_exact(GROUP_ROWS * bpr)
        .zip(dst.chunks_exact_mut(gb))
    {
        let (qs, scales) = out.split_at_mut(bpr * 256);
        // Written in order, 16 rows read at a time.
        for (b, (q, d)) in qs
            .chunks_exact_mut(256)
            .zip(scales.chunks_exact_mut(32))
            .enumerate()
        {
            for r in 0..GROUP_ROWS {
                let blk = &rows[r * bpr + b];
                for (k, run) in q.chunks_exact_mut(64).enumerate() {
                    run[4 * r..4 * r + 4].copy_from_slice(&blk.qs[4 * k..4 * k + 4]);
                }
                d[2 * r..2 * r + 2].copy_from_slice(&blk.d.to_bits().to_le_bytes());
            }
        }
    }
}

/// Block `b` of row `r` of an interleaved matrix: [`interleave`] undone, for the reference product.
pub fn interleaved_block(data: &[u8], bpr: usize, r: usize, b: usize) -> BlockQ4_0 {
    let group = &data[r / GROUP_ROWS * group_bytes(bpr)..][..group_bytes(bpr)];
    let i = r % GROUP_ROWS;
    let mut qs = [0u8; 16];
    for k in 0..4 {
        let o = b * 256 + k * 64 + i * 4;
        qs[4 * k..4 * k + 4].copy_from_slice(&group[o..o + 4]);
    }
    let o = bpr * 256 + b * 32 + i * 2;
    BlockQ4_0 {
        d: half::f16::from_bits(u16::from_le_bytes([group[o], group[o + 1]])),
        qs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block comes back from where `interleave` put it, scale and nibbles, and the groups are the rows'
    /// byte ranges.
    #[test]
    fn interleaving_moves_every_byte_and_loses_none() {
        for bpr in [1, 3, 32] {
            let rows = 48;
            let blocks: Vec<BlockQ4_0> = (0..rows * bpr)
                .map(|i| BlockQ4_0 {
                    d: half::f16::from_bits(i as u16 ^ 0x3c00),
                    qs: std::array::from_fn(|j| (i * 31 + j * 7) as u8),
                })
                .collect();
            let mut packed = vec![0u8; blocks.len() * size_of::<BlockQ4_0>()];
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
            // A group is exactly its 16 rows' bytes: interleaving a group alone gives the same bytes.
            let mut second = vec![0u8; group_bytes(bpr)];
            interleave(&blocks[16 * bpr..32 * bpr], bpr, &mut second);
            assert_eq!(second, packed[group_bytes(bpr)..2 * group_bytes(bpr)]);
        }
    }
}
