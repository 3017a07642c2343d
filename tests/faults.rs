//! Fault injection, black box: the real binary against the strict simulator,
//! one fault class per test (see docs/RELIABILITY.md, "Fault classes").
//! Each test asserts what operators rely on: the connection ends up rotated,
//! the others are not held up, the process keeps running (or `once` exits as
//! documented), no protocol violation, and one log line that names the problem.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime};

use aep_s3_simulator::{RetryAfter, ScriptedFault, SimEvent, SimService};
use common::*;
use serde_json::Value;

/// [`Rotation::quick`] on every simulated connection: quick retries and a
/// 1 s request timeout, so a scripted slow answer times out.
fn quick(h: &Harness) -> TestConfig {
    h.config().rotation(Rotation::quick())
}

fn status(status: u16) -> ScriptedFault {
    ScriptedFault::Status {
        status,
        retry_after: None,
        body: None,
    }
}

fn sts_error(code: &str, status: u16) -> ScriptedFault {
    ScriptedFault::StsError {
        code: code.to_owned(),
        message: format!("scripted {code}"),
        status,
    }
}

fn raw(body: &str) -> ScriptedFault {
    ScriptedFault::Raw {
        status: 200,
        content_type: "application/json".to_owned(),
        body: body.to_owned(),
    }
}

fn error_of(event: &Value) -> &str {
    event["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {event}"))
}

/// Runs `once` to its end and checks the exit code.
fn once(h: &Harness, config: &std::path::Path, code: i32) -> DaemonProcess {
    let mut daemon = h.spawn(config, &["once"]);
    let status = daemon.wait(Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        daemon.stdout_text(),
        daemon.stderr_text()
    );
    daemon
}

/// Every connection in `ids` got exactly `n` successful PATCHes.
fn assert_patches(h: &Harness, ids: &[String], n: u64) {
    for id in ids {
        let patches = h.sim.connection(id).unwrap().patches;
        assert_eq!(patches, n, "connection {id}: {patches} patches, want {n}");
    }
}

fn assert_clean(h: &Harness) {
    assert!(
        h.sim.violations().is_empty(),
        "protocol violations: {:?}",
        h.sim.violations()
    );
    let stats = h.sim.stats();
    assert_eq!(
        stats.expired_seconds, 0.0,
        "a connection held expired credentials: {stats:?}"
    );
}

async fn all_patched(h: &Harness, ids: &[String], n: u64, daemon: &DaemonProcess) {
    let done = h.rotated_at_least(ids, n, Duration::from_secs(10)).await;
    assert!(
        done,
        "not every connection rotated {n} times; stderr:\n{}",
        daemon.stderr_text()
    );
}

fn first_at(events: &[SimEvent], pick: impl Fn(&SimEvent) -> Option<SystemTime>) -> SystemTime {
    events
        .iter()
        .find_map(pick)
        .expect("the simulator saw the event")
}

// 1. Throttling (429) --------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_429_with_an_http_date_retry_after_is_honoured() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    // The 429 is for the rotation's own request, not the bulk etag read.
    h.without_bulk_etags();
    h.sim.script(
        SimService::Flow,
        ScriptedFault::Status {
            status: 429,
            retry_after: Some(RetryAfter::HttpDate(Duration::from_secs(3))),
            body: None,
        },
    );
    let config = quick(&h).write();
    let daemon = once(&h, &config, 0);
    let failed = daemon.events("rotation failed, retrying");
    assert_eq!(failed.len(), 1, "stderr:\n{}", daemon.stderr_text());
    assert_eq!(failed[0]["status"], "429");
    assert!(error_of(&failed[0]).contains("throttled"), "{}", failed[0]);
    assert!(
        error_of(&failed[0]).contains("retry after"),
        "{}",
        failed[0]
    );
    assert_patches(&h, &ids, 1);
    // An HTTP date has whole seconds: 3 s ahead is at least 2 s after parsing.
    let events = h.sim.events();
    let throttled = first_at(&events, |e| match e {
        SimEvent::Throttled { at, .. } => Some(*at),
        _ => None,
    });
    let patched = first_at(&events, |e| match e {
        SimEvent::PatchApplied { at, .. } => Some(*at),
        _ => None,
    });
    let gap = patched.duration_since(throttled).unwrap();
    assert!(
        gap >= Duration::from_millis(1900),
        "retried {gap:?} after a Retry-After date 3 s ahead"
    );
    assert_clean(&h);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_without_retry_after_backs_off_then_succeeds() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    // The 429 is for the rotation's own request, not the bulk etag read.
    h.without_bulk_etags();
    h.sim.script(SimService::Flow, status(429));
    let config = quick(&h).write();
    let daemon = once(&h, &config, 0);
    let failed = daemon.events("rotation failed, retrying");
    assert_eq!(failed.len(), 1, "stderr:\n{}", daemon.stderr_text());
    assert_eq!(failed[0]["status"], "429");
    let error = error_of(&failed[0]);
    assert!(
        error.contains("throttled") && !error.contains("retry after"),
        "{error}"
    );
    assert!(
        failed[0]["retry_in"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{}",
        failed[0]
    );
    assert_eq!(h.sim.stats().flow_429, 1);
    assert_patches(&h, &ids, 1);
    assert_clean(&h);
}

