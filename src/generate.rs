//! One sequence being generated: its KV cache and buffers, prompt processing in chunks, and the decode loop.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::model::{ForwardBuffers, KvCache, KvType, Logits, Model, ModelError};
use crate::sampling::Sampler;

/// Prompt tokens per forward pass: large enough that each expert's weights are read once for many tokens,
/// small enough that the buffers stay a few MiB.
pub const DEFAULT_BATCH: usize = 256;

/// A sequence's state over a model: the tokens whose keys and values are cached, and the working memory.
pub struct Session<'m> {
    model: &'m Model,
    cache: KvCache,
    bufs: ForwardBuffers,
    /// Exactly the tokens held in the cache, in order.
    history: Vec<u32>,
}

impl<'m> Session<'m> {
    /// A session with room for `context` tokens in an f32 cache (the reference), processing prompts `batch`
    /// tokens at a time.
    pub fn new(model: &'m Model, context: usize, batch: usize) -> Session<'m> {
        Self::with_cache(model, context, batch, KvType::F32)
    }

    /// [`Session::new`] with keys and values stored as `cache`.
    pub fn with_cache(
        model: &'m Model,
        context: usize,
        batch: usize,
        cache: KvType,
    ) -> Session<'m> {
        let context = context.max(1);
        crate::model::reserve_thread_scratch(&model.config, context);
        Session {
            model,
            cache: KvCache::new(&model.config, context, cache),
            bufs: ForwardBuffers::new(&model.config, batch.clamp(1, context), 1),
            history: Vec::with_capacity(context),
        }
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// The tokens in the cache.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    pub fn context_size(&self) -> usize {
        self.cache.capacity()
    }

