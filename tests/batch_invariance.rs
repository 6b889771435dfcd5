//! Batch invariance: every product kernel of every set this CPU can run gives each token's outputs bit for bit
//! the same whatever else is in the call. A multi-sequence engine multiplies one matrix with the tokens of
//! several sequences at once, and an MoE expert with however many tokens chose it, so a token's result must
//! not depend on how many tokens share the call (1 alone, or 2..40: the few-token, lane and mixed shapes of
//! every set, AVX-512's 8-lane remainders included), on its position among them, or on which rows a thread's
//! share of the matrix holds (`kernels::parallel` splits products by rows).
//!
//! `QUARRY_TEST_SETS=avx2,avx512vnni` narrows the sets (the ones that ran are printed).

use bytemuck::Zeroable;
use half::{bf16, f16};
use quarry::kernels::{self, Kernels, ProductOut, SCALAR};
use quarry_quantize::blocks::{
    BlockIQ4NL, BlockIQ4XS, BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K,
    quantize_q8_k,
};

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
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn fill(&mut self, bytes: &mut [u8]) {
        for b in bytes {
            *b = self.next() as u8;
        }
    }
    fn scale(&mut self) -> f16 {
        f16::from_f32(self.f32() * 0.05)
    }
}

/// The sets under test: every available one, or those `QUARRY_TEST_SETS` names.
fn sets() -> Vec<&'static Kernels> {
    let all = kernels::available();
    let chosen: Vec<&'static Kernels> = match std::env::var("QUARRY_TEST_SETS") {
        Ok(list) if !list.trim().is_empty() => {
            let names: Vec<&str> = list.split(',').map(str::trim).collect();
            for n in &names {
                assert!(
                    all.iter().any(|k| k.name == *n),
                    "QUARRY_TEST_SETS names {n}, which this CPU does not have"
                );
            }
            all.into_iter()
                .filter(|k| names.contains(&k.name))
                .collect()
        }
        _ => all,
    };
    eprintln!(
        "batch invariance on: {}",
        chosen.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
    );
    chosen
}

/// Distinct activation rows a batch is drawn from.
const POOL: usize = 40;
/// Batches of 1..=MAX_TOKENS tokens.
const MAX_TOKENS: usize = 40;

/// A product as the tests call it: weights, activations (whole tokens of `per_token` elements), the kernel's
/// third argument (blocks per row, or columns) and the output.
type Gemm<'a, W, A> = &'a dyn Fn(&[W], &[A], usize, ProductOut);

/// One weight matrix against the pool of token activations.
struct Case<'a, W, A> {
    what: String,
    w: &'a [W],
    rows: usize,
    pool: &'a [A],
    per_token: usize,
    arg: usize,
    /// The matrix can be cut only at multiples of this many rows (16 for interleaved rows).
    row_step: usize,
}

