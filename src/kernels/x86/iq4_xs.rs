//! IQ4_XS rows as they lie in the file against Q8_0 activations, on every x86 set (AVX2 instructions; AVX-512
//! reads whole groups of 16 rows interleaved instead, `row_lanes`, and only the rows past the last group here).
//!
//! Each 32-weight sub-block is a 32-block product on its own: its nibbles looked up as signed levels, `|w|`
//! against the activation with `w`'s sign (`vpmaddubsw` + `vpmaddwd`, exact: at most 2 * 127 * 127 per pair),
//! four sub-blocks' lanes reduced together to exact integers, each then accumulated with the lane kernels' float
//! step `acc = fma(cvt(isum), da * dw, acc)` in sub-block order, so a row computed here has the bits it has in
//! an interleaved tile. Four rows' super-blocks are unpacked together once for up to 4 tokens.

use std::arch::x86_64::*;

use quarry_quantize::blocks::{BlockIQ4XS, BlockQ8_0};

use super::avx2::madd_ones;
use super::{IQ4_LEVELS, f16_bits_to_f32, hsum4_epi32, lookup16, q4_nibbles};
use crate::kernels::ProductOut;
use crate::kernels::iq4_xs::SUB_BLOCKS;

/// Tokens per pass over a row.
const TOKENS: usize = 4;

/// Bytes of a row requested ahead of the super-block being read: four rows are four streams, which the hardware
/// prefetchers alone do not keep far enough ahead. On AVX2, `bench -p 256 -n 32` of a full-size IQ4_XS file
/// decoded at 37 tok/s without, 51 with 1 KiB, 59-61 with 2 KiB, 57 with 4 KiB (alternating runs).
const AHEAD: usize = 2048;

/// `W[r] . A[t]` for every row of `w` (`bpr / 8` super-blocks each) and every token of `a` (`bpr` blocks each).
///
/// # Safety
/// AVX2, FMA and F16C are present (the module contract of `x86/mod.rs`).
#[inline(always)]
pub(crate) unsafe fn gemm_rows(w: &[BlockIQ4XS], a: &[BlockQ8_0], bpr: usize, mut out: ProductOut) {
    assert!(bpr > 0 && bpr.is_multiple_of(SUB_BLOCKS));
    let spr = bpr / SUB_BLOCKS;
    let (rows, n) = (w.len() / spr, a.len() / bpr);
    crate::kernels::check_shape(&out, rows, n);
    // Four rows at a time: each row's accumulation is a chain of dependent FMAs (one per sub-block), so four
    // rows' chains side by side in the lanes of one vector keep the FMA unit busy; the rows past the last four
    // take the same steps one at a time (the same bits: lane by lane the same operations).
    let rows4 = rows / 4 * 4;
    for r in (0..rows4).step_by(4) {
        let mut t = 0;
        while t < n {
            let tn = (n - t).min(TOKENS);
            // SAFETY: the features are present (the caller's promise).
            let mut acc = [unsafe { _mm_setzero_ps() }; TOKENS];
            for s in 0..spr {
                let blks: [&BlockIQ4XS; 4] = std::array::from_fn(|i| &w[(r + i) * spr + s]);
                for blk in blks {
                    let ahead = (blk as *const BlockIQ4XS as *const i8).wrapping_add(AHEAD);
                    // SAFETY: a prefetch never faults; the address wraps rather than being dereferenced.
                    unsafe {
                        _mm_prefetch::<_MM_HINT_T0>(ahead);
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128));
                    }
                }
                // SAFETY: as below.
                unsafe { super_block4(blks, &a[t * bpr + s * SUB_BLOCKS..], bpr, tn, &mut acc) };
            }
            for (j, &v) in acc[..tn].iter().enumerate() {
                let mut lanes = [0.0f32; 4];
                // SAFETY: `lanes` holds 4 floats.
                unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), v) };
                out.token(t + j)[r..r + 4].copy_from_slice(&lanes);
            }
            t += tn;
        }
    }
    for (r, row) in w.chunks_exact(spr).enumerate().skip(rows4) {
        let mut t = 0;
        while t < n {
            let tn = (n - t).min(TOKENS);
            let mut acc = [0.0f32; TOKENS];
            for (s, blk) in row.iter().enumerate() {
                // SAFETY: the features are present (the caller's promise); the activation blocks of tokens
                // t..t + tn, super-block s, are inside `a` (n tokens of bpr blocks).
                unsafe { super_block(blk, &a[t * bpr + s * SUB_BLOCKS..], bpr, tn, &mut acc) };
            }
            for (j, &v) in acc[..tn].iter().enumerate() {
                out.token(t + j)[r] = v;
            }
            t += tn;
        }
    }
}

