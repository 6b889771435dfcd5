//! The forward pass's parallel regions on the rayon pool, and how each splits its work.
//!
//! A decode step multiplies ~700 small matrices; paying a fork/join for each would cost more than the products, so
//! the model asks for a few large regions per layer instead: all of Q, K and V ([`products`]); every chosen
//! expert's gate and up rows with their SwiGLU ([`expert_swiglu`]); every chosen expert's down rows
//! ([`expert_products`]); attention over every KV head and block of tokens ([`causal_attention`]). Each region is a
//! flat list of work items, and a product's item is a contiguous block of one matrix's rows, so each thread streams
//! long runs of memory and writes its share of the token-major output in place. How many rows an item takes is
//! decided here, once ([`rows_per_item`]); callers only say what to compute. Inside a forward pass the regions
//! run on one team of the pool's threads that stays together between them ([`team`]); elsewhere on rayon.

use std::cell::RefCell;

use rayon::prelude::*;

use super::ops::KvBlocks;
use super::team;
use super::{
    ActivationBatch, ActivationRows, Kernels, ProductOut, WeightRows, gemm_rows, ops, stream,
};

/// Runs `work(i, next)` for every `i` in `0..n_items` as one region: on the forward pass's team when there is one
/// ([`team::with_team`]), else on rayon (inline when the pool has one thread). `next` is the item the thread will
/// most likely run after `i`, if known: where its weight stream goes next ([`stream`]).
fn parallel_items(n_items: usize, work: impl Fn(usize, Option<usize>) + Sync + Send) {
    if n_items <= 1 || rayon::current_num_threads() == 1 {
        (0..n_items).for_each(|i| work(i, (i + 1 < n_items).then_some(i + 1)));
    } else if !team::run_region(n_items, &work) {
        (0..n_items).into_par_iter().for_each(|i| work(i, None));
    }
}

/// Rows per work item for a matrix of `rows` rows multiplied with `tokens` tokens: enough items that both threads
/// stay busy to the end, few enough that each is worth scheduling; a multiple of `align` (itself a multiple of
/// 16, so the kernels' row tiles stay whole). The split never changes a result: every output is computed the same
/// way whichever item holds its row.
///
/// Several products of one region (`region_rows` rows together) share its items in proportion to their rows, so
/// three products do not take three times the items of one: Q, K and V of one token were 48 items of 18-36 KiB,
/// each spending much of its time starting its stream (their region 391-404 -> 372-379 ms of a `bench -n 128`
/// run as 16 items, alternating).
fn rows_per_item(rows: usize, region_rows: usize, tokens: usize, align: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    // Aim at ~8 items per thread for one token; fewer, larger ones when many tokens make each row costly.
    let target_items = if tokens > 8 { threads * 4 } else { threads * 8 };
    let target_items = (target_items * rows).div_ceil(region_rows.max(1)).max(1);
    rows.div_ceil(target_items)
        .next_multiple_of(align)
        .max(align)
}

/// One matrix product of a region: `out[t] = w . acts[t]`, the output exactly `acts.n` tokens by `w.rows`.
pub struct Product<'a> {
    pub w: WeightRows<'a>,
    pub acts: ActivationRows<'a>,
    pub out: ProductOut<'a>,
}

