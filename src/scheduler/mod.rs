//! The scheduler: a thin loop over the connections' state machines.
//!
//! It owns every [`Connection`], keeps a heap of due times, sleeps until the
//! earliest one (no polling), dispatches due connections as jobs (at most a
//! dispatch limit at once), and feeds every job's result back to
//! [`Connection::apply`], which decides the next step. The rules live there;
//! this module only moves events and actions between the connections, the
//! job set and the clock, and publishes what changed: a snapshot of the
//! connections' views after each loop turn that changed any (`publish`:
//! every view reads it, and the state file and the shared table are
//! written from it off the loop, by [`crate::persist`]).
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
//! by page), `clients` (what runs the jobs: built once, rebuilt on a reload
//! keeping what did not change), `reload` (a new config applied as a diff),
//! `replicas`
//! (`[coordination]`: leadership, adoption, the shared table) and
//! `observe` and `readiness` (`READY=1`, `STATUS=`, the watchdog: decided
//! by a pure struct, carried out here; the report),
//! `publish` (the snapshots) and `table` (the connections under small
//! integer keys: the loop's queue, jobs and parking name them by key, and
//! only a request, a reload or the listing looks an id up).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::clock::{Clock, earlier};
use crate::config::{Config, ConnectionConfig};
use crate::connection::{Action, Connection, Event, Phase, Policy};
use crate::coordination::Leadership;
use crate::coordination::local::{StateSnapshot, StateStore};
use crate::observe::notify::Notifier;
use crate::observe::status::{Snapshot, Snapshots};
use crate::observe::telemetry::Telemetry;
use crate::policy::schedule::EXPIRY_MARGIN;
use crate::remote::shaping;
use crate::remote::sts::{SourceIdentity, StsRequest};
use crate::rotation::{Job, JobResult, RotationError, Tested};

mod clients;
mod identities;
mod intake;
mod observe;
mod parking;
mod publish;
mod queue;
mod readiness;
mod reload;
mod replicas;
mod rotate_now;
mod table;

pub use clients::{Runner, build_rotator};
pub use intake::{Intake, MAX_HOLD};
use intake::{Listed, next_intake};
pub use observe::Report;
use publish::Publisher;
use queue::DueQueue;
use readiness::Readiness;
use reload::Prepared;
pub use reload::Reload;
use replicas::leadership_changed;
pub use rotate_now::{Pending, RotateOutcome, RotateRefusal, RotateRequest, Selection};
use table::{Key, Table};

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

/// What a scheduler is made of: the argument of [`Daemon::new`].
pub struct Parts {
    /// The config; its connections are the ones to rotate.
    pub config: Config,
    /// What the command line adds.
    pub options: Options,
    /// Process-wide counters (the clients built on a reload count into them).
    pub telemetry: Arc<Telemetry>,
    /// systemd's notify socket, if any.
    pub notifier: Notifier,
    /// Its time: the system's, or paused tokio time in tests.
    pub clock: Clock,
    /// What runs the jobs: the real clients, or a scripted runner.
    pub runner: Runner,
    /// Where its snapshots go (the views hold the receivers; `None`: nowhere).
    pub snapshots: Option<watch::Sender<Arc<Snapshot>>>,
}

impl Parts {
    /// A scheduler over the real clients, on the system clock, publishing
    /// nowhere (set `snapshots` to publish).
    pub fn real(
        config: Config,
        options: Options,
        telemetry: Arc<Telemetry>,
        notifier: Notifier,
        rotator: Arc<crate::rotation::Rotator>,
    ) -> Self {
        Self {
            config,
            options,
            telemetry,
            notifier,
            clock: Clock::system(),
            runner: Runner::Real(rotator),
            snapshots: None,
        }
    }
}

