//! AVX-512's 32-block products with one lane per weight row: Q4_0, IQ4_NL and Q8_0 rows as they lie in the file for a
//! few tokens (2 to 47), and rows interleaved at load for any number of tokens.
//!
//! The few-token kernel of `x86/mod.rs` spreads a block's 32 bytes over 8 lanes, so every (row, token, block)
//! needs a horizontal sum of its lanes before it can be scaled: per token that costs about as much as the byte
//! dot itself, and a product of 2 to 8 tokens (an expert's share of a batch of sequences) costs nearly that many
//! times one token's. Here 16 rows' blocks are transposed in registers once per block so that lane `i` of vector
//! `k` holds dword `k` of row `i`; each token then takes 8 `vpdpbusd` against its own activation dwords
//! broadcast, and every lane ends with its row's whole exact integer dot, scaled and accumulated as the lane
//! kernel does it (`fma(cvt(isum), da * dw, acc)`, block by block), so the results are the same bits as every
//! other shape's. For rows as they lie in the file the transpose costs a fixed ~4 instructions per row and
//! block, shared by all the tokens of the call.
//!
//! The 16 rows come out of the in-register 4 x 4 transposes permuted (lane `4L + m` holds row `4m + L`); scales
//! are gathered in that order and each token's 16 results are put back in row order once per tile.
//!
//! A model on this set stores its Q4_0 and Q8_0 matrices interleaved instead (`kernels::q4_0::interleave`,
//! `kernels::q8_0::interleave`, done once at load): a group's block is then 4 (Q4_0) or 8 (Q8_0) aligned loads of
//! exactly the vectors the transpose builds (in row order) and one load of its 16 scales, read as one sequential stream the hardware prefetchers follow, where the rows
//! as they lie are 16 interleaved streams that needed software prefetches a tile ahead. The same tile computes
//! both (`RowTiles`), with the same float steps, so the two layouts give the same bits. With the per-block
//! transpose gone the tile is cheaper than the lane kernel's for every token count, so interleaved matrices use
//! it for all of them (passes of up to 16 tokens).

use std::arch::x86_64::*;

use quarry_quantize::blocks::{BlockIQ4NL, BlockQ4_0, BlockQ8_0};

use crate::kernels::ProductOut;
use crate::kernels::iq4_xs::{GROUP_BLOCK_BYTES, SUB_BLOCKS};
use crate::kernels::stream::StreamEnd;

use super::{Scratch, f16_bits_to_f32, grow, request_lines, scratch, tile_shape};

/// A 32-block weight format as 16 rows' transposed unsigned dwords.
pub(crate) trait RowBlock: Copy {
    /// The activation correction: the integer dot is `dot(u, a) - BIAS * sum(a)`.
    const BIAS: i32;
    /// The 8 vectors of unsigned weight dwords of block `b` of the 16 rows starting at `w`, `stride` blocks apart
    /// (lane `4L + m`: row `4m + L`).
    unsafe fn transpose16(w: *const Self, stride: usize) -> [__m512i; 8];
}

/// Four rows' 16 bytes (`p`, `p + stride`, ...) as the four 128-bit lanes of one vector.
#[inline(always)]
unsafe fn rows4(p: *const u8, stride: usize) -> __m512i {
    unsafe {
        let z = _mm512_castsi128_si512(_mm_loadu_si128(p as *const __m128i));
        let z = _mm512_inserti32x4::<1>(z, _mm_loadu_si128(p.add(stride) as *const __m128i));
        let z = _mm512_inserti32x4::<2>(z, _mm_loadu_si128(p.add(2 * stride) as *const __m128i));
        _mm512_inserti32x4::<3>(z, _mm_loadu_si128(p.add(3 * stride) as *const __m128i))
    }
}

