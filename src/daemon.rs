//! The scheduler: one loop that owns every connection's state, keeps a heap of
//! deadlines, sleeps until the earliest one (no polling), dispatches due
//! connections as [`rotation`](crate::rotation) jobs, and turns each outcome
//! into the next deadline with the pure policies of
//! [`schedule`](crate::schedule).
//!
//! Failures are isolated: every connection has its own deadline and its own
//! backoff, and a slow or failing one only ever occupies its own job.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::BackoffPolicy;
use crate::config::{Config, ConnectionConfig};
use crate::flow::FlowClient;
use crate::ims::ImsClient;
use crate::notify::Notifier;
use crate::rotation::{Job, JobResult, RotationError, Rotator};
use crate::schedule::{self, Escalation, RetryKind};
use crate::shaping::RequestGate;
use crate::state::{PersistedConnection, StateSnapshot, StateStore};
use crate::sts::{AwsSts, CredentialCache, SourceIdentity, StsRequest};
use crate::telemetry::{ConnectionStatus, Outcome, Telemetry};

/// How the daemon runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Forever, until cancelled.
    Run,
    /// Rotate each selected connection once (with a few quick retries for
    /// transient trouble), then stop.
    Once,
}

/// Attempts per connection in `once` mode: enough to ride out a throttle or
/// a dropped connection, few enough that `once` finishes promptly.
const ONCE_ATTEMPTS: u32 = 3;

/// How often the state file is written at most: every rotation marks it
/// dirty, and a burst of rotations (the first pass over 10,000 connections)
/// costs one write per second, not one per connection.
const STATE_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// How often the systemd `STATUS=` line is refreshed at most.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Options that do not come from the config file.
#[derive(Debug, Clone)]
pub struct Options {
    /// `run` or `once`.
    pub mode: Mode,
    /// `--dry-run`: everything except the PATCH.
    pub dry_run: bool,
    /// `once --connection ID`: only these (empty = all).
    pub only: Vec<String>,
    /// Where the STS client's own identity comes from.
    pub identity: SourceIdentity,
}

/// The final word on one connection, for `once` and `demo` reports.
#[derive(Debug, Clone)]
pub struct ConnectionReport {
    /// Connection id.
    pub id: String,
    /// Label.
    pub name: String,
    /// Sandbox.
    pub sandbox: String,
    /// Successful rotations during this run.
    pub rotations: u64,
    /// 412s absorbed during this run.
    pub conflicts: u64,
    /// Failed attempts during this run.
    pub failures: u64,
    /// Access key id on the connection, if pushed by this daemon.
    pub access_key_id: Option<String>,
    /// Their expiry.
    pub expires_at: Option<SystemTime>,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
}

/// What a finished run reports.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One entry per connection, in config order.
    pub connections: Vec<ConnectionReport>,
}

impl Report {
    /// True when no connection's last attempt failed.
    pub fn all_ok(&self) -> bool {
        self.connections.iter().all(|c| c.last_error.is_none())
    }
}

/// Builds the remote clients for a config. Called at start and on reload.
pub async fn build_rotator(
    config: &Config,
    options: &Options,
    telemetry: &Arc<Telemetry>,
) -> anyhow::Result<Rotator> {
    let rotation = &config.rotation;
    let http = crate::http::client(rotation).context("building the HTTP client")?;
    let gate = Arc::new(RequestGate::new(
        rotation.concurrency,
        rotation.max_requests_per_second,
    ));
    let sts = AwsSts::new(
        &config.aws,
        &options.identity,
        rotation.request_timeout,
        Arc::clone(telemetry),
    )
    .await;
    Ok(Rotator {
        flow: FlowClient::new(
            http.clone(),
            &config.adobe,
            gate,
            Arc::clone(telemetry),
            rotation.retry_min,
        ),
        ims: Arc::new(ImsClient::new(http, &config.adobe, Arc::clone(telemetry))),
        credentials: Arc::new(CredentialCache::new(Arc::new(sts))),
        telemetry: Arc::clone(telemetry),
        refresh_before: rotation.refresh_before,
        verify: rotation.verify,
        dry_run: options.dry_run,
    })
}

