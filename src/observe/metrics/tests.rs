//! The exposition over hand-made snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::observe::status::{Snapshot, snapshot_channel};
use crate::observe::telemetry::{PREPUSH_RESULTS, Service, Telemetry};

const REFRESH: Duration = Duration::from_secs(20 * 60);

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn status(id: &str) -> ConnectionStatus {
    ConnectionStatus::named(id, id, "prod")
}

/// The exposition of `statuses` and `telemetry` at `NOW`.
fn render(statuses: &[ConnectionStatus], telemetry: &Arc<Telemetry>) -> String {
    let (publish, snapshots) = snapshot_channel(REFRESH);
    publish.send_replace(Arc::new(Snapshot {
        connections: statuses.iter().cloned().map(Arc::new).collect(),
        refresh_before: REFRESH,
        term: 0,
    }));
    let views = Views {
        telemetry: Arc::clone(telemetry),
        snapshots,
        leadership: None,
    };
    Metrics::with_time(views, Some(t(NOW))).render()
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
fn an_empty_snapshot_renders_every_family() {
    let telemetry = Arc::new(Telemetry::new());
    let text = render(&[], &telemetry);
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
fn connections_with_the_same_name_have_their_own_series() {
    // Issue 26 #7: two discovered connections named alike shared one
    // expiry series, so an expiring one could hide behind the other.
    let telemetry = Arc::new(Telemetry::new());
    let mut statuses = Vec::new();
    for (id, expires) in [("c-1", NOW + 60), ("c-2", NOW + 3600), ("c-3", NOW + 3600)] {
        let mut s = status(id);
        Arc::make_mut(&mut s.config).name = if id == "c-3" {
            "other".into()
        } else {
            "ingest".into()
        };
        Arc::make_mut(&mut s.config).sandbox = "prod".into();
        s.expires_at = Some(t(expires));
        statuses.push(s);
    }
    let text = render(&statuses, &telemetry);
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
    let telemetry = Arc::new(Telemetry::new());
    let mut s = status("4cb0c374");
    Arc::make_mut(&mut s.config).name = "sales-bucket".into();
    Arc::make_mut(&mut s.config).sandbox = "prod".into();
    s.access_key_id = Some("ASIAEXAMPLE".into());
    s.expires_at = Some(t(NOW + 3600));
    s.next_rotation_at = Some(t(NOW + 2400));
    s.last_success_at = Some(t(NOW - 1));
    s.counters.successes = 2;
    s.counters.failures = 1;
    s.counters.etag_conflicts = 1;
    telemetry.request(Service::Flow, "200");
    telemetry.request(Service::Flow, "200");
    telemetry.request(Service::Ims, "200");
    telemetry.request(Service::Sts, "Throttling");

    let text = render(&[s], &telemetry);
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
                || name == "aep_s3_rotator_leader_changes_total"
                || name == "aep_s3_rotator_rotate_requests_total",
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
fn remove_drops_every_series_of_the_connection() {
    let telemetry = Arc::new(Telemetry::new());
    let mut statuses = Vec::new();
    for id in ["keep", "gone"] {
        let mut s = status(id);
        s.expires_at = Some(t(NOW + 3600));
        s.next_rotation_at = Some(t(NOW + 2400));
        s.last_success_at = Some(t(NOW));
        s.counters.successes = 1;
        s.counters.failures = 1;
        s.counters.etag_conflicts = 1;
        statuses.push(s);
    }
    assert!(render(&statuses, &telemetry).contains("\"gone\""));
    statuses.retain(|s| s.id() != "gone");
    let text = render(&statuses, &telemetry);
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
}

#[test]
fn verifications_are_counted_by_result() {
    let telemetry = Arc::new(Telemetry::new());
    let mut s = ConnectionStatus {
        access_key_id: None,
        expires_at: None,
        next_rotation_at: None,
        last_success_at: None,
        last_error: None,
        ..ConnectionStatus::named("id-1", "sales", "prod")
    };
    s.counters.verifications_passed = 2;
    s.counters.verifications_failed = 1;
    let text = render(&[s], &telemetry);
    assert!(text.contains("aep_s3_rotator_verifications_total{connection=\"sales\",sandbox=\"prod\",result=\"passed\"} 2"), "{text}");
    assert!(text.contains("aep_s3_rotator_verifications_total{connection=\"sales\",sandbox=\"prod\",result=\"failed\"} 1"), "{text}");
}

#[test]
fn prepush_checks_are_counted_by_result_from_zero() {
    let telemetry = Arc::new(Telemetry::new());
    let text = render(&[], &telemetry);
    for result in PREPUSH_RESULTS {
        let line = format!("aep_s3_rotator_prepush_checks_total{{result=\"{result}\"}} 0");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    telemetry.prepush_check("denied");
    telemetry.prepush_check("denied");
    telemetry.prepush_check("allowed");
    let text = render(&[], &telemetry);
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
    let telemetry = Arc::new(Telemetry::new());
    let mut found = status("c-1");
    Arc::make_mut(&mut found.config).name = "ingest-a".into();
    Arc::make_mut(&mut found.config).origin = crate::config::Origin::Rule(2);
    let statuses = [found, status("c-2")];
    let text = render(&statuses, &telemetry);
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
    let text = render(&statuses, &telemetry);
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