    /// Forgets everything after the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        self.history.truncate(len);
        self.cache.truncate(len);
    }

    /// Expert reads per layer since the session began (for tests and statistics).
    pub fn expert_reads(&self) -> &[Vec<u64>] {
        &self.bufs.expert_reads
    }

    /// Processes `ids` after the cached tokens, in chunks, and returns the logits of the last one.
    pub fn feed(&mut self, ids: &[u32]) -> Result<&[f32], ModelError> {
        self.feed_with(ids, Logits::Last)
    }

    /// Like [`Session::feed`] but returns the logits of every fed position, `[ids][n_vocab]` (for `quarry logits`).
    pub fn feed_all_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let v = self.model.config.n_vocab;
        let mut all = Vec::with_capacity(ids.len() * v);
        for chunk in ids.chunks(self.bufs.max_batch()) {
            self.check_room(chunk.len())?;
            let logits = self
                .model
                .forward(chunk, &mut self.cache, &mut self.bufs, Logits::All)?;
            all.extend_from_slice(logits);
            self.history.extend_from_slice(chunk);
        }
        Ok(all)
    }

    fn check_room(&self, n: usize) -> Result<(), ModelError> {
        if self.history.len() + n > self.cache.capacity() {
            return Err(ModelError::ContextFull {
                needed: self.history.len() + n,
                capacity: self.cache.capacity(),
                model_max: self.model.config.context_length,
            });
        }
        Ok(())
    }

    fn feed_with(&mut self, ids: &[u32], last: Logits) -> Result<&[f32], ModelError> {
        let _all_ran = self.feed_chunks(ids, last, &mut |_, _| ControlFlow::Continue(()))?;
        // The last forward's logits are still in the buffers; run it again only to borrow them would be waste.
        Ok(self.bufs.last_logits(self.model.config.n_vocab))
    }

    /// Runs `ids` chunk by chunk, telling `on_chunk` (tokens done, tokens in all) after each chunk but the last;
    /// a `Break` from it stops before the next chunk, with the chunks done so far kept in the cache (a prefix of
    /// the prompt, which the next [`Session::feed_prompt`] reuses). Returns whether every chunk ran.
    fn feed_chunks(
        &mut self,
        ids: &[u32],
        last: Logits,
        on_chunk: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, ModelError> {
        assert!(!ids.is_empty(), "feed needs at least one token");
        self.check_room(ids.len())?;
        let batch = self.bufs.max_batch();
        let n_chunks = ids.len().div_ceil(batch);
        for (i, chunk) in ids.chunks(batch).enumerate() {
            let want = if i + 1 == n_chunks {
                last
            } else {
                Logits::None
            };
            self.model
                .forward(chunk, &mut self.cache, &mut self.bufs, want)?;
            self.history.extend_from_slice(chunk);
            if i + 1 < n_chunks && on_chunk((i + 1) * batch, ids.len()).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Samples from the last fed position's logits, with the cached tokens as the repetition history.
    pub fn sample_next(&self, sampler: &mut Sampler) -> u32 {
        sampler.sample(
            self.bufs.last_logits(self.model.config.n_vocab),
            &self.history,
        )
    }

    /// Makes the cache hold exactly `prompt`, reusing the longest cached prefix (a chat's earlier turns), and
    /// returns the last position's logits. At least the last prompt token is always recomputed for its logits.
    pub fn feed_prompt(&mut self, prompt: &[u32]) -> Result<&[f32], ModelError> {
        let _all_ran = self.feed_prompt_observed(prompt, &mut |_, _| ControlFlow::Continue(()))?;
        Ok(self.bufs.last_logits(self.model.config.n_vocab))
    }

    /// [`Session::feed_prompt`] that reports its progress to `on_chunk` (tokens computed, tokens to compute)
    /// between chunks and stops early when it returns `Break`: a long prompt can take many seconds, and the
    /// person waiting should see it advance and be able to cancel it. Only a whole prompt leaves logits to
    /// sample from, so `Break` comes back when it was stopped.
    pub fn feed_prompt_observed(
        &mut self,
        prompt: &[u32],
        on_chunk: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, ModelError> {
        assert!(
            !prompt.is_empty(),
            "an empty prompt has no next-token distribution"
        );
        if prompt.len() > self.cache.capacity() {
            return Err(ModelError::ContextFull {
                needed: prompt.len(),
                capacity: self.cache.capacity(),
                model_max: self.model.config.context_length,
            });
        }
        let common = self
            .history
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(prompt.len() - 1);
        self.truncate(keep);
        self.feed_chunks(&prompt[keep..], Logits::Last, on_chunk)
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-text token.
    EndOfText,
    /// The token limit was reached.
    MaxTokens,
    /// The context window is full.
    ContextFull,
    /// The caller asked to stop (Ctrl-C in chat).
    Interrupted,
}

/// Counts and timings of one generation.
#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually computed (fewer than `prompt_tokens` when a cached prefix was reused).
    pub prompt_tokens_computed: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub generation_time: Duration,
    pub stop: StopReason,
    /// Whether the whole prompt was processed: `false` when it was stopped before its end (then nothing was
    /// generated, and `stop` is [`StopReason::Interrupted`]).
    pub prompt_done: bool,
}

impl GenerationStats {
    pub fn prompt_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens_computed, self.prompt_time)
    }

    /// Decode speed: the first token comes from the prompt's logits, so it is not counted as a decode step.
    pub fn generation_tokens_per_second(&self) -> f64 {
        rate(
            self.generated_tokens.saturating_sub(1),
            self.generation_time,
        )
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

/// Generates after `prompt`: samples up to `max_tokens` tokens, stopping after any of `stop_ids` (which is
/// passed to `on_token` like any other token). `on_token` may return `Break` to stop early.
///
/// The whole loop runs on one of rayon's worker threads, so the forward pass's parallel regions are pushed to
/// that worker's own queue: started from outside the pool, each region would go through rayon's global
/// injector, which allocates a block every 63 jobs — the only allocation left on the per-token path.
pub fn generate(
    session: &mut Session,
    prompt: &[u32],
    sampler: &mut Sampler,
    max_tokens: usize,
    stop_ids: &[u32],
    on_token: impl FnMut(u32) -> ControlFlow<()> + Send,
) -> Result<GenerationStats, ModelError> {
    generate_observed(
        session,
        prompt,
        sampler,
        max_tokens,
        stop_ids,
        |_, _| ControlFlow::Continue(()),
        on_token,
    )
}

/// [`generate`] that also tells `on_prompt` (prompt tokens computed, prompt tokens to compute) between the prompt's
/// chunks; its `Break` stops prompt processing there, and the result says so ([`GenerationStats::prompt_done`]
/// false, [`StopReason::Interrupted`], nothing generated). Called only during the prompt, never per token.
pub fn generate_observed(
    session: &mut Session,
    prompt: &[u32],
    sampler: &mut Sampler,
    max_tokens: usize,
    stop_ids: &[u32],
    on_prompt: impl FnMut(usize, usize) -> ControlFlow<()> + Send,
    on_token: impl FnMut(u32) -> ControlFlow<()> + Send,
) -> Result<GenerationStats, ModelError> {
    rayon::scope(|_| {
        generate_here(
            session, prompt, sampler, max_tokens, stop_ids, on_prompt, on_token,
        )
    })
}

fn generate_here(
    session: &mut Session,
    prompt: &[u32],
    sampler: &mut Sampler,
    max_tokens: usize,
    stop_ids: &[u32],
    mut on_prompt: impl FnMut(usize, usize) -> ControlFlow<()>,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<GenerationStats, ModelError> {
    let cached_before = session
        .history
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count();
    let start = Instant::now();
    let to_compute = prompt.len() - cached_before.min(prompt.len() - 1);
    let mut computed = to_compute;
    let fed = session.feed_prompt_observed(prompt, &mut |done, total| {
        computed = done;
        on_prompt(done, total)
    })?;
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        prompt_tokens_computed: to_compute,
        prompt_time: Duration::ZERO,
        generated_tokens: 0,
        generation_time: Duration::ZERO,
        stop: StopReason::MaxTokens,
        prompt_done: true,
    };
    if fed.is_break() {
        stats.prompt_tokens_computed = computed;
        stats.prompt_time = start.elapsed();
        stats.stop = StopReason::Interrupted;
        stats.prompt_done = false;
        return Ok(stats);
    }
    let mut next = session.sample_next(sampler);
    stats.prompt_time = start.elapsed();
    let decode_start = Instant::now();
    while stats.generated_tokens < max_tokens {
        stats.generated_tokens += 1;
        let flow = on_token(next);
        if stop_ids.contains(&next) {
            stats.stop = StopReason::EndOfText;
            break;
        }
        if flow.is_break() {
            stats.stop = StopReason::Interrupted;
            break;
        }
        if stats.generated_tokens == max_tokens {
            break;
        }
        if session.history.len() >= session.context_size() {
            stats.stop = StopReason::ContextFull;
            break;
        }
        session.feed(&[next])?;
        next = session.sample_next(sampler);
    }
    stats.generation_time = decode_start.elapsed();
    Ok(stats)
}