/// One connection as the scheduler sees it.
#[derive(Debug)]
struct Entry {
    config: ConnectionConfig,
    sts: StsRequest,
    /// Etag from our last PATCH (saves a GET).
    etag: Option<String>,
    /// The credentials this daemon put on the connection: access key id, expiry.
    pushed: Option<(String, SystemTime)>,
    /// After a restart, the etag we left; the first job only re-pushes if it changed.
    resume_etag: Option<String>,
    last_success: Option<SystemTime>,
    /// Failures in a row.
    failures: u32,
    /// Whether any job of this connection has ended (for the first pass).
    had_outcome: bool,
    /// The deadline and the sequence number that makes a heap item current.
    due: Option<(SystemTime, u64)>,
    in_flight: bool,
    /// Bumped when the entry is replaced, so outcomes of older jobs are dropped.
    epoch: u64,
    last_escalation_log: Option<(Escalation, SystemTime)>,
    last_short_warning: Option<SystemTime>,
    /// `once` mode: no further attempts.
    finished: bool,
    rotations: u64,
    conflicts: u64,
    failed_attempts: u64,
    last_error: Option<String>,
}

impl Entry {
    fn new(config: ConnectionConfig, sts: StsRequest, epoch: u64) -> Self {
        Self {
            config,
            sts,
            etag: None,
            pushed: None,
            resume_etag: None,
            last_success: None,
            failures: 0,
            had_outcome: false,
            due: None,
            in_flight: false,
            epoch,
            last_escalation_log: None,
            last_short_warning: None,
            finished: false,
            rotations: 0,
            conflicts: 0,
            failed_attempts: 0,
            last_error: None,
        }
    }

    fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "connection",
            connection = %self.config.id,
            sandbox = %self.config.sandbox,
            name = %self.config.name
        )
    }
}

type Finished = (String, u64, JobResult);

/// The scheduler.
pub struct Daemon {
    config: Config,
    options: Options,
    rotator: Arc<Rotator>,
    telemetry: Arc<Telemetry>,
    notifier: Notifier,
    state: Option<StateStore>,
    entries: HashMap<String, Entry>,
    heap: BinaryHeap<Reverse<(SystemTime, u64, String)>>,
    jobs: JoinSet<Finished>,
    seq: u64,
    /// Connections that have not had a first outcome yet; `READY=1` at zero.
    first_pass_pending: usize,
    ready_sent: bool,
    state_dirty: bool,
    last_state_write: Option<tokio::time::Instant>,
    last_status: Option<tokio::time::Instant>,
    /// Dropped jobs are cancelled before their PATCH when shutdown starts.
    job_cancel: CancellationToken,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("connections", &self.entries.len())
            .field("in_flight", &self.jobs.len())
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Prepares the scheduler: builds the clients, reads the state file,
    /// registers every connection with `telemetry`. Nothing is sent yet.
    pub async fn new(
        config: Config,
        options: Options,
        telemetry: Arc<Telemetry>,
        notifier: Notifier,
    ) -> anyhow::Result<Self> {
        let rotator = Arc::new(build_rotator(&config, &options, &telemetry).await?);
        let state = config.state.path.clone().map(StateStore::new);
        let mut daemon = Self {
            config,
            options,
            rotator,
            telemetry,
            notifier,
            state,
            entries: HashMap::new(),
            heap: BinaryHeap::new(),
            jobs: JoinSet::new(),
            seq: 0,
            first_pass_pending: 0,
            ready_sent: false,
            state_dirty: false,
            last_state_write: None,
            last_status: None,
            job_cancel: CancellationToken::new(),
        };
        let persisted = daemon.load_state();
        let now = SystemTime::now();
        let selected: Vec<ConnectionConfig> = daemon
            .config
            .connections
            .iter()
            .filter(|c| daemon.options.only.is_empty() || daemon.options.only.contains(&c.id))
            .cloned()
            .collect();
        for connection in selected {
            let mut entry = daemon.new_entry(connection);
            if let Some(saved) = persisted.connections.get(&entry.config.id) {
                daemon.resume(&mut entry, saved, now);
            }
            let id = entry.config.id.clone();
            daemon.telemetry.upsert(status_of(&entry));
            daemon.entries.insert(id.clone(), entry);
            daemon.schedule(&id, now);
        }
        daemon.first_pass_pending = daemon.entries.len();
        Ok(daemon)
    }

