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
//! Every other view of a connection (telemetry and `/status`, `/readyz`, the
//! state file, the `once` report) is derived from this one state by
//! [`Connection::status`], [`Connection::persisted`] and its counts (the report).

use std::time::{Duration, SystemTime};

use crate::clock::{later, rfc3339, round_ms, until};
use crate::config::{ConnectionConfig, RotationConfig};
use crate::coordination::local::PersistedConnection;
use crate::observe::telemetry::{ConnectionStatus, Outcome};
use crate::policy::backoff::BackoffPolicy;
use crate::policy::schedule::{self, Escalation, RetryKind};
use crate::remote::sts::StsRequest;
use crate::rotation::{Job, JobResult, RotationError};

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
    Changed(Box<ConnectionConfig>, StsRequest),
    /// A reload removed it.
    Removed,
    /// The daemon is stopping.
    Shutdown,
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
    /// No further work.
    Finished,
    /// Forget the connection (removed, and no job of it runs any more).
    Drop,
}

/// Totals for this run, for the `once` and `demo` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Successful rotations.
    pub rotations: u64,
    /// 412s absorbed.
    pub conflicts: u64,
    /// Failed attempts.
    pub failures: u64,
}

/// A settings change that waits for the in-flight job.
#[derive(Debug)]
struct PendingChange {
    config: ConnectionConfig,
    sts: StsRequest,
}

/// One connection as the daemon knows it. Holds no secret.
#[derive(Debug)]
pub struct Connection {
    config: ConnectionConfig,
    sts: StsRequest,
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
    pending: Option<PendingChange>,
    removed: bool,
    /// The bucket, folder and endpoint the pre-push check probes, learnt
    /// from the connection's GET and kept with the etag.
    s3: Option<crate::remote::s3probe::S3Target>,
    last_escalation_log: Option<(Escalation, SystemTime)>,
    last_short_warning: Option<SystemTime>,
    counts: Counts,
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
}

impl Connection {
    /// A connection nothing is known about: due at once.
    pub fn new(config: ConnectionConfig, sts: StsRequest, now: SystemTime) -> Self {
        Self {
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
            counts: Counts::default(),
            last_error: None,
        }
    }

    /// A connection remembered from the state file. When its credentials
    /// are still good for longer than `refresh_before` (and it is not `once`),
    /// the first job only checks that its etag is unchanged. A record with
    /// times this daemon could not have written is ignored (rotate now).
    pub fn restored(
        config: ConnectionConfig,
        sts: StsRequest,
        saved: &PersistedConnection,
        now: SystemTime,
        policy: &Policy,
    ) -> Self {
        let mut connection = Self::new(config, sts, now);
        let absurd = saved.expires_at > later(now, MAX_CREDENTIAL_LIFETIME)
            || saved
                .last_success_at
                .is_some_and(|at| at > later(now, RESTORE_SKEW));
        if absurd {
            tracing::warn!(
                connection = %connection.config.id,
                "state file record has impossible times; ignoring it, rotating now"
            );
            return connection;
        }
        connection.last_success = saved.last_success_at;
        if saved.sandbox != connection.config.sandbox || policy.once {
            return connection;
        }
        let expires_at = policy.believable_expiry(saved, now);
        connection.restored_expiry = Some(expires_at);
        if until(now, expires_at) > policy.refresh_before {
            connection.pushed = Some(Pushed {
                access_key_id: saved.access_key_id.clone(),
                expires_at,
            });
            connection.resume_etag = Some(saved.etag.clone());
            connection.etag = Some(saved.etag.clone());
        }
        connection
    }

