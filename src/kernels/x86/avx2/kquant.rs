//! Q4_K and Q6_K against Q8_K on AVX2 (also the AVX-VNNI set's: `vpmaddubsw` already applies the group scales
//! in its `vpmaddwd`, where `vpdpbusd` would need a pack first, so VNNI has nothing cheaper to offer here).
//!
//! A ymm of quants is exactly one Q4_K group (32 weights) or two Q6_K groups (one per 128-bit lane), so the
//! widening `vpmaddwd` after `vpmaddubsw` multiplies by a vector of the group's scale instead of by ones: the
//! scaled integer dot costs nothing extra. `vpmaddubsw` saturates at i16, but its pairs stay below it: at most
//! `2 * 63 * 127 = 16002` (Q6_K), `2 * 15 * 127` (Q4_K). The `bsums` term (Q4_K mins with `dmin`, Q6_K's `-32`
//! offset in the integer sum) is one `vpmaddwd` per block, as in `avx512/kquant.rs`, whose structure this
//! follows: one row at a time for few tokens, 8-token lanes over 4 unpacked rows for many.

use std::arch::x86_64::*;

use crate::kernels::q4_k::q4k_scales_mins;
use quarry_quantize::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};

use crate::kernels::ProductOut;

use super::super::kquant::{Q4K_MIN_CTRL, WI, prep_acts, q4k_act_pairs, q6k_act_pairs};
use super::super::{CHUNK_TOKENS, f16_bits_to_f32, grow, scratch, store_tile_4x8, tile_shape};

/// Bytes of weights requested ahead of the ones being read (as in the other kernels).
const PREFETCH_BYTES: usize = 8192;

/// `vpshufb` controls broadcasting Q4_K scale byte `g` (from a qword broadcast) to 16 words.
const Q4K_SCALE_CTRL: [[u8; 32]; 8] = {
    let mut c = [[0x80u8; 32]; 8];
    let mut g = 0;
    while g < 8 {
        let mut i = 0;
        while i < 16 {
            c[g][2 * i] = g as u8;
            i += 1;
        }
        g += 1;
    }
    c
};

/// `vpshufb` controls putting Q6_K scale bytes `2p` (low 128-bit lane) and `2p + 1` (high lane) into the high
/// byte of every word, for an arithmetic shift to sign-extend.
const Q6K_SCALE_CTRL: [[u8; 32]; 8] = {
    let mut c = [[0x80u8; 32]; 8];
    let mut p = 0;
    while p < 8 {
        let mut i = 0;
        while i < 8 {
            c[p][2 * i + 1] = (2 * p) as u8;
            c[p][16 + 2 * i + 1] = (2 * p + 1) as u8;
            i += 1;
        }
        p += 1;
    }
    c
};

