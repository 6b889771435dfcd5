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
