//! The core job, black box: the real binary against the strict simulator.

// Helpers outside #[test] functions may unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use aep_s3_simulator::{RetryAfter, ScriptedFault, SimEvent, SimService};
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn rotates_every_connection_every_cycle_then_stops_on_sigterm() {
    let h = Harness::start(3, Duration::from_secs(4)).await;
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["run"]);
    let ids = h.connection_ids();
    let cycled = h.rotated_at_least(&ids, 3, Duration::from_secs(40)).await;
    assert!(
        cycled,
        "not every connection rotated 3 times; stderr:\n{}",
        daemon.stderr_text()
    );

    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM must exit 0");
    assert!(
        h.sim.violations().is_empty(),
        "protocol violations: {:?}",
        h.sim.violations()
    );
    let stats = h.sim.stats();
    assert_eq!(
        stats.expired_seconds, 0.0,
        "a connection held expired credentials"
    );
    // One STS call per cycle for all three connections (they share a role):
    // far fewer calls than PATCHes.
    assert!(stats.sts_assume_role < stats.flow_patches_ok, "{stats:?}");
    for id in &ids {
        let view = h.sim.connection(id).unwrap();
        assert!(
            view.access_key_id
                .as_deref()
                .is_some_and(|k| k.starts_with("ASIA"))
        );
        assert!(
            view.params_other_than_credentials
                .get("bucketName")
                .is_some(),
            "bucketName was dropped"
        );
    }
    let rotated = daemon.events("credentials rotated");
    assert!(
        rotated.len() >= 9,
        "only {} rotations logged",
        rotated.len()
    );
    for event in &rotated {
        assert!(
            event["access_key_id"]
                .as_str()
                .is_some_and(|k| k.starts_with("ASIA")),
            "{event}"
        );
        assert!(
            ids.contains(&event["connection"].as_str().unwrap().to_owned()),
            "{event}"
        );
        assert!(
            event["sandbox"].is_string()
                && event["expires_at"].is_string()
                && event["next_rotation_at"].is_string()
        );
    }
    assert_eq!(daemon.events("shutting down").len(), 1);
    assert_no_secret(&daemon.stderr_text(), &h.secrets());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_etag_conflict_is_resolved_by_reading_the_connection_again() {
    let h = Harness::start(2, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    // The churn comes with a GET: start without bulk etags.
    h.without_bulk_etags();
    h.sim.script_for(&ids[0], ScriptedFault::EtagChurn);
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["once"]);
    let status = daemon.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", daemon.stderr_text());
    assert_eq!(h.sim.stats().flow_412, 1);
    assert_eq!(h.sim.connection(&ids[0]).unwrap().patches, 1);
    let conflicts = daemon.events("etag conflict, re-reading connection");
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0]["connection"], ids[0].as_str());
    assert!(
        daemon.events("rotation failed, retrying").is_empty(),
        "a 412 must be absorbed in the same attempt"
    );
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_etag_from_the_bulk_read_is_resolved_by_reading_the_connection() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let id = h.connection_ids().remove(0);
    // The list page is older than the connection (someone edited it after
    // the page was read): its etag is no longer current. Its bucket is the
    // real one, so the pre-push check needs no GET either.
    let params = h.sim.connection(&id).unwrap().params_other_than_credentials;
    let item = serde_json::json!({
        "id": id,
        "etag": "\"00000000-0000-0000-0000-000000000000\"",
        "name": "conn-0",
        "state": "enabled",
        "connectionSpec": {"id": aep_s3_simulator::S3_CONNECTION_SPEC_ID},
        "auth": {"specName": aep_s3_simulator::ACCESS_KEY_AUTH_SPEC, "params": params},
    });
    h.sim.script_list(ScriptedFault::Raw {
        status: 200,
        content_type: "application/json".to_owned(),
        body: serde_json::json!({ "items": [item] }).to_string(),
    });
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["once"]);
    let status = daemon.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", daemon.stderr_text());
    let stats = h.sim.stats();
    // List, PATCH with the listed etag (412), one GET, one PATCH: one attempt.
    assert_eq!(stats.flow_requests, 4, "{stats:?}");
    assert_eq!(stats.flow_412, 1, "{stats:?}");
    assert_eq!(stats.flow_gets, 1, "{stats:?}");
    assert_eq!(h.sim.connection(&id).unwrap().patches, 1);
    assert_eq!(
        daemon.events("etag conflict, re-reading connection").len(),
        1,
        "stderr:\n{}",
        daemon.stderr_text()
    );
    assert!(daemon.events("rotation failed, retrying").is_empty());
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_request_waits_for_retry_after() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let id = h.connection_ids().remove(0);
    // The 429 is for the rotation's own request, not the bulk etag read.
    h.without_bulk_etags();
    h.sim.script(
        SimService::Flow,
        ScriptedFault::Status {
            status: 429,
            retry_after: Some(RetryAfter::Seconds(2)),
            body: None,
        },
    );
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["once"]);
    let status = daemon.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", daemon.stderr_text());
    let failed = daemon.events("rotation failed, retrying");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["status"], "429");
    assert_eq!(failed[0]["retry_in"], "2s");
    assert_eq!(h.sim.connection(&id).unwrap().patches, 1);
    // The retry came no sooner than Retry-After (a lower bound only: a slow
    // machine can only make it later).
    let events = h.sim.events();
    let throttled_at = events.iter().find_map(|e| match e {
        SimEvent::Throttled { at, .. } => Some(*at),
        _ => None,
    });
    let patched_at = events.iter().find_map(|e| match e {
        SimEvent::PatchApplied { at, .. } => Some(*at),
        _ => None,
    });
    let gap = patched_at
        .unwrap()
        .duration_since(throttled_at.unwrap())
        .unwrap();
    assert!(
        gap >= Duration::from_millis(1900),
        "retried after {gap:?}, before Retry-After"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_ims_token_is_replaced_and_the_patch_retried() {
    let h = Harness::start(2, Duration::from_secs(4)).await;
    let ids = h.connection_ids();
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["run"]);
    assert!(
        h.rotated_at_least(&ids, 1, Duration::from_secs(20)).await,
        "first pass did not happen; stderr:\n{}",
        daemon.stderr_text()
    );
    h.sim.revoke_tokens();
    assert!(
        h.rotated_at_least(&ids, 3, Duration::from_secs(20)).await,
        "rotation did not continue after the token was revoked; stderr:\n{}",
        daemon.stderr_text()
    );
    assert_eq!(daemon.terminate().code(), Some(0));
    let stats = h.sim.stats();
    assert!(stats.flow_401 >= 1, "{stats:?}");
    assert!(stats.ims_tokens_issued >= 2, "{stats:?}");
    assert!(
        !daemon
            .events("ims token refused by flow service, fetching a new one")
            .is_empty()
    );
    assert!(
        daemon.events("rotation failed, retrying").is_empty(),
        "one 401 must be absorbed in the same attempt"
    );
    assert_eq!(stats.expired_seconds, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_connection_fails_alone_and_the_others_keep_rotating() {
    let h = Harness::start(3, Duration::from_secs(4)).await;
    let ids = h.connection_ids();
    h.sim.delete_connection(&ids[1]);
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["run"]);
    let healthy = [&ids[0], &ids[2]];
    assert!(
        wait_until(Duration::from_secs(30), || healthy
            .iter()
            .all(|id| h.sim.connection(id).is_some_and(|c| c.patches >= 3)))
        .await,
        "healthy connections were held up; stderr:\n{}",
        daemon.stderr_text()
    );
    assert_eq!(daemon.terminate().code(), Some(0));
    let failures: Vec<_> = daemon.events("rotation failed, retrying");
    assert!(!failures.is_empty());
    for failure in &failures {
        assert_eq!(
            failure["connection"],
            ids[1].as_str(),
            "only the deleted connection fails: {failure}"
        );
        assert_eq!(failure["status"], "404");
        let error = failure["error"].as_str().unwrap();
        assert!(
            error.contains("not found"),
            "the remote's detail is passed on: {error}"
        );
        assert!(
            error.contains("check that connection"),
            "the advice is given: {error}"
        );
    }
    assert_eq!(h.sim.stats().expired_seconds, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn once_exits_0_when_all_rotate_and_1_when_one_fails() {
    let h = Harness::start(2, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    let config = h.config().write();

    let mut good = h.spawn(&config, &["once"]);
    assert_eq!(
        good.wait(Duration::from_secs(30)).code(),
        Some(0),
        "stderr:\n{}",
        good.stderr_text()
    );
    let report = good.stdout_text();
    assert!(report.contains("2 connections, 2 ok, 0 failed"), "{report}");
    assert!(report.contains("ASIA"), "{report}");

    h.sim.delete_connection(&ids[0]);
    let mut bad = h.spawn(&config, &["once"]);
    assert_eq!(
        bad.wait(Duration::from_secs(30)).code(),
        Some(1),
        "stderr:\n{}",
        bad.stderr_text()
    );
    let report = bad.stdout_text();
    assert!(report.contains("FAIL  conn-0 (prod)"), "{report}");
    assert!(report.contains("2 connections, 1 ok, 1 failed"), "{report}");

    // --connection narrows the run to the named connection.
    let mut only = h.spawn(&config, &["once", "--connection", &ids[1]]);
    assert_eq!(
        only.wait(Duration::from_secs(30)).code(),
        Some(0),
        "stderr:\n{}",
        only.stderr_text()
    );
    assert!(only.stdout_text().contains("1 connection, 1 ok, 0 failed"));

    // ... or to the connection a name names (what logs and reports show).
    let mut by_name = h.spawn(&config, &["once", "--connection", "conn-1"]);
    assert_eq!(
        by_name.wait(Duration::from_secs(30)).code(),
        Some(0),
        "stderr:\n{}",
        by_name.stderr_text()
    );
    let report = by_name.stdout_text();
    assert!(report.contains("ok    conn-1 (dev)"), "{report}");
    assert!(report.contains("1 connection, 1 ok, 0 failed"), "{report}");

    let mut unknown = h.spawn(&config, &["once", "--connection", "no-such-id"]);
    assert_eq!(unknown.wait(Duration::from_secs(30)).code(), Some(2));
    assert!(unknown.stderr_text().contains("no-such-id"));
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_reads_everything_and_patches_nothing() {
    let h = Harness::start(2, Duration::from_secs(60)).await;
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["once", "--dry-run"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(30)).code(),
        Some(0),
        "stderr:\n{}",
        daemon.stderr_text()
    );
    let stats = h.sim.stats();
    assert_eq!(stats.flow_patches_ok, 0);
    // The connections are read in bulk: one list call per sandbox, no GET.
    assert!(
        stats.flow_lists >= 2
            && stats.flow_gets == 0
            && stats.sts_assume_role >= 1
            && stats.ims_tokens_issued >= 1,
        "{stats:?}"
    );
    assert_eq!(daemon.events("dry run: would rotate credentials").len(), 2);
    assert_no_secret(&daemon.stderr_text(), &h.secrets());
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_tests_the_connection_after_the_patch() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let config = h.config().rotation(Rotation::fast().verify(true)).write();
    let mut daemon = h.spawn(&config, &["once"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(30)).code(),
        Some(0),
        "stderr:\n{}",
        daemon.stderr_text()
    );
    let passed = daemon.events("connection test passed");
    assert_eq!(passed.len(), 1, "stderr:\n{}", daemon.stderr_text());
    assert_eq!(passed[0]["connection"], h.connection_ids()[0].as_str());
}
