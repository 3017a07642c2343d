//! Telemetry: the per-connection status board (read by `/status`, `/readyz`,
//! systemd `STATUS=` lines) and the Prometheus metrics derived from it.
//!
//! INTERFACE STUB: owned by the operations work; signatures are the contract.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// A remote service, for `aep_s3_rotator_requests_total{service}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// Adobe IMS token endpoint.
    Ims,
    /// AWS STS.
    Sts,
    /// Flow Service.
    Flow,
}

/// How one rotation attempt ended, for `aep_s3_rotator_rotations_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// New credentials are on the connection.
    Success,
    /// The attempt failed; a retry is scheduled.
    Failure,
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

/// What the daemon knows about one connection. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// A connection that keeps `/readyz` at 503, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotReady {
    /// Connection name.
    pub connection: String,
    /// Why it is not ready.
    pub reason: String,
}

/// The status board and metrics registry. Shared as `Arc<Telemetry>`.
#[derive(Debug)]
pub struct Telemetry {}

impl Telemetry {
    /// A new, empty board. `refresh_before` decides `fresh` vs `expiring`.
    pub fn new(refresh_before: Duration) -> Self {
        let _ = refresh_before;
        todo!()
    }
    /// After a reload.
    pub fn set_refresh_before(&self, refresh_before: Duration) {
        let _ = refresh_before;
        todo!()
    }
    /// Counts one HTTP/API exchange; `status` is the HTTP status code ("200", "412")
    /// or a short error class ("timeout", "connect", "Throttling").
    pub fn request(&self, service: Service, status: &str) {
        let _ = (service, status);
        todo!()
    }
    /// Counts one rotation attempt of connection `id`.
    pub fn rotation(&self, id: &str, outcome: Outcome) {
        let _ = (id, outcome);
        todo!()
    }
    /// Counts one 412 on connection `id`.
    pub fn etag_conflict(&self, id: &str) {
        let _ = id;
        todo!()
    }
    /// Inserts or replaces a connection's status.
    pub fn upsert(&self, status: ConnectionStatus) {
        let _ = status;
        todo!()
    }
    /// Edits a connection's status in place (no-op when unknown).
    pub fn update(&self, id: &str, edit: impl FnOnce(&mut ConnectionStatus)) {
        let _ = (id, edit);
        todo!()
    }
    /// Forgets a connection (and its metric series).
    pub fn remove(&self, id: &str) {
        let _ = id;
        todo!()
    }
    /// All connections, in id order.
    pub fn snapshot(&self) -> Vec<ConnectionStatus> {
        todo!()
    }
    /// `Ok` when every connection holds unexpired credentials pushed by this daemon.
    pub fn readiness(&self, now: SystemTime) -> Result<(), Vec<NotReady>> {
        let _ = now;
        todo!()
    }
    /// Counts per state.
    pub fn summary(&self, now: SystemTime) -> Summary {
        let _ = now;
        todo!()
    }
    /// The Prometheus text exposition.
    pub fn render_metrics(&self, now: SystemTime) -> String {
        let _ = now;
        todo!()
    }
}
