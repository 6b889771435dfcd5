//! AVX-512 (F, BW, VL) with VNNI: `vpdpbusd` sums four u8 x i8 products per i32 lane with no intermediate
//! saturation, so both formats are exact for every byte value. Many-token products put 16 tokens in a zmm;
//! few-token products use the 256-bit form on one block at a time.

use std::arch::x86_64::*;

use half::{bf16, f16};
use quarry_quantize::blocks::{BlockQ4_0, BlockQ8_0};

use super::{BlockDot, FloatLanes, LaneDot};
use crate::kernels::Kernels;

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
pub(in crate::kernels) const SET: Kernels = Kernels {
    name: "avx512vnni",
    quantize_q8_0,
    gemm_q8_0,
    gemm_q4_0,
    gemm_f32,
    gemm_f16,
    gemm_bf16,
    dot_f32,
    axpy_f32,
};

pub(crate) struct Q8;
pub(crate) struct Q4;

impl BlockDot for Q8 {
    type W = BlockQ8_0;
    const BIAS: i32 = 128;
    #[inline(always)]
    unsafe fn d_bits(w: &BlockQ8_0) -> u16 {
        w.d.to_bits()
    }
    #[inline(always)]
    unsafe fn load(w: *const BlockQ8_0) -> (__m256i, __m256i) {
        // w + 128 as unsigned bytes.
        unsafe {
            let x = super::q8_bytes(&*w);
            (_mm256_xor_si256(x, _mm256_set1_epi8(-128)), x)
        }
    }
    #[inline(always)]
    unsafe fn dot(acc: __m256i, w: (__m256i, __m256i), a: __m256i) -> __m256i {
        unsafe { _mm256_dpbusd_epi32(acc, w.0, a) }
    }
}

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
        unsafe { _mm256_dpbusd_epi32(acc, w.0, a) }
    }
}

/// The lane-kernel methods shared by both formats (they differ only in how a block is prepared).
macro_rules! zmm_lanes {
    () => {
        type I = __m512i;
        type F = __m512;
        const N: usize = 16;
        const RW: usize = 8;
        const W_BYTES: usize = 32;
        #[inline(always)]
        unsafe fn block(acc: __m512i, w: *const u8, s: *const u32) -> __m512i {
            unsafe {
                let mut acc = acc;
                for k in 0..8 {
                    let u = _mm512_set1_epi32((w.add(4 * k) as *const i32).read_unaligned());
                    acc =
                        _mm512_dpbusd_epi32(acc, u, _mm512_loadu_si512(s.add(16 * k) as *const _));
                }
                acc
            }
        }
        #[inline(always)]
        unsafe fn load_i(p: *const i32) -> __m512i {
            unsafe { _mm512_loadu_si512(p as *const _) }
        }
        #[inline(always)]
        unsafe fn load_f(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn zero_f() -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat_f(x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn scale_acc(i: __m512i, s: __m512, acc: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), s, acc) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn store_f(p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
    };
}

impl LaneDot for Q8 {
    type W = BlockQ8_0;
    const BIAS: i32 = 128;
    zmm_lanes!();
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

impl LaneDot for Q4 {
    type W = BlockQ4_0;
    const BIAS: i32 = 8;
    zmm_lanes!();
    #[inline(always)]
    unsafe fn d_bits(w: &BlockQ4_0) -> u16 {
        w.d.to_bits()
    }
    #[inline(always)]
    unsafe fn prep(w: &BlockQ4_0, dst: *mut u8) {
        unsafe { _mm256_storeu_si256(dst as *mut __m256i, super::q4_nibbles(w)) }
    }
}

pub(crate) struct Z;

impl FloatLanes for Z {
    type F = __m512;
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
    unsafe fn store(p: *mut f32, v: __m512) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
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
    unsafe fn sum(v: __m512) -> f32 {
        unsafe { _mm512_reduce_add_ps(v) }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn quantize_q8_0_tf(x: &[f32], out: &mut [BlockQ8_0]) {
    unsafe { super::quantize_q8_0_avx2(x, out) }
}
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn gemm_q8_0_tf(w: &[BlockQ8_0], a: &[BlockQ8_0], bpr: usize, out: &mut [f32]) {
    unsafe { super::gemm_quant::<Q8, Q8, 8, 4>(w, a, bpr, out) }
}
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn gemm_q4_0_tf(w: &[BlockQ4_0], a: &[BlockQ8_0], bpr: usize, out: &mut [f32]) {
    unsafe { super::gemm_quant::<Q4, Q4, 8, 4>(w, a, bpr, out) }
}
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn gemm_f32_tf(w: &[f32], a: &[f32], cols: usize, out: &mut [f32]) {
    unsafe { super::gemm_float::<Z, f32>(w, a, cols, out) }
}
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn gemm_f16_tf(w: &[f16], a: &[f32], cols: usize, out: &mut [f32]) {
    unsafe { super::gemm_float::<Z, f16>(w, a, cols, out) }
}
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn gemm_bf16_tf(w: &[bf16], a: &[f32], cols: usize, out: &mut [f32]) {
    unsafe { super::gemm_float::<Z, bf16>(w, a, cols, out) }
}
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_f32_tf(x: &[f32], y: &[f32]) -> f32 {
    unsafe { super::dot_f32::<Z>(x, y) }
}
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn axpy_f32_tf(alpha: f32, x: &[f32], y: &mut [f32]) {
    unsafe { super::axpy_f32::<Z>(alpha, x, y) }
}

// The entries of `SET`. SAFETY (all): `SET` is only reachable through `available()`, which lists it only when
// `detected()` saw every feature enabled on the `_tf` functions; the bodies check slice lengths before any pointer load.
fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    unsafe { quantize_q8_0_tf(x, out) }
}
fn gemm_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0], bpr: usize, out: &mut [f32]) {
    unsafe { gemm_q8_0_tf(w, a, bpr, out) }
}
fn gemm_q4_0(w: &[BlockQ4_0], a: &[BlockQ8_0], bpr: usize, out: &mut [f32]) {
    unsafe { gemm_q4_0_tf(w, a, bpr, out) }
}
fn gemm_f32(w: &[f32], a: &[f32], cols: usize, out: &mut [f32]) {
    unsafe { gemm_f32_tf(w, a, cols, out) }
}
fn gemm_f16(w: &[f16], a: &[f32], cols: usize, out: &mut [f32]) {
    unsafe { gemm_f16_tf(w, a, cols, out) }
}
fn gemm_bf16(w: &[bf16], a: &[f32], cols: usize, out: &mut [f32]) {
    unsafe { gemm_bf16_tf(w, a, cols, out) }
}
fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    unsafe { dot_f32_tf(x, y) }
}
fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    unsafe { axpy_f32_tf(alpha, x, y) }
}
