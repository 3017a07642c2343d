// Black-box tests drive the real binaries in real time: they read the real clocks.
#![allow(clippy::disallowed_methods)]
//! High availability, black box (issue 12 §6): three replicas of the daemon
//! binary against the simulator and one DynamoDB (`moto_server`, through a
//! proxy the test can take down). The simulator's PATCH log says which
//! replica (IMS client) wrote what, so "one writer" is checked at the remote,
//! not from the daemons' own logs.
//!
//! Timings: lease 2 s, renewed every 500 ms. Bounds on takeover times are
//! generous (a loaded 2-core machine runs these in parallel); the measured
//! times are printed (`--no-capture`) and ownership and order are asserted.
//!
//! `scripts/test.sh` exports `AEP_S3_ROTATOR_MOTO_SERVER`; without it these
//! tests FAIL, never skip.

// Helpers outside #[test] functions may unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/ha.rs"]
mod ha;

use std::time::{Duration, SystemTime};

use common::{assert_no_secret, unix_ms, wait_until, wait_until_async};
use ha::{Cluster, Timings, log_time, secs_between};

/// How long a test waits for something that takes a second or two when the
/// machine is idle.
const PATIENCE: Duration = Duration::from_secs(30);

/// Who wrote, in PATCH order, collapsed into runs: `[("replica-2", 7), ...]`.
fn writer_runs(patches: &aep_s3_simulator::SimPatches) -> Vec<(String, usize)> {
    let mut runs: Vec<(String, usize)> = Vec::new();
    for p in &patches.accepted {
        match runs.last_mut() {
            Some((who, n)) if *who == p.client_id => *n += 1,
            _ => runs.push((p.client_id.clone(), 1)),
        }
    }
    runs
}

/// How long a new leader is watched for a re-push after it loaded the
/// shared state. No event says "nothing was re-pushed", so this is an
/// observation window: a scheduler ignoring the shared state dispatches
/// every connection in the turn that adopts it, and such a PATCH lands
/// within a second on this loopback setup; the window ends early, failing,
/// as soon as one does.
const REPUSH_WINDOW: Duration = Duration::from_secs(3);

/// Watches [`REPUSH_WINDOW`] for a PATCH beyond `before` on any of `ids`.
async fn assert_no_repush(c: &Cluster, ids: &[String], before: &[u64]) {
    let repushed = wait_until(REPUSH_WINDOW, || {
        ids.iter()
            .zip(before)
            .any(|(id, n)| c.h.sim.connection(id).is_some_and(|v| v.patches > *n))
    })
    .await;
    assert!(
        !repushed,
        "a connection was re-pushed on failover\n{}",
        c.all_logs()
    );
}

