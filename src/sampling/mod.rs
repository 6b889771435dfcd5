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
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = Rng::new(params.seed);
        Sampler {
            params,
            rng,
            candidates: Vec::new(),
            masked: Vec::new(),
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
        let penalised = p.repeat_penalty != 1.0 && p.repeat_last_n > 0;
        let window = &recent[recent.len().saturating_sub(p.repeat_last_n)..];
        let penalty = |id: u32, l: f32| {
            if penalised && window.contains(&id) {
                if l > 0.0 {
                    l / p.repeat_penalty
                } else {
                    l * p.repeat_penalty
                }
            } else {
                l
            }
        };
        if p.temperature == 0.0 {
            return argmax_by(logits, penalty);
        }
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, penalty(i as u32, l))),
        );
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit_desc);
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

/// Index of the largest value after `f`; the lowest index on ties. NaN never wins.
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

/// Index of the largest logit (lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    argmax_by(logits, |_, l| l)
}

#[cfg(test)]
mod tests {
    use super::*;

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
