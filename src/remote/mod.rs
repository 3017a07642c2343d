//! The remote services and the one HTTP client policy that reaches them:
//! Adobe IMS (`ims`), Flow Service (`flow`, with its wire format and the
//! lenient reader of its JSON, `lenient`), AWS STS (`sts`) and the S3
//! pre-push check (`s3probe`), plus what every client shares: request
//! shaping (`shaping`: the gate of concurrency and rate), timeouts, caps and
//! scrubbing of remote text (`http`), the CA roots (`tls`).
//!
//! Owns: talking to the outside world, and treating every answer as hostile
//! until checked. May import: `config`, `clock`, `fsguard` and its own
//! files; never the scheduler, discovery, coordination or `observe`.

pub mod flow;
pub mod http;
pub mod ims;
pub mod lenient;
pub mod s3dest;
pub mod s3probe;
pub mod s3xml;
pub mod shaping;
pub mod sts;
pub mod sts_cache;
pub mod tls;
