//! Kernel micro-benchmarks, one thread: `cargo bench --bench kernels [-- FILTER]`.
//!
//! - gemv: one token, GB/s of weight bytes. "dram" streams 256 MiB of weights as consecutive 1024-column
//!   matrices, so nothing is reused from any cache (this VM's L3 does not hold large buffers); "l2" repeats one
//!   256 x 1024 matrix (at most 1 MiB of weights).
//! - gemm: 1024 x 1024 weights against 8, 16, 64 and 256 tokens, in G multiply-accumulates per second; and
//!   a 128-row share of it against 64 tokens (a thread's part of a small matrix, where per-call work shows),
//!   written into its columns of the token-major 1024-row output.
//! - `threads`: gemv from DRAM with both cores; `ops`: the f32 operations; `sampling`: one token from 49k logits;
//!   `shapes`: one-token products of the
//!   model's matrix shapes from DRAM in its row shares; `attention`: `attend_block` in GFLOP/s.
//! - `probe FORMAT ROWS TOKENS LDO ITERS`: a fixed amount of work and nothing else (FORMAT also `q4_0i`, `q8_0i`, `q4_ki`, `q6_ki`:
//!   the matrix interleaved as a model stores it), for `perf stat -e
//!   task-clock` (CPU time, which other jobs on a shared machine disturb far less than wall time).
//!
//! Each figure is the fastest of 7 timed runs of about 50 ms. This VM shares its 2 cores with other builds:
//! compare builds in alternating runs, several times.

use std::hint::black_box;
use std::time::Instant;

use half::{bf16, f16};
use quarry::kernels::{self, Kernels, ProductOut};
use quarry_quantize::blocks::{BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K};

const COLS: usize = 1024;
const BPR: usize = COLS / 32;
const DRAM_BYTES: usize = 256 << 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// Seconds per call of `f`: the fastest of several runs of about 50 ms each (the least disturbed by whatever
/// else the machine is doing; this VM shares its 2 cores with builds).
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let iters = ((0.05 / once) as usize).max(1);
    let mut runs: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() / iters as f64
        })
        .collect();
    runs.sort_by(|a, b| a.total_cmp(b));
    runs[0]
}

/// Weight formats as the benchmark sees them: bytes per row, a random matrix, and the kernel call.
trait Format: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    const ROW_BYTES: usize;
    fn random(rng: &mut Rng, rows: usize) -> Vec<Self>;
    /// The product into `out`.
    fn run(k: &Kernels, w: &[Self], a: &Acts, out: ProductOut);
}

struct Acts {
    x: Vec<f32>,
    q: Vec<BlockQ8_0>,
    /// The same activations as Q8_K, for the k-quant formats.
    qk: Vec<BlockQ8K>,
}

impl Acts {
    fn new(rng: &mut Rng, n: usize, k: &Kernels) -> Acts {
        let x: Vec<f32> = (0..n * COLS).map(|_| rng.f32()).collect();
        let mut q = vec![
            BlockQ8_0 {
                d: f16::ZERO,
                qs: [0; 32]
            };
            n * BPR
        ];
        for (xs, qs) in x.chunks(COLS).zip(q.chunks_mut(BPR)) {
            (k.quantize_q8_0)(xs, qs);
        }
        let mut qk = vec![bytemuck::Zeroable::zeroed(); n * COLS / 256];
        (k.quantize_q8_k)(&x, &mut qk);
        Acts { x, q, qk }
    }
}

/// Random quantized blocks, `n` of them.
trait RandomBlocks: Sized {
    fn random_n(rng: &mut Rng, n: usize) -> Vec<Self>;
}

impl RandomBlocks for BlockQ8_0 {
    fn random_n(rng: &mut Rng, n: usize) -> Vec<Self> {
        (0..n)
            .map(|_| BlockQ8_0 {
                d: f16::from_f32(rng.f32() * 0.01),
                qs: std::array::from_fn(|_| rng.next() as i8),
            })
            .collect()
    }
}

impl RandomBlocks for BlockQ4_0 {
    fn random_n(rng: &mut Rng, n: usize) -> Vec<Self> {
        (0..n)
            .map(|_| BlockQ4_0 {
                d: f16::from_f32(rng.f32() * 0.01),
                qs: std::array::from_fn(|_| rng.next() as u8),
            })
            .collect()
    }
}

