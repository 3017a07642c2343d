//! What leaves the loop: the [`Snapshot`] of every connection, published on
//! a `watch` after the loop turns that changed something, and the state
//! file, written from those snapshots by a task of its own (the loop never
//! awaits a disk write).
//!
//! A snapshot is a vector of the connections' own `Arc`ed views
//! ([`crate::connection::Connection::view`]): publishing copies pointers,
//! not connections, but still one per connection. So that this stays a
//! small share of the loop's work, snapshots follow each other at least
//! [`PUBLISH_COST`] per connection apart (never more than
//! [`MAX_PUBLISH_INTERVAL`]): with a few connections every changing turn is
//! published at its end; during a first pass over 10,000, ten a second.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::coordination::local::{PersistedConnection, StateSnapshot, StateStore};
use crate::observe::status::{ConnectionStatus, Snapshot, Snapshots};

/// The least time between two snapshots, per connection they hold.
const PUBLISH_COST: Duration = Duration::from_micros(10);

/// The most time between a change and its snapshot.
const MAX_PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

/// How often the state file is written at most: a burst of rotations (the
/// first pass over 10,000 connections) costs one write per second, not one
/// per connection.
const STATE_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Publishes the scheduler's snapshots.
#[derive(Debug)]
pub(super) struct Publisher {
    tx: watch::Sender<Arc<Snapshot>>,
    /// A connection changed since the last snapshot.
    dirty: bool,
    /// The last snapshot: when, and how long until the next may follow.
    last: Option<(Instant, Duration)>,
}

impl Publisher {
    /// Publishes on `tx` (whose receivers the views hold).
    pub(super) fn new(tx: watch::Sender<Arc<Snapshot>>) -> Self {
        Self {
            tx,
            dirty: true,
            last: None,
        }
    }

    /// A connection changed: the next snapshot is due.
    pub(super) fn changed(&mut self) {
        self.dirty = true;
    }

    /// When the next snapshot is due (`None`: nothing changed).
    pub(super) fn due(&self) -> Option<Instant> {
        if !self.dirty {
            return None;
        }
        Some(match self.last {
            Some((at, interval)) => at + interval,
            None => crate::clock::mono_now(),
        })
    }

    /// Publishes the connections' views if anything changed and a snapshot
    /// is due now (or `force`).
    pub(super) fn publish<'a>(
        &mut self,
        force: bool,
        views: impl ExactSizeIterator<Item = &'a Arc<ConnectionStatus>>,
        refresh_before: Duration,
    ) {
        let now = crate::clock::mono_now();
        let early = self.last.is_some_and(|(at, interval)| now < at + interval);
        if !self.dirty || (early && !force) {
            return;
        }
        let interval = PUBLISH_COST
            .saturating_mul(u32::try_from(views.len()).unwrap_or(u32::MAX))
            .min(MAX_PUBLISH_INTERVAL);
        self.dirty = false;
        self.last = Some((now, interval));
        self.tx.send_replace(Arc::new(Snapshot {
            connections: views.cloned().collect(),
            refresh_before,
        }));
    }

    /// A new reader of the snapshots.
    pub(super) fn subscribe(&self) -> Snapshots {
        self.tx.subscribe()
    }
}

/// The state file's records of a snapshot: the connections this daemon
/// pushed to and whose etag it knows.
fn records(snapshot: &Snapshot) -> StateSnapshot {
    StateSnapshot {
        connections: snapshot
            .connections
            .iter()
            .filter_map(|status| {
                let record = PersistedConnection {
                    sandbox: status.sandbox.clone(),
                    etag: status.etag.clone()?,
                    access_key_id: status.access_key_id.clone()?,
                    expires_at: status.expires_at?,
                    last_success_at: status.last_success_at,
                };
                Some((status.id.clone(), record))
            })
            .collect(),
    }
}

/// Writes the state file whenever the published records differ from the
/// last written ones, at most every [`STATE_WRITE_INTERVAL`], until `stop`;
/// then once more from the last snapshot (the scheduler publishes its
/// final one before it stops this).
///
/// `loaded`: what the file held at the start (not written again as is).
pub(super) async fn write_state_file(
    store: StateStore,
    mut snapshots: Snapshots,
    loaded: StateSnapshot,
    stop: CancellationToken,
) {
    let mut written = loaded;
    loop {
        let stopping = stop.is_cancelled();
        let current = records(&snapshots.borrow_and_update());
        let failed = current != written && !save(&store, &current).await;
        if !failed {
            written = current;
        }
        if stopping {
            return;
        }
        if !failed {
            // Nothing to write until a snapshot differs.
            tokio::select! {
                () = stop.cancelled() => continue,
                changed = snapshots.changed() => if changed.is_err() { return },
            }
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(STATE_WRITE_INTERVAL) => {}
        }
    }
}

/// One atomic write on the blocking pool; `false` (logged) when it failed.
async fn save(store: &StateStore, records: &StateSnapshot) -> bool {
    let store = store.clone();
    let records = records.clone();
    let error = match tokio::task::spawn_blocking(move || store.save(&records)).await {
        Ok(Ok(())) => return true,
        Ok(Err(error)) => error.to_string(),
        Err(error) => error.to_string(),
    };
    tracing::warn!(error = %error, "state file not written; will retry");
    false
}
