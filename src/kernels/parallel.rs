//! Parallel regions. A decode step multiplies ~700 small matrices; paying a fork/join for each would cost more
//! than the products, so the forward pass groups them: one region for Q, K and V, one for attention, one for all
//! chosen experts' gate and up projections, one for their down projections, one for the output projection.
//! Each region is a flat list of work items (a share of one matrix's rows), run by [`parallel_items`] on a small
//! pool of its own: a decode step runs ~120 regions in ~10 ms, and rayon's wake-ups (its idle workers yield
//! through the scheduler and then sleep) cost a few percent there, while these workers spin on one atomic
//! between regions and only sleep after a millisecond without work.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{ActivationRows, Kernels, WeightRows, gemm_rows};

/// How long an idle worker spins before it sleeps: longer than any gap between two regions of a forward pass,
/// short enough that an idle chat costs no CPU.
const SPIN: Duration = Duration::from_millis(2);

/// The work of the current region, type-erased: `call(data, item)` runs item `item` of the caller's closure.
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize),
    n_items: usize,
}

/// The region state in one word, so that joining a region and closing it cannot race: the region's number
/// (bits 33 and up), a closed flag (bit 32), and how many workers are inside it (bits 0..32).
const CLOSED: u64 = 1 << 32;
const ACTIVE: u64 = CLOSED - 1;
const GEN_SHIFT: u32 = 33;

struct Shared {
    state: AtomicU64,
    job: Mutex<Option<Job>>,
    next_item: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: the raw `data` pointer in `Job` is only dereferenced by threads that joined the region that published
// it, and that region does not end (so the closure it points to stays alive) until every joined thread has left.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

thread_local! {
    /// Set on pool workers, and on a caller while its region runs: a region started from inside a region runs
    /// inline (the pool is busy with the outer one).
    static IN_REGION: Cell<bool> = const { Cell::new(false) };
}

fn pool_slot() -> &'static Mutex<Option<Pool>> {
    static POOL: OnceLock<Mutex<Option<Pool>>> = OnceLock::new();
    POOL.get_or_init(|| Mutex::new(None))
}

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Threads the forward pass uses (the calling thread included): [`set_threads`], else every core.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Sizes the pool: `n` threads in all, the caller included (so `n - 1` workers). Cheap when unchanged.
pub fn set_threads(n: usize) {
    let n = n.max(1);
    let mut slot = pool_slot().lock().unwrap_or_else(|p| p.into_inner());
    THREADS.store(n, Ordering::Relaxed);
    if slot.as_ref().is_some_and(|p| p.workers.len() == n - 1) {
        return;
    }
    if let Some(old) = slot.take() {
        old.shared.stop.store(true, Ordering::Release);
        {
            let _g = old.shared.sleep.lock().unwrap_or_else(|p| p.into_inner());
            old.shared.wake.notify_all();
        }
        for w in old.workers {
            let _ = w.join();
        }
    }
    let shared = Arc::new(Shared {
        // Region 0 is closed and empty.
        state: AtomicU64::new(CLOSED),
        job: Mutex::new(None),
        next_item: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        sleep: Mutex::new(()),
        wake: Condvar::new(),
    });
    let workers = (1..n)
        .map(|i| {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("quarry-worker-{i}"))
                .spawn(move || worker(&s))
                .expect("spawning a worker thread")
        })
        .collect();
    *slot = Some(Pool { shared, workers });
}

