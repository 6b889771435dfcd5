//! Panics inside dependencies, turned into errors where a file's or a request's content reaches them.
//!
//! Some libraries Quarry hands untrusted data to assert on what they parse instead of returning an error (the
//! `tokenizers` crate's deserializers unwrap on some malformed `tokenizer.json` files, for one). Quarry's own
//! code returns errors; at the few calls where such a library meets file or request content, [`contain`] runs
//! the call and turns a panic into the panic's message, so the caller can name the file and the command exits
//! with an error (or the server answers 400) instead of a crash. The binary installs [`quiet_hook`] so a
//! contained panic does not also print Rust's panic report: the error that follows says what happened.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};

thread_local! {
    /// How many [`contain`] calls this thread is inside.
    static CONTAINING: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f`; a panic inside it comes back as `Err` with the panic's message.
///
/// `f` must leave nothing half-changed that outlives it when it unwinds (hence no `UnwindSafe` bound): every
/// caller builds or reads a value that is dropped with the panic.
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    CONTAINING.with(|c| c.set(c.get() + 1));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(c.get() - 1));
    result.map_err(|payload| panic_message(payload.as_ref()))
}

/// The message a panic was raised with (`panic!("...")`'s text).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Installs a panic hook that stays silent for panics [`contain`] will turn into errors and reports every other
/// panic as before.
pub fn quiet_hook() {
    let report = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if CONTAINING.with(Cell::get) == 0 {
            report(info);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_the_thread_goes_on() {
        assert_eq!(contain(|| 7), Ok(7));
        assert_eq!(
            contain(|| -> u32 { panic!("bad merge at {}", 3) }),
            Err("bad merge at 3".to_string())
        );
        assert_eq!(
            contain(|| -> u32 { panic!("plain") }),
            Err("plain".to_string())
        );
        assert_eq!(CONTAINING.with(Cell::get), 0);
    }
}
