//! An in-memory shared table for tests: records every `write_state` call,
//! can fail (`down`) or leave items unprocessed. The lease calls are not
//! used by the writers' tests and answer as an empty table would.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::future::BoxFuture;

use super::Change;
use crate::coordination::local::{PersistedConnection, StateSnapshot};
use crate::coordination::{Expect, LeaseRecord, Store, StoreError};

#[derive(Debug, Default)]
pub(crate) struct MemoryTable {
    pub(crate) state: Mutex<BTreeMap<String, PersistedConnection>>,
    /// Every `write_state` call's items, in order (failed ones included).
    pub(crate) calls: Mutex<Vec<Vec<Change>>>,
    /// Every call fails while set.
    pub(crate) down: AtomicBool,
    /// The next call answers this many of its items as unprocessed.
    pub(crate) unprocessed_once: AtomicUsize,
}

impl MemoryTable {
    /// The ids of every item written (not deleted) so far, in order.
    pub(crate) fn put_ids(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .filter(|(_, record)| record.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }
}

impl Store for MemoryTable {
    fn read_lease(&self) -> BoxFuture<'_, Result<Option<LeaseRecord>, StoreError>> {
        Box::pin(async { Ok(None) })
    }

    fn write_lease<'a>(
        &'a self,
        _record: &'a LeaseRecord,
        _expect: &'a Expect,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    fn delete_lease<'a>(&'a self, _rvn: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    fn load_state(&self) -> BoxFuture<'_, Result<StateSnapshot, StoreError>> {
        Box::pin(async {
            Ok(StateSnapshot {
                connections: self.state.lock().unwrap().clone(),
            })
        })
    }

    fn write_state<'a>(
        &'a self,
        items: &'a [Change],
        _holder: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(items.to_vec());
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("connection failed".to_owned()));
            }
            let skip = self.unprocessed_once.swap(0, Ordering::SeqCst);
            Ok(apply(&mut self.state.lock().unwrap(), items, skip))
        })
    }
}

/// `items` applied to an in-memory table as `write_state` would: the
/// first `skip` left unprocessed (answered), the rest written or deleted.
pub(crate) fn apply(
    state: &mut BTreeMap<String, PersistedConnection>,
    items: &[Change],
    skip: usize,
) -> Vec<String> {
    let mut left = Vec::new();
    for (n, (id, record)) in items.iter().enumerate() {
        if n < skip {
            left.push(id.clone());
            continue;
        }
        match record {
            Some(record) => state.insert(id.clone(), record.clone()),
            None => state.remove(id),
        };
    }
    left
}
