//! What every outward view reads: the scheduler's latest [`Snapshot`], this
//! replica's role (the elector's `watch`, with `[coordination]`) and the
//! process-wide [`Telemetry`] counters. Cheap to clone; reading never locks
//! anything the scheduler or the elector writes for longer than a pointer
//! copy.

use std::sync::Arc;

use tokio::sync::watch;

use super::status::{Snapshot, Snapshots};
use super::telemetry::Telemetry;
use crate::coordination::leadership::{Leadership, Role};

/// The sources of `/status`, `/readyz` and `/metrics`.
#[derive(Debug, Clone)]
pub struct Views {
    /// Process-wide counters.
    pub telemetry: Arc<Telemetry>,
    /// The scheduler's snapshots.
    pub snapshots: Snapshots,
    /// The elector's word (`None`: coordination off, the only writer).
    pub leadership: Option<watch::Receiver<Leadership>>,
}

/// This replica's role, as `/readyz`, `/status` and `leader` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleView {
    /// Leader, standby or starting.
    pub role: Role,
    /// The lease holder as last seen.
    pub leader: Option<String>,
    /// The coordination table's last failure, while it lasts.
    pub trouble: Option<String>,
}

impl Views {
    /// The connections as last published.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshots.borrow())
    }

    /// This replica's role (`None`: coordination off, the only writer).
    pub fn role(&self) -> Option<RoleView> {
        let leadership = self.leadership.as_ref()?.borrow();
        Some(RoleView {
            role: leadership.role,
            leader: leadership.leader.clone(),
            trouble: leadership.trouble.clone(),
        })
    }
}
