//! AMX (Advanced Matrix Extensions, Sapphire Rapids and later): the interleaved 32-block products and the
//! k-quant products for many tokens on the tile unit, `tdpbssd` multiplying 16 tokens' activation bytes by 16
//! rows' weight bytes into a 16 x 16 tile of exact i32 dots in one instruction.
//!
//! Why it pays: a prompt's products are compute-bound, and `vpdpbusd` on 512 bits is 64 byte products per
//! instruction where one `tdpbssd` is 8192 (K = 32) or 16384 (K = 64). The tile unit itself is not the limit
//! (C, one core of this project's 2-vCPU Sapphire Rapids VM: 1700 G byte-products/s with nothing stored);
//! storing each block's tiles and scaling them into f32 with AVX-512 is, and for the 32-block formats that is
//! the same per block as the VNNI kernel's float step. Measured with `cargo bench --bench kernels -- probe
//! FORMAT 512 N 1024 ITERS` (one thread, a 512 x 1024 matrix from L2, G products/s, VNNI / tiles): `q4_0i`
//! N = 128: 191 / 308; `q4_k` 160 / 280; `q6_k` 133 / 175. Whole prompts (`quarry bench -p 512 -n 0`, 2 threads,
//! `QUARRY_KERNEL=avx512vnni` / `avx512amx`, alternating): Q4_0 435 / 570, Q8_0 425 / 566, IQ4_NL 414 / 544,
//! IQ4_XS 414 / 555, Q4_K_M 336-356 / 551-554 tok/s (the k-quants after their last two changes).
//!
//! Batch invariance: the tiles hold each (token, row, block)'s exact integer dot, the same integer the VNNI
//! kernels build, and each is scaled and accumulated with that kernel's float steps, block by block in order
//! (`acc = fma(cvt(isum), da * dw, acc)`, the k-quants' steps in `kquant.rs`). So a token's outputs are the same
//! bits whichever kernel computes them, and the set can choose by token count (`tokens_on_tiles`).
//!
//! The 32-block operands: A (tiles 4 and 5) is 16 tokens' 32 quant bytes of one activation block, copied per
//! pass into contiguous zero-padded tiles; B (tiles 6 and 7) is one block of 16 rows in the layout `tdpbssd`
//! wants, 8 rows of 64 bytes, row `k` holding dword `k` of every weight row: exactly the 8 vectors
//! `RowTiles::block` returns, made signed and stored to a 512-byte buffer. C (tiles 0 to 3) is 2 token tiles x 2
//! row groups, zeroed per block. The k-quants: see "K-quants" below.
//!
//! The instructions are written with `asm!` (Rust's AMX intrinsics are unstable); the tiles are not registers
//! the compiler knows, so each call configures them first and releases them before it returns (a thread
//! holding tile state makes every context switch save 8 KiB more). Linux hands the tile state out only to
//! processes that ask (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); [`granted`] asks once.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use quarry_quantize::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K};

use super::kquant::{KFormat, KQuant};
use super::row_lanes::{RowTiles, lane_row, transpose_16x4};
use super::{f16_bits_to_f32, grow, scratch};
use crate::kernels::ProductOut;

/// How many of a product's `n` tokens (the first ones) run on the tile unit; the rest run on the VNNI kernels.
/// A tile of 16 tokens costs the same however many of its rows are padding, where the VNNI kernels' cost grows
/// with the token count, so the tile unit takes whole tiles, and a last partial one only from 8 tokens.
/// Measured with the probe above (VNNI / tiles): `q4_0i` N = 12: 191 / 192, 16: 193 / 200, 20: 180 / 151 (all on
/// tiles; 191 with the last 4 on the row lanes), 24: 180 / 185, 32: 202 / 269; `q4_k` 16: 132 / 131, 24: 106 /
/// 147; `q6_k` 16: 108 / 98, 24: 85 / 88, 32: 122 / 126.
pub(crate) fn tokens_on_tiles(n: usize) -> usize {
    let (full, rest) = (n / 16, n % 16);
    match (full, rest) {
        (0, _) => 0,
        (_, 8..) => n,
        _ => 16 * full,
    }
}

/// Whether this CPU has AMX-TILE and AMX-INT8 and Linux granted this process the tile state. Asked once.
pub fn granted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // CPUID leaf 7, sub-leaf 0: EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
        let leaf7 = __cpuid_count(7, 0);
        if leaf7.edx & (1 << 24) == 0 || leaf7.edx & (1 << 25) == 0 {
            return false;
        }
        request_tile_state()
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: without it the first tile instruction faults.
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a system call with two integer arguments; it changes nothing but this process's permission.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The `ldtilecfg` operand: palette 1, then each tile's bytes per row and rows.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
    reserved2: [u8; 16],
}

