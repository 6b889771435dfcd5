//! The per-token path allocates nothing: after a warm-up, generating tokens (a chat's next turn: a cached prefix,
//! one new prompt token, then decoding) makes no heap allocation at all, counted by a global allocator wrapper
//! on every thread.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::ops::ControlFlow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use quarry::engine::Engine;
use quarry::generate::{Session, generate};
use quarry::sampling::{Sampler, SamplingParams};
use support::*;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static SIZES: [AtomicUsize; 16] = [const { AtomicUsize::new(0) }; 16];
static FIRST: Mutex<Option<String>> = Mutex::new(None);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            let i = ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            if i < 16 {
                SIZES[i].store(layout.size(), Ordering::Relaxed);
            }
            // Where the first one came from, captured with counting off (the capture itself allocates).
            if i == 0 && COUNTING.swap(false, Ordering::Relaxed) {
                let trace = std::backtrace::Backtrace::force_capture().to_string();
                *FIRST.lock().unwrap() = Some(trace);
                COUNTING.store(true, Ordering::Relaxed);
            }
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Tests in this file count every thread's allocations, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn report(what: &str) {
    let n = ALLOCATIONS.load(Ordering::Relaxed);
    let sizes: Vec<usize> = SIZES
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .take(n.min(16))
        .collect();
    assert_eq!(
        n,
        0,
        "{what}: {n} heap allocations (sizes {sizes:?}); the first from:\n{}",
        FIRST.lock().unwrap().take().unwrap_or_default()
    );
}

/// Eight sequences decoding together through the scheduler (each step one token of each, grouped per expert):
/// after they have all started, steps allocate nothing, for each cache type.
#[test]
fn decoding_a_batch_of_eight_allocates_nothing() {
    use quarry::engine::scheduler::{Request, Scheduler, SchedulerConfig};
    use quarry::model::KvType;
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = fixture_dir("granitemoe-kquant-dev").unwrap();
    for (ty, cache) in [
        ("q4_0", KvType::F16),
        ("q8_0", KvType::Q8_0),
        ("f32", KvType::F32),
    ] {
        let engine = Engine::open(&gguf("granitemoe-kquant-dev", &dir, ty)).unwrap();
        let cfg = SchedulerConfig {
            cache_type: cache,
            ..SchedulerConfig::new(8, 256)
        };
        let mut sched = Scheduler::new(&engine.model, cfg);
        for s in 0..8u32 {
            let prompt: Vec<u32> = (1..=8 + s).collect();
            let params = SamplingParams {
                seed: s as u64,
                ..SamplingParams::default()
            };
            sched
                .submit(Request {
                    prompt,
                    params,
                    max_tokens: 100,
                    stop: vec![],
                    constraint: None,
                })
                .unwrap();
        }
        let mut events = Vec::with_capacity(64);
        rayon::scope(|_| {
            // Warm-up: every prompt read, every sequence decoding, thread buffers grown.
            for _ in 0..8 {
                events.clear();
                sched.step(&mut events).unwrap();
            }
            ALLOCATIONS.store(0, Ordering::Relaxed);
            COUNTING.store(true, Ordering::Relaxed);
            for _ in 0..40 {
                events.clear();
                sched.step(&mut events).unwrap();
            }
            COUNTING.store(false, Ordering::Relaxed);
        });
        assert_eq!(sched.active(), 8, "all eight still decoding");
        report(&format!(
            "{ty} file, {cache} cache: 40 steps of 8 sequences"
        ));
    }
}

#[test]
fn decoding_allocates_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for ty in ["f32", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"] {
        let dir = fixture_dir("granitemoe-kquant-dev").unwrap();
        let engine = Engine::open(&gguf("granitemoe-kquant-dev", &dir, ty)).unwrap();
        let mut session = Session::new(&engine.model, 256, 64);
        let mut sampler = Sampler::new(SamplingParams {
            seed: 1,
            ..SamplingParams::default()
        });
        let mut generated = Vec::with_capacity(256);
        // Warm-up: worker threads' scratch buffers grow to this context once.
        let prompt: Vec<u32> = (1..=8).collect();
        generate(&mut session, &prompt, &mut sampler, 8, &[], |id| {
            generated.push(id);
            ControlFlow::Continue(())
        })
        .unwrap();
        let mut turn: Vec<u32> = session.history().to_vec();
        turn.push(*generated.last().unwrap());
        ALLOCATIONS.store(0, Ordering::Relaxed);
        COUNTING.store(true, Ordering::Relaxed);
        generate(&mut session, &turn, &mut sampler, 32, &[], |id| {
            generated.push(id);
            ControlFlow::Continue(())
        })
        .unwrap();
        COUNTING.store(false, Ordering::Relaxed);
        report(&format!("{ty}: generating 32 tokens"));
    }
}
