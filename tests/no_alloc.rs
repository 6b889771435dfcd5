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

#[test]
fn decoding_allocates_nothing() {
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
        let n = ALLOCATIONS.load(Ordering::Relaxed);
        let sizes: Vec<usize> = SIZES
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .take(n.min(16))
            .collect();
        assert_eq!(
            n,
            0,
            "{ty}: {n} heap allocations while generating 32 tokens (sizes {sizes:?}); the first from:\n{}",
            FIRST.lock().unwrap().take().unwrap_or_default()
        );
    }
}
