//! Connections that wait on a failed shared dependency (the IMS token, one
//! STS identity) park on it instead of each running its own backoff; one
//! that comes due while its dependency is down parks without running a job.
//!
//! During an outage every connection's attempt is answered from the one
//! failed request (the clients share a failure for a short while), but each
//! connection still woke on its own backoff: 10,000 connections made ~47,000
//! request-free attempts in ten seconds. Now one connection, the *prober*,
//! keeps its own backoff (its attempts are the real requests, one per
//! backoff step); every other connection given the shared failure parks
//! until the dependency answers (any job that got past it releases them all,
//! due at once) or until its own bound: [`EXPIRY_MARGIN`] before the
//! credentials on it expire, or `retry_max` when its expiry is unknown,
//! never later than parking found it due anyway.
//!
//! The rules, and what keeps them safe:
//! - a connection is parked only while another connection probes that
//!   dependency; the first to meet a failure with nobody probing becomes
//!   the prober (it never parks);
//! - a prober that is removed releases whatever parked on it;
//! - each job's result first takes its connection out of the parking
//!   (whatever it was parked on, it has just tried), so a connection is
//!   never released into an extra rotation; a prober stays the prober until
//!   its dependency answers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::{earlier, later};
use crate::policy::schedule::EXPIRY_MARGIN;
use crate::remote::sts::StsRequest;
use crate::rotation::{JobResult, RotationError};

use super::table::Key;

/// A dependency many connections share.
///
/// An STS identity is told apart by its shared copy, not its contents: the
/// daemon holds one `Arc` per distinct request ([`super::identities`]),
/// and a parked connection's dependency keeps that copy alive, so pointer
/// identity is request identity, and comparing or hashing one costs a word,
/// not the role, session name, policy and tags.
#[derive(Debug, Clone)]
pub(super) enum Dependency {
    /// The IMS access token (one for every connection).
    Ims,
    /// The STS credentials of one identity.
    Sts(Arc<StsRequest>),
}

impl PartialEq for Dependency {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Ims, Self::Ims) => true,
            (Self::Sts(a), Self::Sts(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Dependency {}

impl std::hash::Hash for Dependency {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            Self::Ims => state.write_u8(0),
            Self::Sts(sts) => {
                state.write_u8(1);
                std::ptr::hash(Arc::as_ptr(sts), state);
            }
        }
    }
}

/// What one job's result says about the shared dependencies.
#[derive(Debug, Default)]
pub(super) struct Seen {
    /// The job was given another request's failure of this dependency.
    pub shared_failure: Option<Dependency>,
    /// The job's own request to this dependency failed (it probes).
    pub real_failure: Option<Dependency>,
    /// The job got past these: they answer again.
    pub answered: Vec<Dependency>,
}

impl Seen {
    /// What `result` of a job with identity `sts` says.
    pub(super) fn of(result: &JobResult, sts: &Arc<StsRequest>) -> Self {
        let sts_dep = || Dependency::Sts(Arc::clone(sts));
        match result {
            JobResult::Rotated { .. } | JobResult::WouldRotate { .. } => Self {
                answered: vec![Dependency::Ims, sts_dep()],
                ..Self::default()
            },
            JobResult::Unchanged { .. } => Self {
                answered: vec![Dependency::Ims],
                ..Self::default()
            },
            JobResult::Failed { error, .. } => match error {
                RotationError::Ims(e) if e.is_shared() => Self {
                    shared_failure: Some(Dependency::Ims),
                    ..Self::default()
                },
                RotationError::Ims(_) => Self {
                    real_failure: Some(Dependency::Ims),
                    ..Self::default()
                },
                // STS is asked after the IMS token was had.
                RotationError::Sts(e) if e.is_shared() => Self {
                    shared_failure: Some(sts_dep()),
                    answered: vec![Dependency::Ims],
                    ..Self::default()
                },
                RotationError::Sts(_) => Self {
                    real_failure: Some(sts_dep()),
                    answered: vec![Dependency::Ims],
                    ..Self::default()
                },
                // The pre-push check runs on credentials STS gave.
                RotationError::Prepush(_) => Self {
                    answered: vec![Dependency::Ims, sts_dep()],
                    ..Self::default()
                },
                RotationError::Flow(_) | RotationError::Conflicts(_) => Self {
                    answered: vec![Dependency::Ims],
                    ..Self::default()
                },
                RotationError::Cancelled
                | RotationError::Internal(_)
                | RotationError::NotLeader => Self::default(),
            },
        }
    }
}

/// Who parks on what, and who probes (connections by their key).
#[derive(Debug, Default)]
pub(super) struct Parking {
    parked: HashMap<Dependency, HashSet<Key>>,
    probers: HashMap<Dependency, Key>,
}

impl Parking {
    /// Whether a connection other than `key` probes `dependency` (a removed
    /// prober is forgotten, [`Self::forget`]).
    pub(super) fn probed_by_another(&self, dependency: &Dependency, key: Key) -> bool {
        self.probers
            .get(dependency)
            .is_some_and(|prober| *prober != key)
    }

    /// The dependency `key` (of identity `sts`) would wait on now: one that
    /// another connection probes.
    pub(super) fn down_for(&self, sts: &Arc<StsRequest>, key: Key) -> Option<Dependency> {
        if self.probers.is_empty() {
            // Nothing is down: the common case, without a clone or a hash.
            return None;
        }
        if self.probed_by_another(&Dependency::Ims, key) {
            return Some(Dependency::Ims);
        }
        let sts = Dependency::Sts(Arc::clone(sts));
        self.probed_by_another(&sts, key).then_some(sts)
    }

    /// `key` probes `dependency` (unless another already does).
    pub(super) fn probe(&mut self, dependency: Dependency, key: Key) {
        self.probers.entry(dependency).or_insert(key);
    }

    /// `key` waits for `dependency`.
    pub(super) fn park(&mut self, dependency: Dependency, key: Key) {
        self.parked.entry(dependency).or_default().insert(key);
    }

    /// `dependency` answers: nobody probes it any more, and the connections
    /// parked on it go (their keys).
    pub(super) fn release(&mut self, dependency: &Dependency) -> Vec<Key> {
        self.probers.remove(dependency);
        self.parked
            .remove(dependency)
            .map(|keys| keys.into_iter().collect())
            .unwrap_or_default()
    }

    /// `key` tried again: it is parked nowhere (it may park anew).
    pub(super) fn unpark(&mut self, key: Key) {
        for keys in self.parked.values_mut() {
            keys.remove(&key);
        }
        self.parked.retain(|_, keys| !keys.is_empty());
    }

    /// `key` is gone: parked nowhere; and if it probed, nobody does now, and
    /// what parked there goes (their keys).
    pub(super) fn forget(&mut self, key: Key) -> Vec<Key> {
        self.unpark(key);
        let probed: Vec<Dependency> = self
            .probers
            .iter()
            .filter(|(_, prober)| **prober == key)
            .map(|(dependency, _)| dependency.clone())
            .collect();
        probed
            .iter()
            .flat_map(|dependency| self.release(dependency))
            .collect()
    }
}

/// The latest a parked connection waits: [`EXPIRY_MARGIN`] before the
/// credentials on it expire, or `retry_max` from now when that is unknown.
pub(super) fn parked_until(
    expires_at: Option<SystemTime>,
    now: SystemTime,
    retry_max: Duration,
) -> SystemTime {
    match expires_at {
        Some(expires_at) => earlier(expires_at, EXPIRY_MARGIN),
        None => later(now, retry_max),
    }
}
