//! One connection's state, and the pure function that moves it:
//! [`Connection::apply`]`(event, now, policy, draw) -> Action`.
//!
//! Everything the scheduler decides about a connection is decided here: when
//! it is due, what a job's outcome means for the next attempt (412, 429/503
//! with and without `Retry-After`, 5xx, 401, 400/403/404, STS trouble), short
//! credentials, escalation, resuming after a restart, a reload that changes
//! it while a job is in flight, shutdown. No I/O, no clock, no randomness of
//! its own: `now` and the random `draw` are parameters, so every rule is a
//! unit test below with injected time. (It does log: the messages operators
//! rely on are part of the behaviour.)
//!
//! The connection owns its numbers too (rotations, failures, 412s,
//! verifications: [`Counters`], counted from its jobs' results). Every other
//! view of it (`/status`, `/readyz`, `/metrics`, `STATUS=`, the state file,
//! the `once` report) is derived from one outward struct,
//! [`ConnectionStatus`], which [`Connection::view`] holds, rebuilt by
//! [`Connection::refresh_view`] after each change and published by the
//! scheduler in its snapshots.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::{later, rfc3339, round_ms, until};
use crate::config::{ConnectionConfig, RotationConfig};
use crate::coordination::local::PersistedConnection;
use crate::observe::status::{ConnectionStatus, Counters, Outcome};
use crate::policy::backoff::BackoffPolicy;
use crate::policy::schedule::{self, Escalation, RetryKind};
use crate::remote::sts::StsRequest;
use crate::rotation::{Job, JobResult, RotationError};

mod restore;

#[cfg(test)]
mod tests;

/// Attempts per connection in `once` mode: enough to ride out a throttle or
/// a dropped connection, few enough that `once` finishes promptly.
pub const ONCE_ATTEMPTS: u32 = 3;

/// How often "credentials live shorter than refresh_before" is repeated per
/// connection: it is a standing condition (the role's maximum session), so once
/// is news and every cycle would be noise.
const SHORT_WARNING_INTERVAL: Duration = Duration::from_secs(600);

/// The furthest ahead a restored expiry may lie: STS issues at most 36 h
/// (`GetSessionToken`); a state file that says more was not written by us
/// (or the clock jumped), so that record is not trusted.
const MAX_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(36 * 3600);

/// How far in the future a restored `last_success_at` may lie (clock skew
/// between the run that wrote it and this one).
const RESTORE_SKEW: Duration = Duration::from_secs(300);

/// The rules a connection follows, from `[rotation]` and the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// `[rotation] refresh_before`.
    pub refresh_before: Duration,
    /// `[rotation] jitter`.
    pub jitter: Duration,
    /// `[rotation] retry_min` / `retry_max`.
    pub backoff: BackoffPolicy,
    /// `once`: each connection rotates once (a few quick retries), then is finished.
    pub once: bool,
    /// `[rotation] session_duration`: the longest credentials this daemon
    /// asks for, so the furthest a saved or shared expiry can truthfully lie.
    pub session_duration: Duration,
}

impl Policy {
    /// The policy of a config, for `run` (`once = false`) or `once`.
    pub fn new(rotation: &RotationConfig, once: bool) -> Self {
        Self {
            refresh_before: rotation.refresh_before,
            jitter: rotation.jitter,
            backoff: BackoffPolicy {
                min: rotation.retry_min,
                max: rotation.retry_max,
            },
            once,
            session_duration: rotation.session_duration,
        }
    }

    /// The expiry of a state-file or shared record as far as it can be
    /// believed (issue 26): no later than one session from now, nor one
    /// session (plus clock skew) after the rotation that wrote it. A record
    /// saying more was not written under this config, and believing it
    /// stopped rotation for up to 36 h while `/status` said "fresh".
    pub fn believable_expiry(&self, saved: &PersistedConnection, now: SystemTime) -> SystemTime {
        let by_now = later(now, self.session_duration);
        let by_success = saved.last_success_at.map_or(by_now, |at| {
            later(at, self.session_duration.saturating_add(RESTORE_SKEW))
        });
        saved.expires_at.min(by_now).min(by_success)
    }
}

