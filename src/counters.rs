//! Process-wide counters that the remote clients increment as they talk:
//! requests by service and answer. A leaf any layer may use, so that the
//! clients need not know the views; `observe::telemetry` registers the same
//! counters in the metrics it serves.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// A remote service, for `aep_s3_rotator_requests_total{service}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// Adobe IMS token endpoint.
    Ims,
    /// AWS STS.
    Sts,
    /// Flow Service.
    Flow,
}

impl Service {
    /// The `service` label value: `ims`, `sts` or `flow`.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Ims => "ims",
            Service::Sts => "sts",
            Service::Flow => "flow",
        }
    }
}

/// `aep_s3_rotator_requests_total{service, status}`. Cheap to clone: every
/// clone counts into the same family.
#[derive(Debug, Clone, Default)]
pub struct Requests(Family<RequestLabels, Counter>);

/// The labels of [`Requests`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    service: &'static str,
    status: String,
}

impl Requests {
    /// Counts one HTTP/API exchange; `status` is the HTTP status code ("200",
    /// "412") or a short error class ("timeout", "connect", "Throttling").
    pub fn count(&self, service: Service, status: &str) {
        self.0
            .get_or_create(&RequestLabels {
                service: service.as_str(),
                status: status.to_owned(),
            })
            .inc();
    }

    /// The family, for registering in a metrics registry.
    pub fn family(&self) -> Family<RequestLabels, Counter> {
        self.0.clone()
    }
}

/// The results of `aep_s3_rotator_rotate_requests_total{result}`: every
/// connection pushed; some refused or not finished in time; the request
/// itself refused (malformed, unknown ids, not leader and no forwarding);
/// the client's user may not ask.
pub const ROTATE_RESULTS: [&str; 4] = ["pushed", "failed", "rejected", "denied"];

/// `aep_s3_rotator_rotate_requests_total{result}`: `rotate` requests this
/// process answered (`crate::control`). Cheap to clone, like [`Requests`].
#[derive(Debug, Clone)]
pub struct RotateRequests(Family<RotateLabels, Counter>);

/// The labels of [`RotateRequests`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotateLabels {
    result: &'static str,
}

impl Default for RotateRequests {
    /// Every result at zero from the start, so an alert on
    /// `increase(...{result="denied"}[1h]) > 0` works before the first one.
    fn default() -> Self {
        let family = Family::<RotateLabels, Counter>::default();
        for result in ROTATE_RESULTS {
            family.get_or_create(&RotateLabels { result }).inc_by(0);
        }
        Self(family)
    }
}

impl RotateRequests {
    /// Counts one request; `result` is one of [`ROTATE_RESULTS`].
    pub fn count(&self, result: &'static str) {
        self.0.get_or_create(&RotateLabels { result }).inc();
    }

    /// The family, for registering in a metrics registry.
    pub fn family(&self) -> Family<RotateLabels, Counter> {
        self.0.clone()
    }
}
