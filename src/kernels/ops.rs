//! The f32 operations around the matrix products: normalisation, rotary embedding, softmax, SiLU, attention.
//!
//! Each is written once, in plain Rust shaped for the auto-vectoriser (branch-free element maps; sums and
//! maxima over 16 explicit partial lanes, since LLVM will not reassociate a float reduction by itself), and
//! compiled three times: for the baseline target, with AVX2 + FMA, and with AVX-512. Each kernel set carries its
//! copy as an [`Ops`] table (the scalar set carries the `scalar` references below). The arithmetic is the
//! same IEEE operations in every copy (Rust never fuses a multiply and an add by itself), so every copy gives the
//! same bits; against the references, `rope_adjacent_pairs` is bit-identical, `rms_norm` differs in the order
//! of the mean-square sum, and `softmax` / `silu_mul` use a polynomial `exp` within about 2 ulp of `f32::exp`,
//! which keeps them within 1e-6 relative of the references (`tests/kernels.rs`). Attention is the exception:
//! its register tiles are sized per copy and the x86 copies fuse multiply-adds, so copies differ in rounding;
//! each stays within 1e-5 of the largest value magnitude of the reference.

/// The f32 operations of one kernel set ([`super::Kernels::ops`]).
#[derive(Clone, Copy)]
pub struct Ops {
    /// RMSNorm as Granite computes it: `x / sqrt(mean(x^2) + eps)`, then times the learned weight:
    /// `(x, weight, eps, out)`.
    pub rms_norm: fn(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]),
    /// Rotary embedding on adjacent pairs `(2i, 2i + 1)` of each head, `(x, head_dim, cos_sin)`: the GGUF
    /// converter permuted the Q/K rows so that this equals Hugging Face's rotate-half pairing
    /// `(i, i + head_dim / 2)`. `cos_sin` holds `(cos, sin)` of `position * inv_freq[i]` for each pair `i`.
    pub rope: RopeFn,
    /// In-place softmax.
    pub softmax: fn(x: &mut [f32]),
    /// `gate <- silu(gate) * up`, the SwiGLU combination of both the dense MLP and every expert.
    pub silu_mul: fn(gate: &mut [f32], up: &[f32]),
    /// A block of `nq = lens.len()` queries attending over one KV head, causally: query `j`
    /// (`q[j * hd..(j + 1) * hd]`, `hd = q.len() / nq`) sees positions `0..lens[j]`, and gets
    /// `out[j * hd..(j + 1) * hd] = sum_s p_js v_s` with `p_j = softmax_s(scale * q_j . k_s)` over those
    /// positions. Meant for all the query heads of a KV head and a block of consecutive tokens at once (e.g. 2
    /// heads x 16 tokens): every key and value loaded feeds up to four queries from registers. Arguments
    /// `(q, lens, kv, scale, scratch, out)`:
    ///
    /// - `kv`: the KV head's cache as blocks of consecutive positions ([`KvBlocks`]). Only positions below
    ///   `max(lens)` are used, and they must be finite (values past a query's own length are multiplied by
    ///   exactly 0). Score tiles may load key values past a row's last used position within its block, and
    ///   drop them. Each output is the same whatever other queries share the call and however the positions
    ///   are split into blocks (every score is one dot product in dimension order, every output one sum in
    ///   position order), which is what lets a sequence in a batch get exactly what it gets alone.
    /// - `scratch`: at least `nq * max(lens)` values ([`attend_block_scratch`]); left holding the probabilities,
    ///   row `j` at `j * max(lens)`, zero past `lens[j]`.
    /// - A query with `lens[j] == 0` gets zeros. `hd` is at most 256.
    ///
    /// Results match the textbook order of operations to rounding: within `1e-5 * max |v|` (`tests/kernels.rs`).
    pub attend_block: AttendBlockFn,
}

pub type RopeFn = fn(x: &mut [f32], head_dim: usize, cos_sin: &[(f32, f32)]);

pub type AttendBlockFn =
    fn(q: &[f32], lens: &[usize], kv: &KvBlocks, scale: f32, scratch: &mut [f32], out: &mut [f32]);

/// One KV head of one sequence's cache, as the blocks of a pool that hold it: block `i` holds positions
/// `i * tokens..(i + 1) * tokens` at `base(i) = blocks[i] * block_values + head_offset` values into the storage
/// ([`KvData`], which also says how they are stored).
#[derive(Clone, Copy, Debug)]
pub struct KvBlocks<'a> {
    pub data: KvData<'a>,
    pub blocks: &'a [u32],
    /// Values from one block to the next in the storage.
    pub block_values: usize,
    /// Where this head starts within a block.
    pub head_offset: usize,
    /// Positions per block.
    pub tokens: usize,
    pub head_dim: usize,
}