/// 16 rows' 16 bytes (row `r` at `p + r * stride`) as 4 vectors, vector `k` holding dword `k` of every row
/// (permuted as the module says). No closures: they would be compiled without the caller's features.
#[inline(always)]
pub(super) unsafe fn transpose_16x4(p: *const u8, stride: usize) -> [__m512i; 4] {
    unsafe {
        // Z_j's 128-bit lane L is row 4j + L.
        let a = rows4(p, stride);
        let b = rows4(p.add(4 * stride), stride);
        let c = rows4(p.add(8 * stride), stride);
        let d = rows4(p.add(12 * stride), stride);
        // A 4 x 4 dword transpose within each 128-bit lane: out_k lane L = [a, b, c, d][L][k].
        let ab_lo = _mm512_unpacklo_epi32(a, b);
        let ab_hi = _mm512_unpackhi_epi32(a, b);
        let cd_lo = _mm512_unpacklo_epi32(c, d);
        let cd_hi = _mm512_unpackhi_epi32(c, d);
        [
            _mm512_unpacklo_epi64(ab_lo, cd_lo),
            _mm512_unpackhi_epi64(ab_lo, cd_lo),
            _mm512_unpacklo_epi64(ab_hi, cd_hi),
            _mm512_unpackhi_epi64(ab_hi, cd_hi),
        ]
    }
}

/// The row of lane `p` (`4L + m` holds row `4m + L`).
pub(super) const fn lane_row(p: usize) -> usize {
    4 * (p % 4) + p / 4
}

impl RowBlock for BlockQ4_0 {
    const BIAS: i32 = 8;
    #[inline(always)]
    unsafe fn transpose16(w: *const BlockQ4_0, stride: usize) -> [__m512i; 8] {
        unsafe {
            let raw = transpose_16x4((*w).qs.as_ptr(), stride * size_of::<BlockQ4_0>());
            let m = _mm512_set1_epi8(0x0f);
            let mut out = [_mm512_setzero_si512(); 8];
            for k in 0..4 {
                // Low nibbles are weights 0..15 (dwords 0..3), high nibbles 16..31 (dwords 4..7).
                out[k] = _mm512_and_si512(raw[k], m);
                out[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw[k]), m);
            }
            out
        }
    }
}

/// Nibbles (0..15) looked up as IQ4's levels `+ 128` (`vpshufb` on a table in every 128-bit lane). (A loop, not
/// `array::map`: a closure is compiled without the caller's target features and would not be inlined.)
#[inline(always)]
unsafe fn levels(mut v: [__m512i; 8]) -> [__m512i; 8] {
    unsafe {
        let t = _mm512_broadcast_i32x4(_mm_loadu_si128(
            crate::kernels::iq4_nl::LEVELS_PLUS_128.as_ptr() as *const __m128i,
        ));
        for x in &mut v {
            *x = _mm512_shuffle_epi8(t, *x);
        }
        v
    }
}

impl RowBlock for BlockIQ4NL {
    const BIAS: i32 = 128;
    /// Q4_0's nibbles, each looked up as its level `+ 128`.
    #[inline(always)]
    unsafe fn transpose16(w: *const BlockIQ4NL, stride: usize) -> [__m512i; 8] {
        unsafe { levels(BlockQ4_0::transpose16(w as *const BlockQ4_0, stride)) }
    }
}

impl RowBlock for BlockQ8_0 {
    const BIAS: i32 = 128;
    #[inline(always)]
    unsafe fn transpose16(w: *const BlockQ8_0, stride: usize) -> [__m512i; 8] {
        unsafe {
            let q = (*w).qs.as_ptr() as *const u8;
            let bytes = stride * size_of::<BlockQ8_0>();
            let lo = transpose_16x4(q, bytes);
            let hi = transpose_16x4(q.add(16), bytes);
            let flip = _mm512_set1_epi8(-128);
            let mut out = [_mm512_setzero_si512(); 8];
            for k in 0..4 {
                // `w + 128` as unsigned bytes.
                out[k] = _mm512_xor_si512(lo[k], flip);
                out[k + 4] = _mm512_xor_si512(hi[k], flip);
            }
            out
        }
    }
}

/// The scales of 16 rows' blocks (`stride` blocks apart), in lane order.
#[inline(always)]
unsafe fn row_scales<W: super::Block32>(w: *const W, stride: usize) -> __m512 {
    unsafe {
        let mut bits = [0u16; 16];
        for (p, b) in bits.iter_mut().enumerate() {
            *b = (*w.add(lane_row(p) * stride)).d_bits();
        }
        _mm512_cvtph_ps(_mm256_loadu_si256(bits.as_ptr() as *const __m256i))
    }
}

