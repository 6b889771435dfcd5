//! x86-64 kernels. The loop structure of each product is written once, here and in `kquant.rs`, generic over
//! small traits whose methods are single instructions or short sequences; `avx2.rs` and `avx512.rs` (with their
//! `kquant.rs`) implement the traits and wrap the generic bodies in `#[target_feature]` functions. Every trait
//! method and every body is `#[inline(always)]`, so the whole product is compiled inside the wrapper with its
//! features enabled: there is no call, and no vector passed by value, across a feature boundary.
//!
//! The traits:
//! - `Lanes`: one vector width (`avx2::Ymm`, `avx512::Zmm`): f32 and i32 lanes, loads, the integer-to-float
//!   scaling step and the token-major tile store. The lane kernels below and `axpy_f32` are written in it.
//! - `FloatLanes`: the accumulators of the float products (`avx2::Ymm`, `avx2::YmmPair`, `avx512::Zmm`).
//! - `ByteDot`: an instruction set's u8 x i8 byte dot, on 256 bits and at its lane width, and the height of its
//!   lane tiles (`avx2::Avx2`, `avx2::AvxVnni`, `avx512::Vnni512`, `avx512::Vnni256`).
//! - `BlockDot` and `LaneDot`: a 32-block format on one instruction set, for the two shapes below. `Bytes<W, D>`
//!   is both for Q4_0 on every byte dot and Q8_0 on the VNNI ones (`Unsigned32`: the weights as unsigned bytes);
//!   AVX2's Q8_0 and IQ4_NL are `avx2::Sign`.
//! - `kquant::KDot` and `kquant::KQuant`: the same for the k-quants (`kquant.rs`).
//!
//! So a new instruction set is a `Lanes` width (if it brings one), a `ByteDot` (and `KDot`) impl and its
//! entries; a new format a `BlockDot` + `LaneDot` (or `KQuant`) impl.
//!
//! Two shapes of quantized product, each with one driver:
//! - **few tokens** (decode, and the last tokens of a batch): tiles of up to 4 rows x 4 tokens, walked by
//!   `few_tiles` over a `FewTile` context: `FewBlocks` here, AVX-512's Q4_0 (four blocks per zmm) in `avx512.rs`,
//!   the k-quants' in `kquant.rs`. For the 32-blocks one block at a time: an activation block is loaded once for
//!   several rows and a weight block transformed once for several tokens; the 8 lanes of each (row, token)'s
//!   block dot are reduced to the exact integer, four rows at once (`hsum4_epi32`), and accumulated into the
//!   token's 4-row accumulator with the lane kernel's float step. Memory-bound: the work per weight byte only
//!   has to stay below DRAM speed, and the rows are prefetched ahead into L2 (two row tiles ahead in
//!   `FewBlocks`, `PREFETCH_BYTES` in the others).
//! - **many tokens** (prompt processing): one lane per token, `gemm_lanes` over a `LaneKernel` (`BlockLanes`
//!   for the 32-blocks, `kquant::KLanes`). Activations are transposed once per chunk of tokens so that lane `j`
//!   of vector `k` holds bytes `4k..4k + 4` of token `j`'s block; a weight block, prepared once per row tile, is
//!   then 8 broadcast dwords. Each lane's integer sum is a whole block's dot product, so the float work per
//!   block (convert, scale, accumulate) is shared by 8 or 16 tokens instead of being repeated per token. A
//!   finished tile (rows x tokens) is transposed in registers and stored token-major, one store of its rows per
//!   token (`store_lanes`).
//!
//! Both 32-block formats run on unsigned-by-signed byte dots (`vpdpbusd`, or `vpmaddubsw` + `vpmaddwd`): Q4_0
//! nibbles are used as they are (0..15) and corrected by `-8 * sum(activation block)`; Q8_0 weights are offset by
//! 128 for VNNI and corrected by `-128 * sum`, or (AVX2, where `vpmaddubsw` saturates at i16) split into `|w|` and
//! the sign moved onto the activation. Every per-block integer sum is exact; in `FewBlocks` the correction is
//! spread over the lanes (each lane gets `-bias` times the sum of its own 4 activation bytes) and is where the
//! dot starts from, so that the 8 lanes sum to the block's exact dot.
//!
//! Which shape runs is decided per call from the token count, by each set's `gemm_quant` (and the k-quants'
//! `gemm`): whole vectors of tokens on the lane kernel, the rest on the few-token kernel (or, on AVX-512, on
//! narrower lanes when enough are left).
//!
//! # Batch invariance
//! Which kernel and tile compute an output never changes its bits, so a token's results are the same alone or
//! among any others, at any position of the batch, and whichever rows a thread's share holds. The lane kernels'
//! float steps are the reference: per block, in block order, the block's exact integer sum converted and
//! accumulated, `acc = fma(cvt(isum), da * dw, acc)` from `acc = 0` (the k-quants: `KLanes::tile`'s steps). Both
//! lane widths (zmm and ymm, AVX2's lanes for AVX-512's k-quant remainders) take the same steps per lane, and
//! every few-token kernel reduces each block's integer lanes to the exact sum first and then takes exactly those
//! steps, with the same integer and the same f32 scale (`dw * da` equals `da * dw`: f32 multiplication
//! commutes): `FewBlocks`, `avx512`'s Q4_0 tiles, `kquant::FewK`. Nothing is summed across blocks horizontally
//! in float. The float products give each output its own accumulator, in every tile the same way
//! (`gemm_float`); AVX-512's one-token ones use ymm pairs with its zmm products' bits (`FloatLanes`).
//!
//! # Safety
//! Every `unsafe fn` here and in the two ISA files has one contract: it runs inside a `#[target_feature]`
//! wrapper of a set whose features `kernels::available` detected (AVX2, FMA and F16C for all; AVX-VNNI or
//! AVX-512 F/BW/VL/VNNI for those sets' own code), and every pointer it is given points at the bytes its doc
//! names (a whole block, 32 prepared bytes, 8 or 16 lanes). The `unsafe` blocks inside the small helpers and
//! trait methods only call intrinsics under that contract; the loops that compute pointers check lengths first
//! and say so where they do.