impl<'a> Product<'a> {
    /// The product into the first `acts.n * w.rows` values of `out`, token-major and compact.
    pub fn new(w: WeightRows<'a>, acts: ActivationRows<'a>, out: &'a mut [f32]) -> Product<'a> {
        let out = ProductOut::new(out, acts.n, w.rows);
        Product { w, acts, out }
    }
}

/// Several products as one region, each split into row shares that write their part of the output in place.
pub fn products(k: &Kernels, jobs: &[Product]) {
    products_then(k, jobs, 16, |_, _, _| {});
}

/// [`products`], each share of rows a multiple of `align` (but a product's last, which takes the rows left), and
/// `then(job, first_row, share)` run on each share as soon as it is computed, by the thread that computed it:
/// work on whole groups of rows (RoPE on whole heads, storing a token's key and value heads) joins the region
/// instead of waiting for all of it, and finds its rows in cache.
pub fn products_then(
    k: &Kernels,
    jobs: &[Product],
    align: usize,
    then: impl Fn(usize, usize, &mut ProductOut) + Sync,
) {
    assert!(
        align.is_multiple_of(16),
        "shares of {align} rows split the kernels' 16-row tiles"
    );
    let region_rows: usize = jobs.iter().map(|j| j.w.rows).sum();
    let chunk = |j: &Product| rows_per_item(j.w.rows, region_rows, j.acts.n, align);
    let n_items: usize = jobs.iter().map(|j| j.w.rows.div_ceil(chunk(j))).sum();
    // Item `item`'s job and first row and row count.
    let locate = |mut item: usize| {
        for (ji, job) in jobs.iter().enumerate() {
            let c = chunk(job);
            let items = job.w.rows.div_ceil(c);
            if item < items {
                let r0 = item * c;
                return (ji, r0, c.min(job.w.rows - r0));
            }
            item -= items;
        }
        unreachable!("item {item} past the region's {n_items}")
    };
    parallel_items(n_items, |item, next| {
        let (ji, r0, rows) = locate(item);
        let job = &jobs[ji];
        stream::continue_with(next.map_or(&[], |next| {
            let (jn, rn, len) = locate(next);
            jobs[jn].w.sub_rows(rn, len).data
        }));
        // SAFETY: item `item` of this job owns rows r0..r0 + rows of its output; the items partition the rows, so
        // no two live windows overlap.
        let mut out = unsafe { job.out.window(0, job.acts.n, r0, rows) };
        gemm_rows(k, &job.w.sub_rows(r0, rows), job.acts, out.reborrow());
        then(ji, r0, &mut out);
    });
}

/// One product as a region of its own, into the first `acts.n * w.rows` values of `out`.
pub fn product(k: &Kernels, w: WeightRows, acts: ActivationRows, out: &mut [f32]) {
    products(k, &[Product::new(w, acts, out)]);
}

/// The tokens one expert was chosen by in a batch: rows `first..first + len` of the gathered expert input (and of
/// the outputs computed from it).
#[derive(Clone, Copy, Debug, Default)]
pub struct ExpertSlot {
    pub expert: usize,
    pub first: usize,
    pub len: usize,
}

/// Work items of a region over expert slots: each slot's rows in shares, slot after slot.
struct SlotItems {
    chunk: usize,
    per_slot: usize,
}

impl SlotItems {
    /// Shares of `rows` rows: about 8 items per thread over all the slots together, each slot split into equal
    /// shares. Many slots (a batch of sequences reaches most experts) make each share a whole expert: every item
    /// starts with a weight tile no prefetch has asked for yet, so fewer, longer items stream better.
    fn new(rows: usize, slots: &[ExpertSlot]) -> SlotItems {
        let target = rayon::current_num_threads().max(1) * 8;
        let per_slot = target.div_ceil(slots.len().max(1));
        let chunk = rows.div_ceil(per_slot).next_multiple_of(16).max(16);
        SlotItems {
            chunk,
            per_slot: rows.div_ceil(chunk),
        }
    }

    fn count(&self, slots: &[ExpertSlot]) -> usize {
        slots.len() * self.per_slot
    }

