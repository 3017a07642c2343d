//! High availability: several replicas, exactly one writer.
//!
//! The replicas share one lease item in a DynamoDB table ([`dynamo`]), the
//! pattern of Amazon's DynamoDB Lock Client and the Kinesis Client Library:
//!
//! - **Acquire** when the item is absent (conditional put), or when its
//!   record version number (`rvn`) has stayed the same for a full lease *as
//!   observed by this replica's own monotonic clock* (conditional update on
//!   that `rvn`). No replica trusts another's clock.
//! - **Renew** every `renew_every` by writing a new `rvn` on the condition
//!   that the item still holds ours. A failed condition means someone else
//!   holds the lease: leadership is lost at once.
//! - **Fence.** The leader's right to write ends `lease − renew_every` after
//!   it *sent* its last successful renewal, by its own monotonic clock
//!   ([`Fence`]). A standby can take over no earlier than a full lease after
//!   it *received* that record, so the old leader has stopped with a margin
//!   of `renew_every` to spare. Every job checks the fence before each `GET`
//!   and `PATCH`; the etag (`If-Match`) is the fence at the remote: a PATCH
//!   that races a takeover gets a 412, and a replica that is no longer the
//!   leader stops there instead of re-reading.
//! - **Release** on clean shutdown (conditional delete), so a standby takes
//!   over at its next look, within `renew_every`.
//!
//! The per-connection non-secret state (etag, access key id, expiry, last
//! success) is kept in the same table by the leader (written from the
//! scheduler's snapshots by [`crate::persist::SharedTable`], through
//! [`Store::write_state`]), so a new leader resumes every schedule without
//! re-pushing credentials that are still good. Standbys read it every
//! [`VIEW_REFRESH`] so their `/status` and metrics show what the leader did.

pub mod dynamo;
pub mod leadership;
pub mod local;
pub mod table;

pub use leadership::{Leadership, Role};

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::mono_now;
use crate::coordination::local::{PersistedConnection, StateSnapshot};
use crate::observe::telemetry::Telemetry;

/// How often a standby re-reads the shared state for its own view
/// (`/status`, metrics). One `Query` per half minute per standby costs
/// little, and an operator looking at a standby sees the leader's work.
pub const VIEW_REFRESH: Duration = Duration::from_secs(30);

/// How long a leader keeps writing shared state after it stopped: the
/// writes still queued at shutdown get this long before the lease is released.
pub const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// The lease item as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Who holds it.
    pub holder: String,
    /// Record version number: a fresh random value on every write.
    pub rvn: String,
    /// How long the holder said the lease lasts without renewal.
    pub lease: Duration,
}

/// The condition of a lease write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The item must not exist.
    Absent,
    /// The item must hold this record version number.
    Rvn(String),
}

/// Why a call to the coordination table failed. Every message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A condition did not hold: someone else wrote the lease first.
    #[error("the lease changed under us (conditional write failed)")]
    Conflict,
    /// The table does not exist (in this region / at this endpoint).
    #[error(
        "DynamoDB table {table:?} does not exist; create it with `aep-s3-rotator coordination init` (or see the README), or fix coordination.table / the region"
    )]
    NoTable {
        /// The table name.
        table: String,
    },
    /// DynamoDB refused the request as invalid: the table exists but was
    /// not made for this daemon (another key schema).
    #[error(
        "DynamoDB refused the request on table {table:?} as invalid ({detail}); is it a table made by `aep-s3-rotator coordination init` (partition key pk, sort key sk, both strings)? Fix coordination.table or recreate the table"
    )]
    NotOurs {
        /// The table name.
        table: String,
        /// DynamoDB's message, cleaned.
        detail: String,
    },
    /// The identity may not call this action on the table.
    #[error(
        "access denied: this AWS identity may not call {action} on table {table:?}; grant it (the README lists the IAM policy): {detail}"
    )]
    Denied {
        /// The IAM action, e.g. `dynamodb:PutItem`.
        action: &'static str,
        /// The table name.
        table: String,
        /// DynamoDB's message, cleaned.
        detail: String,
    },
    /// The credentials were refused.
    #[error(
        "DynamoDB refused the AWS credentials ({code}): {detail}; check the AWS identity the daemon runs as"
    )]
    Credentials {
        /// The AWS error code.
        code: String,
        /// DynamoDB's message, cleaned.
        detail: String,
    },
    /// Unreachable, throttled, timed out, or an answer we could not read.
    #[error("DynamoDB unavailable: {0}")]
    Unavailable(String),
}

