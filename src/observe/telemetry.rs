//! Telemetry: the per-connection status board (read by `/status`, `/readyz`,
//! systemd `STATUS=` lines) and the Prometheus metrics derived from it.
//!
//! The board is the single source of truth. Gauges that describe a
//! connection's current state (expiry, next rotation, last success, the
//! per-state connection counts) are rebuilt from it on every scrape, so
//! `/metrics`, `/status` and `/readyz` never disagree and a removed
//! connection disappears from all three at once. Per-connection counters are
//! kept beside the board by connection id and take their `connection`
//! (the name) and `sandbox` labels from the board at render time.
//!
//! Locks are `std::sync::Mutex`es held only for a copy or an increment, never
//! across an `.await`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use super::status::*;

/// Content type of [`Telemetry::render_metrics`] (OpenMetrics text, which
/// Prometheus negotiates and parses natively).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prefix shared by every metric name.
const PREFIX: &str = "aep_s3_rotator";

/// Per-connection counters, kept by connection id beside the board.
#[derive(Debug, Clone, Copy, Default)]
struct ConnectionCounts {
    successes: u64,
    failures: u64,
    etag_conflicts: u64,
    verifications_passed: u64,
    verifications_failed: u64,
    /// The last `GET /connections/{id}/test` answer: `Some(true)` = failed.
    test_failing: Option<bool>,
}

/// Everything behind the one lock.
#[derive(Debug)]
struct Board {
    // Hashed, not ordered: the scheduler touches an entry after every
    // event, and ordered lookups of long ids were 4 % of its CPU; the views
    // that promise an order sort.
    connections: HashMap<String, ConnectionStatus>,
    counts: HashMap<String, ConnectionCounts>,
    refresh_before: Duration,
}

