//! Q4_K and Q6_K against Q8_K on AVX-512 VNNI.
//!
//! Both formats come down to unsigned quants in natural weight order (Q4_K 0..=15, Q6_K 0..=63) against the Q8_K
//! activation bytes, with one integer scale per group (Q4_K: 8 groups of 32, 6-bit; Q6_K: 16 groups of 16, i8),
//! plus a term from the activation group sums (`bsums`): Q4_K's mins (own float scale `dmin`), Q6_K's `-32`
//! offset (folded into the integer sum). Every per-block integer sum is computed exactly, as the scalar
//! reference computes it.
//!
//! - **Few tokens** (decode): each weight block is unpacked in registers into 4 zmm of quant bytes, and each
//!   `vpdpbusd` against 64 activation bytes gives 16 lanes that each hold 4 products of one group. Two such
//!   vectors are packed to words (exact: at most `4 * 63 * 127 = 32004`), and one `vpmaddwd` against the group
//!   scales spread as words over the lanes applies the scales and sums in pairs: 8 `vpdpbusd`, 4 packs and 4
//!   word multiplies per block, then one convert and one FMA per block and token. Rows are tiled 4 at a time
//!   and prefetched ahead into L2, as the Q4_0 kernel does.
//! - **Many tokens** (prompt): one lane per token, as `x86::gemm_lanes` does for the 32-blocks. A tile of 8
//!   rows is unpacked once into scratch (quant bytes, scales and min pairs as integers); each group's lanes are
//!   summed by `vpdpbusd` against transposed activations and multiplied by the group's scale (`vpmulld`), the
//!   `bsums` term is one `vpdpwssd` per two groups against pairs of transposed sums.

use std::arch::x86_64::*;

use crate::kernels::q4_k::q4k_scales_mins;
use quarry_quantize::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};

use crate::kernels::ProductOut;

use super::super::kquant::{Q4K_MIN_CTRL, WI, prep_acts, q4k_act_pairs, q6k_act_pairs};
use super::super::{CHUNK_TOKENS, f16_bits_to_f32, grow, scratch, tile_shape};

/// Bytes of weights requested ahead of the ones being read (as in the Q4_0 kernel).
const PREFETCH_BYTES: usize = 8192;

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

/// A k-quant format on AVX-512 for both kernels.
pub(crate) trait KQuant {
    type W: Copy;
    /// The same format's AVX2 kernels (8-token lanes for short remainders).
    type Y: super::super::avx2::kquant::KQuant<W = Self::W>;
    /// A weight block unpacked in registers.
    type Row: Copy;
    /// Groups per block (scales) and words of `bsums` pairs the second term needs (as dwords).
    const GROUPS: usize;
    const PAIRS: usize;
    /// Whether the `bsums` term is Q6_K's `-32` offset (integer) rather than Q4_K's mins (scaled by `-dmin`).
    const OFFSET32: bool;
    /// Whether `decode` leaves the quants in the order of `permute_act` rather than in weight order.
    const PERMUTED: bool;
    unsafe fn decode(w: *const Self::W) -> Self::Row;
    /// `acc +` the block's partial sums with activation block `a`, whose 256 quant bytes are read from `qa`
    /// (`a.qs` itself, or its permuted copy): 16 lanes whose sum is the dot product.
    unsafe fn acc(row: &Self::Row, qa: *const i8, a: *const BlockQ8K, acc: __m512) -> __m512;
    /// Writes the 256 quant bytes, `GROUPS` scales, `PAIRS` dwords of two word-sized factors for the `bsums`
    /// pairs, and `[d, dmin]`.
    unsafe fn prep(w: *const Self::W, q: *mut u8, wi: *mut i32, f: *mut f32);
    /// The activation side of the `bsums` term: `PAIRS` dwords of two words each.
    const ACT_PAIRS: fn(&BlockQ8K, &mut [i32; 8]);
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
    ($name:ident, $w:ty, $y:ty $(, $qh:ident)?) => {
// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
        impl KQuant for $name {
            type W = $w;
            type Y = $y;
            type Row = Q4KRow;
            const GROUPS: usize = 8;
            const PAIRS: usize = 4;
            const OFFSET32: bool = false;
            const PERMUTED: bool = true;
            const ACT_PAIRS: fn(&BlockQ8K, &mut [i32; 8]) = q4k_act_pairs;
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
            unsafe fn acc(r: &Q4KRow, qa: *const i8, a: *const BlockQ8K, acc: __m512) -> __m512 {
                unsafe {
                    let a = &*a;
                    let z = _mm512_setzero_si512();
                    let mut isum = z;
                    for p in 0..2 {
                        // Lanes 0..8 of d0 are group 4p, 8..16 group 4p + 2; of d1 groups 4p + 1 and 4p + 3.
                        let d0 = _mm512_dpbusd_epi32(
                            z,
                            r.q[2 * p],
                            _mm512_loadu_si512(qa.add(128 * p) as *const _),
                        );
                        let d1 = _mm512_dpbusd_epi32(
                            z,
                            r.q[2 * p + 1],
                            _mm512_loadu_si512(qa.add(128 * p + 64) as *const _),
                        );
                        isum =
                            _mm512_add_epi32(isum, _mm512_madd_epi16(_mm512_packs_epi32(d0, d1), r.sc[p]));
                    }
                    let mins =
                        _mm256_madd_epi16(r.m, _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i));
                    let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(r.d * a.d), acc);
                    _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(_mm512_zextsi256_si512(mins)),
                        _mm512_set1_ps(-(r.dmin * a.d)),
                        acc,
                    )
                }
            }
            #[inline(always)]
            unsafe fn prep(w: *const $w, q: *mut u8, wi: *mut i32, f: *mut f32) {
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
                    let (sc, m) = q4k_scales_mins(&(*w).scales);
                    for g in 0..8 {
                        *wi.add(g) = (sc >> (8 * g)) as u8 as i32;
                    }
                    for k in 0..4 {
                        let (m0, m1) = (
                            (m >> (16 * k)) as u8 as u32,
                            (m >> (16 * k + 8)) as u8 as u32,
                        );
                        *wi.add(8 + k) = (m0 | m1 << 16) as i32;
                    }
                    *f = r.d;
                    *f.add(1) = r.dmin;
                }
            }
        }
    };
}

