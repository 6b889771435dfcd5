#![no_main]
//! Tool-call replies and a request's tool fields, as the server reads them (`harness::tool_reply`).

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(init: quarry::contain::quiet_hook(), |data: &[u8]| harness::tool_reply(data));