impl<W: Copy, A: Copy> Case<'_, W, A> {
    fn run(&self, gemm: Gemm<W, A>, tokens: &[usize], w: &[W], rows: usize) -> Vec<f32> {
        let p = self.per_token;
        let a: Vec<A> = tokens
            .iter()
            .flat_map(|&t| self.pool[t * p..(t + 1) * p].iter().copied())
            .collect();
        let mut out = vec![f32::NAN; tokens.len() * rows];
        gemm(
            w,
            &a,
            self.arg,
            ProductOut::new(&mut out, tokens.len(), rows),
        );
        out
    }

    /// One batch of `n` tokens (the pool over and over) against each token alone, by bits.
    fn check_long(&self, gemm: Gemm<W, A>, n: usize) -> Vec<String> {
        let rows = self.rows;
        let alone: Vec<Vec<f32>> = (0..POOL)
            .map(|t| self.run(gemm, &[t], self.w, rows))
            .collect();
        // Not periodic in 16 or 256, so a token read from the wrong tile or pass gets another token's values.
        let tokens: Vec<usize> = (0..n).map(|i| (7 * i + i / 13 + 3) % POOL).collect();
        let out = self.run(gemm, &tokens, self.w, rows);
        let count = tokens
            .iter()
            .enumerate()
            .flat_map(|(i, &t)| (0..rows).map(move |r| (i, t, r)))
            .filter(|&(i, t, r)| out[i * rows + r].to_bits() != alone[t][r].to_bits())
            .count();
        if count == 0 {
            return vec![];
        }
        vec![format!(
            "{}: {n} tokens: {count} of {} outputs differ from the token alone",
            self.what,
            n * rows
        )]
    }

    /// Every token of every batch of 1..=MAX_TOKENS (drawn from the pool at a rotating start, so each token
    /// sits at many positions) against that token alone, by bits; then shares of the rows against the whole
    /// product. Returns the mismatches, described.
    fn check(&self, gemm: Gemm<W, A>) -> Vec<String> {
        let mut bad = vec![];
        let rows = self.rows;
        let alone: Vec<Vec<f32>> = (0..POOL)
            .map(|t| self.run(gemm, &[t], self.w, rows))
            .collect();
        for n in 1..=MAX_TOKENS {
            let start = (n * 7) % POOL;
            let tokens: Vec<usize> = (0..n).map(|i| (start + i) % POOL).collect();
            let out = self.run(gemm, &tokens, self.w, rows);
            let mut first = None;
            let mut count = 0;
            for (i, &t) in tokens.iter().enumerate() {
                for r in 0..rows {
                    let (got, want) = (out[i * rows + r], alone[t][r]);
                    if got.to_bits() != want.to_bits() {
                        count += 1;
                        first.get_or_insert((i, r, got, want));
                    }
                }
            }
            if let Some((i, r, got, want)) = first {
                bad.push(format!(
                    "{}: {n} tokens: {count} of {} outputs differ from the token alone; first: token {i}, row \
                     {r}: {got:e} ({:#010x}) alone {want:e} ({:#010x})",
                    self.what,
                    n * rows,
                    got.to_bits(),
                    want.to_bits()
                ));
            }
        }
        // Row shares, as `kernels::parallel` cuts them (and cuts that are not multiples of 4 or 16).
        let per_row = self.w.len() / rows;
        for n in [1, 2, 3, 5, 8, 16, 23, 40] {
            let tokens: Vec<usize> = (0..n).map(|i| (3 * i + 1) % POOL).collect();
            let whole = self.run(gemm, &tokens, self.w, rows);
            let cuts: Vec<usize> = [0, 1, 5, 16, 19, rows]
                .into_iter()
                .filter(|c| c.is_multiple_of(self.row_step) || *c == rows)
                .collect();
            for pair in cuts.windows(2) {
                let (r0, r1) = (pair[0], pair[1].min(rows));
                if r0 >= r1 {
                    continue;
                }
                let share = self.run(gemm, &tokens, &self.w[r0 * per_row..r1 * per_row], r1 - r0);
                let differ = (0..n)
                    .flat_map(|t| (r0..r1).map(move |r| (t, r)))
                    .filter(|&(t, r)| {
                        share[t * (r1 - r0) + r - r0].to_bits() != whole[t * rows + r].to_bits()
                    })
                    .count();
                if differ > 0 {
                    bad.push(format!(
                        "{}: {n} tokens: rows {r0}..{r1} alone: {differ} outputs differ from the whole product",
                        self.what
                    ));
                }
            }
        }
        bad
    }
}

/// A case whose activations are whole tokens of `per_token` elements, which is also the kernel's third argument
/// (blocks per row, or columns).
fn case<'a, W, A>(
    what: String,
    w: &'a [W],
    rows: usize,
    pool: &'a [A],
    per_token: usize,
) -> Case<'a, W, A> {
    Case {
        what,
        w,
        rows,
        pool,
        per_token,
        arg: per_token,
        row_step: 1,
    }
}

/// A case over a matrix interleaved in groups of 16 rows (`packed`: its bytes), cut only between groups.
fn interleaved_case<'a, A>(
    what: String,
    packed: &'a [u8],
    rows: usize,
    pool: &'a [A],
    bpr: usize,
) -> Case<'a, u8, A> {
    Case {
        row_step: 16,
        ..case(what, packed, rows, pool, bpr)
    }
}