    /// Item `item`'s slot and row range.
    fn get(&self, slots: &[ExpertSlot], item: usize, rows: usize) -> (ExpertSlot, usize, usize) {
        let slot = slots[item / self.per_slot];
        let r0 = (item % self.per_slot) * self.chunk;
        (slot, r0, self.chunk.min(rows - r0))
    }
}

/// For every slot and each of its tokens `i`: `out[first + i] = silu(G . x) * (U . x)` with `x = input[first + i]`,
/// `G = gate(expert)` and `U = up(expert)`: the SwiGLU of the routed experts, or of a dense MLP as one slot of
/// every token. One region; gate and up rows are read in one pass over each share's activations, and the SiLU
/// product is taken while the share is in cache. `up_out` is scratch of `out`'s shape.
pub fn expert_swiglu<'w>(
    k: &Kernels,
    gate: impl Fn(usize) -> WeightRows<'w> + Sync,
    up: impl Fn(usize) -> WeightRows<'w> + Sync,
    slots: &[ExpertSlot],
    input: &ActivationBatch,
    out: ProductOut,
    up_out: ProductOut,
) {
    let ff = out.rows();
    assert!(up_out.rows() == ff && up_out.tokens() == out.tokens());
    let items = SlotItems::new(ff, slots);
    parallel_items(items.count(slots), |item, next| {
        let (slot, r0, rows) = items.get(slots, item, ff);
        let acts = input.rows(slot.first, slot.len);
        let up_rows = up(slot.expert).sub_rows(r0, rows);
        // SAFETY: slot `s` owns rows first..first + len of both outputs, and this item rows r0..r0 + rows of them;
        // the items partition those windows.
        let (mut g, mut u) = unsafe {
            (
                out.window(slot.first, slot.len, r0, rows),
                up_out.window(slot.first, slot.len, r0, rows),
            )
        };
        stream::continue_with(up_rows.data);
        gemm_rows(k, &gate(slot.expert).sub_rows(r0, rows), acts, g.reborrow());
        stream::continue_with(next.map_or(&[], |next| {
            let (slot, r0, rows) = items.get(slots, next, ff);
            gate(slot.expert).sub_rows(r0, rows).data
        }));
        gemm_rows(k, &up_rows, acts, u.reborrow());
        for t in 0..slot.len {
            (k.ops.silu_mul)(g.token(t), u.token(t));
        }
    });
}

/// For every slot and each of its tokens `i`: `out[first + i] = w(expert) . input[first + i]` (the experts' down
/// projections), one region.
pub fn expert_products<'w>(
    k: &Kernels,
    w: impl Fn(usize) -> WeightRows<'w> + Sync,
    slots: &[ExpertSlot],
    input: &ActivationBatch,
    out: ProductOut,
) {
    let rows_out = out.rows();
    let items = SlotItems::new(rows_out, slots);
    parallel_items(items.count(slots), |item, next| {
        let (slot, r0, rows) = items.get(slots, item, rows_out);
        // SAFETY: as in `expert_swiglu`: the items partition the slots' windows.
        let o = unsafe { out.window(slot.first, slot.len, r0, rows) };
        stream::continue_with(next.map_or(&[], |next| {
            let (slot, r0, rows) = items.get(slots, next, rows_out);
            w(slot.expert).sub_rows(r0, rows).data
        }));
        gemm_rows(
            k,
            &w(slot.expert).sub_rows(r0, rows),
            input.rows(slot.first, slot.len),
            o,
        );
    });
}

/// Tokens whose queries attend together in one work item of prompt processing.
const ATTENTION_TOKEN_BLOCK: usize = 16;

/// The queries of a batch for [`causal_attention`].
pub struct AttentionQueries<'a> {
    /// Queries after RoPE, token-major `[tokens][n_head * head_dim]`.
    pub q: &'a [f32],
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// A run of consecutive tokens of one sequence in a batch: tokens `first..first + len`, at positions
/// `pos0..pos0 + len` of their sequence, so token `first + t` attends to its cached positions `0..=pos0 + t`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSpan {
    pub first: usize,
    pub len: usize,
    pub pos0: usize,
}

/// One worker's attention buffers: the gathered queries of a work item, their causal lengths, the scores and the
/// outputs.
struct AttentionScratch {
    q: Vec<f32>,
    lens: Vec<usize>,
    scratch: Vec<f32>,
    out: Vec<f32>,
}

thread_local! {
    /// Attention buffers per worker thread; they grow to the longest context seen, then stay.
    static ATTENTION: RefCell<AttentionScratch> = const {
        RefCell::new(AttentionScratch { q: Vec::new(), lens: Vec::new(), scratch: Vec::new(), out: Vec::new() })
    };
}