impl Format for BlockQ8_0 {
    const NAME: &'static str = "q8_0";
    const ROW_BYTES: usize = BPR * 34;
    fn random(rng: &mut Rng, rows: usize) -> Vec<Self> {
        Self::random_n(rng, rows * BPR)
    }
    fn run(k: &Kernels, w: &[Self], a: &Acts, out: ProductOut) {
        (k.gemm_q8_0)(w, &a.q, BPR, out)
    }
}

impl Format for BlockQ4_0 {
    const NAME: &'static str = "q4_0";
    const ROW_BYTES: usize = BPR * 18;
    fn random(rng: &mut Rng, rows: usize) -> Vec<Self> {
        Self::random_n(rng, rows * BPR)
    }
    fn run(k: &Kernels, w: &[Self], a: &Acts, out: ProductOut) {
        (k.gemm_q4_0)(w, &a.q, BPR, out)
    }
}

fn small_f16(rng: &mut Rng) -> f16 {
    f16::from_f32(rng.f32() * 0.01)
}

impl Format for BlockQ4K {
    const NAME: &'static str = "q4_k";
    const ROW_BYTES: usize = COLS / 256 * 144;
    fn random(rng: &mut Rng, rows: usize) -> Vec<Self> {
        (0..rows * COLS / 256)
            .map(|_| BlockQ4K {
                d: small_f16(rng),
                dmin: small_f16(rng),
                scales: std::array::from_fn(|_| rng.next() as u8),
                qs: std::array::from_fn(|_| rng.next() as u8),
            })
            .collect()
    }
    fn run(k: &Kernels, w: &[Self], a: &Acts, out: ProductOut) {
        (k.gemm_q4_k)(w, &a.qk, COLS / 256, out)
    }
}

impl Format for BlockQ5K {
    const NAME: &'static str = "q5_k";
    const ROW_BYTES: usize = COLS / 256 * 176;
    fn random(rng: &mut Rng, rows: usize) -> Vec<Self> {
        (0..rows * COLS / 256)
            .map(|_| BlockQ5K {
                d: small_f16(rng),
                dmin: small_f16(rng),
                scales: std::array::from_fn(|_| rng.next() as u8),
                qh: std::array::from_fn(|_| rng.next() as u8),
                qs: std::array::from_fn(|_| rng.next() as u8),
            })
            .collect()
    }
    fn run(k: &Kernels, w: &[Self], a: &Acts, out: ProductOut) {
        (k.gemm_q5_k)(w, &a.qk, COLS / 256, out)
    }
}

impl Format for BlockQ6K {
    const NAME: &'static str = "q6_k";
    const ROW_BYTES: usize = COLS / 256 * 210;
    fn random(rng: &mut Rng, rows: usize) -> Vec<Self> {
        (0..rows * COLS / 256)
            .map(|_| BlockQ6K {
                ql: std::array::from_fn(|_| rng.next() as u8),
                qh: std::array::from_fn(|_| rng.next() as u8),
                scales: std::array::from_fn(|_| rng.next() as i8),
                d: small_f16(rng),
            })
            .collect()
    }
    fn run(k: &Kernels, w: &[Self], a: &Acts, out: ProductOut) {
        (k.gemm_q6_k)(w, &a.qk, COLS / 256, out)
    }
}

impl Format for f32 {
    const NAME: &'static str = "f32";
    const ROW_BYTES: usize = COLS * 4;
    fn random(rng: &mut Rng, rows: usize) -> Vec<Self> {
        (0..rows * COLS).map(|_| rng.f32()).collect()
    }
    fn run(k: &Kernels, w: &[Self], a: &Acts, out: ProductOut) {
        (k.gemm_f32)(w, &a.x, COLS, out)
    }
}

impl Format for f16 {
    const NAME: &'static str = "f16";
    const ROW_BYTES: usize = COLS * 2;
    fn random(rng: &mut Rng, rows: usize) -> Vec<Self> {
        (0..rows * COLS).map(|_| f16::from_f32(rng.f32())).collect()
    }
    fn run(k: &Kernels, w: &[Self], a: &Acts, out: ProductOut) {
        (k.gemm_f16)(w, &a.x, COLS, out)
    }
}