/// A palette-1 configuration of tiles 0-7, each `(bytes per row, rows)`.
const fn tile_config(shapes: [(u16, u8); 8]) -> TileConfig {
    let mut colsb = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 8 {
        (colsb[t], rows[t]) = shapes[t];
        t += 1;
    }
    TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb,
        rows,
        reserved2: [0; 16],
    }
}

/// Tiles 0-3: C (16 tokens x 16 rows of i32); 4-5: A (16 tokens x 32 bytes); 6-7: B (8 x 64 bytes).
const CONFIG: TileConfig = tile_config([
    (64, 16),
    (64, 16),
    (64, 16),
    (64, 16),
    (32, 16),
    (32, 16),
    (64, 8),
    (64, 8),
]);

/// A product's passes over the weights: token ranges of at most `CHUNK_TOKENS`.
fn passes(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(CHUNK_TOKENS)
        .map(move |t0| (t0, (t0 + CHUNK_TOKENS).min(n)))
}

macro_rules! tile_load {
    ($t:literal, $p:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $stride,
            options(nostack, preserves_flags, readonly))
    };
}

macro_rules! tile_store {
    ($t:literal, $p:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) 64usize,
            options(nostack, preserves_flags))
    };
}

macro_rules! tile_dot {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!(
                "tilezero tmm",
                $c,
                "\n",
                "tdpbssd tmm",
                $c,
                ", tmm",
                $a,
                ", tmm",
                $b
            ),
            options(nomem, nostack, preserves_flags)
        )
    };
}

/// Where the C tiles are stored to be scaled: 4 tiles of 16 x 16 i32.
#[repr(C, align(64))]
struct CTiles([[i32; 256]; 4]);

/// One block of two row groups in `tdpbssd`'s B layout.
#[repr(C, align(64))]
struct BTiles([[i8; 512]; 2]);

/// Tokens per pass over the weights: the pass's activations (A tiles and scales, about 33 bytes per token and
/// 32 weights: 264 KiB for 1024 columns) and accumulators stay in L2, and `reserve_scratch` can size them up
/// front. Each pass prepares every B tile again, so a pass should hold all of an expert's tokens in a prompt
/// (about 128 of 512, often more): Q4_K_M prompt, alternating runs, 517-544 tok/s with passes of 128 against
/// 542-565 with 256.
pub(super) const CHUNK_TOKENS: usize = 256;

/// `W[r] . A[t]` for every row of `src` (whole groups of 16) and the first `n` tokens of `a` (at least one), on
/// the tile unit. The caller checked the output's shape and that [`granted`] holds; the set's AVX-512 features
/// are present.
#[inline(always)]
pub(super) unsafe fn gemm_tiles<R: RowTiles>(
    src: &R,
    a: &[BlockQ8_0],
    bpr: usize,
    n: usize,
    out: &mut ProductOut,
) {
    assert!(n > 0 && n * bpr <= a.len() && n <= out.tokens());
    for (t0, t1) in passes(n) {
        // SAFETY: the caller's promises, for tokens t0..t1.
        unsafe { gemm_tiles_chunk(src, a, bpr, t0, t1, out) };
    }
}

