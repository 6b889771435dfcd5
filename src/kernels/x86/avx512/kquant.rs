//! Q4_K, Q5_K and Q6_K against Q8_K on AVX-512 VNNI: the formats' `KQuant` impls and AVX-512's `KDot`, for the
//! drivers in `x86/kquant.rs`.
//!
//! Every format comes down to unsigned quants (Q4_K 0..=15, Q5_K 0..=31, Q6_K 0..=63) against the Q8_K
//! activation bytes, with one integer scale per group, plus the `bsums` term (see `x86/kquant.rs`).
//!
//! - **Few tokens** (decode): each weight block is unpacked in registers into 4 zmm of quant bytes, and each
//!   `vpdpbusd` against 64 activation bytes gives 16 lanes that each hold 4 products of one group. Two such
//!   vectors are packed to words (exact: at most `4 * 63 * 127 = 32004`), and one `vpmaddwd` against the group
//!   scales spread as words over the lanes applies the scales and sums in pairs: 8 `vpdpbusd`, 4 packs and 4
//!   word multiplies per block, then the 16 lanes' halves added for the driver's exact horizontal sums. Rows
//!   are prefetched ahead into L2, as the Q4_0 kernel does. Q4_K/Q5_K quants come out of their 64-byte loads in
//!   an order of their own, so these formats read a permuted copy of the activations (`PERMUTED`).
//! - **Many tokens** (prompt): 16-token lanes over 8 unpacked rows; each group's lanes are summed by `vpdpbusd`
//!   against transposed activations and multiplied by the group's scale (`vpmulld`), the `bsums` term is one
//!   `vpdpwssd` per two groups against pairs of transposed sums. Remainders of 4 to 8 tokens run on AVX2's
//!   8-token lanes (`gemm`).

use std::arch::x86_64::*;

use crate::kernels::q4_k::q4k_scales_mins;
use quarry_quantize::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};

use crate::kernels::ProductOut;

use super::super::avx2::Avx2;
use super::super::f16_bits_to_f32;
use super::super::kquant::{KDot, KFormat, KLanes, KQuant, Q4K_MIN_CTRL, gemm_few};
use super::Vnni512;

/// `vpshufb` controls spreading Q4_K scale bytes (broadcast to every qword) over the words of a packed pair of
/// dot vectors: for half `p`, 128-bit lane `k` holds 4 words of group `4p + 2 * (k >= 2)`, then 4 of group
/// `4p + 1 + 2 * (k >= 2)` (see `Q4K::acc`). High bytes are zero.
const fn q4k_scale_ctrl(p: usize) -> [u8; 64] {
    let mut c = [0x80u8; 64];
    let mut k = 0;
    while k < 4 {
        let mut i = 0;
        while i < 8 {
            let g = 4 * p + 2 * (k >= 2) as usize + (i >= 4) as usize;
            c[16 * k + 2 * i] = g as u8;
            i += 1;
        }
        k += 1;
    }
    c
}
const Q4K_SCALE_CTRL: [[u8; 64]; 2] = [q4k_scale_ctrl(0), q4k_scale_ctrl(1)];

/// The `qh` bit of each byte of the four Q5_K quant vectors (order of `Q4K::decode`): vector `2p + h` holds
/// weights `128p + 32h + l` (bit `4p + h`) in its lower 32 bytes, `128p + 64 + 32h + l` (bit `4p + 2 + h`) above.
const Q5K_BITS: [[u8; 64]; 4] = {
    let mut c = [[0u8; 64]; 4];
    let mut v = 0;
    while v < 4 {
        let (p, h) = (v / 2, v % 2);
        let mut i = 0;
        while i < 64 {
            c[v][i] = 1 << (4 * p + h + if i < 32 { 0 } else { 2 });
            i += 1;
        }
        v += 1;
    }
    c
};

