//! AVX2 + FMA + F16C, and AVX-VNNI (the 256-bit `vpdpbusd` of Alder Lake / Zen 5 class CPUs without
//! AVX-512), which shares everything but the byte dot. Also the 256-bit vector width every x86 set uses (`Ymm`).
//!
//! AVX2's byte dot is `vpmaddubsw` (u8 x i8, pairs summed into a *saturating* i16) then `vpmaddwd` by ones.
//! To stay exact: Q4_0 nibbles (0..15) times activations give at most 2 * 15 * 128 per pair, so even the 8
//! steps of a block can be summed in i16 before widening; Q8_0 uses `|w|` (at most 128) against the activation
//! with `w`'s sign, at most 2 * 128 * 127 = 32512 per pair, which needs activations in -127..=127 (what
//! `quantize_q8_0` produces: -128 would overflow `vpsignb`); IQ4_NL the same on its looked-up levels.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use half::{bf16, f16};
use quarry_quantize::blocks::{
    BlockIQ4NL, BlockIQ4XS, BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K,
};

use super::{BlockDot, ByteDot, FloatLanes, IQ4, LaneDot, Lanes, Q4, Q8, Signed32};

pub(in crate::kernels::x86) mod kquant;
use crate::kernels::{Kernels, ProductOut};

pub fn detected() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub fn detected_vnni() -> bool {
    detected() && is_x86_feature_detected!("avxvnni")
}

/// Only handed out by `kernels::available` after `detected()` (the safety condition of its entries).
pub(in crate::kernels) static SET: Kernels = x86_set!("avx2", crate::kernels::ops::x86::AVX2);

/// Only handed out by `kernels::available` after `detected_vnni()`.
pub(in crate::kernels) static SET_VNNI: Kernels = Kernels {
    name: "avxvnni",
    gemm_q8_0: gemm_q8_0_vnni,
    gemm_q4_0: gemm_q4_0_vnni,
    gemm_q4_0_interleaved: None,
    gemm_q8_0_interleaved: None,
    gemm_iq4_nl: gemm_iq4_nl_vnni,
    gemm_iq4_nl_interleaved: None,
    ..SET
};

