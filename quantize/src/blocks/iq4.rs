//! The 4-bit non-linear formats: each nibble indexes [`IQ4_VALUES`], a fixed table of 16 signed levels spaced
//! more closely near zero, where most weights are (llama.cpp's `kvalues_iq4nl`).
//!
//! - IQ4_NL: 32 weights in 18 bytes, one f16 scale and 16 bytes of nibbles (Q4_0's layout); weight =
//!   `d * IQ4_VALUES[q]`.
//! - IQ4_XS: 256 weights in 136 bytes (4.25 bits per weight): one f16 super-scale, a 6-bit scale per 32 weights
//!   (`scales_l`: the low 4 bits, two per byte; `scales_h`: the high 2 bits, eight in a u16), 128 bytes of
//!   nibbles; weight = `d * (ls - 32) * IQ4_VALUES[q]`.
//!
//! The quantizers are ggml's `quantize_iq4_nl` / `quantize_iq4_xs` without an importance matrix (what
//! llama-quantize runs), operation by operation: the first scale from the signed weight of largest magnitude,
//! then 15 trial inverse scales `(itry - 127) / max`, each solved for the weighted least-squares scale with
//! weights `x^2`, the best kept; IQ4_XS then quantizes the eight sub-block scales to 6 bits against the
//! super-scale and re-picks every nibble for its rounded scale. Same f32 rounding at every step, no fused
//! multiply-adds, ggml's first-wins and half-to-even tie breaks. `tests/iq4_vectors.rs` checks them against
//! bytes made by ggml's own C code.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::kquant::{GROUP_MAX_EPS, nearest_int};
use super::{BLOCK_LEN, QK_K, check_block_lengths, check_lengths};

/// The 16 levels a nibble stands for (ggml's `kvalues_iq4nl`).
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// One IQ4_NL block as ggml lays it out (`block_iq4_nl`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockIQ4NL {
    pub d: f16,
    /// Byte `j` holds weight `j`'s level index in its low nibble and weight `j + 16`'s in its high nibble.
    pub qs: [u8; BLOCK_LEN / 2],
}

const _: () = assert!(std::mem::size_of::<BlockIQ4NL>() == 18);

/// One IQ4_XS super-block as ggml lays it out (`block_iq4_xs`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockIQ4XS {
    pub d: f16,
    /// Bits `2i, 2i + 1`: the high 2 bits of sub-block `i`'s 6-bit scale.
    pub scales_h: u16,
    /// Byte `i / 2`, nibble `i % 2`: the low 4 bits of sub-block `i`'s scale.
    pub scales_l: [u8; QK_K / 64],
    /// Sub-block `i`'s 32 nibbles at `16 i..16 i + 16`, in IQ4_NL's order.
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(std::mem::size_of::<BlockIQ4XS>() == 136);

impl BlockIQ4XS {
    /// Sub-block `i`'s scale, `-32..=31`.
    pub fn scale(&self, i: usize) -> i32 {
        let low = (self.scales_l[i / 2] >> (4 * (i % 2))) & 0x0f;
        let high = (self.scales_h >> (2 * i)) & 3;
        (low as i32 | (high as i32) << 4) - 32
    }
}

