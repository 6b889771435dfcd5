//! What a quantization costs, in numbers: perplexity over a text and, against a base model (F16, say), the KL
//! divergence of the next-token distributions, as llama.cpp's `llama-perplexity` (and its `--kl-divergence`)
//! measures them, so that Quarry's figures can be set beside published llama.cpp ones.
//!
//! The method is llama-perplexity's: the tokens are cut into chunks of `ctx` tokens (a tail shorter than a chunk
//! is left out); each chunk is evaluated from an empty cache; the first half of a chunk is only context, and each
//! position of the second half predicts the next token, so every scored token was predicted with at least
//! `ctx / 2` tokens of context (a chunk of `ctx` scores `ctx - 1 - ctx / 2` tokens). Like llama-perplexity, at
//! least two chunks are required: fewer is an error, not a partial chunk, so that a figure always comes from
//! whole chunks of the stated size and can be compared with others of that size.
//!
//! Where Quarry differs from llama.cpp, it is to be exact: llama.cpp stores the base model's log-probabilities
//! as 16-bit integers and leaves out of the KL sum every token whose base probability is below e^-16; here both
//! models run side by side, chunk by chunk, and the KL sum is taken over the whole vocabulary in f64. Only one
//! chunk's logits (the scored half) of each model are in memory at a time.

use rayon::prelude::*;
use serde::Serialize;

use crate::generate::Session;
use crate::model::ModelError;
use crate::text::tokenizer::Tokenizer;

/// llama-perplexity's default chunk length.
pub const DEFAULT_CTX: usize = 512;
/// The shortest chunk that scores a token: half of it is context, and the last token is only a target.
pub const MIN_CTX: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error(
        "the text has {tokens} tokens, but perplexity over chunks of {ctx} tokens needs at least {needed} (two \
         chunks, as llama-perplexity requires): give a longer text{}",
        if *tokens >= 2 * MIN_CTX { format!(" or a context of at most {}", tokens / 2) } else { String::new() }
    )]
    TooFewTokens {
        tokens: usize,
        ctx: usize,
        needed: usize,
    },
    #[error(
        "a context of {ctx} tokens is too short: the first half of each chunk is context and at least one token \
         must be scored, so it must be at least {MIN_CTX}"
    )]
    ContextTooShort { ctx: usize },
    #[error("a context of {ctx} tokens does not fit: the {which} holds at most {capacity}")]
    ContextTooLong {
        ctx: usize,
        which: &'static str,
        capacity: usize,
    },
    #[error("the base model cannot be compared with this one: {0}")]
    VocabularyMismatch(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A measured value and its standard error, as llama-perplexity prints them (`value ± uncertainty`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    pub uncertainty: f64,
}

/// The figures so far: after each chunk (for progress) and at the end.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Tokens per chunk.
    pub ctx: usize,
    /// Chunks evaluated so far, and in all.
    pub chunks: usize,
    pub chunks_total: usize,
    /// Tokens given (those after the last whole chunk are not evaluated).
    pub tokens: usize,
    /// Predictions scored so far.
    pub scored: usize,
    /// exp of the mean negative log-likelihood of the scored tokens.
    pub perplexity: Estimate,
    /// Present when a base model was given.
    pub divergence: Option<Divergence>,
}

/// How far the model's next-token distributions are from the base model's, over the same scored positions.
#[derive(Clone, Debug, Serialize)]
pub struct Divergence {
    /// The base model's own perplexity on the same tokens.
    pub base_perplexity: Estimate,
    /// ln(PPL / PPL(base)): its uncertainty accounts for the two being measured on the same tokens.
    pub ln_perplexity_ratio: Estimate,
    /// KL(base || model) in nats, per position: mean, median, 99th percentile and maximum.
    pub kl_mean: Estimate,
    pub kl_median: f64,
    pub kl_p99: f64,
    pub kl_max: f64,
    /// Root mean square over positions of p(next token) minus the base's p(next token); a fraction (0.01 = 1 %).
    pub delta_p_rms: Estimate,
    /// Share of positions whose most likely token is the base's most likely token ("same top p").
    pub same_top: Estimate,
}

/// The chunking of `n_tokens` tokens into chunks of `ctx`: how many whole chunks are evaluated.
pub fn chunk_count(n_tokens: usize, ctx: usize) -> Result<usize, PerplexityError> {
    if ctx < MIN_CTX {
        return Err(PerplexityError::ContextTooShort { ctx });
    }
    let chunks = n_tokens / ctx;
    if chunks < 2 {
        return Err(PerplexityError::TooFewTokens {
            tokens: n_tokens,
            ctx,
            needed: 2 * ctx,
        });
    }
    Ok(chunks)
}