/// Where a product's 16-row tiles come from, block by block.
pub(super) trait RowTiles {
    /// The activation correction: the integer dot is `dot(u, a) - BIAS * sum(a)`.
    const BIAS: i32;
    /// Whether lanes hold rows permuted (lane `4L + m`: row `4m + L`) rather than in order.
    const PERMUTED: bool;
    /// Tiles of 16 rows.
    fn tiles(&self) -> usize;
    /// Block `b` of tile `g`: 8 vectors of unsigned weight dwords (vector `k`: dword `k` of each row's block) and
    /// the 16 rows' scales, in lane order.
    unsafe fn block(&self, g: usize, b: usize) -> ([__m512i; 8], __m512);
    /// Requests what tile `g` reads after block `b`, far enough ahead to cover memory latency.
    unsafe fn prefetch(&self, g: usize, b: usize);
}

/// Rows as they lie in the file, 16 at a time: `bpr` blocks each.
struct Transposed<'a, W> {
    w: &'a [W],
    bpr: usize,
}

impl<W: RowBlock + super::Block32> RowTiles for Transposed<'_, W> {
    const BIAS: i32 = W::BIAS;
    const PERMUTED: bool = true;
    #[inline(always)]
    fn tiles(&self) -> usize {
        self.w.len() / (16 * self.bpr)
    }
    #[inline(always)]
    unsafe fn block(&self, g: usize, b: usize) -> ([__m512i; 8], __m512) {
        // SAFETY: block b of rows 16g..16g + 16 lies inside `w` (the caller's tiling).
        unsafe {
            let p = self.w.as_ptr().add(16 * g * self.bpr + b);
            (W::transpose16(p, self.bpr), row_scales(p, self.bpr))
        }
    }
    #[inline(always)]
    unsafe fn prefetch(&self, g: usize, b: usize) {
        // The 16 rows are one contiguous run of memory read in an interleaved order the hardware prefetchers do
        // not follow; the next tile's run is requested into L2 in step with this one's progress.
        let step = 16 * size_of::<W>();
        let next =
            (self.w.as_ptr() as *const i8).wrapping_add((g + 1) * 16 * self.bpr * size_of::<W>());
        let mut off = b * step;
        while off < (b + 1) * step {
            // SAFETY: a prefetch never faults; the address wraps rather than being dereferenced.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(off)) };
            off += 64;
        }
    }
}

/// A format's interleaved groups (`kernels::q4_0::interleave`, `kernels::q8_0::interleave`): per group, each
/// block's `QS_BYTES` of quants, then every block's 16 f16 scales.
pub(crate) trait Groups {
    /// The activation correction: the integer dot is `dot(u, a) - BIAS * sum(a)`.
    const BIAS: i32;
    /// Bytes of one block's quants of the 16 rows.
    const QS_BYTES: usize;
    /// The 8 vectors of unsigned weight dwords of the quants at `qs`.
    unsafe fn weights(qs: *const u8) -> [__m512i; 8];
}

/// Q4_0: 4 runs of 64 nibble bytes (low nibbles weights 0..15, high 16..31).
pub(crate) struct Q4_0Groups;

impl Groups for Q4_0Groups {
    const BIAS: i32 = 8;
    const QS_BYTES: usize = 256;
    #[inline(always)]
    unsafe fn weights(qs: *const u8) -> [__m512i; 8] {
        // SAFETY: the caller's `qs` holds 256 bytes.
        unsafe {
            let m = _mm512_set1_epi8(0x0f);
            let mut out = [_mm512_setzero_si512(); 8];
            for k in 0..4 {
                // Low nibbles are weights 0..15 (dwords 0..3 of the activation block), high nibbles 16..31.
                let raw = _mm512_loadu_si512(qs.add(64 * k) as *const _);
                out[k] = _mm512_and_si512(raw, m);
                out[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m);
            }
            out
        }
    }
}

/// IQ4_NL: Q4_0's runs, each nibble looked up as its level `+ 128`.
pub(crate) struct IQ4NLGroups;

