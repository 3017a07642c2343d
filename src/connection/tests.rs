//! The state machine, event by event, on injected time.

use super::*;
use crate::policy::schedule::{EXPIRY_MARGIN, RETRY_AFTER_CAP};
use crate::remote::flow::FlowError;
use crate::remote::sts::StsError;

const S: fn(u64) -> Duration = Duration::from_secs;

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + S(1_700_000_000 + secs)
}

/// refresh 20 min before, no jitter (draws below are then irrelevant to
/// the rotation time), retries 1 s .. 2 min.
fn policy() -> Policy {
    Policy {
        refresh_before: S(1200),
        jitter: Duration::ZERO,
        backoff: BackoffPolicy {
            min: S(1),
            max: S(120),
        },
        once: false,
        session_duration: S(3600),
    }
}

fn config(id: &str) -> ConnectionConfig {
    ConnectionConfig {
        id: id.to_owned(),
        sandbox: "prod".to_owned(),
        name: id.to_owned(),
        ..ConnectionConfig::default()
    }
}

fn sts(session: &str) -> StsRequest {
    StsRequest {
        role_arn: None,
        external_id: None,
        session_name: session.to_owned(),
        session_policy: None,
        policy_arns: Vec::new(),
        duration: S(3600),
        attribution: Ok(crate::config::ExpandedAttribution::default()),
    }
}

fn fresh(now: SystemTime) -> Connection {
    Connection::new(Arc::new(config("c1")), Arc::new(sts("a")), now)
}

fn dispatch(c: &mut Connection, now: SystemTime) -> Job {
    match c.apply(Event::Due, now, &policy(), 0.5) {
        Action::Dispatch(job) => *job,
        other => panic!("expected a dispatch, got {other:?}"),
    }
}

/// A `rotate` request's moment on tokio's clock, `secs` after a fixed base.
fn at(secs: u64) -> tokio::time::Instant {
    static BASE: std::sync::LazyLock<tokio::time::Instant> =
        std::sync::LazyLock::new(crate::clock::mono_now);
    *BASE + Duration::from_secs(secs)
}

/// A new connection told its state file record, as the scheduler does.
fn restored(
    config: ConnectionConfig,
    sts: StsRequest,
    saved: &PersistedConnection,
    now: SystemTime,
    policy: &Policy,
) -> Connection {
    let mut c = Connection::new(Arc::new(config), Arc::new(sts), now);
    c.apply(Event::Restored(Box::new(saved.clone())), now, policy, 0.5);
    c
}

/// The leader's shared record, as the scheduler sends it.
fn adopt(
    c: &mut Connection,
    shared: Option<&PersistedConnection>,
    now: SystemTime,
    policy: &Policy,
    draw: f64,
) -> Action {
    c.apply(
        Event::Adopt(shared.cloned().map(Box::new)),
        now,
        policy,
        draw,
    )
}

/// A list page's etag, as the scheduler sends it.
fn seed_etag(
    c: &mut Connection,
    etag: &str,
    now: SystemTime,
    policy: &Policy,
    draw: f64,
) -> Action {
    let event = Event::Listed {
        etag: Some(etag.to_owned()),
        s3: None,
    };
    c.apply(event, now, policy, draw)
}

fn rotated(key: &str, expires_at: SystemTime) -> JobResult {
    JobResult::Rotated {
        access_key_id: key.to_owned(),
        expires_at,
        etag: Some("\"e2\"".to_owned()),
        conflicts: 0,
        s3: None,
        verified: None,
    }
}

fn failed(error: RotationError) -> JobResult {
    JobResult::Failed {
        error,
        etag: Some("\"e1\"".to_owned()),
        conflicts: 0,
        s3: None,
    }
}

fn wait_of(action: Action) -> SystemTime {
    match action {
        Action::WaitUntil(at) => at,
        other => panic!("expected a wait, got {other:?}"),
    }
}