// 2. Server errors -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_500_502_503_504_are_retried_then_rotated() {
    let h = Harness::start(4, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    let codes = [500u16, 502, 503, 504];
    for (id, code) in ids.iter().zip(codes) {
        h.sim.script_for(id, status(code));
    }
    let config = quick(&h).write();
    let daemon = once(&h, &config, 0);
    let failed = daemon.events("rotation failed, retrying");
    assert_eq!(failed.len(), 4, "stderr:\n{}", daemon.stderr_text());
    for (id, code) in ids.iter().zip(codes) {
        let event = failed
            .iter()
            .find(|e| e["connection"] == id.as_str())
            .unwrap_or_else(|| panic!("no failure logged for the {code} connection"));
        let error = error_of(event);
        if code == 503 {
            assert_eq!(event["status"], "503", "{event}");
            assert!(error.contains("throttled the request (503)"), "{event}");
        } else {
            assert!(
                error.contains("Flow Service unavailable")
                    && error.contains(&format!("HTTP {code}")),
                "{event}"
            );
        }
        assert!(
            event["retry_in"].as_str().is_some_and(|s| !s.is_empty()),
            "{event}"
        );
    }
    assert_eq!(h.sim.stats().flow_5xx, 4);
    assert_patches(&h, &ids, 1);
    assert_clean(&h);
}

// 3. Resets and timeouts -----------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_and_an_answer_slower_than_the_timeout_are_retried() {
    let h = Harness::start(3, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    h.sim.script_for(&ids[0], ScriptedFault::Reset);
    h.sim
        .script_for(&ids[1], ScriptedFault::Delay(Duration::from_secs(3)));
    let config = quick(&h).write();
    let daemon = once(&h, &config, 0);
    let failed = daemon.events("rotation failed, retrying");
    assert_eq!(failed.len(), 2, "stderr:\n{}", daemon.stderr_text());
    let of = |id: &str| {
        failed
            .iter()
            .find(|e| e["connection"] == id)
            .unwrap_or_else(|| panic!("no failure for {id}"))
    };
    let reset = error_of(of(&ids[0]));
    assert!(
        reset.contains("Flow Service unavailable") && reset.contains("request failed"),
        "{reset}"
    );
    let slow = error_of(of(&ids[1]));
    assert!(
        slow.contains("Flow Service unavailable") && slow.contains("timed out"),
        "{slow}"
    );
    assert_eq!(h.sim.stats().flow_resets, 1);
    assert_patches(&h, &ids, 1);
    assert_clean(&h);
}

// 4. Flow Service down ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn flow_service_down_for_a_while_then_every_connection_rotates() {
    let h = Harness::start(3, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    h.sim.set_service_down(SimService::Flow, true);
    let config = quick(&h).write();
    let mut daemon = h.spawn(&config, &["run"]);
    // Down for a while: every connection fails, and is retried and fails
    // again, before Flow Service comes back.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let failed = daemon.events("rotation failed, retrying");
            ids.iter().all(|id| {
                failed
                    .iter()
                    .filter(|e| e["connection"] == id.as_str())
                    .count()
                    >= 2
            })
        })
        .await,
        "every connection should fail twice while Flow Service is down; stderr:\n{}",
        daemon.stderr_text()
    );
    assert_eq!(h.sim.stats().flow_patches_ok, 0);
    h.sim.set_service_down(SimService::Flow, false);
    all_patched(&h, &ids, 1, &daemon).await;
    assert_eq!(daemon.terminate().code(), Some(0));
    for event in daemon.events("rotation failed, retrying") {
        assert!(
            error_of(&event).contains("Flow Service unavailable"),
            "{event}"
        );
    }
    assert!(daemon.events("rotation failed").is_empty());
    assert_clean(&h);
}

