//! AVX-512 VNNI's Q4_K and Q6_K products over rows interleaved in groups of 16 (`kernels::q4_k::interleave`,
//! `kernels::q6_k::interleave`), one lane per row, for any number of tokens; and the same groups as the tile
//! unit's source (`amx::KTiles`).
//!
//! Rows as they lie (`avx512/kquant.rs`) are 16 streams a row apart, and each row's block is unpacked on its own
//! and its lanes summed per token. Interleaved, a group's block is one sequential run of 2304 bytes that the
//! hardware prefetchers follow: 32 loads give the quants as the 64 dword vectors a lane-per-row dot wants (a
//! run's low nibbles are one group's dword, its high nibbles the next group's), the headers give every lane's
//! scales with a few vector shifts and byte shuffles, and each token then costs 64 `vpdpbusd` against its own
//! activation dwords broadcast, 8 `vpmulld` by the group scales, 4 `vpdpwssd` for the mins against its `bsums`
//! pairs, and the lane kernel's two float steps. Q6_K the same way, with 16 groups of 16, each weight's two high
//! bits from the `qh` runs, and the `-32` offset as 8 `vpdpwssd` of the scales against the `bsums`. Measured
//! (`cargo bench --bench kernels -- probe FORMAT 512 N 1024 ITERS`, one thread, L2-resident, G weights/s, as they
//! lie / interleaved):
//! Q4_K 41 / 62-68 at 1 token, 43 / 140 at 4; Q6_K 36-37 / 40 at 1, 34 / 78-95 at 4.
//!
//! At one token the products wait on memory, and two things made the stream faster. The software prefetches
//! (`AHEAD` bytes ahead, into L2) are issued a few lines at a time between a block's loads, not as one burst of
//! 37 (Q4_K) or 53 (Q6_K) lines per block, which stalled on full fill buffers: `probe q4_ki 131072 1 131072`
//! (75 MB, one thread, from DRAM) 11.3 -> 15.7 GB/s, Q4_K_M tg128 74.0-75.3 -> 80.7-82.3 tok/s (alternating).
//! And Q4_K's high nibbles are dotted in place as `raw & 0xf0` (16 times the nibble; the sum is shifted back
//! once per token), its scales unpacked by byte shuffles: fewer instructions on port 0, where every `vpdpbusd`
//! runs (`probe q4_ki 1024 1 1024`, L2-resident: 70 -> 80 G weights/s).
//!
//! Batch invariance: each lane ends a block with the row's exact integer dot and `bsums` term, the integers
//! every other kernel of the format builds, and takes the lane kernel's float steps (Q4_K `acc = fma(cvt(isum),
//! da * d, acc)`, then `acc = fma(cvt(m), da * -dmin, acc)`; Q6_K `acc = fma(cvt(isum - 32 m), da * d, acc)`),
//! block by block in order: the same bits as rows as they lie, on the lanes or on the tile unit.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use quarry_quantize::blocks::{BlockQ4K, BlockQ6K, BlockQ8K};

use super::amx::{KDigits, KTiles};
use super::kquant::KFormat;
use super::{grow, request_lines, scratch};
use crate::kernels::ProductOut;
use crate::kernels::stream::StreamEnd;
use crate::kernels::{q4_k, q6_k};

/// A k-quant's interleaved group block, as the row lanes and the tile unit read it.
pub(super) trait KGroups {
    type W: KDigits;
    /// Bytes of one block of a group (16 rows' blocks).
    const BLOCK_BYTES: usize;
    /// The integer scales of the block at `at` (block `b` of its group's row of blocks) and its float scales,
    /// one lane per row, as [`KDigits::lane_scales`] gives them.
    unsafe fn lane_scales(at: *const u8, b: usize, sc: &mut [__m512i; 16]) -> [__m512; 2];
    /// Dwords `4 chunk..4 chunk + 4` of the block's unsigned quants (in weight order), all 16 rows.
    unsafe fn dwords(at: *const u8, b: usize, chunk: usize) -> [__m512i; 4];
    /// The block at `at` against `TT` tokens (`ap`: the first token's block, the others `bpr` apart; `da` their
    /// scales, `pairs` their `KFormat::act_pairs`, 8 dwords each), accumulated into `acc` with the lane kernel's
    /// float steps; requesting its share of `stream` ahead.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const TT: usize>(
        stream: &StreamEnd,
        at: *const u8,
        b: usize,
        ap: *const BlockQ8K,
        bpr: usize,
        da: &[f32],
        pairs: &[i32],
        acc: &mut [__m512; TT],
    );
}