/// A connection holding credentials that expire at `expires_at`, idle.
fn holding(now: SystemTime, expires_at: SystemTime) -> Connection {
    let mut c = fresh(now);
    dispatch(&mut c, now);
    c.apply(
        Event::JobDone(rotated("ASIAOLD", expires_at)),
        now,
        &policy(),
        0.0,
    );
    c
}

fn shared(key: &str, expires_at: SystemTime) -> PersistedConnection {
    PersistedConnection {
        sandbox: "prod".to_owned(),
        etag: "\"shared\"".to_owned(),
        access_key_id: key.to_owned(),
        expires_at,
        last_success_at: Some(t(0)),
    }
}

/// The levels and messages of the events `f` logs.
fn logged(f: impl FnOnce()) -> Vec<(tracing::Level, String)> {
    crate::observe::recorded::logged(f)
        .into_iter()
        .map(|event| (event.level, event.message().to_owned()))
        .collect()
}

#[test]
fn refused_since_the_first_attempt_escalates_to_error_like_a_connection_that_once_worked() {
    let refused = || {
        failed(RotationError::Flow(FlowError::Rejected {
            status: 404,
            detail: "no such connection in this sandbox".to_owned(),
        }))
    };
    let threshold =
        schedule::refusals_before_escalation(&policy().backoff, policy().refresh_before);
    assert_eq!(threshold, 10);
    let errors_per_attempt = |c: &mut Connection, start: SystemTime| {
        let mut now = start;
        (1..=threshold + 2)
            .map(|_| {
                dispatch(c, now);
                let mut next = now;
                let events = logged(|| {
                    next = wait_of(c.apply(Event::JobDone(refused()), now, &policy(), 0.5));
                });
                now = next;
                events
                    .iter()
                    .filter(|(level, _)| *level == tracing::Level::ERROR)
                    .count()
            })
            .collect::<Vec<_>>()
    };
    // Never worked: warn up to the threshold, then error on each attempt.
    let mut never = fresh(t(0));
    let errors = errors_per_attempt(&mut never, t(0));
    let first_error = errors.iter().position(|&n| n > 0).map(|i| i + 1);
    // Once worked, refused from its rotation time on: the same count.
    let mut once = holding(t(0), t(3600));
    let once_errors = errors_per_attempt(&mut once, t(3600 - 1200));
    let once_first = once_errors.iter().position(|&n| n > 0).map(|i| i + 1);
    assert_eq!(once_first, Some(threshold as usize), "{once_errors:?}");
    assert_eq!(first_error, once_first, "{errors:?}");
    assert!(
        errors[threshold as usize..].iter().all(|&n| n == 1),
        "{errors:?}"
    );
}

#[test]
fn adopting_fresh_shared_state_schedules_from_its_expiry_without_a_request() {
    let mut c = fresh(t(0));
    let at = wait_of(adopt(
        &mut c,
        Some(&shared("ASIASHARED", t(3600))),
        t(10),
        &policy(),
        0.5,
    ));
    assert_eq!(at, t(3600 - 1200));
    assert_eq!(c.pushed().unwrap().access_key_id, "ASIASHARED");
    assert_eq!(c.etag(), Some("\"shared\""));
    assert!(c.had_outcome());
    // When due, the job PATCHes with the shared etag (no GET first).
    let job = dispatch(&mut c, at);
    assert_eq!(job.known_etag.as_deref(), Some("\"shared\""));
}

#[test]
fn adopting_keeps_whichever_credentials_expire_later() {
    let mut c = holding(t(0), t(7200));
    let at = wait_of(adopt(
        &mut c,
        Some(&shared("ASIAOLDER", t(3600))),
        t(10),
        &policy(),
        0.5,
    ));
    assert_eq!(
        c.pushed().unwrap().expires_at,
        t(7200),
        "our own newer push wins"
    );
    assert_eq!(at, t(7200 - 1200));
}