impl Format for bf16 {
    const NAME: &'static str = "bf16";
    const ROW_BYTES: usize = COLS * 2;
    fn random(rng: &mut Rng, rows: usize) -> Vec<Self> {
        (0..rows * COLS)
            .map(|_| bf16::from_f32(rng.f32()))
            .collect()
    }
    fn run(k: &Kernels, w: &[Self], a: &Acts, out: ProductOut) {
        (k.gemm_bf16)(w, &a.x, COLS, out)
    }
}

/// One table row: gemv GB/s out of cache and in L2, then gemm G-MAC/s at each token count.
fn bench_format<F: Format>(k: &Kernels, rng: &mut Rng, gemm_tokens: &[usize]) -> Vec<String> {
    let mut cells = vec![];
    let a1 = Acts::new(rng, 1, k);
    let mut out = vec![0.0f32; 4096];

    // gemv over 256 MiB: one 1024-row matrix after another.
    let rows_total = DRAM_BYTES / F::ROW_BYTES;
    let big = F::random(rng, rows_total);
    let per = 1024 * big.len() / rows_total;
    let s = time(|| {
        for m in big.chunks(per) {
            let rows = m.len() / (big.len() / rows_total);
            F::run(k, black_box(m), &a1, ProductOut::new(&mut out, 1, rows));
        }
    });
    cells.push(format!(
        "{:.1}",
        (rows_total * F::ROW_BYTES) as f64 / s / 1e9
    ));
    drop(big);

    let small = F::random(rng, 256);
    let s = time(|| F::run(k, black_box(&small), &a1, ProductOut::new(&mut out, 1, 256)));
    cells.push(format!("{:.1}", (256 * F::ROW_BYTES) as f64 / s / 1e9));

    let w = F::random(rng, 1024);
    for &n in gemm_tokens {
        let a = Acts::new(rng, n, k);
        let mut out = vec![0.0f32; 1024 * n];
        let s = time(|| F::run(k, black_box(&w), &a, ProductOut::new(&mut out, n, 1024)));
        cells.push(format!("{:.1}", (1024 * COLS * n) as f64 / s / 1e9));
    }
    // A small thread's share: 128 rows at 64 tokens, where per-call activation work shows, written into its
    // columns of the whole token-major 1024-row output.
    if gemm_tokens.len() > 1 {
        let a = Acts::new(rng, 64, k);
        let mut out = vec![0.0f32; 1024 * 64];
        let s = time(|| {
            let out = ProductOut::with_stride(&mut out, 64, 128, 1024);
            F::run(k, black_box(&w[..w.len() / 8]), &a, out)
        });
        cells.push(format!("{:.1}", (128 * COLS * 64) as f64 / s / 1e9));
    }
    cells
}

/// The f32 operations of every kernel set (the scalar set is the reference), in ns per call.
fn bench_ops() {
    let mut rng = Rng(7);
    let x: Vec<f32> = (0..4096).map(|_| rng.f32() * 8.0).collect();
    let wgt: Vec<f32> = (0..4096).map(|_| rng.f32()).collect();
    let cs: Vec<(f32, f32)> = (0..32)
        .map(|i| ((i as f32).cos(), (i as f32).sin()))
        .collect();
    let mut buf = x.clone();
    let mut out = vec![0.0f32; 4096];
    println!("\nops, ns per call (softmax and silu_mul include copying in 4096 fresh inputs)");
    println!(
        "{:<10} {:>14} {:>13} {:>13} {:>14}",
        "set", "rms_norm 1024", "rope 16 x 64", "softmax 4096", "silu_mul 4096"
    );
    for k in kernels::available() {
        let (name, t) = (k.name, k.ops);
        let a = time(|| (t.rms_norm)(black_box(&x[..1024]), &wgt[..1024], 1e-6, &mut out[..1024]))
            * 1e9;
        let b = time(|| (t.rope)(black_box(&mut buf[..1024]), 64, &cs)) * 1e9;
        let c = time(|| {
            buf.copy_from_slice(&x);
            (t.softmax)(black_box(&mut buf))
        }) * 1e9;
        let d = time(|| {
            buf.copy_from_slice(&x);
            (t.silu_mul)(black_box(&mut buf), &wgt)
        }) * 1e9;
        println!("{name:<10} {a:>14.0} {b:>13.0} {c:>13.0} {d:>14.0}");
    }
}