impl Board {
    /// Edits the counters of `id` (created at zero); no allocation when
    /// they exist.
    fn count(&mut self, id: &str, edit: impl FnOnce(&mut ConnectionCounts)) {
        match self.counts.get_mut(id) {
            Some(counts) => edit(counts),
            None => {
                let mut counts = ConnectionCounts::default();
                edit(&mut counts);
                self.counts.insert(id.to_owned(), counts);
            }
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    connection: String,
    sandbox: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RotationLabels {
    connection: String,
    sandbox: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerificationLabels {
    connection: String,
    sandbox: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    connection: String,
    sandbox: String,
    origin: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListingLabels {
    sandbox: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// The `connection` label of each connection (by id): its name, or, when
/// another connection of the same sandbox has the same name (names are not
/// unique in AEP), `name (id)`, so that every connection has its own series
/// and an expiring one cannot hide behind another's (issue 26).
fn connection_labels(connections: &HashMap<String, ConnectionStatus>) -> HashMap<&str, String> {
    let mut seen: HashMap<(&str, &str), usize> = HashMap::with_capacity(connections.len());
    for status in connections.values() {
        *seen.entry((&status.name, &status.sandbox)).or_default() += 1;
    }
    connections
        .iter()
        .map(|(id, status)| {
            let label = if seen.get(&(status.name.as_str(), status.sandbox.as_str())) > Some(&1) {
                format!("{} ({id})", status.name)
            } else {
                status.name.clone()
            };
            (id.as_str(), label)
        })
        .collect()
}

/// A unix-seconds gauge.
type TimestampGauge = Gauge<f64, AtomicU64>;

/// A metric whose `# HELP`/`# TYPE` lines print even when it has no series.
///
/// prometheus-client leaves empty families out of the exposition; we want
/// every documented name present from the first scrape, so dashboards and
/// `absent()` alerts can tell "no rotation yet" from "no such metric".
#[derive(Debug)]
struct Described<M>(M);

impl<M: EncodeMetric> EncodeMetric for Described<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// The status board and metrics registry. Shared as `Arc<Telemetry>`.
#[derive(Debug)]
pub struct Telemetry {
    board: Mutex<Board>,
    /// `requests_total` is not tied to a connection, so it lives in a
    /// long-lived family (lock-free increments) registered on each render.
    requests: crate::counters::Requests,
    /// `prepush_checks_total{result}`: process-wide, like `requests`.
    prepush_checks: Family<PrepushLabels, Counter>,
    /// `discovery_listings_total{sandbox,outcome}`: one per listing (all its pages).
    listings: Family<ListingLabels, Counter>,
    /// `discovery_conflicts`: connections rules disagree on, not rotated.
    discovery_conflicts: Gauge,
    /// This replica's role under `[coordination]` (`None`: coordination off).
    role: Mutex<Option<RoleView>>,
    /// `leader_changes_total`: this replica became or stopped being the leader.
    leader_changes: Counter,
}

/// This replica's role, as `/readyz`, `/status` and `leader` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleView {
    /// Leader, standby or starting.
    pub role: crate::coordination::leadership::Role,
    /// The lease holder as last seen.
    pub leader: Option<String>,
    /// The coordination table's last failure, while it lasts.
    pub trouble: Option<String>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrepushLabels {
    result: &'static str,
}

/// The results of `aep_s3_rotator_prepush_checks_total{result}`.
pub const PREPUSH_RESULTS: [&str; 4] = ["allowed", "denied", "error", "skipped"];

impl Telemetry {
    /// A new, empty board. `refresh_before` decides `fresh` vs `expiring`.
    pub fn new(refresh_before: Duration) -> Self {
        Self {
            board: Mutex::new(Board {
                connections: HashMap::new(),
                counts: HashMap::new(),
                refresh_before,
            }),
            requests: crate::counters::Requests::default(),
            prepush_checks: {
                // Every result at zero from the start, so alerts on
                // `increase(...{result="denied"})` work before the first one.
                let family = Family::<PrepushLabels, Counter>::default();
                for result in PREPUSH_RESULTS {
                    family.get_or_create(&PrepushLabels { result }).inc_by(0);
                }
                family
            },
            listings: Family::default(),
            discovery_conflicts: Gauge::default(),
            role: Mutex::new(None),
            leader_changes: Counter::default(),
        }
    }

    /// Records this replica's role (coordination on).
    pub fn set_leadership(&self, leadership: &crate::coordination::leadership::Leadership) {
        let view = RoleView {
            role: leadership.role,
            leader: leadership.leader.clone(),
            trouble: leadership.trouble.clone(),
        };
        *self
            .role
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(view);
    }

    /// Counts one change of this replica's leadership (gained or lost).
    pub fn leader_change(&self) {
        self.leader_changes.inc();
    }

    /// This replica's role (`None`: coordination off, the only writer).
    pub fn role(&self) -> Option<RoleView> {
        self.role
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts one listing of `sandbox` (rules or bulk etags), all pages.
    pub fn discovery_listing(&self, sandbox: &str, ok: bool) {
        self.listings
            .get_or_create(&ListingLabels {
                sandbox: sandbox.to_owned(),
                outcome: if ok { "ok" } else { "failure" },
            })
            .inc();
    }

    /// How many connections are not rotated now because rules disagree on them.
    pub fn set_discovery_conflicts(&self, conflicts: usize) {
        self.discovery_conflicts
            .set(i64::try_from(conflicts).unwrap_or(i64::MAX));
    }

    /// Counts one pre-push S3 check; `result` is one of [`PREPUSH_RESULTS`].
    pub fn prepush_check(&self, result: &'static str) {
        self.prepush_checks
            .get_or_create(&PrepushLabels { result })
            .inc();
    }

    /// The board; a panic elsewhere while holding the lock leaves plain data
    /// that is still consistent enough to report, so poisoning is ignored.
    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a reload.
    pub fn set_refresh_before(&self, refresh_before: Duration) {
        self.board().refresh_before = refresh_before;
    }

    /// The `refresh_before` currently used to tell `fresh` from `expiring`.
    pub fn refresh_before(&self) -> Duration {
        self.board().refresh_before
    }

    /// Counts one HTTP/API exchange (see [`crate::counters::Requests`]).
    pub fn request(&self, service: Service, status: &str) {
        self.requests.count(service, status);
    }

    /// The request counters, for the remote clients to count into.
    pub fn requests(&self) -> crate::counters::Requests {
        self.requests.clone()
    }

    /// Counts one rotation attempt of connection `id`.
    ///
    /// Counted even before the connection is on the board; its series then
    /// carries the id as `connection` until [`upsert`](Self::upsert) names it.
    pub fn rotation(&self, id: &str, outcome: Outcome) {
        self.board().count(id, |counts| match outcome {
            Outcome::Success => counts.successes += 1,
            Outcome::Failure => counts.failures += 1,
        });
    }

    /// Counts one 412 on connection `id`.
    pub fn etag_conflict(&self, id: &str) {
        self.board().count(id, |counts| counts.etag_conflicts += 1);
    }

    /// Counts one `[rotation] verify` answer (`GET /connections/{id}/test`)
    /// for connection `id`.
    pub fn verification(&self, id: &str, passed: bool) {
        self.board().count(id, |counts| {
            if passed {
                counts.verifications_passed += 1;
            } else {
                counts.verifications_failed += 1;
            }
        });
    }

    /// Records a `GET /connections/{id}/test` answer for connection `id`
    /// (the health check's or `verify`'s): `connection_test_failing` is 1
    /// while the last one said Flow Service cannot reach S3.
    pub fn connection_test(&self, id: &str, passed: bool) {
        self.board()
            .count(id, |counts| counts.test_failing = Some(!passed));
    }

    /// Inserts or replaces a connection's status.
    pub fn upsert(&self, status: ConnectionStatus) {
        self.board().connections.insert(status.id.clone(), status);
    }

    /// Writes a connection's status in place through `fill` (which is
    /// handed the previous status, or an empty one for a new connection):
    /// the scheduler calls this after every event, and reusing the entry
    /// and its strings costs no allocation when little changed.
    pub fn sync(&self, id: &str, fill: impl FnOnce(&mut ConnectionStatus)) {
        let mut board = self.board();
        match board.connections.get_mut(id) {
            Some(status) => fill(status),
            None => {
                let mut status = ConnectionStatus::default();
                fill(&mut status);
                board.connections.insert(id.to_owned(), status);
            }
        }
    }

    /// Edits a connection's status in place (no-op when unknown).
    pub fn update(&self, id: &str, edit: impl FnOnce(&mut ConnectionStatus)) {
        if let Some(status) = self.board().connections.get_mut(id) {
            edit(status);
        }
    }

    /// Forgets a connection (and its metric series).
    pub fn remove(&self, id: &str) {
        let mut board = self.board();
        board.connections.remove(id);
        board.counts.remove(id);
    }

    /// All connections, in id order.
    pub fn snapshot(&self) -> Vec<ConnectionStatus> {
        let mut all: Vec<ConnectionStatus> = self.board().connections.values().cloned().collect();
        all.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// `Ok` when every connection holds unexpired credentials pushed by this daemon.
    ///
    /// No connections at all is ready: there is nothing to wait for.
    pub fn readiness(&self, now: SystemTime) -> Result<(), Vec<NotReady>> {
        let board = self.board();
        let mut not_ready: Vec<(&str, NotReady)> = board
            .connections
            .values()
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
                Some((
                    status.id.as_str(),
                    NotReady {
                        connection: status.name.clone(),
                        reason,
                    },
                ))
            })
            .collect();
        if not_ready.is_empty() {
            return Ok(());
        }
        // In id order, as before the board was hashed.
        not_ready.sort_unstable_by(|a, b| a.0.cmp(b.0));
        Err(not_ready.into_iter().map(|(_, entry)| entry).collect())
    }

    /// Counts per state.
    pub fn summary(&self, now: SystemTime) -> Summary {
        let board = self.board();
        let mut summary = Summary {
            total: board.connections.len(),
            ..Summary::default()
        };
        for status in board.connections.values() {
            match status.state(now, board.refresh_before) {
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

    /// The Prometheus text exposition (OpenMetrics; see [`METRICS_CONTENT_TYPE`]).
    pub fn render_metrics(&self, now: SystemTime) -> String {
        // Counters are registered without `_total`: the OpenMetrics encoder
        // appends it, so the exposed names are exactly the documented ones.
        let rotations = Family::<RotationLabels, Counter>::default();
        let etag_conflicts = Family::<ConnectionLabels, Counter>::default();
        let verifications = Family::<VerificationLabels, Counter>::default();
        let test_failing = Family::<ConnectionLabels, Gauge>::default();
        let expiry = Family::<ConnectionLabels, TimestampGauge>::default();
        let next_rotation = Family::<ConnectionLabels, TimestampGauge>::default();
        let last_success = Family::<ConnectionLabels, TimestampGauge>::default();
        let connections = Family::<StateLabels, Gauge>::default();
        let info = Family::<InfoLabels, Gauge>::default();

        {
            let board = self.board();
            for state in ConnectionState::ALL {
                // Every state prints, zero included, so alerts and dashboards
                // never see a series vanish.
                connections
                    .get_or_create(&StateLabels {
                        state: state.as_str(),
                    })
                    .set(0);
            }
            let label_of = connection_labels(&board.connections);
            for (id, status) in &board.connections {
                let labels = ConnectionLabels {
                    connection: label_of.get(id.as_str()).cloned().unwrap_or_default(),
                    sandbox: status.sandbox.clone(),
                };
                connections
                    .get_or_create(&StateLabels {
                        state: status.state(now, board.refresh_before).as_str(),
                    })
                    .inc();
                info.get_or_create(&InfoLabels {
                    connection: labels.connection.clone(),
                    sandbox: status.sandbox.clone(),
                    origin: status.origin.to_string(),
                })
                .set(1);
                for (family, time) in [
                    (&expiry, status.expires_at),
                    (&next_rotation, status.next_rotation_at),
                    (&last_success, status.last_success_at),
                ] {
                    if let Some(time) = time {
                        family.get_or_create(&labels).set(unix_seconds(time));
                    }
                }
                // Every known connection gets its counter series from the
                // start, at zero, so every metric name of SPEC.md is scrapeable
                // (and `increase()` works) before the first event.
                for outcome in [Outcome::Success, Outcome::Failure] {
                    rotations
                        .get_or_create(&RotationLabels {
                            connection: labels.connection.clone(),
                            sandbox: labels.sandbox.clone(),
                            outcome: outcome.as_str(),
                        })
                        .inc_by(0);
                }
                etag_conflicts.get_or_create(&labels).inc_by(0);
            }
            for (id, counts) in &board.counts {
                let labels = match board.connections.get(id) {
                    Some(status) => ConnectionLabels {
                        connection: label_of.get(id.as_str()).cloned().unwrap_or_default(),
                        sandbox: status.sandbox.clone(),
                    },
                    None => ConnectionLabels {
                        connection: id.clone(),
                        sandbox: String::new(),
                    },
                };
                for (outcome, n) in [
                    (Outcome::Success, counts.successes),
                    (Outcome::Failure, counts.failures),
                ] {
                    if n > 0 {
                        rotations
                            .get_or_create(&RotationLabels {
                                connection: labels.connection.clone(),
                                sandbox: labels.sandbox.clone(),
                                outcome: outcome.as_str(),
                            })
                            .inc_by(n);
                    }
                }
                for (result, n) in [
                    ("passed", counts.verifications_passed),
                    ("failed", counts.verifications_failed),
                ] {
                    if n > 0 {
                        verifications
                            .get_or_create(&VerificationLabels {
                                connection: labels.connection.clone(),
                                sandbox: labels.sandbox.clone(),
                                result,
                            })
                            .inc_by(n);
                    }
                }
                // Only connections on the board: a removed one's series goes.
                if let (Some(failing), true) =
                    (counts.test_failing, board.connections.contains_key(id))
                {
                    test_failing.get_or_create(&labels).set(i64::from(failing));
                }
                if counts.etag_conflicts > 0 {
                    etag_conflicts
                        .get_or_create(&labels)
                        .inc_by(counts.etag_conflicts);
                }
            }
        }

        let mut registry = Registry::with_prefix(PREFIX);
        registry.register(
            "rotations",
            "Rotation attempts per connection, by outcome",
            Described(rotations),
        );
        registry.register(
            "credentials_expiry_timestamp_seconds",
            "When the credentials this daemon pushed to the connection expire (unix seconds)",
            Described(expiry),
        );
        registry.register(
            "next_rotation_timestamp_seconds",
            "When the next rotation or retry of the connection is due (unix seconds)",
            Described(next_rotation),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "When the connection was last rotated successfully (unix seconds)",
            Described(last_success),
        );
        registry.register(
            "verifications",
            "Answers of GET /connections/{id}/test after a PATCH ([rotation] verify), by result",
            Described(verifications),
        );
        registry.register(
            "connection_test_failing",
            "1 while the connection's last test (GET /connections/{id}/test: [rotation] health_check_every or verify) said Flow Service cannot reach S3 with its credentials, else 0",
            Described(test_failing),
        );
        registry.register(
            "etag_conflicts",
            "412 Precondition Failed answers to a PATCH, per connection",
            Described(etag_conflicts),
        );
        registry.register(
            "requests",
            "Requests to remote services, by HTTP status or error class",
            Described(self.requests.family()),
        );
        registry.register(
            "prepush_checks",
            "Pre-push S3 checks of new credentials before a PATCH, by result (allowed, denied, error, skipped)",
            Described(self.prepush_checks.clone()),
        );
        registry.register(
            "connections",
            "Configured connections per state",
            Described(connections),
        );
        registry.register(
            "connection_info",
            "How each connection was configured (origin: explicit or discover[N]); the value is always 1",
            Described(info),
        );
        registry.register(
            "discovery_conflicts",
            "Connections matched by [[discover]] rules with different identities, not rotated",
            Described(self.discovery_conflicts.clone()),
        );
        registry.register(
            "discovery_listings",
            "Listings of connections (GET /connections, all pages), by sandbox and outcome (ok, failure)",
            Described(self.listings.clone()),
        );
        // Without coordination the process is the only writer: leader = 1,
        // so `sum(aep_s3_rotator_leader) == 1` holds for every deployment.
        let leader = Gauge::<i64>::default();
        leader.set(i64::from(self.role().is_none_or(|v| {
            v.role == crate::coordination::leadership::Role::Leader
        })));
        registry.register(
            "leader",
            "1 while this replica holds the coordination lease (or runs without coordination), else 0",
            leader,
        );
        registry.register(
            "leader_changes",
            "Times this replica became or stopped being the leader",
            self.leader_changes.clone(),
        );
        // A gauge rather than an OpenMetrics `info`: the `_build_info` gauge
        // is the convention every Prometheus-format consumer understands.
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Version of the running daemon; the value is always 1",
            build_info,
        );

        let mut text = String::new();
        if let Err(e) = encode(&mut text, &registry) {
            // Writing to a String cannot fail; a metric's own encoder could
            // only fail on a bug, and a scrape is not worth a crash.
            tracing::error!(error = %e, "cannot encode metrics");
            let _ = writeln!(text, "# metrics encoding failed");
        }
        text
    }
}

/// `time` as unix seconds (negative before 1970, which never happens here).
fn unix_seconds(time: SystemTime) -> f64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
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
    use std::collections::BTreeMap;

    const REFRESH: Duration = Duration::from_secs(20 * 60);

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn status(id: &str) -> ConnectionStatus {
        ConnectionStatus {
            id: id.to_owned(),
            name: id.to_owned(),
            sandbox: "prod".to_owned(),
            access_key_id: None,
            expires_at: None,
            next_rotation_at: None,
            last_success_at: None,
            last_error: None,
            origin: crate::config::Origin::Explicit,
        }
    }

    const NOW: u64 = 1_700_000_000;

    /// Parses the exposition into `(name, labels, value)` samples.
    fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
        text.lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => {
                        let labels = rest
                            .trim_end_matches('}')
                            .split(',')
                            .filter(|kv| !kv.is_empty())
                            .map(|kv| {
                                let (k, v) = kv.split_once('=').unwrap();
                                (k.to_owned(), v.trim_matches('"').to_owned())
                            })
                            .collect();
                        (name.to_owned(), labels)
                    }
                    None => (series.to_owned(), BTreeMap::new()),
                };
                (name, labels, value.parse().unwrap())
            })
            .collect()
    }

    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        samples(text)
            .into_iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| v)
    }

    /// The names declared by `# TYPE` lines, suffix included for counters.
    fn declared(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let mut it = l.split(' ');
                let name = it.next().unwrap();
                match it.next().unwrap() {
                    "counter" => format!("{name}_total"),
                    _ => name.to_owned(),
                }
            })
            .collect()
    }

    const NAMES: [&str; 7] = [
        "aep_s3_rotator_rotations_total",
        "aep_s3_rotator_credentials_expiry_timestamp_seconds",
        "aep_s3_rotator_next_rotation_timestamp_seconds",
        "aep_s3_rotator_last_success_timestamp_seconds",
        "aep_s3_rotator_etag_conflicts_total",
        "aep_s3_rotator_requests_total",
        "aep_s3_rotator_connections",
    ];

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
    fn set_refresh_before_changes_state() {
        let telemetry = Telemetry::new(REFRESH);
        let mut s = status("a");
        s.expires_at = Some(t(NOW + 30 * 60));
        telemetry.upsert(s);
        assert_eq!(telemetry.summary(t(NOW)).fresh, 1);
        telemetry.set_refresh_before(Duration::from_secs(40 * 60));
        assert_eq!(telemetry.refresh_before(), Duration::from_secs(40 * 60));
        assert_eq!(telemetry.summary(t(NOW)).expiring, 1);
    }

    #[test]
    fn empty_board_is_ready_and_renders() {
        let telemetry = Telemetry::new(REFRESH);
        assert_eq!(telemetry.readiness(t(NOW)), Ok(()));
        assert_eq!(telemetry.summary(t(NOW)), Summary::default());
        assert!(telemetry.snapshot().is_empty());
        let text = telemetry.render_metrics(t(NOW));
        let names = declared(&text);
        for name in NAMES {
            assert!(names.iter().any(|n| n == name), "{name} missing:\n{text}");
        }
        for state in ConnectionState::ALL {
            assert_eq!(
                value(
                    &text,
                    "aep_s3_rotator_connections",
                    &[("state", state.as_str())]
                ),
                Some(0.0),
                "{state}:\n{text}"
            );
        }
        assert_eq!(
            value(
                &text,
                "aep_s3_rotator_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Some(1.0)
        );
        assert!(text.ends_with("# EOF\n"));
        // The suffix lands exactly once.
        assert!(!text.contains("_total_total"));
    }

    #[test]
    fn readiness_names_each_unready_connection() {
        let telemetry = Telemetry::new(REFRESH);
        let mut ok = status("ok");
        ok.expires_at = Some(t(NOW + 600));
        ok.last_error = Some("still valid, so ready".into());
        telemetry.upsert(ok);
        assert_eq!(telemetry.readiness(t(NOW)), Ok(()));

        let mut pending = status("pending-id");
        pending.name = "pending".into();
        telemetry.upsert(pending);
        let mut expired = status("expired");
        expired.expires_at = Some(t(NOW - 42));
        expired.last_error = Some("403 Forbidden".into());
        telemetry.upsert(expired);

        let not_ready = telemetry.readiness(t(NOW)).unwrap_err();
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
        let telemetry = Telemetry::new(REFRESH);
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
        for s in [fresh, expiring, expired, failing] {
            telemetry.upsert(s);
        }
        assert_eq!(
            telemetry.summary(t(NOW)),
            Summary {
                total: 4,
                fresh: 1,
                expiring: 1,
                expired: 1,
                failing: 1,
                next_rotation_at: Some(t(NOW + 5)),
            }
        );
        assert_eq!(telemetry.summary(t(NOW)).count(ConnectionState::Expired), 1);
    }

    #[test]
    fn update_edits_known_and_ignores_unknown() {
        let telemetry = Telemetry::new(REFRESH);
        telemetry.upsert(status("a"));
        telemetry.update("a", |s| s.next_rotation_at = Some(t(NOW)));
        telemetry.update("zzz", |_| panic!("called for an unknown id"));
        let snapshot = telemetry.snapshot();
        assert_eq!(snapshot.len(), 1);
        assert_eq!(snapshot[0].next_rotation_at, Some(t(NOW)));
    }

    #[test]
    fn connections_with_the_same_name_have_their_own_series() {
        // Issue 26 #7: two discovered connections named alike shared one
        // expiry series, so an expiring one could hide behind the other.
        let telemetry = Telemetry::new(REFRESH);
        for (id, expires) in [("c-1", NOW + 60), ("c-2", NOW + 3600), ("c-3", NOW + 3600)] {
            let mut s = status(id);
            s.name = if id == "c-3" {
                "other".into()
            } else {
                "ingest".into()
            };
            s.sandbox = "prod".into();
            s.expires_at = Some(t(expires));
            telemetry.upsert(s);
        }
        let text = telemetry.render_metrics(t(NOW));
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("aep_s3_rotator_credentials_expiry_timestamp_seconds{"))
            .collect();
        assert_eq!(series.len(), 3, "{text}");
        let expiry = |label: &str| {
            value(
                &text,
                "aep_s3_rotator_credentials_expiry_timestamp_seconds",
                &[("connection", label), ("sandbox", "prod")],
            )
        };
        assert!(expiry("ingest (c-1)").is_some(), "{text}");
        assert!(expiry("ingest (c-2)").is_some(), "{text}");
        assert!(
            expiry("other").is_some(),
            "a unique name stays as it is: {text}"
        );
    }

    #[test]
    fn metrics_carry_labels_and_values() {
        let telemetry = Telemetry::new(REFRESH);
        let mut s = status("4cb0c374");
        s.name = "sales-bucket".into();
        s.sandbox = "prod".into();
        s.access_key_id = Some("ASIAEXAMPLE".into());
        s.expires_at = Some(t(NOW + 3600));
        s.next_rotation_at = Some(t(NOW + 2400));
        s.last_success_at = Some(t(NOW - 1));
        telemetry.upsert(s);
        telemetry.rotation("4cb0c374", Outcome::Success);
        telemetry.rotation("4cb0c374", Outcome::Success);
        telemetry.rotation("4cb0c374", Outcome::Failure);
        telemetry.etag_conflict("4cb0c374");
        telemetry.request(Service::Flow, "200");
        telemetry.request(Service::Flow, "200");
        telemetry.request(Service::Ims, "200");
        telemetry.request(Service::Sts, "Throttling");

        let text = telemetry.render_metrics(t(NOW));
        let names = declared(&text);
        for name in NAMES {
            assert!(names.iter().any(|n| n == name), "{name} missing:\n{text}");
        }
        let conn = [("connection", "sales-bucket"), ("sandbox", "prod")];
        let with = |extra: (&'static str, &'static str)| {
            let mut l = conn.to_vec();
            l.push(extra);
            l
        };
        assert_eq!(
            value(
                &text,
                "aep_s3_rotator_rotations_total",
                &with(("outcome", "success"))
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &text,
                "aep_s3_rotator_rotations_total",
                &with(("outcome", "failure"))
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "aep_s3_rotator_etag_conflicts_total", &conn),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "aep_s3_rotator_credentials_expiry_timestamp_seconds",
                &conn
            ),
            Some((NOW + 3600) as f64)
        );
        assert_eq!(
            value(
                &text,
                "aep_s3_rotator_next_rotation_timestamp_seconds",
                &conn
            ),
            Some((NOW + 2400) as f64)
        );
        assert_eq!(
            value(
                &text,
                "aep_s3_rotator_last_success_timestamp_seconds",
                &conn
            ),
            Some((NOW - 1) as f64)
        );
        assert_eq!(
            value(
                &text,
                "aep_s3_rotator_requests_total",
                &[("service", "flow"), ("status", "200")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &text,
                "aep_s3_rotator_requests_total",
                &[("service", "ims"), ("status", "200")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "aep_s3_rotator_requests_total",
                &[("service", "sts"), ("status", "Throttling")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "aep_s3_rotator_connections", &[("state", "fresh")]),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "aep_s3_rotator_connections", &[("state", "expired")]),
            Some(0.0)
        );
        // Every sample name is one of ours, with the suffix exactly once.
        for (name, _, _) in samples(&text) {
            assert!(
                NAMES.contains(&name.as_str())
                    || name == "aep_s3_rotator_build_info"
                    || name == "aep_s3_rotator_prepush_checks_total"
                    || name == "aep_s3_rotator_connection_info"
                    || name == "aep_s3_rotator_discovery_conflicts"
                    || name == "aep_s3_rotator_leader"
                    || name == "aep_s3_rotator_leader_changes_total",
                "unexpected series {name}"
            );
        }
        // Without coordination the process is the only writer.
        assert_eq!(value(&text, "aep_s3_rotator_leader", &[]), Some(1.0));
        assert_eq!(
            value(&text, "aep_s3_rotator_leader_changes_total", &[]),
            Some(0.0)
        );
        // No label carries the id when a name is set.
        assert!(!text.contains("4cb0c374"), "{text}");
    }

    #[test]
    fn counts_before_upsert_are_kept_and_relabelled() {
        let telemetry = Telemetry::new(REFRESH);
        telemetry.rotation("id-1", Outcome::Failure);
        let text = telemetry.render_metrics(t(NOW));
        assert_eq!(
            value(
                &text,
                "aep_s3_rotator_rotations_total",
                &[
                    ("connection", "id-1"),
                    ("sandbox", ""),
                    ("outcome", "failure")
                ]
            ),
            Some(1.0)
        );
        let mut s = status("id-1");
        s.name = "named".into();
        telemetry.upsert(s);
        let text = telemetry.render_metrics(t(NOW));
        assert_eq!(
            value(
                &text,
                "aep_s3_rotator_rotations_total",
                &[
                    ("connection", "named"),
                    ("sandbox", "prod"),
                    ("outcome", "failure")
                ]
            ),
            Some(1.0)
        );
        assert!(!text.contains("id-1"), "{text}");
    }

    #[test]
    fn remove_drops_every_series_of_the_connection() {
        let telemetry = Telemetry::new(REFRESH);
        for id in ["keep", "gone"] {
            let mut s = status(id);
            s.expires_at = Some(t(NOW + 3600));
            s.next_rotation_at = Some(t(NOW + 2400));
            s.last_success_at = Some(t(NOW));
            telemetry.upsert(s);
            telemetry.rotation(id, Outcome::Success);
            telemetry.rotation(id, Outcome::Failure);
            telemetry.etag_conflict(id);
        }
        assert!(telemetry.render_metrics(t(NOW)).contains("\"gone\""));
        telemetry.remove("gone");
        let text = telemetry.render_metrics(t(NOW));
        assert!(!text.contains("gone"), "{text}");
        let keep = samples(&text)
            .into_iter()
            .filter(|(_, l, _)| l.get("connection").map(String::as_str) == Some("keep"))
            .count();
        // rotations success + failure, etag conflicts, three timestamps,
        // connection_info.
        assert_eq!(keep, 7, "{text}");
        assert_eq!(
            value(&text, "aep_s3_rotator_connections", &[("state", "fresh")]),
            Some(1.0)
        );
        assert_eq!(telemetry.snapshot().len(), 1);
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
    fn verifications_are_counted_by_result() {
        let telemetry = Telemetry::new(Duration::from_secs(60));
        telemetry.upsert(ConnectionStatus {
            id: "id-1".into(),
            name: "sales".into(),
            sandbox: "prod".into(),
            access_key_id: None,
            expires_at: None,
            next_rotation_at: None,
            last_success_at: None,
            last_error: None,
            origin: crate::config::Origin::Explicit,
        });
        telemetry.verification("id-1", true);
        telemetry.verification("id-1", true);
        telemetry.verification("id-1", false);
        let text = telemetry.render_metrics(crate::clock::wall_now());
        assert!(text.contains("aep_s3_rotator_verifications_total{connection=\"sales\",sandbox=\"prod\",result=\"passed\"} 2"), "{text}");
        assert!(text.contains("aep_s3_rotator_verifications_total{connection=\"sales\",sandbox=\"prod\",result=\"failed\"} 1"), "{text}");
    }

    #[test]
    fn prepush_checks_are_counted_by_result_from_zero() {
        let telemetry = Telemetry::new(Duration::from_secs(60));
        let text = telemetry.render_metrics(crate::clock::wall_now());
        for result in PREPUSH_RESULTS {
            let line = format!("aep_s3_rotator_prepush_checks_total{{result=\"{result}\"}} 0");
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        telemetry.prepush_check("denied");
        telemetry.prepush_check("denied");
        telemetry.prepush_check("allowed");
        let text = telemetry.render_metrics(crate::clock::wall_now());
        assert!(
            text.contains("aep_s3_rotator_prepush_checks_total{result=\"denied\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("aep_s3_rotator_prepush_checks_total{result=\"allowed\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn connection_info_and_discovery_counts() {
        let telemetry = Telemetry::new(Duration::from_secs(1200));
        let mut found = status("c-1");
        found.name = "ingest-a".into();
        found.origin = crate::config::Origin::Rule(2);
        telemetry.upsert(found);
        telemetry.upsert(status("c-2"));
        let text = telemetry.render_metrics(t(NOW));
        let info = |connection: &str, origin: &str| {
            value(
                &text,
                "aep_s3_rotator_connection_info",
                &[
                    ("connection", connection),
                    ("sandbox", "prod"),
                    ("origin", origin),
                ],
            )
        };
        assert_eq!(info("ingest-a", "discover[2]"), Some(1.0), "{text}");
        assert_eq!(info("c-2", "explicit"), Some(1.0), "{text}");
        // Before discovery reports anything, the gauge is 0 and the counter
        // family is declared (no series yet).
        assert_eq!(
            value(&text, "aep_s3_rotator_discovery_conflicts", &[]),
            Some(0.0)
        );
        assert!(
            declared(&text).contains(&"aep_s3_rotator_discovery_listings_total".to_owned()),
            "{text}"
        );
        telemetry.set_discovery_conflicts(3);
        telemetry.discovery_listing("prod", true);
        telemetry.discovery_listing("prod", true);
        telemetry.discovery_listing("dev", false);
        let text = telemetry.render_metrics(t(NOW));
        assert_eq!(
            value(&text, "aep_s3_rotator_discovery_conflicts", &[]),
            Some(3.0)
        );
        let listings = |sandbox: &str, outcome: &str| {
            value(
                &text,
                "aep_s3_rotator_discovery_listings_total",
                &[("sandbox", sandbox), ("outcome", outcome)],
            )
        };
        assert_eq!(listings("prod", "ok"), Some(2.0), "{text}");
        assert_eq!(listings("dev", "failure"), Some(1.0), "{text}");
        assert_eq!(listings("prod", "failure"), None, "{text}");
    }
}
