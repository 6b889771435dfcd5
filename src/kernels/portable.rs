//! Kernels on the `wide` crate: 128-bit SIMD chosen at compile time (SSE2 on a default x86-64 build, NEON on
//! aarch64), so this set runs on any CPU the binary runs on and is the fast path where no `std::arch` set
//! exists. No `unsafe`.
//!
//! `wide` has no u8 x i8 multiply-add, so the quantized dots widen bytes to i16 and use its i16 dot
//! (`pmaddwd` / `smull` + `sadalp` class instructions): exact for every byte value. Each block's integer sum is
//! then scaled and accumulated exactly as the scalar reference does, so the quantized products give the
//! reference's bits.

use half::{bf16, f16};
use quarry_quantize::blocks::{
    BlockIQ4NL, BlockIQ4XS, BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K,
    IQ4_VALUES,
};
use wide::{f32x8, i8x16, i16x16, i32x8, u16x8};

use super::{Kernels, ProductOut, check_shape};

pub static SET: Kernels = Kernels {
    name: "portable",
    quantize_q8_0,
    gemm_q8_0,
    gemm_q4_0,
    gemm_q4_0_interleaved: None,
    gemm_q8_0_interleaved: None,
    gemm_iq4_nl,
    gemm_iq4_nl_interleaved: None,
    gemm_iq4_xs,
    gemm_iq4_xs_interleaved: None,
    quantize_q8_k: quarry_quantize::blocks::quantize_q8_k,
    gemm_q4_k,
    gemm_q4_k_interleaved: None,
    gemm_q5_k,
    gemm_q6_k,
    gemm_q6_k_interleaved: None,
    gemm_f32,
    gemm_f16,
    gemm_bf16,
    axpy_f32,
    ops: super::ops::BASELINE,
};

/// f16 bits to f32 without `half`'s per-call feature check: the exponent is rebased by a multiply, which is
/// exact for normals and subnormals alike; infinities and NaNs keep an all-ones exponent.
#[inline]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let em = (h & 0x7fff) as u32;
    let sign = ((h & 0x8000) as u32) << 16;
    let mag = if em >= 0x7c00 {
        f32::from_bits((em << 13) | 0x7f80_0000)
    } else {
        f32::from_bits(em << 13) * f32::from_bits(0x7780_0000) // 2^112
    };
    f32::from_bits(mag.to_bits() | sign)
}

/// Eight f16 as f32: `f16_to_f32` on 8 lanes.
#[inline]
fn f16x8(h: &[f16]) -> f32x8 {
    let x = i32x8::from_u16x8(u16x8::new(bytemuck::cast(
        *<&[f16; 8]>::try_from(&h[..8]).unwrap(),
    )));
    let em = x & i32x8::splat(0x7fff);
    let sign = (x & i32x8::splat(0x8000)) << 16;
    let shifted = em << 13;
    let finite: i32x8 = bytemuck::cast(
        bytemuck::cast::<i32x8, f32x8>(shifted) * f32x8::splat(f32::from_bits(0x7780_0000)),
    );
    let special = shifted | i32x8::splat(0x7f80_0000);
    bytemuck::cast(em.simd_gt(i32x8::splat(0x7bff)).select(special, finite) | sign)
}

/// Eight bf16 as f32: the top half of an f32.
#[inline]
fn bf16x8(h: &[bf16]) -> f32x8 {
    let x = i32x8::from_u16x8(u16x8::new(bytemuck::cast(
        *<&[bf16; 8]>::try_from(&h[..8]).unwrap(),
    )));
    bytemuck::cast(x << 16)
}

fn load8(x: &[f32]) -> f32x8 {
    f32x8::new(x[..8].try_into().unwrap())
}

