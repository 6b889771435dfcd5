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
//! - **Few tokens** (`gemm_few`): each row streams its blocks a chunk at a time (a tile's rows stay
//!   sequential runs of memory: rows of up to 8 blocks whole), each weight block unpacked once in registers
//!   for up to 4 tokens; each block's integer terms (`KQuant::dot`) are partly summed per row, then finished
//!   for the tile's 4 rows together to exact integers and accumulated with the lane kernel's float steps into
//!   each token's 4-row accumulator (one chain of FMAs for 4 rows), stored as it is. Rows are prefetched
//!   `PREFETCH_BYTES` ahead into L2. (Four rows interleaved block by block, as the Q4_0 kernel does, streamed
//!   DRAM more slowly.)
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
use std::mem::MaybeUninit;

use quarry_quantize::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};

use crate::kernels::ProductOut;
use crate::kernels::q4_k::q4k_scales_mins;

use super::avx2::transpose_8x8;
use super::{
    ByteDot, FewTile, IOf, LaneKernel, Lanes, PREFETCH_BYTES, Scratch, f16_bits_to_f32, few_tiles,
    grow, prefetch_head, scratch, tile_shape,
};

/// Integers per prepared row block in `Scratch::wi` (lane kernels): up to 16 scales, then up to 8 pairs.
pub(super) const WI: usize = 24;

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
        // `reserve_scratch` sizes `act` for this (16 tokens x 256 bytes per block) up front.
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

/// Blocks per chunk of a `FewK` tile: each row streams this many blocks at a time (all of a 2048-column row),
/// their integer sums buffered for the tile's accumulation.
const FEW_K_CHUNK: usize = 8;

/// A block's `[isum, m]` lanes (`KQuant::dot`) partly summed: `[a, b, c, d]` with `a + b` the exact `isum` and
/// `c + d` the exact `m`.
#[inline(always)]
unsafe fn partial_pair(isum: __m256i, m: __m256i) -> __m128i {
    unsafe {
        // Per 128-bit lane: [isum01, isum23, m01, m23], then both lanes added.
        let h = _mm256_hadd_epi32(isum, m);
        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
    }
}

/// A block's `isum` lanes partly summed: 4 lanes whose sum is the exact `isum`.
#[inline(always)]
unsafe fn partial_one(isum: __m256i) -> __m128i {
    unsafe {
        _mm_add_epi32(
            _mm256_castsi256_si128(isum),
            _mm256_extracti128_si256::<1>(isum),
        )
    }
}

