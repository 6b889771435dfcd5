//! Throughput measurement in llama-bench's terms: `pp` processes a prompt of random tokens from an empty cache
//! (or after `n_depth` cached tokens, llama-bench's `-d`), `tg` generates one token at a time; each repeated,
//! after one unmeasured warm-up run. With several sequences (`n_parallel`, llama-batched-bench's terms) each holds
//! an `n_prompt`-token prompt, then all generate `n_gen` tokens together: `pp` is the time to read every prompt,
//! `tg` the time of the generation steps after them, and tokens per second count every sequence's tokens.

use std::time::Instant;

use crate::engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
use crate::generate::Session;
use crate::model::{KvType, Model, ModelError};
use crate::sampling::{Rng, SamplingParams};

/// One test: a prompt-processing (`n_gen == 0`) or a generation (`n_prompt == 0`) run, repeated.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub n_prompt: usize,
    pub n_gen: usize,
    /// Sequences run together (1 for the single-stream tests).
    pub n_parallel: usize,
    /// Tokens already in the cache before the test (llama-bench's `-d`).
    pub n_depth: usize,
    pub n_threads: usize,
    pub n_batch: usize,
    /// Wall time of each repetition, in nanoseconds.
    pub samples_ns: Vec<u64>,
}

impl BenchResult {
    /// Tokens per second of each repetition, every sequence's tokens counted.
    pub fn samples_ts(&self) -> Vec<f64> {
        let n = ((self.n_prompt + self.n_gen) * self.n_parallel) as f64;
        self.samples_ns
            .iter()
            .map(|&ns| n * 1e9 / ns as f64)
            .collect()
    }

    pub fn avg_ts(&self) -> f64 {
        mean(&self.samples_ts())
    }

    pub fn stddev_ts(&self) -> f64 {
        stddev(&self.samples_ts())
    }

    pub fn avg_ns(&self) -> f64 {
        mean(
            &self
                .samples_ns
                .iter()
                .map(|&v| v as f64)
                .collect::<Vec<_>>(),
        )
    }

    pub fn stddev_ns(&self) -> f64 {
        stddev(
            &self
                .samples_ns
                .iter()
                .map(|&v| v as f64)
                .collect::<Vec<_>>(),
        )
    }

