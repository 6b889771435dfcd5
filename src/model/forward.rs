//! The forward pass over a batch of tokens from one or more sequences: for each sequence a run of consecutive
//! tokens (a prompt chunk, or the one token it decodes next), each at its own positions and with its own cache.
//! Everything but attention is per token, so the batch is simply a list of tokens: the products read each
//! weight row once for all of them, and the routed experts group the tokens of every sequence per expert.
//! Attention runs per sequence over its own cache blocks.
//!
//! Read top to bottom it is the Granite network of the reference: embed and scale, then per layer attention and
//! the feed-forward block (routed experts or a dense MLP), each added back scaled by the residual multiplier,
//! then the final norm and the output head divided by the logit scale. The matrix products and attention run as a
//! few parallel regions per layer (`kernels::parallel` decides how they are split); everything else is cheap and
//! runs on the calling thread. The kernels are the model's own set, chosen when it was loaded.

use super::config::ModelConfig;
use super::kv::{BlockId, KV_BLOCK_TOKENS, KvCache, KvPool, KvSlot};
use super::weights::{DenseMlp, ExpertWeights, FeedForward, Matrix};
use super::{Model, ModelError};
use crate::kernels::ops::KvBlocks;
use crate::kernels::parallel::{self, AttentionQueries, AttentionSpan, ExpertSlot, Product};
use crate::kernels::{self, ActivationBatch, Kernels, ProductOut, team};

/// Which logits a forward pass computes for a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt chunk that is not the last).
    None,
    /// The last position's only: all that generation needs.
    Last,
    /// Every position's (`quarry logits`, perplexity).
    All,
}

/// One sequence's part of a batch: tokens `first..first + len` of the batch, at the positions after the `pos0`
/// its cache already holds. Its block table must cover positions up to `pos0 + len` ([`super::SeqKv::reserve`]).
#[derive(Clone, Copy, Debug)]
pub struct SeqSpan<'a> {
    pub first: usize,
    pub len: usize,
    pub pos0: usize,
    pub blocks: &'a [BlockId],
    pub logits: Logits,
}

/// Working memory of the forward pass, sized once for the largest batch; the per-token path allocates nothing.
pub struct ForwardBuffers {
    max_batch: usize,
    /// Each span's tokens for attention, and the batch rows whose logits are computed.
    spans: Vec<AttentionSpan>,
    logit_rows: Vec<usize>,
    /// Residual stream, `[batch][n_embd]`.
    x: Vec<f32>,
    /// Normed input of the attention and feed-forward blocks: one quantization serves all the matrices reading it.
    normed: ActivationBatch,
    /// Queries, keys and values of the batch, token-major.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output per token, `[batch][n_head * head_dim]`, the input of the output projection.
    attn: ActivationBatch,
    /// Output of a projection before it is added to the residual stream, `[batch][n_embd]`.
    proj: Vec<f32>,
    /// `(cos, sin)` per token and rotary pair.
    rope: Vec<(f32, f32)>,
    /// Where each token's key and value go in its sequence's cache.
    kv_slots: Vec<KvSlot>,
    inv_freq: Vec<f32>,
    /// Router logits, `[batch][n_expert]`, and each token's chosen experts with their gate weights, `[batch][k]`.
    router: Vec<f32>,
    chosen: Vec<(usize, f32)>,
    /// For each expert, the batch rows routed to it with their gate weights.
    expert_tokens: Vec<Vec<(usize, f32)>>,
    /// The experts chosen by at least one token, in expert order.
    slots: Vec<ExpertSlot>,
    /// The normed rows of each slot's tokens, slot after slot (`[batch * k][n_embd]`).
    expert_in: ActivationBatch,
    /// `silu(gate) * up` of each slot's tokens, the input of the down projections (`[batch * k][n_ff]`); the up
    /// projections beside it.
    hidden: ActivationBatch,
    up: Vec<f32>,
    /// The down projections of each slot's tokens before the gate weight is applied, `[batch * k][n_embd]`.
    expert_out: Vec<f32>,
    /// The logits computed, row after row in span order.
    logits: Vec<f32>,
    /// How many times each expert's weights were read, per layer; for tests and `bench` statistics.
    pub expert_reads: Vec<Vec<u64>>,
}

