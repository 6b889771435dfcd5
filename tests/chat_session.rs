//! The chat's library side on a fixture model: KV-cache reuse across turns, context trimming, too-long messages,
//! stopping a reply, /set, /save and /load.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};

use quarry::engine::Engine;
use quarry::generate::StopReason;
use quarry::sampling::SamplingParams;
use quarry::text::chat::command::Setting;
use quarry::text::chat::{ChatError, ChatSession, ChatSettings};
use quarry::text::chat_template::Conversation;
use support::*;

fn engine() -> Engine {
    let dir = fixture_dir("granitemoe-dev-1").expect("committed fixture");
    Engine::open_for_text(&gguf("granitemoe-dev-1", &dir, "q8_0")).unwrap()
}

fn settings(max_tokens: usize) -> ChatSettings {
    ChatSettings {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(max_tokens),
        verbose: true,
    }
}

/// Sends one message and returns the reply text.
fn turn(chat: &mut ChatSession, text: &str) -> String {
    chat.submit(text).unwrap();
    let mut reply = String::new();
    chat.reply(&AtomicBool::new(false), |p| reply.push_str(p))
        .unwrap();
    reply
}

#[test]
fn second_turn_computes_only_the_new_tokens() {
    let engine = engine();
    let mut chat = ChatSession::new(&engine, 512, 64, settings(12)).unwrap();
    chat.set_system(Some("Be brief.".into()));

    let first = chat.submit("Hello there").unwrap();
    chat.reply(&AtomicBool::new(false), |_| {}).unwrap();
    let t1 = chat.last_turn().unwrap().clone();
    assert_eq!(
        t1.reused_tokens, 0,
        "nothing is cached before the first turn"
    );
    assert_eq!(t1.generation.prompt_tokens_computed, first.prompt_tokens);
    let cached_after_first = chat.context_used();
    assert_eq!(
        cached_after_first,
        first.prompt_tokens + t1.generation.generated_tokens - 1,
        "the cache holds the prompt and every generated token but the last (sampled, never fed)"
    );

    // What the second turn adds after the first reply: its end-of-turn marker and the new user message.
    let tokenizer = engine.tokenizer();
    let new_message_tokens = tokenizer
        .encode("<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>And then?<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>")
        .unwrap()
        .len();
    let second = chat.submit("And then?").unwrap();
    chat.reply(&AtomicBool::new(false), |_| {}).unwrap();
    let t2 = chat.last_turn().unwrap();
    assert_eq!(
        t2.reused_tokens, cached_after_first,
        "the whole first exchange comes from the cache"
    );
    assert_eq!(
        t2.generation.prompt_tokens_computed,
        second.prompt_tokens - cached_after_first
    );
    // Only the new message (and the one reply token that was never fed) is computed, whether or not the first
    // reply ended on its end-of-text token.
    let ended_on_eos = t1.generation.stop == StopReason::EndOfText;
    let expected = new_message_tokens + 1 - usize::from(ended_on_eos);
    assert_eq!(t2.generation.prompt_tokens_computed, expected);
    assert!(t2.generation.prompt_tokens_computed < first.prompt_tokens);
    assert_eq!(chat.totals().turns, 2);
    assert_eq!(chat.messages().len(), 4);
}