/// `vpshufb` controls putting Q6_K scale bytes (broadcast to every 128-bit lane) into the high byte of each word
/// (sign-extended afterwards by an arithmetic shift): for half `h`, lane `k` holds 4 words of group `8h + k`,
/// then 4 of group `8h + 4 + k`.
const fn q6k_scale_ctrl(h: usize) -> [u8; 64] {
    let mut c = [0x80u8; 64];
    let mut k = 0;
    while k < 4 {
        let mut i = 0;
        while i < 8 {
            c[16 * k + 2 * i + 1] = (8 * h + k + if i < 4 { 0 } else { 4 }) as u8;
            i += 1;
        }
        k += 1;
    }
    c
}
const Q6K_SCALE_CTRL: [[u8; 64]; 2] = [q6k_scale_ctrl(0), q6k_scale_ctrl(1)];

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl KDot for Vnni512 {
    /// `vpdpbusd` over the group's dwords, then `vpmulld` by the scale.
    #[inline(always)]
    unsafe fn group<F: KFormat>(iacc: __m512i, wq: *const u8, act: *const u32, sc: i32) -> __m512i {
        unsafe {
            let gd = 64 / F::GROUPS;
            let mut t = _mm512_setzero_si512();
            for k in 0..gd {
                let u = _mm512_set1_epi32((wq.add(4 * k) as *const i32).read_unaligned());
                t = _mm512_dpbusd_epi32(t, u, _mm512_loadu_si512(act.add(k * 16) as *const _));
            }
            let sc = _mm512_set1_epi32(sc);
            _mm512_add_epi32(iacc, _mm512_mullo_epi32(t, sc))
        }
    }
    #[inline(always)]
    unsafe fn pair(m: __m512i, wp: i32, cp: *const i32) -> __m512i {
        unsafe { _mm512_dpwssd_epi32(m, _mm512_set1_epi32(wp), _mm512_loadu_si512(cp as *const _)) }
    }
}

pub(crate) struct Q4K;
pub(crate) struct Q5K;
pub(crate) struct Q6K;

#[derive(Clone, Copy)]
pub(crate) struct Q4KRow {
    /// Quant bytes of weights `64c..64c + 64`.
    q: [__m512i; 4],
    /// Scale words for the two packed halves.
    sc: [__m512i; 2],
    /// Each min twice, as words.
    m: __m256i,
    d: f32,
    dmin: f32,
}

#[derive(Clone, Copy)]
pub(crate) struct Q6KRow {
    q: [__m512i; 4],
    sc: [__m512i; 2],
    /// The 16 scales as words.
    sc16: __m256i,
    d: f32,
}

/// Q4_K and Q5_K share everything but the fifth bit (`qh`, Q5_K only).
macro_rules! k4_impl {
    ($name:ident, $w:ty $(, $qh:ident)?) => {
// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
        impl KQuant for $name {
            type W = $w;
            type Row = Q4KRow;
            const PERMUTED: bool = true;
            #[inline(always)]
            unsafe fn decode(w: *const $w) -> Q4KRow {
                unsafe {
                    let b = &*w;
                    let low4 = _mm512_set1_epi8(0x0f);
                    let mut q = [_mm512_setzero_si512(); 4];
                    for p in 0..2 {
                        // Byte 32c + l holds weights 64c + l (low nibble) and 64c + 32 + l (high): 64 bytes give weights
                        // [128p.., 128p + 64..] (low) and [128p + 32.., 128p + 96..] (high), 32 each, the order
                        // `permute_act` puts the activations in.
                        let x = _mm512_loadu_si512(b.qs.as_ptr().add(64 * p) as *const _);
                        q[2 * p] = _mm512_and_si512(x, low4);
                        q[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(x), low4);
                    }
                    $(
                        // Q5_K: bit 2c (2c + 1) of qh byte l is the fifth bit of weight 64c + l (64c + 32 + l); a byte
                        // test against the bit each vector's half needs selects the bytes that get 16 added.
                        let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.$qh.as_ptr() as *const __m256i));
                        let sixteen = _mm512_set1_epi8(16);
                        for (v, qv) in q.iter_mut().enumerate() {
                            let k = _mm512_test_epi8_mask(qh, _mm512_loadu_si512(Q5K_BITS[v].as_ptr() as *const _));
                            *qv = _mm512_mask_add_epi8(*qv, k, *qv, sixteen);
                        }
                    )?
                    let (sc, m) = q4k_scales_mins(&b.scales);
                    let scv = _mm512_set1_epi64(sc as i64);
                    let mv = _mm256_set1_epi64x(m as i64);
                    Q4KRow {
                        q,
                        sc: [
                            _mm512_shuffle_epi8(
                                scv,
                                _mm512_loadu_si512(Q4K_SCALE_CTRL[0].as_ptr() as *const _),
                            ),
                            _mm512_shuffle_epi8(
                                scv,
                                _mm512_loadu_si512(Q4K_SCALE_CTRL[1].as_ptr() as *const _),
                            ),
                        ],
                        m: _mm256_shuffle_epi8(
                            mv,
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
                    // Lanes 0..8 of half p's first dot are group 4p, 8..16 group 4p + 2; of its second groups
                    // 4p + 1 and 4p + 3.
                    let isum = halves(scaled_dots(&r.q, &r.sc, qa));
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
                    // Back to weight order: vector 2p + h holds weights 128p + 32h.. and 128p + 64 + 32h...
                    for (v, &qv) in r.q.iter().enumerate() {
                        let (p, h) = (v / 2, v % 2);
                        _mm256_storeu_si256(
                            q.add(128 * p + 32 * h) as *mut __m256i,
                            _mm512_castsi512_si256(qv),
                        );
                        _mm256_storeu_si256(
                            q.add(128 * p + 64 + 32 * h) as *mut __m256i,
                            _mm512_extracti64x4_epi64::<1>(qv),
                        );
                    }
                }
            }
        }
    };
}