/// Super-block `s` of four rows (`blks`) against the matching 8 activation blocks of `tn` tokens, into each
/// token's four accumulators (lane `i`: row `i`), sub-block by sub-block with the one-row path's float steps.
#[inline(always)]
unsafe fn super_block4(
    blks: [&BlockIQ4XS; 4],
    a: &[BlockQ8_0],
    bpr: usize,
    tn: usize,
    acc: &mut [__m128; TOKENS],
) {
    assert!(a.len() >= (tn - 1) * bpr + SUB_BLOCKS);
    // SAFETY: the caller's features; every load reads a whole block checked above.
    unsafe {
        // A loop, not `array::from_fn`: a closure is compiled without the caller's target features.
        let mut d = [0.0f32; 4];
        for (di, blk) in d.iter_mut().zip(blks) {
            *di = f16_bits_to_f32(blk.d.to_bits());
        }
        for ib in 0..SUB_BLOCKS {
            let mut signed = [_mm256_setzero_si256(); 4];
            let mut abs = [_mm256_setzero_si256(); 4];
            let mut dw = [0.0f32; 4];
            for i in 0..4 {
                let qs: &[u8; 16] = blks[i].qs[16 * ib..16 * ib + 16].try_into().unwrap();
                signed[i] = lookup16(&IQ4_LEVELS, q4_nibbles(qs));
                abs[i] = _mm256_abs_epi8(signed[i]);
                dw[i] = d[i] * blks[i].scale(ib) as f32;
            }
            let dw = _mm_loadu_ps(dw.as_ptr());
            for (j, acc_j) in acc[..tn].iter_mut().enumerate() {
                let ab = &a[j * bpr + ib];
                let q = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                let isum = hsum4_epi32(
                    signed_dot(abs[0], signed[0], q),
                    signed_dot(abs[1], signed[1], q),
                    signed_dot(abs[2], signed[2], q),
                    signed_dot(abs[3], signed[3], q),
                );
                let scale = _mm_mul_ps(_mm_set1_ps(f16_bits_to_f32(ab.d.to_bits())), dw);
                *acc_j = _mm_fmadd_ps(_mm_cvtepi32_ps(isum), scale, *acc_j);
            }
        }
    }
}

/// One super-block of a row against the matching 8 activation blocks of `tn` tokens (`a`: the first token's,
/// the others `bpr` blocks apart), into each token's accumulator.
#[inline(always)]
unsafe fn super_block(
    blk: &BlockIQ4XS,
    a: &[BlockQ8_0],
    bpr: usize,
    tn: usize,
    acc: &mut [f32; TOKENS],
) {
    assert!(a.len() >= (tn - 1) * bpr + SUB_BLOCKS);
    // SAFETY: the caller's features; every load reads a whole block checked above.
    unsafe {
        let d = f16_bits_to_f32(blk.d.to_bits());
        for half in 0..2 {
            let mut signed = [_mm256_setzero_si256(); 4];
            let mut abs = [_mm256_setzero_si256(); 4];
            let mut dw = [0.0f32; 4];
            for i in 0..4 {
                let ib = 4 * half + i;
                let qs: &[u8; 16] = blk.qs[16 * ib..16 * ib + 16].try_into().unwrap();
                signed[i] = lookup16(&IQ4_LEVELS, q4_nibbles(qs));
                abs[i] = _mm256_abs_epi8(signed[i]);
                dw[i] = d * blk.scale(ib) as f32;
            }
            for (j, acc_j) in acc[..tn].iter_mut().enumerate() {
                let ab = &a[j * bpr + 4 * half..j * bpr + 4 * half + 4];
                let d: [__m256i; 4] = [
                    sub_dot(abs[0], signed[0], &ab[0]),
                    sub_dot(abs[1], signed[1], &ab[1]),
                    sub_dot(abs[2], signed[2], &ab[2]),
                    sub_dot(abs[3], signed[3], &ab[3]),
                ];
                let mut isum = [0i32; 4];
                _mm_storeu_si128(
                    isum.as_mut_ptr() as *mut __m128i,
                    hsum4_epi32(d[0], d[1], d[2], d[3]),
                );
                for i in 0..4 {
                    let scale = f16_bits_to_f32(ab[i].d.to_bits()) * dw[i];
                    *acc_j = (isum[i] as f32).mul_add(scale, *acc_j);
                }
            }
        }
    }
}

/// The 8 dword lanes of one sub-block's dot: `|w|` times the activation with `w`'s sign. (A function, not a
/// closure: closures are compiled without the caller's target features.)
#[inline(always)]
unsafe fn sub_dot(abs: __m256i, signed: __m256i, a: &BlockQ8_0) -> __m256i {
    // SAFETY: the caller's features; the load reads the block's 32 quants.
    unsafe {
        let q = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
        signed_dot(abs, signed, q)
    }
}

/// [`sub_dot`] on activation quants already loaded.
#[inline(always)]
unsafe fn signed_dot(abs: __m256i, signed: __m256i, q: __m256i) -> __m256i {
    // SAFETY: the caller's features.
    unsafe { madd_ones(_mm256_maddubs_epi16(abs, _mm256_sign_epi8(q, signed))) }
}
