//! The one writer task: follows the published snapshots, works out which
//! records changed since its target last took them, and hands those over,
//! paced, retried and flushed once more at stop.
//!
//! Finding the changes is cheap: a connection replaces its view's `Arc`
//! only when it changes, so a view whose pointer is the one seen before is
//! skipped without a look; only the others are compared by value.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Change, Gate, StateTarget};
use crate::clock::mono_now;
use crate::coordination::local::{PersistedConnection, StateSnapshot};
use crate::observe::status::{ConnectionStatus, Snapshot, Snapshots};

/// How long a failed write waits before the next try: long enough not to
/// hammer a full disk or an unreachable table, short enough that a
/// recovered one is written within a second.
const RETRY: Duration = Duration::from_secs(1);

/// How long records the target answered as not written (DynamoDB's
/// unprocessed items: it is throttling) wait before they go again.
const AGAIN_SOON: Duration = Duration::from_millis(100);

/// Follows `snapshots` into `target` until `stop` (or until the scheduler
/// drops its sender), then flushes once more from the last snapshot within
/// the target's [`StateTarget::FLUSH`].
///
/// `baseline`: what the target holds at the start (the state file as
/// loaded: not written again as is). A snapshot `snapshots` has already
/// marked seen is not followed (before the scheduler's first turn it is
/// the empty placeholder): subscribe before the scheduler runs.
pub async fn run<T: StateTarget>(
    target: T,
    mut snapshots: Snapshots,
    baseline: StateSnapshot,
    stop: CancellationToken,
) {
    let seen = {
        let current = snapshots.borrow();
        if current.has_changed() {
            // Published after `snapshots` subscribed: to be followed.
            Arc::new(Snapshot::default())
        } else {
            Arc::clone(&current)
        }
    };
    let mut writer = Writer {
        target,
        diff: Diff::new(baseline.connections, T::WHOLE),
        seen,
        last_write: None,
        failing: false,
    };
    let mut again: Option<Instant> = None;
    loop {
        let woke = tokio::select! {
            // A stop goes first: the flush below writes the last snapshot
            // (a round before it would only add an attempt).
            biased;
            () = stop.cancelled() => false,
            changed = snapshots.changed() => changed.is_ok(),
            () = tokio::time::sleep_until(again.unwrap_or_else(mono_now)), if again.is_some() => true,
        };
        if !woke {
            break;
        }
        if let Some(at) = writer.last_write.map(|at| at + T::PACE)
            && at > mono_now()
        {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(at) => {}
            }
        }
        writer.follow(&mut snapshots);
        again = writer.round().await.map(|wait| mono_now() + wait);
    }
    writer.flush(&mut snapshots).await;
}

struct Writer<T> {
    target: T,
    diff: Diff,
    /// The last snapshot followed.
    seen: Arc<Snapshot>,
    last_write: Option<Instant>,
    /// The last write failed (logged once until one succeeds).
    failing: bool,
}

impl<T: StateTarget> Writer<T> {
    /// Takes in the newest snapshot, if it is new.
    fn follow(&mut self, snapshots: &mut Snapshots) {
        let latest = Arc::clone(&snapshots.borrow_and_update());
        if !Arc::ptr_eq(&latest, &self.seen) {
            self.diff.follow(&latest);
            self.seen = latest;
        }
    }

    /// Writes what changed, batch by batch, while the target lets it.
    /// Answers how long to wait before trying again what is left (`None`:
    /// nothing is left, or the target holds it until the next snapshot).
    async fn round(&mut self) -> Option<Duration> {
        loop {
            match self.target.gate(&self.seen) {
                Gate::Write => {}
                Gate::Hold => return None,
                Gate::Closed => {
                    let dropped = self.diff.settle();
                    if dropped > 0 {
                        tracing::debug!(dropped, "{} not ours to write; changes dropped", T::NAME);
                    }
                    return None;
                }
                Gate::Begin(view) => self.diff.rebase(view.as_deref()),
            }
            let changes = self.diff.take(T::BATCH);
            if changes.is_empty() {
                return None;
            }
            let result = self.target.write(&changes, &self.diff.desired).await;
            self.last_write = Some(mono_now());
            match result {
                Ok(left) => {
                    if self.failing {
                        tracing::info!("{} written again", T::NAME);
                        self.failing = false;
                    }
                    self.diff.wrote(&changes, &left);
                    if !left.is_empty() {
                        return Some(AGAIN_SOON);
                    }
                }
                Err(error) => {
                    if !self.failing {
                        tracing::warn!(error = %error, "{} not written; will retry", T::NAME);
                        self.failing = true;
                    }
                    return Some(RETRY);
                }
            }
        }
    }