/// The storage of a KV pool (keys `k`, values `v`) in one of its cache types. Per block and head:
/// - `F32`, `F16`: keys transposed (`[head_dim][tokens]`), values row-major (`[tokens][head_dim]`).
/// - `Q8`: signed bytes, keys transposed and values row-major as above, with one f32 scale per group of
///   [`kv_q8_group`]`(head_dim)` consecutive dimensions of a position: a block's value scales row-major
///   (`v_scale[offset / group]`), its key scales `[group][position]` (`k_scale[base / group + c * tokens + s]`
///   for group `c` of position `s`).
#[derive(Clone, Copy, Debug)]
pub enum KvData<'a> {
    F32 {
        k: &'a [f32],
        v: &'a [f32],
    },
    F16 {
        k: &'a [u16],
        v: &'a [u16],
    },
    Q8 {
        k: &'a [i8],
        v: &'a [i8],
        k_scale: &'a [f32],
        v_scale: &'a [f32],
    },
}

/// The largest head size [`Ops::attend_block`] takes (Granite's are 64 and 128).
pub const MAX_HEAD_DIM: usize = 256;

/// Values per scale of the `Q8` cache: ggml's 32, or the whole head row when it is not a multiple of 32.
pub fn kv_q8_group(head_dim: usize) -> usize {
    if head_dim.is_multiple_of(32) {
        32
    } else {
        head_dim
    }
}

/// An f16 (as bits) to f32, branch-free so that loops over it vectorise: the f16 exponent and mantissa placed in
/// an f32 and scaled by 2^112 is exact for normal and subnormal values alike; infinities and NaN keep an all-ones
/// exponent. Equal to `half::f16::to_f32` for every input.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let em = h & 0x7fff;
    let scaled = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000);
    let special = f32::from_bits((em << 13) | 0x7f80_0000);
    let v = if em >= 0x7c00 { special } else { scaled };
    f32::from_bits(v.to_bits() | ((h & 0x8000) << 16))
}

impl<'a> KvBlocks<'a> {
    /// One contiguous f32 cache of `stride` positions: keys `kt[d * stride + s]`, values `v[s * head_dim + d]`.
    pub fn contiguous(kt: &'a [f32], stride: usize, v: &'a [f32], head_dim: usize) -> KvBlocks<'a> {
        KvBlocks {
            data: KvData::F32 { k: kt, v },
            blocks: &[0],
            block_values: 0,
            head_offset: 0,
            tokens: stride,
            head_dim,
        }
    }

    #[inline(always)]
    fn base(&self, i: usize) -> usize {
        self.blocks[i] as usize * self.block_values + self.head_offset
    }

    /// Key `d` of position `s` (the scalar reference's access).
    pub fn key(&self, s: usize, d: usize) -> f32 {
        let (i, p) = (s / self.tokens, s % self.tokens);
        let base = self.base(i);
        match self.data {
            KvData::F32 { k, .. } => k[base + d * self.tokens + p],
            KvData::F16 { k, .. } => half::f16::from_bits(k[base + d * self.tokens + p]).to_f32(),
            KvData::Q8 { k, k_scale, .. } => {
                let g = kv_q8_group(self.head_dim);
                k[base + d * self.tokens + p] as f32 * k_scale[base / g + d / g * self.tokens + p]
            }
        }
    }

    /// Value `d` of position `s`.
    pub fn value(&self, s: usize, d: usize) -> f32 {
        let (i, p) = (s / self.tokens, s % self.tokens);
        let at = self.base(i) + p * self.head_dim + d;
        match self.data {
            KvData::F32 { v, .. } => v[at],
            KvData::F16 { v, .. } => half::f16::from_bits(v[at]).to_f32(),
            KvData::Q8 { v, v_scale, .. } => {
                v[at] as f32 * v_scale[at / kv_q8_group(self.head_dim)]
            }
        }
    }
}

/// The scratch [`Ops::attend_block`] needs for these query lengths.
pub fn attend_block_scratch(lens: &[usize]) -> usize {
    lens.len() * lens.iter().copied().max().unwrap_or(0)
}

/// The references: plain loops, `f32::exp`.
pub(super) const SCALAR: Ops = Ops {
    rms_norm: scalar::rms_norm,
    rope: scalar::rope_adjacent_pairs,
    softmax: scalar::softmax,
    silu_mul: scalar::silu_mul,
    attend_block: scalar::attend_block,
};

/// The bodies compiled for the baseline target (the portable set's).
pub(super) const BASELINE: Ops = Ops {
    rms_norm: body::rms_norm,
    rope: body::rope,
    softmax: body::softmax,
    silu_mul: body::silu_mul,
    attend_block: body::attend_block::<body::Separate, body::BitArithmetic, 32, 16, 8, 32, 16, 8>,
};

/// The one definition of each operation, inlined into each compiled copy.
mod body {
    use super::{KvBlocks, KvData, MAX_HEAD_DIM, f16_to_f32, kv_q8_group};

    /// Partial lanes for sums and maxima: a whole zmm, two ymm, four xmm.
    const L: usize = 16;