    /// Takes up the shared state another replica wrote (coordination: on
    /// becoming the leader, and for a standby's view). Of the shared record
    /// and what this replica knows itself, the credentials that expire
    /// later win; when they are good for longer than `refresh_before` the
    /// connection is scheduled from their expiry (no request: the next
    /// PATCH's `If-Match` catches any change meanwhile), otherwise it is due
    /// now. A record with impossible times, or from another sandbox, is
    /// ignored. A connection with a job in flight is left alone.
    pub fn adopt(
        &mut self,
        shared: Option<&PersistedConnection>,
        now: SystemTime,
        policy: &Policy,
        draw: f64,
    ) -> Action {
        if matches!(self.phase, Phase::InFlight | Phase::Finished) {
            return self.current_action();
        }
        let usable = shared.filter(|saved| {
            saved.sandbox == self.config.sandbox
                && saved.expires_at <= later(now, MAX_CREDENTIAL_LIFETIME)
                && saved
                    .last_success_at
                    .is_none_or(|at| at <= later(now, RESTORE_SKEW))
        });
        // A record whose etag differs from one listed after its rotation
        // describes a connection someone has changed since: not believed
        // (issue 26), so the connection rotates rather than trust it.
        // "After" with a margin: the record's time is rounded down to the
        // second and written by another host's clock, and a listing taken
        // while the leader was rotating may show the etag before its PATCH.
        let usable = usable.filter(|saved| match &self.listed_etag {
            Some((etag, seen_at))
                if *etag != saved.etag
                    && saved
                        .last_success_at
                        .is_none_or(|at| later(at, RESTORE_SKEW) < *seen_at) =>
            {
                let _span = self.span().entered();
                tracing::warn!("shared state's etag differs from the listed one; not adopting it");
                false
            }
            _ => true,
        });
        let believed = usable.map(|saved| policy.believable_expiry(saved, now));
        if let (Some(saved), Some(expires_at)) = (usable, believed)
            && self
                .pushed
                .as_ref()
                .is_none_or(|own| own.expires_at <= expires_at)
        {
            self.pushed = Some(Pushed {
                access_key_id: saved.access_key_id.clone(),
                expires_at,
            });
            self.etag = Some(saved.etag.clone());
            self.last_success = saved.last_success_at.or(self.last_success);
            self.resume_etag = None;
            self.failures_in_a_row = 0;
            self.last_error = None;
        }
        let fresh_until = self
            .pushed
            .as_ref()
            .map(|p| p.expires_at)
            .filter(|at| until(now, *at) > policy.refresh_before);
        let next = match fresh_until {
            Some(expires_at) => {
                self.had_outcome = true;
                self.next_rotation(now, expires_at, policy, draw)
            }
            None => now,
        };
        self.phase = Phase::Waiting(next);
        Action::WaitUntil(next)
    }

    /// An etag read in bulk (a list page) before the first job. A new
    /// connection saves its GET; after a restart, an etag equal to the one
    /// we left proves the connection unchanged without any request (it is
    /// then scheduled from its saved expiry), and a different one makes it
    /// rotate at once with the listed etag.
    pub fn seed_etag(
        &mut self,
        listed: &str,
        now: SystemTime,
        policy: &Policy,
        draw: f64,
    ) -> Action {
        self.listed_etag = Some((listed.to_owned(), now));
        if self.phase == Phase::InFlight {
            return Action::AwaitJob;
        }
        match self.resume_etag.take() {
            Some(left) if left == listed => {
                let expires_at = self.pushed.as_ref().map_or(now, |p| p.expires_at);
                let next = self.next_rotation(now, expires_at, policy, draw);
                let _span = self.span().entered();
                tracing::info!(
                    access_key_id = self.pushed.as_ref().map(|p| p.access_key_id.as_str()).unwrap_or(""),
                    expires_at = %rfc3339(expires_at),
                    next_rotation_at = %rfc3339(next),
                    "connection unchanged since restart, credentials kept"
                );
                self.had_outcome = true;
                self.phase = Phase::Waiting(next);
            }
            Some(_) => self.etag = Some(listed.to_owned()),
            None if self.etag.is_none() => self.etag = Some(listed.to_owned()),
            None => {}
        }
        self.current_action()
    }

    /// The S3 target (bucket, folder, endpoint) read in bulk from the same
    /// list item as the etag, before the first job: its pre-push check then
    /// needs no `GET`. A target learnt from a job is never overwritten, and a
    /// running job is left alone (its result carries what it read).
    pub fn seed_s3(&mut self, listed: &crate::remote::s3probe::S3Target) {
        if self.phase != Phase::InFlight && self.s3.is_none() {
            self.s3 = Some(listed.clone());
        }
    }

    /// Its settings.
    pub fn config(&self) -> &ConnectionConfig {
        &self.config
    }

    /// Which credentials it gets.
    pub fn sts(&self) -> &StsRequest {
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

    /// Totals for this run.
    pub fn counts(&self) -> Counts {
        self.counts
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
            Event::Changed(config, sts) => self.on_changed(*config, sts, now),
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
        }
    }

