//! Throughput measurement in llama-bench's terms: `pp` processes a prompt of random tokens from an empty cache,
//! `tg` generates one token at a time from an empty cache; each repeated, after one unmeasured warm-up run.

use std::time::Instant;

use crate::generate::Session;
use crate::model::{Model, ModelError};
use crate::sampling::Rng;

/// One test: a prompt-processing (`n_gen == 0`) or a generation (`n_prompt == 0`) run, repeated.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub n_prompt: usize,
    pub n_gen: usize,
    pub n_threads: usize,
    pub n_batch: usize,
    /// Wall time of each repetition, in nanoseconds.
    pub samples_ns: Vec<u64>,
}

impl BenchResult {
    /// Tokens per second of each repetition.
    pub fn samples_ts(&self) -> Vec<f64> {
        let n = (self.n_prompt + self.n_gen) as f64;
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

/// Runs one test on the current rayon pool (call it inside `ThreadPool::install` to choose the thread count).
/// The session is made once, so its buffers and KV cache are not part of the timing.
pub fn run_test(
    model: &Model,
    n_prompt: usize,
    n_gen: usize,
    batch: usize,
    reps: usize,
) -> Result<BenchResult, ModelError> {
    let mut session = Session::new(model, (n_prompt + n_gen).max(1), batch.max(1));
    let mut rng = Rng::new(0x0062_656e_6368);
    let vocab = model.config.n_vocab as u64;
    let mut tokens: Vec<u32> = Vec::with_capacity(n_prompt.max(n_gen));
    let one =
        |session: &mut Session, rng: &mut Rng, tokens: &mut Vec<u32>| -> Result<u64, ModelError> {
            tokens.clear();
            tokens.extend((0..n_prompt.max(n_gen)).map(|_| (rng.next_u64() % vocab) as u32));
            session.truncate(0);
            let start = Instant::now();
            if n_prompt > 0 {
                session.feed(&tokens[..n_prompt])?;
            }
            for &t in &tokens[..n_gen] {
                session.feed(&[t])?;
            }
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
        n_threads: rayon::current_num_threads(),
        n_batch: batch,
        samples_ns,
    })
}