#[test]
fn adopting_stale_absurd_or_foreign_records_rotates_now() {
    for record in [
        shared("ASIASTALE", t(600)),                 // < refresh_before left
        shared("ASIAFAR", t(100 * 365 * 24 * 3600)), // impossible expiry
        PersistedConnection {
            sandbox: "dev".to_owned(),
            ..shared("ASIADEV", t(3600))
        },
    ] {
        let mut c = fresh(t(0));
        assert_eq!(
            wait_of(adopt(&mut c, Some(&record), t(10), &policy(), 0.5)),
            t(10),
            "{record:?}"
        );
    }
    let mut c = fresh(t(0));
    assert_eq!(wait_of(adopt(&mut c, None, t(10), &policy(), 0.5)), t(10));
}

#[test]
fn saved_and_shared_expiries_are_clamped_to_one_session() {
    // Issue 26 #6: 35 h ahead under a 1 h session stopped rotation for
    // 35 h while /status said "fresh".
    let far = t(35 * 3600);
    let record = PersistedConnection {
        last_success_at: Some(t(0)),
        ..shared("ASIAFAR", far)
    };
    let restored = restored(config("c1"), sts("a"), &record, t(10), &policy());
    assert!(
        restored.credentials_expire_at().unwrap() <= t(3600 + 300),
        "{:?}",
        restored.credentials_expire_at()
    );
    let mut c = fresh(t(0));
    let at = wait_of(adopt(&mut c, Some(&record), t(10), &policy(), 0.5));
    assert!(
        at <= t(3600 + 300 - 1200),
        "adopted and scheduled at {at:?}"
    );
    assert!(c.pushed().unwrap().expires_at <= t(3600 + 300));
}

#[test]
fn a_shared_record_whose_etag_differs_from_a_later_listing_is_not_adopted() {
    // Issue 26 #6: adopt sent no request although the listing showed
    // that the connection had changed since the record was written.
    let mut c = fresh(t(0));
    seed_etag(&mut c, "\"changed-by-someone\"", t(900), &policy(), 0.5);
    let record = shared("ASIASHARED", t(3600));
    assert_eq!(
        wait_of(adopt(&mut c, Some(&record), t(910), &policy(), 0.5)),
        t(910)
    );
    assert!(c.pushed().is_none());
    // The same etag as listed: adopted as before.
    let mut c = fresh(t(0));
    seed_etag(&mut c, "\"shared\"", t(900), &policy(), 0.5);
    assert_eq!(
        wait_of(adopt(&mut c, Some(&record), t(910), &policy(), 0.5)),
        t(3600 - 1200)
    );
    // A listing taken about when the record's rotation happened (the
    // leader's PATCH racing a standby's start) proves nothing.
    let mut c = fresh(t(0));
    seed_etag(&mut c, "\"before-the-patch\"", t(5), &policy(), 0.5);
    assert_eq!(
        wait_of(adopt(&mut c, Some(&record), t(10), &policy(), 0.5)),
        t(3600 - 1200)
    );
}

#[test]
fn adopting_leaves_a_running_job_alone() {
    let mut c = fresh(t(0));
    dispatch(&mut c, t(0));
    assert!(matches!(
        adopt(
            &mut c,
            Some(&shared("ASIASHARED", t(3600))),
            t(1),
            &policy(),
            0.5
        ),
        Action::AwaitJob
    ));
    assert!(c.pushed().is_none());
}

#[test]
fn standing_down_is_no_failure_and_forgets_a_refused_etag() {
    let mut c = fresh(t(0));
    dispatch(&mut c, t(0));
    let result = JobResult::Failed {
        error: RotationError::NotLeader,
        etag: None,
        conflicts: 1,
        s3: None,
    };
    assert_eq!(
        outcome_of(&result),
        None,
        "not counted as a rotation failure"
    );
    let at = wait_of(c.apply(Event::JobDone(result), t(1), &policy(), 0.5));
    assert_eq!(at, t(1), "due again for whoever leads next");
    assert_eq!(c.counters().failures, 0);
    assert_eq!(c.last_error(), None);
    assert_eq!(c.etag(), None, "after a 412 the next leader re-reads");
}

