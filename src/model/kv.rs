//! Keys and values of every sequence, in fixed-size blocks from one pool (as in paged attention): a sequence
//! holds a table of the blocks its positions live in, takes a block when it grows past the last one, and gives
//! them back when it ends, so many sequences share one budget instead of each reserving a whole context.
//!
//! A block holds [`KV_BLOCK_TOKENS`] consecutive positions of every layer and KV head. Within a block, keys are
//! stored transposed (`[layer][kv_head][head_dim][position]`) and values row-major
//! (`[layer][kv_head][position][head_dim]`): a query's scores are then `head_dim` runs along contiguous
//! positions, and its output `len` runs along contiguous dimensions, with no per-position horizontal sums.
//!
//! The cache type ([`KvType`]) sets how the values are stored: f32 as computed, f16 (half the memory and half
//! the bytes attention reads after a long prompt), or q8_0 (signed bytes with one scale per 32 values, about a
//! quarter; keys transposed like the others, with their scales stored `[group][position]`). Attention reads
//! each type directly, widening a register tile at a time.
//!
//! Blocks are reference-counted so that a block holding a prompt prefix can be shared by several sequences
//! (the scheduler's prefix reuse); a shared block is never written: a sequence about to write into one gets a
//! private copy first.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::config::ModelConfig;
use crate::kernels::advise_huge_pages;
use crate::kernels::ops::{KvData, MAX_HEAD_DIM, kv_q8_group};

/// Positions per block: a whole number of every attention kernel's position tiles (at most 64), small enough
/// that a sequence wastes little of its last block.
pub const KV_BLOCK_TOKENS: usize = 64;

/// A block's index in its pool.
pub type BlockId = u32;

/// The pool ran out of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the KV pool is full: {needed} more blocks of {KV_BLOCK_TOKENS} positions needed, {free} free of {total}; raise --kv-pool or run fewer sequences at once"
)]
pub struct PoolExhausted {
    pub needed: usize,
    pub free: usize,
    pub total: usize,
}

/// How keys and values are stored (`--cache-type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvType {
    #[default]
    F32,
    F16,
    Q8_0,
}

impl KvType {
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// Bytes of one position of one sequence (keys and values of every layer and KV head).
    pub fn bytes_per_token(self, cfg: &ModelConfig) -> usize {
        let values = 2 * cfg.n_layer * cfg.kv_dim();
        match self {
            KvType::F32 => values * 4,
            KvType::F16 => values * 2,
            KvType::Q8_0 => values + values / kv_q8_group(cfg.head_dim) * 4,
        }
    }
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> Result<KvType, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            "q8_0" => Ok(KvType::Q8_0),
            _ => Err(format!("unknown cache type '{s}' (f32, f16 or q8_0)")),
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The values of every block, in the pool's type.
enum Storage {
    F32 {
        k: Vec<f32>,
        v: Vec<f32>,
    },
    F16 {
        k: Vec<u16>,
        v: Vec<u16>,
    },
    Q8 {
        k: Vec<i8>,
        v: Vec<i8>,
        k_scale: Vec<f32>,
        v_scale: Vec<f32>,
    },
}

/// The storage of every block, the free list and the reference counts.
pub struct KvPool {
    ty: KvType,
    n_kv_head: usize,
    head_dim: usize,
    /// Values of one block in `k` (and in `v`): every layer and KV head.
    block_values: usize,
    storage: Storage,
    /// Free blocks, taken from the end.
    free: Vec<BlockId>,
    refs: Vec<u32>,
}

impl KvPool {
    /// A pool with room for `tokens` positions (rounded up to whole blocks) of type `ty`. The memory is zeroed
    /// lazily by the OS, so the part no sequence reaches costs address space, not resident memory.
    pub fn new(cfg: &ModelConfig, tokens: usize, ty: KvType) -> KvPool {
        let blocks = tokens.div_ceil(KV_BLOCK_TOKENS).max(1);
        let block_values = cfg.n_layer * cfg.n_head_kv * cfg.head_dim * KV_BLOCK_TOKENS;
        let n = blocks * block_values;
        // Huge pages where the OS gives them: attention streams every block of a sequence, and its requests for a
        // block ahead keep missing the TLB with 4 KiB pages. A block is 0.75-3 MiB (every layer's heads), so
        // this rounds a sequence's memory up by little.
        let storage = match ty {
            KvType::F32 => {
                let (mut k, mut v) = (vec![0.0; n], vec![0.0; n]);
                advise_huge_pages(&mut k);
                advise_huge_pages(&mut v);
                Storage::F32 { k, v }
            }
            KvType::F16 => {
                let (mut k, mut v) = (vec![0; n], vec![0; n]);
                advise_huge_pages(&mut k);
                advise_huge_pages(&mut v);
                Storage::F16 { k, v }
            }
            KvType::Q8_0 => {
                let g = kv_q8_group(cfg.head_dim);
                let (mut k, mut v) = (vec![0; n], vec![0; n]);
                advise_huge_pages(&mut k);
                advise_huge_pages(&mut v);
                Storage::Q8 {
                    k,
                    v,
                    k_scale: vec![0.0; n / g],
                    v_scale: vec![0.0; n / g],
                }
            }
        };
        KvPool {
            ty,
            n_kv_head: cfg.n_head_kv,
            head_dim: cfg.head_dim,
            block_values,
            storage,
            free: (0..blocks as BlockId).rev().collect(),
            refs: vec![0; blocks],
        }
    }