/// Checks that `base` tokenizes exactly as `model` does (same ids for the same strings), without which comparing
/// their distributions position by position means nothing.
pub fn check_same_vocabulary(model: &Tokenizer, base: &Tokenizer) -> Result<(), PerplexityError> {
    if model.vocab_size() != base.vocab_size() {
        return Err(PerplexityError::VocabularyMismatch(format!(
            "{} has {} tokens and {} has {}",
            model.origin(),
            model.vocab_size(),
            base.origin(),
            base.vocab_size()
        )));
    }
    for id in 0..model.vocab_size() as u32 {
        let (a, b) = (model.id_to_token(id), base.id_to_token(id));
        if a != b || model.is_special(id) != base.is_special(id) {
            return Err(PerplexityError::VocabularyMismatch(format!(
                "token {id} is {a:?} in {} but {b:?} in {}",
                model.origin(),
                base.origin()
            )));
        }
    }
    Ok(())
}

/// Perplexity of `model` over `tokens` in chunks of `ctx` and, with `base`, the divergence from the base model
/// on the same chunks. Both sessions are emptied before each chunk and must hold `ctx` tokens. `on_chunk` sees
/// the figures after every chunk (for progress output).
pub fn evaluate(
    model: &mut Session,
    mut base: Option<&mut Session>,
    tokens: &[u32],
    ctx: usize,
    mut on_chunk: impl FnMut(&Report),
) -> Result<Report, PerplexityError> {
    let chunks_total = chunk_count(tokens.len(), ctx)?;
    let n_vocab = model.model().config.n_vocab;
    let mut sessions: Vec<(&'static str, &Session)> = vec![("model's context", &*model)];
    if let Some(base) = base.as_deref() {
        let base_vocab = base.model().config.n_vocab;
        if base_vocab != n_vocab {
            return Err(PerplexityError::VocabularyMismatch(format!(
                "the model has {n_vocab} output logits and the base model {base_vocab}"
            )));
        }
        sessions.push(("base model's context", base));
    }
    for (which, session) in sessions {
        if session.context_size() < ctx {
            return Err(PerplexityError::ContextTooLong {
                ctx,
                which,
                capacity: session.context_size(),
            });
        }
    }

    let mut sums = Sums::new(base.is_some());
    let first = ctx / 2;
    for (done, chunk) in tokens.chunks_exact(ctx).take(chunks_total).enumerate() {
        let logits = scored_logits(model, chunk, first)?;
        let base_logits = match base.as_deref_mut() {
            Some(base) => Some(scored_logits(base, chunk, first)?),
            None => None,
        };
        let targets = &chunk[first + 1..];
        let positions: Vec<Position> = (0..targets.len())
            .into_par_iter()
            .map(|i| {
                let rows = i * n_vocab..(i + 1) * n_vocab;
                Position::score(
                    &logits[rows.clone()],
                    base_logits.as_ref().map(|b| &b[rows]),
                    targets[i] as usize,
                )
            })
            .collect();
        // Added in position order, so the sums do not depend on how the work was split between threads.
        for p in &positions {
            sums.add(p);
        }
        on_chunk(&sums.report(ctx, done + 1, chunks_total, tokens.len()));
    }
    Ok(sums.report(ctx, chunks_total, chunks_total, tokens.len()))
}

/// Evaluates `chunk` from an empty cache and returns the logits of positions `first..ctx - 1`, the ones that
/// predict a scored token (`[ctx - 1 - first][n_vocab]`). The context half is fed without its logits, and the
/// last token is never fed: nothing is scored against what follows it.
fn scored_logits(
    session: &mut Session,
    chunk: &[u32],
    first: usize,
) -> Result<Vec<f32>, ModelError> {
    session.truncate(0);
    session.feed(&chunk[..first])?;
    session.feed_all_logits(&chunk[first..chunk.len() - 1])
}

/// What one scored position contributes.
#[derive(Clone, Copy, Debug)]
struct Position {
    nll: f64,
    /// The rest is only computed against a base model (zero otherwise).
    nll_base: f64,
    kl: f64,
    same_top: bool,
}

/// The log-normaliser and most likely token of a row of logits.
struct Softmax {
    log_sum: f64,
    argmax: usize,
}

impl Softmax {
    fn of(logits: &[f32]) -> Softmax {
        // The first of equal maxima, as llama.cpp picks it.
        let (argmax, max) =
            logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv { (i, v) } else { (bi, bv) }
                });
        let max = f64::from(max);
        let sum: f64 = logits.iter().map(|&v| (f64::from(v) - max).exp()).sum();
        Softmax {
            log_sum: max + sum.ln(),
            argmax,
        }
    }

    fn log_p(&self, logit: f32) -> f64 {
        f64::from(logit) - self.log_sum
    }
}