// 5. A 412 storm ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_412_storm_fails_the_attempt_then_rotates_on_the_next() {
    let h = Harness::start(2, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    // Churn comes with GETs: start without bulk etags.
    h.without_bulk_etags();
    // One more conflict than a job absorbs (MAX_CONFLICTS_PER_JOB = 5).
    for _ in 0..6 {
        h.sim.script_for(&ids[0], ScriptedFault::EtagChurn);
    }
    let config = quick(&h).write();
    let daemon = once(&h, &config, 0);
    let conflicts = daemon.events("etag conflict, re-reading connection");
    assert_eq!(conflicts.len(), 5, "stderr:\n{}", daemon.stderr_text());
    assert!(conflicts.iter().all(|e| e["connection"] == ids[0].as_str()));
    let failed = daemon.events("rotation failed, retrying");
    assert_eq!(failed.len(), 1, "stderr:\n{}", daemon.stderr_text());
    assert_eq!(failed[0]["connection"], ids[0].as_str());
    assert_eq!(failed[0]["status"], "412");
    assert!(
        error_of(&failed[0]).contains("6 etag conflicts in a row"),
        "{}",
        failed[0]
    );
    assert_eq!(h.sim.stats().flow_412, 6);
    assert_patches(&h, &ids, 1);
    // What AEP holds is what the daemon says it pushed, and the rest is intact.
    let rotated = daemon.events("credentials rotated");
    for id in &ids {
        let view = h.sim.connection(id).unwrap();
        let logged = rotated
            .iter()
            .find(|e| e["connection"] == id.as_str())
            .unwrap();
        assert_eq!(
            view.access_key_id.as_deref(),
            logged["access_key_id"].as_str()
        );
        assert!(
            view.params_other_than_credentials
                .get("bucketName")
                .is_some()
        );
    }
    assert_clean(&h);
}

// 6. IMS ----------------------------------------------------------------------------

/// Starts the daemon (`run`, [`Rotation::quick`]) with `service` down and
/// waits until `calls` (a log message, one line per request made) has been
/// logged `n` times: several rounds of retries.
async fn run_with_service_down(
    h: &Harness,
    service: SimService,
    calls: &str,
    n: usize,
) -> DaemonProcess {
    h.sim.set_service_down(service, true);
    let config = quick(h).write();
    let daemon = h.spawn(&config, &["run"]);
    assert!(
        wait_until(Duration::from_secs(10), || daemon.events(calls).len() >= n).await,
        "stderr:\n{}",
        daemon.stderr_text()
    );
    daemon
}