    pub fn total_blocks(&self) -> usize {
        self.refs.len()
    }

    pub fn cache_type(&self) -> KvType {
        self.ty
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Positions the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.total_blocks() * KV_BLOCK_TOKENS
    }

    /// A free block, with one reference.
    pub fn alloc(&mut self) -> Option<BlockId> {
        let b = self.free.pop()?;
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// One more holder of `b`.
    pub fn retain(&mut self, b: BlockId) {
        debug_assert!(self.refs[b as usize] > 0, "retain of a free block");
        self.refs[b as usize] += 1;
    }

    /// One holder fewer; the last one returns the block to the free list.
    pub fn release(&mut self, b: BlockId) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "release of a free block");
        *r -= 1;
        if *r == 0 {
            self.free.push(b);
        }
    }

    /// How many hold `b`.
    pub fn refs(&self, b: BlockId) -> u32 {
        self.refs[b as usize]
    }

    /// Offset of layer `layer`, KV head `head` within a block: `head_dim * KV_BLOCK_TOKENS` values in `k` and `v`.
    pub(crate) fn head_offset(&self, layer: usize, head: usize) -> usize {
        (layer * self.n_kv_head + head) * self.head_dim * KV_BLOCK_TOKENS
    }

    pub(crate) fn block_values(&self) -> usize {
        self.block_values
    }

    /// The storage as attention reads it.
    pub(crate) fn data(&self) -> KvData<'_> {
        match &self.storage {
            Storage::F32 { k, v } => KvData::F32 { k, v },
            Storage::F16 { k, v } => KvData::F16 { k, v },
            Storage::Q8 {
                k,
                v,
                k_scale,
                v_scale,
            } => KvData::Q8 {
                k,
                v,
                k_scale,
                v_scale,
            },
        }
    }

    /// A handle that stores keys and values of layer `layer` from several threads at once: the forward pass's
    /// Q/K/V region writes each token's key and value heads as soon as its share of the products is done (in
    /// parallel, and into cache lines attention is about to read), instead of one thread storing them all after
    /// the region.
    pub(crate) fn writer(&mut self, layer: usize) -> KvWriter<'_> {
        let ptrs = match &mut self.storage {
            Storage::F32 { k, v } => WriterPtrs::F32 {
                k: k.as_mut_ptr(),
                v: v.as_mut_ptr(),
            },
            Storage::F16 { k, v } => WriterPtrs::F16 {
                k: k.as_mut_ptr(),
                v: v.as_mut_ptr(),
            },
            Storage::Q8 {
                k,
                v,
                k_scale,
                v_scale,
            } => WriterPtrs::Q8 {
                k: k.as_mut_ptr(),
                v: v.as_mut_ptr(),
                k_scale: k_scale.as_mut_ptr(),
                v_scale: v_scale.as_mut_ptr(),
            },
        };
        KvWriter {
            ptrs,
            blocks: self.refs.len(),
            block_values: self.block_values,
            head_dim: self.head_dim,
            n_kv_head: self.n_kv_head,
            head_offset: self.head_offset(layer, 0),
            _pool: std::marker::PhantomData,
        }
    }

    /// Stores one position's key and value of one layer and KV head: `pos` is the position within block `b`.
    #[cfg(test)]
    pub(crate) fn write(
        &mut self,
        b: BlockId,
        layer: usize,
        head: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let w = self.writer(layer);
        let slot = KvSlot { block: b, pos };
        // SAFETY: one call through a writer that no other thread has.
        unsafe {
            w.write_k(slot, head, k);
            w.write_v(slot, head, v);
        }
    }

    /// Copies block `from` into `to` whole (copy on write of a shared block).
    fn copy_block(&mut self, from: BlockId, to: BlockId) {
        let n = self.block_values;
        let (f, t) = (from as usize * n, to as usize * n);
        match &mut self.storage {
            Storage::F32 { k, v } => {
                k.copy_within(f..f + n, t);
                v.copy_within(f..f + n, t);
            }
            Storage::F16 { k, v } => {
                k.copy_within(f..f + n, t);
                v.copy_within(f..f + n, t);
            }
            Storage::Q8 {
                k,
                v,
                k_scale,
                v_scale,
            } => {
                k.copy_within(f..f + n, t);
                v.copy_within(f..f + n, t);
                let g = kv_q8_group(self.head_dim);
                k_scale.copy_within(f / g..(f + n) / g, t / g);
                v_scale.copy_within(f / g..(f + n) / g, t / g);
            }
        }
    }
}

