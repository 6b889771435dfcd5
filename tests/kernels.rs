//! Every kernel set this CPU can run, against the scalar reference, on random and extreme blocks of many shapes.
//!
//! Integer block sums must be exact: with every scale 1.0 the float result is the integer sum itself, as long
//! as all partial sums stay below 2^24 (checked per case; then any difference is an integer error).
//! Float results must be within `1e-5 * |reference| + 1e-6 * sum(|terms|)`: a float sum is only defined up to
//! rounding relative to the magnitude of its terms (the scalar's own error bound is about `len * 2^-24 *
//! sum|terms|`), so near-zero results of large cancelling terms need that floor; 1e-6 is far below any real
//! kernel mistake, which changes at least one whole term.

use half::{bf16, f16};
use quarry::kernels::{self, Kernels, ProductOut, SCALAR};
use quarry_quantize::blocks::{BlockIQ4NL, BlockIQ4XS, BlockQ4_0, BlockQ8_0, IQ4_VALUES};

/// SplitMix64: small, seeded, good enough to spread test values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn i8(&mut self) -> i8 {
        self.next() as i8
    }
}

fn sets() -> Vec<&'static Kernels> {
    let all = kernels::available();
    assert_eq!(all[0].name, "scalar");
    eprintln!(
        "kernel sets: {}",
        all.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
    );
    all.into_iter().skip(1).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Block generators.

#[derive(Clone, Copy, Debug)]
enum Scales {
    One,
    Random,
    /// Zero, -0.0, subnormal and large f16 scales mixed in.
    Odd,
}

#[derive(Clone, Copy, Debug)]
enum Values {
    Random,
    /// Only the extremes (-128/127 weights, -127/127 activations, 0/15 nibbles).
    Extreme,
    Small,
}

fn scale(rng: &mut Rng, s: Scales) -> f16 {
    match s {
        Scales::One => f16::ONE,
        Scales::Random => f16::from_f32(rng.f32() * 0.1),
        Scales::Odd => match rng.below(6) {
            0 => f16::ZERO,
            1 => f16::NEG_ZERO,
            2 => f16::from_bits(1 + rng.below(0x3ff) as u16),
            3 => f16::from_bits(0x8000 | (1 + rng.below(0x3ff) as u16)),
            4 => f16::from_f32(1000.0 * rng.f32()),
            _ => f16::from_f32(rng.f32()),
        },
    }
}

fn q8_weights(rng: &mut Rng, n: usize, s: Scales, v: Values) -> Vec<BlockQ8_0> {
    (0..n)
        .map(|_| {
            let mut qs = [0i8; 32];
            for q in &mut qs {
                *q = match v {
                    Values::Random => rng.i8(),
                    Values::Extreme => [-128, 127][rng.below(2) as usize],
                    Values::Small => rng.below(5) as i8 - 2,
                };
            }
            BlockQ8_0 {
                d: scale(rng, s),
                qs,
            }
        })
        .collect()
}

/// Activation blocks: quants in -127..=127, as `quantize_q8_0` makes them.
fn q8_acts(rng: &mut Rng, n: usize, s: Scales, v: Values) -> Vec<BlockQ8_0> {
    let mut b = q8_weights(rng, n, s, v);
    for blk in &mut b {
        for q in &mut blk.qs {
            *q = (*q).max(-127);
        }
    }
    b
}

fn q4_weights(rng: &mut Rng, n: usize, s: Scales, v: Values) -> Vec<BlockQ4_0> {
    (0..n)
        .map(|_| {
            let mut qs = [0u8; 16];
            for q in &mut qs {
                *q = match v {
                    Values::Random => rng.next() as u8,
                    Values::Extreme => [0x00, 0xff, 0x0f, 0xf0][rng.below(4) as usize],
                    Values::Small => 0x77 + 0x11 * rng.below(3) as u8,
                };
            }
            BlockQ4_0 {
                d: scale(rng, s),
                qs,
            }
        })
        .collect()
}

/// IQ4_NL blocks: Q4_0's nibbles (the extremes are then levels -127 and 113) read as level indices.
fn iq4_weights(rng: &mut Rng, n: usize, s: Scales, v: Values) -> Vec<BlockIQ4NL> {
    q4_weights(rng, n, s, v)
        .into_iter()
        .map(|b| BlockIQ4NL { d: b.d, qs: b.qs })
        .collect()
}