/// Fails listing every mismatch of every set and format at once: first how many batches failed per case, then
/// the first ones in detail.
fn report(failures: Vec<String>) {
    if failures.is_empty() {
        return;
    }
    let mut cases: Vec<(String, usize)> = vec![];
    for f in &failures {
        let case = f[..f.find(':').unwrap_or(f.len())].to_string();
        match cases.iter_mut().find(|(c, _)| *c == case) {
            Some((_, n)) => *n += 1,
            None => cases.push((case, 1)),
        }
    }
    let summary: Vec<String> = cases
        .iter()
        .map(|(c, n)| format!("  {c}: {n} failing batches"))
        .collect();
    let shown: Vec<&str> = failures.iter().take(40).map(String::as_str).collect();
    panic!(
        "{} batch-invariance failures in {} cases:\n{}\nfirst failures:\n{}",
        failures.len(),
        cases.len(),
        summary.join("\n"),
        shown.join("\n"),
    );
}

/// (rows, blocks per row) of the 32-block formats: row counts that are and are not multiples of 4 and 16,
/// rows with no, one and two whole quads of blocks (AVX-512's one-token Q4_0 kernel) and with block remainders.
const SHAPES_32: [(usize, usize); 6] = [(37, 2), (37, 3), (37, 5), (64, 4), (64, 8), (37, 13)];
/// (rows, 256-blocks per row) of the k-quants (11: two chunks of `FewK` tiles).
const SHAPES_K: [(usize, usize); 4] = [(37, 2), (64, 3), (37, 8), (21, 11)];

fn q8_0_acts(rng: &mut Rng, cols: usize) -> Vec<BlockQ8_0> {
    let x: Vec<f32> = (0..POOL * cols).map(|_| rng.f32() * 2.0).collect();
    let mut q = vec![
        BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; 32]
        };
        POOL * cols / 32
    ];
    for (xs, qs) in x.chunks_exact(cols).zip(q.chunks_exact_mut(cols / 32)) {
        (SCALAR.quantize_q8_0)(xs, qs);
    }
    q
}

fn q8_k_acts(rng: &mut Rng, cols: usize) -> Vec<BlockQ8K> {
    let x: Vec<f32> = (0..POOL * cols).map(|_| rng.f32() * 2.0).collect();
    let mut q = vec![BlockQ8K::zeroed(); POOL * cols / 256];
    quantize_q8_k(&x, &mut q);
    q
}

/// `n` Q4_0 blocks of random scales and nibbles.
fn random_q4_0(rng: &mut Rng, n: usize) -> Vec<BlockQ4_0> {
    (0..n)
        .map(|_| BlockQ4_0 {
            d: rng.scale(),
            qs: std::array::from_fn(|_| rng.next() as u8),
        })
        .collect()
}

/// `n` Q4_K blocks of random scales, mins and nibbles.
fn random_q4k(rng: &mut Rng, n: usize) -> Vec<BlockQ4K> {
    let mut w = vec![BlockQ4K::zeroed(); n];
    for b in &mut w {
        rng.fill(&mut b.scales);
        rng.fill(&mut b.qs);
        (b.d, b.dmin) = (rng.scale(), rng.scale());
    }
    w
}

/// Q4_K rows' bytes with their whole groups of 16 interleaved (`kernels::q4_k::interleave`), the rest as they lie.
fn interleave_q4k(w: &[BlockQ4K], rows: usize, bpr: usize) -> Vec<u8> {
    let grouped = rows / 16 * 16 * bpr;
    let mut packed = bytemuck::cast_slice::<_, u8>(w).to_vec();
    kernels::q4_k::interleave(&w[..grouped], bpr, &mut packed[..grouped * 144]);
    packed
}

/// Q6_K rows' bytes with their whole groups of 16 interleaved (`kernels::q6_k::interleave`), the rest as they lie.
fn interleave_q6k(w: &[BlockQ6K], rows: usize, bpr: usize) -> Vec<u8> {
    let grouped = rows / 16 * 16 * bpr;
    let mut packed = bytemuck::cast_slice::<_, u8>(w).to_vec();
    kernels::q6_k::interleave(&w[..grouped], bpr, &mut packed[..grouped * 210]);
    packed
}