/// Rows interleaved in groups of 16 of format `F`, `bpr` 256-blocks each.
pub(super) struct InterleavedK<'a, F> {
    w: &'a [u8],
    bpr: usize,
    stream: StreamEnd,
    /// The block `KTiles::prepare` made current, and its index in its group's row of blocks.
    at: *const u8,
    b: usize,
    _format: PhantomData<F>,
}

impl<'a, F: KGroups> InterleavedK<'a, F> {
    pub(super) fn new(w: &'a [u8], bpr: usize) -> InterleavedK<'a, F> {
        assert!(bpr > 0 && w.len().is_multiple_of(bpr * F::BLOCK_BYTES));
        InterleavedK {
            w,
            bpr,
            stream: StreamEnd::of(w),
            at: w.as_ptr(),
            b: 0,
            _format: PhantomData,
        }
    }

    fn tiles(&self) -> usize {
        self.w.len() / (self.bpr * F::BLOCK_BYTES)
    }

    /// Block `b` of group `g`.
    fn block(&self, g: usize, b: usize) -> *const u8 {
        assert!(g < self.tiles() && b < self.bpr);
        self.w[(g * self.bpr + b) * F::BLOCK_BYTES..].as_ptr()
    }

    /// Bytes the stream is requested ahead of its use, into L2 (`row_lanes::Interleaved`'s distance).
    const AHEAD: usize = 16384;
}

/// Requests part `part` of `parts` of `stream` `AHEAD` bytes past block `at` (one block's worth of lines, and
/// one more; `parts` 1 is all of them): the row lanes spread a block's requests over its work, where one burst of
/// 37 or 53 would wait on full fill buffers (the attention's KV prefetches measured the same).
#[inline(always)]
fn prefetch_part<F: KGroups>(stream: &StreamEnd, at: *const u8, part: usize, parts: usize) {
    let lines = F::BLOCK_BYTES / 64 + 1;
    let p = (at as usize).wrapping_add(InterleavedK::<F>::AHEAD);
    request_lines(stream, p, part * lines / parts..(part + 1) * lines / parts);
}

impl<F: KGroups> KTiles for InterleavedK<'_, F> {
    type W = F::W;
    const PERMUTED: bool = false;
    #[inline(always)]
    fn tiles(&self) -> usize {
        InterleavedK::tiles(self)
    }
    #[inline(always)]
    unsafe fn prepare(&mut self, g: usize, b: usize, sc: &mut [__m512i; 16]) -> [__m512; 2] {
        (self.at, self.b) = (self.block(g, b), b);
        // SAFETY: `at` is a whole group block; the caller's features.
        unsafe {
            prefetch_part::<F>(&self.stream, self.at, 0, 1);
            F::lane_scales(self.at, b, sc)
        }
    }
    #[inline(always)]
    unsafe fn dwords(&self, chunk: usize) -> [__m512i; 4] {
        // SAFETY: `at` is the current whole group block; the caller's features.
        unsafe { F::dwords(self.at, self.b, chunk) }
    }
}

/// Run `j` (64 bytes: dword `j` of a field of the 16 rows) at `at`.
#[inline(always)]
unsafe fn run(at: *const u8, j: usize) -> __m512i {
    // SAFETY: the caller's `at + 64 j` starts a whole run.
    unsafe { _mm512_loadu_si512(at.add(64 * j) as *const _) }
}

/// Byte `k` (0..4) of every dword of `v`, zero-extended to the dword: one shuffle (port 5, beside the dots'
/// port 0, where a shift and a mask would take port 0).
#[inline(always)]
unsafe fn byte_of(v: __m512i, k: usize) -> __m512i {
    let k = k as i32;
    // SAFETY: the caller's features.
    unsafe {
        let at = |j: i32| 0x8080_8000u32 as i32 | (4 * j + k);
        _mm512_shuffle_epi8(v, _mm512_set4_epi32(at(3), at(2), at(1), at(0)))
    }
}