#[test]
fn a_new_connection_is_due_at_once_and_reads_its_etag() {
    let mut c = fresh(t(0));
    assert_eq!(c.phase(), Phase::Waiting(t(0)));
    let job = dispatch(&mut c, t(0));
    assert_eq!(job.known_etag, None);
    assert_eq!(job.held, None);
    assert_eq!(c.phase(), Phase::InFlight);
}

#[test]
fn never_two_jobs_for_one_connection() {
    let mut c = fresh(t(0));
    dispatch(&mut c, t(0));
    assert!(matches!(
        c.apply(Event::Due, t(1), &policy(), 0.5),
        Action::AwaitJob
    ));
}

#[test]
fn a_stale_wake_up_waits_for_the_real_due_time() {
    let mut c = holding(t(0), t(3600));
    assert_eq!(wait_of(c.apply(Event::Due, t(10), &policy(), 0.5)), t(2400));
}

#[test]
fn success_schedules_from_the_sts_expiry() {
    let mut c = fresh(t(0));
    dispatch(&mut c, t(0));
    let at = wait_of(c.apply(
        Event::JobDone(rotated("ASIA1", t(3600))),
        t(0),
        &policy(),
        0.0,
    ));
    assert_eq!(at, t(2400), "expiry − refresh_before");
    assert_eq!(c.pushed().unwrap().access_key_id, "ASIA1");
    assert_eq!(c.etag(), Some("\"e2\""));
    assert_eq!(c.counters().successes, 1);
    // The next job skips the GET and names the key it replaces.
    let job = dispatch(&mut c, t(2400));
    assert_eq!(job.known_etag.as_deref(), Some("\"e2\""));
    assert_eq!(job.held.as_deref(), Some("ASIA1"));
}

#[test]
fn jitter_pulls_the_rotation_earlier() {
    let mut p = policy();
    p.jitter = S(60);
    let mut c = fresh(t(0));
    dispatch(&mut c, t(0));
    let at = wait_of(c.apply(Event::JobDone(rotated("ASIA1", t(3600))), t(0), &p, 0.5));
    assert_eq!(at, t(2370));
}

#[test]
fn short_credentials_rotate_at_half_their_life() {
    let mut c = fresh(t(0));
    dispatch(&mut c, t(0));
    let at = wait_of(c.apply(
        Event::JobDone(rotated("ASIA1", t(600))),
        t(0),
        &policy(),
        0.0,
    ));
    assert_eq!(at, t(300));
}

#[test]
fn transient_failures_back_off_exponentially_within_retry_max() {
    let mut c = holding(t(0), t(3600));
    let mut now = t(2400);
    let mut waits = Vec::new();
    for _ in 0..10 {
        dispatch(&mut c, now);
        let error = RotationError::Flow(FlowError::Unavailable("HTTP 502".into()));
        // draw just below 1: the cap of each attempt.
        let at = wait_of(c.apply(Event::JobDone(failed(error)), now, &policy(), 0.999));
        waits.push(at.duration_since(now).unwrap().as_secs_f64().round() as u64);
        now = at;
    }
    assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 120, 120, 120]);
    assert_eq!(c.counters().failures, 10);
    assert!(c.last_error().unwrap().contains("502"));
}

#[test]
fn rejections_and_sts_denials_wait_the_slow_cadence() {
    for error in [
        RotationError::Flow(FlowError::Rejected {
            status: 404,
            detail: "gone".into(),
        }),
        RotationError::Sts(StsError::Rejected {
            code: "AccessDenied".into(),
            message: "no".into(),
        }),
    ] {
        let mut c = holding(t(0), t(3600));
        dispatch(&mut c, t(2400));
        let at = wait_of(c.apply(Event::JobDone(failed(error)), t(2400), &policy(), 0.1));
        assert_eq!(at, t(2520), "retry_max");
    }
}

