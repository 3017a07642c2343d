#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The generic writer with a fake target on paused time, and the two real
//! targets: the shared table over an in-memory [`MemoryTable`], the state
//! file in a temporary directory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::memory::MemoryTable;
use super::*;
use crate::coordination::local::StateStore;
use crate::coordination::{Fence, Leadership, Role, Store};
use crate::observe::status::ConnectionStatus;

const S: fn(u64) -> Duration = Duration::from_secs;

/// A view of connection `id` whose record is `n` (`None`: nothing pushed).
fn view(id: &str, n: Option<u64>) -> Arc<ConnectionStatus> {
    let mut status = ConnectionStatus::named(id, id, "prod");
    if let Some(n) = n {
        let record = record(n);
        status.etag = Some(record.etag);
        status.access_key_id = Some(record.access_key_id);
        status.expires_at = Some(record.expires_at);
    }
    Arc::new(status)
}

fn record(n: u64) -> PersistedConnection {
    PersistedConnection {
        sandbox: "prod".to_owned(),
        etag: format!("\"e{n}\""),
        access_key_id: format!("ASIA{n:016}"),
        expires_at: UNIX_EPOCH + S(2_000_000_000 + n),
        last_success_at: None,
    }
}

fn snapshot(views: &[&Arc<ConnectionStatus>], term: u64) -> Arc<Snapshot> {
    Arc::new(Snapshot {
        connections: views.iter().map(|v| Arc::clone(v)).collect(),
        term,
        ..Snapshot::default()
    })
}

/// What a fake target was handed, and when.
type Log = Arc<Mutex<Vec<(Duration, Vec<Change>)>>>;

/// A target that records each write; fails the next `fail` writes; answers
/// the gate it is told.
#[derive(Clone)]
struct Fake {
    start: Instant,
    log: Log,
    fail: Arc<AtomicUsize>,
    gate: Arc<Mutex<Gate>>,
}

impl Fake {
    fn new() -> Self {
        Self {
            start: crate::clock::mono_now(),
            log: Log::default(),
            fail: Arc::default(),
            gate: Arc::new(Mutex::new(Gate::Write)),
        }
    }

    /// Every write so far: when (whole seconds since the start) and the ids
    /// it changed (`-id`: deleted).
    fn writes(&self) -> Vec<(u64, Vec<String>)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(at, changes)| {
                let ids = changes
                    .iter()
                    .map(|(id, r)| match r {
                        Some(_) => id.clone(),
                        None => format!("-{id}"),
                    })
                    .collect();
                (at.as_secs(), ids)
            })
            .collect()
    }
}

impl StateTarget for Fake {
    const NAME: &'static str = "fake";
    const PACE: Duration = Duration::from_secs(1);
    const BATCH: usize = 2;
    const WHOLE: bool = false;
    const FLUSH: Duration = Duration::from_secs(3);

    /// A `Begin` is answered once, then `Write`.
    fn gate(&mut self, _snapshot: &Snapshot) -> Gate {
        let mut gate = self.gate.lock().unwrap();
        let answer = gate.clone();
        if matches!(answer, Gate::Begin(_)) {
            *gate = Gate::Write;
        }
        answer
    }

    fn write<'a>(
        &'a mut self,
        changes: &'a [Change],
        _all: &'a StateSnapshot,
    ) -> BoxFuture<'a, Result<Vec<String>, String>> {
        self.log
            .lock()
            .unwrap()
            .push((self.start.elapsed(), changes.to_vec()));
        let failed = self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        Box::pin(async move {
            if failed {
                Err("disk full".to_owned())
            } else {
                Ok(Vec::new())
            }
        })
    }
}

/// A writer following a fresh channel into `target`.
fn start<T: StateTarget>(
    target: T,
    baseline: StateSnapshot,
) -> (
    watch::Sender<Arc<Snapshot>>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(target, rx, baseline, stop.clone()));
    (tx, stop, task)
}

