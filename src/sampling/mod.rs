//! Choosing the next token from the logits: greedy, or llama.cpp's usual chain (repetition penalty, top-k,
//! top-p, min-p, temperature) with a seeded generator so that the same seed gives the same text; and, for
//! structured output, only among the tokens a [`TokenConstraint`] allows ([`grammar`] builds them from JSON
//! schemas and grammars).

pub mod grammar;

/// A rule on which tokens may come next (a JSON schema, a forced tool call), one per sequence. The scheduler asks
/// for the allowed set before each token is sampled and reports every token sampled, so the two stay in step.
pub trait TokenConstraint: Send + Sync {
    /// Takes `token`, the one sampled last, as generated.
    fn accept(&mut self, token: u32) -> Result<(), String>;
    /// Sets in `allowed` (one bit per id, bit `id % 32` of word `id / 32`; as many words as the vocabulary needs)
    /// exactly the ids that may come next, the end-of-text id once the rule is complete. An error, or no id
    /// allowed, means the rule cannot go on.
    fn allowed(&mut self, allowed: &mut [u32]) -> Result<(), String>;
}

/// Sampling settings; the defaults are llama.cpp's.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to p (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0: none).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recently seen tokens by this (1: off).
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

/// A seed for a request that gave none: different every call (the clock's nanoseconds mixed with the process
/// id), so unseeded requests differ from each other.
pub fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5eed,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    /// Rejects settings that would silently do something else (a negative temperature, p outside 0..=1).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature {} must be 0 or more",
                self.temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(format!("top-p {} must be between 0 and 1", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p {} must be between 0 and 1", self.min_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(format!(
                "repeat penalty {} must be more than 0",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and the same sequence on every platform.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A sampler with its own candidate buffer, so picking a token allocates nothing.
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    candidates: Vec<(u32, f32)>,
    /// The logits with the tokens a constraint forbids set to minus infinity ([`Sampler::sample_allowed`]).
    masked: Vec<f32>,
    /// The logits after the repetition penalty ([`Sampler::sample`]).
    penalised: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = Rng::new(params.seed);
        Sampler {
            params,
            rng,
            candidates: Vec::new(),
            masked: Vec::new(),
            penalised: Vec::new(),
        }
    }

    /// [`Sampler::sample`] among the ids set in `allowed` (a bit set as [`TokenConstraint::allowed`] fills it);
    /// the same choice as over logits where every other id is minus infinity. `None` when no id is allowed.
    pub fn sample_allowed(
        &mut self,
        logits: &[f32],
        recent: &[u32],
        allowed: &[u32],
    ) -> Option<u32> {
        let mut masked = std::mem::take(&mut self.masked);
        masked.clear();
        masked.extend(logits.iter().enumerate().map(|(i, &l)| {
            if allowed.get(i / 32).is_some_and(|w| w >> (i % 32) & 1 == 1) {
                l
            } else {
                f32::NEG_INFINITY
            }
        }));
        let any = masked.iter().any(|&l| l > f32::NEG_INFINITY);
        let token = any.then(|| self.sample(&masked, recent));
        self.masked = masked;
        token
    }

    /// Picks the next token. `recent` is the token history the repetition penalty looks at.
    pub fn sample(&mut self, logits: &[f32], recent: &[u32]) -> u32 {
        let p = &self.params;
        if p.repeat_penalty == 1.0 || p.repeat_last_n == 0 {
            return self.sample_as_they_are(logits);
        }
        // The penalised logits in a buffer of their own: a copy with the window's ids changed costs less than
        // asking of every one of 49k ids whether the window holds it.
        let mut penalised = std::mem::take(&mut self.penalised);
        penalised.clear();
        penalised.extend_from_slice(logits);
        for &id in &recent[recent.len().saturating_sub(p.repeat_last_n)..] {
            // From the original logit, so an id the window holds twice is penalised once.
            if let Some(&l) = logits.get(id as usize) {
                penalised[id as usize] = if l > 0.0 {
                    l / p.repeat_penalty
                } else {
                    l * p.repeat_penalty
                };
            }
        }
        let token = self.sample_as_they_are(&penalised);
        self.penalised = penalised;
        token
    }

    /// [`Self::sample`] of logits no penalty changes.
    fn sample_as_they_are(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let c = &mut self.candidates;
        c.clear();
        let scored = logits.iter().enumerate().map(|(i, &l)| (i as u32, l));
        if p.top_k > 0 && p.top_k < logits.len() {
            best_k_sorted(scored, p.top_k, c);
        } else {
            c.extend(scored);
            c.sort_unstable_by(by_logit_desc);
        }
        // Probabilities of the untempered logits decide top-p and min-p, as in llama.cpp's default chain.
        let max = c[0].1;
        let total: f32 = c.iter().map(|&(_, l)| (l - max).exp()).sum();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, &(_, l)) in c.iter().enumerate() {
                acc += (l - max).exp() / total;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        if p.min_p > 0.0 {
            // exp(l - max) >= min_p  <=>  l >= max + ln(min_p)
            let floor = max + p.min_p.ln();
            let keep = c.iter().take_while(|&&(_, l)| l >= floor).count().max(1);
            c.truncate(keep);
        }
        let inv_t = 1.0 / p.temperature;
        let total: f32 = c.iter().map(|&(_, l)| ((l - max) * inv_t).exp()).sum();
        let mut r = self.rng.next_f32() * total;
        for &(id, l) in c.iter() {
            r -= ((l - max) * inv_t).exp();
            if r < 0.0 {
                return id;
            }
        }
        // Rounding left a sliver: the least likely token that can be chosen at all.
        c.iter()
            .rev()
            .find(|&&(_, l)| l > f32::NEG_INFINITY)
            .unwrap_or(&c[c.len() - 1])
            .0
    }
}

