#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The lease protocol with paused time and an in-memory table: several
//! electors share one [`Table`], each through its own [`View`] whose link
//! can be cut. The property every test checks at every step: never two
//! open fences at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::*;

const LEASE: Duration = Duration::from_secs(3);
const RENEW: Duration = Duration::from_secs(1);
const STEP: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
struct Table {
    lease: Mutex<Option<LeaseRecord>>,
    state: Mutex<BTreeMap<String, PersistedConnection>>,
}

/// One replica's link to the table.
#[derive(Debug)]
struct View {
    table: Arc<Table>,
    down: AtomicBool,
    /// `write_state` answers this many items of each batch as unprocessed, once.
    unprocessed_once: AtomicUsize,
    calls: AtomicUsize,
}

impl View {
    fn new(table: &Arc<Table>) -> Arc<Self> {
        Arc::new(Self {
            table: Arc::clone(table),
            down: AtomicBool::new(false),
            unprocessed_once: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        })
    }

    fn check(&self) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("connection failed".to_owned()))
        } else {
            Ok(())
        }
    }
}

impl Store for View {
    fn read_lease(&self) -> BoxFuture<'_, Result<Option<LeaseRecord>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            Ok(self.table.lease.lock().unwrap().clone())
        })
    }

    fn write_lease<'a>(
        &'a self,
        record: &'a LeaseRecord,
        expect: &'a Expect,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.check()?;
            let mut lease = self.table.lease.lock().unwrap();
            let holds = match (expect, lease.as_ref()) {
                (Expect::Absent, None) => true,
                (Expect::Rvn(rvn), Some(current)) => current.rvn == *rvn,
                _ => false,
            };
            if !holds {
                return Err(StoreError::Conflict);
            }
            *lease = Some(record.clone());
            Ok(())
        })
    }

    fn delete_lease<'a>(&'a self, rvn: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.check()?;
            let mut lease = self.table.lease.lock().unwrap();
            if lease.as_ref().is_some_and(|l| l.rvn == rvn) {
                *lease = None;
                Ok(())
            } else {
                Err(StoreError::Conflict)
            }
        })
    }

    fn load_state(&self) -> BoxFuture<'_, Result<StateSnapshot, StoreError>> {
        Box::pin(async move {
            self.check()?;
            Ok(StateSnapshot {
                connections: self.table.state.lock().unwrap().clone(),
            })
        })
    }

    fn write_state<'a>(
        &'a self,
        items: &'a [(String, Option<PersistedConnection>)],
        _holder: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            let skip = self.unprocessed_once.swap(0, Ordering::SeqCst);
            Ok(crate::persist::memory::apply(
                &mut self.table.state.lock().unwrap(),
                items,
                skip,
            ))
        })
    }
}

