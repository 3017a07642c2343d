//! The scheduler: a thin loop over the connections' state machines.
//!
//! It owns every [`Connection`], keeps a heap of due times, sleeps until the
//! earliest one (no polling), dispatches due connections as jobs (at most a
//! dispatch limit at once), and feeds every job's result back to
//! [`Connection::apply`], which decides the next step. The rules live there;
//! this module only moves events and actions between the connections, the
//! job set, the clock and the observers (telemetry, systemd, the state file).
//!
//! - The deadline branch is armed only when a dispatch can happen, so a
//!   backlog larger than the dispatch limit does not spin the loop.
//! - Of the connections due at once, rotations go before retries: many
//!   connections whose requests hang until the timeout cannot queue the
//!   healthy ones' rotations behind their retries ([`DueQueue`]).
//! - Every job is spawned in a `JoinSet` keyed by task id: its result, or its
//!   panic, always maps back to its connection, which is rescheduled.
//! - A reload is a diff ([`Event::Changed`] / [`Event::Removed`] / new
//!   connections); the clients are rebuilt off the loop and keep whatever the
//!   new config does not change (IMS token, STS cache, request gate).
//! - `WATCHDOG=1` is sent only while the loop makes progress.
//!
//! The loop is this file; what it delegates lives beside it:
//! `intake` (the start's listing: held connections, connections found page
//! by page), `reload` (the clients, and a reload as a diff), `replicas`
//! (`[coordination]`: leadership, adoption, the shared table) and
//! `observe` (readiness, `STATUS=`, the watchdog, the state file, the
//! report).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::clock::{Clock, earlier};
use crate::config::{Config, ConnectionConfig};
use crate::connection::{self, Action, Connection, Event, Phase, Policy};
use crate::coordination::local::{StateSnapshot, StateStore};
use crate::coordination::{Leadership, StateSink};
use crate::observe::notify::Notifier;
use crate::observe::telemetry::Telemetry;
use crate::policy::schedule::EXPIRY_MARGIN;
use crate::remote::shaping;
use crate::remote::sts::{SourceIdentity, StsRequest};
use crate::rotation::{Job, JobResult, JobRunner, RotateNow, RotationError, Rotator};

mod intake;
mod observe;
mod reload;
mod replicas;

pub use intake::{Intake, MAX_HOLD};
use intake::{Listed, next_intake};
pub use observe::{ConnectionReport, Report};
use reload::{Prepared, Runner};
pub use reload::{Reload, build_rotator};
use replicas::leadership_changed;

/// The deadline heaps: (due time, insertion number, id), earliest first,
/// one for rotations and one for retries of connections whose last attempt
/// failed.
///
/// Of the connections due at once, rotations go first: a retry's attempt
/// may hold its dispatch slot and request permit for a whole
/// `request_timeout` (a remote that hangs), so when many connections fail
/// that way, due time alone would queue every healthy rotation behind them.
/// Retries take every slot no rotation is due for.
///
/// Connections due at the same time (a whole first pass is) come out in the
/// order they were queued: the insertion number settles every tie, so the
/// heap never compares ids (10,000 equal due times made string comparison
/// the heap's main cost).
#[derive(Debug, Default)]
struct DueQueue {
    rotations: BinaryHeap<Reverse<(SystemTime, u64, String)>>,
    retries: BinaryHeap<Reverse<(SystemTime, u64, String)>>,
    queued: u64,
}

impl DueQueue {
    fn push(&mut self, at: SystemTime, id: &str, retry: bool) {
        self.queued = self.queued.wrapping_add(1);
        let heap = if retry {
            &mut self.retries
        } else {
            &mut self.rotations
        };
        heap.push(Reverse((at, self.queued, id.to_owned())));
    }

    /// Drops stale entries (`current` says which are not) from both tops.
    fn clean(&mut self, current: impl Fn(SystemTime, &str) -> bool) {
        for heap in [&mut self.rotations, &mut self.retries] {
            while let Some(Reverse((at, _, id))) = heap.peek() {
                if current(*at, id) {
                    break;
                }
                heap.pop();
            }
        }
    }