/// `n` Q6_K blocks of random quants and scales.
fn random_q6k(rng: &mut Rng, n: usize) -> Vec<BlockQ6K> {
    let mut w = vec![BlockQ6K::zeroed(); n];
    for b in &mut w {
        rng.fill(&mut b.ql);
        rng.fill(&mut b.qh);
        rng.fill(bytemuck::cast_slice_mut(&mut b.scales));
        b.d = rng.scale();
    }
    w
}

/// Q4_0 rows' bytes with their whole groups of 16 interleaved (`kernels::q4_0::interleave`), the rest as they lie.
fn interleave_q4_0(w: &[BlockQ4_0], rows: usize, bpr: usize) -> Vec<u8> {
    let grouped = rows / 16 * 16 * bpr;
    let mut packed = bytemuck::cast_slice::<_, u8>(w).to_vec();
    kernels::q4_0::interleave(&w[..grouped], bpr, &mut packed[..grouped * 18]);
    packed
}

#[test]
fn q8_0_q4_0_and_iq4_nl_products_are_batch_invariant() {
    let mut rng = Rng(11);
    let mut failures = vec![];
    let all = sets();
    for (rows, bpr) in SHAPES_32 {
        let acts = q8_0_acts(&mut rng, bpr * 32);
        let w8: Vec<BlockQ8_0> = (0..rows * bpr)
            .map(|_| BlockQ8_0 {
                d: rng.scale(),
                qs: std::array::from_fn(|_| rng.next() as i8),
            })
            .collect();
        let w4 = random_q4_0(&mut rng, rows * bpr);
        let wi: Vec<BlockIQ4NL> = w4.iter().map(|b| BlockIQ4NL { d: b.d, qs: b.qs }).collect();
        for k in &all {
            let what = |f: &str| format!("{f} on {}, {rows} rows x {bpr} blocks", k.name);
            failures.extend(
                case(what("q8_0"), &w8, rows, &acts, bpr)
                    .check(&|w, a, b, o| (k.gemm_q8_0)(w, a, b, o)),
            );
            failures.extend(
                case(what("q4_0"), &w4, rows, &acts, bpr)
                    .check(&|w, a, b, o| (k.gemm_q4_0)(w, a, b, o)),
            );
            failures.extend(
                case(what("iq4_nl"), &wi, rows, &acts, bpr)
                    .check(&|w, a, b, o| (k.gemm_iq4_nl)(w, a, b, o)),
            );
        }
    }
    report(failures);
}

/// Rows interleaved in groups of 16 (`kernels::q4_0::interleave`, which IQ4_NL shares, `kernels::q8_0::interleave`), in the sets that
/// read them so; cut only between groups, as the model's regions cut them (37 rows: two groups and 5 rows as
/// they lie).
#[test]
fn interleaved_products_are_batch_invariant() {
    let mut rng = Rng(13);
    let mut failures = vec![];
    let all = sets();
    for (rows, bpr) in [(64, 2), (37, 5), (48, 32)] {
        let acts = q8_0_acts(&mut rng, bpr * 32);
        let grouped = rows / 16 * 16 * bpr;
        let packed4 = interleave_q4_0(&random_q4_0(&mut rng, rows * bpr), rows, bpr);
        let w8: Vec<BlockQ8_0> = (0..rows * bpr)
            .map(|_| BlockQ8_0 {
                d: rng.scale(),
                qs: std::array::from_fn(|_| rng.next() as i8),
            })
            .collect();
        let mut packed8 = bytemuck::cast_slice::<_, u8>(&w8).to_vec();
        kernels::q8_0::interleave(&w8[..grouped], bpr, &mut packed8[..grouped * 34]);
        for k in &all {
            let cases = [
                ("q4_0", k.gemm_q4_0_interleaved, &packed4),
                // IQ4_NL blocks are laid out as Q4_0's: the same bytes, read as level indices.
                ("iq4_nl", k.gemm_iq4_nl_interleaved, &packed4),
                ("q8_0", k.gemm_q8_0_interleaved, &packed8),
            ];
            for (ty, gemm, packed) in cases {
                let Some(gemm) = gemm else {
                    continue;
                };
                let what = format!("interleaved {ty} on {}, {rows} rows x {bpr} blocks", k.name);
                failures.extend(interleaved_case(what, packed, rows, &acts, bpr).check(&gemm));
            }
        }
    }
    report(failures);
}