struct Replica {
    view: Arc<View>,
    rx: watch::Receiver<Leadership>,
    fence: Fence,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn replica(table: &Arc<Table>, name: &str) -> Replica {
    let view = View::new(table);
    let telemetry = Arc::new(Telemetry::new());
    let (elector, rx, fence) = Elector::new(
        Arc::clone(&view) as Arc<dyn Store>,
        name.to_owned(),
        LEASE,
        RENEW,
        telemetry,
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(elector.run(stop.clone()));
    Replica {
        view,
        rx,
        fence,
        stop,
        task,
    }
}

fn role(r: &Replica) -> Role {
    r.rx.borrow().role
}

/// Advances time in small steps until `done`, checking at every step that
/// no two fences are open; answers the time it took.
async fn run_until(replicas: &[&Replica], limit: Duration, done: impl Fn() -> bool) -> Duration {
    let start = mono_now();
    while !done() {
        let open = replicas.iter().filter(|r| r.fence.is_open()).count();
        assert!(
            open <= 1,
            "two writers at once after {:?}",
            mono_now() - start
        );
        assert!(mono_now() - start <= limit, "not done within {limit:?}");
        tokio::time::sleep(STEP).await;
    }
    mono_now() - start
}

/// Lets `time` pass, checking at every step that no two fences are open.
async fn hold(replicas: &[&Replica], time: Duration) {
    let end = mono_now() + time;
    while mono_now() < end {
        let open = replicas.iter().filter(|r| r.fence.is_open()).count();
        assert!(open <= 1, "two writers at once");
        tokio::time::sleep(STEP).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_lone_replica_takes_an_absent_lease_at_once_and_keeps_it() {
    let table = Arc::new(Table::default());
    let a = replica(&table, "a");
    let took = run_until(&[&a], LEASE, || role(&a) == Role::Leader).await;
    assert!(
        took <= STEP,
        "an absent lease is taken at the first look: {took:?}"
    );
    assert!(a.fence.is_open());
    assert_eq!(a.rx.borrow().term, 1);
    let first = table.lease.lock().unwrap().clone().unwrap();
    tokio::time::sleep(LEASE * 5).await;
    assert_eq!(role(&a), Role::Leader);
    assert!(a.fence.is_open(), "renewals keep the fence open");
    let now = table.lease.lock().unwrap().clone().unwrap();
    assert_eq!(now.holder, "a");
    assert_ne!(now.rvn, first.rvn, "every renewal writes a new version");
    assert_eq!(a.rx.borrow().term, 1, "renewals are not new terms");
}

#[tokio::test(start_paused = true)]
async fn a_standby_takes_over_a_dead_leader_only_after_a_full_lease() {
    let table = Arc::new(Table::default());
    let a = replica(&table, "a");
    run_until(&[&a], LEASE, || role(&a) == Role::Leader).await;
    let b = replica(&table, "b");
    run_until(&[&a, &b], LEASE, || role(&b) == Role::Standby).await;
    assert_eq!(b.rx.borrow().leader.as_deref(), Some("a"));
    // Healthy leader: the standby never takes over.
    tokio::time::sleep(LEASE * 4).await;
    assert_eq!(role(&b), Role::Standby);
    // The leader dies without a word (SIGKILL): no release.
    a.task.abort();
    let took = run_until(&[&a, &b], LEASE * 3, || role(&b) == Role::Leader).await;
    assert!(
        took >= LEASE - RENEW && took <= LEASE + RENEW + STEP,
        "takeover after {took:?}, expected within lease ± renew_every"
    );
    assert!(
        !a.fence.is_open(),
        "the dead leader's fence had closed before"
    );
    assert_eq!(table.lease.lock().unwrap().as_ref().unwrap().holder, "b");
}

#[tokio::test(start_paused = true)]
async fn a_stale_item_claiming_a_long_lease_waits_no_longer_than_ours() {
    // Issue 26 #10: an item saying 10 minutes (the read clamp) delayed
    // takeover by 10 minutes whatever the configured lease.
    let table = Arc::new(Table::default());
    *table.lease.lock().unwrap() = Some(LeaseRecord {
        holder: "gone".to_owned(),
        rvn: "stale".to_owned(),
        lease: Duration::from_secs(600),
    });
    let b = replica(&table, "b");
    let took = run_until(&[&b], LEASE * 3, || role(&b) == Role::Leader).await;
    assert!(took <= LEASE + RENEW + STEP, "takeover after {took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_stops_writing_before_a_standby_starts() {
    let table = Arc::new(Table::default());
    let a = replica(&table, "a");
    run_until(&[&a], LEASE, || role(&a) == Role::Leader).await;
    let b = replica(&table, "b");
    run_until(&[&a, &b], LEASE, || role(&b) == Role::Standby).await;
    // Only the leader loses the table (a network partition).
    a.view.down.store(true, Ordering::SeqCst);
    let lost = run_until(&[&a, &b], LEASE * 2, || role(&a) == Role::Standby).await;
    assert!(!a.fence.is_open());
    assert!(lost <= LEASE - RENEW + STEP, "fence closed after {lost:?}");
    run_until(&[&a, &b], LEASE * 3, || role(&b) == Role::Leader).await;
    // The old leader comes back: it stays a standby under the new one.
    a.view.down.store(false, Ordering::SeqCst);
    hold(&[&a, &b], LEASE * 3).await;
    assert_eq!(role(&a), Role::Standby);
    assert_eq!(a.rx.borrow().leader.as_deref(), Some("b"));
    assert_eq!(role(&b), Role::Leader);
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_within_one_renewal() {
    let table = Arc::new(Table::default());
    let a = replica(&table, "a");
    run_until(&[&a], LEASE, || role(&a) == Role::Leader).await;
    let b = replica(&table, "b");
    run_until(&[&a, &b], LEASE, || role(&b) == Role::Standby).await;
    a.stop.cancel();
    let took = run_until(&[&a, &b], LEASE * 2, || role(&b) == Role::Leader).await;
    assert!(
        took <= RENEW + STEP,
        "takeover after a release took {took:?}"
    );
    assert!(!a.fence.is_open());
}

#[tokio::test(start_paused = true)]
async fn the_table_down_for_longer_than_the_lease_stops_every_writer_then_one_resumes() {
    let table = Arc::new(Table::default());
    let a = replica(&table, "a");
    run_until(&[&a], LEASE, || role(&a) == Role::Leader).await;
    let b = replica(&table, "b");
    let c = replica(&table, "c");
    run_until(&[&a, &b, &c], LEASE, || {
        role(&b) == Role::Standby && role(&c) == Role::Standby
    })
    .await;
    for r in [&a, &b, &c] {
        r.view.down.store(true, Ordering::SeqCst);
    }
    run_until(&[&a, &b, &c], LEASE * 2, || !a.fence.is_open()).await;
    tokio::time::sleep(LEASE * 2).await;
    assert!([&a, &b, &c].iter().all(|r| !r.fence.is_open()));
    assert!([&a, &b, &c].iter().all(|r| r.rx.borrow().trouble.is_some()));
    for r in [&a, &b, &c] {
        r.view.down.store(false, Ordering::SeqCst);
    }
    run_until(&[&a, &b, &c], LEASE * 3, || {
        [&a, &b, &c]
            .iter()
            .filter(|r| role(r) == Role::Leader)
            .count()
            == 1
    })
    .await;
    // And it stays that way.
    hold(&[&a, &b, &c], LEASE * 3).await;
    assert_eq!(
        [&a, &b, &c]
            .iter()
            .filter(|r| role(r) == Role::Leader)
            .count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_renewal_that_finds_another_version_loses_at_once() {
    let table = Arc::new(Table::default());
    let a = replica(&table, "a");
    run_until(&[&a], LEASE, || role(&a) == Role::Leader).await;
    *table.lease.lock().unwrap() = Some(LeaseRecord {
        holder: "intruder".to_owned(),
        rvn: "other".to_owned(),
        lease: LEASE,
    });
    let lost = run_until(&[&a], LEASE, || role(&a) == Role::Standby).await;
    assert!(lost <= RENEW + STEP);
    assert!(!a.fence.is_open());
}