/// SIGSTOP the leader: a standby takes over after the lease, and writes;
/// SIGCONT the old leader: it never writes again while the other holds the
/// lease. Before the stop, one writer only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_is_replaced_and_never_writes_again() {
    let c = Cluster::start(3, Duration::from_secs(6), 3, Timings::FAST).await;
    let ids = c.h.connection_ids();
    let first = c.wait_for_leader(PATIENCE).await;
    // Every connection pushed at least once, then one more rotation each,
    // all by the leader.
    c.wait_patched(2, PATIENCE).await;
    let before = c.h.sim.patches();
    assert_eq!(before.writers(), [first.as_str()], "one writer only");
    assert_eq!(c.leaders_by_logs(), [first.as_str()]);
    for r in c.replicas.iter().filter(|r| r.name != first) {
        assert!(
            !r.process.events("standing by").is_empty(),
            "{} never said it stands by\n{}",
            r.name,
            r.process.stderr_text()
        );
    }

    let i = c.index_of(&first);
    let stopped_at = SystemTime::now();
    c.replicas[i].process.signal("STOP");
    let (second, became) = c
        .wait_leader_since(Some(&first), stopped_at, PATIENCE)
        .await;
    let took_over = log_time(&became);
    let takeover = secs_between(stopped_at, took_over);
    // It takes over once the record was unchanged for a full lease by its
    // own clock, looking every renew_every.
    let nominal = (c.timings.lease + c.timings.renew_every).as_secs_f64();
    println!("SIGSTOP takeover: {takeover:.3} s (nominal bound {nominal:.1} s)");
    assert!(
        takeover >= c.timings.lease.as_secs_f64() - 0.6,
        "took over after {takeover:.3} s, before the lease ran out by its own clock\n{}",
        c.all_logs()
    );
    assert!(takeover < nominal + 8.0, "takeover {takeover:.3} s");
    let previous = became["previous"].clone();
    assert_eq!(previous, first.as_str(), "{previous}");

    // The new leader writes (connections are due every ~2 s).
    assert!(
        wait_until(PATIENCE, || !c
            .h
            .sim
            .patches()
            .by_client(&second)
            .is_empty())
        .await,
        "the new leader never wrote\n{}",
        c.all_logs()
    );
    let first_write = c.h.sim.patches().by_client(&second)[0].at_unix_ms;
    println!(
        "SIGSTOP to the new leader's first PATCH: {:.3} s",
        (first_write.saturating_sub(unix_ms(stopped_at))) as f64 / 1000.0
    );

    // Wake the old leader: it must find its lease gone and never write.
    let resumed_at = SystemTime::now();
    c.replicas[i].process.signal("CONT");
    assert!(
        wait_until(PATIENCE, || !c.replicas[i]
            .process
            .events("lost leadership")
            .is_empty())
        .await,
        "the old leader never noticed it lost the lease\n{}",
        c.replicas[i].process.stderr_text()
    );
    // Let rotations happen for a few more seconds: every connection is due
    // at least once more, so a confused old leader would have had its chance.
    let mark = c.h.sim.patches().accepted.len();
    assert!(
        wait_until(PATIENCE, || {
            let p = c.h.sim.patches();
            ids.iter()
                .all(|id| p.accepted[mark..].iter().any(|x| x.connection == *id))
        })
        .await,
        "rotations did not continue after SIGCONT\n{}",
        c.all_logs()
    );
    let after = c.h.sim.patches();
    let runs = writer_runs(&after);
    println!(
        "writers in PATCH order: {runs:?}; refused: {:?}",
        after.rejected
    );
    // Exactly two terms at the remote: the first leader, then the second.
    assert_eq!(
        runs.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>(),
        [first.as_str(), second.as_str()],
        "{runs:?}"
    );
    let last_by_first = after.by_client(&first).last().unwrap().at_unix_ms;
    assert!(
        last_by_first <= unix_ms(resumed_at),
        "the old leader wrote after SIGCONT"
    );
    assert_eq!(c.leaders_by_logs(), [second.as_str()]);
    assert!(
        c.h.sim.violations().is_empty(),
        "{:?}",
        c.h.sim.violations()
    );
    println!(
        "expired seconds over the test: {:.3}",
        c.h.sim.stats().expired_seconds
    );
    assert_no_secret(&c.all_logs(), &c.secrets());
}