    #[inline(always)]
    pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let body = x.len() / L * L;
        let mut acc = [0.0f32; L];
        for c in x[..body].chunks_exact(L) {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v * v;
            }
        }
        let mut sq = pairwise(acc);
        for v in &x[body..] {
            sq += v * v;
        }
        let scale = 1.0 / (sq / x.len() as f32 + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = v * scale * w;
        }
    }

    #[inline(always)]
    pub fn rope(x: &mut [f32], head_dim: usize, cos_sin: &[(f32, f32)]) {
        for head in x.chunks_exact_mut(head_dim) {
            for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(cos_sin) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos - b * sin;
                pair[1] = a * sin + b * cos;
            }
        }
    }

    #[inline(always)]
    pub fn softmax(x: &mut [f32]) {
        let body = x.len() / L * L;
        let mut m = [f32::NEG_INFINITY; L];
        for c in x[..body].chunks_exact(L) {
            for (mi, &v) in m.iter_mut().zip(c) {
                *mi = mi.max(v);
            }
        }
        let max = x[body..]
            .iter()
            .chain(&m)
            .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let mut acc = [0.0f32; L];
        for c in x[..body].chunks_exact_mut(L) {
            for (a, v) in acc.iter_mut().zip(c) {
                *v = exp(*v - max);
                *a += *v;
            }
        }
        let mut sum = pairwise(acc);
        for v in &mut x[body..] {
            *v = exp(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in x.iter_mut() {
            *v *= inv;
        }
    }

    #[inline(always)]
    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp(-*g)) * u;
        }
    }

    /// How a copy multiplies and adds: fused where the instruction set has FMA (the x86 copies), as a product
    /// and a sum where `mul_add` would be a library call (the baseline copy).
    pub trait Madd {
        fn madd(a: f32, b: f32, c: f32) -> f32;
    }

    pub struct Fused;
    pub struct Separate;

    impl Madd for Fused {
        #[inline(always)]
        fn madd(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }

    impl Madd for Separate {
        #[inline(always)]
        fn madd(a: f32, b: f32, c: f32) -> f32 {
            a * b + c
        }
    }

    /// How a copy widens f16 cache values to f32: F16C's conversion on x86, the branch-free bit arithmetic of
    /// [`f16_to_f32`] elsewhere. Both are exact, so every copy reads the same values.
    pub trait Widen {
        fn f16<const N: usize>(h: &[u16; N]) -> [f32; N];
    }

    pub struct BitArithmetic;

    impl Widen for BitArithmetic {
        #[inline(always)]
        fn f16<const N: usize>(h: &[u16; N]) -> [f32; N] {
            let mut out = [0.0; N];
            for (o, &x) in out.iter_mut().zip(h) {
                *o = f16_to_f32(x);
            }
            out
        }
    }

    /// Block `i` of one KV head in its stored type, read a register tile at a time as f32: attention loads a
    /// compact cache's bytes once and widens them in registers, so an f16 cache costs half the memory traffic of
    /// an f32 one and a q8_0 cache about a quarter. Keys at dimension `d` of positions `s..` and values at
    /// dimensions `d0..` of position `s` (layouts as in [`KvData`]).
    pub trait KvBlock<'a>: Sized {
        fn at(kv: &KvBlocks<'a>, i: usize) -> Self;
        /// Whether a tile of `n` positions from `s` can be loaded at every dimension (a contiguous f32 cache may
        /// end before its last block does).
        fn keys_fit(&self, s: usize, n: usize) -> bool;
        fn keys<W: Widen, const N: usize>(&self, d: usize, s: usize) -> [f32; N];
        fn key(&self, d: usize, s: usize) -> f32;
        fn values<W: Widen, const N: usize>(&self, s: usize, d0: usize) -> [f32; N];
        /// Adds the block's keys (and its values) to the lines to request into L2 ahead of their use.
        fn prefetch_keys(&self, lines: &mut Pending);
        fn prefetch_values(&self, lines: &mut Pending);
    }

    /// Cache lines to request into L2, a few at a time between the loads they are to overlap with: a block's
    /// keys or values are a few KiB that the hardware prefetchers reach too late (each block of a sequence is its
    /// own short stream, anywhere in the pool), and asked for all at once they stall the core on full fill
    /// buffers instead of arriving while it computes (`perf`: half of attention's samples on those bursts). The
    /// next block's keys and this block's values go out 4 lines per head dimension of the scores, the next
    /// block's values 2 per position of the weighted sum. Alternating `quarry bench s4.gguf`, f16 cache: 16
    /// sequences (`--parallel 16 -p 128 -n 64`) 310-314 -> 320-322 tok/s, 8 sequences 211-215 -> 214-219, one
    /// after 3500 positions (`--depth 3500 -p 0 -n 64`) 46.6-47.7 -> 49.8.
    #[derive(Default)]
    pub struct Pending {
        /// `(next, end)` byte addresses, the last taken first.
        ranges: [(usize, usize); 4],
        n: usize,
    }

    impl Pending {
        #[inline(always)]
        fn add<T>(&mut self, x: &[T]) {
            if self.n == self.ranges.len() {
                self.flush();
            }
            let p = x.as_ptr() as usize;
            self.ranges[self.n] = (p, p + std::mem::size_of_val(x));
            self.n += 1;
        }

        /// Requests up to `lines` lines.
        #[inline(always)]
        fn step(&mut self, lines: usize) {
            for _ in 0..lines {
                if self.n == 0 {
                    return;
                }
                let (next, end) = &mut self.ranges[self.n - 1];
                prefetch_line(*next);
                *next += 64;
                if *next >= *end {
                    self.n -= 1;
                }
            }
        }

        /// Requests every line left.
        #[inline(always)]
        fn flush(&mut self) {
            while self.n > 0 {
                self.step(64);
            }
        }
    }

    #[inline(always)]
    fn prefetch_line(addr: usize) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch never faults; the address is inside a slice the caller holds.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(addr as *const i8)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = addr;
    }

    /// A value type stored as it is (f32) or widened exactly (f16 as bits).
    pub trait Plain: Copy + Sized {
        /// Keys and values of a cache of this type.
        fn storage<'a>(data: KvData<'a>) -> (&'a [Self], &'a [Self]);
        fn widen<W: Widen, const N: usize>(x: &[Self; N]) -> [f32; N];
        fn widen_one(x: Self) -> f32;
    }

    impl Plain for f32 {
        #[inline(always)]
        fn storage<'a>(data: KvData<'a>) -> (&'a [f32], &'a [f32]) {
            let KvData::F32 { k, v } = data else {
                unreachable!("an f32 block of another cache type")
            };
            (k, v)
        }
        #[inline(always)]
        fn widen<W: Widen, const N: usize>(x: &[f32; N]) -> [f32; N] {
            *x
        }
        #[inline(always)]
        fn widen_one(x: f32) -> f32 {
            x
        }
    }

    impl Plain for u16 {
        #[inline(always)]
        fn storage<'a>(data: KvData<'a>) -> (&'a [u16], &'a [u16]) {
            let KvData::F16 { k, v } = data else {
                unreachable!("an f16 block of another cache type")
            };
            (k, v)
        }
        #[inline(always)]
        fn widen<W: Widen, const N: usize>(x: &[u16; N]) -> [f32; N] {
            W::f16(x)
        }
        #[inline(always)]
        fn widen_one(x: u16) -> f32 {
            f16_to_f32(x)
        }
    }

    /// A block of an f32 or f16 cache: keys transposed, values row-major, one value per element.
    pub struct PlainBlock<'a, T> {
        k: &'a [T],
        v: &'a [T],
        bt: usize,
        hd: usize,
    }

    impl<'a, T: Plain> KvBlock<'a> for PlainBlock<'a, T> {
        #[inline(always)]
        fn at(kv: &KvBlocks<'a>, i: usize) -> Self {
            let (k, v) = T::storage(kv.data);
            let (base, n) = (kv.base(i), kv.head_dim * kv.tokens);
            // A contiguous f32 cache may end before its block does.
            PlainBlock {
                k: &k[base..(base + n).min(k.len())],
                v: &v[base..(base + n).min(v.len())],
                bt: kv.tokens,
                hd: kv.head_dim,
            }
        }
        #[inline(always)]
        fn keys_fit(&self, s: usize, n: usize) -> bool {
            (self.hd - 1) * self.bt + s + n <= self.k.len()
        }
        #[inline(always)]
        fn keys<W: Widen, const N: usize>(&self, d: usize, s: usize) -> [f32; N] {
            let at = d * self.bt + s;
            T::widen::<W, N>(self.k[at..at + N].try_into().unwrap())
        }
        #[inline(always)]
        fn key(&self, d: usize, s: usize) -> f32 {
            T::widen_one(self.k[d * self.bt + s])
        }
        #[inline(always)]
        fn values<W: Widen, const N: usize>(&self, s: usize, d0: usize) -> [f32; N] {
            let at = s * self.hd + d0;
            T::widen::<W, N>(self.v[at..at + N].try_into().unwrap())
        }
        #[inline(always)]
        fn prefetch_keys(&self, lines: &mut Pending) {
            lines.add(self.k);
        }
        #[inline(always)]
        fn prefetch_values(&self, lines: &mut Pending) {
            lines.add(self.v);
        }
    }

    pub struct Q8Block<'a> {
        k: &'a [i8],
        v: &'a [i8],
        /// `[group][position]`.
        k_scale: &'a [f32],
        /// `[position][group]`.
        v_scale: &'a [f32],
        bt: usize,
        hd: usize,
        /// Groups of 32 dimensions (else one group per position: [`kv_q8_group`]).
        by_32: bool,
    }

    impl<'a> Q8Block<'a> {
        /// The scale group of dimension `d` and where `d` sits in it.
        #[inline(always)]
        fn group(&self, d: usize) -> (usize, usize) {
            if self.by_32 { (d / 32, d % 32) } else { (0, d) }
        }
    }

    impl<'a> KvBlock<'a> for Q8Block<'a> {
        #[inline(always)]
        fn at(kv: &KvBlocks<'a>, i: usize) -> Self {
            let KvData::Q8 {
                k,
                v,
                k_scale,
                v_scale,
            } = kv.data
            else {
                unreachable!("a q8 block of another cache type")
            };
            let (base, n, g) = (
                kv.base(i),
                kv.head_dim * kv.tokens,
                kv_q8_group(kv.head_dim),
            );
            Q8Block {
                k: &k[base..base + n],
                v: &v[base..base + n],
                k_scale: &k_scale[base / g..(base + n) / g],
                v_scale: &v_scale[base / g..(base + n) / g],
                bt: kv.tokens,
                hd: kv.head_dim,
                by_32: g == 32,
            }
        }
        #[inline(always)]
        fn keys_fit(&self, s: usize, n: usize) -> bool {
            s + n <= self.bt
        }
        #[inline(always)]
        fn keys<W: Widen, const N: usize>(&self, d: usize, s: usize) -> [f32; N] {
            let at = d * self.bt + s;
            let sc_at = self.group(d).0 * self.bt + s;
            let q: &[i8; N] = self.k[at..at + N].try_into().unwrap();
            let sc: &[f32; N] = self.k_scale[sc_at..sc_at + N].try_into().unwrap();
            let mut out = [0.0; N];
            for ((o, &x), &d) in out.iter_mut().zip(q).zip(sc) {
                *o = x as f32 * d;
            }
            out
        }
        #[inline(always)]
        fn key(&self, d: usize, s: usize) -> f32 {
            self.k[d * self.bt + s] as f32 * self.k_scale[self.group(d).0 * self.bt + s]
        }
        #[inline(always)]
        fn values<W: Widen, const N: usize>(&self, s: usize, d0: usize) -> [f32; N] {
            let at = s * self.hd + d0;
            let q: &[i8; N] = self.v[at..at + N].try_into().unwrap();
            let per_row = if self.by_32 { self.hd / 32 } else { 1 };
            let (c, within) = self.group(d0);
            let g0 = s * per_row + c;
            let g = if self.by_32 { 32 } else { self.hd };
            let mut out = [0.0; N];
            if within + N <= g {
                let d = self.v_scale[g0];
                for (o, &x) in out.iter_mut().zip(q) {
                    *o = x as f32 * d;
                }
            } else if self.by_32 && within == 0 && N.is_multiple_of(32) {
                let sc = &self.v_scale[g0..g0 + N / 32];
                for ((o, q), &d) in out.chunks_exact_mut(32).zip(q.chunks_exact(32)).zip(sc) {
                    for (o, &x) in o.iter_mut().zip(q) {
                        *o = x as f32 * d;
                    }
                }
            } else {
                for (i, (o, &x)) in out.iter_mut().zip(q).enumerate() {
                    *o = x as f32 * self.v_scale[s * per_row + self.group(d0 + i).0];
                }
            }
            out
        }
        #[inline(always)]
        fn prefetch_keys(&self, lines: &mut Pending) {
            lines.add(self.k);
            lines.add(self.k_scale);
        }
        #[inline(always)]
        fn prefetch_values(&self, lines: &mut Pending) {
            lines.add(self.v);
            lines.add(self.v_scale);
        }
    }

    /// [`super::Ops::attend_block`]. Queries are taken 4 at a time (then 2, 1). Scores: a register tile of 4
    /// queries x `P4` positions (`P2`, `P1` for 2 and 1 queries), one run of keys per head dimension feeding
    /// all of them. Values: 4 queries x `D4` dimensions (`D2`, `D1`), one value row chunk per position feeding
    /// all of them, accumulated in registers across a whole cache block of positions (no store-to-load chain
    /// per position). The keys (then values) of one block stay in L1/L2 while every query tile uses them, each
    /// tile widened from the stored type as it is loaded ([`KvBlock`]). Each copy picks the widths so that a
    /// tile is whole registers and has enough independent accumulators to hide the multiply-add latency (at
    /// least 8 on AVX2 and baseline, 4 zmm on AVX-512) within its register file; with fewer queries, wider
    /// tiles.
    #[inline(always)]
    pub fn attend_block<
        M: Madd,
        W: Widen,
        const P1: usize,
        const P2: usize,
        const P4: usize,
        const D1: usize,
        const D2: usize,
        const D4: usize,
    >(
        q: &[f32],
        lens: &[usize],
        kv: &KvBlocks,
        scale: f32,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        match kv.data {
            KvData::F32 { .. } => attend::<M, W, PlainBlock<f32>, P1, P2, P4, D1, D2, D4>(
                q, lens, kv, scale, scratch, out,
            ),
            KvData::F16 { .. } => attend::<M, W, PlainBlock<u16>, P1, P2, P4, D1, D2, D4>(
                q, lens, kv, scale, scratch, out,
            ),
            KvData::Q8 { .. } => {
                attend::<M, W, Q8Block, P1, P2, P4, D1, D2, D4>(q, lens, kv, scale, scratch, out)
            }
        }
    }

    /// [`attend_block`] over one cache type.
    #[inline(always)]
    fn attend<
        'a,
        M: Madd,
        W: Widen,
        B: KvBlock<'a>,
        const P1: usize,
        const P2: usize,
        const P4: usize,
        const D1: usize,
        const D2: usize,
        const D4: usize,
    >(
        q: &[f32],
        lens: &[usize],
        kv: &KvBlocks<'a>,
        scale: f32,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        let nq = lens.len();
        if nq == 0 {
            return;
        }
        let hd = q.len() / nq;
        assert!(hd > 0 && hd <= MAX_HEAD_DIM && q.len() == nq * hd && out.len() == nq * hd);
        let lmax = lens.iter().copied().max().unwrap_or(0);
        out.fill(0.0);
        if lmax == 0 {
            return;
        }
        assert!(kv.head_dim == hd && kv.tokens > 0);
        let bt = kv.tokens;
        assert!(kv.blocks.len() * bt >= lmax && scratch.len() >= nq * lmax);
        let p = &mut scratch[..nq * lmax];
        // Query tiles: 4, then 2, then 1, each with the longest length among its queries.
        let tiles = || {
            let mut j = 0;
            std::iter::from_fn(move || {
                if j >= nq {
                    return None;
                }
                let jt = if nq - j >= 4 {
                    4
                } else if nq - j >= 2 {
                    2
                } else {
                    1
                };
                let tile = (j, jt, lens[j..j + jt].iter().copied().max().unwrap_or(0));
                j += jt;
                Some(tile)
            })
        };

        // Scores, block by block of positions: `p` rows start at column c0 for this block's positions. The next
        // block's keys are requested while this one's are used, and each block's values for the pass after.
        let blocks = lmax.div_ceil(bt);
        let mut lines = Pending::default();
        B::at(kv, 0).prefetch_keys(&mut lines);
        lines.flush();
        for (bi, c0) in (0..lmax).step_by(bt).enumerate() {
            let blk = B::at(kv, bi);
            if bi + 1 < blocks {
                B::at(kv, bi + 1).prefetch_keys(&mut lines);
            }
            blk.prefetch_values(&mut lines);
            for (j, jt, lt) in tiles() {
                let c1 = lt.min(c0 + bt);
                if c1 <= c0 {
                    continue;
                }
                let q = &q[j * hd..(j + jt) * hd];
                let p = &mut p[j * lmax + c0..(j + jt) * lmax];
                match jt {
                    4 => scores::<M, W, B, 4, P4>(q, &blk, c1 - c0, scale, p, lmax, &mut lines),
                    2 => scores::<M, W, B, 2, P2>(q, &blk, c1 - c0, scale, p, lmax, &mut lines),
                    _ => scores::<M, W, B, 1, P1>(q, &blk, c1 - c0, scale, p, lmax, &mut lines),
                }
            }
            lines.flush();
        }

        // Each query's softmax over its own positions; zero probability past them (up to its tile's length).
        for (row, &len) in p.chunks_exact_mut(lmax).zip(lens) {
            if len > 0 {
                softmax(&mut row[..len]);
            }
            row[len..].fill(0.0);
        }

        // Weighted sum of values, block by block of positions, a register tile of dimensions at a time.
        for (bi, c0) in (0..lmax).step_by(bt).enumerate() {
            let blk = B::at(kv, bi);
            if bi + 1 < blocks {
                B::at(kv, bi + 1).prefetch_values(&mut lines);
            }
            for (j, jt, lt) in tiles() {
                let c1 = lt.min(c0 + bt);
                if c1 <= c0 {
                    continue;
                }
                let p = &p[j * lmax + c0..(j + jt) * lmax];
                let n = c1 - c0;
                let out = &mut out[j * hd..(j + jt) * hd];
                let dt = match jt {
                    4 => D4,
                    2 => D2,
                    _ => D1,
                };
                let mut d0 = 0;
                while d0 < hd {
                    // Whole register tiles, then 16 and 8 dimensions, then single ones.
                    let (width, step) = if hd - d0 >= dt {
                        (0, dt)
                    } else if hd - d0 >= 16 {
                        (1, 16)
                    } else if hd - d0 >= 8 {
                        (2, 8)
                    } else {
                        (3, 1)
                    };
                    let b = &blk;
                    match (jt, width) {
                        (4, 0) => values::<M, W, B, 4, D4>(p, lmax, b, d0, n, out, &mut lines),
                        (2, 0) => values::<M, W, B, 2, D2>(p, lmax, b, d0, n, out, &mut lines),
                        (_, 0) => values::<M, W, B, 1, D1>(p, lmax, b, d0, n, out, &mut lines),
                        (4, 1) => values::<M, W, B, 4, 16>(p, lmax, b, d0, n, out, &mut lines),
                        (2, 1) => values::<M, W, B, 2, 16>(p, lmax, b, d0, n, out, &mut lines),
                        (_, 1) => values::<M, W, B, 1, 16>(p, lmax, b, d0, n, out, &mut lines),
                        (4, 2) => values::<M, W, B, 4, 8>(p, lmax, b, d0, n, out, &mut lines),
                        (2, 2) => values::<M, W, B, 2, 8>(p, lmax, b, d0, n, out, &mut lines),
                        (_, 2) => values::<M, W, B, 1, 8>(p, lmax, b, d0, n, out, &mut lines),
                        (4, _) => values::<M, W, B, 4, 1>(p, lmax, b, d0, n, out, &mut lines),
                        (2, _) => values::<M, W, B, 2, 1>(p, lmax, b, d0, n, out, &mut lines),
                        (_, _) => values::<M, W, B, 1, 1>(p, lmax, b, d0, n, out, &mut lines),
                    }
                    d0 += step;
                }
            }
            lines.flush();
        }
    }

    /// `p[jj * ps + s] = scale * q_jj . k_s` for the `JT` queries in `q` and the block's positions `0..n`:
    /// `PT` positions at a time; a last partial tile loads a whole one when the block reaches that far (the
    /// extra scores are dropped), else runs one position at a time.
    #[inline(always)]
    fn scores<'a, M: Madd, W: Widen, B: KvBlock<'a>, const JT: usize, const PT: usize>(
        q: &[f32],
        blk: &B,
        n_pos: usize,
        scale: f32,
        p: &mut [f32],
        ps: usize,
        lines: &mut Pending,
    ) {
        let hd = q.len() / JT;
        // The queries transposed, `qt[d][jj]`: the tile loop then indexes nothing that can panic, which
        // keeps its accumulators in registers.
        let mut qt = [[0.0f32; JT]; MAX_HEAD_DIM];
        for (d, qd) in qt[..hd].iter_mut().enumerate() {
            for (jj, x) in qd.iter_mut().enumerate() {
                *x = q[jj * hd + d];
            }
        }
        let qt = &qt[..hd];
        let mut s = 0;
        while s < n_pos {
            let n = (n_pos - s).min(PT);
            // A partial tile may read past `max(lens)` within the block: in bounds, and dropped.
            if n == PT || blk.keys_fit(s, PT) {
                let mut acc = [[0.0f32; PT]; JT];
                for (d, qd) in qt.iter().enumerate() {
                    lines.step(4);
                    let k = blk.keys::<W, PT>(d, s);
                    for (acc_j, &x) in acc.iter_mut().zip(qd) {
                        for (a, &kv) in acc_j.iter_mut().zip(&k) {
                            *a = M::madd(x, kv, *a);
                        }
                    }
                }
                for (jj, acc_j) in acc.iter().enumerate() {
                    for (o, &a) in p[jj * ps + s..jj * ps + s + n].iter_mut().zip(acc_j) {
                        *o = a * scale;
                    }
                }
            } else {
                for t in s..s + n {
                    for jj in 0..JT {
                        let mut a = 0.0f32;
                        for (d, qd) in qt.iter().enumerate() {
                            a = M::madd(qd[jj], blk.key(d, t), a);
                        }
                        p[jj * ps + t] = a * scale;
                    }
                }
            }
            s += n;
        }
    }

    /// `out[jj * hd + d] += sum_{s < n} p[jj * ps + s] * v_s[d]` for the `JT` queries and dimensions
    /// `d0..d0 + DT` over a block's first `n` positions, accumulated in registers.
    #[inline(always)]
    fn values<'a, M: Madd, W: Widen, B: KvBlock<'a>, const JT: usize, const DT: usize>(
        p: &[f32],
        ps: usize,
        blk: &B,
        d0: usize,
        n: usize,
        out: &mut [f32],
        lines: &mut Pending,
    ) {
        let hd = out.len() / JT;
        let mut acc = [[0.0f32; DT]; JT];
        for (jj, acc_j) in acc.iter_mut().enumerate() {
            acc_j.copy_from_slice(&out[jj * hd + d0..jj * hd + d0 + DT]);
        }
        let rows: [&[f32]; JT] = std::array::from_fn(|jj| &p[jj * ps..jj * ps + n]);
        for i in 0..n {
            lines.step(2);
            let x = blk.values::<W, DT>(i, d0);
            for (acc_j, row) in acc.iter_mut().zip(&rows) {
                let pj = row[i];
                for (a, &xv) in acc_j.iter_mut().zip(&x) {
                    *a = M::madd(pj, xv, *a);
                }
            }
        }
        for (jj, acc_j) in acc.iter().enumerate() {
            out[jj * hd + d0..jj * hd + d0 + DT].copy_from_slice(acc_j);
        }
    }

    #[inline(always)]
    fn pairwise(mut a: [f32; L]) -> f32 {
        let mut n = L;
        while n > 1 {
            n /= 2;
            for i in 0..n {
                a[i] += a[i + n];
            }
        }
        a[0]
    }

    /// `e^x`: `x = n ln2 + r` with |r| <= ln2 / 2 (ln2 split in two so `r` is exact), a degree-6 polynomial for
    /// `e^r` (the classic Cephes `expf` coefficients, about 1 ulp), and `2^n` applied as two factors so that
    /// results near overflow and in the subnormal range form without an intermediate overflow. Inputs are
    /// clamped to where `e^x` is 0 or infinite anyway. Branch-free, so loops over it vectorise.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to an integer
        let x = x.clamp(-105.0, 89.0);
        let y = x * std::f32::consts::LOG2_E + MAGIC;
        let n = y - MAGIC;
        // n as an integer, from the bits of y = 1.5 * 2^23 + n (a float-to-int cast would not vectorise:
        // its saturation is done lane by lane).
        let ni = y.to_bits() as i32 - MAGIC.to_bits() as i32;
        let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let mut p = 1.987_569_1e-4;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 0.5;
        let p = p * (r * r) + r + 1.0;
        let n1 = ni >> 1;
        let pow = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
        p * pow(n1) * pow(ni - n1)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{KvBlocks, Ops, body};
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};

    /// F16C's `vcvtph2ps`, 8 values an instruction. Only the copies below use it, and only inside their
    /// `target_feature` entries, whose kernel sets are handed out after F16C was detected.
    pub struct F16c;

    impl body::Widen for F16c {
        #[inline(always)]
        fn f16<const N: usize>(h: &[u16; N]) -> [f32; N] {
            let mut out = [0.0f32; N];
            let mut i = 0;
            while i + 8 <= N {
                // SAFETY: `i + 8 <= N` keeps both 8-value accesses in bounds; F16C is enabled in every function
                // this is inlined into (see above).
                unsafe {
                    let x = _mm_loadu_si128(h.as_ptr().add(i) as *const __m128i);
                    _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(x));
                }
                i += 8;
            }
            for (o, &x) in out[i..].iter_mut().zip(&h[i..]) {
                *o = super::f16_to_f32(x);
            }
            out
        }
    }

    /// The bodies compiled with `$features` (see `target_feature_entries!`), attention with the given register
    /// tiles. Only the x86 kernel sets whose detection covers `$features` carry these tables.
    macro_rules! ops_compiled_with {
        ($features:literal, attend_block::<$madd:ty, $widen:ty, $($tile:literal),*>) => {{
            target_feature_entries! { $features;
                fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) = body::rms_norm(x, w, eps, out);
                fn rope(x: &mut [f32], hd: usize, cs: &[(f32, f32)]) = body::rope(x, hd, cs);
                fn softmax(x: &mut [f32]) = body::softmax(x);
                fn silu_mul(g: &mut [f32], u: &[f32]) = body::silu_mul(g, u);
                #[allow(clippy::too_many_arguments)]
                fn attend_block(
                    q: &[f32],
                    lens: &[usize],
                    kv: &KvBlocks,
                    sc: f32,
                    s: &mut [f32],
                    o: &mut [f32],
                ) = body::attend_block::<$madd, $widen, $($tile),*>(q, lens, kv, sc, s, o);
            }
            Ops { rms_norm, rope, softmax, silu_mul, attend_block }
        }};
    }

    /// The avx2 and avxvnni sets' copy.
    pub(in crate::kernels) const AVX2: Ops = ops_compiled_with!(
        "avx2,fma,f16c",
        attend_block::<body::Fused, F16c, 64, 32, 16, 64, 32, 16>
    );

    /// The avx512vnni set's copy. No tile is wider than a pool block's 64 positions: a 128-position tile for one
    /// query never fits in a block, so one query (a model whose KV heads are not shared) ran position by position
    /// (`cargo bench --bench kernels -- attention`, one by one: 3.9 -> 11 GFLOP/s).
    pub(in crate::kernels) const AVX512: Ops = ops_compiled_with!(
        "avx512f,avx2,fma,f16c",
        attend_block::<body::Fused, F16c, 64, 64, 64, 64, 64, 64>
    );
}

