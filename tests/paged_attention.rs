//! Attention over a KV cache split into pool blocks (scattered, in any order) gives exactly the bits of the
//! same cache laid out contiguously, in every kernel set, and a query's output does not depend on the other
//! queries of its call: what lets a sequence in a batch get what it gets alone.

use quarry::kernels::{self, ops};
use quarry::sampling::Rng;

/// Values in [-1, 1).
fn uniform(rng: &mut Rng) -> f32 {
    rng.next_f32() * 2.0 - 1.0
}

const BT: usize = 64;

/// `len` positions of one head, contiguous (`kt[d * len + s]`, `v[s * hd + d]`) and as blocks of `BT` positions
/// placed at shuffled block ids among unrelated blocks.
struct Cache {
    kt: Vec<f32>,
    v: Vec<f32>,
    stride: usize,
    pool_k: Vec<f32>,
    pool_v: Vec<f32>,
    ids: Vec<u32>,
    block_values: usize,
    head_offset: usize,
}

impl Cache {
    fn new(rng: &mut Rng, hd: usize, len: usize) -> Cache {
        let n_blocks = len.div_ceil(BT);
        let stride = n_blocks * BT;
        let kt: Vec<f32> = (0..hd * stride).map(|_| uniform(rng)).collect();
        let v: Vec<f32> = (0..stride * hd).map(|_| uniform(rng) * 2.0).collect();
        // Two heads per block, this one second; blocks at ids n_blocks + 2 .. in reverse order.
        let head_values = hd * BT;
        let block_values = 2 * head_values;
        let total = 2 * n_blocks + 3;
        let mut pool_k: Vec<f32> = (0..total * block_values).map(|_| uniform(rng)).collect();
        let mut pool_v: Vec<f32> = (0..total * block_values).map(|_| uniform(rng)).collect();
        let ids: Vec<u32> = (0..n_blocks)
            .map(|i| (2 * n_blocks + 2 - i) as u32)
            .collect();
        for (i, &id) in ids.iter().enumerate() {
            let base = id as usize * block_values + head_values;
            for d in 0..hd {
                for s in 0..BT {
                    pool_k[base + d * BT + s] = kt[d * stride + i * BT + s];
                    pool_v[base + s * hd + d] = v[(i * BT + s) * hd + d];
                }
            }
        }
        Cache {
            kt,
            v,
            stride,
            pool_k,
            pool_v,
            ids,
            block_values,
            head_offset: head_values,
        }
    }