/// SIGTERM the leader: it drains, releases the lease ("released
/// leadership") and a standby takes over within about renew_every, without
/// re-pushing any connection whose credentials are still fresh. A healthy
/// standby is ready (`/readyz` 200, role standby).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_leader_hands_over_at_once_without_re_pushing() {
    // Credentials of an hour: after the first push nothing is due, so any
    // later PATCH is a re-push.
    let mut c = Cluster::start(4, Duration::from_secs(3600), 3, Timings::FAST).await;
    let ids = c.h.connection_ids();
    let first = c.wait_for_leader(PATIENCE).await;
    c.wait_patched(1, PATIENCE).await;
    // The leader's shared state reaches the table (written asynchronously).
    let leader_log = |c: &Cluster| c.replicas[c.index_of(&first)].process.stderr_text();
    let standby = c
        .replicas
        .iter()
        .find(|r| r.name != first)
        .unwrap()
        .name
        .clone();
    let admin = c.admin_addr(&standby).await;
    let mut readyz = (0, String::new());
    wait_until_async(Duration::from_secs(10), async || {
        if let Ok(response) = reqwest::get(format!("http://{admin}/readyz")).await {
            readyz = (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            );
        }
        readyz.0 == 200 && readyz.1.contains(&first)
    })
    .await;
    assert_eq!(readyz.0, 200, "standby /readyz: {}", readyz.1);
    let body: serde_json::Value = serde_json::from_str(&readyz.1).unwrap();
    assert_eq!(body["role"], "standby", "{body}");
    assert_eq!(body["leader"], first.as_str(), "{body}");
    assert_eq!(c.h.sim.patches().writers(), [first.as_str()]);

    let i = c.index_of(&first);
    let term_at = SystemTime::now();
    let status = c.replicas[i].process.terminate();
    assert!(status.success(), "{status:?}\n{}", leader_log(&c));
    let released = c.replicas[i].process.events("released leadership");
    assert_eq!(released.len(), 1, "{}", leader_log(&c));
    let released_at = log_time(&released[0]);

    let (second, became) = c.wait_leader_since(Some(&first), term_at, PATIENCE).await;
    let handover = secs_between(released_at, log_time(&became));
    println!(
        "SIGTERM: released {:.3} s after the signal, taken over {handover:.3} s after the release (renew_every {:?})",
        secs_between(term_at, released_at),
        c.timings.renew_every
    );
    // The release removes the item: a standby takes it at its next look,
    // without waiting for a lease to run out.
    assert!(
        handover < c.timings.lease.as_secs_f64(),
        "takeover {handover:.3} s after the release: it waited for the lease instead"
    );
    assert!(handover >= -0.05, "taken over before the release");

    // The new leader loads the shared state, and re-pushes nothing.
    let j = c.index_of(&second);
    assert!(
        wait_until(PATIENCE, || !c.replicas[j]
            .process
            .events("shared state loaded")
            .is_empty())
        .await,
        "{}",
        c.replicas[j].process.stderr_text()
    );
    let loaded = c.replicas[j].process.events("shared state loaded");
    assert_eq!(
        loaded.last().unwrap()["connections"],
        ids.len(),
        "the shared state holds every connection: {}",
        loaded.last().unwrap()
    );
    // It would re-push at once if it ignored the shared state.
    assert_no_repush(&c, &ids, &[1; 4]).await;
    for id in &ids {
        assert_eq!(
            c.h.sim.connection(id).unwrap().patches,
            1,
            "connection {id} was re-pushed on failover\n{}",
            c.all_logs()
        );
    }
    let patches = c.h.sim.patches();
    assert_eq!(
        patches.writers(),
        [first.as_str()],
        "{:?}",
        patches.accepted
    );
    assert_eq!(c.leaders_by_logs(), [second.as_str()]);
    assert!(
        c.h.sim.violations().is_empty(),
        "{:?}",
        c.h.sim.violations()
    );
    assert_no_secret(&c.all_logs(), &c.secrets());
}

