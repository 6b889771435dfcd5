//! The forward pass over a batch of consecutive tokens (a prompt chunk, or one token when decoding).
//!
//! Read top to bottom it is the Granite network of the reference: embed and scale, then per layer attention and
//! the feed-forward block (routed experts or a dense MLP), each added back scaled by the residual multiplier,
//! then the final norm and the output head divided by the logit scale.

use super::config::ModelConfig;
use super::weights::{DenseMlp, ExpertWeights, FeedForward, Matrix};
use super::{Model, ModelError};
use crate::kernels::{self, ActivationBatch, Kernels, ops};

/// Keys and values of every processed position, per layer and KV head: `[layer][kv_head][position][head_dim]`,
/// so attention reads each head's history contiguously.
pub struct KvCache {
    n_kv_head: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvCache {
    /// A cache for `capacity` positions. The memory is zeroed lazily by the OS, so an unused long context costs
    /// address space, not resident memory.
    pub fn new(cfg: &ModelConfig, capacity: usize) -> KvCache {
        let n = cfg.n_layer * cfg.n_head_kv * capacity * cfg.head_dim;
        KvCache {
            n_kv_head: cfg.n_head_kv,
            head_dim: cfg.head_dim,
            capacity,
            len: 0,
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets positions from `len` on (a new conversation, or a retried turn).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn offset(&self, layer: usize, head: usize, pos: usize) -> usize {
        ((layer * self.n_kv_head + head) * self.capacity + pos) * self.head_dim
    }
}

/// Which logits a forward pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt chunk that is not the last).
    None,
    /// The last position's only: all that generation needs.
    Last,
    /// Every position's (`quarry logits`, perplexity).
    All,
}

/// Working memory of the forward pass, sized once for the largest batch; the per-token path allocates nothing.
pub struct ForwardBuffers {
    max_batch: usize,
    /// Residual stream, `[batch][n_embd]`.
    x: Vec<f32>,
    /// Normed input of the attention and feed-forward blocks: one quantization serves all the matrices reading it.
    normed: ActivationBatch,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output per token, `[batch][n_head * head_dim]`, the input of the output projection.
    attn: ActivationBatch,
    /// Output of a projection before it is added to the residual stream, `[batch][n_embd]`.
    proj: Vec<f32>,
    /// Scores of one head over the cached positions.
    scores: Vec<f32>,
    /// `(cos, sin)` per token and rotary pair.
    rope: Vec<(f32, f32)>,
    inv_freq: Vec<f32>,
    /// Router logits, `[batch][n_expert]`, and each token's chosen experts and gate weights, `[batch][k]`.
    router: Vec<f32>,
    chosen: Vec<(usize, f32)>,
    /// For each expert, the batch rows routed to it and their gate weights.
    expert_tokens: Vec<Vec<(usize, f32)>>,
    /// Token indices of one expert's group, and their normed activations gathered into one batch.
    group: Vec<usize>,
    expert_in: ActivationBatch,
    /// Row-major kernel output before it is scattered token-major.
    gemm_out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// One expert's down projection of its tokens, `[tokens][n_embd]`, before the gate weight is applied.
    expert_out: Vec<f32>,
    /// `silu(gate) * up` of one expert's (or the dense MLP's) tokens: the input of the down projection.
    hidden: ActivationBatch,
    /// Logits of the last position, or of every position with [`Logits::All`].
    logits: Vec<f32>,
    /// How many times each expert's weights were read, per layer; for tests and `bench` statistics.
    pub expert_reads: Vec<Vec<u64>>,
}

impl ForwardBuffers {
    /// Buffers for batches of up to `max_batch` tokens and a cache of `context` positions.
    pub fn new(cfg: &ModelConfig, max_batch: usize, context: usize) -> ForwardBuffers {
        let b = max_batch.max(1);
        let q_dim = cfg.n_head * cfg.head_dim;
        let half = cfg.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        ForwardBuffers {
            max_batch: b,
            x: vec![0.0; b * cfg.n_embd],
            normed: ActivationBatch::new(cfg.n_embd, b),
            q: vec![0.0; b * q_dim],
            k: vec![0.0; b * cfg.kv_dim()],
            v: vec![0.0; b * cfg.kv_dim()],
            attn: ActivationBatch::new(q_dim, b),
            proj: vec![0.0; b * cfg.n_embd],
            scores: vec![0.0; context],
            rope: vec![(0.0, 0.0); b * half],
            inv_freq,
            router: vec![0.0; b * cfg.n_expert],
            chosen: vec![(0, 0.0); b * cfg.n_expert_used],
            expert_tokens: (0..cfg.n_expert).map(|_| Vec::with_capacity(b)).collect(),
            group: Vec::with_capacity(b),
            expert_in: ActivationBatch::new(cfg.n_embd, b),
            gemm_out: Vec::with_capacity(b * cfg.n_embd.max(cfg.n_ff).max(q_dim).max(cfg.n_vocab)),
            gate: vec![0.0; b * cfg.n_ff],
            up: vec![0.0; b * cfg.n_ff],
            expert_out: vec![0.0; b * cfg.n_embd],
            hidden: ActivationBatch::new(cfg.n_ff, b),
            logits: vec![0.0; cfg.n_vocab],
            expert_reads: vec![vec![0; cfg.n_expert]; cfg.n_layer],
        }
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The logits the last forward pass with [`Logits::Last`] computed.
    pub fn last_logits(&self, n_vocab: usize) -> &[f32] {
        &self.logits[..n_vocab]
    }
}

impl Model {
    /// Runs `tokens` (at most `bufs.max_batch()`) at the positions after those in `cache`, appends their keys
    /// and values to it, and returns the requested logits (`[n_vocab]` or `[tokens][n_vocab]`).
    pub fn forward<'b>(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        bufs: &'b mut ForwardBuffers,
        want: Logits,
    ) -> Result<&'b [f32], ModelError> {
        let cfg = &self.config;
        let k = kernels::selected();
        let n = tokens.len();
        assert!(
            n <= bufs.max_batch,
            "forward batch {n} exceeds the buffers' {}",
            bufs.max_batch
        );
        let pos0 = cache.len;
        if pos0 + n > cache.capacity {
            return Err(ModelError::ContextFull {
                needed: pos0 + n,
                capacity: cache.capacity,
                model_max: cfg.context_length,
            });
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= cfg.n_vocab) {
            return Err(ModelError::TokenOutOfRange {
                id,
                n_vocab: cfg.n_vocab,
            });
        }
        if bufs.scores.len() < cache.capacity {
            // A cache larger than the buffers were made for: grow once, before the per-token work.
            bufs.scores.resize(cache.capacity, 0.0);
        }
        let h = cfg.n_embd;

        // Token embeddings, times Granite's embedding multiplier.
        let embd = self.weights.token_embd.view();
        for (t, &id) in tokens.iter().enumerate() {
            let row = &mut bufs.x[t * h..(t + 1) * h];
            embd.dequantize_row(id as usize, row);
            row.iter_mut().for_each(|v| *v *= cfg.embedding_scale);
        }

        // Rotary angles for this batch's positions, as HF computes them: f32 position times f32 inverse frequency.
        let half = cfg.head_dim / 2;
        for t in 0..n {
            let pos = (pos0 + t) as f32;
            for (i, &f) in bufs.inv_freq.iter().enumerate() {
                let angle = pos * f;
                bufs.rope[t * half + i] = (angle.cos(), angle.sin());
            }
        }

        for (il, layer) in self.weights.layers.iter().enumerate() {
            // Attention block.
            rms_norm_batch(
                &bufs.x[..n * h],
                &layer.attn_norm,
                cfg.rms_eps,
                &mut bufs.normed,
                n,
            );
            project(
                k,
                &layer.wq,
                &mut bufs.normed,
                &mut bufs.q,
                &mut bufs.gemm_out,
            );
            project(
                k,
                &layer.wk,
                &mut bufs.normed,
                &mut bufs.k,
                &mut bufs.gemm_out,
            );
            project(
                k,
                &layer.wv,
                &mut bufs.normed,
                &mut bufs.v,
                &mut bufs.gemm_out,
            );
            self.attention(k, il, n, pos0, cache, bufs);
            project(
                k,
                &layer.wo,
                &mut bufs.attn,
                &mut bufs.proj,
                &mut bufs.gemm_out,
            );
            add_scaled(
                &mut bufs.x[..n * h],
                &bufs.proj[..n * h],
                cfg.residual_scale,
            );

            // Feed-forward block.
            rms_norm_batch(
                &bufs.x[..n * h],
                &layer.ffn_norm,
                cfg.rms_eps,
                &mut bufs.normed,
                n,
            );
            match &layer.ffn {
                FeedForward::Experts(experts) => self.moe(k, il, experts, n, bufs),
                FeedForward::Dense(mlp) => dense_mlp(k, mlp, n, bufs),
            }
            add_scaled(
                &mut bufs.x[..n * h],
                &bufs.proj[..n * h],
                cfg.residual_scale,
            );
        }
        cache.len = pos0 + n;

        // Output head on the final norm, divided by Granite's logit scale.
        let rows = match want {
            Logits::None => return Ok(&[]),
            Logits::Last => n - 1..n,
            Logits::All => 0..n,
        };
        let m = rows.len();
        let out = self.weights.output_head();
        let normed = bufs.normed.start(m);
        for (i, t) in rows.enumerate() {
            ops::rms_norm(
                &bufs.x[t * h..(t + 1) * h],
                &self.weights.output_norm,
                cfg.rms_eps,
                &mut normed[i * h..(i + 1) * h],
            );
        }
        let v = cfg.n_vocab;
        if bufs.logits.len() < m * v {
            // Only `Logits::All` gets here, which is never on the generation path.
            bufs.logits.resize(m * v, 0.0);
        }
        project(
            k,
            out,
            &mut bufs.normed,
            &mut bufs.logits[..m * v],
            &mut bufs.gemm_out,
        );
        let inv = 1.0 / cfg.logit_scale;
        bufs.logits[..m * v].iter_mut().for_each(|l| *l *= inv);
        Ok(&bufs.logits[..m * v])
    }

    /// Causal grouped-query attention of the batch: RoPE on q and k, k and v appended to the cache, then each
    /// query head attends over its KV head's positions up to its own.
    fn attention(
        &self,
        k: &Kernels,
        layer: usize,
        n: usize,
        pos0: usize,
        cache: &mut KvCache,
        bufs: &mut ForwardBuffers,
    ) {
        let cfg = &self.config;
        let (hd, half) = (cfg.head_dim, cfg.head_dim / 2);
        let (q_dim, kv_dim) = (cfg.n_head * hd, cfg.kv_dim());
        let group = cfg.n_head / cfg.n_head_kv;
        for t in 0..n {
            let cos_sin = &bufs.rope[t * half..(t + 1) * half];
            ops::rope_adjacent_pairs(&mut bufs.q[t * q_dim..(t + 1) * q_dim], hd, cos_sin);
            ops::rope_adjacent_pairs(&mut bufs.k[t * kv_dim..(t + 1) * kv_dim], hd, cos_sin);
            for kvh in 0..cfg.n_head_kv {
                let at = cache.offset(layer, kvh, pos0 + t);
                let src = t * kv_dim + kvh * hd;
                cache.k[at..at + hd].copy_from_slice(&bufs.k[src..src + hd]);
                cache.v[at..at + hd].copy_from_slice(&bufs.v[src..src + hd]);
            }
        }
        let out = bufs.attn.start(n);
        for t in 0..n {
            let len = pos0 + t + 1;
            for head in 0..cfg.n_head {
                let kvh = head / group;
                let q = &bufs.q[t * q_dim + head * hd..t * q_dim + (head + 1) * hd];
                let base = cache.offset(layer, kvh, 0);
                let keys = &cache.k[base..base + len * hd];
                let scores = &mut bufs.scores[..len];
                for (s, key) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
                    *s = (k.dot_f32)(q, key) * cfg.attention_scale;
                }
                ops::softmax(scores);
                let o = &mut out[t * q_dim + head * hd..t * q_dim + (head + 1) * hd];
                o.fill(0.0);
                let values = &cache.v[base..base + len * hd];
                for (&p, value) in scores.iter().zip(values.chunks_exact(hd)) {
                    for (acc, &x) in o.iter_mut().zip(value) {
                        *acc += p * x;
                    }
                }
            }
        }
    }