k4_impl!(Q4K, BlockQ4K, super::super::avx2::kquant::Q4K);
k4_impl!(Q5K, BlockQ5K, super::super::avx2::kquant::Q5K, qh);

// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
impl KQuant for Q6K {
    type W = BlockQ6K;
    type Y = super::super::avx2::kquant::Q6K;
    type Row = Q6KRow;
    const GROUPS: usize = 16;
    const PAIRS: usize = 8;
    const OFFSET32: bool = true;
    const PERMUTED: bool = false;
    const ACT_PAIRS: fn(&BlockQ8K, &mut [i32; 8]) = q6k_act_pairs;
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
    unsafe fn acc(r: &Q6KRow, qa: *const i8, a: *const BlockQ8K, acc: __m512) -> __m512 {
        unsafe {
            let a = &*a;
            let z = _mm512_setzero_si512();
            let mut isum = z;
            for h in 0..2 {
                // 4 groups of 16 per vector: d0 groups 8h..8h + 4, d1 groups 8h + 4..8h + 8.
                let d0 = _mm512_dpbusd_epi32(
                    z,
                    r.q[2 * h],
                    _mm512_loadu_si512(qa.add(128 * h) as *const _),
                );
                let d1 = _mm512_dpbusd_epi32(
                    z,
                    r.q[2 * h + 1],
                    _mm512_loadu_si512(qa.add(128 * h + 64) as *const _),
                );
                isum =
                    _mm512_add_epi32(isum, _mm512_madd_epi16(_mm512_packs_epi32(d0, d1), r.sc[h]));
            }
            // - 32 * sum(scale_g * bsum_g), exact in i32.
            let off = _mm256_madd_epi16(
                r.sc16,
                _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i),
            );
            let isum = _mm512_sub_epi32(isum, _mm512_zextsi256_si512(_mm256_slli_epi32::<5>(off)));
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(r.d * a.d), acc)
        }
    }
    #[inline(always)]
    unsafe fn prep(w: *const BlockQ6K, q: *mut u8, wi: *mut i32, f: *mut f32) {
        unsafe {
            let r = Self::decode(w);
            for (c, &qc) in r.q.iter().enumerate() {
                _mm512_storeu_si512(q.add(64 * c) as *mut _, qc);
            }
            let sc = &(*w).scales;
            for (g, &scg) in sc.iter().enumerate() {
                *wi.add(g) = scg as i32;
            }
            for k in 0..8 {
                let (s0, s1) = (
                    sc[2 * k] as i16 as u16 as u32,
                    sc[2 * k + 1] as i16 as u16 as u32,
                );
                *wi.add(16 + k) = (s0 | s1 << 16) as i32;
            }
            *f = r.d;
            *f.add(1) = 0.0;
        }
    }
}

