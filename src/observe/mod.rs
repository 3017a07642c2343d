//! What operators see: the scheduler's snapshot and the words of every view
//! (`status`), what the views read (`views`), the process-wide counters
//! (`telemetry`), the Prometheus exposition (`metrics`), the admin HTTP
//! endpoint and the `status` client (`admin`), systemd's notify protocol
//! (`notify`) and the log formats (`logging`).
//!
//! Owns: every view of the daemon's state. It reads; it never changes a
//! connection. Imported by the scheduler, `app` and the commands.

pub mod admin;
pub mod logging;
pub mod metrics;
pub mod notify;
#[cfg(test)]
pub(crate) mod recorded;
pub mod status;
pub mod telemetry;
pub mod views;
