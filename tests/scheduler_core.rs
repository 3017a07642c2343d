//! Legal but unusual answers from the remotes, black box: the release-like
//! binary against the strict simulator. Each test pins a bug of the first
//! scheduler: one throttled connection froze every other one, and an IMS
//! `expires_in` of `u64::MAX` panicked a job and wedged the daemon.

// Black-box tests drive the real binary in real time: they read the real clocks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use aep_s3_simulator::{RetryAfter, ScriptedFault};
use common::*;

/// 12 s credentials rotated 4 s before expiry: several cycles in a test.
fn fast() -> Rotation {
    Rotation::fast()
        .refresh_before("4s")
        .jitter("100ms")
        .retry_max("1s")
}

/// Every connection in `ids` has at least `n` successful PATCHes within `within`.
async fn rotated_at_least(h: &Harness, ids: &[String], n: u64, within: Duration) -> bool {
    wait_until(within, || {
        ids.iter()
            .all(|id| h.sim.connection(id).is_some_and(|c| c.patches >= n))
    })
    .await
}

fn assert_no_panic(daemon: &DaemonProcess) {
    let stderr = daemon.stderr_text();
    assert!(!stderr.contains("panicked"), "a task panicked:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_hour_long_retry_after_on_one_connection_freezes_no_other() {
    let h = Harness::start(4, Duration::from_secs(12)).await;
    let ids = h.connection_ids();
    // The first request about connection 0 is told to come back in an hour
    // (a quota reset an hour away is a legal answer).
    h.sim.script_for(
        &ids[0],
        ScriptedFault::Status {
            status: 429,
            retry_after: Some(RetryAfter::Seconds(3600)),
            body: None,
        },
    );
    let config = h.config().rotation(fast()).write();
    let mut daemon = h.spawn(&config, &["run"]);
    // The others rotate on schedule, cycle after cycle (12 s credentials:
    // three rotations take about 20 s); the frozen daemon never rotated them.
    let others = &ids[1..];
    let rotated = rotated_at_least(&h, others, 3, Duration::from_secs(40)).await;
    assert!(
        rotated,
        "the others were held up; stderr:\n{}",
        daemon.stderr_text()
    );
    for id in others {
        let view = h.sim.connection(id).unwrap();
        assert!(
            view.expires_at.unwrap() > std::time::SystemTime::now(),
            "{id} holds expired credentials"
        );
    }
    // Connection 0 waits its own (capped) Retry-After: no retry within the test.
    assert_eq!(h.sim.connection(&ids[0]).unwrap().patches, 0);
    let throttled = daemon.events("rotation failed, retrying");
    assert!(
        throttled.iter().any(|e| e["status"] == "429"),
        "{throttled:?}"
    );
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_no_panic(&daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ims_expires_in_of_u64_max_neither_panics_nor_wedges() {
    let h = Harness::start_with(3, Duration::from_secs(12), |sim| {
        sim.ims_token_lifetime = Duration::from_secs(u64::MAX);
    })
    .await;
    let ids = h.connection_ids();
    let config = h.config().rotation(fast()).write();
    let mut daemon = h.spawn(&config, &["run"]);
    let rotated = rotated_at_least(&h, &ids, 3, Duration::from_secs(40)).await;
    assert!(
        rotated,
        "rotations stopped; stderr:\n{}",
        daemon.stderr_text()
    );
    // One token, cached (the huge lifetime is believed up to 48 h).
    assert_eq!(h.sim.stats().ims_tokens_issued, 1, "{:?}", h.sim.stats());
    let stats = h.sim.stats();
    assert_eq!(stats.expired_seconds, 0.0, "{stats:?}");
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_no_panic(&daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_patch_answered_204_with_an_etag_header_needs_no_get_next_time() {
    let h = Harness::start(2, Duration::from_secs(12)).await;
    let ids = h.connection_ids();
    // The first PATCH of each is applied but answered `204 No Content`, its
    // new etag only in an `ETag` header (not Flow Service's documented
    // body): the next rotation can PATCH with it, without reading first.
    for id in &ids {
        h.sim.script_for(id, ScriptedFault::EtagInHeader);
    }
    let config = h.config().rotation(fast()).write();
    let mut daemon = h.spawn(&config, &["run"]);
    let rotated = rotated_at_least(&h, &ids, 2, Duration::from_secs(30)).await;
    assert!(rotated, "stderr:\n{}", daemon.stderr_text());
    let stats = h.sim.stats();
    assert_eq!(stats.flow_gets, 0, "{stats:?}");
    assert_eq!(stats.violations, 0, "{stats:?}");
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_no_panic(&daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_whose_requests_hang_never_starve_the_healthy_ones() {
    // 20 s credentials; 16 of 18 connections get answers only after the
    // client has given up (3 s against a 1 s timeout), on every request.
    let h = Harness::start(18, Duration::from_secs(20)).await;
    let ids = h.connection_ids();
    let (healthy, hanging) = ids.split_at(2);
    for id in hanging {
        for _ in 0..200 {
            h.sim
                .script_for(id, ScriptedFault::Delay(Duration::from_secs(3)));
        }
    }
    // One Flow request at a time (4 jobs in flight), rotated 10 s before
    // expiry. The hanging connections always have retries overdue: served
    // by due time alone, a healthy rotation waited behind ~12 of them (a
    // second each) and its credentials ran out.
    let config = h
        .config()
        .rotation(
            Rotation::fast()
                .refresh_before("10s")
                .jitter("100ms")
                .concurrency(1)
                .retry_max("1s")
                .request_timeout("1s")
                .prepush_check(false),
        )
        .write();
    let mut daemon = h.spawn(&config, &["run"]);
    // The first pass is all first attempts, hanging ones included (about
    // 16 s); what is measured is the steady state after it.
    let started = rotated_at_least(&h, healthy, 2, Duration::from_secs(60)).await;
    assert!(
        started,
        "no second rotation; stderr:\n{}",
        daemon.stderr_text()
    );
    let expired_before = h.sim.stats().expired_seconds;
    let rotated = rotated_at_least(&h, healthy, 5, Duration::from_secs(60)).await;
    assert!(
        rotated,
        "the healthy connections were held up behind the hanging ones' retries: {:?}; stderr:\n{}",
        healthy
            .iter()
            .map(|id| h.sim.connection(id))
            .collect::<Vec<_>>(),
        daemon.stderr_text()
    );
    // Three more cycles without a moment of expired credentials on a
    // connection the daemon pushed to (only the healthy ones ever are).
    let stats = h.sim.stats();
    assert_eq!(stats.expired_seconds, expired_before, "{stats:?}");
    for id in hanging {
        assert_eq!(h.sim.connection(id).unwrap().patches, 0, "{id}");
    }
    // The hanging ones were still tried, again and again.
    let failed = daemon.events("rotation failed, retrying");
    assert!(failed.len() >= 32, "{} retries", failed.len());
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_no_panic(&daemon);
}
