#![no_main]
//! A hostile Hugging Face snapshot through the converter (`harness::convert`).

#[path = "../harness.rs"]
mod harness;

use std::path::PathBuf;
use std::sync::OnceLock;

/// A folder of this process's own under the temporary directory, rewritten for every input.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        std::env::temp_dir().join(format!("quarry-fuzz-convert-{}", std::process::id()))
    })
}

libfuzzer_sys::fuzz_target!(init: quarry::contain::quiet_hook(), |data: &[u8]| harness::convert(data, scratch()));
