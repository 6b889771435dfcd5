//! The k-quant products (Q4_K, Q5_K and Q6_K against Q8_K) of every x86 set, written once over two traits: an
//! instruction set's lane dot (`KDot`: the per-group integer dot and the `bsums` pair term at the width and tile
//! height of its `ByteDot`) and a format on that set (`KQuant`: a weight block unpacked in registers, its dot
//! with one activation block, its quants in weight order). `avx2/kquant.rs` and `avx512/kquant.rs` implement
//! them (a new set: one `KDot` impl and the three formats' `KQuant`), and decide per call which kernel gets which
//! tokens (`gemm`); what every set sees the same way is here: the format constants and prepared scales
//! (`KFormat`), the activation side of the lane kernel (transposed quants, scales and `bsums` pairs), and both
//! drivers.
//!
//! A 256-block carries one integer scale per group (Q4_K/Q5_K: 8 groups of 32, 6-bit; Q6_K: 16 groups of 16,
//! i8) and a term from the activation group sums (`bsums`): Q4_K's mins (own float scale `dmin`), Q6_K's `-32`
//! offset (folded into the integer sum). Every per-block integer sum is computed exactly, as the scalar
//! reference computes it.
//!
//! - **Few tokens** (`gemm_few`): one row at a time (a tile's rows are one sequential stream), each weight
//!   block unpacked once in registers for up to 4 tokens; each block's integer terms (`KQuant::dot`) are
//!   reduced to exact integers, four at a time (two blocks' `[isum, m]` for one token, one block's for two
//!   tokens), and accumulated with the lane kernel's float steps. Rows are prefetched `PREFETCH_BYTES` ahead
//!   into L2.
//! - **Many tokens** (the lane driver `x86::gemm_lanes` over `KLanes`): one lane per token. A tile of rows is
//!   unpacked once into scratch (quant bytes in weight order, scales and `bsums` factor pairs as integers);
//!   each group's lanes are summed against transposed activations and scaled by the group's integer scale,
//!   the `bsums` term is one pair dot per two groups against pairs of transposed sums.
//!
//! Batch invariant (see `x86/mod.rs`): both drivers give every output the same float steps per block, in block
//! order, from the same exact integers and the same f32 scales: Q4_K/Q5_K `acc = fma(cvt(isum), da * d, acc)`,
//! then `acc = fma(cvt(m), da * -dmin, acc)`; Q6_K `acc = fma(cvt(isum - 32 m), da * d, acc)`.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use quarry_quantize::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};

use crate::kernels::ProductOut;
use crate::kernels::q4_k::q4k_scales_mins;

use super::avx2::transpose_8x8;
use super::{
    ByteDot, FewTile, IOf, LaneKernel, Lanes, PREFETCH_BYTES, Scratch, f16_bits_to_f32, few_tiles,
    grow, hsum4_epi32, lanes_from, prefetch_head, scratch, tile_shape,
};

/// Integers per prepared row block in `Scratch::wi` (lane kernels): up to 16 scales, then up to 8 pairs.
const WI: usize = 24;

/// `vpshufb` control turning the 8 Q4_K min bytes (broadcast to every qword) into 16
/// words, each min twice: `vpmaddwd` against the 16 `bsums` then gives `min_g * (bsums[2g] + bsums[2g + 1])`.
pub(crate) const Q4K_MIN_CTRL: [u8; 32] = {
    let mut c = [0x80u8; 32];
    let mut i = 0;
    while i < 16 {
        c[2 * i] = (i / 2) as u8;
        i += 1;
    }
    c
};