/// Where one position lives: its block and its index within it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvSlot {
    pub block: BlockId,
    pub pos: usize,
}

/// The storage's base pointers, for [`KvWriter`].
#[derive(Clone, Copy)]
enum WriterPtrs {
    F32 {
        k: *mut f32,
        v: *mut f32,
    },
    F16 {
        k: *mut u16,
        v: *mut u16,
    },
    Q8 {
        k: *mut i8,
        v: *mut i8,
        k_scale: *mut f32,
        v_scale: *mut f32,
    },
}

/// Stores keys and values of one layer from several threads (see [`KvPool::writer`]). It borrows the pool
/// exclusively, so nothing reads the pool while it lives; the threads' writes are disjoint by the contract of
/// [`KvWriter::write_k`] and [`KvWriter::write_v`].
pub(crate) struct KvWriter<'a> {
    ptrs: WriterPtrs,
    blocks: usize,
    block_values: usize,
    head_dim: usize,
    n_kv_head: usize,
    /// Offset of the layer's first head within a block.
    head_offset: usize,
    _pool: std::marker::PhantomData<&'a mut KvPool>,
}

// SAFETY: the writer is an exclusive borrow of the pool's storage handed to the threads of one region; each
// call writes only the values of its (slot, head), and callers promise that no two concurrent calls share one
// (see `write_k`).
unsafe impl Sync for KvWriter<'_> {}

impl KvWriter<'_> {
    /// The offset of `slot`'s first value of KV head `head` (keys: its dimension 0; values: its row).
    fn base(&self, slot: KvSlot, head: usize) -> usize {
        assert!(
            (slot.block as usize) < self.blocks
                && slot.pos < KV_BLOCK_TOKENS
                && head < self.n_kv_head,
            "KV slot {slot:?} head {head} outside a pool of {} blocks",
            self.blocks
        );
        slot.block as usize * self.block_values
            + self.head_offset
            + head * self.head_dim * KV_BLOCK_TOKENS
    }

    /// Stores key head `head` (`head_dim` values) of the position at `slot`: transposed, one value per
    /// dimension row of the block.
    ///
    /// # Safety
    /// No other call writes the same `(slot, head)` key at the same time.
    pub(crate) unsafe fn write_k(&self, slot: KvSlot, head: usize, k: &[f32]) {
        let hd = self.head_dim;
        let k = &k[..hd];
        let base = self.base(slot, head);
        let at = |d: usize| base + d * KV_BLOCK_TOKENS + slot.pos;
        // SAFETY: `base` checked the slot and head against the pool; every index is below
        // `base + hd * KV_BLOCK_TOKENS`, inside the head's part of the block. The caller keeps writes disjoint.
        unsafe {
            match self.ptrs {
                WriterPtrs::F32 { k: ks, .. } => {
                    for (d, &x) in k.iter().enumerate() {
                        *ks.add(at(d)) = x;
                    }
                }
                WriterPtrs::F16 { k: ks, .. } => {
                    let mut h = [f16::ZERO; MAX_HEAD_DIM];
                    h[..hd].convert_from_f32_slice(k);
                    for (d, x) in h[..hd].iter().enumerate() {
                        *ks.add(at(d)) = x.to_bits();
                    }
                }
                WriterPtrs::Q8 { k: kq, k_scale, .. } => {
                    let g = kv_q8_group(hd);
                    // Keys transposed like the other types, their scales `[group][position]` beside them.
                    let (mut kb, mut sc) = ([0i8; MAX_HEAD_DIM], [0.0f32; MAX_HEAD_DIM]);
                    quantize_row(k, &mut kb[..hd], &mut sc[..hd / g], g);
                    for (d, &x) in kb[..hd].iter().enumerate() {
                        *kq.add(at(d)) = x;
                    }
                    for (c, &d) in sc[..hd / g].iter().enumerate() {
                        *k_scale.add(base / g + c * KV_BLOCK_TOKENS + slot.pos) = d;
                    }
                }
            }
        }
    }

    /// Stores value head `head` (`head_dim` values) of the position at `slot`, as one row.
    ///
    /// # Safety
    /// No other call writes the same `(slot, head)` value at the same time.
    pub(crate) unsafe fn write_v(&self, slot: KvSlot, head: usize, v: &[f32]) {
        let hd = self.head_dim;
        let v = &v[..hd];
        let row = self.base(slot, head) + slot.pos * hd;
        // SAFETY: as in `write_k`: the row lies inside the head's part of the checked block.
        unsafe {
            match self.ptrs {
                WriterPtrs::F32 { v: vs, .. } => {
                    std::slice::from_raw_parts_mut(vs.add(row), hd).copy_from_slice(v);
                }
                WriterPtrs::F16 { v: vs, .. } => {
                    let dst = std::slice::from_raw_parts_mut(vs.add(row) as *mut f16, hd);
                    dst.convert_from_f32_slice(v);
                }
                WriterPtrs::Q8 { v: vq, v_scale, .. } => {
                    let g = kv_q8_group(hd);
                    quantize_row(
                        v,
                        std::slice::from_raw_parts_mut(vq.add(row), hd),
                        std::slice::from_raw_parts_mut(v_scale.add(row / g), hd / g),
                        g,
                    );
                }
            }
        }
    }
}

