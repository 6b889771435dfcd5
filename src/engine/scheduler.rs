//! Continuous batching: many requests decoded together, each forward step taking one token from every running
//! sequence and prompt chunks from those still reading their prompts (chunked prefill under a token budget, so
//! a long prompt never stalls the others' decoding). Sequences join as others leave, first come first served up
//! to a limit; each has its own sampler, so the same seed gives the same tokens whatever runs beside it.
//!
//! KV memory comes from one [`KvPool`]: a sequence is admitted when the pool can hold its prompt, takes a block
//! as it grows, and gives its blocks back when it ends. A sequence that cannot grow first evicts cached
//! prefixes, then the most recently admitted other sequence is preempted (its blocks freed, and it is recomputed
//! from its tokens later, which gives the same values); a sequence alone that still cannot grow ends with
//! [`FinishReason::Length`]. Nothing here panics on a request: what cannot run is refused at [`Scheduler::submit`].
//!
//! Prefix reuse: when a sequence ends, its full blocks stay in a cache keyed by the tokens they hold (and all
//! before them); a new sequence whose prompt starts with those tokens (a chat client resending the conversation)
//! adopts them instead of computing them again. Cached blocks are evicted least recently used first when the
//! pool needs room.
//!
//! The library has no threads of its own and no I/O: a caller (`quarry batch`, the server) submits, calls
//! [`Scheduler::step`] and reads the events.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::model::{
    BlockId, ForwardBuffers, KV_BLOCK_TOKENS, KvPool, KvType, Logits, Model, ModelError, SeqKv,
    SeqSpan,
};
use crate::sampling::{Sampler, SamplingParams, TokenConstraint};

/// A request's handle.
pub type SeqId = u64;

/// One generation request.
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Most tokens to generate (the stop token counts as one).
    pub max_tokens: usize,
    /// Tokens that end the sequence (the model's end-of-text among them); they are emitted like any other.
    pub stop: Vec<u32>,
    /// Which tokens may be sampled (a JSON schema, a forced tool call); `None` for free text.
    pub constraint: Option<Box<dyn TokenConstraint>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("prompt", &self.prompt)
            .field("params", &self.params)
            .field("max_tokens", &self.max_tokens)
            .field("stop", &self.stop)
            .field("constrained", &self.constraint.is_some())
            .finish()
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The sequence's context (or the pool) is full.
    ContextFull,
    /// [`Scheduler::cancel`].
    Cancelled,
    /// The request's [`TokenConstraint`] could not go on (an error of its own, or no token allowed); the
    /// sequence ends rather than continue unconstrained.
    ConstraintFailed,
}

impl FinishReason {
    /// The `finish_reason` clients are told (OpenAI's names: a full context is a `length` too).
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::ContextFull => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::ConstraintFailed => "constraint_failed",
        }
    }
}

/// What a step produced, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token {
        id: SeqId,
        token: u32,
    },
    Finished {
        id: SeqId,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        reused_tokens: usize,
    },
}

/// A request that cannot run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the prompt is empty: there is nothing to continue")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt} tokens but a sequence's context holds {context}; shorten it or raise --ctx-size"
    )]
    PromptTooLong { prompt: usize, context: usize },
    #[error("the prompt has {prompt} tokens but the whole KV pool holds {pool}; raise --kv-pool")]
    PoolTooSmall { prompt: usize, pool: usize },
    #[error("token id {id} is outside the vocabulary of {n_vocab} tokens")]
    TokenOutOfRange { id: u32, n_vocab: usize },
    #[error("{0}")]
    BadSampling(String),
}

/// Limits of a scheduler.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Sequences decoded together at most; more wait, first come first served.
    pub max_running: usize,
    /// Positions one sequence may hold (prompt and generated tokens).
    pub context: usize,
    /// Positions the KV pool holds for all sequences together.
    pub pool_tokens: usize,
    /// Tokens per forward step (decode tokens plus prompt chunks).
    pub step_tokens: usize,
    /// How the pool stores keys and values.
    pub cache_type: KvType,
    /// Keep the blocks of ended sequences for prefix reuse.
    pub prefix_cache: bool,
    /// Decode running sequences in the same steps as others' prompt chunks (chunked prefill). Off, prompts
    /// are read first and decoding waits for them (the benchmark's phases, llama-batched-bench's).
    pub decode_during_prefill: bool,
}

