//! What the k-quant kernels of every x86 set share: the Q4_K scale unpacking, and the activation side of the
//! lane kernels (transposed quants, scales and `bsums` pairs), all AVX2-level code.

use std::arch::x86_64::*;

use quarry_quantize::blocks::BlockQ8K;

use super::{Scratch, grow, transpose_8x8};

/// Integers per prepared row block in `Scratch::wi` (lane kernels): up to 16 scales, then up to 8 pairs.
pub(crate) const WI: usize = 24;

/// `vpshufb` control turning the 8 Q4_K min bytes (broadcast to every qword) into 16
/// words, each min twice: `vpmaddwd` against the 16 `bsums` then gives `min_g * (bsums[2g] + bsums[2g + 1])`.
pub(crate) const Q4K_MIN_CTRL: [u8; 32] = {
    let mut c = [0x80u8; 32];
    let mut i = 0;
    while i < 16 {
        c[2 * i] = (i / 2) as u8;
        i += 1;
    }
    c
};

/// The Q4_K/Q5_K activation side of the mins term: 4 dwords, each two group sums (of 32 quants: at most
/// 32 * 127, a word).
pub(crate) fn q4k_act_pairs(a: &BlockQ8K, out: &mut [i32; 8]) {
    for (k, o) in out.iter_mut().take(4).enumerate() {
        let bs = &a.bsums[4 * k..4 * k + 4];
        let g0 = bs[0].wrapping_add(bs[1]) as u16 as u32;
        let g1 = bs[2].wrapping_add(bs[3]) as u16 as u32;
        *o = (g0 | g1 << 16) as i32;
    }
}

/// The Q6_K activation side of the offset term: the 16 `bsums` as 8 dwords of two words.
pub(crate) fn q6k_act_pairs(a: &BlockQ8K, out: &mut [i32; 8]) {
    for (k, o) in out.iter_mut().enumerate() {
        *o = (a.bsums[2 * k] as u16 as u32 | (a.bsums[2 * k + 1] as u16 as u32) << 16) as i32;
    }
}

/// Transposes the activations of tokens `t0..t0 + N * groups` (zero past `t1`) into scratch for the lane
/// kernels: per group `g` and block `b` (`gb = g * bpr + b`), `act[(gb * 64 + k) * N + j]` is dword `k` of token
/// `j`'s quants, `da[gb * N + j]` its scale and `corr[(gb * 8 + k) * N + j]` its `k`th `bsums` pair (`pairs`).
#[inline(always)]
pub(crate) unsafe fn prep_acts<const N: usize>(
    a: &[BlockQ8K],
    bpr: usize,
    t0: usize,
    t1: usize,
    groups: usize,
    s: &mut Scratch,
    pairs: fn(&BlockQ8K, &mut [i32; 8]),
) {
    grow(&mut s.act, groups * bpr * 64 * N);
    grow(&mut s.da, groups * bpr * N);
    grow(&mut s.corr, groups * bpr * 8 * N);
    // SAFETY: loads read block b < bpr of token < t1 <= n; stores stay below the sizes grown above.
    unsafe {
        for g in 0..groups {
            for b in 0..bpr {
                let gb = g * bpr + b;
                for h in 0..N / 8 {
                    let tb = t0 + N * g + 8 * h;
                    for kk in 0..8 {
                        let mut r = [_mm256_setzero_si256(); 8];
                        for (j, rj) in r.iter_mut().enumerate() {
                            if tb + j < t1 {
                                let blk = &a[(tb + j) * bpr + b];
                                *rj = _mm256_loadu_si256(
                                    blk.qs.as_ptr().add(32 * kk) as *const __m256i
                                );
                            }
                        }
                        let cols = transpose_8x8(r);
                        for (k, &c) in cols.iter().enumerate() {
                            _mm256_storeu_si256(
                                s.act.as_mut_ptr().add((gb * 64 + 8 * kk + k) * N + 8 * h)
                                    as *mut __m256i,
                                c,
                            );
                        }
                    }
                }
                for j in 0..N {
                    let tok = t0 + N * g + j;
                    let mut p = [0i32; 8];
                    let mut d = 0.0;
                    if tok < t1 {
                        let blk = &a[tok * bpr + b];
                        pairs(blk, &mut p);
                        d = blk.d;
                    }
                    s.da[gb * N + j] = d;
                    for (k, &pk) in p.iter().enumerate() {
                        s.corr[(gb * 8 + k) * N + j] = pk;
                    }
                }
            }
        }
    }
}