/// A k-quant block format: what the kernels of every instruction set see the same way.
pub(crate) trait KFormat: Copy {
    /// Groups per block (integer scales).
    const GROUPS: usize;
    /// Dwords of `bsums` pairs the second term needs.
    const PAIRS: usize;
    /// Whether the `bsums` term is Q6_K's `-32` offset (integer) rather than Q4_K's mins (scaled by `-dmin`).
    const OFFSET32: bool;
    /// Dwords of a group whose `vpmaddubsw` words may be summed in i16 before the scale is applied (AVX2's
    /// lane dot): Q4_K 8 (words of at most `2 * 15 * 127`: 30480), Q5_K 4 (`2 * 31 * 127`: 31496), Q6_K 2
    /// (`2 * 63 * 127`: 32004).
    const RUN: usize;
    /// The activation side of the `bsums` term: `PAIRS` dwords of two words each.
    fn act_pairs(a: &BlockQ8K, out: &mut [i32; 8]);
    /// The lane kernel's prepared scales: `GROUPS` integer scales and `PAIRS` dwords of two word-sized factors
    /// for the `bsums` pairs at `wi`, `[d, dmin]` at `f`.
    unsafe fn prep_scales(&self, wi: *mut i32, f: *mut f32);
}

/// Q4_K and Q5_K share everything but the fifth bit (`qh`, Q5_K only).
macro_rules! k4_format {
    ($w:ty, $run:literal) => {
        impl KFormat for $w {
            const GROUPS: usize = 8;
            const PAIRS: usize = 4;
            const OFFSET32: bool = false;
            const RUN: usize = $run;
            #[inline(always)]
            fn act_pairs(a: &BlockQ8K, out: &mut [i32; 8]) {
                q4k_act_pairs(a, out)
            }
            #[inline(always)]
            unsafe fn prep_scales(&self, wi: *mut i32, f: *mut f32) {
                // SAFETY: the caller's pointers hold `GROUPS + PAIRS` integers and 2 floats.
                unsafe {
                    q4k_prep_scales(&self.scales, self.d.to_bits(), self.dmin.to_bits(), wi, f)
                }
            }
        }
    };
}

k4_format!(BlockQ4K, 8);
k4_format!(BlockQ5K, 4);

impl KFormat for BlockQ6K {
    const GROUPS: usize = 16;
    const PAIRS: usize = 8;
    const OFFSET32: bool = true;
    const RUN: usize = 2;
    #[inline(always)]
    fn act_pairs(a: &BlockQ8K, out: &mut [i32; 8]) {
        // The 16 `bsums` as 8 dwords of two words.
        for (k, o) in out.iter_mut().enumerate() {
            *o = (a.bsums[2 * k] as u16 as u32 | (a.bsums[2 * k + 1] as u16 as u32) << 16) as i32;
        }
    }
    #[inline(always)]
    unsafe fn prep_scales(&self, wi: *mut i32, f: *mut f32) {
        // SAFETY: the caller's pointers hold 24 integers and 2 floats.
        unsafe {
            let sc = &self.scales;
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
            *f = f16_bits_to_f32(self.d.to_bits());
            *f.add(1) = 0.0;
        }
    }
}

/// The Q4_K/Q5_K activation side of the mins term: 4 dwords, each two group sums (of 32 quants: at most
/// 32 * 127, a word).
fn q4k_act_pairs(a: &BlockQ8K, out: &mut [i32; 8]) {
    for (k, o) in out.iter_mut().take(4).enumerate() {
        let bs = &a.bsums[4 * k..4 * k + 4];
        let g0 = bs[0].wrapping_add(bs[1]) as u16 as u32;
        let g1 = bs[2].wrapping_add(bs[3]) as u16 as u32;
        *o = (g0 | g1 << 16) as i32;
    }
}

/// The Q4_K/Q5_K prepared scales: the 8 scales, the mins as 4 pairs of words, `[d, dmin]`.
#[inline(always)]
unsafe fn q4k_prep_scales(scales: &[u8; 12], d: u16, dmin: u16, wi: *mut i32, f: *mut f32) {
    // SAFETY: the caller's pointers hold 12 integers and 2 floats.
    unsafe {
        let (sc, m) = q4k_scales_mins(scales);
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
        *f = f16_bits_to_f32(d);
        *f.add(1) = f16_bits_to_f32(dmin);
    }
}