    fn new_entry(&mut self, connection: ConnectionConfig) -> Entry {
        let sts = StsRequest::for_connection(&self.config, &connection);
        self.seq += 1;
        Entry::new(connection, sts, self.seq)
    }

    /// Takes a remembered connection back: when its credentials are still good
    /// for longer than `refresh_before`, the first job only checks the etag.
    fn resume(&self, entry: &mut Entry, saved: &PersistedConnection, now: SystemTime) {
        entry.last_success = saved.last_success_at;
        if saved.sandbox != entry.config.sandbox || self.options.mode == Mode::Once {
            return;
        }
        let left = saved
            .expires_at
            .duration_since(now)
            .unwrap_or(Duration::ZERO);
        if left > self.config.rotation.refresh_before {
            entry.pushed = Some((saved.access_key_id.clone(), saved.expires_at));
            entry.resume_etag = Some(saved.etag.clone());
            entry.etag = Some(saved.etag.clone());
        }
    }

    fn load_state(&self) -> StateSnapshot {
        let Some(store) = &self.state else {
            return StateSnapshot::default();
        };
        match store.load() {
            Ok(snapshot) => {
                if !snapshot.connections.is_empty() {
                    tracing::info!(connections = snapshot.connections.len(), "state loaded");
                }
                snapshot
            }
            Err(error) => {
                tracing::warn!(error = %error, "state file ignored; every connection rotates now");
                StateSnapshot::default()
            }
        }
    }

    fn schedule(&mut self, id: &str, at: SystemTime) {
        self.seq += 1;
        if let Some(entry) = self.entries.get_mut(id) {
            entry.due = Some((at, self.seq));
            self.heap.push(Reverse((at, self.seq, id.to_owned())));
            let next = Some(at);
            self.telemetry.update(id, |s| s.next_rotation_at = next);
        }
    }

