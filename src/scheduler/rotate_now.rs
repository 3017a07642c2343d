//! `rotate` requests inside the scheduler: which connections a request
//! names, and who waits for each one's requested job.
//!
//! A request reaches the loop on an `mpsc` channel ([`Daemon::serve_rotate_requests`]);
//! each named connection gets [`Event::RotateNow`] (its state machine
//! decides when the job runs: at once, or right after the job in flight),
//! and the requester gets one receiver per connection that answers with
//! the result of *that* job: not of a scheduled job that was already
//! running when the request came.
//!
//! The transport (the control socket, the coordination table) is not here:
//! see `crate::control`.

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};

use super::Daemon;
use crate::connection::Event;
use crate::rotation::{JobResult, RotationError};

/// Which connections a request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every connection this daemon rotates.
    All,
    /// These ids, and every connection in these sandboxes.
    Only {
        /// Connection ids.
        connections: Vec<String>,
        /// Sandbox names.
        sandboxes: Vec<String>,
    },
}

/// One `rotate` request, as the loop receives it.
#[derive(Debug)]
pub struct RotateRequest {
    /// Which connections.
    pub selection: Selection,
    /// Where the loop answers: the connections it took on, or why none.
    pub reply: oneshot::Sender<Result<Vec<Pending>, RotateRefusal>>,
}

/// A connection a request was taken on for; `outcome` answers when its
/// requested job ends (dropped unanswered when the daemon stops first).
#[derive(Debug)]
pub struct Pending {
    /// Connection id.
    pub id: String,
    /// Its sandbox.
    pub sandbox: String,
    /// Its display name.
    pub name: String,
    /// The requested job's result.
    pub outcome: oneshot::Receiver<RotateOutcome>,
}

/// How one connection's requested job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateOutcome {
    /// New credentials are on the connection.
    Pushed {
        /// Their access key id (not secret).
        access_key_id: String,
        /// When they expire.
        expires_at: SystemTime,
    },
    /// The daemon runs with `--dry-run`: nothing was pushed.
    DryRun {
        /// The access key id that would have been pushed.
        access_key_id: String,
    },
    /// Nothing was pushed, for this reason (safe to print: the job's error).
    Refused(String),
}

impl RotateOutcome {
    /// What a finished job means to the requester.
    pub fn of(result: &JobResult) -> Self {
        match result {
            JobResult::Rotated {
                access_key_id,
                expires_at,
                ..
            } => Self::Pushed {
                access_key_id: access_key_id.clone(),
                expires_at: *expires_at,
            },
            JobResult::WouldRotate { access_key_id, .. } => Self::DryRun {
                access_key_id: access_key_id.clone(),
            },
            // A requested job is never a resume check (`Connection::on_due`).
            JobResult::Unchanged { .. } => {
                Self::Refused("the connection was left unchanged".to_owned())
            }
            JobResult::Failed {
                error: RotationError::Cancelled,
                ..
            } => Self::Refused("the daemon is shutting down".to_owned()),
            JobResult::Failed {
                error: RotationError::NotLeader,
                ..
            } => Self::Refused(
                "this replica lost the coordination lease before it pushed".to_owned(),
            ),
            JobResult::Failed { error, .. } => Self::Refused(error.to_string()),
        }
    }
}

/// Why the loop took a request on for no connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateRefusal {
    /// With `[coordination]`: this replica is not the leader (the caller
    /// forwards the request through the table).
    NotLeader,
    /// Ids or sandboxes this daemon does not rotate (nothing was started).
    Unknown {
        /// Connection ids not known (nor names of exactly one connection).
        connections: Vec<String>,
        /// Sandboxes with no connection.
        sandboxes: Vec<String>,
    },
    /// The daemon has no connection at all.
    NoConnections,
    /// The loop is gone or wedged (shutdown): nothing was started.
    Stopping,
}

/// Who waits for which connection's requested job.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    by_id: HashMap<String, Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    /// Requests whose job has not started yet.
    queued: Vec<oneshot::Sender<RotateOutcome>>,
    /// Requests the job in flight answers.
    running: Vec<oneshot::Sender<RotateOutcome>>,
}

impl Waiters {
    fn add(&mut self, id: &str, tx: oneshot::Sender<RotateOutcome>) {
        self.by_id.entry(id.to_owned()).or_default().queued.push(tx);
    }

    /// A requested job of `id` starts: it answers the requests queued so far.
    pub(super) fn started(&mut self, id: &str) {
        if let Some(waiting) = self.by_id.get_mut(id) {
            let queued = std::mem::take(&mut waiting.queued);
            waiting.running.extend(queued);
        }
    }