/// The scheduler.
pub struct Daemon {
    /// The config in force, without its connections (each [`Connection`]
    /// holds its own).
    config: Config,
    options: Options,
    policy: Policy,
    clock: Clock,
    runner: Runner,
    telemetry: Arc<Telemetry>,
    notifier: Notifier,
    state: Option<StateStore>,
    /// Keys in the order their connections were added (the report's order).
    order: Vec<Key>,
    /// How many connections at the front of `order` have had an outcome:
    /// the first pass is complete when all have, and each loop turn looks
    /// on from there instead of at every connection again (an outcome is
    /// never undone; a removal starts the count over).
    settled: usize,
    /// The connections: the loop names each by its key, a request by its id.
    connections: Table,
    /// Due times; an item is current while its connection waits for exactly that time.
    heap: DueQueue<Key>,
    jobs: JoinSet<(Key, JobResult)>,
    /// Which connection each running task belongs to (for panics).
    tasks: HashMap<tokio::task::Id, Key>,
    /// Dropped jobs are cancelled before their PATCH when shutdown starts.
    job_cancel: CancellationToken,
    /// READY, STATUS and WATCHDOG, decided.
    readiness: Readiness,
    /// The snapshots every view reads.
    publisher: Publisher,
    /// Connections waiting on a failed shared dependency, and who probes it.
    parking: parking::Parking,
    /// The connections' STS identities, one shared copy each.
    identities: identities::Identities,
    /// What the state file held at the start.
    loaded: StateSnapshot,
    /// `[coordination]`: the elector's word (`None`: the only writer).
    leadership: Option<watch::Receiver<Leadership>>,
    /// Whether this replica may dispatch: always without coordination;
    /// with it, from a leadership term until the fence closes.
    leading: bool,
    /// The leadership term whose shared state was adopted.
    term: u64,
    /// The start's listing, page by page, until it is done.
    intake: Option<mpsc::UnboundedReceiver<Intake>>,
    /// When the hold is looked at next: the earliest time a held
    /// connection must go without its page ([`Self::hold_limit`]).
    hold_until: Option<tokio::time::Instant>,
    /// State file records of no configured connection: a connection the
    /// start's listing adds is restored from them. Dropped when the listing
    /// is over (a later reload adds connections as new, as it always did).
    unclaimed: std::collections::BTreeMap<String, crate::coordination::local::PersistedConnection>,
    /// `rotate` requests (`crate::control`), while someone can send them.
    requests: Option<mpsc::Receiver<RotateRequest>>,
    /// Who waits for which connection's requested job.
    waiters: rotate_now::Waiters,
    /// The health check's answers ([`Self::take_health_answers`]).
    health_answers: Option<mpsc::Receiver<Tested>>,
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
    /// The scheduler made of `parts`: reads the state file and takes in
    /// every configured connection. Nothing is sent yet.
    pub fn new(parts: Parts) -> Self {
        let Parts {
            config,
            options,
            telemetry,
            notifier,
            clock,
            runner,
            snapshots,
        } = parts;
        let mut daemon = Self::with_runner(config, options, telemetry, notifier, clock, runner);
        if let Some(tx) = snapshots {
            daemon.publisher = Publisher::new(tx);
        }
        daemon
    }

