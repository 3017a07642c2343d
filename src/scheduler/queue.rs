//! The deadline heaps the loop sleeps on: which connection is due next,
//! rotations before retries, ties in the order queued.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::SystemTime;

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
/// heap never compares connections. An entry names its connection by `K`,
/// the scheduler's key ([`super::table::Key`]): every wait of every
/// connection is an entry.
#[derive(Debug)]
pub(super) struct DueQueue<K> {
    rotations: BinaryHeap<Reverse<Due<K>>>,
    retries: BinaryHeap<Reverse<Due<K>>>,
    queued: u64,
}

impl<K> Default for DueQueue<K> {
    fn default() -> Self {
        Self {
            rotations: BinaryHeap::new(),
            retries: BinaryHeap::new(),
            queued: 0,
        }
    }
}

/// One entry: ordered by due time, then insertion number (unique).
#[derive(Debug)]
struct Due<K> {
    at: SystemTime,
    queued: u64,
    connection: K,
}

impl<K> PartialEq for Due<K> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<K> Eq for Due<K> {}

impl<K> PartialOrd for Due<K> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<K> Ord for Due<K> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.queued).cmp(&(other.at, other.queued))
    }
}

impl<K: Copy> DueQueue<K> {
    pub(super) fn push(&mut self, at: SystemTime, connection: K, retry: bool) {
        self.queued = self.queued.wrapping_add(1);
        let heap = if retry {
            &mut self.retries
        } else {
            &mut self.rotations
        };
        heap.push(Reverse(Due {
            at,
            queued: self.queued,
            connection,
        }));
    }

    /// Drops stale entries (`current` says which are not) from both tops.
    pub(super) fn clean(&mut self, current: impl Fn(SystemTime, K) -> bool) {
        for heap in [&mut self.rotations, &mut self.retries] {
            while let Some(Reverse(due)) = heap.peek() {
                if current(due.at, due.connection) {
                    break;
                }
                heap.pop();
            }
        }
    }

    /// The earliest due time of either heap.
    pub(super) fn earliest(&self) -> Option<SystemTime> {
        let top = |heap: &BinaryHeap<Reverse<Due<K>>>| heap.peek().map(|Reverse(due)| due.at);
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
        current: impl Fn(SystemTime, K) -> bool,
    ) -> Option<K> {
        for heap in [&mut self.rotations, &mut self.retries] {
            while heap.peek().is_some_and(|Reverse(due)| due.at <= now) {
                let Some(Reverse(due)) = heap.pop() else {
                    break;
                };
                if current(due.at, due.connection) {
                    return Some(due.connection);
                }
            }
        }
        None
    }
}
