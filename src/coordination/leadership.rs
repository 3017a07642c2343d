//! This replica's role and what the elector publishes with it: a leaf of
//! its own, so that the views (`observe`) can read the role without
//! importing the elector.

use super::local::StateSnapshot;
use std::sync::Arc;

/// This replica's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The lease has not been read yet.
    Starting,
    /// This replica holds the lease and writes.
    Leader,
    /// Another replica holds it (or nobody can tell); this one watches.
    Standby,
}

impl Role {
    /// `leader`, `standby`, `starting`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Leader => "leader",
            Self::Standby => "standby",
        }
    }
}

/// What the elector tells the scheduler (through a `watch` channel).
#[derive(Debug, Clone)]
pub struct Leadership {
    /// This replica's role.
    pub role: Role,
    /// The holder of the lease as last seen (`None`: nobody or unknown).
    pub leader: Option<String>,
    /// Incremented every time this replica becomes the leader.
    pub term: u64,
    /// The shared state read with this change, if one was read.
    pub view: Option<Arc<StateSnapshot>>,
    /// The last failure to reach the table, while it lasts.
    pub trouble: Option<String>,
}

impl Leadership {
    /// The state before the lease is first read.
    pub fn starting() -> Self {
        Self {
            role: Role::Starting,
            leader: None,
            term: 0,
            view: None,
            trouble: None,
        }
    }

    /// The systemd `STATUS=` prefix for a replica that is not the leader.
    pub fn status_line(&self) -> String {
        let leader = self.leader.as_deref().unwrap_or("unknown");
        match self.role {
            Role::Starting => "starting (reading the lease)".to_owned(),
            Role::Leader => "leader".to_owned(),
            Role::Standby => match &self.trouble {
                Some(trouble) => {
                    format!("standby (leader: {leader}; coordination table: {trouble})")
                }
                None => format!("standby (leader: {leader})"),
            },
        }
    }
}