/// [`gemm_tiles`] for tokens `t0..t1`, at most `CHUNK_TOKENS`.
#[inline(always)]
unsafe fn gemm_tiles_chunk<R: RowTiles>(
    src: &R,
    a: &[BlockQ8_0],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    let n = t1 - t0;
    let token_tiles = n.div_ceil(16);
    let padded = token_tiles * 16;
    // SAFETY: see `scratch`.
    let s = unsafe { &mut *scratch() };
    // The activations tile by tile: scales block-major (`da[b * padded + t]`, a tile's 16 adjacent) and quants
    // as A tiles (16 rows of 32 bytes at `(tt * bpr + b) * 512`), zero past the tokens. In place they would be
    // 16 rows a whole token apart, a tile load touching up to 32 lines instead of 8.
    grow(&mut s.da, bpr * padded);
    grow(&mut s.w, token_tiles * bpr * 512);
    let da = &mut s.da[..bpr * padded];
    let at = &mut s.w[..token_tiles * bpr * 512];
    for t in 0..padded {
        let (tt, m) = (t / 16, t % 16);
        for b in 0..bpr {
            let row = &mut at[(tt * bpr + b) * 512 + 32 * m..][..32];
            match a.get((t0 + t) * bpr + b).filter(|_| t < n) {
                Some(blk) => {
                    // SAFETY: F16C is present.
                    da[b * padded + t] = unsafe { f16_bits_to_f32(blk.d.to_bits()) };
                    row.copy_from_slice(bytemuck::cast_slice(&blk.qs));
                }
                None => {
                    da[b * padded + t] = 0.0;
                    row.fill(0);
                }
            }
        }
    }
    // f32 accumulators of one pair of row groups: token-major, 32 rows each. (Not the output's window itself:
    // its rows are a whole matrix row apart, often 4 KiB, and 16 of them alias in L1: 40% slower.)
    grow(&mut s.dw, padded * 32);
    let acc = &mut s.dw[..padded * 32];
    let (da, at) = (&s.da[..bpr * padded], &s.w[..token_tiles * bpr * 512]);

    let mut bt = BTiles([[0; 512]; 2]);
    let mut ct = CTiles([[0; 256]; 4]);
    let groups = src.tiles();
    // SAFETY: tile state was granted (the caller); every tile load reads 16 rows of 32 bytes (A: inside `at`) or 8
    // rows of 64 (B: `bt`); stores write 1 KiB into `ct`; `acc` has 32 floats for each of `padded` tokens, and
    // the output 16 for each token and row group.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, preserves_flags, readonly));
        let mut g = 0;
        while g < groups {
            let pair = (groups - g).min(2);
            let mut dw = [_mm512_setzero_ps(); 2];
            for b in 0..bpr {
                for (i, dwi) in dw.iter_mut().enumerate().take(pair) {
                    src.prefetch(g + i, b);
                    let (wv, d) = src.block(g + i, b);
                    *dwi = d;
                    let bias = _mm512_set1_epi8(R::BIAS as i8);
                    for (k, &v) in wv.iter().enumerate() {
                        // Unsigned (w + BIAS) back to signed w; BIAS 128 wraps to the same bytes as a flip.
                        _mm512_store_si512(
                            bt.0[i][64 * k..].as_mut_ptr() as *mut _,
                            _mm512_sub_epi8(v, bias),
                        );
                    }
                }
                tile_load!("6", bt.0[0].as_ptr(), 64usize);
                if pair == 2 {
                    tile_load!("7", bt.0[1].as_ptr(), 64usize);
                }
                let a_tile = |tt: usize| at.as_ptr().add((tt * bpr + b) * 512);
                // Software-pipelined over token tiles, two C sets taking turns: tile tt's results are stored, tile
                // tt + 1's products issued, and only then tile tt's results scaled, so the tile unit works while
                // the vector units scale. (Loads of what a tile store wrote wait for the store to retire, and it
                // retires in program order: issued after the next products it would wait for them.)
                tile_load!("4", a_tile(0), 32usize);
                tile_dot!("0", "4", "6");
                if pair == 2 {
                    tile_dot!("1", "4", "7");
                }
                let mut tt = 0;
                loop {
                    tile_store!("0", ct.0[0].as_mut_ptr());
                    if pair == 2 {
                        tile_store!("1", ct.0[1].as_mut_ptr());
                    }
                    let next = tt + 1 < token_tiles;
                    if next {
                        tile_load!("5", a_tile(tt + 1), 32usize);
                        tile_dot!("2", "5", "6");
                        if pair == 2 {
                            tile_dot!("3", "5", "7");
                        }
                    }
                    scale_tiles(
                        &ct.0[..pair],
                        &da[b * padded + 16 * tt..][..16],
                        &dw,
                        b == 0,
                        &mut acc[512 * tt..],
                    );
                    if !next {
                        break;
                    }
                    tile_store!("2", ct.0[2].as_mut_ptr());
                    if pair == 2 {
                        tile_store!("3", ct.0[3].as_mut_ptr());
                    }
                    let next = tt + 2 < token_tiles;
                    if next {
                        tile_load!("4", a_tile(tt + 2), 32usize);
                        tile_dot!("0", "4", "6");
                        if pair == 2 {
                            tile_dot!("1", "4", "7");
                        }
                    }
                    scale_tiles(
                        &ct.0[2..2 + pair],
                        &da[b * padded + 16 * (tt + 1)..][..16],
                        &dw,
                        b == 0,
                        &mut acc[512 * (tt + 1)..],
                    );
                    if !next {
                        break;
                    }
                    tt += 2;
                }
            }
            for t in 0..n {
                let o = out.as_mut_ptr().add((t0 + t) * out.stride() + 16 * g);
                for i in 0..pair {
                    _mm512_storeu_ps(
                        o.add(16 * i),
                        _mm512_loadu_ps(acc.as_ptr().add(32 * t + 16 * i)),
                    );
                }
            }
            g += pair;
        }
        asm!("tilerelease", options(nomem, nostack, preserves_flags));
    }
}

