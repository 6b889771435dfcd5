//! x86-64 kernels. The loop structure of each product is written once here, generic over small traits whose
//! methods are single instructions or short sequences; `avx2.rs` and `avx512.rs` implement the traits and wrap
//! the generic bodies in `#[target_feature]` functions. Every trait method and every body is
//! `#[inline(always)]`, so the whole product is compiled inside the wrapper with its features enabled: there is
//! no call, and no vector passed by value, across a feature boundary.
//!
//! Two shapes of quantized product:
//! - **few tokens** (decode, and the last tokens of a batch): one 32-byte block at a time, rows and tokens
//!   tiled so an activation block is loaded once for several rows and a weight block transformed once for
//!   several tokens; the 8 lanes of a block's integer dot are scaled and accumulated as floats and summed
//!   horizontally once per output. Memory-bound: the work per weight byte only has to stay below DRAM speed,
//!   and the rows are prefetched two tiles ahead into L2 (see `few_tile`). AVX-512 has its own Q4_0 version,
//!   four blocks per zmm (`avx512.rs`).
//! - **many tokens** (prompt processing): one lane per token. Activations are transposed once per call so that
//!   lane `j` of vector `k` holds bytes `4k..4k + 4` of token `j`'s block; a weight block is then 8 broadcast
//!   dwords. Each lane's integer sum is a whole block's dot product, so the float work per block (convert,
//!   scale, accumulate) is shared by 8 or 16 tokens instead of being repeated per token. A finished tile (rows
//!   x tokens) is transposed in registers and stored token-major, one store of its rows per token.
//!
//! Both formats run on unsigned-by-signed byte dots (`vpdpbusd`, or `vpmaddubsw` + `vpmaddwd`): Q4_0 nibbles are
//! used as they are (0..15) and corrected by `-8 * sum(activation block)`; Q8_0 weights are offset by 128 for
//! VNNI and corrected by `-128 * sum`, or (AVX2, where `vpmaddubsw` saturates at i16) split into `|w|` and the
//! sign moved onto the activation. Every per-block integer sum is exact; in the few-token kernels the correction
//! is spread over the lanes (each lane gets `-bias` times the sum of its own 4 activation bytes), so every float
//! lane is a true partial dot product and no larger than the terms it sums.
//!
//! Which shape runs is decided per call from the token count: whole vectors of tokens on the lane kernel, the
//! rest on the few-token kernel.
//!
//! The k-quant products (Q4_K, Q5_K, Q6_K against Q8_K) have the same two shapes but their own bodies, since a
//! 256-block carries per-group integer scales and a `bsums` term: `avx512/kquant.rs` and `avx2/kquant.rs`, with
//! what they share (scale unpacking, transposed activations) in `kquant.rs`.
//!
//! # Safety
//! Every `unsafe fn` here and in the two ISA files has one contract: it runs inside a `#[target_feature]`
//! wrapper of a set whose features `kernels::available` detected (AVX2, FMA and F16C for all; AVX-VNNI or
//! AVX-512 F/BW/VL/VNNI for those sets' own code), and every pointer it is given points at the bytes its doc
//! names (a whole block, 32 prepared bytes, 8 or 16 lanes). The `unsafe` blocks inside the small helpers and
//! trait methods only call intrinsics under that contract; the loops that compute pointers check lengths first
//! and say so where they do.

pub mod avx2;
pub mod avx512;
mod kquant;

use std::arch::x86_64::*;
use std::cell::UnsafeCell;

use half::{bf16, f16};
use quarry_quantize::blocks::{BlockQ4_0, BlockQ8_0, BlockQ8K};

use crate::kernels::ProductOut;

/// Per-thread buffers for transposed activations and prepared weights, reused across calls so that a product
/// never allocates once warm.
#[derive(Default)]
struct Scratch {
    /// Transposed activation dwords (many-token kernel).
    act: Vec<u32>,
    /// Activation block scales as f32.
    da: Vec<f32>,
    /// `-bias * sum(activation block)`, the correction for the unsigned weight operand.
    corr: Vec<i32>,
    /// Prepared weight blocks (many-token kernel).
    w: Vec<u8>,
    /// Weight block scales as f32 (many-token kernel).
    dw: Vec<f32>,
    /// Prepared k-quant group scales and min (or offset) pairs as integers (many-token kernel).
    wi: Vec<i32>,
}

thread_local! {
    static SCRATCH: UnsafeCell<Scratch> = UnsafeCell::new(Scratch::default());
}

/// This thread's scratch. A raw pointer rather than `with(|s| ...)` so that the kernel body is not inside a
/// closure, which would be compiled without the wrapper's target features.
/// SAFETY (for callers): kernels never call each other while holding it, so there is one live reference.
fn scratch() -> *mut Scratch {
    SCRATCH.with(|s| s.get())
}

