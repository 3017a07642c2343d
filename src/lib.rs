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
//!   daemon (the loop: a deadline heap, a dispatch limit, a JoinSet keyed by task)
//!                 │ Event::Due / JobDone / Changed / Removed / Shutdown
//!                 ▼
//!   connection (one state per connection; apply(event, now, policy, draw) → Action)
//!                 │   uses schedule / backoff (pure policy: next rotation, retry wait, escalation)
//!                 │ Action::Dispatch(job)
//!                 ▼
//!   rotation (one job, behind the JobRunner trait: token → etag → credentials → S3 pre-push check → PATCH, 412 → re-GET)
//!                 │ JobResult, back to connection::apply
//!                 ▼
//!   views of the connection state: telemetry (status + metrics) ─► admin (HTTP),
//!   notify (systemd), state (file), the `once` report
//!
//!   coordination (optional, `[coordination]`): an elector holds a lease item
//!   in DynamoDB; its Leadership gates the daemon's dispatch, its Fence is
//!   checked by every job before each GET and PATCH, and the leader's
//!   connection state is shared in the same table (a view of `connection`).
//! ```
//!
//! Time is read through [`clock`]: the scheduler runs on a `Clock`, so tests
//! drive it with paused tokio time; every remote number is clamped there.
//!
//! The binary (`src/main.rs`) only parses the command line, sets up logging,
//! loads the configuration and maps the result of [`app`] to an exit code.
//! The strict loopback simulator of the three remote APIs lives in its own
//! crate (`crates/aep-s3-simulator`): a dev-dependency of the tests and, behind
//! the default-on `demo` feature, the engine of `demo`. A build with
//! `--no-default-features` has no simulator code in it.

pub mod app;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod connection;
pub mod coordination;
pub mod discovery;
pub mod exit;
pub mod fsguard;
pub mod ident;
pub mod observe;
pub mod policy;
pub mod remote;
pub mod rotation;
pub mod scheduler;
pub mod shutdown;