/// The credentials this daemon put on the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Their access key id (not secret).
    pub access_key_id: String,
    /// When they expire, as STS said.
    pub expires_at: SystemTime,
}

/// Where the connection is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting; due at this time.
    Waiting(SystemTime),
    /// A job is running for it (never more than one).
    InFlight,
    /// No further work (`once` after its attempts, or shutdown).
    Finished,
}

/// What happens to a connection.
#[derive(Debug)]
pub enum Event {
    /// Its due time has come.
    Due,
    /// Its job ended.
    JobDone(JobResult),
    /// A reload changed its settings.
    Changed(Arc<ConnectionConfig>, Arc<StsRequest>),
    /// A reload removed it.
    Removed,
    /// An operator asked for new credentials now (`rotate`): the next job
    /// runs at once (after the one in flight, if any) and pushes
    /// credentials from an STS call started at or after `since` (the
    /// health check sends it too, when S3 refuses the connection's).
    RotateNow {
        /// When the request arrived (tokio's clock); the job's credentials
        /// are from an STS call started no earlier.
        since: tokio::time::Instant,
    },
    /// The health check's connection test answered (`passed`: Flow
    /// Service reached S3 with the credentials on it).
    Tested {
        /// The answer.
        passed: bool,
    },
    /// The daemon is stopping.
    Shutdown,
    /// Its state file record (a restart; sent to a new connection).
    Restored(Box<PersistedConnection>),
    /// The leader's shared record of it (`[coordination]`: a new term, or a
    /// standby's view; `None`: the table has none).
    Adopt(Option<Box<PersistedConnection>>),
    /// What a list page said of it: its etag and S3 target.
    Listed {
        /// Its etag (ends a hold).
        etag: Option<String>,
        /// Its bucket, folder and endpoint.
        s3: Option<Box<crate::remote::s3probe::S3Target>>,
    },
    /// A shared dependency (the IMS token, its STS identity) failed and
    /// another connection probes it: wait until `until` at the latest
    /// (never earlier than already due), or until [`Event::Unpark`].
    Park {
        /// The latest it waits (the scheduler bounds it by the expiry).
        until: SystemTime,
    },
    /// The dependency it parked on answers again: due now.
    Unpark,
    /// Wait for the start's listing to bring its etag before dispatching.
    Hold,
    /// Stop waiting for the listing (it is over, or late for this one).
    Release,
}

/// What the scheduler must do next for the connection.
#[derive(Debug)]
pub enum Action {
    /// Start this job now.
    Dispatch(Box<Job>),
    /// Nothing until this time, then send [`Event::Due`].
    WaitUntil(SystemTime),
    /// Nothing until its job ends.
    AwaitJob,
    /// Held: nothing until the listing seeds it or releases it.
    AwaitListing,
    /// No further work.
    Finished,
    /// Forget the connection (removed, and no job of it runs any more).
    Drop,
}

/// A settings change that waits for the in-flight job.
#[derive(Debug)]
struct PendingChange {
    config: Arc<ConnectionConfig>,
    sts: Arc<StsRequest>,
}

