//! The words the views share: a connection's state as operators see it
//! (`ConnectionStatus`, `ConnectionState`, the per-state `Summary`, why it is
//! not ready), and the services and outcomes the counters are labelled by.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

pub use crate::counters::Service;

/// How one rotation attempt ended, for `aep_s3_rotator_rotations_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// New credentials are on the connection.
    Success,
    /// The attempt failed; a retry is scheduled.
    Failure,
}

impl Outcome {
    /// The `outcome` label value: `success` or `failure`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }
}

/// A connection's state as operators see it (derived, never stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    /// Credentials pushed by this daemon, valid for longer than `refresh_before`, last attempt fine.
    Fresh,
    /// Valid, but rotation is due or overdue (or nothing pushed yet).
    Expiring,
    /// The credentials this daemon pushed have expired.
    Expired,
    /// The last attempt failed; the credentials on the connection are still valid.
    Failing,
}

impl ConnectionState {
    /// Every state, in the order the `connections{state}` gauge prints them.
    pub const ALL: [ConnectionState; 4] = [
        ConnectionState::Fresh,
        ConnectionState::Expiring,
        ConnectionState::Expired,
        ConnectionState::Failing,
    ];

    /// The label / JSON value: `fresh`, `expiring`, `expired` or `failing`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Fresh => "fresh",
            ConnectionState::Expiring => "expiring",
            ConnectionState::Expired => "expired",
            ConnectionState::Failing => "failing",
        }
    }
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the daemon knows about one connection. Holds no secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionStatus {
    /// Base connection id.
    pub id: String,
    /// Label for logs and metrics.
    pub name: String,
    /// Sandbox name.
    pub sandbox: String,
    /// Access key id of the credentials on the connection (pushed by this daemon).
    pub access_key_id: Option<String>,
    /// When those credentials expire.
    pub expires_at: Option<SystemTime>,
    /// When the next rotation or retry is due.
    pub next_rotation_at: Option<SystemTime>,
    /// Last successful rotation.
    pub last_success_at: Option<SystemTime>,
    /// Last error, if the last attempt failed (cleared on success).
    pub last_error: Option<String>,
    /// How the connection was configured (`explicit` or `discover[N]`).
    pub origin: crate::config::Origin,
}

impl ConnectionStatus {
    /// The state operators see at `now`:
    ///
    /// - nothing pushed yet: `failing` if the last attempt failed, else
    ///   `expiring` (the first rotation is pending);
    /// - pushed credentials past their expiry: `expired` (whatever the error);
    /// - last attempt failed: `failing`;
    /// - at most `refresh_before` left: `expiring`;
    /// - otherwise `fresh`.
    pub fn state(&self, now: SystemTime, refresh_before: Duration) -> ConnectionState {
        let Some(expires_at) = self.expires_at else {
            return if self.last_error.is_some() {
                ConnectionState::Failing
            } else {
                ConnectionState::Expiring
            };
        };
        match expires_at.duration_since(now) {
            // `expires_at <= now`: a zero remaining lifetime is expired too.
            Err(_) => ConnectionState::Expired,
            Ok(left) if left.is_zero() => ConnectionState::Expired,
            Ok(_) if self.last_error.is_some() => ConnectionState::Failing,
            Ok(left) if left <= refresh_before => ConnectionState::Expiring,
            Ok(_) => ConnectionState::Fresh,
        }
    }
}

/// Counts of connections per state, for the systemd `STATUS=` line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// All connections.
    pub total: usize,
    /// Per state.
    pub fresh: usize,
    /// Per state.
    pub expiring: usize,
    /// Per state.
    pub expired: usize,
    /// Per state.
    pub failing: usize,
    /// The earliest next rotation.
    pub next_rotation_at: Option<SystemTime>,
}

impl Summary {
    /// The count for one state.
    pub fn count(&self, state: ConnectionState) -> usize {
        match state {
            ConnectionState::Fresh => self.fresh,
            ConnectionState::Expiring => self.expiring,
            ConnectionState::Expired => self.expired,
            ConnectionState::Failing => self.failing,
        }
    }
}

/// A connection that keeps `/readyz` at 503, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotReady {
    /// Connection name.
    pub connection: String,
    /// Why it is not ready.
    pub reason: String,
}
