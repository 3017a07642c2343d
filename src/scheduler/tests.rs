//! The scheduler loop under paused time, with a scripted job runner: no
//! sockets, hours of schedule in milliseconds. Each test pins one of the
//! loop's promises (see the module doc of `daemon`).

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::remote::flow::FlowError;
use crate::rotation::{JobRunner, Rotator};

const S: fn(u64) -> Duration = Duration::from_secs;

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + S(1_700_000_000)
}

fn config_text(connections: usize, concurrency: usize, role: &str) -> String {
    let mut text = format!(
        r#"[adobe]
client_id = "cid"
client_secret = "not-a-real-secret"
org_id = "0123456789ABCDEF01234567@AdobeOrg"

[aws]
role_arn = "arn:aws:iam::123456789012:role/{role}"

[rotation]
session_duration = "1h"
refresh_before = "20m"
jitter = "0s"
concurrency = {concurrency}
"#
    );
    for i in 0..connections {
        text.push_str(&format!(
            "\n[[connections]]\nid = \"c{i}\"\nsandbox = \"prod\"\n"
        ));
    }
    text
}

fn config(connections: usize, concurrency: usize) -> Config {
    Config::from_toml_str(&config_text(connections, concurrency, "aep"), Vec::new()).unwrap()
}

type Behaviour = dyn Fn(&Job, SystemTime) -> (Duration, JobResult) + Send + Sync;

/// A job runner that answers from a script after a (paused-time) delay and
/// records every job: when it started, with which identity, and how many
/// jobs of one connection ran at once.
struct Scripted {
    clock: Clock,
    behaviour: Box<Behaviour>,
    log: Mutex<Log>,
}

#[derive(Debug, Default)]
struct Log {
    started: Vec<(String, SystemTime, StsRequest)>,
    running: HashMap<String, usize>,
    most_at_once_per_connection: usize,
    /// Each job's `known_etag`, in start order.
    known_etags: Vec<(String, Option<String>)>,
}

impl std::fmt::Debug for Scripted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scripted").finish_non_exhaustive()
    }
}

impl Scripted {
    fn new(
        clock: Clock,
        behaviour: impl Fn(&Job, SystemTime) -> (Duration, JobResult) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            clock,
            behaviour: Box::new(behaviour),
            log: Mutex::new(Log::default()),
        })
    }

    fn known_etags(&self) -> Vec<(String, Option<String>)> {
        self.log.lock().unwrap().known_etags.clone()
    }

    fn starts(&self, id: &str) -> Vec<SystemTime> {
        let log = self.log.lock().unwrap();
        log.started
            .iter()
            .filter(|(i, _, _)| i == id)
            .map(|(_, at, _)| *at)
            .collect()
    }
}

impl JobRunner for Scripted {
    fn run<'a>(&'a self, job: &'a Job, _cancel: &'a CancellationToken) -> BoxFuture<'a, JobResult> {
        Box::pin(async move {
            let now = self.clock.now();
            {
                let mut log = self.log.lock().unwrap();
                log.started.push((job.id.clone(), now, (*job.sts).clone()));
                log.known_etags
                    .push((job.id.clone(), job.known_etag.clone()));
                let running = log.running.entry(job.id.clone()).or_default();
                *running += 1;
                let running = *running;
                log.most_at_once_per_connection = log.most_at_once_per_connection.max(running);
            }
            let (delay, result) = (self.behaviour)(job, now);
            tokio::time::sleep(delay).await;
            *self
                .log
                .lock()
                .unwrap()
                .running
                .entry(job.id.clone())
                .or_default() -= 1;
            result
        })
    }
}

fn rotated(now: SystemTime, life: Duration) -> JobResult {
    JobResult::Rotated {
        access_key_id: "ASIATEST".to_owned(),
        expires_at: now + life,
        etag: Some("\"e\"".to_owned()),
        conflicts: 0,
        s3: None,
        verified: None,
    }
}

fn options(mode: Mode) -> Options {
    Options {
        mode,
        dry_run: false,
        only: Vec::new(),
        identity: SourceIdentity::DefaultChain,
        fence: None,
    }
}

fn scheduler(
    config: Config,
    mode: Mode,
    clock: Clock,
    runner: Arc<Scripted>,
    notifier: Notifier,
) -> Daemon {
    Daemon::new(Parts {
        config,
        options: options(mode),
        telemetry: Arc::new(Telemetry::new()),
        notifier,
        clock,
        runner: Runner::Fixed(runner),
        snapshots: None,
    })
}

/// Runs `daemon` for `length` of paused time, then stops it.
async fn run_for(daemon: Daemon, length: Duration) -> Report {
    let cancel = CancellationToken::new();
    let (_reloads_tx, reloads) = mpsc::channel(1);
    let task = tokio::spawn(daemon.run(cancel.clone(), reloads));
    tokio::time::sleep(length).await;
    cancel.cancel();
    task.await.unwrap().unwrap()
}

