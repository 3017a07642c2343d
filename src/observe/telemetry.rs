//! Telemetry: the process-wide counters (requests by service and status,
//! pre-push checks, listings, discovery conflicts, leader changes).
//!
//! Nothing here is per connection: a connection's numbers live in the
//! connection and reach `/metrics` through the scheduler's snapshot
//! ([`super::metrics`]). Every counter is a lock-free atomic, cloned into
//! whoever counts (the remote clients take [`crate::counters::Requests`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

pub use super::status::*;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ListingLabels {
    pub(super) sandbox: String,
    pub(super) outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PrepushLabels {
    pub(super) result: &'static str,
}

/// The results of `aep_s3_rotator_prepush_checks_total{result}`.
pub const PREPUSH_RESULTS: [&str; 4] = ["allowed", "denied", "error", "skipped"];

/// The process-wide counters. Shared as `Arc<Telemetry>`.
#[derive(Debug)]
pub struct Telemetry {
    /// `requests_total{service,status}`.
    pub(super) requests: crate::counters::Requests,
    /// `prepush_checks_total{result}`.
    pub(super) prepush_checks: Family<PrepushLabels, Counter>,
    /// `discovery_listings_total{sandbox,outcome}`: one per listing (all its pages).
    pub(super) listings: Family<ListingLabels, Counter>,
    /// `discovery_conflicts`: connections rules disagree on, not rotated.
    pub(super) discovery_conflicts: Gauge,
    /// `leader_changes_total`: this replica became or stopped being the leader.
    pub(super) leader_changes: Counter,
    /// `rotate_requests_total{result}`: `rotate` requests answered.
    pub(super) rotate_requests: crate::counters::RotateRequests,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// Every counter at zero.
    pub fn new() -> Self {
        Self {
            requests: crate::counters::Requests::default(),
            prepush_checks: {
                // Every result at zero from the start, so alerts on
                // `increase(...{result="denied"})` work before the first one.
                let family = Family::<PrepushLabels, Counter>::default();
                for result in PREPUSH_RESULTS {
                    family.get_or_create(&PrepushLabels { result }).inc_by(0);
                }
                family
            },
            listings: Family::default(),
            discovery_conflicts: Gauge::default(),
            leader_changes: Counter::default(),
            rotate_requests: crate::counters::RotateRequests::default(),
        }
    }

    /// The `rotate` request counter (`crate::control` counts into it).
    pub fn rotate_requests(&self) -> &crate::counters::RotateRequests {
        &self.rotate_requests
    }

    /// Counts one change of this replica's leadership (gained or lost).
    pub fn leader_change(&self) {
        self.leader_changes.inc();
    }

    /// Counts one listing of `sandbox` (rules or bulk etags), all pages.
    pub fn discovery_listing(&self, sandbox: &str, ok: bool) {
        self.listings
            .get_or_create(&ListingLabels {
                sandbox: sandbox.to_owned(),
                outcome: if ok { "ok" } else { "failure" },
            })
            .inc();
    }

    /// How many connections are not rotated now because rules disagree on them.
    pub fn set_discovery_conflicts(&self, conflicts: usize) {
        self.discovery_conflicts
            .set(i64::try_from(conflicts).unwrap_or(i64::MAX));
    }

    /// Counts one pre-push S3 check; `result` is one of [`PREPUSH_RESULTS`].
    pub fn prepush_check(&self, result: &'static str) {
        self.prepush_checks
            .get_or_create(&PrepushLabels { result })
            .inc();
    }

    /// Counts one HTTP/API exchange (see [`crate::counters::Requests`]).
    pub fn request(&self, service: Service, status: &str) {
        self.requests.count(service, status);
    }

    /// The request counters, for the remote clients to count into.
    pub fn requests(&self) -> crate::counters::Requests {
        self.requests.clone()
    }
}