impl Groups for IQ4NLGroups {
    const BIAS: i32 = 128;
    const QS_BYTES: usize = 256;
    #[inline(always)]
    unsafe fn weights(qs: *const u8) -> [__m512i; 8] {
        // SAFETY: the caller's `qs` holds 256 bytes.
        unsafe { levels(Q4_0Groups::weights(qs)) }
    }
}

/// Q8_0: 8 runs of 64 bytes, already offset by 128 to unsigned.
pub(crate) struct Q8_0Groups;

impl Groups for Q8_0Groups {
    const BIAS: i32 = 128;
    const QS_BYTES: usize = 512;
    #[inline(always)]
    unsafe fn weights(qs: *const u8) -> [__m512i; 8] {
        // SAFETY: the caller's `qs` holds 512 bytes.
        unsafe { std::array::from_fn(|k| _mm512_loadu_si512(qs.add(64 * k) as *const _)) }
    }
}

/// Rows interleaved in groups of 16 of format `G`, `bpr` blocks each.
struct Interleaved<'a, G> {
    w: &'a [u8],
    bpr: usize,
    /// Where the prefetches go past `w` (`kernels::stream`).
    stream: StreamEnd,
    _format: std::marker::PhantomData<G>,
}

impl<G: Groups> Interleaved<'_, G> {
    /// Bytes of one block of a group: its quants and its 16 scales.
    const BLOCK: usize = G::QS_BYTES + 32;

    /// Bytes the stream is requested ahead of its use, into L2. The hardware prefetchers follow the stream,
    /// but not far enough ahead to keep DRAM busy: alternating runs of `bench --parallel 1,8 -p 128 -n 128` on a
    /// Q4_0 model (tg tok/s at B=1 / B=8) measured none 65 / 138, 2 KiB into L1 78 / 177, 2 KiB into L2
    /// 75 / 170, 8 KiB 81 / 184, 16 KiB 83 / 189, 32 KiB 81 / 184.
    const AHEAD: usize = 16384;

    fn group_bytes(&self) -> usize {
        self.bpr * Self::BLOCK
    }
}

impl<G: Groups> RowTiles for Interleaved<'_, G> {
    const BIAS: i32 = G::BIAS;
    const PERMUTED: bool = false;
    #[inline(always)]
    fn tiles(&self) -> usize {
        self.w.len() / self.group_bytes()
    }
    #[inline(always)]
    unsafe fn block(&self, g: usize, b: usize) -> ([__m512i; 8], __m512) {
        // SAFETY: tile g < tiles() and block b < bpr: the block's quants at QS_BYTES b and its 32 scale bytes at
        // QS_BYTES bpr + 32 b of the group are inside `w`.
        unsafe {
            let group = self.w.as_ptr().add(g * self.group_bytes());
            let scales = group.add(G::QS_BYTES * self.bpr + 32 * b);
            (
                G::weights(group.add(G::QS_BYTES * b)),
                _mm512_cvtph_ps(_mm256_loadu_si256(scales as *const __m256i)),
            )
        }
    }
    #[inline(always)]
    unsafe fn prefetch(&self, g: usize, b: usize) {
        // The requests advance one block's share of the group (quants and scales, which sit at its end) a
        // block, so the whole group is covered: whole lines, and one more.
        let p = (self.w.as_ptr() as usize)
            .wrapping_add(g * self.group_bytes() + Self::BLOCK * b + Self::AHEAD);
        request_lines(&self.stream, p, 0..Self::BLOCK / 64 + 1);
    }
}

/// IQ4_XS rows interleaved in groups of 16 (`kernels::iq4_xs::interleave`); `bpr` counts sub-blocks (32
/// weights, one activation block each). A sub-block's 16 scales `d * (ls - 32)` are decoded from the group's
/// headers in registers: the same f32 products the scalar reference computes.
struct InterleavedIQ4XS<'a> {
    w: &'a [u8],
    bpr: usize,
    stream: StreamEnd,
}

impl InterleavedIQ4XS<'_> {
    /// Bytes of one sub-block's share of a group: its nibbles and an eighth of the super-block's headers.
    const SHARE: usize = GROUP_BLOCK_BYTES / SUB_BLOCKS;

    fn group_bytes(&self) -> usize {
        self.bpr / SUB_BLOCKS * GROUP_BLOCK_BYTES
    }
}

