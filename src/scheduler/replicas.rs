//! `[coordination]` as the scheduler sees it: dispatch only while this
//! replica leads and its fence is open, adopt the shared state of each new
//! term. The shared table is written from the snapshots by its own writer
//! ([`crate::persist::SharedTable`]); each snapshot says which term's state
//! its views adopted, so that writer never puts an older view over it.

use tokio::sync::watch;

use super::{Daemon, DueQueue};
use crate::connection::{Event, Phase};
use crate::coordination::local::StateSnapshot;
use crate::coordination::{Leadership, Role};

impl Daemon {
    /// Runs as one of several replicas: dispatches only while `leadership`
    /// says this replica leads (and its fence is open), and adopts the
    /// shared state of each new term.
    pub fn coordinate(&mut self, leadership: watch::Receiver<Leadership>) {
        self.leadership = Some(leadership);
        self.leading = false;
    }

    /// Whether the fence (coordination) lets jobs write now.
    pub(super) fn fence_open(&self) -> bool {
        self.options
            .fence
            .as_ref()
            .is_none_or(crate::coordination::Fence::is_open)
    }

    /// The elector changed its word: a new term adopts the shared state and
    /// starts dispatching; anything else stops it (jobs in flight stop at
    /// their next fence check).
    pub(super) fn on_leadership(&mut self, open: bool) {
        if !open {
            // The elector has ended (shutdown): nothing more is written.
            self.leading = false;
            return;
        }
        let Some(receiver) = self.leadership.as_mut() else {
            return;
        };
        let current = receiver.borrow_and_update().clone();
        match current.role {
            Role::Leader if current.term != self.term => {
                self.term = current.term;
                self.adopt(current.view.as_deref());
                // The next snapshot shows the new term even when no view
                // was read (the shared table's writer waits for it).
                self.publisher.changed();
                self.leading = true;
            }
            Role::Leader => {}
            Role::Standby | Role::Starting => {
                self.leading = false;
                self.adopt(current.view.as_deref());
            }
        }
        // The role shows in `STATUS=` at once.
        self.readiness.status_now();
    }

    /// Takes up the shared state (see [`crate::connection::Connection::adopt`]); `None` keeps
    /// this replica's own view.
    fn adopt(&mut self, view: Option<&StateSnapshot>) {
        let Some(view) = view else {
            return;
        };
        let now = self.clock.now();
        for connection in self.connections.values_mut() {
            let shared = view
                .connections
                .get(&connection.config().id)
                .cloned()
                .map(Box::new);
            connection.apply(Event::Adopt(shared), now, &self.policy, rand::random());
            connection.refresh_view();
        }
        self.publisher.changed();
        // Every due time may have moved: the heap is rebuilt rather than
        // grown (a standby adopts a view every half minute).
        self.heap = DueQueue::default();
        for (key, connection) in self.connections.iter() {
            if let Phase::Waiting(at) = connection.phase()
                && !connection.is_held()
            {
                self.heap.push(at, key, connection.is_retrying());
            }
        }
    }

    /// The role as `STATUS=` shows it when this replica is not the leader.
    pub(super) fn standby_line(&self) -> Option<String> {
        let leadership = self.leadership.as_ref()?.borrow();
        (leadership.role != Role::Leader).then(|| leadership.status_line())
    }
}

/// Resolves when the elector publishes (`true`), or when it has ended
/// (`false`, once); never without coordination.
pub(super) async fn leadership_changed(
    leadership: &mut Option<watch::Receiver<Leadership>>,
) -> bool {
    match leadership {
        Some(receiver) => {
            let open = receiver.changed().await.is_ok();
            if !open {
                // Ended: later calls wait forever instead of spinning.
                *leadership = None;
            }
            open
        }
        None => std::future::pending().await,
    }
}