/// A k-quant format on one instruction set.
pub(crate) trait KQuant {
    type W: KFormat;
    /// A weight block unpacked in registers (few-token kernel).
    type Row: Copy;
    /// Whether `decode` leaves the quants in the order of `permute_act` rather than in weight order.
    const PERMUTED: bool;
    unsafe fn decode(w: *const Self::W) -> Self::Row;
    /// The block's integer dot with activation block `a`, whose 256 quant bytes are read from `qa` (`a.qs`
    /// itself, or its permuted copy), as two vectors of 8 i32 lanes whose sums are exactly the lane kernel's
    /// integers (`KLanes::tile`): `[isum, m]`, `isum` the scaled quant dot `sum(sc_g * dot_g)` and `m` the
    /// `bsums` term `sum(min_g * bsum_g)` (Q4_K, Q5_K); Q6_K folds its `-32 * sum(sc_g * bsum_g)` into `isum`
    /// and returns zeros for `m`.
    unsafe fn dot(row: &Self::Row, qa: *const i8, a: *const BlockQ8K) -> [__m256i; 2];
    /// The block's float scales `[d, dmin]` (Q6_K: `[d, 0]`), as `KFormat::prep_scales` gives them.
    fn scales(row: &Self::Row) -> [f32; 2];
    /// Writes the block's 256 quant bytes in weight order (lane kernel).
    unsafe fn quants(w: *const Self::W, q: *mut u8);
}

/// An instruction set's k-quant lane dot, at the width and tile height of its `ByteDot`.
pub(crate) trait KDot: ByteDot {
    /// `iacc + sc *` each lane's dot of one group: the group's `64 / GROUPS` prepared weight dwords at `wq`
    /// (broadcast) against the activation vectors at `act` (`N` dwords apart).
    unsafe fn group<F: KFormat>(
        iacc: IOf<Self>,
        wq: *const u8,
        act: *const u32,
        sc: i32,
    ) -> IOf<Self>;
    /// `m +` each lane's dot of the two words of `wp` with the two words of the pair vector at `cp`.
    unsafe fn pair(m: IOf<Self>, wp: i32, cp: *const i32) -> IOf<Self>;
}

/// Copies the quants of each activation block in the order Q4_K's nibbles come out of a 64-byte load (for the
/// formats whose `decode` is `PERMUTED`): per half `p`, weights `128p..+32`, `128p + 64..+32`, `128p + 32..+32`,
/// `128p + 96..+32`.
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
pub(crate) unsafe fn gemm_few<K: KQuant>(
    w: &[K::W],
    a: &[BlockQ8K],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    let (_, rows) = tile_shape(w.len(), a.len(), bpr, t0, t1, out);
    let perm = if K::PERMUTED {
        // SAFETY: see `scratch`.
        let s = unsafe { &mut *scratch() };
        // `reserve_few_token_scratch` sizes `act` for this (16 tokens x 256 bytes per block) up front.
        grow(&mut s.act, (t1 - t0) * bpr * 64);
        // SAFETY: reads blocks of tokens t0..t1 < n, writes 256 bytes per block within the size grown above.
        unsafe { permute_act(&a[t0 * bpr..t1 * bpr], s.act.as_mut_ptr() as *mut i8) };
        s.act.as_ptr() as *const i8
    } else {
        std::ptr::null()
    };
    let mut tiles = FewK::<K> {
        w,
        a,
        bpr,
        t0,
        perm,
        out: out.reborrow(),
    };
    // SAFETY: the tiles stay within rows and tokens; prefetches never fault.
    unsafe {
        prefetch_head(w, rows * bpr);
        few_tiles::<_, 4>(&mut tiles, rows, t0, t1);
    }
}

/// The few-token tiles of a k-quant product; `perm`, for a `PERMUTED` format, the permuted activation quants of
/// tokens `t0..`.
struct FewK<'a, K: KQuant> {
    w: &'a [K::W],
    a: &'a [BlockQ8K],
    bpr: usize,
    t0: usize,
    perm: *const i8,
    out: ProductOut<'a>,
}

