//! Text to token ids and back, for Granite's byte-level BPE vocabulary.
//!
//! The work is done by Hugging Face's `tokenizers` crate, loaded from the `tokenizer.json` that the converter
//! embeds in the GGUF file (`tokenizer.huggingface.json`): the reference ids were made with that same library,
//! so matching them is a matter of loading the same file, not of re-implementing BPE and its pre-tokenizer regex.
//! Files made by llama.cpp carry only `tokenizer.ggml.*`; [`Tokenizer::from_gguf`] has one place where building
//! from those will go.

use std::collections::HashSet;
use std::path::Path;

use quarry_quantize::gguf::{GgufFile, Value};
use tokenizers::{
    DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
};

/// GGUF key holding the whole Hugging Face `tokenizer.json` as one string (GGUF spec, "tokenizer.huggingface").
pub const GGUF_HF_JSON_KEY: &str = "tokenizer.huggingface.json";
/// GGUF key of the end-of-text id, where generation stops.
pub const GGUF_EOS_KEY: &str = "tokenizer.ggml.eos_token_id";
/// Granite's `<|end_of_text|>`: BOS, EOS, PAD and UNK at once; used when a file does not say otherwise.
pub const DEFAULT_EOS_ID: u32 = 0;

/// A tokenizer problem, naming where the tokenizer came from (a file, or a GGUF key inside a file).
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{origin}: cannot read the tokenizer: {source}")]
    Io {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{origin}: this GGUF file has no `{GGUF_HF_JSON_KEY}`; building the tokenizer from `tokenizer.ggml.*` \
         alone (as in files made by llama.cpp) is not supported yet: convert the model with `quarry quantize`"
    )]
    NoEmbeddedTokenizer { origin: String },
    #[error("{origin}: metadata `{key}` {problem}")]
    BadMetadata {
        origin: String,
        key: &'static str,
        problem: String,
    },
    #[error("{origin}: not a valid Hugging Face tokenizer.json: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: token id {id} is outside the vocabulary of {vocab_size} tokens")]
    IdOutOfRange {
        origin: String,
        id: u32,
        vocab_size: usize,
    },
    #[error("{origin}: encoding failed: {message}")]
    Encode { origin: String, message: String },
    #[error("{origin}: decoding failed: {message}")]
    Decode { origin: String, message: String },
}

