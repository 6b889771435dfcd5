//! Q4_K, Q5_K and Q6_K against Q8_K on AVX2 (also the AVX-VNNI set's: `vpmaddubsw` already applies the group
//! scales in its `vpmaddwd`, where `vpdpbusd` would need a pack first, so VNNI has nothing cheaper to offer
//! here): the formats' `KQuant` impls and AVX2's `KDot`, for the drivers in `x86/kquant.rs`.
//!
//! A ymm of quants is exactly one Q4_K group (32 weights) or two Q6_K groups (one per 128-bit lane), so the
//! widening `vpmaddwd` after `vpmaddubsw` multiplies by a vector of the group's scale instead of by ones: the
//! scaled integer dot costs nothing extra. `vpmaddubsw` saturates at i16, but its pairs stay below it: at most
//! `2 * 63 * 127 = 16002` (Q6_K), `2 * 15 * 127` (Q4_K). The `bsums` term (Q4_K mins with `dmin`, Q6_K's `-32`
//! offset in the integer sum) is one `vpmaddwd` per block. Few tokens run one row at a time, many on 8-token
//! lanes over 4 unpacked rows.

use std::arch::x86_64::*;

use crate::kernels::q4_k::q4k_scales_mins;
use quarry_quantize::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};

use crate::kernels::ProductOut;

use super::super::f16_bits_to_f32;
use super::super::kquant::{KDot, KFormat, KLanes, KQuant, Q4K_MIN_CTRL, gemm_few};
use super::Avx2;

/// `vpshufb` controls spreading scale bytes over the 16 words of a ymm, one per `k < 8`: byte `step * k` into
/// every word of the low 128-bit lane, byte `step * k + step - 1` into those of the high lane, as the words' low
/// byte (zero-extended) or, with `high`, their high byte (for an arithmetic shift to sign-extend).
const fn word_ctrls(step: usize, high: bool) -> [[u8; 32]; 8] {
    let mut c = [[0x80u8; 32]; 8];
    let mut k = 0;
    while k < 8 {
        let mut i = 0;
        while i < 16 {
            c[k][2 * i + high as usize] = (step * k + (i / 8) * (step - 1)) as u8;
            i += 1;
        }
        k += 1;
    }
    c
}

/// Q4_K scale byte `g` (from a qword broadcast) to 16 words.
const Q4K_SCALE_CTRL: [[u8; 32]; 8] = word_ctrls(1, false);

/// Q6_K scale bytes `2p` (low 128-bit lane) and `2p + 1` (high lane) into the high byte of every word.
const Q6K_SCALE_CTRL: [[u8; 32]; 8] = word_ctrls(2, true);

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl KDot for Avx2 {
    /// `vpmaddubsw` words summed in i16 over `RUN` dwords, then widened by `vpmaddwd` against the scale.
    #[inline(always)]
    unsafe fn group<F: KFormat>(iacc: __m256i, wq: *const u8, act: *const u32, sc: i32) -> __m256i {
        unsafe {
            let gd = 64 / F::GROUPS;
            let sc = _mm256_set1_epi16(sc as i16);
            let mut iacc = iacc;
            let mut k = 0;
            while k < gd {
                let mut words = _mm256_setzero_si256();
                for kk in k..k + F::RUN {
                    let u = _mm256_set1_epi32((wq.add(4 * kk) as *const i32).read_unaligned());
                    let a = _mm256_loadu_si256(act.add(kk * 8) as *const __m256i);
                    words = _mm256_add_epi16(words, _mm256_maddubs_epi16(u, a));
                }
                iacc = _mm256_add_epi32(iacc, _mm256_madd_epi16(words, sc));
                k += F::RUN;
            }
            iacc
        }
    }
    #[inline(always)]
    unsafe fn pair(m: __m256i, wp: i32, cp: *const i32) -> __m256i {
        unsafe {
            _mm256_add_epi32(
                m,
                _mm256_madd_epi16(
                    _mm256_set1_epi32(wp),
                    _mm256_loadu_si256(cp as *const __m256i),
                ),
            )
        }
    }
}

pub(crate) struct Q4K;
pub(crate) struct Q5K;
pub(crate) struct Q6K;

#[derive(Clone, Copy)]
pub(crate) struct Q4KRow {
    /// The raw nibble bytes, 32 per two groups.
    qs: [__m256i; 4],
    /// Q5_K's fifth bits (bit `g` of byte `l`: weight `32g + l`); zero for Q4_K.
    qh: __m256i,
    /// The scale bytes in every qword.
    scv: __m256i,
    /// Each min twice, as words.
    m: __m256i,
    d: f32,
    dmin: f32,
}