/// A k-quant format on AVX2 for both kernels.
pub(crate) trait KQuant {
    type W: Copy;
    /// A weight block loaded (and partly unpacked) in registers.
    type Row: Copy;
    const GROUPS: usize;
    const PAIRS: usize;
    /// Whether the `bsums` term is Q6_K's `-32` offset (integer) rather than Q4_K's mins (scaled by `-dmin`).
    const OFFSET32: bool;
    /// Dwords of a group whose `vpmaddubsw` words may be summed in i16 before the scale is applied (lanes).
    const RUN: usize;
    const ACT_PAIRS: fn(&BlockQ8K, &mut [i32; 8]);
    unsafe fn decode(w: *const Self::W) -> Self::Row;
    /// `acc +` the block's partial sums with activation block `a` (8 lanes whose sum is the dot product).
    unsafe fn acc(row: &Self::Row, a: *const BlockQ8K, acc: __m256) -> __m256;
    /// Writes the 256 quant bytes in weight order, `GROUPS` scales, `PAIRS` dwords of two word-sized factors for
    /// the `bsums` pairs, and `[d, dmin]`.
    unsafe fn prep(w: *const Self::W, q: *mut u8, wi: *mut i32, f: *mut f32);
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

/// Q4_K and Q5_K share everything but the fifth bit (`qh`, Q5_K only). `RUN`: words of `vpmaddubsw` summed in
/// i16, at most `2 * 15 * 127` each for Q4_K (8 of them: 30480), `2 * 31 * 127` for Q5_K (4: 31496).
macro_rules! k4_impl {
    ($name:ident, $w:ty, $run:literal $(, $qh:ident)?) => {
// SAFETY (every method): the module contract in `x86/mod.rs`: features enabled by the caller, pointers valid.
        impl KQuant for $name {
            type W = $w;
            type Row = Q4KRow;
            const GROUPS: usize = 8;
            const PAIRS: usize = 4;
            const OFFSET32: bool = false;
            const RUN: usize = $run;
            const ACT_PAIRS: fn(&BlockQ8K, &mut [i32; 8]) = q4k_act_pairs;
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
            unsafe fn acc(r: &Q4KRow, a: *const BlockQ8K, acc: __m256) -> __m256 {
                unsafe {
                    let a = &*a;
                    let qa = a.qs.as_ptr();
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
                    let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(r.d * a.d), acc);
                    _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(mins),
                        _mm256_set1_ps(-(r.dmin * a.d)),
                        acc,
                    )
                }
            }
            #[inline(always)]
            unsafe fn prep(w: *const $w, q: *mut u8, wi: *mut i32, f: *mut f32) {
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

k4_impl!(Q4K, BlockQ4K, 8);
k4_impl!(Q5K, BlockQ5K, 4, qh);

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
    const GROUPS: usize = 16;
    const PAIRS: usize = 8;
    const OFFSET32: bool = true;
    /// Two words of at most `2 * 63 * 127`: 32004.
    const RUN: usize = 2;
    const ACT_PAIRS: fn(&BlockQ8K, &mut [i32; 8]) = q6k_act_pairs;
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
    unsafe fn acc(r: &Q6KRow, a: *const BlockQ8K, acc: __m256) -> __m256 {
        unsafe {
            let a = &*a;
            let qa = a.qs.as_ptr();
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
            let isum = _mm256_sub_epi32(isum, _mm256_slli_epi32::<5>(off));
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(r.d * a.d), acc)
        }
    }
    #[inline(always)]
    unsafe fn prep(w: *const BlockQ6K, q: *mut u8, wi: *mut i32, f: *mut f32) {
        unsafe {
            let r = Self::decode(w);
            for h in 0..2 {
                let qs = quants6(r.ql[2 * h], r.ql[2 * h + 1], r.qh[h]);
                for (k, &qk) in qs.iter().enumerate() {
                    _mm256_storeu_si256(q.add(128 * h + 32 * k) as *mut __m256i, qk);
                }
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
            gemm_lanes::<K>(w, a, bpr, 0, lanes, &mut out);
        }
        if lanes < n {
            gemm_few::<K>(w, a, bpr, lanes, n, &mut out);
        }
    }
}

/// Tokens `t0..t1`: 4 rows x up to 4 tokens, each weight block loaded once per tile.
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
    // SAFETY: the tiles stay within rows and tokens (below); prefetches never fault.
    unsafe {
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
                    (4, 4..) => few_tile::<K, 4, 4>(w, a, bpr, r, t, out),
                    (4, 2..) => few_tile::<K, 4, 2>(w, a, bpr, r, t, out),
                    (4, _) => few_tile::<K, 4, 1>(w, a, bpr, r, t, out),
                    (_, 4..) => few_tile::<K, 1, 4>(w, a, bpr, r, t, out),
                    (_, 2..) => few_tile::<K, 1, 2>(w, a, bpr, r, t, out),
                    (_, _) => few_tile::<K, 1, 1>(w, a, bpr, r, t, out),
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
unsafe fn few_tile<K: KQuant, const RT: usize, const TT: usize>(
    w: &[K::W],
    a: &[BlockQ8K],
    bpr: usize,
    r0: usize,
    t: usize,
    out: &mut ProductOut,
) {
    let bb = size_of::<K::W>();
    debug_assert!((r0 + RT) * bpr <= w.len() && (t + TT) * bpr <= a.len());
    // SAFETY (bounds): rows r0..r0 + RT and tokens t..t + TT exist (the caller's tiling), every pointer indexes
    // block b < bpr of one of them. Prefetch addresses wrap and are never dereferenced.
    unsafe {
        // One row at a time (the tile's rows are one sequential stream), accumulators in registers.
        let ap = a.as_ptr().add(t * bpr);
        let mut fin = [[_mm256_setzero_ps(); TT]; RT];
        for (i, fin_i) in fin.iter_mut().enumerate() {
            let wp = w.as_ptr().add((r0 + i) * bpr);
            let mut acc = [_mm256_setzero_ps(); TT];
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
                    *acc_j = K::acc(&row, ap.add(j * bpr + b), *acc_j);
                }
            }
            *fin_i = acc;
        }
        // Four rows' sums reduced together and stored as one vector (rows are only a few blocks long).
        for j in 0..TT {
            let o = out.as_mut_ptr().add((t + j) * out.stride() + r0);
            if RT == 4 {
                // SAFETY: rows r0..r0 + 4 of token t + j are within the window `tile_shape` checked.
                _mm_storeu_ps(o, hsum4(fin[0][j], fin[1][j], fin[2][j], fin[3][j]));
            } else {
                for (i, fin_i) in fin.iter().enumerate() {
                    *o.add(i) = super::super::hsum_ps_256(fin_i[j]);
                }
            }
        }
    }
}

/// `[sum(a), sum(b), sum(c), sum(d)]`.
#[inline(always)]
unsafe fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
    unsafe {
        // Per 128-bit lane: [a01, a23, b01, b23], [c01, c23, d01, d23], then [a0..4, b0..4, c0..4, d0..4].
        let abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        )
    }
}

