//! `/metrics`: the Prometheus exposition (OpenMetrics text), built from the
//! scheduler's [`Snapshot`](super::status::Snapshot) and the process-wide
//! [`Telemetry`](super::telemetry::Telemetry) counters by one
//! prometheus-client [`Collector`], registered once.
//!
//! Gauges that describe a connection's current state (expiry, next
//! rotation, last success, the per-state counts) and its counters come from
//! the same snapshot as `/status` and `/readyz`, so the three never disagree
//! and a removed connection disappears from all of them at once. Families
//! print in the order SPEC.md lists them, each with its `# HELP`/`# TYPE`
//! lines even before its first series, so dashboards and `absent()` alerts
//! can tell "no rotation yet" from "no such metric".

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::status::{ConnectionState, ConnectionStatus, Outcome};
use super::views::Views;
use crate::coordination::leadership::Role;

/// Content type of [`Metrics::render`] (OpenMetrics text, which Prometheus
/// negotiates and parses natively).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prefix shared by every metric name.
const PREFIX: &str = "aep_s3_rotator";

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
struct BuildLabels {
    version: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// A unix-seconds gauge.
type TimestampGauge = Gauge<f64, AtomicU64>;

/// The registry behind `/metrics`, built once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// The registry over `views`.
    pub fn new(views: Views) -> Self {
        Self::with_time(views, None)
    }

    /// The registry over `views` as seen at `now` (`None`: the wall clock).
    fn with_time(views: Views, now: Option<SystemTime>) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(Exposition { views, now }));
        Self { registry }
    }

    /// The exposition as of now.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = encode(&mut text, &self.registry) {
            // Writing to a String cannot fail; a metric's own encoder could
            // only fail on a bug, and a scrape is not worth a crash.
            tracing::error!(error = %e, "cannot encode metrics");
            let _ = writeln!(text, "# metrics encoding failed");
        }
        text
    }
}

/// The one collector: every family, from the views at scrape time.
#[derive(Debug)]
struct Exposition {
    views: Views,
    /// Fixed for tests; `None`: the wall clock at each scrape.
    now: Option<SystemTime>,
}

/// Encodes one family (its `# HELP`/`# TYPE` lines even when empty).
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let metric_encoder = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(metric_encoder)
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = self.now.unwrap_or_else(crate::clock::wall_now);
        let snapshot = self.views.snapshot();
        let telemetry = &self.views.telemetry;
        let per = PerConnection::of(&snapshot.connections, snapshot.refresh_before, now);
        // Counters are named without `_total`: the OpenMetrics encoder
        // appends it, so the exposed names are exactly the documented ones.
        family(
            &mut encoder,
            "rotations",
            "Rotation attempts per connection, by outcome",
            &per.rotations,
        )?;
        family(
            &mut encoder,
            "credentials_expiry_timestamp_seconds",
            "When the credentials this daemon pushed to the connection expire (unix seconds)",
            &per.expiry,
        )?;
        family(
            &mut encoder,
            "next_rotation_timestamp_seconds",
            "When the next rotation or retry of the connection is due (unix seconds)",
            &per.next_rotation,
        )?;
        family(
            &mut encoder,
            "last_success_timestamp_seconds",
            "When the connection was last rotated successfully (unix seconds)",
            &per.last_success,
        )?;
        family(
            &mut encoder,
            "verifications",
            "Answers of GET /connections/{id}/test after a PATCH ([rotation] verify), by result",
            &per.verifications,
        )?;
        family(
            &mut encoder,
            "connection_test_failing",
            "1 while the connection's last test (GET /connections/{id}/test: [rotation] health_check_every or verify) said Flow Service cannot reach S3 with its credentials, else 0",
            &per.test_failing,
        )?;
        family(
            &mut encoder,
            "etag_conflicts",
            "412 Precondition Failed answers to a PATCH, per connection",
            &per.etag_conflicts,
        )?;
        family(
            &mut encoder,
            "requests",
            "Requests to remote services, by HTTP status or error class",
            &telemetry.requests.family(),
        )?;
        family(
            &mut encoder,
            "prepush_checks",
            "Pre-push S3 checks of new credentials before a PATCH, by result (allowed, denied, error, skipped)",
            &telemetry.prepush_checks,
        )?;
        family(
            &mut encoder,
            "connections",
            "Configured connections per state",
            &per.states,
        )?;
        family(
            &mut encoder,
            "connection_info",
            "How each connection was configured (origin: explicit or discover[N]); the value is always 1",
            &per.info,
        )?;
        family(
            &mut encoder,
            "discovery_conflicts",
            "Connections matched by [[discover]] rules with different identities, not rotated",
            &telemetry.discovery_conflicts,
        )?;
        family(
            &mut encoder,
            "discovery_listings",
            "Listings of connections (GET /connections, all pages), by sandbox and outcome (ok, failure)",
            &telemetry.listings,
        )?;
        // Without coordination the process is the only writer: leader = 1,
        // so `sum(aep_s3_rotator_leader) == 1` holds for every deployment.
        let leader = Gauge::<i64>::default();
        leader.set(i64::from(
            self.views.role().is_none_or(|v| v.role == Role::Leader),
        ));
        family(
            &mut encoder,
            "leader",
            "1 while this replica holds the coordination lease (or runs without coordination), else 0",
            &leader,
        )?;
        family(
            &mut encoder,
            "rotate_requests",
            "Requests of `aep-s3-rotator rotate` answered, by result (pushed, failed, rejected, denied)",
            &telemetry.rotate_requests.family(),
        )?;
        family(
            &mut encoder,
            "leader_changes",
            "Times this replica became or stopped being the leader",
            &telemetry.leader_changes,
        )?;
        // A gauge rather than an OpenMetrics `info`: the `_build_info` gauge
        // is the convention every Prometheus-format consumer understands.
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        family(
            &mut encoder,
            "build_info",
            "Version of the running daemon; the value is always 1",
            &build_info,
        )
    }
}