#[test]
fn a_reused_prefix_gives_the_same_reply_as_a_fresh_session() {
    // The second reply, once through the cache and once from a new session that computes the same prompt from
    // scratch: reusing the cache must not change a single greedy token.
    let engine = engine();
    let mut chat = ChatSession::new(&engine, 512, 64, settings(10)).unwrap();
    turn(&mut chat, "Hello there");
    chat.submit("And then?").unwrap();
    let prompt = chat.prompt_ids().to_vec();
    let mut cached_reply = String::new();
    chat.reply(&AtomicBool::new(false), |p| cached_reply.push_str(p))
        .unwrap();
    assert!(chat.last_turn().unwrap().reused_tokens > 0);

    let mut session = quarry::generate::Session::new(&engine.model, 512, 64);
    let mut sampler = quarry::sampling::Sampler::new(SamplingParams::greedy());
    let mut ids = Vec::new();
    let eos = engine.tokenizer().eos_id();
    quarry::generate::generate(&mut session, &prompt, &mut sampler, 10, &[eos], |id| {
        ids.push(id);
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    ids.retain(|&id| id != eos);
    assert_eq!(cached_reply, engine.tokenizer().decode(&ids, true).unwrap());
}

#[test]
fn oldest_turns_are_dropped_when_the_context_fills_and_the_system_message_stays() {
    let engine = engine();
    let mut chat = ChatSession::new(&engine, 96, 32, settings(16)).unwrap();
    chat.set_system(Some("Be brief.".into()));
    let mut dropped = 0;
    for i in 0..8 {
        let p = chat.submit(&format!("Message number {i} for you")).unwrap();
        assert!(
            p.prompt_tokens + 16 <= 96,
            "the prompt leaves room for the reply"
        );
        dropped += p.dropped_turns;
        chat.reply(&AtomicBool::new(false), |_| {}).unwrap();
        assert!(chat.context_used() <= 96);
    }
    assert!(dropped > 0, "eight exchanges do not fit 96 tokens");
    assert_eq!(chat.system(), Some("Be brief."));
    let conv = chat.conversation();
    assert_eq!(conv.messages[0].role(), Some("system"));
    assert_eq!(
        conv.messages.last().and_then(|m| m.role()),
        Some("assistant")
    );
    assert!(
        conv.messages
            .iter()
            .any(|m| m.content() == Some("Message number 7 for you"))
    );
    assert!(
        !conv
            .messages
            .iter()
            .any(|m| m.content() == Some("Message number 0 for you")),
        "the oldest turn went first"
    );
}

#[test]
fn a_message_too_long_for_the_context_is_refused_and_changes_nothing() {
    let engine = engine();
    let mut chat = ChatSession::new(&engine, 64, 32, settings(8)).unwrap();
    turn(&mut chat, "hi");
    let before = chat.messages().to_vec();
    let long = "word ".repeat(200);
    match chat.submit(&long) {
        Err(ChatError::MessageTooLong {
            needed, context, ..
        }) => {
            assert!(needed > context);
            assert_eq!(context, 64);
        }
        other => panic!("expected MessageTooLong, got {other:?}"),
    }
    let err = chat.submit(&long).unwrap_err().to_string();
    assert!(err.contains("--ctx-size"), "{err}");
    assert_eq!(chat.messages(), &before[..]);
    // And the chat goes on.
    assert!(chat.submit("short again").is_ok());
    chat.reply(&AtomicBool::new(false), |_| {}).unwrap();
}

#[test]
fn a_stopped_reply_is_cut_short_and_kept() {
    let engine = engine();
    let mut chat = ChatSession::new(&engine, 1024, 64, settings(500)).unwrap();
    let stop = AtomicBool::new(false);
    chat.submit("Tell me a long story").unwrap();
    let mut pieces = 0;
    chat.reply(&stop, |_| {
        pieces += 1;
        // What a SIGINT handler does, here after a few pieces of text.
        if pieces == 3 {
            stop.store(true, Ordering::SeqCst);
        }
    })
    .unwrap();
    let t = chat.last_turn().unwrap();
    assert_eq!(t.generation.stop, StopReason::Interrupted);
    assert!(
        t.generation.generated_tokens < 20,
        "{}",
        t.generation.generated_tokens
    );
    assert_eq!(chat.messages().len(), 2);
    assert_eq!(chat.messages()[1].role(), Some("assistant"));
    assert!(
        !chat.messages()[1].content().unwrap_or("").is_empty(),
        "the partial reply is kept"
    );
    // The next turn reuses the partial reply from the cache.
    chat.submit("Go on").unwrap();
    chat.reply(&AtomicBool::new(false), |_| {}).unwrap();
    assert!(chat.last_turn().unwrap().reused_tokens > 0);
}

#[test]
fn replies_stream_in_pieces_that_add_up_to_the_reply() {
    let engine = engine();
    let mut chat = ChatSession::new(&engine, 512, 64, settings(24)).unwrap();
    chat.submit("Hello").unwrap();
    let mut pieces = Vec::new();
    chat.reply(&AtomicBool::new(false), |p| pieces.push(p.to_string()))
        .unwrap();
    assert!(pieces.len() > 1, "one piece per token, not one at the end");
    let streamed: String = pieces.concat();
    assert_eq!(
        Some(streamed.as_str()),
        chat.messages()[1].content(),
        "the streamed text is the reply kept in the conversation"
    );
}

#[test]
fn settings_apply_and_bad_values_are_refused() {
    let engine = engine();
    let mut chat = ChatSession::new(&engine, 256, 64, settings(8)).unwrap();
    chat.apply(Setting::Temperature(0.3)).unwrap();
    chat.apply(Setting::TopK(5)).unwrap();
    chat.apply(Setting::Seed(7)).unwrap();
    chat.apply(Setting::MaxTokens(None)).unwrap();
    chat.apply(Setting::Verbose(false)).unwrap();
    let s = chat.settings();
    assert_eq!(s.sampling.temperature, 0.3);
    assert_eq!(s.sampling.top_k, 5);
    assert_eq!(s.sampling.seed, 7);
    assert_eq!(s.max_tokens, None);
    assert!(!s.verbose);
    assert!(chat.apply(Setting::TopP(1.5)).is_err());
    assert!(chat.apply(Setting::Temperature(-1.0)).is_err());
    assert_eq!(
        chat.settings().sampling.top_p,
        0.95,
        "a refused value changes nothing"
    );

    // The same seed gives the same sampled reply.
    chat.apply(Setting::MaxTokens(Some(12))).unwrap();
    chat.apply(Setting::Seed(42)).unwrap();
    let a = turn(&mut chat, "Hello");
    chat.clear();
    chat.apply(Setting::Seed(42)).unwrap();
    let b = turn(&mut chat, "Hello");
    assert_eq!(a, b);
}

#[test]
fn save_and_load_round_trip() {
    let engine = engine();
    let mut chat = ChatSession::new(&engine, 256, 64, settings(8)).unwrap();
    chat.set_system(Some("Be brief.".into()));
    turn(&mut chat, "Hello");
    let path = temp_dir("chat-save").join("conv.json");
    assert_eq!(chat.save(&path).unwrap(), 3);
    let conv = Conversation::from_file(&path).unwrap();
    assert_eq!(conv, chat.conversation());

    let mut other = ChatSession::new(&engine, 256, 64, settings(8)).unwrap();
    other.load(conv);
    assert_eq!(other.system(), Some("Be brief."));
    assert_eq!(other.messages(), chat.messages());

    let bad = temp_dir("chat-save").join("no-such-dir").join("x.json");
    let err = chat.save(&bad).unwrap_err().to_string();
    assert!(err.contains("x.json"), "{err}");
}

#[test]
fn clear_keeps_the_system_message_and_the_cached_system_prefix() {
    let engine = engine();
    let mut chat = ChatSession::new(&engine, 256, 64, settings(6)).unwrap();
    chat.set_system(Some("You answer in French.".into()));
    turn(&mut chat, "Hello");
    chat.clear();
    assert!(chat.messages().is_empty());
    assert_eq!(chat.system(), Some("You answer in French."));
    turn(&mut chat, "Bonjour");
    // The system turn is still in the cache.
    assert!(chat.last_turn().unwrap().reused_tokens >= 5);
}

#[test]
fn with_the_real_granite_tokenizer_the_second_turn_computes_only_the_new_message() {
    let Some(dir) = fixture_dir(SHARED_MODEL) else {
        return;
    };
    let engine = Engine::open_for_text(&gguf(SHARED_MODEL, &dir, "q8_0")).unwrap();
    let mut chat = ChatSession::new(&engine, 1024, 64, settings(24)).unwrap();
    chat.set_system(Some("Be brief.".into()));
    turn(&mut chat, "Name two uses of copper.");
    let t1 = chat.last_turn().unwrap().clone();
    let cached = chat.context_used();
    let p2 = chat.submit("And of granite?").unwrap();
    chat.reply(&AtomicBool::new(false), |_| {}).unwrap();
    let t2 = chat.last_turn().unwrap();
    let new_message = engine
        .tokenizer()
        .encode("<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>And of granite?<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>")
        .unwrap()
        .len();
    let expected = new_message + 1 - usize::from(t1.generation.stop == StopReason::EndOfText);
    assert_eq!(t2.reused_tokens, cached);
    assert_eq!(t2.generation.prompt_tokens_computed, expected);
    assert_eq!(p2.prompt_tokens, cached + expected);
}