/// Seconds between the first and the last of `lines` (log timestamps).
fn span_seconds(lines: &[Value]) -> f64 {
    match (lines.first(), lines.last()) {
        (Some(first), Some(last)) => log_time(last)
            .duration_since(log_time(first))
            .unwrap_or_default()
            .as_secs_f64(),
        _ => 0.0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ims_down_at_start_then_back_rotates_every_connection() {
    let h = Harness::start(12, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    let mut daemon =
        run_with_service_down(&h, SimService::Ims, "ims token request failed", 5).await;
    assert_eq!(h.sim.stats().ims_tokens_issued, 0);
    // One outage, asked about at most once per retry_min (100 ms), however
    // many connections are due: each of the 12 retries on its own schedule,
    // but they share the answer (a slower machine only asks less often),
    // and one line per request says so: a connection given the shared
    // answer logs its failure at debug, only the one that asked at warn.
    // Unshared, the 12 first attempts alone would ask 12 times at once.
    // Failures first: each one's request is logged before it.
    let failed = daemon.events("rotation failed, retrying").len();
    let asks = daemon.events("ims token request failed");
    let asked = asks.len();
    // From the first request's line to the last one's (one retry_min of
    // slack for when an answer comes back within its interval).
    let bound = span_seconds(&asks) / 0.1 + 2.0;
    assert!(
        asked >= 1 && (asked as f64) <= bound && failed <= asked,
        "{asked} IMS requests (bound {bound:.0}), {failed} failures logged at warn"
    );
    h.sim.set_service_down(SimService::Ims, false);
    all_patched(&h, &ids, 1, &daemon).await;
    assert_eq!(daemon.terminate().code(), Some(0));
    for event in daemon.events("rotation failed, retrying") {
        assert!(error_of(&event).contains("IMS unavailable"), "{event}");
    }
    assert_clean(&h);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ims_token_no_header_can_carry_is_refused_not_cached() {
    let h = Harness::start(2, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    // A 200 whose token holds a control character: cached, it would fail
    // every Flow request for its 24 h; refused, the next request gets a
    // good one.
    h.sim.script(
        SimService::Ims,
        raw(r#"{"access_token": "eyJhbGci\u0001OiJSUzI1NiJ9", "token_type": "bearer", "expires_in": 86399}"#),
    );
    let config = quick(&h).write();
    let daemon = once(&h, &config, 0);
    assert_patches(&h, &ids, 1);
    let refused = daemon.events("ims token request failed");
    assert_eq!(refused.len(), 1, "stderr:\n{}", daemon.stderr_text());
    assert!(
        error_of(&refused[0]).contains("cannot be sent in an Authorization header"),
        "{}",
        refused[0]
    );
    assert_eq!(h.sim.stats().ims_tokens_issued, 1);
    assert_clean(&h);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_client_secret_fails_once_with_advice() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    std::fs::write(
        h.dir.path().join("client-secret"),
        "not-the-client-secret-at-all\n",
    )
    .unwrap();
    let config = quick(&h).write();
    let daemon = once(&h, &config, 1);
    let failed = daemon.events("rotation failed");
    assert_eq!(failed.len(), 1, "stderr:\n{}", daemon.stderr_text());
    let error = error_of(&failed[0]);
    assert!(
        error.contains("IMS refused the client credentials") && error.contains("invalid_client"),
        "{error}"
    );
    assert!(
        error.contains("check [adobe] client_id and the client secret"),
        "{error}"
    );
    // A refusal is not retried quickly: once gives up at the first one.
    assert!(daemon.events("rotation failed, retrying").is_empty());
    assert_eq!(h.sim.stats().ims_tokens_issued, 0);
    assert_eq!(h.sim.stats().flow_requests, 0);
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

// 7. STS ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sts_throttling_is_retried_then_rotated() {
    let h = Harness::start(2, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    h.sim.script(SimService::Sts, sts_error("Throttling", 400));
    let config = quick(&h).write();
    let daemon = once(&h, &config, 0);
    let failed = daemon.events("rotation failed, retrying");
    assert!(!failed.is_empty(), "stderr:\n{}", daemon.stderr_text());
    for event in &failed {
        let error = error_of(event);
        assert!(
            error.contains("STS unavailable") && error.contains("Throttling"),
            "{error}"
        );
    }
    assert_patches(&h, &ids, 1);
    assert_clean(&h);
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_down_at_start_is_one_problem_then_every_connection_rotates() {
    // 40 connections on one role: without the shared failure each would
    // call STS on its own backoff (~4 calls each in the first second, 160
    // in all); with it, at most one call per half retry_min (50 ms).
    let h = Harness::start(40, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    let mut daemon =
        run_with_service_down(&h, SimService::Sts, "rotation failed, retrying", 5).await;
    // At info, only the connection whose STS call failed logs it (warn);
    // the ones given that answer log theirs at debug: one line per call.
    // Unshared, the 40 first attempts alone would call 40 times at once.
    let lines = daemon.events("rotation failed, retrying");
    let calls = lines.len();
    // From the first call's line to the last one's, with slack as above.
    let bound = span_seconds(&lines) / 0.05 + 2.0;
    assert!(
        calls >= 1 && (calls as f64) <= bound,
        "{calls} failed STS calls logged (bound {bound:.0})"
    );
    h.sim.set_service_down(SimService::Sts, false);
    all_patched(&h, &ids, 1, &daemon).await;
    assert_eq!(daemon.terminate().code(), Some(0));
    for event in daemon.events("rotation failed, retrying") {
        assert_eq!(event["level"], "warn", "{event}");
        assert!(error_of(&event).contains("STS unavailable"), "{event}");
    }
    assert_clean(&h);
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_access_denied_and_validation_errors_fail_once_with_advice() {
    for (code, advice) in [
        ("AccessDenied", "trust policy"),
        ("ValidationError", "check role_arn"),
    ] {
        let h = Harness::start(1, Duration::from_secs(60)).await;
        let status = if code == "AccessDenied" { 403 } else { 400 };
        h.sim.script(SimService::Sts, sts_error(code, status));
        let config = quick(&h).write();
        let daemon = once(&h, &config, 1);
        let failed = daemon.events("rotation failed");
        assert_eq!(failed.len(), 1, "stderr:\n{}", daemon.stderr_text());
        assert_eq!(failed[0]["status"], code);
        let error = error_of(&failed[0]);
        assert!(
            error.contains(&format!("STS refused {code}")) && error.contains(advice),
            "{error}"
        );
        assert!(daemon.events("rotation failed, retrying").is_empty());
        assert_eq!(h.sim.stats().flow_patches_ok, 0);
        assert!(daemon.stdout_text().contains("1 failed"));
        assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
    }
}

// 8. Short credentials ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn short_credentials_warn_and_are_replaced_before_they_expire() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    h.sim.script(
        SimService::Sts,
        ScriptedFault::ShortCredentials(Duration::from_secs(3)),
    );
    let config = h
        .config()
        .rotation(Rotation::quick().refresh_before("10s"))
        .write();
    let mut daemon = h.spawn(&config, &["run"]);
    all_patched(&h, &ids, 2, &daemon).await;
    // Run on past the short credentials' expiry: a moment of expired
    // credentials, or a second warning, would show.
    let first_expiry = h.sim.events().iter().find_map(|e| match e {
        SimEvent::PatchApplied { expires_at, .. } => Some(*expires_at),
        _ => None,
    });
    let first_expiry = first_expiry.expect("a PATCH was applied");
    assert!(
        wait_until(Duration::from_secs(10), || {
            aep_s3_rotator::clock::wall_now() > first_expiry
        })
        .await,
        "the short credentials expire {first_expiry:?}"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
    let warned = daemon.events(
        "credentials live shorter than refresh_before, rotating at half their remaining life; check the role's maximum session duration",
    );
    assert_eq!(warned.len(), 1, "stderr:\n{}", daemon.stderr_text());
    assert_eq!(warned[0]["level"], "warn", "{}", warned[0]);
    assert_eq!(warned[0]["connection"], ids[0].as_str());
    let patches: Vec<(SystemTime, SystemTime)> = h
        .sim
        .events()
        .iter()
        .filter_map(|e| match e {
            SimEvent::PatchApplied { at, expires_at, .. } => Some((*at, *expires_at)),
            _ => None,
        })
        .collect();
    let (first_at, first_expiry) = patches[0];
    assert!(first_expiry.duration_since(first_at).unwrap() <= Duration::from_secs(4));
    assert!(
        patches[1].0 < first_expiry,
        "the short credentials were replaced only after they expired"
    );
    assert!(daemon.events("rotation failed, retrying").is_empty());
    assert_clean(&h);
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_claiming_ten_years_are_pushed_and_scheduled_by_the_session_asked_for() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    // A host clock years behind STS's (or a broken endpoint): the
    // credentials work now, so they are pushed; their next rotation comes
    // from the 15 minutes asked for, not from the ten years claimed.
    h.sim.script(
        SimService::Sts,
        ScriptedFault::ShortCredentials(Duration::from_secs(10 * 365 * 86_400)),
    );
    let config = quick(&h).write();
    let daemon = once(&h, &config, 0);
    assert_patches(&h, &ids, 1);
    let warned = daemon.events(
        "STS credentials claim a longer life than was asked for; treated as expiring at the end of the session duration (check the clock of this host and [aws] sts_endpoint)",
    );
    assert_eq!(warned.len(), 1, "stderr:\n{}", daemon.stderr_text());
    assert_eq!(warned[0]["level"], "warn");
    assert_eq!(warned[0]["session_duration_seconds"], 900);
    let rotated = daemon.events("credentials rotated");
    let expires_at = rotated[0]["expires_at"].as_str().unwrap();
    let expires_at = humantime::parse_rfc3339(expires_at).unwrap();
    let left = expires_at
        .duration_since(aep_s3_rotator::clock::wall_now())
        .unwrap_or_default();
    assert!(left <= Duration::from_secs(900), "expires_at {left:?} away");
    assert_clean(&h);
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_that_come_back_already_expired_are_never_pushed() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    h.sim.script(
        SimService::Sts,
        ScriptedFault::ShortCredentials(Duration::ZERO),
    );
    let config = quick(&h).write();
    let mut daemon = h.spawn(&config, &["run"]);
    all_patched(&h, &ids, 1, &daemon).await;
    assert_eq!(daemon.terminate().code(), Some(0));
    let failed = daemon.events("rotation failed, retrying");
    assert_eq!(failed.len(), 1, "stderr:\n{}", daemon.stderr_text());
    let error = error_of(&failed[0]);
    assert!(error.contains("already past"), "{error}");
    // The dead credentials never reached Flow Service: no violation recorded.
    assert_clean(&h);
}

// 9. Wrong sandbox, unsuitable connections ---------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_in_another_sandbox_is_a_404_and_the_others_rotate() {
    let h = Harness::start(3, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    // The simulator holds connection 1 in `dev`; the config says `prod`.
    let mut connections = h.sim_config.connections.clone();
    assert_eq!(connections[1].sandbox, "dev");
    connections[1].sandbox = "prod".to_owned();
    let config = quick(&h).connections(&connections).write();
    let daemon = once(&h, &config, 1);
    let failed = daemon.events("rotation failed");
    assert_eq!(failed.len(), 1, "stderr:\n{}", daemon.stderr_text());
    assert_eq!(failed[0]["connection"], ids[1].as_str());
    assert_eq!(failed[0]["status"], "404");
    let error = error_of(&failed[0]);
    assert!(
        error.contains("not found in sandbox prod")
            && error.contains(&format!("check that connection {}", ids[1])),
        "{error}"
    );
    assert_patches(&h, &[ids[0].clone(), ids[2].clone()], 1);
    assert_patches(&h, &[ids[1].clone()], 0);
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn non_s3_and_non_access_key_connections_are_refused_and_the_others_rotate() {
    let h = Harness::start_with(3, Duration::from_secs(60), |c| {
        c.connections[1].connection_spec_id = "00000000-0000-0000-0000-0000000000db".to_owned();
        c.connections[2].auth_spec = "IAMRole Based".to_owned();
    })
    .await;
    let ids = h.connection_ids();
    let config = quick(&h).write();
    let daemon = once(&h, &config, 1);
    let failed = daemon.events("rotation failed");
    assert_eq!(failed.len(), 2, "stderr:\n{}", daemon.stderr_text());
    let of = |id: &str| error_of(failed.iter().find(|e| e["connection"] == id).unwrap());
    let spec = of(&ids[1]);
    assert!(
        spec.contains("not an S3 access-key connection")
            && spec.contains("00000000-0000-0000-0000-0000000000db")
            && spec.contains("not Amazon S3"),
        "{spec}"
    );
    let auth = of(&ids[2]);
    assert!(
        auth.contains("not an S3 access-key connection")
            && auth.contains("IAMRole Based")
            && auth.contains("not \"Access Key\""),
        "{auth}"
    );
    assert!(daemon.events("rotation failed, retrying").is_empty());
    assert_patches(&h, &ids[..1], 1);
    assert_patches(&h, &ids[1..], 0);
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

// 10. Unusable answers ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn unusable_get_answers_are_named_then_the_rotation_succeeds() {
    let h = Harness::start(4, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    let cases = [
        ("{\"items\": [", "is not {\"items\": [...]} JSON"),
        ("{\"items\": []}", "empty items list"),
        (
            "{\"items\": [{\"id\": \"x\", \"name\": \"no etag\"}]}",
            "has no etag",
        ),
        ("{\"connection\": {\"id\": \"x\"}}", "missing field `items`"),
    ];
    // These are GET answers: start without bulk etags.
    h.without_bulk_etags();
    for (id, (body, _)) in ids.iter().zip(cases) {
        h.sim.script_for(id, raw(body));
    }
    let config = quick(&h).write();
    let daemon = once(&h, &config, 0);
    let failed = daemon.events("rotation failed, retrying");
    assert_eq!(failed.len(), 4, "stderr:\n{}", daemon.stderr_text());
    for (id, (_, named)) in ids.iter().zip(cases) {
        let event = failed
            .iter()
            .find(|e| e["connection"] == id.as_str())
            .unwrap_or_else(|| panic!("no failure for {id}"));
        let error = error_of(event);
        assert!(
            error.contains("Flow Service answer unusable") && error.contains(named),
            "want {named:?}: {error}"
        );
    }
    assert_patches(&h, &ids, 1);
    assert_clean(&h);
}

// 11. Secrets at trace level ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_is_printed_at_trace_level_through_every_fault_path() {
    // Many connections with 6 s credentials renewed 4 s ahead: the daemon's
    // own crate logs nothing below info and third-party crates are capped at
    // info, so the output is made long by rotating often. (With 3 s
    // credentials and 2 s ahead, a loaded CI machine running trace-level
    // logging and other tests in parallel left 0.13 s of expired
    // credentials now and then: the margin, not the daemon, was too thin.)
    let h = Harness::start(40, Duration::from_secs(6)).await;
    let ids = h.connection_ids();
    let config = h
        .config()
        .rotation(Rotation::quick().refresh_before("4s"))
        .write();
    let mut output = String::new();
    let mut lines = 0usize;
    let mut collect = |daemon: &DaemonProcess| {
        for text in [daemon.stderr_text(), daemon.stdout_text()] {
            lines += text.lines().count();
            output.push_str(&text);
            output.push('\n');
        }
    };

    // check and a dry run first.
    let mut check = h.spawn(&config, &["--log-level", "trace", "check"]);
    assert_eq!(check.wait(Duration::from_secs(20)).code(), Some(0));
    collect(&check);
    let mut dry = h.spawn(&config, &["--log-level", "trace", "once", "--dry-run"]);
    assert_eq!(dry.wait(Duration::from_secs(20)).code(), Some(0));
    collect(&dry);

    // Then the daemon through a 412, a 429, a 500, an STS throttle and a 401
    // (the churn comes with a GET: no bulk etags).
    h.without_bulk_etags();
    h.sim.script_for(&ids[0], ScriptedFault::EtagChurn);
    h.sim.script_for(
        &ids[1],
        ScriptedFault::Status {
            status: 429,
            retry_after: Some(RetryAfter::Seconds(1)),
            body: None,
        },
    );
    h.sim.script_for(&ids[2], status(500));
    h.sim.script(SimService::Sts, sts_error("Throttling", 400));
    let mut daemon = h.spawn(&config, &["--log-level", "trace", "run"]);
    all_patched(&h, &ids, 1, &daemon).await;
    h.sim.revoke_tokens();
    all_patched(&h, &ids, 4, &daemon).await;
    assert_eq!(daemon.terminate().code(), Some(0));
    collect(&daemon);

    let stats = h.sim.stats();
    assert!(
        stats.flow_412 >= 1 && stats.flow_429 >= 1 && stats.flow_5xx >= 1 && stats.flow_401 >= 1,
        "not every path was taken: {stats:?}"
    );
    assert!(stats.ims_tokens_issued >= 2, "{stats:?}");
    assert!(
        h.sim
            .events()
            .iter()
            .any(|e| matches!(e, SimEvent::StsFailed { code, .. } if code == "Throttling")),
        "the STS throttle was not taken"
    );
    // The search must cover real output: every process logged at length.
    let ours_below_info = output
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l.get("target").is_none() && (l["level"] == "DEBUG" || l["level"] == "TRACE"))
        .count();
    assert!(
        ours_below_info > 0 || lines >= 250,
        "only {lines} lines of output: the search proves little"
    );
    assert_no_secret(&output, &h.secrets());
    assert_clean(&h);
}

// 12. check as a diagnostic ---------------------------------------------------------------

fn check(h: &Harness, config: &std::path::Path) -> String {
    let mut daemon = h.spawn(config, &["check"]);
    let status = daemon.wait(Duration::from_secs(20));
    let report = daemon.stdout_text();
    assert_eq!(
        status.code(),
        Some(1),
        "check must fail; stdout:\n{report}\nstderr:\n{}",
        daemon.stderr_text()
    );
    assert_no_secret(&report, &h.secrets());
    report
}

fn line_with<'a>(report: &'a str, prefix: &str) -> Vec<&'a str> {
    report.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_a_refused_client_secret_and_a_wrong_org() {
    let h = Harness::start(2, Duration::from_secs(60)).await;
    std::fs::write(
        h.dir.path().join("client-secret"),
        "not-the-client-secret-at-all\n",
    )
    .unwrap();
    let config = quick(&h).write();
    let report = check(&h, &config);
    let ims = line_with(&report, "FAIL  ims");
    assert_eq!(ims.len(), 1, "{report}");
    assert!(
        ims[0].contains("invalid_client") && ims[0].contains("check [adobe] client_id"),
        "{report}"
    );

    let h = Harness::start_with(2, Duration::from_secs(60), |c| {
        c.org_id = "FEDCBA9876543210FEDCBA98@AdobeOrg".to_owned();
    })
    .await;
    let config = quick(&h).write();
    let report = check(&h, &config);
    let failing = line_with(&report, "FAIL  connection");
    assert_eq!(failing.len(), 2, "{report}");
    for line in failing {
        assert!(
            line.contains("403") && line.contains("IMS Org") && line.contains("org_id"),
            "{line}"
        );
    }
    assert!(line_with(&report, "ok    ims").len() == 1, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_unknown_and_non_s3_connections_and_sts_access_denied() {
    let h = Harness::start_with(3, Duration::from_secs(60), |c| {
        c.connections[1].connection_spec_id = "00000000-0000-0000-0000-0000000000db".to_owned();
    })
    .await;
    let mut connections = h.sim_config.connections.clone();
    connections[2].id = "11111111-2222-3333-4444-555555555555".to_owned();
    h.sim
        .script(SimService::Sts, sts_error("AccessDenied", 403));
    let config = quick(&h).connections(&connections).write();
    let report = check(&h, &config);
    assert_eq!(line_with(&report, "ok    connection").len(), 1, "{report}");
    let failing = line_with(&report, "FAIL  connection");
    assert_eq!(failing.len(), 2, "{report}");
    assert!(
        failing
            .iter()
            .any(|l| l.contains("conn-1") && l.contains("not Amazon S3")),
        "{report}"
    );
    assert!(
        failing.iter().any(|l| l.contains("conn-2")
            && l.contains("(404)")
            && l.contains("11111111-2222-3333-4444-555555555555")),
        "{report}"
    );
    let sts = line_with(&report, "FAIL  sts");
    assert_eq!(sts.len(), 1, "{report}");
    assert!(
        sts[0].contains("AccessDenied") && sts[0].contains("trust policy"),
        "{report}"
    );
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_missing_aws_credentials() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let config = quick(&h).write();
    // No AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: the default chain finds nothing.
    let mut command = clean_command(binary());
    command.arg("--config").arg(&config).arg("check");
    let mut daemon = DaemonProcess::spawn(command);
    let status = daemon.wait(Duration::from_secs(30));
    let report = daemon.stdout_text();
    assert_eq!(status.code(), Some(1), "{report}");
    let sts = line_with(&report, "FAIL  sts");
    assert_eq!(sts.len(), 1, "{report}");
    assert!(
        sts[0].contains("no AWS credentials found by the default chain"),
        "{report}"
    );
    assert!(line_with(&report, "ok    ims").len() == 1, "{report}");
    assert_eq!(h.sim.stats().sts_assume_role, 0);
}

/// A chain whose provider fails loudly (a profile whose `credential_process`
/// exits 1): the SDK warns with a dump of its error for every provider that
/// fails; at the default level none of that shows, and the daemon's own line
/// comes first, short, with the provider's reason as one sentence.
#[tokio::test(flavor = "multi_thread")]
async fn check_without_aws_credentials_says_so_in_one_short_line() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let config = quick(&h).write();
    let aws_config = h.dir.path().join("aws-config");
    std::fs::write(&aws_config, "[default]\ncredential_process = /bin/false\n").unwrap();
    let mut command = clean_command(binary());
    command
        .env("AWS_CONFIG_FILE", &aws_config)
        .env("AEP_S3_ROTATOR_LOG_FORMAT", "text")
        .arg("--config")
        .arg(&config)
        .arg("check");
    let mut daemon = DaemonProcess::spawn(command);
    let status = daemon.wait(Duration::from_secs(30));
    let report = daemon.stdout_text();
    let stderr = daemon.stderr_text();
    assert_eq!(status.code(), Some(1), "{report}");
    assert!(
        !stderr.contains("aws_config"),
        "the SDK's chain warnings show at the default level:\n{stderr}"
    );
    let sts = line_with(&report, "FAIL  sts");
    assert_eq!(sts.len(), 1, "{report}");
    let line = sts[0];
    assert!(
        line.contains(
            ": no AWS credentials found by the default chain; give the daemon an identity"
        ),
        "{line}"
    );
    assert!(line.contains("; last: "), "{line}");
    assert!(
        line.len() < 400 && !line.contains('{') && !line.contains("more bytes"),
        "not one short line ({} bytes): {line}",
        line.len()
    );
}

/// The documented systemd setup: `client_secret_file` points into
/// `/run/credentials/UNIT/`, which exists only inside the running unit.
/// `check` by an operator outside it validates everything else and skips
/// (not fails) what needs the secret; under another unit that holds the
/// credential (`systemd-run -p LoadCredential=...`, `$CREDENTIALS_DIRECTORY`)
/// it checks IMS too; `status` needs only `[admin] listen`; the daemon
/// itself refuses to start without the secret, saying why.
#[tokio::test(flavor = "multi_thread")]
async fn a_systemd_credential_outside_its_unit_is_skipped_by_check_and_ignored_by_status() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let config = quick(&h).admin_listen("127.0.0.1:9").write();
    let credential = "/run/credentials/aep-s3-rotator-test.service/client-secret";
    let text = std::fs::read_to_string(&config).unwrap();
    let secret_file = h.dir.path().join("client-secret").display().to_string();
    std::fs::write(&config, text.replace(&secret_file, credential)).unwrap();

    let mut outside = h.spawn(&config, &["check"]);
    let status = outside.wait(Duration::from_secs(20));
    let report = outside.stdout_text();
    assert_eq!(
        status.code(),
        Some(0),
        "{report}\n{}",
        outside.stderr_text()
    );
    assert_eq!(line_with(&report, "skip  ims").len(), 1, "{report}");
    assert!(
        line_with(&report, "warn  config")
            .iter()
            .any(|l| l.contains("systemd credential") && l.contains("systemd-run")),
        "{report}"
    );
    assert_eq!(line_with(&report, "ok    sts").len(), 1, "{report}");
    assert!(report.contains(" 0 failed, "), "{report}");
    assert_eq!(
        h.sim.stats().ims_tokens_issued,
        0,
        "an IMS request with no secret"
    );

    // Inside a unit that holds the credential under the same name.
    let mut command = clean_command(binary());
    command
        .env("AWS_ACCESS_KEY_ID", SOURCE_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SOURCE_SECRET)
        .env("CREDENTIALS_DIRECTORY", h.dir.path())
        .arg("--config")
        .arg(&config)
        .arg("check");
    let mut inside = DaemonProcess::spawn(command);
    let status = inside.wait(Duration::from_secs(20));
    let report = inside.stdout_text();
    assert_eq!(status.code(), Some(0), "{report}\n{}", inside.stderr_text());
    assert_eq!(line_with(&report, "ok    ims").len(), 1, "{report}");
    assert_eq!(line_with(&report, "skip").len(), 0, "{report}");

    // `status` reads [admin] listen only: nothing listens there, exit 1, not 78.
    let mut status_command = h.spawn(&config, &["status"]);
    let code = status_command.wait(Duration::from_secs(20)).code();
    assert_eq!(code, Some(1), "{}", status_command.stderr_text());

    // The daemon cannot run without its secret: exit 78, the reason named.
    let mut run = h.spawn(&config, &["run"]);
    assert_eq!(run.wait(Duration::from_secs(20)).code(), Some(78));
    let stderr = run.stderr_text();
    assert!(
        stderr.contains("adobe.client_secret_file")
            && stderr.contains("systemd credential")
            && stderr.contains("systemctl start aep-s3-rotator-test.service"),
        "{stderr}"
    );
}