/// A loaded tokenizer. Cheap to share by reference; loading the 3.5 MB Granite `tokenizer.json` takes ~100 ms,
/// so load it once per model, not per request.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it was loaded from, for error messages.
    origin: String,
    /// Number of ids, added tokens included (49155 for Granite); cached because `tokenizers` recounts on each call.
    vocab_size: usize,
    /// Ids of special added tokens (`<|end_of_text|>`, the role markers, ...), which decoding may skip.
    special_ids: HashSet<u32>,
    eos_id: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size)
            .field("eos_id", &self.eos_id)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// The tokenizer embedded in a GGUF file, with its end-of-text id (`tokenizer.ggml.eos_token_id`, else 0).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let file = gguf.path().display().to_string();
        let tokenizer = match gguf.get(GGUF_HF_JSON_KEY) {
            Some(Value::String(json)) => {
                Self::from_json_str_labelled(json, format!("{file} ({GGUF_HF_JSON_KEY})"))?
            }
            Some(other) => {
                return Err(TokenizerError::BadMetadata {
                    origin: file,
                    key: GGUF_HF_JSON_KEY,
                    problem: format!("is a {:?}, not a string", other.value_type()),
                });
            }
            None => Self::from_ggml_metadata(gguf)?,
        };
        let eos_id = match gguf.get(GGUF_EOS_KEY) {
            None => DEFAULT_EOS_ID,
            Some(v) => v
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| TokenizerError::BadMetadata {
                    origin: file.clone(),
                    key: GGUF_EOS_KEY,
                    problem: format!("is {}, not a token id", v.summary()),
                })?,
        };
        tokenizer.with_eos_id(eos_id).map_err(|e| match e {
            TokenizerError::IdOutOfRange { id, vocab_size, .. } => TokenizerError::BadMetadata {
                origin: file,
                key: GGUF_EOS_KEY,
                problem: format!("is {id}, outside the vocabulary of {vocab_size} tokens"),
            },
            other => other,
        })
    }

    /// The seam for GGUF files without an embedded `tokenizer.json` (llama.cpp's converter writes only
    /// `tokenizer.ggml.tokens`, `merges`, `token_type` and `pre`): a byte-level BPE can be rebuilt from those.
    fn from_ggml_metadata(gguf: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        Err(TokenizerError::NoEmbeddedTokenizer {
            origin: gguf.path().display().to_string(),
        })
    }

    /// A Hugging Face `tokenizer.json` read from disk (tests, and Hugging Face folders).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let json = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            origin: origin.clone(),
            source,
        })?;
        Self::from_json_str_labelled(&json, origin)
    }

    /// A Hugging Face `tokenizer.json` given as a string; the end-of-text id is 0 until [`Self::with_eos_id`].
    pub fn from_json_str(json: &str) -> Result<Tokenizer, TokenizerError> {
        Self::from_json_str_labelled(json, "tokenizer.json".to_string())
    }

    fn from_json_str_labelled(json: &str, origin: String) -> Result<Tokenizer, TokenizerError> {
        let inner: tokenizers::Tokenizer =
            json.parse()
                .map_err(|e: tokenizers::Error| TokenizerError::Parse {
                    origin: origin.clone(),
                    message: e.to_string(),
                })?;
        let vocab_size = inner.get_vocab_size(true);
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        Ok(Tokenizer {
            inner,
            origin,
            vocab_size,
            special_ids,
            eos_id: DEFAULT_EOS_ID,
        })
    }

    /// Sets the id that ends generation; it must be in the vocabulary.
    pub fn with_eos_id(mut self, eos_id: u32) -> Result<Tokenizer, TokenizerError> {
        self.check_id(eos_id)?;
        self.eos_id = eos_id;
        Ok(self)
    }

    /// Token ids of `text`. Special tokens written in the text (`<|start_of_role|>`, ...) become their ids, as
    /// `apply_chat_template(tokenize=True)` does; nothing is prepended (Granite's `add_bos_token` is false and its
    /// post-processor adds nothing).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| TokenizerError::Encode {
                origin: self.origin.clone(),
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, byte-exact for byte-level vocabularies. A sequence that ends inside a multi-byte
    /// character decodes to U+FFFD there; use [`Self::stream`] for output that arrives token by token.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        // `tokenizers` silently drops ids it does not know; a model emitting one is a bug worth hearing about.
        for &id in ids {
            self.check_id(id)?;
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode {
                origin: self.origin.clone(),
                message: e.to_string(),
            })
    }

    /// An incremental decoder for generated ids that never splits a UTF-8 character and, with `skip_special`,
    /// prints no special tokens (`<|end_of_text|>`, role markers).
    pub fn stream(&self, skip_special: bool) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            decoder: self.inner.decode_stream(skip_special),
            held: Vec::new(),
            skip_special,
        }
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id` as stored (byte-level pieces use the GPT-2 alphabet: `Ġ` for a space).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special added token, which `decode(.., true)` and a skipping stream leave out.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// The id that ends generation (Granite: 0, `<|end_of_text|>`).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Where this tokenizer was loaded from, as errors name it.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    fn check_id(&self, id: u32) -> Result<(), TokenizerError> {
        if (id as usize) < self.vocab_size {
            Ok(())
        } else {
            Err(TokenizerError::IdOutOfRange {
                origin: self.origin.clone(),
                id,
                vocab_size: self.vocab_size,
            })
        }
    }
}

type HfDecodeStream<'a> = tokenizers::DecodeStream<
    'a,
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Turns generated ids into printable text one id at a time.
///
/// A byte-level token can end in the middle of a UTF-8 character (an emoji is often three tokens); its text is
/// held back until the character is complete, so what is printed never contains a broken character.
/// `tokenizers`' `DecodeStream` does the incremental work; this adds the id check, cheap skipping of special
/// tokens and [`TokenStream::finish`], which hands out what is still held when generation stops.
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    decoder: HfDecodeStream<'a>,
    /// Ids given since text was last returned: their text is incomplete so far.
    held: Vec<u32>,
    skip_special: bool,
}

impl TokenStream<'_> {
    /// The text that `id` completes; empty while a character is still incomplete (or for a skipped special).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.tokenizer.check_id(id)?;
        if self.skip_special && self.tokenizer.is_special(id) {
            // Decoding would drop it anyway; not feeding it keeps the decoder's window from growing.
            return Ok(String::new());
        }
        let step = self.decoder.step(id).map_err(|e| TokenizerError::Decode {
            origin: self.tokenizer.origin.clone(),
            message: e.to_string(),
        })?;
        match step {
            Some(text) => {
                self.held.clear();
                Ok(text)
            }
            None => {
                self.held.push(id);
                Ok(String::new())
            }
        }
    }

    /// What is still held when the ids end: an incomplete character comes out as U+FFFD, as `decode` gives it.
    pub fn finish(self) -> Result<String, TokenizerError> {
        if self.held.is_empty() {
            return Ok(String::new());
        }
        self.tokenizer.decode(&self.held, self.skip_special)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny byte-level tokenizer: the 256 single-byte pieces (GPT-2 alphabet), one merge, and two special
    /// tokens, so multi-byte characters arrive one byte per token.
    fn byte_tokenizer() -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        vocab.insert("<|end_of_text|>".into(), 0.into());
        for (i, piece) in gpt2_alphabet().into_iter().enumerate() {
            vocab.insert(piece.to_string(), (i + 1).into());
        }
        vocab.insert("ab".into(), 257.into());
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 0, "content": "<|end_of_text|>", "single_word": false, "lstrip": false, "rstrip": false,
                 "normalized": false, "special": true},
                {"id": 258, "content": "<|start_of_role|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                              "use_regex": true},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                               "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": [["a", "b"]]}
        });
        Tokenizer::from_json_str(&json.to_string()).unwrap()
    }

    /// GPT-2's printable stand-ins for the 256 byte values, in byte order.
    fn gpt2_alphabet() -> Vec<char> {
        let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        let mut shifted = 0;
        (0u32..256)
            .map(|b| {
                if printable(b) {
                    char::from_u32(b).unwrap()
                } else {
                    shifted += 1;
                    char::from_u32(255 + shifted).unwrap()
                }
            })
            .collect()
    }

    #[test]
    fn encodes_bytes_merges_and_specials() {
        let t = byte_tokenizer();
        assert_eq!(t.vocab_size(), 259);
        assert_eq!(t.encode("ab").unwrap(), vec![257]);
        assert_eq!(t.encode("<|start_of_role|>a").unwrap(), vec![258, 98]);
        assert_eq!(t.encode("é").unwrap().len(), 2);
        assert_eq!(
            t.decode(&[258, 257, 0], false).unwrap(),
            "<|start_of_role|>ab<|end_of_text|>"
        );
        assert_eq!(t.decode(&[258, 257, 0], true).unwrap(), "ab");
        assert!(t.is_special(0) && t.is_special(258) && !t.is_special(257));
        assert_eq!(t.token_to_id("ab"), Some(257));
        assert_eq!(t.id_to_token(258).as_deref(), Some("<|start_of_role|>"));
    }

    #[test]
    fn stream_holds_partial_characters() {
        let t = byte_tokenizer();
        let text = "a🎉é!";
        let ids = t.encode(text).unwrap();
        assert_eq!(ids.len(), 1 + 4 + 2 + 1);
        let mut stream = t.stream(true);
        let pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(pieces, ["a", "", "", "", "🎉", "", "é", "!"]);
        assert_eq!(stream.finish().unwrap(), "");
    }

    #[test]
    fn stream_skips_or_keeps_specials() {
        let t = byte_tokenizer();
        let ids = t.encode("<|start_of_role|>ab<|end_of_text|>").unwrap();
        let mut skipping = t.stream(true);
        let mut keeping = t.stream(false);
        let (mut skipped, mut kept) = (String::new(), String::new());
        for &id in &ids {
            skipped += &skipping.push(id).unwrap();
            kept += &keeping.push(id).unwrap();
        }
        assert_eq!(skipped, "ab");
        assert_eq!(kept, "<|start_of_role|>ab<|end_of_text|>");
    }

    #[test]
    fn finish_flushes_an_incomplete_character() {
        let t = byte_tokenizer();
        let ids = t.encode("x🎉").unwrap();
        let mut stream = t.stream(true);
        let mut out = String::new();
        for &id in &ids[..3] {
            out += &stream.push(id).unwrap();
        }
        assert_eq!(out, "x");
        assert_eq!(stream.finish().unwrap(), "\u{FFFD}");
    }

    /// A small deterministic generator (64-bit LCG), so the random cases are the same on every run.
    fn pseudo_random_ids(seed: u64, len: usize, below: u32) -> Vec<u32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % u64::from(below)) as u32
            })
            .collect()
    }

    /// Arbitrary byte sequences (most are not valid UTF-8, as a model can produce): the stream must never fail,
    /// and what it prints, plus `finish`, must be exactly what decoding everything at once gives.
    #[test]
    fn stream_of_arbitrary_ids_adds_up_to_decode() {
        let t = byte_tokenizer();
        for seed in 0..300 {
            let ids = pseudo_random_ids(seed, 1 + (seed as usize % 17), 259);
            for skip_special in [false, true] {
                let mut stream = t.stream(skip_special);
                let mut streamed = String::new();
                for &id in &ids {
                    streamed += &stream.push(id).unwrap();
                }
                streamed += &stream.finish().unwrap();
                assert_eq!(
                    streamed,
                    t.decode(&ids, skip_special).unwrap(),
                    "{ids:?} skip {skip_special}"
                );
            }
        }
    }

    #[test]
    fn unknown_ids_are_errors() {
        let t = byte_tokenizer();
        let err = t.decode(&[1, 259], false).unwrap_err().to_string();
        assert!(
            err.contains("token id 259 is outside the vocabulary of 259"),
            "{err}"
        );
        assert!(t.stream(true).push(100_000).is_err());
        assert!(byte_tokenizer().with_eos_id(300).is_err());
    }

    #[test]
    fn bad_json_names_the_origin() {
        let err = Tokenizer::from_json_str("{\"model\": 3}")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("tokenizer.json: not a valid Hugging Face tokenizer.json"),
            "{err}"
        );
        let err = Tokenizer::from_file("/nonexistent/tokenizer.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/nonexistent/tokenizer.json: cannot read"),
            "{err}"
        );
    }

    fn gguf_with(meta: Vec<(String, Value)>) -> GgufFile {
        let bytes = quarry_quantize::gguf::GgufWriter::new(Vec::new(), &meta, Vec::new())
            .unwrap()
            .finish()
            .unwrap();
        GgufFile::from_bytes("mem.gguf", bytes).unwrap()
    }

    #[test]
    fn from_gguf_reads_the_embedded_json_and_eos() {
        let json = byte_tokenizer().inner.to_string(false).unwrap();
        let gguf = gguf_with(vec![
            (GGUF_HF_JSON_KEY.to_string(), Value::String(json.clone())),
            (GGUF_EOS_KEY.to_string(), Value::U32(258)),
        ]);
        let t = Tokenizer::from_gguf(&gguf).unwrap();
        assert_eq!((t.eos_id(), t.vocab_size()), (258, 259));
        assert_eq!(t.encode("ab").unwrap(), vec![257]);
        let t = Tokenizer::from_gguf(&gguf_with(vec![(
            GGUF_HF_JSON_KEY.to_string(),
            Value::String(json.clone()),
        )]))
        .unwrap();
        assert_eq!(t.eos_id(), 0);
        let err = Tokenizer::from_gguf(&gguf_with(vec![
            (GGUF_HF_JSON_KEY.to_string(), Value::String(json)),
            (GGUF_EOS_KEY.to_string(), Value::U32(4000)),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("mem.gguf: metadata `tokenizer.ggml.eos_token_id` is 4000, outside"),
            "{err}"
        );
    }

    #[test]
    fn from_gguf_without_json_is_a_clear_error() {
        let err = Tokenizer::from_gguf(&gguf_with(vec![]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("mem.gguf: this GGUF file has no `tokenizer.huggingface.json`"),
            "{err}"
        );
        let gguf = gguf_with(vec![(GGUF_HF_JSON_KEY.to_string(), Value::U32(1))]);
        let err = Tokenizer::from_gguf(&gguf).unwrap_err().to_string();
        assert!(
            err.contains("`tokenizer.huggingface.json` is a U32, not a string"),
            "{err}"
        );
        let gguf = gguf_with(vec![(
            GGUF_HF_JSON_KEY.to_string(),
            Value::String("[]".into()),
        )]);
        let err = Tokenizer::from_gguf(&gguf).unwrap_err().to_string();
        assert!(
            err.starts_with("mem.gguf (tokenizer.huggingface.json): not a valid"),
            "{err}"
        );
    }
}