/// The checks every product kernel starts with: whole rows of `bpr` blocks, tokens `t0..t1` within the
/// activations, and an output of exactly that shape (`kernels::check_shape`). Returns the token and row counts.
#[inline(always)]
fn tile_shape(
    w_blocks: usize,
    a_blocks: usize,
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &ProductOut,
) -> (usize, usize) {
    assert!(bpr > 0);
    let (n, rows) = (a_blocks / bpr, w_blocks / bpr);
    assert!(t0 <= t1 && t1 <= n);
    crate::kernels::check_shape(out, rows, n);
    (n, rows)
}

/// Sizes this thread's few-token buffers for rows of up to `max_blocks_per_row` blocks (see
/// [`crate::kernels::reserve_thread_scratch`]).
pub fn reserve_few_token_scratch(max_blocks_per_row: usize) {
    // Fewer tokens than one lane vector (16 at most) go to the few-token kernels: `gemm_few` here needs `da`
    // per token and block and `corr` 8 per block; AVX-512's Q4_0 `gemm_few_q4` 8 activation dwords per block and
    // 16 corrections and scales per started octet of blocks; AVX-512's Q4_K/Q5_K permuted activation copy 64
    // dwords per 256-block, which is the same 8 per 32 columns.
    let (tokens, bpr) = (16, max_blocks_per_row);
    let octet_lanes = bpr.div_ceil(8) * 16;
    // SAFETY: see `scratch`; no kernel is running on this thread.
    let s = unsafe { &mut *scratch() };
    grow(&mut s.da, tokens * bpr.max(octet_lanes));
    grow(&mut s.corr, tokens * (bpr * 8).max(octet_lanes));
    grow(&mut s.act, tokens * bpr * 8);
}

fn grow<T: Copy + Default>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Small helpers (AVX2 + F16C: every x86 set has them).

/// One f16 to f32 with `vcvtph2ps`: `half`'s own conversion re-checks CPU features on every call.
#[inline(always)]
unsafe fn f16_bits_to_f32(bits: u16) -> f32 {
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
}

#[inline(always)]
unsafe fn hsum_ps_256(v: __m256) -> f32 {
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// Activation row to Q8_0 with exactly the scalar reference's arithmetic: the same f32 `amax`, `d`, `1/d` and
/// product, rounded half to even by `vcvtps2dq` (the default MXCSR mode, which Rust never changes). The
/// reference maps NaN to 0 and clamps to +-127 (NaN or infinity only arise when `1/d` overflows for
/// a denormal-tiny block); both are reproduced before the conversion so the bytes match for every input.
#[inline(always)]
unsafe fn quantize_q8_0_avx2(x: &[f32], out: &mut [BlockQ8_0]) {
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let lim = _mm256_set1_ps(127.0);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (xs, block) in x.chunks_exact(32).zip(out.iter_mut()) {
            let p = xs.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            // |v| first: `maxps` returns its second operand when either is NaN, so a NaN input is skipped as
            // `f32::max` skips it.
            let mut m = _mm256_setzero_ps();
            for &vi in &v {
                m = _mm256_max_ps(_mm256_andnot_ps(sign, vi), m);
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
            let amax = _mm_cvtss_f32(m1);
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let dh = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(d));
            block.d = f16::from_bits(_mm_extract_epi16::<0>(dh) as u16);
            let idv = _mm256_set1_ps(id);
            let mut q = [_mm256_setzero_si256(); 4];
            for (qi, &vi) in q.iter_mut().zip(&v) {
                let y = _mm256_mul_ps(vi, idv);
                let y = _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
                let y = _mm256_min_ps(
                    _mm256_max_ps(y, _mm256_sub_ps(_mm256_setzero_ps(), lim)),
                    lim,
                );
                *qi = _mm256_cvtps_epi32(y);
            }
            let w01 = _mm256_packs_epi32(q[0], q[1]);
            let w23 = _mm256_packs_epi32(q[2], q[3]);
            let b = _mm256_packs_epi16(w01, w23);
            let b = _mm256_permutevar8x32_epi32(b, order);
            _mm256_storeu_si256(block.qs.as_mut_ptr() as *mut __m256i, b);
        }
    }
}