#[derive(Clone, Copy)]
pub(crate) struct Q6KRow {
    ql: [__m256i; 4],
    qh: [__m256i; 2],
    /// The 16 scale bytes in both 128-bit lanes.
    bc: __m256i,
    /// The 16 scales as words.
    sc16: __m256i,
    d: f32,
}

/// The `qh` bytes of a Q5_K block (zero for Q4_K, which has none).
macro_rules! k4_qh {
    ($b:ident) => {
        _mm256_setzero_si256()
    };
    ($b:ident, $qh:ident) => {
        _mm256_loadu_si256($b.$qh.as_ptr() as *const __m256i)
    };
}

/// Q4_K and Q5_K share everything but the fifth bit (`qh`, Q5_K only).
macro_rules! k4_impl {
    ($name:ident, $w:ty $(, $qh:ident)?) => {
// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
        impl KQuant for $name {
            type W = $w;
            type Row = Q4KRow;
            const PERMUTED: bool = false;
            #[inline(always)]
            unsafe fn decode(w: *const $w) -> Q4KRow {
                unsafe {
                    let b = &*w;
                    let mut qs = [_mm256_setzero_si256(); 4];
                    for (c, qc) in qs.iter_mut().enumerate() {
                        *qc = _mm256_loadu_si256(b.qs.as_ptr().add(32 * c) as *const __m256i);
                    }
                    let (sc, m) = q4k_scales_mins(&b.scales);
                    Q4KRow {
                        qs,
                        qh: k4_qh!(b $(, $qh)?),
                        scv: _mm256_set1_epi64x(sc as i64),
                        m: _mm256_shuffle_epi8(
                            _mm256_set1_epi64x(m as i64),
                            _mm256_loadu_si256(Q4K_MIN_CTRL.as_ptr() as *const __m256i),
                        ),
                        d: f16_bits_to_f32(b.d.to_bits()),
                        dmin: f16_bits_to_f32(b.dmin.to_bits()),
                    }
                }
            }
            #[inline(always)]
            unsafe fn dot(r: &Q4KRow, qa: *const i8, a: *const BlockQ8K) -> [__m256i; 2] {
                unsafe {
                    let a = &*a;
                    let low4 = _mm256_set1_epi8(0x0f);
                    let mut isum = _mm256_setzero_si256();
                    for (c, &x) in r.qs.iter().enumerate() {
                        // Byte 32c + l: weight 64c + l (group 2c) low, 64c + 32 + l (group 2c + 1) high.
                        let lo = _mm256_and_si256(x, low4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), low4);
                        for (h, q) in [lo, hi].into_iter().enumerate() {
                            let g = 2 * c + h;
                            $(let q = high_bit(q, r.$qh, g);)?
                            let p = _mm256_maddubs_epi16(
                                q,
                                _mm256_loadu_si256(qa.add(32 * g) as *const __m256i),
                            );
                            let sc = _mm256_shuffle_epi8(
                                r.scv,
                                _mm256_loadu_si256(Q4K_SCALE_CTRL[g].as_ptr() as *const __m256i),
                            );
                            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, sc));
                        }
                    }
                    let mins =
                        _mm256_madd_epi16(r.m, _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i));
                    [isum, mins]
                }
            }
            #[inline(always)]
            fn scales(r: &Q4KRow) -> [f32; 2] {
                [r.d, r.dmin]
            }
            #[inline(always)]
            unsafe fn quants(w: *const $w, q: *mut u8) {
                unsafe {
                    let r = Self::decode(w);
                    let low4 = _mm256_set1_epi8(0x0f);
                    for (c, &x) in r.qs.iter().enumerate() {
                        let lo = _mm256_and_si256(x, low4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), low4);
                        $(let (lo, hi) = (high_bit(lo, r.$qh, 2 * c), high_bit(hi, r.$qh, 2 * c + 1));)?
                        _mm256_storeu_si256(q.add(64 * c) as *mut __m256i, lo);
                        _mm256_storeu_si256(q.add(64 * c + 32) as *mut __m256i, hi);
                    }
                }
            }
        }
    };
}

k4_impl!(Q4K, BlockQ4K);
k4_impl!(Q5K, BlockQ5K, qh);

