//! A synthetic byte-level BPE tokenizer of any size from 260 to 65 796 tokens, written as a Hugging Face
//! `tokenizer.json` so that it goes through the converter's own tokenizer code: the `tokenizer.ggml.*` keys and
//! the embedded `tokenizer.huggingface.json` then describe the same tokenizer by construction, and both llama.cpp
//! and quarry load it.
//!
//! Layout (Granite's conventions, so tools that assume them work): id 0 `<|end_of_text|>` (BOS, EOS, PAD, UNK);
//! ids 1..=256 the bytes 0..=255 in GPT-2's byte-to-character alphabet; then two-byte merges, common English
//! letters first, so text tokenizes into plausibly fewer tokens than bytes; the last three ids are Granite's role
//! and tool-call markers, which a small Granite-style chat template uses.

use std::path::PathBuf;

use serde_json::{Map, Value, json};

use crate::convert::vocab::TokenizerSources;
use crate::error::ConvertError;

const END_OF_TEXT: &str = "<|end_of_text|>";
const ROLE_TOKENS: [&str; 3] = ["<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"];
/// `<|end_of_text|>`, the 256 bytes, the three role tokens.
pub const MIN_SYNTHETIC_VOCAB_SIZE: usize = 1 + 256 + ROLE_TOKENS.len();
/// Every two-byte merge used once.
pub const MAX_SYNTHETIC_VOCAB_SIZE: usize = MIN_SYNTHETIC_VOCAB_SIZE + 256 * 256;

/// Granite's chat layout (`<|start_of_role|>ROLE<|end_of_role|>CONTENT<|end_of_text|>` and a newline per message),
/// without its tool and document sections: enough for `quarry run` and chat on a synthetic model.
const SYNTHETIC_CHAT_TEMPLATE: &str = "{%- for message in messages %}\
{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}";

/// Bytes in the order their pairs are merged: English letters by frequency, digits, punctuation, then the rest.
const COMMON_BYTES: &[u8] =
    b" etaoinsrhldcumfpgwybvkxjqzETAOINSRHLDCUMFPGWYBVKXJQZ0123456789\n.,'\"-:;!?()";

/// The tokenizer files of a synthetic vocabulary of `vocab_size` tokens.
pub fn synthetic_tokenizer(vocab_size: usize) -> Result<TokenizerSources, ConvertError> {
    if !(MIN_SYNTHETIC_VOCAB_SIZE..=MAX_SYNTHETIC_VOCAB_SIZE).contains(&vocab_size) {
        return Err(ConvertError::SyntheticVocab {
            vocab_size,
            min: MIN_SYNTHETIC_VOCAB_SIZE,
            max: MAX_SYNTHETIC_VOCAB_SIZE,
        });
    }
    let pieces: Vec<char> = (0..=255u8).map(byte_level_char).collect();
    let mut vocab = Map::new();
    vocab.insert(END_OF_TEXT.into(), 0.into());
    for (byte, piece) in pieces.iter().enumerate() {
        vocab.insert(piece.to_string(), (byte + 1).into());
    }
    let n_merges = vocab_size - MIN_SYNTHETIC_VOCAB_SIZE;
    let mut merges = Vec::with_capacity(n_merges);
    for (left, right) in merge_order().into_iter().take(n_merges) {
        let (left, right) = (pieces[usize::from(left)], pieces[usize::from(right)]);
        vocab.insert(format!("{left}{right}"), vocab.len().into());
        merges.push(json!([left.to_string(), right.to_string()]));
    }
    let added_token = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let mut added_tokens = vec![added_token(0, END_OF_TEXT)];
    for (i, content) in ROLE_TOKENS.iter().enumerate() {
        added_tokens.push(added_token(vocab_size - ROLE_TOKENS.len() + i, content));
    }
    let byte_level = |add_prefix_space: bool, trim_offsets: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets,
               "use_regex": true})
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": byte_level(false, true),
        "post_processor": byte_level(true, false),
        "decoder": byte_level(true, true),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    let tokenizer_config: Map<String, Value> = [
        ("add_bos_token", json!(false)),
        ("add_prefix_space", json!(false)),
        ("bos_token", json!(END_OF_TEXT)),
        ("eos_token", json!(END_OF_TEXT)),
        ("pad_token", json!(END_OF_TEXT)),
        ("unk_token", json!(END_OF_TEXT)),
        ("chat_template", json!(SYNTHETIC_CHAT_TEMPLATE)),
        ("tokenizer_class", json!("GPT2Tokenizer")),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value))
    .collect();
    Ok(TokenizerSources {
        tokenizer_path: PathBuf::from("synthetic tokenizer.json"),
        tokenizer_json: tokenizer.to_string(),
        tokenizer_config_path: PathBuf::from("synthetic tokenizer_config.json"),
        tokenizer_config,
        generation_config: Map::new(),
        model_config: Map::new(),
        chat_template_jinja: None,
    })
}

/// Every ordered pair of bytes once, those of common bytes first: the pairs of the `n` most common bytes come
/// before any pair involving a less common one.
fn merge_order() -> Vec<(u8, u8)> {
    let mut by_frequency: Vec<u8> = COMMON_BYTES.to_vec();
    by_frequency.extend((0..=255u8).filter(|b| !COMMON_BYTES.contains(b)));
    let mut order = Vec::with_capacity(256 * 256);
    for (newest, &new) in by_frequency.iter().enumerate() {
        for &older in &by_frequency[..newest] {
            order.push((older, new));
            order.push((new, older));
        }
        order.push((new, new));
    }
    order
}

/// GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes (controls, space,
/// DEL, NBSP, soft hyphen) for U+0100.. in byte order, so every token is printable and has no spaces.
fn byte_level_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        return char::from(byte);
    }
    let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
    // 0x100 + rank is at most U+0143, a valid scalar value.
    char::from_u32(0x100 + rank).unwrap_or(char::REPLACEMENT_CHARACTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_alphabet() {
        assert_eq!(byte_level_char(b'a'), 'a');
        assert_eq!(byte_level_char(b' '), '\u{0120}'); // 'Ġ'
        assert_eq!(byte_level_char(0), '\u{0100}');
        assert_eq!(byte_level_char(b'\n'), '\u{010A}'); // 'Ċ'
        assert_eq!(byte_level_char(0xAD), '\u{0143}');
        let mut all: Vec<char> = (0..=255u8).map(byte_level_char).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn merges_cover_every_pair_once_common_letters_first() {
        let order = merge_order();
        assert_eq!(order.len(), 256 * 256);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256 * 256);
        assert_eq!(
            &order[..4],
            &[(b' ', b' '), (b' ', b'e'), (b'e', b' '), (b'e', b'e')]
        );
    }

    #[test]
    fn sizes_outside_the_layout_are_refused() {
        for size in [MIN_SYNTHETIC_VOCAB_SIZE - 1, MAX_SYNTHETIC_VOCAB_SIZE + 1] {
            let err = synthetic_tokenizer(size).unwrap_err().to_string();
            assert!(err.contains("--tokenizer"), "{err}");
        }
        assert!(synthetic_tokenizer(MIN_SYNTHETIC_VOCAB_SIZE).is_ok());
    }
}
