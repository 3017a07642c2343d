//! When to rotate next, and when to retry: pure policy functions of `now`,
//! the expiry STS returned, the settings and a random draw.

use std::time::{Duration, SystemTime};

use crate::clock::later;
use crate::policy::backoff::BackoffPolicy;

/// The soonest a rotation is scheduled after the previous one. One second is
/// what SPEC.md asks for short-lived credentials; it also stops a broken clock
/// or a zero-lifetime answer from turning the daemon into a busy loop.
pub const MIN_ROTATION_GAP: Duration = Duration::from_secs(1);

/// How often the escalation messages ("credentials expire before next
/// attempt", "credentials expired") are repeated for one connection: often
/// enough to stay on an operator's screen, rarely enough not to flood it.
pub const ESCALATION_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// The longest `Retry-After` honoured for one connection whose credentials'
/// expiry is known. Longer hints (a quota reset a day away is a legal
/// answer) are cut to this: longer than any throttle window Adobe documents.
/// Such a connection never waits into its last [`EXPIRY_MARGIN`] anyway.
///
/// A connection whose expiry is unknown (nothing pushed by this daemon, no
/// state) may hold credentials that are already dead: they are what the
/// daemon was started to replace. Its `Retry-After` is cut further, to
/// `retry_max` (the cadence at which even a refused connection is tried),
/// but never below [`UNKNOWN_EXPIRY_RETRY_AFTER_FLOOR`].
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(15 * 60);

/// A `Retry-After` up to this long is honoured whole even by a connection
/// whose expiry is unknown, however small `retry_max` is: a short throttle
/// window is the remote's to set.
pub const UNKNOWN_EXPIRY_RETRY_AFTER_FLOOR: Duration = Duration::from_secs(60);

/// How long before the credentials on a connection expire a retry must come
/// at the latest: a PATCH takes a round trip or two, and AEP reads the
/// credentials a little before its dataflow runs.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// When the next rotation is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextRotation {
    /// The due time.
    pub at: SystemTime,
    /// True when the credentials live shorter than `refresh_before`, so the
    /// rotation is at half of their remaining life (the caller warns).
    pub short_lived: bool,
}

/// The next rotation for credentials that expire at `expires_at`:
/// `expires_at − refresh_before − jitter·unit`, never before `now`; or, when
/// they already live shorter than `refresh_before`, half their remaining life
/// (never sooner than [`MIN_ROTATION_GAP`]).
pub fn next_rotation(
    now: SystemTime,
    expires_at: SystemTime,
    refresh_before: Duration,
    jitter: Duration,
    unit: f64,
) -> NextRotation {
    let remaining = expires_at.duration_since(now).unwrap_or(Duration::ZERO);
    if remaining <= refresh_before {
        return NextRotation {
            at: later(now, (remaining / 2).max(MIN_ROTATION_GAP)),
            short_lived: true,
        };
    }
    let slack = remaining - refresh_before;
    let early = jitter.mul_f64(unit.clamp(0.0, 1.0)).min(slack);
    NextRotation {
        at: later(now, slack - early),
        short_lived: false,
    }
}

/// What kind of wait a failure asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryKind {
    /// Transient trouble (5xx, timeouts, resets, throttling without a hint):
    /// exponential backoff.
    Backoff,
    /// The remote said how long to wait (`Retry-After`).
    After(Duration),
    /// A problem a retry will not fix soon (400/403/404, STS denied): the slow
    /// cadence, `retry_max`.
    Slow,
}

/// What the operator must hear about a connection's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escalation {
    /// Nothing: the retry comes well before the credentials expire.
    None,
    /// The credentials on the connection expire before the retry could have
    /// been made as the policy wanted; the retry was pulled in, `left` remains.
    ExpiresBeforeRetry {
        /// Time left until the credentials on the connection expire.
        left: Duration,
    },
    /// The credentials on the connection expired `ago`.
    Expired {
        /// How long ago they expired.
        ago: Duration,
    },
}

/// A planned retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPlan {
    /// When to try again.
    pub at: SystemTime,
    /// What to tell the operator.
    pub escalation: Escalation,
}

