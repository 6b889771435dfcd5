//! AVX-512's 32-block products for a few tokens (2 to 15), one lane per weight row.
//!
//! The few-token kernel of `x86/mod.rs` spreads a block's 32 bytes over 8 lanes, so every (row, token, block)
//! needs a horizontal sum of its lanes before it can be scaled: per token that costs about as much as the byte
//! dot itself, and a product of 2 to 8 tokens (an expert's share of a batch of sequences) costs nearly that many
//! times one token's. Here 16 rows' blocks are transposed in registers once per block so that lane `i` of vector
//! `k` holds dword `k` of row `i`; each token then takes 8 `vpdpbusd` against its own activation dwords
//! broadcast, and every lane ends with its row's whole exact integer dot, scaled and accumulated as the lane
//! kernel does it (`fma(cvt(isum), da * dw, acc)`, block by block), so the results are the same bits as every
//! other shape's. The weights are read where they lie (no repacking): the transpose costs a fixed ~4
//! instructions per row and block, shared by all the tokens of the call.
//!
//! The 16 rows come out of the in-register 4 x 4 transposes permuted (lane `4L + m` holds row `4m + L`); scales
//! are gathered in that order and each token's 16 results are put back in row order once per tile.

use std::arch::x86_64::*;

use quarry_quantize::blocks::{BlockQ4_0, BlockQ8_0};

use crate::kernels::ProductOut;

use super::{f16_bits_to_f32, grow, scratch, tile_shape};

/// A 32-block weight format as 16 rows' transposed unsigned dwords.
pub(crate) trait RowBlock: Copy {
    /// The activation correction: the integer dot is `dot(u, a) - BIAS * sum(a)`.
    const BIAS: i32;
    /// The 8 vectors of unsigned weight dwords of block `b` of the 16 rows starting at `w`, `stride` blocks apart
    /// (lane `4L + m`: row `4m + L`).
    unsafe fn transpose16(w: *const Self, stride: usize) -> [__m512i; 8];
}

/// Four rows' 16 bytes (`p`, `p + stride`, ...) as the four 128-bit lanes of one vector.
#[inline(always)]
unsafe fn rows4(p: *const u8, stride: usize) -> __m512i {
    unsafe {
        let z = _mm512_castsi128_si512(_mm_loadu_si128(p as *const __m128i));
        let z = _mm512_inserti32x4::<1>(z, _mm_loadu_si128(p.add(stride) as *const __m128i));
        let z = _mm512_inserti32x4::<2>(z, _mm_loadu_si128(p.add(2 * stride) as *const __m128i));
        _mm512_inserti32x4::<3>(z, _mm_loadu_si128(p.add(3 * stride) as *const __m128i))
    }
}

/// 16 rows' 16 bytes (row `r` at `p + r * stride`) as 4 vectors, vector `k` holding dword `k` of every row
/// (permuted as the module says). No closures: they would be compiled without the caller's features.
#[inline(always)]
unsafe fn transpose_16x4(p: *const u8, stride: usize) -> [__m512i; 4] {
    unsafe {
        // Z_j's 128-bit lane L is row 4j + L.
        let a = rows4(p, stride);
        let b = rows4(p.add(4 * stride), stride);
        let c = rows4(p.add(8 * stride), stride);
        let d = rows4(p.add(12 * stride), stride);
        // A 4 x 4 dword transpose within each 128-bit lane: out_k lane L = [a, b, c, d][L][k].
        let ab_lo = _mm512_unpacklo_epi32(a, b);
        let ab_hi = _mm512_unpackhi_epi32(a, b);
        let cd_lo = _mm512_unpacklo_epi32(c, d);
        let cd_hi = _mm512_unpackhi_epi32(c, d);
        [
            _mm512_unpacklo_epi64(ab_lo, cd_lo),
            _mm512_unpackhi_epi64(ab_lo, cd_lo),
            _mm512_unpacklo_epi64(ab_hi, cd_hi),
            _mm512_unpackhi_epi64(ab_hi, cd_hi),
        ]
    }
}

/// The row of lane `p` (`4L + m` holds row `4m + L`).
const fn lane_row(p: usize) -> usize {
    4 * (p % 4) + p / 4
}

impl RowBlock for BlockQ4_0 {
    const BIAS: i32 = 8;
    #[inline(always)]
    unsafe fn transpose16(w: *const BlockQ4_0, stride: usize) -> [__m512i; 8] {
        unsafe {
            let raw = transpose_16x4((*w).qs.as_ptr(), stride * size_of::<BlockQ4_0>());
            let m = _mm512_set1_epi8(0x0f);
            let mut out = [_mm512_setzero_si512(); 8];
            for k in 0..4 {
                // Low nibbles are weights 0..15 (dwords 0..3), high nibbles 16..31 (dwords 4..7).
                out[k] = _mm512_and_si512(raw[k], m);
                out[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw[k]), m);
            }
            out
        }
    }
}

impl RowBlock for BlockQ8_0 {
    const BIAS: i32 = 128;
    #[inline(always)]
    unsafe fn transpose16(w: *const BlockQ8_0, stride: usize) -> [__m512i; 8] {
        unsafe {
            let q = (*w).qs.as_ptr() as *const u8;
            let bytes = stride * size_of::<BlockQ8_0>();
            let lo = transpose_16x4(q, bytes);
            let hi = transpose_16x4(q.add(16), bytes);
            let flip = _mm512_set1_epi8(-128);
            let mut out = [_mm512_setzero_si512(); 8];
            for k in 0..4 {
                // `w + 128` as unsigned bytes.
                out[k] = _mm512_xor_si512(lo[k], flip);
                out[k + 4] = _mm512_xor_si512(hi[k], flip);
            }
            out
        }
    }
}