impl SchedulerConfig {
    /// Pool positions for `max_running` sequences of `context` positions each all at once: whole blocks per
    /// sequence (a pool of `max_running * context` positions rounds down per sequence, and sequences that all
    /// reach their context would preempt each other).
    pub fn pool_for(max_running: usize, context: usize) -> usize {
        max_running.max(1) * context.max(1).next_multiple_of(KV_BLOCK_TOKENS)
    }

    /// `max_running` sequences of up to `context` positions each, with a pool for all of them at once.
    pub fn new(max_running: usize, context: usize) -> SchedulerConfig {
        let max_running = max_running.max(1);
        SchedulerConfig {
            max_running,
            context: context.max(1),
            pool_tokens: SchedulerConfig::pool_for(max_running, context),
            step_tokens: crate::generate::DEFAULT_BATCH.max(max_running),
            cache_type: KvType::F32,
            prefix_cache: true,
            decode_during_prefill: true,
        }
    }
}

/// Counters for tests and statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub steps: u64,
    /// Tokens run through the model (prompt chunks and decode tokens).
    pub computed_tokens: u64,
    /// Prompt tokens taken from the prefix cache instead.
    pub reused_tokens: u64,
    /// Sequences preempted for lack of KV blocks (and recomputed later).
    pub preemptions: u64,
}

struct Sequence {
    id: SeqId,
    /// Prompt, then every generated token.
    tokens: Vec<u32>,
    prompt_len: usize,
    kv: SeqKv,
    sampler: Sampler,
    max_tokens: usize,
    stop: Vec<u32>,
    generated: usize,
    reused: usize,
    constraint: Option<Constrained>,
}

/// A sequence's constraint and the allowed set for its next token.
struct Constrained {
    rule: Box<dyn TokenConstraint>,
    /// The token sampled last, not yet shown to `rule`.
    unseen: Option<u32>,
    /// One bit per id: what may be sampled next, once `prepare` has run for this step.
    allowed: Vec<u32>,
    ready: bool,
    failed: bool,
}

impl Constrained {
    /// Shows `rule` the last token and asks what may come next. Runs beside the forward pass of the step
    /// whose logits it will mask ([`Scheduler::step_observing`]), so the batch does not wait for it.
    fn prepare(&mut self) {
        if self.ready || self.failed {
            return;
        }
        let result = match self.unseen.take() {
            Some(token) => self.rule.accept(token),
            None => Ok(()),
        };
        self.failed = result
            .and_then(|()| self.rule.allowed(&mut self.allowed))
            .is_err();
        self.ready = true;
    }
}

impl Sequence {
    /// Tokens not yet in the cache: a prompt (chunk) to read, or the one token to decode.
    fn pending(&self) -> usize {
        self.tokens.len() - self.kv.len()
    }

    /// Past its prompt, with just the last sampled token to run; otherwise it is reading a prompt (its own, or
    /// its tokens again after a preemption).
    fn is_decoding(&self) -> bool {
        self.pending() == 1 && self.tokens.len() > self.prompt_len
    }
}

/// A cached full block: the block, its own tokens and the key of the block before it (to tell hash collisions
/// apart), and when it was last used.
struct CachedBlock {
    block: BlockId,
    tokens: [u32; KV_BLOCK_TOKENS],
    parent: u64,
    last_used: u64,
}

/// Blocks of ended sequences, keyed by a hash of every token up to the end of the block.
#[derive(Default)]
struct PrefixCache {
    blocks: HashMap<u64, CachedBlock>,
    clock: u64,
}