/// Activation row to Q8_K with exactly the reference's arithmetic (`quarry_quantize::blocks::quantize_q8_k`,
/// ggml's): the first value of largest magnitude sets `iscale = -127 / max`, each quant is ggml's `nearest_int`
/// reproduced bit for bit (add 1.5 * 2^23, keep the low mantissa bits) rather than `vcvtps2dq`, so even
/// non-finite products give the reference's byte, then `min(127)` and the truncation of `as i8` (a shift pair,
/// after which the saturating packs are exact). The group sums are those of the truncated bytes.
#[inline(always)]
unsafe fn quantize_q8_k_avx2(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(
        x.len(),
        out.len() * 256,
        "Q8_K: {} values for {} blocks",
        x.len(),
        out.len()
    );
    // SAFETY: every load reads 8 floats inside the 256 of `xs`; every store 16 bytes inside `block.qs`.
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        for (xs, block) in x.chunks_exact(256).zip(out.iter_mut()) {
            let p = xs.as_ptr();
            // |v|, NaN skipped: `maxps` returns its second operand when either is NaN.
            let mut m = _mm256_setzero_ps();
            for k in 0..32 {
                m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * k))), m);
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
            if amax == 0.0 {
                *block = bytemuck::Zeroable::zeroed();
                continue;
            }
            // The first value of that magnitude, as the reference's strict `>` keeps it.
            let av = _mm256_set1_ps(amax);
            let mut max = amax;
            for k in 0..32 {
                let v = _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * k)));
                let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, av));
                if hit != 0 {
                    max = xs[8 * k + hit.trailing_zeros() as usize];
                    break;
                }
            }
            let iscale = -127.0 / max;
            let is = _mm256_set1_ps(iscale);
            let magic = _mm256_set1_ps(12_582_912.0);
            let mant = _mm256_set1_epi32(0x007f_ffff);
            let half = _mm256_set1_epi32(0x0040_0000);
            let lim = _mm256_set1_epi32(127);
            for g in 0..16 {
                let mut q = [_mm256_setzero_si256(); 2];
                for (h, qh) in q.iter_mut().enumerate() {
                    let y = _mm256_add_ps(
                        _mm256_mul_ps(is, _mm256_loadu_ps(p.add(16 * g + 8 * h))),
                        magic,
                    );
                    let i = _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(y), mant), half);
                    let i = _mm256_min_epi32(i, lim);
                    *qh = _mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(i));
                }
                let lo = _mm_packs_epi32(
                    _mm256_castsi256_si128(q[0]),
                    _mm256_extracti128_si256::<1>(q[0]),
                );
                let hi = _mm_packs_epi32(
                    _mm256_castsi256_si128(q[1]),
                    _mm256_extracti128_si256::<1>(q[1]),
                );
                _mm_storeu_si128(
                    block.qs.as_mut_ptr().add(16 * g) as *mut __m128i,
                    _mm_packs_epi16(lo, hi),
                );
                let s = _mm_add_epi16(lo, hi);
                let s = _mm_add_epi16(s, _mm_unpackhi_epi64(s, s));
                let s = _mm_add_epi16(s, _mm_srli_epi64::<32>(s));
                let s = _mm_add_epi16(s, _mm_srli_epi32::<16>(s));
                block.bsums[g] = _mm_extract_epi16::<0>(s) as i16;
            }
            block.d = 1.0 / iscale;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Quantized products, few tokens: one block per 256-bit vector.

/// A weight format on one instruction set, for the few-token kernel.
pub(crate) trait BlockDot {
    type W: Copy;
    /// The activation correction: the integer dot is `dot(u, a) - BIAS * sum(a)`.
    const BIAS: i32;
    unsafe fn d_bits(w: &Self::W) -> u16;
    /// The weight block as the unsigned operand, plus whatever else `dot` needs (the raw signs for AVX2 Q8_0).
    unsafe fn load(w: *const Self::W) -> (__m256i, __m256i);
    /// `acc + ` the 8 lanes of the block's (uncorrected) integer dot with activation bytes `a`.
    unsafe fn dot(acc: __m256i, w: (__m256i, __m256i), a: __m256i) -> __m256i;
}