/// Sizes every pool thread's attention buffers for `group` query heads per KV head of `head_dim` over a cache of
/// `capacity` positions now, so that no thread grows them on the per-token path (which thread runs which item is
/// up to the scheduler, so a thread may meet its first one long after the warm-up).
pub fn reserve_attention_scratch(group: usize, head_dim: usize, capacity: usize) {
    let rows = group * ATTENTION_TOKEN_BLOCK;
    rayon::broadcast(|_| {
        ATTENTION.with_borrow_mut(|w| {
            w.q.reserve(rows * head_dim);
            w.lens.reserve(rows);
            w.out.reserve(rows * head_dim);
            if w.scratch.len() < rows * capacity {
                w.scratch.resize(rows * capacity, 0.0);
            }
        })
    });
}

/// Causal grouped-query attention of a batch, into `out` (`[tokens][n_head * head_dim]`): each span attends over
/// its own sequence's cache (`kv_head(span, kv_head)`), one work item per span, KV head and block of its tokens,
/// whose group of query heads for those tokens attend together ([`ops::Ops::attend_block`]), so each cached key
/// and value is loaded once for all of them. A token's result does not depend on which item computed it.
pub fn causal_attention<'c>(
    k: &Kernels,
    queries: &AttentionQueries,
    spans: &[AttentionSpan],
    kv_head: impl Fn(usize, usize) -> KvBlocks<'c> + Sync,
    out: ProductOut,
) {
    let AttentionQueries {
        q,
        n_head,
        n_head_kv,
        head_dim: hd,
        scale,
    } = *queries;
    let (q_dim, group) = (n_head * hd, n_head / n_head_kv);
    assert!(out.rows() == q_dim && q.len() >= out.tokens() * q_dim);
    assert!(spans.iter().all(|s| s.first + s.len <= out.tokens()));
    let blocks = |s: &AttentionSpan| s.len.div_ceil(ATTENTION_TOKEN_BLOCK);
    let n_items: usize = spans.iter().map(|s| n_head_kv * blocks(s)).sum();
    parallel_items(n_items, |mut item, _| {
        let mut si = 0;
        while item >= n_head_kv * blocks(&spans[si]) {
            item -= n_head_kv * blocks(&spans[si]);
            si += 1;
        }
        let span = spans[si];
        let (kvh, b) = (item % n_head_kv, item / n_head_kv);
        let t0 = span.first + b * ATTENTION_TOKEN_BLOCK;
        let t1 = (t0 + ATTENTION_TOKEN_BLOCK).min(span.first + span.len);
        let heads = kvh * group * hd..(kvh + 1) * group * hd;
        let cache = kv_head(si, kvh);
        // SAFETY: item (span, kvh, token block) owns this group's heads of these tokens; spans do not overlap and
        // the items partition each span's output.
        let mut o = unsafe { out.window(t0, t1 - t0, heads.start, heads.len()) };
        ATTENTION.with_borrow_mut(|w| {
            w.q.clear();
            w.lens.clear();
            for t in t0..t1 {
                w.q.extend_from_slice(&q[t * q_dim..][heads.clone()]);
                w.lens
                    .extend(std::iter::repeat_n(span.pos0 + (t - span.first) + 1, group));
            }
            let need = ops::attend_block_scratch(&w.lens);
            if w.scratch.len() < need {
                // Grows to the longest context seen, once per thread.
                let reach = cache.blocks.len() * cache.tokens;
                w.scratch
                    .resize(need.max(group * ATTENTION_TOKEN_BLOCK * reach), 0.0);
            }
            w.out.resize(w.q.len(), 0.0);
            (k.ops.attend_block)(&w.q, &w.lens, &cache, scale, &mut w.scratch, &mut w.out);
            for (i, chunk) in w.out.chunks_exact(group * hd).enumerate() {
                o.token(i).copy_from_slice(chunk);
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::SCALAR;
    use quarry_quantize::gguf::GgmlType;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn f32_rows(data: &[f32], rows: usize, cols: usize) -> WeightRows<'_> {
        WeightRows {
            ty: GgmlType::F32,
            layout: crate::kernels::Layout::Rows,
            rows,
            cols,
            data: bytemuck::cast_slice(data),
        }
    }

    /// Expert `e` of a stack of `ff` x `cols` matrices.
    fn stack(w: &[f32], e: usize, ff: usize, cols: usize) -> WeightRows<'_> {
        f32_rows(&w[e * ff * cols..(e + 1) * ff * cols], ff, cols)
    }

    fn batch(x: &[f32], dim: usize) -> ActivationBatch {
        let n = x.len() / dim;
        let mut b = ActivationBatch::new(dim, n);
        b.start(n).copy_from_slice(x);
        b
    }

    #[test]
    fn slot_items_cover_every_row_of_every_slot_once() {
        let slots = [(0, 0, 3), (5, 3, 1), (7, 4, 40)].map(|(expert, first, len)| ExpertSlot {
            expert,
            first,
            len,
        });
        for rows in [1, 16, 70, 512] {
            let items = SlotItems::new(rows, &slots);
            let mut seen = vec![vec![0u32; rows]; slots.len()];
            for item in 0..items.count(&slots) {
                let (slot, r0, n) = items.get(&slots, item, rows);
                let s = slots.iter().position(|s| s.expert == slot.expert).unwrap();
                seen[s][r0..r0 + n].iter_mut().for_each(|c| *c += 1);
            }
            assert!(seen.iter().flatten().all(|&c| c == 1), "{rows} rows");
        }
    }

    /// Split into row shares written in place, a product gives exactly the unsplit product.
    #[test]
    fn shares_write_exactly_the_whole_product() {
        let (rows, cols, n) = (100, 24, 3);
        let w = values(rows * cols, 1);
        let x = batch(&values(n * cols, 2), cols);
        let mut want = vec![0.0; n * rows];
        gemm_rows(
            &SCALAR,
            &f32_rows(&w, rows, cols),
            x.all_rows(),
            ProductOut::new(&mut want, n, rows),
        );
        let mut got = vec![f32::NAN; n * rows];
        product(&SCALAR, f32_rows(&w, rows, cols), x.all_rows(), &mut got);
        assert_eq!(got, want);
    }

    /// Each gathered token gets `silu(G x) * (U x)` of its own expert.
    #[test]
    fn expert_swiglu_is_each_slots_own_expert() {
        let (ff, cols, experts) = (40, 16, 3);
        let gate = values(experts * ff * cols, 3);
        let up = values(experts * ff * cols, 4);
        let slots =
            [(2, 0, 2), (0, 2, 3)].map(|(expert, first, len)| ExpertSlot { expert, first, len });
        let x = batch(&values(5 * cols, 5), cols);
        let (mut got, mut up_out) = (vec![0.0; 5 * ff], vec![0.0; 5 * ff]);
        expert_swiglu(
            &SCALAR,
            |e| stack(&gate, e, ff, cols),
            |e| stack(&up, e, ff, cols),
            &slots,
            &x,
            ProductOut::new(&mut got, 5, ff),
            ProductOut::new(&mut up_out, 5, ff),
        );
        for slot in slots {
            let acts = x.rows(slot.first, slot.len);
            let (mut g, mut u) = (vec![0.0; slot.len * ff], vec![0.0; slot.len * ff]);
            gemm_rows(
                &SCALAR,
                &stack(&gate, slot.expert, ff, cols),
                acts,
                ProductOut::new(&mut g, slot.len, ff),
            );
            gemm_rows(
                &SCALAR,
                &stack(&up, slot.expert, ff, cols),
                acts,
                ProductOut::new(&mut u, slot.len, ff),
            );
            (SCALAR.ops.silu_mul)(&mut g, &u);
            assert_eq!(got[slot.first * ff..(slot.first + slot.len) * ff], g[..]);
        }
    }
}
