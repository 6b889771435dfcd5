//! Text to token ids and back, for Granite's byte-level BPE vocabulary.
//!
//! The work is done by Hugging Face's `tokenizers` crate, loaded from the `tokenizer.json` that the converter
//! embeds in the GGUF file (`tokenizer.huggingface.json`): the reference ids were made with that same library,
//! so matching them is a matter of loading the same file, not of re-implementing BPE and its pre-tokenizer regex.
//!
//! Files made by llama.cpp carry only `tokenizer.ggml.*` (tokens, token types, merges and the name of a
//! pre-tokenizer). From those, [`Tokenizer::from_gguf`] writes the equivalent `tokenizer.json` and loads it the
//! same way, so there is still one implementation of encoding, decoding and streaming. See
//! [`Tokenizer::from_gguf`] for which `tokenizer.ggml.pre` values are understood and why `refact` is read as
//! Granite's Hugging Face split rather than as llama.cpp's.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use quarry_quantize::gguf::{Array, GgufFile, Value};
use tokenizers::{
    DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
};

/// GGUF key holding the whole Hugging Face `tokenizer.json` as one string (GGUF spec, "tokenizer.huggingface").
pub const GGUF_HF_JSON_KEY: &str = "tokenizer.huggingface.json";
/// GGUF key of the end-of-text id, where generation stops.
pub const GGUF_EOS_KEY: &str = "tokenizer.ggml.eos_token_id";
/// Granite's `<|end_of_text|>`: BOS, EOS, PAD and UNK at once; used when a file does not say otherwise.
pub const DEFAULT_EOS_ID: u32 = 0;
/// GGUF key naming the tokenizer family; only `gpt2` (byte-level BPE, Granite's) is built from metadata.
pub const GGUF_GGML_MODEL_KEY: &str = "tokenizer.ggml.model";
/// GGUF key naming llama.cpp's pre-tokenizer (the regex split applied before BPE).
pub const GGUF_GGML_PRE_KEY: &str = "tokenizer.ggml.pre";
const GGUF_GGML_TOKENS_KEY: &str = "tokenizer.ggml.tokens";
const GGUF_GGML_TOKEN_TYPE_KEY: &str = "tokenizer.ggml.token_type";
const GGUF_GGML_MERGES_KEY: &str = "tokenizer.ggml.merges";
const GGUF_GGML_ADD_BOS_KEY: &str = "tokenizer.ggml.add_bos_token";
const GGUF_GGML_ADD_EOS_KEY: &str = "tokenizer.ggml.add_eos_token";

/// The `tokenizer.ggml.pre` values [`Tokenizer::from_gguf`] understands, for error messages.
const SUPPORTED_PRE: &str = "`gpt-2`, `refact` (Granite) and `starcoder`";

/// llama.cpp's `token_type` values that are matched in text as whole tokens (`llama_token_type`): 2 unknown and
/// 3 control become special added tokens, 4 user-defined a plain added token.
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

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
        "{origin}: this GGUF file has no `{GGUF_HF_JSON_KEY}` and no `{GGUF_GGML_MODEL_KEY}`: it carries no \
         tokenizer; convert the model with `quarry quantize`"
    )]
    NoEmbeddedTokenizer { origin: String },
    #[error("{origin}: metadata `{key}` = {value:?} is not supported; {supported}")]
    Unsupported {
        origin: String,
        key: &'static str,
        value: String,
        supported: String,
    },
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
    #[error(
        "the text is {bytes} bytes: more than {max_tokens} tokens can hold (this vocabulary's tokens are at most \
         {token_bytes} bytes); shorten it"
    )]
    TooLong {
        bytes: usize,
        max_tokens: usize,
        token_bytes: usize,
    },
}

/// GPT-2's printable stand-ins for the 256 byte values, in byte order (byte-level BPE writes byte `b` as the
/// `b`-th of these).
fn gpt2_byte_alphabet() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut shifted = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).unwrap_or('?')
            }
        })
        .collect()
}