/// The dots of the 4 dwords `w` with the 4 activation dwords at `q` broadcast, from zero. (A function, not a
/// closure: closures are compiled without the caller's target features.)
#[inline(always)]
unsafe fn dots4(w: &[__m512i], q: *const i32) -> __m512i {
    // SAFETY: the caller's `q` has 4 dwords; the caller's features.
    unsafe {
        let mut acc = _mm512_setzero_si512();
        for (k, &wk) in w.iter().enumerate() {
            acc = _mm512_dpbusd_epi32(acc, wk, _mm512_set1_epi32(q.add(k).read_unaligned()));
        }
        acc
    }
}

/// `sum_k pairs[k] . words[k]`: each lane's word pairs against the token's pair `k` broadcast.
#[inline(always)]
unsafe fn pair_dots(words: &[__m512i], pairs: *const i32) -> __m512i {
    // SAFETY: the caller's `pairs` has a dword for each of `words`; the caller's features.
    unsafe {
        let mut m = _mm512_setzero_si512();
        for (k, &wk) in words.iter().enumerate() {
            m = _mm512_dpwssd_epi32(m, wk, _mm512_set1_epi32(*pairs.add(k)));
        }
        m
    }
}

/// The Q4_K group block's 6-bit scales and mins as 4 dword vectors, one lane per row: bytes 0..4 of `[0]` are
/// scales 0..4, of `[1]` scales 4..8, of `[2]` mins 0..4, of `[3]` mins 4..8 (`q4k_scales_mins` on the three
/// packed dwords of every row at once).
#[inline(always)]
unsafe fn q4k_scale_words(at: *const u8) -> [__m512i; 4] {
    // SAFETY: the caller's `at` is a whole group block; the caller's features.
    unsafe {
        let scales = at.add(q4_k::SCALES_AT);
        let (lo, mid, hi) = (run(scales, 0), run(scales, 1), run(scales, 2));
        let (six, four, top) = (
            _mm512_set1_epi32(0x3f3f_3f3f),
            _mm512_set1_epi32(0x0f0f_0f0f),
            _mm512_set1_epi32(0x3030_3030),
        );
        [
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
        ]
    }
}

/// The Q4_K group block's `[d, -dmin]`, one lane per row (`-dmin` by its sign bit, as the lane kernel negates
/// it).
#[inline(always)]
unsafe fn q4k_d_neg_dmin(at: *const u8) -> [__m512; 2] {
    // SAFETY: the caller's `at` is a whole group block; the caller's features.
    unsafe {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(at.add(q4_k::D_AT) as *const __m256i));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(at.add(q4_k::DMIN_AT) as *const __m256i));
        let sign = _mm512_set1_epi32(i32::MIN);
        [
            d,
            _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(dmin), sign)),
        ]
    }
}

/// Bytes `k` and `k + 1` (k even) of every dword of `v`, zero-extended to the dword's two words: one shuffle.
#[inline(always)]
unsafe fn byte_pair_of(v: __m512i, k: usize) -> __m512i {
    let k = k as i32;
    // Within each 128-bit lane, dword `j`'s bytes are `4j..4j + 4`; index 0x80 writes a zero.
    // SAFETY: the caller's features.
    unsafe {
        let at = |j: i32| 0x8000_8000u32 as i32 | ((4 * j + k + 1) << 16) | (4 * j + k);
        _mm512_shuffle_epi8(v, _mm512_set4_epi32(at(3), at(2), at(1), at(0)))
    }
}

/// Q4_K (`kernels::q4_k::interleave`): run `8c + k` of the quants holds group `2c`'s dword `k` in its low
/// nibbles and group `2c + 1`'s in its high nibbles.
pub(super) struct Q4KGroups;

impl KGroups for Q4KGroups {
    type W = BlockQ4K;
    const BLOCK_BYTES: usize = q4_k::GROUP_BLOCK_BYTES;

    /// The 6-bit scales (`sc[g]`) and mins (`sc[8 + g]`), and `[d, -dmin]`.
    #[inline(always)]
    unsafe fn lane_scales(at: *const u8, _b: usize, sc: &mut [__m512i; 16]) -> [__m512; 2] {
        // SAFETY: the set's features are present; `at` is a whole group block.
        unsafe {
            let words = q4k_scale_words(at);
            for (i, &w) in words.iter().enumerate() {
                for k in 0..4 {
                    sc[4 * i + k] = byte_of(w, k);
                }
            }
            q4k_d_neg_dmin(at)
        }
    }

