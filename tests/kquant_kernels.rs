//! The k-quant products (Q4_K, Q5_K, Q6_K weights against Q8_K activations) of every kernel set this CPU can run,
//! against the scalar references, on random and extreme blocks of many shapes; and the Q8_K activation
//! quantizer of every set against ggml's (byte-identical).
//!
//! The portable set's products must be bit-identical to the references (it adds the same block terms in the
//! same order). Integer sums must be exact: with `d = dmin = 1` and activation scale 1 the float result is the integer
//! `sum(scale * q * a) - sum(min * bsum)` itself while the magnitudes stay below 2^24. Otherwise results must be
//! within `1e-5 * |reference| + 1e-6 * sum(|terms|)`, as for the 32-blocks (`tests/kernels.rs`).

use bytemuck::Zeroable;
use half::f16;
use quarry::kernels::{self, Kernels, ProductOut, SCALAR};
use quarry_quantize::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, quantize_q8_k};

/// SplitMix64, as in `tests/kernels.rs`.
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
    fn fill(&mut self, bytes: &mut [u8]) {
        for b in bytes {
            *b = self.next() as u8;
        }
    }
}

fn sets() -> Vec<&'static Kernels> {
    let all = kernels::available();
    assert_eq!(all[0].name, "scalar");
    all.into_iter().skip(1).collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Unit scales: results are exact integers.
    Exact,
    /// All quants, scales and mins at their largest (and activations at +-127): the integer extremes.
    Extreme,
    Random,
    /// Zero, negative zero, subnormal and large f16 super-scales mixed in.
    Odd,
}

const KINDS: [Kind; 4] = [Kind::Exact, Kind::Extreme, Kind::Random, Kind::Odd];

fn super_scale(rng: &mut Rng, kind: Kind) -> f16 {
    match kind {
        Kind::Exact | Kind::Extreme => f16::ONE,
        Kind::Random => f16::from_f32(rng.f32() * 0.01),
        Kind::Odd => match rng.below(5) {
            0 => f16::ZERO,
            1 => f16::NEG_ZERO,
            2 => f16::from_bits(1 + rng.below(0x3ff) as u16),
            3 => f16::from_f32(100.0 * rng.f32()),
            _ => f16::from_f32(rng.f32()),
        },
    }
}

fn q4_k(rng: &mut Rng, n: usize, kind: Kind) -> Vec<BlockQ4K> {
    (0..n)
        .map(|_| {
            let mut b = BlockQ4K::zeroed();
            if kind == Kind::Extreme {
                b.scales = [0xff; 12];
                b.qs = [0xff; 128];
            } else {
                rng.fill(&mut b.scales);
                rng.fill(&mut b.qs);
            }
            b.d = super_scale(rng, kind);
            b.dmin = super_scale(rng, kind);
            b
        })
        .collect()
}

fn q5_k(rng: &mut Rng, n: usize, kind: Kind) -> Vec<BlockQ5K> {
    (0..n)
        .map(|_| {
            let mut b = BlockQ5K::zeroed();
            if kind == Kind::Extreme {
                b.scales = [0xff; 12];
                b.qh = [0xff; 32];
                b.qs = [0xff; 128];
            } else {
                rng.fill(&mut b.scales);
                rng.fill(&mut b.qh);
                rng.fill(&mut b.qs);
            }
            b.d = super_scale(rng, kind);
            b.dmin = super_scale(rng, kind);
            b
        })
        .collect()
}

fn q6_k(rng: &mut Rng, n: usize, kind: Kind) -> Vec<BlockQ6K> {
    (0..n)
        .map(|_| {
            let mut b = BlockQ6K::zeroed();
            if kind == Kind::Extreme {
                // Quant 0 (value -32) everywhere and scale -128: the largest positive products with a = -127.
                b.scales = [-128; 16];
            } else {
                rng.fill(&mut b.ql);
                rng.fill(&mut b.qh);
                rng.fill(bytemuck::cast_slice_mut(&mut b.scales));
            }
            b.d = super_scale(rng, kind);
            b
        })
        .collect()
}

