//! What the scheduler tells systemd, decided without doing it: when
//! `READY=1` goes out (a standby at once; a leader after its first pass),
//! when `STATUS=` is refreshed, and whether a watchdog ping is deserved.
//! Pure: the loop hands it the facts (turns, progress, the time) and carries
//! out its answer through the notifier.

use std::time::Duration;

use tokio::time::Instant;

/// How often the systemd `STATUS=` line is refreshed at most.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Loop turns between two watchdog pings beyond which the loop counts as
/// spinning (and stops feeding the watchdog) when nothing was dispatched or
/// completed: a healthy loop turns a few times per event, never thousands of
/// times for none.
const SPIN_TURNS: u64 = 10_000;

/// What is true of the scheduler when readiness is decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Facts {
    /// This replica is a standby (`[coordination]`).
    pub standby: bool,
    /// This replica may dispatch, the start's listing is over, and every
    /// connection has had an outcome: the first pass is complete.
    pub first_pass_done: bool,
}

/// What to tell systemd after a loop turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Say {
    /// Nothing now.
    Nothing,
    /// `READY=1`, as a standby ready to take over.
    ReadyAsStandby,
    /// `READY=1`: the first pass is complete.
    Ready,
    /// A fresh `STATUS=` line.
    Status,
}

/// A watchdog tick's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ping {
    /// `WATCHDOG=1`.
    Alive,
    /// Still starting (before `READY=1`): ping, asking for more start time.
    ExtendStart,
    /// No progress (wedged or spinning): no ping; log this many turns.
    Withhold {
        /// Loop turns since the last tick.
        turns: u64,
    },
}

/// The readiness bookkeeping of one scheduler.
#[derive(Debug, Default)]
pub(super) struct Readiness {
    ready_sent: bool,
    last_status: Option<Instant>,
    /// Work dispatched or completed since the last watchdog tick.
    progressed: bool,
    turns: u64,
    turns_at_tick: u64,
}

impl Readiness {
    /// One more turn of the loop.
    pub(super) fn turn(&mut self) {
        self.turns += 1;
    }

    /// Turns so far.
    pub(super) fn turns(&self) -> u64 {
        self.turns
    }

    /// A job was dispatched or completed.
    pub(super) fn progressed(&mut self) {
        self.progressed = true;
    }

    /// Whether `READY=1` went out.
    pub(super) fn ready_sent(&self) -> bool {
        self.ready_sent
    }

    /// The next `STATUS=` goes out at once (the role changed).
    pub(super) fn status_now(&mut self) {
        self.last_status = None;
    }

    /// What to tell systemd after a turn at `now`.
    pub(super) fn after_turn(&mut self, facts: Facts, now: Instant) -> Say {
        let say = if !self.ready_sent && facts.standby {
            Say::ReadyAsStandby
        } else if !self.ready_sent && facts.first_pass_done {
            Say::Ready
        } else if self.ready_sent
            && self
                .last_status
                .is_none_or(|at| now.duration_since(at) >= STATUS_INTERVAL)
        {
            Say::Status
        } else {
            return Say::Nothing;
        };
        if matches!(say, Say::Ready | Say::ReadyAsStandby) {
            self.ready_sent = true;
        }
        self.last_status = Some(now);
        say
    }

    /// A watchdog tick: `idle` when no job runs and nothing is overdue.
    /// A loop that made progress, or had nothing it could do, is alive; a
    /// wedged or spinning one is not.
    pub(super) fn tick(&mut self, idle: bool) -> Ping {
        let turns = self.turns - self.turns_at_tick;
        self.turns_at_tick = self.turns;
        let spinning = !self.progressed && turns > SPIN_TURNS;
        let alive = (self.progressed || idle) && !spinning;
        self.progressed = false;
        match (alive, self.ready_sent) {
            (false, _) => Ping::Withhold { turns },
            (true, false) => Ping::ExtendStart,
            (true, true) => Ping::Alive,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST_PASS: Facts = Facts {
        standby: false,
        first_pass_done: true,
    };

    #[tokio::test(start_paused = true)]
    async fn ready_once_after_the_first_pass_then_status_at_most_every_second() {
        let mut r = Readiness::default();
        let t0 = crate::clock::mono_now();
        assert_eq!(r.after_turn(Facts::default(), t0), Say::Nothing);
        assert_eq!(r.after_turn(FIRST_PASS, t0), Say::Ready);
        assert!(r.ready_sent());
        assert_eq!(r.after_turn(FIRST_PASS, t0), Say::Nothing);
        let later = t0 + STATUS_INTERVAL;
        assert_eq!(r.after_turn(FIRST_PASS, later), Say::Status);
        assert_eq!(r.after_turn(FIRST_PASS, later), Say::Nothing);
        r.status_now();
        assert_eq!(r.after_turn(FIRST_PASS, later), Say::Status);
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_is_ready_at_once() {
        let mut r = Readiness::default();
        let standby = Facts {
            standby: true,
            first_pass_done: false,
        };
        assert_eq!(
            r.after_turn(standby, crate::clock::mono_now()),
            Say::ReadyAsStandby
        );
        assert_eq!(
            r.after_turn(FIRST_PASS, crate::clock::mono_now()),
            Say::Nothing
        );
    }

    #[test]
    fn the_watchdog_is_fed_on_progress_or_idleness_never_when_spinning() {
        let mut r = Readiness::default();
        // Starting: pings ask for more start time.
        r.progressed();
        assert_eq!(r.tick(false), Ping::ExtendStart);
        // Busy without progress: wedged.
        r.turn();
        assert_eq!(r.tick(false), Ping::Withhold { turns: 1 });
        // Idle: alive.
        assert_eq!(r.tick(true), Ping::ExtendStart);
        // Spinning: thousands of turns for nothing, idle or not.
        for _ in 0..=SPIN_TURNS {
            r.turn();
        }
        assert_eq!(
            r.tick(true),
            Ping::Withhold {
                turns: SPIN_TURNS + 1
            }
        );
        // After READY=1, plain pings.
        r.after_turn(FIRST_PASS, crate::clock::mono_now());
        r.progressed();
        assert_eq!(r.tick(false), Ping::Alive);
    }
}