/// A loaded tokenizer. Cheap to share by reference; loading the 3.5 MB Granite `tokenizer.json` takes ~100 ms,
/// so load it once per model, not per request.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// A copy of `inner` that reads special-token strings as ordinary text, made on first use by
    /// [`Tokenizer::encode_as_text`] (a copy because the switch is a setting of the whole `tokenizers` object).
    text_only: OnceLock<tokenizers::Tokenizer>,
    /// The longest token's text in bytes, made on first use by [`Tokenizer::encode_at_most`].
    longest_token: OnceLock<usize>,
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

/// A panic of the `tokenizers` crate on `origin`'s data, as the error it should have been.
fn contained_panic(origin: &str, panic: String) -> TokenizerError {
    TokenizerError::Parse {
        origin: origin.to_string(),
        message: format!(
            "the tokenizer library failed on this data ({panic}); the tokenizer is malformed: \
             re-download or re-convert the model"
        ),
    }
}

impl Tokenizer {
    /// The tokenizer of a GGUF file, with its end-of-text id (`tokenizer.ggml.eos_token_id`, else 0).
    ///
    /// The embedded `tokenizer.huggingface.json` is used when present (files made by `quarry quantize`). Otherwise
    /// the tokenizer is rebuilt from `tokenizer.ggml.*` (files made by llama.cpp): `tokenizer.ggml.model` must be
    /// `gpt2`, and `tokenizer.ggml.pre` names the regex split done before BPE:
    ///
    /// * `gpt-2`: the GPT-2 regex, Hugging Face's `ByteLevel(use_regex)`.
    /// * `refact`: what llama.cpp's converter writes for Granite, because Granite's tokenizer gives the same ids
    ///   as Refact's on the converter's check text. llama.cpp then cuts every digit out on its own before the
    ///   GPT-2 regex. Granite's own `tokenizer.json` does not: it is plain `ByteLevel(use_regex)`, and its
    ///   vocabulary has no token joining a digit to anything, which is why the two agree on that check text and
    ///   on every reference case. They differ only where whitespace comes right before a number. A run of
    ///   whitespace before a digit: for `"x  123"` Hugging Face gives `x Ġ Ġ 1 2 3` (the GPT-2 regex keeps one
    ///   space for `" 123"`) and llama.cpp `x ĠĠ 1 2 3` (the digit split leaves `"x  "`, whose spaces the GPT-2
    ///   regex keeps together); `"\n\n42"` likewise. A space before a non-ASCII numeral: for `"x ²"` Hugging Face
    ///   merges the space with the numeral's first byte (`x ĠÂ ²`), which llama.cpp's digit split prevents.
    ///   Granite was trained on the Hugging Face ids, so `refact` is read as the GPT-2 split here. Quarry runs only
    ///   Granite architectures, so a file it can run that says `refact` holds Granite's tokenizer.
    /// * `starcoder`: llama.cpp's definition, every digit alone and then the GPT-2 regex (which is also how
    ///   StarCoder's own `tokenizer.json` splits).
    ///
    /// Other tokenizer families and pre-tokenizers, a missing `tokenizer.ggml.pre`, and tokenizers that add BOS or
    /// EOS tokens are refused with an error naming the file and the value.
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

