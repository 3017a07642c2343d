//! Pure scheduling policy, functions of `now`, the settings and a jitter
//! draw: when the next rotation is due (`schedule`) and how long a retry
//! waits (`backoff`), never past a connection's expiry.
//!
//! Owns: the numbers. May import: `clock`, `config` types; nothing that
//! does I/O.

pub mod backoff;
pub mod schedule;
