//! Legal but unusual answers from the remotes, black box: the release-like
//! binary against the strict simulator. Each test pins a bug of the first
//! scheduler: one throttled connection froze every other one, and an IMS
//! `expires_in` of `u64::MAX` panicked a job and wedged the daemon.
//!
//! The scheduling rules themselves are pinned on paused time in
//! `src/scheduler/tests.rs` (an hour-long `Retry-After`, hanging
//! connections, a panicking job); these are the wall-clock smoke tests of
//! the same paths through the real binary, HTTP and request gate.

// Black-box tests drive the real binary in real time: they read the real clocks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use aep_s3_simulator::{RetryAfter, ScriptedFault};
use common::*;

/// Simulator credentials of 4 s rotated with 2 s left ([`Rotation::fast`]):
/// a rotation about every 2 s, so three cycles take about five seconds.
const LIFETIME: Duration = Duration::from_secs(4);

/// [`Rotation::fast`] with retries capped at 1 s.
fn rotation() -> Rotation {
    Rotation::fast().retry_max("1s").jitter("100ms")
}

fn assert_no_panic(daemon: &DaemonProcess) {
    let stderr = daemon.stderr_text();
    assert!(!stderr.contains("panicked"), "a task panicked:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_hour_long_retry_after_on_one_connection_freezes_no_other() {
    let h = Harness::start(4, LIFETIME).await;
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
    let config = h.config().rotation(rotation()).write();
    let mut daemon = h.spawn(&config, &["run"]);
    // The others rotate on schedule, cycle after cycle (4 s credentials:
    // three rotations take about 5 s); the frozen daemon never rotated them.
    let others = &ids[1..];
    let rotated = h.rotated_at_least(others, 3, Duration::from_secs(30)).await;
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
    let h = Harness::start_with(3, LIFETIME, |sim| {
        sim.ims_token_lifetime = Duration::from_secs(u64::MAX);
    })
    .await;
    let ids = h.connection_ids();
    let config = h.config().rotation(rotation()).write();
    let mut daemon = h.spawn(&config, &["run"]);
    let rotated = h.rotated_at_least(&ids, 3, Duration::from_secs(30)).await;
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
    let h = Harness::start(2, LIFETIME).await;
    let ids = h.connection_ids();
    // The first PATCH of each is applied but answered `204 No Content`, its
    // new etag only in an `ETag` header (not Flow Service's documented
    // body): the next rotation can PATCH with it, without reading first.
    for id in &ids {
        h.sim.script_for(id, ScriptedFault::EtagInHeader);
    }
    let config = h.config().rotation(rotation()).write();
    let mut daemon = h.spawn(&config, &["run"]);
    let rotated = h.rotated_at_least(&ids, 2, Duration::from_secs(30)).await;
    assert!(rotated, "stderr:\n{}", daemon.stderr_text());
    let stats = h.sim.stats();
    assert_eq!(stats.flow_gets, 0, "{stats:?}");
    assert_eq!(stats.violations, 0, "{stats:?}");
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_no_panic(&daemon);
}
