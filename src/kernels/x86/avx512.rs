//! AVX-512 (F, BW, VL) with VNNI: `vpdpbusd` sums four u8 x i8 products per i32 lane with no intermediate
//! saturation, so both formats are exact for every byte value. Many-token products put 16 tokens in a zmm
//! (`Vnni512`, over the `Zmm` width); 6 to 15 tokens past the last whole zmm the 256-bit form (`Vnni256`, over
//! AVX2's `Ymm`); few-token Q8_0 products use the 256-bit form on one block at a time, few-token Q4_0 products
//! four blocks per zmm (see "Q4_0, few tokens" below). Lane tiles are transposed in registers and stored
//! token-major. Every kernel here takes the lane kernel's float steps per block (see "Batch invariance" in
//! `x86/mod.rs`), so which one computes a token never changes its bits.

use std::arch::x86_64::*;

use half::{bf16, f16};
use quarry_quantize::blocks::{
    BlockIQ4NL, BlockIQ4XS, BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K,
};

use super::avx2::{Ymm, YmmPair};
use super::k_row_lanes::{KGroups, Q4KGroups as KGroupsQ4K, Q6KGroups as KGroupsQ6K};
use super::{BlockDot, FewTile, FloatLanes, IQ4, Lanes, Q4, Q8, row_lanes};

mod kquant;
use crate::kernels::{Kernels, ProductOut};

/// The features every function here is compiled with; `available` checks them all.
pub fn detected() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Only handed out by `kernels::available` after `detected()`: that check is the safety condition of every
/// `unsafe` call to a `#[target_feature]` function below.
pub(in crate::kernels) static SET: Kernels = x86_set!(
    "avx512vnni",
    crate::kernels::ops::x86::AVX512,
    Some(gemm_q4_0_interleaved),
    Some(gemm_q8_0_interleaved),
    Some(gemm_iq4_nl_interleaved),
    Some(gemm_iq4_xs_interleaved),
    Some(gemm_q4_k_interleaved),
    Some(gemm_q6_k_interleaved)
);

/// AVX-512 VNNI with the interleaved and k-quant products of many tokens on AMX's tile unit (`x86/amx.rs`); only
/// handed out by `kernels::available` after `detected()` and `amx::granted()`.
pub(in crate::kernels) static SET_AMX: Kernels = Kernels {
    gemm_q4_k: gemm_q4_k_amx,
    gemm_q5_k: gemm_q5_k_amx,
    gemm_q6_k: gemm_q6_k_amx,
    ..x86_set!(
        "avx512amx",
        crate::kernels::ops::x86::AVX512,
        Some(gemm_q4_0_interleaved_amx),
        Some(gemm_q8_0_interleaved_amx),
        Some(gemm_iq4_nl_interleaved_amx),
        Some(gemm_iq4_xs_interleaved_amx),
        Some(gemm_q4_k_interleaved_amx),
        Some(gemm_q6_k_interleaved_amx)
    )
};

/// 512-bit vectors: 16 lanes.
pub(crate) struct Zmm;

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl Lanes for Zmm {
    type F = __m512;
    type I = __m512i;
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn zero_i() -> __m512i {
        unsafe { _mm512_setzero_si512() }
    }
    #[inline(always)]
    unsafe fn load_i(p: *const i32) -> __m512i {
        unsafe { _mm512_loadu_si512(p as *const _) }
    }
    #[inline(always)]
    unsafe fn bcast(p: *const u8) -> __m512i {
        unsafe { _mm512_set1_epi32((p as *const i32).read_unaligned()) }
    }
    #[inline(always)]
    unsafe fn sub_32x(a: __m512i, b: __m512i) -> __m512i {
        unsafe { _mm512_sub_epi32(a, _mm512_slli_epi32::<5>(b)) }
    }
    #[inline(always)]
    unsafe fn scale_acc(i: __m512i, s: __m512, acc: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), s, acc) }
    }
    /// 8 rows.
    #[inline(always)]
    unsafe fn store_tile<const RW: usize>(acc: &[__m512; RW], p: *mut f32, ldo: usize) {
        const { assert!(RW == 8) };
        unsafe { store_tile_8x16(acc, p, ldo) }
    }
}

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl FloatLanes for Zmm {
    type F = __m512;
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        unsafe {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
        }
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    /// The halves added, then `Ymm`'s sum: `YmmPair::sum`'s tree.
    #[inline(always)]
    unsafe fn sum(v: __m512) -> f32 {
        unsafe { <Ymm as FloatLanes>::sum(_mm256_add_ps(_mm512_castps512_ps256(v), upper_half(v))) }
    }
}

