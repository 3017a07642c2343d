//! The start's listing as the scheduler takes it: connections known at the
//! start are held until a list page seeds their etag (and S3 target), the
//! connections rules find are added page by page, and nothing is held past
//! [`MAX_HOLD`] or its credentials' expiry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::Daemon;
use super::table::Key;
use crate::clock::earlier;
use crate::config::ConnectionConfig;
use crate::connection::{Action, Connection, Event, Phase};
use crate::policy::schedule::EXPIRY_MARGIN;
use crate::remote::sts::StsRequest;

/// How long past its due time the start's listing may hold a connection.
/// The listing normally seeds every etag within seconds (10,000
/// connections: under 3 s); a list API that answers slowly (each page within
/// the request timeout, but many pages) must not keep connections from
/// rotating, so after this those not reached yet read their own etag (a
/// `GET` each). A connection whose credentials expire sooner is held only
/// until [`EXPIRY_MARGIN`] before their expiry.
pub const MAX_HOLD: Duration = Duration::from_secs(60);

/// What the start's listing tells a daemon started with
/// [`Daemon::hold_until_listed`], page by page (see
/// [`crate::discovery::resolve_streaming`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Intake {
    /// Listed so far: etags and S3 targets by id (explicit connections' id
    /// chunks, or discovered ones), and connections found by rules on a
    /// page (to add, with their etags and targets).
    Found {
        /// Connections the rules found on this page.
        added: Vec<Arc<ConnectionConfig>>,
        /// Etags by connection id.
        etags: HashMap<String, String>,
        /// S3 targets by connection id.
        targets: HashMap<String, crate::remote::s3probe::S3Target>,
    },
    /// The start's listing is over: whatever is still held goes now (it
    /// will `GET` its etag).
    Done,
}

/// What is known of a connection before it is added.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Listed<'a> {
    /// Its state file record.
    saved: Option<&'a crate::coordination::local::PersistedConnection>,
    /// The etag and S3 target its list item carried.
    etag: Option<&'a str>,
    target: Option<&'a crate::remote::s3probe::S3Target>,
}

impl Daemon {
    /// Etags read in bulk (list pages) before the first pass: each goes to
    /// its connection as [`Event::Listed`].
    pub fn seed_etags(&mut self, etags: &HashMap<String, String>) {
        for (id, etag) in etags {
            self.event_for(
                id,
                Event::Listed {
                    etag: Some(etag.clone()),
                    s3: None,
                },
            );
        }
    }

    /// S3 targets read in bulk (list pages), by connection id; seed them
    /// before [`Self::seed_etags`] so the first job holds both.
    pub fn seed_s3_targets(&mut self, targets: &HashMap<String, crate::remote::s3probe::S3Target>) {
        for (id, target) in targets {
            self.event_for(
                id,
                Event::Listed {
                    etag: None,
                    s3: Some(Box::new(target.clone())),
                },
            );
        }
    }

    /// Starts with every connection known so far (the explicit ones)
    /// **held**: in `/status`, the metrics and restored from the state file
    /// as usual, but not dispatched until `intake` seeds its etag with an
    /// [`Intake::Found`] or says [`Intake::Done`] (a closed channel counts
    /// as `Done`: nothing is held forever). Connections a `Found` adds
    /// start at once with the etag it carries. `READY=1` (first pass
    /// complete) waits for `Done`: before it, most connections may not even
    /// be known yet.
    pub fn hold_until_listed(&mut self, intake: mpsc::UnboundedReceiver<Intake>) {
        for key in self.connections.keys() {
            self.event(key, Event::Hold);
        }
        self.intake = Some(intake);
        self.plan_hold();
    }

    /// The connections held now.
    fn held(&self) -> Vec<Key> {
        self.connections
            .iter()
            .filter(|(_, c)| c.is_held())
            .map(|(key, _)| key)
            .collect()
    }

    /// The latest time a held connection may wait for its page: [`MAX_HOLD`]
    /// past its due time, and never later than [`EXPIRY_MARGIN`] before its
    /// credentials expire. `None` when it is not waiting at all.
    fn hold_limit(&self, key: Key) -> Option<SystemTime> {
        let connection = self.connections.get(key)?;
        let Phase::Waiting(due) = connection.phase() else {
            return None;
        };
        if !connection.is_held() {
            return None;
        }
        let by_due = crate::clock::later(due, MAX_HOLD);
        Some(match connection.credentials_expire_at() {
            Some(expires_at) => by_due.min(earlier(expires_at, EXPIRY_MARGIN)),
            None => by_due,
        })
    }