    /// A job of `id` ended: if it was a requested one, its requesters learn how.
    pub(super) fn finished(&mut self, id: &str, result: &JobResult) {
        let Some(waiting) = self.by_id.get_mut(id) else {
            return;
        };
        if waiting.running.is_empty() {
            return; // a scheduled job; the requested one comes next
        }
        let outcome = RotateOutcome::of(result);
        for tx in waiting.running.drain(..) {
            let _ = tx.send(outcome.clone());
        }
        if waiting.queued.is_empty() {
            self.by_id.remove(id);
        }
    }

    /// `id` was removed (a reload): nothing more will run for it.
    pub(super) fn dropped(&mut self, id: &str) {
        if let Some(waiting) = self.by_id.remove(id) {
            for tx in waiting.queued.into_iter().chain(waiting.running) {
                let _ = tx.send(RotateOutcome::Refused(
                    "the connection was removed from the daemon's config meanwhile".to_owned(),
                ));
            }
        }
    }
}

impl Daemon {
    /// Takes `rotate` requests from `requests` while it runs.
    pub fn serve_rotate_requests(&mut self, requests: mpsc::Receiver<RotateRequest>) {
        self.requests = Some(requests);
    }

    /// The channel closed: no more requests (the server stopped).
    pub(super) fn on_rotate_request(&mut self, request: Option<RotateRequest>) {
        let Some(request) = request else {
            self.requests = None;
            return;
        };
        let answer = self.take_on(&request.selection);
        let _ = request.reply.send(answer);
    }

    fn take_on(&mut self, selection: &Selection) -> Result<Vec<Pending>, RotateRefusal> {
        if !self.leading {
            return Err(RotateRefusal::NotLeader);
        }
        let ids = self.select(selection)?;
        let since = crate::clock::mono_now();
        let mut pending = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(key) = self.connections.key(&id) else {
                continue;
            };
            let Some(connection) = self.connections.get(key) else {
                continue;
            };
            let (tx, rx) = oneshot::channel();
            pending.push(Pending {
                id: id.clone(),
                sandbox: connection.config().sandbox.clone(),
                name: connection.config().name.clone(),
                outcome: rx,
            });
            self.waiters.add(&id, tx);
            self.event(key, Event::RotateNow { since });
        }
        Ok(pending)
    }

    /// The ids `selection` names, sorted; every unknown name is reported.
    fn select(&self, selection: &Selection) -> Result<Vec<String>, RotateRefusal> {
        let mut ids = BTreeSet::new();
        match selection {
            Selection::All => ids.extend(self.connections.values().map(|c| c.config().id.clone())),
            Selection::Only {
                connections,
                sandboxes,
            } => {
                // One pass over the connections, whatever the request
                // holds: it may name 20,000 things, and the loop turns
                // for nothing else meanwhile.
                let mut by_name: HashMap<&str, Option<&str>> = HashMap::new();
                let mut in_sandbox: HashMap<&str, Vec<&str>> = HashMap::new();
                for connection in self.connections.values() {
                    let config = connection.config();
                    by_name
                        .entry(config.name.as_str())
                        .and_modify(|only| *only = None)
                        .or_insert(Some(config.id.as_str()));
                    in_sandbox
                        .entry(config.sandbox.as_str())
                        .or_default()
                        .push(config.id.as_str());
                }
                // An id, or a name only one connection has (as `once`).
                let mut unknown = Vec::new();
                for wanted in connections {
                    if self.connections.contains_id(wanted) {
                        ids.insert(wanted.clone());
                    } else if let Some(Some(only)) = by_name.get(wanted.as_str()) {
                        ids.insert((*only).to_owned());
                    } else {
                        unknown.push(wanted.clone());
                    }
                }
                let empty: Vec<String> = sandboxes
                    .iter()
                    .filter(|s| !in_sandbox.contains_key(s.as_str()))
                    .cloned()
                    .collect();
                if !unknown.is_empty() || !empty.is_empty() {
                    return Err(RotateRefusal::Unknown {
                        connections: unknown,
                        sandboxes: empty,
                    });
                }
                for sandbox in sandboxes {
                    if let Some(members) = in_sandbox.get(sandbox.as_str()) {
                        ids.extend(members.iter().map(|id| (*id).to_owned()));
                    }
                }
            }
        }
        if ids.is_empty() {
            return Err(RotateRefusal::NoConnections);
        }
        Ok(ids.into_iter().collect())
    }
}

#[cfg(test)]
mod tests;