impl<K: KQuant> FewTile for FewK<'_, K> {
    /// One row at a time, its blocks in order. Per block and token the integer terms (`KQuant::dot`) are
    /// reduced horizontally to exact integers, four at a time, and applied exactly as the lane kernel applies
    /// them (`KLanes::tile`): Q4_K/Q5_K `acc = fma(cvt(isum), da * d, acc)` then `acc = fma(cvt(m), da * -dmin,
    /// acc)`, Q6_K `acc = fma(cvt(isum - 32 m), da * d, acc)`, so every output has the same bits whichever
    /// kernel and tile computed it. The accumulator of a row holds its tokens (lane `j`: token `t + j`); a
    /// reduction's 4 lanes are `4 / TT` steps of `TT` tokens: one token pairs two blocks' `[isum, m]` (Q6_K
    /// four blocks' `isum`), two tokens one block's terms (Q6_K two blocks'), four tokens one term.
    #[inline(always)]
    unsafe fn tile<const RT: usize, const TT: usize>(&mut self, r0: usize, t: usize) {
        const { assert!((RT == 4 || RT == 1) && (TT == 1 || TT == 2 || TT == 4)) };
        let (w, a, bpr, t0, perm) = (self.w, self.a, self.bpr, self.t0, self.perm);
        let out = &mut self.out;
        let bb = size_of::<K::W>();
        // Integer terms per block and token, and blocks per round of `STEPS` steps (each `TT` lanes).
        let terms = if K::W::OFFSET32 { 1 } else { 2 };
        let per_round = (4 / TT / terms).max(1);
        let steps = per_round * terms;
        debug_assert!((r0 + RT) * bpr <= w.len() && (t + TT) * bpr <= a.len());
        // SAFETY (bounds): rows r0..r0 + RT and tokens t..t + TT exist (the caller's tiling), every pointer
        // indexes block b < bpr of one of them. Prefetch addresses wrap and are never dereferenced.
        unsafe {
            // One row at a time: the rows of a tile are consecutive in memory, so this is one sequential
            // stream. (Four rows interleaved, as the Q4_0 kernel does, kept the accumulators of the
            // not-unrolled row loop on the stack.)
            let ap = a.as_ptr().add(t * bpr);
            let mut fin = [_mm_setzero_ps(); RT];
            for (i, fin_i) in fin.iter_mut().enumerate() {
                let wp = w.as_ptr().add((r0 + i) * bpr);
                let mut acc = _mm_setzero_ps();
                let mut b = 0;
                while b < bpr {
                    // The round's terms: step `s` (block `s / terms`, term `s % terms`) in lanes
                    // `s * TT..(s + 1) * TT` of the vectors `v`, its scales (one per token) in `sc[s]`.
                    let mut v = [_mm256_setzero_si256(); 8];
                    let mut sc = [_mm_setzero_ps(); 4];
                    let nb = per_round.min(bpr - b);
                    for k in 0..per_round {
                        if k < nb {
                            let blk = wp.add(b + k);
                            let pf = (blk as *const i8).wrapping_add(PREFETCH_BYTES);
                            let mut off = 0;
                            while off < bb {
                                _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(off));
                                off += 64;
                            }
                            let row = K::decode(blk);
                            let mut da = [0.0f32; 4];
                            for (j, da_j) in da.iter_mut().enumerate().take(TT) {
                                let ab = ap.add(j * bpr + b + k);
                                let qa = if K::PERMUTED {
                                    perm.add(((t - t0 + j) * bpr + b + k) * 256)
                                } else {
                                    (*ab).qs.as_ptr()
                                };
                                let [isum, m] = K::dot(&row, qa, ab);
                                v[k * terms * TT + j] = isum;
                                if terms == 2 {
                                    v[(k * terms + 1) * TT + j] = m;
                                }
                                *da_j = (*ab).d;
                            }
                            // The lane kernel's scales: da * d and da * -dmin.
                            let [d, dmin] = K::scales(&row);
                            let da = _mm_loadu_ps(da.as_ptr());
                            sc[k * terms] = _mm_mul_ps(da, _mm_set1_ps(d));
                            if terms == 2 {
                                sc[k * terms + 1] = _mm_mul_ps(da, _mm_set1_ps(-dmin));
                            }
                        }
                    }
                    for g in 0..steps * TT / 4 {
                        let x = _mm_cvtepi32_ps(hsum4_epi32(
                            v[4 * g],
                            v[4 * g + 1],
                            v[4 * g + 2],
                            v[4 * g + 3],
                        ));
                        for k in 0..4 / TT {
                            let step = g * (4 / TT) + k;
                            // Only the steps of blocks that exist: a step of zeros could still turn a -0.0
                            // accumulator into +0.0.
                            if step / terms < nb {
                                acc = _mm_fmadd_ps(lanes_from(x, k * TT), sc[step], acc);
                            }
                        }
                    }
                    b += nb;
                }
                *fin_i = acc;
            }
            if RT == 4 {
                // Rows x tokens to tokens x rows: one 4-float store per token.
                let t01 = _mm_unpacklo_ps(fin[0], fin[1]);
                let t23 = _mm_unpacklo_ps(fin[2], fin[3]);
                let u01 = _mm_unpackhi_ps(fin[0], fin[1]);
                let u23 = _mm_unpackhi_ps(fin[2], fin[3]);
                let per_token = [
                    _mm_movelh_ps(t01, t23),
                    _mm_movehl_ps(t23, t01),
                    _mm_movelh_ps(u01, u23),
                    _mm_movehl_ps(u23, u01),
                ];
                for (j, &v) in per_token.iter().enumerate().take(TT) {
                    // SAFETY: rows r0..r0 + 4 of token t + j are within the window `tile_shape` checked.
                    _mm_storeu_ps(out.token(t + j).as_mut_ptr().add(r0), v);
                }
            } else {
                let mut v = [0.0f32; 4];
                _mm_storeu_ps(v.as_mut_ptr(), fin[0]);
                for (j, &vj) in v.iter().enumerate().take(TT) {
                    out.token(t + j)[r0] = vj;
                }
            }
        }
    }
}

