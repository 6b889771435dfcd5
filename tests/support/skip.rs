//! The rule for a test that needs what only `../shared` holds (the real Granite tokenizer, llama.cpp's own GGUF
//! files, the fixtures that are not committed): on a developer's machine without it, the test says `SKIPPED ...` on
//! stderr and returns; in CI (`CI` set to anything but empty, `0` or `false`) it fails instead, so that a missing
//! fixture can never pass there unnoticed.
//!
//! One file for both test crates: the runtime's tests have it as `support::skip`, the converter's compile it into
//! their own `support` module by path.

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;

/// The environment variable that says a run is CI's (`CI=true bash .ci/run`).
pub const CI_ENV: &str = "CI";

/// Whether `ci`, the value of [`CI_ENV`] (if set), says this is a CI run: set to anything but empty, `0` or
/// `false` (in any case, spaces around ignored).
pub fn is_ci(ci: Option<&OsStr>) -> bool {
    ci.is_some_and(|v| {
        let v = v.to_string_lossy();
        let v = v.trim();
        !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false")
    })
}

/// `what` cannot be checked because `missing` is not there: SKIPPED on a developer's machine, a failure in CI.
pub fn skipped(what: &str, missing: &Path) {
    skip_or_fail(std::env::var_os(CI_ENV).as_deref(), what, missing);
}

/// [`skipped`] with the value of [`CI_ENV`] given rather than read.
pub fn skip_or_fail(ci: Option<&OsStr>, what: &str, missing: &Path) {
    if is_ci(ci) {
        panic!(
            "{what}: {} not found, and {CI_ENV}={} says this is a CI run, where a test must not pass by skipping: \
             put ../shared beside the project (the real Granite tokenizer, llama.cpp's GGUF files, the fixtures not \
             committed)",
            missing.display(),
            ci.unwrap_or_default().to_string_lossy()
        );
    }
    // Straight to stderr: the test harness captures `eprintln!` of passing tests, and a skip must show.
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED {what}: {} not found (the real Granite tokenizer, llama.cpp's files and some fixtures are not \
         committed; they live in ../shared)",
        missing.display()
    );
}