/// The order candidates are kept and drawn in: the higher logit first, the lower id on ties (a strict total
/// order, so every way of choosing the best `k` keeps the same ones in the same order).
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `k` best of `scored` under [`by_logit_desc`] into `kept` (empty on entry), best first. One pass in
/// which nearly every candidate is compared with the worst one kept and dropped: writing out and partitioning all
/// 49k candidates for `select_nth_unstable` took ~110 us a token, which a batch of sequences pays once per
/// sequence in every step while the worker threads wait.
fn best_k_sorted(scored: impl Iterator<Item = (u32, f32)>, k: usize, kept: &mut Vec<(u32, f32)>) {
    use std::cmp::Ordering::Less;
    // The worst kept logit, for a plain comparison first: a lower one loses under the total order too.
    let mut floor = f32::NEG_INFINITY;
    for candidate in scored {
        if kept.len() == k {
            if candidate.1 < floor || by_logit_desc(&candidate, &kept[k - 1]) != Less {
                continue;
            }
            kept.pop();
        }
        let at = kept.partition_point(|x| by_logit_desc(x, &candidate) == Less);
        kept.insert(at, candidate);
        if kept.len() == k {
            floor = kept[k - 1].1;
        }
    }
}

/// Index of the largest logit (lowest index on ties; NaN never wins): `argmax_by` with no change to the
/// logits, in two passes the compiler vectorizes: the largest value (16 running maxima, each a strict `>` as
/// there), then its first index. The one-pass loop took ~50 us over 49k logits, longer than sampling with top-k.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = logits.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            if x > *m {
                *m = x;
            }
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &x in lanes.iter().chain(tail) {
        if x > max {
            max = x;
        }
    }
    if max == f32::NEG_INFINITY {
        // Nothing beats minus infinity (all -inf or NaN): `argmax_by` keeps index 0.
        return 0;
    }
    logits.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// Index of the largest value after `f`; the lowest index on ties. NaN never wins. The one-pass reference