    /// The earliest due time of either heap.
    fn earliest(&self) -> Option<SystemTime> {
        let top = |heap: &BinaryHeap<Reverse<(SystemTime, u64, String)>>| {
            heap.peek().map(|Reverse((at, _, _))| *at)
        };
        match (top(&self.rotations), top(&self.retries)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next connection to dispatch at `now`: a due rotation, else a due
    /// retry.
    fn pop_due(&mut self, now: SystemTime) -> Option<String> {
        for heap in [&mut self.rotations, &mut self.retries] {
            if heap.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
                return heap.pop().map(|Reverse((_, _, id))| id);
            }
        }
        None
    }
}

/// How the daemon runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Forever, until cancelled.
    Run,
    /// Rotate each selected connection once (with a few quick retries for
    /// transient trouble), then stop.
    Once,
}

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
    /// With `[coordination]`: this replica's right to write, checked by every
    /// job before each request that could write (`None`: the only writer).
    pub fence: Option<crate::coordination::Fence>,
}

/// The scheduler.
pub struct Daemon {
    config: Config,
    options: Options,
    policy: Policy,
    clock: Clock,
    runner: Runner,
    telemetry: Arc<Telemetry>,
    notifier: Notifier,
    state: Option<StateStore>,
    /// Boxed: a `Connection` is about 1 KB, and a discovery start adds
    /// 10,000 page by page, so each growth of the map moved all of them.
    connections: HashMap<String, Box<Connection>>,
    /// Due times; an item is current while its connection waits for exactly that time.
    heap: DueQueue,
    jobs: JoinSet<(String, JobResult)>,
    /// Which connection each running task belongs to (for panics).
    tasks: HashMap<tokio::task::Id, String>,
    /// Dropped jobs are cancelled before their PATCH when shutdown starts.
    job_cancel: CancellationToken,
    ready_sent: bool,
    state_dirty: bool,
    last_state_write: Option<tokio::time::Instant>,
    last_status: Option<tokio::time::Instant>,
    /// Work dispatched or completed since the last watchdog ping.
    progressed: bool,
    turns: u64,
    turns_at_ping: u64,
    /// `[coordination]`: the elector's word (`None`: the only writer).
    leadership: Option<watch::Receiver<Leadership>>,
    /// Whether this replica may dispatch: always without coordination;
    /// with it, from a leadership term until the fence closes.
    leading: bool,
    /// The leadership term whose shared state was adopted.
    term: u64,
    /// Where changed connections' shared state goes (coordination on).
    shared: Option<StateSink>,
    /// Connections known but not scheduled until the start's listing seeds
    /// their etag (or ends): see [`Self::hold_until_listed`].
    held: HashSet<String>,
    /// The start's listing, page by page, until it is done.
    intake: Option<mpsc::UnboundedReceiver<Intake>>,
    /// When the hold is looked at next: the earliest time a held
    /// connection must go without its page ([`Self::hold_limit`]).
    hold_until: Option<tokio::time::Instant>,
    /// State file records of no configured connection: a connection the
    /// start's listing adds is restored from them. Dropped when the listing
    /// is over (a later reload adds connections as new, as it always did).
    unclaimed: std::collections::BTreeMap<String, crate::coordination::local::PersistedConnection>,
    /// Requests to rotate a connection at once with fresh credentials (the
    /// health check's hook, [`Self::rotate_on_request`]).
    rotate_requests: Option<mpsc::Receiver<RotateNow>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("connections", &self.connections.len())
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
        let rotator = build_rotator(&config, &options, &telemetry, None).await?;
        Ok(Self::with_runner(
            config,
            options,
            telemetry,
            notifier,
            Clock::system(),
            Runner::Real(Arc::new(rotator)),
        ))
    }

    /// A scheduler on clients already built (shared with discovery).
    pub fn with_rotator(
        config: Config,
        options: Options,
        telemetry: Arc<Telemetry>,
        notifier: Notifier,
        rotator: Arc<Rotator>,
    ) -> Self {
        Self::with_runner(
            config,
            options,
            telemetry,
            notifier,
            Clock::system(),
            Runner::Real(rotator),
        )
    }

    /// A scheduler whose jobs run on `runner` and whose time is `clock`:
    /// the seam that lets tests drive the loop with paused time and no sockets.
    pub fn with_job_runner(
        config: Config,
        options: Options,
        telemetry: Arc<Telemetry>,
        notifier: Notifier,
        clock: Clock,
        runner: Arc<dyn JobRunner>,
    ) -> Self {
        Self::with_runner(
            config,
            options,
            telemetry,
            notifier,
            clock,
            Runner::Fixed(runner),
        )
    }

    fn with_runner(
        config: Config,
        options: Options,
        telemetry: Arc<Telemetry>,
        notifier: Notifier,
        clock: Clock,
        runner: Runner,
    ) -> Self {
        let policy = Policy::new(&config.rotation, options.mode == Mode::Once);
        let state = config.state.path.clone().map(StateStore::new);
        let mut daemon = Self {
            config,
            options,
            policy,
            clock,
            runner,
            telemetry,
            notifier,
            state,
            connections: HashMap::new(),
            heap: DueQueue::default(),
            jobs: JoinSet::new(),
            tasks: HashMap::new(),
            job_cancel: CancellationToken::new(),
            ready_sent: false,
            state_dirty: false,
            last_state_write: None,
            last_status: None,
            progressed: false,
            turns: 0,
            turns_at_ping: 0,
            leadership: None,
            leading: true,
            term: 0,
            shared: None,
            held: HashSet::new(),
            intake: None,
            hold_until: None,
            unclaimed: std::collections::BTreeMap::new(),
            rotate_requests: None,
        };
        let persisted = daemon.load_state();
        let now = daemon.clock.now();
        for config in daemon.selected(&daemon.config) {
            let sts = StsRequest::for_connection(&daemon.config, &config);
            let id = config.id.clone();
            let connection = match persisted.connections.get(&id) {
                Some(saved) => Connection::restored(config, sts, saved, now, &daemon.policy),
                None => Connection::new(config, sts, now),
            };
            daemon.connections.insert(id.clone(), Box::new(connection));
            daemon.follow(&id, Action::WaitUntil(now));
        }
        let mut unclaimed = persisted.connections;
        unclaimed.retain(|id, _| !daemon.connections.contains_key(id));
        daemon.unclaimed = unclaimed;
        daemon
    }

    /// The connections of `config` this run is about (`once --connection`).
    fn selected(&self, config: &Config) -> Vec<ConnectionConfig> {
        config
            .connections
            .iter()
            .filter(|c| self.options.only.is_empty() || self.options.only.contains(&c.id))
            .cloned()
            .collect()
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

    /// Runs until `cancel` (mode `Run`) or until every connection is done
    /// (mode `Once`). `reloads` delivers validated configs (SIGHUP).
    pub async fn run(
        mut self,
        cancel: CancellationToken,
        mut reloads: mpsc::Receiver<Reload>,
    ) -> anyhow::Result<Report> {
        let watchdog = self.notifier.watchdog_interval();
        let mut watchdog_tick =
            tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
        watchdog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (prepared_tx, mut prepared) = mpsc::channel::<anyhow::Result<Prepared>>(4);
        let mut reloads_open = true;
        if self.intake.is_none() {
            // Without a streamed start nothing claims these records.
            self.unclaimed = std::collections::BTreeMap::new();
        }
        loop {
            self.turns += 1;
            self.dispatch_due();
            if self.options.mode == Mode::Once
                && self.jobs.is_empty()
                && self
                    .connections
                    .values()
                    .all(|c| c.phase() == Phase::Finished)
            {
                break;
            }
            self.after_progress();
            // Armed only when a dispatch could happen: with every slot busy,
            // an overdue deadline would otherwise fire on every turn.
            let next_due = if self.leading && self.jobs.len() < self.dispatch_limit() {
                self.next_deadline()
            } else {
                None
            };
            let next_state_write = self.next_state_write();
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(finished) = self.jobs.join_next_with_id(), if !self.jobs.is_empty() => {
                    self.on_joined(finished);
                }
                Some(prepared) = prepared.recv() => self.apply_reload(prepared),
                open = leadership_changed(&mut self.leadership) => self.on_leadership(open),
                intake = next_intake(&mut self.intake) => self.on_intake(intake),
                () = tokio::time::sleep_until(self.hold_until.unwrap_or_else(crate::clock::mono_now)), if self.hold_until.is_some() => {
                    self.hold_expired();
                }
                request = next_rotate_request(&mut self.rotate_requests) => match request {
                    Some(request) => self.on_rotate_now(request),
                    None => self.rotate_requests = None,
                },
                reload = reloads.recv(), if reloads_open => match reload {
                    Some(reload) => self.prepare_reload(reload, prepared_tx.clone()),
                    None => reloads_open = false,
                },
                () = tokio::time::sleep_until(self.clock.instant_at(next_due.unwrap_or(SystemTime::UNIX_EPOCH))), if next_due.is_some() => {}
                () = tokio::time::sleep_until(next_state_write.unwrap_or_else(crate::clock::mono_now)), if next_state_write.is_some() => {
                    self.write_state().await;
                }
                _ = watchdog_tick.tick(), if watchdog.is_some() => self.watchdog(),
            }
        }
        if cancel.is_cancelled() {
            self.shutdown().await;
        } else {
            self.write_state().await;
        }
        Ok(self.report())
    }

    /// Takes requests to rotate a connection at once with credentials from
    /// an STS call started after a moment ([`RotateNow`]; the health check
    /// sends them when S3 refuses a connection's credentials). A connection
    /// that waits is due now; one in flight gets them with its next job.
    pub fn rotate_on_request(&mut self, requests: mpsc::Receiver<RotateNow>) {
        self.rotate_requests = Some(requests);
    }

    fn on_rotate_now(&mut self, request: RotateNow) {
        // Unknown (removed meanwhile) or held until the start's listing:
        // nothing to do; a held connection rotates as soon as it is listed.
        if self.held.contains(&request.id) || !self.connections.contains_key(&request.id) {
            return;
        }
        let id = request.id;
        self.event(
            &id,
            Event::RotateNow {
                fresh_after: request.fresh_after,
            },
        );
    }

    /// Jobs in flight at most. Jobs beyond `concurrency` only wait in the
    /// request gate, so a modest surplus keeps the gate busy without holding
    /// thousands of futures. Four times, not two: with the pre-push check a
    /// job spends about half its time on S3, outside the gate, so twice the
    /// slots filled the gate only when both halves took exactly as long (at
    /// 10,000 connections the first pass took 1.17x its PATCH-only floor).
    fn dispatch_limit(&self) -> usize {
        self.config.rotation.concurrency.get().saturating_mul(4)
    }

    /// The earliest current due time; drops stale heap items on the way.
    fn next_deadline(&mut self) -> Option<SystemTime> {
        let connections = &self.connections;
        self.heap.clean(|at, id| {
            connections
                .get(id)
                .is_some_and(|c| c.phase() == Phase::Waiting(at))
        });
        self.heap.earliest()
    }

    fn dispatch_due(&mut self) {
        if !self.leading {
            return;
        }
        if !self.fence_open() {
            // The lease lapsed before the elector said so: stop until it
            // publishes a new term (it always does after a lapse).
            self.leading = false;
            return;
        }
        let now = self.clock.now();
        while self.jobs.len() < self.dispatch_limit() {
            match self.next_deadline() {
                Some(at) if at <= now => {}
                _ => break,
            }
            let Some(id) = self.heap.pop_due(now) else {
                break;
            };
            self.event(&id, Event::Due);
        }
    }

    /// Sends one event to one connection and carries out what it answers.
    fn event(&mut self, id: &str, event: Event) {
        let now = self.clock.now();
        if matches!(event, Event::Due) && self.held.contains(id) {
            // Held until the start's listing seeds it: its wake-up is
            // dropped, and releasing it schedules it again.
            return;
        }
        let Some(connection) = self.connections.get_mut(id) else {
            return;
        };
        let outcome = match &event {
            Event::JobDone(result) => connection::outcome_of(result),
            _ => None,
        };
        let action = connection.apply(event, now, &self.policy, rand::random());
        if let Some(outcome) = outcome {
            self.telemetry.rotation(id, outcome);
            self.state_dirty = true;
            self.share(id);
        }
        self.follow(id, action);
    }

    fn follow(&mut self, id: &str, action: Action) {
        match action {
            Action::Dispatch(job) => self.spawn(*job),
            Action::WaitUntil(at) => {
                let retry = self.connections.get(id).is_some_and(|c| c.is_retrying());
                self.heap.push(at, id, retry);
            }
            Action::AwaitJob | Action::Finished => {}
            Action::Drop => {
                self.connections.remove(id);
                self.telemetry.remove(id);
                self.state_dirty = true;
                self.share(id);
                return;
            }
        }
        if let Some(connection) = self.connections.get(id) {
            self.telemetry
                .sync(id, |status| connection.write_status(status));
        }
    }

    fn spawn(&mut self, job: Job) {
        let Some(connection) = self.connections.get_mut(&job.id) else {
            return;
        };
        self.progressed = true;
        // A shared pause (another connection's 429) never holds this job
        // past the point where its own credentials need replacing.
        let start_by = connection
            .pushed()
            .map(|p| self.clock.instant_at(earlier(p.expires_at, EXPIRY_MARGIN)));
        let span = connection.job_span();
        let runner = self.runner.job_runner();
        let cancel = self.job_cancel.clone();
        let id = job.id.clone();
        // Boxed so a waiting job costs a pointer, not the largest future.
        let task = Box::pin(async move {
            let result = shaping::start_by(start_by, runner.run(&job, &cancel)).await;
            (job.id, result)
        });
        let handle = self.jobs.spawn(task.instrument(span));
        self.tasks.insert(handle.id(), id);
    }

    fn on_joined(
        &mut self,
        joined: Result<(tokio::task::Id, (String, JobResult)), tokio::task::JoinError>,
    ) {
        self.progressed = true;
        match joined {
            Ok((task, (id, result))) => {
                self.tasks.remove(&task);
                if let JobResult::Failed {
                    error: RotationError::NotLeader,
                    ..
                } = &result
                {
                    // Stand down until the elector publishes a new term.
                    self.leading = false;
                }
                self.event(&id, Event::JobDone(result));
            }
            Err(error) => {
                let Some(id) = self.tasks.remove(&error.id()) else {
                    tracing::error!(error = %error, "rotation task of an unknown connection failed");
                    return;
                };
                let detail = if error.is_panic() {
                    "the job panicked"
                } else {
                    "the job was aborted"
                };
                tracing::error!(connection = %id, error = %error, "rotation task failed; the connection is rescheduled");
                let result = JobResult::Failed {
                    error: RotationError::Internal(detail.to_owned()),
                    etag: None,
                    conflicts: 0,
                    s3: None,
                };
                self.event(&id, Event::JobDone(result));
            }
        }
    }

    /// Stops new work, lets PATCHes in flight finish within the grace period,
    /// writes the state file.
    async fn shutdown(&mut self) {
        tracing::info!(in_flight = self.jobs.len(), "shutting down");
        self.notifier.stopping();
        self.job_cancel.cancel();
        let ids: Vec<String> = self.connections.keys().cloned().collect();
        for id in &ids {
            self.event(id, Event::Shutdown);
        }
        let grace = self.config.rotation.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = self.jobs.join_next_with_id().await {
                self.on_joined(joined);
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
}

/// The next [`RotateNow`] request; never, without a sender.
async fn next_rotate_request(
    requests: &mut Option<mpsc::Receiver<RotateNow>>,
) -> Option<RotateNow> {
    match requests {
        Some(requests) => requests.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
