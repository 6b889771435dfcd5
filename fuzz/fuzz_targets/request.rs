#![no_main]
//! Hostile request bodies to the OpenAI and ollama routes of an in-process server (`harness::request`).

#[path = "../harness.rs"]
mod harness;

use std::path::Path;
use std::sync::OnceLock;

fn server() -> &'static harness::LocalServer {
    static SERVER: OnceLock<harness::LocalServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        harness::LocalServer::start(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/gguf/dev-2-q8_0.gguf"),
        )
    })
}

libfuzzer_sys::fuzz_target!(init: quarry::contain::quiet_hook(), |data: &[u8]| harness::request(data, server()));
