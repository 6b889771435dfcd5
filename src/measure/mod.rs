//! Measuring the runtime rather than running it: how fast ([`bench`](mod@bench), llama-bench's tests), how close
//! to the unquantized model ([`perplexity`], llama-perplexity's perplexity and KL divergence), and raw logits in a
//! file other tools read ([`npy`], for comparing with a reference outside Quarry). Nothing here is on the path of
//! `run` or `chat`; each sits on top of [`generate`](crate::generate) and [`model`](crate::model).

pub mod bench;
pub mod npy;
pub mod perplexity;