/// The key of the block holding `tokens[i * B..(i + 1) * B]`, given the key of the block before it.
fn block_key(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixCache {
    /// The cached blocks holding the longest prefix of `tokens[..limit]` in whole blocks, one reference taken
    /// on each for the caller.
    fn take_prefix(
        &mut self,
        pool: &mut KvPool,
        tokens: &[u32],
        limit: usize,
        out: &mut Vec<BlockId>,
    ) {
        self.clock += 1;
        let mut parent = 0;
        for chunk in tokens[..limit].chunks_exact(KV_BLOCK_TOKENS) {
            let key = block_key(parent, chunk);
            match self.blocks.get_mut(&key) {
                Some(c) if c.parent == parent && c.tokens[..] == *chunk => {
                    c.last_used = self.clock;
                    pool.retain(c.block);
                    out.push(c.block);
                }
                _ => break,
            }
            parent = key;
        }
    }

    /// Keeps the full blocks of `seq` (whose keys and values are stored) for later sequences.
    fn insert(&mut self, pool: &mut KvPool, seq: &Sequence) {
        self.clock += 1;
        let full = seq.kv.len() / KV_BLOCK_TOKENS;
        let mut parent = 0;
        for (i, chunk) in seq.tokens[..full * KV_BLOCK_TOKENS]
            .chunks_exact(KV_BLOCK_TOKENS)
            .enumerate()
        {
            let key = block_key(parent, chunk);
            let block = seq.kv.blocks()[i];
            self.blocks.entry(key).or_insert_with(|| {
                pool.retain(block);
                CachedBlock {
                    block,
                    tokens: chunk.try_into().expect("a whole block"),
                    parent,
                    last_used: 0,
                }
            });
            if let Some(c) = self.blocks.get_mut(&key) {
                c.last_used = self.clock;
            }
            parent = key;
        }
    }

    /// Blocks only the cache holds, which eviction would free.
    fn evictable(&self, pool: &KvPool) -> usize {
        self.blocks
            .values()
            .filter(|c| pool.refs(c.block) == 1)
            .count()
    }

    /// Frees least recently used blocks that only the cache holds until `free` blocks are free (or none is
    /// left to evict).
    fn evict_until(&mut self, pool: &mut KvPool, free: usize) {
        while pool.free_blocks() < free {
            let victim = self
                .blocks
                .iter()
                .filter(|(_, c)| pool.refs(c.block) == 1)
                .min_by_key(|(_, c)| c.last_used)
                .map(|(&k, _)| k);
            let Some(key) = victim else { return };
            let c = self.blocks.remove(&key).expect("just found");
            pool.release(c.block);
        }
    }

    fn clear(&mut self, pool: &mut KvPool) {
        for (_, c) in self.blocks.drain() {
            pool.release(c.block);
        }
    }
}

/// Many sequences over one model: see the module documentation.
pub struct Scheduler<'m> {
    model: &'m Model,
    cfg: SchedulerConfig,
    pool: KvPool,
    bufs: ForwardBuffers,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    prefix: PrefixCache,
    next_id: SeqId,
    stats: SchedulerStats,
    /// The step's tokens and, per running sequence in the step, (index in `running`, tokens taken).
    step_tokens: Vec<u32>,
    plan: Vec<(usize, usize)>,
    /// Sequences that ended this step, with why.
    ended: Vec<(usize, FinishReason)>,
    spans: Vec<SeqSpan<'static>>,
    prefix_scratch: Vec<BlockId>,
    /// This step's constraints, out of their sequences (index in `running`) while their masks are worked out.
    constrained: Vec<(usize, Constrained)>,
}