/// One-token products of the model's matrix shapes (Granite 3.0 1B-A400M) from DRAM, one thread, GB/s of
/// weight bytes: 256 MiB of distinct matrices of one shape, each called in the row shares the forward pass
/// gives its work items with 2 threads (`rows_per_item`: 32 rows of a 512-row expert matrix, 64 of a 1024-row
/// one, 3072 of the output head).
fn bench_decode_shapes() {
    let k = kernels::selected();
    println!(
        "\none-token products of the model's shapes from DRAM ({}, one thread), GB/s",
        k.name
    );
    println!(
        "{:<24} {:>14} {:>7} {:>7}",
        "matrix", "rows x cols", "q4_0", "q8_0"
    );
    let shapes = [
        ("expert gate / up", 512usize, 1024usize),
        ("expert down", 1024, 512),
        ("attention q / o", 1024, 1024),
        ("output head", 49155, 1024),
    ];
    let mut rng = Rng(21);
    for (name, rows, cols) in shapes {
        let chunk = rows.div_ceil(16).next_multiple_of(16).max(16);
        let bpr = cols / 32;
        let x: Vec<f32> = (0..cols).map(|_| rng.f32()).collect();
        let mut a = vec![
            BlockQ8_0 {
                d: f16::ZERO,
                qs: [0; 32]
            };
            bpr
        ];
        (k.quantize_q8_0)(&x, &mut a);
        let mut out = vec![0.0f32; rows];
        let mut cell = |row_bytes: usize, run: &mut dyn FnMut(usize, usize, &mut [f32])| {
            let mats = (DRAM_BYTES / (rows * row_bytes)).max(2);
            let s = time(|| {
                for m in 0..mats {
                    for r0 in (0..rows).step_by(chunk) {
                        let n = chunk.min(rows - r0);
                        run(m * rows + r0, n, &mut out[r0..r0 + n]);
                    }
                }
            });
            (mats * rows * row_bytes) as f64 / s / 1e9
        };
        let total = |row_bytes: usize| (DRAM_BYTES / (rows * row_bytes)).max(2) * rows * bpr;
        let w4: Vec<BlockQ4_0> = BlockQ4_0::random_n(&mut rng, total(bpr * 18));
        let g4 = cell(bpr * 18, &mut |r, n, o| {
            (k.gemm_q4_0)(
                black_box(&w4[r * bpr..(r + n) * bpr]),
                &a,
                bpr,
                ProductOut::new(o, 1, n),
            )
        });
        drop(w4);
        let w8: Vec<BlockQ8_0> = BlockQ8_0::random_n(&mut rng, total(bpr * 34));
        let g8 = cell(bpr * 34, &mut |r, n, o| {
            (k.gemm_q8_0)(
                black_box(&w8[r * bpr..(r + n) * bpr]),
                &a,
                bpr,
                ProductOut::new(o, 1, n),
            )
        });
        println!(
            "{name:<24} {:>14} {g4:>7.1} {g8:>7.1}",
            format!("{rows} x {cols}")
        );
    }
}