/// The VNNI row-lane kernel's float step for a token tile's C tiles (one per row group `i`, scales `dw[i]`),
/// accumulating into `acc` (token `m`'s 32 rows at `32 m`, group `i`'s at `+ 16 i`; on the `first` block, into
/// zeros instead of whatever `acc` holds): `acc = fma(cvt(isum), da * dw, acc)`.
#[inline(always)]
unsafe fn scale_tiles(
    c: &[[i32; 256]],
    da: &[f32],
    dw: &[__m512; 2],
    first: bool,
    acc: &mut [f32],
) {
    debug_assert!(c.len() <= 2 && da.len() == 16 && acc.len() >= 512);
    // SAFETY: each tile holds 16 rows of 16; `acc` 16 rows of 32.
    unsafe {
        for (i, ci) in c.iter().enumerate() {
            for (m, &d) in da.iter().enumerate() {
                let isum = _mm512_load_si512(ci.as_ptr().add(16 * m) as *const _);
                let scale = _mm512_mul_ps(_mm512_set1_ps(d), dw[i]);
                let p = acc.as_mut_ptr().add(32 * m + 16 * i);
                let prev = if first {
                    _mm512_setzero_ps()
                } else {
                    _mm512_loadu_ps(p)
                };
                _mm512_storeu_ps(p, _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, prev));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// K-quants (Q4_K, Q5_K, Q6_K against Q8_K), rows as they lie or interleaved (`KTiles`).
//
// A 256-block's integer dot is `sum over groups of sc_g * dot_g` (plus Q4_K/Q5_K's mins term `sum(min_g *
// bsum_g)`, Q6_K's `-32` offset), and the lane kernel scales it once per block. Taking each group's dot from a
// tile and multiplying it by its scale in vector registers would cost more per block than the 32-block
// formats' whole float step; instead the scale goes into the weight bytes. `sc_g * w` does not fit a byte, so
// the scale is split into digits small enough that `digit * w` does (Q4_K: two base-8 digits of a 6-bit
// scale times a 4-bit quant, at most 105; Q5_K: three base-4 digits times 5 bits, 93; Q6_K: the scale plus 128
// in four base-4 digits times `q - 32`, 96), and the tile unit computes one product per digit over all 256
// weights: `isum = sum_i base^i * C_i`, exactly the lane kernel's integer. One more product gives the second
// term: the mins themselves as weight bytes (`C = sum(min_g * bsum_g)`), or Q6_K's `q - 32` (the `-128` of
// the shifted scale). So a block's tile work is 3 to 5 products of K = 256, and its float steps are the lane
// kernel's, once per block.

/// A k-quant's scale split into digits for the tile unit.
pub(super) trait KDigits: KFormat {
    /// Bits per digit.
    const DIGIT_BITS: u32;
    /// Digits per scale; the tile products are these and one more (`DIGITS + 1 <= 5`).
    const DIGITS: usize;
    /// The integer scales of 16 rows' blocks (`blocks[p]`: lane `p`'s row) as `sc[group]`, one dword per lane:
    /// Q6_K's plus 128; Q4_K's and Q5_K's mins after them (`sc[8 + group]`). And the float scales `[d, -dmin]`
    /// (Q6_K: `[d, 0]`) per lane, as the lane kernel's `prep_scales` gives them.
    unsafe fn lane_scales(blocks: &[*const Self; 16], sc: &mut [__m512i; 16]) -> [__m512; 2];
}

/// Q4_K's and Q5_K's: each row's 6-bit scales and mins unpacked as 8 bytes (`q4k_scales_mins`), then byte `g`
/// of the 16 rows' words gathered into lanes.
#[inline(always)]
unsafe fn k4_lane_scales(
    packed: &[&[u8; 12]; 16],
    d: &[u16; 16],
    dmin: &[u16; 16],
    sc: &mut [__m512i; 16],
) -> [__m512; 2] {
    let mut words = [[0u64; 16]; 2];
    for (p, &bytes) in packed.iter().enumerate() {
        (words[0][p], words[1][p]) = crate::kernels::q4_k::q4k_scales_mins(bytes);
    }
    // SAFETY: AVX-512 F and F16C are present; every load reads inside its array.
    unsafe {
        let byte = _mm512_set1_epi64(0xff);
        for (half, w) in words.iter().enumerate() {
            let (lo, hi) = (
                _mm512_loadu_si512(w.as_ptr() as *const _),
                _mm512_loadu_si512(w.as_ptr().add(8) as *const _),
            );
            for g in 0..8 {
                let shift = _mm_cvtsi32_si128(8 * g as i32);
                let l = _mm512_cvtepi64_epi32(_mm512_and_si512(_mm512_srl_epi64(lo, shift), byte));
                let h = _mm512_cvtepi64_epi32(_mm512_and_si512(_mm512_srl_epi64(hi, shift), byte));
                sc[8 * half + g] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(l), h);
            }
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr() as *const __m256i));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(dmin.as_ptr() as *const __m256i));
        // `-dmin` by its sign bit, as the lane kernel negates it (a subtraction from zero would turn -0 to +0).
        let sign = _mm512_set1_epi32(i32::MIN);
        [
            d,
            _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(dmin), sign)),
        ]
    }
}