#[test]
fn retry_after_is_honoured_up_to_the_cap_and_before_expiry() {
    let throttled = |secs| {
        failed(RotationError::Flow(FlowError::Throttled {
            status: 429,
            retry_after: Some(S(secs)),
        }))
    };
    // 7 s: honoured.
    let mut c = holding(t(0), t(7200));
    dispatch(&mut c, t(6000));
    assert_eq!(
        wait_of(c.apply(Event::JobDone(throttled(7)), t(6000), &policy(), 0.5)),
        t(6007)
    );
    // An hour, with 20 minutes left when the rotation is due: the cap.
    let mut c = holding(t(0), t(5400));
    dispatch(&mut c, t(4200));
    let at = wait_of(c.apply(Event::JobDone(throttled(3600)), t(4200), &policy(), 0.5));
    assert_eq!(at, t(4200) + RETRY_AFTER_CAP);
    // An hour, nothing pushed yet (expiry unknown, the credentials there
    // may be dead): retry_max.
    let mut c = fresh(t(0));
    dispatch(&mut c, t(0));
    let at = wait_of(c.apply(Event::JobDone(throttled(3600)), t(0), &policy(), 0.5));
    assert_eq!(at, t(120));
    // An hour with five minutes left: pulled in well before expiry.
    let mut c = holding(t(0), t(600));
    dispatch(&mut c, t(300));
    let at = wait_of(c.apply(Event::JobDone(throttled(3600)), t(300), &policy(), 0.5));
    assert!(at > t(300) && at <= t(600) - EXPIRY_MARGIN, "{at:?}");
    // u64::MAX seconds: no overflow, same rule.
    dispatch(&mut c, at);
    let next = wait_of(c.apply(Event::JobDone(throttled(u64::MAX)), at, &policy(), 0.5));
    assert!(
        next > at && next <= t(600) - EXPIRY_MARGIN.min(S(1)),
        "{next:?}"
    );
}

#[test]
fn a_refused_or_malformed_etag_is_not_kept() {
    let mut c = holding(t(0), t(3600));
    dispatch(&mut c, t(2400));
    let result = JobResult::Failed {
        error: RotationError::Flow(FlowError::Malformed("bad etag".into())),
        etag: None,
        conflicts: 0,
        s3: None,
    };
    c.apply(Event::JobDone(result), t(2400), &policy(), 0.5);
    assert_eq!(c.etag(), None);
    let job = dispatch(&mut c, t(2500));
    assert_eq!(job.known_etag, None, "the next job must GET again");
}

#[test]
fn a_panicked_job_backs_off_and_keeps_the_state() {
    let mut c = holding(t(0), t(3600));
    dispatch(&mut c, t(2400));
    let result = JobResult::Failed {
        error: RotationError::Internal("the job panicked".into()),
        etag: None,
        conflicts: 0,
        s3: None,
    };
    let at = wait_of(c.apply(Event::JobDone(result), t(2400), &policy(), 0.0));
    assert_eq!(at, t(2401));
    assert_eq!(c.pushed().unwrap().access_key_id, "ASIAOLD");
}