/// DynamoDB unreachable for longer than the lease: the leader stops writing
/// when its fence closes (no PATCH lands once the lease could have expired
/// elsewhere), nobody takes over while it is down, and rotation resumes when
/// it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_replica_writes_while_dynamodb_is_down_and_rotation_resumes() {
    let c = Cluster::start(3, Duration::from_secs(6), 3, Timings::FAST).await;
    let ids = c.h.connection_ids();
    let first = c.wait_for_leader(PATIENCE).await;
    c.wait_patched(1, PATIENCE).await;

    let down_at = SystemTime::now();
    c.proxy.down();
    // Down until the leader has stood down, a standby would have taken over
    // an unrenewed lease (a lease and a look later), and every connection
    // is overdue by the credentials the simulator holds (6 s, refreshed
    // with 4 s left): a writer has had its chance on each. (A PATCH after
    // the fence would push the due time on, and the wait with it, and be
    // caught below.)
    let i = c.index_of(&first);
    let fence = down_at + c.timings.lease;
    let refresh_before = Duration::from_secs(4);
    let outage_over = wait_until(PATIENCE, || {
        let now = SystemTime::now();
        now > fence + c.timings.renew_every
            && c.replicas[i]
                .process
                .events("lost leadership")
                .iter()
                .any(|l| log_time(l) >= down_at)
            && ids.iter().all(|id| {
                c.h.sim
                    .connection(id)
                    .and_then(|v| v.expires_at)
                    .is_some_and(|e| e - refresh_before < now)
            })
    })
    .await;
    let up_at = SystemTime::now();
    let during = c.h.sim.patches();
    c.proxy.up();
    assert!(
        outage_over,
        "the outage never reached its end condition\n{}",
        c.all_logs()
    );

    let lost: Vec<_> = c.replicas[i]
        .process
        .events("lost leadership")
        .into_iter()
        .filter(|l| log_time(l) >= down_at)
        .collect();
    assert!(
        !lost.is_empty(),
        "the leader did not stand down while DynamoDB was down\n{}",
        c.replicas[i].process.stderr_text()
    );
    let stood_down = secs_between(down_at, log_time(&lost[0]));
    println!(
        "DynamoDB down: leader stood down {stood_down:.3} s after the outage began (lease - renew_every = {:?})",
        c.timings.lease - c.timings.renew_every
    );
    // Generous: a timer on a loaded machine wakes late; the PATCH log below
    // is the safety check.
    assert!(
        stood_down < c.timings.lease.as_secs_f64() + 2.0,
        "{stood_down:.3} s"
    );
    // The safety property: once the lease could have expired as seen by
    // another replica (a full lease after the last renewal, at the latest
    // the outage's start), no PATCH lands.
    let fence = unix_ms(down_at) + u64::try_from(c.timings.lease.as_millis()).unwrap();
    let late: Vec<_> = during
        .accepted
        .iter()
        .filter(|p| p.at_unix_ms > fence)
        .collect();
    assert!(late.is_empty(), "PATCHes while DynamoDB was down: {late:?}");
    let last = during.accepted.last().unwrap().at_unix_ms;
    println!(
        "last PATCH {:.3} s after the outage began",
        last as f64 / 1000.0 - unix_ms(down_at) as f64 / 1000.0
    );
    // Nobody became leader while it was down.
    for r in &c.replicas {
        let became: Vec<_> = r
            .process
            .events("became leader")
            .into_iter()
            .filter(|l| {
                let t = log_time(l);
                t > down_at && t < up_at
            })
            .collect();
        assert!(
            became.is_empty(),
            "{} became leader while DynamoDB was down",
            r.name
        );
    }

    // Back: a leader again, and every connection rotated after the outage.
    let (resumed, _) = c.wait_leader_since(None, up_at, PATIENCE).await;
    assert!(
        wait_until(PATIENCE, || {
            let p = c.h.sim.patches();
            ids.iter().all(|id| {
                p.on_connection(id)
                    .iter()
                    .any(|x| x.at_unix_ms >= unix_ms(up_at))
            })
        })
        .await,
        "rotation did not resume\n{}",
        c.all_logs()
    );
    let after = c.h.sim.patches();
    println!(
        "after the outage {resumed} leads; writers in order: {:?}; expired seconds: {:.3}",
        writer_runs(&after),
        c.h.sim.stats().expired_seconds
    );
    // One leader at a time at the remote: the writes after the outage come
    // in runs, one writer each, and each run's writer became leader after
    // the run before it ended and before its own first write. Usually one
    // run; on a loaded machine a renewal that comes late can end a term
    // and start another, which is still one leader at a time.
    let post: Vec<_> = after
        .accepted
        .iter()
        .filter(|p| p.at_unix_ms >= unix_ms(up_at))
        .collect();
    let mut previous_end: Option<u64> = None;
    for run in post.chunk_by(|a, b| a.client_id == b.client_id) {
        let (writer, start) = (&run[0].client_id, run[0].at_unix_ms);
        let began = c
            .became_leader_since(writer, up_at)
            .iter()
            .map(|l| unix_ms(log_time(l)))
            .any(|at| at <= start && previous_end.is_none_or(|end| at > end));
        assert!(
            began,
            "{writer} wrote at {start} without a term of its own after the previous writer's last write ({previous_end:?}); writers: {:?}\n{}",
            writer_runs(&after),
            c.all_logs()
        );
        previous_end = run.last().map(|p| p.at_unix_ms);
    }
    assert!(
        c.h.sim.violations().is_empty(),
        "{:?}",
        c.h.sim.violations()
    );
    assert_no_secret(&c.all_logs(), &c.secrets());
}