/// Tokens `t0..t1` in vectors of 8 (the last one padded), 4 rows per tile. Also AVX-512's kernel for remainders
/// of 4 to 8 tokens.
#[inline(always)]
pub(crate) unsafe fn gemm_lanes<K: KQuant>(
    w: &[K::W],
    a: &[BlockQ8K],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    const N: usize = 8;
    const RW: usize = 4;
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
                    let mut acc = [_mm256_setzero_ps(); RW];
                    for b in 0..bpr {
                        let gb = g * bpr + b;
                        let ap = s.act.as_ptr().add(gb * 64 * N);
                        let mut iacc = [_mm256_setzero_si256(); RW];
                        for grp in 0..K::GROUPS {
                            for (i, iacc_i) in iacc.iter_mut().enumerate() {
                                let ib = i * bpr + b;
                                let wq = s.w.as_ptr().add(ib * 256 + grp * gd * 4);
                                let sc =
                                    _mm256_set1_epi16(*s.wi.as_ptr().add(ib * WI + grp) as i16);
                                let mut k = 0;
                                while k < gd {
                                    let mut words = _mm256_setzero_si256();
                                    for kk in k..k + K::RUN {
                                        let u = _mm256_set1_epi32(
                                            (wq.add(4 * kk) as *const i32).read_unaligned(),
                                        );
                                        let act = _mm256_loadu_si256(
                                            ap.add((grp * gd + kk) * N) as *const __m256i
                                        );
                                        words =
                                            _mm256_add_epi16(words, _mm256_maddubs_epi16(u, act));
                                    }
                                    *iacc_i =
                                        _mm256_add_epi32(*iacc_i, _mm256_madd_epi16(words, sc));
                                    k += K::RUN;
                                }
                            }
                        }
                        let cp = s.corr.as_ptr().add(gb * 8 * N);
                        let da = _mm256_loadu_ps(s.da.as_ptr().add(gb * N));
                        for (i, (acc_i, &iacc_i)) in acc.iter_mut().zip(&iacc).enumerate() {
                            let ib = i * bpr + b;
                            let mut m = _mm256_setzero_si256();
                            for k in 0..K::PAIRS {
                                m = _mm256_add_epi32(
                                    m,
                                    _mm256_madd_epi16(
                                        _mm256_set1_epi32(
                                            *s.wi.as_ptr().add(ib * WI + K::GROUPS + k),
                                        ),
                                        _mm256_loadu_si256(cp.add(k * N) as *const __m256i),
                                    ),
                                );
                            }
                            let d = _mm256_mul_ps(da, _mm256_set1_ps(*s.dw.as_ptr().add(ib * 2)));
                            if K::OFFSET32 {
                                let isum = _mm256_sub_epi32(iacc_i, _mm256_slli_epi32::<5>(m));
                                *acc_i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, *acc_i);
                            } else {
                                let dm = _mm256_mul_ps(
                                    da,
                                    _mm256_set1_ps(-*s.dw.as_ptr().add(ib * 2 + 1)),
                                );
                                *acc_i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc_i), d, *acc_i);
                                *acc_i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), dm, *acc_i);
                            }
                        }
                    }
                    acc
                };
                let valid = (t1 - tg).min(N);
                if valid == N && nr == RW {
                    let ldo = out.stride();
                    // SAFETY: tokens tg..tg + 8 <= t1 <= n and rows r0..r0 + 4 <= rows, inside the
                    // window `tile_shape` checked.
                    unsafe { store_tile_4x8(&acc, out.as_mut_ptr().add(tg * ldo + r0), ldo) };
                } else {
                    let mut tmp = [0.0f32; N * RW];
                    for (acc_i, row) in acc.iter().zip(tmp.chunks_exact_mut(N)).take(nr) {
                        // SAFETY: `row` holds 8 floats.
                        unsafe { _mm256_storeu_ps(row.as_mut_ptr(), *acc_i) };
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