/// `W[r] . A[t]`: whole vectors of 16 tokens on the lane kernel, a remainder of 9 or more
/// padded to 16; 4 to 8 on the AVX2 kernel's 8-token lanes (a half-empty zmm measured slower: 1024 x 1024 at
/// 8 tokens, 66 against 83 G-MAC/s for Q4_K); fewer on the few-token kernel.
#[inline(always)]
pub(crate) unsafe fn gemm<K: KQuant>(w: &[K::W], a: &[BlockQ8K], bpr: usize, mut out: ProductOut) {
    if bpr == 0 || a.is_empty() || w.is_empty() {
        return;
    }
    let n = a.len() / bpr;
    let (whole, rest) = (n / 16 * 16, n % 16);
    unsafe {
        if rest >= 9 {
            gemm_lanes::<K>(w, a, bpr, 0, n, &mut out);
            return;
        }
        if whole > 0 {
            gemm_lanes::<K>(w, a, bpr, 0, whole, &mut out);
        }
        if rest >= 4 {
            super::super::avx2::kquant::gemm_lanes::<K::Y>(w, a, bpr, whole, n, &mut out);
        } else if rest > 0 {
            gemm_few::<K>(w, a, bpr, whole, n, &mut out);
        }
    }
}

/// Copies the quants of each activation block in the order Q4_K's nibbles come out of a 64-byte load: per half
/// `p`, weights `128p..+32`, `128p + 64..+32`, `128p + 32..+32`, `128p + 96..+32`.
#[inline(always)]
unsafe fn permute_act(a: &[BlockQ8K], dst: *mut i8) {
    unsafe {
        for (i, blk) in a.iter().enumerate() {
            let (src, d) = (blk.qs.as_ptr(), dst.add(256 * i));
            for p in 0..2 {
                for (k, from) in [0, 64, 32, 96].into_iter().enumerate() {
                    _mm256_storeu_si256(
                        d.add(128 * p + 32 * k) as *mut __m256i,
                        _mm256_loadu_si256(src.add(128 * p + from) as *const __m256i),
                    );
                }
            }
        }
    }
}