/// The scales of 16 rows' blocks (`stride` blocks apart), in lane order.
#[inline(always)]
unsafe fn row_scales<W: super::Block32>(w: *const W, stride: usize) -> __m512 {
    unsafe {
        let mut bits = [0u16; 16];
        for (p, b) in bits.iter_mut().enumerate() {
            *b = (*w.add(lane_row(p) * stride)).d_bits();
        }
        _mm512_cvtph_ps(_mm256_loadu_si256(bits.as_ptr() as *const __m256i))
    }
}

/// `W[r] . A[t]` for every row (a multiple of 16 of them) and tokens `t0..t1`, up to 16 tokens per pass over
/// the weights.
#[inline(always)]
pub(crate) unsafe fn gemm_rows16<W: RowBlock + super::Block32>(
    w: &[W],
    a: &[BlockQ8_0],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    let (_, rows16) = tile_shape(w.len(), a.len(), bpr, t0, t1, out);
    assert!(rows16.is_multiple_of(16));
    // SAFETY: see `scratch`.
    let s = unsafe { &mut *scratch() };
    let nt = t1 - t0;
    grow(&mut s.da, nt * bpr);
    grow(&mut s.corr, nt * bpr);
    // Per token and block: the activation scale and the correction `-BIAS * sum(a)`.
    for t in 0..nt {
        for b in 0..bpr {
            let blk = &a[(t0 + t) * bpr + b];
            // SAFETY: AVX2 + F16C are present in every x86 set.
            s.da[t * bpr + b] = unsafe { f16_bits_to_f32(blk.d.to_bits()) };
            let mut sum = 0i32;
            for &q in &blk.qs {
                sum += q as i32;
            }
            s.corr[t * bpr + b] = -W::BIAS * sum;
        }
    }
    let (da, corr) = (&s.da[..nt * bpr], &s.corr[..nt * bpr]);
    // SAFETY: prefetches never fault.
    unsafe { super::prefetch_head(w, 16 * bpr) };
    let mut r0 = 0;
    while r0 < rows16 {
        let mut t = t0;
        while t < t1 {
            // One pass of up to 16 tokens, each count its own tile: splitting 3 tokens into 2 + 1 would transpose
            // the rows twice, and the transpose costs as much as two or three tokens' dots. (16 accumulators, the
            // 8 weight vectors and the scales fit AVX-512's 32 registers.)
            let tt = (t1 - t).min(16);
            // SAFETY: rows r0..r0 + 16 <= rows and tokens t..t + tt <= t1 exist; `da` and `corr` cover tokens
            // t0..t1.
            unsafe {
                match tt {
                    16 => tile::<W, 16>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    15 => tile::<W, 15>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    14 => tile::<W, 14>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    13 => tile::<W, 13>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    12 => tile::<W, 12>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    11 => tile::<W, 11>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    10 => tile::<W, 10>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    9 => tile::<W, 9>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    8 => tile::<W, 8>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    7 => tile::<W, 7>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    6 => tile::<W, 6>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    5 => tile::<W, 5>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    4 => tile::<W, 4>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    3 => tile::<W, 3>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    2 => tile::<W, 2>(w, a, bpr, r0, t, t - t0, da, corr, out),
                    _ => tile::<W, 1>(w, a, bpr, r0, t, t - t0, da, corr, out),
                }
            }
            t += tt;
        }
        r0 += 16;
    }
}

/// Rows `r0..r0 + 16` x tokens `t..t + TT` (`ti = t - t0` indexes `da` and `corr`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<W: RowBlock + super::Block32, const TT: usize>(
    w: &[W],
    a: &[BlockQ8_0],
    bpr: usize,
    r0: usize,
    t: usize,
    ti: usize,
    da: &[f32],
    corr: &[i32],
    out: &mut ProductOut,
) {
    debug_assert!((r0 + 16) * bpr <= w.len() && (t + TT) * bpr <= a.len());
    debug_assert!((ti + TT) * bpr <= da.len());
    // SAFETY: every pointer indexes block b < bpr of rows r0..r0 + 16 or tokens t..t + TT (the caller's
    // promise); prefetches never fault.
    unsafe {
        let wp = w.as_ptr().add(r0 * bpr);
        let next = (wp as *const i8).wrapping_add(16 * bpr * size_of::<W>());
        let ap = a.as_ptr().add(t * bpr);
        let mut acc = [_mm512_setzero_ps(); TT];
        for b in 0..bpr {
            // The 16 rows are one contiguous run of memory read in an interleaved order the hardware prefetchers
            // do not follow; the next tile's run is requested into L2 in step with this one's progress.
            let step = 16 * size_of::<W>();
            let mut off = b * step;
            while off < (b + 1) * step {
                _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(off));
                off += 64;
            }
            let wv = W::transpose16(wp.add(b), bpr);
            let dw = row_scales(wp.add(b), bpr);
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let q = (*ap.add(j * bpr + b)).qs.as_ptr() as *const i32;
                let mut isum = _mm512_set1_epi32(*corr.get_unchecked((ti + j) * bpr + b));
                for (k, &wk) in wv.iter().enumerate() {
                    isum =
                        _mm512_dpbusd_epi32(isum, wk, _mm512_set1_epi32(q.add(k).read_unaligned()));
                }
                let scale =
                    _mm512_mul_ps(_mm512_set1_ps(*da.get_unchecked((ti + j) * bpr + b)), dw);
                *acc_j = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc_j);
            }
        }
        // Back to row order: row r is lane 4 (r % 4) + r / 4.
        let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        for (j, &acc_j) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add((t + j) * out.stride() + r0);
            _mm512_storeu_ps(o, _mm512_permutexvar_ps(idx, acc_j));
        }
    }
}