impl<'m> Scheduler<'m> {
    pub fn new(model: &'m Model, cfg: SchedulerConfig) -> Scheduler<'m> {
        let cfg = SchedulerConfig {
            max_running: cfg.max_running.max(1),
            context: cfg.context.max(1),
            pool_tokens: cfg.pool_tokens.max(KV_BLOCK_TOKENS),
            step_tokens: cfg.step_tokens.max(cfg.max_running).max(1),
            ..cfg
        };
        crate::model::reserve_thread_scratch(&model.config, cfg.context);
        Scheduler {
            model,
            pool: KvPool::new(&model.config, cfg.pool_tokens, cfg.cache_type),
            bufs: ForwardBuffers::new(&model.config, cfg.step_tokens, cfg.max_running),
            waiting: VecDeque::new(),
            running: Vec::with_capacity(cfg.max_running),
            prefix: PrefixCache::default(),
            next_id: 0,
            stats: SchedulerStats::default(),
            step_tokens: Vec::with_capacity(cfg.step_tokens),
            plan: Vec::with_capacity(cfg.max_running),
            ended: Vec::with_capacity(cfg.max_running),
            spans: Vec::with_capacity(cfg.max_running),
            prefix_scratch: Vec::new(),
            constrained: Vec::with_capacity(cfg.max_running),
            cfg,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// Bytes of the KV pool.
    pub fn pool_bytes(&self) -> usize {
        self.pool.capacity_tokens() * self.cfg.cache_type.bytes_per_token(&self.model.config)
    }

    pub fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }

    pub fn total_blocks(&self) -> usize {
        self.pool.total_blocks()
    }

    /// Blocks held by the prefix cache.
    pub fn cached_blocks(&self) -> usize {
        self.prefix.blocks.len()
    }

    /// Sequences running (holding a slot), as opposed to waiting for one.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences running or waiting.
    pub fn active(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.active() == 0
    }

    /// Queues a request; its tokens arrive through [`Scheduler::step`]'s events under the returned id.
    pub fn submit(&mut self, req: Request) -> Result<SeqId, SubmitError> {
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let n_vocab = self.model.config.n_vocab;
        if let Some(&id) = req.prompt.iter().find(|&&id| id as usize >= n_vocab) {
            return Err(SubmitError::TokenOutOfRange { id, n_vocab });
        }
        if req.prompt.len() > self.cfg.context {
            return Err(SubmitError::PromptTooLong {
                prompt: req.prompt.len(),
                context: self.cfg.context,
            });
        }
        if req.prompt.len() > self.pool.capacity_tokens() {
            return Err(SubmitError::PoolTooSmall {
                prompt: req.prompt.len(),
                pool: self.pool.capacity_tokens(),
            });
        }
        req.params.validate().map_err(SubmitError::BadSampling)?;
        let id = self.next_id;
        self.next_id += 1;
        let room = req
            .prompt
            .len()
            .saturating_add(req.max_tokens)
            .min(self.cfg.context + 1);
        let mut tokens = Vec::with_capacity(room);
        tokens.extend_from_slice(&req.prompt);
        self.waiting.push_back(Sequence {
            id,
            prompt_len: req.prompt.len(),
            tokens,
            kv: SeqKv::with_capacity(self.cfg.context),
            sampler: Sampler::new(req.params),
            max_tokens: req.max_tokens,
            stop: req.stop,
            generated: 0,
            reused: 0,
            constraint: req.constraint.map(|rule| Constrained {
                rule,
                unseen: None,
                allowed: vec![0; n_vocab.div_ceil(32)],
                ready: false,
                failed: false,
            }),
        });
        Ok(id)
    }

    /// Ends a request now, freeing its blocks; its `Finished` event (reason `Cancelled`) is pushed to
    /// `events`. Unknown (or already finished) ids are ignored.
    pub fn cancel(&mut self, id: SeqId, events: &mut Vec<Event>) {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(i);
            self.finish(seq, FinishReason::Cancelled, events);
        } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            let seq = self.waiting.remove(i).expect("found");
            self.finish(seq, FinishReason::Cancelled, events);
        }
    }

    /// Drops every cached prefix (their blocks go back to the pool).
    pub fn clear_prefix_cache(&mut self) {
        self.prefix.clear(&mut self.pool);
    }

    /// One forward step over every running sequence; appends what happened to `events`. Does nothing when idle.
    ///
    /// Call it on a worker of the rayon pool (inside `rayon::scope`, as `generate` does): from outside, every
    /// parallel region goes through rayon's global injector, which allocates.
    pub fn step(&mut self, events: &mut Vec<Event>) -> Result<(), ModelError> {
        self.step_observing(events, |_, _| {})
    }