/// Attention of a block of queries over one KV head (head size 64, in KV pool blocks of 64 positions, keys
/// transposed within each), in GFLOP/s counting the two products (4 * head_dim * sum of lengths): `attend_block` with
/// the whole block, the same queries one at a time (the one-query path, `attend_head`), and the scalar
/// reference. nq = 2 is one decode step of a GQA group; nq = 16 is 2 query heads x 8 consecutive tokens
/// (causal: lengths len - 7..=len).
fn bench_attention() {
    use quarry::kernels::ops;
    const HD: usize = 64;
    const STRIDE: usize = 4096;
    let mut rng = Rng(11);
    let kt: Vec<f32> = (0..HD * STRIDE).map(|_| rng.f32()).collect();
    let v: Vec<f32> = (0..STRIDE * HD).map(|_| rng.f32()).collect();
    // Laid out as the model's KV pool lays out one head: blocks of 64 positions, here in order.
    let block_ids: Vec<u32> = (0..(STRIDE / 64) as u32).collect();
    let kv = ops::KvBlocks {
        data: ops::KvData::F32 { k: &kt, v: &v },
        blocks: &block_ids,
        block_values: HD * 64,
        head_offset: 0,
        tokens: 64,
        head_dim: HD,
    };
    println!("\nattention, head size 64, GFLOP/s (4 * hd * sum of lengths per call)");
    println!(
        "{:<10} {:>4} {:>6} {:>10} {:>13} {:>8}",
        "set", "nq", "len", "block", "one by one", "scalar"
    );
    for k in kernels::available().into_iter().skip(1) {
        let (name, t) = (k.name, k.ops);
        for nq in [2usize, 16] {
            for len in [128usize, 512, 2048] {
                let lens: Vec<usize> = (0..nq).map(|j| len - (nq - 1 - j) / 2).collect();
                let q: Vec<f32> = (0..nq * HD).map(|_| rng.f32()).collect();
                let mut scratch = vec![0.0f32; ops::attend_block_scratch(&lens)];
                let mut out = vec![0.0f32; nq * HD];
                let flops = 4.0 * HD as f64 * lens.iter().sum::<usize>() as f64;
                let scale = 0.125;
                let block = time(|| {
                    (t.attend_block)(black_box(&q), &lens, &kv, scale, &mut scratch, &mut out)
                });
                let single = time(|| {
                    for (j, &l) in lens.iter().enumerate() {
                        (t.attend_block)(
                            black_box(&q[j * HD..(j + 1) * HD]),
                            &[l],
                            &kv,
                            scale,
                            &mut scratch,
                            &mut out[j * HD..(j + 1) * HD],
                        )
                    }
                });
                let scalar = if name == "baseline" {
                    let s = time(|| {
                        ops::scalar::attend_block(
                            black_box(&q),
                            &lens,
                            &kv,
                            scale,
                            &mut scratch,
                            &mut out,
                        )
                    });
                    format!("{:.1}", flops / s / 1e9)
                } else {
                    "-".into()
                };
                println!(
                    "{name:<10} {nq:>4} {len:>6} {:>10.1} {:>13.1} {scalar:>8}",
                    flops / block / 1e9,
                    flops / single / 1e9
                );
            }
        }
    }
}

/// The ceiling the decode step can aim at: the selected set's gemv over 256 MiB with both cores, each thread
/// taking half the rows of every matrix (no synchronisation between matrices, so an upper bound).
fn bench_two_threads() {
    let k = kernels::selected();
    println!(
        "\ngemv dram with 2 threads ({}), GB/s of weight bytes",
        k.name
    );
    let mut rng = Rng(9);
    fn run<F: Format>(k: &Kernels, rng: &mut Rng) -> f64 {
        let rows_total = DRAM_BYTES / F::ROW_BYTES;
        let big = F::random(rng, rows_total);
        let a1 = Acts::new(rng, 1, k);
        let per_row = big.len() / rows_total;
        let s = time(|| {
            std::thread::scope(|sc| {
                for half in 0..2 {
                    let (big, a1) = (&big, &a1);
                    sc.spawn(move || {
                        let mut out = vec![0.0f32; 512];
                        for m in big.chunks(1024 * per_row) {
                            let h = m.len() / 2 / per_row * per_row;
                            let part = if half == 0 { &m[..h] } else { &m[h..] };
                            let rows = part.len() / per_row;
                            F::run(k, black_box(part), a1, ProductOut::new(&mut out, 1, rows));
                        }
                    });
                }
            })
        });
        (rows_total * F::ROW_BYTES) as f64 / s / 1e9
    }
    println!("q4_0 {:.1}", run::<BlockQ4_0>(k, &mut rng));
    println!("q8_0 {:.1}", run::<BlockQ8_0>(k, &mut rng));
    println!("q4_k {:.1}", run::<BlockQ4K>(k, &mut rng));
    println!("q6_k {:.1}", run::<BlockQ6K>(k, &mut rng));
    println!("f16  {:.1}", run::<f16>(k, &mut rng));
}

type BenchFn = fn(&Kernels, &mut Rng, &[usize]) -> Vec<String>;