/// `x` as signed bytes in groups of `g`, each with the scale `max|x| / 127` (q8_0's rounding: to nearest).
fn quantize_row(x: &[f32], q: &mut [i8], scales: &mut [f32], g: usize) {
    for ((x, q), d) in x.chunks_exact(g).zip(q.chunks_exact_mut(g)).zip(scales) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        *d = amax / 127.0;
        let id = if *d > 0.0 { 1.0 / *d } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v * id).round().clamp(-127.0, 127.0) as i8;
        }
    }
}

/// One sequence's share of a pool: its block table and how many positions are filled.
#[derive(Debug, Default)]
pub struct SeqKv {
    blocks: Vec<BlockId>,
    len: usize,
}

impl SeqKv {
    /// An empty sequence whose table has room for `max_tokens` positions without reallocating.
    pub fn with_capacity(max_tokens: usize) -> SeqKv {
        SeqKv {
            blocks: Vec::with_capacity(max_tokens.div_ceil(KV_BLOCK_TOKENS)),
            len: 0,
        }
    }

    /// Positions whose keys and values are stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Blocks a sequence needs for `tokens` positions.
    pub fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(KV_BLOCK_TOKENS)
    }

    /// New blocks that [`SeqKv::reserve`] would take to hold `tokens` positions (counting the private copy of a
    /// shared block that the next write would go into).
    pub fn blocks_needed(&self, pool: &KvPool, tokens: usize) -> usize {
        let grow = Self::blocks_for(tokens).saturating_sub(self.blocks.len());
        let cow = tokens > self.len
            && !self.len.is_multiple_of(KV_BLOCK_TOKENS)
            && pool.refs(self.blocks[self.len / KV_BLOCK_TOKENS]) > 1;
        grow + cow as usize
    }

    /// Makes room for positions up to `tokens`: takes new blocks, and gives the block the next position is
    /// written into a private copy if it is shared. Takes nothing when the pool cannot cover all of it.
    pub fn reserve(&mut self, pool: &mut KvPool, tokens: usize) -> Result<(), PoolExhausted> {
        let needed = self.blocks_needed(pool, tokens);
        if needed > pool.free_blocks() {
            return Err(PoolExhausted {
                needed,
                free: pool.free_blocks(),
                total: pool.total_blocks(),
            });
        }
        if tokens > self.len && !self.len.is_multiple_of(KV_BLOCK_TOKENS) {
            let i = self.len / KV_BLOCK_TOKENS;
            let shared = self.blocks[i];
            if pool.refs(shared) > 1 {
                let own = pool.alloc().expect("counted above");
                pool.copy_block(shared, own);
                pool.release(shared);
                self.blocks[i] = own;
            }
        }
        while self.blocks.len() < Self::blocks_for(tokens) {
            let b = pool.alloc().expect("counted above");
            self.blocks.push(b);
        }
        Ok(())
    }

    /// Records that positions up to `len` are filled (after a forward pass wrote them).
    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.blocks.len() * KV_BLOCK_TOKENS);
        self.len = len;
    }

    /// Starts the sequence with `blocks` (full blocks of a cached prefix, one reference each already taken for
    /// this sequence) holding its first `blocks.len() * KV_BLOCK_TOKENS` positions.
    pub fn adopt_prefix(&mut self, blocks: &[BlockId]) {
        assert!(
            self.blocks.is_empty(),
            "a prefix is adopted by an empty sequence"
        );
        self.blocks.extend_from_slice(blocks);
        self.len = blocks.len() * KV_BLOCK_TOKENS;
    }

    /// Forgets positions from `len` on, returning the blocks no longer needed.
    pub fn truncate(&mut self, pool: &mut KvPool, len: usize) {
        self.len = self.len.min(len);
        let keep = Self::blocks_for(self.len);
        for b in self.blocks.drain(keep..) {
            pool.release(b);
        }
    }

    /// Returns every block (the sequence ended or was cancelled).
    pub fn release(&mut self, pool: &mut KvPool) {
        self.truncate(pool, 0);
    }
}

