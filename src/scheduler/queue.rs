//! The deadline heaps the loop sleeps on: which connection is due next,
//! rotations before retries, ties in the order queued.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::ConnectionConfig;

/// The deadline heaps: (due time, insertion number, connection), earliest
/// first, one for rotations and one for retries of connections whose last
/// attempt failed.
///
/// Of the connections due at once, rotations go first: a retry's attempt
/// may hold its dispatch slot and request permit for a whole
/// `request_timeout` (a remote that hangs), so when many connections fail
/// that way, due time alone would queue every healthy rotation behind them.
/// Retries take every slot no rotation is due for.
///
/// Connections due at the same time (a whole first pass is) come out in the
/// order they were queued: the insertion number settles every tie, so the
/// heap never compares connections. An entry holds the connection's shared
/// config entry (its id), not a copy of the id: every wait of every
/// connection is an entry.
#[derive(Debug, Default)]
pub(super) struct DueQueue {
    rotations: BinaryHeap<Reverse<Due>>,
    retries: BinaryHeap<Reverse<Due>>,
    queued: u64,
}

/// One entry: ordered by due time, then insertion number (unique).
#[derive(Debug)]
struct Due {
    at: SystemTime,
    queued: u64,
    connection: Arc<ConnectionConfig>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.queued).cmp(&(other.at, other.queued))
    }
}

impl DueQueue {
    pub(super) fn push(&mut self, at: SystemTime, connection: &Arc<ConnectionConfig>, retry: bool) {
        self.queued = self.queued.wrapping_add(1);
        let heap = if retry {
            &mut self.retries
        } else {
            &mut self.rotations
        };
        heap.push(Reverse(Due {
            at,
            queued: self.queued,
            connection: Arc::clone(connection),
        }));
    }

    /// Drops stale entries (`current` says which are not) from both tops.
    pub(super) fn clean(&mut self, current: impl Fn(SystemTime, &str) -> bool) {
        for heap in [&mut self.rotations, &mut self.retries] {
            while let Some(Reverse(due)) = heap.peek() {
                if current(due.at, &due.connection.id) {
                    break;
                }
                heap.pop();
            }
        }
    }

    /// The earliest due time of either heap.
    pub(super) fn earliest(&self) -> Option<SystemTime> {
        let top = |heap: &BinaryHeap<Reverse<Due>>| heap.peek().map(|Reverse(due)| due.at);
        match (top(&self.rotations), top(&self.retries)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next connection to dispatch at `now`: a due rotation, else a due
    /// retry. Stale entries met on the way (`current` says which are not)
    /// are dropped; only entries taken are looked at, not both tops each
    /// time.
    pub(super) fn pop_due(
        &mut self,
        now: SystemTime,
        current: impl Fn(SystemTime, &str) -> bool,
    ) -> Option<Arc<ConnectionConfig>> {
        for heap in [&mut self.rotations, &mut self.retries] {
            while heap.peek().is_some_and(|Reverse(due)| due.at <= now) {
                let Some(Reverse(due)) = heap.pop() else {
                    break;
                };
                if current(due.at, &due.connection.id) {
                    return Some(due.connection);
                }
            }
        }
        None
    }
}
