//! The inference thread: it owns the scheduler, admits requests as they arrive, steps all running sequences
//! together, and hands each request its tokens. HTTP handlers never touch the model; they talk to this thread
//! through [`Worker`] and read their tokens from a channel, so a slow or vanished client costs nothing but its
//! own sequence, which is cancelled (its KV blocks freed) as soon as its channel is seen closed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::mpsc as tokio_mpsc;

use crate::engine::Engine;
use crate::engine::scheduler::{Event, FinishReason, Request, Scheduler, SchedulerConfig, SeqId};

/// What a request receives, in order: its tokens, then one `Done` (or one `Failed`).
#[derive(Debug)]
pub enum Output {
    Token(u32),
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        reused_tokens: usize,
    },
    /// The request cannot run (its message says why): the client's error.
    Refused(String),
    /// The model failed mid-step.
    Failed(String),
}

struct Job {
    request: Request,
    out: tokio_mpsc::UnboundedSender<Output>,
}

/// Counters the HTTP side reads for `/metrics` and for admission.
#[derive(Default, Debug)]
pub struct Load {
    /// Requests sent to the thread and not yet finished (running or waiting for a slot).
    pub in_flight: AtomicUsize,
    /// Sequences holding a slot.
    pub running: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    /// Of the blocks in use, those the prefix cache holds (a running sequence may share them).
    pub kv_blocks_cached: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    /// Requests finished (whatever the reason), and their tokens.
    pub requests_total: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    /// Of those prompt tokens, the ones whose keys and values came from the prefix cache.
    pub reused_tokens_total: AtomicU64,
    pub generated_tokens_total: AtomicU64,
    /// Time spent in forward steps, in microseconds.
    pub busy_micros_total: AtomicU64,
}

/// The HTTP side's handle on the inference thread.
#[derive(Clone)]
pub struct Worker {
    jobs: mpsc::Sender<Job>,
    pub load: Arc<Load>,
}

impl Worker {
    /// Starts the thread. It runs until every `Worker` clone is dropped and its sequences have finished.
    pub fn start(engine: Arc<Engine>, cfg: SchedulerConfig) -> std::io::Result<Worker> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let load = Arc::new(Load::default());
        let thread_load = load.clone();
        std::thread::Builder::new()
            .name("quarry-inference".into())
            .spawn(move || run(&engine, cfg, rx, &thread_load))?;
        Ok(Worker { jobs, load })
    }

    /// Queues a request; its output arrives on the returned channel. Dropping the receiver cancels it.
    pub fn submit(&self, request: Request) -> tokio_mpsc::UnboundedReceiver<Output> {
        let (out, rx) = tokio_mpsc::unbounded_channel();
        self.load.in_flight.fetch_add(1, Ordering::SeqCst);
        if let Err(mpsc::SendError(job)) = self.jobs.send(Job { request, out }) {
            self.load.in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = job
                .out
                .send(Output::Failed("the inference thread has stopped".into()));
        }
        rx
    }
}

type Running = HashMap<SeqId, tokio_mpsc::UnboundedSender<Output>>;

fn run(engine: &Engine, cfg: SchedulerConfig, jobs: mpsc::Receiver<Job>, load: &Load) {
    // Regions of the forward pass start from a pool worker's own deque (see `generate`): the whole loop runs
    // inside the pool.
    rayon::scope(move |_| {
        let mut running = Running::new();
        // A panic here is a bug in Quarry, but it should cost the requests it hit, not the server: without
        // this the thread died, every later request waited for ever and the counters of the lost ones never
        // came down. The requests that were running fail with the panic's message, and the loop starts over
        // with a fresh scheduler (an empty KV pool); requests still queued are served by it.
        loop {
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                serve_jobs(engine, cfg, &jobs, load, &mut running)
            }));
            let Err(panic) = served else { return };
            let message = crate::contain::panic_message(panic.as_ref());
            eprintln!(
                "the inference thread panicked ({message}); its {} running request(s) failed and it starts over",
                running.len()
            );
            for (_, out) in running.drain() {
                let _ = out.send(Output::Failed(format!(
                    "inference failed: the inference thread panicked ({message}); the server goes on, retry the request"
                )));
                load.requests_total.fetch_add(1, Ordering::Relaxed);
                load.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    });
}

/// Set by a test to make the next forward step panic.
#[cfg(test)]
static PANIC_IN_NEXT_STEP: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