    fn contiguous(&self, hd: usize) -> ops::KvBlocks<'_> {
        ops::KvBlocks::contiguous(&self.kt, self.stride, &self.v, hd)
    }

    fn paged(&self, hd: usize) -> ops::KvBlocks<'_> {
        ops::KvBlocks {
            data: ops::KvData::F32 {
                k: &self.pool_k,
                v: &self.pool_v,
            },
            blocks: &self.ids,
            block_values: self.block_values,
            head_offset: self.head_offset,
            tokens: BT,
            head_dim: hd,
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn paged_attention_is_contiguous_attention_and_each_query_its_own() {
    let mut rng = Rng::new(5);
    let mut cases = 0;
    for k in kernels::available() {
        for hd in [64usize, 128] {
            for len in [1usize, 63, 64, 65, 200, 300] {
                let cache = Cache::new(&mut rng, hd, len);
                // A causal block: 2 heads x up to 5 tokens ending at `len`.
                let tokens = len.min(5);
                let lens: Vec<usize> = (0..tokens)
                    .flat_map(|t| [len - tokens + 1 + t; 2])
                    .collect();
                let nq = lens.len();
                let q: Vec<f32> = (0..nq * hd).map(|_| uniform(&mut rng)).collect();
                let run = |kv: &ops::KvBlocks, q: &[f32], lens: &[usize]| {
                    let mut s = vec![0.0; ops::attend_block_scratch(lens)];
                    let mut o = vec![f32::NAN; lens.len() * hd];
                    (k.ops.attend_block)(q, lens, kv, 0.125, &mut s, &mut o);
                    o
                };
                let whole = run(&cache.contiguous(hd), &q, &lens);
                let paged = run(&cache.paged(hd), &q, &lens);
                assert_eq!(bits(&whole), bits(&paged), "{}: hd {hd} len {len}", k.name);
                for j in 0..nq {
                    let alone = run(&cache.paged(hd), &q[j * hd..(j + 1) * hd], &lens[j..j + 1]);
                    assert_eq!(
                        bits(&alone),
                        bits(&paged[j * hd..(j + 1) * hd]),
                        "{}: hd {hd} len {len}: query {j} alone",
                        k.name
                    );
                }
                cases += 1;
            }
        }
    }
    eprintln!("{cases} cases");
}

/// A paged cache in a compact type, and the f32 cache of exactly the values it stores (same block ids and
/// layout), built from `cache`'s pool.
struct Compact {
    f16_k: Vec<u16>,
    f16_v: Vec<u16>,
    q8_k: Vec<i8>,
    q8_v: Vec<i8>,
    q8_ks: Vec<f32>,
    q8_vs: Vec<f32>,
    /// The f16 cache widened.
    f16_as_f32: (Vec<f32>, Vec<f32>),
    /// The q8 cache dequantized.
    q8_as_f32: (Vec<f32>, Vec<f32>),
}

/// Signed bytes and the scale `max|x| / 127` (the KV pool's q8_0 rounding).
fn quantize(x: &[f32]) -> (Vec<i8>, f32) {
    let d = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let q = x
        .iter()
        .map(|&v| (v * id).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (q, d)
}

impl Compact {
    fn new(c: &Cache, hd: usize) -> Compact {
        let f16 = |x: &f32| half::f16::from_f32(*x).to_bits();
        let (f16_k, f16_v): (Vec<u16>, Vec<u16>) = (
            c.pool_k.iter().map(f16).collect(),
            c.pool_v.iter().map(f16).collect(),
        );
        let widen = |h: &[u16]| -> Vec<f32> {
            h.iter()
                .map(|&b| half::f16::from_bits(b).to_f32())
                .collect()
        };
        let f16_as_f32 = (widen(&f16_k), widen(&f16_v));
        let g = ops::kv_q8_group(hd);
        let n = c.pool_k.len();
        let (mut q8_k, mut q8_v) = (vec![0i8; n], vec![0i8; n]);
        let (mut q8_ks, mut q8_vs) = (vec![0.0f32; n / g], vec![0.0f32; n / g]);
        let (mut dk, mut dv) = (vec![0.0f32; n], vec![0.0f32; n]);
        // Every head region of every block (the test's pool holds whole regions of `hd * BT` values).
        for base in (0..n).step_by(hd * BT) {
            for s in 0..BT {
                for c0 in (0..hd).step_by(g) {
                    // Keys: dimensions c0.. of position s, transposed; their scale at [group][position].
                    let at = |d: usize| base + d * BT + s;
                    let x: Vec<f32> = (c0..c0 + g).map(|d| c.pool_k[at(d)]).collect();
                    let (q, d) = quantize(&x);
                    q8_ks[base / g + c0 / g * BT + s] = d;
                    for (i, &qi) in q.iter().enumerate() {
                        q8_k[at(c0 + i)] = qi;
                        dk[at(c0 + i)] = qi as f32 * d;
                    }
                    // Values: row-major, a scale per group.
                    let row = base + s * hd + c0;
                    let (q, d) = quantize(&c.pool_v[row..row + g]);
                    q8_vs[row / g] = d;
                    for (i, &qi) in q.iter().enumerate() {
                        q8_v[row + i] = qi;
                        dv[row + i] = qi as f32 * d;
                    }
                }
            }
        }
        Compact {
            f16_k,
            f16_v,
            q8_k,
            q8_v,
            q8_ks,
            q8_vs,
            f16_as_f32,
            q8_as_f32: (dk, dv),
        }
    }
}

/// Attention reads f16 and q8_0 caches directly, widening tiles in registers: in every kernel set it gives
/// exactly the bits it gives over an f32 cache holding the same values, each query the same alone as among
/// others, and within `1e-5 * max|v|` of the scalar reference reading the compact cache value by value.
#[test]
fn compact_caches_read_as_their_f32_values() {
    let mut rng = Rng::new(6);
    let mut cases = 0;
    for hd in [64usize, 128, 40] {
        for len in [1usize, 63, 64, 65, 200, 300] {
            let cache = Cache::new(&mut rng, hd, len);
            let compact = Compact::new(&cache, hd);
            let tokens = len.min(5);
            let lens: Vec<usize> = (0..tokens)
                .flat_map(|t| [len - tokens + 1 + t; 2])
                .collect();
            let nq = lens.len();
            let q: Vec<f32> = (0..nq * hd).map(|_| uniform(&mut rng)).collect();
            let paged = |data| ops::KvBlocks {
                data,
                blocks: &cache.ids,
                block_values: cache.block_values,
                head_offset: cache.head_offset,
                tokens: BT,
                head_dim: hd,
            };
            let types = [
                (
                    "f16",
                    ops::KvData::F16 {
                        k: &compact.f16_k,
                        v: &compact.f16_v,
                    },
                    &compact.f16_as_f32,
                ),
                (
                    "q8_0",
                    ops::KvData::Q8 {
                        k: &compact.q8_k,
                        v: &compact.q8_v,
                        k_scale: &compact.q8_ks,
                        v_scale: &compact.q8_vs,
                    },
                    &compact.q8_as_f32,
                ),
            ];
            for (ty, data, (fk, fv)) in types {
                let kv = paged(data);
                let as_f32 = paged(ops::KvData::F32 { k: fk, v: fv });
                let mut want = vec![0.0; nq * hd];
                let mut s = vec![0.0; ops::attend_block_scratch(&lens)];
                ops::scalar::attend_block(&q, &lens, &kv, 0.125, &mut s, &mut want);
                let vmax = fv.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                for k in kernels::available() {
                    let run = |kv: &ops::KvBlocks, q: &[f32], lens: &[usize]| {
                        let mut s = vec![0.0; ops::attend_block_scratch(lens)];
                        let mut o = vec![f32::NAN; lens.len() * hd];
                        (k.ops.attend_block)(q, lens, kv, 0.125, &mut s, &mut o);
                        o
                    };
                    let ctx = format!("{} {ty}: hd {hd} len {len}", k.name);
                    let got = run(&kv, &q, &lens);
                    assert_eq!(bits(&got), bits(&run(&as_f32, &q, &lens)), "{ctx}");
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!((g - w).abs() <= 1e-5 * vmax, "{ctx}: [{i}] {g} vs {w}");
                    }
                    for j in 0..nq {
                        let alone = run(&kv, &q[j * hd..(j + 1) * hd], &lens[j..j + 1]);
                        assert_eq!(
                            bits(&alone),
                            bits(&got[j * hd..(j + 1) * hd]),
                            "{ctx}: query {j} alone"
                        );
                    }
                    cases += 1;
                }
            }
        }
    }
    eprintln!("{cases} cases");
}