    /// Sets when the hold is looked at next (see `hold_until`).
    fn plan_hold(&mut self) {
        self.hold_until = self
            .connections
            .iter()
            .filter_map(|(key, _)| self.hold_limit(key))
            .min()
            .map(|at| self.clock.instant_at(at));
    }

    /// Schedules one held connection at its own due time: it reads its own
    /// etag (a later page no longer seeds it).
    fn release(&mut self, key: Key) {
        self.event(key, Event::Release);
    }

    /// Schedules every held connection at its own due time (each will GET
    /// its etag).
    fn release_held(&mut self) {
        self.hold_until = None;
        for key in self.held() {
            self.release(key);
        }
    }

    /// The hold's time came: the held connections past their
    /// [`Self::hold_limit`] go now and read their own etag (later pages
    /// still add connections and seed the others).
    pub(super) fn hold_expired(&mut self) {
        // Decided on the wall clock, which `plan_hold` converts from: a
        // connection not due to go now has a limit strictly in the future,
        // so this never turns into a loop that fires at once.
        let now = self.clock.now();
        let held = self.held();
        let late: Vec<Key> = held
            .iter()
            .copied()
            .filter(|key| self.hold_limit(*key).is_none_or(|limit| limit <= now))
            .collect();
        if !late.is_empty() {
            tracing::warn!(
                released = late.len(),
                still_held = held.len() - late.len(),
                "the start's listing is slow; connections it has not reached read their own etag"
            );
        }
        for key in late {
            self.release(key);
        }
        self.plan_hold();
    }

    /// One message of the start's listing (`None`: the channel closed).
    pub(super) fn on_intake(&mut self, intake: Option<Intake>) {
        let now = self.clock.now();
        let Some(Intake::Found {
            added,
            etags,
            targets,
        }) = intake
        else {
            // Done, or the listing is gone: release the rest as they are
            // (they will GET their etag), at their own due time.
            self.intake = None;
            self.unclaimed = std::collections::BTreeMap::new();
            self.release_held();
            return;
        };
        for config in added {
            if self.connections.contains_id(&config.id)
                || !(self.options.only.is_empty() || self.options.only.contains(&config.id))
            {
                continue;
            }
            let sts = self
                .identities
                .intern(StsRequest::for_connection(&self.config, &config));
            let id = config.id.clone();
            let saved = self.unclaimed.remove(&id);
            let listed = Listed {
                saved: saved.as_ref(),
                etag: etags.get(&id).map(String::as_str),
                target: targets.get(&id),
            };
            self.add_connection(config, sts, now, listed);
        }
        for (id, etag) in etags {
            let Some(key) = self.connections.key(&id) else {
                continue;
            };
            if !self.connections.get(key).is_some_and(|c| c.is_held()) {
                continue;
            }
            let s3 = targets.get(&id).cloned().map(Box::new);
            self.event(
                key,
                Event::Listed {
                    etag: Some(etag),
                    s3,
                },
            );
        }
    }

    /// A connection the daemon did not know (a reload's, or one the start's
    /// listing found): restored from its state file record when there is
    /// one, seeded with what its list item said, then due.
    pub(super) fn add_connection(
        &mut self,
        config: Arc<ConnectionConfig>,
        sts: Arc<StsRequest>,
        now: SystemTime,
        listed: Listed<'_>,
    ) {
        let key = self
            .connections
            .insert(Box::new(Connection::new(config, sts, now)));
        self.order.push(key);
        let mut told = false;
        if let Some(saved) = listed.saved {
            self.event(key, Event::Restored(Box::new(saved.clone())));
            told = true;
        }
        if listed.etag.is_some() || listed.target.is_some() {
            self.event(
                key,
                Event::Listed {
                    etag: listed.etag.map(str::to_owned),
                    s3: listed.target.cloned().map(Box::new),
                },
            );
            told = true;
        }
        if !told {
            // A new connection is due at once.
            self.follow(key, Action::WaitUntil(now));
        }
    }
}

/// The start's next listing message (`None` once: the channel closed);
/// never once the listing is over.
pub(super) async fn next_intake(
    intake: &mut Option<mpsc::UnboundedReceiver<Intake>>,
) -> Option<Intake> {
    match intake {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}
