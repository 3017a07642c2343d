//! # aep-s3-rotator
//!
//! Keeps Adobe Experience Platform (AEP) Flow Service S3 *base connections*
//! supplied with fresh, temporary AWS credentials.
//!
//! ## The tree, top to bottom
//!
//! ```text
//!   main.rs          parse the command line, set up logging, map the result to an exit code
//!   commands/        one file per command: run · once · check · status · create · demo · rotate
//!   control/         the control socket `rotate` talks to (peer check, framing), and the
//!                    standby's way to the leader through the coordination table
//!   app.rs           the wiring every command shares: CA roots, the config as loaded,
//!                    the clients with the start's membership, [coordination] around a daemon
//!   scheduler/       the loop: deadline heaps (queue), a dispatch limit, jobs keyed by task;
//!                    readiness (pure: READY/STATUS/WATCHDOG), publish (snapshots out),
//!                    clients (built once, kept across reloads), reloads as a diff,
//!                    intake, replicas, identities (one shared StsRequest per identity),
//!                    table (the connections under integer keys the loop uses)
//!   persist/         the records of the snapshots kept, off the loop: one writer over a
//!                    StateTarget, the state file (file.rs) and the shared table (table.rs)
//!   discovery/       [[discover]] rules over listings (rules.rs is pure), the streamed start
//!   coordination/    the DynamoDB lease (leadership.rs: the role), the shared state's
//!                    table (Store), the local state file's format (local.rs)
//!   rotation/        one job over traits (seams.rs: FlowApi, TokenSource; S3Probe, the STS cache):
//!                    token → etag → credentials → S3 pre-push check → PATCH, 412 → re-read
//!   health.rs        [rotation] health_check_every: tests each connection; every answer
//!                    goes to the scheduler (Tested), a refused one with "rotate now"
//!   connection/      one state per connection, its numbers included; apply(event, now,
//!                    policy, draw) → Action is the only door (restore, adopt, listing: events)
//!   policy/          pure: when the next rotation is due, how long a retry waits
//!   observe/         what operators see: the snapshot and its words (status), what the
//!                    views read (views), process-wide counters (telemetry), the metrics
//!                    collector, admin endpoint, systemd notify, log formats
//!   remote/          the clients and their one HTTP policy: ims, sts (+ sts_cache), flow (+ wire), s3probe,
//!                    shaping (the request gate), http (caps, scrubbing), tls
//!   config/          types · raw · load · check (+ sections, identities): every problem with its key path
//!   ident.rs · scrub.rs · counters.rs · exit.rs · clock.rs · fsguard.rs · shutdown.rs · cli.rs
//!                    small shared nouns and seams (ids' shapes, safe remote text, exit codes, time)
//! ```
//!
//! ## Data flow
//!
//! ```text
//!   config ──► Config (validated) ──► app: clients built once (IMS token cache, STS
//!   credential cache, Flow client, S3 probe, request gate), rebuilt on reload only
//!   where their settings changed
//!                 │
//!                 ▼
//!   scheduler (owns every Connection) ── Event::Due / JobDone / Changed / Removed ──►
//!   connection::apply (uses policy) ── Action::Dispatch(job) ──► rotation (remote traits)
//!                 ▲                                                   │
//!                 └──────────────────── JobResult ◄───────────────────┘
//!
//!   after each turn that changed a connection, the scheduler publishes a Snapshot
//!   (the connections' Arc'd views, on a watch): /status, /readyz, /metrics and
//!   the persist writers (state file, shared table) read it; STATUS= and the
//!   `once` report read the same views
//!
//!   coordination (optional, `[coordination]`): an elector holds a lease item in
//!   DynamoDB; its Leadership gates the scheduler's dispatch, its Fence is checked
//!   by every job before each GET and PATCH, and the leader's connection state is
//!   shared in the same table (written from the snapshots, like the state file).
//! ```
//!
//! Layers: `commands` → `app` → `scheduler`, `discovery` → `persist` →
//! `coordination` → `rotation` → `connection`, `policy` → `remote` → `config` → `ident`,
//! `scrub`, `clock`, `fsguard` (which import no module of the crate). No
//! module imports one above it, and there is no import circle (`python3
//! ../shared/tools/house.py`). The remote clients count their requests in
//! [`counters`], a leaf that `observe` registers in its metrics. The role
//! is published by coordination on a `watch`, which the views read.
//!
//! Time is read through [`clock`]: the scheduler runs on a `Clock`, so tests
//! drive it with paused tokio time; every remote number is clamped there.
//!
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
pub mod control;
pub mod coordination;
pub mod counters;
pub mod discovery;
pub mod exit;
pub mod fsguard;
pub mod health;
pub mod ident;
pub mod observe;
pub mod persist;
pub mod policy;
pub mod remote;
pub mod rotation;
pub mod scheduler;
pub mod scrub;
pub mod shutdown;
