//! Black-box tests of `[[discover]]`: the release-like binary against the
//! simulator's strict `GET /connections`, with `every = "1s"` so a change is
//! seen at once. Membership changes are made with the simulator's knobs
//! while the daemon runs.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use aep_s3_simulator::{RetryAfter, ScriptedFault, SimConnection};
use common::{Harness, assert_no_secret, wait_until};

const TAG: &str = "rotate:aep-s3";

/// One rule on `prod`: tagged connections whose name starts with `ingest-`.
const RULE: &str = r#"
[[discover]]
sandboxes = ["prod"]
name = "ingest-*"
description_tag = "rotate:aep-s3"
every = "1s"
"#;

fn tagged(id: &str, sandbox: &str, name: &str) -> SimConnection {
    SimConnection::s3(id, sandbox, name).with_description(format!("team data; {TAG}"))
}

fn patches(h: &Harness, id: &str) -> u64 {
    h.sim.connection(id).map_or(0, |c| c.patches)
}

/// A harness with no connections at first; `connections` are added before
/// the daemon starts.
async fn harness(lifetime: Duration, connections: Vec<SimConnection>) -> Harness {
    Harness::start_with(0, lifetime, |config| config.connections = connections).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rule_picks_up_new_connections_and_never_touches_the_rest() {
    let mut not_s3 = tagged("not-s3", "prod", "ingest-blob");
    not_s3.connection_spec_id = "other-spec".to_owned();
    let mut role_based = tagged("role-based", "prod", "ingest-role");
    role_based.auth_spec = "IAMRole Based".to_owned();
    let mut disabled = tagged("disabled", "prod", "ingest-off");
    disabled.state = "disabled".to_owned();
    let untouched = [
        SimConnection::s3("untagged", "prod", "ingest-untagged"),
        tagged("wrong-name", "prod", "egress-sales"),
        tagged("other-sandbox", "dev", "ingest-dev"),
        not_s3,
        role_based,
        disabled,
    ];
    let mut all = vec![tagged("first", "prod", "ingest-first")];
    all.extend(untouched.iter().cloned());
    let h = harness(Duration::from_secs(60), all).await;
    let config = h.config().table(RULE).connections(&[]).write();
    let mut daemon = h.spawn(&config, &["run"]);

    assert!(
        wait_until(Duration::from_secs(20), || patches(&h, "first") >= 1).await,
        "the matching connection was not rotated; stderr:\n{}",
        daemon.stderr_text()
    );
    // Created while the daemon runs: found by the next listing (every 1 s).
    h.sim
        .add_connection(tagged("created-later", "prod", "ingest-later"));
    assert!(
        wait_until(Duration::from_secs(15), || patches(&h, "created-later")
            >= 1)
        .await,
        "a new tagged connection was not picked up; stderr:\n{}",
        daemon.stderr_text()
    );
    let discovered: Vec<String> = daemon
        .events("connection discovered")
        .iter()
        .map(|e| e["connection"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(discovered, ["first", "created-later"]);
    assert!(
        daemon
            .events("connection discovered")
            .iter()
            .all(|e| e["origin"] == "discover[0]" && e["sandbox"] == "prod")
    );

    for c in &untouched {
        assert_eq!(patches(&h, &c.id), 0, "{} was PATCHed", c.id);
    }
    assert!(h.sim.stats().flow_lists >= 2, "the sandbox is re-listed");
    assert_eq!(daemon.terminate().code(), Some(0));
    for c in &untouched {
        assert_eq!(patches(&h, &c.id), 0, "{} was PATCHed", c.id);
    }
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
    assert_no_secret(&daemon.stderr_text(), &h.secrets());
}

#[tokio::test(flavor = "multi_thread")]
async fn renamed_or_untagged_connections_are_dropped() {
    // Credentials of 3 s with refresh_before 2 s: each connection is
    // PATCHed about every second while it is a member.
    let h = harness(
        Duration::from_secs(3),
        vec![
            tagged("renamed", "prod", "ingest-a"),
            tagged("untagged", "prod", "ingest-b"),
            tagged("stays", "prod", "ingest-c"),
        ],
    )
    .await;
    let config = h.config().table(RULE).connections(&[]).write();
    let mut daemon = h.spawn(&config, &["run"]);
    assert!(
        wait_until(Duration::from_secs(20), || {
            ["renamed", "untagged", "stays"]
                .iter()
                .all(|id| patches(&h, id) >= 1)
        })
        .await,
        "stderr:\n{}",
        daemon.stderr_text()
    );

    assert!(h.sim.rename_connection("renamed", "egress-a"));
    assert!(h.sim.set_description("untagged", "no longer rotated here"));
    assert!(
        wait_until(Duration::from_secs(15), || {
            daemon.events("connection no longer matches").len() == 2
        })
        .await,
        "stderr:\n{}",
        daemon.stderr_text()
    );
    // Let a job that was in flight at the drop finish, then watch two more
    // rotations of the member: the dropped ones get none.
    let stays = patches(&h, "stays");
    assert!(wait_until(Duration::from_secs(15), || patches(&h, "stays") > stays).await);
    let dropped = (patches(&h, "renamed"), patches(&h, "untagged"));
    let stays = patches(&h, "stays");
    assert!(
        wait_until(Duration::from_secs(20), || patches(&h, "stays")
            >= stays + 2)
        .await,
        "the remaining member stopped rotating; stderr:\n{}",
        daemon.stderr_text()
    );
    assert_eq!(
        (patches(&h, "renamed"), patches(&h, "untagged")),
        dropped,
        "a dropped connection was still rotated"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_or_throttled_list_drops_nothing() {
    // Credentials of 3 s: the members rotate about every second.
    let h = harness(
        Duration::from_secs(3),
        vec![
            tagged("one", "prod", "ingest-1"),
            tagged("two", "prod", "ingest-2"),
        ],
    )
    .await;
    let config = h.config().table(RULE).connections(&[]).write();
    let mut daemon = h.spawn(&config, &["run"]);
    assert!(
        wait_until(Duration::from_secs(20), || {
            patches(&h, "one") >= 1 && patches(&h, "two") >= 1
        })
        .await,
        "stderr:\n{}",
        daemon.stderr_text()
    );
    let lists = h.sim.stats().flow_lists;
    for status in [429, 503, 500, 429] {
        h.sim.script_list(ScriptedFault::Status {
            status,
            retry_after: (status == 429).then_some(RetryAfter::Seconds(1)),
            body: None,
        });
    }
    h.sim.script_list(ScriptedFault::Reset);
    // Five failed listings, then a good one.
    assert!(
        wait_until(Duration::from_secs(30), || h.sim.stats().flow_lists > lists).await,
        "stderr:\n{}",
        daemon.stderr_text()
    );
    assert!(
        daemon
            .events("listing connections failed, keeping the last known set")
            .len()
            >= 5,
        "stderr:\n{}",
        daemon.stderr_text()
    );
    assert!(
        daemon.events("connection no longer matches").is_empty(),
        "a failed listing dropped a connection; stderr:\n{}",
        daemon.stderr_text()
    );
    let before = (patches(&h, "one"), patches(&h, "two"));
    assert!(
        wait_until(Duration::from_secs(15), || {
            patches(&h, "one") > before.0 && patches(&h, "two") > before.1
        })
        .await,
        "the members stopped rotating; stderr:\n{}",
        daemon.stderr_text()
    );
    assert_eq!(daemon.terminate().code(), Some(0));
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

/// The start's listing fails after its first page: the connections that
/// page brought are rotated and kept (a failed list call drops nothing), and
/// the next re-list brings the rest. Each connection is PATCHed once: none
/// is dropped and then rotated again as new.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_listing_failing_after_its_first_page_keeps_that_page() {
    let connections: Vec<SimConnection> = (0..130)
        .map(|n| tagged(&format!("c{n:03}"), "prod", &format!("ingest-{n:03}")))
        .collect();
    let h = harness(Duration::from_secs(60), connections).await;
    // The first list page (100 items) is answered, the second fails.
    h.sim.script_list(ScriptedFault::Delay(Duration::ZERO));
    h.sim.script_list(ScriptedFault::Status {
        status: 503,
        retry_after: None,
        body: None,
    });
    let config = h.config().table(RULE).connections(&[]).write();
    let mut daemon = h.spawn(&config, &["run"]);
    assert!(
        wait_until(Duration::from_secs(60), || {
            h.sim.stats().connections_never_rotated == 0
        })
        .await,
        "stderr:\n{}",
        daemon.stderr_text()
    );
    let dropping: Vec<_> = daemon
        .events("config reloaded")
        .into_iter()
        .filter(|e| e["removed"].as_u64() != Some(0))
        .collect();
    assert!(
        dropping.is_empty(),
        "the failed page made the daemon drop connections: {dropping:?}"
    );
    assert!(daemon.events("connection no longer matches").is_empty());
    for n in 0..130 {
        let id = format!("c{n:03}");
        assert_eq!(patches(&h, &id), 1, "{id} was rotated again as new");
    }
    assert_eq!(daemon.terminate().code(), Some(0));
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn check_prints_what_each_rule_matches() {
    let h = harness(
        Duration::from_secs(60),
        vec![
            tagged("match-1", "prod", "ingest-1"),
            SimConnection::s3("no-tag", "prod", "ingest-2"),
        ],
    )
    .await;
    let config = h.config().table(RULE).connections(&[]).write();
    let mut daemon = h.spawn(&config, &["check"]);
    let status = daemon.wait(Duration::from_secs(30));
    let out = daemon.stdout_text();
    assert_eq!(
        status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        daemon.stderr_text()
    );
    assert!(
        out.contains("discover[0]") && out.contains("matches 1 connections now"),
        "{out}"
    );
    assert!(out.contains("match-1 \"ingest-1\" (prod)"), "{out}");
    assert!(!out.contains("no-tag"), "{out}");
    assert_eq!(patches(&h, "match-1"), 0, "check changes nothing");
}
