//! Retry waits: capped exponential backoff with full jitter, and `Retry-After`.
//!
//! Pure functions: the random draw is a parameter (`unit`, uniform in `[0, 1)`),
//! so tests can pin every branch.

use std::time::{Duration, SystemTime};

/// Capped exponential backoff with full jitter, floored at `min`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The smallest wait (`[rotation] retry_min`).
    pub min: Duration,
    /// The largest wait (`[rotation] retry_max`).
    pub max: Duration,
}

impl BackoffPolicy {
    /// The wait before retry number `attempt` (0 = the first retry).
    ///
    /// Full jitter ("Exponential Backoff And Jitter", AWS Architecture Blog):
    /// uniform in `[0, cap]` with `cap = min(max, min · 2^attempt)`, then
    /// floored at `min` so a retry never comes sooner than the operator allowed.
    /// The doubling saturates, so any `attempt` is safe.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let max = self.max.max(self.min);
        let factor = 2u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
        let cap = self.min.checked_mul(factor).unwrap_or(max).min(max);
        cap.mul_f64(unit.clamp(0.0, 1.0)).max(self.min).min(max)
    }
}

/// Parses a `Retry-After` header: delay-seconds, or an HTTP date (RFC 9110 §10.2.3).
/// A date in the past means "now" (zero). Anything else is `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: BackoffPolicy = BackoffPolicy {
        min: Duration::from_secs(1),
        max: Duration::from_secs(120),
    };

    #[test]
    fn doubles_until_the_cap() {
        // unit just below 1 picks (almost) the cap of each attempt.
        let top = |attempt| POLICY.delay(attempt, 0.999_999).as_secs_f64().round() as u64;
        assert_eq!(top(0), 1);
        assert_eq!(top(1), 2);
        assert_eq!(top(2), 4);
        assert_eq!(top(6), 64);
        assert_eq!(top(7), 120);
        assert_eq!(top(1_000), 120);
    }

    #[test]
    fn full_jitter_is_floored_at_min() {
        assert_eq!(POLICY.delay(5, 0.0), Duration::from_secs(1));
        assert_eq!(POLICY.delay(5, 0.5), Duration::from_secs(16));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    proptest! {
        #[test]
        fn delay_stays_within_min_and_max(
            min_ms in 1u64..10_000, extra_ms in 0u64..600_000, attempt in 0u32..200, unit in 0.0f64..1.0,
        ) {
            let policy = BackoffPolicy {
                min: Duration::from_millis(min_ms),
                max: Duration::from_millis(min_ms + extra_ms),
            };
            let d = policy.delay(attempt, unit);
            prop_assert!(d >= policy.min);
            prop_assert!(d <= policy.max);
        }
    }
}
