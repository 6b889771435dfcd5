//! The rule of `support/skip.rs` itself: a test that needs `../shared` and does not find it passes with a SKIPPED
//! line on a developer's machine, and fails in CI, naming what is missing and where it was looked for.

mod support;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use support::skip::{CI_ENV, is_ci, skip_or_fail};

/// Set for the child run of this binary: the path that [`child_needs_something_missing`] is told is absent.
const CHILD_ENV: &str = "QUARRY_SKIP_RULE_CHILD";
const MISSING: &str = "/nonexistent/shared/fixtures/skip-rule-probe";

#[test]
fn what_counts_as_a_ci_run() {
    assert!(!is_ci(None));
    for off in ["", " ", "0", "false", "FALSE", "False"] {
        assert!(!is_ci(Some(OsStr::new(off))), "CI={off:?}");
    }
    for on in ["true", "1", "yes", "TRUE"] {
        assert!(is_ci(Some(OsStr::new(on))), "CI={on:?}");
    }
}

#[test]
fn under_ci_a_skip_is_a_failure_that_names_what_and_where() {
    let failure = std::panic::catch_unwind(|| {
        skip_or_fail(
            Some(OsStr::new("true")),
            "the probe fixture",
            Path::new(MISSING),
        )
    })
    .expect_err("a skip under CI=true must fail");
    let message = failure
        .downcast_ref::<String>()
        .expect("a formatted panic message");
    assert!(message.contains("the probe fixture"), "{message}");
    assert!(message.contains(MISSING), "{message}");
    assert!(message.contains("CI=true"), "{message}");
}

/// Only does anything when [`skips_and_failures_as_a_test_binary_sees_them`] runs it in a child process.
#[test]
#[ignore = "run by skips_and_failures_as_a_test_binary_sees_them, in a child process"]
fn child_needs_something_missing() {
    if let Some(missing) = std::env::var_os(CHILD_ENV) {
        support::skipped("the probe fixture", Path::new(&missing));
    }
}

/// This binary's own ignored test, run with `CI` as given (unset when `None`).
fn child(ci: Option<&str>) -> Output {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
    cmd.args([
        "--ignored",
        "--exact",
        "child_needs_something_missing",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, MISSING);
    match ci {
        Some(v) => cmd.env(CI_ENV, v),
        None => cmd.env_remove(CI_ENV),
    };
    cmd.output().expect("the test binary runs")
}

/// The whole path a real test takes (`support::skipped`, reading `CI` from the environment), in a test binary.
#[test]
fn skips_and_failures_as_a_test_binary_sees_them() {
    let text = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    for ci in [None, Some("0"), Some("false"), Some("")] {
        let out = child(ci);
        let all = text(&out);
        assert!(out.status.success(), "CI={ci:?}: {all}");
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains(&format!("SKIPPED the probe fixture: {MISSING} not found")),
            "CI={ci:?}: {all}"
        );
    }
    let out = child(Some("true"));
    let all = text(&out);
    assert!(!out.status.success(), "CI=true must fail: {all}");
    assert!(all.contains("the probe fixture"), "{all}");
    assert!(all.contains(MISSING), "{all}");
    assert!(!all.contains("SKIPPED the probe fixture"), "{all}");
}