impl RowTiles for InterleavedIQ4XS<'_> {
    const BIAS: i32 = 128;
    const PERMUTED: bool = false;
    #[inline(always)]
    fn tiles(&self) -> usize {
        self.w.len() / self.group_bytes()
    }
    #[inline(always)]
    unsafe fn block(&self, g: usize, b: usize) -> ([__m512i; 8], __m512) {
        let (s, ib) = (b / SUB_BLOCKS, b % SUB_BLOCKS);
        // SAFETY: tile g < tiles() and sub-block b < bpr: super-block s of the group (its 8 x 256 bytes of
        // nibbles, then 32 bytes of d, 32 of scales_h and 64 of scales_l) is inside `w`.
        unsafe {
            let sb = self
                .w
                .as_ptr()
                .add(g * self.group_bytes() + s * GROUP_BLOCK_BYTES);
            let h = sb.add(SUB_BLOCKS * 256);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(h as *const __m256i));
            let high = _mm512_cvtepu16_epi32(_mm256_loadu_si256(h.add(32) as *const __m256i));
            let low = _mm512_loadu_si512(h.add(64) as *const _);
            let low = _mm512_and_si512(
                _mm512_srl_epi32(low, _mm_cvtsi32_si128(4 * ib as i32)),
                _mm512_set1_epi32(15),
            );
            let high = _mm512_and_si512(
                _mm512_srl_epi32(high, _mm_cvtsi32_si128(2 * ib as i32)),
                _mm512_set1_epi32(3),
            );
            let ls = _mm512_sub_epi32(
                _mm512_or_si512(low, _mm512_slli_epi32::<4>(high)),
                _mm512_set1_epi32(32),
            );
            (
                IQ4NLGroups::weights(sb.add(256 * ib)),
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(ls)),
            )
        }
    }
    #[inline(always)]
    unsafe fn prefetch(&self, g: usize, b: usize) {
        // As `Interleaved`: one sub-block's share of the stream a sub-block, `AHEAD` bytes ahead.
        let p = (self.w.as_ptr() as usize).wrapping_add(
            g * self.group_bytes() + Self::SHARE * b + Interleaved::<IQ4NLGroups>::AHEAD,
        );
        request_lines(&self.stream, p, 0..Self::SHARE / 64 + 1);
    }
}

/// Each token's activation scales and corrections `-bias * sum(a)` per block, for tokens `t0..t1`, into `s`.
#[inline(always)]
unsafe fn prepare_tokens(
    a: &[BlockQ8_0],
    bpr: usize,
    t0: usize,
    t1: usize,
    bias: i32,
    s: &mut Scratch,
) {
    let n = (t1 - t0) * bpr;
    grow(&mut s.da, n);
    grow(&mut s.corr, n);
    for (i, blk) in a[t0 * bpr..t1 * bpr].iter().enumerate() {
        // SAFETY: AVX-512 VNNI, AVX2 and F16C are present (this module's sets); the load reads the block's 32
        // quants.
        unsafe {
            s.da[i] = f16_bits_to_f32(blk.d.to_bits());
            // The block's sum: its bytes times ones, 8 dwords, then folded.
            let q = _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i);
            let d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), q);
            let x = _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256::<1>(d));
            let x = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
            let x = _mm_add_epi32(x, _mm_shuffle_epi32::<1>(x));
            s.corr[i] = -bias * _mm_cvtsi128_si32(x);
        }
    }
}

/// `W[r] . A[t]` for every row (a multiple of 16 of them) of rows as they lie in the file, and tokens `t0..t1`,
/// up to 16 tokens per pass over the weights.
#[inline(always)]
pub(crate) unsafe fn gemm_rows16<W: RowBlock + super::Block32>(
    w: &[W],
    a: &[BlockQ8_0],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    let (_, rows16) = tile_shape(w.len(), a.len(), bpr, t0, t1, out);
    assert!(rows16.is_multiple_of(16));
    // SAFETY: the set's features are present; prefetches never fault.
    unsafe {
        super::prefetch_head(w, 16 * bpr);
        gemm_tiles(&Transposed { w, bpr }, a, bpr, t0, t1, out);
    }
}