    /// The last write, from the last snapshot; retried within the
    /// target's [`StateTarget::FLUSH`].
    async fn flush(&mut self, snapshots: &mut Snapshots) {
        let deadline = mono_now() + T::FLUSH;
        loop {
            self.follow(snapshots);
            let Some(wait) = self.round().await else {
                return;
            };
            if mono_now() + wait > deadline {
                tracing::warn!(
                    left = self.diff.dirty.len(),
                    "{} not fully written before shutdown",
                    T::NAME
                );
                return;
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// The records as the snapshots show them against what the target holds.
#[derive(Debug)]
struct Diff {
    whole: bool,
    /// A snapshot was taken in (nothing is written before).
    followed: bool,
    /// The last snapshot's views, by id.
    views: HashMap<String, Arc<ConnectionStatus>>,
    /// Their records (see [`record`]).
    desired: StateSnapshot,
    /// What the target holds, as far as this writer knows.
    written: BTreeMap<String, PersistedConnection>,
    /// Ids whose record may differ from the written one.
    dirty: BTreeSet<String>,
}

impl Diff {
    fn new(baseline: BTreeMap<String, PersistedConnection>, whole: bool) -> Self {
        Self {
            whole,
            followed: false,
            views: HashMap::new(),
            desired: StateSnapshot::default(),
            written: baseline,
            dirty: BTreeSet::new(),
        }
    }

    /// Takes in a snapshot: each view whose pointer changed, and each
    /// connection that is gone, is looked at again.
    fn follow(&mut self, snapshot: &Snapshot) {
        if !self.followed {
            self.followed = true;
            if self.whole {
                // A target written whole drops, at its first write, the
                // records of connections the snapshots do not have.
                self.dirty.extend(self.written.keys().cloned());
            }
        }
        for view in &snapshot.connections {
            if self
                .views
                .get(view.id())
                .is_some_and(|seen| Arc::ptr_eq(seen, view))
            {
                continue;
            }
            self.views.insert(view.id().to_owned(), Arc::clone(view));
            match record(view) {
                Some(record) => self
                    .desired
                    .connections
                    .insert(view.id().to_owned(), record),
                None => self.desired.connections.remove(view.id()),
            };
            self.dirty.insert(view.id().to_owned());
        }
        if self.views.len() > snapshot.connections.len() {
            let present: HashSet<&str> =
                snapshot.connections.iter().map(|view| view.id()).collect();
            let gone: Vec<String> = self
                .views
                .keys()
                .filter(|id| !present.contains(id.as_str()))
                .cloned()
                .collect();
            for id in gone {
                self.views.remove(&id);
                self.desired.connections.remove(&id);
                self.dirty.insert(id);
            }
        }
    }

    /// What writing `id` would change: its record where it differs from
    /// the written one (a connection without a record is left alone), a
    /// deletion where it is gone and was written.
    fn change(&self, id: &str) -> Option<Option<&PersistedConnection>> {
        let written = self.written.get(id);
        if self.views.contains_key(id) {
            let record = self.desired.connections.get(id)?;
            (written != Some(record)).then_some(Some(record))
        } else {
            written.map(|_| None)
        }
    }

    /// Up to `limit` changes; forgets the ids that need none.
    fn take(&mut self, limit: usize) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut settled = Vec::new();
        for id in &self.dirty {
            if changes.len() == limit {
                break;
            }
            match self.change(id) {
                Some(record) => changes.push((id.clone(), record.cloned())),
                None => settled.push(id.clone()),
            }
        }
        for id in settled {
            self.dirty.remove(&id);
        }
        changes
    }

    /// The target took `changes`, except the ids in `left`.
    fn wrote(&mut self, changes: &[Change], left: &[String]) {
        if self.whole {
            // It now holds exactly the current records.
            self.written.clone_from(&self.desired.connections);
            self.dirty.clear();
            return;
        }
        for (id, record) in changes {
            if left.contains(id) {
                continue;
            }
            match record {
                Some(record) => self.written.insert(id.clone(), record.clone()),
                None => self.written.remove(id),
            };
            self.dirty.remove(id);
        }
    }

    /// Takes every pending change as written without writing it (not ours
    /// to write); answers how many there were.
    fn settle(&mut self) -> usize {
        let changes = self.take(usize::MAX);
        self.wrote(&changes, &[]);
        changes.len()
    }

    /// The target holds `view` (`None`: what it was last known to hold):
    /// every connection is compared with it again.
    fn rebase(&mut self, view: Option<&StateSnapshot>) {
        if let Some(view) = view {
            self.written.clone_from(&view.connections);
        }
        self.dirty.extend(self.views.keys().cloned());
        if self.whole {
            self.dirty.extend(self.written.keys().cloned());
        }
    }
}

/// A view's record: only a connection this daemon pushed to and whose etag
/// it knows has one. Built from non-secret fields only.
pub(super) fn record(status: &ConnectionStatus) -> Option<PersistedConnection> {
    Some(PersistedConnection {
        sandbox: status.sandbox().to_owned(),
        etag: status.etag.clone()?,
        access_key_id: status.access_key_id.clone()?,
        expires_at: status.expires_at?,
        last_success_at: status.last_success_at,
    })
}