/// The coordination table, behind a trait so the lease protocol is tested
/// with paused time and an in-memory table.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Reads the lease item (strongly consistent).
    fn read_lease(&self) -> BoxFuture<'_, Result<Option<LeaseRecord>, StoreError>>;
    /// Writes the lease item on a condition.
    fn write_lease<'a>(
        &'a self,
        record: &'a LeaseRecord,
        expect: &'a Expect,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Deletes the lease item if it still holds `rvn`.
    fn delete_lease<'a>(&'a self, rvn: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Reads every connection's shared state.
    fn load_state(&self) -> BoxFuture<'_, Result<StateSnapshot, StoreError>>;
    /// Writes (or, for `None`, deletes) some connections' state; answers
    /// the ids that were not processed (to be written again).
    fn write_state<'a>(
        &'a self,
        items: &'a [(String, Option<PersistedConnection>)],
        holder: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>>;
}

/// This replica's right to write, by its own monotonic clock. Cheap to
/// clone and to check; jobs check it before every `GET` and `PATCH`.
#[derive(Debug, Clone, Default)]
pub struct Fence {
    valid_until: Arc<Mutex<Option<Instant>>>,
}

impl Fence {
    /// A closed fence.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether this replica may write now.
    pub fn is_open(&self) -> bool {
        self.valid_until().is_some_and(|at| mono_now() < at)
    }

