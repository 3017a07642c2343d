//! The deadline heaps the loop sleeps on: which connection is due next,
//! rotations before retries, ties in the order queued.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::SystemTime;

/// The deadline heaps: (due time, insertion number, id), earliest first,
/// one for rotations and one for retries of connections whose last attempt
/// failed.
///
/// Of the connections due at once, rotations go first: a retry's attempt
/// may hold its dispatch slot and request permit for a whole
/// `request_timeout` (a remote that hangs), so when many connections fail
/// that way, due time alone would queue every healthy rotation behind them.
/// Retries take every slot no rotation is due for.
///
/// Connections due at the same time (a whole first pass is) come out in the
/// order they were queued: the insertion number settles every tie, so the
/// heap never compares ids (10,000 equal due times made string comparison
/// the heap's main cost).
#[derive(Debug, Default)]
pub(super) struct DueQueue {
    rotations: BinaryHeap<Reverse<(SystemTime, u64, String)>>,
    retries: BinaryHeap<Reverse<(SystemTime, u64, String)>>,
    queued: u64,
}

impl DueQueue {
    pub(super) fn push(&mut self, at: SystemTime, id: &str, retry: bool) {
        self.queued = self.queued.wrapping_add(1);
        let heap = if retry {
            &mut self.retries
        } else {
            &mut self.rotations
        };
        heap.push(Reverse((at, self.queued, id.to_owned())));
    }

    /// Drops stale entries (`current` says which are not) from both tops.
    pub(super) fn clean(&mut self, current: impl Fn(SystemTime, &str) -> bool) {
        for heap in [&mut self.rotations, &mut self.retries] {
            while let Some(Reverse((at, _, id))) = heap.peek() {
                if current(*at, id) {
                    break;
                }
                heap.pop();
            }
        }
    }

    /// The earliest due time of either heap.
    pub(super) fn earliest(&self) -> Option<SystemTime> {
        let top = |heap: &BinaryHeap<Reverse<(SystemTime, u64, String)>>| {
            heap.peek().map(|Reverse((at, _, _))| *at)
        };
        match (top(&self.rotations), top(&self.retries)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next connection to dispatch at `now`: a due rotation, else a due
    /// retry.
    pub(super) fn pop_due(&mut self, now: SystemTime) -> Option<String> {
        for heap in [&mut self.rotations, &mut self.retries] {
            if heap.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
                return heap.pop().map(|Reverse((_, _, id))| id);
            }
        }
        None
    }
}