    #[inline(always)]
    unsafe fn dwords(at: *const u8, _b: usize, chunk: usize) -> [__m512i; 4] {
        // Chunk `chunk` is dwords 4 chunk..4 chunk + 4: group g = chunk / 2, the low (even g) or high nibbles of
        // runs 4 (chunk % 2).. of its pair of groups.
        let (g, k0) = (chunk / 2, 4 * (chunk % 2));
        // SAFETY: `at` is a whole group block; the caller's features.
        unsafe {
            let m = _mm512_set1_epi8(0x0f);
            let mut out = [_mm512_setzero_si512(); 4];
            for (k, o) in out.iter_mut().enumerate() {
                let raw = run(at, 8 * (g / 2) + k0 + k);
                *o = if g % 2 == 0 {
                    _mm512_and_si512(raw, m)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m)
                };
            }
            out
        }
    }

    #[inline(always)]
    unsafe fn block<const TT: usize>(
        stream: &StreamEnd,
        at: *const u8,
        _b: usize,
        ap: *const BlockQ8K,
        bpr: usize,
        da: &[f32],
        pairs: &[i32],
        acc: &mut [__m512; TT],
    ) {
        // SAFETY: `at` is a whole group block, `ap` TT tokens' blocks `bpr` apart, `da` and `pairs` theirs (the
        // caller's promises); the set's features are present.
        unsafe {
            let words = q4k_scale_words(at);
            let [d, neg_dmin] = q4k_d_neg_dmin(at);
            // The high nibbles are dotted in place, as 16 times the nibble (`raw & 0xf0`: no shift, which would
            // take the port the dots need), so the even groups' scales are taken 16 times too and each token's
            // sum is `16 isum`, shifted back exactly at the end (|16 isum| <= 16 * 8 * 32 * 15 * 128 * 63 <
            // 2^29).
            // (Loops, not `array::from_fn`: closures are compiled without the caller's target features.)
            let mut sc = [_mm512_setzero_si512(); 8];
            for (g, scg) in sc.iter_mut().enumerate() {
                *scg = byte_of(words[g / 4], g % 4);
                if g % 2 == 0 {
                    *scg = _mm512_slli_epi32::<4>(*scg);
                }
            }
            let (low, high) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0xf0u8 as i8));
            let mut isum16 = [_mm512_setzero_si512(); TT];
            for c in 0..4 {
                prefetch_part::<Self>(stream, at, c, 4);
                let mut lo = [_mm512_setzero_si512(); 8];
                let mut hi = [_mm512_setzero_si512(); 8];
                for k in 0..8 {
                    let raw = run(at, 8 * c + k);
                    lo[k] = _mm512_and_si512(raw, low);
                    hi[k] = _mm512_and_si512(raw, high);
                }
                for (j, isum_j) in isum16.iter_mut().enumerate() {
                    // Group 2c is activation dwords 16c..16c + 8, group 2c + 1 the next 8 (two chains of four
                    // each: one token leaves little else to overlap with the dots' latency).
                    let q = (*ap.add(j * bpr)).qs.as_ptr().add(64 * c) as *const i32;
                    let even = _mm512_add_epi32(dots4(&lo[..4], q), dots4(&lo[4..], q.add(4)));
                    let odd16 =
                        _mm512_add_epi32(dots4(&hi[..4], q.add(8)), dots4(&hi[4..], q.add(12)));
                    let even = _mm512_mullo_epi32(even, sc[2 * c]);
                    let odd = _mm512_mullo_epi32(odd16, sc[2 * c + 1]);
                    *isum_j = _mm512_add_epi32(*isum_j, _mm512_add_epi32(even, odd));
                }
            }
            // The mins as word pairs (min 2p, min 2p + 1) per lane, against each token's pairs of group sums.
            let mut mins = [_mm512_setzero_si512(); 4];
            for (p, mp) in mins.iter_mut().enumerate() {
                *mp = byte_pair_of(words[2 + p / 2], 2 * (p % 2));
            }
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let m = pair_dots(&mins, pairs.as_ptr().add(8 * j));
                let isum = _mm512_srai_epi32::<4>(isum16[j]);
                let da = _mm512_set1_ps(da[j]);
                let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(da, d), *acc_j);
                *acc_j = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), _mm512_mul_ps(da, neg_dmin), v);
            }
        }
    }
}