/// One sequence alone with a pool of its own: the cache of `run`, `chat`, `logits` and the single-stream bench.
pub struct KvCache {
    pub(crate) pool: KvPool,
    pub(crate) seq: SeqKv,
    capacity: usize,
}

impl KvCache {
    /// A cache for `capacity` positions of type `ty`.
    pub fn new(cfg: &ModelConfig, capacity: usize, ty: KvType) -> KvCache {
        KvCache {
            pool: KvPool::new(cfg, capacity, ty),
            seq: SeqKv::with_capacity(capacity),
            capacity,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.seq.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }

    /// Forgets positions from `len` on (a new conversation, or a retried turn).
    pub fn truncate(&mut self, len: usize) {
        self.seq.truncate(&mut self.pool, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize) -> KvPool {
        let cfg = ModelConfig {
            arch: super::super::Architecture::GraniteMoe,
            name: None,
            n_vocab: 16,
            n_embd: 128,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 64,
            n_ff: 32,
            n_expert: 4,
            n_expert_used: 2,
            context_length: 1024,
            rope_theta: 10000.0,
            rms_eps: 1e-6,
            embedding_scale: 1.0,
            attention_scale: 1.0,
            residual_scale: 1.0,
            logit_scale: 1.0,
        };
        KvPool::new(&cfg, blocks * KV_BLOCK_TOKENS, KvType::F32)
    }

    #[test]
    fn sequences_take_blocks_as_they_grow_and_give_them_back() {
        let mut p = pool(4);
        let mut a = SeqKv::default();
        a.reserve(&mut p, 1).unwrap();
        assert_eq!((a.blocks().len(), p.free_blocks()), (1, 3));
        a.reserve(&mut p, 2 * KV_BLOCK_TOKENS + 1).unwrap();
        assert_eq!(p.free_blocks(), 1);
        let mut b = SeqKv::default();
        let err = b.reserve(&mut p, 2 * KV_BLOCK_TOKENS).unwrap_err();
        assert_eq!((err.needed, err.free), (2, 1));
        assert!(b.blocks().is_empty(), "a failed reserve takes nothing");
        a.release(&mut p);
        assert_eq!(p.free_blocks(), 4);
    }

    #[test]
    fn a_shared_block_is_copied_before_it_is_written() {
        let mut p = pool(4);
        let mut a = SeqKv::default();
        a.reserve(&mut p, KV_BLOCK_TOKENS).unwrap();
        a.set_len(KV_BLOCK_TOKENS / 2);
        let shared = a.blocks()[0];
        p.write(shared, 0, 0, 3, &[1.0; 64], &[2.0; 64]);
        let mut b = SeqKv::default();
        p.retain(shared);
        b.adopt_prefix(&[shared]);
        b.truncate(&mut p, KV_BLOCK_TOKENS / 2);
        assert_eq!(b.blocks_needed(&p, KV_BLOCK_TOKENS / 2 + 1), 1);
        b.reserve(&mut p, KV_BLOCK_TOKENS / 2 + 1).unwrap();
        let own = b.blocks()[0];
        assert_ne!(own, shared);
        assert_eq!((p.refs(shared), p.refs(own)), (1, 1));
        let n = p.block_values();
        let KvData::F32 { k, .. } = p.data() else {
            unreachable!()
        };
        assert_eq!(k[own as usize * n..][..n], k[shared as usize * n..][..n]);
    }
}