/// Activations as the Q8_K quantizer makes them: quants in -127..=127 and their 16-sums.
fn q8_k(rng: &mut Rng, n: usize, kind: Kind) -> Vec<BlockQ8K> {
    (0..n)
        .map(|_| {
            let mut b = BlockQ8K::zeroed();
            for q in &mut b.qs {
                *q = match kind {
                    Kind::Extreme => -127,
                    _ => (rng.below(255) as i32 - 127) as i8,
                };
            }
            for (s, g) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
                *s = g.iter().map(|&q| q as i16).sum();
            }
            b.d = match kind {
                Kind::Exact | Kind::Extreme => 1.0,
                Kind::Random => rng.f32() * 0.1,
                Kind::Odd => [0.0, -0.0, 1e-30, 1e4, rng.f32()][rng.below(5) as usize],
            };
            b
        })
        .collect()
}

/// Per block: the exact integer result with unit super-scales, and the sum of the absolute integer terms.
fn exact_q4_k(w: &BlockQ4K, a: &BlockQ8K, high_bits: Option<&[u8; 32]>) -> (i64, i64) {
    let (mut exact, mut abs) = (0i64, 0i64);
    for i in 0..256 {
        let (c, l, hi) = (i / 64, i % 32, (i % 64) >= 32);
        let byte = w.qs[32 * c + l];
        let mut q = if hi { byte >> 4 } else { byte & 15 } as i64;
        if let Some(qh) = high_bits {
            q |= (((qh[l] >> (2 * c + hi as usize)) & 1) as i64) << 4;
        }
        let (sc, _) = w.scale_min(i / 32);
        let t = sc as i64 * q * a.qs[i] as i64;
        exact += t;
        abs += t.abs();
    }
    for j in 0..8 {
        let (_, m) = w.scale_min(j);
        let t = m as i64 * (a.bsums[2 * j] as i64 + a.bsums[2 * j + 1] as i64);
        exact -= t;
        abs += t.abs();
    }
    (exact, abs)
}

fn exact_q5_k(w: &BlockQ5K, a: &BlockQ8K) -> (i64, i64) {
    // Q5_K's low nibbles and scales are laid out as Q4_K's.
    let as_q4 = BlockQ4K {
        d: w.d,
        dmin: w.dmin,
        scales: w.scales,
        qs: w.qs,
    };
    exact_q4_k(&as_q4, a, Some(&w.qh))
}

fn exact_q6_k(w: &BlockQ6K, a: &BlockQ8K) -> (i64, i64) {
    let (mut exact, mut abs) = (0i64, 0i64);
    for i in 0..256 {
        let t = w.scales[i / 16] as i64 * (w.quant(i) as i64 - 32) * a.qs[i] as i64;
        exact += t;
        abs += t.abs();
    }
    (exact, abs)
}

/// A value no kernel computes: output positions a kernel must not write hold it and are compared by bits.
const UNTOUCHED: u32 = 0x7fc0_2a2a;

const ROWS: [usize; 5] = [1, 3, 4, 8, 17];
const TOKENS: [usize; 9] = [1, 2, 3, 4, 7, 8, 9, 16, 33];
const BLOCKS: [usize; 5] = [1, 2, 3, 4, 7];

type Gemm<W> = fn(&[W], &[BlockQ8K], usize, ProductOut);

