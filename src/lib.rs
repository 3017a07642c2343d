//! # aep-s3-rotator
//!
//! Keeps Adobe Experience Platform (AEP) Flow Service S3 *base connections*
//! supplied with fresh, temporary AWS credentials.
//!
//! ## Data flow
//!
//! ```text
//!   config ──► Config (validated)
//!                 │
//!   sts ──────────┼──► CredentialCache (one STS call per identity and cycle)
//!                 │            │
//!   ims ──────────┼──► TokenCache (one IMS token, single flight)
//!                 │            │
//!                 ▼            ▼
//!   daemon (scheduler: one loop, a deadline heap, sleeps until the next due time)
//!                 │ dispatches due connections, at most `concurrency` at once
//!                 ▼
//!   rotation (one job: credentials → token → PATCH with If-Match, 412 → re-GET)
//!                 │ outcome
//!                 ▼
//!   schedule / backoff (pure policy: next rotation, retry wait, escalation)
//!                 │
//!                 ▼
//!   telemetry (status board + Prometheus metrics) ─► admin (HTTP), notify (systemd), state (file)
//! ```
//!
//! The binary (`src/main.rs`) only parses the command line, sets up logging,
//! loads the configuration and maps the result of [`app`] to an exit code.
//! The strict loopback simulator of the three remote APIs lives in its own
//! crate (`crates/aep-s3-simulator`): a dev-dependency of the tests and, behind
//! the default-on `demo` feature, the engine of `demo`. A build with
//! `--no-default-features` has no simulator code in it.

pub mod admin;
pub mod app;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod flow;
pub mod fsguard;
pub mod http;
pub mod ims;
pub mod logging;
pub mod notify;
pub mod rotation;
pub mod schedule;
pub mod shaping;
pub mod shutdown;
pub mod state;
pub mod sts;
pub mod telemetry;