#[test]
fn once_finishes_after_success_or_its_attempts() {
    let mut p = policy();
    p.once = true;
    let mut c = fresh(t(0));
    dispatch(&mut c, t(0));
    assert!(matches!(
        c.apply(Event::JobDone(rotated("ASIA1", t(3600))), t(0), &p, 0.5),
        Action::Finished
    ));
    let mut c = fresh(t(0));
    let mut now = t(0);
    for attempt in 1..=ONCE_ATTEMPTS {
        dispatch(&mut c, now);
        let error = RotationError::Flow(FlowError::Unavailable("reset".into()));
        match c.apply(Event::JobDone(failed(error)), now, &p, 0.5) {
            Action::WaitUntil(at) if attempt < ONCE_ATTEMPTS => now = at,
            Action::Finished if attempt == ONCE_ATTEMPTS => {}
            other => panic!("attempt {attempt}: {other:?}"),
        }
    }
    // A slow-cadence error ends `once` at the first attempt.
    let mut c = fresh(t(0));
    dispatch(&mut c, t(0));
    let error = RotationError::Flow(FlowError::Unsuitable("not S3".into()));
    assert!(matches!(
        c.apply(Event::JobDone(failed(error)), t(0), &p, 0.5),
        Action::Finished
    ));
    assert_eq!(c.phase(), Phase::Finished);
}

fn saved(expires_at: SystemTime) -> PersistedConnection {
    PersistedConnection {
        sandbox: "prod".into(),
        etag: "\"e9\"".into(),
        access_key_id: "ASIASAVED".into(),
        expires_at,
        last_success_at: Some(t(0)),
    }
}

#[test]
fn restart_with_good_credentials_only_checks_the_etag() {
    let mut c = restored(config("c1"), sts("a"), &saved(t(3600)), t(60), &policy());
    assert!(!c.had_outcome(), "a restored record is not a first pass");
    let job = dispatch(&mut c, t(60));
    assert_eq!(job.resume_if_etag.as_deref(), Some("\"e9\""));
    assert_eq!(job.held.as_deref(), Some("ASIASAVED"));
    let at = wait_of(c.apply(
        Event::JobDone(JobResult::Unchanged {
            etag: "\"e9\"".into(),
            s3: None,
        }),
        t(60),
        &policy(),
        0.0,
    ));
    assert_eq!(at, t(2400));
    assert!(c.had_outcome());
}

#[test]
fn restart_near_expiry_or_with_absurd_times_rotates_now() {
    let near = restored(config("c1"), sts("a"), &saved(t(1000)), t(0), &policy());
    assert!(near.pushed().is_none());
    let ten_years = t(0) + S(10 * 365 * 86_400);
    let mut absurd = restored(config("c1"), sts("a"), &saved(ten_years), t(0), &policy());
    assert!(absurd.pushed().is_none());
    assert_eq!(dispatch(&mut absurd, t(0)).resume_if_etag, None);
    let mut future_success = saved(t(3600));
    future_success.last_success_at = Some(t(86_400));
    let c = restored(config("c1"), sts("a"), &future_success, t(0), &policy());
    assert!(c.pushed().is_none());
}

#[test]
fn a_change_during_a_job_waits_for_it_then_rotates_with_the_new_identity() {
    let mut c = holding(t(0), t(3600));
    dispatch(&mut c, t(2400));
    let action = c.apply(
        Event::Changed(Arc::new(config("c1")), Arc::new(sts("b"))),
        t(2401),
        &policy(),
        0.5,
    );
    assert!(matches!(action, Action::AwaitJob));
    assert!(matches!(
        c.apply(Event::Due, t(2401), &policy(), 0.5),
        Action::AwaitJob
    ));
    // The old job's result is applied (it tells which key is on the
    // connection), then the connection is due at once with the new identity.
    let at = wait_of(c.apply(
        Event::JobDone(rotated("ASIAOLDROLE", t(6000))),
        t(2402),
        &policy(),
        0.5,
    ));
    assert_eq!(at, t(2402));
    assert_eq!(c.pushed().unwrap().access_key_id, "ASIAOLDROLE");
    let job = dispatch(&mut c, t(2402));
    assert_eq!(*job.sts, sts("b"));
    assert_eq!(job.held.as_deref(), Some("ASIAOLDROLE"));
}