impl Position {
    fn score(logits: &[f32], base: Option<&[f32]>, target: usize) -> Position {
        let q = Softmax::of(logits);
        let nll = -q.log_p(logits[target]);
        let Some(base) = base else {
            return Position {
                nll,
                nll_base: 0.0,
                kl: 0.0,
                same_top: false,
            };
        };
        let p = Softmax::of(base);
        // KL(base || model) = sum over the vocabulary of p_base * (log p_base - log p_model).
        let kl = base
            .iter()
            .zip(logits)
            .map(|(&b, &m)| {
                let log_p_base = p.log_p(b);
                log_p_base.exp() * (log_p_base - q.log_p(m))
            })
            .sum();
        Position {
            nll,
            nll_base: -p.log_p(base[target]),
            kl,
            same_top: q.argmax == p.argmax,
        }
    }
}

/// Running sums over scored positions, as llama-perplexity keeps them, plus every position's KL for the
/// percentiles (4 bytes a position).
struct Sums {
    count: usize,
    nll: f64,
    nll2: f64,
    /// Present with a base model.
    base: Option<BaseSums>,
}

#[derive(Default)]
struct BaseSums {
    nll: f64,
    nll2: f64,
    nll_nll_base: f64,
    kl: f64,
    kl2: f64,
    p_diff2: f64,
    p_diff4: f64,
    same_top: usize,
    kl_values: Vec<f32>,
}

impl Sums {
    fn new(with_base: bool) -> Sums {
        Sums {
            count: 0,
            nll: 0.0,
            nll2: 0.0,
            base: with_base.then(BaseSums::default),
        }
    }

    fn add(&mut self, p: &Position) {
        self.count += 1;
        self.nll += p.nll;
        self.nll2 += p.nll * p.nll;
        if let Some(b) = &mut self.base {
            b.nll += p.nll_base;
            b.nll2 += p.nll_base * p.nll_base;
            b.nll_nll_base += p.nll * p.nll_base;
            b.kl += p.kl;
            b.kl2 += p.kl * p.kl;
            let p_diff = (-p.nll).exp() - (-p.nll_base).exp();
            b.p_diff2 += p_diff * p_diff;
            b.p_diff4 += p_diff.powi(4);
            b.same_top += usize::from(p.same_top);
            b.kl_values.push(p.kl as f32);
        }
    }

    fn report(&self, ctx: usize, chunks: usize, chunks_total: usize, tokens: usize) -> Report {
        let n = self.count;
        let ln_ppl = mean_and_uncertainty(self.nll, self.nll2, n);
        let divergence = self.base.as_ref().map(|b| {
            let ln_ppl_base = mean_and_uncertainty(b.nll, b.nll2, n);
            let covariance = if n > 1 {
                let n_f = n as f64;
                (b.nll_nll_base / n_f - (self.nll / n_f) * (b.nll / n_f)) / (n_f - 1.0)
            } else {
                0.0
            };
            let ratio_variance =
                ln_ppl.uncertainty.powi(2) + ln_ppl_base.uncertainty.powi(2) - 2.0 * covariance;
            let mse = mean_and_uncertainty(b.p_diff2, b.p_diff4, n);
            let rms = mse.value.sqrt();
            let same_top = b.same_top as f64 / n as f64;
            let mut sorted = b.kl_values.clone();
            sorted.sort_by(f32::total_cmp);
            Divergence {
                base_perplexity: exp_of(ln_ppl_base),
                ln_perplexity_ratio: Estimate {
                    value: ln_ppl.value - ln_ppl_base.value,
                    uncertainty: ratio_variance.max(0.0).sqrt(),
                },
                kl_mean: mean_and_uncertainty(b.kl, b.kl2, n),
                kl_median: percentile(&sorted, 0.5),
                kl_p99: percentile(&sorted, 0.99),
                kl_max: percentile(&sorted, 1.0),
                delta_p_rms: Estimate {
                    value: rms,
                    uncertainty: if rms > 0.0 {
                        0.5 / rms * mse.uncertainty
                    } else {
                        0.0
                    },
                },
                same_top: Estimate {
                    value: same_top,
                    uncertainty: if n > 1 {
                        (same_top * (1.0 - same_top) / (n as f64 - 1.0)).sqrt()
                    } else {
                        0.0
                    },
                },
            }
        });
        Report {
            ctx,
            chunks,
            chunks_total,
            tokens,
            scored: n,
            perplexity: exp_of(ln_ppl),
            divergence,
        }
    }
}