macro_rules! k4_digits {
    ($w:ty, $bits:literal, $digits:literal) => {
        impl KDigits for $w {
            const DIGIT_BITS: u32 = $bits;
            const DIGITS: usize = $digits;
            #[inline(always)]
            unsafe fn lane_scales(
                blocks: &[*const Self; 16],
                sc: &mut [__m512i; 16],
            ) -> [__m512; 2] {
                // SAFETY: the caller's pointers are blocks.
                unsafe {
                    let packed = std::array::from_fn(|p| &(*blocks[p]).scales);
                    let d = std::array::from_fn(|p| (*blocks[p]).d.to_bits());
                    let dmin = std::array::from_fn(|p| (*blocks[p]).dmin.to_bits());
                    k4_lane_scales(&packed, &d, &dmin, sc)
                }
            }
        }
    };
}

// Q4_K: two base-8 digits of a 6-bit scale times a 4-bit quant (at most 105); Q5_K: three base-4 digits times
// 5 bits (93).
k4_digits!(BlockQ4K, 3, 2);
k4_digits!(BlockQ5K, 2, 3);

impl KDigits for BlockQ6K {
    /// Four base-4 digits of the scale plus 128, times `q - 32` (at most 96).
    const DIGIT_BITS: u32 = 2;
    const DIGITS: usize = 4;
    #[inline(always)]
    unsafe fn lane_scales(blocks: &[*const Self; 16], sc: &mut [__m512i; 16]) -> [__m512; 2] {
        // SAFETY: the caller's pointers are blocks; AVX-512 BW and F16C are present.
        unsafe {
            let mut scales = [[0u8; 16]; 16];
            let mut d = [0u16; 16];
            for p in 0..16 {
                scales[p] = bytemuck::cast((*blocks[p]).scales);
                d[p] = (*blocks[p]).d.to_bits();
            }
            // Rows in lane order already: the plain transpose's dword k holds groups 4k..4k + 4.
            let mut rows = [[0u8; 16]; 16];
            for p in 0..16 {
                rows[lane_row(p)] = scales[p];
            }
            let dwords = transpose_16x4(rows.as_ptr().cast::<u8>(), 16);
            for (g, scg) in sc.iter_mut().enumerate() {
                let v = _mm512_srl_epi32(dwords[g / 4], _mm_cvtsi32_si128(8 * (g % 4) as i32));
                // The byte as a signed scale, plus 128.
                let signed = _mm512_srai_epi32::<24>(_mm512_slli_epi32::<24>(v));
                *scg = _mm512_add_epi32(signed, _mm512_set1_epi32(128));
            }
            [
                _mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr() as *const __m256i)),
                _mm512_setzero_ps(),
            ]
        }
    }
}

/// Tiles 0-4: C; 5: A (16 tokens x 64 bytes); 6-7: B (16 rows of 64 bytes: K = 64 of 16 weight rows).
const K_CONFIG: TileConfig = tile_config([(64, 16); 8]);

/// One 256-block of 16 rows as B tiles: per product, 4 tiles of K = 64 (`[product][dword of the block]`, 64
/// bytes each: the dword of every row, in the permuted lane order of `transpose_16x4`).
#[repr(C, align(64))]
struct KBTiles([[[u8; 64]; 64]; 5]);

/// 16 rows' blocks unpacked to quants in weight order.
#[repr(C, align(64))]
struct KQuants([[u8; 256]; 16]);

/// Five C tiles.
#[repr(C, align(64))]
struct KCTiles([[i32; 256]; 5]);

/// Where the k-quant tile products' blocks of 16 rows come from: rows as they lie ([`KRows`]) or interleaved
/// (`k_row_lanes::InterleavedK`). One block is prepared at a time.
pub(super) trait KTiles {
    type W: KDigits;
    /// Whether lanes hold rows permuted (lane `4L + m`: row `4m + L`, as `transpose_16x4` leaves them) rather
    /// than in order.
    const PERMUTED: bool;
    /// Tiles of 16 rows.
    fn tiles(&self) -> usize;
    /// Makes block `b` of tile `g` the current one: its integer scales into `sc` and its float scales, in lane
    /// order, as [`KDigits::lane_scales`] gives them; requests what comes after it.
    unsafe fn prepare(&mut self, g: usize, b: usize, sc: &mut [__m512i; 16]) -> [__m512; 2];
    /// Dwords `4 chunk..4 chunk + 4` of the current block's unsigned quants (in weight order), one vector each,
    /// lane order.
    unsafe fn dwords(&self, chunk: usize) -> [__m512i; 4];
}

/// Rows as they lie in the file, 16 at a time: each block's 16 rows unpacked to quants in weight order, then
/// transposed a chunk at a time.
pub(super) struct KRows<'a, K: KQuant> {
    w: &'a [K::W],
    bpr: usize,
    q: KQuants,
}