fn serve_jobs(
    engine: &Engine,
    cfg: SchedulerConfig,
    jobs: &mpsc::Receiver<Job>,
    load: &Load,
    running: &mut Running,
) {
    let mut sched = Scheduler::new(&engine.model, cfg);
    let mut events = Vec::new();
    let mut cancelled = Vec::new();
    load.kv_blocks_total
        .store(sched.total_blocks(), Ordering::Relaxed);
    let finish = |load: &Load| {
        load.in_flight.fetch_sub(1, Ordering::SeqCst);
    };
    {
        loop {
            load.running.store(sched.running(), Ordering::Relaxed);
            load.kv_blocks_used.store(
                sched.total_blocks() - sched.free_blocks(),
                Ordering::Relaxed,
            );
            load.kv_blocks_cached
                .store(sched.cached_blocks(), Ordering::Relaxed);
            // Wait for work when there is none; take whatever else has arrived without waiting.
            if sched.is_idle() {
                match jobs.recv() {
                    Ok(job) => admit(&mut sched, running, job, load, &finish),
                    Err(_) => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                admit(&mut sched, running, job, load, &finish);
            }
            // Clients that went away: their sequences stop now, not at their next token.
            let gone: Vec<SeqId> = running
                .iter()
                .filter(|(_, out)| out.is_closed())
                .map(|(&id, _)| id)
                .collect();
            for id in gone {
                cancelled.clear();
                sched.cancel(id, &mut cancelled);
                running.remove(&id);
                load.requests_total.fetch_add(1, Ordering::Relaxed);
                finish(load);
            }
            if sched.is_idle() {
                continue;
            }
            events.clear();
            #[cfg(test)]
            if PANIC_IN_NEXT_STEP.swap(false, Ordering::SeqCst) {
                panic!("a test made this step panic");
            }
            let t0 = Instant::now();
            let stepped = sched.step(&mut events);
            load.busy_micros_total
                .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            if let Err(e) = stepped {
                // The model itself failed: every running request learns why, and the thread stays up.
                for (id, out) in running.drain() {
                    cancelled.clear();
                    sched.cancel(id, &mut cancelled);
                    let _ = out.send(Output::Failed(format!("inference failed: {e}")));
                    finish(load);
                }
                continue;
            }
            for e in &events {
                match *e {
                    Event::Token { id, token } => {
                        load.generated_tokens_total.fetch_add(1, Ordering::Relaxed);
                        if let Some(out) = running.get(&id) {
                            let _ = out.send(Output::Token(token));
                        }
                    }
                    Event::Finished {
                        id,
                        reason,
                        prompt_tokens,
                        reused_tokens,
                        ..
                    } => {
                        load.requests_total.fetch_add(1, Ordering::Relaxed);
                        load.prompt_tokens_total
                            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
                        load.reused_tokens_total
                            .fetch_add(reused_tokens as u64, Ordering::Relaxed);
                        if let Some(out) = running.remove(&id) {
                            let _ = out.send(Output::Done {
                                reason,
                                prompt_tokens,
                                reused_tokens,
                            });
                            finish(load);
                        }
                    }
                }
            }
        }
    }
}

fn admit(
    sched: &mut Scheduler,
    running: &mut Running,
    job: Job,
    load: &Load,
    finish: &impl Fn(&Load),
) {
    match sched.submit(job.request) {
        Ok(id) => {
            running.insert(id, job.out);
        }
        Err(e) => {
            let _ = job.out.send(Output::Refused(e.to_string()));
            finish(load);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    fn request(max_tokens: usize) -> Request {
        Request {
            prompt: vec![1, 2, 3],
            params: SamplingParams::greedy(),
            max_tokens,
            stop: Vec::new(),
            constraint: None,
        }
    }

    /// Every output of one request, up to its last.
    fn outputs(mut rx: tokio_mpsc::UnboundedReceiver<Output>) -> Vec<Output> {
        let mut all = Vec::new();
        while let Some(out) = rx.blocking_recv() {
            let last = !matches!(out, Output::Token(_));
            all.push(out);
            if last {
                break;
            }
        }
        all
    }

    #[test]
    fn a_panicking_step_fails_its_requests_and_the_thread_serves_the_next() {
        // The tiny model the fuzz corpus keeps (tests/fixtures/granitemoe-dev-2 in Q8_0).
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/gguf/dev-2-q8_0.gguf");
        let engine = Arc::new(Engine::open(&model).unwrap());
        let worker = Worker::start(engine, SchedulerConfig::new(2, 64)).unwrap();

        let want = outputs(worker.submit(request(4)));
        assert!(matches!(want.last(), Some(Output::Done { .. })), "{want:?}");

        PANIC_IN_NEXT_STEP.store(true, Ordering::SeqCst);
        let failed = outputs(worker.submit(request(4)));
        match failed.as_slice() {
            [Output::Failed(message)] => assert!(
                message.contains("panicked (a test made this step panic)"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }

        // The thread goes on, and the same request gets the same reply as before the panic.
        let again = outputs(worker.submit(request(4)));
        assert_eq!(format!("{again:?}"), format!("{want:?}"));
        // The thread counts a request finished just after handing it its end.
        let t0 = Instant::now();
        while worker.load.in_flight.load(Ordering::SeqCst) != 0 {
            assert!(
                t0.elapsed().as_secs() < 5,
                "requests in flight: {}",
                worker.load.in_flight.load(Ordering::SeqCst)
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(worker.load.requests_total.load(Ordering::SeqCst), 3);
    }
}