k4_impl!(Q4K, BlockQ4K);
k4_impl!(Q5K, BlockQ5K, qh);

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl KQuant for Q6K {
    type W = BlockQ6K;
    type Row = Q6KRow;
    const PERMUTED: bool = false;
    #[inline(always)]
    unsafe fn decode(w: *const BlockQ6K) -> Q6KRow {
        unsafe {
            let b = &*w;
            let low4 = _mm512_set1_epi8(0x0f);
            let bits45 = _mm512_set1_epi8(0x30);
            let mut q = [_mm512_setzero_si512(); 4];
            for h in 0..2 {
                let ql = _mm512_loadu_si512(b.ql.as_ptr().add(64 * h) as *const _);
                let qh = _mm256_loadu_si256(b.qh.as_ptr().add(32 * h) as *const __m256i);
                // High-bit pairs 0-1 and 2-3 of each byte at bits 0-1 (lower and upper 32 bytes), then pairs
                // 4-5 and 6-7 at bits 4-5: weights 128h..128h + 64 take the first, + 64.. the second.
                let qhz =
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<2>(qh));
                q[2 * h] = _mm512_or_si512(
                    _mm512_and_si512(ql, low4),
                    _mm512_and_si512(_mm512_slli_epi16::<4>(qhz), bits45),
                );
                q[2 * h + 1] = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4),
                    _mm512_and_si512(qhz, bits45),
                );
            }
            let xs = _mm_loadu_si128(b.scales.as_ptr() as *const __m128i);
            let bc = _mm512_broadcast_i32x4(xs);
            // No closure: it would be compiled without the target features.
            let mut sc = [_mm512_setzero_si512(); 2];
            for (h, sch) in sc.iter_mut().enumerate() {
                *sch = _mm512_srai_epi16::<8>(_mm512_shuffle_epi8(
                    bc,
                    _mm512_loadu_si512(Q6K_SCALE_CTRL[h].as_ptr() as *const _),
                ));
            }
            Q6KRow {
                q,
                sc,
                sc16: _mm256_cvtepi8_epi16(xs),
                d: f16_bits_to_f32(b.d.to_bits()),
            }
        }
    }
    #[inline(always)]
    unsafe fn dot(r: &Q6KRow, qa: *const i8, a: *const BlockQ8K) -> [__m256i; 2] {
        unsafe {
            let a = &*a;
            // 4 groups of 16 per vector: half h's first dot groups 8h..8h + 4, its second 8h + 4..8h + 8.
            let isum = halves(scaled_dots(&r.q, &r.sc, qa));
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
            for (c, &qc) in r.q.iter().enumerate() {
                _mm512_storeu_si512(q.add(64 * c) as *mut _, qc);
            }
        }
    }
}

/// The 16 i32 lanes of `v` as 8: its halves added (exactly: the lanes only need to keep their sum).
#[inline(always)]
unsafe fn halves(v: __m512i) -> __m256i {
    unsafe { _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v)) }
}

