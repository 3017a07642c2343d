//! Persistence: the connections' non-secret records, kept where they
//! outlive this process, all derived from the scheduler's published
//! [`Snapshot`]s.
//!
//! There are two places, each a [`StateTarget`]: the state file
//! ([`StateFile`], `[state] path`) and, with `[coordination]`, the shared
//! table ([`SharedTable`]: the leader's records, read by a new leader and by
//! the standbys' views). One generic task ([`run`], in `writer`) follows the
//! snapshots, finds the records that changed since its target last took
//! them (by the views' `Arc` pointers, then by value), and hands them over,
//! paced and retried as the target says. The scheduler's loop never awaits
//! a disk or network write, and sends nothing to a writer: a writer reads
//! what the loop publishes anyway.
//!
//! A record holds no secret ([`PersistedConnection`]: sandbox, etag, access
//! key id, expiry, last success), so nothing a writer handles can leak one.
//!
//! Imports `observe::status` (the snapshots) and `coordination` (the
//! records, the table's [`crate::coordination::Store`], the fence and the
//! role); imported by `scheduler` (the state file) and `app` (the table).

mod file;
mod table;
mod writer;

#[cfg(test)]
pub(crate) mod memory;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

pub use file::StateFile;
pub use table::SharedTable;
pub use writer::run;

use crate::coordination::local::{PersistedConnection, StateSnapshot};
use crate::observe::status::Snapshot;

/// One connection's change: its new record, or `None` when the connection
/// is gone (its record is deleted).
pub type Change = (String, Option<PersistedConnection>);

/// Where a writer keeps the records: the state file, the shared table.
///
/// Its constants are its pacing; [`Self::gate`] says whether this process
/// may write there now; [`Self::write`] writes.
pub trait StateTarget: Send + 'static {
    /// What it is, in the logs (`state file`, `shared state`).
    const NAME: &'static str;
    /// The least time from one write to the next: a burst of changes
    /// becomes one write.
    const PACE: Duration;
    /// The most changes handed to one [`Self::write`].
    const BATCH: usize;
    /// Whether a write replaces everything the target holds with every
    /// current record (the file). Otherwise it changes only the records it
    /// is given, and records of connections this process never had stay.
    const WHOLE: bool;
    /// How long the last flush at stop keeps retrying (zero: one attempt).
    const FLUSH: Duration;

    /// Whether the changes up to `snapshot` may be written now.
    fn gate(&mut self, snapshot: &Snapshot) -> Gate;

    /// Writes `changes` (at most [`Self::BATCH`]); `all` is every current
    /// record, for a target that writes them all. Answers the ids of
    /// `changes` that were not written (handed over again shortly); an
    /// error (for the log) means none was.
    fn write<'a>(
        &'a mut self,
        changes: &'a [Change],
        all: &'a StateSnapshot,
    ) -> BoxFuture<'a, Result<Vec<String>, String>>;
}

/// What a target answers before a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Write what changed.
    Write,
    /// Not yet: keep what changed until the next snapshot (the snapshots
    /// do not show something the target waits for).
    Hold,
    /// Not this process's to write: what changed is dropped, and the
    /// target is taken to hold the records as they are now.
    Closed,
    /// A new start: the target holds `view` (`None`: the records as this
    /// writer last knew them); whatever differs from it is written.
    Begin(Option<Arc<StateSnapshot>>),
}