/// Q6_K (`kernels::q6_k::interleave`): weight dword `w` (weights `4w..4w + 4`, group `w / 4`) of half `n = w /
/// 32`, quarter `p = w % 32 / 8`, dword `l = w % 8` of the quarter, is the low (p < 2) or high nibbles of `ql`
/// dword `16n + 8 (p % 2) + l` and bits `2p..2p + 2` of `qh` dword `8n + l` (runs placed by `q6_k::ql_run`).
pub(super) struct Q6KGroups;

/// Dword `l` (0..8) of the four quarters of half `n` of the Q6_K group block whose runs start at `runs` (weight
/// dwords `32n + 8p + l`, p = 0..4), all 16 rows: quants 0..=63. They share two `ql` runs and one `qh` run.
#[inline(always)]
unsafe fn q6k_quarters(runs: *const u8, n: usize, l: usize) -> [__m512i; 4] {
    // SAFETY: `runs` starts a whole block's runs; the caller's features.
    unsafe {
        let (a, b) = (
            run(runs, q6_k::ql_run(16 * n + l)),
            run(runs, q6_k::ql_run(16 * n + 8 + l)),
        );
        let qh = run(runs, q6_k::qh_run(8 * n + l));
        // Quarter p: the low (p < 2) or high nibbles of `a` (even p) or `b` (odd p), and bits 2p..2p + 2 of
        // each qh byte moved to bits 4..6.
        [
            q6k_quant(a, _mm512_slli_epi16::<4>(qh)),
            q6k_quant(b, _mm512_slli_epi16::<2>(qh)),
            q6k_quant(_mm512_srli_epi16::<4>(a), qh),
            q6k_quant(_mm512_srli_epi16::<4>(b), _mm512_srli_epi16::<2>(qh)),
        ]
    }
}

/// The low nibble of each byte of `nibbles` with bits 4..6 of `high`. (A function, not a closure: closures are
/// compiled without the caller's target features.)
#[inline(always)]
unsafe fn q6k_quant(nibbles: __m512i, high: __m512i) -> __m512i {
    // SAFETY: the caller's features.
    unsafe {
        _mm512_or_si512(
            _mm512_and_si512(nibbles, _mm512_set1_epi8(0x0f)),
            _mm512_and_si512(high, _mm512_set1_epi8(0x30)),
        )
    }
}

impl Q6KGroups {
    /// The 16 signed scales of the block whose scale runs start at `scales`, one dword per lane each.
    #[inline(always)]
    unsafe fn signed_scales(scales: *const u8) -> [__m512i; 16] {
        // SAFETY: `at` is a whole group block; the caller's features.
        unsafe {
            let mut sc = [_mm512_setzero_si512(); 16];
            for (g, scg) in sc.iter_mut().enumerate() {
                let v = run(scales, g / 4);
                let shifted = _mm512_sll_epi32(v, _mm_cvtsi32_si128(8 * (3 - g % 4) as i32));
                *scg = _mm512_srai_epi32::<24>(shifted);
            }
            sc
        }
    }

    /// The scales as word pairs (scale 2k, scale 2k + 1) per lane, sign-extended, for `vpdpwssd`: each pair
    /// shuffled to the top bytes of its words and shifted down with its sign.
    #[inline(always)]
    unsafe fn scale_pairs(scales: *const u8) -> [__m512i; 8] {
        // SAFETY: `scales` is a whole group block's scales; the caller's features.
        unsafe {
            let mut words = [_mm512_setzero_si512(); 8];
            for (k, wk) in words.iter_mut().enumerate() {
                let i = 2 * (k % 2) as i32;
                let tops = |j: i32| (4 * j + i + 1) << 24 | 0x80 << 16 | (4 * j + i) << 8 | 0x80;
                let v = _mm512_shuffle_epi8(
                    run(scales, k / 2),
                    _mm512_set4_epi32(tops(3), tops(2), tops(1), tops(0)),
                );
                *wk = _mm512_srai_epi16::<8>(v);
            }
            words
        }
    }

    /// The 16 `d` of block `b` at `at`.
    #[inline(always)]
    unsafe fn d(at: *const u8, b: usize) -> __m512 {
        // SAFETY: `at` is a whole group block; the caller's features.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(at.add(q6_k::d_at(b)) as *const __m256i)) }
    }
}

