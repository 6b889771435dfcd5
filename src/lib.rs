//! Quarry runtime.
