#![no_main]
//! Hostile conversations through the real Granite templates, and hostile templates (`harness::chat_template`).

#[path = "../harness.rs"]
mod harness;

use std::path::Path;
use std::sync::OnceLock;

fn real() -> &'static harness::RealTemplates {
    static REAL: OnceLock<harness::RealTemplates> = OnceLock::new();
    REAL.get_or_init(|| {
        harness::RealTemplates::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
    })
}

libfuzzer_sys::fuzz_target!(init: quarry::contain::quiet_hook(), |data: &[u8]| harness::chat_template(data, real()));
