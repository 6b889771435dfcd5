//! AVX-512 VNNI's Q4_K product over rows interleaved in groups of 16 (`kernels::q4_k::interleave`), one lane per
//! row, for any number of tokens; and the same groups as the tile unit's source (`amx::KTiles`).
//!
//! Rows as they lie (`avx512/kquant.rs`) are 16 streams a row apart, and each row's block is unpacked on its own
//! and its lanes summed per token: about 450 instructions per 16 rows' block for one token. Interleaved, a
//! group's block is one sequential run of 2304 bytes that the hardware prefetchers follow: 32 aligned loads give
//! the quants as the 64 dword vectors a lane-per-row dot wants (a run's low nibbles are one group's dword, its
//! high nibbles the next group's), the headers give every lane's scales with a few vector shifts, and each token
//! then costs 64 `vpdpbusd` against its own activation dwords broadcast, 8 `vpmulld` by the group scales, 4
//! `vpdpwssd` for the mins against its `bsums` pairs, and the lane kernel's two float steps: about 240
//! instructions per block for one token, 100 for each more.
//!
//! Batch invariance: each lane ends a block with the row's exact integer dot and mins term, the integers every
//! other Q4_K kernel builds, and takes the lane kernel's float steps (`acc = fma(cvt(isum), da * d, acc)`, then
//! `acc = fma(cvt(m), da * -dmin, acc)`), block by block in order: the same bits as rows as they lie, on the
//! lanes or on the tile unit.

use std::arch::x86_64::*;

use quarry_quantize::blocks::{BlockQ4K, BlockQ8K};

use super::amx::KTiles;
use super::kquant::KFormat;
use super::{grow, scratch};
use crate::kernels::ProductOut;
use crate::kernels::q4_k::{D_AT, DMIN_AT, GROUP_BLOCK_BYTES, SCALES_AT};

/// Q4_K rows interleaved in groups of 16, `bpr` 256-blocks each.
pub(super) struct InterleavedQ4K<'a> {
    w: &'a [u8],
    bpr: usize,
    /// The block `KTiles::prepare` made current.
    at: *const u8,
}

impl<'a> InterleavedQ4K<'a> {
    pub(super) fn new(w: &'a [u8], bpr: usize) -> InterleavedQ4K<'a> {
        assert!(bpr > 0 && w.len().is_multiple_of(bpr * GROUP_BLOCK_BYTES));
        InterleavedQ4K {
            w,
            bpr,
            at: w.as_ptr(),
        }
    }

    fn tiles(&self) -> usize {
        self.w.len() / (self.bpr * GROUP_BLOCK_BYTES)
    }

    /// Block `b` of group `g`.
    fn block(&self, g: usize, b: usize) -> *const u8 {
        assert!(g < self.tiles() && b < self.bpr);
        self.w[(g * self.bpr + b) * GROUP_BLOCK_BYTES..].as_ptr()
    }

    /// Bytes the stream is requested ahead of its use, into L2 (`row_lanes::Interleaved`'s distance).
    const AHEAD: usize = 16384;

    /// Requests the stream `AHEAD` bytes past block `at`: one block's worth of lines, and one more.
    #[inline(always)]
    unsafe fn prefetch(at: *const u8) {
        let p = (at as *const i8).wrapping_add(Self::AHEAD);
        for line in 0..GROUP_BLOCK_BYTES / 64 + 1 {
            // SAFETY: a prefetch never faults; the address wraps rather than being dereferenced.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64 * line)) };
        }
    }
}

/// The 16 rows' 6-bit scales (`sc[g]`) and mins (`sc[8 + g]`) of the group block at `at`, one dword per lane, and
/// the float scales `[d, -dmin]`: `q4k_scales_mins` on the three dwords of every row at once.
#[inline(always)]
unsafe fn lane_scales(at: *const u8, sc: &mut [__m512i; 16]) -> [__m512; 2] {
    // SAFETY: the set's features are present; `at` is a whole group block.
    unsafe {
        let lo = _mm512_loadu_si512(at.add(SCALES_AT) as *const _);
        let mid = _mm512_loadu_si512(at.add(SCALES_AT + 64) as *const _);
        let hi = _mm512_loadu_si512(at.add(SCALES_AT + 128) as *const _);
        let (six, four, top) = (
            _mm512_set1_epi32(0x3f3f_3f3f),
            _mm512_set1_epi32(0x0f0f_0f0f),
            _mm512_set1_epi32(0x3030_3030),
        );
        let words = [
            _mm512_and_si512(lo, six),
            _mm512_or_si512(
                _mm512_and_si512(hi, four),
                _mm512_and_si512(_mm512_srli_epi32::<2>(lo), top),
            ),
            _mm512_and_si512(mid, six),
            _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi32::<4>(hi), four),
                _mm512_and_si512(_mm512_srli_epi32::<2>(mid), top),
            ),
        ];
        let byte = _mm512_set1_epi32(0xff);
        for (i, &w) in words.iter().enumerate() {
            for k in 0..4 {
                let v = _mm512_srl_epi32(w, _mm_cvtsi32_si128(8 * k as i32));
                sc[4 * i + k] = _mm512_and_si512(v, byte);
            }
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(at.add(D_AT) as *const __m256i));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(at.add(DMIN_AT) as *const __m256i));
        // `-dmin` by its sign bit, as the lane kernel negates it.
        let sign = _mm512_set1_epi32(i32::MIN);
        [
            d,
            _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(dmin), sign)),
        ]
    }
}