impl ForwardBuffers {
    /// Buffers for batches of up to `max_batch` tokens from up to `max_seqs` sequences.
    pub fn new(cfg: &ModelConfig, max_batch: usize, max_seqs: usize) -> ForwardBuffers {
        let b = max_batch.max(1);
        let seqs = max_seqs.clamp(1, b);
        let q_dim = cfg.n_head * cfg.head_dim;
        let half = cfg.head_dim / 2;
        // HF computes the inverse frequencies in f32: 1 / theta^(2i / head_dim).
        let inv_freq = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        // Every token's k experts (the dense MLP counts as one expert per token).
        let routed = b * cfg.n_expert_used.max(1);
        ForwardBuffers {
            max_batch: b,
            spans: Vec::with_capacity(b),
            logit_rows: Vec::with_capacity(b),
            x: vec![0.0; b * cfg.n_embd],
            normed: ActivationBatch::new(cfg.n_embd, b),
            q: vec![0.0; b * q_dim],
            k: vec![0.0; b * cfg.kv_dim()],
            v: vec![0.0; b * cfg.kv_dim()],
            attn: ActivationBatch::new(q_dim, b),
            proj: vec![0.0; b * cfg.n_embd],
            rope: vec![(0.0, 0.0); b * half],
            kv_slots: vec![KvSlot::default(); b],
            inv_freq,
            router: vec![0.0; b * cfg.n_expert],
            chosen: vec![(0, 0.0); b * cfg.n_expert_used],
            expert_tokens: (0..cfg.n_expert).map(|_| Vec::with_capacity(b)).collect(),
            slots: Vec::with_capacity(cfg.n_expert),
            expert_in: ActivationBatch::new(cfg.n_embd, routed),
            hidden: ActivationBatch::new(cfg.n_ff, routed),
            up: vec![0.0; routed * cfg.n_ff],
            expert_out: vec![0.0; routed * cfg.n_embd],
            logits: vec![0.0; seqs * cfg.n_vocab],
            expert_reads: vec![vec![0; cfg.n_expert]; cfg.n_layer],
        }
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The first row of logits the last forward pass computed (a single sequence's [`Logits::Last`]).
    pub fn last_logits(&self, n_vocab: usize) -> &[f32] {
        &self.logits[..n_vocab]
    }

    /// Row `i` of the logits the last forward pass computed.
    pub fn logits_row(&self, i: usize, n_vocab: usize) -> &[f32] {
        &self.logits[i * n_vocab..(i + 1) * n_vocab]
    }
}

/// Sizes every pool thread's attention and kernel buffers for a cache of `capacity` tokens now, so that no
/// thread grows them later on the per-token path.
pub fn reserve_thread_scratch(cfg: &ModelConfig, capacity: usize) {
    kernels::reserve_thread_scratch(cfg.n_embd.max(cfg.n_ff));
    parallel::reserve_attention_scratch(cfg.n_head / cfg.n_head_kv, cfg.head_dim, capacity);
}

impl Model {
    /// Runs `tokens` (at most `bufs.max_batch()`) of one sequence at the positions after those in `cache`,
    /// appends their keys and values to it, and returns the requested logits (`[n_vocab]` or
    /// `[tokens][n_vocab]`).
    pub(crate) fn forward<'b>(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        bufs: &'b mut ForwardBuffers,
        want: Logits,
    ) -> Result<&'b [f32], ModelError> {
        let (pos0, n) = (cache.len(), tokens.len());
        if pos0 + n > cache.capacity() {
            return Err(ModelError::ContextFull {
                needed: pos0 + n,
                capacity: cache.capacity(),
                model_max: self.config.context_length,
            });
        }
        cache
            .seq
            .reserve(&mut cache.pool, pos0 + n)
            .expect("a cache's own pool covers its capacity");
        let span = SeqSpan {
            first: 0,
            len: n,
            pos0,
            blocks: cache.seq.blocks(),
            logits: want,
        };
        self.forward_batch(tokens, &[span], &mut cache.pool, bufs)?;
        cache.seq.set_len(pos0 + n);
        Ok(&bufs.logits[..bufs.logit_rows.len() * self.config.n_vocab])
    }