impl KGroups for Q6KGroups {
    type W = BlockQ6K;
    const BLOCK_BYTES: usize = q6_k::GROUP_BLOCK_BYTES;

    /// The scales plus 128 (`sc[g]`) and `[d, 0]`.
    #[inline(always)]
    unsafe fn lane_scales(at: *const u8, b: usize, sc: &mut [__m512i; 16]) -> [__m512; 2] {
        // SAFETY: the caller's promises, passed on.
        unsafe {
            let signed = Self::signed_scales(at.add(q6_k::scales_at(b)));
            for (scg, &s) in sc.iter_mut().zip(&signed) {
                *scg = _mm512_add_epi32(s, _mm512_set1_epi32(128));
            }
            [Self::d(at, b), _mm512_setzero_ps()]
        }
    }

    #[inline(always)]
    unsafe fn dwords(at: *const u8, b: usize, chunk: usize) -> [__m512i; 4] {
        // SAFETY: the caller's promises, passed on.
        unsafe {
            let runs = at.add(q6_k::runs_at(b));
            // Chunk `chunk` is group `chunk`: dwords 4 chunk..4 chunk + 4, quarter p = chunk % 8 / 2 of half
            // n = chunk / 8, l from 4 (chunk % 2).
            let (n, p, l0) = (chunk / 8, chunk % 8 / 2, 4 * (chunk % 2));
            let mut out = [_mm512_setzero_si512(); 4];
            for (k, o) in out.iter_mut().enumerate() {
                *o = q6k_quarters(runs, n, l0 + k)[p];
            }
            out
        }
    }

    #[inline(always)]
    unsafe fn block<const TT: usize>(
        stream: &StreamEnd,
        at: *const u8,
        b: usize,
        ap: *const BlockQ8K,
        bpr: usize,
        da: &[f32],
        pairs: &[i32],
        acc: &mut [__m512; TT],
    ) {
        // SAFETY: as `Q4KGroups::block`.
        unsafe {
            let runs = at.add(q6_k::runs_at(b));
            let sc = Self::signed_scales(at.add(q6_k::scales_at(b)));
            let mut isum = [_mm512_setzero_si512(); TT];
            // A quarter-half at a time: dwords l = 4 lh..4 lh + 4 of the four quarters of half n, which share
            // their `ql` and `qh` runs (groups 8n + 2p + lh, p = 0..4).
            for n in 0..2 {
                for lh in 0..2 {
                    let mut w = [[_mm512_setzero_si512(); 4]; 4];
                    for li in 0..4 {
                        prefetch_part::<Self>(stream, at, 8 * n + 4 * lh + li, 16);
                        let quarters = q6k_quarters(runs, n, 4 * lh + li);
                        for (wp, &quarter) in w.iter_mut().zip(&quarters) {
                            wp[li] = quarter;
                        }
                    }
                    for (j, isum_j) in isum.iter_mut().enumerate() {
                        let q = (*ap.add(j * bpr)).qs.as_ptr() as *const i32;
                        for (p, wp) in w.iter().enumerate() {
                            let g = 8 * n + 2 * p + lh;
                            let dot = _mm512_mullo_epi32(dots4(wp, q.add(4 * g)), sc[g]);
                            *isum_j = _mm512_add_epi32(*isum_j, dot);
                        }
                    }
                }
            }
            // Read after the runs: in even blocks `d` is the block's last bytes.
            let d = Self::d(at, b);
            // The scales as word pairs (scale 2k, scale 2k + 1) per lane, against each token's `bsums` pairs:
            // `m = sum(scale_g * bsum_g)`, the `-32` offset's factor.
            let words = Self::scale_pairs(at.add(q6_k::scales_at(b)));
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let m = pair_dots(&words, pairs.as_ptr().add(8 * j));
                let isum = _mm512_sub_epi32(isum[j], _mm512_slli_epi32::<5>(m));
                let da = _mm512_set1_ps(da[j]);
                *acc_j = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(da, d), *acc_j);
            }
        }
    }
}

/// Tokens per chunk of `prepare_tokens`: what `reserve_scratch` sizes (`da` one per token and block, `corr`
/// `KFormat::PAIRS`).
const CHUNK_TOKENS: usize = 64;

/// Most tokens per pass over a group: one accumulator and one integer sum per token beside a chunk's weight
/// vectors.
const PASS_TOKENS: usize = 8;