/// Group `g`'s quants `q` (32 bytes, 0..=15) with their fifth bit from bit `g` of the `qh` bytes.
#[inline(always)]
unsafe fn high_bit(q: __m256i, qh: __m256i, g: usize) -> __m256i {
    unsafe {
        let bit = _mm256_set1_epi8((1u8 << g) as i8);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
        _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(16)))
    }
}

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl KQuant for Q6K {
    type W = BlockQ6K;
    type Row = Q6KRow;
    const PERMUTED: bool = false;
    #[inline(always)]
    unsafe fn decode(w: *const BlockQ6K) -> Q6KRow {
        unsafe {
            let b = &*w;
            let mut ql = [_mm256_setzero_si256(); 4];
            for (k, qk) in ql.iter_mut().enumerate() {
                *qk = _mm256_loadu_si256(b.ql.as_ptr().add(32 * k) as *const __m256i);
            }
            let qh = [
                _mm256_loadu_si256(b.qh.as_ptr() as *const __m256i),
                _mm256_loadu_si256(b.qh.as_ptr().add(32) as *const __m256i),
            ];
            let xs = _mm_loadu_si128(b.scales.as_ptr() as *const __m128i);
            Q6KRow {
                ql,
                qh,
                bc: _mm256_broadcastsi128_si256(xs),
                sc16: _mm256_cvtepi8_epi16(xs),
                d: f16_bits_to_f32(b.d.to_bits()),
            }
        }
    }
    #[inline(always)]
    unsafe fn dot(r: &Q6KRow, qa: *const i8, a: *const BlockQ8K) -> [__m256i; 2] {
        unsafe {
            let a = &*a;
            let mut isum = _mm256_setzero_si256();
            for h in 0..2 {
                let q = quants6(r.ql[2 * h], r.ql[2 * h + 1], r.qh[h]);
                for (k, &qk) in q.iter().enumerate() {
                    // Weights 128h + 32k..: groups 8h + 2k (low lane) and 8h + 2k + 1 (high lane).
                    let p = _mm256_maddubs_epi16(
                        qk,
                        _mm256_loadu_si256(qa.add(128 * h + 32 * k) as *const __m256i),
                    );
                    let sc = _mm256_srai_epi16::<8>(_mm256_shuffle_epi8(
                        r.bc,
                        _mm256_loadu_si256(Q6K_SCALE_CTRL[4 * h + k].as_ptr() as *const __m256i),
                    ));
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, sc));
                }
            }
            // - 32 * sum(scale_g * bsum_g), exact in i32.
            let off = _mm256_madd_epi16(
                r.sc16,
                _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i),
            );
            [
                _mm256_sub_epi32(isum, _mm256_slli_epi32::<5>(off)),
                _mm256_setzero_si256(),
            ]
        }
    }
    #[inline(always)]
    fn scales(r: &Q6KRow) -> [f32; 2] {
        [r.d, 0.0]
    }
    #[inline(always)]
    unsafe fn quants(w: *const BlockQ6K, q: *mut u8) {
        unsafe {
            let r = Self::decode(w);
            for h in 0..2 {
                let qs = quants6(r.ql[2 * h], r.ql[2 * h + 1], r.qh[h]);
                for (k, &qk) in qs.iter().enumerate() {
                    _mm256_storeu_si256(q.add(128 * h + 32 * k) as *mut __m256i, qk);
                }
            }
        }
    }
}

/// The 128 six-bit quants of one Q6_K half in weight order, 32 per vector: low nibbles of `ql0`, `ql1`, then
/// their high nibbles, with bit pairs 0-1, 2-3, 4-5, 6-7 of `qh` on top.
#[inline(always)]
unsafe fn quants6(ql0: __m256i, ql1: __m256i, qh: __m256i) -> [__m256i; 4] {
    unsafe {
        let low4 = _mm256_set1_epi8(0x0f);
        let bits45 = _mm256_set1_epi8(0x30);
        let lo0 = _mm256_and_si256(ql0, low4);
        let lo1 = _mm256_and_si256(ql1, low4);
        let hi0 = _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4);
        let hi1 = _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4);
        [
            _mm256_or_si256(lo0, _mm256_and_si256(_mm256_slli_epi16::<4>(qh), bits45)),
            _mm256_or_si256(lo1, _mm256_and_si256(_mm256_slli_epi16::<2>(qh), bits45)),
            _mm256_or_si256(hi0, _mm256_and_si256(qh, bits45)),
            _mm256_or_si256(hi1, _mm256_and_si256(_mm256_srli_epi16::<2>(qh), bits45)),
        ]
    }
}

/// `W[r] . A[t]`: whole vectors of 8 tokens (and a remainder of 4 or more, padded) on the lane
/// kernel, fewer on the few-token kernel.
#[inline(always)]
pub(crate) unsafe fn gemm<K: KQuant>(w: &[K::W], a: &[BlockQ8K], bpr: usize, mut out: ProductOut) {
    if bpr == 0 || a.is_empty() || w.is_empty() {
        return;
    }
    let n = a.len() / bpr;
    let lanes = if n % 8 >= 4 { n } else { n / 8 * 8 };
    unsafe {
        if lanes > 0 {
            super::super::gemm_lanes::<KLanes<K, Avx2>, 4>(w, a, bpr, 0, lanes, &mut out);
        }
        if lanes < n {
            gemm_few::<K>(w, a, bpr, lanes, n, &mut out);
        }
    }
}