impl<K: KQuant> KTiles for KRows<'_, K>
where
    K::W: KDigits,
{
    type W = K::W;
    const PERMUTED: bool = true;
    #[inline(always)]
    fn tiles(&self) -> usize {
        self.w.len() / (16 * self.bpr)
    }
    #[inline(always)]
    unsafe fn prepare(&mut self, g: usize, b: usize, sc: &mut [__m512i; 16]) -> [__m512; 2] {
        // SAFETY: block b of rows 16g..16g + 16 lies inside `w` (the caller's tiling); prefetches never fault.
        unsafe {
            // Lane p holds row `lane_row(p)`.
            let blocks: [*const K::W; 16] =
                std::array::from_fn(|p| self.w.as_ptr().add((16 * g + lane_row(p)) * self.bpr + b));
            for (p, &blk) in blocks.iter().enumerate() {
                // The next group's block, requested now: 16 rows a whole row apart, which the hardware
                // prefetchers do not follow.
                let next = (self
                    .w
                    .as_ptr()
                    .wrapping_add((16 * (g + 1) + p) * self.bpr + b))
                    as *const i8;
                for line in 0..size_of::<K::W>().div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * line));
                }
                K::quants(blk, self.q.0[lane_row(p)].as_mut_ptr());
            }
            K::W::lane_scales(&blocks, sc)
        }
    }
    #[inline(always)]
    unsafe fn dwords(&self, chunk: usize) -> [__m512i; 4] {
        // SAFETY: `q` holds 16 rows of 256 bytes; chunk < 16.
        unsafe { transpose_16x4(self.q.0.as_ptr().cast::<u8>().add(16 * chunk), 256) }
    }
}

/// `W[r] . A[t]` for every row of `w` (a multiple of 16 rows of `bpr` 256-blocks) and the first `n` tokens of `a`,
/// on the tile unit; the results are the lane kernel's bits. The caller checked the output's shape and that
/// [`granted`] holds; the set's AVX-512 features are present.
#[inline(always)]
pub(super) unsafe fn gemm_kquant<K: KQuant>(
    w: &[K::W],
    a: &[BlockQ8K],
    bpr: usize,
    n: usize,
    out: &mut ProductOut,
) where
    K::W: KDigits,
{
    assert!(w.len().is_multiple_of(16 * bpr));
    let mut src = KRows::<K> {
        w,
        bpr,
        q: KQuants([[0; 256]; 16]),
    };
    // SAFETY: the caller's promises.
    unsafe { gemm_k_tiles(&mut src, a, bpr, n, out) };
}

/// `W[r] . A[t]` for every row of `src` and the first `n` tokens of `a`, on the tile unit, with the lane
/// kernel's bits. The caller checked the output's shape and that [`granted`] holds; the set's AVX-512 features
/// are present.
#[inline(always)]
pub(super) unsafe fn gemm_k_tiles<S: KTiles>(
    src: &mut S,
    a: &[BlockQ8K],
    bpr: usize,
    n: usize,
    out: &mut ProductOut,
) {
    assert!(n > 0 && n * bpr <= a.len() && n <= out.tokens());
    assert!(src.tiles() * 16 <= out.rows());
    for (t0, t1) in passes(n) {
        // SAFETY: the caller's promises, for tokens t0..t1.
        unsafe { gemm_k_tiles_chunk(src, a, bpr, t0, t1, out) };
    }
}

