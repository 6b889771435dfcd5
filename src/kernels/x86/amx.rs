//! AMX (Advanced Matrix Extensions, Sapphire Rapids and later): the interleaved 32-block products for many tokens
//! on the tile unit, `tdpbssd` multiplying 16 tokens' activation bytes by 16 rows' weight bytes into a 16 x 16
//! tile of exact i32 dots in one instruction.
//!
//! Why it pays: a prompt's products are compute-bound, and `vpdpbusd` on 512 bits is 64 byte products per
//! instruction where one `tdpbssd` over a 32-byte block is 8192. Measured on this project's 2-vCPU Sapphire
//! Rapids VM (C, one core): the loop below (4 tiles of 16 x 16 per block, tiles stored and scaled into f32 with
//! AVX-512) runs 357 G byte-products/s, against about 130 for the VNNI row-lane kernel inside a whole prompt.
//! The tile unit itself is faster still (1700 G/s with nothing stored); storing the tiles and scaling them is
//! the cost, and it is the same per block as the VNNI kernel's float step.
//!
//! Batch invariance: the tile holds each (token, row, block)'s exact integer dot, the same integer the VNNI
//! row-lane kernel builds from unsigned weights and a correction, and each is scaled and accumulated with that
//! kernel's float step, block by block in order (`acc = fma(cvt(isum), da * dw, acc)`). So a token's outputs are
//! the same bits whichever kernel computes them, and the set can choose by token count.
//!
//! The operands: A (tiles 4 and 5) is 16 tokens' 32 quant bytes of one activation block, read in place from the
//! `BlockQ8_0` array (`tileloadd` takes a row stride: the rows are `bpr` blocks apart), or from a zero-padded copy
//! for the last tokens; B (tiles 6 and 7) is one block of 16 rows in the layout `tdpbssd` wants, 8 rows of 64 bytes,
//! row `k` holding dword `k` of every weight row: exactly the 8 vectors `RowTiles::block` returns, made signed
//! and stored to a 512-byte buffer. C (tiles 0 to 3) is 2 token tiles x 2 row groups, zeroed per block.
//!
//! The instructions are written with `asm!` (Rust's AMX intrinsics are unstable); the tiles are not registers
//! the compiler knows, so each call configures them first and releases them before it returns (a thread
//! holding tile state makes every context switch save 8 KiB more). Linux hands the tile state out only to
//! processes that ask (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); [`granted`] asks once.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use quarry_quantize::blocks::BlockQ8_0;

use super::row_lanes::RowTiles;
use super::{f16_bits_to_f32, grow, scratch};
use crate::kernels::ProductOut;

/// How many of a product's `n` tokens (the first ones) run on the tile unit; the rest run on the VNNI row
/// lanes. A tile of 16 tokens costs the same however many of its rows are padding, where the row lanes' cost
/// grows with the token count, so the tile unit takes whole tiles, and a last partial one only from 8 tokens.
/// Measured with `cargo bench --bench kernels -- probe q4_0i 512 N 1024 ITERS` (one 512 x 1024 Q4_0 matrix from
/// L2, one thread, G products/s, row lanes / all on tiles): N = 12: 191 / 192, 16: 193 / 200, 20: 180 / 151,
/// 24: 180 / 185, 32: 202 / 269, 128: 191 / 308.
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

/// Tiles 0-3: C (16 tokens x 16 rows of i32); 4-5: A (16 tokens x 32 bytes); 6-7: B (8 x 64 bytes).
const CONFIG: TileConfig = {
    let mut colsb = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 8 {
        (colsb[t], rows[t]) = match t {
            0..=3 => (64, 16),
            4 | 5 => (32, 16),
            _ => (64, 8),
        };
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
};

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
            match a.get(t * bpr + b).filter(|_| t < n) {
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
            acc.fill(0.0);
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
                        &mut acc[512 * (tt + 1)..],
                    );
                    if !next {
                        break;
                    }
                    tt += 2;
                }
            }
            for t in 0..n {
                let o = out.as_mut_ptr().add(t * out.stride() + 16 * g);
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
/// accumulating into `acc` (token `m`'s 32 rows at `32 m`, group `i`'s at `+ 16 i`):
/// `acc = fma(cvt(isum), da * dw, acc)`.
#[inline(always)]
unsafe fn scale_tiles(c: &[[i32; 256]], da: &[f32], dw: &[__m512; 2], acc: &mut [f32]) {
    debug_assert!(c.len() <= 2 && da.len() == 16 && acc.len() >= 512);
    // SAFETY: each tile holds 16 rows of 16; `acc` 16 rows of 32.
    unsafe {
        for (i, ci) in c.iter().enumerate() {
            for (m, &d) in da.iter().enumerate() {
                let isum = _mm512_load_si512(ci.as_ptr().add(16 * m) as *const _);
                let scale = _mm512_mul_ps(_mm512_set1_ps(d), dw[i]);
                let p = acc.as_mut_ptr().add(32 * m + 16 * i);
                _mm512_storeu_ps(
                    p,
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, _mm512_loadu_ps(p)),
                );
            }
        }
    }
}