    /// Runs a batch of tokens from several sequences (`spans`: which tokens belong to which, in batch order,
    /// without gaps or overlaps), writes their keys and values into the pool blocks of each sequence, and returns
    /// the requested logits, row after row in span order (one row for [`Logits::Last`], `len` for
    /// [`Logits::All`]). Each sequence gets exactly the values it would get alone: every product, every
    /// attention output and every expert's contribution to a token is computed the same way whatever else is
    /// in the batch.
    pub(crate) fn forward_batch<'b>(
        &self,
        tokens: &[u32],
        spans: &[SeqSpan],
        pool: &mut KvPool,
        bufs: &'b mut ForwardBuffers,
    ) -> Result<&'b [f32], ModelError> {
        // The pass's parallel regions run on one team of the pool's threads, formed once for all of them.
        team::with_team(|| self.batch_pass(tokens, spans, pool, bufs))
    }

    /// [`Model::forward_batch`]'s pass.
    fn batch_pass<'b>(
        &self,
        tokens: &[u32],
        spans: &[SeqSpan],
        pool: &mut KvPool,
        bufs: &'b mut ForwardBuffers,
    ) -> Result<&'b [f32], ModelError> {
        let cfg = &self.config;
        let k = self.kernels;
        let n = tokens.len();
        assert!(
            n <= bufs.max_batch,
            "forward batch {n} exceeds the buffers' {}",
            bufs.max_batch
        );
        let mut next = 0;
        for s in spans {
            assert!(
                s.first == next && s.len > 0 && s.blocks.len() * KV_BLOCK_TOKENS >= s.pos0 + s.len,
                "spans must cover the batch in order, each within its blocks"
            );
            next += s.len;
        }
        assert_eq!(next, n, "spans must cover the batch");
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= cfg.n_vocab) {
            return Err(ModelError::TokenOutOfRange {
                id,
                n_vocab: cfg.n_vocab,
            });
        }
        let h = cfg.n_embd;
        bufs.spans.clear();
        bufs.spans.extend(spans.iter().map(|s| AttentionSpan {
            first: s.first,
            len: s.len,
            pos0: s.pos0,
        }));

        // Token embeddings, times Granite's embedding multiplier.
        let embd = self.weights.token_embd.view();
        for (t, &id) in tokens.iter().enumerate() {
            let row = &mut bufs.x[t * h..(t + 1) * h];
            embd.dequantize_row(id as usize, row);
            row.iter_mut().for_each(|v| *v *= cfg.embedding_scale);
        }

        // Each token's place in its sequence's cache, and its rotary angles as HF computes them: f32 position
        // times f32 inverse frequency.
        let half = cfg.head_dim / 2;
        for s in spans {
            for t in s.first..s.first + s.len {
                let pos = s.pos0 + t - s.first;
                bufs.kv_slots[t] = KvSlot {
                    block: s.blocks[pos / KV_BLOCK_TOKENS],
                    pos: pos % KV_BLOCK_TOKENS,
                };
                for (i, &f) in bufs.inv_freq.iter().enumerate() {
                    let angle = pos as f32 * f;
                    bufs.rope[t * half + i] = (angle.cos(), angle.sin());
                }
            }
        }

        for (il, layer) in self.weights.layers.iter().enumerate() {
            // Attention block: x += Wo(attention(rope(Wq h), rope(Wk h), Wv h)) * residual_multiplier.
            rms_norm_batch(
                k,
                &bufs.x[..n * h],
                &layer.attn_norm,
                cfg.rms_eps,
                &mut bufs.normed,
                n,
            );
            self.project_qkv(il, pool, bufs);
            self.attention(il, n, spans, pool, bufs);
            project(k, &layer.wo, &mut bufs.attn, &mut bufs.proj);
            (k.axpy_f32)(
                cfg.residual_scale,
                &bufs.proj[..n * h],
                &mut bufs.x[..n * h],
            );

            // Feed-forward block: x += ffn(h) * residual_multiplier.
            rms_norm_batch(
                k,
                &bufs.x[..n * h],
                &layer.ffn_norm,
                cfg.rms_eps,
                &mut bufs.normed,
                n,
            );
            match &layer.ffn {
                FeedForward::Experts(experts) => self.moe(il, experts, n, bufs),
                FeedForward::Dense(mlp) => dense_mlp(k, mlp, n, bufs),
            }
            (k.axpy_f32)(
                cfg.residual_scale,
                &bufs.proj[..n * h],
                &mut bufs.x[..n * h],
            );
        }

        // Output head on the final norm of the rows asked for, divided by Granite's logit scale.
        bufs.logit_rows.clear();
        for s in spans {
            match s.logits {
                Logits::None => {}
                Logits::Last => bufs.logit_rows.push(s.first + s.len - 1),
                Logits::All => bufs.logit_rows.extend(s.first..s.first + s.len),
            }
        }
        let m = bufs.logit_rows.len();
        if m == 0 {
            return Ok(&[]);
        }
        let normed = bufs.normed.start(m);
        for (i, &t) in bufs.logit_rows.iter().enumerate() {
            (k.ops.rms_norm)(
                &bufs.x[t * h..(t + 1) * h],
                &self.weights.output_norm,
                cfg.rms_eps,
                &mut normed[i * h..(i + 1) * h],
            );
        }
        let v = cfg.n_vocab;
        if bufs.logits.len() < m * v {
            // More rows than the buffers were sized for: `Logits::All`, never on the generation path.
            bufs.logits.resize(m * v, 0.0);
        }
        project(
            k,
            self.weights.output_head(),
            &mut bufs.normed,
            &mut bufs.logits,
        );
        let inv = 1.0 / cfg.logit_scale;
        bufs.logits[..m * v].iter_mut().for_each(|l| *l *= inv);
        Ok(&bufs.logits[..m * v])
    }

    /// Q, K and V of the normed batch, as one parallel region: as each share of whole heads is computed, RoPE
    /// turns its query and key heads, and its key and value heads are stored in their sequences' caches.
    fn project_qkv(&self, layer: usize, pool: &mut KvPool, bufs: &mut ForwardBuffers) {
        let (cfg, k, l) = (&self.config, self.kernels, &self.weights.layers[layer]);
        let (hd, half) = (cfg.head_dim, cfg.head_dim / 2);
        for w in [&l.wq, &l.wk, &l.wv] {
            bufs.normed.prepare_for(w.ty, k);
        }
        let acts = bufs.normed.all_rows();
        let (rope, slots) = (&bufs.rope, &bufs.kv_slots);
        let kv = pool.writer(layer);
        // Shares of whole heads that the kernels' 16-row tiles also divide.
        let align = hd * 16 / gcd(hd, 16);
        parallel::products_then(
            k,
            &[
                Product::new(l.wq.view(), acts, &mut bufs.q),
                Product::new(l.wk.view(), acts, &mut bufs.k),
                Product::new(l.wv.view(), acts, &mut bufs.v),
            ],
            align,
            |job, r0, share| {
                for t in 0..share.tokens() {
                    let cos_sin = &rope[t * half..(t + 1) * half];
                    for (i, head) in share.token(t).chunks_exact_mut(hd).enumerate() {
                        let h = r0 / hd + i;
                        // SAFETY: this share alone computed key and value head `h` of token `t`, so it is the
                        // only writer of that head at the token's slot (tokens have distinct slots).
                        match job {
                            0 => (k.ops.rope)(head, hd, cos_sin),
                            1 => {
                                (k.ops.rope)(head, hd, cos_sin);
                                unsafe { kv.write_k(slots[t], h, head) };
                            }
                            _ => unsafe { kv.write_v(slots[t], h, head) },
                        }
                    }
                }
            },
        );
    }

    /// Causal grouped-query attention of the batch (queries and keys turned by RoPE, keys and values stored by
    /// `project_qkv`): each query head attends over its KV head's positions up to its own, in its own sequence.
    fn attention(
        &self,
        layer: usize,
        n: usize,
        spans: &[SeqSpan],
        pool: &KvPool,
        bufs: &mut ForwardBuffers,
    ) {
        let (cfg, k) = (&self.config, self.kernels);
        let hd = cfg.head_dim;
        let q_dim = cfg.n_head * hd;
        let queries = AttentionQueries {
            q: &bufs.q,
            n_head: cfg.n_head,
            n_head_kv: cfg.n_head_kv,
            head_dim: hd,
            scale: cfg.attention_scale,
        };
        let kv_head = |span: usize, kvh: usize| KvBlocks {
            data: pool.data(),
            blocks: spans[span].blocks,
            block_values: pool.block_values(),
            head_offset: pool.head_offset(layer, kvh),
            tokens: KV_BLOCK_TOKENS,
            head_dim: hd,
        };
        let out = ProductOut::new(bufs.attn.start(n), n, q_dim);
        parallel::causal_attention(k, &queries, &bufs.spans, kv_head, out);
    }

    /// The routed experts: each token picks its top-k experts by router logit, weighted by the softmax over just
    /// those k logits. Tokens are grouped by expert so that each chosen expert's weights are read once per batch;
    /// experts no token chose are never touched.
    fn moe(&self, layer: usize, experts: &ExpertWeights, n: usize, bufs: &mut ForwardBuffers) {
        let (cfg, k) = (&self.config, self.kernels);
        let (e_count, top_k, h, ff) = (cfg.n_expert, cfg.n_expert_used, cfg.n_embd, cfg.n_ff);

        // Route: the router's logits, then each token's top k.
        project(k, &experts.router, &mut bufs.normed, &mut bufs.router);
        for list in bufs.expert_tokens.iter_mut() {
            list.clear();
        }
        for t in 0..n {
            let chosen = &mut bufs.chosen[t * top_k..(t + 1) * top_k];
            route_top_k(&bufs.router[t * e_count..(t + 1) * e_count], chosen);
            for &(e, w) in chosen.iter() {
                bufs.expert_tokens[e].push((t, w));
            }
        }

        // Gather each chosen expert's tokens into one contiguous batch, quantized once for the expert weights.
        bufs.normed.prepare_for(experts.gate.ty, k);
        bufs.normed.prepare_for(experts.up.ty, k);
        let quantized = |ty| kernels::wants_q8_0(ty) || kernels::wants_q8_k(ty);
        let experts_need_values = !(quantized(experts.gate.ty) && quantized(experts.up.ty));
        bufs.slots.clear();
        bufs.expert_in.start(0);
        for (e, routed) in bufs.expert_tokens.iter().enumerate() {
            if routed.is_empty() {
                continue;
            }
            bufs.expert_reads[layer][e] += 1;
            bufs.slots.push(ExpertSlot {
                expert: e,
                first: bufs.expert_in.len(),
                len: routed.len(),
            });
            bufs.expert_in.append_rows_from(
                &bufs.normed,
                routed.iter().map(|&(t, _)| t),
                experts_need_values,
            );
        }
        let m = bufs.expert_in.len();

        // Gate and up: silu(gate) * up of every gathered token, for the down projections.
        parallel::expert_swiglu(
            k,
            |e| experts.gate.expert(e),
            |e| experts.up.expert(e),
            &bufs.slots,
            &bufs.expert_in,
            ProductOut::new(bufs.hidden.start(m), m, ff),
            ProductOut::new(&mut bufs.up, m, ff),
        );
        bufs.hidden.prepare_for(experts.down.ty, k);

        // Down.
        parallel::expert_products(
            k,
            |e| experts.down.expert(e),
            &bufs.slots,
            &bufs.hidden,
            ProductOut::new(&mut bufs.expert_out, m, h),
        );

        // Combine: each token's output is its experts' down projections weighted by their gates.
        bufs.proj[..n * h].fill(0.0);
        for slot in &bufs.slots {
            for (i, &(t, w)) in bufs.expert_tokens[slot.expert].iter().enumerate() {
                let row = (slot.first + i) * h;
                (k.axpy_f32)(
                    w,
                    &bufs.expert_out[row..row + h],
                    &mut bufs.proj[t * h..(t + 1) * h],
                );
            }
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Picks the `chosen.len()` largest router logits (the lower expert index first on ties) and writes
/// `(expert, gate weight)` pairs, the weights being the softmax over the chosen logits only.
fn route_top_k(logits: &[f32], chosen: &mut [(usize, f32)]) {
    let k = chosen.len();
    for slot in 0..k {
        let mut best: Option<usize> = None;
        for (e, &l) in logits.iter().enumerate() {
            if chosen[..slot].iter().any(|&(c, _)| c == e) {
                continue;
            }
            if best.is_none_or(|b| l > logits[b]) {
                best = Some(e);
            }
        }
        let e = best.expect("k <= number of experts is checked at load");
        chosen[slot] = (e, logits[e]);
    }
    let max = chosen[0].1;
    let mut sum = 0.0;
    for c in chosen.iter_mut() {
        c.1 = (c.1 - max).exp();
        sum += c.1;
    }
    for c in chosen.iter_mut() {
        c.1 /= sum;
    }
}

/// The dense SwiGLU MLP of the `granite` architecture, over the whole batch: down(silu(gate h) * up h), the
/// gate and up projections computed as one expert chosen by every token.
fn dense_mlp(k: &Kernels, mlp: &DenseMlp, n: usize, bufs: &mut ForwardBuffers) {
    let ff = mlp.gate.rows;
    bufs.normed.prepare_for(mlp.gate.ty, k);
    bufs.normed.prepare_for(mlp.up.ty, k);
    let every_token = ExpertSlot {
        expert: 0,
        first: 0,
        len: n,
    };
    parallel::expert_swiglu(
        k,
        |_| mlp.gate.view(),
        |_| mlp.up.view(),
        &[every_token],
        &bufs.normed,
        ProductOut::new(bufs.hidden.start(n), n, ff),
        ProductOut::new(&mut bufs.up, n, ff),
    );
    project(k, &mlp.down, &mut bufs.hidden, &mut bufs.proj);
}

/// `out[t] = W . input[t]` for every token of the batch, as one parallel region.
fn project(k: &Kernels, w: &Matrix, input: &mut ActivationBatch, out: &mut [f32]) {
    input.prepare_for(w.ty, k);
    parallel::product(k, w.view(), input.all_rows(), out);
}

fn rms_norm_batch(
    k: &Kernels,
    x: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut ActivationBatch,
    n: usize,
) {
    let h = weight.len();
    let dst = out.start(n);
    for (src, dst) in x.chunks_exact(h).zip(dst.chunks_exact_mut(h)) {
        (k.ops.rms_norm)(src, weight, eps, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::route_top_k;

    #[test]
    fn top_k_picks_the_largest_logits_lower_index_first_on_ties() {
        let logits = [0.5, 2.0, -1.0, 2.0, 1.0];
        let mut chosen = [(0, 0.0); 3];
        route_top_k(&logits, &mut chosen);
        let experts: Vec<usize> = chosen.iter().map(|c| c.0).collect();
        assert_eq!(experts, [1, 3, 4]);
        // The gate weights: a softmax over the chosen logits only.
        let z = 2.0f32.exp() * 2.0 + 1.0f32.exp();
        for (&(e, w), want) in
            chosen
                .iter()
                .zip([2.0f32.exp() / z, 2.0f32.exp() / z, 1.0f32.exp() / z])
        {
            assert!((w - want).abs() < 1e-6, "expert {e}: {w} vs {want}");
        }
    }
}
