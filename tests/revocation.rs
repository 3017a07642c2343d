//! Healing after "revoke active sessions", black box: the real daemon
//! against the simulator, whose S3 and connection test refuse every session
//! of the role issued before the revocation, and which counts PATCHes that
//! store such credentials.

// Black-box tests drive the real binary in real time: they read the real clocks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::time::{Duration, SystemTime};

use aep_s3_simulator::SimConnection;
use common::*;

/// Credentials that live an hour: nothing is due during a test, so only
/// the revocation handling can replace them.
const HOUR: Duration = Duration::from_secs(3600);

const EVICTED: &str = "cached credentials refused by S3, asking STS for new ones";
const TEST_FAILED: &str = "connection test failed: Flow Service cannot reach S3 with the credentials on the connection; rotating now with new credentials";

/// The access key on connection `id` and when STS issued it.
fn held(h: &Harness, id: &str) -> Option<(String, SystemTime)> {
    let key = h.sim.connection(id)?.access_key_id?;
    let session = h.sim.sts_session(&key)?;
    Some((key, session.issued_at))
}

async fn wait_all_patched(h: &Harness, ids: &[String], daemon: &DaemonProcess) {
    assert!(
        h.rotated_at_least(ids, 1, Duration::from_secs(20)).await,
        "first pass incomplete; stderr:\n{}",
        daemon.stderr_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_revoked_credentials_are_replaced_in_the_same_attempt_and_never_pushed() {
    let h = Harness::start(2, HOUR).await;
    let ids = h.connection_ids();
    let config = h.config().write();
    let daemon = h.spawn(&config, &["run"]);
    wait_all_patched(&h, &ids, &daemon).await;
    // One role, no tags: one AssumeRole for both, cached for an hour.
    assert_eq!(h.sim.stats().sts_assume_role, 1);

    let revoked_at = h.sim.revoke_sessions(ROLE_ARN);
    // A connection that needs credentials now (here: added by a reload)
    // is handed the cached, revoked ones first.
    let added = SimConnection::s3(uuid::Uuid::new_v4().to_string(), "prod", "conn-added");
    h.sim.add_connection(added.clone());
    let mut all = h.sim_config.connections.clone();
    all.push(added.clone());
    h.config().connections(&all).write();
    daemon.reload().await;

    assert!(
        wait_until(Duration::from_secs(30), || held(&h, &added.id).is_some()).await,
        "the added connection got nothing; stderr:\n{}",
        daemon.stderr_text()
    );
    let (_, issued_at) = held(&h, &added.id).unwrap();
    assert!(
        issued_at > revoked_at,
        "pushed credentials issued before the revocation"
    );
    // Healed within that one attempt: no retry, one eviction, one new call.
    let connection = h.sim.connection(&added.id).unwrap();
    assert_eq!(connection.patches, 1);
    let added_failures: Vec<_> = daemon
        .events("rotation failed, retrying")
        .into_iter()
        .filter(|e| e["connection"] == added.id.as_str())
        .collect();
    assert!(added_failures.is_empty(), "{added_failures:?}");
    let evicted = daemon.events(EVICTED);
    assert_eq!(evicted.len(), 1, "{}", daemon.stderr_text());
    assert_eq!(evicted[0]["connection"], added.id.as_str());
    assert_eq!(evicted[0]["s3_code"], "AccessDenied");
    assert_eq!(evicted[0]["level"], "info");
    // The refusal that counts was the retry's, and it passed: no error line.
    assert!(daemon
        .events("new credentials cannot list the bucket, not pushed; the connection keeps its current credentials")
        .is_empty());
    assert_eq!(h.sim.stats().sts_assume_role, 2);
    // Without the health check the connections not due keep their revoked
    // credentials (tests below): nothing else was rotated.
    for id in &ids {
        assert_eq!(h.sim.connection(id).unwrap().patches, 1);
    }
    assert_eq!(h.sim.stats().flow_patches_revoked, 0);
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
    assert_no_secret(&daemon.stderr_text(), &h.secrets());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_health_check_every_connection_is_healed_within_one_period() {
    let h = Harness::start(3, HOUR).await;
    let ids = h.connection_ids();
    let period = Duration::from_secs(3);
    let config = h
        .config()
        .rotation(Rotation::fast().health_check_every("3s"))
        .admin()
        .write();
    let daemon = h.spawn(&config, &["run"]);
    let admin = daemon.admin_addr().await;
    wait_all_patched(&h, &ids, &daemon).await;
    let first: Vec<String> = ids.iter().map(|id| held(&h, id).unwrap().0).collect();
    // One pass finds everything healthy.
    let all_passed = || {
        daemon
            .events("connection tests done")
            .iter()
            .any(|e| e["passed"] == ids.len())
    };
    assert!(
        wait_until(period * 3, all_passed).await,
        "{}",
        daemon.stderr_text()
    );
    assert!(
        daemon.events(TEST_FAILED).is_empty(),
        "{}",
        daemon.stderr_text()
    );
    let calls_before = h.sim.stats().sts_assume_role;

    let revoked_at = h.sim.revoke_sessions(ROLE_ARN);
    let healed = || {
        ids.iter()
            .all(|id| held(&h, id).is_some_and(|(_, issued_at)| issued_at > revoked_at))
    };
    // A deadline for a stuck daemon only (a loaded machine is slow): "within
    // one period" is asserted by counting passes below, not by the clock.
    assert!(
        wait_until(period * 3 + Duration::from_secs(10), healed).await,
        "not healed; stderr:\n{}",
        daemon.stderr_text()
    );
    for (id, old) in ids.iter().zip(&first) {
        assert_ne!(&held(&h, id).unwrap().0, old, "{id} kept its key");
    }
    // Each connection failed exactly one test: the first pass after the
    // revocation healed it (a second failing pass would log it again).
    assert_eq!(daemon.events(TEST_FAILED).len(), ids.len());
    // Three connections sharing an identity: one new AssumeRole for all.
    assert_eq!(h.sim.stats().sts_assume_role, calls_before + 1);
    // Never a PATCH of revoked credentials.
    assert_eq!(h.sim.stats().flow_patches_revoked, 0);

    // The gauge: 0 for every connection once the next pass tested the new keys.
    let mut lines = Vec::new();
    let all_zero = wait_until_async(period * 2 + Duration::from_secs(2), async || {
        let text = match reqwest::get(format!("http://{admin}/metrics")).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        lines = text
            .lines()
            .filter(|l| l.starts_with("aep_s3_rotator_connection_test_failing{"))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        lines.len() == ids.len() && lines.iter().all(|l| l.ends_with(" 0"))
    })
    .await;
    assert!(all_zero, "gauge: {lines:?}");
    assert!(
        lines.len() == ids.len() && lines.iter().all(|l| l.ends_with(" 0")),
        "gauge: {lines:?}"
    );
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
    assert_no_secret(&daemon.stderr_text(), &h.secrets());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_pre_push_check_the_health_check_still_never_pushes_revoked_credentials() {
    let h = Harness::start(2, HOUR).await;
    let ids = h.connection_ids();
    let config = h
        .config()
        .rotation(
            Rotation::fast()
                .prepush_check(false)
                .health_check_every("2s"),
        )
        .write();
    let daemon = h.spawn(&config, &["run"]);
    wait_all_patched(&h, &ids, &daemon).await;
    let revoked_at = h.sim.revoke_sessions(ROLE_ARN);
    assert!(
        wait_until(Duration::from_secs(8), || ids
            .iter()
            .all(|id| held(&h, id).is_some_and(|(_, at)| at > revoked_at)))
        .await,
        "not healed; stderr:\n{}",
        daemon.stderr_text()
    );
    assert_eq!(h.sim.stats().flow_patches_revoked, 0);
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}
