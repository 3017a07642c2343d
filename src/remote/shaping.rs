//! Request shaping for Flow Service: at most `concurrency` requests in flight,
//! at most `max_requests_per_second`, and a short shared pause after a 429 so
//! that every connection slows down, not just the one that was told.
//!
//! A throttle slows the others; it never starves them: the shared pause is
//! capped at [`SHARED_PAUSE_CAP`] (the connection that was told waits its full
//! `Retry-After` in its own schedule), and a job never waits for it past its
//! own connection's deadline ([`start_by`]).

use std::future::Future;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The longest pause one throttled answer imposes on *every* request. The
/// connection that got the 429 waits its whole `Retry-After` through its own
/// schedule; the others only back off briefly (if the quota is really
/// exhausted, they get their own 429s and wait on their own schedules).
pub const SHARED_PAUSE_CAP: Duration = Duration::from_secs(30);

tokio::task_local! {
    /// The instant by which the current job must get its requests out (its
    /// connection's credentials need replacing then), if known.
    static START_BY: Option<Instant>;
}

/// Runs a job's future with its deadline: the shared pause never holds its
/// requests past `deadline`.
pub async fn start_by<F: Future>(deadline: Option<Instant>, job: F) -> F::Output {
    START_BY.scope(deadline, job).await
}

/// Until when a shared wait that lasts until `until` (a 429's pause,
/// another caller's IMS or STS failure) may hold the current job: never
/// past its deadline (see [`start_by`]), when its connection's credentials
/// need replacing. `until` itself outside a job or without a deadline.
pub fn shared_until(until: Instant) -> Instant {
    match START_BY.try_with(|deadline| *deadline) {
        Ok(Some(deadline)) => until.min(deadline),
        _ => until,
    }
}

/// The gate every Flow Service request passes.
#[derive(Debug)]
pub struct RequestGate {
    slots: Arc<Semaphore>,
    limiter: Option<DefaultDirectRateLimiter>,
    paused_until: Mutex<Option<Instant>>,
    pause_cap: Duration,
}

/// Held while one request is in flight.
#[derive(Debug)]
pub struct Pass {
    _slot: Option<OwnedSemaphorePermit>,
}

impl RequestGate {
    /// A gate with `concurrency` slots and an optional rate ceiling, whose
    /// shared pauses last at most `pause_cap` (and never more than
    /// [`SHARED_PAUSE_CAP`]): the daemon passes `retry_max`, so a throttle
    /// never holds the others longer than the longest backoff the operator allows.
    pub fn new(
        concurrency: NonZeroUsize,
        per_second: Option<NonZeroU32>,
        pause_cap: Duration,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(concurrency.get())),
            // Burst of one: a ceiling operators set is a ceiling, not an average.
            limiter: per_second.map(|rate| {
                RateLimiter::direct(Quota::per_second(rate).allow_burst(NonZeroU32::MIN))
            }),
            paused_until: Mutex::new(None),
            pause_cap: pause_cap.min(SHARED_PAUSE_CAP),
        }
    }

    /// Waits for the shared pause to end, then for the rate limiter, then for a
    /// free slot. Cancellation-safe: dropping the future gives everything back.
    pub async fn enter(&self) -> Pass {
        loop {
            let pause = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
            let now = crate::clock::mono_now();
            match pause {
                Some(until) if until > now => {
                    let until = shared_until(until);
                    if until <= now {
                        break; // this connection cannot wait any longer
                    }
                    tokio::time::sleep_until(until).await;
                }
                _ => break,
            }
        }
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
        // The semaphore is never closed, so this only fails in theory; running
        // without a slot then is safer than stopping rotations.
        Pass {
            _slot: Arc::clone(&self.slots).acquire_owned().await.ok(),
        }
    }

    /// Makes every request wait `for_at_least` from now, at most
    /// [`SHARED_PAUSE_CAP`] (a 429 or 503): requests already waiting pick the
    /// longer pause up.
    pub fn pause(&self, for_at_least: Duration) {
        let now = crate::clock::mono_now();
        let until = now
            .checked_add(for_at_least.min(self.pause_cap))
            .unwrap_or(now);
        let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn concurrency_bounds_requests_in_flight() {
        let gate = Arc::new(RequestGate::new(
            NonZeroUsize::new(2).unwrap(),
            None,
            SHARED_PAUSE_CAP,
        ));
        let a = gate.enter().await;
        let _b = gate.enter().await;
        let third = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.enter().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !third.is_finished(),
            "a third request got in with two slots"
        );
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_request() {
        let gate = RequestGate::new(NonZeroUsize::new(4).unwrap(), None, SHARED_PAUSE_CAP);
        let start = crate::clock::mono_now();
        gate.pause(Duration::from_secs(3));
        gate.pause(Duration::from_secs(1)); // a shorter pause does not shorten it
        let _pass = gate.enter().await;
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn an_hour_long_hint_pauses_the_others_only_briefly() {
        let gate = RequestGate::new(NonZeroUsize::new(4).unwrap(), None, SHARED_PAUSE_CAP);
        let start = crate::clock::mono_now();
        gate.pause(Duration::from_secs(3600));
        gate.pause(Duration::MAX); // no overflow either
        let _pass = gate.enter().await;
        assert_eq!(start.elapsed(), SHARED_PAUSE_CAP);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_never_holds_a_job_past_its_deadline() {
        let gate = RequestGate::new(NonZeroUsize::new(4).unwrap(), None, SHARED_PAUSE_CAP);
        let start = crate::clock::mono_now();
        gate.pause(Duration::from_secs(20));
        let deadline = start + Duration::from_secs(5);
        let _pass = start_by(Some(deadline), gate.enter()).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // A job whose deadline has passed goes at once.
        let _pass = start_by(Some(start), gate.enter()).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    // governor keeps its own (real) clock, so this one runs in real time: 1 s.
    #[tokio::test]
    async fn the_rate_ceiling_spaces_requests() {
        let gate = RequestGate::new(
            NonZeroUsize::new(8).unwrap(),
            NonZeroU32::new(10),
            SHARED_PAUSE_CAP,
        );
        // Unpaused here, so the crate's monotonic clock is real time.
        let start = crate::clock::mono_now();
        for _ in 0..11 {
            drop(gate.enter().await);
        }
        // 11 requests at 10/s with a burst of one need at least a second.
        assert!(
            start.elapsed() >= Duration::from_millis(990),
            "{:?}",
            start.elapsed()
        );
    }
}
