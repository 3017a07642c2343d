//! What operators see: the status board and metrics (`telemetry`), the
//! admin HTTP endpoint and the `status` client (`admin`), systemd's notify
//! protocol (`notify`) and the log formats (`logging`).
//!
//! Owns: every view of the daemon's state. It reads; it never changes a
//! connection. Imported by the scheduler, `app` and the commands.

pub mod admin;
pub mod logging;
pub mod notify;
pub mod status;
pub mod telemetry;
