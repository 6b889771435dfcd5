#![no_main]
//! A hostile GGUF file, from header to forward pass (`harness::gguf`).

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(init: quarry::contain::quiet_hook(), |data: &[u8]| harness::gguf(data));