    /// Builds the tokenizer from llama.cpp's `tokenizer.ggml.*` keys by writing the `tokenizer.json` that says the
    /// same thing (BPE over the byte-level alphabet, the same ids, merges in rank order, control tokens as special
    /// added tokens) and loading it like any other, so encoding, decoding and streaming keep one implementation.
    fn from_ggml_metadata(gguf: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let file = gguf.path().display().to_string();
        let bad = |key: &'static str, problem: String| TokenizerError::BadMetadata {
            origin: file.clone(),
            key,
            problem,
        };
        let unsupported =
            |key: &'static str, value: &str, supported: String| TokenizerError::Unsupported {
                origin: file.clone(),
                key,
                value: value.to_string(),
                supported,
            };
        let string = |key: &'static str| match gguf.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| bad(key, format!("is {}, not a string", v.summary()))),
        };

        let Some(model) = string(GGUF_GGML_MODEL_KEY)? else {
            return Err(TokenizerError::NoEmbeddedTokenizer { origin: file });
        };
        if model != "gpt2" {
            return Err(unsupported(
                GGUF_GGML_MODEL_KEY,
                model,
                "only `gpt2` (byte-level BPE, Granite's tokenizer) can be built from metadata"
                    .into(),
            ));
        }
        let pre = string(GGUF_GGML_PRE_KEY)?.ok_or_else(|| {
            bad(
                GGUF_GGML_PRE_KEY,
                format!(
                    "is missing, so the regex split before BPE is unknown (Quarry knows {SUPPORTED_PRE}); \
                     llama.cpp would guess and warn that quality is degraded"
                ),
            )
        })?;
        let pre_tokenizer = pre_tokenizer_json(pre).ok_or_else(|| {
            unsupported(
                GGUF_GGML_PRE_KEY,
                pre,
                format!("Quarry knows {SUPPORTED_PRE}"),
            )
        })?;
        // Granite's tokenizer adds nothing around the text; one that adds BOS or EOS is not a Granite tokenizer,
        // and silently encoding without them would shift every position the model was trained on.
        for key in [GGUF_GGML_ADD_BOS_KEY, GGUF_GGML_ADD_EOS_KEY] {
            if gguf.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(unsupported(
                    key,
                    "true",
                    "a tokenizer that adds BOS/EOS tokens is not Granite's and is not built from metadata".into(),
                ));
            }
        }

        let tokens =
            string_array(gguf, GGUF_GGML_TOKENS_KEY).map_err(|p| bad(GGUF_GGML_TOKENS_KEY, p))?;
        if tokens.is_empty() {
            return Err(bad(GGUF_GGML_TOKENS_KEY, "is empty".into()));
        }
        // llama.cpp reads a missing type list as "all normal": nothing is matched as a whole token in text.
        let token_types = match gguf.get(GGUF_GGML_TOKEN_TYPE_KEY) {
            None => vec![1; tokens.len()],
            Some(v) => v
                .as_array()
                .and_then(|a| a.to_i64_vec())
                .filter(|types| types.len() == tokens.len())
                .ok_or_else(|| {
                    bad(
                        GGUF_GGML_TOKEN_TYPE_KEY,
                        format!(
                            "is {}, not one integer per token ({} tokens)",
                            v.summary(),
                            tokens.len()
                        ),
                    )
                })?,
        };
        let merges =
            string_array(gguf, GGUF_GGML_MERGES_KEY).map_err(|p| bad(GGUF_GGML_MERGES_KEY, p))?;

        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added_tokens = Vec::new();
        for (id, (token, &token_type)) in tokens.iter().zip(&token_types).enumerate() {
            if let Some(first) = vocab.insert(token.clone(), id.into()) {
                return Err(bad(
                    GGUF_GGML_TOKENS_KEY,
                    format!("has {token:?} at both id {first} and id {id}"),
                ));
            }
            let special = match token_type {
                TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL => true,
                TOKEN_TYPE_USER_DEFINED => false,
                _ => continue,
            };
            added_tokens.push(serde_json::json!({
                "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": special
            }));
        }
        let merges = merges
            .iter()
            .enumerate()
            .map(|(rank, merge)| {
                // llama.cpp splits at the first space after the first character; byte-level pieces hold no space.
                merge
                    .char_indices()
                    .nth(1)
                    .and_then(|(second, _)| merge[second..].find(' ').map(|at| at + second))
                    .map(|at| [&merge[..at], &merge[at + 1..]])
                    .ok_or_else(|| {
                        bad(
                            GGUF_GGML_MERGES_KEY,
                            format!(
                                "entry {rank} ({merge:?}) is not two tokens separated by a space"
                            ),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": added_tokens,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges
            }
        });
        let origin = format!("{file} (tokenizer.ggml.*)");
        let inner = crate::contain::contain(|| serde_json::from_value(json))
            .map_err(|panic| contained_panic(&origin, panic))?
            .map_err(|e| TokenizerError::Parse {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
        Self::from_hf(inner, origin)
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

    pub(crate) fn from_json_str_labelled(
        json: &str,
        origin: String,
    ) -> Result<Tokenizer, TokenizerError> {
        let inner: tokenizers::Tokenizer = crate::contain::contain(|| json.parse())
            .map_err(|panic| contained_panic(&origin, panic))?
            .map_err(|e: tokenizers::Error| TokenizerError::Parse {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
        Self::from_hf(inner, origin)
    }

    fn from_hf(inner: tokenizers::Tokenizer, origin: String) -> Result<Tokenizer, TokenizerError> {
        let tables = crate::contain::contain(|| {
            let vocab_size = inner.get_vocab_size(true);
            let special_ids = inner
                .get_added_tokens_decoder()
                .into_iter()
                .filter(|(_, token)| token.special)
                .map(|(id, _)| id)
                .collect();
            // Some of the library's panics wait for the first text (a post-processor naming a token it does
            // not define, a zero-length split): meet them here, at load, where the file can still be named. An
            // error (not a panic) is left for the text that causes it.
            if let Ok(probe) = inner.encode_fast("Hello, world! 123", true) {
                let _ = inner.decode(probe.get_ids(), false);
            }
            (vocab_size, special_ids)
        });
        let (vocab_size, special_ids) = tables.map_err(|panic| contained_panic(&origin, panic))?;
        Ok(Tokenizer {
            inner,
            text_only: OnceLock::new(),
            longest_token: OnceLock::new(),
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
    /// [`Tokenizer::encode`] for a text that must fit `max_tokens` tokens (a context): a text so long that it
    /// cannot is refused by its length before any of it is tokenized, which costs about 150 bytes of memory per
    /// byte of text (a 10 MB prompt took 1.5 GB only to be refused). The result may still be longer than
    /// `max_tokens`; the caller says what to do then.
    pub fn encode_at_most(
        &self,
        text: &str,
        max_tokens: usize,
    ) -> Result<Vec<u32>, TokenizerError> {
        // Each token covers at most its own text's bytes of the input (a vocabulary entry's text is never
        // shorter than the input bytes it stands for); twice that leaves room for normalizers that shrink text.
        let token_bytes = *self.longest_token.get_or_init(|| {
            self.inner
                .get_vocab(true)
                .keys()
                .map(|t| t.len())
                .max()
                .unwrap_or(1)
                .max(1)
        });
        if text.len() > max_tokens.saturating_mul(token_bytes).saturating_mul(2) {
            return Err(TokenizerError::TooLong {
                bytes: text.len(),
                max_tokens,
                token_bytes,
            });
        }
        self.encode(text)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(&self.inner, text)
    }

    /// Encodes with `tokenizer` (the tokenizer's own, or its text-only copy). The text is a user's or a client's,
    /// so a panic of the library on it is contained and reported as an encoding error.
    fn encode_with(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        text: &str,
    ) -> Result<Vec<u32>, TokenizerError> {
        let error = |message: String| TokenizerError::Encode {
            origin: self.origin.clone(),
            message,
        };
        let encoding = crate::contain::contain(|| tokenizer.encode_fast(text, true))
            .map_err(|panic| error(format!("the tokenizer library failed ({panic})")))?
            .map_err(|e| error(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` read as plain text: a special token written in it (`<|end_of_text|>`) is tokenized like
    /// any other characters, not turned into its id. This is how llama.cpp's tools read data files
    /// (`llama-perplexity` tokenizes with `parse_special = false`), so a corpus that happens to contain such a
    /// string is scored as the text it is.
    pub fn encode_as_text(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let text_only = self.text_only.get_or_init(|| {
            let mut copy = self.inner.clone();
            copy.set_encode_special_tokens(true);
            copy
        });
        self.encode_with(text_only, text)
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

    /// The bytes each id stands for, index = id, as a grammar engine matches them against text: byte-level pieces
    /// mapped back through the GPT-2 alphabet (`Ġ` is a space), `<0xNN>` byte-fallback pieces as that byte, other
    /// pieces as their text with `▁` read as a space. Special tokens are `None`: they are no text at all.
    pub fn token_bytes(&self) -> Vec<Option<Vec<u8>>> {
        let byte_level = matches!(self.inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        let unicode_to_byte: HashMap<char, u8> = gpt2_byte_alphabet()
            .into_iter()
            .enumerate()
            .map(|(b, c)| (c, b as u8))
            .collect();
        (0..self.vocab_size as u32)
            .map(|id| {
                if self.is_special(id) {
                    return None;
                }
                let piece = self.inner.id_to_token(id)?;
                if byte_level {
                    piece
                        .chars()
                        .map(|c| unicode_to_byte.get(&c).copied())
                        .collect()
                } else if let Some(hex) =
                    piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'))
                {
                    u8::from_str_radix(hex, 16).ok().map(|b| vec![b])
                } else {
                    Some(piece.replace('\u{2581}', " ").into_bytes())
                }
            })
            .collect()
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

/// The strings of a string-array key, or what is wrong with it.
fn string_array<'a>(gguf: &'a GgufFile, key: &str) -> Result<&'a [String], String> {
    match gguf.get(key) {
        None => Err("is missing".into()),
        Some(Value::Array(Array::String(strings))) => Ok(strings),
        Some(other) => Err(format!("is {}, not an array of strings", other.summary())),
    }
}

/// The Hugging Face pre-tokenizer equivalent to llama.cpp's `tokenizer.ggml.pre` (see [`Tokenizer::from_gguf`]).
fn pre_tokenizer_json(pre: &str) -> Option<serde_json::Value> {
    // The GPT-2 regex split and the byte-to-character mapping, exactly as Granite's tokenizer.json has them.
    let gpt2 = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    match pre {
        "gpt-2" | "refact" => Some(gpt2),
        "starcoder" => Some(serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "\\p{N}"}, "behavior": "Isolated", "invert": false},
                gpt2
            ]
        })),
        _ => None,
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
        for (i, piece) in gpt2_byte_alphabet().into_iter().enumerate() {
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

    #[test]
    fn token_bytes_are_the_text_each_id_stands_for() {
        let t = byte_tokenizer();
        let bytes = t.token_bytes();
        assert_eq!(bytes.len(), 259);
        assert_eq!(bytes[0], None, "<|end_of_text|> is special");
        assert_eq!(bytes[258], None);
        assert_eq!(bytes[257].as_deref(), Some(&b"ab"[..]));
        // Every byte, the unprintable ones (stored as shifted characters) included, maps back to itself.
        for b in 0..=255u8 {
            let id = t
                .token_to_id(&gpt2_byte_alphabet()[b as usize].to_string())
                .unwrap();
            assert_eq!(bytes[id as usize].as_deref(), Some(&[b][..]), "byte {b}");
        }
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

    /// `byte_tokenizer` described as llama.cpp describes it, plus a `ĠĠ` merge that shows the pre-tokenizer.
    fn ggml_metadata(pre: &str) -> Vec<(String, Value)> {
        let mut tokens = vec!["<|end_of_text|>".to_string()];
        tokens.extend(gpt2_byte_alphabet().into_iter().map(String::from));
        tokens.extend(["ab", "<|start_of_role|>", "ĠĠ"].map(String::from));
        let mut types = vec![1; tokens.len()];
        (types[0], types[258]) = (3, 3);
        vec![
            (GGUF_GGML_MODEL_KEY.into(), Value::String("gpt2".into())),
            (GGUF_GGML_PRE_KEY.into(), Value::String(pre.into())),
            (
                GGUF_GGML_TOKENS_KEY.into(),
                Value::Array(Array::String(tokens)),
            ),
            (
                GGUF_GGML_TOKEN_TYPE_KEY.into(),
                Value::Array(Array::I32(types)),
            ),
            (
                GGUF_GGML_MERGES_KEY.into(),
                Value::Array(Array::String(vec!["a b".into(), "Ġ Ġ".into()])),
            ),
            (GGUF_EOS_KEY.into(), Value::U32(0)),
        ]
    }

    #[test]
    fn from_ggml_metadata_encodes_like_the_json_tokenizer() {
        let json = byte_tokenizer();
        let rebuilt = Tokenizer::from_gguf(&gguf_with(ggml_metadata("gpt-2"))).unwrap();
        assert_eq!(rebuilt.vocab_size(), 260);
        assert_eq!(rebuilt.origin(), "mem.gguf (tokenizer.ggml.*)");
        for text in [
            "ab",
            "<|start_of_role|>a",
            "é",
            "x🎉 ab<|end_of_text|>",
            "a  1",
        ] {
            let ids = rebuilt.encode(text).unwrap();
            if !text.contains("  ") {
                assert_eq!(ids, json.encode(text).unwrap(), "{text:?}");
            }
            assert_eq!(rebuilt.decode(&ids, false).unwrap(), text);
        }
        assert!(rebuilt.is_special(0) && rebuilt.is_special(258) && !rebuilt.is_special(257));
        assert_eq!(rebuilt.decode(&[258, 257, 0], true).unwrap(), "ab");
        // Special-token text read as text: byte by byte here, as there are no merges for it.
        assert_eq!(rebuilt.encode_as_text("<|end_of_text|>").unwrap().len(), 15);
        assert_eq!(json.encode_as_text("a<|start_of_role|>").unwrap().len(), 18);
    }

    #[test]
    fn pre_tokenizers_split_whitespace_before_digits_as_named() {
        let piece_ids = |pre: &str, text: &str| {
            Tokenizer::from_gguf(&gguf_with(ggml_metadata(pre)))
                .unwrap()
                .encode(text)
                .unwrap()
        };
        // Byte b is id b + 1 in `ggml_metadata`.
        let (space, pair, x, y, one, two) = (33, 259, 121, 122, 50, 51);
        // GPT-2 (Granite's HF split): `"x  12"` is `x`, `" "`, `" 12"`, so the two spaces never meet.
        assert_eq!(piece_ids("gpt-2", "x  12"), [x, space, space, one, two]);
        assert_eq!(piece_ids("refact", "x  12"), [x, space, space, one, two]);
        // llama.cpp's refact/starcoder split: digits first leaves `"x  "`, whose spaces stay together.
        assert_eq!(piece_ids("starcoder", "x  12"), [x, pair, one, two]);
        // Before a letter, GPT-2 keeps all but the last space of a run together too.
        assert_eq!(piece_ids("gpt-2", "x  y"), [x, space, space, y]);
        assert_eq!(piece_ids("gpt-2", "x   y"), [x, pair, space, y]);
    }

    #[test]
    fn unsupported_ggml_metadata_is_a_clear_error() {
        let with = |key: &str, value: Value| {
            let mut meta = ggml_metadata("gpt-2");
            meta.retain(|(k, _)| k != key);
            meta.push((key.to_string(), value));
            Tokenizer::from_gguf(&gguf_with(meta))
                .unwrap_err()
                .to_string()
        };
        let err = with(GGUF_GGML_PRE_KEY, Value::String("qwen2".into()));
        assert_eq!(
            err,
            "mem.gguf: metadata `tokenizer.ggml.pre` = \"qwen2\" is not supported; Quarry knows \
             `gpt-2`, `refact` (Granite) and `starcoder`"
        );
        let err = with(GGUF_GGML_MODEL_KEY, Value::String("llama".into()));
        assert!(
            err.contains("`tokenizer.ggml.model` = \"llama\" is not supported; only `gpt2`"),
            "{err}"
        );
        let err = with(GGUF_GGML_MODEL_KEY, Value::U32(3));
        assert!(
            err.contains("`tokenizer.ggml.model` is 3, not a string"),
            "{err}"
        );
        let mut tokens = vec!["<|end_of_text|>".to_string()];
        tokens.extend(gpt2_byte_alphabet().into_iter().map(String::from));
        tokens.extend(["ab", "<|start_of_role|>", "a"].map(String::from));
        let err = with(GGUF_GGML_TOKENS_KEY, Value::Array(Array::String(tokens)));
        assert!(err.contains("has \"a\" at both id 98 and id 259"), "{err}");
        let err = with(
            GGUF_GGML_TOKEN_TYPE_KEY,
            Value::Array(Array::I32(vec![1; 3])),
        );
        assert!(
            err.contains("is [I32; 3], not one integer per token (260 tokens)"),
            "{err}"
        );
        let err = with(
            GGUF_GGML_MERGES_KEY,
            Value::Array(Array::String(vec!["a z".into()])),
        );
        assert!(
            err.starts_with("mem.gguf (tokenizer.ggml.*): not a valid"),
            "{err}"
        );
        let err = with(GGUF_GGML_MERGES_KEY, Value::U8(0));
        assert!(
            err.contains("`tokenizer.ggml.merges` is 0, not an array of strings"),
            "{err}"
        );
        let err = with("tokenizer.ggml.add_eos_token", Value::Bool(true));
        assert!(
            err.contains("`tokenizer.ggml.add_eos_token` = \"true\" is not supported"),
            "{err}"
        );
        let err = with(GGUF_EOS_KEY, Value::U32(260));
        assert!(
            err.contains("is 260, outside the vocabulary of 260 tokens"),
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