    /// Until when it may write (`None`: not at all).
    pub fn valid_until(&self) -> Option<Instant> {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn open_until(&self, at: Instant) {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(at);
    }

    pub(crate) fn close(&self) {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// The default holder name: hostname, pid and a random suffix, so two
/// processes never share one (a restarted process is a new holder).
pub fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                .take(64)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

fn new_rvn() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A record version number this replica saw, and since when (by its clock,
/// taken when the answer arrived: the write happened before).
#[derive(Debug)]
struct Observed {
    rvn: String,
    since: Instant,
}

/// Runs the lease protocol and publishes [`Leadership`].
#[derive(Debug)]
pub struct Elector {
    store: Arc<dyn Store>,
    me: String,
    lease: Duration,
    renew_every: Duration,
    fence: Fence,
    tx: watch::Sender<Leadership>,
    telemetry: Arc<Telemetry>,
    /// The record version number this replica last wrote, while it may hold it.
    mine: Option<String>,
    observed: Option<Observed>,
    last_view: Option<Instant>,
}

impl Elector {
    /// An elector for holder `me`; watch its [`Leadership`] on the receiver,
    /// gate writes on the [`Fence`].
    pub fn new(
        store: Arc<dyn Store>,
        me: String,
        lease: Duration,
        renew_every: Duration,
        telemetry: Arc<Telemetry>,
    ) -> (Self, watch::Receiver<Leadership>, Fence) {
        let (tx, rx) = watch::channel(Leadership::starting());
        let fence = Fence::new();
        let elector = Self {
            store,
            me,
            lease,
            renew_every,
            fence: fence.clone(),
            tx,
            telemetry,
            mine: None,
            observed: None,
            last_view: None,
        };
        (elector, rx, fence)
    }

    /// Runs until `stop`; then releases the lease if this replica holds it.
    /// The caller stops it only after the scheduler has drained its jobs
    /// and the shared state is flushed.
    pub async fn run(mut self, stop: CancellationToken) {
        tracing::info!(
            holder = %self.me,
            lease = %humantime::format_duration(self.lease),
            renew_every = %humantime::format_duration(self.renew_every),
            "coordination on: waiting for the lease"
        );
        loop {
            let next = if self.role() == Role::Leader {
                self.leader_turn().await
            } else {
                self.standby_turn().await
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(next) => {}
            }
        }
        self.release().await;
    }

    fn role(&self) -> Role {
        self.tx.borrow().role
    }

    fn publish(&self, edit: impl FnOnce(&mut Leadership)) {
        self.tx.send_modify(edit);
    }

    /// The leader's right to write ends `renew_every` before the lease
    /// could expire as seen by anyone else.
    fn valid_until(&self, sent: Instant) -> Instant {
        sent + self.lease.saturating_sub(self.renew_every)
    }

    fn trouble(&self, error: &StoreError) {
        let message = error.to_string();
        let fresh = self.tx.borrow().trouble.as_deref() != Some(message.as_str());
        if fresh {
            tracing::warn!(table_error = %message, role = self.role().as_str(), "coordination table call failed; will retry");
            self.publish(|l| l.trouble = Some(message));
        } else {
            tracing::debug!(table_error = %message, "coordination table call failed again");
        }
    }

    fn healthy(&self) {
        if self.tx.borrow().trouble.is_some() {
            tracing::info!("coordination table reachable again");
            self.publish(|l| l.trouble = None);
        }
    }

    async fn standby_turn(&mut self) -> Instant {
        let read = self.store.read_lease().await;
        let now = mono_now();
        let record = match read {
            Ok(record) => record,
            Err(error) => {
                self.trouble(&error);
                self.enter_standby(None, "the lease could not be read");
                return now + self.renew_every;
            }
        };
        self.healthy();
        let Some(record) = record else {
            return self.take(Expect::Absent, None).await;
        };
        if record.holder == self.me && self.mine.is_some() {
            // Our own record from before a lapse: nobody replaced it.
            return self.take(Expect::Rvn(record.rvn), None).await;
        }
        let since = match &self.observed {
            Some(seen) if seen.rvn == record.rvn => seen.since,
            _ => {
                self.observed = Some(Observed {
                    rvn: record.rvn.clone(),
                    since: now,
                });
                now
            }
        };
        // The item's own duration, but never longer than ours: replicas of
        // one table share one config, and a stale or hostile item saying 10
        // minutes delayed takeover past refresh_before (issue 26).
        let lease = record.lease.min(self.lease);
        if now.duration_since(since) >= lease {
            tracing::info!(
                previous = %record.holder,
                unchanged_for = %humantime::format_duration(crate::clock::round_ms(now.duration_since(since))),
                "the lease was not renewed for a full lease; taking over"
            );
            return self
                .take(Expect::Rvn(record.rvn), Some(record.holder))
                .await;
        }
        self.enter_standby(Some(record.holder), "");
        self.refresh_view().await;
        (now + self.renew_every).min(since + lease)
    }

    /// Publishes `Standby` (logging `standing by` when it is news).
    fn enter_standby(&self, leader: Option<String>, why: &str) {
        let current = self.tx.borrow().clone();
        let leader = leader.or_else(|| current.leader.clone().filter(|l| *l != self.me));
        if current.role == Role::Standby && current.leader == leader {
            return;
        }
        tracing::info!(
            leader = leader.as_deref().unwrap_or("unknown"),
            reason = why,
            "standing by"
        );
        self.publish(|l| {
            l.role = Role::Standby;
            l.leader = leader;
            l.view = None;
        });
    }

    async fn refresh_view(&mut self) {
        let now = mono_now();
        if self
            .last_view
            .is_some_and(|at| now.duration_since(at) < VIEW_REFRESH)
        {
            return;
        }
        self.last_view = Some(now);
        match self.store.load_state().await {
            Ok(view) => self.publish(|l| l.view = Some(Arc::new(view))),
            Err(error) => self.trouble(&error),
        }
    }

    /// A lease record of ours with a fresh version number.
    fn new_record(&self) -> LeaseRecord {
        LeaseRecord {
            holder: self.me.clone(),
            rvn: new_rvn(),
            lease: self.lease,
        }
    }

    /// A conditional write of a new record of ours.
    async fn take(&mut self, expect: Expect, previous: Option<String>) -> Instant {
        let (record, sent) = (self.new_record(), mono_now());
        match self.store.write_lease(&record, &expect).await {
            Ok(()) => {
                self.mine = Some(record.rvn);
                self.become_leader(sent, previous).await;
                sent + self.renew_every
            }
            Err(StoreError::Conflict) => {
                // Someone else wrote first: look again at the next turn.
                self.observed = None;
                self.mine = None;
                mono_now() + self.renew_every
            }
            Err(error) => {
                self.trouble(&error);
                mono_now() + self.renew_every
            }
        }
    }

    async fn become_leader(&mut self, sent: Instant, previous: Option<String>) {
        self.fence.open_until(self.valid_until(sent));
        self.observed = None;
        self.telemetry.leader_change();
        let term = self.tx.borrow().term + 1;
        tracing::info!(
            holder = %self.me,
            term,
            previous = previous.as_deref().unwrap_or(""),
            "became leader"
        );
        // The schedules come from the shared state read now, after the
        // lease is ours: whatever the previous leader wrote is in it.
        let view = match self.store.load_state().await {
            Ok(view) => {
                tracing::info!(connections = view.connections.len(), "shared state loaded");
                Some(Arc::new(view))
            }
            Err(error) => {
                tracing::warn!(table_error = %error, "shared state not read; connections keep this replica's view");
                None
            }
        };
        self.last_view = Some(mono_now());
        let me = self.me.clone();
        self.publish(|l| {
            l.role = Role::Leader;
            l.leader = Some(me);
            l.term = term;
            l.view = view;
        });
    }

    fn lose(&mut self, why: &str) {
        self.fence.close();
        self.telemetry.leader_change();
        tracing::warn!(holder = %self.me, reason = why, "lost leadership");
        self.publish(|l| {
            l.role = Role::Standby;
            l.leader = None;
            l.view = None;
        });
    }

    async fn leader_turn(&mut self) -> Instant {
        let Some(mine) = self.mine.clone() else {
            self.lose("no record of ours");
            return mono_now();
        };
        if !self.fence.is_open() {
            self.lose("the lease could not be renewed in time");
            return mono_now();
        }
        let (record, sent) = (self.new_record(), mono_now());
        match self.store.write_lease(&record, &Expect::Rvn(mine)).await {
            Ok(()) => {
                self.healthy();
                self.mine = Some(record.rvn);
                // A renewal answered after the fence had closed: jobs may
                // have stood down meanwhile, so this is a new term for them.
                let lapsed = !self.fence.is_open();
                self.fence.open_until(self.valid_until(sent));
                if lapsed {
                    self.lose("a renewal arrived after the lease had lapsed");
                    self.become_leader(sent, None).await;
                }
                sent + self.renew_every
            }
            Err(StoreError::Conflict) => {
                self.mine = None;
                self.lose("another replica holds the lease");
                mono_now()
            }
            Err(error) => {
                self.trouble(&error);
                // Retry sooner than usual, and wake when the fence closes
                // so the loss is published at once.
                let now = mono_now();
                let retry = now + self.renew_every / 2;
                match self.fence.valid_until() {
                    Some(until) if until > now => retry.min(until),
                    _ => now,
                }
            }
        }
    }

    async fn release(&mut self) {
        let Some(mine) = self.mine.take() else {
            return;
        };
        let was_leader = self.role() == Role::Leader;
        self.fence.close();
        match self.store.delete_lease(&mine).await {
            Ok(()) => tracing::info!(holder = %self.me, "released leadership"),
            Err(StoreError::Conflict) => {}
            Err(error) => tracing::warn!(
                table_error = %error,
                "lease not released; a standby takes over when it expires"
            ),
        }
        if was_leader {
            self.telemetry.leader_change();
        }
        self.publish(|l| {
            l.role = Role::Standby;
            l.leader = None;
        });
    }
}

#[cfg(test)]
mod tests;