/// The scaled integer sums of a block unpacked into quant vectors `q` and scale words `sc` (`Q4KRow`,
/// `Q6KRow`), against the activation quants at `qa` in the same order: per half `h`, `vpdpbusd` of vectors
/// `2h` and `2h + 1` against 64 bytes each (4 products of one group per lane), packed to words (exact: at most
/// `4 * 63 * 127 = 32004`) and multiplied by the half's scale words with `vpmaddwd`.
#[inline(always)]
unsafe fn scaled_dots(q: &[__m512i; 4], sc: &[__m512i; 2], qa: *const i8) -> __m512i {
    unsafe {
        let z = _mm512_setzero_si512();
        let mut isum = z;
        for h in 0..2 {
            let d0 =
                _mm512_dpbusd_epi32(z, q[2 * h], _mm512_loadu_si512(qa.add(128 * h) as *const _));
            let d1 = _mm512_dpbusd_epi32(
                z,
                q[2 * h + 1],
                _mm512_loadu_si512(qa.add(128 * h + 64) as *const _),
            );
            isum = _mm512_add_epi32(isum, _mm512_madd_epi16(_mm512_packs_epi32(d0, d1), sc[h]));
        }
        isum
    }
}

/// `W[r] . A[t]`: with `AMX`, the tokens `amx::tokens_on_tiles` picks on the tile unit for the whole 16-row groups
/// (the same bits as the lane kernel's); the rest as [`gemm_tokens`] splits them.
#[inline(always)]
pub(crate) unsafe fn gemm<K: KQuant, Y: KQuant<W = K::W>, const AMX: bool>(
    w: &[K::W],
    a: &[BlockQ8K],
    bpr: usize,
    mut out: ProductOut,
) where
    K::W: super::super::amx::KDigits,
{
    if bpr == 0 || a.is_empty() || w.is_empty() {
        return;
    }
    let n = a.len() / bpr;
    let rows = w.len() / bpr;
    let rows16 = rows / 16 * 16;
    let on_tiles = if AMX && rows16 > 0 {
        super::super::amx::tokens_on_tiles(n)
    } else {
        0
    };
    // SAFETY: the set's features are present (and with AMX, the tile state was granted).
    unsafe {
        if on_tiles > 0 {
            crate::kernels::check_shape(&out, rows, n);
            let (mut groups, mut tail) = out.reborrow().split_at_row(rows16);
            super::super::amx::gemm_kquant::<K>(&w[..rows16 * bpr], a, bpr, on_tiles, &mut groups);
            if rows16 < rows {
                gemm_tokens::<K, Y>(&w[rows16 * bpr..], a, bpr, 0, on_tiles, &mut tail);
            }
        }
        if on_tiles < n {
            gemm_tokens::<K, Y>(w, a, bpr, on_tiles, n, &mut out);
        }
    }
}

/// `W[r] . A[t]` for tokens `t0..t1`: whole vectors of 16 tokens on the lane kernel, a remainder of 9 or more
/// padded to 16; 4 to 8 on AVX2's 8-token lanes, format `Y` (a half-empty zmm measured slower: 1024 x 1024 at
/// 8 tokens, 66 against 83 G-MAC/s for Q4_K); fewer on the few-token kernel.
#[inline(always)]
unsafe fn gemm_tokens<K: KQuant, Y: KQuant<W = K::W>>(
    w: &[K::W],
    a: &[BlockQ8K],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    let (whole, rest) = (t0 + (t1 - t0) / 16 * 16, (t1 - t0) % 16);
    unsafe {
        if rest >= 9 {
            super::super::gemm_lanes::<KLanes<K, Vnni512>, 8>(w, a, bpr, t0, t1, out);
            return;
        }
        if whole > t0 {
            super::super::gemm_lanes::<KLanes<K, Vnni512>, 8>(w, a, bpr, t0, whole, out);
        }
        if rest >= 4 {
            super::super::gemm_lanes::<KLanes<Y, Avx2>, 4>(w, a, bpr, whole, t1, out);
        } else if rest > 0 {
            gemm_few::<K>(w, a, bpr, whole, t1, out);
        }
    }
}