/// Eight rows of 16 tokens (`r[i]`, one zmm each) stored token-major, `p[j * ldo + i] = r[i][j]`: 4 x 4
/// transposes within the 128-bit lanes, then one two-source permute per two tokens, 16 stores of 8 floats.
/// (No closures here: they would be compiled without the target features, and every intrinsic in them called.)
#[inline(always)]
unsafe fn store_tile_8x16(r: &[__m512], p: *mut f32, ldo: usize) {
    unsafe {
        // Lane l of lo[k] (hi[k]) holds token 4l + k of rows 0..4 (4..8).
        let lo = transpose_4x4_lanes(r[0], r[1], r[2], r[3]);
        let hi = transpose_4x4_lanes(r[4], r[5], r[6], r[7]);
        // Lanes 0 and 1 of both, interleaved: tokens k and 4 + k; lanes 2 and 3: tokens 8 + k and 12 + k.
        let first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
        let second =
            _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
        for k in 0..4 {
            let a = _mm512_permutex2var_ps(lo[k], first, hi[k]);
            let b = _mm512_permutex2var_ps(lo[k], second, hi[k]);
            _mm256_storeu_ps(p.add(k * ldo), _mm512_castps512_ps256(a));
            _mm256_storeu_ps(p.add((k + 4) * ldo), upper_half(a));
            _mm256_storeu_ps(p.add((k + 8) * ldo), _mm512_castps512_ps256(b));
            _mm256_storeu_ps(p.add((k + 12) * ldo), upper_half(b));
        }
    }
}

#[inline(always)]
unsafe fn upper_half(v: __m512) -> __m256 {
    unsafe { _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))) }
}

/// The 4 x 4 transposes within each 128-bit lane of four rows: lane `l` of result `k` holds token `4l + k` of
/// rows 0..4.
#[inline(always)]
unsafe fn transpose_4x4_lanes(r0: __m512, r1: __m512, r2: __m512, r3: __m512) -> [__m512; 4] {
    unsafe {
        let t0 = _mm512_unpacklo_ps(r0, r1);
        let t1 = _mm512_unpackhi_ps(r0, r1);
        let t2 = _mm512_unpacklo_ps(r2, r3);
        let t3 = _mm512_unpackhi_ps(r2, r3);
        [
            _mm512_shuffle_ps::<0x44>(t0, t2),
            _mm512_shuffle_ps::<0xee>(t0, t2),
            _mm512_shuffle_ps::<0x44>(t1, t3),
            _mm512_shuffle_ps::<0xee>(t1, t3),
        ]
    }
}

vnni_byte_dot! {
    /// AVX-512 VNNI's `vpdpbusd` on 16-token zmm lanes, 8 rows per tile (and on ymm for the few-token kernel).
    Vnni512: Zmm, 8, _mm256_dpbusd_epi32, _mm512_dpbusd_epi32
}

vnni_byte_dot! {
    /// The same on 8-token ymm lanes (the AVX-512 VL encoding), for batches of 6 to 15 tokens past the last whole
    /// zmm.
    Vnni256: Ymm, 8, _mm256_dpbusd_epi32, _mm256_dpbusd_epi32
}

/// Float products: one token on pairs of ymm, more on zmm, with the same bits (16 lanes either way, see
/// `FloatLanes`). Streaming a matrix from DRAM for one token, the ymm loop reaches 23-27 GB/s of f16 weights
/// where the zmm loop reaches 18-22 (alternating runs on this machine); with weights reused across tokens or in
/// cache, zmm is faster.
#[inline(always)]
unsafe fn gemm_float<W: super::FloatWeight>(w: &[W], a: &[f32], cols: usize, out: ProductOut) {
    unsafe {
        if a.len() == cols {
            super::gemm_float::<YmmPair, W>(w, a, cols, out)
        } else {
            super::gemm_float::<Zmm, W>(w, a, cols, out)
        }
    }
}