/// [`argmax`] is tested against.
#[cfg(test)]
fn argmax_by(logits: &[f32], f: impl Fn(u32, f32) -> f32) -> u32 {
    let mut best = 0u32;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        let v = f(i as u32, l);
        if v > best_v {
            best_v = v;
            best = i as u32;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits every comparison must handle: infinities, both zeros, NaN of either sign.
    const AWKWARD: [f32; 6] = [
        f32::NEG_INFINITY,
        f32::INFINITY,
        0.0,
        -0.0,
        f32::NAN,
        -f32::NAN,
    ];

    /// The vectorized `argmax` picks what `argmax_by` picks: the first index of the largest value, NaN never,
    /// index 0 when nothing beats minus infinity, and either zero equal to the other.
    #[test]
    fn argmax_is_argmax_by_without_a_change() {
        let mut rng = Rng::new(5);
        for round in 0..2000 {
            let n = 1 + (rng.next_u64() % 70) as usize;
            let logits: Vec<f32> = (0..n)
                .map(|_| match rng.next_u64() % 8 {
                    0 | 1 => AWKWARD[(rng.next_u64() % 6) as usize],
                    2 | 3 => (rng.next_u64() % 3) as f32 - 1.0,
                    _ => rng.next_f32() * 8.0 - 4.0,
                })
                .collect();
            assert_eq!(
                argmax(&logits),
                argmax_by(&logits, |_, l| l),
                "round {round}: {logits:?}"
            );
        }
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, -f32::NAN]), 0);
    }

    /// The repetition penalty changes each id the window holds once, however often it appears there (ids past
    /// the vocabulary ignored): the same draws as an unpenalised sampler given logits penalised by hand.
    #[test]
    fn the_penalty_is_the_window_applied_once_per_id() {
        let mut rng = Rng::new(9);
        let logits: Vec<f32> = (0..500).map(|_| rng.next_f32() * 6.0 - 3.0).collect();
        let recent: Vec<u32> = [7, 7, 3, 499, 120, 3, 100_000, 42, 0]
            .into_iter()
            .chain((0..80).map(|i| (i * 37) % 500))
            .collect();
        for base in [
            SamplingParams::greedy(),
            SamplingParams {
                temperature: 1.0,
                top_k: 20,
                seed: 4,
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 1.5,
                top_k: 0,
                min_p: 0.0,
                seed: 5,
                ..SamplingParams::default()
            },
        ] {
            let params = SamplingParams {
                repeat_penalty: 1.3,
                repeat_last_n: 64,
                ..base.clone()
            };
            let window = &recent[recent.len() - 64..];
            let by_hand: Vec<f32> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| match window.contains(&(i as u32)) {
                    true if l > 0.0 => l / 1.3,
                    true => l * 1.3,
                    false => l,
                })
                .collect();
            let (mut penalised, mut plain) = (Sampler::new(params), Sampler::new(base));
            for _ in 0..200 {
                assert_eq!(
                    penalised.sample(&logits, &recent),
                    plain.sample(&by_hand, &recent)
                );
            }
        }
    }

    /// `best_k_sorted` keeps exactly what sorting every candidate and taking the first `k` keeps, in the same
    /// order: with ties (the lower id first), infinities, both zeros and NaN of either sign among the logits.
    #[test]
    fn the_best_k_are_those_a_full_sort_keeps() {
        let mut rng = Rng::new(11);
        let mut kept = Vec::new();
        for round in 0..300 {
            let n = 1 + (rng.next_u64() % 300) as usize;
            let logits: Vec<f32> = (0..n)
                .map(|_| match rng.next_u64() % 10 {
                    0 => AWKWARD[(rng.next_u64() % 6) as usize],
                    // Few distinct values, so ties are common.
                    1..=4 => (rng.next_u64() % 4) as f32,
                    _ => rng.next_f32() * 8.0 - 4.0,
                })
                .collect();
            let scored = || logits.iter().enumerate().map(|(i, &l)| (i as u32, l));
            let mut all: Vec<(u32, f32)> = scored().collect();
            all.sort_by(by_logit_desc);
            for k in [1, 2, 3, 7, 40, n.saturating_sub(1).max(1), n] {
                let k = k.min(n);
                kept.clear();
                best_k_sorted(scored(), k, &mut kept);
                let bits =
                    |v: &[(u32, f32)]| v.iter().map(|&(i, l)| (i, l.to_bits())).collect::<Vec<_>>();
                assert_eq!(bits(&kept), bits(&all[..k]), "round {round}, n {n}, k {k}");
            }
        }
    }

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let params = SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params);
        assert_eq!(s.sample(&[1.0, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn same_seed_same_tokens_and_filters_hold() {
        let logits: Vec<f32> = (0..500).map(|i| ((i * 7919) % 101) as f32 / 10.0).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 5,
            seed: 42,
            ..SamplingParams::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = run(&params);
        assert_eq!(a, run(&params));
        assert_ne!(
            a,
            run(&SamplingParams {
                seed: 43,
                ..params.clone()
            })
        );
        let mut top5: Vec<u32> = (0..500u32).collect();
        top5.sort_by(|&x, &y| {
            logits[y as usize]
                .total_cmp(&logits[x as usize])
                .then(x.cmp(&y))
        });
        top5.truncate(5);
        assert!(
            a.iter().all(|t| top5.contains(t)),
            "top-k let through a token outside the top 5"
        );
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 1,
            "temperature 1 should vary"
        );
    }

    #[test]
    fn allowed_ids_only() {
        let logits: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let mut allowed = vec![0u32; 4];
        for id in [3usize, 40, 77] {
            allowed[id / 32] |= 1 << (id % 32);
        }
        let mut greedy = Sampler::new(SamplingParams::greedy());
        assert_eq!(greedy.sample_allowed(&logits, &[], &allowed), Some(77));
        let mut s = Sampler::new(SamplingParams {
            temperature: 100.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        });
        let seen: std::collections::HashSet<u32> = (0..300)
            .filter_map(|_| s.sample_allowed(&logits, &[], &allowed))
            .collect();
        assert_eq!(seen, [3, 40, 77].into_iter().collect());
        assert_eq!(greedy.sample_allowed(&logits, &[], &[0; 4]), None);
    }

    #[test]
    fn min_p_keeps_only_near_top() {
        let logits = [10.0, 9.9, 0.0, -5.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params);
        for _ in 0..100 {
            assert!(s.sample(&logits, &[]) <= 1);
        }
    }
}