/// The references the compiled copies are tested against (the scalar kernel set's table, and a test hook of
/// `tests/kernels.rs` and the benches).
#[doc(hidden)]
pub mod scalar {
    use super::KvBlocks;

    pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = v * scale * w;
        }
    }

    pub fn rope_adjacent_pairs(x: &mut [f32], head_dim: usize, cos_sin: &[(f32, f32)]) {
        for head in x.chunks_exact_mut(head_dim) {
            for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(cos_sin) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos - b * sin;
                pair[1] = a * sin + b * cos;
            }
        }
    }

    pub fn softmax(x: &mut [f32]) {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0;
        for v in x.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in x.iter_mut() {
            *v *= inv;
        }
    }

    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    }

    /// Attention of one head the textbook way: a dot product per position, softmax, weighted sum of values.
    pub fn attend_head(
        q: &[f32],
        kv: &KvBlocks,
        len: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        for (s, score) in scores[..len].iter_mut().enumerate() {
            *score = q
                .iter()
                .enumerate()
                .map(|(d, &qd)| qd * kv.key(s, d))
                .sum::<f32>()
                * scale;
        }
        softmax(&mut scores[..len]);
        out.fill(0.0);
        for (s, &p) in scores[..len].iter().enumerate() {
            for (d, o) in out.iter_mut().enumerate() {
                *o += p * kv.value(s, d);
            }
        }
    }

    /// A block of queries, each the textbook way ([`attend_head`]) over its own length; `scratch` as in
    /// [`super::Ops::attend_block`].
    pub fn attend_block(
        q: &[f32],
        lens: &[usize],
        kv: &KvBlocks,
        scale: f32,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        let nq = lens.len();
        if nq == 0 {
            return;
        }
        let hd = q.len() / nq;
        let lmax = lens.iter().copied().max().unwrap_or(0);
        for (j, &len) in lens.iter().enumerate() {
            let row = &mut scratch[j * lmax..(j + 1) * lmax];
            let o = &mut out[j * hd..(j + 1) * hd];
            if len == 0 {
                o.fill(0.0);
            } else {
                attend_head(&q[j * hd..(j + 1) * hd], kv, len, scale, row, o);
            }
            row[len..].fill(0.0);
        }
    }
}