    /// The routed experts: each token picks its top-k experts by router logit, weighted by the softmax over just
    /// those k logits. Tokens are grouped by expert so that each chosen expert's weights are read once per batch,
    /// and experts no token chose are never touched.
    fn moe(
        &self,
        k: &Kernels,
        layer: usize,
        experts: &ExpertWeights,
        n: usize,
        bufs: &mut ForwardBuffers,
    ) {
        let cfg = &self.config;
        let (e_count, top_k, h, ff) = (cfg.n_expert, cfg.n_expert_used, cfg.n_embd, cfg.n_ff);
        project(
            k,
            &experts.router,
            &mut bufs.normed,
            &mut bufs.router,
            &mut bufs.gemm_out,
        );
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
        // Every expert reads the same normed input; quantize it once for the expert weight type.
        bufs.normed.prepare_for(experts.gate.ty, k);
        bufs.normed.prepare_for(experts.up.ty, k);
        bufs.proj[..n * h].fill(0.0);
        for e in 0..e_count {
            if bufs.expert_tokens[e].is_empty() {
                continue;
            }
            bufs.expert_reads[layer][e] += 1;
            let m = bufs.expert_tokens[e].len();
            bufs.group.clear();
            bufs.group
                .extend(bufs.expert_tokens[e].iter().map(|&(t, _)| t));
            bufs.expert_in.gather_from(&bufs.normed, &bufs.group);
            let (gate_w, up_w, down_w) = (
                experts.gate.expert(e),
                experts.up.expert(e),
                experts.down.expert(e),
            );
            bufs.expert_in.prepare_for(gate_w.ty, k);
            bufs.expert_in.prepare_for(up_w.ty, k);
            kernels::matmul(
                k,
                &gate_w,
                &bufs.expert_in,
                &mut bufs.gate,
                ff,
                &mut bufs.gemm_out,
            );
            kernels::matmul(
                k,
                &up_w,
                &bufs.expert_in,
                &mut bufs.up,
                ff,
                &mut bufs.gemm_out,
            );
            let hidden = bufs.hidden.start(m);
            hidden.copy_from_slice(&bufs.gate[..m * ff]);
            ops::silu_mul(hidden, &bufs.up[..m * ff]);
            bufs.hidden.prepare_for(down_w.ty, k);
            kernels::matmul(
                k,
                &down_w,
                &bufs.hidden,
                &mut bufs.expert_out,
                h,
                &mut bufs.gemm_out,
            );
            for (i, &(t, w)) in bufs.expert_tokens[e].iter().enumerate() {
                add_scaled(
                    &mut bufs.proj[t * h..(t + 1) * h],
                    &bufs.expert_out[i * h..(i + 1) * h],
                    w,
                );
            }
        }
    }
}