/// Same bytes as the scalar reference: amax over non-NaN values, the same f32 `d` and `1/d`, and round half to
/// even by adding and subtracting 1.5 * 2^23 (exact for |x| < 2^22, and IEEE addition rounds to even), with NaN
/// mapped to 0 and the clamp to +-127 before the conversion.
fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    let magic = f32x8::splat(12_582_912.0);
    let lim = f32x8::splat(127.0);
    for (xs, block) in x.chunks_exact(32).zip(out.iter_mut()) {
        let v = [
            load8(xs),
            load8(&xs[8..]),
            load8(&xs[16..]),
            load8(&xs[24..]),
        ];
        let mut m = f32x8::ZERO;
        for vi in v {
            let a = vi.abs();
            m = m.max(a.is_nan().select(f32x8::ZERO, a));
        }
        let amax = m.to_array().into_iter().fold(0.0f32, f32::max);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        let idv = f32x8::splat(id);
        for (k, vi) in v.into_iter().enumerate() {
            let y = vi * idv;
            let y = y.is_nan().select(f32x8::ZERO, y).max(-lim).min(lim);
            let r = ((y + magic) - magic).round_int().to_array();
            for (q, r) in block.qs[k * 8..k * 8 + 8].iter_mut().zip(r) {
                *q = r as i8;
            }
        }
    }
}

#[inline]
fn i16s(q: &[i8]) -> i16x16 {
    i16x16::from_i8x16(i8x16::new(q[..16].try_into().unwrap()))
}

#[inline]
fn isum_q8(w: &BlockQ8_0, a: &BlockQ8_0) -> i32 {
    let s: i32x8 = i16s(&w.qs).dot(i16s(&a.qs)) + i16s(&w.qs[16..]).dot(i16s(&a.qs[16..]));
    s.reduce_add()
}

#[inline]
fn isum_q4(w: &BlockQ4_0, a: &BlockQ8_0) -> i32 {
    // Sign-extended bytes: `& 15` is the low nibble, the arithmetic `>> 4` then `& 15` the high one.
    let x = i16x16::from_i8x16(i8x16::new(bytemuck::cast(w.qs)));
    let m = i16x16::splat(15);
    let eight = i16x16::splat(8);
    let lo = (x & m) - eight;
    let hi = ((x >> 4i32) & m) - eight;
    let s: i32x8 = lo.dot(i16s(&a.qs)) + hi.dot(i16s(&a.qs[16..]));
    s.reduce_add()
}

#[inline]
fn isum_iq4_nl(w: &BlockIQ4NL, a: &BlockQ8_0) -> i32 {
    isum_iq4(&w.qs, a)
}

/// The integer dot of 16 bytes of IQ4 level indices (IQ4_NL's block, an IQ4_XS sub-block) with an activation
/// block.
#[inline]
fn isum_iq4(qs: &[u8], a: &BlockQ8_0) -> i32 {
    // `wide` has no byte shuffle: the 32 levels are looked up one by one, then multiplied as Q8_0's bytes are.
    let mut levels = [0i8; 32];
    for (j, &b) in qs[..16].iter().enumerate() {
        levels[j] = IQ4_VALUES[(b & 0x0f) as usize];
        levels[j + 16] = IQ4_VALUES[(b >> 4) as usize];
    }
    let s: i32x8 = i16s(&levels).dot(i16s(&a.qs)) + i16s(&levels[16..]).dot(i16s(&a.qs[16..]));
    s.reduce_add()
}

/// Row pairs share each activation block; the float accumulation is the reference's, block by block.
fn gemm_blocks<W>(
    w: &[W],
    a: &[BlockQ8_0],
    bpr: usize,
    mut out: ProductOut,
    d: impl Fn(&W) -> u16,
    isum: impl Fn(&W, &BlockQ8_0) -> i32,
) {
    if bpr == 0 {
        return;
    }
    let n = a.len() / bpr;
    let rows = w.len() / bpr;
    check_shape(&out, rows, n);
    for t in 0..n {
        let act = &a[t * bpr..(t + 1) * bpr];
        let out = out.token(t);
        let mut r = 0;
        while r + 2 <= rows {
            let (w0, w1) = (&w[r * bpr..(r + 1) * bpr], &w[(r + 1) * bpr..(r + 2) * bpr]);
            let (mut s0, mut s1) = (0.0f32, 0.0f32);
            for ((b0, b1), ba) in w0.iter().zip(w1).zip(act) {
                let da = f16_to_f32(ba.d.to_bits());
                s0 += f16_to_f32(d(b0)) * da * isum(b0, ba) as f32;
                s1 += f16_to_f32(d(b1)) * da * isum(b1, ba) as f32;
            }
            out[r] = s0;
            out[r + 1] = s1;
            r += 2;
        }
        if r < rows {
            let mut s = 0.0f32;
            for (bw, ba) in w[r * bpr..(r + 1) * bpr].iter().zip(act) {
                s += f16_to_f32(d(bw)) * f16_to_f32(ba.d.to_bits()) * isum(bw, ba) as f32;
            }
            out[r] = s;
        }
    }
}