/// [`gemm_k_tiles`] for tokens `t0..t1`, at most `CHUNK_TOKENS`.
#[inline(always)]
unsafe fn gemm_k_tiles_chunk<S: KTiles>(
    src: &mut S,
    a: &[BlockQ8K],
    bpr: usize,
    t0: usize,
    t1: usize,
    out: &mut ProductOut,
) {
    let n = t1 - t0;
    let token_tiles = n.div_ceil(16);
    let padded = token_tiles * 16;
    let products = S::W::DIGITS + 1;
    // SAFETY: see `scratch`.
    let s = unsafe { &mut *scratch() };
    // A tiles: `((tt * bpr + b) * 4 + c) * 1024`, 16 tokens x 64 quants of block b; scales `da[b * padded + t]`.
    grow(&mut s.da, bpr * padded);
    grow(&mut s.w, token_tiles * bpr * 4096);
    let da = &mut s.da[..bpr * padded];
    let at = &mut s.w[..token_tiles * bpr * 4096];
    for t in 0..padded {
        let (tt, m) = (t / 16, t % 16);
        for b in 0..bpr {
            let blk = a.get((t0 + t) * bpr + b).filter(|_| t < n);
            da[b * padded + t] = blk.map_or(0.0, |blk| blk.d);
            for c in 0..4 {
                let row = &mut at[((tt * bpr + b) * 4 + c) * 1024 + 64 * m..][..64];
                match blk {
                    Some(blk) => {
                        row.copy_from_slice(bytemuck::cast_slice(&blk.qs[64 * c..64 * c + 64]))
                    }
                    None => row.fill(0),
                }
            }
        }
    }
    grow(&mut s.dw, padded * 16);
    let acc = &mut s.dw[..padded * 16];
    let (da, at) = (&s.da[..bpr * padded], &s.w[..token_tiles * bpr * 4096]);

    let mut bt = KBTiles([[[0; 64]; 64]; 5]);
    let mut ct = KCTiles([[0; 256]; 5]);
    // SAFETY: AVX-512 is present.
    let mut sc = [unsafe { _mm512_setzero_si512() }; 16];
    let group_dwords = 64 / S::W::GROUPS;
    // Output row r is lane 4 (r % 4) + r / 4 of permuted tiles.
    // SAFETY: AVX-512 is present.
    let unpermute =
        unsafe { _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15) };
    // SAFETY: tile state was granted (the caller); tile loads read 16 rows of 64 bytes inside `at` or `bt`; stores
    // write 1 KiB into `ct`; every block read is tile < tiles(), block < bpr; `acc` holds 16 floats per padded
    // token, the output 16 per token and row group.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &K_CONFIG, options(nostack, preserves_flags, readonly));
        for g in 0..src.tiles() {
            for b in 0..bpr {
                let [dv, dmv] = src.prepare(g, b, &mut sc);
                build_b_tiles(&*src, &sc, group_dwords, &mut bt);
                for tt in 0..token_tiles {
                    k_tile_products(at.as_ptr().add((tt * bpr + b) * 4096), &bt, products);
                    k_tile_store(&mut ct, products);
                    let rows = &da[b * padded + 16 * tt..][..16];
                    scale_k_tile::<S::W>(&ct, rows, dv, dmv, b == 0, &mut acc[256 * tt..]);
                }
            }
            for t in 0..n {
                let o = out.as_mut_ptr().add((t0 + t) * out.stride() + 16 * g);
                let v = _mm512_loadu_ps(acc.as_ptr().add(16 * t));
                let v = if S::PERMUTED {
                    _mm512_permutexvar_ps(unpermute, v)
                } else {
                    v
                };
                _mm512_storeu_ps(o, v);
            }
        }
        asm!("tilerelease", options(nomem, nostack, preserves_flags));
    }
}

/// The B tiles of one block of 16 rows: the quants transposed to `[dword][row]`, then per digit `i` each dword
/// times its group's digit (row by row), and the last product (mins, or Q6_K's `q - 32`).
#[inline(always)]
unsafe fn build_b_tiles<S: KTiles>(
    src: &S,
    sc: &[__m512i; 16],
    group_dwords: usize,
    bt: &mut KBTiles,
) {
    // SAFETY: AVX-512 BW is present; `src` has a prepared block, `bt` holds 5 x 64 x 64.
    unsafe {
        let odd_bytes: __mmask64 = 0xAAAA_AAAA_AAAA_AAAA;
        let digit_mask = _mm512_set1_epi32((1 << S::W::DIGIT_BITS) - 1);
        let chunks_per_group = group_dwords / 4;
        for grp in 0..S::W::GROUPS {
            // The group's digits as bytes [d, 0, d, 0] (`even`) and [0, d, 0, d] (`odd`) per row: `vpmaddubsw`
            // then gives each even (odd) weight times d as a word, whose low byte is the product (it fits a
            // signed byte).
            let scv = sc[grp];
            let mut even = [_mm512_setzero_si512(); 4];
            let mut odd = [_mm512_setzero_si512(); 4];
            for i in 0..S::W::DIGITS {
                let shift = _mm_cvtsi32_si128((S::W::DIGIT_BITS * i as u32) as i32);
                let digit = _mm512_and_si512(_mm512_srl_epi32(scv, shift), digit_mask);
                even[i] = _mm512_or_si512(digit, _mm512_slli_epi32::<16>(digit));
                odd[i] = _mm512_slli_epi32::<8>(even[i]);
            }
            // Q4_K/Q5_K: the group's min in every byte of the row's dword.
            let mins = if S::W::OFFSET32 {
                _mm512_setzero_si512()
            } else {
                let m = _mm512_or_si512(sc[8 + grp], _mm512_slli_epi32::<8>(sc[8 + grp]));
                _mm512_or_si512(m, _mm512_slli_epi32::<16>(m))
            };
            for chunk in grp * chunks_per_group..(grp + 1) * chunks_per_group {
                for (k, &v) in src.dwords(chunk).iter().enumerate() {
                    let j = 4 * chunk + k;
                    let wv = if S::W::OFFSET32 {
                        _mm512_sub_epi8(v, _mm512_set1_epi8(32))
                    } else {
                        v
                    };
                    for i in 0..S::W::DIGITS {
                        let lo = _mm512_maddubs_epi16(even[i], wv);
                        let hi = _mm512_maddubs_epi16(odd[i], wv);
                        let prod =
                            _mm512_mask_blend_epi8(odd_bytes, lo, _mm512_slli_epi16::<8>(hi));
                        _mm512_store_si512(bt.0[i][j].as_mut_ptr() as *mut _, prod);
                    }
                    let last = if S::W::OFFSET32 { wv } else { mins };
                    _mm512_store_si512(bt.0[S::W::DIGITS][j].as_mut_ptr() as *mut _, last);
                }
            }
        }
    }
}