    fn with_runner(
        mut config: Config,
        options: Options,
        telemetry: Arc<Telemetry>,
        notifier: Notifier,
        clock: Clock,
        runner: Runner,
    ) -> Self {
        let policy = Policy::new(&config.rotation, options.mode == Mode::Once);
        // Each connection keeps its own settings: the daemon's config keeps
        // none (a second copy of 10,000 entries).
        let connections = std::mem::take(&mut config.connections);
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
            order: Vec::new(),
            settled: 0,
            connections: Table::default(),
            heap: DueQueue::default(),
            jobs: JoinSet::new(),
            tasks: HashMap::new(),
            job_cancel: CancellationToken::new(),
            readiness: Readiness::default(),
            publisher: Publisher::new(watch::channel(Arc::new(Snapshot::default())).0),
            loaded: StateSnapshot::default(),
            parking: parking::Parking::default(),
            identities: identities::Identities::default(),
            leadership: None,
            leading: true,
            term: 0,
            intake: None,
            hold_until: None,
            unclaimed: std::collections::BTreeMap::new(),
            requests: None,
            waiters: rotate_now::Waiters::default(),
            health_answers: None,
        };
        let persisted = daemon.load_state();
        let now = daemon.clock.now();
        for config in daemon.selected(connections) {
            let sts = daemon
                .identities
                .intern(StsRequest::for_connection(&daemon.config, &config));
            let saved = persisted.connections.get(&config.id);
            let key = daemon
                .connections
                .insert(Box::new(Connection::new(config, sts, now)));
            daemon.order.push(key);
            match saved {
                Some(saved) => daemon.event(key, Event::Restored(Box::new(saved.clone()))),
                None => daemon.follow(key, Action::WaitUntil(now)),
            }
        }
        let mut unclaimed = persisted.connections.clone();
        unclaimed.retain(|id, _| !daemon.connections.contains_id(id));
        daemon.unclaimed = unclaimed;
        daemon.loaded = persisted;
        daemon
    }

    /// The connections of a config this run is about (`once --connection`).
    fn selected(&self, connections: Vec<Arc<ConnectionConfig>>) -> Vec<Arc<ConnectionConfig>> {
        connections
            .into_iter()
            .filter(|c| self.options.only.is_empty() || self.options.only.contains(&c.id))
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
        let stop_writing = CancellationToken::new();
        let state_writer = self.state.clone().map(|store| {
            tokio::spawn(crate::persist::run(
                crate::persist::StateFile::new(store),
                self.publisher.subscribe(),
                std::mem::take(&mut self.loaded),
                stop_writing.clone(),
            ))
        });
        if self.intake.is_none() {
            // Without a streamed start nothing claims these records.
            self.unclaimed = std::collections::BTreeMap::new();
        }
        loop {
            self.readiness.turn();
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
            self.publish(false);
            // Armed only when a dispatch could happen: with every slot busy,
            // an overdue deadline would otherwise fire on every turn.
            let next_due = if self.leading && self.jobs.len() < self.dispatch_limit() {
                self.next_deadline()
            } else {
                None
            };
            let next_publish = self.publisher.due();
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(finished) = self.jobs.join_next_with_id(), if !self.jobs.is_empty() => {
                    self.on_joined(finished);
                }
                Some(prepared) = prepared.recv() => self.apply_reload(prepared),
                open = leadership_changed(&mut self.leadership) => self.on_leadership(open),
                intake = next_intake(&mut self.intake) => self.on_intake(intake),
                request = next_from(&mut self.requests) => self.on_rotate_request(request),
                () = tokio::time::sleep_until(self.hold_until.unwrap_or_else(crate::clock::mono_now)), if self.hold_until.is_some() => {
                    self.hold_expired();
                }
                answer = next_from(&mut self.health_answers) => match answer {
                    Some(answer) => self.on_tested(answer),
                    None => self.health_answers = None,
                },
                reload = reloads.recv(), if reloads_open => match reload {
                    Some(reload) => self.prepare_reload(reload, prepared_tx.clone()),
                    None => reloads_open = false,
                },
                () = tokio::time::sleep_until(self.clock.instant_at(next_due.unwrap_or(SystemTime::UNIX_EPOCH))), if next_due.is_some() => {}
                () = tokio::time::sleep_until(next_publish.unwrap_or_else(crate::clock::mono_now)), if next_publish.is_some() => {}
                _ = watchdog_tick.tick(), if watchdog.is_some() => self.watchdog(),
            }
        }
        if cancel.is_cancelled() {
            self.shutdown().await;
        }
        self.publish(true);
        stop_writing.cancel();
        if let Some(writer) = state_writer {
            // Its last write is of the final snapshot.
            let _ = writer.await;
        }
        Ok(self.report())
    }

    /// Takes the health check's answers ([`Tested`]): each connection
    /// records its test's answer, and one whose credentials S3 refused is
    /// due now, with credentials from an STS call started after the
    /// refusal (one in flight gets them with its next job).
    pub fn take_health_answers(&mut self, answers: mpsc::Receiver<Tested>) {
        self.health_answers = Some(answers);
    }

    fn on_tested(&mut self, answer: Tested) {
        let Tested {
            id,
            passed,
            rotate_after,
        } = answer;
        let Some(key) = self.connections.key(&id) else {
            return;
        };
        self.event(key, Event::Tested { passed });
        // Held until the start's listing: it rotates as soon as it is listed.
        if let Some(since) = rotate_after
            && self.connections.get(key).is_some_and(|c| !c.is_held())
        {
            self.event(key, Event::RotateNow { since });
        }
    }

    /// Publishes the connections' views if a snapshot is due (or `force`).
    fn publish(&mut self, force: bool) {
        self.publisher.publish(
            force,
            self.connections.values().map(|c| c.view()),
            self.config.rotation.refresh_before,
            self.term,
        );
    }

    /// A new reader of the snapshots (the shared table's writer follows
    /// them). Subscribe before [`Self::run`]: what the channel holds now
    /// is taken as seen.
    pub fn snapshots(&self) -> Snapshots {
        self.publisher.subscribe()
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
        self.heap.clean(waiting_for(&self.connections));
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
            let Some(key) = self.heap.pop_due(now, waiting_for(&self.connections)) else {
                break;
            };
            if !self.park_before(key, now) {
                self.event(key, Event::Due);
            }
        }
    }

    /// A due connection whose dependency is down (another connection
    /// probes it) parks without a job: during an outage only the prober
    /// runs. `true` when it parked.
    fn park_before(&mut self, key: Key, now: SystemTime) -> bool {
        let Some(connection) = self.connections.get_mut(key) else {
            return false;
        };
        let Phase::Waiting(due) = connection.phase() else {
            return false;
        };
        if due > now || connection.is_held() {
            return false;
        }
        let Some(dependency) = self.parking.down_for(connection.sts(), key) else {
            return false;
        };
        let parked = park_until_bound(
            &mut self.parking,
            (&self.policy, self.config.rotation.retry_max),
            (key, connection),
            dependency,
            now,
            now,
        );
        match parked {
            Some(action) => {
                self.follow(key, action);
                true
            }
            None => false,
        }
    }

    /// Sends one event to one connection and carries out what it answers.
    fn event(&mut self, key: Key, event: Event) {
        let now = self.clock.now();
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        let seen = match &event {
            Event::JobDone(result) => {
                self.waiters.finished(&connection.config().id, result);
                Some(parking::Seen::of(result, connection.sts()))
            }
            _ => None,
        };
        let mut action = connection.apply(event, now, &self.policy, rand::random());
        let mut released = Vec::new();
        if let Some(seen) = seen {
            action = self.park_after(key, seen, action, now, &mut released);
        }
        self.follow(key, action);
        for key in released {
            self.event(key, Event::Unpark);
        }
    }

    /// [`Self::event`] for the connection `id`, if there is one: where a
    /// request, a reload or the listing names it.
    fn event_for(&mut self, id: &str, event: Event) {
        if let Some(key) = self.connections.key(id) {
            self.event(key, event);
        }
    }

    /// After a job: its connection leaves the parking; the dependencies it
    /// got past release theirs (into `released`); one given a shared
    /// failure parks while another connection probes (see
    /// [`parking`]); one whose own request failed probes.
    fn park_after(
        &mut self,
        key: Key,
        seen: parking::Seen,
        action: Action,
        now: SystemTime,
        released: &mut Vec<Key>,
    ) -> Action {
        self.parking.unpark(key);
        for dependency in &seen.answered {
            released.extend(self.parking.release(dependency));
        }
        if let Some(dependency) = seen.real_failure {
            self.parking.probe(dependency, key);
        }
        let Some(dependency) = seen.shared_failure else {
            return action;
        };
        let Action::WaitUntil(due) = action else {
            return action;
        };
        if !self.parking.probed_by_another(&dependency, key) {
            // Nobody else asks: this one does, on its own backoff.
            self.parking.probe(dependency, key);
            return action;
        }
        let Some(connection) = self.connections.get_mut(key) else {
            return action;
        };
        park_until_bound(
            &mut self.parking,
            (&self.policy, self.config.rotation.retry_max),
            (key, connection),
            dependency,
            due,
            now,
        )
        .unwrap_or(action)
    }

    fn follow(&mut self, key: Key, action: Action) {
        match action {
            Action::Dispatch(job) => self.spawn(key, *job),
            Action::WaitUntil(at) => {
                // One lookup for the wait and the view.
                if let Some(connection) = self.connections.get_mut(key) {
                    self.heap.push(at, key, connection.is_retrying());
                    connection.refresh_view();
                    self.publisher.changed();
                }
                return;
            }
            Action::AwaitJob | Action::AwaitListing | Action::Finished => {}
            Action::Drop => {
                if let Some(gone) = self.connections.remove(key) {
                    self.waiters.dropped(&gone.config().id);
                }
                for parked in self.parking.forget(key) {
                    self.event(parked, Event::Unpark);
                }
                self.order.retain(|known| *known != key);
                self.settled = 0;
                self.publisher.changed();
                return;
            }
        }
        if let Some(connection) = self.connections.get_mut(key) {
            connection.refresh_view();
            self.publisher.changed();
        }
    }

    fn spawn(&mut self, key: Key, job: Job) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        self.readiness.progressed();
        if job.fresh_after.is_some() {
            self.waiters.started(&job.id);
        }
        // A shared pause (another connection's 429) never holds this job
        // past the point where its own credentials need replacing.
        let start_by = connection
            .pushed()
            .map(|p| self.clock.instant_at(earlier(p.expires_at, EXPIRY_MARGIN)));
        let span = connection.job_span();
        let runner = self.runner.job_runner();
        let cancel = self.job_cancel.clone();
        // Boxed so a waiting job costs a pointer, not the largest future.
        let task = Box::pin(async move {
            let result = shaping::start_by(start_by, runner.run(&job, &cancel)).await;
            (key, result)
        });
        let handle = self.jobs.spawn(task.instrument(span));
        self.tasks.insert(handle.id(), key);
    }

    fn on_joined(
        &mut self,
        joined: Result<(tokio::task::Id, (Key, JobResult)), tokio::task::JoinError>,
    ) {
        self.readiness.progressed();
        match joined {
            Ok((task, (key, result))) => {
                self.tasks.remove(&task);
                if let JobResult::Failed {
                    error: RotationError::NotLeader,
                    ..
                } = &result
                {
                    // Stand down until the elector publishes a new term.
                    self.leading = false;
                }
                self.event(key, Event::JobDone(result));
            }
            Err(error) => {
                let Some(key) = self.tasks.remove(&error.id()) else {
                    tracing::error!(error = %error, "rotation task of an unknown connection failed");
                    return;
                };
                let detail = if error.is_panic() {
                    "the job panicked"
                } else {
                    "the job was aborted"
                };
                let id = self.connections.get(key).map(|c| c.config().id.clone());
                tracing::error!(connection = %id.unwrap_or_default(), error = %error, "rotation task failed; the connection is rescheduled");
                let result = JobResult::Failed {
                    error: RotationError::Internal(detail.to_owned()),
                    etag: None,
                    conflicts: 0,
                    s3: None,
                };
                self.event(key, Event::JobDone(result));
            }
        }
    }

    /// Stops new work, lets PATCHes in flight finish within the grace period
    /// (the state file's writer then flushes the final snapshot).
    async fn shutdown(&mut self) {
        tracing::info!(in_flight = self.jobs.len(), "shutting down");
        self.notifier.stopping();
        self.job_cancel.cancel();
        for key in self.connections.keys() {
            self.event(key, Event::Shutdown);
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
    }
}