#[test]
fn a_rename_keeps_the_schedule() {
    let mut c = holding(t(0), t(3600));
    let mut renamed = config("c1");
    renamed.name = "sales".into();
    let at = wait_of(c.apply(
        Event::Changed(Arc::new(renamed), Arc::new(sts("a"))),
        t(5),
        &policy(),
        0.5,
    ));
    assert_eq!(at, t(2400));
    assert_eq!(c.status().name(), "sales");
}

#[test]
fn a_removed_connection_goes_once_its_job_ends() {
    let mut c = holding(t(0), t(3600));
    dispatch(&mut c, t(2400));
    assert!(matches!(
        c.apply(Event::Removed, t(2401), &policy(), 0.5),
        Action::AwaitJob
    ));
    assert!(matches!(
        c.apply(
            Event::JobDone(rotated("ASIA2", t(6000))),
            t(2402),
            &policy(),
            0.5
        ),
        Action::Drop
    ));
    let mut idle = holding(t(0), t(3600));
    assert!(matches!(
        idle.apply(Event::Removed, t(1), &policy(), 0.5),
        Action::Drop
    ));
}

#[test]
fn shutdown_finishes_idle_connections_and_waits_for_jobs() {
    let mut idle = holding(t(0), t(3600));
    assert!(matches!(
        idle.apply(Event::Shutdown, t(1), &policy(), 0.5),
        Action::Finished
    ));
    let mut busy = holding(t(0), t(3600));
    dispatch(&mut busy, t(2400));
    assert!(matches!(
        busy.apply(Event::Shutdown, t(2401), &policy(), 0.5),
        Action::AwaitJob
    ));
    let cancelled = JobResult::Failed {
        error: RotationError::Cancelled,
        etag: Some("\"e2\"".into()),
        conflicts: 0,
        s3: None,
    };
    assert!(matches!(
        busy.apply(Event::JobDone(cancelled), t(2402), &policy(), 0.5),
        Action::Finished
    ));
    assert_eq!(
        busy.counters().failures,
        0,
        "a cancelled job is not a failure"
    );
}

#[test]
fn status_and_state_file_are_views_of_the_one_state() {
    let c = holding(t(0), t(3600));
    let status = c.status();
    assert_eq!(status.access_key_id.as_deref(), Some("ASIAOLD"));
    assert_eq!(status.expires_at, Some(t(3600)));
    assert_eq!(status.next_rotation_at, Some(t(2400)));
    // The state file's record is made from this view
    // (`persist::writer::record`): its etag and expiry, and none for a
    // connection nothing was pushed to.
    assert_eq!(status.etag.as_deref(), Some("\"e2\""));
    assert_eq!(status.expires_at, Some(t(3600)));
    let nothing = fresh(t(0)).status();
    assert!(nothing.etag.is_none() && nothing.access_key_id.is_none());
}

#[test]
fn a_rotate_request_makes_an_idle_connection_due_at_once_with_fresh_credentials() {
    // Rotated at 0, next due at 40 min: the request at 5 min moves it to now.
    let mut c = holding(t(0), t(3600));
    let asked = t(300);
    assert_eq!(
        wait_of(c.apply(Event::RotateNow { since: at(300) }, asked, &policy(), 0.0)),
        asked
    );
    assert!(c.rotate_requested());
    let job = dispatch(&mut c, asked);
    assert_eq!(job.fresh_after, Some(at(300)));
    // The held key is sent as always (the cache ignores it for a fresh job).
    assert_eq!(job.held.as_deref(), Some("ASIAOLD"));
    assert!(!c.rotate_requested());
    // Done: back on the ordinary schedule, from the new expiry.
    let next = wait_of(c.apply(
        Event::JobDone(rotated("ASIANEW", t(300 + 3600))),
        t(301),
        &policy(),
        0.0,
    ));
    assert_eq!(next, t(300 + 3600 - 1200));
    assert_eq!(c.pushed().unwrap().access_key_id, "ASIANEW");
    // The next scheduled job is an ordinary one.
    assert_eq!(dispatch(&mut c, next).fresh_after, None);
}