/// Mean of `n` values given their sum and sum of squares, with the standard error of that mean.
fn mean_and_uncertainty(sum: f64, sum2: f64, n: usize) -> Estimate {
    if n == 0 {
        return Estimate::default();
    }
    let n_f = n as f64;
    let mean = sum / n_f;
    let variance = sum2 / n_f - mean * mean;
    Estimate {
        value: mean,
        uncertainty: if n > 1 && variance > 0.0 {
            (variance / (n_f - 1.0)).sqrt()
        } else {
            0.0
        },
    }
}

/// exp of a log-scale estimate, its uncertainty carried through to first order (d exp(x) = exp(x) dx).
fn exp_of(ln: Estimate) -> Estimate {
    let value = ln.value.exp();
    Estimate {
        value,
        uncertainty: value * ln.uncertainty,
    }
}

/// The `fraction` quantile of sorted values, interpolated between neighbours as llama-perplexity does.
fn percentile(sorted: &[f32], fraction: f64) -> f64 {
    let Some(&last) = sorted.last() else {
        return 0.0;
    };
    let at = fraction.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (i, frac) = (at as usize, at.fract());
    let next = sorted.get(i + 1).copied().unwrap_or(last);
    (1.0 - frac) * f64::from(sorted[i]) + frac * f64::from(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_follows_llama_perplexity() {
        assert_eq!(chunk_count(1024, 512).unwrap(), 2);
        assert_eq!(chunk_count(1535, 512).unwrap(), 2);
        let err = chunk_count(1023, 512).unwrap_err().to_string();
        assert_eq!(
            err,
            "the text has 1023 tokens, but perplexity over chunks of 512 tokens needs at least 1024 (two \
             chunks, as llama-perplexity requires): give a longer text or a context of at most 511"
        );
        let err = chunk_count(5, 3).unwrap_err().to_string();
        assert!(err.ends_with("give a longer text"), "{err}");
        assert!(matches!(
            chunk_count(100, 2),
            Err(PerplexityError::ContextTooShort { ctx: 2 })
        ));
    }

    #[test]
    fn identical_distributions_diverge_by_nothing() {
        let logits = [1.0f32, 3.0, -2.0, 0.5];
        let p = Position::score(&logits, Some(&logits), 1);
        assert_eq!(p.kl, 0.0);
        assert!(p.same_top);
        assert_eq!(p.nll, p.nll_base);
        let expected = -(3.0f64 - logits.iter().map(|&v| f64::from(v).exp()).sum::<f64>().ln());
        assert!((p.nll - expected).abs() < 1e-12);
    }

    #[test]
    fn kl_of_two_known_distributions() {
        // base: (0.5, 0.5); model: (0.8, 0.2) => KL = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2).
        let base = [0.0f32, 0.0];
        let model = [(0.8f32).ln(), (0.2f32).ln()];
        let p = Position::score(&model, Some(&base), 0);
        let want = 0.5 * (0.5f64 / 0.8).ln() + 0.5 * (0.5f64 / 0.2).ln();
        assert!((p.kl - want).abs() < 1e-6, "{} vs {want}", p.kl);
        // Ties pick the first maximum, as llama.cpp does: both argmaxes are token 0.
        assert!(p.same_top);
        let mut sums = Sums::new(true);
        sums.add(&p);
        sums.add(&Position::score(&model, Some(&base), 1));
        let report = sums.report(3, 1, 2, 6);
        let d = report.divergence.unwrap();
        assert!((d.kl_mean.value - want).abs() < 1e-6);
        assert_eq!(d.same_top.value, 1.0);
        // p(target) - p_base(target) is +0.3 then -0.3.
        assert!((d.delta_p_rms.value - 0.3).abs() < 1e-6);
        assert!((report.perplexity.value - (1.0 / (0.8f64 * 0.2).sqrt())).abs() < 1e-5);
        assert!((d.base_perplexity.value - 2.0).abs() < 1e-12);
    }

    #[test]
    fn estimates_and_percentiles() {
        let e = mean_and_uncertainty(6.0, 14.0, 3);
        assert_eq!(e.value, 2.0);
        assert!((e.uncertainty - (2.0f64 / 3.0 / 2.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_and_uncertainty(1.0, 1.0, 1).uncertainty, 0.0);
        let sorted = [0.0f32, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&sorted, 0.5), 2.0);
        assert!((percentile(&sorted, 0.99) - 3.96).abs() < 1e-12);
        assert_eq!(percentile(&sorted, 1.0), 4.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