/// Picks the `chosen.len()` largest router logits (the lower expert index first on ties) and writes
/// `(expert, gate weight)` pairs with the weights the softmax over the chosen logits only.
pub fn route_top_k(logits: &[f32], chosen: &mut [(usize, f32)]) {
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

/// The dense SwiGLU MLP of the `granite` architecture, over the whole batch.
fn dense_mlp(k: &Kernels, mlp: &DenseMlp, n: usize, bufs: &mut ForwardBuffers) {
    let ff = mlp.gate.rows;
    project(
        k,
        &mlp.gate,
        &mut bufs.normed,
        &mut bufs.gate,
        &mut bufs.gemm_out,
    );
    project(
        k,
        &mlp.up,
        &mut bufs.normed,
        &mut bufs.up,
        &mut bufs.gemm_out,
    );
    let hidden = bufs.hidden.start(n);
    hidden.copy_from_slice(&bufs.gate[..n * ff]);
    ops::silu_mul(hidden, &bufs.up[..n * ff]);
    project(
        k,
        &mlp.down,
        &mut bufs.hidden,
        &mut bufs.proj,
        &mut bufs.gemm_out,
    );
}

/// `out[t] = W . input[t]` for every token of the batch.
fn project(
    k: &Kernels,
    w: &Matrix,
    input: &mut ActivationBatch,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    input.prepare_for(w.ty, k);
    kernels::matmul(k, &w.view(), input, out, w.rows, scratch);
}

fn rms_norm_batch(x: &[f32], weight: &[f32], eps: f32, out: &mut ActivationBatch, n: usize) {
    let h = weight.len();
    let dst = out.start(n);
    for (src, dst) in x.chunks_exact(h).zip(dst.chunks_exact_mut(h)) {
        ops::rms_norm(src, weight, eps, dst);
    }
}

fn add_scaled(acc: &mut [f32], x: &[f32], scale: f32) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b * scale;
    }
}