/// Dword `k` (0..8) of chunk `c` (0..4) of the block at `at`, all 16 rows: low nibbles are group `2c`'s weights
/// `4k..4k + 4`, high nibbles group `2c + 1`'s.
#[inline(always)]
unsafe fn run(at: *const u8, c: usize, k: usize) -> __m512i {
    // SAFETY: the caller's `at` is a whole group block.
    unsafe { _mm512_loadu_si512(at.add(64 * (8 * c + k)) as *const _) }
}

impl KTiles for InterleavedQ4K<'_> {
    type W = BlockQ4K;
    const PERMUTED: bool = false;
    #[inline(always)]
    fn tiles(&self) -> usize {
        InterleavedQ4K::tiles(self)
    }
    #[inline(always)]
    unsafe fn prepare(&mut self, g: usize, b: usize, sc: &mut [__m512i; 16]) -> [__m512; 2] {
        self.at = self.block(g, b);
        // SAFETY: `at` is a whole group block; the caller's features.
        unsafe {
            Self::prefetch(self.at);
            lane_scales(self.at, sc)
        }
    }
    #[inline(always)]
    unsafe fn dwords(&self, chunk: usize) -> [__m512i; 4] {
        // Chunk `chunk` is dwords 4 chunk..4 chunk + 4 of the block: group g = chunk / 2, which is the low (even
        // g) or high nibbles of runs 4 (chunk % 2).. of its pair of groups.
        let (g, k0) = (chunk / 2, 4 * (chunk % 2));
        // SAFETY: `at` is the current whole group block; the caller's features.
        unsafe {
            let m = _mm512_set1_epi8(0x0f);
            let mut out = [_mm512_setzero_si512(); 4];
            for (k, o) in out.iter_mut().enumerate() {
                let raw = run(self.at, g / 2, k0 + k);
                *o = if g % 2 == 0 {
                    _mm512_and_si512(raw, m)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m)
                };
            }
            out
        }
    }
}

/// Tokens per chunk of `prepare_tokens`: what `reserve_scratch` sizes (`da` one per token and block, `corr` 4).
const CHUNK_TOKENS: usize = 64;

/// Most tokens per pass over a group: one accumulator and one integer sum per token beside the 16 weight
/// vectors of a chunk.
const PASS_TOKENS: usize = 8;

/// Each token's activation scales (`s.da`, per block) and mins-term pairs (`s.corr`, 4 dwords per block: two
/// group sums each), for tokens `t0..t1`.
fn prepare_tokens(a: &[BlockQ8K], bpr: usize, t0: usize, t1: usize) {
    // SAFETY: see `scratch`.
    let s = unsafe { &mut *scratch() };
    let n = (t1 - t0) * bpr;
    grow(&mut s.da, n);
    grow(&mut s.corr, 4 * n);
    let mut pairs = [0i32; 8];
    for (i, blk) in a[t0 * bpr..t1 * bpr].iter().enumerate() {
        s.da[i] = blk.d;
        BlockQ4K::act_pairs(blk, &mut pairs);
        s.corr[4 * i..4 * i + 4].copy_from_slice(&pairs[..4]);
    }
}

/// `W[r] . A[t]` for every row of the whole groups `w` (`bpr` 256-blocks a row) and every token of `a`: with
/// `AMX`, the tokens `amx::tokens_on_tiles` picks on the tile unit, the rest on the row lanes.
#[inline(always)]
pub(crate) unsafe fn gemm_interleaved_q4_k<const AMX: bool>(
    w: &[u8],
    a: &[BlockQ8K],
    bpr: usize,
    out: &mut ProductOut,
) {
    let mut src = InterleavedQ4K::new(w, bpr);
    let n = a.len() / bpr;
    crate::kernels::check_shape(out, src.tiles() * 16, n);
    if n == 0 || src.tiles() == 0 {
        return;
    }
    let on_tiles = if AMX {
        super::amx::tokens_on_tiles(n)
    } else {
        0
    };
    // SAFETY: the set's features are present (and with AMX, the tile state was granted).
    unsafe {
        if on_tiles > 0 {
            super::amx::gemm_k_tiles(&mut src, a, bpr, on_tiles, out);
        }
        let mut t0 = on_tiles;
        while t0 < n {
            let t1 = (t0 + CHUNK_TOKENS).min(n);
            prepare_tokens(a, bpr, t0, t1);
            for g in 0..src.tiles() {
                let mut t = t0;
                while t < t1 {
                    let tt = (t1 - t).min(PASS_TOKENS);
                    match tt {
                        8 => tile::<8>(&src, g, a, t, t - t0, out),
                        7 => tile::<7>(&src, g, a, t, t - t0, out),
                        6 => tile::<6>(&src, g, a, t, t - t0, out),
                        5 => tile::<5>(&src, g, a, t, t - t0, out),
                        4 => tile::<4>(&src, g, a, t, t - t0, out),
                        3 => tile::<3>(&src, g, a, t, t - t0, out),
                        2 => tile::<2>(&src, g, a, t, t - t0, out),
                        _ => tile::<1>(&src, g, a, t, t - t0, out),
                    }
                    t += tt;
                }
            }
            t0 = t1;
        }
    }
}

