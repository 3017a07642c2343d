//! The one outward description of the connections: [`ConnectionStatus`]
//! (one connection, its numbers included) and the [`Snapshot`] the scheduler
//! publishes after each loop turn, from which every view derives (`/status`,
//! `/readyz`, `/metrics`, systemd `STATUS=`, the `once` report, the state
//! file). Also the words those views share: the state operators see, the
//! per-state [`Summary`], why a connection is not ready, and the outcomes
//! counters are labelled by.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::ConnectionConfig;

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

/// A connection's own numbers since this process started (its metric
/// series): kept by the connection, counted from its jobs' results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Rotations that put new credentials on the connection.
    pub successes: u64,
    /// Attempts that failed (a shutdown or a lost lease is not one).
    pub failures: u64,
    /// 412 answers absorbed.
    pub etag_conflicts: u64,
    /// `[rotation] verify` answers: the connection test passed.
    pub verifications_passed: u64,
    /// `[rotation] verify` answers: the connection test failed.
    pub verifications_failed: u64,
}

/// What the daemon knows about one connection: the one struct every view
/// of a connection is derived from. Holds no secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionStatus {
    /// The connection's entry (id, name, sandbox, origin: see [`Self::id`]
    /// and the others), shared with the connection: a view copies none of
    /// its strings.
    pub config: Arc<ConnectionConfig>,
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
    /// Its numbers since this process started.
    pub counters: Counters,
    /// The etag known after this daemon's last PATCH or read (the state
    /// file keeps it; no view shows it).
    pub etag: Option<String>,
    /// The last connection test's answer (`GET /connections/{id}/test`,
    /// by `verify` or the health check): `Some(true)` when it failed.
    pub test_failing: Option<bool>,
}

impl ConnectionStatus {
    /// Base connection id.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Label for logs and metrics.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Sandbox name.
    pub fn sandbox(&self) -> &str {
        &self.config.sandbox
    }

    /// How the connection was configured (`explicit` or `discover[N]`).
    pub fn origin(&self) -> crate::config::Origin {
        self.config.origin
    }

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

#[cfg(test)]
impl ConnectionStatus {
    /// The view of a connection nothing is known about yet (tests).
    pub(crate) fn named(id: &str, name: &str, sandbox: &str) -> Self {
        Self {
            config: Arc::new(ConnectionConfig {
                id: id.to_owned(),
                name: name.to_owned(),
                sandbox: sandbox.to_owned(),
                ..ConnectionConfig::default()
            }),
            ..Self::default()
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

/// One connection in `GET /status` (and what `aep-s3-rotator status` reads).
/// Times are RFC 3339 (`2024-05-01T12:00:00Z`) or null. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEntry {
    /// Base connection id.
    pub id: String,
    /// Label used in logs and metrics (defaults to the id).
    pub name: String,
    /// Sandbox name.
    pub sandbox: String,
    /// Derived state at the time of the request.
    pub state: ConnectionState,
    /// Access key id of the credentials this daemon pushed (not secret).
    pub access_key_id: Option<String>,
    /// When those credentials expire.
    pub expires_at: Option<String>,
    /// When the next rotation or retry is due.
    pub next_rotation_at: Option<String>,
    /// Last successful rotation.
    pub last_success_at: Option<String>,
    /// Last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// How the connection was configured: `explicit` (`[[connections]]`) or
    /// `discover[N]` (the Nth `[[discover]]` rule). Empty from a daemon too
    /// old to say.
    #[serde(default)]
    pub origin: String,
}

impl StatusEntry {
    /// The entry for `status` as seen at `now` with `refresh_before`.
    pub fn from_status(
        status: &ConnectionStatus,
        now: SystemTime,
        refresh_before: Duration,
    ) -> Self {
        let rfc3339 = |t: Option<SystemTime>| t.map(crate::clock::rfc3339);
        Self {
            id: status.id().to_owned(),
            name: status.name().to_owned(),
            sandbox: status.sandbox().to_owned(),
            state: status.state(now, refresh_before),
            access_key_id: status.access_key_id.clone(),
            expires_at: rfc3339(status.expires_at),
            next_rotation_at: rfc3339(status.next_rotation_at),
            last_success_at: rfc3339(status.last_success_at),
            last_error: status.last_error.clone(),
            origin: status.origin().to_string(),
        }
    }
}

/// The connections as the scheduler last published them: immutable, shared
/// by every reader (`Arc`), replaced as a whole after each loop turn that
/// changed something. Readers never lock anything the scheduler writes.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every connection, in no particular order (the views that promise
    /// one sort).
    pub connections: Vec<Arc<ConnectionStatus>>,
    /// `[rotation] refresh_before` of the config in force: it tells
    /// `fresh` from `expiring`.
    pub refresh_before: Duration,
    /// `[coordination]`: the leadership term whose shared state these
    /// views have adopted (0: none yet, and always without coordination).
    /// The shared table's writer starts a term from the first snapshot
    /// that shows it.
    pub term: u64,
}

/// Where the scheduler publishes its snapshots and the views read them.
pub type Snapshots = tokio::sync::watch::Receiver<Arc<Snapshot>>;

/// A channel holding an empty snapshot until the scheduler publishes.
pub fn snapshot_channel(
    refresh_before: Duration,
) -> (tokio::sync::watch::Sender<Arc<Snapshot>>, Snapshots) {
    tokio::sync::watch::channel(Arc::new(Snapshot {
        refresh_before,
        ..Snapshot::default()
    }))
}

impl Snapshot {
    /// The connections in id order.
    pub fn by_id(&self) -> Vec<&ConnectionStatus> {
        let mut all: Vec<&ConnectionStatus> = self.connections.iter().map(AsRef::as_ref).collect();
        all.sort_unstable_by(|a, b| a.id().cmp(b.id()));
        all
    }