macro_rules! k_product {
    ($c:literal, $b:literal, $p:expr) => {
        asm!(concat!("tileloadd tmm", $b, ", [{p} + {s}*1]\n", "tdpbssd tmm", $c, ", tmm5, tmm", $b),
            p = in(reg) $p, s = in(reg) 64usize, options(nostack, preserves_flags, readonly))
    };
}

/// The `products` C tiles of one token tile (A tiles at `at`: 4 of K = 64) x one block of 16 rows.
#[inline(always)]
unsafe fn k_tile_products(at: *const u8, bt: &KBTiles, products: usize) {
    // SAFETY: tile state is configured (`K_CONFIG`); `at` holds 4 A tiles, `bt` the products' B tiles.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            options(nomem, nostack, preserves_flags)
        );
        if products > 3 {
            asm!("tilezero tmm3", options(nomem, nostack, preserves_flags));
        }
        if products > 4 {
            asm!("tilezero tmm4", options(nomem, nostack, preserves_flags));
        }
        for c in 0..4 {
            tile_load!("5", at.add(1024 * c), 64usize);
            let b = |i: usize| bt.0[i][16 * c].as_ptr();
            k_product!("0", "6", b(0));
            k_product!("1", "7", b(1));
            k_product!("2", "6", b(2));
            if products > 3 {
                k_product!("3", "7", b(3));
            }
            if products > 4 {
                k_product!("4", "6", b(4));
            }
        }
    }
}

/// Stores the `products` C tiles.
#[inline(always)]
unsafe fn k_tile_store(ct: &mut KCTiles, products: usize) {
    // SAFETY: tile state is configured; each store writes 1 KiB into `ct`.
    unsafe {
        tile_store!("0", ct.0[0].as_mut_ptr());
        tile_store!("1", ct.0[1].as_mut_ptr());
        tile_store!("2", ct.0[2].as_mut_ptr());
        if products > 3 {
            tile_store!("3", ct.0[3].as_mut_ptr());
        }
        if products > 4 {
            tile_store!("4", ct.0[4].as_mut_ptr());
        }
    }
}

/// The lane kernel's float steps for each token of a tile (row `m` of every C tile; `acc` row `m` at `16 m`, read
/// as zeros on the `first` block):
/// `isum = sum_i C_i << (DIGIT_BITS * i)`; Q4_K/Q5_K `acc = fma(cvt(isum), da * d, acc)` then
/// `acc = fma(cvt(m), da * -dmin, acc)`; Q6_K `acc = fma(cvt(isum - 128 C_last), da * d, acc)`.
#[inline(always)]
unsafe fn scale_k_tile<W: KDigits>(
    ct: &KCTiles,
    da: &[f32],
    d: __m512,
    dmin: __m512,
    first: bool,
    acc: &mut [f32],
) {
    debug_assert!(da.len() == 16 && acc.len() >= 256);
    // SAFETY: every tile holds 16 rows of 16; `acc` 16 rows of 16.
    unsafe {
        for (m, &dam) in da.iter().enumerate() {
            // (No closure for the row loads: it would be compiled without the target features.)
            let mut isum = _mm512_load_si512(ct.0[0].as_ptr().add(16 * m) as *const _);
            for i in 1..W::DIGITS {
                let ci = _mm512_load_si512(ct.0[i].as_ptr().add(16 * m) as *const _);
                let shift = _mm_cvtsi32_si128((W::DIGIT_BITS * i as u32) as i32);
                isum = _mm512_add_epi32(isum, _mm512_sll_epi32(ci, shift));
            }
            let last = _mm512_load_si512(ct.0[W::DIGITS].as_ptr().add(16 * m) as *const _);
            let p = acc.as_mut_ptr().add(16 * m);
            let prev = if first {
                _mm512_setzero_ps()
            } else {
                _mm512_loadu_ps(p)
            };
            let da = _mm512_set1_ps(dam);
            if W::OFFSET32 {
                let isum = _mm512_sub_epi32(isum, _mm512_slli_epi32::<7>(last));
                _mm512_storeu_ps(
                    p,
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(da, d), prev),
                );
            } else {
                let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(da, d), prev);
                _mm512_storeu_ps(
                    p,
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(last), _mm512_mul_ps(da, dmin), v),
                );
            }
        }
    }
}