/// SIGKILL the leader (no release, no flush): once the shared state it
/// wrote is in the table, a standby takes over after the lease and re-pushes
/// no connection whose credentials are still fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_without_re_pushing_fresh_connections() {
    let mut c = Cluster::start(4, Duration::from_secs(3600), 3, Timings::FAST).await;
    let ids = c.h.connection_ids();
    let first = c.wait_for_leader(PATIENCE).await;
    c.wait_patched(1, PATIENCE).await;
    // What the simulator holds is what the table holds (the state writer
    // is asynchronous: wait for it, the way a crash after a flush would be).
    let pushed = |c: &Cluster| -> std::collections::BTreeMap<String, String> {
        ids.iter()
            .filter_map(|id| Some((id.clone(), c.h.sim.connection(id)?.access_key_id?)))
            .collect()
    };
    let (mut table, mut expected) = Default::default();
    let matched = wait_until_async(PATIENCE, async || {
        table = ha::shared_state_keys(&c.dynamo).await;
        expected = pushed(&c);
        table == expected
    })
    .await;
    assert!(
        matched,
        "the shared state never matched what was pushed: {table:?} vs {expected:?}; patches {:?}\n{}",
        c.h.sim.patches(),
        c.all_logs()
    );
    let patches_before: Vec<u64> = ids
        .iter()
        .map(|id| c.h.sim.connection(id).unwrap().patches)
        .collect();

    let i = c.index_of(&first);
    let killed_at = SystemTime::now();
    c.replicas[i].process.child.kill().unwrap();
    let _ = c.replicas[i].process.child.wait();
    let (second, became) = c.wait_leader_since(Some(&first), killed_at, PATIENCE).await;
    println!(
        "SIGKILL takeover: {:.3} s",
        secs_between(killed_at, log_time(&became))
    );
    let j = c.index_of(&second);
    assert!(
        wait_until(PATIENCE, || !c.replicas[j]
            .process
            .events("shared state loaded")
            .is_empty())
        .await,
        "{}",
        c.replicas[j].process.stderr_text()
    );
    assert_no_repush(&c, &ids, &patches_before).await;
    for (id, before) in ids.iter().zip(&patches_before) {
        assert_eq!(
            c.h.sim.connection(id).unwrap().patches,
            *before,
            "connection {id} was re-pushed on failover\n{}",
            c.all_logs()
        );
    }
    assert_eq!(c.h.sim.patches().writers(), [first.as_str()]);
    assert!(
        c.h.sim.violations().is_empty(),
        "{:?}",
        c.h.sim.violations()
    );
}

/// Issue 31: with `[coordination]` every replica re-listed every `every`, so
/// Flow Service's listing load grew with the replicas. Each replica lists
/// once at its start (its connections and their etags); after that only the
/// leader does, at one replica's pace.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_re_lists_so_three_replicas_list_as_often_as_one() {
    let rule = "[[discover]]\nsandboxes = [\"prod\"]\nname = \"*\"\nevery = \"1s\"\n";
    let c =
        Cluster::start_with_tables(2, Duration::from_secs(3600), 3, Timings::FAST, &[rule]).await;
    let leader = c.wait_for_leader(PATIENCE).await;
    let lists = |name: &str| {
        c.h.sim
            .lists_by_client()
            .get(name)
            .copied()
            .unwrap_or_default()
    };
    // Every replica's start listing is in.
    assert!(
        wait_until(PATIENCE, || c.replicas.iter().all(|r| lists(&r.name) >= 1)).await,
        "{:?}",
        c.h.sim.lists_by_client()
    );
    // And the leader has re-listed once since. On a loaded machine another
    // replica can hold the first lease for a moment and list as it takes
    // over (a leader's right); by now that listing is in, and the window
    // below sees only standbys.
    let settled = lists(&leader);
    assert!(
        wait_until(PATIENCE, || lists(&leader) > settled).await,
        "the leader does not re-list: {:?}",
        c.h.sim.lists_by_client()
    );
    let at_start = c.h.sim.lists_by_client();
    // The leader re-lists once a second: five of its rounds.
    let leader_before = lists(&leader);
    assert!(
        wait_until(PATIENCE, || lists(&leader) >= leader_before + 5).await,
        "the leader does not re-list: {:?}",
        c.h.sim.lists_by_client()
    );
    let after = c.h.sim.lists_by_client();
    assert_eq!(
        c.wait_for_leader(PATIENCE).await,
        leader,
        "the lease moved during the window; the standbys' counts say nothing\n{}",
        c.all_logs()
    );
    for standby in c.replicas.iter().filter(|r| r.name != leader) {
        assert_eq!(
            after.get(&standby.name),
            at_start.get(&standby.name),
            "standby {} re-listed: {after:?}\n{}",
            standby.name,
            c.all_logs()
        );
    }
}