/// A set's table from the entries its module defines (`target_feature_entries!`), which every x86 set names
/// alike.
macro_rules! x86_set {
    ($name:literal, $ops:expr) => {
        x86_set!($name, $ops, None, None, None, None, None, None)
    };
    (
        $name:literal,
        $ops:expr,
        $q4_0_interleaved:expr,
        $q8_0_interleaved:expr,
        $iq4_nl_interleaved:expr,
        $iq4_xs_interleaved:expr,
        $q4_k_interleaved:expr,
        $q6_k_interleaved:expr
    ) => {
        $crate::kernels::Kernels {
            name: $name,
            quantize_q8_0,
            gemm_q8_0,
            gemm_q4_0,
            gemm_q4_0_interleaved: $q4_0_interleaved,
            gemm_q8_0_interleaved: $q8_0_interleaved,
            gemm_iq4_nl,
            gemm_iq4_nl_interleaved: $iq4_nl_interleaved,
            gemm_iq4_xs,
            gemm_iq4_xs_interleaved: $iq4_xs_interleaved,
            quantize_q8_k,
            gemm_q4_k,
            gemm_q4_k_interleaved: $q4_k_interleaved,
            gemm_q5_k,
            gemm_q6_k,
            gemm_q6_k_interleaved: $q6_k_interleaved,
            gemm_f32,
            gemm_f16,
            gemm_bf16,
            axpy_f32,
            ops: $ops,
        }
    };
}