/// IQ4_XS against Q8_0, rows as they lie and (in the sets that read them so) interleaved in groups of 16, cut
/// only between groups.
#[test]
fn iq4_xs_products_are_batch_invariant() {
    let mut rng = Rng(14);
    let mut failures = vec![];
    let all = sets();
    for (rows, spr) in [(37, 1), (64, 2), (21, 3)] {
        let bpr = 8 * spr;
        let acts = q8_0_acts(&mut rng, bpr * 32);
        let mut w = vec![BlockIQ4XS::zeroed(); rows * spr];
        for b in &mut w {
            rng.fill(&mut b.scales_l);
            rng.fill(&mut b.qs);
            (b.d, b.scales_h) = (rng.scale(), rng.next() as u16);
        }
        let grouped = rows / 16 * 16 * spr;
        let mut packed = bytemuck::cast_slice::<_, u8>(&w).to_vec();
        kernels::iq4_xs::interleave(&w[..grouped], spr, &mut packed[..grouped * 136]);
        for k in &all {
            failures.extend(
                case(
                    format!("iq4_xs on {}, {rows} rows x {spr} super-blocks", k.name),
                    &w,
                    rows,
                    &acts,
                    bpr,
                )
                .check(&|w, a, b, o| (k.gemm_iq4_xs)(w, a, b, o)),
            );
            if let Some(gemm) = k.gemm_iq4_xs_interleaved {
                let what = format!(
                    "interleaved iq4_xs on {}, {rows} rows x {spr} super-blocks",
                    k.name
                );
                failures.extend(interleaved_case(what, &packed, rows, &acts, bpr).check(&gemm));
            }
        }
    }
    report(failures);
}

#[test]
fn k_quant_products_are_batch_invariant() {
    let mut rng = Rng(12);
    let mut failures = vec![];
    let all = sets();
    for (rows, bpr) in SHAPES_K {
        let acts = q8_k_acts(&mut rng, bpr * 256);
        let w4 = random_q4k(&mut rng, rows * bpr);
        let mut w5 = vec![BlockQ5K::zeroed(); rows * bpr];
        for b in &mut w5 {
            rng.fill(&mut b.scales);
            rng.fill(&mut b.qh);
            rng.fill(&mut b.qs);
            (b.d, b.dmin) = (rng.scale(), rng.scale());
        }
        let w6 = random_q6k(&mut rng, rows * bpr);
        for k in &all {
            let what = |f: &str| format!("{f} on {}, {rows} rows x {bpr} blocks", k.name);
            failures.extend(
                case(what("q4_k"), &w4, rows, &acts, bpr)
                    .check(&|w, a, b, o| (k.gemm_q4_k)(w, a, b, o)),
            );
            if let Some(gemm) = k.gemm_q4_k_interleaved {
                let packed = interleave_q4k(&w4, rows, bpr);
                failures.extend(
                    interleaved_case(what("interleaved q4_k"), &packed, rows, &acts, bpr)
                        .check(&gemm),
                );
            }
            failures.extend(
                case(what("q5_k"), &w5, rows, &acts, bpr)
                    .check(&|w, a, b, o| (k.gemm_q5_k)(w, a, b, o)),
            );
            failures.extend(
                case(what("q6_k"), &w6, rows, &acts, bpr)
                    .check(&|w, a, b, o| (k.gemm_q6_k)(w, a, b, o)),
            );
            if let Some(gemm) = k.gemm_q6_k_interleaved {
                let packed = interleave_q6k(&w6, rows, bpr);
                failures.extend(
                    interleaved_case(what("interleaved q6_k"), &packed, rows, &acts, bpr)
                        .check(&gemm),
                );
            }
        }
    }
    report(failures);
}

