//! The shared table as a [`StateTarget`]: the changed records only, as soon
//! as they change, in DynamoDB's batches, and only while this replica leads
//! with its fence open.
//!
//! A standby drops what changed (its records are what it adopted, not its
//! own work). A new term starts from the view the elector read with it:
//! the scheduler adopts that view, and only what then differs from it is
//! written, so a new leader does not rewrite 10,000 unchanged records. The
//! writer holds its changes until the snapshots show that adoption
//! ([`Snapshot::term`]): a snapshot from before it would put this
//! replica's older view over the table's newer one.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{Change, Gate, StateTarget};
use crate::coordination::local::StateSnapshot;
use crate::coordination::{Fence, Leadership, Role, Store, dynamo};
use crate::observe::status::Snapshot;

/// The shared state in the coordination table.
#[derive(Debug)]
pub struct SharedTable {
    store: Arc<dyn Store>,
    fence: Fence,
    holder: String,
    leadership: watch::Receiver<Leadership>,
    /// The term whose view the writer has started from (0: none yet).
    term: u64,
}

impl SharedTable {
    /// Writes through `store` as `holder`, while `leadership` says this
    /// replica leads and `fence` is open.
    pub fn new(
        store: Arc<dyn Store>,
        fence: Fence,
        holder: String,
        leadership: watch::Receiver<Leadership>,
    ) -> Self {
        Self {
            store,
            fence,
            holder,
            leadership,
            term: 0,
        }
    }
}

impl StateTarget for SharedTable {
    const NAME: &'static str = "shared state";
    /// As soon as possible: the sooner a record is in the table, the
    /// smaller the window in which a new leader would read an older one.
    const PACE: Duration = Duration::ZERO;
    const BATCH: usize = dynamo::BATCH_LIMIT;
    const WHOLE: bool = false;
    const FLUSH: Duration = crate::coordination::FLUSH_GRACE;

    fn gate(&mut self, snapshot: &Snapshot) -> Gate {
        let leadership = self.leadership.borrow();
        if leadership.role != Role::Leader || !self.fence.is_open() {
            // Not the leader: this replica's view is not authoritative.
            return Gate::Closed;
        }
        if snapshot.term != leadership.term {
            // The scheduler has not adopted this term's view yet.
            return Gate::Hold;
        }
        if self.term != leadership.term {
            self.term = leadership.term;
            return Gate::Begin(leadership.view.clone());
        }
        Gate::Write
    }

    fn write<'a>(
        &'a mut self,
        changes: &'a [Change],
        _all: &'a StateSnapshot,
    ) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            self.store
                .write_state(changes, &self.holder)
                .await
                .map_err(|error| error.to_string())
        })
    }
}