    /// `Ok` when every connection holds unexpired credentials pushed by this
    /// daemon. No connections at all is ready: there is nothing to wait for.
    pub fn readiness(&self, now: SystemTime) -> Result<(), Vec<NotReady>> {
        let not_ready: Vec<NotReady> = self
            .by_id()
            .into_iter()
            .filter_map(|status| {
                let mut reason = match status.expires_at {
                    None => "no credentials pushed yet".to_owned(),
                    Some(expires_at) if expires_at <= now => format!(
                        "credentials expired {} ago",
                        compact_duration(now.duration_since(expires_at).unwrap_or_default())
                    ),
                    Some(_) => return None,
                };
                if let Some(error) = &status.last_error {
                    reason.push_str("; last error: ");
                    reason.push_str(error);
                }
                Some(NotReady {
                    connection: status.name().to_owned(),
                    reason,
                })
            })
            .collect();
        if not_ready.is_empty() {
            Ok(())
        } else {
            Err(not_ready)
        }
    }

    /// Counts per state at `now`, and the earliest next rotation.
    pub fn summary(&self, now: SystemTime) -> Summary {
        Summary::of(
            self.connections.iter().map(AsRef::as_ref),
            self.refresh_before,
            now,
        )
    }
}

impl Summary {
    /// Counts per state of `statuses` at `now`, and the earliest next rotation.
    pub fn of<'a>(
        statuses: impl IntoIterator<Item = &'a ConnectionStatus>,
        refresh_before: Duration,
        now: SystemTime,
    ) -> Self {
        let mut summary = Summary::default();
        for status in statuses {
            summary.total += 1;
            match status.state(now, refresh_before) {
                ConnectionState::Fresh => summary.fresh += 1,
                ConnectionState::Expiring => summary.expiring += 1,
                ConnectionState::Expired => summary.expired += 1,
                ConnectionState::Failing => summary.failing += 1,
            }
            if let Some(next) = status.next_rotation_at {
                summary.next_rotation_at = Some(match summary.next_rotation_at {
                    Some(earliest) => earliest.min(next),
                    None => next,
                });
            }
        }
        summary
    }
}

/// A duration in at most its two largest units, whole seconds: `41m 3s`,
/// `2h 5m`, `3d 4h`, `12s`, `0s`.
pub fn compact_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    let units = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3_600, "h"),
        (secs % 3_600 / 60, "m"),
        (secs % 60, "s"),
    ];
    let mut parts = units
        .iter()
        .skip_while(|(n, _)| *n == 0)
        .take(2)
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"));
    let first = parts.next().unwrap_or_else(|| "0s".to_owned());
    match parts.next() {
        Some(second) => format!("{first} {second}"),
        None => first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const REFRESH: Duration = Duration::from_secs(20 * 60);
    const NOW: u64 = 1_700_000_000;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn status(id: &str) -> ConnectionStatus {
        ConnectionStatus::named(id, id, "prod")
    }

    fn snapshot(statuses: impl IntoIterator<Item = ConnectionStatus>) -> Snapshot {
        Snapshot {
            connections: statuses.into_iter().map(Arc::new).collect(),
            refresh_before: REFRESH,
            term: 0,
        }
    }

    #[test]
    fn state_nothing_pushed_is_expiring_or_failing() {
        let mut s = status("a");
        assert_eq!(s.state(t(NOW), REFRESH), ConnectionState::Expiring);
        s.last_error = Some("403 forbidden".into());
        assert_eq!(s.state(t(NOW), REFRESH), ConnectionState::Failing);
    }

    #[test]
    fn state_expired_wins_over_error() {
        let mut s = status("a");
        s.expires_at = Some(t(NOW));
        assert_eq!(s.state(t(NOW), REFRESH), ConnectionState::Expired);
        s.expires_at = Some(t(NOW - 1));
        s.last_error = Some("boom".into());
        assert_eq!(s.state(t(NOW), REFRESH), ConnectionState::Expired);
    }

    #[test]
    fn state_failing_expiring_fresh() {
        let mut s = status("a");
        s.expires_at = Some(t(NOW + 3600));
        assert_eq!(s.state(t(NOW), REFRESH), ConnectionState::Fresh);
        s.expires_at = Some(t(NOW + 20 * 60));
        assert_eq!(s.state(t(NOW), REFRESH), ConnectionState::Expiring);
        s.expires_at = Some(t(NOW + 20 * 60 + 1));
        assert_eq!(s.state(t(NOW), REFRESH), ConnectionState::Fresh);
        s.last_error = Some("503".into());
        assert_eq!(s.state(t(NOW), REFRESH), ConnectionState::Failing);
        s.expires_at = Some(t(NOW + 60));
        assert_eq!(s.state(t(NOW), REFRESH), ConnectionState::Failing);
    }

    #[test]
    fn compact_durations() {
        assert_eq!(compact_duration(Duration::ZERO), "0s");
        assert_eq!(compact_duration(Duration::from_millis(12_900)), "12s");
        assert_eq!(compact_duration(Duration::from_secs(41 * 60 + 3)), "41m 3s");
        assert_eq!(compact_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(compact_duration(Duration::from_secs(3600 + 5)), "1h");
        assert_eq!(compact_duration(Duration::from_secs(7500)), "2h 5m");
        assert_eq!(
            compact_duration(Duration::from_secs(3 * 86_400 + 4 * 3600 + 59)),
            "3d 4h"
        );
    }

    #[test]
    fn refresh_before_of_the_snapshot_decides_fresh_or_expiring() {
        let mut s = status("a");
        s.expires_at = Some(t(NOW + 30 * 60));
        let mut snapshot = snapshot([s]);
        assert_eq!(snapshot.summary(t(NOW)).fresh, 1);
        snapshot.refresh_before = Duration::from_secs(40 * 60);
        assert_eq!(snapshot.summary(t(NOW)).expiring, 1);
    }

    #[test]
    fn an_empty_snapshot_is_ready() {
        let empty = snapshot([]);
        assert_eq!(empty.readiness(t(NOW)), Ok(()));
        assert_eq!(empty.summary(t(NOW)), Summary::default());
    }

    #[test]
    fn readiness_names_each_unready_connection() {
        let mut ok = status("ok");
        ok.expires_at = Some(t(NOW + 600));
        ok.last_error = Some("still valid, so ready".into());
        assert_eq!(snapshot([ok.clone()]).readiness(t(NOW)), Ok(()));

        let mut pending = status("pending-id");
        Arc::make_mut(&mut pending.config).name = "pending".into();
        let mut expired = status("expired");
        expired.expires_at = Some(t(NOW - 42));
        expired.last_error = Some("403 Forbidden".into());

        let not_ready = snapshot([pending, ok, expired])
            .readiness(t(NOW))
            .unwrap_err();
        assert_eq!(
            not_ready,
            vec![
                NotReady {
                    connection: "expired".into(),
                    reason: "credentials expired 42s ago; last error: 403 Forbidden".into(),
                },
                NotReady {
                    connection: "pending".into(),
                    reason: "no credentials pushed yet".into(),
                },
            ]
        );
    }

    #[test]
    fn summary_counts_and_earliest_rotation() {
        let mut fresh = status("a");
        fresh.expires_at = Some(t(NOW + 3600));
        fresh.next_rotation_at = Some(t(NOW + 2400));
        let mut expiring = status("b");
        expiring.expires_at = Some(t(NOW + 60));
        expiring.next_rotation_at = Some(t(NOW + 5));
        let mut expired = status("c");
        expired.expires_at = Some(t(NOW - 60));
        let mut failing = status("d");
        failing.last_error = Some("x".into());
        failing.next_rotation_at = Some(t(NOW + 30));
        let snapshot = snapshot([fresh, expiring, expired, failing]);
        assert_eq!(
            snapshot.summary(t(NOW)),
            Summary {
                total: 4,
                fresh: 1,
                expiring: 1,
                expired: 1,
                failing: 1,
                next_rotation_at: Some(t(NOW + 5)),
            }
        );
        assert_eq!(snapshot.summary(t(NOW)).count(ConnectionState::Expired), 1);
    }
}
