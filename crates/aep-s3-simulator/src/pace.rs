//! The injected latency, kept to about a tenth of a millisecond.
//!
//! tokio's timer ticks in whole milliseconds and rounds every deadline up,
//! and the answer was built after the wait: with `sleep(20 ms)` the
//! simulator's Flow Service answered in 21.7–22.1 ms on average (measured
//! at 10,000 connections and 1,200 requests/s on 2 cores). Those extra
//! ~2 ms are the simulator's, not the client's, yet the benchmark compares
//! the client against `latency × requests ÷ concurrency`: a floor no client
//! could reach.
//!
//! So a wait is counted from when the request arrived, and its last stretch
//! is timed by one thread that sleeps on a condition variable with a
//! timeout (a futex wait on the kernel's high-resolution timers) and wakes
//! each request at its deadline. tokio's timer still runs the first part
//! of a wait and races the thread for the rest, so on paused time a wait
//! takes no real time, as before.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How much of a wait, at most, the precise thread times: tokio's timer
/// may fire up to about a millisecond and a half late.
const FINE: Duration = Duration::from_millis(2);

/// Waits until `latency` after `arrived` (a [`tokio::time::Instant`] taken
/// when the request came in).
pub(crate) async fn wait(latency: Duration, arrived: tokio::time::Instant) {
    if latency.is_zero() {
        return;
    }
    // A latency too large for the clock waits "forever" in practice.
    let deadline = arrived
        .checked_add(latency)
        .unwrap_or_else(|| arrived + Duration::from_secs(86_400 * 365));
    if let Some(coarse) = deadline.checked_sub(FINE)
        && coarse > tokio::time::Instant::now()
    {
        tokio::time::sleep_until(coarse).await;
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if left.is_zero() {
        return;
    }
    let (done, woken) = oneshot::channel();
    timer().add(Instant::now() + left, done);
    // Whichever is first: the precise thread in real time, tokio's timer on
    // paused time (which it advances to the deadline at once) or should the
    // thread have failed to start.
    tokio::select! {
        _ = woken => {}
        () = tokio::time::sleep_until(deadline) => {}
    }
}

/// The precise timer: deadlines under a lock, and one thread that sleeps
/// until the earliest. It is woken only when a new deadline comes before
/// the earliest one (rare: deadlines mostly arrive in order), so a request
/// costs a lock and a heap push, not a thread wake-up.
#[derive(Default)]
struct Timer {
    queue: Mutex<Queue>,
    earlier: Condvar,
}

#[derive(Default)]
struct Queue {
    /// Earliest deadline first.
    due: BinaryHeap<Reverse<Wake>>,
    /// Arrival order, to break ties.
    seq: u64,
}

/// One waiting request: its deadline and how to wake it.
struct Wake {
    at: Instant,
    seq: u64,
    done: oneshot::Sender<()>,
}

impl Ord for Wake {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl PartialOrd for Wake {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Wake {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Wake {}

impl Timer {
    fn add(&self, at: Instant, done: oneshot::Sender<()>) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let first = queue
            .due
            .peek()
            .is_none_or(|Reverse(earliest)| at < earliest.at);
        queue.seq += 1;
        let seq = queue.seq;
        queue.due.push(Reverse(Wake { at, seq, done }));
        drop(queue);
        if first {
            self.earlier.notify_one();
        }
    }

    /// Wakes each waiting request at its deadline, earliest first.
    fn run(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            while queue.due.peek().is_some_and(|Reverse(wake)| wake.at <= now) {
                if let Some(Reverse(wake)) = queue.due.pop() {
                    // The request may have gone away meanwhile: no one to wake.
                    let _ = wake.done.send(());
                }
            }
            queue = match queue.due.peek() {
                None => self
                    .earlier
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(Reverse(wake)) => {
                    let timeout = wake.at.saturating_duration_since(now);
                    self.earlier
                        .wait_timeout(queue, timeout)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

/// The process's timer; its thread starts on first use.
fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let timer: &'static Timer = Box::leak(Box::default());
        // Should the thread fail to start, tokio's timer ends every wait.
        let _ = std::thread::Builder::new()
            .name("sim-latency".to_owned())
            .spawn(move || timer.run());
        timer
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_ends_at_its_deadline_counted_from_arrival() {
        let arrived = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        wait(Duration::from_millis(150), arrived).await;
        let took = arrived.elapsed();
        assert!(took >= Duration::from_millis(150), "{took:?}");
        // Not 100 + 150: the time before the wait counts.
        assert!(took < Duration::from_millis(250), "{took:?}");
    }

    #[tokio::test]
    async fn waits_end_in_deadline_order() {
        let arrived = tokio::time::Instant::now();
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for ms in [90u64, 30, 60] {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                wait(Duration::from_millis(ms), arrived).await;
                order.lock().unwrap().push(ms);
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![30, 60, 90]);
    }

    #[tokio::test(start_paused = true)]
    async fn paused_time_skips_all_but_the_last_stretch() {
        let real = Instant::now();
        let arrived = tokio::time::Instant::now();
        wait(Duration::from_secs(3600), arrived).await;
        assert!(arrived.elapsed() >= Duration::from_secs(3600));
        assert!(
            real.elapsed() < Duration::from_secs(60),
            "{:?}",
            real.elapsed()
        );
    }

    #[tokio::test]
    async fn no_latency_no_wait_and_a_huge_one_does_not_overflow() {
        let arrived = tokio::time::Instant::now();
        wait(Duration::ZERO, arrived).await;
        let huge =
            tokio::time::timeout(Duration::from_millis(10), wait(Duration::MAX, arrived)).await;
        assert!(huge.is_err(), "a latency of Duration::MAX never ends");
    }
}