/// Plans the retry after a failed attempt.
///
/// `attempt` counts the failures in a row so far (0 = this was the first).
/// `on_connection_expires` is the expiry of the credentials this daemon last
/// put on the connection, if any: the wait never runs past it. When the policy
/// wait would, the retry is pulled in to half of the time left (at least
/// `min_gap`, so a dying connection is not hammered), and the plan escalates.
pub fn plan_retry(
    policy: &BackoffPolicy,
    now: SystemTime,
    attempt: u32,
    kind: RetryKind,
    on_connection_expires: Option<SystemTime>,
    unit: f64,
) -> RetryPlan {
    let wait = match kind {
        RetryKind::Backoff => policy.delay(attempt, unit),
        RetryKind::After(hint) => {
            let cap = match on_connection_expires {
                Some(_) => RETRY_AFTER_CAP,
                None => policy
                    .max
                    .max(UNKNOWN_EXPIRY_RETRY_AFTER_FLOOR)
                    .min(RETRY_AFTER_CAP),
            };
            hint.min(cap).max(policy.min)
        }
        RetryKind::Slow => policy.max.max(policy.min),
    };
    let Some(expires_at) = on_connection_expires else {
        return RetryPlan {
            at: later(now, wait),
            escalation: Escalation::None,
        };
    };
    match expires_at.duration_since(now) {
        // Expired already: the policy's wait stands (hammering does not
        // bring the credentials back), escalated.
        Err(past) => RetryPlan {
            at: later(now, wait),
            escalation: Escalation::Expired {
                ago: past.duration(),
            },
        },
        // The wait would run into the last EXPIRY_MARGIN (or past expiry):
        // pulled in to half the time left, at least `min_gap` so a dying
        // connection is not hammered.
        Ok(left) if wait >= left.saturating_sub(EXPIRY_MARGIN.min(left / 2)) => {
            let min_gap = policy.min.min(MIN_ROTATION_GAP);
            RetryPlan {
                at: later(now, (left / 2).max(min_gap.min(left))),
                escalation: Escalation::ExpiresBeforeRetry { left },
            }
        }
        Ok(_) => RetryPlan {
            at: later(now, wait),
            escalation: Escalation::None,
        },
    }
}

/// How many refusals in a row a connection whose credentials this daemon
/// knows would take to reach [`Escalation::ExpiresBeforeRetry`]: its first
/// attempt comes `refresh_before` ahead of expiry, each refusal waits the
/// slow cadence (`retry_max`), and it escalates on the refusal whose wait
/// would run into the last [`EXPIRY_MARGIN`]. A connection refused since its
/// first attempt (a wrong sandbox, a deleted connection: 404 forever) has no
/// known expiry to escalate on, and the operator hears of it at `error` after
/// the same count. At least 1; at most 1,000 (a retry_max of a millisecond).
pub fn refusals_before_escalation(policy: &BackoffPolicy, refresh_before: Duration) -> u32 {
    let wait = policy.max.max(policy.min);
    let mut left = refresh_before;
    let mut refusals = 1;
    while refusals < 1_000 && wait < left.saturating_sub(EXPIRY_MARGIN.min(left / 2)) {
        left -= wait;
        refusals += 1;
    }
    refusals
}

