//! Properties of the forward pass itself, through the library: batched prompt processing equals token-by-token
//! decoding, only the chosen experts are read, and a cached prefix is reused.

mod support;

use quarry::engine::Engine;
use quarry::generate::Session;
use support::*;

fn long_prompt(name: &str) -> (Engine, Vec<u32>) {
    let dir = fixture_dir(name).unwrap();
    let (_, ids, _, _) = prompts(&reference(&dir))
        .into_iter()
        .find(|p| p.0 == "long")
        .unwrap();
    (Engine::open(&gguf(name, &dir, "f32")).unwrap(), ids)
}

/// Chunks of 64 tokens (experts fed by many tokens at once, batched attention) against one token at a time
/// (the decode path): the same logits at every position within 1e-4.
#[test]
fn chunked_prompt_processing_equals_token_by_token_decoding() {
    for name in [
        "granitemoe-dev-1",
        "granite-dense-dev",
        "granitemoe-kquant-dev",
    ] {
        let (engine, ids) = long_prompt(name);
        let mut batched = Session::new(&engine.model, ids.len(), 64);
        let all = batched.feed_all_logits(&ids).unwrap();
        let mut single = Session::new(&engine.model, ids.len(), 1);
        let v = engine.model.config.n_vocab;
        for (i, &id) in ids.iter().enumerate() {
            let l = single.feed(&[id]).unwrap();
            let d = max_abs_diff(l, &all[i * v..(i + 1) * v]);
            assert!(
                d <= 1e-4,
                "{name}: position {i}: chunked and token-by-token logits differ by {d:.2e}"
            );
        }
    }
}

/// One token reads exactly k experts per layer; a short batch reads only the experts its tokens chose, which
/// here leaves most experts untouched.
#[test]
fn experts_no_token_chose_are_never_read() {
    let (engine, ids) = long_prompt("granitemoe-dev-1");
    let cfg = &engine.model.config;
    let mut s = Session::new(&engine.model, 64, 64);
    s.feed(&ids[..1]).unwrap();
    for (layer, reads) in s.expert_reads().iter().enumerate() {
        assert_eq!(
            reads.iter().sum::<u64>(),
            cfg.n_expert_used as u64,
            "layer {layer}: {reads:?}"
        );
        assert!(
            reads.iter().all(|&r| r <= 1),
            "layer {layer}: an expert read twice for one token: {reads:?}"
        );
    }
    s.feed(&ids[1..3]).unwrap();
    for (layer, reads) in s.expert_reads().iter().enumerate() {
        let touched = reads.iter().filter(|&&r| r > 0).count();
        assert!(
            touched < cfg.n_expert,
            "layer {layer}: all {} experts read for 3 tokens",
            cfg.n_expert
        );
        // The second batch (2 tokens) read each chosen expert once: at most 2k more reads.
        assert!(
            reads.iter().sum::<u64>() <= 3 * cfg.n_expert_used as u64,
            "layer {layer}: {reads:?}"
        );
    }
}

/// A second chat turn: the conversation so far is cached, so only the new tokens are computed.
#[test]
fn a_cached_prefix_is_reused() {
    let (engine, ids) = long_prompt("granitemoe-dev-1");
    let mut s = Session::new(&engine.model, ids.len(), 32);
    let first = s.feed_prompt(&ids[..100]).unwrap().to_vec();
    let reads_after_first: u64 = s.expert_reads().iter().flatten().sum();
    let second = s.feed_prompt(&ids[..120]).unwrap().to_vec();
    assert_eq!(s.history(), &ids[..120]);
    let mut fresh = Session::new(&engine.model, ids.len(), 32);
    assert!(max_abs_diff(&second, fresh.feed_prompt(&ids[..120]).unwrap()) <= 1e-4);
    // 20 new tokens in one batch read each layer's experts at most once each: far fewer reads than 120 tokens.
    let new_reads: u64 = s.expert_reads().iter().flatten().sum::<u64>() - reads_after_first;
    assert!(new_reads <= (engine.model.config.n_layer * engine.model.config.n_expert) as u64);
    // Going back to a shorter prompt recomputes only its last token.
    let again = s.feed_prompt(&ids[..100]).unwrap();
    assert!(max_abs_diff(&first, again) <= 1e-4);
    assert_eq!(s.history().len(), 100);
}
