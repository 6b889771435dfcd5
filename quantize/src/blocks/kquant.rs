//! Arithmetic shared by the k-quant reference quantizers (Q4_K, Q5_K, Q6_K, Q8_K), written from the behaviour of
//! ggml's `ggml-quants.c` (llama.cpp b4748) so that every rounding step happens in the same f32 operation, in the
//! same order, as in the C code llama-quantize runs.
//!
//! Float rules that matter for byte-identical output:
//! * every product and sum is its own rounded f32 operation. ggml's quantizers live in `libggml-base`, which x86-64
//!   builds compile without `-mfma`, so the C compiler cannot contract `a*b + c` into a fused multiply-add; Rust
//!   never contracts on its own, so `mul_add` must simply never appear here;
//! * sums are accumulated left to right, one element at a time (no pairwise or vectorised reductions);
//! * `a * b * c` is `(a * b) * c`, and integers are converted to f32 exactly where C converts them;
//! * rounding to an integer is [`nearest_int`] (round half to even), not `f32::round` (half away from zero);
//! * on ties in a max search the first element wins (`>` comparisons, never `>=`).

/// ggml's `nearest_int`: rounds to the nearest integer, halves to even, by adding 1.5 * 2^23 (which moves the value
/// into the binade where the f32 spacing is exactly 1, so the addition itself rounds) and reading the integer from
/// the low mantissa bits. Exact for |v| < 2^22; larger or non-finite inputs give an arbitrary value, as in C, and
/// callers clamp the result. Never panics.
#[inline]
pub(crate) fn nearest_int(v: f32) -> i32 {
    let shifted = v + 12_582_912.0;
    (shifted.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// Below this largest |x| a group counts as all zero (ggml's `GROUP_MAX_EPS`).
pub(crate) const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `make_qkx2_quants` for the asymmetric formats (Q4_K, Q5_K): finds `scale` and `min` so that
/// `x[i] ≈ scale * q[i] - min` with `q[i]` in `0..=nmax`, minimising the `weights`-weighted squared error.
///
/// It starts from the plain min/max mapping, then tries `nstep + 1` slightly different inverse scales
/// `(rmin + rdelta * is + nmax) / (max - min)`; for each it rounds the quants and solves the 2x2 weighted
/// least-squares problem for scale and min in closed form, keeping the candidate only when its error is strictly
/// smaller. `min` is never positive (a group of positive values is quantized from 0). Writes the quants to `l`
/// and returns `(scale, -min)` (the second value is what the block stores: a non-negative offset).
pub(crate) fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_mad = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_mad += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut aux = [0u8; 32];
    let aux = &mut aux[..n];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0.0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                mad += weights[i] * (diff * diff);
            }
            if mad < best_mad {
                l[..n].copy_from_slice(aux);
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights, as Q6_K uses it: a symmetric scale for
/// `x[i] ≈ scale * (q[i] - nmax)` with `q[i] - nmax` in `-nmax..nmax`, weighting each value's squared error by
/// `x[i]^2`.
///
/// The first scale maps the signed value of largest magnitude (the first on ties) to `-nmax`; then 18 nearby
/// inverse scales `-(nmax + 0.1 * is) / max` (is = -9..=9, not 0) are tried and one replaces the best so far when
/// its least-squares fit is strictly better. Writes `q[i]` (offset by `nmax`, so `0..2*nmax`) to `l` and returns
/// the scale; an all-zero group (largest |x| below [`GROUP_MAX_EPS`]) gets quants 0 and scale 0.
pub(crate) fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [u8]) -> f32 {
    let n = x.len();
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // The weighted sums of one candidate inverse scale.
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let q = quant(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let mut iscale = -nmax_f / max;
    for (q, &v) in l.iter_mut().zip(x) {
        *q = (quant(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax_f + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (q, &v) in l.iter_mut().zip(x) {
                *q = (quant(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Packs eight 6-bit scales and eight 6-bit mins (each `0..=63`) into the 12 bytes Q4_K and Q5_K store:
/// bytes 0..4 hold scales 0..4 in their low 6 bits, bytes 4..8 mins 0..4; bytes 8..12 hold the low nibbles of
/// scale `j` (low) and min `j` (high) for j = 4..8, whose top two bits go to the top bits of bytes `j - 4`
/// (scales) and `j` (mins).
pub(crate) fn pack_scales_mins(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..4 {
        out[j] = scales[j] | ((scales[j + 4] >> 4) << 6);
        out[j + 4] = mins[j] | ((mins[j + 4] >> 4) << 6);
        out[j + 8] = (scales[j + 4] & 0x0F) | ((mins[j + 4] & 0x0F) << 4);
    }
    out
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of 32-weight group `j` (0..8) from the packed 12 bytes.
#[inline]
pub(crate) fn unpack_scale_min(j: usize, packed: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// The shared front half of the Q4_K and Q5_K reference quantizers (`quantize_row_q{4,5}_K_ref`) for one
/// 256-weight block: per 32-weight group a `make_qkx2_quants` fit with weights `sqrt(mean(x^2)) + |x|`, then the
/// group scales and mins quantized to 6 bits against the largest of each, the two f16 super-scales, and the
/// quants recomputed from the stored (rounded) scales. Returns `(d, dmin, packed scales, quants 0..=nmax)`.
pub(crate) fn quantize_asymmetric_block(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> (half::f16, half::f16, [u8; 12], [u8; 256]) {
    let mut l = [0u8; 256];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for (j, group) in x.chunks_exact(32).enumerate() {
        let mut sum_x2 = 0.0f32;
        for &v in group {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| av_x + group[i].abs());
        let (scale, min) = make_qkx2_quants(
            nmax,
            group,
            &weights,
            &mut l[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
        );
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // C stores nearest_int's result in a uint8_t before clamping: a (pathological) negative scale wraps to a large
    // value and clamps to 63 rather than to 0.
    let six_bits = |v: f32| (nearest_int(v) as u8).min(63);
    let ls: [u8; 8] = std::array::from_fn(|j| six_bits(inv_scale * scales[j]));
    let lm: [u8; 8] = std::array::from_fn(|j| six_bits(inv_min * mins[j]));
    let packed = pack_scales_mins(&ls, &lm);
    let d = half::f16::from_f32(max_scale / 63.0);
    let dmin = half::f16::from_f32(max_min / 63.0);

    for (j, group) in x.chunks_exact(32).enumerate() {
        let (sc, m) = unpack_scale_min(j, &packed);
        let dj = d.to_f32() * sc as f32;
        // A group whose scale rounds to 0 keeps the quants of its fit (they dequantize to -dm whatever they are).
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for (q, &v) in l[32 * j..32 * j + 32].iter_mut().zip(group) {
            *q = nearest_int((v + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        let cases = [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (-2.5, -2),
            (0.499_999_97, 0),
            (3.7, 4),
            (-3.7, -4),
            (127.0, 127),
            (-128.0, -128),
            (4_194_303.0, 4_194_303),
        ];
        for (v, want) in cases {
            assert_eq!(nearest_int(v), want, "{v}");
        }
        // Out of range and non-finite: some value, no panic.
        let _ = (
            nearest_int(f32::NAN),
            nearest_int(f32::INFINITY),
            nearest_int(1e30),
        );
    }

    #[test]
    fn scale_min_packing_round_trips() {
        let scales: [u8; 8] = [0, 63, 17, 32, 48, 1, 62, 15];
        let mins: [u8; 8] = [63, 0, 31, 16, 5, 60, 33, 47];
        let packed = pack_scales_mins(&scales, &mins);
        for j in 0..8 {
            assert_eq!(
                unpack_scale_min(j, &packed),
                (scales[j], mins[j]),
                "group {j}"
            );
        }
    }
}