/// One connection as the daemon knows it. Holds no secret.
#[derive(Debug)]
pub struct Connection {
    /// Shared with the config and discovery's membership: one copy per
    /// connection, however many of them hold it.
    config: Arc<ConnectionConfig>,
    /// Shared by every connection with the same STS identity.
    sts: Arc<StsRequest>,
    phase: Phase,
    /// Etag from our last PATCH or read (saves a GET).
    etag: Option<String>,
    pushed: Option<Pushed>,
    /// After a restart, the etag we left; the first job only re-pushes if it changed.
    resume_etag: Option<String>,
    last_success: Option<SystemTime>,
    /// Failures in a row.
    failures_in_a_row: u32,
    /// Whether any job of this connection has ended in this process (the
    /// first pass, for `READY=1`).
    had_outcome: bool,
    /// Boxed: rare, and as large as the rest of the connection.
    pending: Option<Box<PendingChange>>,
    removed: bool,
    /// The bucket, folder and endpoint the pre-push check probes, learnt
    /// from the connection's GET and kept with the etag.
    s3: Option<crate::remote::s3probe::S3Target>,
    last_escalation_log: Option<(Escalation, SystemTime)>,
    last_short_warning: Option<SystemTime>,
    counters: Counters,
    last_error: Option<String>,
    /// The span of the job in flight ([`Self::job_span`]): its result is
    /// logged in the same span instead of a second one per rotation.
    job_span: Option<tracing::Span>,
    /// The expiry a sane state-file record gave for credentials too close
    /// to it to be kept ([`Self::restored`] then rotates at once): nothing
    /// may make that first rotation wait past it.
    restored_expiry: Option<SystemTime>,
    /// The last etag a list page showed, and when: a shared record written
    /// before then with another etag is stale ([`Self::adopt`]).
    listed_etag: Option<(String, SystemTime)>,
    /// The outward view as of the last [`Self::refresh_view`].
    view: Arc<ConnectionStatus>,
    /// Held until the start's listing brings its etag: due times pass
    /// without a dispatch ([`Event::Hold`]).
    held: bool,
    /// A `rotate` request not yet dispatched: its job pushes credentials
    /// issued at or after this time ([`Event::RotateNow`]).
    rotate_now: Option<tokio::time::Instant>,
    /// The last connection test's answer (`verify` or the health check):
    /// `Some(true)` when Flow Service could not reach S3.
    test_failing: Option<bool>,
}

impl Connection {
    /// A connection nothing is known about: due at once.
    pub fn new(config: Arc<ConnectionConfig>, sts: Arc<StsRequest>, now: SystemTime) -> Self {
        let mut connection = Self {
            config,
            sts,
            phase: Phase::Waiting(now),
            etag: None,
            pushed: None,
            resume_etag: None,
            last_success: None,
            failures_in_a_row: 0,
            had_outcome: false,
            pending: None,
            removed: false,
            s3: None,
            last_escalation_log: None,
            last_short_warning: None,
            job_span: None,
            restored_expiry: None,
            listed_etag: None,
            rotate_now: None,
            test_failing: None,
            counters: Counters::default(),
            last_error: None,
            view: Arc::default(),
            held: false,
        };
        connection.refresh_view();
        connection
    }

    /// Its settings: the config's own entry, shared (the due queue and the
    /// view hold it instead of copies).
    pub fn config(&self) -> &Arc<ConnectionConfig> {
        &self.config
    }

    /// Which credentials it gets.
    pub fn sts(&self) -> &Arc<StsRequest> {
        &self.sts
    }

    /// Where it is in its cycle.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether its last attempt failed, so that what it waits for is a
    /// retry (the scheduler dispatches due rotations before due retries).
    pub fn is_retrying(&self) -> bool {
        self.failures_in_a_row > 0
    }

    /// Whether it waits for the start's listing ([`Event::Hold`]).
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// Whether a job of it has ended in this process (or it is finished).
    pub fn had_outcome(&self) -> bool {
        self.had_outcome || self.phase == Phase::Finished
    }

    /// The credentials this daemon put on the connection.
    pub fn pushed(&self) -> Option<&Pushed> {
        self.pushed.as_ref()
    }

    /// When the credentials on the connection expire, as far as this
    /// process knows: the ones it pushed, else a restored record's.
    pub fn credentials_expire_at(&self) -> Option<SystemTime> {
        self.pushed
            .as_ref()
            .map(|p| p.expires_at)
            .or(self.restored_expiry)
    }