/// Columns of the float products: multiples of 16, of 8 but not 16 (the ymm and zmm bodies differ), and with
/// scalar tails.
const FLOAT_SHAPES: [(usize, usize); 4] = [(37, 64), (64, 72), (37, 203), (64, 256)];

#[test]
fn float_products_are_batch_invariant() {
    let mut rng = Rng(13);
    let mut failures = vec![];
    let all = sets();
    for (rows, cols) in FLOAT_SHAPES {
        let acts: Vec<f32> = (0..POOL * cols).map(|_| rng.f32()).collect();
        let w32: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
        let w16: Vec<f16> = w32.iter().map(|&x| f16::from_f32(x)).collect();
        let wb16: Vec<bf16> = w32.iter().map(|&x| bf16::from_f32(x)).collect();
        for k in &all {
            let what = |f: &str| format!("{f} on {}, {rows} rows x {cols} columns", k.name);
            failures.extend(
                case(what("f32"), &w32, rows, &acts, cols)
                    .check(&|w, a, c, o| (k.gemm_f32)(w, a, c, o)),
            );
            failures.extend(
                case(what("f16"), &w16, rows, &acts, cols)
                    .check(&|w, a, c, o| (k.gemm_f16)(w, a, c, o)),
            );
            failures.extend(
                case(what("bf16"), &wb16, rows, &acts, cols)
                    .check(&|w, a, c, o| (k.gemm_bf16)(w, a, c, o)),
            );
        }
    }
    report(failures);
}

/// Batches longer than a prompt chunk's expert share: products of several hundred tokens (AMX's passes of 256
/// and a remainder on tiles or on the VNNI kernels) against each token alone.
#[test]
fn long_batches_are_batch_invariant() {
    let mut rng = Rng(15);
    let mut failures = vec![];
    let all = sets();
    let (rows, bpr) = (37, 4);
    let acts = q8_0_acts(&mut rng, bpr * 32);
    let packed4 = interleave_q4_0(&random_q4_0(&mut rng, rows * bpr), rows, bpr);
    let kbpr = 2;
    let kacts = q8_k_acts(&mut rng, kbpr * 256);
    let wk = random_q4k(&mut rng, rows * kbpr);
    let packed_k = interleave_q4k(&wk, rows, kbpr);
    let w6 = random_q6k(&mut rng, rows * kbpr);
    let packed_6 = interleave_q6k(&w6, rows, kbpr);
    for k in &all {
        // 300: a pass of 256 and one of 44 (whole tiles and a last one of 12); 263: the last 7 past the tiles.
        for n in [300, 263] {
            let what = |f: &str| format!("{f} on {}, {n} tokens", k.name);
            if let Some(gemm) = k.gemm_q4_0_interleaved {
                failures.extend(
                    interleaved_case(what("interleaved q4_0"), &packed4, rows, &acts, bpr)
                        .check_long(&gemm, n),
                );
            }
            failures.extend(
                case(what("q4_k"), &wk, rows, &kacts, kbpr)
                    .check_long(&|w, a, b, o| (k.gemm_q4_k)(w, a, b, o), n),
            );
            if let Some(gemm) = k.gemm_q4_k_interleaved {
                failures.extend(
                    interleaved_case(what("interleaved q4_k"), &packed_k, rows, &kacts, kbpr)
                        .check_long(&gemm, n),
                );
            }
            failures.extend(
                case(what("q6_k"), &w6, rows, &kacts, kbpr)
                    .check_long(&|w, a, b, o| (k.gemm_q6_k)(w, a, b, o), n),
            );
            if let Some(gemm) = k.gemm_q6_k_interleaved {
                failures.extend(
                    interleaved_case(what("interleaved q6_k"), &packed_6, rows, &kacts, kbpr)
                        .check_long(&gemm, n),
                );
            }
        }
    }
    report(failures);
}