    /// [`Scheduler::step`], showing `observe` each sequence's logits before its next token is sampled from them.
    pub fn step_observing(
        &mut self,
        events: &mut Vec<Event>,
        mut observe: impl FnMut(SeqId, &[f32]),
    ) -> Result<(), ModelError> {
        self.admit();
        self.plan_step(events);
        if self.plan.is_empty() {
            return Ok(());
        }
        self.stats.steps += 1;

        // The batch: each planned sequence's next tokens, in plan order.
        self.step_tokens.clear();
        for &(i, n) in &self.plan {
            let s = &self.running[i];
            let from = s.kv.len();
            self.step_tokens
                .extend_from_slice(&s.tokens[from..from + n]);
        }
        self.stats.computed_tokens += self.step_tokens.len() as u64;
        // The constraints of sequences sampling this step, moved out so that their masks can be worked out while
        // the forward pass reads the sequences' caches.
        for &(i, n) in &self.plan {
            let s = &mut self.running[i];
            if s.kv.len() + n == s.tokens.len()
                && let Some(c) = s.constraint.take()
            {
                self.constrained.push((i, c));
            }
        }
        let mut spans = recycle(std::mem::take(&mut self.spans));
        let mut first = 0;
        for &(i, n) in &self.plan {
            let s = &self.running[i];
            let last = s.kv.len() + n == s.tokens.len();
            spans.push(SeqSpan {
                first,
                len: n,
                pos0: s.kv.len(),
                blocks: s.kv.blocks(),
                logits: if last { Logits::Last } else { Logits::None },
            });
            first += n;
        }
        let (model, pool, bufs, step_tokens) = (
            self.model,
            &mut self.pool,
            &mut self.bufs,
            &self.step_tokens,
        );
        let constrained = &mut self.constrained;
        let (result, ()) = rayon::join(
            || {
                model
                    .forward_batch(step_tokens, &spans, pool, bufs)
                    .map(|_| ())
            },
            || constrained.iter_mut().for_each(|(_, c)| c.prepare()),
        );
        self.spans = recycle(spans);
        for (i, c) in self.constrained.drain(..) {
            self.running[i].constraint = Some(c);
        }
        result?;

        // Record what is now cached; sample for the sequences that reached their last token.
        let n_vocab = self.model.config.n_vocab;
        let mut row = 0;
        self.ended.clear();
        for &(i, n) in &self.plan {
            let s = &mut self.running[i];
            let len = s.kv.len() + n;
            s.kv.set_len(len);
            if s.pending() > 0 {
                continue;
            }
            let logits = self.bufs.logits_row(row, n_vocab);
            observe(s.id, logits);
            row += 1;
            let token = match &mut s.constraint {
                None => s.sampler.sample(logits, &s.tokens),
                Some(c) => {
                    let token = if c.failed {
                        None
                    } else {
                        s.sampler.sample_allowed(logits, &s.tokens, &c.allowed)
                    };
                    let Some(token) = token else {
                        self.ended.push((i, FinishReason::ConstraintFailed));
                        continue;
                    };
                    c.unseen = Some(token);
                    c.ready = false;
                    token
                }
            };
            s.generated += 1;
            events.push(Event::Token { id: s.id, token });
            // The same order of checks as `generate`, so a sequence ends where it would alone.
            if s.stop.contains(&token) {
                self.ended.push((i, FinishReason::Stop));
            } else if s.generated >= s.max_tokens {
                self.ended.push((i, FinishReason::Length));
            } else if s.tokens.len() >= self.cfg.context {
                self.ended.push((i, FinishReason::ContextFull));
            } else {
                s.tokens.push(token);
            }
        }
        // Highest index first, so the others stay where they are while removing.
        self.ended.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        for k in 0..self.ended.len() {
            let (i, reason) = self.ended[k];
            let seq = self.running.remove(i);
            self.finish(seq, reason, events);
        }
        Ok(())
    }