    /// Runs until `cancel` (mode `Run`) or until every connection is done
    /// (mode `Once`). `reloads` delivers validated configs (SIGHUP).
    pub async fn run(
        mut self,
        cancel: CancellationToken,
        mut reloads: mpsc::Receiver<Config>,
    ) -> anyhow::Result<Report> {
        let watchdog = self.notifier.watchdog_interval();
        let mut watchdog_tick =
            tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
        watchdog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.dispatch_due();
            if self.options.mode == Mode::Once
                && self.jobs.is_empty()
                && self.entries.values().all(|e| e.finished)
            {
                break;
            }
            self.after_progress();
            let next_due = self.next_deadline();
            let next_state_write = self.next_state_write();
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(finished) = self.jobs.join_next(), if !self.jobs.is_empty() => {
                    match finished {
                        Ok((id, epoch, result)) => self.on_result(&id, epoch, result),
                        Err(error) => tracing::error!(error = %error, "rotation task failed"),
                    }
                }
                Some(config) = reloads.recv() => self.reload(config).await,
                () = sleep_until(next_due), if next_due.is_some() => {}
                () = tokio::time::sleep_until(next_state_write.unwrap_or_else(tokio::time::Instant::now)), if next_state_write.is_some() => {
                    self.write_state().await;
                }
                _ = watchdog_tick.tick(), if watchdog.is_some() => self.notifier.watchdog(),
            }
        }
        if cancel.is_cancelled() {
            self.shutdown().await;
        } else {
            self.write_state().await;
        }
        Ok(self.report())
    }

    fn next_deadline(&mut self) -> Option<SystemTime> {
        // Drop stale heap items (rescheduled or removed connections) lazily.
        while let Some(Reverse((at, seq, id))) = self.heap.peek() {
            let current = self
                .entries
                .get(id)
                .is_some_and(|e| !e.in_flight && !e.finished && e.due == Some((*at, *seq)));
            if current {
                return Some(*at);
            }
            self.heap.pop();
        }
        None
    }

    /// Dispatches due connections while fewer than the dispatch limit are in
    /// flight. Jobs beyond `concurrency` only wait in the request gate, so a
    /// modest surplus keeps the gate busy without holding thousands of futures.
    fn dispatch_due(&mut self) {
        let limit = self.config.rotation.concurrency.get().saturating_mul(2);
        let now = SystemTime::now();
        while self.jobs.len() < limit {
            let Some(at) = self.next_deadline() else {
                break;
            };
            if at > now {
                break;
            }
            let Some(Reverse((_, _, id))) = self.heap.pop() else {
                break;
            };
            self.start_job(&id);
        }
    }

    fn start_job(&mut self, id: &str) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        entry.in_flight = true;
        entry.due = None;
        let job = Job {
            id: entry.config.id.clone(),
            sandbox: entry.config.sandbox.clone(),
            sts: entry.sts.clone(),
            known_etag: entry.etag.clone(),
            held: entry.pushed.as_ref().map(|(key, _)| key.clone()),
            resume_if_etag: entry.resume_etag.take(),
        };
        let rotator = Arc::clone(&self.rotator);
        let cancel = self.job_cancel.clone();
        let epoch = entry.epoch;
        let span = entry.span();
        // Boxed so a waiting job costs a pointer, not the largest future.
        self.jobs.spawn(
            Box::pin(async move {
                let result = rotator.run(&job, &cancel).await;
                (job.id, epoch, result)
            })
            .instrument(span),
        );
    }

    fn on_result(&mut self, id: &str, epoch: u64, result: JobResult) {
        let now = SystemTime::now();
        let rotation = self.config.rotation.clone();
        let mode = self.options.mode.clone();
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        if entry.epoch != epoch {
            return; // the connection was replaced by a reload meanwhile
        }
        entry.in_flight = false;
        if !entry.had_outcome
            && !matches!(
                result,
                JobResult::Failed {
                    error: RotationError::Cancelled,
                    ..
                }
            )
        {
            entry.had_outcome = true;
            self.first_pass_pending = self.first_pass_pending.saturating_sub(1);
        }
        let _span = entry.span().entered();
        let next_at = match result {
            JobResult::Rotated {
                access_key_id,
                expires_at,
                etag,
                conflicts,
            } => {
                entry.pushed = Some((access_key_id.clone(), expires_at));
                entry.etag = etag;
                entry.failures = 0;
                entry.last_success = Some(now);
                entry.last_error = None;
                entry.rotations += 1;
                entry.conflicts += u64::from(conflicts);
                self.telemetry.rotation(id, Outcome::Success);
                self.state_dirty = true;
                let next = next_rotation(now, expires_at, &rotation, &mut entry.last_short_warning);
                tracing::info!(
                    access_key_id = %access_key_id,
                    expires_at = %rfc3339(expires_at),
                    next_rotation_at = %rfc3339(next),
                    "credentials rotated"
                );
                if mode == Mode::Once {
                    entry.finished = true;
                }
                next
            }
            JobResult::WouldRotate {
                access_key_id,
                expires_at,
                etag,
            } => {
                entry.failures = 0;
                entry.last_error = None;
                entry.etag = Some(etag.clone());
                let next = next_rotation(now, expires_at, &rotation, &mut entry.last_short_warning);
                tracing::info!(
                    access_key_id = %access_key_id,
                    expires_at = %rfc3339(expires_at),
                    etag = %etag,
                    changes = "s3AccessKey, s3SecretKey (redacted), s3SessionToken (redacted)",
                    next_rotation_at = %rfc3339(next),
                    "dry run: would rotate credentials"
                );
                if mode == Mode::Once {
                    entry.finished = true;
                }
                next
            }
            JobResult::Unchanged { etag } => {
                entry.etag = Some(etag);
                entry.failures = 0;
                let expires_at = entry.pushed.as_ref().map_or(now, |(_, at)| *at);
                let next = next_rotation(now, expires_at, &rotation, &mut entry.last_short_warning);
                tracing::info!(
                    access_key_id = entry.pushed.as_ref().map(|(k, _)| k.as_str()).unwrap_or(""),
                    expires_at = %rfc3339(expires_at),
                    next_rotation_at = %rfc3339(next),
                    "connection unchanged since restart, credentials kept"
                );
                next
            }
            JobResult::Failed {
                error: RotationError::Cancelled,
                etag,
                ..
            } => {
                entry.etag = etag.or(entry.etag.take());
                return;
            }
            JobResult::Failed {
                error,
                etag,
                conflicts,
            } => {
                // None = unknown, stale or refused: never kept (issue 14).
                entry.etag = etag;
                entry.conflicts += u64::from(conflicts);
                entry.failed_attempts += 1;
                entry.last_error = Some(error.to_string());
                self.telemetry.rotation(id, Outcome::Failure);
                let attempt = entry.failures;
                entry.failures += 1;
                let policy = BackoffPolicy {
                    min: rotation.retry_min,
                    max: rotation.retry_max,
                };
                let on_connection = entry.pushed.as_ref().map(|(_, at)| *at);
                let plan = schedule::plan_retry(
                    &policy,
                    now,
                    attempt,
                    error.retry_kind(),
                    on_connection,
                    rand::random(),
                );
                let retry_in = plan.at.duration_since(now).unwrap_or_default();
                let give_up = mode == Mode::Once
                    && (entry.failures >= ONCE_ATTEMPTS || error.retry_kind() == RetryKind::Slow);
                if give_up {
                    entry.finished = true;
                    tracing::error!(
                        error = %error,
                        status = error.status().unwrap_or_default(),
                        attempt = entry.failures,
                        "rotation failed"
                    );
                } else {
                    tracing::warn!(
                        error = %error,
                        status = error.status().unwrap_or_default(),
                        attempt = entry.failures,
                        retry_in = %humantime::format_duration(round_ms(retry_in)),
                        "rotation failed, retrying"
                    );
                }
                if schedule::should_log_escalation(entry.last_escalation_log, plan.escalation, now)
                {
                    entry.last_escalation_log = Some((plan.escalation, now));
                    escalate(plan.escalation, on_connection);
                }
                plan.at
            }
        };
        let status = status_of(entry);
        self.telemetry.upsert(status);
        if !self.entries.get(id).is_some_and(|e| e.finished) {
            self.schedule(id, next_at);
        } else {
            self.telemetry.update(id, |s| s.next_rotation_at = None);
        }
    }

    /// Readiness, `STATUS=` and the state file after something happened.
    fn after_progress(&mut self) {
        let first_pass_done = self
            .entries
            .values()
            .all(|e| e.last_success.is_some() || e.failed_attempts > 0 || e.finished);
        let now = tokio::time::Instant::now();
        let status_due = self
            .last_status
            .is_none_or(|at| now.duration_since(at) >= STATUS_INTERVAL);
        if !self.ready_sent && first_pass_done {
            self.ready_sent = true;
            self.last_status = Some(now);
            let line = self.status_line();
            tracing::info!(status = %line, "first pass complete");
            self.notifier.ready(&line);
        } else if self.ready_sent && status_due {
            self.last_status = Some(now);
            self.notifier.status(&self.status_line());
        }
    }

    fn status_line(&self) -> String {
        let now = SystemTime::now();
        let summary = self.telemetry.summary(now);
        let next = summary
            .next_rotation_at
            .map(|at| {
                let wait = at.duration_since(now).unwrap_or_default();
                format!(
                    ", next rotation in {}",
                    humantime::format_duration(Duration::from_secs(wait.as_secs()))
                )
            })
            .unwrap_or_default();
        let mut line = format!("{}/{} connections fresh", summary.fresh, summary.total);
        for (count, label) in [(summary.failing, "failing"), (summary.expired, "expired")] {
            if count > 0 {
                line.push_str(&format!(", {count} {label}"));
            }
        }
        line + &next
    }

    fn next_state_write(&self) -> Option<tokio::time::Instant> {
        if !self.state_dirty || self.state.is_none() {
            return None;
        }
        Some(
            self.last_state_write
                .map_or_else(tokio::time::Instant::now, |at| at + STATE_WRITE_INTERVAL),
        )
    }

    async fn write_state(&mut self) {
        let Some(store) = self.state.clone() else {
            return;
        };
        if !self.state_dirty {
            return;
        }
        self.state_dirty = false;
        self.last_state_write = Some(tokio::time::Instant::now());
        let snapshot = self.snapshot();
        let error = match tokio::task::spawn_blocking(move || store.save(&snapshot)).await {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        tracing::warn!(error = %error, "state file not written; will retry");
        self.state_dirty = true;
    }

    fn snapshot(&self) -> StateSnapshot {
        let connections = self
            .entries
            .values()
            .filter_map(|e| {
                let (key, expires_at) = e.pushed.clone()?;
                let etag = e.etag.clone()?;
                Some((
                    e.config.id.clone(),
                    PersistedConnection {
                        sandbox: e.config.sandbox.clone(),
                        etag,
                        access_key_id: key,
                        expires_at,
                        last_success_at: e.last_success,
                    },
                ))
            })
            .collect();
        StateSnapshot { connections }
    }

    /// Applies a new, already validated config: connections added start now,
    /// removed ones stop, changed ones (sandbox or STS identity) rotate now,
    /// unchanged ones keep their state and schedule.
    async fn reload(&mut self, config: Config) {
        self.notifier.reloading();
        let rotator = match build_rotator(&config, &self.options, &self.telemetry).await {
            Ok(rotator) => rotator,
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "config reload failed, keeping the running config");
                self.notifier.reloaded(&self.status_line());
                return;
            }
        };
        self.rotator = Arc::new(rotator);
        self.telemetry
            .set_refresh_before(config.rotation.refresh_before);
        let now = SystemTime::now();
        let wanted: HashMap<String, ConnectionConfig> = config
            .connections
            .iter()
            .filter(|c| self.options.only.is_empty() || self.options.only.contains(&c.id))
            .map(|c| (c.id.clone(), c.clone()))
            .collect();
        let removed: Vec<String> = self
            .entries
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in &removed {
            self.entries.remove(id);
            self.telemetry.remove(id);
        }
        self.config = config;
        let (mut added, mut changed) = (0usize, 0usize);
        for connection in self.config.connections.clone() {
            if !wanted.contains_key(&connection.id) {
                continue;
            }
            let sts = StsRequest::for_connection(&self.config, &connection);
            let id = connection.id.clone();
            match self.entries.get_mut(&id) {
                Some(entry) if entry.config.sandbox == connection.sandbox && entry.sts == sts => {
                    // Same target, same identity: keep state and schedule (a new
                    // name or timing applies from the next rotation).
                    entry.config = connection;
                    entry.sts = sts;
                    self.telemetry.upsert(status_of(entry));
                }
                Some(_) => {
                    changed += 1;
                    let entry = self.new_entry(connection);
                    self.telemetry.remove(&id);
                    self.telemetry.upsert(status_of(&entry));
                    self.entries.insert(id.clone(), entry);
                    self.schedule(&id, now);
                }
                None => {
                    added += 1;
                    let entry = self.new_entry(connection);
                    self.telemetry.upsert(status_of(&entry));
                    self.entries.insert(id.clone(), entry);
                    self.schedule(&id, now);
                }
            }
        }
        if !self.ready_sent {
            self.first_pass_pending = self.entries.values().filter(|e| !e.had_outcome).count();
        }
        let in_use: HashSet<StsRequest> = self.entries.values().map(|e| e.sts.clone()).collect();
        self.rotator.credentials.retain(&in_use);
        self.state_dirty = true;
        tracing::info!(
            added,
            removed = removed.len(),
            changed,
            connections = self.entries.len(),
            "config reloaded"
        );
        self.notifier.reloaded(&self.status_line());
    }

    /// Stops new work, lets PATCHes in flight finish within the grace period,
    /// writes the state file.
    async fn shutdown(&mut self) {
        tracing::info!(in_flight = self.jobs.len(), "shutting down");
        self.notifier.stopping();
        self.job_cancel.cancel();
        let grace = self.config.rotation.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while let Some(finished) = self.jobs.join_next().await {
                if let Ok((id, epoch, result)) = finished {
                    self.on_result(&id, epoch, result);
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(abandoned = self.jobs.len(), grace = %humantime::format_duration(grace), "requests still in flight after the grace period, abandoning them");
            self.jobs.abort_all();
        }
        self.state_dirty = true;
        self.write_state().await;
    }

    fn report(&self) -> Report {
        let connections = self
            .config
            .connections
            .iter()
            .filter_map(|c| self.entries.get(&c.id))
            .map(|e| ConnectionReport {
                id: e.config.id.clone(),
                name: e.config.name.clone(),
                sandbox: e.config.sandbox.clone(),
                rotations: e.rotations,
                conflicts: e.conflicts,
                failures: e.failed_attempts,
                access_key_id: e.pushed.as_ref().map(|(k, _)| k.clone()),
                expires_at: e.pushed.as_ref().map(|(_, at)| *at),
                last_error: e.last_error.clone(),
            })
            .collect();
        Report { connections }
    }
}