/// Tokens `t0..t1`: 4 rows x up to 4 tokens, each weight block unpacked once per tile.
#[inline(always)]
unsafe fn gemm_few<K: KQuant>(
    w: &[K::W],
    a: &[BlockQ8K],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    let (_, rows) = tile_shape(w.len(), a.len(), bpr, t0, t1, out);
    // SAFETY: see `scratch`.
    let s = unsafe { &mut *scratch() };
    let perm = if K::PERMUTED {
        // `reserve_few_token_scratch` sizes `act` for this (16 tokens x 256 bytes per block) up front.
        grow(&mut s.act, (t1 - t0) * bpr * 64);
        // SAFETY: reads blocks of tokens t0..t1 < n, writes 256 bytes per block within the size grown above.
        unsafe { permute_act(&a[t0 * bpr..t1 * bpr], s.act.as_mut_ptr() as *mut i8) };
        s.act.as_ptr() as *const i8
    } else {
        std::ptr::null()
    };
    // SAFETY: the tiles stay within rows and tokens (below); prefetches never fault.
    unsafe {
        // The first tiles are not covered by the loop's prefetches (they request PREFETCH_BYTES ahead).
        let head = w.as_ptr() as *const i8;
        let bytes = (rows * bpr * size_of::<K::W>()).min(PREFETCH_BYTES);
        for off in (0..bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T1>(head.wrapping_add(off));
        }
        let mut r = 0;
        while r < rows {
            let rt = if rows - r >= 4 { 4 } else { 1 };
            let mut t = t0;
            while t < t1 {
                let left = t1 - t;
                match (rt, left) {
                    (4, 4..) => few_tile::<K, 4, 4>(w, a, bpr, r, t, t0, perm, out),
                    (4, 2..) => few_tile::<K, 4, 2>(w, a, bpr, r, t, t0, perm, out),
                    (4, _) => few_tile::<K, 4, 1>(w, a, bpr, r, t, t0, perm, out),
                    (_, 4..) => few_tile::<K, 1, 4>(w, a, bpr, r, t, t0, perm, out),
                    (_, 2..) => few_tile::<K, 1, 2>(w, a, bpr, r, t, t0, perm, out),
                    (_, _) => few_tile::<K, 1, 1>(w, a, bpr, r, t, t0, perm, out),
                }
                t += if left >= 4 {
                    4
                } else if left >= 2 {
                    2
                } else {
                    1
                };
            }
            r += rt;
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn few_tile<K: KQuant, const RT: usize, const TT: usize>(
    w: &[K::W],
    a: &[BlockQ8K],
    bpr: usize,
    r0: usize,
    t: usize,
    t0: usize,
    perm: *const i8,
    out: &mut ProductOut,
) {
    let bb = size_of::<K::W>();
    debug_assert!((r0 + RT) * bpr <= w.len() && (t + TT) * bpr <= a.len());
    // SAFETY (bounds): rows r0..r0 + RT and tokens t..t + TT exist (the caller's tiling), every pointer indexes
    // block b < bpr of one of them. Prefetch addresses wrap and are never dereferenced.
    unsafe {
        // One row at a time, its accumulators in registers: the rows of a tile are consecutive in memory, so this
        // is one sequential stream. (Four rows interleaved, as the Q4_0 kernel does, kept the accumulators of
        // the not-unrolled row loop on the stack.)
        let ap = a.as_ptr().add(t * bpr);
        let mut fin = [[_mm512_setzero_ps(); TT]; RT];
        for (i, fin_i) in fin.iter_mut().enumerate() {
            let wp = w.as_ptr().add((r0 + i) * bpr);
            let mut acc = [_mm512_setzero_ps(); TT];
            for b in 0..bpr {
                let blk = wp.add(b);
                let pf = (blk as *const i8).wrapping_add(PREFETCH_BYTES);
                let mut off = 0;
                while off < bb {
                    _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(off));
                    off += 64;
                }
                let row = K::decode(blk);
                for (j, acc_j) in acc.iter_mut().enumerate() {
                    let blk = ap.add(j * bpr + b);
                    let qa = if K::PERMUTED {
                        perm.add(((t - t0 + j) * bpr + b) * 256)
                    } else {
                        (*blk).qs.as_ptr()
                    };
                    *acc_j = K::acc(&row, qa, blk, *acc_j);
                }
            }
            *fin_i = acc;
        }
        // Rows are only a few blocks long (4 at 1024 columns), so the horizontal sums matter: four rows are
        // reduced together and stored as one 4-float vector.
        for j in 0..TT {
            let o = out.as_mut_ptr().add((t + j) * out.stride() + r0);
            if RT == 4 {
                // SAFETY: rows r0..r0 + 4 of token t + j are within the window `tile_shape` checked.
                _mm_storeu_ps(o, hsum4(fin[0][j], fin[1][j], fin[2][j], fin[3][j]));
            } else {
                for (i, fin_i) in fin.iter().enumerate() {
                    *o.add(i) = _mm512_reduce_add_ps(fin_i[j]);
                }
            }
        }
    }
}

/// The sums of four vectors, as one vector `[sum(a), sum(b), sum(c), sum(d)]`.
#[inline(always)]
unsafe fn hsum4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
    unsafe {
        let a = _mm256_add_ps(_mm512_castps512_ps256(a), super::upper_half(a));
        let b = _mm256_add_ps(_mm512_castps512_ps256(b), super::upper_half(b));
        let c = _mm256_add_ps(_mm512_castps512_ps256(c), super::upper_half(c));
        let d = _mm256_add_ps(_mm512_castps512_ps256(d), super::upper_half(d));
        // Per 128-bit lane: [a01, a23, b01, b23], [c01, c23, d01, d23], then [a0..4, b0..4, c0..4, d0..4].
        let abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        )
    }
}

