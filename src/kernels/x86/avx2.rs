//! AVX2 + FMA + F16C, and AVX-VNNI (the 256-bit `vpdpbusd` of Alder Lake / Zen 5 class CPUs without
//! AVX-512), which shares everything but the byte dot.
//!
//! AVX2's byte dot is `vpmaddubsw` (u8 x i8, pairs summed into a *saturating* i16) then `vpmaddwd` by ones.
//! To stay exact: Q4_0 nibbles (0..15) times activations give at most 2 * 15 * 128 per pair, so even the 8
//! steps of a block can be summed in i16 before widening; Q8_0 uses `|w|` (at most 128) against the activation
//! with `w`'s sign, at most 2 * 128 * 127 = 32512 per pair, which needs activations in -127..=127 (what
//! `quantize_q8_0` produces: -128 would overflow `vpsignb`).

use std::arch::x86_64::*;

use half::{bf16, f16};
use quarry_quantize::blocks::{BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K};

use super::{BlockDot, FloatLanes, LaneDot};

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
pub(in crate::kernels) static SET: Kernels = Kernels {
    name: "avx2",
    quantize_q8_0,
    gemm_q8_0,
    gemm_q4_0,
    quantize_q8_k,
    gemm_q4_k,
    gemm_q5_k,
    gemm_q6_k,
    gemm_f32,
    gemm_f16,
    gemm_bf16,
    axpy_f32,
    ops: crate::kernels::ops::x86::AVX2,
};

/// Only handed out by `kernels::available` after `detected_vnni()`.
pub(in crate::kernels) static SET_VNNI: Kernels = Kernels {
    name: "avxvnni",
    quantize_q8_0,
    gemm_q8_0: gemm_q8_0_vnni,
    gemm_q4_0: gemm_q4_0_vnni,
    quantize_q8_k,
    gemm_q4_k,
    gemm_q5_k,
    gemm_q6_k,
    gemm_f32,
    gemm_f16,
    gemm_bf16,
    axpy_f32,
    ops: crate::kernels::ops::x86::AVX2,
};

#[inline(always)]
unsafe fn madd_ones(p: __m256i) -> __m256i {
    unsafe { _mm256_madd_epi16(p, _mm256_set1_epi16(1)) }
}

#[inline(always)]
unsafe fn bcast(p: *const u8) -> __m256i {
    unsafe { _mm256_set1_epi32((p as *const i32).read_unaligned()) }
}