/// How often "credentials live shorter than refresh_before" is repeated per
/// connection: it is a standing condition (the role's maximum session), so once
/// is news and every cycle would be noise.
const SHORT_WARNING_INTERVAL: Duration = Duration::from_secs(600);

fn next_rotation(
    now: SystemTime,
    expires_at: SystemTime,
    rotation: &crate::config::RotationConfig,
    last_warning: &mut Option<SystemTime>,
) -> SystemTime {
    let next = schedule::next_rotation(
        now,
        expires_at,
        rotation.refresh_before,
        rotation.jitter,
        rand::random(),
    );
    let warn_due = last_warning
        .and_then(|at| now.duration_since(at).ok())
        .is_none_or(|since| since >= SHORT_WARNING_INTERVAL);
    if next.short_lived && warn_due {
        *last_warning = Some(now);
        let left = expires_at.duration_since(now).unwrap_or_default();
        tracing::warn!(
            expires_at = %rfc3339(expires_at),
            expires_in = %humantime::format_duration(round_ms(left)),
            refresh_before = %humantime::format_duration(rotation.refresh_before),
            "credentials live shorter than refresh_before, rotating at half their remaining life; check the role's maximum session duration"
        );
    }
    next.at
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

fn status_of(entry: &Entry) -> ConnectionStatus {
    ConnectionStatus {
        id: entry.config.id.clone(),
        name: entry.config.name.clone(),
        sandbox: entry.config.sandbox.clone(),
        access_key_id: entry.pushed.as_ref().map(|(k, _)| k.clone()),
        expires_at: entry.pushed.as_ref().map(|(_, at)| *at),
        next_rotation_at: entry.due.map(|(at, _)| at),
        last_success_at: entry.last_success,
        last_error: entry.last_error.clone(),
    }
}

/// Sleeps until a wall-clock deadline (tokio time, so paused-time tests drive it).
async fn sleep_until(at: Option<SystemTime>) {
    let wait = at
        .and_then(|at| at.duration_since(SystemTime::now()).ok())
        .unwrap_or_default();
    tokio::time::sleep(wait).await;
}

/// RFC 3339 with seconds, for log fields.
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Durations in logs, to the millisecond.
pub fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
}
