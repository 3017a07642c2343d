//! The time seam: the one place that reads a clock, and checked time arithmetic.
//!
//! The scheduler and the connection state machine never call `now()` on a
//! clock of their own: they hold a [`Clock`] and ask it. In production it is
//! the wall clock; in tests it is tokio's clock anchored at a wall-clock
//! instant, so `#[tokio::test(start_paused = true)]` moves the daemon's sense
//! of "now" and its sleeps together, and an hour of schedule runs in
//! milliseconds.
//!
//! Every value that reaches time arithmetic from outside (an IMS
//! `expires_in`, a `Retry-After`, an STS `Expiration`, a state-file time, a
//! config duration) goes through [`later`] / [`until`] / [`capped`]: they
//! saturate instead of overflowing, so no remote answer can panic a task.

use std::time::{Duration, SystemTime};

/// The furthest any computed time is put ahead of its base: a century is
/// beyond any credential, token or retry this daemon handles, and far enough
/// inside `SystemTime`'s and tokio `Instant`'s range that adding it never
/// overflows on any platform.
pub const HORIZON: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Where "now" comes from.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The operating system's wall clock (production).
    System,
    /// tokio's clock, anchored: `now() = wall + (tokio_now − mono)`. With
    /// paused tokio time, tests advance it with `tokio::time::advance` or by
    /// sleeping.
    Tokio {
        /// The wall-clock time at `mono`.
        wall: SystemTime,
        /// The tokio instant that corresponds to `wall`.
        mono: tokio::time::Instant,
    },
}

impl Clock {
    /// The wall clock.
    pub fn system() -> Self {
        Self::System
    }

    /// tokio's clock, reading `wall` right now (tests: under paused time).
    pub fn tokio_at(wall: SystemTime) -> Self {
        Self::Tokio {
            wall,
            mono: mono_now(),
        }
    }

    /// The current wall-clock time as this clock sees it.
    pub fn now(&self) -> SystemTime {
        match self {
            Self::System => wall_now(),
            Self::Tokio { wall, mono } => later(*wall, mono.elapsed()),
        }
    }

    /// The tokio instant at which this clock reads `at` (now, if `at` has
    /// passed): what a sleep until a wall-clock deadline waits for.
    pub fn instant_at(&self, at: SystemTime) -> tokio::time::Instant {
        let now = mono_now();
        let wait = until(self.now(), at).min(HORIZON);
        now.checked_add(wait).unwrap_or(now)
    }
}

/// tokio's monotonic clock: what every deadline, timeout and debounce in the
/// daemon measures against (paused-time tests move it). The only call of
/// `tokio::time::Instant::now` in the crate.
#[allow(clippy::disallowed_methods)]
pub fn mono_now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// The operating system's wall clock. The only call of `SystemTime::now` in
/// the crate: log timestamps, the admin endpoint and the edges that convert
/// remote times use it; scheduling logic goes through a [`Clock`].
#[allow(clippy::disallowed_methods)]
pub fn wall_now() -> SystemTime {
    SystemTime::now()
}

/// `base + wait`, saturating: the wait is cut to [`HORIZON`], and a base so
/// far out that even that overflows stays where it is.
pub fn later(base: SystemTime, wait: Duration) -> SystemTime {
    base.checked_add(wait.min(HORIZON)).unwrap_or(base)
}

/// `base − back`, saturating at the Unix epoch (and at `base` itself when
/// even that cannot be represented).
pub fn earlier(base: SystemTime, back: Duration) -> SystemTime {
    base.checked_sub(back)
        .unwrap_or(SystemTime::UNIX_EPOCH.min(base))
}

/// How long from `from` until `to`; zero when `to` is not after `from`.
pub fn until(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or(Duration::ZERO)
}

/// A remote-supplied number of seconds as a duration no longer than `cap`.
pub fn capped(seconds: u64, cap: Duration) -> Duration {
    Duration::from_secs(seconds).min(cap)
}

/// A time read from outside (a state file, a remote) as seconds since the
/// epoch: `None` when it cannot be represented.
pub fn from_unix_seconds(seconds: u64) -> Option<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z).
const RFC3339_MAX_SECS: u64 = 253_402_300_799;

/// RFC 3339 with seconds, for log fields. Times past year 9999 are written
/// as that year's last second (humantime cannot write them, and a failing
/// `Display` would panic the caller).
pub fn rfc3339(at: SystemTime) -> String {
    let max = SystemTime::UNIX_EPOCH + Duration::from_secs(RFC3339_MAX_SECS);
    humantime::format_rfc3339_seconds(at.min(max)).to_string()
}

/// Durations in logs, to the millisecond.
pub fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn arithmetic_saturates_instead_of_panicking() {
        assert_eq!(later(t(0), Duration::from_secs(5)), t(5));
        assert_eq!(later(t(0), Duration::MAX), later(t(0), HORIZON));
        assert_eq!(earlier(t(10), Duration::from_secs(4)), t(6));
        assert_eq!(earlier(t(0), Duration::MAX), SystemTime::UNIX_EPOCH);
        assert_eq!(until(t(5), t(3)), Duration::ZERO);
        assert_eq!(until(t(3), t(5)), Duration::from_secs(2));
        assert_eq!(
            capped(u64::MAX, Duration::from_secs(60)),
            Duration::from_secs(60)
        );
        assert!(from_unix_seconds(u64::MAX).is_none());
        assert_eq!(from_unix_seconds(1_700_000_000), Some(t(0)));
        // Past year 9999 humantime cannot write a date: clamped, no panic.
        let far = from_unix_seconds(400_000_000_000).unwrap();
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59Z");
    }

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_with_paused_time() {
        let clock = Clock::tokio_at(t(0));
        assert_eq!(clock.now(), t(0));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now(), t(3600));
        let at = clock.instant_at(t(3610));
        assert_eq!(at - mono_now(), Duration::from_secs(10));
        // A deadline in the past, or absurdly far, never panics.
        let _ = clock.instant_at(t(0));
        let _ = clock.instant_at(later(t(0), HORIZON));
    }
}