pub(crate) struct Q8;
pub(crate) struct Q4;
pub(crate) struct VnniQ8;
pub(crate) struct VnniQ4;

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl BlockDot for Q8 {
    type W = BlockQ8_0;
    const BIAS: i32 = 0;
    #[inline(always)]
    unsafe fn d_bits(w: &BlockQ8_0) -> u16 {
        w.d.to_bits()
    }
    #[inline(always)]
    unsafe fn load(w: *const BlockQ8_0) -> (__m256i, __m256i) {
        unsafe {
            let x = super::q8_bytes(&*w);
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
impl BlockDot for Q4 {
    type W = BlockQ4_0;
    const BIAS: i32 = 8;
    #[inline(always)]
    unsafe fn d_bits(w: &BlockQ4_0) -> u16 {
        w.d.to_bits()
    }
    #[inline(always)]
    unsafe fn load(w: *const BlockQ4_0) -> (__m256i, __m256i) {
        unsafe {
            let x = super::q4_nibbles(&*w);
            (x, x)
        }
    }
    #[inline(always)]
    unsafe fn dot(acc: __m256i, w: (__m256i, __m256i), a: __m256i) -> __m256i {
        unsafe { _mm256_add_epi32(acc, madd_ones(_mm256_maddubs_epi16(w.0, a))) }
    }
}

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl BlockDot for VnniQ8 {
    type W = BlockQ8_0;
    const BIAS: i32 = 128;
    #[inline(always)]
    unsafe fn d_bits(w: &BlockQ8_0) -> u16 {
        w.d.to_bits()
    }
    #[inline(always)]
    unsafe fn load(w: *const BlockQ8_0) -> (__m256i, __m256i) {
        unsafe {
            let x = super::q8_bytes(&*w);
            (_mm256_xor_si256(x, _mm256_set1_epi8(-128)), x)
        }
    }
    #[inline(always)]
    unsafe fn dot(acc: __m256i, w: (__m256i, __m256i), a: __m256i) -> __m256i {
        unsafe { _mm256_dpbusd_avx_epi32(acc, w.0, a) }
    }
}

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl BlockDot for VnniQ4 {
    type W = BlockQ4_0;
    const BIAS: i32 = 8;
    #[inline(always)]
    unsafe fn d_bits(w: &BlockQ4_0) -> u16 {
        w.d.to_bits()
    }
    #[inline(always)]
    unsafe fn load(w: *const BlockQ4_0) -> (__m256i, __m256i) {
        unsafe {
            let x = super::q4_nibbles(&*w);
            (x, x)
        }
    }
    #[inline(always)]
    unsafe fn dot(acc: __m256i, w: (__m256i, __m256i), a: __m256i) -> __m256i {
        unsafe { _mm256_dpbusd_avx_epi32(acc, w.0, a) }
    }
}

/// The lane-kernel methods every format shares on 8 tokens per ymm.
// SAFETY (every method generated): as for the trait impls, see `x86/mod.rs`.
macro_rules! ymm_lanes {
    () => {
        type I = __m256i;
        type F = __m256;
        const N: usize = 8;
        const RW: usize = 4;
        #[inline(always)]
        unsafe fn load_i(p: *const i32) -> __m256i {
            unsafe { _mm256_loadu_si256(p as *const __m256i) }
        }
        #[inline(always)]
        unsafe fn load_f(p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn zero_f() -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat_f(x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn scale_acc(i: __m256i, s: __m256, acc: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), s, acc) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn store_f(p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_tile(acc: &[__m256], p: *mut f32, ldo: usize) {
            unsafe { super::store_tile_4x8(acc, p, ldo) }
        }
    };
}

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl LaneDot for Q8 {
    type W = BlockQ8_0;
    const BIAS: i32 = 0;
    const W_BYTES: usize = 64;
    ymm_lanes!();
    #[inline(always)]
    unsafe fn d_bits(w: &BlockQ8_0) -> u16 {
        w.d.to_bits()
    }
    /// `|w|`, then `w` for its signs.
    #[inline(always)]
    unsafe fn prep(w: &BlockQ8_0, dst: *mut u8) {
        unsafe {
            let x = super::q8_bytes(w);
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

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl LaneDot for Q4 {
    type W = BlockQ4_0;
    const BIAS: i32 = 8;
    const W_BYTES: usize = 32;
    ymm_lanes!();
    #[inline(always)]
    unsafe fn d_bits(w: &BlockQ4_0) -> u16 {
        w.d.to_bits()
    }
    #[inline(always)]
    unsafe fn prep(w: &BlockQ4_0, dst: *mut u8) {
        unsafe { _mm256_storeu_si256(dst as *mut __m256i, super::q4_nibbles(w)) }
    }
    /// All 8 steps summed in i16 (at most 8 * 3840), widened once.
    #[inline(always)]
    unsafe fn block(acc: __m256i, w: *const u8, s: *const u32) -> __m256i {
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

// SAFETY (every method generated): as for the trait impls, see `x86/mod.rs`.
macro_rules! vnni_block {
    () => {
        const W_BYTES: usize = 32;
        #[inline(always)]
        unsafe fn block(acc: __m256i, w: *const u8, s: *const u32) -> __m256i {
            unsafe {
                let mut acc = acc;
                for k in 0..8 {
                    let a = _mm256_loadu_si256(s.add(8 * k) as *const __m256i);
                    acc = _mm256_dpbusd_avx_epi32(acc, bcast(w.add(4 * k)), a);
                }
                acc
            }
        }
    };
}

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl LaneDot for VnniQ8 {
    type W = BlockQ8_0;
    const BIAS: i32 = 128;
    ymm_lanes!();
    vnni_block!();
    #[inline(always)]
    unsafe fn d_bits(w: &BlockQ8_0) -> u16 {
        w.d.to_bits()
    }
    #[inline(always)]
    unsafe fn prep(w: &BlockQ8_0, dst: *mut u8) {
        unsafe {
            let u = _mm256_xor_si256(super::q8_bytes(w), _mm256_set1_epi8(-128));
            _mm256_storeu_si256(dst as *mut __m256i, u);
        }
    }
}

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl LaneDot for VnniQ4 {
    type W = BlockQ4_0;
    const BIAS: i32 = 8;
    ymm_lanes!();
    vnni_block!();
    #[inline(always)]
    unsafe fn d_bits(w: &BlockQ4_0) -> u16 {
        w.d.to_bits()
    }
    #[inline(always)]
    unsafe fn prep(w: &BlockQ4_0, dst: *mut u8) {
        unsafe { _mm256_storeu_si256(dst as *mut __m256i, super::q4_nibbles(w)) }
    }
}

pub(crate) struct Y;

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl FloatLanes for Y {
    type F = __m256;
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
    unsafe fn store(p: *mut f32, v: __m256) {
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
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
    unsafe fn sum(v: __m256) -> f32 {
        unsafe { super::hsum_ps_256(v) }
    }
}

target_feature_entries! { "avx2,fma,f16c";
    fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) = super::quantize_q8_k_avx2(x, out);
    fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) = super::quantize_q8_0_avx2(x, out);
    fn gemm_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        super::gemm_quant::<Q8, Q8, 4, 2>(w, a, bpr, out);
    fn gemm_q4_0(w: &[BlockQ4_0], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        super::gemm_quant::<Q4, Q4, 4, 2>(w, a, bpr, out);
    fn gemm_q4_k(w: &[BlockQ4K], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        kquant::gemm::<kquant::Q4K>(w, a, bpr, out);
    fn gemm_q5_k(w: &[BlockQ5K], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        kquant::gemm::<kquant::Q5K>(w, a, bpr, out);
    fn gemm_q6_k(w: &[BlockQ6K], a: &[BlockQ8K], bpr: usize, out: ProductOut) =
        kquant::gemm::<kquant::Q6K>(w, a, bpr, out);
    fn gemm_f32(w: &[f32], a: &[f32], cols: usize, out: ProductOut) =
        super::gemm_float::<Y, f32>(w, a, cols, out);
    fn gemm_f16(w: &[f16], a: &[f32], cols: usize, out: ProductOut) =
        super::gemm_float::<Y, f16>(w, a, cols, out);
    fn gemm_bf16(w: &[bf16], a: &[f32], cols: usize, out: ProductOut) =
        super::gemm_float::<Y, bf16>(w, a, cols, out);
    fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) = super::axpy_f32::<Y>(alpha, x, y);
}

target_feature_entries! { "avx2,fma,f16c,avxvnni";
    fn gemm_q8_0_vnni(w: &[BlockQ8_0], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        super::gemm_quant::<VnniQ8, VnniQ8, 4, 2>(w, a, bpr, out);
    fn gemm_q4_0_vnni(w: &[BlockQ4_0], a: &[BlockQ8_0], bpr: usize, out: ProductOut) =
        super::gemm_quant::<VnniQ4, VnniQ4, 4, 2>(w, a, bpr, out);
}