/// IQ4_XS super-blocks: Q4_0-like nibbles for the levels; sub-block scales random, or only the extremes (-32
/// and 31) with `Values::Extreme`.
fn iq4_xs_weights(rng: &mut Rng, n: usize, s: Scales, v: Values) -> Vec<BlockIQ4XS> {
    (0..n)
        .map(|_| {
            let nibbles = q4_weights(rng, 8, Scales::One, v);
            let mut b = BlockIQ4XS {
                d: scale(rng, s),
                scales_h: rng.next() as u16,
                scales_l: std::array::from_fn(|_| rng.next() as u8),
                qs: std::array::from_fn(|j| nibbles[j / 16].qs[j % 16]),
            };
            if matches!(v, Values::Extreme) {
                // Stored 0 (-32) or 63 (31) per sub-block.
                let (mut h, mut l) = (0u16, [0u8; 4]);
                for ib in 0..8 {
                    let stored = if rng.below(2) == 0 { 0u8 } else { 63 };
                    l[ib / 2] |= (stored & 15) << (4 * (ib % 2));
                    h |= u16::from(stored >> 4) << (2 * ib);
                }
                (b.scales_h, b.scales_l) = (h, l);
            }
            b
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Exact references.

/// The levels of an IQ4_NL block, in activation order.
fn iq4_levels(w: &BlockIQ4NL) -> [i64; 32] {
    std::array::from_fn(|j| {
        let b = w.qs[j % 16];
        IQ4_VALUES[if j < 16 { b & 15 } else { b >> 4 } as usize] as i64
    })
}

/// A value no kernel computes (a NaN with a payload): output positions a kernel must not write are filled with
/// it and compared by bits afterwards.
const UNTOUCHED: u32 = 0x7fc0_2a2a;

/// The row strides each product is checked with: compact (`ldo == rows`) and with gaps between token rows.
fn strides(rows: usize) -> [usize; 2] {
    [rows, rows + 3]
}

/// An output buffer for `n` tokens x `rows` rows at stride `ldo`: exactly the `(n - 1) * ldo + rows` values the
/// contract asks for when `tight`, else with a few more, all holding `UNTOUCHED`.
fn out_buf(rows: usize, n: usize, ldo: usize, tight: bool) -> Vec<f32> {
    let len = (n - 1) * ldo + rows + if tight { 0 } else { 7 };
    vec![f32::from_bits(UNTOUCHED); len]
}

/// Every position of `out` that is not an output (between token rows, past the last) still holds `UNTOUCHED`.
fn check_untouched(what: &str, out: &[f32], rows: usize, ldo: usize) {
    for (i, v) in out.iter().enumerate() {
        if i % ldo >= rows {
            assert_eq!(
                v.to_bits(),
                UNTOUCHED,
                "{what}: wrote out[{i}] (token {}, position {} of a row of {rows} at stride {ldo})",
                i / ldo,
                i % ldo
            );
        }
    }
}

/// Checks `got` (token-major at stride `ldo`) against the scalar `want` (token-major, compact), with each
/// output's exact integer sum and the magnitude of its terms.
#[allow(clippy::too_many_arguments)]
fn check_quant(
    what: &str,
    set: &str,
    rows: usize,
    n: usize,
    bpr: usize,
    got: &[f32],
    ldo: usize,
    want: &[f32],
    term: impl Fn(usize, usize, usize) -> (i64, f32, f32),
) {
    check_untouched(&format!("{what} on {set}"), got, rows, ldo);
    for r in 0..rows {
        for t in 0..n {
            let (mut exact, mut bound, mut mag) = (0i64, 0i64, 0.0f32);
            let mut all_one = true;
            for b in 0..bpr {
                let (isum, scale, abs) = term(r, t, b);
                exact += isum;
                bound += abs as i64;
                mag += scale.abs() * abs;
                all_one &= scale == 1.0;
            }
            let (g, w) = (got[t * ldo + r], want[t * rows + r]);
            let ctx = || {
                format!(
                    "{what} on {set}: rows {rows}, tokens {n}, blocks {bpr}, stride {ldo}: token {t}, row {r}"
                )
            };
            if all_one && bound < 1 << 24 {
                assert_eq!(g, exact as f32, "{} not the exact integer sum", ctx());
                assert_eq!(w, exact as f32, "{}: scalar reference not exact", ctx());
            } else {
                let tol = 1e-5 * w.abs() + 1e-6 * mag;
                assert!(
                    (g - w).abs() <= tol,
                    "{}: got {g}, scalar {w}, tolerance {tol}",
                    ctx()
                );
            }
        }
    }
}

const ROWS: [usize; 6] = [1, 3, 5, 8, 17, 33];
const TOKENS: [usize; 13] = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 47];
const BLOCKS: [usize; 7] = [1, 2, 3, 5, 13, 32, 48];
const KINDS: [(Scales, Values); 6] = [
    (Scales::One, Values::Random),
    (Scales::One, Values::Extreme),
    (Scales::One, Values::Small),
    (Scales::Random, Values::Random),
    (Scales::Odd, Values::Random),
    (Scales::Odd, Values::Extreme),
];

/// Shapes: the grid above, plus a batch past the many-token kernel's 128-token chunk.
fn shapes() -> Vec<(usize, usize, usize)> {
    let mut v = vec![];
    for &rows in &ROWS {
        for &n in &TOKENS {
            for &bpr in &BLOCKS {
                v.push((rows, n, bpr));
            }
        }
    }
    v.push((9, 300, 5));
    v.push((4, 129, 2));
    v
}

/// A product of weights `W` against Q8_0 activations, as a kernel set's table holds it.
type Gemm32<W> = fn(&[W], &[BlockQ8_0], usize, ProductOut);

/// One output's block `b` (weight row `r`, token `t`): its exact integer sum, the f32 scale it is multiplied by,
/// and the sum of its terms' magnitudes.
type Term<'a> = &'a dyn Fn(usize, usize, usize) -> (i64, f32, f32);

/// Every set's product (`gemm` picks it from a table) against the scalar set's, on every shape (rows, tokens,
/// activation blocks per row) and kind of block, at both output strides. `weights(rng, rows, bpr, s, v)` makes a
/// matrix; `term(w, a, bpr)` describes its outputs for `check_quant`.
fn gemm_matches_scalar<W>(
    what: &str,
    seed: u64,
    shapes: Vec<(usize, usize, usize)>,
    weights: impl Fn(&mut Rng, usize, usize, Scales, Values) -> Vec<W>,
    gemm: impl Fn(&Kernels) -> Gemm32<W>,
    term: impl for<'w> Fn(&'w [W], &'w [BlockQ8_0], usize, usize, usize, usize) -> (i64, f32, f32),
) {
    let mut rng = Rng(seed);
    for k in sets() {
        for &(rows, n, bpr) in &shapes {
            for (s, v) in KINDS {
                let w = weights(&mut rng, rows, bpr, s, v);
                let a = q8_acts(&mut rng, n * bpr, s, v);
                let mut want = out_buf(rows, n, rows, true);
                gemm(&SCALAR)(&w, &a, bpr, ProductOut::new(&mut want, n, rows));
                for (i, ldo) in strides(rows).into_iter().enumerate() {
                    let mut got = out_buf(rows, n, ldo, i == 0);
                    gemm(k)(&w, &a, bpr, ProductOut::with_stride(&mut got, n, rows, ldo));
                    let term: Term = &|r, t, b| term(&w, &a, bpr, r, t, b);
                    check_quant(what, k.name, rows, n, bpr, &got, ldo, &want, term);
                }
            }
        }
    }
}

/// `(exact, scale, magnitude)` of a block whose 32 weights are `levels`, against activation block `ba`, with the
/// weight block's scale `dw`.
fn block_term(levels: [i64; 32], dw: f32, ba: &BlockQ8_0) -> (i64, f32, f32) {
    let terms = levels.into_iter().zip(ba.qs).map(|(l, q)| l * q as i64);
    let (exact, abs) = terms.fold((0, 0), |(e, m), p| (e + p, m + p.abs()));
    (exact, dw * ba.d.to_f32(), abs as f32)
}

fn q4_levels(w: &BlockQ4_0) -> [i64; 32] {
    std::array::from_fn(|j| {
        let b = w.qs[j % 16];
        (if j < 16 { b & 15 } else { b >> 4 }) as i64 - 8
    })
}

#[test]
fn gemm_q8_0_matches_scalar() {
    gemm_matches_scalar(
        "gemm_q8_0",
        1,
        shapes(),
        |rng, rows, bpr, s, v| q8_weights(rng, rows * bpr, s, v),
        |k| k.gemm_q8_0,
        |w, a, bpr, r, t, b| {
            let bw = &w[r * bpr + b];
            block_term(bw.qs.map(i64::from), bw.d.to_f32(), &a[t * bpr + b])
        },
    );
}

#[test]
fn gemm_q4_0_matches_scalar() {
    gemm_matches_scalar(
        "gemm_q4_0",
        2,
        shapes(),
        |rng, rows, bpr, s, v| q4_weights(rng, rows * bpr, s, v),
        |k| k.gemm_q4_0,
        |w, a, bpr, r, t, b| {
            let bw = &w[r * bpr + b];
            block_term(q4_levels(bw), bw.d.to_f32(), &a[t * bpr + b])
        },
    );
}

#[test]
fn gemm_iq4_nl_matches_scalar() {
    gemm_matches_scalar(
        "gemm_iq4_nl",
        4,
        shapes(),
        |rng, rows, bpr, s, v| iq4_weights(rng, rows * bpr, s, v),
        |k| k.gemm_iq4_nl,
        |w, a, bpr, r, t, b| {
            let bw = &w[r * bpr + b];
            block_term(iq4_levels(bw), bw.d.to_f32(), &a[t * bpr + b])
        },
    );
}

/// Shapes for IQ4_XS: rows of whole super-blocks (8 activation blocks each).
fn shapes_iq4_xs() -> Vec<(usize, usize, usize)> {
    let mut v = vec![];
    for &rows in &ROWS {
        for &n in &TOKENS {
            for bpr in [8, 16, 48] {
                v.push((rows, n, bpr));
            }
        }
    }
    v.push((9, 300, 8));
    v
}

#[test]
fn gemm_iq4_xs_matches_scalar() {
    gemm_matches_scalar(
        "gemm_iq4_xs",
        5,
        shapes_iq4_xs(),
        |rng, rows, bpr, s, v| iq4_xs_weights(rng, rows * bpr / 8, s, v),
        |k| k.gemm_iq4_xs,
        |w, a, bpr, r, t, b| {
            let bw = &w[r * bpr / 8 + b / 8];
            let sub = BlockIQ4NL {
                d: f16::ONE,
                qs: bw.qs[16 * (b % 8)..16 * (b % 8) + 16].try_into().unwrap(),
            };
            // The sub-block's integer scale multiplies the exact sum; the f32 scale is the super-block's.
            let ls = bw.scale(b % 8) as i64;
            let (exact, scale, abs) = block_term(iq4_levels(&sub), bw.d.to_f32(), &a[t * bpr + b]);
            (exact * ls, scale, abs * ls.unsigned_abs() as f32)
        },
    );
}

/// Rows interleaved in groups of 16 (`kernels::q4_0::interleave`, `kernels::q8_0::interleave`; the rows past the
/// last whole group as they lie), in every set that reads them so, against the same set's product over the rows
/// as they lie, by bits: the layout changes where bytes are, never a result (and `gemm_q4_0_matches_scalar`,
/// `gemm_q8_0_matches_scalar` hold those to the reference). Every token count a pass of up to 16 takes, and then
/// some, for each kind of block.
#[test]
fn interleaved_products_are_the_row_products_by_bits() {
    let mut rng = Rng(3);
    let tokens: Vec<usize> = (1..=34).chain([47, 48, 64, 129]).collect();
    let mut tested = vec![];
    for k in sets() {
        for rows in [16, 37, 48, 64] {
            for bpr in [1, 2, 3, 8, 16, 32] {
                for &n in &tokens {
                    for (s, v) in KINDS {
                        let a = q8_acts(&mut rng, n * bpr, s, v);
                        if let Some(gemm) = k.gemm_q4_0_interleaved {
                            let w = q4_weights(&mut rng, rows * bpr, s, v);
                            let packed = pack(&w, rows, bpr, kernels::q4_0::interleave);
                            let mut want = out_buf(rows, n, rows, true);
                            (k.gemm_q4_0)(&w, &a, bpr, ProductOut::new(&mut want, n, rows));
                            check_interleaved("q4_0", k, gemm, &packed, &a, rows, n, bpr, &want);
                            tested.push(format!("q4_0 on {}", k.name));
                        }
                        if let Some(gemm) = k.gemm_iq4_nl_interleaved {
                            let w = iq4_weights(&mut rng, rows * bpr, s, v);
                            let packed = pack(&w, rows, bpr, kernels::iq4_nl::interleave);
                            let mut want = out_buf(rows, n, rows, true);
                            (k.gemm_iq4_nl)(&w, &a, bpr, ProductOut::new(&mut want, n, rows));
                            check_interleaved("iq4_nl", k, gemm, &packed, &a, rows, n, bpr, &want);
                            tested.push(format!("iq4_nl on {}", k.name));
                        }
                        if let (Some(gemm), true) = (k.gemm_iq4_xs_interleaved, bpr % 8 == 0) {
                            let w = iq4_xs_weights(&mut rng, rows * bpr / 8, s, v);
                            let packed = pack(&w, rows, bpr / 8, kernels::iq4_xs::interleave);
                            let mut want = out_buf(rows, n, rows, true);
                            (k.gemm_iq4_xs)(&w, &a, bpr, ProductOut::new(&mut want, n, rows));
                            check_interleaved("iq4_xs", k, gemm, &packed, &a, rows, n, bpr, &want);
                            tested.push(format!("iq4_xs on {}", k.name));
                        }
                        if let Some(gemm) = k.gemm_q8_0_interleaved {
                            let w = q8_weights(&mut rng, rows * bpr, s, v);
                            let packed = pack(&w, rows, bpr, kernels::q8_0::interleave);
                            let mut want = out_buf(rows, n, rows, true);
                            (k.gemm_q8_0)(&w, &a, bpr, ProductOut::new(&mut want, n, rows));
                            check_interleaved("q8_0", k, gemm, &packed, &a, rows, n, bpr, &want);
                            tested.push(format!("q8_0 on {}", k.name));
                        }
                    }
                }
            }
        }
    }
    tested.sort();
    tested.dedup();
    eprintln!("interleaved products on: {}", tested.join(", "));
}

/// `rows` rows of `bpr` blocks as a model packs them: whole groups interleaved, the rest as they lie.
fn pack<B: bytemuck::Pod>(
    w: &[B],
    rows: usize,
    bpr: usize,
    interleave: fn(&[B], usize, &mut [u8]),
) -> Vec<u8> {
    let bytes: &[u8] = bytemuck::cast_slice(w);
    let mut packed = bytes.to_vec();
    let grouped = rows / 16 * 16 * bpr;
    let split = grouped * size_of::<B>();
    interleave(&w[..grouped], bpr, &mut packed[..split]);
    packed
}

#[allow(clippy::too_many_arguments)]
fn check_interleaved(
    ty: &str,
    k: &Kernels,
    gemm: kernels::InterleavedGemm,
    packed: &[u8],
    a: &[BlockQ8_0],
    rows: usize,
    n: usize,
    bpr: usize,
    want: &[f32],
) {
    for (i, ldo) in strides(rows).into_iter().enumerate() {
        let mut got = out_buf(rows, n, ldo, i == 0);
        gemm(
            packed,
            a,
            bpr,
            ProductOut::with_stride(&mut got, n, rows, ldo),
        );
        let what = format!(
            "interleaved {ty} on {}: {rows} rows, {n} tokens, {bpr} blocks, stride {ldo}",
            k.name
        );
        check_untouched(&what, &got, rows, ldo);
        for t in 0..n {
            for r in 0..rows {
                let (g, w) = (got[t * ldo + r], want[t * rows + r]);
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{what}: token {t}, row {r}: {g:e} against {w:e} from the rows"
                );
            }
        }
    }
}

/// Extreme blocks where the exact sum is known in closed form, so the reference itself is checked too.
#[test]
fn extreme_blocks_give_known_sums() {
    for k in kernels::available() {
        for bpr in [1, 2, 5] {
            let w8 = vec![
                BlockQ8_0 {
                    d: f16::ONE,
                    qs: [-128; 32]
                };
                3 * bpr
            ];
            let w4 = vec![
                BlockQ4_0 {
                    d: f16::ONE,
                    qs: [0x00; 16]
                };
                3 * bpr
            ];
            for n in [1, 9, 16, 20] {
                for av in [-127i8, 127] {
                    let a = vec![
                        BlockQ8_0 {
                            d: f16::ONE,
                            qs: [av; 32]
                        };
                        n * bpr
                    ];
                    let mut out = vec![0.0; 3 * n];
                    (k.gemm_q8_0)(&w8, &a, bpr, ProductOut::new(&mut out, n, 3));
                    let want = (-128 * av as i64 * 32 * bpr as i64) as f32;
                    assert!(
                        out.iter().all(|&o| o == want),
                        "{}: q8 {out:?} != {want}",
                        k.name
                    );
                    (k.gemm_q4_0)(&w4, &a, bpr, ProductOut::new(&mut out, n, 3));
                    let want = (-8 * av as i64 * 32 * bpr as i64) as f32;
                    assert!(
                        out.iter().all(|&o| o == want),
                        "{}: q4 {out:?} != {want}",
                        k.name
                    );
                    // Nibbles 0 and 15 are IQ4_NL's outermost levels, -127 and 113.
                    for (nibbles, level) in [(0x00u8, -127i64), (0xff, 113)] {
                        let wi = vec![
                            BlockIQ4NL {
                                d: f16::ONE,
                                qs: [nibbles; 16]
                            };
                            3 * bpr
                        ];
                        (k.gemm_iq4_nl)(&wi, &a, bpr, ProductOut::new(&mut out, n, 3));
                        let want = (level * av as i64 * 32 * bpr as i64) as f32;
                        assert!(
                            out.iter().all(|&o| o == want),
                            "{}: iq4_nl {out:?} != {want}",
                            k.name
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Activation quantization.

fn quantize_rows() -> Vec<Vec<f32>> {
    let mut rng = Rng(3);
    let mut rows = vec![];
    for len in [32, 64, 96, 1024] {
        for mag in [1.0f32, 1e-3, 1e3, 1e-20, 1e-38, 1e30] {
            rows.push((0..len).map(|_| rng.f32() * mag).collect::<Vec<_>>());
        }
    }
    // Ties: with amax 127 the scale is exactly 1, with amax 63.5 exactly 1/2, so these are x.5 after scaling.
    let mut ties: Vec<f32> = (0..32).map(|i| i as f32 - 15.5).collect();
    ties[0] = 127.0;
    rows.push(ties.clone());
    rows.push(ties.iter().map(|v| -v).collect());
    let mut halves: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.25 + 0.125).collect();
    halves[5] = 63.5;
    rows.push(halves);
    rows.push((0..64).map(|i| (i as f32 - 32.0) + 0.5).collect());
    // Zeros, negative zeros, one non-zero value, denormals.
    rows.push(vec![0.0; 32]);
    rows.push(vec![-0.0; 64]);
    let mut one = vec![0.0f32; 32];
    one[7] = -3.0;
    rows.push(one);
    rows.push((0..32).map(|i| f32::from_bits(i * 3)).collect());
    rows.push((0..32).map(|i| -f32::from_bits(0x0080_0000 + i)).collect());
    rows
}

#[test]
fn quantize_q8_0_is_byte_identical() {
    for k in sets() {
        for x in quantize_rows() {
            let nb = x.len() / 32;
            let mut want = vec![
                BlockQ8_0 {
                    d: f16::ZERO,
                    qs: [0; 32]
                };
                nb
            ];
            let mut got = vec![
                BlockQ8_0 {
                    d: f16::from_f32(9.0),
                    qs: [9; 32]
                };
                nb
            ];
            (SCALAR.quantize_q8_0)(&x, &mut want);
            (k.quantize_q8_0)(&x, &mut got);
            let (w, g): (&[u8], &[u8]) = (bytemuck::cast_slice(&want), bytemuck::cast_slice(&got));
            assert_eq!(
                w,
                g,
                "quantize_q8_0 on {} differs for {:?}",
                k.name,
                &x[..8]
            );
        }
    }
}

#[test]
fn quantize_q8_0_rounds_half_to_even() {
    let mut x: Vec<f32> = (0..32).map(|i| i as f32 - 15.5).collect();
    x[0] = 127.0;
    let mut out = [BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; 32],
    }];
    for k in kernels::available() {
        (k.quantize_q8_0)(&x, &mut out);
        assert_eq!(out[0].d, f16::ONE);
        assert_eq!(out[0].qs[1], -14, "{}: -14.5 -> -14", k.name);
        assert_eq!(out[0].qs[2], -14, "{}: -13.5 -> -14", k.name);
        assert_eq!(out[0].qs[16], 0, "{}: 0.5 -> 0", k.name);
        assert_eq!(out[0].qs[17], 2, "{}: 1.5 -> 2", k.name);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Float kernels.

const COLS: [usize; 11] = [1, 3, 7, 8, 15, 16, 17, 33, 64, 100, 1024];

fn check_float(what: &str, set: &str, got: &[f32], want: &[f32], mags: &[f32]) {
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mags).enumerate() {
        let tol = 1e-5 * w.abs() + 1e-6 * m;
        assert!(
            (g - w).abs() <= tol,
            "{what} on {set}: out[{i}] got {g}, scalar {w}, tolerance {tol}"
        );
    }
}

type FloatGemm<W> = fn(&[W], &[f32], usize, ProductOut);

fn float_case<W: Copy>(
    what: &str,
    conv: impl Fn(f32) -> W,
    back: impl Fn(W) -> f32,
    gemm: impl Fn(&Kernels) -> FloatGemm<W>,
) {
    let mut rng = Rng(4);
    let all = sets();
    for &rows in &[1, 3, 5, 17] {
        for &n in &[1, 2, 3, 7, 16, 19] {
            for &cols in &COLS {
                let w: Vec<W> = (0..rows * cols).map(|_| conv(rng.f32() * 4.0)).collect();
                let a: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                // Token-major, compact: exact (f64) products and their magnitudes, then the scalar kernel,
                // which must agree with them (this pins its layout), and every set against the scalar one.
                let (mut exact, mut mags) = (vec![], vec![]);
                for t in 0..n {
                    for r in 0..rows {
                        let terms = (0..cols)
                            .map(|c| back(w[r * cols + c]) as f64 * a[t * cols + c] as f64);
                        exact.push(terms.clone().sum::<f64>() as f32);
                        mags.push(terms.map(f64::abs).sum::<f64>() as f32);
                    }
                }
                let mut want = out_buf(rows, n, rows, true);
                gemm(&SCALAR)(&w, &a, cols, ProductOut::new(&mut want, n, rows));
                for (i, ((&g, &e), &m)) in want.iter().zip(&exact).zip(&mags).enumerate() {
                    // The scalar's own rounding is up to about cols / 4 * 2^-24 of the magnitude.
                    assert!(
                        (g - e).abs() <= 1e-4 * m,
                        "{what} scalar: out[{i}] {g}, exact {e}"
                    );
                }
                for k in &all {
                    for (i, ldo) in strides(rows).into_iter().enumerate() {
                        let mut got = out_buf(rows, n, ldo, i == 0);
                        gemm(k)(
                            &w,
                            &a,
                            cols,
                            ProductOut::with_stride(&mut got, n, rows, ldo),
                        );
                        let ctx = format!("{what} on {}, stride {ldo}", k.name);
                        check_untouched(&ctx, &got, rows, ldo);
                        let compact: Vec<f32> = (0..n)
                            .flat_map(|t| got[t * ldo..t * ldo + rows].to_vec())
                            .collect();
                        check_float(what, &ctx, &compact, &want, &mags);
                    }
                }
            }
        }
    }
}

#[test]
fn gemm_f32_matches_scalar() {
    float_case("gemm_f32", |x| x, |x| x, |k| k.gemm_f32);
}

#[test]
fn gemm_f16_matches_scalar() {
    float_case("gemm_f16", f16::from_f32, f16::to_f32, |k| k.gemm_f16);
}

#[test]
fn gemm_bf16_matches_scalar() {
    float_case("gemm_bf16", bf16::from_f32, bf16::to_f32, |k| k.gemm_bf16);
}

#[test]
fn f16_and_bf16_special_values_convert_exactly() {
    // Every finite f16 bit pattern, as one row against unit activations at each position in turn.
    let all: Vec<f16> = (0..=u16::MAX)
        .map(f16::from_bits)
        .filter(|v| v.is_finite())
        .collect();
    let allb: Vec<bf16> = (0..=u16::MAX)
        .map(bf16::from_bits)
        .filter(|v| v.is_finite())
        .collect();
    for k in sets() {
        for chunk in all.chunks(64).filter(|c| c.len() == 64) {
            for pos in [0, 13, 63] {
                let mut a = vec![0.0f32; 64];
                a[pos] = 1.0;
                let mut out = [0.0f32];
                (k.gemm_f16)(chunk, &a, 64, ProductOut::new(&mut out, 1, 1));
                assert_eq!(
                    out[0],
                    chunk[pos].to_f32(),
                    "{} f16 {:?}",
                    k.name,
                    chunk[pos]
                );
            }
        }
        for chunk in allb.chunks(64).filter(|c| c.len() == 64) {
            let mut a = vec![0.0f32; 64];
            a[21] = 1.0;
            let mut out = [0.0f32];
            (k.gemm_bf16)(chunk, &a, 64, ProductOut::new(&mut out, 1, 1));
            assert_eq!(out[0], chunk[21].to_f32(), "{} bf16", k.name);
        }
    }
}

#[test]
fn axpy_matches_scalar() {
    let mut rng = Rng(5);
    for k in sets() {
        for len in (0..70).chain([64, 128, 1000, 1024, 4099]) {
            let x: Vec<f32> = (0..len).map(|_| rng.f32()).collect();
            let y: Vec<f32> = (0..len).map(|_| rng.f32()).collect();
            let alpha = rng.f32();
            let mut want = y.clone();
            let mut got = y.clone();
            (SCALAR.axpy_f32)(alpha, &x, &mut want);
            (k.axpy_f32)(alpha, &x, &mut got);
            assert_eq!(
                got, want,
                "axpy_f32 on {} (len {len}) must round as the scalar loop",
                k.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The f32 operations.

use quarry::kernels::ops;

/// Every set's compiled copy of the f32 operations but the scalar references, by set name.
fn ops_copies() -> Vec<(&'static str, ops::Ops)> {
    sets().into_iter().map(|k| (k.name, k.ops)).collect()
}

/// Within 1e-6 relative, or below f32's normal range (where f32 itself has no relative precision left).
fn close(got: &[f32], want: &[f32], what: &str) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= 1e-6 * w.abs() || (g - w).abs() <= f32::MIN_POSITIVE || g == w;
        assert!(ok, "{what}: [{i}] got {g}, scalar {w}");
    }
}

/// Softmax: within 1e-6 relative of the scalar version, or, for long rows, where the scalar's own sequential
/// f32 sum drifts by more than that, no further from the exact (f64) softmax than the scalar is, plus 1e-6.
fn softmax_close(x: &[f32], got: &[f32], want: &[f32], what: &str) {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    for (i, ((&g, &w), &v)) in got.iter().zip(want).zip(x).enumerate() {
        let exact = (v as f64 - max).exp() / sum;
        let (eg, ew) = ((g as f64 - exact).abs(), (w as f64 - exact).abs());
        let ok = (g - w).abs() <= 1e-6 * w.abs()
            || (g - w).abs() <= f32::MIN_POSITIVE
            || eg <= ew + 1e-6 * exact;
        assert!(ok, "{what}: [{i}] got {g}, scalar {w}, exact {exact}");
    }
}

/// One head's attention (transposed keys, row-major values) in every compiled copy against the textbook
/// reference: the summation order differs, so outputs agree to 1e-5 of the largest value magnitude.
#[test]
fn attend_head_matches_scalar() {
    let mut rng = Rng(11);
    for hd in [8usize, 16, 64, 128] {
        for len in [1usize, 2, 7, 16, 33, 100, 300] {
            let stride = len + 5;
            let q: Vec<f32> = (0..hd).map(|_| rng.f32()).collect();
            let kt: Vec<f32> = (0..hd * stride).map(|_| rng.f32()).collect();
            let v: Vec<f32> = (0..len * hd).map(|_| rng.f32() * 2.0).collect();
            let (mut want_s, mut want) = (vec![0.0; len], vec![0.0; hd]);
            let kv = ops::KvBlocks::contiguous(&kt, stride, &v, hd);
            ops::scalar::attend_head(&q, &kv, len, 0.3, &mut want_s, &mut want);
            let bound = 1e-5 * v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let copies: Vec<(&str, ops::AttendBlockFn)> = ops_copies()
                .into_iter()
                .map(|(name, t)| (name, t.attend_block))
                .collect();
            for (name, f) in copies {
                let (mut s, mut got) = (vec![0.0; len + 3], vec![f32::NAN; hd]);
                f(&q, &[len], &kv, 0.3, &mut s, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= bound,
                        "attend {name} hd {hd} len {len}: [{i}] {g} vs {w}"
                    );
                }
            }
        }
    }
}

/// Blocks of queries over one KV head in every compiled copy against the scalar reference (each query the
/// textbook way): many block sizes, head sizes, causal and arbitrary lengths (zero included), key strides
/// exactly the longest length or wider, and NaN in every key and value slot past the longest length, which
/// score tiles may load but must drop.
#[test]
fn attend_block_matches_scalar() {
    let mut rng = Rng(12);
    let copies = ops_copies();
    let mut cases = 0;
    for hd in [8usize, 16, 64, 128] {
        for nq in [1usize, 2, 3, 4, 5, 8, 16, 32] {
            for lmax in [1usize, 7, 16, 63, 64, 65, 255, 257, 300, 1000] {
                if hd * lmax * nq > 2_000_000 {
                    continue;
                }
                for pattern in 0..3 {
                    // Causal: 2 query heads per token, tokens ending at lmax; arbitrary; a zero among them.
                    let lens: Vec<usize> = (0..nq)
                        .map(|j| match pattern {
                            0 => lmax.saturating_sub((nq - 1 - j) / 2).max(1),
                            1 => 1 + rng.below(lmax as u64) as usize,
                            _ => [0, lmax, lmax / 2, 1][j % 4],
                        })
                        .collect();
                    let longest = *lens.iter().max().unwrap();
                    for pad in [0usize, 5] {
                        let stride = longest + pad;
                        // Keys: rows of `stride`, the last one cut at `longest` when there is no padding.
                        let kt_len = (hd - 1) * stride + longest + pad;
                        let kt: Vec<f32> = (0..kt_len)
                            .map(|i| {
                                if i % stride < longest {
                                    rng.f32()
                                } else {
                                    f32::NAN
                                }
                            })
                            .collect();
                        let v: Vec<f32> = (0..(longest + pad) * hd)
                            .map(|i| {
                                if i < longest * hd {
                                    rng.f32() * 3.0
                                } else {
                                    f32::NAN
                                }
                            })
                            .collect();
                        let q: Vec<f32> = (0..nq * hd).map(|_| rng.f32() * 2.0).collect();
                        let scale = 1.0 / (hd as f32).sqrt() * [1.0, 8.0][pattern % 2];
                        let scratch_len = ops::attend_block_scratch(&lens);
                        let mut want_p = vec![f32::NAN; scratch_len];
                        let mut want = vec![f32::NAN; nq * hd];
                        let kv = ops::KvBlocks::contiguous(&kt, stride, &v, hd);
                        ops::scalar::attend_block(&q, &lens, &kv, scale, &mut want_p, &mut want);
                        let vmax = v[..longest * hd].iter().fold(0.0f32, |m, x| m.max(x.abs()));
                        for (name, t) in &copies {
                            let mut p = vec![f32::NAN; scratch_len];
                            let mut got = vec![f32::NAN; nq * hd];
                            (t.attend_block)(&q, &lens, &kv, scale, &mut p, &mut got);
                            let ctx = format!(
                                "attend_block {name}: hd {hd}, nq {nq}, lens {lens:?}, stride {stride}"
                            );
                            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                                assert!(
                                    (g - w).abs() <= 1e-5 * vmax,
                                    "{ctx}: out[{i}] (query {}) {g} vs {w}",
                                    i / hd
                                );
                            }
                            for (j, (row, &len)) in
                                p.chunks_exact(longest.max(1)).zip(&lens).enumerate()
                            {
                                let wrow = &want_p[j * longest..(j + 1) * longest];
                                for (s, (&g, &w)) in row.iter().zip(wrow).enumerate() {
                                    let ok = if s < len {
                                        (g - w).abs() <= 1e-5 * w + 1e-7
                                    } else {
                                        g == 0.0
                                    };
                                    assert!(ok, "{ctx}: probability [{j}][{s}] {g} vs {w}");
                                }
                            }
                        }
                        cases += 1;
                    }
                }
            }
        }
    }
    eprintln!("{cases} attend_block cases");
}

#[test]
fn ops_match_scalar() {
    let copies = ops_copies();
    eprintln!(
        "ops copies: {}",
        copies.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
    );
    let mut rng = Rng(6);
    let mut cases: Vec<(Vec<f32>, Vec<f32>)> = vec![];
    for len in (1..40).chain([64, 100, 1024, 4097]) {
        for mag in [1.0f32, 10.0, 100.0] {
            let x: Vec<f32> = (0..len).map(|_| rng.f32() * mag).collect();
            let u: Vec<f32> = (0..len).map(|_| rng.f32() * 3.0).collect();
            cases.push((x, u));
        }
    }
    // Extremes of exp: overflow to infinity in silu's denominator, underflow to 0 and subnormals in softmax.
    let mut x: Vec<f32> = (0..64).map(|i| -110.0 + i as f32 * 3.5).collect();
    x.extend([-88.0, -87.0, -100.0, -103.5, 0.0, 88.5, 88.7, -0.0]);
    let ones = vec![1.0; x.len()];
    cases.push((x, ones));

    for (x, u) in &cases {
        let len = x.len();
        let mut want_sm = x.clone();
        ops::scalar::softmax(&mut want_sm);
        let mut want_silu = x.clone();
        ops::scalar::silu_mul(&mut want_silu, u);
        let mut want_rms = vec![0.0; len];
        ops::scalar::rms_norm(x, u, 1e-6, &mut want_rms);
        let mut first: Option<Vec<f32>> = None;
        for (name, t) in &copies {
            let mut got = x.clone();
            (t.softmax)(&mut got);
            softmax_close(x, &got, &want_sm, &format!("softmax {name} len {len}"));
            let mut all = got;

            let mut got = x.clone();
            (t.silu_mul)(&mut got, u);
            close(&got, &want_silu, &format!("silu_mul {name} len {len}"));
            all.extend(got);

            let mut got = vec![0.0; len];
            (t.rms_norm)(x, u, 1e-6, &mut got);
            close(&got, &want_rms, &format!("rms_norm {name} len {len}"));
            all.extend(got);

            // Every compiled copy is the same arithmetic, so the same bits.
            let bits: Vec<u32> = all.iter().map(|v| v.to_bits()).collect();
            match &first {
                None => first = Some(all),
                Some(f) => assert_eq!(
                    bits,
                    f.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{name}"
                ),
            }
        }
    }
}

#[test]
fn rope_is_bit_identical() {
    let mut rng = Rng(7);
    for head_dim in [2, 6, 8, 10, 64, 128] {
        let cs: Vec<(f32, f32)> = (0..head_dim / 2)
            .map(|i| ((i as f32 * 0.3).cos(), (i as f32 * 0.3).sin()))
            .collect();
        let x: Vec<f32> = (0..head_dim * 3).map(|_| rng.f32() * 5.0).collect();
        let mut want = x.clone();
        ops::scalar::rope_adjacent_pairs(&mut want, head_dim, &cs);
        for (name, t) in ops_copies() {
            let mut got = x.clone();
            (t.rope)(&mut got, head_dim, &cs);
            assert_eq!(got, want, "{name}: head_dim {head_dim}");
        }
    }
}
