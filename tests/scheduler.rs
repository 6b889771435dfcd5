//! The multi-sequence scheduler: every sequence of a batch gets exactly the tokens and logits it gets alone (on
//! f32 and q8_0 files, every kernel set, prompts read in chunks beside others' decoding, sequences joining and
//! leaving mid-run, sequences preempted for lack of KV blocks), the same seed gives the same sampled tokens,
//! a cancelled sequence frees its blocks, and prefix reuse computes only the new tokens with the same results.

mod support;

use std::collections::HashMap;
use std::ops::ControlFlow;

use quarry::engine::scheduler::{
    Event, FinishReason, Request, Scheduler, SchedulerConfig, SubmitError,
};
use quarry::generate::{Session, generate};
use quarry::model::{KV_BLOCK_TOKENS, Model};
use quarry::sampling::{Sampler, SamplingParams};
use support::*;

/// What one request produced: its tokens, the bits of the logits each was sampled from, and how it ended.
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    logits: Vec<Vec<u32>>,
    finish: Option<FinishReason>,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The request alone, through `Session` and `generate` as `quarry run` runs it.
fn alone(model: &Model, req: &Request, context: usize) -> Outcome {
    let mut session = Session::new(model, context, quarry::generate::DEFAULT_BATCH);
    let mut sampler = Sampler::new(req.params.clone());
    let mut out = Outcome::default();
    // `generate` does not show the logits; replay its loop with the same calls.
    let stats = generate(
        &mut session,
        &req.prompt,
        &mut sampler,
        req.max_tokens,
        &req.stop,
        |id| {
            out.tokens.push(id);
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    // The logits of each step, recomputed one by one in a fresh session (feeding is deterministic).
    let mut replay = Session::new(model, context, quarry::generate::DEFAULT_BATCH);
    let mut l = replay.feed(&req.prompt).unwrap().to_vec();
    for (i, &t) in out.tokens.iter().enumerate() {
        out.logits.push(bits(&l));
        if i + 1 < out.tokens.len() {
            l = replay.feed(&[t]).unwrap().to_vec();
        }
    }
    out.finish = Some(match stats.stop {
        quarry::generate::StopReason::EndOfText => FinishReason::Stop,
        quarry::generate::StopReason::MaxTokens => FinishReason::Length,
        quarry::generate::StopReason::ContextFull => FinishReason::ContextFull,
        quarry::generate::StopReason::Interrupted => FinishReason::Cancelled,
    });
    out
}

/// The same unconstrained request again (a constraint is state, so requests are not `Clone`).
fn copy(r: &Request) -> Request {
    assert!(r.constraint.is_none());
    Request {
        prompt: r.prompt.clone(),
        params: r.params.clone(),
        max_tokens: r.max_tokens,
        stop: r.stop.clone(),
        constraint: None,
    }
}

/// Every request through one scheduler, submitted at the given steps (0: before the first).
fn batched(
    sched: &mut Scheduler,
    reqs: &[(usize, Request)],
) -> (Vec<Outcome>, Vec<(usize, usize)>) {
    let mut outcomes: Vec<Outcome> = (0..reqs.len()).map(|_| Outcome::default()).collect();
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut usage = vec![(0, 0); reqs.len()];
    let mut events = Vec::new();
    let mut step = 0;
    rayon::scope(|_| {
        loop {
            for (i, (at, req)) in reqs.iter().enumerate() {
                if *at == step {
                    let id = sched.submit(copy(req)).unwrap();
                    index.insert(id, i);
                }
            }
            let pending = reqs.iter().any(|(at, _)| *at > step);
            if sched.is_idle() && !pending {
                break;
            }
            events.clear();
            let mut seen = Vec::new();
            sched
                .step_observing(&mut events, |id, logits| seen.push((id, bits(logits))))
                .unwrap();
            for (id, l) in seen {
                outcomes[index[&id]].logits.push(l);
            }
            for e in &events {
                match *e {
                    Event::Token { id, token } => outcomes[index[&id]].tokens.push(token),
                    Event::Finished {
                        id,
                        reason,
                        prompt_tokens,
                        completion_tokens,
                        ..
                    } => {
                        outcomes[index[&id]].finish = Some(reason);
                        usage[index[&id]] = (prompt_tokens, completion_tokens);
                    }
                }
            }
            step += 1;
            assert!(step < 10_000, "the scheduler made no progress");
        }
    });
    (outcomes, usage)
}

fn greedy_request(prompt: &[u32], max_tokens: usize, eos: u32) -> Request {
    Request {
        prompt: prompt.to_vec(),
        params: SamplingParams::greedy(),
        max_tokens,
        stop: vec![eos],
        constraint: None,
    }
}

fn sampled_request(prompt: &[u32], max_tokens: usize, eos: u32, seed: u64) -> Request {
    Request {
        prompt: prompt.to_vec(),
        params: SamplingParams {
            seed,
            ..SamplingParams::default()
        },
        max_tokens,
        stop: vec![eos],
        constraint: None,
    }
}

/// The reference prompts (full, halves, sampled), arriving over the first steps, on a scheduler with room for
/// three at a time and a small step budget so prompts are read in chunks beside other sequences' decoding.
fn mixed_requests(model: &Model, dir: &std::path::Path, eos: u32) -> Vec<(usize, Request)> {
    let reference = reference(dir);
    let mut reqs = Vec::new();
    let vocab = model.config.n_vocab as u32;
    for (i, (_, ids, _, greedy)) in prompts(&reference).into_iter().enumerate() {
        reqs.push((0, greedy_request(&ids, greedy.len().max(1), eos)));
        let half = &ids[..(ids.len() / 2).max(1)];
        reqs.push((i + 1, greedy_request(half, 5 + half.len() % 7, eos)));
        reqs.push((
            2 * i + 3,
            sampled_request(&ids, 12, eos, 7 + ids.len() as u64),
        ));
    }
    // A longer prompt (several chunks) arriving late, and one that reaches the context limit.
    let long: Vec<u32> = (0..150).map(|i| (i * 7919 + 13) % vocab).collect();
    reqs.push((4, greedy_request(&long, 6, eos)));
    reqs.push((1, greedy_request(&long[..40], 1000, eos)));
    reqs
}

#[test]
fn each_sequence_of_a_batch_gets_exactly_what_it_gets_alone() {
    let context = 400;
    let mut cases = 0;
    for (name, dir) in all_fixtures() {
        for ty in ["f32", "q8_0"] {
            let file = gguf(&name, &dir, ty);
            for set in kernel_sets() {
                let engine = engine_on(set, &file, true);
                let model = &engine.model;
                let eos = engine.tokenizer().eos_id();
                let reqs = mixed_requests(model, &dir, eos);
                let cfg = SchedulerConfig {
                    step_tokens: 16,
                    ..SchedulerConfig::new(3, context)
                };
                let mut sched = Scheduler::new(model, cfg);
                let (got, usage) = batched(&mut sched, &reqs);
                for (i, (_, req)) in reqs.iter().enumerate() {
                    let want = alone(model, req, context);
                    assert_eq!(
                        got[i].tokens, want.tokens,
                        "{name} {ty} {set}: request {i} tokens"
                    );
                    assert_eq!(got[i].logits.len(), want.logits.len());
                    if let Some(k) =
                        (0..want.logits.len()).find(|&k| got[i].logits[k] != want.logits[k])
                    {
                        panic!("{name} {ty} {set}: request {i}: the logits of step {k} differ");
                    }
                    assert_eq!(got[i].finish, want.finish, "{name} {ty} {set}: request {i}");
                    assert_eq!(usage[i], (req.prompt.len(), want.tokens.len()));
                    cases += 1;
                }
                // Once all have ended, every block is free or held by the prefix cache.
                assert_eq!(
                    sched.free_blocks() + sched.cached_blocks(),
                    sched.total_blocks()
                );
            }
        }
    }
    eprintln!("{cases} requests equal alone");
}

#[test]
fn a_small_pool_preempts_and_recomputes_with_the_same_results() {
    let (name, dir) = all_fixtures().into_iter().next().unwrap();
    let file = gguf(&name, &dir, "q8_0");
    let set = kernel_sets().pop().unwrap();
    let engine = engine_on(set, &file, true);
    let model = &engine.model;
    let eos = engine.tokenizer().eos_id();
    let vocab = model.config.n_vocab as u32;
    // Four sequences of 60-token prompts generating 100 tokens each: 3 blocks each at the end, in a pool of 6.
    let reqs: Vec<(usize, Request)> = (0..4)
        .map(|s| {
            let p: Vec<u32> = (0..60).map(|i| (i * 31 + s * 101 + 5) % vocab).collect();
            (0, sampled_request(&p, 100, u32::MAX, s as u64 + 1))
        })
        .collect();
    let cfg = SchedulerConfig {
        pool_tokens: 6 * KV_BLOCK_TOKENS,
        prefix_cache: false,
        ..SchedulerConfig::new(4, 256)
    };
    let mut sched = Scheduler::new(model, cfg);
    let (got, _) = batched(&mut sched, &reqs);
    assert!(
        sched.stats().preemptions > 0,
        "the pool was meant to run out"
    );
    for (i, (_, req)) in reqs.iter().enumerate() {
        let want = alone(model, req, 256);
        assert_eq!(got[i].tokens, want.tokens, "request {i}");
        assert!(got[i].logits == want.logits, "request {i} logits");
    }
    assert_eq!(sched.free_blocks(), sched.total_blocks());
    let _ = eos;
}

#[test]
fn a_cancelled_sequence_frees_its_blocks() {
    let (name, dir) = all_fixtures().into_iter().next().unwrap();
    let file = gguf(&name, &dir, "q8_0");
    let engine = engine_on(kernel_sets().pop().unwrap(), &file, true);
    let model = &engine.model;
    let vocab = model.config.n_vocab as u32;
    let prompt: Vec<u32> = (0..100).map(|i| (i * 17 + 3) % vocab).collect();
    let cfg = SchedulerConfig {
        prefix_cache: false,
        ..SchedulerConfig::new(2, 512)
    };
    let mut sched = Scheduler::new(model, cfg);
    let total = sched.total_blocks();
    let a = sched
        .submit(sampled_request(&prompt, 1000, u32::MAX, 3))
        .unwrap();
    let b = sched
        .submit(sampled_request(&prompt[..10], 1000, u32::MAX, 4))
        .unwrap();
    let mut events = Vec::new();
    rayon::scope(|_| {
        for _ in 0..5 {
            sched.step(&mut events).unwrap();
        }
    });
    assert!(sched.free_blocks() < total - 1);
    events.clear();
    sched.cancel(a, &mut events);
    assert!(matches!(
        events[..],
        [Event::Finished { id, reason: FinishReason::Cancelled, .. }] if id == a
    ));
    assert_eq!(sched.free_blocks(), total - 1, "only b's one block is held");
    sched.cancel(b, &mut events);
    assert_eq!(sched.free_blocks(), total);
    assert!(sched.is_idle());
    // A waiting request can be cancelled too, and an unknown id is ignored.
    let c = sched.submit(greedy_request(&prompt, 4, 0)).unwrap();
    sched.cancel(c, &mut events);
    sched.cancel(12345, &mut events);
    assert!(sched.is_idle());
}

#[test]
fn prefix_reuse_computes_only_the_new_tokens_and_gives_the_same_results() {
    let (name, dir) = all_fixtures().into_iter().next().unwrap();
    let file = gguf(&name, &dir, "f32");
    let engine = engine_on(kernel_sets().pop().unwrap(), &file, true);
    let model = &engine.model;
    let eos = engine.tokenizer().eos_id();
    let vocab = model.config.n_vocab as u32;
    // A conversation: turn 1's prompt and reply, then turn 2 resending both with a new message.
    let turn1: Vec<u32> = (0..150).map(|i| (i * 37 + 11) % vocab).collect();
    let mut sched = Scheduler::new(model, SchedulerConfig::new(2, 512));
    let (first, _) = batched(&mut sched, &[(0, greedy_request(&turn1, 20, u32::MAX))]);
    let mut turn2 = turn1.clone();
    turn2.extend_from_slice(&first[0].tokens);
    turn2.extend((0..30).map(|i| (i * 13 + 1) % vocab));
    let before = sched.stats();
    let req = greedy_request(&turn2, 8, eos);
    let (second, _) = batched(&mut sched, &[(0, copy(&req))]);
    let after = sched.stats();
    // turn 1 held 150 + 19 positions: two whole blocks (128 positions) are reused.
    let reused = (after.reused_tokens - before.reused_tokens) as usize;
    assert_eq!(reused, 2 * KV_BLOCK_TOKENS);
    let computed = (after.computed_tokens - before.computed_tokens) as usize;
    let generated = second[0].tokens.len();
    assert_eq!(computed, turn2.len() - reused + generated - 1);
    let want = alone(model, &req, 512);
    assert_eq!(second[0].tokens, want.tokens);
    assert!(second[0].logits == want.logits, "logits after prefix reuse");
}

#[test]
fn requests_that_cannot_run_are_refused_at_submit() {
    let (name, dir) = all_fixtures().into_iter().next().unwrap();
    let file = gguf(&name, &dir, "q8_0");
    let engine = engine_on(kernel_sets().pop().unwrap(), &file, true);
    let model = &engine.model;
    let cfg = SchedulerConfig {
        pool_tokens: KV_BLOCK_TOKENS,
        ..SchedulerConfig::new(2, 100)
    };
    let mut sched = Scheduler::new(model, cfg);
    let long = vec![1u32; 101];
    assert!(matches!(
        sched.submit(greedy_request(&long, 1, 0)),
        Err(SubmitError::PromptTooLong {
            prompt: 101,
            context: 100
        })
    ));
    assert!(matches!(
        sched.submit(greedy_request(&long[..80], 1, 0)),
        Err(SubmitError::PoolTooSmall { .. })
    ));
    assert_eq!(
        sched.submit(greedy_request(&[], 1, 0)),
        Err(SubmitError::EmptyPrompt)
    );
    let bad = model.config.n_vocab as u32;
    assert!(matches!(
        sched.submit(greedy_request(&[bad], 1, 0)),
        Err(SubmitError::TokenOutOfRange { .. })
    ));
    assert!(sched.is_idle());
}

/// Allows only ids that are multiples of `step` (and the end-of-text id 0), records what it is shown, and
/// fails once it has been shown `fail_after` tokens.
struct EveryNth {
    step: u32,
    fail_after: usize,
    shown: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
}

impl quarry::sampling::TokenConstraint for EveryNth {
    fn accept(&mut self, token: u32) -> Result<(), String> {
        let mut shown = self.shown.lock().unwrap();
        shown.push(token);
        if shown.len() >= self.fail_after {
            return Err("enough".into());
        }
        Ok(())
    }

    fn allowed(&mut self, allowed: &mut [u32]) -> Result<(), String> {
        allowed.fill(0);
        for id in (0..allowed.len() as u32 * 32).step_by(self.step as usize) {
            allowed[id as usize / 32] |= 1 << (id % 32);
        }
        Ok(())
    }
}

/// Runs `reqs` together to the end; per request its tokens and how it ended.
fn run_owned(sched: &mut Scheduler, reqs: Vec<Request>) -> Vec<(Vec<u32>, FinishReason)> {
    let mut out = vec![(Vec::new(), FinishReason::Cancelled); reqs.len()];
    let ids: Vec<u64> = reqs.into_iter().map(|r| sched.submit(r).unwrap()).collect();
    let mut events = Vec::new();
    rayon::scope(|_| {
        while !sched.is_idle() {
            events.clear();
            sched.step(&mut events).unwrap();
            for e in &events {
                match *e {
                    Event::Token { id, token } => out[ids.iter().position(|&i| i == id).unwrap()]
                        .0
                        .push(token),
                    Event::Finished { id, reason, .. } => {
                        out[ids.iter().position(|&i| i == id).unwrap()].1 = reason
                    }
                }
            }
        }
    });
    out
}

#[test]
fn a_constrained_sequence_samples_only_allowed_tokens_alone_or_batched() {
    let (name, dir) = all_fixtures().remove(0);
    let file = gguf(&name, &dir, "q8_0");
    let engine = engine_on(kernel_sets()[0], &file, true);
    let model = &engine.model;
    let vocab = model.config.n_vocab as u32;
    let prompt: Vec<u32> = (0..40).map(|i| (i * 31 + 7) % vocab).collect();
    let other: Vec<u32> = (0..25).map(|i| (i * 17 + 3) % vocab).collect();
    let constrained = |fail_after: usize, seed: u64| {
        let shown = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut req = sampled_request(&prompt, 24, u32::MAX, seed);
        req.constraint = Some(Box::new(EveryNth {
            step: 3,
            fail_after,
            shown: shown.clone(),
        }));
        (req, shown)
    };
    let cfg = || SchedulerConfig {
        step_tokens: 16,
        ..SchedulerConfig::new(3, 256)
    };

    let (req, shown) = constrained(usize::MAX, 5);
    let solo = run_owned(&mut Scheduler::new(model, cfg()), vec![req]);
    assert_eq!(solo[0].1, FinishReason::Length);
    assert_eq!(solo[0].0.len(), 24);
    assert!(solo[0].0.iter().all(|t| t % 3 == 0), "{:?}", solo[0].0);
    // The rule saw every token but the last (nothing is sampled after it).
    assert_eq!(*shown.lock().unwrap(), solo[0].0[..23]);

    // Beside unconstrained sequences: the same tokens, and theirs the same as alone.
    let free_alone = run_owned(
        &mut Scheduler::new(model, cfg()),
        vec![sampled_request(&other, 30, u32::MAX, 9)],
    );
    let (req, _) = constrained(usize::MAX, 5);
    let (failing, _) = constrained(4, 5);
    let together = run_owned(
        &mut Scheduler::new(model, cfg()),
        vec![sampled_request(&other, 30, u32::MAX, 9), req, failing],
    );
    assert_eq!(together[0], free_alone[0]);
    assert_eq!(together[1], solo[0]);
    // A rule that fails ends its own sequence, after the tokens it accepted, and no other.
    assert_eq!(together[2].1, FinishReason::ConstraintFailed);
    assert_eq!(together[2].0, solo[0].0[..4]);
}

/// The default pool holds every sequence at its full context at once, whatever the context's size: a context
/// that is not a whole number of blocks (81 positions: two blocks each) used to give a pool that rounded down
/// per sequence, so eight sequences reaching their limit preempted and recomputed each other.
#[test]
fn the_default_pool_holds_every_sequence_at_its_full_context() {
    let (name, dir) = all_fixtures().into_iter().next().unwrap();
    let file = gguf(&name, &dir, "q8_0");
    let engine = engine_on(kernel_sets().pop().unwrap(), &file, true);
    let model = &engine.model;
    let vocab = model.config.n_vocab as u32;
    let context = 81;
    let cfg = SchedulerConfig {
        prefix_cache: false,
        ..SchedulerConfig::new(8, context)
    };
    let mut sched = Scheduler::new(model, cfg);
    let reqs: Vec<Request> = (0..8u32)
        .map(|s| {
            let prompt: Vec<u32> = (0..16).map(|i| (i * 31 + s * 7 + 1) % vocab).collect();
            sampled_request(&prompt, context - 16, u32::MAX, s as u64)
        })
        .collect();
    let out = run_owned(&mut sched, reqs);
    for (tokens, reason) in &out {
        assert_eq!(tokens.len(), context - 16);
        assert_eq!(*reason, FinishReason::Length);
    }
    assert_eq!(sched.stats().preemptions, 0, "{:?}", sched.stats());
}