/// `W[r] . A[t]` for every row of a matrix interleaved in groups of format `G` (`w`: whole groups of 16 rows of
/// `bpr` blocks) and every token of `a`.
#[inline(always)]
pub(crate) unsafe fn gemm_interleaved<G: Groups, const AMX: bool>(
    w: &[u8],
    a: &[BlockQ8_0],
    bpr: usize,
    out: &mut ProductOut,
) {
    let src = Interleaved::<G> {
        w,
        bpr,
        stream: StreamEnd::of(w),
        _format: std::marker::PhantomData,
    };
    assert!(bpr > 0 && w.len().is_multiple_of(src.group_bytes()));
    let n = a.len() / bpr;
    crate::kernels::check_shape(out, src.tiles() * 16, n);
    // SAFETY: the set's features are present (and with AMX, the tile state was granted).
    unsafe { gemm_tiles_on::<_, AMX>(&src, a, bpr, n, out) };
}

/// `W[r] . A[t]` for every row of an IQ4_XS matrix interleaved in groups of 16 (`w`: whole groups of rows of
/// `bpr / 8` super-blocks) and every token of `a`.
#[inline(always)]
pub(crate) unsafe fn gemm_interleaved_iq4_xs<const AMX: bool>(
    w: &[u8],
    a: &[BlockQ8_0],
    bpr: usize,
    out: &mut ProductOut,
) {
    let src = InterleavedIQ4XS {
        w,
        bpr,
        stream: StreamEnd::of(w),
    };
    assert!(bpr > 0 && bpr.is_multiple_of(SUB_BLOCKS) && w.len().is_multiple_of(src.group_bytes()));
    let n = a.len() / bpr;
    crate::kernels::check_shape(out, src.tiles() * 16, n);
    // SAFETY: the set's features are present (and with AMX, the tile state was granted).
    unsafe { gemm_tiles_on::<_, AMX>(&src, a, bpr, n, out) };
}

/// Every tile of `src` x all `n` tokens: in a set with AMX, the tokens `amx::tokens_on_tiles` picks on the tile
/// unit and the rest on the row lanes. (The two give the same bits: see `amx`.)
#[inline(always)]
unsafe fn gemm_tiles_on<R: RowTiles, const AMX: bool>(
    src: &R,
    a: &[BlockQ8_0],
    bpr: usize,
    n: usize,
    out: &mut ProductOut,
) {
    let on_tiles = if AMX {
        super::amx::tokens_on_tiles(n)
    } else {
        0
    };
    // SAFETY: the caller's promises, passed on.
    unsafe {
        if on_tiles > 0 {
            super::amx::gemm_tiles(src, a, bpr, on_tiles, out);
        }
        if on_tiles < n {
            gemm_tiles(src, a, bpr, on_tiles, n, out);
        }
    }
}