/// `W[r] . A[t]` for tokens `t0..t1`, tiling 4 rows x up to `TMAX` tokens.
#[inline(always)]
unsafe fn gemm_few<D: BlockDot, const TMAX: usize>(
    w: &[D::W],
    a: &[BlockQ8_0],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    let (_, rows) = tile_shape(w.len(), a.len(), bpr, t0, t1, out);
    // SAFETY: see `scratch`.
    let s = unsafe { &mut *scratch() };
    unsafe {
        // Per activation block: its scale, and the correction per lane: `-BIAS` times the sum of the 4 bytes
        // that lane covers. Correcting each lane (rather than the block total in one lane) keeps every lane an
        // unbiased partial dot product, so the float lanes stay as small as the terms they sum.
        let nt = t1 - t0;
        grow(&mut s.da, nt * bpr);
        grow(&mut s.corr, nt * bpr * 8);
        for t in 0..nt {
            for b in 0..bpr {
                let blk = &a[(t0 + t) * bpr + b];
                s.da[t * bpr + b] = f16_bits_to_f32(blk.d.to_bits());
                let c = if D::BIAS != 0 {
                    let q = _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i);
                    let sums = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(_mm256_set1_epi8(1), q),
                        _mm256_set1_epi16(1),
                    );
                    _mm256_mullo_epi32(sums, _mm256_set1_epi32(-D::BIAS))
                } else {
                    _mm256_setzero_si256()
                };
                _mm256_storeu_si256(
                    s.corr.as_mut_ptr().add((t * bpr + b) * 8) as *mut __m256i,
                    c,
                );
            }
        }
        let (da, corr) = (&s.da[..nt * bpr], &s.corr[..nt * bpr * 8]);
        let mut r = 0;
        while r < rows {
            if rows - r >= 4 {
                few_rows::<D, 4, TMAX>(w, a, bpr, r, t0, t1, da, corr, out);
                r += 4;
            } else {
                few_rows::<D, 1, TMAX>(w, a, bpr, r, t0, t1, da, corr, out);
                r += 1;
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn few_rows<D: BlockDot, const RT: usize, const TMAX: usize>(
    w: &[D::W],
    a: &[BlockQ8_0],
    bpr: usize,
    r0: usize,
    t0: usize,
    t1: usize,
    da: &[f32],
    corr: &[i32],
    out: &mut ProductOut,
) {
    let mut t = t0;
    while t < t1 {
        let left = t1 - t;
        unsafe {
            if left >= 4 && TMAX >= 4 {
                few_tile::<D, RT, 4>(w, a, bpr, r0, t, t0, da, corr, out);
                t += 4;
            } else if left >= 2 {
                few_tile::<D, RT, 2>(w, a, bpr, r0, t, t0, da, corr, out);
                t += 2;
            } else {
                few_tile::<D, RT, 1>(w, a, bpr, r0, t, t0, da, corr, out);
                t += 1;
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn few_tile<D: BlockDot, const RT: usize, const TT: usize>(
    w: &[D::W],
    a: &[BlockQ8_0],
    bpr: usize,
    r0: usize,
    t: usize,
    t0: usize,
    da: &[f32],
    corr: &[i32],
    out: &mut ProductOut,
) {
    // SAFETY (bounds): the caller keeps r0 + RT <= rows and t + TT <= n; every pointer below indexes block b < bpr
    // of one of those rows or tokens; `da` holds (t1 - t0) * bpr entries and `corr` 8 per entry.
    debug_assert!((r0 + RT) * bpr <= w.len() && (t + TT) * bpr <= a.len());
    debug_assert!((t - t0 + TT) * bpr <= da.len());
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); TT]; RT];
        let wp = w.as_ptr().add(r0 * bpr);
        let ap = a.as_ptr().add(t * bpr);
        let dap = da.as_ptr().add((t - t0) * bpr);
        let cp = corr.as_ptr().add((t - t0) * bpr * 8);
        for b in 0..bpr {
            let mut av = [_mm256_setzero_si256(); TT];
            let mut cv = [_mm256_setzero_si256(); TT];
            let mut dav = [0.0f32; TT];
            for j in 0..TT {
                av[j] = _mm256_loadu_si256((*ap.add(j * bpr + b)).qs.as_ptr() as *const __m256i);
                cv[j] = _mm256_loadu_si256(cp.add((j * bpr + b) * 8) as *const __m256i);
                dav[j] = *dap.add(j * bpr + b);
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let blk = wp.add(i * bpr + b);
                // The same block two row tiles ahead, into L2. The hardware prefetchers do not follow 4
                // interleaved row streams well (about 9 GB/s here against 25 for one stream); requesting the
                // tiles ahead into L2 (T1: more misses in flight than L1 allows) reaches the one-stream speed.
                _mm_prefetch::<_MM_HINT_T1>(blk.wrapping_add(2 * RT * bpr) as *const i8);
                let wv = D::load(blk);
                let dw = f16_bits_to_f32(D::d_bits(&*blk));
                for j in 0..TT {
                    let isum = D::dot(cv[j], wv, av[j]);
                    acc_i[j] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(isum),
                        _mm256_set1_ps(dw * dav[j]),
                        acc_i[j],
                    );
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            for (j, &acc_ij) in acc_i.iter().enumerate() {
                out.token(t + j)[r0 + i] = hsum_ps_256(acc_ij);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Quantized products, many tokens: one lane per token.

/// A weight format on one vector width and instruction set, for the many-token kernel.
pub(crate) trait LaneDot {
    type W: Copy;
    type I: Copy;
    type F: Copy;
    /// Tokens per vector.
    const N: usize;
    /// Rows computed together (bounded by the register count).
    const RW: usize;
    const BIAS: i32;
    /// Bytes of one prepared weight block.
    const W_BYTES: usize;
    unsafe fn d_bits(w: &Self::W) -> u16;
    /// Writes the block in the form `block` reads (unsigned operand, and signs if needed).
    unsafe fn prep(w: &Self::W, dst: *mut u8);
    /// `acc + ` each lane's dot of the prepared block `w` (broadcast) with the 8 transposed activation vectors.
    unsafe fn block(acc: Self::I, w: *const u8, s: *const u32) -> Self::I;
    unsafe fn load_i(p: *const i32) -> Self::I;
    unsafe fn load_f(p: *const f32) -> Self::F;
    unsafe fn zero_f() -> Self::F;
    unsafe fn splat_f(x: f32) -> Self::F;
    /// `fma(cvt(i), s, acc)`
    unsafe fn scale_acc(i: Self::I, s: Self::F, acc: Self::F) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn store_f(p: *mut f32, v: Self::F);
    /// Stores a whole tile token-major: `acc[i]` holds row `i`'s `N` tokens (`acc.len() == RW`), written as
    /// `p[j * ldo + i]` for every token `j < N` and row `i < RW`, by a transpose in registers and one `RW`-float
    /// store per token.
    unsafe fn store_tile(acc: &[Self::F], p: *mut f32, ldo: usize);
}

/// Tokens per pass over a row tile: the transposed activations of one pass (about 40 bytes per token and
/// block) stay in L2 while every row tile of the matrix streams past them.
const CHUNK_TOKENS: usize = 128;

/// Transposes the activation blocks of tokens `t0..t0 + groups * N` (tokens past `t1` are zero) into scratch:
/// for group g, block b: 8 vectors of N dwords (`act`), then N scales (`da`) and N corrections (`corr`).
/// Eight tokens at a time as an 8 x 8 dword transpose in registers: done per call for every token and block,
/// element by element it cost a quarter of a 128-row product.
#[inline(always)]
unsafe fn prep_acts<L: LaneDot>(
    a: &[BlockQ8_0],
    bpr: usize,
    t0: usize,
    t1: usize,
    groups: usize,
    s: &mut Scratch,
) {
    let nn = L::N;
    grow(&mut s.act, groups * bpr * 8 * nn);
    grow(&mut s.da, groups * bpr * nn);
    grow(&mut s.corr, groups * bpr * nn);
    // SAFETY: every x86 set has AVX2 and F16C (checked when the set was selected). Loads read block b < bpr of
    // token t < t1 <= n; stores write 8 lanes at offsets below groups * bpr * 8 * N (act) and
    // groups * bpr * N (da, corr), the sizes grown above.
    unsafe {
        let ones = _mm256_set1_epi8(1);
        let ones16 = _mm256_set1_epi16(1);
        let nbias = _mm256_set1_epi32(-L::BIAS);
        for g in 0..groups {
            for h in 0..nn / 8 {
                let tb = t0 + g * nn + h * 8;
                for b in 0..bpr {
                    let gb = g * bpr + b;
                    let mut r = [_mm256_setzero_si256(); 8];
                    let mut d = [0.0f32; 8];
                    for (j, (rj, dj)) in r.iter_mut().zip(d.iter_mut()).enumerate() {
                        if tb + j < t1 {
                            let blk = &a[(tb + j) * bpr + b];
                            *rj = _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i);
                            *dj = f16_bits_to_f32(blk.d.to_bits());
                        }
                    }
                    let cols = transpose_8x8(r);
                    let mut sums = _mm256_setzero_si256();
                    for (k, &c) in cols.iter().enumerate() {
                        _mm256_storeu_si256(
                            s.act.as_mut_ptr().add((gb * 8 + k) * nn + h * 8) as *mut __m256i,
                            c,
                        );
                        sums = _mm256_add_epi32(
                            sums,
                            _mm256_madd_epi16(_mm256_maddubs_epi16(ones, c), ones16),
                        );
                    }
                    let o = gb * nn + h * 8;
                    _mm256_storeu_si256(
                        s.corr.as_mut_ptr().add(o) as *mut __m256i,
                        _mm256_mullo_epi32(sums, nbias),
                    );
                    _mm256_storeu_ps(s.da.as_mut_ptr().add(o), _mm256_loadu_ps(d.as_ptr()));
                }
            }
        }
    }
}

/// Rows of 8 dwords to columns.
#[inline(always)]
unsafe fn transpose_8x8(r: [__m256i; 8]) -> [__m256i; 8] {
    unsafe {
        let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
        let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
        let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
        let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
        let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
        let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
        let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
        let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
        let u0 = _mm256_unpacklo_epi64(t0, t2);
        let u1 = _mm256_unpackhi_epi64(t0, t2);
        let u2 = _mm256_unpacklo_epi64(t1, t3);
        let u3 = _mm256_unpackhi_epi64(t1, t3);
        let u4 = _mm256_unpacklo_epi64(t4, t6);
        let u5 = _mm256_unpackhi_epi64(t4, t6);
        let u6 = _mm256_unpacklo_epi64(t5, t7);
        let u7 = _mm256_unpackhi_epi64(t5, t7);
        [
            _mm256_permute2x128_si256::<0x20>(u0, u4),
            _mm256_permute2x128_si256::<0x20>(u1, u5),
            _mm256_permute2x128_si256::<0x20>(u2, u6),
            _mm256_permute2x128_si256::<0x20>(u3, u7),
            _mm256_permute2x128_si256::<0x31>(u0, u4),
            _mm256_permute2x128_si256::<0x31>(u1, u5),
            _mm256_permute2x128_si256::<0x31>(u2, u6),
            _mm256_permute2x128_si256::<0x31>(u3, u7),
        ]
    }
}

/// Four rows of 8 tokens (`r[i]`, one ymm each) stored token-major: `p[j * ldo + i] = r[i][j]`, 8 stores of 4
/// floats.
#[inline(always)]
unsafe fn store_tile_4x8(r: &[__m256], p: *mut f32, ldo: usize) {
    unsafe {
        let s = transpose_4x4_lanes(r[0], r[1], r[2], r[3]);
        for (k, &sk) in s.iter().enumerate() {
            _mm_storeu_ps(p.add(k * ldo), _mm256_castps256_ps128(sk));
            _mm_storeu_ps(p.add((k + 4) * ldo), _mm256_extractf128_ps::<1>(sk));
        }
    }
}

/// Eight rows of 8 tokens stored token-major: 8 stores of 8 floats.
#[inline(always)]
unsafe fn store_tile_8x8(r: &[__m256], p: *mut f32, ldo: usize) {
    unsafe {
        let lo = transpose_4x4_lanes(r[0], r[1], r[2], r[3]);
        let hi = transpose_4x4_lanes(r[4], r[5], r[6], r[7]);
        for k in 0..4 {
            _mm256_storeu_ps(p.add(k * ldo), _mm256_permute2f128_ps::<0x20>(lo[k], hi[k]));
            _mm256_storeu_ps(
                p.add((k + 4) * ldo),
                _mm256_permute2f128_ps::<0x31>(lo[k], hi[k]),
            );
        }
    }
}

/// The 4 x 4 transposes within each 128-bit lane of four rows: lane `l` of result `k` holds token `4l + k` of
/// rows 0..4.
#[inline(always)]
unsafe fn transpose_4x4_lanes(r0: __m256, r1: __m256, r2: __m256, r3: __m256) -> [__m256; 4] {
    unsafe {
        let t0 = _mm256_unpacklo_ps(r0, r1);
        let t1 = _mm256_unpackhi_ps(r0, r1);
        let t2 = _mm256_unpacklo_ps(r2, r3);
        let t3 = _mm256_unpackhi_ps(r2, r3);
        [
            _mm256_shuffle_ps::<0x44>(t0, t2),
            _mm256_shuffle_ps::<0xee>(t0, t2),
            _mm256_shuffle_ps::<0x44>(t1, t3),
            _mm256_shuffle_ps::<0xee>(t1, t3),
        ]
    }
}

/// `W[r] . A[t]` for tokens `t0..t1` (whole vectors of `N` tokens, the last one padded).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_lanes<L: LaneDot, const RW: usize>(
    w: &[L::W],
    a: &[BlockQ8_0],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    assert!(RW == L::RW && L::N <= 16 && RW <= 8);
    let (_, rows) = tile_shape(w.len(), a.len(), bpr, t0, t1, out);
    let nn = L::N;
    let chunk_groups = CHUNK_TOKENS.div_ceil(nn);
    // SAFETY: see `scratch`.
    let s = unsafe { &mut *scratch() };
    {
        let mut c0 = t0;
        while c0 < t1 {
            let groups = (t1 - c0).div_ceil(nn).min(chunk_groups);
            let c1 = (c0 + groups * nn).min(t1);
            // SAFETY: AVX2/F16C present (see `prep_acts`); the scratch is sized there.
            unsafe { prep_acts::<L>(a, bpr, c0, c1, groups, s) };
            grow(&mut s.w, RW * bpr * L::W_BYTES);
            grow(&mut s.dw, RW * bpr);
            let mut r0 = 0;
            while r0 < rows {
                let nr = (rows - r0).min(RW);
                // Prepared weights for rows r0..r0 + nr; missing rows of the last tile are zero (scale 0).
                for i in 0..RW {
                    for b in 0..bpr {
                        let dst =
                            &mut s.w[(i * bpr + b) * L::W_BYTES..(i * bpr + b + 1) * L::W_BYTES];
                        if i < nr {
                            let blk = &w[(r0 + i) * bpr + b];
                            // SAFETY: `dst` holds W_BYTES bytes; the set's features are present.
                            unsafe {
                                L::prep(blk, dst.as_mut_ptr());
                                s.dw[i * bpr + b] = f16_bits_to_f32(L::d_bits(blk));
                            }
                        } else {
                            dst.fill(0);
                            s.dw[i * bpr + b] = 0.0;
                        }
                    }
                }
                for g in 0..groups {
                    let tg = c0 + g * nn;
                    // SAFETY: scratch indices are within the sizes grown above: group g < groups, block
                    // b < bpr, row i < RW; the features are those of the set that selected this kernel.
                    let acc = unsafe {
                        let mut acc = [L::zero_f(); RW];
                        for b in 0..bpr {
                            let gb = g * bpr + b;
                            let sp = s.act.as_ptr().add(gb * 8 * nn);
                            let corr = L::load_i(s.corr.as_ptr().add(gb * nn));
                            let da = L::load_f(s.da.as_ptr().add(gb * nn));
                            for (i, acc_i) in acc.iter_mut().enumerate() {
                                let isum = L::block(
                                    corr,
                                    s.w.as_ptr().add((i * bpr + b) * L::W_BYTES),
                                    sp,
                                );
                                let scale =
                                    L::mul(da, L::splat_f(*s.dw.get_unchecked(i * bpr + b)));
                                *acc_i = L::scale_acc(isum, scale, *acc_i);
                            }
                        }
                        acc
                    };
                    let valid = (t1 - tg).min(nn);
                    if valid == nn && nr == RW {
                        // SAFETY: tokens tg..tg + N <= t1 <= n and rows r0..r0 + RW <= rows, all inside the
                        // window `tile_shape` checked.
                        let ldo = out.stride();
                        unsafe { L::store_tile(&acc, out.as_mut_ptr().add(tg * ldo + r0), ldo) };
                    } else {
                        // A partial tile (the last rows or tokens): through a buffer, writing only what exists.
                        let mut tmp = [0.0f32; 16 * 8];
                        for (acc_i, row) in acc.iter().zip(tmp.chunks_exact_mut(16)).take(nr) {
                            // SAFETY: `row` holds 16 >= N floats.
                            unsafe { L::store_f(row.as_mut_ptr(), *acc_i) };
                        }
                        for j in 0..valid {
                            for (i, o) in out.token(tg + j)[r0..r0 + nr].iter_mut().enumerate() {
                                *o = tmp[i * 16 + j];
                            }
                        }
                    }
                }
                r0 += RW;
            }
            c0 = c1;
        }
    }
}

/// The whole product: whole vectors of tokens on the lane kernel, the rest on the few-token kernel.
#[inline(always)]
unsafe fn gemm_quant<F: BlockDot, L: LaneDot<W = F::W>, const RW: usize, const TMAX: usize>(
    w: &[F::W],
    a: &[BlockQ8_0],
    bpr: usize,
    mut out: ProductOut,
) {
    if bpr == 0 || a.is_empty() || w.is_empty() {
        return;
    }
    let n = a.len() / bpr;
    let lane_tokens = if n >= L::N { n / L::N * L::N } else { 0 };
    unsafe {
        if lane_tokens > 0 {
            gemm_lanes::<L, RW>(w, a, bpr, 0, lane_tokens, &mut out);
        }
        if lane_tokens < n {
            gemm_few::<F, TMAX>(w, a, bpr, lane_tokens, n, &mut out);
        }
    }
}

/// Unsigned Q4_0 nibbles in activation order: bytes 0..16 are the low nibbles (weights 0..15), 16..32 the high.
#[inline(always)]
unsafe fn q4_nibbles(w: &BlockQ4_0) -> __m256i {
    unsafe {
        let x = _mm_loadu_si128(w.qs.as_ptr() as *const __m128i);
        let m = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(x, m);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), m);
        _mm256_set_m128i(hi, lo)
    }
}

#[inline(always)]
unsafe fn q8_bytes(w: &BlockQ8_0) -> __m256i {
    unsafe { _mm256_loadu_si256(w.qs.as_ptr() as *const __m256i) }
}

// ---------------------------------------------------------------------------------------------------------------
// Float products.

/// One float vector width.
pub(crate) trait FloatLanes {
    type F: Copy;
    const N: usize;
    unsafe fn zero() -> Self::F;
    unsafe fn splat(x: f32) -> Self::F;
    unsafe fn load(p: *const f32) -> Self::F;
    unsafe fn load_f16(p: *const u16) -> Self::F;
    unsafe fn load_bf16(p: *const u16) -> Self::F;
    unsafe fn store(p: *mut f32, v: Self::F);
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn sum(v: Self::F) -> f32;
}

/// A float weight type: how a vector of it is loaded as f32.
pub(crate) trait FloatWeight: Copy {
    unsafe fn load<L: FloatLanes>(p: *const Self) -> L::F;
    fn to_f32(self) -> f32;
}

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl FloatWeight for f32 {
    #[inline(always)]
    unsafe fn load<L: FloatLanes>(p: *const f32) -> L::F {
        unsafe { L::load(p) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl FloatWeight for f16 {
    #[inline(always)]
    unsafe fn load<L: FloatLanes>(p: *const f16) -> L::F {
        unsafe { L::load_f16(p as *const u16) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // Tails only (fewer than one vector per row).
        f16::to_f32(self)
    }
}

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl FloatWeight for bf16 {
    #[inline(always)]
    unsafe fn load<L: FloatLanes>(p: *const bf16) -> L::F {
        unsafe { L::load_bf16(p as *const u16) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// `W[r] . A[t]`, tiling 4 rows x 2 tokens (one accumulator each), remainders by 1.
#[inline(always)]
unsafe fn gemm_float<L: FloatLanes, W: FloatWeight>(
    w: &[W],
    a: &[f32],
    cols: usize,
    mut out: ProductOut,
) {
    if cols == 0 {
        return;
    }
    let n = a.len() / cols;
    let rows = w.len() / cols;
    crate::kernels::check_shape(&out, rows, n);
    let mut r = 0;
    while r < rows {
        let rt = if rows - r >= 4 { 4 } else { 1 };
        let mut t = 0;
        while t < n {
            // SAFETY: r + rt <= rows, t + tt <= n; the tile reads whole rows of `w` and `a` within bounds.
            unsafe {
                match (rt, n - t >= 2) {
                    (4, true) => float_tile::<L, W, 4, 2>(w, a, cols, r, t, &mut out),
                    (4, false) => float_tile::<L, W, 4, 1>(w, a, cols, r, t, &mut out),
                    (_, true) => float_tile::<L, W, 1, 2>(w, a, cols, r, t, &mut out),
                    (_, false) => float_tile::<L, W, 1, 1>(w, a, cols, r, t, &mut out),
                }
            }
            t += if n - t >= 2 { 2 } else { 1 };
        }
        r += rt;
    }
}

#[inline(always)]
unsafe fn float_tile<L: FloatLanes, W: FloatWeight, const RT: usize, const TT: usize>(
    w: &[W],
    a: &[f32],
    cols: usize,
    r0: usize,
    t0: usize,
    out: &mut ProductOut,
) {
    debug_assert!((r0 + RT) * cols <= w.len() && (t0 + TT) * cols <= a.len());
    let body = cols / L::N * L::N;
    unsafe {
        let wp = w.as_ptr().add(r0 * cols);
        let ap = a.as_ptr().add(t0 * cols);
        let mut acc = [[L::zero(); TT]; RT];
        let mut c = 0;
        while c < body {
            let mut av = [L::zero(); TT];
            for (j, avj) in av.iter_mut().enumerate() {
                *avj = L::load(ap.add(j * cols + c));
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let p = wp.add(i * cols + c);
                // Two row tiles ahead into L2, as in the quantized kernels.
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(2 * RT * cols) as *const i8);
                let wv = W::load::<L>(p);
                for j in 0..TT {
                    acc_i[j] = L::fma(wv, av[j], acc_i[j]);
                }
            }
            c += L::N;
        }
        for (i, acc_i) in acc.iter().enumerate() {
            for (j, &acc_ij) in acc_i.iter().enumerate() {
                let mut s = L::sum(acc_ij);
                for k in body..cols {
                    s += (*wp.add(i * cols + k)).to_f32() * *ap.add(j * cols + k);
                }
                out.token(t0 + j)[r0 + i] = s;
            }
        }
    }
}

/// `y += alpha * x`, rounded as the scalar loop rounds (a product, then a sum), so every set gives the same
/// bits.
#[inline(always)]
unsafe fn axpy_f32<L: FloatLanes>(alpha: f32, x: &[f32], y: &mut [f32]) {
    let len = x.len().min(y.len());
    let body = len / L::N * L::N;
    // SAFETY: every access is below `body <= len`.
    unsafe {
        let al = L::splat(alpha);
        let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        while i < body {
            L::store(
                yp.add(i),
                L::add(L::load(yp.add(i)), L::mul(al, L::load(xp.add(i)))),
            );
            i += L::N;
        }
    }
    for k in body..len {
        y[k] += alpha * x[k];
    }
}