/// 256-bit vectors: 8 lanes.
pub(crate) struct Ymm;

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl Lanes for Ymm {
    type F = __m256;
    type I = __m256i;
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn zero_i() -> __m256i {
        unsafe { _mm256_setzero_si256() }
    }
    #[inline(always)]
    unsafe fn load_i(p: *const i32) -> __m256i {
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }
    #[inline(always)]
    unsafe fn bcast(p: *const u8) -> __m256i {
        unsafe { bcast(p) }
    }
    #[inline(always)]
    unsafe fn sub_32x(a: __m256i, b: __m256i) -> __m256i {
        unsafe { _mm256_sub_epi32(a, _mm256_slli_epi32::<5>(b)) }
    }
    #[inline(always)]
    unsafe fn scale_acc(i: __m256i, s: __m256, acc: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), s, acc) }
    }
    /// 4 rows (AVX2's tiles) or 8 (AVX-512's ymm tiles).
    #[inline(always)]
    unsafe fn store_tile<const RW: usize>(acc: &[__m256; RW], p: *mut f32, ldo: usize) {
        const { assert!(RW == 4 || RW == 8) };
        unsafe {
            if RW == 4 {
                store_tile_4x8(acc, p, ldo)
            } else {
                store_tile_8x8(acc, p, ldo)
            }
        }
    }
}

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl FloatLanes for Ymm {
    type F = __m256;
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        unsafe {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        }
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn sum(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
}

/// Two ymm as one 16-lane float accumulator: lanes `0..8` in the first, `8..16` in the second. AVX-512's
/// one-token float products run on it (a zmm loop streams f16 weights from DRAM more slowly here), with the
/// bits of its zmm products (`avx512::Zmm`).
pub(crate) struct YmmPair;

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl FloatLanes for YmmPair {
    type F = [__m256; 2];
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> [__m256; 2] {
        unsafe { [_mm256_setzero_ps(); 2] }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [__m256; 2] {
        unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> [__m256; 2] {
        unsafe {
            [
                <Ymm as FloatLanes>::load_f16(p),
                <Ymm as FloatLanes>::load_f16(p.add(8)),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> [__m256; 2] {
        unsafe {
            [
                <Ymm as FloatLanes>::load_bf16(p),
                <Ymm as FloatLanes>::load_bf16(p.add(8)),
            ]
        }
    }
    #[inline(always)]
    unsafe fn fma(a: [__m256; 2], b: [__m256; 2], c: [__m256; 2]) -> [__m256; 2] {
        unsafe {
            [
                _mm256_fmadd_ps(a[0], b[0], c[0]),
                _mm256_fmadd_ps(a[1], b[1], c[1]),
            ]
        }
    }
    /// The halves added, then `Ymm`'s sum: `Zmm::sum`'s tree.
    #[inline(always)]
    unsafe fn sum(v: [__m256; 2]) -> f32 {
        unsafe { <Ymm as FloatLanes>::sum(_mm256_add_ps(v[0], v[1])) }
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

/// Rows of 8 dwords to columns.
#[inline(always)]
pub(super) unsafe fn transpose_8x8(r: [__m256i; 8]) -> [__m256i; 8] {
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

#[inline(always)]
pub(super) unsafe fn madd_ones(p: __m256i) -> __m256i {
    unsafe { _mm256_madd_epi16(p, _mm256_set1_epi16(1)) }
}

#[inline(always)]
unsafe fn bcast(p: *const u8) -> __m256i {
    unsafe { _mm256_set1_epi32((p as *const i32).read_unaligned()) }
}

/// AVX2's byte dot, `vpmaddubsw` + `vpmaddwd` by ones: 8-token lanes, 4 rows per tile.
pub(crate) struct Avx2;

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl ByteDot for Avx2 {
    type L = Ymm;
    const RW: usize = 4;
    const VNNI: bool = false;
    #[inline(always)]
    unsafe fn dot(acc: __m256i, u: __m256i, a: __m256i) -> __m256i {
        unsafe { _mm256_add_epi32(acc, madd_ones(_mm256_maddubs_epi16(u, a))) }
    }
    #[inline(always)]
    unsafe fn dot_lanes(acc: __m256i, u: __m256i, a: __m256i) -> __m256i {
        unsafe { Self::dot(acc, u, a) }
    }
    /// All 8 steps summed in i16 (at most 8 * 3840), widened once.
    #[inline(always)]
    unsafe fn block_nibbles(acc: __m256i, w: *const u8, s: *const u32) -> __m256i {
        unsafe {
            let mut p = _mm256_setzero_si256();
            for k in 0..8 {
                let a = _mm256_loadu_si256(s.add(8 * k) as *const __m256i);
                p = _mm256_add_epi16(p, _mm256_maddubs_epi16(bcast(w.add(4 * k)), a));
            }
            _mm256_add_epi32(acc, madd_ones(p))
        }
    }
}

vnni_byte_dot! {
    /// AVX-VNNI's `vpdpbusd` (VEX): 8-token lanes, 4 rows per tile.
    AvxVnni: Ymm, 4, _mm256_dpbusd_avx_epi32, _mm256_dpbusd_avx_epi32
}

/// A signed 32-block format on AVX2 (Q8_0, IQ4_NL): `|w|` as the unsigned operand and `w`'s sign moved onto the
/// activation (`vpsignb`), no correction (`vpmaddubsw` would saturate on the unsigned `w + 128` of the VNNI sets).
pub(crate) struct Sign<W>(PhantomData<W>);

/// Q8_0 on AVX2.
pub(crate) type Q8Sign = Sign<BlockQ8_0>;

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl<W: Signed32> BlockDot for Sign<W> {
    type W = W;
    const BIAS: i32 = 0;
    #[inline(always)]
    unsafe fn load(w: *const W) -> (__m256i, __m256i) {
        unsafe {
            let x = (*w).signed();
            (_mm256_abs_epi8(x), x)
        }
    }
    #[inline(always)]
    unsafe fn dot(acc: __m256i, w: (__m256i, __m256i), a: __m256i) -> __m256i {
        unsafe {
            let p = _mm256_maddubs_epi16(w.0, _mm256_sign_epi8(a, w.1));
            _mm256_add_epi32(acc, madd_ones(p))
        }
    }
}

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl<W: Signed32> LaneDot for Sign<W> {
    type W = W;
    type L = Ymm;
    const RW: usize = 4;
    const BIAS: i32 = 0;
    const W_BYTES: usize = 64;
    /// `|w|`, then `w` for its signs.
    #[inline(always)]
    unsafe fn prep(w: &W, dst: *mut u8) {
        unsafe {
            let x = w.signed();
            _mm256_storeu_si256(dst as *mut __m256i, _mm256_abs_epi8(x));
            _mm256_storeu_si256(dst.add(32) as *mut __m256i, x);
        }
    }
    #[inline(always)]
    unsafe fn block(acc: __m256i, w: *const u8, s: *const u32) -> __m256i {
        unsafe {
            let mut acc = acc;
            for k in 0..8 {
                let a = _mm256_loadu_si256(s.add(8 * k) as *const __m256i);
                let p = _mm256_maddubs_epi16(
                    bcast(w.add(4 * k)),
                    _mm256_sign_epi8(a, bcast(w.add(32 + 4 * k))),
                );
                acc = _mm256_add_epi32(acc, madd_ones(p));
            }
            acc
        }
    }
}

/// The whole 32-block product: whole vectors of 8 tokens on the lane kernel, the rest on the few-token kernel
/// (tiles of up to 2 tokens).
#[inline(always)]
unsafe fn gemm_quant<D: BlockDot + LaneDot<W = <D as BlockDot>::W>>(
    w: &[<D as BlockDot>::W],
    a: &[BlockQ8_0],
    bpr: usize,
    mut out: ProductOut,
) {
    if bpr == 0 || a.is_empty() || w.is_empty() {
        return;
    }
    let n = a.len() / bpr;
    let lane_tokens = n / 8 * 8;
    unsafe {
        if lane_tokens > 0 {
            super::gemm_lanes::<super::BlockLanes<D>, 4>(w, a, bpr, 0, lane_tokens, &mut out);
        }
        if lane_tokens < n {
            super::gemm_few::<D, 2>(w, a, bpr, lane_tokens, n, &mut out);
        }
    }
}

target_feature_entries! { "avx2,fma,f16c";
    fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) = super::quantize_q8_k_avx2(x, out);
    fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) = super::quantize_q8_0_avx2(x, out);
    fn gemm_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        gemm_quant::<Q8Sign>(w, a, bpr, out);
    fn gemm_q4_0(w: &[BlockQ4_0], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        gemm_quant::<Q4<Avx2>>(w, a, bpr, out);
    fn gemm_iq4_nl(w: &[BlockIQ4NL], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        gemm_quant::<Sign<BlockIQ4NL>>(w, a, bpr, out);
    fn gemm_iq4_xs(w: &[BlockIQ4XS], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        super::iq4_xs::gemm_rows(w, a, bpr, out);
    fn gemm_q4_k(w: &[BlockQ4K], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        kquant::gemm::<kquant::Q4K>(w, a, bpr, out);
    fn gemm_q5_k(w: &[BlockQ5K], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        kquant::gemm::<kquant::Q5K>(w, a, bpr, out);
    fn gemm_q6_k(w: &[BlockQ6K], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        kquant::gemm::<kquant::Q6K>(w, a, bpr, out);
    fn gemm_f32(w: &[f32], a: &[f32], cols: usize, out: ProductOut) =
        super::gemm_float::<Ymm, f32>(w, a, cols, out);
    fn gemm_f16(w: &[f16], a: &[f32], cols: usize, out: ProductOut) =
        super::gemm_float::<Ymm, f16>(w, a, cols, out);
    fn gemm_bf16(w: &[bf16], a: &[f32], cols: usize, out: ProductOut) =
        super::gemm_float::<Ymm, bf16>(w, a, cols, out);
    fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) = super::axpy_f32::<Ymm>(alpha, x, y);
}

target_feature_entries! { "avx2,fma,f16c,avxvnni";
    fn gemm_q8_0_vnni(w: &[BlockQ8_0], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        gemm_quant::<Q8<AvxVnni>>(w, a, bpr, out);
    fn gemm_q4_0_vnni(w: &[BlockQ4_0], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        gemm_quant::<Q4<AvxVnni>>(w, a, bpr, out);
    fn gemm_iq4_nl_vnni(w: &[BlockIQ4NL], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        gemm_quant::<IQ4<AvxVnni>>(w, a, bpr, out);
}