/// `probe FORMAT ROWS TOKENS LDO ITERS`: a fixed amount of work with the selected set and nothing else, for
/// `perf stat -e cycles:u` (user cycles of this process only, which a busy machine disturbs far less than
/// wall time).
fn probe(args: &[String]) {
    let num = |i: usize| -> usize { args[i].parse().expect("probe FORMAT ROWS TOKENS LDO ITERS") };
    let (rows, n, ldo, iters) = (num(2), num(3), num(4), num(5));
    let k = kernels::selected();
    let mut rng = Rng(3);
    fn go<F: Format>(k: &Kernels, rng: &mut Rng, rows: usize, n: usize, ldo: usize, iters: usize) {
        let w = F::random(rng, rows);
        let a = Acts::new(rng, n, k);
        let mut out = vec![0.0f32; (n - 1) * ldo + rows];
        for _ in 0..iters {
            F::run(
                k,
                black_box(&w),
                &a,
                ProductOut::with_stride(&mut out, n, rows, ldo),
            );
        }
        black_box(&out);
    }
    /// The matrix interleaved as a model on this set stores it (`q4_0i`, `q8_0i`, `q4_ki`, `q6_ki`).
    fn go_interleaved(
        k: &Kernels,
        rng: &mut Rng,
        ty: &str,
        rows: usize,
        n: usize,
        ldo: usize,
        iters: usize,
    ) {
        /// A cache line, so that the packed matrix starts on one as the model's packed copies do (a `Vec<u8>`
        /// this large is 16 bytes past a page: every 64-byte run would straddle two lines).
        #[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
        #[repr(C, align(64))]
        struct Line([u8; 64]);
        fn packed<B: bytemuck::Pod>(
            w: &[B],
            bpr: usize,
            interleave: fn(&[B], usize, &mut [u8]),
        ) -> Vec<Line> {
            // Whole groups of 16 rows of 1024 weights are whole lines in every interleaved format.
            assert!(size_of_val(w).is_multiple_of(64));
            let mut packed = vec![Line([0; 64]); size_of_val(w) / 64];
            interleave(w, bpr, bytemuck::cast_slice_mut(&mut packed));
            packed
        }
        let missing = format!("probe: {} has no interleaved {ty}", k.name);
        let a = Acts::new(rng, n, k);
        let mut out = vec![0.0f32; (n - 1) * ldo + rows];
        let mut repeat = |run: &dyn Fn(ProductOut)| {
            for _ in 0..iters {
                run(ProductOut::with_stride(&mut out, n, rows, ldo));
            }
        };
        match ty {
            "q4_ki" | "q6_ki" => {
                let (w, gemm) = if ty == "q4_ki" {
                    let w = BlockQ4K::random(rng, rows);
                    (
                        packed(&w, COLS / 256, kernels::q4_k::interleave),
                        k.gemm_q4_k_interleaved,
                    )
                } else {
                    let w = BlockQ6K::random(rng, rows);
                    (
                        packed(&w, COLS / 256, kernels::q6_k::interleave),
                        k.gemm_q6_k_interleaved,
                    )
                };
                let gemm = gemm.expect(&missing);
                repeat(&|out| gemm(black_box(bytemuck::cast_slice(&w)), &a.qk, COLS / 256, out));
            }
            _ => {
                let (w, gemm) = if ty == "q4_0i" {
                    let w = packed(
                        &BlockQ4_0::random(rng, rows),
                        BPR,
                        kernels::q4_0::interleave,
                    );
                    (w, k.gemm_q4_0_interleaved)
                } else {
                    let w = packed(
                        &BlockQ8_0::random(rng, rows),
                        BPR,
                        kernels::q8_0::interleave,
                    );
                    (w, k.gemm_q8_0_interleaved)
                };
                let gemm = gemm.expect(&missing);
                repeat(&|out| gemm(black_box(bytemuck::cast_slice(&w)), &a.q, BPR, out));
            }
        }
        black_box(&out);
    }
    match args[1].as_str() {
        ty @ ("q4_0i" | "q8_0i" | "q4_ki" | "q6_ki") => {
            go_interleaved(k, &mut rng, ty, rows, n, ldo, iters)
        }
        "q4_0" => go::<BlockQ4_0>(k, &mut rng, rows, n, ldo, iters),
        "q8_0" => go::<BlockQ8_0>(k, &mut rng, rows, n, ldo, iters),
        "q4_k" => go::<BlockQ4K>(k, &mut rng, rows, n, ldo, iters),
        "q5_k" => go::<BlockQ5K>(k, &mut rng, rows, n, ldo, iters),
        "q6_k" => go::<BlockQ6K>(k, &mut rng, rows, n, ldo, iters),
        "f16" => go::<f16>(k, &mut rng, rows, n, ldo, iters),
        other => panic!("probe: unknown format {other}"),
    }
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if filter.first().is_some_and(|a| a == "probe") {
        return probe(&filter);
    }
    let tokens = [8, 16, 64, 256];
    println!(
        "one thread; gemv in GB/s of weight bytes (dram: 256 MiB streamed; l2: 256 x 1024), gemm 1024 x 1024 in G-MAC/s"
    );
    println!(
        "{:<11} {:<5} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>12}",
        "set",
        "type",
        "gemv dram",
        "gemv l2",
        "gemm 8",
        "gemm 16",
        "gemm 64",
        "gemm 256",
        "64 x 128 rows"
    );
    // The ceiling for "gemv dram": a plain sum over the same 256 MiB.
    let buf: Vec<u64> = (0..DRAM_BYTES / 8).map(|i| i as u64).collect();
    let s = time(|| {
        let mut acc = [0u64; 8];
        for c in black_box(&buf).chunks_exact(8) {
            for i in 0..8 {
                acc[i] = acc[i].wrapping_add(c[i]);
            }
        }
        black_box(acc);
    });
    println!(
        "(plain read of 256 MiB: {:.1} GB/s)",
        DRAM_BYTES as f64 / s / 1e9
    );
    drop(buf);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for k in kernels::available() {
        let rows: Vec<(&str, BenchFn)> = vec![
            (BlockQ4_0::NAME, bench_format::<BlockQ4_0>),
            (BlockQ8_0::NAME, bench_format::<BlockQ8_0>),
            (BlockQ4K::NAME, bench_format::<BlockQ4K>),
            (BlockQ5K::NAME, bench_format::<BlockQ5K>),
            (BlockQ6K::NAME, bench_format::<BlockQ6K>),
            (f32::NAME, bench_format::<f32>),
            (f16::NAME, bench_format::<f16>),
            (bf16::NAME, bench_format::<bf16>),
        ];
        for (name, f) in rows {
            let label = format!("{} {}", k.name, name);
            if !filter.is_empty() && !filter.iter().any(|p| label.contains(p.as_str())) {
                continue;
            }
            // The scalar set is a reference, not a contender: skip its slow many-token runs.
            let t: &[usize] = if k.name == "scalar" {
                &tokens[..1]
            } else {
                &tokens
            };
            let c = f(k, &mut rng, t);
            let get = |i: usize| c.get(i).cloned().unwrap_or_else(|| "-".into());
            println!(
                "{:<11} {:<5} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>12}",
                k.name,
                name,
                get(0),
                get(1),
                get(2),
                get(3),
                get(4),
                get(5),
                get(6)
            );
        }
    }
    if filter.is_empty() || filter.iter().any(|p| p == "threads") {
        bench_two_threads();
    }
    if filter.is_empty() || filter.iter().any(|p| p == "ops") {
        bench_ops();
    }
    if filter.is_empty() || filter.iter().any(|p| p == "shapes") {
        bench_decode_shapes();
    }
    if filter.is_empty() || filter.iter().any(|p| p == "attention") {
        bench_attention();
    }
    if filter.is_empty() || filter.iter().any(|p| p == "sampling") {
        bench_sampling();
    }
}

/// Picking one token from Granite's 49,155 logits, in us per token: the scheduler does this for every sequence
/// of a batch after each step, while the worker threads wait.
fn bench_sampling() {
    use quarry::sampling::{Sampler, SamplingParams};
    let mut rng = Rng(0x5a3f_1e00_9e37);
    let logits: Vec<f32> = (0..49_155).map(|_| rng.f32() * 20.0).collect();
    let recent = vec![0u32; 64];
    println!(
        "
sampling 49,155 logits, us per token"
    );
    for (name, params) in [
        ("greedy", SamplingParams::greedy()),
        (
            "default (top-k 40, top-p 0.95, min-p 0.05, t 0.8)",
            SamplingParams::default(),
        ),
        (
            "no top-k (top-p 0.95)",
            SamplingParams {
                top_k: 0,
                ..SamplingParams::default()
            },
        ),
        (
            "top-k 40, repeat penalty 1.1",
            SamplingParams {
                repeat_penalty: 1.1,
                ..SamplingParams::default()
            },
        ),
    ] {
        let mut sampler = Sampler::new(params);
        let t = time(|| {
            black_box(sampler.sample(black_box(&logits), &recent));
        });
        println!("{name:<52} {:>8.1}", t * 1e6);
    }
}
