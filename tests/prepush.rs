//! The pre-push S3 check, black-box: the real daemon against the simulator,
//! whose S3 verifies SigV4 signatures with the secrets its own STS issued.
//! (moto with IAM enforcement covers allowed/denied in `moto_e2e.rs`; the
//! cases moto cannot produce, eventual consistency, another region's 301,
//! 5xx, are here.) The probe itself is also driven directly, with short
//! waits, for its retry and region logic.

// Black-box tests drive the real binary in real time: they read the real clocks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::time::{Duration, SystemTime};

use aep_s3_rotator::remote::s3probe::{HttpProbe, ProbeError, ProbeSettings, S3Probe, S3Target};
use aep_s3_rotator::remote::sts::AwsCredentials;
use aep_s3_simulator::{ScriptedFault, SimEvent, SimService};
use common::*;

const DENIED: &str = "new credentials cannot list the bucket, not pushed; the connection keeps its current credentials";

fn bucket(h: &Harness, i: usize) -> String {
    h.sim
        .connection(&h.connection_ids()[i])
        .unwrap()
        .params_other_than_credentials["bucketName"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn s3_events(h: &Harness) -> Vec<(String, bool, String)> {
    h.sim
        .events()
        .into_iter()
        .filter_map(|e| match e {
            SimEvent::S3Checked {
                bucket,
                allowed,
                code,
                ..
            } => Some((bucket, allowed, code)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn denied_credentials_are_never_pushed_and_the_old_key_stays() {
    let h = Harness::start(2, Duration::from_secs(3600)).await;
    let ids = h.connection_ids();
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["once"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        daemon.stderr_text()
    );
    let before: Vec<_> = ids.iter().map(|id| h.sim.connection(id).unwrap()).collect();
    assert!(before.iter().all(|c| c.patches == 1));

    // The second connection's bucket now refuses every key.
    h.sim.s3_deny_bucket(&bucket(&h, 1), true);
    let mut daemon = h.spawn(&config, &["once"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(30)).code(),
        Some(1),
        "{}",
        daemon.stderr_text()
    );
    // The first is rotated as usual: isolation.
    let first = h.sim.connection(&ids[0]).unwrap();
    assert_eq!(first.patches, 2);
    // The second keeps its previous credentials: no PATCH at all.
    let second = h.sim.connection(&ids[1]).unwrap();
    assert_eq!(second.patches, 1, "a denied check must not PATCH");
    assert_eq!(second.access_key_id, before[1].access_key_id);
    let denied = daemon.events(DENIED);
    assert_eq!(denied.len(), 1, "{}", daemon.stderr_text());
    let d = &denied[0];
    assert_eq!(d["level"], "error");
    assert_eq!(d["s3_code"], "AccessDenied");
    assert_eq!(d["bucket"], bucket(&h, 1).as_str());
    assert_eq!(d["prefix"], "landing/");
    assert_eq!(d["role"], ROLE_ARN);
    assert_eq!(d["connection"], ids[1].as_str());
    assert!(d["access_key_id"].as_str().unwrap().starts_with("ASIA"));
    // Denials are believed only after the eventual-consistency retries:
    // 1 + 3 checks per key. When the other connection's call minted the key
    // (the two share an identity), the denied connection was handed it from
    // the STS cache: an AccessDenied then drops it and a key minted for this
    // connection is checked too (issue 30: a revoked session must not stay
    // cached), so 4 or 8 checks, one `error` line either way.
    let refused = s3_events(&h)
        .into_iter()
        .filter(|(b, allowed, _)| *b == bucket(&h, 1) && !allowed)
        .count();
    assert!(refused == 4 || refused == 8, "{refused}");
    // `once` gives up on the slow cadence at once (no quick retries).
    assert_eq!(daemon.events("rotation failed").len(), 1);
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
    assert_no_secret(&daemon.stderr_text(), &h.secrets());
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_usable_after_a_short_delay_are_pushed() {
    let h = Harness::start(1, Duration::from_secs(3600)).await;
    let id = h.connection_ids().remove(0);
    // IAM eventual consistency: the first check with the new key is denied.
    h.sim.s3_deny_next(1);
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["once"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        daemon.stderr_text()
    );
    assert_eq!(h.sim.connection(&id).unwrap().patches, 1);
    let passed = daemon.events("pre-push check passed");
    assert_eq!(passed.len(), 1);
    assert_eq!(passed[0]["attempt"], 2, "passed on the retry");
    assert!(daemon.events(DENIED).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_in_another_region_is_checked_in_its_region() {
    let h = Harness::start(1, Duration::from_secs(3600)).await;
    let id = h.connection_ids().remove(0);
    h.sim.s3_set_bucket_region(&bucket(&h, 0), "eu-west-1");
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["once"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        daemon.stderr_text()
    );
    assert_eq!(h.sim.connection(&id).unwrap().patches, 1);
    let passed = daemon.events("pre-push check passed");
    assert_eq!(passed[0]["region"], "eu-west-1");
    let events = s3_events(&h);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].2, "PermanentRedirect");
    assert!(
        events[1].1,
        "the second check, signed for eu-west-1, passed"
    );
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_s3_failure_backs_off_and_pushes_nothing_until_it_passes() {
    let h = Harness::start(1, Duration::from_secs(3600)).await;
    let id = h.connection_ids().remove(0);
    for _ in 0..2 {
        h.sim.script(
            SimService::S3,
            ScriptedFault::Status {
                status: 500,
                retry_after: None,
                body: None,
            },
        );
    }
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["once"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        daemon.stderr_text()
    );
    // Two failed attempts, each retried after a quick backoff (retry_min is
    // 100 ms, retry_max 2 s: not the slow cadence), then one PATCH.
    let retries = daemon.events("rotation failed, retrying");
    assert_eq!(retries.len(), 2, "{}", daemon.stderr_text());
    for retry in &retries {
        assert!(
            retry["error"].as_str().unwrap().contains("InternalError"),
            "{retry}"
        );
        let wait = humantime::parse_duration(retry["retry_in"].as_str().unwrap()).unwrap();
        assert!(wait <= Duration::from_secs(2), "{wait:?}");
    }
    assert!(daemon.events(DENIED).is_empty(), "a 5xx is not a denial");
    let view = h.sim.connection(&id).unwrap();
    assert_eq!(view.patches, 1, "pushed once, after the check passed");
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_runs_the_check_and_check_prints_it() {
    let h = Harness::start(2, Duration::from_secs(3600)).await;
    h.sim.s3_deny_bucket(&bucket(&h, 1), true);
    let config = h.config().write();

    let mut dry = h.spawn(&config, &["once", "--dry-run"]);
    let mut check = h.spawn(&config, &["check"]);
    assert_eq!(
        dry.wait(Duration::from_secs(30)).code(),
        Some(1),
        "{}",
        dry.stderr_text()
    );
    assert_eq!(dry.events("dry run: would rotate credentials").len(), 1);
    assert_eq!(dry.events(DENIED).len(), 1);

    assert_eq!(
        check.wait(Duration::from_secs(30)).code(),
        Some(1),
        "{}",
        check.stderr_text()
    );
    let report = check.stdout_text();
    assert!(
        report.contains(&format!(
            "ok    s3         conn-0 (prod): ListObjectsV2 s3://{}/landing/ allowed for ASIA",
            bucket(&h, 0)
        )),
        "{report}"
    );
    assert!(
        report.contains(
            "FAIL  s3         conn-1 (dev): S3 answered AccessDenied (403) to ListObjectsV2"
        ),
        "{report}"
    );
    assert!(
        report.contains("(role arn:aws:iam::123456789012:role/aep-s3-ingest)"),
        "{report}"
    );
    // Neither changed anything.
    assert_eq!(h.sim.stats().flow_patches_ok, 0);
    assert_no_secret(
        &(check.stdout_text() + &check.stderr_text() + &dry.stderr_text()),
        &h.secrets(),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prepush_check_false_pushes_without_asking_s3() {
    let h = Harness::start(1, Duration::from_secs(3600)).await;
    let id = h.connection_ids().remove(0);
    h.sim.s3_deny_bucket(&bucket(&h, 0), true);
    let config = h
        .config()
        .rotation(Rotation::fast().prepush_check(false))
        .write();
    let mut daemon = h.spawn(&config, &["once"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        daemon.stderr_text()
    );
    assert_eq!(h.sim.connection(&id).unwrap().patches, 1);
    assert!(s3_events(&h).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_healthy_rotation_stays_one_patch_with_the_check() {
    // 3 s credentials, refresh 2 s before: a rotation about every second.
    let h = Harness::start(1, Duration::from_secs(3)).await;
    let id = h.connection_ids().remove(0);
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["run"]);
    assert!(
        wait_until(Duration::from_secs(20), || h
            .sim
            .connection(&id)
            .is_some_and(|c| c.patches >= 3))
        .await,
        "{}",
        daemon.stderr_text()
    );
    daemon.terminate();
    let stats = h.sim.stats();
    // One list call at start (etag and bucket in its item), no GET, then
    // PATCHes only; each after a check.
    assert_eq!(stats.flow_lists, 1, "{stats:?}");
    assert_eq!(stats.flow_gets, 0, "{stats:?}");
    assert!(stats.s3_checks_allowed >= 3, "{stats:?}");
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_folder_changed_under_a_known_etag_is_checked_again_after_the_412() {
    // 30 s credentials, refreshed 28 s before expiry: a rotation about
    // every 2 s, with credentials that outlive the ~7 s of denial retries.
    let h = Harness::start(1, Duration::from_secs(30)).await;
    let id = h.connection_ids().remove(0);
    let config = h
        .config()
        .rotation(Rotation::fast().refresh_before("28s"))
        .write();
    let mut daemon = h.spawn(&config, &["run"]);
    assert!(
        wait_until(Duration::from_secs(10), || h
            .sim
            .connection(&id)
            .is_some_and(|c| c.patches >= 1))
        .await
    );
    // Someone points the connection at a folder the role may not list. The
    // cached target is stale: the check passes on the old folder, the PATCH
    // gets 412, the re-GET shows the new folder, and the check runs again
    // there before any PATCH.
    h.sim
        .s3_deny_bucket(&format!("{}/restricted/", bucket(&h, 0)), true);
    h.sim
        .set_connection_param(&id, "folderPath", Some("/restricted"));
    assert!(
        wait_until(Duration::from_secs(20), || !daemon
            .events(DENIED)
            .is_empty())
        .await,
        "{}",
        daemon.stderr_text()
    );
    daemon.terminate();
    assert_eq!(
        h.sim.connection(&id).unwrap().patches,
        1,
        "nothing pushed after the edit"
    );
    assert!(h.sim.stats().flow_412 >= 1, "{:?}", h.sim.stats());
    assert_eq!(daemon.events(DENIED)[0]["prefix"], "restricted/");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denial_on_a_stale_cached_bucket_reads_the_connection_again() {
    // 6 s credentials, rotated with 2 s left: the move comes well before
    // the next rotation (with 3 s, a rotation racing the move sometimes
    // found the new bucket without the stale-cache denial this is about).
    let h = Harness::start(1, Duration::from_secs(6)).await;
    let id = h.connection_ids().remove(0);
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["run"]);
    assert!(
        wait_until(Duration::from_secs(10), || h
            .sim
            .connection(&id)
            .is_some_and(|c| c.patches >= 1))
        .await
    );
    // The connection moves to another bucket: the cached one no longer
    // exists (NoSuchBucket). That denial sends the job back to the
    // connection, which names the new bucket; the role may list it: pushed.
    // (A job already past its check when the bucket moves pushes first:
    // wait for the check of the new bucket and a PATCH after the move.)
    let before = h.sim.connection(&id).unwrap().patches;
    h.sim
        .set_connection_param(&id, "bucketName", Some("aep-ingest-moved"));
    assert!(
        wait_until(Duration::from_secs(20), || {
            h.sim.connection(&id).is_some_and(|c| c.patches > before)
                && s3_events(&h)
                    .iter()
                    .any(|(b, allowed, _)| *allowed && b == "aep-ingest-moved")
        })
        .await,
        "{}",
        daemon.stderr_text()
    );
    daemon.terminate();
    assert!(daemon.events(DENIED).is_empty(), "{}", daemon.stderr_text());
    let events = s3_events(&h);
    assert!(
        events.iter().any(|(b, allowed, code)| !allowed
            && code == "NoSuchBucket"
            && b != "aep-ingest-moved"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(b, allowed, _)| *allowed && b == "aep-ingest-moved"),
        "{events:?}"
    );
}

// --- The probe itself, with short waits ---------------------------------

fn settings(endpoint: &str, delays: usize) -> ProbeSettings {
    let endpoint = url::Url::parse(endpoint).unwrap();
    ProbeSettings {
        destinations: aep_s3_rotator::remote::s3dest::Destinations::new(
            "us-east-1",
            [&endpoint],
            [],
        ),
        endpoint: Some(endpoint),
        region: "us-east-1".into(),
        denial_retry_delays: vec![Duration::from_millis(20); delays],
        timeout: Duration::from_secs(2),
    }
}

/// Credentials issued by the simulator's STS (a form POST, as the SDK does).
async fn issue(h: &Harness) -> AwsCredentials {
    let body = "Action=GetSessionToken&Version=2011-06-15";
    let answer = reqwest::Client::new()
        .post(h.sim.sts_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .header(
            "authorization",
            format!("AWS4-HMAC-SHA256 Credential={SOURCE_KEY_ID}/20260101/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=00"),
        )
        .body(body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let field = |tag: &str| {
        let start = answer.find(&format!("<{tag}>")).unwrap() + tag.len() + 2;
        let end = answer[start..].find(&format!("</{tag}>")).unwrap();
        answer[start..start + end].to_owned()
    };
    AwsCredentials {
        access_key_id: field("AccessKeyId"),
        secret_access_key: field("SecretAccessKey").into(),
        session_token: field("SessionToken").into(),
        expiration: SystemTime::now() + Duration::from_secs(600),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_probe_retries_denials_a_bounded_number_of_times() {
    let h = Harness::start(1, Duration::from_secs(3600)).await;
    let creds = issue(&h).await;
    let target = S3Target {
        bucket: bucket(&h, 0),
        folder: Some("/landing".into()),
        service_url: None,
    };
    let probe = HttpProbe::new(settings(&h.sim.s3_url(), 2)).unwrap();
    h.sim.s3_deny_next(2);
    let allowed = probe.check(&target, &creds).await.unwrap();
    assert_eq!(allowed.attempts, 3);
    h.sim.s3_deny_next(3);
    let error = probe.check(&target, &creds).await.unwrap_err();
    assert!(
        matches!(error, ProbeError::Denied { ref code, .. } if code == "AccessDenied"),
        "{error}"
    );
    // No folder: HeadBucket, and an unknown bucket is a denial (NoSuchBucket).
    let root = S3Target {
        folder: None,
        ..target.clone()
    };
    assert_eq!(
        probe.check(&root, &creds).await.unwrap().operation,
        "HeadBucket"
    );
    let missing = S3Target {
        bucket: "no-such-bucket".into(),
        ..root
    };
    let before = h.sim.stats().s3_checks_refused;
    let error = probe.check(&missing, &creds).await.unwrap_err();
    assert_eq!(error.code(), Some("NoSuchBucket"), "{error}");
    assert_eq!(
        h.sim.stats().s3_checks_refused,
        before + 1,
        "a missing bucket is not retried"
    );
    // A key the simulator's STS never issued.
    let forged = AwsCredentials {
        access_key_id: "ASIAFORGED0000000000".into(),
        ..creds.clone()
    };
    assert_eq!(
        probe.check(&target, &forged).await.unwrap_err().code(),
        Some("InvalidAccessKeyId")
    );
    // A wrong secret: the signature does not verify (and is a violation).
    let wrong = AwsCredentials {
        secret_access_key: "not-the-issued-secret".to_owned().into(),
        ..creds.clone()
    };
    assert_eq!(
        probe.check(&target, &wrong).await.unwrap_err().code(),
        Some("SignatureDoesNotMatch")
    );
    assert_eq!(h.sim.violations().len(), 3, "{:?}", h.sim.violations());
    // A reset is transient.
    h.sim.script(SimService::S3, ScriptedFault::Reset);
    assert!(
        probe
            .check(&target, &creds)
            .await
            .unwrap_err()
            .is_transient()
    );
}