/// Format `K` on the lane kernel of instruction set `D` (`x86::gemm_lanes`).
pub(crate) struct KLanes<K, D>(PhantomData<(K, D)>);

impl<K: KQuant, D: KDot> LaneKernel for KLanes<K, D> {
    type W = K::W;
    type A = BlockQ8K;
    type L = D::L;
    const RW: usize = D::RW;
    /// Per group `g` and block `b` (`gb = g * bpr + b`), `act[(gb * 64 + k) * N + j]` is dword `k` of token
    /// `j`'s quants, `da[gb * N + j]` its scale and `corr[(gb * 8 + k) * N + j]` its `k`th `bsums` pair
    /// (`KFormat::act_pairs`).
    #[inline(always)]
    unsafe fn prep_acts(a: &[BlockQ8K], bpr: usize, s: &mut Scratch) {
        let n = D::L::N;
        let tokens = a.len() / bpr;
        let groups = tokens.div_ceil(n);
        grow(&mut s.act, groups * bpr * 64 * n);
        grow(&mut s.da, groups * bpr * n);
        grow(&mut s.corr, groups * bpr * 8 * n);
        // SAFETY: loads read block b < bpr of token < tokens; stores stay below the sizes grown above.
        unsafe {
            for g in 0..groups {
                for b in 0..bpr {
                    let gb = g * bpr + b;
                    for h in 0..n / 8 {
                        let tb = n * g + 8 * h;
                        for kk in 0..8 {
                            let mut r = [_mm256_setzero_si256(); 8];
                            for (j, rj) in r.iter_mut().enumerate() {
                                if tb + j < tokens {
                                    let blk = &a[(tb + j) * bpr + b];
                                    *rj = _mm256_loadu_si256(
                                        blk.qs.as_ptr().add(32 * kk) as *const __m256i
                                    );
                                }
                            }
                            let cols = transpose_8x8(r);
                            for (k, &c) in cols.iter().enumerate() {
                                _mm256_storeu_si256(
                                    s.act.as_mut_ptr().add((gb * 64 + 8 * kk + k) * n + 8 * h)
                                        as *mut __m256i,
                                    c,
                                );
                            }
                        }
                    }
                    for j in 0..n {
                        let tok = n * g + j;
                        let mut p = [0i32; 8];
                        let mut d = 0.0;
                        if tok < tokens {
                            let blk = &a[tok * bpr + b];
                            K::W::act_pairs(blk, &mut p);
                            d = blk.d;
                        }
                        s.da[gb * n + j] = d;
                        for (k, &pk) in p.iter().enumerate() {
                            s.corr[(gb * 8 + k) * n + j] = pk;
                        }
                    }
                }
            }
        }
    }
    #[inline(always)]
    fn grow_rows(s: &mut Scratch, bpr: usize) {
        grow(&mut s.w, D::RW * bpr * 256);
        grow(&mut s.wi, D::RW * bpr * WI);
        grow(&mut s.dw, D::RW * bpr * 2);
    }
    #[inline(always)]
    unsafe fn prep_block(w: Option<&K::W>, ib: usize, s: &mut Scratch) {
        match w {
            // SAFETY: 256 bytes, WI integers and 2 floats at these offsets were grown by `grow_rows`.
            Some(blk) => unsafe {
                K::quants(blk, s.w.as_mut_ptr().add(ib * 256));
                blk.prep_scales(
                    s.wi.as_mut_ptr().add(ib * WI),
                    s.dw.as_mut_ptr().add(ib * 2),
                );
            },
            // Missing rows of the last tile: zero quants, scales and factors.
            None => {
                s.w[ib * 256..(ib + 1) * 256].fill(0);
                s.wi[ib * WI..(ib + 1) * WI].fill(0);
                s.dw[ib * 2..ib * 2 + 2].fill(0.0);
            }
        }
    }
    #[inline(always)]
    unsafe fn tile<const RW: usize>(s: &Scratch, g: usize, bpr: usize) -> [<D::L as Lanes>::F; RW] {
        let n = D::L::N;
        let groups = K::W::GROUPS;
        let gd = 64 / groups;
        // SAFETY: scratch indices are within the sizes grown by `prep_acts` and `grow_rows`: group g < groups,
        // block b < bpr, row i < RW, dword k < 64, pair k < PAIRS <= 8.
        unsafe {
            let mut acc = [D::L::zero(); RW];
            for b in 0..bpr {
                let gb = g * bpr + b;
                let ap = s.act.as_ptr().add(gb * 64 * n);
                let mut iacc = [D::L::zero_i(); RW];
                for grp in 0..groups {
                    for (i, iacc_i) in iacc.iter_mut().enumerate() {
                        let ib = i * bpr + b;
                        let wq = s.w.as_ptr().add(ib * 256 + grp * gd * 4);
                        let sc = *s.wi.as_ptr().add(ib * WI + grp);
                        *iacc_i = D::group::<K::W>(*iacc_i, wq, ap.add(grp * gd * n), sc);
                    }
                }
                let cp = s.corr.as_ptr().add(gb * 8 * n);
                let da = D::L::load(s.da.as_ptr().add(gb * n));
                for (i, (acc_i, &iacc_i)) in acc.iter_mut().zip(&iacc).enumerate() {
                    let ib = i * bpr + b;
                    let mut m = D::L::zero_i();
                    for k in 0..K::W::PAIRS {
                        m = D::pair(m, *s.wi.as_ptr().add(ib * WI + groups + k), cp.add(k * n));
                    }
                    let d = D::L::mul(da, D::L::splat(*s.dw.as_ptr().add(ib * 2)));
                    if K::W::OFFSET32 {
                        *acc_i = D::L::scale_acc(D::L::sub_32x(iacc_i, m), d, *acc_i);
                    } else {
                        let dm = D::L::mul(da, D::L::splat(-*s.dw.as_ptr().add(ib * 2 + 1)));
                        *acc_i = D::L::scale_acc(iacc_i, d, *acc_i);
                        *acc_i = D::L::scale_acc(m, dm, *acc_i);
                    }
                }
            }
            acc
        }
    }
}