fn gemm_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0], bpr: usize, out: ProductOut) {
    gemm_blocks(w, a, bpr, out, |b| b.d.to_bits(), isum_q8)
}

fn gemm_q4_0(w: &[BlockQ4_0], a: &[BlockQ8_0], bpr: usize, out: ProductOut) {
    gemm_blocks(w, a, bpr, out, |b| b.d.to_bits(), isum_q4)
}

fn gemm_iq4_nl(w: &[BlockIQ4NL], a: &[BlockQ8_0], bpr: usize, out: ProductOut) {
    gemm_blocks(w, a, bpr, out, |b| b.d.to_bits(), isum_iq4_nl)
}

/// Sub-block by sub-block, accumulated as the scalar reference does (`bpr`: activation blocks per row).
fn gemm_iq4_xs(w: &[BlockIQ4XS], a: &[BlockQ8_0], bpr: usize, mut out: ProductOut) {
    use crate::kernels::iq4_xs::{SUB_BLOCKS, sub_scale};
    assert!(bpr > 0 && bpr.is_multiple_of(SUB_BLOCKS));
    let spr = bpr / SUB_BLOCKS;
    let (rows, n) = (w.len() / spr, a.len() / bpr);
    check_shape(&out, rows, n);
    for (t, act) in a.chunks_exact(bpr).enumerate() {
        let out = out.token(t);
        for (r, row) in w.chunks_exact(spr).enumerate() {
            let mut s = 0.0f32;
            for (bw, acts) in row.iter().zip(act.chunks_exact(SUB_BLOCKS)) {
                for (ib, ba) in acts.iter().enumerate() {
                    let isum = isum_iq4(&bw.qs[16 * ib..], ba);
                    s += sub_scale(bw, ib) * f16_to_f32(ba.d.to_bits()) * isum as f32;
                }
            }
            out[r] = s;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// k-quants against Q8_K: per block, the weights widened to i16 and multiplied by their group scale (Q4_K/Q5_K
// `q * sc` at most 31 * 63; Q6_K `(q - 32) * sc` at most 32 * 128: both words), one i16 dot per 16 weights into
// i32 lanes (pairs of at most 2 * 4096 * 127), one reduction per block, then the reference's own float
// expression: the same bits as the scalar products.

/// A token's activation block widened to i16 once, for every row.
type Wide = [i16x16; 16];

/// Up to this many blocks of a token's activations are widened at a time (on the stack: 512 bytes each).
const WIDE_BLOCKS: usize = 8;

fn widen(a: &BlockQ8K) -> Wide {
    std::array::from_fn(|k| i16s(&a.qs[16 * k..]))
}

/// Every row's block terms added in block order from 0 as the reference does.
fn gemm_k<W>(
    w: &[W],
    a: &[BlockQ8K],
    bpr: usize,
    mut out: ProductOut,
    term: impl Fn(&W, &BlockQ8K, &Wide) -> f32,
) {
    if bpr == 0 {
        return;
    }
    let n = a.len() / bpr;
    let rows = w.len() / bpr;
    check_shape(&out, rows, n);
    let mut wide = [[i16x16::ZERO; 16]; WIDE_BLOCKS];
    for t in 0..n {
        let act = &a[t * bpr..(t + 1) * bpr];
        let out = out.token(t);
        for b0 in (0..bpr).step_by(WIDE_BLOCKS) {
            let nb = (bpr - b0).min(WIDE_BLOCKS);
            for (wb, ab) in wide.iter_mut().zip(&act[b0..b0 + nb]) {
                *wb = widen(ab);
            }
            for r in 0..rows {
                let o = &mut out[r];
                let mut s = if b0 == 0 { 0.0f32 } else { *o };
                for (k, bw) in w[r * bpr + b0..r * bpr + b0 + nb].iter().enumerate() {
                    s += term(bw, &act[b0 + k], &wide[k]);
                }
                *o = s;
            }
        }
    }
}

/// Q4_K/Q5_K block: 16 bytes of quants (0..=31) as words.
#[inline]
fn scaled(q: i16x16, sc: u8) -> i16x16 {
    q * i16x16::splat(sc as i16)
}

/// `d * da * dots - dmin * da * mins` with the exact integer sums, as `q4_k::dot_scalar`; `qh` is Q5_K's.
#[inline]
fn k4_term(
    d: f16,
    dmin: f16,
    scales: &[u8; 12],
    qs: &[u8; 128],
    qh: Option<&[u8; 32]>,
    a: &BlockQ8K,
    wide: &Wide,
) -> f32 {
    let (sc, m) = super::q4_k::q4k_scales_mins(scales);
    let m15 = i16x16::splat(15);
    let one = i16x16::splat(1);
    let h = qh.map(|qh| {
        [
            i16s(bytemuck::cast_slice(&qh[..16])),
            i16s(bytemuck::cast_slice(&qh[16..])),
        ]
    });
    let mut acc = i32x8::ZERO;
    for c in 0..4 {
        let (sc_lo, sc_hi) = ((sc >> (16 * c)) as u8, (sc >> (16 * c + 8)) as u8);
        for half in 0..2 {
            // Sign-extended bytes: `& 15` is the low nibble, the arithmetic `>> 4` then `& 15` the high one.
            let x = i16s(bytemuck::cast_slice(&qs[32 * c + 16 * half..]));
            let (mut lo, mut hi) = (x & m15, (x >> 4i32) & m15);
            if let Some(h) = h {
                // Bits 2c and 2c + 1 of each qh byte (sign extension only fills bits above 7).
                lo |= ((h[half] >> (2 * c) as i32) & one) << 4;
                hi |= ((h[half] >> (2 * c + 1) as i32) & one) << 4;
            }
            acc += scaled(lo, sc_lo).dot(wide[4 * c + half]);
            acc += scaled(hi, sc_hi).dot(wide[4 * c + 2 + half]);
        }
    }
    let dots = acc.reduce_add();
    let mut mins = 0i32;
    for g in 0..8 {
        let bs = a.bsums[2 * g] as i32 + a.bsums[2 * g + 1] as i32;
        mins += ((m >> (8 * g)) as u8) as i32 * bs;
    }
    d.to_f32() * a.d * dots as f32 - dmin.to_f32() * a.d * mins as f32
}

fn gemm_q4_k(w: &[BlockQ4K], a: &[BlockQ8K], bpr: usize, out: ProductOut) {
    gemm_k(w, a, bpr, out, |b, a, wide| {
        k4_term(b.d, b.dmin, &b.scales, &b.qs, None, a, wide)
    })
}

fn gemm_q5_k(w: &[BlockQ5K], a: &[BlockQ8K], bpr: usize, out: ProductOut) {
    gemm_k(w, a, bpr, out, |b, a, wide| {
        k4_term(b.d, b.dmin, &b.scales, &b.qs, Some(&b.qh), a, wide)
    })
}

/// `d * da * sum(scale_g * (q - 32) * a)`, as `q6_k::dot_scalar`.
fn q6_term(b: &BlockQ6K, a: &BlockQ8K, wide: &Wide) -> f32 {
    let m15 = i16x16::splat(15);
    let m3 = i16x16::splat(3);
    let c32 = i16x16::splat(32);
    let mut acc = i32x8::ZERO;
    for h in 0..2 {
        for s in 0..2 {
            let ql0 = i16s(bytemuck::cast_slice(&b.ql[64 * h + 16 * s..]));
            let ql1 = i16s(bytemuck::cast_slice(&b.ql[64 * h + 32 + 16 * s..]));
            let qh = i16s(bytemuck::cast_slice(&b.qh[32 * h + 16 * s..]));
            // Quarter `qt` of this half: weights 128h + 32qt + 16s.., group 8h + 2qt + s.
            let quants: [i16x16; 4] = [
                (ql0 & m15) | ((qh & m3) << 4),
                (ql1 & m15) | (((qh >> 2i32) & m3) << 4),
                ((ql0 >> 4i32) & m15) | (((qh >> 4i32) & m3) << 4),
                ((ql1 >> 4i32) & m15) | (((qh >> 6i32) & m3) << 4),
            ];
            for (qt, q) in quants.into_iter().enumerate() {
                let g = 8 * h + 2 * qt + s;
                let wq: i16x16 = (q - c32) * i16x16::splat(b.scales[g] as i16);
                acc += wq.dot(wide[g]);
            }
        }
    }
    b.d.to_f32() * a.d * acc.reduce_add() as f32
}

fn gemm_q6_k(w: &[BlockQ6K], a: &[BlockQ8K], bpr: usize, out: ProductOut) {
    gemm_k(w, a, bpr, out, q6_term)
}

/// Dot product of `x` with a weight row converted 8 at a time by `conv`.
#[inline]
fn dot_with(
    len: usize,
    y: &[f32],
    conv: impl Fn(usize) -> f32x8,
    tail: impl Fn(usize) -> f32,
) -> f32 {
    let body = len / 16 * 16;
    let (mut a0, mut a1) = (f32x8::ZERO, f32x8::ZERO);
    let mut i = 0;
    while i < body {
        a0 = conv(i).mul_add(load8(&y[i..]), a0);
        a1 = conv(i + 8).mul_add(load8(&y[i + 8..]), a1);
        i += 16;
    }
    let mut s = (a0 + a1).reduce_add();
    for (k, &yk) in y.iter().enumerate().take(len).skip(body) {
        s += tail(k) * yk;
    }
    s
}

fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    let len = x.len().min(y.len());
    dot_with(len, y, |i| load8(&x[i..]), |k| x[k])
}

fn gemm_float(
    rows: usize,
    cols: usize,
    a: &[f32],
    mut out: ProductOut,
    dot: impl Fn(usize, &[f32]) -> f32,
) {
    if cols == 0 {
        return;
    }
    let n = a.len() / cols;
    check_shape(&out, rows, n);
    for (t, act) in a.chunks_exact(cols).enumerate() {
        for (r, o) in out.token(t).iter_mut().enumerate() {
            *o = dot(r, act);
        }
    }
}

fn gemm_f32(w: &[f32], a: &[f32], cols: usize, out: ProductOut) {
    let rows = w.len().checked_div(cols).unwrap_or(0);
    gemm_float(rows, cols, a, out, |r, act| {
        dot_f32(&w[r * cols..(r + 1) * cols], act)
    })
}

fn gemm_f16(w: &[f16], a: &[f32], cols: usize, out: ProductOut) {
    let rows = w.len().checked_div(cols).unwrap_or(0);
    gemm_float(rows, cols, a, out, |r, act| {
        let row = &w[r * cols..(r + 1) * cols];
        dot_with(
            cols,
            act,
            |i| f16x8(&row[i..]),
            |k| f16_to_f32(row[k].to_bits()),
        )
    })
}

fn gemm_bf16(w: &[bf16], a: &[f32], cols: usize, out: ProductOut) {
    let rows = w.len().checked_div(cols).unwrap_or(0);
    let conv = |b: bf16| f32::from_bits((b.to_bits() as u32) << 16);
    gemm_float(rows, cols, a, out, |r, act| {
        let row = &w[r * cols..(r + 1) * cols];
        dot_with(cols, act, |i| bf16x8(&row[i..]), |k| conv(row[k]))
    })
}

/// `y += alpha * x`, a product then a sum per element like the scalar loop (no fused multiply-add).
fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    let len = x.len().min(y.len());
    let body = len / 8 * 8;
    let al = f32x8::splat(alpha);
    for i in (0..body).step_by(8) {
        let r = load8(&y[i..]) + al * load8(&x[i..]);
        y[i..i + 8].copy_from_slice(&r.to_array());
    }
    for (acc, &v) in y[body..len].iter_mut().zip(&x[body..len]) {
        *acc += alpha * v;
    }
}
