//! The state file as a [`StateTarget`]: every record, written whole and
//! atomically ([`StateStore::save`]) on the blocking pool, at most once a
//! second.

use std::time::Duration;

use futures::future::BoxFuture;

use super::{Change, Gate, StateTarget};
use crate::coordination::local::{StateSnapshot, StateStore};
use crate::observe::status::Snapshot;

/// The state file at `[state] path`.
#[derive(Debug, Clone)]
pub struct StateFile {
    store: StateStore,
}

impl StateFile {
    /// Writes through `store`.
    pub fn new(store: StateStore) -> Self {
        Self { store }
    }
}

impl StateTarget for StateFile {
    const NAME: &'static str = "state file";
    /// A burst of rotations (the first pass over 10,000 connections) costs
    /// one write per second, not one per connection.
    const PACE: Duration = Duration::from_secs(1);
    /// The file is written whole: every change at once.
    const BATCH: usize = usize::MAX;
    const WHOLE: bool = true;
    /// One last attempt: a disk that fails now does not hold up the stop.
    const FLUSH: Duration = Duration::ZERO;

    fn gate(&mut self, _snapshot: &Snapshot) -> Gate {
        // This process's own file: always its to write.
        Gate::Write
    }

    fn write<'a>(
        &'a mut self,
        _changes: &'a [Change],
        all: &'a StateSnapshot,
    ) -> BoxFuture<'a, Result<Vec<String>, String>> {
        let store = self.store.clone();
        let all = all.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || store.save(&all)).await {
                Ok(Ok(())) => Ok(Vec::new()),
                Ok(Err(error)) => Err(error.to_string()),
                Err(error) => Err(error.to_string()),
            }
        })
    }
}