target_feature_entries! { "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c";
    fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) = super::quantize_q8_k_avx2(x, out);
    fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) = super::quantize_q8_0_avx2(x, out);
    fn gemm_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        gemm_quant::<Q8<Vnni512>, Q8<Vnni256>>(w, a, bpr, out);
    fn gemm_q4_0(w: &[BlockQ4_0], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        gemm_quant::<Q4<Vnni512>, Q4<Vnni256>>(w, a, bpr, out);
    fn gemm_q4_0_interleaved(w: &[u8], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        interleaved::<false, row_lanes::Q4_0Groups, Q4<Vnni512>, Q4<Vnni256>>(w, a, bpr, out);
    fn gemm_q8_0_interleaved(w: &[u8], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        interleaved::<false, row_lanes::Q8_0Groups, Q8<Vnni512>, Q8<Vnni256>>(w, a, bpr, out);
    fn gemm_iq4_nl(w: &[BlockIQ4NL], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        gemm_quant::<IQ4<Vnni512>, IQ4<Vnni256>>(w, a, bpr, out);
    fn gemm_iq4_nl_interleaved(w: &[u8], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        interleaved::<false, row_lanes::IQ4NLGroups, IQ4<Vnni512>, IQ4<Vnni256>>(w, a, bpr, out);
    fn gemm_iq4_xs(w: &[BlockIQ4XS], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        super::iq4_xs::gemm_rows(w, a, bpr, out);
    fn gemm_iq4_xs_interleaved(w: &[u8], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        interleaved_iq4_xs::<false>(w, a, bpr, out);
    fn gemm_q4_0_interleaved_amx(w: &[u8], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        interleaved::<true, row_lanes::Q4_0Groups, Q4<Vnni512>, Q4<Vnni256>>(w, a, bpr, out);
    fn gemm_q8_0_interleaved_amx(w: &[u8], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        interleaved::<true, row_lanes::Q8_0Groups, Q8<Vnni512>, Q8<Vnni256>>(w, a, bpr, out);
    fn gemm_iq4_nl_interleaved_amx(w: &[u8], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        interleaved::<true, row_lanes::IQ4NLGroups, IQ4<Vnni512>, IQ4<Vnni256>>(w, a, bpr, out);
    fn gemm_iq4_xs_interleaved_amx(w: &[u8], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        interleaved_iq4_xs::<true>(w, a, bpr, out);
    fn gemm_q4_k_interleaved(w: &[u8], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        interleaved_k::<false, KGroupsQ4K, kquant::Q4K, super::avx2::kquant::Q4K>(w, a, bpr, out);
    fn gemm_q4_k_interleaved_amx(w: &[u8], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        interleaved_k::<true, KGroupsQ4K, kquant::Q4K, super::avx2::kquant::Q4K>(w, a, bpr, out);
    fn gemm_q6_k_interleaved(w: &[u8], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        interleaved_k::<false, KGroupsQ6K, kquant::Q6K, super::avx2::kquant::Q6K>(w, a, bpr, out);
    fn gemm_q6_k_interleaved_amx(w: &[u8], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        interleaved_k::<true, KGroupsQ6K, kquant::Q6K, super::avx2::kquant::Q6K>(w, a, bpr, out);
    fn gemm_q4_k_amx(w: &[BlockQ4K], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        kquant::gemm::<kquant::Q4K, super::avx2::kquant::Q4K, true>(w, a, bpr, out);
    fn gemm_q5_k_amx(w: &[BlockQ5K], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        kquant::gemm::<kquant::Q5K, super::avx2::kquant::Q5K, true>(w, a, bpr, out);
    fn gemm_q6_k_amx(w: &[BlockQ6K], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        kquant::gemm::<kquant::Q6K, super::avx2::kquant::Q6K, true>(w, a, bpr, out);
    fn gemm_q4_k(w: &[BlockQ4K], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        kquant::gemm::<kquant::Q4K, super::avx2::kquant::Q4K, false>(w, a, bpr, out);
    fn gemm_q5_k(w: &[BlockQ5K], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        kquant::gemm::<kquant::Q5K, super::avx2::kquant::Q5K, false>(w, a, bpr, out);
    fn gemm_q6_k(w: &[BlockQ6K], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        kquant::gemm::<kquant::Q6K, super::avx2::kquant::Q6K, false>(w, a, bpr, out);
    fn gemm_f32(w: &[f32], a: &[f32], cols: usize, out: ProductOut) = gemm_float::<f32>(w, a, cols, out);
    fn gemm_f16(w: &[f16], a: &[f32], cols: usize, out: ProductOut) = gemm_float::<f16>(w, a, cols, out);
    fn gemm_bf16(w: &[bf16], a: &[f32], cols: usize, out: ProductOut) =
        gemm_float::<bf16>(w, a, cols, out);
    fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) = super::axpy_f32::<Zmm>(alpha, x, y);
}

// ---------------------------------------------------------------------------------------------------------------
// Q4_0, few tokens: four blocks per load, eight per reduction.
//
// One-token Q4_0 products must keep up with DRAM at 18 bytes a block, so the work per block is what limits them.
// Four consecutive blocks are 72 bytes: two zmm loads inside them (bytes 0..64 and 8..72) hold all four 16-byte
// nibble arrays at even offsets, so one two-source word permute (`vpermt2w`, AVX-512 BW; no VBMI needed)
// gathers them into one zmm, and one shift and two masks split it into the low nibbles (weights 0..16 of each
// block, one block per 128-bit lane) and the high ones (weights 16..32): two `vpdpbusd` per token against
// activation bytes laid out the same way give each block's (uncorrected) integer dot in 4 lanes. Two such quads
// are then folded into one vector (`vpackssdw` + `vpmaddwd` by ones: every lane sums 8 products of at most
// 15 * 127, so nothing saturates), 2 lanes per block for 8 blocks. Measured one-token from L2 on the EPYC (CPU
// time, busy machine): 21 GB/s with the earlier two-blocks-per-zmm kernel, 29 with four blocks per step, 31 with
// the fold.
//
// Batch invariance: the folded vectors of a tile's 4 rows are reduced together (4 in-lane shuffles and 2 adds)
// to two vectors holding every block's exact integer dot for the 4 rows (128-bit lane `L`: block `L`, or
// `4 + L`, of rows 0..4), corrected by `-8 * sum(activation block)`, converted, and accumulated block by block
// in order into the token's 4-row accumulator with the lane kernel's step, `acc = fma(cvt(isum), dw * da,
// acc)`. The 8 row scales of each row (one word permute of both quads' first loads, `vcvtph2ps`) are transposed
// into the same layout once per tile and octet. Without it, the shared `gemm_few` decodes Q4_0 models a quarter
// slower here (64 against 84 tokens/s).
//
// The activation side (bytes in lane order, and each block's correction and scale in the reduced layout) is
// prepared once per call; blocks past the last whole four run one 256-bit step each, after the octets.

/// Word indices of `vpermt2w` over `x0` = bytes 0..64 and `x1` = bytes 40..72 of four blocks: lane `b` (8 words)
/// takes block `b`'s nibble bytes, which start at byte `18b + 2` (word `9b + 1` of `x0`; the fourth block's are
/// words 8..16 of `x1`, indices 40..48).
const Q4_QS_WORDS: [i16; 32] = [
    1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 24, 25, 26, 40, 41,
    42, 43, 44, 45, 46, 47,
];

/// Word indices of `vpermt2w` over the first loads of two quads (`x0` of the even quad, then of the odd one)
/// giving the 8 f16 scales of an octet in block order: block `b` of the even quad at word `9b`, of the odd one at
/// index `32 + 9b`.
const Q4_D_WORDS: [i16; 32] = [
    0, 9, 18, 27, 32, 41, 50, 59, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0,
];

/// Dword indices of `vpermt2ps` over `[row 0, row 1]` and `[row 2, row 3]` (8 block scales each): lane `4L + i`
/// takes block `L` (first) or `4 + L` (second) of row `i`, the layout of `reduce_rows`.
const Q4_DW_EVEN: [i32; 16] = [0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27];
const Q4_DW_ODD: [i32; 16] = [4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31];

/// Dwords per prepared activation quad in `Scratch::act`: the low-half bytes of four blocks, then the high.
const QUAD_ACT: usize = 32;

/// Floats (and corrections) per prepared activation octet in `Scratch::da` (`Scratch::corr`): each block's
/// value in the 4 lanes of its 128-bit lane, the even quad's blocks in the first 16, the odd quad's in the second.
const OCT_ACT: usize = 32;

/// Two quads' lane sums folded into one vector: per 128-bit lane `L`, lanes `4L, 4L + 1` of `even` summed in
/// pairs, then those of `odd` (exact while every lane fits in i16).
#[inline(always)]
unsafe fn fold(even: __m512i, odd: __m512i) -> __m512i {
    unsafe { _mm512_madd_epi16(_mm512_packs_epi32(even, odd), _mm512_set1_epi16(1)) }
}

/// The folded sums of 4 rows (`fold`: per 128-bit lane `L`, 2 lanes of block `L`, then 2 of block `4 + L`) as
/// each block's exact sum per row: `[even, odd]`, lane `4L + i` of `even` block `L` of row `i`, of `odd` block
/// `4 + L`.
#[inline(always)]
unsafe fn reduce_rows(f: &[__m512i; 4]) -> [__m512i; 2] {
    unsafe {
        let f0 = _mm512_castsi512_ps(f[0]);
        let f1 = _mm512_castsi512_ps(f[1]);
        let f2 = _mm512_castsi512_ps(f[2]);
        let f3 = _mm512_castsi512_ps(f[3]);
        // Per lane: [f0 block L, f0 block 4 + L, f1 block L, f1 block 4 + L], and the same of f2, f3.
        let r01 = _mm512_add_epi32(
            _mm512_castps_si512(_mm512_shuffle_ps::<0x88>(f0, f1)),
            _mm512_castps_si512(_mm512_shuffle_ps::<0xdd>(f0, f1)),
        );
        let r23 = _mm512_add_epi32(
            _mm512_castps_si512(_mm512_shuffle_ps::<0x88>(f2, f3)),
            _mm512_castps_si512(_mm512_shuffle_ps::<0xdd>(f2, f3)),
        );
        let (r01, r23) = (_mm512_castsi512_ps(r01), _mm512_castsi512_ps(r23));
        [
            _mm512_castps_si512(_mm512_shuffle_ps::<0x88>(r01, r23)),
            _mm512_castps_si512(_mm512_shuffle_ps::<0xdd>(r01, r23)),
        ]
    }
}

/// 128-bit lane `l` of `v`, for `l < 4`.
#[inline(always)]
unsafe fn quarter(v: __m512, l: usize) -> __m128 {
    unsafe {
        match l {
            0 => _mm512_castps512_ps128(v),
            1 => _mm512_extractf32x4_ps::<1>(v),
            2 => _mm512_extractf32x4_ps::<2>(v),
            _ => _mm512_extractf32x4_ps::<3>(v),
        }
    }
}

/// `acc = fma(cvt(isum), scale, acc)` for the 4 blocks of `isum` and `scale` (one per 128-bit lane, 4 rows each),
/// in order: the lane kernel's step per block.
#[inline(always)]
unsafe fn acc_blocks(isum: __m512i, scale: __m512, acc: __m128) -> __m128 {
    unsafe {
        let x = _mm512_cvtepi32_ps(isum);
        let mut acc = acc;
        for l in 0..4 {
            acc = _mm_fmadd_ps(quarter(x, l), quarter(scale, l), acc);
        }
        acc
    }
}

/// `W[r] . A[t]` for tokens `t0..t1`: 4 rows x up to 4 tokens.
#[inline(always)]
unsafe fn gemm_few_q4(
    w: &[BlockQ4_0],
    a: &[BlockQ8_0],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    let (_, rows) = super::tile_shape(w.len(), a.len(), bpr, t0, t1, out);
    let (nt, quads) = (t1 - t0, bpr / 4);
    let octs = quads.div_ceil(2);
    // SAFETY: see `super::scratch`.
    let s = unsafe { &mut *super::scratch() };
    // Per token and quad: activation bytes; per token and octet: corrections and scales (`OCT_ACT`).
    super::grow(&mut s.act, nt * quads * QUAD_ACT);
    super::grow(&mut s.corr, nt * octs * OCT_ACT);
    super::grow(&mut s.da, nt * octs * OCT_ACT);
    // SAFETY: the loads read blocks 4q..4q + 4 <= bpr of token t0 + t < n; each store writes 16 lanes at
    // (t * quads + q) * 32 (+ 16) or 32 values at (t * octs + oc) * 32, within the sizes grown above.
    unsafe {
        for t in 0..nt {
            let blocks = a.as_ptr().add((t0 + t) * bpr);
            for q in 0..quads {
                let blk = blocks.add(4 * q);
                let act = s.act.as_mut_ptr().add((t * quads + q) * QUAD_ACT);
                for h in 0..2 {
                    let half = |b: usize| (*blk.add(b)).qs.as_ptr().add(16 * h) as *const __m128i;
                    let x = _mm512_castsi128_si512(_mm_loadu_si128(half(0)));
                    let x = _mm512_inserti32x4::<1>(x, _mm_loadu_si128(half(1)));
                    let x = _mm512_inserti32x4::<2>(x, _mm_loadu_si128(half(2)));
                    let x = _mm512_inserti32x4::<3>(x, _mm_loadu_si128(half(3)));
                    _mm512_storeu_si512(act.add(16 * h) as *mut _, x);
                }
            }
            for oc in 0..octs {
                // Blocks 8oc..8oc + 8 (zero for a missing odd quad, whose steps the tiles skip).
                let o = (t * octs + oc) * OCT_ACT;
                for k in 0..8 {
                    let blk = 8 * oc + k;
                    let (mut c, mut d) = (0, 0.0);
                    if blk < 4 * quads {
                        let ab = &*blocks.add(blk);
                        let mut sum = 0i32;
                        for &q in &ab.qs {
                            sum += q as i32;
                        }
                        c = -8 * sum;
                        d = super::f16_bits_to_f32(ab.d.to_bits());
                    }
                    for l in 0..4 {
                        *s.corr.as_mut_ptr().add(o + 4 * k + l) = c;
                        *s.da.as_mut_ptr().add(o + 4 * k + l) = d;
                    }
                }
            }
        }
        super::prefetch_head(w, rows * bpr);
        let mut tiles = Q4Tiles {
            w,
            a,
            bpr,
            t0,
            s,
            out: out.reborrow(),
        };
        super::few_tiles::<_, 4>(&mut tiles, rows, t0, t1);
    }
}

/// The few-token tiles of a Q4_0 product, with the activation side prepared by `gemm_few_q4` in `s` for tokens
/// `t0..`.
struct Q4Tiles<'a> {
    w: &'a [BlockQ4_0],
    a: &'a [BlockQ8_0],
    bpr: usize,
    t0: usize,
    s: &'a super::Scratch,
    out: ProductOut<'a>,
}

impl FewTile for Q4Tiles<'_> {
    /// Rows `r0..r0 + RT` x tokens `t..t + TT` of the Q4_0 few-token product: per token, an accumulator of the
    /// 4 rows (a single row's tile computes rows of zeros beside it), stored as it is.
    #[inline(always)]
    // Indexed loops over the activation quads: the iterator forms clippy suggests compiled to a 16% slower loop
    // (one token from L2, 32.9 against 27.7 GB/s, alternating runs).
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const RT: usize, const TT: usize>(&mut self, r0: usize, t: usize) {
        const { assert!(RT == 4 || RT == 1) };
        let (w, a, bpr, t0, s) = (self.w, self.a, self.bpr, self.t0, self.s);
        let out = &mut self.out;
        let quads = bpr / 4;
        let octs = quads.div_ceil(2);
        let row_bytes = bpr * size_of::<BlockQ4_0>();
        let ahead = super::PREFETCH_BYTES.next_multiple_of(RT * row_bytes);
        debug_assert!((r0 + RT) * bpr <= w.len() && (t + TT) * bpr <= a.len());
        // SAFETY (bounds): rows r0..r0 + RT and tokens t..t + TT exist (the caller's tiling); the weight loads read
        // bytes 0..72 of blocks 4q..4q + 4 <= bpr of those rows; the prepared activations hold (t1 - t0) * quads
        // (and * octs) entries. Prefetches may point anywhere (they never fault), so their addresses wrap.
        unsafe {
            let qs_words = _mm512_loadu_si512(Q4_QS_WORDS.as_ptr() as *const _);
            let d_words = _mm512_loadu_si512(Q4_D_WORDS.as_ptr() as *const _);
            let dw_even = _mm512_loadu_si512(Q4_DW_EVEN.as_ptr() as *const _);
            let dw_odd = _mm512_loadu_si512(Q4_DW_ODD.as_ptr() as *const _);
            let low4 = _mm512_set1_epi8(0x0f);
            let mut acc = [_mm_setzero_ps(); TT];
            let wp = (w.as_ptr() as *const u8).add(r0 * row_bytes);
            for oc in 0..octs {
                // The odd quad of the last octet may not exist (quads odd): then only the even one is read, its
                // sums are folded with zeros, and the odd blocks' steps are skipped.
                let two = 2 * oc + 1 < quads;
                // The activation side of this octet, shared by the rows (loads are the scarce resource: a zmm
                // load takes a whole cycle of this core's load bandwidth).
                let mut act = [[[_mm512_setzero_si512(); 2]; 2]; TT];
                for j in 0..TT {
                    for h in 0..1 + two as usize {
                        let p = s
                            .act
                            .as_ptr()
                            .add(((t - t0 + j) * quads + 2 * oc + h) * QUAD_ACT);
                        act[j][h] = [
                            _mm512_loadu_si512(p as *const _),
                            _mm512_loadu_si512(p.add(16) as *const _),
                        ];
                    }
                }
                let mut folded = [[_mm512_setzero_si512(); 4]; TT];
                let mut dws = [_mm256_setzero_ps(); 4];
                for i in 0..RT {
                    let mut isum = [[_mm512_setzero_si512(); 2]; TT];
                    let mut x0s = [_mm512_setzero_si512(); 2];
                    for h in 0..1 + two as usize {
                        let p = wp.add(i * row_bytes + (2 * oc + h) * 72);
                        // PREFETCH_BYTES ahead (whole row tiles: the same rows further on) into L2; 72 bytes span
                        // two lines. The hardware prefetchers do not follow several interleaved rows well.
                        let pf = p.wrapping_add(ahead) as *const i8;
                        _mm_prefetch::<_MM_HINT_T1>(pf);
                        _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(64));
                        let x0 = _mm512_loadu_si512(p as *const _);
                        let x1 =
                            _mm512_castsi256_si512(_mm256_loadu_si256(p.add(40) as *const __m256i));
                        x0s[h] = x0;
                        let qs = _mm512_permutex2var_epi16(x0, qs_words, x1);
                        let lo = _mm512_and_si512(qs, low4);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(qs), low4);
                        for (isum_j, act_j) in isum.iter_mut().zip(&act) {
                            let [alo, ahi] = act_j[h];
                            isum_j[h] = _mm512_dpbusd_epi32(
                                _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, alo),
                                hi,
                                ahi,
                            );
                        }
                    }
                    if !two {
                        x0s[1] = x0s[0];
                    }
                    // The row's 8 block scales in block order.
                    dws[i] = _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_permutex2var_epi16(
                        x0s[0], d_words, x0s[1],
                    )));
                    for j in 0..TT {
                        folded[j][i] = fold(isum[j][0], isum[j][1]);
                    }
                }
                // The scales transposed into `reduce_rows`' layout: [rows 0, 1] and [rows 2, 3], permuted.
                let z01 = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                    _mm512_castpd256_pd512(_mm256_castps_pd(dws[0])),
                    _mm256_castps_pd(dws[1]),
                ));
                let z23 = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                    _mm512_castpd256_pd512(_mm256_castps_pd(dws[2])),
                    _mm256_castps_pd(dws[3]),
                ));
                let dw = [
                    _mm512_permutex2var_ps(z01, dw_even, z23),
                    _mm512_permutex2var_ps(z01, dw_odd, z23),
                ];
                for (j, acc_j) in acc.iter_mut().enumerate() {
                    let sums = reduce_rows(&folded[j]);
                    let o = ((t - t0 + j) * octs + oc) * OCT_ACT;
                    for h in 0..1 + two as usize {
                        let isum = _mm512_add_epi32(
                            sums[h],
                            _mm512_loadu_si512(s.corr.as_ptr().add(o + 16 * h) as *const _),
                        );
                        // dw * da per lane: the lane kernel's da * dw, f32 multiplication commuting.
                        let scale =
                            _mm512_mul_ps(dw[h], _mm512_loadu_ps(s.da.as_ptr().add(o + 16 * h)));
                        *acc_j = acc_blocks(isum, scale, *acc_j);
                    }
                }
            }
            // The blocks past the last whole four, one 256-bit step each, in order after the octets.
            for b in 4 * quads..bpr {
                let mut dw = [0.0f32; 4];
                let mut wv = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 4];
                for i in 0..RT {
                    let blk = w.as_ptr().add((r0 + i) * bpr + b);
                    wv[i] = <Q4<Vnni512> as BlockDot>::load(blk);
                    dw[i] = super::f16_bits_to_f32((*blk).d.to_bits());
                }
                let dw = _mm_loadu_ps(dw.as_ptr());
                for (j, acc_j) in acc.iter_mut().enumerate() {
                    let ab = &*a.as_ptr().add((t + j) * bpr + b);
                    let q = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                    let c = _mm256_sub_epi32(
                        _mm256_setzero_si256(),
                        _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(8), q),
                    );
                    let mut v = [_mm256_setzero_si256(); 4];
                    for i in 0..RT {
                        v[i] = <Q4<Vnni512> as BlockDot>::dot(c, wv[i], q);
                    }
                    let isum = super::hsum4_epi32(v[0], v[1], v[2], v[3]);
                    let da = super::f16_bits_to_f32(ab.d.to_bits());
                    let scale = _mm_mul_ps(dw, _mm_set1_ps(da));
                    *acc_j = _mm_fmadd_ps(_mm_cvtepi32_ps(isum), scale, *acc_j);
                }
            }
            for (j, &acc_j) in acc.iter().enumerate() {
                if RT == 4 {
                    // SAFETY: rows r0..r0 + 4 of token t + j are inside the window `tile_shape` checked.
                    _mm_storeu_ps(out.token(t + j).as_mut_ptr().add(r0), acc_j);
                } else {
                    out.token(t + j)[r0] = _mm_cvtss_f32(acc_j);
                }
            }
        }
    }
}

/// Some rows' bytes and their output window.
type RowsPart<'w, 'o> = (&'w [u8], ProductOut<'o>);

/// A matrix interleaved in groups of 16 rows (`Layout::Interleaved`, `row_bytes` a row, `tokens` tokens) cut
/// into its whole groups and the rows past them (as they lie): each part's bytes and output window, the rest
/// empty when the rows are whole groups. Checks the output's shape.
fn split_at_groups<'w, 'o>(
    w: &'w [u8],
    row_bytes: usize,
    tokens: usize,
    out: ProductOut<'o>,
) -> [RowsPart<'w, 'o>; 2] {
    assert!(row_bytes > 0 && w.len().is_multiple_of(row_bytes));
    let rows = w.len() / row_bytes;
    crate::kernels::check_shape(&out, rows, tokens);
    let grouped = rows / 16 * 16;
    let (groups, tail) = out.split_at_row(grouped);
    let (wg, wt) = w.split_at(grouped * row_bytes);
    [(wg, groups), (wt, tail)]
}

/// IQ4_XS rows interleaved in groups of 16 (`kernels::iq4_xs::interleave`), the rows past the last whole group
/// as they lie.
#[inline(always)]
unsafe fn interleaved_iq4_xs<const AMX: bool>(
    w: &[u8],
    a: &[BlockQ8_0],
    bpr: usize,
    out: ProductOut,
) {
    use crate::kernels::iq4_xs::SUB_BLOCKS;
    assert!(bpr > 0 && bpr.is_multiple_of(SUB_BLOCKS));
    let row_bytes = bpr / SUB_BLOCKS * size_of::<BlockIQ4XS>();
    let [(wg, mut groups), (wt, tail)] = split_at_groups(w, row_bytes, a.len() / bpr, out);
    // SAFETY: the set's features are present.
    unsafe {
        row_lanes::gemm_interleaved_iq4_xs::<AMX>(wg, a, bpr, &mut groups);
        if !wt.is_empty() {
            super::iq4_xs::gemm_rows(bytemuck::cast_slice(wt), a, bpr, tail);
        }
    }
}

/// K-quant rows interleaved in groups of 16 (`kernels::q4_k::interleave`, `kernels::q6_k::interleave`): the
/// whole groups on `k_row_lanes` (format `G`), the rows past them as they lie on the products of `K` and `Y`.
#[inline(always)]
unsafe fn interleaved_k<
    const AMX: bool,
    G: KGroups,
    K: super::kquant::KQuant,
    Y: super::kquant::KQuant<W = K::W>,
>(
    w: &[u8],
    a: &[BlockQ8K],
    bpr: usize,
    out: ProductOut,
) where
    K::W: super::amx::KDigits + bytemuck::Pod,
{
    let row_bytes = bpr * size_of::<K::W>();
    let [(wg, mut groups), (wt, tail)] = split_at_groups(w, row_bytes, a.len() / bpr, out);
    // SAFETY: the set's features are present (and with AMX, the tile state was granted).
    unsafe {
        super::k_row_lanes::gemm_interleaved_k::<G, AMX>(wg, a, bpr, &mut groups);
        if !wt.is_empty() {
            kquant::gemm::<K, Y, AMX>(bytemuck::cast_slice(wt), a, bpr, tail);
        }
    }
}

/// A matrix interleaved in groups of 16 rows (`Layout::Interleaved`): its whole groups on `row_lanes`, the rows
/// past them (as they lie) on the product of `D` and `Y` over rows.
#[inline(always)]
unsafe fn interleaved<
    const AMX: bool,
    G: row_lanes::Groups,
    D: Few + super::LaneDot<W = <D as BlockDot>::W>,
    Y: super::LaneDot<W = <D as BlockDot>::W>,
>(
    w: &[u8],
    a: &[BlockQ8_0],
    bpr: usize,
    out: ProductOut,
) where
    <D as BlockDot>::W: row_lanes::RowBlock + bytemuck::Pod,
{
    let row_bytes = bpr * size_of::<<D as BlockDot>::W>();
    let [(wg, mut groups), (wt, tail)] = split_at_groups(w, row_bytes, a.len() / bpr, out);
    // SAFETY: the set's features are present.
    unsafe {
        row_lanes::gemm_interleaved::<G, AMX>(wg, a, bpr, &mut groups);
        if !wt.is_empty() {
            gemm_quant::<D, Y>(bytemuck::cast_slice(wt), a, bpr, tail);
        }
    }
}

/// Token counts (past the last whole zmm of tokens) that run on `row_lanes`, one lane per row: from 2 tokens
/// on, it does the per-block work once for 16 rows instead of summing each row's lanes per token.
const ROW_LANES_MIN: usize = 2;
const ROW_LANES_MAX: usize = 15;

/// Below this many tokens the whole product runs on `row_lanes` (passes of up to 16 tokens): one L2-resident
/// 512 x 1024 Q4_0 matrix, CPU time per call (`probe`), row lanes against the zmm lane kernel: 16 tokens 52 against
/// 72 us, 32 tokens 110 against 124; from about 48 the lane kernel's one-off activation transpose pays.
/// A batch of 16 sequences gives such products: attention's and the output's 16 tokens, busy experts' 5 to 12.
const ROW_LANES_BELOW: usize = 48;

/// Each format's few-token kernel.
trait Few: BlockDot {
    unsafe fn few(
        w: &[Self::W],
        a: &[BlockQ8_0],
        bpr: usize,
        t0: usize,
        t1: usize,
        out: &mut ProductOut,
    );
}

// SAFETY (every method): the module contract in `x86/mod.rs`.
impl Few for Q8<Vnni512> {
    #[inline(always)]
    unsafe fn few(
        w: &[BlockQ8_0],
        a: &[BlockQ8_0],
        bpr: usize,
        t0: usize,
        t1: usize,
        out: &mut ProductOut,
    ) {
        unsafe { super::gemm_few::<Self, 4>(w, a, bpr, t0, t1, out) }
    }
}

// SAFETY (every method): the module contract in `x86/mod.rs`.
impl Few for IQ4<Vnni512> {
    #[inline(always)]
    unsafe fn few(
        w: &[BlockIQ4NL],
        a: &[BlockQ8_0],
        bpr: usize,
        t0: usize,
        t1: usize,
        out: &mut ProductOut,
    ) {
        unsafe { super::gemm_few::<Self, 4>(w, a, bpr, t0, t1, out) }
    }
}

// SAFETY (every method): the module contract in `x86/mod.rs`.
impl Few for Q4<Vnni512> {
    #[inline(always)]
    unsafe fn few(
        w: &[BlockQ4_0],
        a: &[BlockQ8_0],
        bpr: usize,
        t0: usize,
        t1: usize,
        out: &mut ProductOut,
    ) {
        unsafe { gemm_few_q4(w, a, bpr, t0, t1, out) }
    }
}

/// The whole product: whole zmm of tokens on the lane kernel; a remainder of 6 or more tokens on the ymm lane
/// kernel (padded to whole ymm), a smaller one on the few-token kernel.
#[inline(always)]
unsafe fn gemm_quant<
    D: Few + super::LaneDot<W = <D as BlockDot>::W>,
    Y: super::LaneDot<W = <D as BlockDot>::W>,
>(
    w: &[<D as BlockDot>::W],
    a: &[BlockQ8_0],
    bpr: usize,
    mut out: ProductOut,
) where
    <D as BlockDot>::W: super::row_lanes::RowBlock,
{
    if bpr == 0 || a.is_empty() || w.is_empty() {
        return;
    }
    let (n, rows) = (a.len() / bpr, w.len() / bpr);
    if (ROW_LANES_MIN..ROW_LANES_BELOW).contains(&n) && rows >= 16 {
        let rows16 = rows / 16 * 16;
        let (mut head, mut tail) = out.reborrow().split_at_row(rows16);
        unsafe {
            super::row_lanes::gemm_rows16(&w[..rows16 * bpr], a, bpr, 0, n, &mut head);
            // The last rows on the few-token kernel, at most 15 tokens at a time (the size of its buffers).
            let mut t = 0;
            while rows16 < rows && t < n {
                let t1 = (t + ROW_LANES_MAX).min(n);
                D::few(&w[rows16 * bpr..], a, bpr, t, t1, &mut tail);
                t = t1;
            }
        }
        return;
    }
    let lane_tokens = n / 16 * 16;
    unsafe {
        if lane_tokens > 0 {
            super::gemm_lanes::<super::BlockLanes<D>, 8>(w, a, bpr, 0, lane_tokens, &mut out);
        }
        let few = n - lane_tokens;
        if (ROW_LANES_MIN..=ROW_LANES_MAX).contains(&few) && rows >= 16 {
            // Whole tiles of 16 rows with one lane per row; the last rows on the few-token kernel.
            let rows16 = rows / 16 * 16;
            let (mut head, mut tail) = out.reborrow().split_at_row(rows16);
            super::row_lanes::gemm_rows16(&w[..rows16 * bpr], a, bpr, lane_tokens, n, &mut head);
            if rows16 < rows {
                D::few(&w[rows16 * bpr..], a, bpr, lane_tokens, n, &mut tail);
            }
        } else if few >= 6 {
            super::gemm_lanes::<super::BlockLanes<Y>, 8>(w, a, bpr, lane_tokens, n, &mut out);
        } else if few > 0 {
            D::few(w, a, bpr, lane_tokens, n, &mut out);
        }
    }
}
