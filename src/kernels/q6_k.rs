//! Q6_K weights (16 groups of 16 six-bit quants with signed 8-bit scales per 256, offset 32) against
//! Q8_K-quantized activations: the scalar reference. The SIMD versions are in `portable.rs` and `x86/`.

use quarry_quantize::blocks::{BlockQ6K, BlockQ8K};

/// Reference dot product: per block the exact integer sum of `scale_g * (q - 32) * a` over the 16 groups, then
/// `d * da * sum` in f32. Equal to `sum(scale_g * q * a) - 32 * sum(scale_g * bsum_g)`, the form SIMD versions
/// use to keep the quants unsigned.
pub fn dot_scalar(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (bw, ba) in w.iter().zip(a) {
        let mut isum = 0i32;
        for (g, &scale) in bw.scales.iter().enumerate() {
            let group: i32 = (16 * g..16 * g + 16)
                .map(|i| (bw.quant(i) as i32 - 32) * ba.qs[i] as i32)
                .sum();
            isum += scale as i32 * group;
        }
        sum += bw.d.to_f32() * ba.d * isum as f32;
    }
    sum
}

/// Rows per group of the interleaved layout ([`interleave`]): the model's one group height.
pub const GROUP_ROWS: usize = super::INTERLEAVE_ROWS;

/// Bytes of one 256-block of a group: 4 runs of 64 bytes of scales, 48 runs of `ql` and `qh`, and the 16 rows'
/// `d` (f16). As many as the 16 rows' blocks take in the file.
pub const GROUP_BLOCK_BYTES: usize = GROUP_ROWS * size_of::<BlockQ6K>();

/// Where block `b` of a group has its scale runs (its quant runs follow them): a block is 52.5 cache lines, so
/// its 32 bytes of `d` come last in even blocks and first in odd ones, which keeps every 64-byte run on one
/// cache line when the group starts on one (no load split over two lines; Q4_K_M tg128 64.5-68.4 -> 66.6-69.3
/// tok/s, alternating runs).
pub const fn scales_at(b: usize) -> usize {
    32 * (b % 2)
}

/// Where block `b`'s quant runs start.
pub const fn runs_at(b: usize) -> usize {
    scales_at(b) + 4 * 64
}

/// Where block `b`'s 16 `d` are (see [`scales_at`]).
pub const fn d_at(b: usize) -> usize {
    if b % 2 == 1 { 0 } else { 4 * 64 + 48 * 64 }
}

/// The place among a block's quant runs of `ql` dword `j` and `qh` dword `i`: in the order the kernel reads
/// them, for half `n` and dword `l` of a quarter, `ql` dwords `16n + l` and `16n + 8 + l` and `qh` dword `8n + l`
/// (the four quarters' weights `32n + 8p + l` share them).
pub const fn ql_run(j: usize) -> usize {
    let (n, r) = (j / 16, j % 16);
    3 * (8 * n + r % 8) + r / 8
}

/// See [`ql_run`].
pub const fn qh_run(i: usize) -> usize {
    3 * i + 2
}

/// Rewrites rows of Q6_K blocks (a multiple of [`GROUP_ROWS`] rows of `bpr` blocks each) into groups of 16 rows
/// that a kernel with one vector lane per row loads without rearranging, block after block: per block, run `k`
/// of the scales (64 bytes) holds dword `k` of the 16 rows' scales, then the quant runs, each dword `j` of `ql`
/// or `i` of `qh` of rows 0..16, in the order the kernel reads them ([`ql_run`]), and the 16 `d` last or first
/// ([`scales_at`]). The same bytes in another order: a share of whole groups is a byte range, as a share of rows
/// is.
///
/// # Panics
/// When `src` is not whole groups of whole rows, or `dst` is not exactly its size.
pub fn interleave(src: &[BlockQ6K], bpr: usize, dst: &mut [u8]) {
    assert!(bpr > 0 && src.len().is_multiple_of(GROUP_ROWS * bpr));
    assert_eq!(dst.len(), size_of_val(src));
    for (rows, out) in src
        .chunks_exact(GROUP_ROWS * bpr)
        .zip(dst.chunks_exact_mut(GROUP_ROWS * bpr * size_of::<BlockQ6K>()))
    {
        for (b, block) in out.chunks_exact_mut(GROUP_BLOCK_BYTES).enumerate() {
            for r in 0..GROUP_ROWS {
                let blk = &rows[r * bpr + b];
                block[d_at(b) + 2 * r..][..2].copy_from_slice(&blk.d.to_bits().to_le_bytes());
                let scales: &[u8; 16] = bytemuck::cast_ref(&blk.scales);
                for k in 0..4 {
                    block[scales_at(b) + 64 * k + 4 * r..][..4]
                        .copy_from_slice(&scales[4 * k..4 * k + 4]);
                }
                let runs = &mut block[runs_at(b)..];
                for j in 0..32 {
                    runs[64 * ql_run(j) + 4 * r..][..4].copy_from_slice(&blk.ql[4 * j..4 * j + 4]);
                }
                for i in 0..16 {
                    runs[64 * qh_run(i) + 4 * r..][..4].copy_from_slice(&blk.qh[4 * i..4 * i + 4]);
                }
            }
        }
    }
}

/// Block `b` of row `r` of an interleaved matrix: [`interleave`] undone, for the embedding lookup.
pub fn interleaved_block(data: &[u8], bpr: usize, r: usize, b: usize) -> BlockQ6K {
    let group_bytes = GROUP_ROWS * bpr * size_of::<BlockQ6K>();
    let gb = &data[r / GROUP_ROWS * group_bytes + b * GROUP_BLOCK_BYTES..][..GROUP_BLOCK_BYTES];
    let i = r % GROUP_ROWS;
    // Byte k of dword `run` of the field starting at `base`, this row's.
    let at = |base: usize, run: usize, k: usize| gb[base + 64 * run + 4 * i + k];
    let (runs, d) = (runs_at(b), d_at(b));
    BlockQ6K {
        ql: std::array::from_fn(|k| at(runs, ql_run(k / 4), k % 4)),
        qh: std::array::from_fn(|k| at(runs, qh_run(k / 4), k % 4)),
        scales: std::array::from_fn(|k| at(scales_at(b), k / 4, k % 4) as i8),
        d: half::f16::from_bits(u16::from_le_bytes([gb[d + 2 * i], gb[d + 2 * i + 1]])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block comes back from where `interleave` put it, and a group is exactly its rows' bytes.
    #[test]
    fn interleaving_moves_every_byte_and_loses_none() {
        crate::kernels::check_interleave_round_trip(
            |i| BlockQ6K {
                ql: std::array::from_fn(|j| (i * 31 + j * 7) as u8),
                qh: std::array::from_fn(|j| (i * 17 + j * 5) as u8),
                scales: std::array::from_fn(|j| (i * 13 + j * 3) as i8),
                d: half::f16::from_bits((i * 7919) as u16),
            },
            interleave,
            interleaved_block,
        );
    }
}