/// Each token's activation scales (`s.da`, per block) and `bsums` pairs (`s.corr`, `PAIRS` dwords per block),
/// for tokens `t0..t1`, block-major per token.
fn prepare_tokens<W: KFormat>(a: &[BlockQ8K], bpr: usize, t0: usize, t1: usize) {
    // SAFETY: see `scratch`.
    let s = unsafe { &mut *scratch() };
    let n = (t1 - t0) * bpr;
    grow(&mut s.da, n);
    grow(&mut s.corr, W::PAIRS * n);
    let mut pairs = [0i32; 8];
    for (i, blk) in a[t0 * bpr..t1 * bpr].iter().enumerate() {
        s.da[i] = blk.d;
        W::act_pairs(blk, &mut pairs);
        s.corr[W::PAIRS * i..W::PAIRS * (i + 1)].copy_from_slice(&pairs[..W::PAIRS]);
    }
}

/// `W[r] . A[t]` for every row of the whole groups `w` (`bpr` 256-blocks a row) of format `F` and every token
/// of `a`: with `AMX`, the tokens `amx::tokens_on_tiles` picks on the tile unit, the rest on the row lanes.
#[inline(always)]
pub(crate) unsafe fn gemm_interleaved_k<F: KGroups, const AMX: bool>(
    w: &[u8],
    a: &[BlockQ8K],
    bpr: usize,
    out: &mut ProductOut,
) {
    let mut src = InterleavedK::<F>::new(w, bpr);
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
            prepare_tokens::<F::W>(a, bpr, t0, t1);
            for g in 0..src.tiles() {
                let mut t = t0;
                while t < t1 {
                    let tt = (t1 - t).min(PASS_TOKENS);
                    match tt {
                        8 => tile::<F, 8>(&src, g, a, t, t - t0, out),
                        7 => tile::<F, 7>(&src, g, a, t, t - t0, out),
                        6 => tile::<F, 6>(&src, g, a, t, t - t0, out),
                        5 => tile::<F, 5>(&src, g, a, t, t - t0, out),
                        4 => tile::<F, 4>(&src, g, a, t, t - t0, out),
                        3 => tile::<F, 3>(&src, g, a, t, t - t0, out),
                        2 => tile::<F, 2>(&src, g, a, t, t - t0, out),
                        _ => tile::<F, 1>(&src, g, a, t, t - t0, out),
                    }
                    t += tt;
                }
            }
            t0 = t1;
        }
    }
}

/// Rows `16g..16g + 16` x tokens `t..t + TT` (`ti = t - t0`: the first token's place in the prepared chunk).
#[inline(always)]
unsafe fn tile<F: KGroups, const TT: usize>(
    src: &InterleavedK<F>,
    g: usize,
    a: &[BlockQ8K],
    t: usize,
    ti: usize,
    out: &mut ProductOut,
) {
    let (bpr, pairs) = (src.bpr, <F::W as KFormat>::PAIRS);
    assert!((t + TT) * bpr <= a.len());
    // SAFETY: see `scratch`; `prepare_tokens` covered tokens t0..t0 + ti + TT.
    let s = unsafe { &*scratch() };
    let (da, corr) = (
        &s.da[ti * bpr..(ti + TT) * bpr],
        &s.corr[pairs * ti * bpr..pairs * (ti + TT) * bpr],
    );
    let mut da_b = [0.0f32; TT];
    let mut pairs_b = [[0i32; 8]; TT];
    // SAFETY: the set's features are present; every activation block indexed is block b < bpr of tokens
    // t..t + TT (checked above); the tile's 16 rows are inside the output (the caller checked its shape).
    unsafe {
        let mut acc = [_mm512_setzero_ps(); TT];
        for b in 0..bpr {
            let at = src.block(g, b);
            for j in 0..TT {
                da_b[j] = da[j * bpr + b];
                pairs_b[j][..pairs].copy_from_slice(&corr[pairs * (j * bpr + b)..][..pairs]);
            }
            F::block::<TT>(
                &src.stream,
                at,
                b,
                a.as_ptr().add(t * bpr + b),
                bpr,
                &da_b,
                pairs_b.as_flattened(),
                &mut acc,
            );
        }
        for (j, &acc_j) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add((t + j) * out.stride() + 16 * g), acc_j);
        }
    }
}