    /// Moves waiting sequences to running while there is room, oldest first: a sequence is admitted when the
    /// pool (after evicting cached prefixes) can hold its whole prompt, reusing the cached blocks of its prefix.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_running {
            let Some(seq) = self.waiting.front_mut() else {
                return;
            };
            // At least the last token is computed for its logits, so only blocks before it are reused.
            let mut prefix = std::mem::take(&mut self.prefix_scratch);
            prefix.clear();
            if self.cfg.prefix_cache && seq.kv.is_empty() {
                let limit = (seq.tokens.len() - 1) / KV_BLOCK_TOKENS * KV_BLOCK_TOKENS;
                self.prefix
                    .take_prefix(&mut self.pool, &seq.tokens, limit, &mut prefix);
            }
            let need = SeqKv::blocks_for(seq.tokens.len()) - prefix.len();
            let free = self.pool.free_blocks() + self.prefix.evictable(&self.pool);
            if need > free {
                for &b in &prefix {
                    self.pool.release(b);
                }
                self.prefix_scratch = prefix;
                return;
            }
            self.prefix.evict_until(&mut self.pool, need);
            let mut seq = self.waiting.pop_front().expect("front exists");
            if !prefix.is_empty() {
                seq.kv.adopt_prefix(&prefix);
                seq.reused += prefix.len() * KV_BLOCK_TOKENS;
                self.stats.reused_tokens += (prefix.len() * KV_BLOCK_TOKENS) as u64;
            }
            self.prefix_scratch = prefix;
            let total = seq.tokens.len();
            seq.kv
                .reserve(&mut self.pool, total)
                .expect("room was made above");
            self.running.push(seq);
        }
    }

    /// Chooses this step's tokens into `plan`: one for every decoding sequence, then prompt chunks in admission
    /// order within the step's budget, each sequence's blocks reserved for what it takes.
    fn plan_step(&mut self, events: &mut Vec<Event>) {
        self.plan.clear();
        let mut budget = self.cfg.step_tokens;
        let prefilling = self.running.iter().any(|s| !s.is_decoding());
        let decode = self.cfg.decode_during_prefill || !prefilling;
        // Decoding sequences first: their one token each.
        let mut i = 0;
        while decode && i < self.running.len() {
            let s = &self.running[i];
            if s.is_decoding() {
                match self.make_room(i, s.kv.len() + 1, events) {
                    Room::Ok => {
                        self.plan.push((i, 1));
                        budget -= 1;
                    }
                    Room::Removed => continue,
                }
            }
            i += 1;
        }
        // Then prompts, in chunks.
        for i in 0..self.running.len() {
            if budget == 0 {
                break;
            }
            let s = &self.running[i];
            if s.is_decoding() {
                continue;
            }
            let n = s.pending().min(budget);
            // Prompt blocks were reserved at admission.
            self.plan.push((i, n));
            budget -= n;
        }
    }

    /// Makes sure running sequence `i` can hold `tokens` positions: evicts cached prefixes, then preempts the
    /// most recently admitted other sequence, then (alone) ends it as full.
    fn make_room(&mut self, i: usize, tokens: usize, events: &mut Vec<Event>) -> Room {
        loop {
            let s = &self.running[i];
            let need = s.kv.blocks_needed(&self.pool, tokens);
            if need <= self.pool.free_blocks() {
                self.running[i]
                    .kv
                    .reserve(&mut self.pool, tokens)
                    .expect("counted");
                return Room::Ok;
            }
            if self.prefix.evictable(&self.pool) > 0 {
                self.prefix.evict_until(&mut self.pool, need);
                continue;
            }
            let last = self.running.len() - 1;
            if last == i {
                if last == 0 {
                    let seq = self.running.remove(i);
                    self.finish(seq, FinishReason::ContextFull, events);
                    return Room::Removed;
                }
                // `i` is the newest: preempt it rather than an older one.
                self.preempt(i);
                return Room::Removed;
            }
            // Planning goes in order, so `last > i` is not in this step's plan yet.
            self.preempt(last);
        }
    }

    /// Frees sequence `i`'s blocks and puts it back at the front of the queue; it will recompute its tokens
    /// (prompt and generated so far) as a prompt and continue with its sampler where it was.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        seq.kv.release(&mut self.pool);
        self.stats.preemptions += 1;
        self.waiting.push_front(seq);
    }

    fn finish(&mut self, mut seq: Sequence, reason: FinishReason, events: &mut Vec<Event>) {
        if self.cfg.prefix_cache {
            self.prefix.insert(&mut self.pool, &seq);
        }
        seq.kv.release(&mut self.pool);
        events.push(Event::Finished {
            id: seq.id,
            reason,
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated,
            reused_tokens: seq.reused,
        });
    }
}

enum Room {
    Ok,
    /// The sequence left `running` (preempted or finished).
    Removed,
}

/// An empty vector of `U` in the allocation of `v`: the spans of a step borrow the sequences, so they cannot be
/// kept between steps, but their buffer can (collecting a mapped `into_iter` of a same-layout type reuses it).
fn recycle<'a, 'b>(mut v: Vec<SeqSpan<'a>>) -> Vec<SeqSpan<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!("cleared")).collect()
}