/// The per-connection families of one scrape.
struct PerConnection {
    rotations: Family<RotationLabels, Counter>,
    etag_conflicts: Family<ConnectionLabels, Counter>,
    verifications: Family<VerificationLabels, Counter>,
    test_failing: Family<ConnectionLabels, Gauge>,
    expiry: Family<ConnectionLabels, TimestampGauge>,
    next_rotation: Family<ConnectionLabels, TimestampGauge>,
    last_success: Family<ConnectionLabels, TimestampGauge>,
    states: Family<StateLabels, Gauge>,
    info: Family<InfoLabels, Gauge>,
}

impl PerConnection {
    fn of(
        connections: &[std::sync::Arc<ConnectionStatus>],
        refresh_before: std::time::Duration,
        now: SystemTime,
    ) -> Self {
        let per = Self {
            rotations: Family::default(),
            etag_conflicts: Family::default(),
            verifications: Family::default(),
            test_failing: Family::default(),
            expiry: Family::default(),
            next_rotation: Family::default(),
            last_success: Family::default(),
            states: Family::default(),
            info: Family::default(),
        };
        for state in ConnectionState::ALL {
            // Every state prints, zero included, so alerts and dashboards
            // never see a series vanish.
            per.states
                .get_or_create(&StateLabels {
                    state: state.as_str(),
                })
                .set(0);
        }
        let label_of = connection_labels(connections);
        for (status, label) in connections.iter().zip(label_of) {
            let labels = ConnectionLabels {
                connection: label,
                sandbox: status.sandbox().to_owned(),
            };
            per.states
                .get_or_create(&StateLabels {
                    state: status.state(now, refresh_before).as_str(),
                })
                .inc();
            per.info
                .get_or_create(&InfoLabels {
                    connection: labels.connection.clone(),
                    sandbox: status.sandbox().to_owned(),
                    origin: status.origin().to_string(),
                })
                .set(1);
            for (family, time) in [
                (&per.expiry, status.expires_at),
                (&per.next_rotation, status.next_rotation_at),
                (&per.last_success, status.last_success_at),
            ] {
                if let Some(time) = time {
                    family.get_or_create(&labels).set(unix_seconds(time));
                }
            }
            // Every known connection has its counter series from the start,
            // at zero, so every metric name of SPEC.md is scrapeable (and
            // `increase()` works) before the first event.
            let counters = status.counters;
            for (outcome, n) in [
                (Outcome::Success, counters.successes),
                (Outcome::Failure, counters.failures),
            ] {
                per.rotations
                    .get_or_create(&RotationLabels {
                        connection: labels.connection.clone(),
                        sandbox: labels.sandbox.clone(),
                        outcome: outcome.as_str(),
                    })
                    .inc_by(n);
            }
            for (result, n) in [
                ("passed", counters.verifications_passed),
                ("failed", counters.verifications_failed),
            ] {
                if n > 0 {
                    per.verifications
                        .get_or_create(&VerificationLabels {
                            connection: labels.connection.clone(),
                            sandbox: labels.sandbox.clone(),
                            result,
                        })
                        .inc_by(n);
                }
            }
            if let Some(failing) = status.test_failing {
                per.test_failing
                    .get_or_create(&labels)
                    .set(i64::from(failing));
            }
            per.etag_conflicts
                .get_or_create(&labels)
                .inc_by(counters.etag_conflicts);
        }
        per
    }
}

/// The `connection` label of each connection, in the order given: its name,
/// or, when another connection of the same sandbox has the same name (names
/// are not unique in AEP), `name (id)`, so that every connection has its own
/// series and an expiring one cannot hide behind another's (issue 26).
fn connection_labels(connections: &[std::sync::Arc<ConnectionStatus>]) -> Vec<String> {
    let mut seen: HashMap<(&str, &str), usize> = HashMap::with_capacity(connections.len());
    for status in connections {
        *seen.entry((status.name(), status.sandbox())).or_default() += 1;
    }
    connections
        .iter()
        .map(|status| {
            if seen.get(&(status.name(), status.sandbox())) > Some(&1) {
                format!("{} ({})", status.name(), status.id())
            } else {
                status.name().to_owned()
            }
        })
        .collect()
}

/// `time` as unix seconds (negative before 1970, which never happens here).
fn unix_seconds(time: SystemTime) -> f64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests;