/// The next message of an optional channel (`None` once: it closed);
/// never without one (`rotate` requests, the health check's answers).
async fn next_from<T>(channel: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match channel {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Whether a due-queue entry (due time, key) is current: its connection is
/// still there and waits for that time (a later event queued a newer one).
fn waiting_for(connections: &Table) -> impl Fn(SystemTime, Key) -> bool + '_ {
    |at, key| {
        connections
            .get(key)
            .is_some_and(|c| c.phase() == Phase::Waiting(at))
    }
}

/// Parks `connection` on `dependency` until its bound (see [`parking`]), if
/// that is later than `due`, and answers the connection's action; `None`
/// when parking would not hold it longer. `rules`: the policy and
/// `retry_max`. Apart from the daemon, so that the one lookup of the
/// connection serves the whole step.
fn park_until_bound(
    parking: &mut parking::Parking,
    (policy, retry_max): (&Policy, Duration),
    (key, connection): (Key, &mut Connection),
    dependency: parking::Dependency,
    due: SystemTime,
    now: SystemTime,
) -> Option<Action> {
    let until = parking::parked_until(connection.credentials_expire_at(), now, retry_max);
    if until <= due {
        return None;
    }
    parking.park(dependency, key);
    Some(connection.apply(Event::Park { until }, now, policy, rand::random()))
}

#[cfg(test)]
mod tests;