/// A worker joins each open region it sees (a region closes once its items are all claimed, so a worker that
/// was descheduled simply misses it), runs items until none are left, and leaves.
fn worker(s: &Shared) {
    IN_REGION.with(|w| w.set(true));
    let mut seen = 0u64;
    let mut idle_since = Instant::now();
    loop {
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        let state = s.state.load(Ordering::Acquire);
        let generation = state >> GEN_SHIFT;
        if generation != seen {
            if state & CLOSED != 0 {
                seen = generation;
                continue;
            }
            if s.state
                .compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            seen = generation;
            let job = *s.job.lock().unwrap_or_else(|p| p.into_inner());
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if let Some(job) = job {
                    claim_items(s, job)
                }
            }));
            if result.is_err() {
                s.panicked.store(true, Ordering::Release);
            }
            s.state.fetch_sub(1, Ordering::AcqRel);
            idle_since = Instant::now();
            continue;
        }
        if idle_since.elapsed() < SPIN {
            std::hint::spin_loop();
            continue;
        }
        let guard = s.sleep.lock().unwrap_or_else(|p| p.into_inner());
        if s.state.load(Ordering::Acquire) >> GEN_SHIFT == seen && !s.stop.load(Ordering::Acquire) {
            let _ = s.wake.wait_timeout(guard, Duration::from_millis(100));
        }
    }
}

fn claim_items(s: &Shared, job: Job) {
    loop {
        let i = s.next_item.fetch_add(1, Ordering::Relaxed);
        if i >= job.n_items {
            return;
        }
        // SAFETY: the caller joined the region that published `job`, which is still running (see `Shared`).
        unsafe { (job.call)(job.data, i) };
    }
}

/// Runs `work(i)` for every `i` in `0..n_items` as one region on the pool (inline with one thread, one item, or
/// when called from inside a region). The calling thread works too, so a region never waits for a worker
/// that is not running.
pub fn parallel_items<F: Fn(usize) + Sync + Send>(n_items: usize, work: F) {
    if n_items <= 1 || threads() == 1 || IN_REGION.with(|w| w.get()) {
        (0..n_items).for_each(work);
        return;
    }
    let mut slot = pool_slot().lock().unwrap_or_else(|p| p.into_inner());
    if slot
        .as_ref()
        .is_none_or(|p| p.workers.len() + 1 != threads())
    {
        drop(slot);
        set_threads(threads());
        slot = pool_slot().lock().unwrap_or_else(|p| p.into_inner());
    }
    let pool = slot.as_ref().expect("set_threads made the pool");
    let s = &*pool.shared;

    unsafe fn call<F: Fn(usize)>(data: *const (), i: usize) {
        // SAFETY: `data` is the `&F` published below, alive until the region ends.
        unsafe { (*(data as *const F))(i) }
    }
    let job = Job {
        data: &work as *const F as *const (),
        call: call::<F>,
        n_items,
    };
    *s.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(job);
    s.next_item.store(0, Ordering::Relaxed);
    // Open the next region (the previous one is closed and empty).
    let generation = (s.state.load(Ordering::Acquire) >> GEN_SHIFT) + 1;
    s.state.store(generation << GEN_SHIFT, Ordering::Release);
    {
        // Wake sleepers; spinning workers see the new region without this.
        let _g = s.sleep.lock().unwrap_or_else(|p| p.into_inner());
        s.wake.notify_all();
    }
    IN_REGION.with(|w| w.set(true));
    let own = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| claim_items(s, job)));
    IN_REGION.with(|w| w.set(false));
    // Every item is claimed: close the region to latecomers, then wait for the workers inside to finish theirs.
    s.state.fetch_or(CLOSED, Ordering::AcqRel);
    let mut spins = 0u32;
    while s.state.load(Ordering::Acquire) & ACTIVE != 0 {
        spins += 1;
        if spins < 1 << 14 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    *s.job.lock().unwrap_or_else(|p| p.into_inner()) = None;
    if own.is_err() || s.panicked.swap(false, Ordering::AcqRel) {
        panic!("a parallel work item panicked");
    }
}

/// Rows per work item for a matrix of `rows` rows: enough items that both threads stay busy to the end, few
/// enough that each is worth scheduling; a multiple of 16 so the kernels' row tiles stay whole.
pub fn rows_per_item(rows: usize, tokens: usize) -> usize {
    let threads = threads();
    // Aim at ~8 items per thread for one token; fewer, larger ones when many tokens make each row costly.
    let target_items = if tokens > 8 { threads * 4 } else { threads * 8 };
    rows.div_ceil(target_items).next_multiple_of(16).max(16)
}