    /// llama-bench's test name: `pp512`, `tg128`.
    pub fn test_name(&self) -> String {
        if self.n_gen == 0 {
            format!("pp{}", self.n_prompt)
        } else {
            format!("tg{}", self.n_gen)
        }
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Sample standard deviation, as llama-bench reports it.
fn stddev(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// Runs one test on the current rayon pool (call it inside `ThreadPool::install` to choose the thread count),
/// after `n_depth` untimed tokens of prompt. The session is made once, so its buffers and KV cache are not part
/// of the timing.
pub fn run_test(
    model: &Model,
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    batch: usize,
    reps: usize,
    cache: KvType,
) -> Result<BenchResult, ModelError> {
    let mut session = Session::with_cache(
        model,
        (n_depth + n_prompt + n_gen).max(1),
        batch.max(1),
        cache,
    );
    let mut depth: Vec<u32> = Vec::with_capacity(n_depth);
    let mut rng = Rng::new(0x0062_656e_6368);
    let vocab = model.config.n_vocab as u64;
    let mut tokens: Vec<u32> = Vec::with_capacity(n_prompt.max(n_gen));
    let mut one =
        |session: &mut Session, rng: &mut Rng, tokens: &mut Vec<u32>| -> Result<u64, ModelError> {
            tokens.clear();
            tokens.extend((0..n_prompt.max(n_gen)).map(|_| (rng.next_u64() % vocab) as u32));
            depth.clear();
            depth.extend((0..n_depth).map(|_| (rng.next_u64() % vocab) as u32));
            session.truncate(0);
            if n_depth > 0 {
                rayon::scope(|_| session.feed(&depth).map(|_| ()))?;
            }
            let start = Instant::now();
            // On a pool worker, as `generate` runs (its regions then go to the worker's own queue).
            rayon::scope(|_| -> Result<(), ModelError> {
                if n_prompt > 0 {
                    session.feed(&tokens[..n_prompt])?;
                }
                for &t in &tokens[..n_gen] {
                    session.feed(&[t])?;
                }
                Ok(())
            })?;
            Ok(start.elapsed().as_nanos() as u64)
        };
    one(&mut session, &mut rng, &mut tokens)?; // warm-up: page in the weights, size the thread-local buffers
    let mut samples_ns = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        samples_ns.push(one(&mut session, &mut rng, &mut tokens)?);
    }
    Ok(BenchResult {
        n_prompt,
        n_gen,
        n_parallel: 1,
        n_depth,
        n_threads: rayon::current_num_threads(),
        n_batch: batch,
        samples_ns,
    })
}

/// `n_parallel` sequences through the scheduler, as llama-batched-bench runs them: each reads its own
/// `n_prompt`-token prompt of random tokens (all prompts first, `batch` tokens per step), then all generate
/// `n_gen` tokens together (the first comes from the prompts' logits, then `n_gen` decode steps of one token per
/// sequence, no stop token). Returns the prompt and the generation results, each repeated after a warm-up.
pub fn run_parallel_test(
    model: &Model,
    n_parallel: usize,
    n_prompt: usize,
    n_gen: usize,
    batch: usize,
    reps: usize,
    cache: KvType,
) -> Result<(BenchResult, BenchResult), ModelError> {
    let b = n_parallel.max(1);
    let cfg = SchedulerConfig {
        step_tokens: batch.max(b),
        prefix_cache: false,
        decode_during_prefill: false,
        cache_type: cache,
        ..SchedulerConfig::new(b, (n_prompt + n_gen + 1).max(1))
    };
    let mut sched = Scheduler::new(model, cfg);
    let mut rng = Rng::new(0x0062_656e_6368);
    let vocab = model.config.n_vocab as u64;
    let mut events = Vec::with_capacity(4 * b);
    let mut one = |sched: &mut Scheduler| -> Result<(u64, u64), ModelError> {
        for _ in 0..b {
            let prompt: Vec<u32> = (0..n_prompt.max(1))
                .map(|_| (rng.next_u64() % vocab) as u32)
                .collect();
            let req = Request {
                prompt,
                params: SamplingParams::greedy(),
                max_tokens: n_gen + 1,
                stop: Vec::new(),
                constraint: None,
            };
            sched
                .submit(req)
                .expect("the bench's requests fit its scheduler");
        }
        rayon::scope(|_| -> Result<(u64, u64), ModelError> {
            // Prompts: until every sequence has its first token.
            let start = Instant::now();
            let mut first = 0;
            while first < b {
                events.clear();
                sched.step(&mut events)?;
                first += events
                    .iter()
                    .filter(|e| matches!(e, Event::Token { .. }))
                    .count();
            }
            let prompt_ns = start.elapsed().as_nanos() as u64;
            let start = Instant::now();
            while !sched.is_idle() {
                events.clear();
                sched.step(&mut events)?;
            }
            Ok((prompt_ns, start.elapsed().as_nanos() as u64))
        })
    };
    one(&mut sched)?; // warm-up
    let (mut pp, mut tg) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for _ in 0..reps.max(1) {
        let (p, g) = one(&mut sched)?;
        pp.push(p);
        tg.push(g);
    }
    let result = |n_prompt, n_gen, samples_ns| BenchResult {
        n_prompt,
        n_gen,
        n_parallel: b,
        n_depth: 0,
        n_threads: rayon::current_num_threads(),
        n_batch: batch,
        samples_ns,
    };
    Ok((result(n_prompt, 0, pp), result(0, n_gen, tg)))
}

/// Weight bytes one decode step reads: every attention and router matrix, the chosen experts' share of the
/// expert tensors (k of E), the dense MLP if any, and the output head. The embedding row is negligible.
pub fn weight_bytes_per_token(model: &Model) -> u64 {
    use crate::model::FeedForward;
    let w = &model.weights;
    let bytes = |m: &crate::model::Matrix| m.bytes() as u64;
    let mut total = bytes(w.output_head());
    for l in &w.layers {
        total += bytes(&l.wq) + bytes(&l.wk) + bytes(&l.wv) + bytes(&l.wo);
        match &l.ffn {
            FeedForward::Experts(e) => {
                let per_expert = |m: &crate::model::ExpertMatrices| m.expert(0).data.len() as u64;
                total += bytes(&e.router);
                total += model.config.n_expert_used as u64
                    * (per_expert(&e.gate) + per_expert(&e.up) + per_expert(&e.down));
            }
            FeedForward::Dense(d) => total += bytes(&d.gate) + bytes(&d.up) + bytes(&d.down),
        }
    }
    total
}

/// Memory read bandwidth of this machine with the current rayon pool's threads, in bytes per second: the best of
/// several passes summing a buffer far larger than any cache. It is the ceiling decode speed is measured against.
pub fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    const LEN: usize = 512 << 20;
    let words = LEN / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words / (rayon::current_num_threads() * 16).max(1);
    let mut best = f64::MAX;
    // Each way of reading, best of 5: plain loads, and loads with software prefetches far ahead (what the
    // decode kernels do; on some machines the hardware prefetchers alone leave DRAM well short of busy, and a
    // ceiling measured without them would flatter every figure set against it).
    for prefetch in [false, true] {
        for _ in 0..5 {
            let start = Instant::now();
            let sum: u64 = buf
                .par_chunks(chunk)
                .map(|c| sum_words(c, prefetch))
                .reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(sum);
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    LEN as f64 / best
}

/// The wrapping sum of `words`, read in the widest vectors the CPU has (a baseline x86-64 build's loop is SSE2,
/// whose loads cannot keep two channels of DRAM busy; on an AVX-512 VM here, 2 threads read 22.5 GB/s with it,
/// 27 with 256-bit loads, 29-30 with 512-bit ones and prefetches), optionally requesting every line 16 KiB ahead
/// into L2.
fn sum_words(words: &[u64], prefetch: bool) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was just detected.
        return unsafe { sum_words_avx512(words, prefetch) };
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe { sum_words_avx2(words, prefetch) };
    }
    let _ = prefetch;
    let acc = words.chunks_exact(8).fold([0u64; 8], |mut acc, w| {
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(w[i]);
        }
        acc
    });
    acc.iter()
        .chain(words.chunks_exact(8).remainder())
        .fold(0, |a, &b| a.wrapping_add(b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_words_avx512(words: &[u64], prefetch: bool) -> u64 {
    use std::arch::x86_64::*;
    const AHEAD: usize = 16384;
    let body = words.len() / 16 * 16;
    let mut acc = [_mm512_setzero_si512(); 2];
    let p = words.as_ptr();
    let mut i = 0;
    while i < body {
        // SAFETY: words i..i + 16 are inside `words`; a prefetch never faults (its address wraps).
        unsafe {
            if prefetch {
                _mm_prefetch::<_MM_HINT_T1>((p.add(i) as *const i8).wrapping_add(AHEAD));
                _mm_prefetch::<_MM_HINT_T1>((p.add(i) as *const i8).wrapping_add(AHEAD + 64));
            }
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm512_add_epi64(*a, _mm512_loadu_si512(p.add(i + 8 * k) as *const _));
            }
        }
        i += 16;
    }
    let lanes = _mm512_add_epi64(acc[0], acc[1]);
    words[body..]
        .iter()
        .fold(_mm512_reduce_add_epi64(lanes) as u64, |a, &b| {
            a.wrapping_add(b)
        })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(words: &[u64], prefetch: bool) -> u64 {
    use std::arch::x86_64::*;
    const AHEAD: usize = 16384;
    let body = words.len() / 16 * 16;
    let mut acc = [_mm256_setzero_si256(); 4];
    let p = words.as_ptr();
    let mut i = 0;
    while i < body {
        // SAFETY: words i..i + 16 are inside `words`; a prefetch never faults (its address wraps).
        unsafe {
            if prefetch {
                _mm_prefetch::<_MM_HINT_T1>((p.add(i) as *const i8).wrapping_add(AHEAD));
                _mm_prefetch::<_MM_HINT_T1>((p.add(i) as *const i8).wrapping_add(AHEAD + 64));
            }
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_epi64(*a, _mm256_loadu_si256(p.add(i + 4 * k) as *const __m256i));
            }
        }
        i += 16;
    }
    let mut lanes = [0u64; 16];
    for (k, a) in acc.iter().enumerate() {
        // SAFETY: 4 u64 lanes into 4 of `lanes`.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().add(4 * k) as *mut __m256i, *a) };
    }
    lanes
        .iter()
        .chain(&words[body..])
        .fold(0, |a, &b| a.wrapping_add(b))
}