/// Runs one product on every set for the grid of shapes and checks it as the module doc says.
fn check_product<W>(
    what: &str,
    seed: u64,
    weights: fn(&mut Rng, usize, Kind) -> Vec<W>,
    gemm: fn(&Kernels) -> Gemm<W>,
    exact: fn(&W, &BlockQ8K) -> (i64, i64),
    scales: fn(&W) -> (f32, f32),
) {
    let mut rng = Rng(seed);
    let mut shapes = vec![];
    for rows in ROWS {
        for n in TOKENS {
            for bpr in BLOCKS {
                shapes.push((rows, n, bpr));
            }
        }
    }
    shapes.push((5, 130, 2));
    for k in sets() {
        for &(rows, n, bpr) in &shapes {
            for kind in KINDS {
                let w = weights(&mut rng, rows * bpr, kind);
                let a = q8_k(&mut rng, n * bpr, kind);
                let mut want = vec![0.0f32; n * rows];
                gemm(&SCALAR)(&w, &a, bpr, ProductOut::new(&mut want, n, rows));
                for ldo in [rows, rows + 3] {
                    let mut got = vec![f32::from_bits(UNTOUCHED); (n - 1) * ldo + rows + 5];
                    gemm(k)(&w, &a, bpr, ProductOut::with_stride(&mut got, n, rows, ldo));
                    let ctx = |t: usize, r: usize| {
                        format!(
                            "{what} on {}: {kind:?}, rows {rows}, tokens {n}, blocks {bpr}, stride {ldo}: token {t}, row {r}",
                            k.name
                        )
                    };
                    for (i, v) in got.iter().enumerate() {
                        if i % ldo >= rows || i >= (n - 1) * ldo + rows {
                            assert_eq!(
                                v.to_bits(),
                                UNTOUCHED,
                                "{}: wrote position {i}",
                                ctx(i / ldo, i % ldo)
                            );
                        }
                    }
                    for t in 0..n {
                        for r in 0..rows {
                            let (mut sum, mut bound, mut mag) = (0i64, 0i64, 0.0f32);
                            for b in 0..bpr {
                                let (bw, ba) = (&w[r * bpr + b], &a[t * bpr + b]);
                                let (e, abs) = exact(bw, ba);
                                let (d, dmin) = scales(bw);
                                sum += e;
                                bound += abs;
                                mag += (d.abs().max(dmin.abs()) * ba.d.abs()) * abs as f32;
                            }
                            let (g, want) = (got[t * ldo + r], want[t * rows + r]);
                            if matches!(kind, Kind::Exact | Kind::Extreme) && bound < 1 << 24 {
                                assert_eq!(
                                    want,
                                    sum as f32,
                                    "{}: scalar reference not exact",
                                    ctx(t, r)
                                );
                                assert_eq!(
                                    g,
                                    sum as f32,
                                    "{}: not the exact integer result",
                                    ctx(t, r)
                                );
                            } else if k.name == "portable" {
                                // The portable set adds the same block terms in the same order.
                                assert_eq!(
                                    g.to_bits(),
                                    want.to_bits(),
                                    "{}: portable differs from scalar ({g} vs {want})",
                                    ctx(t, r)
                                );
                            } else {
                                let tol = 1e-5 * want.abs() + 1e-6 * mag;
                                assert!(
                                    (g - want).abs() <= tol || (g.is_nan() && want.is_nan()),
                                    "{}: got {g}, scalar {want}, tolerance {tol}",
                                    ctx(t, r)
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn gemm_q4_k_matches_scalar() {
    check_product(
        "gemm_q4_k",
        11,
        q4_k,
        |k| k.gemm_q4_k,
        |w, a| exact_q4_k(w, a, None),
        |w| (w.d.to_f32(), w.dmin.to_f32()),
    );
}

#[test]
fn gemm_q5_k_matches_scalar() {
    check_product(
        "gemm_q5_k",
        12,
        q5_k,
        |k| k.gemm_q5_k,
        exact_q5_k,
        |w| (w.d.to_f32(), w.dmin.to_f32()),
    );
}

#[test]
fn gemm_q6_k_matches_scalar() {
    check_product(
        "gemm_q6_k",
        13,
        q6_k,
        |k| k.gemm_q6_k,
        exact_q6_k,
        |w| (w.d.to_f32(), 0.0),
    );
}

/// K-quant rows interleaved in groups of 16 (`kernels::q4_k::interleave`, `kernels::q6_k::interleave`; the rows
/// past the last whole group as they lie), in every set that reads them so, against the same set's product over
/// the rows as they lie, by bits (and `gemm_q4_k_matches_scalar`, `gemm_q6_k_matches_scalar` hold those to the
/// reference): every token count of the row lanes' passes (up to 8) and of the tile unit's (whole tiles of 16, a
/// last partial one from 8), several chunks of 64, blocks 1 to 4.
fn check_interleaved<W: bytemuck::Pod>(
    what: &str,
    seed: u64,
    weights: fn(&mut Rng, usize, Kind) -> Vec<W>,
    interleave: fn(&[W], usize, &mut [u8]),
    gemm: fn(&Kernels) -> Gemm<W>,
    interleaved: fn(&Kernels) -> Option<kernels::InterleavedKGemm>,
) {
    let mut rng = Rng(seed);
    let tokens: Vec<usize> = (1..=34).chain([47, 48, 64, 65, 129, 263]).collect();
    let mut tested = vec![];
    for k in sets() {
        let Some(packed_gemm) = interleaved(k) else {
            continue;
        };
        tested.push(k.name);
        for rows in [16, 37, 48] {
            for bpr in [1, 2, 4] {
                for &n in &tokens {
                    for kind in KINDS {
                        let w = weights(&mut rng, rows * bpr, kind);
                        let a = q8_k(&mut rng, n * bpr, kind);
                        let grouped = rows / 16 * 16 * bpr;
                        let mut packed = bytemuck::cast_slice::<_, u8>(&w).to_vec();
                        interleave(&w[..grouped], bpr, &mut packed[..grouped * size_of::<W>()]);
                        let mut want = vec![0.0f32; n * rows];
                        gemm(k)(&w, &a, bpr, ProductOut::new(&mut want, n, rows));
                        for ldo in [rows, rows + 5] {
                            let mut got = vec![f32::from_bits(UNTOUCHED); (n - 1) * ldo + rows + 5];
                            packed_gemm(
                                &packed,
                                &a,
                                bpr,
                                ProductOut::with_stride(&mut got, n, rows, ldo),
                            );
                            let ctx = format!(
                                "interleaved {what} on {}: {kind:?}, {rows} rows, {n} tokens, {bpr} blocks, stride {ldo}",
                                k.name
                            );
                            for (i, v) in got.iter().enumerate() {
                                let inside = i % ldo < rows && i < (n - 1) * ldo + rows;
                                if inside {
                                    let w = want[i / ldo * rows + i % ldo];
                                    assert_eq!(
                                        v.to_bits(),
                                        w.to_bits(),
                                        "{ctx}: token {}, row {}: {v:e} against {w:e} from the rows",
                                        i / ldo,
                                        i % ldo
                                    );
                                } else {
                                    assert_eq!(v.to_bits(), UNTOUCHED, "{ctx}: wrote position {i}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!("interleaved {what} on: {}", tested.join(", "));
}

#[test]
fn interleaved_q4_k_is_the_row_product_by_bits() {
    check_interleaved(
        "q4_k",
        14,
        q4_k,
        kernels::q4_k::interleave,
        |k| k.gemm_q4_k,
        |k| k.gemm_q4_k_interleaved,
    );
}

#[test]
fn interleaved_q6_k_is_the_row_product_by_bits() {
    check_interleaved(
        "q6_k",
        15,
        q6_k,
        kernels::q6_k::interleave,
        |k| k.gemm_q6_k,
        |k| k.gemm_q6_k_interleaved,
    );
}

/// Every set's Q8_K quantizer gives ggml's bytes (the quantize crate's `quantize_q8_k`, itself checked against
/// ggml's output in `quantize/tests`), on ordinary, tiny, huge, tied and all-zero rows.
#[test]
fn quantize_q8_k_is_byte_identical() {
    let mut rng = Rng(14);
    let mut rows: Vec<Vec<f32>> = vec![];
    for len in [256, 512, 1024] {
        for mag in [1.0f32, 1e-3, 1e3, 1e-20, 1e-38, 1e30] {
            rows.push((0..len).map(|_| rng.f32() * mag).collect());
        }
    }
    rows.push(vec![0.0; 256]);
    rows.push(vec![-0.0; 256]);
    // The largest magnitude negative, and ties: x.5 after scaling by 127 / 127.
    let mut ties: Vec<f32> = (0..256).map(|i| (i % 64) as f32 - 31.5).collect();
    ties[3] = -127.0;
    rows.push(ties);
    rows.push((0..256).map(|i| f32::from_bits(i * 7)).collect());
    for x in rows {
        let nb = x.len() / 256;
        let mut want = vec![BlockQ8K::zeroed(); nb];
        quantize_q8_k(&x, &mut want);
        for k in kernels::available() {
            let mut got = vec![
                BlockQ8K {
                    d: 9.0,
                    qs: [9; 256],
                    bsums: [9; 16]
                };
                nb
            ];
            (k.quantize_q8_k)(&x, &mut got);
            let (w, g): (&[u8], &[u8]) = (bytemuck::cast_slice(&want), bytemuck::cast_slice(&got));
            assert!(
                w == g,
                "quantize_q8_k on {} differs for a row starting {:?}",
                k.name,
                &x[..4]
            );
        }
    }
}
