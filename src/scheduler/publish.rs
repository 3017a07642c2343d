//! What leaves the loop: the [`Snapshot`] of every connection, published on
//! a `watch` after the loop turns that changed something. Everything else
//! reads it: the views, and the writers of the state file and the shared
//! table ([`crate::persist`]), tasks of their own (the loop never awaits a
//! disk or network write).
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

use crate::observe::status::{ConnectionStatus, Snapshot, Snapshots};

/// The least time between two snapshots, per connection they hold.
const PUBLISH_COST: Duration = Duration::from_micros(10);

/// The most time between a change and its snapshot.
const MAX_PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

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
    /// is due now (or `force`); `term`: the leadership term whose shared
    /// state they have adopted.
    pub(super) fn publish<'a>(
        &mut self,
        force: bool,
        views: impl Iterator<Item = &'a Arc<ConnectionStatus>>,
        refresh_before: Duration,
        term: u64,
    ) {
        let now = crate::clock::mono_now();
        let early = self.last.is_some_and(|(at, interval)| now < at + interval);
        if !self.dirty || (early && !force) {
            return;
        }
        let connections: Vec<Arc<ConnectionStatus>> = views.cloned().collect();
        let interval = PUBLISH_COST
            .saturating_mul(u32::try_from(connections.len()).unwrap_or(u32::MAX))
            .min(MAX_PUBLISH_INTERVAL);
        self.dirty = false;
        self.last = Some((now, interval));
        self.tx.send_replace(Arc::new(Snapshot {
            connections,
            refresh_before,
            term,
        }));
    }

    /// A new reader of the snapshots.
    pub(super) fn subscribe(&self) -> Snapshots {
        self.tx.subscribe()
    }
}
