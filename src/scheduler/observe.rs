//! What the scheduler tells systemd (readiness, `STATUS=`, watchdog pings,
//! as [`super::readiness`] decides) and the final report of a run. Each is
//! read from the connections' views when it is due, never kept as a copy.

use std::time::Duration;

use super::Daemon;
use super::readiness::{Facts, Ping, Say};
use crate::coordination::Role;
use crate::observe::status::{ConnectionStatus, Summary};

/// What a finished run reports.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One entry per connection, in config order.
    pub connections: Vec<ConnectionStatus>,
    /// Turns of the scheduler loop (for the benchmark: turns per rotation).
    pub loop_turns: u64,
}

impl Report {
    /// True when no connection's last attempt failed.
    pub fn all_ok(&self) -> bool {
        self.connections.iter().all(|c| c.last_error.is_none())
    }
}

impl Daemon {
    /// A watchdog tick: pings if the loop made progress since the last
    /// one, or had nothing it could do; a wedged or spinning loop stops
    /// feeding it.
    pub(super) fn watchdog(&mut self) {
        let now = self.clock.now();
        // A standby's due connections wait for leadership, not for the loop.
        let overdue = self.leading && self.next_deadline().is_some_and(|at| at <= now);
        let idle = self.jobs.is_empty() && !overdue;
        match self.readiness.tick(idle) {
            Ping::Alive => self.notifier.watchdog(),
            // Before READY=1 (the first pass is still going): three ping
            // intervals more to start, asked again at each ping.
            Ping::ExtendStart => match self.notifier.watchdog_interval() {
                Some(interval) => self
                    .notifier
                    .watchdog_extending_start(interval.saturating_mul(3)),
                None => self.notifier.watchdog(),
            },
            Ping::Withhold { turns } => tracing::warn!(
                in_flight = self.jobs.len(),
                loop_turns = turns,
                "scheduler made no progress since the last watchdog ping; not pinging"
            ),
        }
    }

    /// Readiness and `STATUS=` after a turn.
    pub(super) fn after_progress(&mut self) {
        let facts = if self.readiness.ready_sent() {
            Facts::default()
        } else {
            Facts {
                standby: self
                    .leadership
                    .as_ref()
                    .is_some_and(|l| l.borrow().role == Role::Standby),
                first_pass_done: self.leading && self.intake.is_none() && self.all_settled(),
            }
        };
        match self.readiness.after_turn(facts, crate::clock::mono_now()) {
            Say::Nothing => {}
            Say::ReadyAsStandby => {
                // A healthy standby is ready: ready to take over.
                let line = self.status_line();
                tracing::info!(status = %line, "ready as a standby");
                self.notifier.ready(&line);
            }
            Say::Ready => {
                let line = self.status_line();
                tracing::info!(status = %line, "first pass complete");
                self.notifier.ready(&line);
            }
            Say::Status => self.notifier.status(&self.status_line()),
        }
    }

    /// Whether every connection has had an outcome (see `settled`): a
    /// first pass of 10,000 rotations would otherwise look at up to 10,000
    /// connections on each of its 10,000 loop turns.
    fn all_settled(&mut self) -> bool {
        while let Some(&key) = self.order.get(self.settled) {
            if self.connections.get(key).is_some_and(|c| !c.had_outcome()) {
                return false;
            }
            self.settled += 1;
        }
        true
    }

    pub(super) fn status_line(&self) -> String {
        if let Some(line) = self.standby_line() {
            return line;
        }
        let now = self.clock.now();
        let summary = Summary::of(
            self.connections.values().map(|c| c.view().as_ref()),
            self.config.rotation.refresh_before,
            now,
        );
        let next = summary
            .next_rotation_at
            .map(|at| {
                let wait = crate::clock::until(now, at);
                format!(
                    ", next rotation in {}",
                    humantime::format_duration(Duration::from_secs(wait.as_secs()))
                )
            })
            .unwrap_or_default();
        let role = if self.leadership.is_some() {
            "leader: "
        } else {
            ""
        };
        let mut line = format!(
            "{role}{}/{} connections fresh",
            summary.fresh, summary.total
        );
        for (count, label) in [(summary.failing, "failing"), (summary.expired, "expired")] {
            if count > 0 {
                line.push_str(&format!(", {count} {label}"));
            }
        }
        line + &next
    }

    pub(super) fn report(&self) -> Report {
        let connections = self
            .order
            .iter()
            .filter_map(|key| self.connections.get(*key))
            .map(|c| c.view().as_ref().clone())
            .collect();
        Report {
            connections,
            loop_turns: self.readiness.turns(),
        }
    }
}