/// Tokens `t0..t1` in vectors of 16 (the last one padded), 8 rows per tile.
#[inline(always)]
unsafe fn gemm_lanes<K: KQuant>(
    w: &[K::W],
    a: &[BlockQ8K],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    const N: usize = 16;
    const RW: usize = 8;
    let (_, rows) = tile_shape(w.len(), a.len(), bpr, t0, t1, out);
    let gd = 64 / K::GROUPS;
    // SAFETY: see `scratch`.
    let s = unsafe { &mut *scratch() };
    let mut c0 = t0;
    while c0 < t1 {
        let groups = (t1 - c0).div_ceil(N).min(CHUNK_TOKENS / N);
        let c1 = (c0 + groups * N).min(t1);
        // SAFETY: the set's features are enabled; `prep_acts` sizes its buffers.
        unsafe { prep_acts::<N>(a, bpr, c0, c1, groups, s, K::ACT_PAIRS) };
        grow(&mut s.w, RW * bpr * 256);
        grow(&mut s.wi, RW * bpr * WI);
        grow(&mut s.dw, RW * bpr * 2);
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(RW);
            for i in 0..RW {
                for b in 0..bpr {
                    let ib = i * bpr + b;
                    if i < nr {
                        // SAFETY: 256 bytes, WI integers and 2 floats at these offsets were grown above.
                        unsafe {
                            K::prep(
                                &w[(r0 + i) * bpr + b],
                                s.w.as_mut_ptr().add(ib * 256),
                                s.wi.as_mut_ptr().add(ib * WI),
                                s.dw.as_mut_ptr().add(ib * 2),
                            )
                        };
                    } else {
                        // Missing rows of the last tile: zero quants, scales and factors.
                        s.w[ib * 256..(ib + 1) * 256].fill(0);
                        s.wi[ib * WI..(ib + 1) * WI].fill(0);
                        s.dw[ib * 2..ib * 2 + 2].fill(0.0);
                    }
                }
            }
            for g in 0..groups {
                let tg = c0 + g * N;
                // SAFETY: scratch indices are within the sizes grown above: group g < groups, block b < bpr,
                // row i < RW, dword k < 64, pair k < PAIRS <= 8.
                let acc = unsafe {
                    let mut acc = [_mm512_setzero_ps(); RW];
                    for b in 0..bpr {
                        let gb = g * bpr + b;
                        let ap = s.act.as_ptr().add(gb * 64 * N);
                        let mut iacc = [_mm512_setzero_si512(); RW];
                        for grp in 0..K::GROUPS {
                            for (i, iacc_i) in iacc.iter_mut().enumerate() {
                                let ib = i * bpr + b;
                                let wq = s.w.as_ptr().add(ib * 256 + grp * gd * 4);
                                let mut t = _mm512_setzero_si512();
                                for k in 0..gd {
                                    let u = _mm512_set1_epi32(
                                        (wq.add(4 * k) as *const i32).read_unaligned(),
                                    );
                                    t = _mm512_dpbusd_epi32(
                                        t,
                                        u,
                                        _mm512_loadu_si512(ap.add((grp * gd + k) * N) as *const _),
                                    );
                                }
                                let sc = _mm512_set1_epi32(*s.wi.as_ptr().add(ib * WI + grp));
                                *iacc_i = _mm512_add_epi32(*iacc_i, _mm512_mullo_epi32(t, sc));
                            }
                        }
                        let cp = s.corr.as_ptr().add(gb * 8 * N);
                        let da = _mm512_loadu_ps(s.da.as_ptr().add(gb * N));
                        for (i, (acc_i, &iacc_i)) in acc.iter_mut().zip(&iacc).enumerate() {
                            let ib = i * bpr + b;
                            let mut m = _mm512_setzero_si512();
                            for k in 0..K::PAIRS {
                                m = _mm512_dpwssd_epi32(
                                    m,
                                    _mm512_set1_epi32(*s.wi.as_ptr().add(ib * WI + K::GROUPS + k)),
                                    _mm512_loadu_si512(cp.add(k * N) as *const _),
                                );
                            }
                            let d = _mm512_mul_ps(da, _mm512_set1_ps(*s.dw.as_ptr().add(ib * 2)));
                            if K::OFFSET32 {
                                let isum = _mm512_sub_epi32(iacc_i, _mm512_slli_epi32::<5>(m));
                                *acc_i = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), d, *acc_i);
                            } else {
                                let dm = _mm512_mul_ps(
                                    da,
                                    _mm512_set1_ps(-*s.dw.as_ptr().add(ib * 2 + 1)),
                                );
                                *acc_i = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc_i), d, *acc_i);
                                *acc_i = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), dm, *acc_i);
                            }
                        }
                    }
                    acc
                };
                let valid = (t1 - tg).min(N);
                if valid == N && nr == RW {
                    let ldo = out.stride();
                    // SAFETY: tokens tg..tg + 16 <= t1 <= n and rows r0..r0 + 8 <= rows, inside the
                    // window `tile_shape` checked.
                    unsafe {
                        super::store_tile_8x16(&acc, out.as_mut_ptr().add(tg * ldo + r0), ldo)
                    };
                } else {
                    let mut tmp = [0.0f32; N * RW];
                    for (acc_i, row) in acc.iter().zip(tmp.chunks_exact_mut(N)).take(nr) {
                        // SAFETY: `row` holds 16 floats.
                        unsafe { _mm512_storeu_ps(row.as_mut_ptr(), *acc_i) };
                    }
                    for j in 0..valid {
                        for (i, o) in out.token(tg + j)[r0..r0 + nr].iter_mut().enumerate() {
                            *o = tmp[i * N + j];
                        }
                    }
                }
            }
            r0 += RW;
        }
        c0 = c1;
    }
}