#[tokio::test(start_paused = true)]
async fn only_changed_records_are_written_paced_and_batched() {
    let fake = Fake::new();
    let (tx, stop, task) = start(fake.clone(), StateSnapshot::default());
    let (a, b, c) = (view("a", Some(1)), view("b", Some(2)), view("c", None));
    tx.send_replace(snapshot(&[&a, &b, &c], 0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Nothing pushed to `c`: no record. Two per batch: one write.
    assert_eq!(fake.writes(), [(0, vec!["a".into(), "b".into()])]);

    // Within the pace: `a` changes twice; `b` is a new view of the same
    // record; `c` is the same view. One write, a second after the last,
    // of `a`'s newest record only.
    let a2 = view("a", Some(11));
    let b2 = view("b", Some(2));
    tx.send_replace(snapshot(&[&a2, &b2, &c], 0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a3 = view("a", Some(12));
    tx.send_replace(snapshot(&[&a3, &b2, &c], 0));
    tokio::time::sleep(S(5)).await;
    assert_eq!(fake.writes()[1..], [(1, vec!["a".into()])]);
    let writes = fake.log.lock().unwrap().clone();
    assert_eq!(writes[1].1[0].1, Some(record(12)));

    // Gone and new connections at once: in batches of two, back to back;
    // `c` (never written) is not deleted.
    let views: Vec<_> = (0..3).map(|n| view(&format!("n{n}"), Some(n))).collect();
    tx.send_replace(snapshot(&views.iter().collect::<Vec<_>>(), 0));
    tokio::time::sleep(S(5)).await;
    assert_eq!(
        fake.writes()[2..],
        [
            (5, vec!["-a".into(), "-b".into()]),
            (5, vec!["n0".into(), "n1".into()]),
            (5, vec!["n2".into()]),
        ]
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_is_retried_until_it_succeeds() {
    let fake = Fake::new();
    fake.fail.store(2, Ordering::SeqCst);
    let (tx, stop, task) = start(fake.clone(), StateSnapshot::default());
    let a = view("a", Some(1));
    tx.send_replace(snapshot(&[&a], 0));
    tokio::time::sleep(S(10)).await;
    assert_eq!(
        fake.writes(),
        [
            (0, vec!["a".into()]),
            (1, vec!["a".into()]),
            (2, vec!["a".into()]),
        ],
        "retried a second apart until written, then left alone"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_removed_connection_is_deleted_once_and_only_if_written() {
    let fake = Fake::new();
    let mut baseline = StateSnapshot::default();
    baseline.connections.insert("kept".into(), record(7));
    baseline.connections.insert("other".into(), record(8));
    let (tx, stop, task) = start(fake.clone(), baseline);
    // `kept` is as the target holds it; `never` was never pushed.
    let (kept, gone, never) = (
        view("kept", Some(7)),
        view("gone", Some(1)),
        view("never", None),
    );
    tx.send_replace(snapshot(&[&kept, &gone, &never], 0));
    tokio::time::sleep(S(5)).await;
    assert_eq!(fake.writes(), [(0, vec!["gone".into()])]);
    // Both go: only the written one is deleted. `other`, a record of a
    // connection this process never had, is not touched (the target is
    // not written whole).
    tx.send_replace(snapshot(&[&kept], 0));
    tokio::time::sleep(S(5)).await;
    assert_eq!(fake.writes()[1..], [(5, vec!["-gone".into()])]);
    tx.send_replace(snapshot(&[&kept], 0));
    tokio::time::sleep(S(5)).await;
    assert_eq!(fake.writes().len(), 2, "deleted once");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_closed_gate_drops_changes_and_a_begin_starts_from_its_view() {
    let fake = Fake::new();
    *fake.gate.lock().unwrap() = Gate::Closed;
    let (tx, stop, task) = start(fake.clone(), StateSnapshot::default());
    let (a, b) = (view("a", Some(1)), view("b", Some(2)));
    tx.send_replace(snapshot(&[&a, &b], 0));
    tokio::time::sleep(S(5)).await;
    assert!(fake.writes().is_empty(), "a closed gate wrote");

    // Held: nothing goes, nothing is dropped.
    *fake.gate.lock().unwrap() = Gate::Hold;
    let b2 = view("b", Some(22));
    tx.send_replace(snapshot(&[&a, &b2], 0));
    tokio::time::sleep(S(5)).await;
    assert!(fake.writes().is_empty(), "a held change was written");

    // A new start from a view that has `a` as it is: only `b` differs.
    let mut view_held = StateSnapshot::default();
    view_held.connections.insert("a".into(), record(1));
    view_held.connections.insert("b".into(), record(2));
    *fake.gate.lock().unwrap() = Gate::Begin(Some(Arc::new(view_held)));
    tx.send_replace(snapshot(&[&a, &b2], 0));
    tokio::time::sleep(S(5)).await;
    assert_eq!(fake.writes(), [(10, vec!["b".into()])]);

    // Closed again: what changed meanwhile is dropped for good, not
    // written when the gate opens (the records as they were are the baseline).
    *fake.gate.lock().unwrap() = Gate::Closed;
    let a2 = view("a", Some(11));
    tx.send_replace(snapshot(&[&a2, &b2], 0));
    tokio::time::sleep(S(5)).await;
    *fake.gate.lock().unwrap() = Gate::Write;
    tx.send_replace(snapshot(&[&a2, &b2], 0));
    tokio::time::sleep(S(5)).await;
    assert_eq!(fake.writes().len(), 1, "a dropped change came back");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_last_snapshot_is_flushed_at_stop_within_the_flush_time() {
    let fake = Fake::new();
    let (tx, stop, task) = start(fake.clone(), StateSnapshot::default());
    let a = view("a", Some(1));
    tx.send_replace(snapshot(&[&a], 0));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Published and stopped at once, inside the pace: flushed, not paced.
    let b = view("b", Some(2));
    tx.send_replace(snapshot(&[&a, &b], 0));
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        fake.writes(),
        [(0, vec!["a".into()]), (0, vec!["b".into()])]
    );

    // A failing target at stop: retried a second apart within FLUSH (3 s).
    let fake = Fake::new();
    fake.fail.store(10, Ordering::SeqCst);
    let (tx, stop, task) = start(fake.clone(), StateSnapshot::default());
    tx.send_replace(snapshot(&[&a], 0));
    stop.cancel();
    let started = crate::clock::mono_now();
    task.await.unwrap();
    assert_eq!(
        fake.writes().iter().map(|(at, _)| *at).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert!(started.elapsed() <= S(3));
    // The sender gone is a stop too.
    let fake = Fake::new();
    let (tx, _stop, task) = start(fake.clone(), StateSnapshot::default());
    tx.send_replace(snapshot(&[&a], 0));
    drop(tx);
    task.await.unwrap();
    assert_eq!(fake.writes(), [(0, vec!["a".into()])]);
}

#[tokio::test(start_paused = true)]
async fn the_placeholder_a_writer_starts_with_is_never_written() {
    // A state file written whole from the empty placeholder the channel
    // holds before the scheduler's first snapshot would lose every record.
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path().join("state.json"));
    let mut loaded = StateSnapshot::default();
    loaded.connections.insert("a".into(), record(1));
    store.save(&loaded).unwrap();
    let (_tx, stop, task) = start(StateFile::new(store.clone()), loaded.clone());
    tokio::time::sleep(S(5)).await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(store.load().unwrap(), loaded);
}

/// The shared table's target over `table`, with the role and fence it reads.
fn shared(table: &Arc<MemoryTable>) -> (SharedTable, watch::Sender<Leadership>, Fence) {
    let (leadership_tx, leadership) = watch::channel(Leadership::starting());
    let fence = Fence::new();
    let target = SharedTable::new(
        Arc::clone(table) as Arc<dyn Store>,
        fence.clone(),
        "me".to_owned(),
        leadership,
    );
    (target, leadership_tx, fence)
}

fn lead(tx: &watch::Sender<Leadership>, fence: &Fence, term: u64, view: Option<StateSnapshot>) {
    fence.open_until(crate::clock::mono_now() + S(3600));
    tx.send_modify(|l| {
        l.role = Role::Leader;
        l.term = term;
        l.view = view.map(Arc::new);
    });
}

#[tokio::test(start_paused = true)]
async fn the_shared_table_is_written_only_while_the_fence_is_open() {
    let table = Arc::new(MemoryTable::default());
    let (target, leadership, fence) = shared(&table);
    let (tx, stop, task) = start(target, StateSnapshot::default());
    // Starting, fence closed: dropped, never written.
    let c0 = view("c0", Some(0));
    tx.send_replace(snapshot(&[&c0], 0));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(table.calls.lock().unwrap().is_empty());

    // Leader of term 1 with an empty view: the snapshot from before the
    // scheduler adopted it is held, then everything it has is written, in
    // batches of 25, unprocessed items again.
    lead(&leadership, &fence, 1, Some(StateSnapshot::default()));
    let views: Vec<_> = (0..=60).map(|n| view(&format!("c{n}"), Some(n))).collect();
    tx.send_replace(snapshot(&views.iter().collect::<Vec<_>>(), 0));
    tokio::time::sleep(S(1)).await;
    assert!(
        table.calls.lock().unwrap().is_empty(),
        "a stale snapshot was written"
    );
    table.unprocessed_once.store(3, Ordering::SeqCst);
    tx.send_replace(snapshot(&views.iter().collect::<Vec<_>>(), 1));
    tokio::time::sleep(S(2)).await;
    assert_eq!(table.state.lock().unwrap().len(), 61);
    let sizes: Vec<usize> = table.calls.lock().unwrap().iter().map(Vec::len).collect();
    assert_eq!(sizes, [25, 25, 14], "batches of 25, the unprocessed again");

    // A gone connection is deleted.
    let fewer: Vec<_> = views.iter().filter(|v| v.id() != "c1").collect();
    tx.send_replace(snapshot(&fewer, 1));
    tokio::time::sleep(S(1)).await;
    assert!(!table.state.lock().unwrap().contains_key("c1"));

    // The fence closes: a change is dropped, not written.
    fence.close();
    let changed = view("c2", Some(99));
    let mut after: Vec<_> = fewer.clone();
    after.retain(|v| v.id() != "c2");
    after.push(&changed);
    tx.send_replace(snapshot(&after, 1));
    tokio::time::sleep(S(2)).await;
    stop.cancel();
    task.await.unwrap();
    let state = table.state.lock().unwrap();
    assert_eq!(state.len(), 60);
    assert_eq!(state["c2"], record(2));
    assert_eq!(state["c60"], record(60));
}

#[tokio::test(start_paused = true)]
async fn a_new_leader_writes_only_what_differs_from_the_adopted_view() {
    let table = Arc::new(MemoryTable::default());
    let (target, leadership, fence) = shared(&table);
    let (tx, stop, task) = start(target, StateSnapshot::default());
    // A standby's views (adopted from the table): dropped.
    leadership.send_modify(|l| l.role = Role::Standby);
    let views: Vec<_> = (0..1000)
        .map(|n| view(&format!("c{n:04}"), Some(n)))
        .collect();
    tx.send_replace(snapshot(&views.iter().collect::<Vec<_>>(), 0));
    tokio::time::sleep(S(1)).await;
    assert!(table.calls.lock().unwrap().is_empty());

    // Term 1: the view holds all but one as they are, and one the table
    // has that this replica does not (left alone).
    let mut view_read = StateSnapshot::default();
    for n in 1..1000 {
        view_read.connections.insert(format!("c{n:04}"), record(n));
    }
    view_read
        .connections
        .insert("elsewhere".into(), record(5000));
    lead(&leadership, &fence, 1, Some(view_read));
    tx.send_replace(snapshot(&views.iter().collect::<Vec<_>>(), 1));
    tokio::time::sleep(S(1)).await;
    assert_eq!(table.put_ids(), ["c0000"], "unchanged records rewritten");
    assert_eq!(
        table.calls.lock().unwrap().len(),
        1,
        "a deletion was written"
    );

    // A final change and a stop at once: flushed.
    let c5 = view("c0005", Some(55));
    let mut last: Vec<_> = views.iter().filter(|v| v.id() != "c0005").collect();
    last.push(&c5);
    tx.send_replace(snapshot(&last, 1));
    stop.cancel();
    task.await.unwrap();
    assert_eq!(table.state.lock().unwrap()["c0005"], record(55));
}

#[tokio::test(start_paused = true)]
async fn the_state_file_is_written_whole_and_only_when_records_differ() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let store = StateStore::new(path.clone());
    let mut loaded = StateSnapshot::default();
    loaded.connections.insert("a".into(), record(1));
    store.save(&loaded).unwrap();
    let mtime = || std::fs::metadata(&path).unwrap().modified().unwrap();
    let before: SystemTime = mtime();

    let (tx, stop, task) = start(StateFile::new(store.clone()), loaded.clone());
    // What was loaded, as loaded: not written again.
    let a = view("a", Some(1));
    tx.send_replace(snapshot(&[&a], 0));
    tokio::time::sleep(S(2)).await;
    assert_eq!(mtime(), before);
    // A new record: the whole set is written.
    let b = view("b", Some(2));
    tx.send_replace(snapshot(&[&a, &b], 0));
    tokio::time::sleep(S(2)).await;
    let written = store.load().unwrap();
    assert_eq!(written.connections.keys().collect::<Vec<_>>(), ["a", "b"]);
    // `a` removed: the file no longer has it.
    tx.send_replace(snapshot(&[&b], 0));
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        store.load().unwrap().connections.keys().collect::<Vec<_>>(),
        ["b"]
    );
}

#[test]
fn a_record_is_made_only_of_a_pushed_connection_whose_etag_is_known() {
    // What the state file and the table keep of a view: the sandbox, etag,
    // access key id, expiry and last success; nothing while any of the
    // first three is unknown (nothing pushed yet).
    let pushed = view("c1", Some(5));
    let made = writer::record(&pushed).unwrap();
    assert_eq!(made, record(5));
    assert_eq!(made.sandbox, "prod");
    assert_eq!(writer::record(&view("c2", None)), None);
    let mut no_etag = (*pushed).clone();
    no_etag.etag = None;
    assert_eq!(writer::record(&no_etag), None);
    let mut no_key = (*pushed).clone();
    no_key.access_key_id = None;
    assert_eq!(writer::record(&no_key), None);
}