/// ggml's `best_index_int8` over [`IQ4_VALUES`]: the level nearest to `x` (the upper one on a tie), by bisection.
fn best_index(x: f32) -> u8 {
    let val = &IQ4_VALUES;
    if x <= val[0] as f32 {
        return 0;
    }
    if x >= val[15] as f32 {
        return 15;
    }
    let (mut ml, mut mu) = (0, 15);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < val[mav] as f32 {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - (val[mu - 1] as f32) < (val[mu] as f32) - x {
        mu as u8 - 1
    } else {
        mu as u8
    }
}

/// Trial inverse scales on either side of the first guess, as llama-quantize asks (`ntry`).
const NTRY: i32 = 7;

/// The weighted least-squares scale of 32 weights `x` (weights `x^2`) over [`NTRY`] trials, with their
/// level indices from the first guess in `l` (`quantize_row_iq4_nl_impl`'s per-block part). An all-but-zero
/// block (largest |x| below `GROUP_MAX_EPS`) gets scale 0 and leaves `l` as it was.
fn block_scale(x: &[f32], l: &mut [u8]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let v0 = IQ4_VALUES[0] as f32;
    let sums = |id: f32, l: Option<&mut [u8]>| {
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        let mut l = l;
        for (j, &xj) in x.iter().enumerate() {
            let idx = best_index(id * xj);
            if let Some(l) = l.as_deref_mut() {
                l[j] = idx;
            }
            let q = IQ4_VALUES[idx as usize] as f32;
            let w = xj * xj;
            sumqx += w * q * xj;
            sumq2 += w * q * q;
        }
        (sumqx, sumq2)
    };
    let d = -max / v0;
    let (sumqx, sumq2) = sums(1.0 / d, Some(l));
    let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
    let mut best = d * sumqx;
    for itry in -NTRY..=NTRY {
        let id = (itry + IQ4_VALUES[0] as i32) as f32 / max;
        let (sumqx, sumq2) = sums(id, None);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

/// Packs 32 level indices into IQ4's 16 bytes: byte `j` = `l[j] | l[j + 16] << 4`.
fn pack(l: &[u8], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = l[j] | (l[j + 16] << 4);
    }
}

/// ggml's `quantize_iq4_nl` without an importance matrix (llama-quantize's IQ4_NL).
///
/// Panics if `x.len() != out.len() * 32`.
pub fn quantize_iq4_nl(x: &[f32], out: &mut [BlockIQ4NL]) {
    check_lengths("IQ4_NL", x.len(), out.len());
    for (x, block) in x.chunks_exact(BLOCK_LEN).zip(out.iter_mut()) {
        let mut l = [0u8; BLOCK_LEN];
        let d = block_scale(x, &mut l);
        block.d = f16::from_f32(d);
        // Every index re-picked for the chosen scale (ggml does this in f32, before rounding it to f16).
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (lj, &xj) in l.iter_mut().zip(x) {
            *lj = best_index(id * xj);
        }
        pack(&l, &mut block.qs);
    }
}

/// ggml's `quantize_iq4_xs` without an importance matrix (llama-quantize's IQ4_XS).
///
/// Panics if `x.len() != out.len() * 256`.
pub fn quantize_iq4_xs(x: &[f32], out: &mut [BlockIQ4XS]) {
    check_block_lengths("IQ4_XS", x.len(), out.len(), QK_K);
    for (x, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut l = [0u8; QK_K];
        let mut scales = [0.0f32; QK_K / 32];
        let (mut amax_scale, mut max_scale) = (0.0f32, 0.0f32);
        for (ib, (xb, lb)) in x.chunks_exact(32).zip(l.chunks_exact_mut(32)).enumerate() {
            let d = block_scale(xb, lb);
            scales[ib] = d;
            if d.abs() > amax_scale {
                amax_scale = d.abs();
                max_scale = d;
            }
        }
        let d = -max_scale / 32.0;
        *block = BlockIQ4XS::zeroed();
        block.d = f16::from_f32(d);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (ib, (xb, lb)) in x.chunks_exact(32).zip(l.chunks_exact_mut(32)).enumerate() {
            let ls = nearest_int(id * scales[ib]).clamp(-32, 31);
            // The sub-block's scale in f32 from the f32 super-scale, as ggml picks the indices.
            let dl = d * ls as f32;
            let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            for (lj, &xj) in lb.iter_mut().zip(xb) {
                *lj = best_index(idl * xj);
            }
            let stored = (ls + 32) as u8;
            block.scales_l[ib / 2] |= (stored & 0x0f) << (4 * (ib % 2));
            block.scales_h |= ((stored >> 4) as u16) << (2 * ib);
        }
        for (l, qs) in l.chunks_exact(32).zip(block.qs.chunks_exact_mut(16)) {
            pack(l, qs);
        }
    }
}

/// ggml's `dequantize_row_iq4_nl`: weight = `f32(d) * f32(IQ4_VALUES[q])`.
///
/// Panics if `out.len() != blocks.len() * 32`.
pub fn dequantize_iq4_nl(blocks: &[BlockIQ4NL], out: &mut [f32]) {
    check_lengths("IQ4_NL", out.len(), blocks.len());
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(BLOCK_LEN)) {
        unpack(block.d.to_f32(), &block.qs, values);
    }
}

/// ggml's `dequantize_row_iq4_xs`: weight = `(f32(d) * f32(ls - 32)) * f32(IQ4_VALUES[q])`.
///
/// Panics if `out.len() != blocks.len() * 256`.
pub fn dequantize_iq4_xs(blocks: &[BlockIQ4XS], out: &mut [f32]) {
    check_block_lengths("IQ4_XS", out.len(), blocks.len(), QK_K);
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = block.d.to_f32();
        for (ib, (qs, values)) in block
            .qs
            .chunks_exact(16)
            .zip(values.chunks_exact_mut(32))
            .enumerate()
        {
            unpack(d * block.scale(ib) as f32, qs, values);
        }
    }
}