/// `acc +` the dots of `w[k]` with dword `k` at `q` broadcast, for each `k` in turn. (A function, not a closure:
/// closures are compiled without the caller's target features.)
#[inline(always)]
unsafe fn dots(w: &[__m512i; 8], q: *const i32) -> __m512i {
    // SAFETY: the caller's `q` has 8 dwords; the caller's features.
    unsafe {
        // Two chains of four: one token leaves little else to overlap with the dots' latency.
        let mut lo = _mm512_setzero_si512();
        let mut hi = _mm512_setzero_si512();
        for k in 0..4 {
            lo = _mm512_dpbusd_epi32(lo, w[k], _mm512_set1_epi32(q.add(k).read_unaligned()));
            hi = _mm512_dpbusd_epi32(
                hi,
                w[k + 4],
                _mm512_set1_epi32(q.add(k + 4).read_unaligned()),
            );
        }
        _mm512_add_epi32(lo, hi)
    }
}

/// Rows `16g..16g + 16` x tokens `t..t + TT` (`ti = t - t0`: the first token's place in the prepared chunk).
#[inline(always)]
unsafe fn tile<const TT: usize>(
    src: &InterleavedQ4K,
    g: usize,
    a: &[BlockQ8K],
    t: usize,
    ti: usize,
    out: &mut ProductOut,
) {
    let bpr = src.bpr;
    assert!((t + TT) * bpr <= a.len());
    // SAFETY: see `scratch`; `prepare_tokens` covered tokens t0..t0 + ti + TT.
    let s = unsafe { &*scratch() };
    let (da, pairs) = (
        &s.da[ti * bpr..(ti + TT) * bpr],
        &s.corr[4 * ti * bpr..4 * (ti + TT) * bpr],
    );
    // SAFETY: the set's features are present; every activation block indexed is block b < bpr of tokens
    // t..t + TT (checked above); the tile's 16 rows are inside the output (the caller checked its shape).
    unsafe {
        let ap = a.as_ptr().add(t * bpr);
        let mut acc = [_mm512_setzero_ps(); TT];
        let mut sc = [_mm512_setzero_si512(); 16];
        let nibble = _mm512_set1_epi8(0x0f);
        for b in 0..bpr {
            let at = src.block(g, b);
            InterleavedQ4K::prefetch(at);
            let [d, neg_dmin] = lane_scales(at, &mut sc);
            let mut isum = [_mm512_setzero_si512(); TT];
            for c in 0..4 {
                let mut lo = [_mm512_setzero_si512(); 8];
                let mut hi = [_mm512_setzero_si512(); 8];
                for k in 0..8 {
                    let raw = run(at, c, k);
                    lo[k] = _mm512_and_si512(raw, nibble);
                    hi[k] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nibble);
                }
                for (j, isum_j) in isum.iter_mut().enumerate() {
                    // Group 2c is activation dwords 16c..16c + 8, group 2c + 1 the next 8.
                    let q = (*ap.add(j * bpr + b)).qs.as_ptr().add(64 * c) as *const i32;
                    let even = _mm512_mullo_epi32(dots(&lo, q), sc[2 * c]);
                    let odd = _mm512_mullo_epi32(dots(&hi, q.add(8)), sc[2 * c + 1]);
                    *isum_j = _mm512_add_epi32(*isum_j, _mm512_add_epi32(even, odd));
                }
            }
            // The mins as word pairs (min 2p, min 2p + 1) per lane, against each token's pairs of group sums.
            let mins: [__m512i; 4] = [
                _mm512_or_si512(sc[8], _mm512_slli_epi32::<16>(sc[9])),
                _mm512_or_si512(sc[10], _mm512_slli_epi32::<16>(sc[11])),
                _mm512_or_si512(sc[12], _mm512_slli_epi32::<16>(sc[13])),
                _mm512_or_si512(sc[14], _mm512_slli_epi32::<16>(sc[15])),
            ];
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let i = j * bpr + b;
                let p = pairs.as_ptr().add(4 * i);
                let mut m = _mm512_setzero_si512();
                for (k, &mk) in mins.iter().enumerate() {
                    m = _mm512_dpwssd_epi32(m, mk, _mm512_set1_epi32(*p.add(k)));
                }
                let da = _mm512_set1_ps(*da.get_unchecked(i));
                let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[j]), _mm512_mul_ps(da, d), *acc_j);
                *acc_j = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), _mm512_mul_ps(da, neg_dmin), v);
            }
        }
        for (j, &acc_j) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add((t + j) * out.stride() + 16 * g), acc_j);
        }
    }
}
