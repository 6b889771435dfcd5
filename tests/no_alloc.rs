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
use quarry::kernels;
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
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Counts one allocation (or growth) of `size` bytes while counting is on, and keeps where the first came from.
fn count(size: usize) {
    if COUNTING.load(Ordering::Relaxed) {
        let i = ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        if i < 16 {
            SIZES[i].store(size, Ordering::Relaxed);
        }
        // Captured with counting off (the capture itself allocates).
        if i == 0 && COUNTING.swap(false, Ordering::Relaxed) {
            let trace = std::backtrace::Backtrace::force_capture().to_string();
            *FIRST.lock().unwrap() = Some(trace);
            COUNTING.store(true, Ordering::Relaxed);
        }
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
/// after they have all started, steps allocate nothing, for each cache type and each kernel set (which thread
/// gets which expert's tokens changes from step to step, so every thread's kernel buffers must be sized up front).
#[test]
fn decoding_a_batch_of_eight_allocates_nothing() {
    use quarry::engine::scheduler::{Request, Scheduler, SchedulerConfig};
    use quarry::model::KvType;
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = fixture_dir("granitemoe-kquant-dev").unwrap();
    for kernel in kernel_sets() {
        for (ty, cache) in [
            ("q4_0", KvType::F16),
            ("q8_0", KvType::Q8_0),
            ("q4_k_m", KvType::F16),
            ("f32", KvType::F32),
        ] {
            let engine = engine_on(kernel, &gguf("granitemoe-kquant-dev", &dir, ty), false);
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
                // Warm-up: every prompt read, every sequence decoding.
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
                "{kernel} kernels, {ty} file, {cache} cache: 40 steps of 8 sequences"
            ));
        }
    }
}

/// Every quantized product of every kernel set, of any number of tokens (the few-token kernels, whole lane
/// vectors, several chunks of them) and rows up to the reserved width, allocates nothing on a pool thread once
/// `reserve_thread_scratch` has run: the step-to-step variation the batch test above meets by chance, met here
/// deterministically.
#[test]
fn products_allocate_nothing_after_reserving_scratch() {
    use quarry::kernels::{ProductOut, reserve_thread_scratch};
    use quarry_quantize::blocks::{BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K};
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const MAX_COLS: usize = 1024;
    const ROWS: usize = 40;
    const TOKENS: [usize; 9] = [1, 3, 8, 15, 16, 17, 100, 144, 300];
    fn zeroed<T: bytemuck::Zeroable + Clone>(n: usize) -> Vec<T> {
        vec![T::zeroed(); n]
    }
    let max_tokens = TOKENS[TOKENS.len() - 1];
    let a32: Vec<BlockQ8_0> = zeroed(max_tokens * MAX_COLS / 32);
    let ak: Vec<BlockQ8K> = zeroed(max_tokens * MAX_COLS / 256);
    let (wq8, wq4) = (
        zeroed::<BlockQ8_0>(ROWS * MAX_COLS / 32),
        zeroed::<BlockQ4_0>(ROWS * MAX_COLS / 32),
    );
    let (w4k, w5k, w6k) = (
        zeroed::<BlockQ4K>(ROWS * MAX_COLS / 256),
        zeroed::<BlockQ5K>(ROWS * MAX_COLS / 256),
        zeroed::<BlockQ6K>(ROWS * MAX_COLS / 256),
    );
    reserve_thread_scratch(MAX_COLS);
    // Each pool thread's output buffer, allocated before counting starts.
    let outs: Vec<Mutex<Vec<f32>>> = (0..rayon::current_num_threads())
        .map(|_| Mutex::new(vec![0.0; max_tokens * ROWS]))
        .collect();
    let sets = kernels::available();
    // Counting covers only the products: broadcasting itself allocates, so every thread waits at a barrier
    // while counting is switched on, and again before it is switched off.
    let barrier = std::sync::Barrier::new(rayon::current_num_threads());
    let switch = |on: bool, ctx: &rayon::BroadcastContext| {
        barrier.wait();
        if ctx.index() == 0 {
            if on {
                ALLOCATIONS.store(0, Ordering::Relaxed);
            }
            COUNTING.store(on, Ordering::Relaxed);
        }
        barrier.wait();
    };
    rayon::broadcast(|ctx| {
        let mut out = outs[ctx.index()].lock().unwrap();
        switch(true, &ctx);
        for k in &sets {
            for cols in [256, 512, MAX_COLS] {
                let (b32, bk) = (cols / 32, cols / 256);
                for rows in [1, 8, 17, ROWS] {
                    for n in TOKENS {
                        let o = &mut out[..n * rows];
                        (k.gemm_q8_0)(
                            &wq8[..rows * b32],
                            &a32[..n * b32],
                            b32,
                            ProductOut::new(o, n, rows),
                        );
                        (k.gemm_q4_0)(
                            &wq4[..rows * b32],
                            &a32[..n * b32],
                            b32,
                            ProductOut::new(o, n, rows),
                        );
                        (k.gemm_q4_k)(
                            &w4k[..rows * bk],
                            &ak[..n * bk],
                            bk,
                            ProductOut::new(o, n, rows),
                        );
                        (k.gemm_q5_k)(
                            &w5k[..rows * bk],
                            &ak[..n * bk],
                            bk,
                            ProductOut::new(o, n, rows),
                        );
                        (k.gemm_q6_k)(
                            &w6k[..rows * bk],
                            &ak[..n * bk],
                            bk,
                            ProductOut::new(o, n, rows),
                        );
                    }
                }
            }
        }
        switch(false, &ctx);
    });
    report("quantized products of every kernel set after reserve_thread_scratch");
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