/// 32 weights of scale `d` from their 16 bytes of level indices.
fn unpack(d: f32, qs: &[u8], values: &mut [f32]) {
    let (low, high) = values.split_at_mut(16);
    for ((&byte, lo), hi) in qs.iter().zip(low).zip(high) {
        *lo = d * IQ4_VALUES[(byte & 0x0f) as usize] as f32;
        *hi = d * IQ4_VALUES[(byte >> 4) as usize] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_index_picks_the_nearest_level_and_the_lower_on_ties() {
        assert_eq!(best_index(-1000.0), 0);
        assert_eq!(best_index(1000.0), 15);
        assert_eq!(best_index(0.0), 8); // -10 and 1: 1 is nearer
        assert_eq!(best_index(-4.5), 8); // halfway between -10 and 1: a tie goes to the upper level
        assert_eq!(best_index(-4.6), 7);
        assert_eq!(best_index(113.0), 15);
        assert_eq!(best_index(101.0), 15); // 89 and 113: exactly halfway, 12 < 12 is false -> upper
        assert_eq!(best_index(100.9), 14);
        assert_eq!(best_index(-127.0), 0);
    }

    #[test]
    fn a_sub_block_scale_round_trips_through_its_bits() {
        let mut b = BlockIQ4XS::zeroed();
        for (i, s) in [-32, -1, 0, 31, 5, -17, 16, -16].into_iter().enumerate() {
            let stored = (s + 32) as u8;
            b.scales_l[i / 2] |= (stored & 0x0f) << (4 * (i % 2));
            b.scales_h |= ((stored >> 4) as u16) << (2 * i);
        }
        let got: Vec<i32> = (0..8).map(|i| b.scale(i)).collect();
        assert_eq!(got, [-32, -1, 0, 31, 5, -17, 16, -16]);
    }

    #[test]
    fn a_zero_block_stores_zero_scales_and_the_level_nearest_zero() {
        let x = [0.0f32; 256];
        let mut nl = [BlockIQ4NL::zeroed(); 8];
        quantize_iq4_nl(&x, &mut nl);
        assert!(nl.iter().all(|b| b.d.to_f32() == 0.0 && b.qs == [0x88; 16]));
        let mut xs = [BlockIQ4XS::zeroed()];
        quantize_iq4_xs(&x, &mut xs);
        assert_eq!(xs[0].d.to_f32(), 0.0);
        assert!((0..8).all(|i| xs[0].scale(i) == 0));
        assert_eq!(xs[0].qs, [0x88; 128]);
    }
}