/// Whether an escalation should be logged now, given the last one logged for
/// the connection and when: at most once per [`ESCALATION_LOG_INTERVAL`], but
/// at once when it changes kind (credentials that just expired are news).
pub fn should_log_escalation(
    last_logged: Option<(Escalation, SystemTime)>,
    escalation: Escalation,
    now: SystemTime,
) -> bool {
    if escalation == Escalation::None {
        return false;
    }
    match last_logged {
        None => true,
        Some((last, _)) if std::mem::discriminant(&last) != std::mem::discriminant(&escalation) => {
            true
        }
        Some((_, then)) => now
            .duration_since(then)
            .map(|since| since >= ESCALATION_LOG_INTERVAL)
            .unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }
    const S: fn(u64) -> Duration = Duration::from_secs;
    const POLICY: BackoffPolicy = BackoffPolicy {
        min: Duration::from_secs(1),
        max: Duration::from_secs(120),
    };

    #[test]
    fn rotates_refresh_before_ahead_minus_jitter() {
        // 1 h credentials, refresh 20 m before, up to 1 m jitter.
        let plan = next_rotation(t(0), t(3600), S(1200), S(60), 0.0);
        assert_eq!(
            plan,
            NextRotation {
                at: t(2400),
                short_lived: false
            }
        );
        let plan = next_rotation(t(0), t(3600), S(1200), S(60), 0.5);
        assert_eq!(plan.at, t(2370));
    }

    #[test]
    fn jitter_never_pulls_the_rotation_before_now() {
        let plan = next_rotation(t(0), t(100), S(90), S(60), 0.99);
        assert_eq!(
            plan,
            NextRotation {
                at: t(0),
                short_lived: false
            }
        );
    }

    #[test]
    fn short_lived_credentials_rotate_at_half_life() {
        let plan = next_rotation(t(0), t(600), S(1200), S(60), 0.7);
        assert_eq!(
            plan,
            NextRotation {
                at: t(300),
                short_lived: true
            }
        );
        // Never sooner than one second, even when already expired.
        let plan = next_rotation(t(10), t(0), S(1200), S(60), 0.7);
        assert_eq!(
            plan,
            NextRotation {
                at: t(11),
                short_lived: true
            }
        );
    }

    #[test]
    fn retry_after_is_honoured_and_floored() {
        let plan = plan_retry(&POLICY, t(0), 0, RetryKind::After(S(7)), Some(t(3600)), 0.3);
        assert_eq!(
            plan,
            RetryPlan {
                at: t(7),
                escalation: Escalation::None
            }
        );
        let plan = plan_retry(&POLICY, t(0), 0, RetryKind::After(S(0)), None, 0.3);
        assert_eq!(plan.at, t(1));
    }

    #[test]
    fn a_long_retry_after_is_cut_to_retry_max_while_the_expiry_is_unknown() {
        // Expiry known and far: the hint is honoured up to the cap.
        let hour = RetryKind::After(S(3600));
        let plan = plan_retry(&POLICY, t(0), 0, hour, Some(t(7200)), 0.3);
        assert_eq!(plan.at, t(0) + RETRY_AFTER_CAP);
        // Nothing pushed yet: the connection may hold dead credentials, so
        // it is tried again at the slow cadence, not a quarter hour later.
        let plan = plan_retry(&POLICY, t(0), 0, hour, None, 0.3);
        assert_eq!(plan.at, t(120));
        // A hint shorter than retry_max stands either way.
        let plan = plan_retry(&POLICY, t(0), 0, RetryKind::After(S(90)), None, 0.3);
        assert_eq!(plan.at, t(90));
        // A retry_max below a minute does not cut a hint of up to a minute.
        let short = BackoffPolicy {
            min: S(1),
            max: S(2),
        };
        let plan = plan_retry(&short, t(0), 0, RetryKind::After(S(45)), None, 0.3);
        assert_eq!(plan.at, t(45));
        let plan = plan_retry(&short, t(0), 0, hour, None, 0.3);
        assert_eq!(plan.at, t(0) + UNKNOWN_EXPIRY_RETRY_AFTER_FLOOR);
        // A retry_max above the cap does not lift it.
        let long = BackoffPolicy {
            min: S(1),
            max: S(3600),
        };
        let plan = plan_retry(&long, t(0), 0, hour, None, 0.3);
        assert_eq!(plan.at, t(0) + RETRY_AFTER_CAP);
    }

    #[test]
    fn slow_cadence_is_retry_max() {
        let plan = plan_retry(&POLICY, t(0), 3, RetryKind::Slow, Some(t(3600)), 0.3);
        assert_eq!(plan.at, t(120));
    }

    #[test]
    fn a_wait_past_expiry_is_pulled_in_and_escalated() {
        let plan = plan_retry(&POLICY, t(0), 0, RetryKind::Slow, Some(t(60)), 0.3);
        assert_eq!(
            plan,
            RetryPlan {
                at: t(30),
                escalation: Escalation::ExpiresBeforeRetry { left: S(60) }
            }
        );
    }

    #[test]
    fn expired_credentials_escalate_and_keep_the_policy_wait() {
        let plan = plan_retry(&POLICY, t(100), 0, RetryKind::After(S(5)), Some(t(40)), 0.3);
        assert_eq!(
            plan,
            RetryPlan {
                at: t(105),
                escalation: Escalation::Expired { ago: S(60) }
            }
        );
    }

    #[test]
    fn refusals_before_escalation_match_a_connection_that_once_worked() {
        let policy = BackoffPolicy {
            min: S(1),
            max: S(120),
        };
        // Walk a known-expiry connection through refusals from
        // refresh_before ahead of its expiry, as plan_retry sees it.
        let walk = |refresh_before: Duration| {
            let expires = t(10_000);
            let mut now = expires - refresh_before;
            let mut refusals = 0;
            loop {
                refusals += 1;
                let plan = plan_retry(
                    &policy,
                    now,
                    refusals - 1,
                    RetryKind::Slow,
                    Some(expires),
                    0.5,
                );
                if plan.escalation != Escalation::None {
                    return refusals;
                }
                now = plan.at;
            }
        };
        for refresh_before in [S(60), S(300), S(1_200), S(3_600)] {
            assert_eq!(
                refusals_before_escalation(&policy, refresh_before),
                walk(refresh_before),
                "refresh_before {refresh_before:?}"
            );
        }
        assert_eq!(refusals_before_escalation(&policy, S(1_200)), 10);
        assert_eq!(refusals_before_escalation(&policy, S(1)), 1);
        let tiny = BackoffPolicy {
            min: Duration::from_millis(1),
            max: Duration::from_millis(1),
        };
        assert_eq!(refusals_before_escalation(&tiny, S(43_200)), 1_000);
    }

    #[test]
    fn escalation_logs_are_rate_limited_but_a_new_kind_is_news() {
        let soon = Escalation::ExpiresBeforeRetry { left: S(10) };
        let expired = Escalation::Expired { ago: S(1) };
        assert!(should_log_escalation(None, soon, t(0)));
        assert!(!should_log_escalation(None, Escalation::None, t(0)));
        assert!(!should_log_escalation(Some((soon, t(0))), soon, t(29)));
        assert!(should_log_escalation(Some((soon, t(0))), soon, t(30)));
        assert!(should_log_escalation(Some((soon, t(0))), expired, t(5)));
        assert!(!should_log_escalation(
            Some((expired, t(5))),
            expired,
            t(20)
        ));
        // A clock that went backwards does not unmute it.
        assert!(!should_log_escalation(Some((soon, t(10))), soon, t(0)));
    }

    proptest! {
        #[test]
        fn next_rotation_is_before_expiry_and_within_jitter(
            now_s in 0u64..100_000, life_ms in 2_000u64..43_200_000, rb_ms in 1u64..43_200_000,
            jitter_ms in 0u64..3_600_000, unit in 0.0f64..1.0,
        ) {
            let now = t(now_s);
            let expires = now + Duration::from_millis(life_ms);
            let rb = Duration::from_millis(rb_ms);
            let jitter = Duration::from_millis(jitter_ms);
            let plan = next_rotation(now, expires, rb, jitter, unit);
            prop_assert!(plan.at >= now);
            prop_assert!(plan.at < expires, "rotation at or after expiry");
            if !plan.short_lived {
                let unjittered = expires - rb;
                prop_assert!(plan.at <= unjittered);
                prop_assert!(unjittered.duration_since(plan.at).unwrap() <= jitter);
            }
        }

        #[test]
        fn no_retry_is_scheduled_past_expiry(
            now_s in 0u64..100_000, left_ms in 1u64..10_000_000, attempt in 0u32..50,
            kind in 0u8..3, hint_s in 0u64..10_000, unit in 0.0f64..1.0,
        ) {
            let now = t(now_s);
            let expires = now + Duration::from_millis(left_ms);
            let kind = match kind { 0 => RetryKind::Backoff, 1 => RetryKind::Slow, _ => RetryKind::After(S(hint_s)) };
            let plan = plan_retry(&POLICY, now, attempt, kind, Some(expires), unit);
            prop_assert!(plan.at > now);
            prop_assert!(plan.at <= expires, "retry scheduled past expiry");
            prop_assert!(plan.at.duration_since(now).unwrap() <= POLICY.max.max(Duration::from_secs(hint_s)));
        }
    }
}