impl<K: KQuant> FewTile for FewK<'_, K> {
    /// Each row streams a chunk of its blocks (one sequential run of memory), every block unpacked once for
    /// the tile's tokens, and its integer terms (`KQuant::dot`) partly summed into a buffer. Then per block of
    /// the chunk, in order, the 4 rows' partial sums are finished together to exact integers (lane `i`: row
    /// `i`) and applied exactly as the lane kernel applies them (`KLanes::tile`): Q4_K/Q5_K `acc =
    /// fma(cvt(isum), da * d, acc)` then `acc = fma(cvt(m), da * -dmin, acc)`, Q6_K `acc = fma(cvt(isum - 32
    /// m), da * d, acc)`, into the token's accumulator of the 4 rows, which is stored as it is. So every output
    /// has the same bits whichever kernel and tile computed it, and the 4 rows share one chain of FMAs.
    #[inline(always)]
    unsafe fn tile<const RT: usize, const TT: usize>(&mut self, r0: usize, t: usize) {
        const { assert!((RT == 4 || RT == 1) && TT <= 4) };
        let (w, a, bpr, t0, perm) = (self.w, self.a, self.bpr, self.t0, self.perm);
        let out = &mut self.out;
        let bb = size_of::<K::W>();
        debug_assert!((r0 + RT) * bpr <= w.len() && (t + TT) * bpr <= a.len());
        // SAFETY (bounds): rows r0..r0 + RT and tokens t..t + TT exist (the caller's tiling), every pointer
        // indexes block b < bpr of one of them. Prefetch addresses wrap and are never dereferenced.
        unsafe {
            let ap = a.as_ptr().add(t * bpr);
            let neg = _mm_set1_ps(-0.0);
            // Token j's 4 rows (a single row's tile has rows of zeros beside it).
            let mut acc = [_mm_setzero_ps(); TT];
            let mut b0 = 0;
            while b0 < bpr {
                let nb = FEW_K_CHUNK.min(bpr - b0);
                // Per block of the chunk, row and token: the partial sums; per block and row: d and dmin.
                // Uninitialised (zeroing them per tile cost as much as a short row's work): every entry read
                // is written first, the rows past a single row's tile as zeros.
                let mut part = MaybeUninit::<[[[__m128i; TT]; 4]; FEW_K_CHUNK]>::uninit();
                let mut ds = MaybeUninit::<[[f32; 4]; FEW_K_CHUNK]>::uninit();
                let mut dmins = MaybeUninit::<[[f32; 4]; FEW_K_CHUNK]>::uninit();
                let (pp, dp, mp) = (
                    part.as_mut_ptr() as *mut __m128i,
                    ds.as_mut_ptr() as *mut f32,
                    dmins.as_mut_ptr() as *mut f32,
                );
                for i in 0..RT {
                    let wp = w.as_ptr().add((r0 + i) * bpr + b0);
                    for k in 0..nb {
                        let blk = wp.add(k);
                        let pf = (blk as *const i8).wrapping_add(PREFETCH_BYTES);
                        let mut off = 0;
                        while off < bb {
                            _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(off));
                            off += 64;
                        }
                        let row = K::decode(blk);
                        let [d, dmin] = K::scales(&row);
                        dp.add(4 * k + i).write(d);
                        mp.add(4 * k + i).write(dmin);
                        for j in 0..TT {
                            let ab = ap.add(j * bpr + b0 + k);
                            let qa = if K::PERMUTED {
                                perm.add(((t - t0 + j) * bpr + b0 + k) * 256)
                            } else {
                                (*ab).qs.as_ptr()
                            };
                            let [isum, m] = K::dot(&row, qa, ab);
                            pp.add((4 * k + i) * TT + j).write(if K::W::OFFSET32 {
                                partial_one(isum)
                            } else {
                                partial_pair(isum, m)
                            });
                        }
                    }
                }
                if RT == 1 {
                    for k in 0..nb {
                        for i in 1..4 {
                            dp.add(4 * k + i).write(0.0);
                            mp.add(4 * k + i).write(0.0);
                            for j in 0..TT {
                                pp.add((4 * k + i) * TT + j).write(_mm_setzero_si128());
                            }
                        }
                    }
                }
                for k in 0..nb {
                    let d = _mm_loadu_ps(dp.add(4 * k));
                    let p = pp.add(4 * k * TT);
                    for (j, acc_j) in acc.iter_mut().enumerate() {
                        // The lane kernel's scales: da * d and da * -dmin.
                        let da = _mm_set1_ps((*ap.add(j * bpr + b0 + k)).d);
                        let h01 = _mm_hadd_epi32(*p.add(j), *p.add(TT + j));
                        let h23 = _mm_hadd_epi32(*p.add(2 * TT + j), *p.add(3 * TT + j));
                        if K::W::OFFSET32 {
                            let isum = _mm_hadd_epi32(h01, h23);
                            *acc_j = _mm_fmadd_ps(_mm_cvtepi32_ps(isum), _mm_mul_ps(da, d), *acc_j);
                        } else {
                            // [row 0 isum, row 0 m, row 1 isum, row 1 m] and rows 2, 3: isums, then ms.
                            let (h01, h23) = (_mm_castsi128_ps(h01), _mm_castsi128_ps(h23));
                            let isum = _mm_castps_si128(_mm_shuffle_ps::<0x88>(h01, h23));
                            let m = _mm_castps_si128(_mm_shuffle_ps::<0xdd>(h01, h23));
                            let ndmin = _mm_xor_ps(_mm_loadu_ps(mp.add(4 * k)), neg);
                            *acc_j = _mm_fmadd_ps(_mm_cvtepi32_ps(isum), _mm_mul_ps(da, d), *acc_j);
                            *acc_j =
                                _mm_fmadd_ps(_mm_cvtepi32_ps(m), _mm_mul_ps(da, ndmin), *acc_j);
                        }
                    }
                }
                b0 += nb;
            }
            for (j, &acc_j) in acc.iter().enumerate() {
                if RT == 4 {
                    // SAFETY: rows r0..r0 + 4 of token t + j are within the window `tile_shape` checked.
                    _mm_storeu_ps(out.token(t + j).as_mut_ptr().add(r0), acc_j);
                } else {
                    out.token(t + j)[r0] = _mm_cvtss_f32(acc_j);
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