/// A buffer that the items of one region write into, each its own disjoint range.
pub struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: `SharedOut` only hands out ranges through the unsafe `range_mut`, whose callers guarantee that no two
// live ranges overlap; with that, concurrent use from several threads is like holding disjoint `&mut` slices.
unsafe impl Send for SharedOut<'_> {}
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub fn new(buf: &'a mut [f32]) -> SharedOut<'a> {
        SharedOut {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _borrow: PhantomData,
        }
    }

    /// # Safety
    /// No other live slice obtained from this `SharedOut` may overlap `start..start + len`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range_mut(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(
            start + len <= self.len,
            "range {start}+{len} outside a buffer of {}",
            self.len
        );
        // SAFETY: in bounds (checked above) and not aliased (the caller's promise).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// One matrix product of a region. Each work item (a share of `rows_per_item(rows, n)` rows starting at `r0`)
/// writes its part token-major, `[n][share rows]`, at `out[r0 * n..]`; `scatter_token_major` assembles them.
pub struct GemmJob<'a> {
    pub w: WeightRows<'a>,
    pub acts: ActivationRows<'a>,
    pub out: SharedOut<'a>,
}

/// Runs several products as one region, each split into row shares.
pub fn parallel_gemm(k: &Kernels, jobs: &[GemmJob]) {
    let chunk = |j: &GemmJob| rows_per_item(j.w.rows, j.acts.n);
    let n_items: usize = jobs.iter().map(|j| j.w.rows.div_ceil(chunk(j))).sum();
    parallel_items(n_items, |mut item| {
        for job in jobs {
            let c = chunk(job);
            let items = job.w.rows.div_ceil(c);
            if item < items {
                let r0 = item * c;
                let rows = c.min(job.w.rows - r0);
                let n = job.acts.n;
                // SAFETY: item `item` of this job owns rows r0..r0+rows, i.e. out[r0*n..(r0+rows)*n]; items
                // partition the rows, so no two items write the same range.
                let out = unsafe { job.out.range_mut(r0 * n, rows * n) };
                gemm_rows(k, &job.w.sub_rows(r0, rows), job.acts, out, rows);
                return;
            }
            item -= items;
        }
    });
}

/// Assembles a product of `rows` rows and `n` tokens that was computed in row shares of `chunk` rows (the last
/// one shorter), share after share in `src`, each share token-major (`[n][share rows]` at `src[r0 * n..]`),
/// into token-major `dst[t * stride + r]`: one contiguous copy per share and token.
pub fn scatter_token_major(
    src: &[f32],
    rows: usize,
    n: usize,
    chunk: usize,
    dst: &mut [f32],
    stride: usize,
) {
    if n == 1 {
        dst[..rows].copy_from_slice(&src[..rows]);
        return;
    }
    for r0 in (0..rows).step_by(chunk) {
        let len = chunk.min(rows - r0);
        let share = &src[r0 * n..(r0 + len) * n];
        for (t, part) in share.chunks_exact(len).enumerate() {
            dst[t * stride + r0..t * stride + r0 + len].copy_from_slice(part);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every item of every region runs exactly once, whatever the thread count, across many short regions
    /// (the decode pattern) and with nested regions running inline.
    #[test]
    fn every_item_runs_once() {
        for threads in [1, 2, 3, 4] {
            set_threads(threads);
            for n in [0usize, 1, 2, 3, 17, 1000] {
                for _ in 0..200 {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    parallel_items(n, |i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                        parallel_items(2, |_| {});
                    });
                    assert!(
                        hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                        "{threads} threads, {n} items"
                    );
                }
            }
        }
    }

    #[test]
    fn a_panicking_item_panics_the_caller_and_the_pool_survives() {
        set_threads(2);
        let r = std::panic::catch_unwind(|| parallel_items(64, |i| assert!(i != 40, "item 40")));
        assert!(r.is_err());
        let sum = AtomicUsize::new(0);
        parallel_items(100, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }
}