/// `run` over `config` with `runner`, for `length` of paused time.
async fn run_with(
    config: Config,
    clock: Clock,
    runner: &Arc<Scripted>,
    length: Duration,
) -> Report {
    run_for(
        scheduler(
            config,
            Mode::Run,
            clock,
            Arc::clone(runner),
            Notifier::default(),
        ),
        length,
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn an_hour_long_retry_after_on_one_connection_delays_no_other() {
    let clock = Clock::tokio_at(t0());
    let runner = Scripted::new(clock, |job, now| {
        if job.id == "c0" {
            let throttled = FlowError::Throttled {
                status: 429,
                retry_after: Some(S(3600)),
            };
            (
                S(1),
                JobResult::Failed {
                    error: RotationError::Flow(throttled),
                    etag: None,
                    conflicts: 0,
                    s3: None,
                },
            )
        } else {
            (S(1), rotated(now, S(3600)))
        }
    });
    let report = run_with(config(5, 8), clock, &runner, S(3 * 3600)).await;
    for id in ["c1", "c2", "c3", "c4"] {
        let starts = runner.starts(id);
        // Rotated at 0 and then every 40 min (1 h credentials, 20 min ahead).
        assert_eq!(starts.len(), 5, "{id}: {starts:?}");
        for pair in starts.windows(2) {
            let gap = pair[1].duration_since(pair[0]).unwrap();
            assert!(gap <= S(40 * 60 + 2), "{id} waited {gap:?}");
        }
    }
    // The throttled one is retried on its own schedule, within the cap:
    // nothing was ever pushed to it (the credentials there may be dead), so
    // the hour is cut to retry_max (2 min), not to the 15 min a connection
    // with a known expiry may wait.
    let throttled = runner.starts("c0");
    assert!(throttled.len() >= 80, "{throttled:?}");
    for pair in throttled.windows(2) {
        let gap = pair[1].duration_since(pair[0]).unwrap();
        assert!(gap <= S(2 * 60 + 2), "c0 waited {gap:?}");
    }
    assert!(
        report
            .connections
            .iter()
            .filter(|c| c.last_error.is_none())
            .count()
            == 4
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_job_is_rescheduled_and_wedges_nothing() {
    let clock = Clock::tokio_at(t0());
    let runner = Scripted::new(clock, |job, now| {
        assert!(job.id != "c0", "scripted panic in the job of c0");
        (S(1), rotated(now, S(3600)))
    });
    let report = run_with(config(3, 1), clock, &runner, S(3600)).await;
    assert!(
        runner.starts("c0").len() >= 5,
        "c0 must be retried: {:?}",
        runner.starts("c0")
    );
    for id in ["c1", "c2"] {
        assert_eq!(runner.starts(id).len(), 2, "{id}");
    }
    let c0 = report.connections.iter().find(|c| c.id() == "c0").unwrap();
    assert!(
        c0.last_error.as_deref().unwrap().contains("panicked"),
        "{c0:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backlog_larger_than_the_dispatch_limit_does_not_spin() {
    let clock = Clock::tokio_at(t0());
    let runner = Scripted::new(clock, |_, now| (S(1), rotated(now, S(3600))));
    // 200 connections, concurrency 1 (dispatch limit 4): a long backlog.
    let (_tx, reloads) = mpsc::channel(1);
    let daemon = scheduler(
        config(200, 1),
        Mode::Once,
        clock,
        Arc::clone(&runner),
        Notifier::default(),
    );
    let report = daemon.run(CancellationToken::new(), reloads).await.unwrap();
    let rotations: u64 = report
        .connections
        .iter()
        .map(|c| c.counters.successes)
        .sum();
    assert_eq!(rotations, 200);
    // A few turns per job (dispatch, completion); a spinning loop turns
    // thousands of times per job.
    assert!(
        report.loop_turns <= 3 * rotations,
        "{} loop turns for {rotations} rotations",
        report.loop_turns
    );
}

#[tokio::test(start_paused = true)]
async fn the_views_see_each_rotation_in_a_snapshot_and_an_idle_loop_does_not_turn() {
    let clock = Clock::tokio_at(t0());
    let runner = Scripted::new(clock, |_, now| (S(1), rotated(now, S(3600))));
    let (tx, mut snapshots) = crate::observe::status::snapshot_channel(S(1200));
    let daemon = Daemon::new(Parts {
        config: config(3, 8),
        options: options(Mode::Run),
        telemetry: Arc::new(Telemetry::new()),
        notifier: Notifier::default(),
        clock,
        runner: Runner::Fixed(Arc::clone(&runner) as Arc<dyn JobRunner>),
        snapshots: Some(tx),
    });
    let cancel = CancellationToken::new();
    let (_reloads_tx, reloads) = mpsc::channel(1);
    let task = tokio::spawn(daemon.run(cancel.clone(), reloads));
    // Before the first job ends: every connection, nothing pushed yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = snapshots.borrow_and_update().clone();
    assert_eq!(first.connections.len(), 3);
    assert!(first.connections.iter().all(|c| c.access_key_id.is_none()));
    // Once the jobs ended (1 s), each view carries its push and its count.
    tokio::time::sleep(S(1)).await;
    let rotated = snapshots.borrow_and_update().clone();
    for status in &rotated.connections {
        assert_eq!(
            status.access_key_id.as_deref(),
            Some("ASIATEST"),
            "{status:?}"
        );
        assert_eq!(status.counters.successes, 1, "{status:?}");
        assert!(status.next_rotation_at.is_some(), "{status:?}");
    }
    // Three hours: five rotations each, and the loop only turns for them
    // (a publish timer that kept firing would turn it endlessly).
    tokio::time::sleep(S(3 * 3600)).await;
    cancel.cancel();
    let report = task.await.unwrap().unwrap();
    let rotations: u64 = report
        .connections
        .iter()
        .map(|c| c.counters.successes)
        .sum();
    assert_eq!(rotations, 15);
    assert!(
        report.loop_turns <= 10 * rotations,
        "{} loop turns for {rotations} rotations",
        report.loop_turns
    );
    // The last snapshot says what the report says.
    let last = snapshots.borrow().clone();
    let published: u64 = last.connections.iter().map(|c| c.counters.successes).sum();
    assert_eq!(published, rotations);
}

/// A datagram socket standing in for systemd's `$NOTIFY_SOCKET`.
struct FakeSystemd {
    _dir: tempfile::TempDir,
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl FakeSystemd {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_nonblocking(true).unwrap();
        Self {
            _dir: dir,
            socket,
            path,
        }
    }

    fn notifier(&self, watchdog: Option<Duration>) -> Notifier {
        Notifier::with_socket(self.path.clone(), watchdog)
    }

    /// Sleeps `length` of paused time, draining the socket every 5 s (a
    /// datagram queue holds only a few messages); answers what arrived.
    async fn collect_for(&self, length: Duration) -> Vec<String> {
        let mut out = self.received();
        let mut slept = Duration::ZERO;
        while slept < length {
            tokio::time::sleep(S(5)).await;
            slept += S(5);
            out.extend(self.received());
        }
        out
    }

    /// Every message received so far.
    fn received(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }
}

#[tokio::test(start_paused = true)]
async fn ready_only_after_a_real_first_pass_even_with_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let expires = t0() + S(3600);
    let mut snapshot = StateSnapshot::default();
    for i in 0..2 {
        snapshot.connections.insert(
            format!("c{i}"),
            crate::coordination::local::PersistedConnection {
                sandbox: "prod".into(),
                etag: "\"e\"".into(),
                access_key_id: "ASIASAVED".into(),
                expires_at: expires,
                last_success_at: Some(t0()),
            },
        );
    }
    StateStore::new(state.clone()).save(&snapshot).unwrap();
    let mut config = config(2, 4);
    config.state.path = Some(state);
    let clock = Clock::tokio_at(t0());
    // The etag check after a restart is slow: 10 s.
    let runner = Scripted::new(clock, |_, _| {
        (
            S(10),
            JobResult::Unchanged {
                etag: "\"e\"".into(),
                s3: None,
            },
        )
    });
    let systemd = FakeSystemd::new();
    let daemon = scheduler(
        config,
        Mode::Run,
        clock,
        Arc::clone(&runner),
        systemd.notifier(None),
    );
    let cancel = CancellationToken::new();
    let (_tx, reloads) = mpsc::channel(1);
    let task = tokio::spawn(daemon.run(cancel.clone(), reloads));
    tokio::time::sleep(S(5)).await;
    assert!(
        !systemd.received().iter().any(|m| m.contains("READY=1")),
        "READY before the first pass finished"
    );
    tokio::time::sleep(S(10)).await;
    assert!(
        systemd.received().iter().any(|m| m.contains("READY=1")),
        "no READY after the first pass"
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn ready_waits_for_a_connection_a_reload_adds_during_the_first_pass() {
    let clock = Clock::tokio_at(t0());
    // c0 and c1 rotate at once, c2 takes 10 s, c3 (added) 30 s.
    let runner = Scripted::new(clock, |job, now| {
        let took = match job.id.as_str() {
            "c2" => S(10),
            "c3" => S(30),
            _ => S(1),
        };
        (took, rotated(now + took, S(3600)))
    });
    let systemd = FakeSystemd::new();
    let daemon = scheduler(
        config(3, 4),
        Mode::Run,
        clock,
        Arc::clone(&runner),
        systemd.notifier(None),
    );
    let cancel = CancellationToken::new();
    let (reload, reloads) = mpsc::channel(1);
    let task = tokio::spawn(daemon.run(cancel.clone(), reloads));
    // Every message so far (reading the socket drains it).
    let seen = std::cell::RefCell::new(Vec::<String>::new());
    let ready = || {
        seen.borrow_mut().extend(systemd.received());
        seen.borrow().iter().any(|m| m.contains("READY=1"))
    };
    // The loop has looked past c0 and c1 and waits on c2 when c3 comes.
    tokio::time::sleep(S(5)).await;
    assert!(!ready(), "READY before c2 rotated");
    reload.send(Reload::from(config(4, 4))).await.unwrap();
    tokio::time::sleep(S(15)).await;
    assert_eq!(runner.starts("c3").len(), 1, "the added connection started");
    assert!(!ready(), "READY while the added c3 had no outcome yet");
    tokio::time::sleep(S(25)).await;
    assert!(ready(), "no READY once every connection had rotated");
    assert!(
        !seen.borrow().iter().any(|m| m.contains("RELOADING=1")),
        "RELOADING=1 during the start, which systemd ignores: {:?}",
        seen.borrow()
    );
    // After the start a reload follows systemd's protocol: RELOADING=1,
    // then READY=1 once the new config is in force.
    reload.send(Reload::from(config(4, 4))).await.unwrap();
    tokio::time::sleep(S(1)).await;
    let after = systemd.received();
    let reloading = after.iter().position(|m| m.contains("RELOADING=1"));
    let ready_again = after.iter().rposition(|m| m.contains("READY=1"));
    assert!(
        reloading.is_some() && ready_again > reloading,
        "a reload after the start says RELOADING=1, then READY=1: {after:?}"
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn ready_in_a_dry_run() {
    let clock = Clock::tokio_at(t0());
    let runner = Scripted::new(clock, |_, now| {
        (
            S(1),
            JobResult::WouldRotate {
                access_key_id: "ASIADRY".into(),
                expires_at: now + S(3600),
                etag: "\"e\"".into(),
                s3: None,
            },
        )
    });
    let systemd = FakeSystemd::new();
    run_for(
        scheduler(
            config(2, 4),
            Mode::Run,
            clock,
            runner,
            systemd.notifier(None),
        ),
        S(5),
    )
    .await;
    assert!(systemd.received().iter().any(|m| m.contains("READY=1")));
}

#[tokio::test(start_paused = true)]
async fn the_watchdog_is_fed_only_while_the_loop_makes_progress() {
    let clock = Clock::tokio_at(t0());
    // Every job hangs for a day: all slots busy, the backlog overdue.
    let runner = Scripted::new(clock, |_, now| (S(86_400), rotated(now, S(3600))));
    let systemd = FakeSystemd::new();
    // WatchdogSec=60s: pings every 30 s.
    let notifier = systemd.notifier(Some(S(60)));
    let daemon = scheduler(config(10, 1), Mode::Run, clock, runner, notifier);
    let cancel = CancellationToken::new();
    let (_tx, reloads) = mpsc::channel(1);
    let task = tokio::spawn(daemon.run(cancel.clone(), reloads));
    let early = systemd
        .collect_for(S(5))
        .await
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    let later = systemd
        .collect_for(S(300))
        .await
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    // The first tick (right after dispatching) may ping; after that, with
    // no job completing and work overdue, no more pings.
    assert!(
        early <= 1 && later == 0,
        "pings: {early} early, {later} while wedged"
    );
    cancel.cancel();
    // The grace period abandons the hung jobs.
    task.await.unwrap().unwrap();

    // An idle daemon (everything fresh) keeps feeding it.
    let runner = Scripted::new(clock, |_, now| (S(1), rotated(now, S(3600))));
    let systemd = FakeSystemd::new();
    let daemon = scheduler(
        config(2, 4),
        Mode::Run,
        clock,
        runner,
        systemd.notifier(Some(S(60))),
    );
    let cancel = CancellationToken::new();
    let (_tx, reloads) = mpsc::channel(1);
    let task = tokio::spawn(daemon.run(cancel.clone(), reloads));
    let pings = systemd
        .collect_for(S(600))
        .await
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    cancel.cancel();
    task.await.unwrap().unwrap();
    assert!(
        pings >= 15,
        "idle daemon pinged only {pings} times in 10 min"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_changes_the_role_waits_for_the_slow_patch() {
    let clock = Clock::tokio_at(t0());
    // The first job (old role) is a slow PATCH: 30 s.
    let runner = Scripted::new(clock, |job, now| {
        let slow = job
            .sts
            .role_arn
            .as_ref()
            .is_some_and(|r| r.as_str().ends_with("/old"));
        (if slow { S(30) } else { S(1) }, rotated(now, S(3600)))
    });
    let old = Config::from_toml_str(&config_text(1, 4, "old"), Vec::new()).unwrap();
    let new = Config::from_toml_str(&config_text(1, 4, "new"), Vec::new()).unwrap();
    let daemon = scheduler(
        old,
        Mode::Run,
        clock,
        Arc::clone(&runner),
        Notifier::default(),
    );
    let cancel = CancellationToken::new();
    let (reload_tx, reloads) = mpsc::channel(1);
    let task = tokio::spawn(daemon.run(cancel.clone(), reloads));
    tokio::time::sleep(S(5)).await;
    reload_tx.send(new.into()).await.unwrap();
    tokio::time::sleep(S(60)).await;
    cancel.cancel();
    task.await.unwrap().unwrap();
    let log = runner.log.lock().unwrap();
    assert_eq!(
        log.most_at_once_per_connection, 1,
        "two jobs ran for one connection"
    );
    let roles: Vec<(u64, String)> = log
        .started
        .iter()
        .map(|(_, at, sts)| {
            (
                at.duration_since(t0()).unwrap().as_secs(),
                sts.role_arn
                    .as_ref()
                    .unwrap()
                    .as_str()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    // Old role at 0; the new role right after the slow PATCH ended (30 s),
    // not at the next scheduled rotation 40 min later.
    assert_eq!(roles, [(0, "old".to_owned()), (30, "new".to_owned())]);
}

#[tokio::test(start_paused = true)]
async fn only_the_leader_dispatches_and_a_new_term_adopts_the_shared_state() {
    use crate::coordination::{Fence, Leadership, Role, Store};
    use crate::persist::{SharedTable, memory::MemoryTable};
    let clock = Clock::tokio_at(t0());
    let runner = Scripted::new(clock, |_, now| (S(1), rotated(now, S(3600))));
    let systemd = FakeSystemd::new();
    let fence = Fence::new();
    let mut options = options(Mode::Run);
    options.fence = Some(fence.clone());
    let config = config(3, 4);
    let mut daemon = Daemon::new(Parts {
        config,
        options,
        telemetry: Arc::new(Telemetry::new()),
        notifier: systemd.notifier(None),
        clock,
        runner: Runner::Fixed(Arc::clone(&runner) as Arc<dyn JobRunner>),
        snapshots: None,
    });
    let (leadership_tx, leadership) = watch::channel(Leadership::starting());
    // The shared table's writer follows the daemon's snapshots, as `app` wires it.
    let table = Arc::new(MemoryTable::default());
    let stop_writer = CancellationToken::new();
    let writer = tokio::spawn(crate::persist::run(
        SharedTable::new(
            Arc::clone(&table) as Arc<dyn Store>,
            fence.clone(),
            "me".into(),
            leadership.clone(),
        ),
        daemon.snapshots(),
        StateSnapshot::default(),
        stop_writer.clone(),
    ));
    daemon.coordinate(leadership);
    let cancel = CancellationToken::new();
    let (_tx, reloads) = mpsc::channel(1);
    let task = tokio::spawn(daemon.run(cancel.clone(), reloads));

    // Starting, then a standby: everything is due, nothing is dispatched.
    tokio::time::sleep(S(5)).await;
    assert!(!systemd.received().iter().any(|m| m.contains("READY=1")));
    leadership_tx.send_modify(|l| {
        l.role = Role::Standby;
        l.leader = Some("other".into());
    });
    tokio::time::sleep(S(60)).await;
    assert!(
        runner.log.lock().unwrap().started.is_empty(),
        "a standby dispatched"
    );
    assert!(
        systemd
            .received()
            .iter()
            .any(|m| m.contains("READY=1") && m.contains("standby (leader: other)")),
        "a healthy standby is READY and says whose lease it is: {:?}",
        systemd.received()
    );

    // Leader, term 1: c0's shared credentials are good for an hour, so
    // only c1 and c2 are rotated.
    let now = clock.now();
    let mut view = StateSnapshot::default();
    view.connections.insert(
        "c0".into(),
        crate::coordination::local::PersistedConnection {
            sandbox: "prod".into(),
            etag: "\"shared\"".into(),
            access_key_id: "ASIASHARED".into(),
            expires_at: now + S(3600),
            last_success_at: Some(now),
        },
    );
    fence.open_until(crate::clock::mono_now() + S(24 * 3600));
    leadership_tx.send_modify(|l| {
        l.role = Role::Leader;
        l.leader = Some("me".into());
        l.term = 1;
        l.view = Some(Arc::new(view));
    });
    tokio::time::sleep(S(5)).await;
    assert!(
        runner.starts("c0").is_empty(),
        "a fresh shared record was re-pushed"
    );
    assert_eq!(runner.starts("c1").len(), 1);
    assert_eq!(runner.starts("c2").len(), 1);
    let mut shared = table.put_ids();
    shared.sort();
    assert_eq!(
        shared,
        ["c1", "c2"],
        "the leader shares what it pushed, and not the record it adopted"
    );

    // The fence closes (lost lease): nothing more is dispatched, even when
    // everything falls due.
    fence.close();
    tokio::time::sleep(S(3 * 3600)).await;
    assert_eq!(runner.starts("c0").len(), 0);
    assert_eq!(runner.starts("c1").len(), 1);
    cancel.cancel();
    let report = task.await.unwrap().unwrap();
    stop_writer.cancel();
    writer.await.unwrap();
    assert!(
        report.loop_turns < 100,
        "a closed fence made the loop spin: {} turns",
        report.loop_turns
    );
    assert_eq!(table.put_ids().len(), 2, "written after the fence closed");
}

/// The entry the queue gives at `at`, every entry current.
fn take(queue: &mut DueQueue<&'static str>, at: SystemTime) -> Option<&'static str> {
    queue.pop_due(at, |_, _| true)
}

#[test]
fn due_queue_serves_earliest_first_and_ties_in_queue_order() {
    let mut queue = DueQueue::default();
    // Ids in reverse order: a tie must not fall back to comparing them.
    queue.push(t0() + S(5), "a", false);
    queue.push(t0(), "z", false);
    queue.push(t0(), "m", false);
    queue.push(t0(), "b", false);
    assert_eq!(queue.earliest(), Some(t0()));
    let order: Vec<&str> = std::iter::from_fn(|| take(&mut queue, t0())).collect();
    assert_eq!(order, ["z", "m", "b"], "only what is due");
    assert_eq!(queue.earliest(), Some(t0() + S(5)));
    assert_eq!(take(&mut queue, t0() + S(5)), Some("a"));
    assert_eq!(queue.earliest(), None);
}

#[test]
fn due_queue_serves_due_rotations_before_due_retries() {
    let mut queue = DueQueue::default();
    queue.push(t0(), "retry-early", true);
    queue.push(t0() + S(10), "rotation", false);
    queue.push(t0() + S(20), "retry-late", true);
    // Only the retry is due: it goes.
    assert_eq!(queue.earliest(), Some(t0()));
    assert_eq!(take(&mut queue, t0() + S(5)), Some("retry-early"));
    // Both due: the rotation first, though the retry was queued earlier.
    queue.push(t0(), "retry-overdue", true);
    let now = t0() + S(30);
    let order: Vec<&str> = std::iter::from_fn(|| take(&mut queue, now)).collect();
    assert_eq!(order, ["rotation", "retry-overdue", "retry-late"]);
    // Stale entries are dropped from both tops.
    queue.push(t0(), "gone", false);
    queue.push(t0(), "gone-too", true);
    queue.push(t0() + S(1), "kept", true);
    queue.clean(|_, id| id == "kept");
    assert_eq!(queue.earliest(), Some(t0() + S(1)));
    // Taking what is due drops the stale entries it meets, in either heap.
    queue.push(t0(), "stale-rotation", false);
    queue.push(t0(), "stale-retry", true);
    let current = |_: SystemTime, id: &str| !id.starts_with("stale");
    assert_eq!(queue.pop_due(t0() + S(5), current), Some("kept"));
    assert!(queue.pop_due(t0() + S(5), current).is_none());
    assert_eq!(queue.earliest(), None, "the stale entries went on the way");
}

/// A running scheduler over `connections` connections whose connections
/// are held for the start's listing ([`Daemon::hold_until_listed`]).
struct Held {
    runner: Arc<Scripted>,
    intake: mpsc::UnboundedSender<Intake>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<Report>>,
}

fn start_held(connections: usize, concurrency: usize, notifier: Notifier) -> Held {
    let clock = Clock::tokio_at(t0());
    let runner = Scripted::new(clock, |_, now| (S(1), rotated(now, S(3600))));
    let mut daemon = scheduler(
        config(connections, concurrency),
        Mode::Run,
        clock,
        Arc::clone(&runner),
        notifier,
    );
    let (intake, rx) = mpsc::unbounded_channel();
    daemon.hold_until_listed(rx);
    let cancel = CancellationToken::new();
    let (_reloads_tx, reloads) = mpsc::channel(1);
    let task = tokio::spawn(daemon.run(cancel.clone(), reloads));
    Held {
        runner,
        intake,
        cancel,
        task,
    }
}

/// An `Intake::Found` with these etags (no target, nothing added).
fn found(etags: &[(&str, &str)]) -> Intake {
    Intake::Found {
        added: Vec::new(),
        etags: etags
            .iter()
            .map(|(id, etag)| ((*id).to_owned(), (*etag).to_owned()))
            .collect(),
        targets: HashMap::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_held_connection_waits_for_its_listed_etag_and_done_releases_the_rest() {
    let Held {
        runner,
        intake,
        cancel,
        task,
    } = start_held(3, 8, Notifier::default());
    // The listing takes a while: nothing is dispatched (no GET) meanwhile.
    tokio::time::sleep(S(30)).await;
    assert!(
        runner.known_etags().is_empty(),
        "{:?}",
        runner.known_etags()
    );

    intake.send(found(&[("c1", "\"listed-c1\"")])).unwrap();
    tokio::time::sleep(S(5)).await;
    assert_eq!(
        runner.known_etags(),
        [("c1".to_owned(), Some("\"listed-c1\"".to_owned()))],
        "only the listed one goes, with the listed etag"
    );

    // Later than their due time (but within MAX_HOLD): still released at once.
    tokio::time::sleep(S(20)).await;
    intake.send(Intake::Done).unwrap();
    tokio::time::sleep(S(5)).await;
    let mut etags = runner.known_etags();
    etags.sort();
    assert_eq!(
        etags,
        [
            ("c0".to_owned(), None),
            ("c1".to_owned(), Some("\"listed-c1\"".to_owned())),
            ("c2".to_owned(), None),
        ],
        "Done releases the rest, which read their own etag"
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn ready_waits_for_the_end_of_the_listing() {
    let systemd = FakeSystemd::new();
    let Held {
        runner,
        intake,
        cancel,
        task,
    } = start_held(2, 4, systemd.notifier(None));
    // Every connection known so far has rotated, but more pages may come.
    intake
        .send(found(&[("c0", "\"a\""), ("c1", "\"b\"")]))
        .unwrap();
    tokio::time::sleep(S(20)).await;
    assert_eq!(runner.known_etags().len(), 2);
    assert!(
        !systemd.received().iter().any(|m| m.contains("READY=1")),
        "READY before the listing was done"
    );
    intake.send(Intake::Done).unwrap();
    tokio::time::sleep(S(1)).await;
    assert!(
        systemd.received().iter().any(|m| m.contains("READY=1")),
        "no READY after Done"
    );
    assert_eq!(runner.known_etags().len(), 2, "Done released nothing new");
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_closed_intake_releases_every_held_connection() {
    let clock = Clock::tokio_at(t0());
    let runner = Scripted::new(clock, |_, now| (S(1), rotated(now, S(3600))));
    let systemd = FakeSystemd::new();
    let mut daemon = scheduler(
        config(3, 8),
        Mode::Run,
        clock,
        Arc::clone(&runner),
        systemd.notifier(None),
    );
    let (intake, rx) = mpsc::unbounded_channel();
    daemon.hold_until_listed(rx);
    // The listing task died without a word.
    drop(intake);
    run_for(daemon, S(10)).await;
    let mut etags = runner.known_etags();
    etags.sort();
    assert_eq!(
        etags,
        [
            ("c0".to_owned(), None),
            ("c1".to_owned(), None),
            ("c2".to_owned(), None)
        ]
    );
    assert!(systemd.received().iter().any(|m| m.contains("READY=1")));
}

#[tokio::test(start_paused = true)]
async fn a_connection_found_by_a_page_starts_with_its_etag_or_its_saved_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    // c3 rotated before the restart and its listed etag is the one left:
    // no request at all. c2 has no record: it rotates with the listed etag.
    let mut snapshot = StateSnapshot::default();
    snapshot.connections.insert(
        "c3".to_owned(),
        crate::coordination::local::PersistedConnection {
            sandbox: "prod".into(),
            etag: "\"left\"".into(),
            access_key_id: "ASIASAVED".into(),
            expires_at: t0() + S(3600),
            last_success_at: Some(t0()),
        },
    );
    StateStore::new(state.clone()).save(&snapshot).unwrap();
    let mut base = config(1, 4);
    base.state.path = Some(state);
    let later = config(4, 4);
    let clock = Clock::tokio_at(t0());
    let runner = Scripted::new(clock, |_, now| (S(1), rotated(now, S(3600))));
    let mut daemon = scheduler(
        base,
        Mode::Run,
        clock,
        Arc::clone(&runner),
        Notifier::default(),
    );
    let (intake, rx) = mpsc::unbounded_channel();
    daemon.hold_until_listed(rx);
    intake
        .send(Intake::Found {
            added: later.connections[2..].to_vec(),
            etags: HashMap::from([
                ("c2".to_owned(), "\"listed-c2\"".to_owned()),
                ("c3".to_owned(), "\"left\"".to_owned()),
            ]),
            targets: HashMap::new(),
        })
        .unwrap();
    intake.send(Intake::Done).unwrap();
    let report = run_for(daemon, S(10)).await;
    let mut etags = runner.known_etags();
    etags.sort();
    assert_eq!(
        etags,
        [
            ("c0".to_owned(), None),
            ("c2".to_owned(), Some("\"listed-c2\"".to_owned()))
        ]
    );
    let ids: Vec<&str> = report.connections.iter().map(|c| c.id()).collect();
    assert_eq!(ids, ["c0", "c2", "c3"], "added connections are reported");
    let c3 = report.connections.iter().find(|c| c.id() == "c3").unwrap();
    assert_eq!(c3.access_key_id.as_deref(), Some("ASIASAVED"));
}

#[tokio::test(start_paused = true)]
async fn a_slow_listing_holds_connections_at_most_max_hold() {
    let Held {
        runner,
        intake,
        cancel,
        task,
    } = start_held(2, 4, Notifier::default());
    tokio::time::sleep(MAX_HOLD - S(1)).await;
    assert!(runner.known_etags().is_empty(), "released before MAX_HOLD");
    tokio::time::sleep(S(2)).await;
    let mut etags = runner.known_etags();
    etags.sort();
    assert_eq!(
        etags,
        [("c0".to_owned(), None), ("c1".to_owned(), None)],
        "after MAX_HOLD the held connections read their own etag"
    );
    // The listing goes on: a page still adds what it finds, with its etag.
    let mut page = found(&[("c9", "\"listed-c9\"")]);
    if let Intake::Found { added, .. } = &mut page {
        let mut c9 = ConnectionConfig {
            id: "c9".to_owned(),
            ..(*config(1, 1).connections[0]).clone()
        };
        c9.name = "c9".to_owned();
        added.push(Arc::new(c9));
    }
    intake.send(page).unwrap();
    tokio::time::sleep(S(5)).await;
    assert!(
        runner
            .known_etags()
            .contains(&("c9".to_owned(), Some("\"listed-c9\"".to_owned()))),
        "{:?}",
        runner.known_etags()
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_held_connection_never_waits_into_its_credentials_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let mut snapshot = StateSnapshot::default();
    // c0's restored credentials expire in 40 s, c1's in an hour.
    for (id, expires_in) in [("c0", S(40)), ("c1", S(3600))] {
        snapshot.connections.insert(
            id.to_owned(),
            crate::coordination::local::PersistedConnection {
                sandbox: "prod".into(),
                etag: "\"e\"".into(),
                access_key_id: "ASIASAVED".into(),
                expires_at: t0() + expires_in,
                last_success_at: Some(t0()),
            },
        );
    }
    StateStore::new(state.clone()).save(&snapshot).unwrap();
    let mut config = config(2, 4);
    config.state.path = Some(state);
    let clock = Clock::tokio_at(t0());
    let runner = Scripted::new(clock, |_, now| (S(1), rotated(now, S(3600))));
    let mut daemon = scheduler(
        config,
        Mode::Run,
        clock,
        Arc::clone(&runner),
        Notifier::default(),
    );
    let (_intake, rx) = mpsc::unbounded_channel();
    daemon.hold_until_listed(rx);
    let cancel = CancellationToken::new();
    let (_reloads_tx, reloads) = mpsc::channel(1);
    let task = tokio::spawn(daemon.run(cancel.clone(), reloads));
    // The listing says nothing. c0 is held until EXPIRY_MARGIN before its
    // expiry (t0 + 10 s), not for all of MAX_HOLD.
    tokio::time::sleep(S(9)).await;
    assert!(
        runner.known_etags().is_empty(),
        "{:?}",
        runner.known_etags()
    );
    tokio::time::sleep(S(2)).await;
    assert_eq!(runner.known_etags(), [("c0".to_owned(), None)]);
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_slow_first_pass_asks_systemd_for_more_start_time_until_ready() {
    let clock = Clock::tokio_at(t0());
    // 30 connections, 4 jobs at a time (dispatch limit), 20 s each: a
    // 160 s first pass, longer than systemd's default 90 s start timeout.
    let runner = Scripted::new(clock, |_, now| (S(20), rotated(now, S(3600))));
    let systemd = FakeSystemd::new();
    let notifier = systemd.notifier(Some(S(60)));
    let daemon = scheduler(config(30, 1), Mode::Run, clock, runner, notifier);
    let cancel = CancellationToken::new();
    let (_tx, reloads) = mpsc::channel(1);
    let task = tokio::spawn(daemon.run(cancel.clone(), reloads));
    let during = systemd.collect_for(S(120)).await;
    let extends = |messages: &[String]| {
        messages
            .iter()
            .filter(|m| m.contains("EXTEND_TIMEOUT_USEC=90000000"))
            .count()
    };
    assert!(!during.iter().any(|m| m.contains("READY=1")));
    assert!(
        extends(&during) >= 3,
        "every ping of the first pass extends the start: {during:?}"
    );
    let after = systemd.collect_for(S(300)).await;
    assert!(after.iter().any(|m| m.contains("READY=1")));
    let ready_at = after.iter().position(|m| m.contains("READY=1")).unwrap();
    assert_eq!(
        extends(&after[ready_at..]),
        0,
        "no extension after READY: {after:?}"
    );
    assert!(after[ready_at..].iter().any(|m| m.contains("WATCHDOG=1")));
    cancel.cancel();
    task.await.unwrap().unwrap();
}

/// Builds the clients for `text` the way a reload does, from the running
/// `previous` ones when given. The region is set so that no AWS lookup
/// leaves the process.
async fn rotator_for(text: &str, previous: Option<(&Config, &Rotator)>) -> (Config, Rotator) {
    let text = text.replace("[aws]\n", "[aws]\nregion = \"eu-west-1\"\n");
    let config = Config::from_toml_str(&text, Vec::new()).unwrap();
    let telemetry = Arc::new(Telemetry::new());
    let rotator = build_rotator(&config, &options(Mode::Run), &telemetry, previous)
        .await
        .unwrap();
    (config, rotator)
}

#[tokio::test]
async fn a_reload_keeps_the_ims_token_sts_cache_and_gate_whose_settings_did_not_change() {
    let (base, old) = rotator_for(&config_text(2, 4, "a"), None).await;
    let kept = |new: &Rotator| {
        (
            Arc::ptr_eq(&new.ims, &old.ims),
            Arc::ptr_eq(&new.credentials, &old.credentials),
            Arc::ptr_eq(&new.flow.gate(), &old.flow.gate()),
        )
    };
    // Another connection and another role: connection settings only, so
    // the token, the STS answers (keyed by role) and a 429's pause stay.
    let (_, new) = rotator_for(&config_text(3, 4, "b"), Some((&base, &old))).await;
    assert_eq!(kept(&new), (true, true, true));
    // Another Adobe client: a new token, the rest kept.
    let other_client =
        config_text(2, 4, "a").replace("client_id = \"cid\"", "client_id = \"cid2\"");
    let (_, new) = rotator_for(&other_client, Some((&base, &old))).await;
    assert_eq!(kept(&new), (false, true, true));
    // Another client_secret_file holding the same secret: a new IMS client,
    // which re-reads the new file (not the old one) after `invalid_client`.
    let dir = tempfile::tempdir().unwrap();
    let with_file = |name: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, "not-a-real-secret").unwrap();
        config_text(2, 4, "a").replace(
            "client_secret = \"not-a-real-secret\"",
            &format!("client_secret_file = \"{}\"", file.display()),
        )
    };
    let (file_base, file_old) = rotator_for(&with_file("one"), None).await;
    let (_, moved) = rotator_for(&with_file("two"), Some((&file_base, &file_old))).await;
    assert!(
        !Arc::ptr_eq(&moved.ims, &file_old.ims),
        "the IMS client kept the old secret file"
    );
    let (_, same) = rotator_for(&with_file("one"), Some((&file_base, &file_old))).await;
    assert!(Arc::ptr_eq(&same.ims, &file_old.ims));
    // Another concurrency: a new gate, the rest kept.
    let (_, new) = rotator_for(&config_text(2, 8, "a"), Some((&base, &old))).await;
    assert_eq!(kept(&new), (true, true, false));
    // Another request timeout: a new HTTP client, so new IMS and STS
    // clients; the gate does not depend on it.
    let slower = config_text(2, 4, "a").replace(
        "concurrency = 4",
        "concurrency = 4\nrequest_timeout = \"45s\"",
    );
    let (_, new) = rotator_for(&slower, Some((&base, &old))).await;
    assert_eq!(kept(&new), (false, false, true));
    // No previous clients (the start): all new.
    let (_, new) = rotator_for(&config_text(2, 4, "a"), None).await;
    assert_eq!(kept(&new), (false, false, false));
}

#[tokio::test(start_paused = true)]
async fn connections_that_hang_then_fail_never_hold_back_the_others_rotations() {
    let clock = Clock::tokio_at(t0());
    // c0..c39 hang for 30 s and fail every time (a remote that times out);
    // c40 and c41 are healthy. One request at a time: 4 dispatch slots.
    let runner = Scripted::new(clock, |job, now| {
        let n: usize = job.id.trim_start_matches('c').parse().unwrap();
        if n < 40 {
            let failed = JobResult::Failed {
                error: RotationError::Flow(FlowError::Unavailable("timed out".into())),
                etag: None,
                conflicts: 0,
                s3: None,
            };
            (S(30), failed)
        } else {
            (S(1), rotated(now, S(3600)))
        }
    });
    run_with(config(42, 1), clock, &runner, S(3 * 3600)).await;
    for id in ["c40", "c41"] {
        let starts = runner.starts(id);
        assert!(starts.len() >= 5, "{id}: {starts:?}");
        // Due 40 min after each success (1 h credentials, 20 min ahead);
        // started at the first free slot, at most one hanging attempt
        // (30 s) later, not behind every retry that fell due before it.
        for pair in starts.windows(2) {
            let gap = pair[1].duration_since(pair[0]).unwrap();
            assert!(gap <= S(40 * 60 + 31), "{id} waited {gap:?}");
        }
    }
    // The hanging ones are still tried, on every slot left over.
    assert!(runner.starts("c0").len() >= 20, "{:?}", runner.starts("c0"));
}

/// A job's IMS failure during an outage: `c0`'s request is the real one,
/// every other job is given its shared answer.
fn ims_down(job: &Job) -> JobResult {
    let real = crate::remote::ims::ImsError::Unavailable("connection refused".to_owned());
    let error = if job.id == "c0" {
        real
    } else {
        crate::remote::ims::ImsError::Shared(Box::new(real))
    };
    JobResult::Failed {
        error: RotationError::Ims(error),
        etag: None,
        conflicts: 0,
        s3: None,
    }
}

/// Jobs of 10 ms that meet an IMS outage (c0 first) until `recovery`,
/// then rotate for an hour.
fn ims_down_until(clock: Clock, recovery: SystemTime) -> Arc<Scripted> {
    Scripted::new(clock, move |job, now| {
        if now < recovery {
            (Duration::from_millis(10), ims_down(job))
        } else {
            (Duration::from_millis(10), rotated(now, S(3600)))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn connections_given_a_shared_failure_park_until_the_prober_gets_through() {
    // Issue 31: during an IMS outage every connection ran its own backoff
    // (each attempt answered from the one failed request); 10,000 made
    // ~47,000 attempts in ten seconds.
    let clock = Clock::tokio_at(t0());
    let recovery = t0() + S(30);
    let runner = ims_down_until(clock, recovery);
    // Long enough for the prober's first attempt after the recovery
    // whatever its full-jitter backoff draws (at most retry_max, 2 min,
    // after its last attempt in the outage).
    run_with(config(10, 4), clock, &runner, S(200)).await;
    // The prober (c0) retries on its own backoff: its attempts are the
    // outage's only requests.
    let probes: Vec<SystemTime> = runner
        .starts("c0")
        .into_iter()
        .filter(|at| *at < recovery)
        .collect();
    assert!(probes.len() >= 4, "{probes:?}");
    let through = runner
        .starts("c0")
        .into_iter()
        .find(|at| *at >= recovery)
        .expect("c0 rotates after the outage");
    for i in 1..10 {
        let id = format!("c{i}");
        let starts = runner.starts(&id);
        let during: Vec<_> = starts.iter().filter(|at| **at < recovery).collect();
        assert_eq!(during.len(), 1, "{id} retried on its own: {starts:?}");
        // Released the moment the prober got through (or, if its backoff
        // drew long, at the parked connection's own bound, retry_max:
        // whichever comes first), not on a backoff of its own.
        let after = starts.iter().find(|at| **at >= recovery).expect("rotated");
        assert!(
            *after <= through + S(1),
            "{id} released at {after:?}, the prober got through at {through:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_parked_connection_goes_before_its_credentials_expire() {
    // Pushed credentials live 100 s: rotated at half their life (50 s),
    // when IMS is down for good. Parking may not hold a connection past
    // EXPIRY_MARGIN before that expiry.
    let clock = Clock::tokio_at(t0());
    let outage = t0() + S(40);
    let runner = Scripted::new(clock, move |job, now| {
        if now < outage {
            (Duration::from_millis(10), rotated(now, S(100)))
        } else {
            (Duration::from_millis(10), ims_down(job))
        }
    });
    run_with(config(3, 4), clock, &runner, S(90)).await;
    for id in ["c1", "c2"] {
        let starts = runner.starts(id);
        let during: Vec<SystemTime> = starts.iter().copied().filter(|at| *at >= outage).collect();
        // Parked after its first failure (about 50 s), out again at
        // expiry (100 s) - EXPIRY_MARGIN (30 s) = 70 s at the latest.
        assert!(during.len() >= 2, "{id}: {starts:?}");
        let expiry_bound = t0() + S(100) - crate::policy::schedule::EXPIRY_MARGIN;
        assert!(
            during[1] <= expiry_bound + S(1),
            "{id} held past its expiry bound: {starts:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_due_while_its_dependency_is_down_parks_without_a_job() {
    // Concurrency 1 (4 jobs at once): c0 meets the outage first and probes;
    // the connections that come due after it park without running a job.
    let clock = Clock::tokio_at(t0());
    let recovery = t0() + S(30);
    let runner = ims_down_until(clock, recovery);
    // The prober's backoff is jittered; a retry_max of 8 s puts its first
    // attempt after the recovery inside the run whatever the draw.
    let text = config_text(40, 1, "aep")
        .replace("concurrency = 1\n", "concurrency = 1\nretry_max = \"8s\"\n");
    let config = Config::from_toml_str(&text, Vec::new()).unwrap();
    run_with(config, clock, &runner, S(60)).await;
    let untried = (1..40)
        .filter(|i| {
            runner
                .starts(&format!("c{i}"))
                .iter()
                .all(|at| *at >= recovery)
        })
        .count();
    // Only the first dispatch slots' worth ran before c0 was the prober.
    assert!(
        untried >= 30,
        "{untried} of 39 ran no job during the outage"
    );
    for i in 0..40 {
        assert!(
            runner
                .starts(&format!("c{i}"))
                .iter()
                .any(|at| *at >= recovery),
            "c{i} did not rotate after the outage: {:?}",
            runner.starts(&format!("c{i}"))
        );
    }
}