    fn on_due(&mut self, now: SystemTime) -> Action {
        match self.phase {
            Phase::InFlight => Action::AwaitJob,
            Phase::Finished => Action::Finished,
            // A stale wake-up (the connection was rescheduled meanwhile).
            Phase::Waiting(at) if at > now => Action::WaitUntil(at),
            Phase::Waiting(_) => {
                self.phase = Phase::InFlight;
                Action::Dispatch(Box::new(Job {
                    id: self.config.id.clone(),
                    sandbox: self.config.sandbox.clone(),
                    sts: self.sts.clone(),
                    known_etag: self.etag.clone(),
                    held: self.pushed.as_ref().map(|p| p.access_key_id.clone()),
                    resume_if_etag: self.resume_etag.take(),
                    s3: self.s3.clone(),
                }))
            }
        }
    }

    fn on_changed(&mut self, config: ConnectionConfig, sts: StsRequest, now: SystemTime) -> Action {
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
            self.pending = Some(PendingChange { config, sts });
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
            return self.take_change(change, now);
        }
        match next {
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
                ..
            } => {
                self.etag = etag;
                self.failures_in_a_row = 0;
                self.last_success = Some(now);
                self.last_error = None;
                self.counts.rotations += 1;
                self.counts.conflicts += u64::from(conflicts);
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
        self.counts.conflicts += u64::from(conflicts);
        self.counts.failures += 1;
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

    /// The view operators see (telemetry, `/status`, `/readyz`).
    pub fn status(&self) -> ConnectionStatus {
        let mut status = ConnectionStatus::default();
        self.write_status(&mut status);
        status
    }

    /// [`Self::status`] written over `status`, reusing its strings.
    pub fn write_status(&self, status: &mut ConnectionStatus) {
        status.id.clone_from(&self.config.id);
        status.name.clone_from(&self.config.name);
        status.sandbox.clone_from(&self.config.sandbox);
        match (&mut status.access_key_id, &self.pushed) {
            (Some(held), Some(pushed)) => held.clone_from(&pushed.access_key_id),
            (slot, pushed) => *slot = pushed.as_ref().map(|p| p.access_key_id.clone()),
        }
        status.expires_at = self.pushed.as_ref().map(|p| p.expires_at);
        status.next_rotation_at = match self.phase {
            Phase::Waiting(at) => Some(at),
            Phase::InFlight | Phase::Finished => None,
        };
        status.last_success_at = self.last_success;
        status.last_error.clone_from(&self.last_error);
        status.origin = self.config.origin;
    }

    /// What the state file keeps (nothing until this daemon pushed and knows the etag).
    pub fn persisted(&self) -> Option<PersistedConnection> {
        let pushed = self.pushed.as_ref()?;
        Some(PersistedConnection {
            sandbox: self.config.sandbox.clone(),
            etag: self.etag.clone()?,
            access_key_id: pushed.access_key_id.clone(),
            expires_at: pushed.expires_at,
            last_success_at: self.last_success,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::schedule::{EXPIRY_MARGIN, RETRY_AFTER_CAP};
    use crate::remote::flow::FlowError;
    use crate::remote::sts::StsError;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + S(1_700_000_000 + secs)
    }

    /// refresh 20 min before, no jitter (draws below are then irrelevant to
    /// the rotation time), retries 1 s .. 2 min.
    fn policy() -> Policy {
        Policy {
            refresh_before: S(1200),
            jitter: Duration::ZERO,
            backoff: BackoffPolicy {
                min: S(1),
                max: S(120),
            },
            once: false,
            session_duration: S(3600),
        }
    }

    fn config(id: &str) -> ConnectionConfig {
        ConnectionConfig {
            id: id.to_owned(),
            sandbox: "prod".to_owned(),
            name: id.to_owned(),
            role_arn: None,
            external_id: None,
            session_name: None,
            session_policy: None,
            policy_arns: Vec::new(),
            origin: crate::config::Origin::Explicit,
        }
    }

    fn sts(session: &str) -> StsRequest {
        StsRequest {
            role_arn: None,
            external_id: None,
            session_name: session.to_owned(),
            session_policy: None,
            policy_arns: Vec::new(),
            duration: S(3600),
        }
    }

    fn fresh(now: SystemTime) -> Connection {
        Connection::new(config("c1"), sts("a"), now)
    }

    fn dispatch(c: &mut Connection, now: SystemTime) -> Job {
        match c.apply(Event::Due, now, &policy(), 0.5) {
            Action::Dispatch(job) => *job,
            other => panic!("expected a dispatch, got {other:?}"),
        }
    }

    fn rotated(key: &str, expires_at: SystemTime) -> JobResult {
        JobResult::Rotated {
            access_key_id: key.to_owned(),
            expires_at,
            etag: Some("\"e2\"".to_owned()),
            conflicts: 0,
            s3: None,
        }
    }

    fn failed(error: RotationError) -> JobResult {
        JobResult::Failed {
            error,
            etag: Some("\"e1\"".to_owned()),
            conflicts: 0,
            s3: None,
        }
    }

    fn wait_of(action: Action) -> SystemTime {
        match action {
            Action::WaitUntil(at) => at,
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    /// A connection holding credentials that expire at `expires_at`, idle.
    fn holding(now: SystemTime, expires_at: SystemTime) -> Connection {
        let mut c = fresh(now);
        dispatch(&mut c, now);
        c.apply(
            Event::JobDone(rotated("ASIAOLD", expires_at)),
            now,
            &policy(),
            0.0,
        );
        c
    }

    fn shared(key: &str, expires_at: SystemTime) -> PersistedConnection {
        PersistedConnection {
            sandbox: "prod".to_owned(),
            etag: "\"shared\"".to_owned(),
            access_key_id: key.to_owned(),
            expires_at,
            last_success_at: Some(t(0)),
        }
    }

    /// The levels and messages of the events `f` logs.
    fn logged(f: impl FnOnce()) -> Vec<(tracing::Level, String)> {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Default)]
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        struct Record(Arc<Mutex<Vec<(tracing::Level, String)>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Record {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                let mut message = Message::default();
                event.record(&mut message);
                self.0
                    .lock()
                    .unwrap()
                    .push((*event.metadata().level(), message.0));
            }
        }
        let events = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Record(Arc::clone(&events)));
        tracing::subscriber::with_default(subscriber, f);
        events.lock().unwrap().clone()
    }

    #[test]
    fn refused_since_the_first_attempt_escalates_to_error_like_a_connection_that_once_worked() {
        let refused = || {
            failed(RotationError::Flow(FlowError::Rejected {
                status: 404,
                detail: "no such connection in this sandbox".to_owned(),
            }))
        };
        let threshold =
            schedule::refusals_before_escalation(&policy().backoff, policy().refresh_before);
        assert_eq!(threshold, 10);
        let errors_per_attempt = |c: &mut Connection, start: SystemTime| {
            let mut now = start;
            (1..=threshold + 2)
                .map(|_| {
                    dispatch(c, now);
                    let mut next = now;
                    let events = logged(|| {
                        next = wait_of(c.apply(Event::JobDone(refused()), now, &policy(), 0.5));
                    });
                    now = next;
                    events
                        .iter()
                        .filter(|(level, _)| *level == tracing::Level::ERROR)
                        .count()
                })
                .collect::<Vec<_>>()
        };
        // Never worked: warn up to the threshold, then error on each attempt.
        let mut never = fresh(t(0));
        let errors = errors_per_attempt(&mut never, t(0));
        let first_error = errors.iter().position(|&n| n > 0).map(|i| i + 1);
        // Once worked, refused from its rotation time on: the same count.
        let mut once = holding(t(0), t(3600));
        let once_errors = errors_per_attempt(&mut once, t(3600 - 1200));
        let once_first = once_errors.iter().position(|&n| n > 0).map(|i| i + 1);
        assert_eq!(once_first, Some(threshold as usize), "{once_errors:?}");
        assert_eq!(first_error, once_first, "{errors:?}");
        assert!(
            errors[threshold as usize..].iter().all(|&n| n == 1),
            "{errors:?}"
        );
    }

    #[test]
    fn adopting_fresh_shared_state_schedules_from_its_expiry_without_a_request() {
        let mut c = fresh(t(0));
        let at = wait_of(c.adopt(Some(&shared("ASIASHARED", t(3600))), t(10), &policy(), 0.5));
        assert_eq!(at, t(3600 - 1200));
        assert_eq!(c.pushed().unwrap().access_key_id, "ASIASHARED");
        assert_eq!(c.etag(), Some("\"shared\""));
        assert!(c.had_outcome());
        // When due, the job PATCHes with the shared etag (no GET first).
        let job = dispatch(&mut c, at);
        assert_eq!(job.known_etag.as_deref(), Some("\"shared\""));
    }

    #[test]
    fn adopting_keeps_whichever_credentials_expire_later() {
        let mut c = holding(t(0), t(7200));
        let at = wait_of(c.adopt(Some(&shared("ASIAOLDER", t(3600))), t(10), &policy(), 0.5));
        assert_eq!(
            c.pushed().unwrap().expires_at,
            t(7200),
            "our own newer push wins"
        );
        assert_eq!(at, t(7200 - 1200));
    }

    #[test]
    fn adopting_stale_absurd_or_foreign_records_rotates_now() {
        for record in [
            shared("ASIASTALE", t(600)),                 // < refresh_before left
            shared("ASIAFAR", t(100 * 365 * 24 * 3600)), // impossible expiry
            PersistedConnection {
                sandbox: "dev".to_owned(),
                ..shared("ASIADEV", t(3600))
            },
        ] {
            let mut c = fresh(t(0));
            assert_eq!(
                wait_of(c.adopt(Some(&record), t(10), &policy(), 0.5)),
                t(10),
                "{record:?}"
            );
        }
        let mut c = fresh(t(0));
        assert_eq!(wait_of(c.adopt(None, t(10), &policy(), 0.5)), t(10));
    }

    #[test]
    fn saved_and_shared_expiries_are_clamped_to_one_session() {
        // Issue 26 #6: 35 h ahead under a 1 h session stopped rotation for
        // 35 h while /status said "fresh".
        let far = t(35 * 3600);
        let record = PersistedConnection {
            last_success_at: Some(t(0)),
            ..shared("ASIAFAR", far)
        };
        let restored = Connection::restored(config("c1"), sts("a"), &record, t(10), &policy());
        assert!(
            restored.credentials_expire_at().unwrap() <= t(3600 + 300),
            "{:?}",
            restored.credentials_expire_at()
        );
        let mut c = fresh(t(0));
        let at = wait_of(c.adopt(Some(&record), t(10), &policy(), 0.5));
        assert!(
            at <= t(3600 + 300 - 1200),
            "adopted and scheduled at {at:?}"
        );
        assert!(c.pushed().unwrap().expires_at <= t(3600 + 300));
    }

    #[test]
    fn a_shared_record_whose_etag_differs_from_a_later_listing_is_not_adopted() {
        // Issue 26 #6: adopt sent no request although the listing showed
        // that the connection had changed since the record was written.
        let mut c = fresh(t(0));
        c.seed_etag("\"changed-by-someone\"", t(900), &policy(), 0.5);
        let record = shared("ASIASHARED", t(3600));
        assert_eq!(
            wait_of(c.adopt(Some(&record), t(910), &policy(), 0.5)),
            t(910)
        );
        assert!(c.pushed().is_none());
        // The same etag as listed: adopted as before.
        let mut c = fresh(t(0));
        c.seed_etag("\"shared\"", t(900), &policy(), 0.5);
        assert_eq!(
            wait_of(c.adopt(Some(&record), t(910), &policy(), 0.5)),
            t(3600 - 1200)
        );
        // A listing taken about when the record's rotation happened (the
        // leader's PATCH racing a standby's start) proves nothing.
        let mut c = fresh(t(0));
        c.seed_etag("\"before-the-patch\"", t(5), &policy(), 0.5);
        assert_eq!(
            wait_of(c.adopt(Some(&record), t(10), &policy(), 0.5)),
            t(3600 - 1200)
        );
    }

    #[test]
    fn adopting_leaves_a_running_job_alone() {
        let mut c = fresh(t(0));
        dispatch(&mut c, t(0));
        assert!(matches!(
            c.adopt(Some(&shared("ASIASHARED", t(3600))), t(1), &policy(), 0.5),
            Action::AwaitJob
        ));
        assert!(c.pushed().is_none());
    }

    #[test]
    fn standing_down_is_no_failure_and_forgets_a_refused_etag() {
        let mut c = fresh(t(0));
        dispatch(&mut c, t(0));
        let result = JobResult::Failed {
            error: RotationError::NotLeader,
            etag: None,
            conflicts: 1,
            s3: None,
        };
        assert_eq!(
            outcome_of(&result),
            None,
            "not counted as a rotation failure"
        );
        let at = wait_of(c.apply(Event::JobDone(result), t(1), &policy(), 0.5));
        assert_eq!(at, t(1), "due again for whoever leads next");
        assert_eq!(c.counts().failures, 0);
        assert_eq!(c.last_error(), None);
        assert_eq!(c.etag(), None, "after a 412 the next leader re-reads");
    }

    #[test]
    fn a_new_connection_is_due_at_once_and_reads_its_etag() {
        let mut c = fresh(t(0));
        assert_eq!(c.phase(), Phase::Waiting(t(0)));
        let job = dispatch(&mut c, t(0));
        assert_eq!(job.known_etag, None);
        assert_eq!(job.held, None);
        assert_eq!(c.phase(), Phase::InFlight);
    }

    #[test]
    fn never_two_jobs_for_one_connection() {
        let mut c = fresh(t(0));
        dispatch(&mut c, t(0));
        assert!(matches!(
            c.apply(Event::Due, t(1), &policy(), 0.5),
            Action::AwaitJob
        ));
    }

    #[test]
    fn a_stale_wake_up_waits_for_the_real_due_time() {
        let mut c = holding(t(0), t(3600));
        assert_eq!(wait_of(c.apply(Event::Due, t(10), &policy(), 0.5)), t(2400));
    }

    #[test]
    fn success_schedules_from_the_sts_expiry() {
        let mut c = fresh(t(0));
        dispatch(&mut c, t(0));
        let at = wait_of(c.apply(
            Event::JobDone(rotated("ASIA1", t(3600))),
            t(0),
            &policy(),
            0.0,
        ));
        assert_eq!(at, t(2400), "expiry − refresh_before");
        assert_eq!(c.pushed().unwrap().access_key_id, "ASIA1");
        assert_eq!(c.etag(), Some("\"e2\""));
        assert_eq!(c.counts().rotations, 1);
        // The next job skips the GET and names the key it replaces.
        let job = dispatch(&mut c, t(2400));
        assert_eq!(job.known_etag.as_deref(), Some("\"e2\""));
        assert_eq!(job.held.as_deref(), Some("ASIA1"));
    }

    #[test]
    fn jitter_pulls_the_rotation_earlier() {
        let mut p = policy();
        p.jitter = S(60);
        let mut c = fresh(t(0));
        dispatch(&mut c, t(0));
        let at = wait_of(c.apply(Event::JobDone(rotated("ASIA1", t(3600))), t(0), &p, 0.5));
        assert_eq!(at, t(2370));
    }

    #[test]
    fn short_credentials_rotate_at_half_their_life() {
        let mut c = fresh(t(0));
        dispatch(&mut c, t(0));
        let at = wait_of(c.apply(
            Event::JobDone(rotated("ASIA1", t(600))),
            t(0),
            &policy(),
            0.0,
        ));
        assert_eq!(at, t(300));
    }

    #[test]
    fn transient_failures_back_off_exponentially_within_retry_max() {
        let mut c = holding(t(0), t(3600));
        let mut now = t(2400);
        let mut waits = Vec::new();
        for _ in 0..10 {
            dispatch(&mut c, now);
            let error = RotationError::Flow(FlowError::Unavailable("HTTP 502".into()));
            // draw just below 1: the cap of each attempt.
            let at = wait_of(c.apply(Event::JobDone(failed(error)), now, &policy(), 0.999));
            waits.push(at.duration_since(now).unwrap().as_secs_f64().round() as u64);
            now = at;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 120, 120, 120]);
        assert_eq!(c.counts().failures, 10);
        assert!(c.last_error().unwrap().contains("502"));
    }

    #[test]
    fn rejections_and_sts_denials_wait_the_slow_cadence() {
        for error in [
            RotationError::Flow(FlowError::Rejected {
                status: 404,
                detail: "gone".into(),
            }),
            RotationError::Sts(StsError::Rejected {
                code: "AccessDenied".into(),
                message: "no".into(),
            }),
        ] {
            let mut c = holding(t(0), t(3600));
            dispatch(&mut c, t(2400));
            let at = wait_of(c.apply(Event::JobDone(failed(error)), t(2400), &policy(), 0.1));
            assert_eq!(at, t(2520), "retry_max");
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap_and_before_expiry() {
        let throttled = |secs| {
            failed(RotationError::Flow(FlowError::Throttled {
                status: 429,
                retry_after: Some(S(secs)),
            }))
        };
        // 7 s: honoured.
        let mut c = holding(t(0), t(7200));
        dispatch(&mut c, t(6000));
        assert_eq!(
            wait_of(c.apply(Event::JobDone(throttled(7)), t(6000), &policy(), 0.5)),
            t(6007)
        );
        // An hour, with 20 minutes left when the rotation is due: the cap.
        let mut c = holding(t(0), t(5400));
        dispatch(&mut c, t(4200));
        let at = wait_of(c.apply(Event::JobDone(throttled(3600)), t(4200), &policy(), 0.5));
        assert_eq!(at, t(4200) + RETRY_AFTER_CAP);
        // An hour, nothing pushed yet (expiry unknown, the credentials there
        // may be dead): retry_max.
        let mut c = fresh(t(0));
        dispatch(&mut c, t(0));
        let at = wait_of(c.apply(Event::JobDone(throttled(3600)), t(0), &policy(), 0.5));
        assert_eq!(at, t(120));
        // An hour with five minutes left: pulled in well before expiry.
        let mut c = holding(t(0), t(600));
        dispatch(&mut c, t(300));
        let at = wait_of(c.apply(Event::JobDone(throttled(3600)), t(300), &policy(), 0.5));
        assert!(at > t(300) && at <= t(600) - EXPIRY_MARGIN, "{at:?}");
        // u64::MAX seconds: no overflow, same rule.
        dispatch(&mut c, at);
        let next = wait_of(c.apply(Event::JobDone(throttled(u64::MAX)), at, &policy(), 0.5));
        assert!(
            next > at && next <= t(600) - EXPIRY_MARGIN.min(S(1)),
            "{next:?}"
        );
    }

    #[test]
    fn a_refused_or_malformed_etag_is_not_kept() {
        let mut c = holding(t(0), t(3600));
        dispatch(&mut c, t(2400));
        let result = JobResult::Failed {
            error: RotationError::Flow(FlowError::Malformed("bad etag".into())),
            etag: None,
            conflicts: 0,
            s3: None,
        };
        c.apply(Event::JobDone(result), t(2400), &policy(), 0.5);
        assert_eq!(c.etag(), None);
        let job = dispatch(&mut c, t(2500));
        assert_eq!(job.known_etag, None, "the next job must GET again");
    }

    #[test]
    fn a_panicked_job_backs_off_and_keeps_the_state() {
        let mut c = holding(t(0), t(3600));
        dispatch(&mut c, t(2400));
        let result = JobResult::Failed {
            error: RotationError::Internal("the job panicked".into()),
            etag: None,
            conflicts: 0,
            s3: None,
        };
        let at = wait_of(c.apply(Event::JobDone(result), t(2400), &policy(), 0.0));
        assert_eq!(at, t(2401));
        assert_eq!(c.pushed().unwrap().access_key_id, "ASIAOLD");
    }

    #[test]
    fn once_finishes_after_success_or_its_attempts() {
        let mut p = policy();
        p.once = true;
        let mut c = fresh(t(0));
        dispatch(&mut c, t(0));
        assert!(matches!(
            c.apply(Event::JobDone(rotated("ASIA1", t(3600))), t(0), &p, 0.5),
            Action::Finished
        ));
        let mut c = fresh(t(0));
        let mut now = t(0);
        for attempt in 1..=ONCE_ATTEMPTS {
            dispatch(&mut c, now);
            let error = RotationError::Flow(FlowError::Unavailable("reset".into()));
            match c.apply(Event::JobDone(failed(error)), now, &p, 0.5) {
                Action::WaitUntil(at) if attempt < ONCE_ATTEMPTS => now = at,
                Action::Finished if attempt == ONCE_ATTEMPTS => {}
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        // A slow-cadence error ends `once` at the first attempt.
        let mut c = fresh(t(0));
        dispatch(&mut c, t(0));
        let error = RotationError::Flow(FlowError::Unsuitable("not S3".into()));
        assert!(matches!(
            c.apply(Event::JobDone(failed(error)), t(0), &p, 0.5),
            Action::Finished
        ));
        assert_eq!(c.phase(), Phase::Finished);
    }

    fn saved(expires_at: SystemTime) -> PersistedConnection {
        PersistedConnection {
            sandbox: "prod".into(),
            etag: "\"e9\"".into(),
            access_key_id: "ASIASAVED".into(),
            expires_at,
            last_success_at: Some(t(0)),
        }
    }

    #[test]
    fn restart_with_good_credentials_only_checks_the_etag() {
        let mut c = Connection::restored(config("c1"), sts("a"), &saved(t(3600)), t(60), &policy());
        assert!(!c.had_outcome(), "a restored record is not a first pass");
        let job = dispatch(&mut c, t(60));
        assert_eq!(job.resume_if_etag.as_deref(), Some("\"e9\""));
        assert_eq!(job.held.as_deref(), Some("ASIASAVED"));
        let at = wait_of(c.apply(
            Event::JobDone(JobResult::Unchanged {
                etag: "\"e9\"".into(),
                s3: None,
            }),
            t(60),
            &policy(),
            0.0,
        ));
        assert_eq!(at, t(2400));
        assert!(c.had_outcome());
    }

    #[test]
    fn restart_near_expiry_or_with_absurd_times_rotates_now() {
        let near = Connection::restored(config("c1"), sts("a"), &saved(t(1000)), t(0), &policy());
        assert!(near.pushed().is_none());
        let ten_years = t(0) + S(10 * 365 * 86_400);
        let mut absurd =
            Connection::restored(config("c1"), sts("a"), &saved(ten_years), t(0), &policy());
        assert!(absurd.pushed().is_none());
        assert_eq!(dispatch(&mut absurd, t(0)).resume_if_etag, None);
        let mut future_success = saved(t(3600));
        future_success.last_success_at = Some(t(86_400));
        let c = Connection::restored(config("c1"), sts("a"), &future_success, t(0), &policy());
        assert!(c.pushed().is_none());
    }

    #[test]
    fn a_change_during_a_job_waits_for_it_then_rotates_with_the_new_identity() {
        let mut c = holding(t(0), t(3600));
        dispatch(&mut c, t(2400));
        let action = c.apply(
            Event::Changed(Box::new(config("c1")), sts("b")),
            t(2401),
            &policy(),
            0.5,
        );
        assert!(matches!(action, Action::AwaitJob));
        assert!(matches!(
            c.apply(Event::Due, t(2401), &policy(), 0.5),
            Action::AwaitJob
        ));
        // The old job's result is applied (it tells which key is on the
        // connection), then the connection is due at once with the new identity.
        let at = wait_of(c.apply(
            Event::JobDone(rotated("ASIAOLDROLE", t(6000))),
            t(2402),
            &policy(),
            0.5,
        ));
        assert_eq!(at, t(2402));
        assert_eq!(c.pushed().unwrap().access_key_id, "ASIAOLDROLE");
        let job = dispatch(&mut c, t(2402));
        assert_eq!(job.sts, sts("b"));
        assert_eq!(job.held.as_deref(), Some("ASIAOLDROLE"));
    }

    #[test]
    fn a_rename_keeps_the_schedule() {
        let mut c = holding(t(0), t(3600));
        let mut renamed = config("c1");
        renamed.name = "sales".into();
        let at = wait_of(c.apply(
            Event::Changed(Box::new(renamed), sts("a")),
            t(5),
            &policy(),
            0.5,
        ));
        assert_eq!(at, t(2400));
        assert_eq!(c.status().name, "sales");
    }

    #[test]
    fn a_removed_connection_goes_once_its_job_ends() {
        let mut c = holding(t(0), t(3600));
        dispatch(&mut c, t(2400));
        assert!(matches!(
            c.apply(Event::Removed, t(2401), &policy(), 0.5),
            Action::AwaitJob
        ));
        assert!(matches!(
            c.apply(
                Event::JobDone(rotated("ASIA2", t(6000))),
                t(2402),
                &policy(),
                0.5
            ),
            Action::Drop
        ));
        let mut idle = holding(t(0), t(3600));
        assert!(matches!(
            idle.apply(Event::Removed, t(1), &policy(), 0.5),
            Action::Drop
        ));
    }

    #[test]
    fn shutdown_finishes_idle_connections_and_waits_for_jobs() {
        let mut idle = holding(t(0), t(3600));
        assert!(matches!(
            idle.apply(Event::Shutdown, t(1), &policy(), 0.5),
            Action::Finished
        ));
        let mut busy = holding(t(0), t(3600));
        dispatch(&mut busy, t(2400));
        assert!(matches!(
            busy.apply(Event::Shutdown, t(2401), &policy(), 0.5),
            Action::AwaitJob
        ));
        let cancelled = JobResult::Failed {
            error: RotationError::Cancelled,
            etag: Some("\"e2\"".into()),
            conflicts: 0,
            s3: None,
        };
        assert!(matches!(
            busy.apply(Event::JobDone(cancelled), t(2402), &policy(), 0.5),
            Action::Finished
        ));
        assert_eq!(
            busy.counts().failures,
            0,
            "a cancelled job is not a failure"
        );
    }

    #[test]
    fn status_and_state_file_are_views_of_the_one_state() {
        let c = holding(t(0), t(3600));
        let status = c.status();
        assert_eq!(status.access_key_id.as_deref(), Some("ASIAOLD"));
        assert_eq!(status.expires_at, Some(t(3600)));
        assert_eq!(status.next_rotation_at, Some(t(2400)));
        let record = c.persisted().unwrap();
        assert_eq!(record.etag, "\"e2\"");
        assert_eq!(record.expires_at, t(3600));
        assert!(fresh(t(0)).persisted().is_none());
    }
}