    /// The etag to send next, if known.
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// Its numbers since this process started.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The last error, if the last attempt failed.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// A tracing span with its id, sandbox and name.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "connection",
            connection = %self.config.id,
            sandbox = %self.config.sandbox,
            name = %self.config.name
        )
    }

    /// The span a job of this connection runs in; kept until its result is
    /// applied, which logs in it too.
    pub fn job_span(&mut self) -> tracing::Span {
        let span = self.span();
        self.job_span = Some(span.clone());
        span
    }

    /// Moves the connection by one event. `draw` is a uniform random number
    /// in `[0, 1)` for jitter and backoff.
    pub fn apply(&mut self, event: Event, now: SystemTime, policy: &Policy, draw: f64) -> Action {
        match event {
            Event::Due => self.on_due(now),
            Event::JobDone(result) => self.on_job_done(result, now, policy, draw),
            Event::Changed(config, sts) => self.on_changed(config, sts, now),
            Event::RotateNow { since } => self.on_rotate_now(since, now),
            Event::Tested { passed } => {
                self.test_failing = Some(!passed);
                self.current_action()
            }
            Event::Removed => {
                self.removed = true;
                if self.phase == Phase::InFlight {
                    Action::AwaitJob
                } else {
                    Action::Drop
                }
            }
            Event::Shutdown => {
                if self.phase == Phase::InFlight {
                    Action::AwaitJob
                } else {
                    self.phase = Phase::Finished;
                    Action::Finished
                }
            }
            Event::Restored(saved) => self.on_restored(&saved, now, policy),
            Event::Adopt(shared) => self.on_adopt(shared.as_deref(), now, policy, draw),
            Event::Listed { etag, s3 } => {
                self.on_listed(etag.as_deref(), s3.as_deref(), now, policy, draw)
            }
            Event::Park { until } => {
                if let Phase::Waiting(at) = self.phase {
                    self.phase = Phase::Waiting(at.max(until));
                }
                self.current_action()
            }
            Event::Unpark => {
                if let Phase::Waiting(at) = self.phase
                    && at > now
                {
                    self.phase = Phase::Waiting(now);
                }
                self.current_action()
            }
            Event::Hold => {
                self.held = true;
                self.current_action()
            }
            Event::Release => {
                self.held = false;
                self.current_action()
            }
        }
    }

    fn on_due(&mut self, now: SystemTime) -> Action {
        match self.phase {
            Phase::InFlight => Action::AwaitJob,
            Phase::Finished => Action::Finished,
            // A stale wake-up (the connection was rescheduled meanwhile).
            Phase::Waiting(at) if at > now => Action::WaitUntil(at),
            // Its page is on the way: releasing it schedules it again.
            Phase::Waiting(_) if self.held => Action::AwaitListing,
            Phase::Waiting(_) => {
                self.phase = Phase::InFlight;
                let fresh_after = self.rotate_now.take();
                // A requested rotation pushes whatever the connection
                // holds: "unchanged since restart" is no answer to it.
                let resume_if_etag = self.resume_etag.take().filter(|_| fresh_after.is_none());
                Action::Dispatch(Box::new(Job {
                    id: self.config.id.clone(),
                    sandbox: self.config.sandbox.clone(),
                    sts: Arc::clone(&self.sts),
                    known_etag: self.etag.clone(),
                    held: self.pushed.as_ref().map(|p| p.access_key_id.clone()),
                    resume_if_etag,
                    s3: self.s3.clone(),
                    fresh_after,
                }))
            }
        }
    }

    /// A `rotate` request: due now, or right after the job in flight
    /// (never two jobs for one connection). Requests that meet before the
    /// job starts are served by one job, with the latest `since`.
    fn on_rotate_now(&mut self, since: tokio::time::Instant, now: SystemTime) -> Action {
        if self.removed || self.phase == Phase::Finished {
            return self.current_action();
        }
        self.rotate_now = Some(self.rotate_now.map_or(since, |at| at.max(since)));
        match self.phase {
            Phase::Waiting(_) => {
                self.phase = Phase::Waiting(now);
                Action::WaitUntil(now)
            }
            Phase::InFlight | Phase::Finished => self.current_action(),
        }
    }

    /// Whether a `rotate` request waits for this connection's next job.
    pub fn rotate_requested(&self) -> bool {
        self.rotate_now.is_some()
    }

    fn on_changed(
        &mut self,
        config: Arc<ConnectionConfig>,
        sts: Arc<StsRequest>,
        now: SystemTime,
    ) -> Action {
        let same_target = config.sandbox == self.config.sandbox;
        if same_target && sts == self.sts {
            // Same target, same identity: keep state and schedule (a new
            // name applies at once, new timings from the next rotation).
            self.config = config;
            self.pending = None;
            return self.current_action();
        }
        if self.phase == Phase::InFlight {
            // Never two jobs for one connection: the old job's result is
            // applied first (it tells which key is on the connection), then
            // the connection rotates with the new settings.
            self.pending = Some(Box::new(PendingChange { config, sts }));
            return Action::AwaitJob;
        }
        self.take_change(PendingChange { config, sts }, now)
    }

    fn take_change(&mut self, change: PendingChange, now: SystemTime) -> Action {
        if change.config.sandbox != self.config.sandbox {
            // Another sandbox is another connection as far as we know.
            self.etag = None;
            self.s3 = None;
            self.pushed = None;
            self.resume_etag = None;
        }
        self.config = change.config;
        self.sts = change.sts;
        self.failures_in_a_row = 0;
        if self.phase == Phase::Finished {
            return Action::Finished;
        }
        self.phase = Phase::Waiting(now);
        Action::WaitUntil(now)
    }

    fn current_action(&self) -> Action {
        match self.phase {
            Phase::Waiting(_) if self.held => Action::AwaitListing,
            Phase::Waiting(at) => Action::WaitUntil(at),
            Phase::InFlight => Action::AwaitJob,
            Phase::Finished => Action::Finished,
        }
    }

    fn on_job_done(
        &mut self,
        result: JobResult,
        now: SystemTime,
        policy: &Policy,
        draw: f64,
    ) -> Action {
        if self.phase != Phase::InFlight {
            return self.current_action(); // not ours; nothing was running
        }
        let cancelled = matches!(
            result,
            JobResult::Failed {
                error: RotationError::Cancelled | RotationError::NotLeader,
                ..
            }
        );
        if !cancelled {
            self.had_outcome = true;
        }
        if let Some(target) = result.s3_target() {
            self.s3 = Some(target.clone());
        }
        let next = {
            let span = self.job_span.take().unwrap_or_else(|| self.span());
            let _entered = span.entered();
            self.outcome(result, now, policy, draw)
        };
        if self.removed {
            return Action::Drop;
        }
        if let Some(change) = self.pending.take() {
            self.phase = Phase::Waiting(now);
            return self.take_change(*change, now);
        }
        match next {
            // A `rotate` request came while this job ran: its own job now.
            Some(_) if self.rotate_now.is_some() => {
                self.phase = Phase::Waiting(now);
                Action::WaitUntil(now)
            }
            Some(at) => {
                self.phase = Phase::Waiting(at);
                Action::WaitUntil(at)
            }
            None => {
                self.phase = Phase::Finished;
                Action::Finished
            }
        }
    }

    /// Applies a job's outcome; answers the next due time (`None`: finished).
    fn outcome(
        &mut self,
        result: JobResult,
        now: SystemTime,
        policy: &Policy,
        draw: f64,
    ) -> Option<SystemTime> {
        match result {
            JobResult::Rotated {
                access_key_id,
                expires_at,
                etag,
                conflicts,
                verified,
                ..
            } => {
                self.etag = etag;
                self.failures_in_a_row = 0;
                self.last_success = Some(now);
                self.last_error = None;
                self.counters.successes += 1;
                self.counters.etag_conflicts += u64::from(conflicts);
                match verified {
                    Some(true) => self.counters.verifications_passed += 1,
                    Some(false) => self.counters.verifications_failed += 1,
                    None => {}
                }
                if let Some(passed) = verified {
                    self.test_failing = Some(!passed);
                }
                let next = self.next_rotation(now, expires_at, policy, draw);
                tracing::info!(
                    access_key_id = %access_key_id,
                    expires_at = %rfc3339(expires_at),
                    next_rotation_at = %rfc3339(next),
                    "credentials rotated"
                );
                self.pushed = Some(Pushed {
                    access_key_id,
                    expires_at,
                });
                (!policy.once).then_some(next)
            }
            JobResult::WouldRotate {
                access_key_id,
                expires_at,
                etag,
                ..
            } => {
                self.failures_in_a_row = 0;
                self.last_error = None;
                let next = self.next_rotation(now, expires_at, policy, draw);
                tracing::info!(
                    access_key_id = %access_key_id,
                    expires_at = %rfc3339(expires_at),
                    etag = %etag,
                    changes = "s3AccessKey, s3SecretKey (redacted), s3SessionToken (redacted)",
                    next_rotation_at = %rfc3339(next),
                    "dry run: would rotate credentials"
                );
                self.etag = Some(etag);
                (!policy.once).then_some(next)
            }
            JobResult::Unchanged { etag, .. } => {
                self.etag = Some(etag);
                self.failures_in_a_row = 0;
                let expires_at = self.pushed.as_ref().map_or(now, |p| p.expires_at);
                let next = self.next_rotation(now, expires_at, policy, draw);
                tracing::info!(
                    access_key_id = self.pushed.as_ref().map(|p| p.access_key_id.as_str()).unwrap_or(""),
                    expires_at = %rfc3339(expires_at),
                    next_rotation_at = %rfc3339(next),
                    "connection unchanged since restart, credentials kept"
                );
                Some(next)
            }
            JobResult::Failed {
                error: RotationError::Cancelled,
                etag,
                ..
            } => {
                // Shutdown: nothing happened on the connection.
                if etag.is_some() {
                    self.etag = etag;
                }
                None
            }
            JobResult::Failed {
                error: RotationError::NotLeader,
                etag,
                ..
            } => {
                // Leadership lost: not this connection's failure. The job's
                // etag view wins (`None` after a 412); whoever leads next
                // takes it up from the shared state.
                self.etag = etag;
                tracing::info!("stood down before the next request: no longer the leader");
                Some(now)
            }
            JobResult::Failed {
                error,
                etag,
                conflicts,
                ..
            } => self.failed(error, etag, conflicts, now, policy, draw),
        }
    }

    fn failed(
        &mut self,
        error: RotationError,
        etag: Option<String>,
        conflicts: u32,
        now: SystemTime,
        policy: &Policy,
        draw: f64,
    ) -> Option<SystemTime> {
        // The job's view of the etag wins: `None` after a refused or
        // malformed etag, so a bad one is never reused.
        self.etag = etag;
        self.counters.etag_conflicts += u64::from(conflicts);
        self.counters.failures += 1;
        self.last_error = Some(error.to_string());
        let attempt = self.failures_in_a_row;
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        let on_connection = self.pushed.as_ref().map(|p| p.expires_at);
        let kind = error.retry_kind();
        let plan = schedule::plan_retry(&policy.backoff, now, attempt, kind, on_connection, draw);
        let give_up =
            policy.once && (self.failures_in_a_row >= ONCE_ATTEMPTS || kind == RetryKind::Slow);
        let status = error.status().unwrap_or_default();
        let retry_in = humantime::format_duration(round_ms(until(now, plan.at)));
        if give_up {
            tracing::error!(error = %error, status = %status, attempt = self.failures_in_a_row, "rotation failed");
        } else if error.is_shared() {
            // Another request's failure (IMS down, or an STS call for the
            // same identity), logged at `warn` where it was made: one line
            // per request, not one per connection given its answer (at
            // 10,000 connections, thousands of identical lines a second).
            // Counted and shown per connection as any failure.
            tracing::debug!(error = %error, status = %status, attempt = self.failures_in_a_row, retry_in = %retry_in, "rotation failed, retrying");
        } else {
            tracing::warn!(error = %error, status = %status, attempt = self.failures_in_a_row, retry_in = %retry_in, "rotation failed, retrying");
        }
        if schedule::should_log_escalation(self.last_escalation_log, plan.escalation, now) {
            self.last_escalation_log = Some((plan.escalation, now));
            escalate(plan.escalation, on_connection);
        }
        // Refused since the first attempt: no expiry to escalate on, so the
        // count a connection that once worked would take stands in for it.
        if !give_up
            && on_connection.is_none()
            && self.last_success.is_none()
            && kind == RetryKind::Slow
            && self.failures_in_a_row
                >= schedule::refusals_before_escalation(&policy.backoff, policy.refresh_before)
        {
            tracing::error!(
                error = %error,
                attempt = self.failures_in_a_row,
                "refused since the first attempt; the credentials on the connection are not this daemon's and may have expired: fix the cause"
            );
        }
        (!give_up).then_some(plan.at)
    }

    fn next_rotation(
        &mut self,
        now: SystemTime,
        expires_at: SystemTime,
        policy: &Policy,
        draw: f64,
    ) -> SystemTime {
        let next =
            schedule::next_rotation(now, expires_at, policy.refresh_before, policy.jitter, draw);
        let warn_due = self
            .last_short_warning
            .and_then(|at| now.duration_since(at).ok())
            .is_none_or(|since| since >= SHORT_WARNING_INTERVAL);
        if next.short_lived && warn_due {
            self.last_short_warning = Some(now);
            tracing::warn!(
                expires_at = %rfc3339(expires_at),
                expires_in = %humantime::format_duration(round_ms(until(now, expires_at))),
                refresh_before = %humantime::format_duration(policy.refresh_before),
                "credentials live shorter than refresh_before, rotating at half their remaining life; check the role's maximum session duration"
            );
        }
        next.at
    }

    /// The outward view as of the last [`Self::refresh_view`] (what the
    /// scheduler publishes).
    pub fn view(&self) -> &Arc<ConnectionStatus> {
        &self.view
    }

    /// Rebuilds [`Self::view`] from the state: in place when no snapshot
    /// holds the previous one (its strings reused), else as a new `Arc`.
    pub fn refresh_view(&mut self) {
        // A shared placeholder while the view is out: no allocation.
        static PLACEHOLDER: std::sync::LazyLock<Arc<ConnectionStatus>> =
            std::sync::LazyLock::new(Arc::default);
        let mut view = std::mem::replace(&mut self.view, Arc::clone(&PLACEHOLDER));
        self.fill(Arc::make_mut(&mut view));
        self.view = view;
    }

    /// The view as of now (what [`Self::refresh_view`] would publish).
    pub fn status(&self) -> ConnectionStatus {
        let mut status = ConnectionStatus::default();
        self.fill(&mut status);
        status
    }

    /// Writes the view over `view`, reusing its strings.
    fn fill(&self, view: &mut ConnectionStatus) {
        if !Arc::ptr_eq(&view.config, &self.config) {
            view.config = Arc::clone(&self.config);
        }
        match (&mut view.access_key_id, &self.pushed) {
            (Some(held), Some(pushed)) => held.clone_from(&pushed.access_key_id),
            (slot, pushed) => *slot = pushed.as_ref().map(|p| p.access_key_id.clone()),
        }
        view.expires_at = self.pushed.as_ref().map(|p| p.expires_at);
        view.next_rotation_at = match self.phase {
            Phase::Waiting(at) => Some(at),
            Phase::InFlight | Phase::Finished => None,
        };
        view.last_success_at = self.last_success;
        view.last_error.clone_from(&self.last_error);
        view.counters = self.counters;
        view.etag.clone_from(&self.etag);
        view.test_failing = self.test_failing;
    }
}

/// The telemetry outcome a job result counts as (`None`: not an attempt).
pub fn outcome_of(result: &JobResult) -> Option<Outcome> {
    match result {
        JobResult::Rotated { .. } => Some(Outcome::Success),
        JobResult::Failed {
            error: RotationError::Cancelled | RotationError::NotLeader,
            ..
        } => None,
        JobResult::Failed { .. } => Some(Outcome::Failure),
        JobResult::WouldRotate { .. } | JobResult::Unchanged { .. } => None,
    }
}

fn escalate(escalation: Escalation, expires_at: Option<SystemTime>) {
    let expires_at = expires_at.map(rfc3339).unwrap_or_default();
    match escalation {
        Escalation::None => {}
        Escalation::ExpiresBeforeRetry { left } => tracing::error!(
            expires_at = %expires_at,
            expires_in = %humantime::format_duration(round_ms(left)),
            "credentials expire before next attempt"
        ),
        Escalation::Expired { ago } => tracing::error!(
            expires_at = %expires_at,
            expired_ago = %humantime::format_duration(round_ms(ago)),
            "credentials expired"
        ),
    }
}