#[test]
fn a_rotate_request_during_a_job_runs_right_after_it_never_beside_it() {
    let mut c = fresh(t(0));
    let running = dispatch(&mut c, t(0));
    assert_eq!(running.fresh_after, None);
    // Asked while the scheduled job is in flight: no second job.
    assert!(matches!(
        c.apply(Event::RotateNow { since: at(1) }, t(1), &policy(), 0.0),
        Action::AwaitJob
    ));
    assert!(matches!(
        c.apply(Event::Due, t(1), &policy(), 0.0),
        Action::AwaitJob
    ));
    // The scheduled job ends: the requested one is due at once, not in 40 min.
    assert_eq!(
        wait_of(c.apply(
            Event::JobDone(rotated("ASIAOLD", t(3600))),
            t(2),
            &policy(),
            0.0
        )),
        t(2)
    );
    let job = dispatch(&mut c, t(2));
    assert_eq!(job.fresh_after, Some(at(1)));
}

#[test]
fn requests_that_meet_before_the_job_starts_share_it_with_the_latest_time() {
    let mut c = holding(t(0), t(3600));
    c.apply(Event::RotateNow { since: at(10) }, t(10), &policy(), 0.0);
    c.apply(Event::RotateNow { since: at(12) }, t(12), &policy(), 0.0);
    c.apply(Event::RotateNow { since: at(11) }, t(12), &policy(), 0.0);
    assert_eq!(dispatch(&mut c, t(12)).fresh_after, Some(at(12)));
}

#[test]
fn a_requested_job_after_a_restart_pushes_even_if_the_connection_is_unchanged() {
    let saved = PersistedConnection {
        sandbox: "prod".to_owned(),
        etag: "\"kept\"".to_owned(),
        access_key_id: "ASIAKEPT".to_owned(),
        expires_at: t(3600),
        last_success_at: Some(t(0)),
    };
    // Restored with a resume check pending: its first job would only
    // re-push if the etag changed.
    let mut c = restored(config("c1"), sts("a"), &saved, t(60), &policy());
    c.apply(Event::RotateNow { since: at(60) }, t(60), &policy(), 0.0);
    let job = dispatch(&mut c, t(60));
    assert_eq!(job.resume_if_etag, None);
    assert_eq!(job.fresh_after, Some(at(60)));
}

#[test]
fn a_failed_requested_job_retries_on_the_ordinary_cadence() {
    let mut c = holding(t(0), t(3600));
    c.apply(Event::RotateNow { since: at(5) }, t(5), &policy(), 0.0);
    dispatch(&mut c, t(5));
    let retry = wait_of(c.apply(
        Event::JobDone(failed(RotationError::Flow(FlowError::Unavailable(
            "503".into(),
        )))),
        t(6),
        &policy(),
        0.5,
    ));
    assert!(retry > t(6) && retry <= t(6 + 120), "{retry:?}");
    assert!(!c.rotate_requested());
    assert_eq!(dispatch(&mut c, retry).fresh_after, None);
}

#[test]
fn a_rotate_request_after_shutdown_or_removal_starts_nothing() {
    let mut stopped = holding(t(0), t(3600));
    stopped.apply(Event::Shutdown, t(1), &policy(), 0.0);
    assert!(matches!(
        stopped.apply(Event::RotateNow { since: at(2) }, t(2), &policy(), 0.0),
        Action::Finished
    ));
    let mut leaving = fresh(t(0));
    dispatch(&mut leaving, t(0));
    leaving.apply(Event::Removed, t(1), &policy(), 0.0);
    assert!(matches!(
        leaving.apply(Event::RotateNow { since: at(2) }, t(2), &policy(), 0.0),
        Action::AwaitJob
    ));
    assert!(matches!(
        leaving.apply(
            Event::JobDone(rotated("ASIAX", t(3600))),
            t(3),
            &policy(),
            0.0
        ),
        Action::Drop
    ));
}