/// A `vpdpbusd` byte dot (a `ByteDot` with `VNNI`): `$dot` on 256 bits for the few-token kernels, `$lanes` at the
/// width `$l` of lane tiles of `$rw` rows. AVX-VNNI's and AVX-512's two widths differ in nothing else.
macro_rules! vnni_byte_dot {
    ($(#[$doc:meta])* $name:ident: $l:ty, $rw:literal, $dot:ident, $lanes:ident) => {
        $(#[$doc])*
        pub(crate) struct $name;

        // SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller.
        impl $crate::kernels::x86::ByteDot for $name {
            type L = $l;
            const RW: usize = $rw;
            const VNNI: bool = true;
            #[inline(always)]
            unsafe fn dot(acc: __m256i, u: __m256i, a: __m256i) -> __m256i {
                unsafe { $dot(acc, u, a) }
            }
            #[inline(always)]
            unsafe fn dot_lanes(
                acc: <$l as $crate::kernels::x86::Lanes>::I,
                u: <$l as $crate::kernels::x86::Lanes>::I,
                a: <$l as $crate::kernels::x86::Lanes>::I,
            ) -> <$l as $crate::kernels::x86::Lanes>::I {
                unsafe { $lanes(acc, u, a) }
            }
        }
    };
}

pub mod amx;
pub mod avx2;
pub mod avx512;
mod iq4_xs;
mod k_row_lanes;
mod kquant;
mod row_lanes;

use std::arch::x86_64::*;
use std::cell::UnsafeCell;
use std::marker::PhantomData;

use half::{bf16, f16};
use quarry_quantize::blocks::{BlockIQ4NL, BlockQ4_0, BlockQ8_0, BlockQ8K};

use crate::kernels::ProductOut;
use crate::kernels::stream::StreamEnd;

use avx2::transpose_8x8;

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

/// Sizes this thread's buffers for every product over rows of up to `max_cols` weights (see
/// [`crate::kernels::reserve_thread_scratch`]): afterwards no product grows them, however many tokens it gets and
/// whichever thread runs it.
pub fn reserve_scratch(max_cols: usize) {
    // The largest `grow` of each buffer, with `b` 32-blocks per row (a 256-block's buffers are 8 times a
    // 32-block's, so k-quant bounds are the same per column), `F` = 16 tokens for the few-token kernels (fewer
    // than one lane vector) and `T` for the lane kernels (one chunk of `CHUNK_TOKENS`, rounded up to whole
    // vectors of at most 16 tokens):
    // - `act`: lane kernels 8 dwords per token and block (8T·b); few-token `gemm_few` 8F·b, AVX-512's
    //   `gemm_few_q4` and the k-quant activation permute the same.
    // - `da`: lane kernels T·b; `gemm_few` and `gemm_rows16` F·b; `gemm_few_q4` 32 per token and started octet.
    // - `corr`: lane kernels T·b; `gemm_few` 8F·b; `gemm_rows16` F·b; `gemm_few_q4` as `da`.
    // - `k_row_lanes` (interleaved Q4_K), per chunk of 64 tokens: `da` one per token and 256-block, `corr` four
    //   (within the lane kernels' bounds).
    // - `w`, `dw`, `wi`: one tile of at most 8 rows of prepared weights: 64 bytes per 32-block (AVX2) or 256 per
    //   256-block, 1 scale per 32-block or 2 per 256-block, `kquant::WI` integers per 256-block.
    let b = max_cols.div_ceil(32);
    let (f, t) = (16, CHUNK_TOKENS + 16);
    let octet_lanes = f * b.div_ceil(8) * 32;
    // SAFETY: see `scratch`; no kernel is running on this thread.
    let s = unsafe { &mut *scratch() };
    grow(&mut s.act, t * b * 8);
    grow(&mut s.da, (t * b).max(octet_lanes));
    grow(&mut s.corr, (t * b).max(f * b * 8).max(octet_lanes));
    grow(&mut s.w, 8 * b * 64);
    grow(&mut s.dw, 8 * b);
    // The tile kernels (`amx`): per pass of `amx::CHUNK_TOKENS`, `w` holds the A tiles (32 bytes per token and
    // 32-block), `da` a scale per token and 32-block (k-quants: per 256-block), `dw` 32 accumulators per token.
    let at = amx::CHUNK_TOKENS;
    grow(&mut s.w, at * b * 32);
    grow(&mut s.da, at * b);
    grow(&mut s.dw, at * 32);
    grow(&mut s.wi, 8 * max_cols.div_ceil(256) * kquant::WI);
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

/// `[sum(a), sum(b), sum(c), sum(d)]` of four vectors of 8 i32 lanes: the exact integer sums of four block dots
/// (integer addition is associative, so the order of the adds does not matter), reduced together so that the
/// shuffles are shared.
#[inline(always)]
unsafe fn hsum4_epi32(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m128i {
    unsafe {
        // Per 128-bit lane: [a01, a23, b01, b23], [c01, c23, d01, d23], then [a0..4, b0..4, c0..4, d0..4].
        let abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
        _mm_add_epi32(
            _mm256_castsi256_si128(abcd),
            _mm256_extracti128_si256::<1>(abcd),
        )
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
// Vector widths and instruction sets: what the generic bodies below are written in.

/// One vector width: `N` f32 lanes (`F`) and `N` i32 lanes (`I`), and the operations on them that the lane
/// kernels (one token per lane) and `axpy_f32` are written in. `avx2::Ymm` (every x86 set has it) and
/// `avx512::Zmm`.
pub(crate) trait Lanes {
    type F: Copy;
    type I: Copy;
    /// Lanes per vector.
    const N: usize;
    unsafe fn zero() -> Self::F;
    unsafe fn splat(x: f32) -> Self::F;
    unsafe fn load(p: *const f32) -> Self::F;
    unsafe fn store(p: *mut f32, v: Self::F);
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn zero_i() -> Self::I;
    unsafe fn load_i(p: *const i32) -> Self::I;
    /// The dword at `p` in every lane.
    unsafe fn bcast(p: *const u8) -> Self::I;
    /// `a - 32 * b`.
    unsafe fn sub_32x(a: Self::I, b: Self::I) -> Self::I;
    /// `fma(cvt(i), s, acc)`: an integer sum converted, scaled and accumulated.
    unsafe fn scale_acc(i: Self::I, s: Self::F, acc: Self::F) -> Self::F;
    /// Stores a whole lane tile token-major: `acc[i]` holds row `i`'s `N` tokens, written as `p[j * ldo + i]`
    /// for every token `j < N` and row `i < RW`, by a transpose in registers and one `RW`-float store per token.
    unsafe fn store_tile<const RW: usize>(acc: &[Self::F; RW], p: *mut f32, ldo: usize);
}

/// The integer vector of a byte dot's lane width.
type IOf<D> = <<D as ByteDot>::L as Lanes>::I;

/// An instruction set's byte dot: unsigned bytes times signed bytes, four products summed into each i32 lane
/// (`vpdpbusd`, or AVX2's `vpmaddubsw` + `vpmaddwd` by ones), at 256 bits for the few-token kernels and at the
/// width `L` of its lane kernels. `avx2::Avx2`, `avx2::AvxVnni`, `avx512::Vnni512` (zmm lanes) and
/// `avx512::Vnni256` (ymm lanes, for AVX-512's short remainders).
pub(crate) trait ByteDot {
    type L: Lanes;
    /// Rows per lane tile (bounded by the register count).
    const RW: usize;
    /// Whether the dot is `vpdpbusd`, exact for every unsigned byte (as Q8_0 weights offset by 128 need).
    const VNNI: bool;
    /// `acc +` the dot of each dword of `u` (unsigned) with that of `a` (signed): exact for `u` below 128 (every
    /// byte with VNNI).
    unsafe fn dot(acc: __m256i, u: __m256i, a: __m256i) -> __m256i;
    /// The same at the lane width.
    unsafe fn dot_lanes(acc: IOf<Self>, u: IOf<Self>, a: IOf<Self>) -> IOf<Self>;
    /// `acc +` each lane's dot of the 32 prepared bytes at `w` (dword `k` broadcast) with the 8 transposed
    /// activation vectors at `s` (`N` dwords apart), as exact as `dot`.
    #[inline(always)]
    unsafe fn block(acc: IOf<Self>, w: *const u8, s: *const u32) -> IOf<Self> {
        unsafe {
            let mut acc = acc;
            for k in 0..8 {
                let a = Self::L::load_i(s.add(Self::L::N * k) as *const i32);
                acc = Self::dot_lanes(acc, Self::L::bcast(w.add(4 * k)), a);
            }
            acc
        }
    }
    /// `block` for unsigned bytes below 16 (Q4_0's nibbles), which AVX2 sums in i16 before widening.
    #[inline(always)]
    unsafe fn block_nibbles(acc: IOf<Self>, w: *const u8, s: *const u32) -> IOf<Self> {
        unsafe { Self::block(acc, w, s) }
    }
}

/// The 32-weight blocks: their f16 scale.
pub(crate) trait Block32: Copy {
    fn d_bits(&self) -> u16;
}

impl Block32 for BlockQ8_0 {
    #[inline(always)]
    fn d_bits(&self) -> u16 {
        self.d.to_bits()
    }
}

impl Block32 for BlockQ4_0 {
    #[inline(always)]
    fn d_bits(&self) -> u16 {
        self.d.to_bits()
    }
}

impl Block32 for BlockIQ4NL {
    #[inline(always)]
    fn d_bits(&self) -> u16 {
        self.d.to_bits()
    }
}

/// Requests lines `lines` (64 bytes each) from stream address `p` on into L2, where `stream` places them (in
/// the call's slice, or on into the next one): the row lanes' requests ahead of their reads.
#[inline(always)]
fn request_lines(stream: &StreamEnd, p: usize, lines: std::ops::Range<usize>) {
    for line in lines {
        if let Some(line) = stream.ahead(p.wrapping_add(64 * line)) {
            // SAFETY: SSE is part of x86_64; a prefetch never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(line) };
        }
    }
}

/// Requests the first `PREFETCH_BYTES` of `blocks` weight blocks into L2: the first tiles of a few-token kernel
/// whose loop requests `PREFETCH_BYTES` ahead of what it reads.
#[inline(always)]
unsafe fn prefetch_head<W>(w: &[W], blocks: usize) {
    let head = w.as_ptr() as *const i8;
    let bytes = (blocks * size_of::<W>()).min(PREFETCH_BYTES);
    for off in (0..bytes).step_by(64) {
        // SAFETY: a prefetch never faults; the address wraps rather than being dereferenced.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(head.wrapping_add(off)) };
    }
}

/// Bytes of weights the few-token kernels of AVX-512 Q4_0 and of the k-quants request ahead of the ones they
/// read: enough misses in flight to cover DRAM latency at full bandwidth (the same distance as the Q8_0 kernel's
/// two tiles of 4 rows x 1088 bytes).
const PREFETCH_BYTES: usize = 8192;

// ---------------------------------------------------------------------------------------------------------------
// Quantized products, few tokens.

/// A few-token kernel over its inputs and output: the tile of rows `r..r + RT` x tokens `t..t + TT`, each
/// output computed and written whole. The caller (`few_tiles`) keeps every tile inside the shape the kernel
/// checked (`tile_shape`), which the tile's loads and stores rely on.
pub(crate) trait FewTile {
    unsafe fn tile<const RT: usize, const TT: usize>(&mut self, r: usize, t: usize);
}

/// Rows `0..rows` x tokens `t0..t1` as tiles of 4 rows (single rows at the end) by 4 tokens (if `TMAX` is 4),
/// then 2, then 1, in that order. The caller has checked the shape (`tile_shape`).
#[inline(always)]
unsafe fn few_tiles<T: FewTile, const TMAX: usize>(k: &mut T, rows: usize, t0: usize, t1: usize) {
    let mut r = 0;
    while r < rows {
        // SAFETY: every tile lies within rows `0..rows` and tokens `t0..t1`.
        unsafe {
            if rows - r >= 4 {
                few_row_tiles::<T, 4, TMAX>(k, r, t0, t1);
                r += 4;
            } else {
                few_row_tiles::<T, 1, TMAX>(k, r, t0, t1);
                r += 1;
            }
        }
    }
}

#[inline(always)]
unsafe fn few_row_tiles<T: FewTile, const RT: usize, const TMAX: usize>(
    k: &mut T,
    r: usize,
    t0: usize,
    t1: usize,
) {
    let mut t = t0;
    while t < t1 {
        let left = t1 - t;
        // SAFETY: tokens t..t + TT <= t1, rows r..r + RT as the caller checked.
        unsafe {
            if left >= 4 && TMAX >= 4 {
                k.tile::<RT, 4>(r, t);
                t += 4;
            } else if left >= 2 {
                k.tile::<RT, 2>(r, t);
                t += 2;
            } else {
                k.tile::<RT, 1>(r, t);
                t += 1;
            }
        }
    }
}

/// A weight format on one instruction set, for the few-token kernel: one 32-block per 256-bit vector.
pub(crate) trait BlockDot {
    type W: Block32;
    /// The activation correction: the integer dot is `dot(u, a) - BIAS * sum(a)`.
    const BIAS: i32;
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
        // that lane covers, the accumulator each lane's dot starts from (the lanes then sum to the block's
        // exact integer dot).
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
        let mut tiles = FewBlocks::<D> {
            w,
            a,
            bpr,
            t0,
            da: &s.da[..nt * bpr],
            corr: &s.corr[..nt * bpr * 8],
            out: out.reborrow(),
        };
        few_tiles::<_, TMAX>(&mut tiles, rows, t0, t1);
    }
}

/// The few-token tiles of a 32-block product: the weights and activations, and the activation scales and lane
/// corrections of tokens `t0..` (`(t1 - t0) * bpr` entries, 8 corrections each).
struct FewBlocks<'a, D: BlockDot> {
    w: &'a [D::W],
    a: &'a [BlockQ8_0],
    bpr: usize,
    t0: usize,
    da: &'a [f32],
    corr: &'a [i32],
    out: ProductOut<'a>,
}

impl<D: BlockDot> FewTile for FewBlocks<'_, D> {
    /// Per block, each (row, token)'s exact integer dot (its 8 lanes reduced horizontally, four at a time), then
    /// `acc = fma(cvt(isum), dw * da, acc)`: exactly the lane kernel's float steps (`BlockLanes::tile`), so every
    /// output has the same bits whichever kernel and tile computed it. With 4 rows the accumulators hold the
    /// rows of one token (and are stored as they are), with one row its tokens.
    #[inline(always)]
    unsafe fn tile<const RT: usize, const TT: usize>(&mut self, r0: usize, t: usize) {
        const { assert!((RT == 4 || RT == 1) && TT <= 4) };
        let (w, a, bpr, t0, da, corr) = (self.w, self.a, self.bpr, self.t0, self.da, self.corr);
        let out = &mut self.out;
        // SAFETY (bounds): the caller keeps r0 + RT <= rows and t + TT <= n; every pointer below indexes block
        // b < bpr of one of those rows or tokens; `da` holds (t1 - t0) * bpr entries and `corr` 8 per entry.
        debug_assert!((r0 + RT) * bpr <= w.len() && (t + TT) * bpr <= a.len());
        debug_assert!((t - t0 + TT) * bpr <= da.len());
        unsafe {
            // RT == 4: acc[j] is token j's 4 rows; RT == 1: acc[0] is the row's TT tokens.
            let mut acc = [_mm_setzero_ps(); TT];
            let wp = w.as_ptr().add(r0 * bpr);
            let ap = a.as_ptr().add(t * bpr);
            let dap = da.as_ptr().add((t - t0) * bpr);
            let cp = corr.as_ptr().add((t - t0) * bpr * 8);
            for b in 0..bpr {
                let mut av = [_mm256_setzero_si256(); TT];
                let mut cv = [_mm256_setzero_si256(); TT];
                let mut dav = [0.0f32; 4];
                for j in 0..TT {
                    av[j] =
                        _mm256_loadu_si256((*ap.add(j * bpr + b)).qs.as_ptr() as *const __m256i);
                    cv[j] = _mm256_loadu_si256(cp.add((j * bpr + b) * 8) as *const __m256i);
                    dav[j] = *dap.add(j * bpr + b);
                }
                let mut isum = [[_mm256_setzero_si256(); TT]; RT];
                let mut dw = [0.0f32; 4];
                for (i, isum_i) in isum.iter_mut().enumerate() {
                    let blk = wp.add(i * bpr + b);
                    // The same block two row tiles ahead, into L2. The hardware prefetchers do not follow 4
                    // interleaved row streams well (about 9 GB/s here against 25 for one stream); requesting
                    // the tiles ahead into L2 (T1: more misses in flight than L1 allows) reaches the one-stream
                    // speed.
                    _mm_prefetch::<_MM_HINT_T1>(blk.wrapping_add(2 * RT * bpr) as *const i8);
                    let wv = D::load(blk);
                    dw[i] = f16_bits_to_f32((*blk).d_bits());
                    for j in 0..TT {
                        isum_i[j] = D::dot(cv[j], wv, av[j]);
                    }
                }
                if RT == 4 {
                    let dw4 = _mm_loadu_ps(dw.as_ptr());
                    for (j, acc_j) in acc.iter_mut().enumerate() {
                        let s = hsum4_epi32(isum[0][j], isum[1][j], isum[2][j], isum[3][j]);
                        // dw * da per lane: the lane kernel's da * dw, f32 multiplication commuting.
                        let scale = _mm_mul_ps(dw4, _mm_set1_ps(dav[j]));
                        *acc_j = _mm_fmadd_ps(_mm_cvtepi32_ps(s), scale, *acc_j);
                    }
                } else {
                    let mut v = [_mm256_setzero_si256(); 4];
                    v[..TT].copy_from_slice(&isum[0]);
                    let s = hsum4_epi32(v[0], v[1], v[2], v[3]);
                    let scale = _mm_mul_ps(_mm_set1_ps(dw[0]), _mm_loadu_ps(dav.as_ptr()));
                    acc[0] = _mm_fmadd_ps(_mm_cvtepi32_ps(s), scale, acc[0]);
                }
            }
            if RT == 4 {
                for (j, &acc_j) in acc.iter().enumerate() {
                    // SAFETY: rows r0..r0 + 4 of token t + j are inside the window `tile_shape` checked.
                    _mm_storeu_ps(out.token(t + j).as_mut_ptr().add(r0), acc_j);
                }
            } else {
                let mut v = [0.0f32; 4];
                _mm_storeu_ps(v.as_mut_ptr(), acc[0]);
                for (j, &vj) in v.iter().enumerate().take(TT) {
                    out.token(t + j)[r0] = vj;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Quantized products, many tokens: one lane per token.

/// Tokens per pass over a row tile: the transposed activations of one pass (about 40 bytes per token and
/// block, 300 for a 256-block) stay in L2 while every row tile of the matrix streams past them.
const CHUNK_TOKENS: usize = 128;

/// A product on the lane kernel (`gemm_lanes`): how its activations are transposed into scratch, how its weight
/// blocks are prepared, and one tile of `RW` rows x `N` tokens computed from both.
trait LaneKernel {
    type W: Copy;
    type A: Copy;
    type L: Lanes;
    /// Rows per tile.
    const RW: usize;
    /// Transposes the activations of a chunk of tokens (`a`: whole tokens of `bpr` blocks) into scratch, in
    /// vectors of `N` tokens (the last one padded with zeros).
    unsafe fn prep_acts(a: &[Self::A], bpr: usize, s: &mut Scratch);
    /// Sizes the prepared-weight buffers for `RW` rows of `bpr` blocks.
    fn grow_rows(s: &mut Scratch, bpr: usize);
    /// Prepares weight block `w` as the tile's block `ib` (`row * bpr + block`); `None`, a row past the matrix,
    /// as zeros (scale 0).
    unsafe fn prep_block(w: Option<&Self::W>, ib: usize, s: &mut Scratch);
    /// The `RW` rows of the tile (as prepared) x the `N` tokens of group `g` (as transposed).
    unsafe fn tile<const RW: usize>(
        s: &Scratch,
        g: usize,
        bpr: usize,
    ) -> [<Self::L as Lanes>::F; RW];
}

/// `W[r] . A[t]` for tokens `t0..t1` (whole vectors of `N` tokens, the last one padded): per chunk of
/// `CHUNK_TOKENS` tokens the activations are transposed once, then per tile of `RW` rows the weights are prepared
/// once and every token vector of the chunk computed and stored.
#[inline(always)]
unsafe fn gemm_lanes<K: LaneKernel, const RW: usize>(
    w: &[K::W],
    a: &[K::A],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    assert!(RW == K::RW && K::L::N <= 16 && RW <= 8);
    let (_, rows) = tile_shape(w.len(), a.len(), bpr, t0, t1, out);
    let nn = K::L::N;
    let chunk_groups = CHUNK_TOKENS.div_ceil(nn);
    // SAFETY: see `scratch`.
    let s = unsafe { &mut *scratch() };
    let mut c0 = t0;
    while c0 < t1 {
        let groups = (t1 - c0).div_ceil(nn).min(chunk_groups);
        let c1 = (c0 + groups * nn).min(t1);
        // SAFETY: the set's features are present; `prep_acts` sizes its buffers.
        unsafe { K::prep_acts(&a[c0 * bpr..c1 * bpr], bpr, s) };
        K::grow_rows(s, bpr);
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(RW);
            // Prepared weights for rows r0..r0 + nr; missing rows of the last tile are zero (scale 0).
            for i in 0..RW {
                for b in 0..bpr {
                    let blk = if i < nr {
                        Some(&w[(r0 + i) * bpr + b])
                    } else {
                        None
                    };
                    // SAFETY: block i * bpr + b < RW * bpr, the rows `grow_rows` sized.
                    unsafe { K::prep_block(blk, i * bpr + b, s) };
                }
            }
            for g in 0..groups {
                let tg = c0 + g * nn;
                // SAFETY: group g < groups and the tile's rows were prepared above.
                let acc = unsafe { K::tile::<RW>(s, g, bpr) };
                // SAFETY: tokens tg..tg + valid <= t1 <= n and rows r0..r0 + nr <= rows, inside the window
                // `tile_shape` checked.
                unsafe { store_lanes::<K::L, RW>(&acc, out, tg, r0, nr, (t1 - tg).min(nn)) };
            }
            r0 += RW;
        }
        c0 = c1;
    }
}

/// Stores a finished lane tile: `acc[i]` holds row `r0 + i`'s results for tokens `tg..tg + N`, of which rows
/// `i < nr` and tokens `j < valid` exist (and lie inside `out`). A whole tile is transposed in registers; a partial
/// one (the last rows or tokens) goes through a buffer, writing only what exists.
#[inline(always)]
unsafe fn store_lanes<L: Lanes, const RW: usize>(
    acc: &[L::F; RW],
    out: &mut ProductOut,
    tg: usize,
    r0: usize,
    nr: usize,
    valid: usize,
) {
    if valid == L::N && nr == RW {
        let ldo = out.stride();
        // SAFETY: the caller's promise: tokens tg..tg + N and rows r0..r0 + RW are inside the window.
        unsafe { L::store_tile(acc, out.as_mut_ptr().add(tg * ldo + r0), ldo) };
    } else {
        let mut tmp = [0.0f32; 16 * 8];
        for (acc_i, row) in acc.iter().zip(tmp.chunks_exact_mut(16)).take(nr) {
            // SAFETY: `row` holds 16 >= N floats.
            unsafe { L::store(row.as_mut_ptr(), *acc_i) };
        }
        for j in 0..valid {
            for (i, o) in out.token(tg + j)[r0..r0 + nr].iter_mut().enumerate() {
                *o = tmp[i * 16 + j];
            }
        }
    }
}

/// A 32-block weight format on one vector width and instruction set, for the lane kernel.
pub(crate) trait LaneDot {
    type W: Block32;
    type L: Lanes;
    /// Rows computed together (bounded by the register count).
    const RW: usize;
    const BIAS: i32;
    /// Bytes of one prepared weight block.
    const W_BYTES: usize;
    /// Writes the block in the form `block` reads (unsigned operand, and signs if needed).
    unsafe fn prep(w: &Self::W, dst: *mut u8);
    /// `acc + ` each lane's dot of the prepared block `w` (broadcast) with the 8 transposed activation vectors.
    unsafe fn block(
        acc: <Self::L as Lanes>::I,
        w: *const u8,
        s: *const u32,
    ) -> <Self::L as Lanes>::I;
}

/// The 32-block products of format `D` on the lane kernel.
struct BlockLanes<D>(PhantomData<D>);

impl<D: LaneDot> LaneKernel for BlockLanes<D> {
    type W = D::W;
    type A = BlockQ8_0;
    type L = D::L;
    const RW: usize = D::RW;
    /// For group g, block b: 8 vectors of N dwords (`act`), then N scales (`da`) and N corrections (`corr`).
    /// Eight tokens at a time as an 8 x 8 dword transpose in registers: done per call for every token and block,
    /// element by element it cost a quarter of a 128-row product.
    #[inline(always)]
    unsafe fn prep_acts(a: &[BlockQ8_0], bpr: usize, s: &mut Scratch) {
        let nn = D::L::N;
        let n = a.len() / bpr;
        let groups = n.div_ceil(nn);
        grow(&mut s.act, groups * bpr * 8 * nn);
        grow(&mut s.da, groups * bpr * nn);
        grow(&mut s.corr, groups * bpr * nn);
        // SAFETY: every x86 set has AVX2 and F16C (checked when the set was selected). Loads read block b < bpr of
        // token t < n; stores write 8 lanes at offsets below groups * bpr * 8 * N (act) and
        // groups * bpr * N (da, corr), the sizes grown above.
        unsafe {
            let ones = _mm256_set1_epi8(1);
            let ones16 = _mm256_set1_epi16(1);
            let nbias = _mm256_set1_epi32(-D::BIAS);
            for g in 0..groups {
                for h in 0..nn / 8 {
                    let tb = g * nn + h * 8;
                    for b in 0..bpr {
                        let gb = g * bpr + b;
                        let mut r = [_mm256_setzero_si256(); 8];
                        let mut d = [0.0f32; 8];
                        for (j, (rj, dj)) in r.iter_mut().zip(d.iter_mut()).enumerate() {
                            if tb + j < n {
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
    #[inline(always)]
    fn grow_rows(s: &mut Scratch, bpr: usize) {
        grow(&mut s.w, D::RW * bpr * D::W_BYTES);
        grow(&mut s.dw, D::RW * bpr);
    }
    #[inline(always)]
    unsafe fn prep_block(w: Option<&D::W>, ib: usize, s: &mut Scratch) {
        let dst = &mut s.w[ib * D::W_BYTES..(ib + 1) * D::W_BYTES];
        match w {
            // SAFETY: `dst` holds W_BYTES bytes; the set's features are present.
            Some(blk) => unsafe {
                D::prep(blk, dst.as_mut_ptr());
                s.dw[ib] = f16_bits_to_f32(blk.d_bits());
            },
            None => {
                dst.fill(0);
                s.dw[ib] = 0.0;
            }
        }
    }
    #[inline(always)]
    unsafe fn tile<const RW: usize>(s: &Scratch, g: usize, bpr: usize) -> [<D::L as Lanes>::F; RW] {
        let nn = D::L::N;
        // SAFETY: scratch indices are within the sizes grown by `prep_acts` and `grow_rows`: group g < groups,
        // block b < bpr, row i < RW; the features are those of the set that selected this kernel.
        unsafe {
            let mut acc = [D::L::zero(); RW];
            for b in 0..bpr {
                let gb = g * bpr + b;
                let sp = s.act.as_ptr().add(gb * 8 * nn);
                let corr = D::L::load_i(s.corr.as_ptr().add(gb * nn));
                let da = D::L::load(s.da.as_ptr().add(gb * nn));
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let isum = D::block(corr, s.w.as_ptr().add((i * bpr + b) * D::W_BYTES), sp);
                    let scale = D::L::mul(da, D::L::splat(*s.dw.get_unchecked(i * bpr + b)));
                    *acc_i = D::L::scale_acc(isum, scale, *acc_i);
                }
            }
            acc
        }
    }
}

/// The nibbles of a Q4_0 or IQ4_NL block in activation order: bytes 0..16 are the low nibbles (weights 0..15),
/// 16..32 the high.
#[inline(always)]
unsafe fn q4_nibbles(qs: &[u8; 16]) -> __m256i {
    unsafe {
        let x = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
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

/// A 32-block format as the unsigned operand of a byte dot, for `Bytes`.
pub(crate) trait Unsigned32: Block32 {
    /// The activation correction: the integer dot is `dot(u, a) - BIAS * sum(a)`.
    const BIAS: i32;
    /// Whether the bytes stay below 16 (`ByteDot::block_nibbles`); otherwise they take the whole byte range,
    /// which only a VNNI dot multiplies exactly.
    const NIBBLES: bool;
    /// The 32 unsigned bytes, in activation order.
    unsafe fn unsigned(&self) -> __m256i;
}

// SAFETY (every method): the module contract above: features enabled by the caller.
impl Unsigned32 for BlockQ4_0 {
    const BIAS: i32 = 8;
    const NIBBLES: bool = true;
    /// The nibbles as they are (0..15).
    #[inline(always)]
    unsafe fn unsigned(&self) -> __m256i {
        unsafe { q4_nibbles(&self.qs) }
    }
}

// SAFETY (every method): the module contract above: features enabled by the caller.
impl Unsigned32 for BlockQ8_0 {
    const BIAS: i32 = 128;
    const NIBBLES: bool = false;
    /// `w + 128` as unsigned bytes.
    #[inline(always)]
    unsafe fn unsigned(&self) -> __m256i {
        unsafe { _mm256_xor_si256(q8_bytes(self), _mm256_set1_epi8(-128)) }
    }
}

/// `table`'s bytes at the indices in `idx` (every byte below 16), on both 128-bit halves: `vpshufb`.
#[inline(always)]
unsafe fn lookup16(table: &[u8; 16], idx: __m256i) -> __m256i {
    unsafe {
        let t = _mm256_broadcastsi128_si256(_mm_loadu_si128(table.as_ptr() as *const __m128i));
        _mm256_shuffle_epi8(t, idx)
    }
}

/// IQ4_NL's levels as signed bytes, for AVX2's sign trick (`avx2::Sign`).
pub(crate) const IQ4_LEVELS: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = quarry_quantize::blocks::IQ4_VALUES[i] as u8;
        i += 1;
    }
    t
};

// SAFETY (every method): the module contract above: features enabled by the caller.
impl Unsigned32 for BlockIQ4NL {
    const BIAS: i32 = 128;
    const NIBBLES: bool = false;
    /// `level + 128` as unsigned bytes.
    #[inline(always)]
    unsafe fn unsigned(&self) -> __m256i {
        unsafe {
            lookup16(
                &crate::kernels::iq4_nl::LEVELS_PLUS_128,
                q4_nibbles(&self.qs),
            )
        }
    }
}

/// A 32-block format as signed bytes, for AVX2's byte dot without VNNI (`avx2::Sign`: `|w|` times the activation
/// with `w`'s sign).
pub(crate) trait Signed32: Block32 {
    /// The 32 weights as signed bytes in -127..=127, in activation order.
    unsafe fn signed(&self) -> __m256i;
}

// SAFETY (every method): the module contract above: features enabled by the caller.
impl Signed32 for BlockQ8_0 {
    #[inline(always)]
    unsafe fn signed(&self) -> __m256i {
        unsafe { q8_bytes(self) }
    }
}

// SAFETY (every method): the module contract above: features enabled by the caller.
impl Signed32 for BlockIQ4NL {
    #[inline(always)]
    unsafe fn signed(&self) -> __m256i {
        unsafe { lookup16(&IQ4_LEVELS, q4_nibbles(&self.qs)) }
    }
}

/// Format `W` on byte dot `D`, for both kernels: the weights as unsigned bytes (`Unsigned32`), corrected by
/// `-BIAS * sum(activation block)`. Q8_0 needs a VNNI dot (AVX2, where `vpmaddubsw` saturates at i16, has its own
/// form: `avx2::Sign`).
pub(crate) struct Bytes<W, D>(PhantomData<(W, D)>);

/// Q4_0 on any instruction set.
pub(crate) type Q4<D> = Bytes<BlockQ4_0, D>;

/// Q8_0 on a VNNI set.
pub(crate) type Q8<D> = Bytes<BlockQ8_0, D>;

/// IQ4_NL on a VNNI set.
pub(crate) type IQ4<D> = Bytes<BlockIQ4NL, D>;

// SAFETY (every method): the module contract above: features enabled by the caller, pointers valid.
impl<W: Unsigned32, D: ByteDot> BlockDot for Bytes<W, D> {
    type W = W;
    const BIAS: i32 = W::BIAS;
    #[inline(always)]
    unsafe fn load(w: *const W) -> (__m256i, __m256i) {
        const { assert!(W::NIBBLES || D::VNNI) };
        unsafe {
            let u = (*w).unsigned();
            (u, u)
        }
    }
    #[inline(always)]
    unsafe fn dot(acc: __m256i, w: (__m256i, __m256i), a: __m256i) -> __m256i {
        unsafe { D::dot(acc, w.0, a) }
    }
}

// SAFETY (every method): the module contract above: features enabled by the caller, pointers valid.
impl<W: Unsigned32, D: ByteDot> LaneDot for Bytes<W, D> {
    type W = W;
    type L = D::L;
    const RW: usize = D::RW;
    const BIAS: i32 = W::BIAS;
    const W_BYTES: usize = 32;
    #[inline(always)]
    unsafe fn prep(w: &W, dst: *mut u8) {
        const { assert!(W::NIBBLES || D::VNNI) };
        unsafe { _mm256_storeu_si256(dst as *mut __m256i, w.unsigned()) }
    }
    #[inline(always)]
    unsafe fn block(acc: IOf<D>, w: *const u8, s: *const u32) -> IOf<D> {
        unsafe {
            if W::NIBBLES {
                D::block_nibbles(acc, w, s)
            } else {
                D::block(acc, w, s)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Float products.

/// The accumulators of the float products: `N` f32 lanes, one vector or two (`avx2::Ymm`, `avx2::YmmPair`,
/// `avx512::Zmm`). A product's bits depend only on `N`, not on the registers: lane `k` of an accumulator sums
/// columns `k, k + N, k + 2N, ...` by FMA, and `sum` adds the lanes in the same tree for every type of a width
/// (`YmmPair` and `Zmm`: halves first, then `Ymm`'s), so AVX-512's one-token products on ymm pairs give the same
/// bits as its zmm products for more tokens.
pub(crate) trait FloatLanes {
    type F: Copy;
    const N: usize;
    unsafe fn zero() -> Self::F;
    unsafe fn load(p: *const f32) -> Self::F;
    unsafe fn load_f16(p: *const u16) -> Self::F;
    unsafe fn load_bf16(p: *const u16) -> Self::F;
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// The sum of the lanes.
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

/// `W[r] . A[t]`, tiling 4 rows x 2 tokens (one accumulator each), remainders by 1. Each output is computed
/// the same way in every tile (its own accumulator over the whole vectors of columns, `L::sum`, then the
/// columns past them one by one), so the tiling never changes a bit.
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
unsafe fn axpy_f32<L: Lanes>(alpha: f32, x: &[f32], y: &mut [f32]) {
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