/// Every tile of `src` x tokens `t0..t1`, in passes of up to 16 tokens. The caller checked the output's shape.
#[inline(always)]
unsafe fn gemm_tiles<R: RowTiles>(
    src: &R,
    a: &[BlockQ8_0],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    // SAFETY: see `scratch`.
    let s = unsafe { &mut *scratch() };
    // SAFETY: the set's features are present.
    unsafe { prepare_tokens(a, bpr, t0, t1, R::BIAS, s) };
    let n = (t1 - t0) * bpr;
    let (da, corr) = (&s.da[..n], &s.corr[..n]);
    for g in 0..src.tiles() {
        let mut t = t0;
        while t < t1 {
            // One pass of up to 16 tokens, each count its own tile: splitting 3 tokens into 2 + 1 would read (and
            // transpose) the rows twice. (16 accumulators, the 8 weight vectors and the scales fit AVX-512's 32
            // registers.)
            let tt = (t1 - t).min(16);
            // SAFETY: tile g < tiles() and tokens t..t + tt <= t1 exist; `da` and `corr` cover tokens t0..t1.
            unsafe {
                match tt {
                    16 => tile::<R, 16>(src, g, a, bpr, t, t - t0, da, corr, out),
                    15 => tile::<R, 15>(src, g, a, bpr, t, t - t0, da, corr, out),
                    14 => tile::<R, 14>(src, g, a, bpr, t, t - t0, da, corr, out),
                    13 => tile::<R, 13>(src, g, a, bpr, t, t - t0, da, corr, out),
                    12 => tile::<R, 12>(src, g, a, bpr, t, t - t0, da, corr, out),
                    11 => tile::<R, 11>(src, g, a, bpr, t, t - t0, da, corr, out),
                    10 => tile::<R, 10>(src, g, a, bpr, t, t - t0, da, corr, out),
                    9 => tile::<R, 9>(src, g, a, bpr, t, t - t0, da, corr, out),
                    8 => tile::<R, 8>(src, g, a, bpr, t, t - t0, da, corr, out),
                    7 => tile::<R, 7>(src, g, a, bpr, t, t - t0, da, corr, out),
                    6 => tile::<R, 6>(src, g, a, bpr, t, t - t0, da, corr, out),
                    5 => tile::<R, 5>(src, g, a, bpr, t, t - t0, da, corr, out),
                    4 => tile::<R, 4>(src, g, a, bpr, t, t - t0, da, corr, out),
                    3 => tile::<R, 3>(src, g, a, bpr, t, t - t0, da, corr, out),
                    2 => tile::<R, 2>(src, g, a, bpr, t, t - t0, da, corr, out),
                    _ => tile::<R, 1>(src, g, a, bpr, t, t - t0, da, corr, out),
                }
            }
            t += tt;
        }
    }
}

/// `acc +` the dots of `w[k]` with dword `k` at `q` broadcast, for each `k` in turn. (A function, not a closure:
/// closures are compiled without the caller's target features.)
#[inline(always)]
unsafe fn dots(acc: __m512i, w: &[__m512i], q: *const i32) -> __m512i {
    let mut acc = acc;
    for (k, &wk) in w.iter().enumerate() {
        // SAFETY: the caller's `q` has a dword for each of `w`.
        acc = unsafe { _mm512_dpbusd_epi32(acc, wk, _mm512_set1_epi32(q.add(k).read_unaligned())) };
    }
    acc
}

/// Rows `16g..16g + 16` x tokens `t..t + TT` (`ti = t - t0` indexes `da` and `corr`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<R: RowTiles, const TT: usize>(
    src: &R,
    g: usize,
    a: &[BlockQ8_0],
    bpr: usize,
    t: usize,
    ti: usize,
    da: &[f32],
    corr: &[i32],
    out: &mut ProductOut,
) {
    debug_assert!(g < src.tiles() && (t + TT) * bpr <= a.len());
    debug_assert!((ti + TT) * bpr <= da.len());
    // SAFETY: every pointer indexes block b < bpr of tokens t..t + TT (the caller's promise); the tile's rows are
    // inside the output (its shape was checked); prefetches never fault.
    unsafe {
        let ap = a.as_ptr().add(t * bpr);
        let mut acc = [_mm512_setzero_ps(); TT];
        for b in 0..bpr {
            src.prefetch(g, b);
            let (wv, dw) = src.block(g, b);
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let q = (*ap.add(j * bpr + b)).qs.as_ptr() as *const i32;
                let c = _mm512_set1_epi32(*corr.get_unchecked((ti + j) * bpr + b));
                let isum = if TT <= 2 {
                    // Two chains of four: one token leaves nothing else to overlap with the dots' latency.
                    let lo = dots(c, &wv[..4], q);
                    let hi = dots(_mm512_setzero_si512(), &wv[4..], q.add(4));
                    _mm512_add_epi32(lo, hi)
                } else {
                    dots(c, &wv, q)
                };
                let scale =
                    _mm512_mul_ps(_mm512_set1_ps(*da.get_unchecked((ti + j) * bpr + b)), dw);
                *acc_j = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc_j);
            }
        }
        // Row r is lane 4 (r % 4) + r / 4 of a permuted tile.
        let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        for (j, &acc_j) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add((t + j) * out.stride() + 16 * g);
            let v = if R::PERMUTED {
                _mm512_permutexvar_ps(idx, acc_j)
            } else {
                acc_j
            };
            _mm512_storeu_ps(o, v);
        }
    }
}
