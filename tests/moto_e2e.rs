// Black-box tests drive the real binary in real time: they read the real clocks.
#![allow(clippy::disallowed_methods)]
//! End to end with `moto` as STS: a real, independent implementation of the
//! STS wire protocol, reached by the real `aws-sdk-sts` client in the daemon.
//! IMS and Flow Service are the simulator's.
//!
//! The pre-push S3 check is tested here against moto's S3 with moto's IAM
//! enforcement on (`INITIAL_NO_AUTH_ACTION_COUNT`, set through
//! `/moto-api/reset-auth` by `tests/support/moto_iam_setup.py`): moto then
//! verifies every SigV4 signature and evaluates the assumed role's policies.
//!
//! `scripts/test.sh` installs moto into `.venv` and exports
//! `AEP_S3_ROTATOR_MOTO_SERVER`. Without it this test FAILS: it never skips.

// Helpers outside #[test] functions may unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn rotates_with_credentials_from_moto_sts() {
    let moto = Moto::start();
    let h = Harness::start_with(2, Duration::from_secs(3600), |sim| {
        sim.accept_foreign_credentials = true
    })
    .await;
    let ids = h.connection_ids();
    // STS is moto instead of the simulator.
    let config = h.config().sts_endpoint(&moto.url()).write();

    let mut daemon = h.spawn(&config, &["once"]);
    let status = daemon.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", daemon.stderr_text());
    for id in &ids {
        let key = h
            .sim
            .connection(id)
            .unwrap()
            .access_key_id
            .expect("credentials were pushed");
        assert!(
            key.starts_with("ASIA"),
            "moto's temporary key ids start with ASIA: {key}"
        );
    }
    // moto honours DurationSeconds (15 min asked): the expiry the daemon
    // schedules from is the one STS returned.
    for event in daemon.events("credentials rotated") {
        let expires_at = humantime::parse_rfc3339(event["expires_at"].as_str().unwrap()).unwrap();
        let left = expires_at
            .duration_since(std::time::SystemTime::now())
            .unwrap();
        assert!(
            left > Duration::from_secs(800) && left <= Duration::from_secs(900),
            "{left:?}"
        );
    }
    // Both connections share one role: one AssumeRole, same key on both.
    let keys: Vec<_> = ids
        .iter()
        .map(|id| h.sim.connection(id).unwrap().access_key_id)
        .collect();
    assert_eq!(keys[0], keys[1]);
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
    assert_no_secret(
        &daemon.stderr_text(),
        &[h.secret.clone(), SOURCE_SECRET.to_owned()],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn get_session_token_is_used_when_no_role_is_configured() {
    let moto = Moto::start();
    let h = Harness::start_with(1, Duration::from_secs(3600), |sim| {
        sim.accept_foreign_credentials = true
    })
    .await;
    let id = h.connection_ids().remove(0);
    let config = h.config().sts_endpoint(&moto.url()).role_arn(None).write();

    let mut daemon = h.spawn(&config, &["once"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(60)).code(),
        Some(0),
        "stderr:\n{}",
        daemon.stderr_text()
    );
    let key = h
        .sim
        .connection(&id)
        .unwrap()
        .access_key_id
        .expect("credentials were pushed");
    // Session credentials, not the daemon's own identity.
    assert_ne!(key, SOURCE_KEY_ID);
    assert_eq!(daemon.events("credentials rotated").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_every_dependency_against_moto() {
    let moto = Moto::start();
    let h = Harness::start_with(2, Duration::from_secs(3600), |sim| {
        sim.accept_foreign_credentials = true
    })
    .await;
    let ids = h.connection_ids();
    h.sim.delete_connection(&ids[1]);
    let config = h.config().sts_endpoint(&moto.url()).write();

    let mut daemon = h.spawn(&config, &["check"]);
    assert_eq!(daemon.wait(Duration::from_secs(60)).code(), Some(1));
    let report = daemon.stdout_text();
    assert!(report.contains("ok    config"), "{report}");
    assert!(report.contains("ok    ims"), "{report}");
    // The CA roots are a check of their own (the host's store here).
    assert!(report.contains("ok    ca         "), "{report}");
    assert!(
        report.contains("ok    connection conn-0 (prod)"),
        "{report}"
    );
    assert!(report.contains("FAIL  connection conn-1 (dev)"), "{report}");
    assert!(
        report.contains(
            "ok    sts        arn:aws:iam::123456789012:role/aep-s3-ingest: AssumeRole gave ASIA"
        ),
        "{report}"
    );
    // The pre-push check runs per connection with the fresh credentials
    // (against the simulator's S3, which takes moto's keys here).
    assert!(
        report.contains("ok    s3         conn-0 (prod): ListObjectsV2 s3://aep-ingest-conn-0/landing/ allowed for ASIA"),
        "{report}"
    );
    assert!(
        report.contains("FAIL  s3         conn-1 (dev): not checked"),
        "{report}"
    );
    assert!(report.contains("8 checks, 2 failed"), "{report}");
    // check changes nothing.
    assert_eq!(h.sim.stats().flow_patches_ok, 0);
}

/// What `tests/support/moto_iam_setup.py` created in moto.
#[derive(serde::Deserialize)]
struct IamSetup {
    access_key_id: String,
    secret_access_key: String,
    bucket: String,
    reader: String,
    outsider: String,
}

/// Creates a bucket, a user and two roles in `moto`, then turns IAM
/// enforcement on. Uses the venv's Python, beside `moto_server`.
fn setup_iam(moto: &Moto) -> IamSetup {
    run_moto_setup("moto_iam_setup.py", &[&moto.url()])
}

/// Runs `once` with the moto user as the daemon's source identity.
fn once_as(setup: &IamSetup, config: &std::path::Path) -> DaemonProcess {
    let mut command = clean_command(binary());
    command
        .env("AWS_ACCESS_KEY_ID", &setup.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &setup.secret_access_key)
        .arg("--config")
        .arg(config)
        .arg("once");
    DaemonProcess::spawn(command)
}

#[tokio::test(flavor = "multi_thread")]
async fn prepush_check_with_moto_iam_pushes_a_reader_and_refuses_an_outsider() {
    let moto = Moto::start();
    let setup = setup_iam(&moto);
    let h = Harness::start_with(1, Duration::from_secs(3600), |sim| {
        sim.accept_foreign_credentials = true
    })
    .await;
    let id = h.connection_ids().remove(0);
    h.sim
        .set_connection_param(&id, "bucketName", Some(&setup.bucket));
    let base = h
        .config()
        .sts_endpoint(&moto.url())
        .s3_endpoint(&moto.url());
    let mut secrets = h.secrets();
    secrets.push(setup.secret_access_key.clone());

    // 1. The reader role may list the bucket: checked by moto, pushed.
    let config = base.clone().role_arn(Some(&setup.reader)).write();
    let mut daemon = once_as(&setup, &config);
    assert_eq!(
        daemon.wait(Duration::from_secs(60)).code(),
        Some(0),
        "stderr:\n{}",
        daemon.stderr_text()
    );
    let passed = daemon.events("pre-push check passed");
    assert_eq!(passed.len(), 1, "{}", daemon.stderr_text());
    assert_eq!(passed[0]["bucket"], setup.bucket.as_str());
    assert_eq!(passed[0]["operation"], "ListObjectsV2");
    let pushed = h.sim.connection(&id).unwrap();
    let reader_key = pushed.access_key_id.clone().expect("pushed");
    assert_eq!(pushed.patches, 1);
    assert_no_secret(&daemon.stderr_text(), &secrets);

    // 2. The outsider role may not: moto answers AccessDenied, nothing is
    // pushed, the connection keeps the reader's credentials.
    base.clone().role_arn(Some(&setup.outsider)).write();
    let mut daemon = once_as(&setup, &config);
    assert_eq!(
        daemon.wait(Duration::from_secs(60)).code(),
        Some(1),
        "stderr:\n{}",
        daemon.stderr_text()
    );
    let denied = daemon.events(
        "new credentials cannot list the bucket, not pushed; the connection keeps its current credentials",
    );
    assert_eq!(denied.len(), 1, "{}", daemon.stderr_text());
    let denial = &denied[0];
    assert_eq!(denial["level"], "error");
    assert_eq!(denial["s3_code"], "AccessDenied");
    assert_eq!(denial["bucket"], setup.bucket.as_str());
    assert_eq!(denial["role"], setup.outsider.as_str());
    let refused_key = denial["access_key_id"].as_str().unwrap();
    assert!(refused_key.starts_with("ASIA") && refused_key != reader_key);
    let kept = h.sim.connection(&id).unwrap();
    assert_eq!(kept.patches, 1, "nothing was PATCHed");
    assert_eq!(kept.access_key_id.as_deref(), Some(reader_key.as_str()));
    assert_no_secret(&daemon.stderr_text(), &secrets);

    // 3. serviceUrl wins over the configured endpoint: with the endpoint
    // dead, only the connection's serviceUrl (moto) can let the check pass.
    h.sim
        .set_connection_param(&id, "serviceUrl", Some(&moto.url()));
    base.role_arn(Some(&setup.reader))
        .s3_endpoint("http://127.0.0.1:9")
        .write();
    let mut daemon = once_as(&setup, &config);
    assert_eq!(
        daemon.wait(Duration::from_secs(60)).code(),
        Some(0),
        "stderr:\n{}",
        daemon.stderr_text()
    );
    assert_eq!(h.sim.connection(&id).unwrap().patches, 2);
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}
