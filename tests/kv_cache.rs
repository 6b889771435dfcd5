//! Compact KV caches: f16 and q8_0 keys and values stay close to the f32 cache. For every fixture (f32 file,
//! the reference prompts, fed in chunks and then one token at a time so attention reads the compact cache both
//! ways), on every kernel set (each compiles its own conversion of the compact blocks), the mean KL divergence
//! from the f32 cache's logits is measured and bounded.

mod support;

use quarry::generate::Session;
use quarry::model::KvType;
use support::*;

/// Logits of every position of `ids`: the first half fed as one chunk, the rest one token at a time.
fn logits_with(model: &quarry::model::Model, ids: &[u32], ty: KvType) -> Vec<f32> {
    let mut s = Session::with_cache(model, ids.len(), 16, ty);
    let half = ids.len() / 2;
    let mut all = if half > 0 {
        s.feed_all_logits(&ids[..half]).unwrap()
    } else {
        Vec::new()
    };
    for &t in &ids[half..] {
        all.extend_from_slice(s.feed(&[t]).unwrap());
    }
    all
}

#[test]
fn compact_caches_stay_within_measured_kl_of_f32() {
    let mut worst = [(0.0f64, 1.0f64); 2];
    for set in kernel_sets() {
        for (name, dir) in all_fixtures() {
            let file = gguf(&name, &dir, "f32");
            let engine = engine_on(set, &file, false);
            let model = &engine.model;
            let vocab = model.config.n_vocab;
            for (prompt, ids, _, greedy) in prompts(&reference(&dir)) {
                let mut ids = ids.clone();
                ids.extend_from_slice(&greedy);
                let want = logits_with(model, &ids, KvType::F32);
                for (i, ty) in [KvType::F16, KvType::Q8_0].into_iter().enumerate() {
                    let got = logits_with(model, &ids, ty);
                    let (kl, top1) = kl_and_top1(&want, &got, vocab);
                    eprintln!("{set} {name} {prompt} {ty}: KL {kl:.2e}, top-1 {top1:.3}");
                    worst[i].0 = worst[i].0.max(kl);
                    worst[i].1 = worst[i].1.min(top1);
                }
            }
        }
    }
    eprintln!(
        "worst f16: KL {:.2e} top-1 {:.3}; worst q8_0: KL {:.2e} top-1 {:.3}",
        worst[0].0, worst[0].1, worst[1].0, worst[1].1
    );
    // Bounds from the measured values with room for other kernel sets (see the README's cache table).
    assert!(
        worst[0].0 < 2e-3 && worst[0].1 >= 0.98,
        "f16 cache: {:?}",
        worst[0]
    );
    assert!(
        worst[1].0 < 0.15 && worst[1].1 >= 0.8,
        "q8_0 cache: {:?}",
        worst[1]
    );
}
