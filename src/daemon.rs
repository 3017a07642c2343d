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
//! - Every job is spawned in a `JoinSet` keyed by task id: its result, or its
//!   panic, always maps back to its connection, which is rescheduled.
//! - A reload is a diff ([`Event::Changed`] / [`Event::Removed`] / new
//!   connections); the clients are rebuilt off the loop and keep whatever the
//!   new config does not change (IMS token, STS cache, request gate).
//! - `WATCHDOG=1` is sent only while the loop makes progress.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::clock::{Clock, earlier};
use crate::config::{Config, ConnectionConfig};
use crate::connection::{self, Action, Connection, Event, Phase, Policy};
use crate::coordination::{Leadership, Role, StateSink};
use crate::flow::FlowClient;
use crate::ims::ImsClient;
use crate::notify::Notifier;
use crate::rotation::{Job, JobResult, JobRunner, RotationError, Rotator};
use crate::schedule::EXPIRY_MARGIN;
use crate::shaping::{self, RequestGate};
use crate::state::{StateSnapshot, StateStore};
use crate::sts::{AwsSts, CredentialCache, SourceIdentity, StsRequest};
use crate::telemetry::Telemetry;

/// The deadline heap: (due time, insertion number, id), earliest first.
///
/// Connections due at the same time (a whole first pass is) come out in the
/// order they were queued: the insertion number settles every tie, so the
/// heap never compares ids (10,000 equal due times made string comparison
/// the heap's main cost).
#[derive(Debug, Default)]
struct DueQueue {
    heap: BinaryHeap<Reverse<(SystemTime, u64, String)>>,
    queued: u64,
}

impl DueQueue {
    fn push(&mut self, at: SystemTime, id: &str) {
        self.queued = self.queued.wrapping_add(1);
        self.heap.push(Reverse((at, self.queued, id.to_owned())));
    }

    fn peek(&self) -> Option<(SystemTime, &str)> {
        self.heap
            .peek()
            .map(|Reverse((at, _, id))| (*at, id.as_str()))
    }

    fn pop(&mut self) -> Option<String> {
        self.heap.pop().map(|Reverse((_, _, id))| id)
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

/// How often the state file is written at most: every rotation marks it
/// dirty, and a burst of rotations (the first pass over 10,000 connections)
/// costs one write per second, not one per connection.
const STATE_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// How often the systemd `STATUS=` line is refreshed at most.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Loop turns between two watchdog pings beyond which the loop counts as
/// spinning (and stops feeding the watchdog) when nothing was dispatched or
/// completed: a healthy loop turns a few times per event, never thousands of
/// times for none.
const SPIN_TURNS: u64 = 10_000;

/// How long past its due time the start's listing may hold a connection.
/// The listing normally seeds every etag within seconds (10,000
/// connections: under 3 s); a list API that answers slowly (each page within
/// the request timeout, but many pages) must not keep connections from
/// rotating, so after this those not reached yet read their own etag (a
/// `GET` each). A connection whose credentials expire sooner is held only
/// until [`EXPIRY_MARGIN`] before their expiry.
pub const MAX_HOLD: Duration = Duration::from_secs(60);

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
    /// Turns of the scheduler loop (for the benchmark: turns per rotation).
    pub loop_turns: u64,
}

impl Report {
    /// True when no connection's last attempt failed.
    pub fn all_ok(&self) -> bool {
        self.connections.iter().all(|c| c.last_error.is_none())
    }
}

/// What the start's listing tells a daemon started with
/// [`Daemon::hold_until_listed`], page by page (see
/// [`crate::discovery::resolve_streaming`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Intake {
    /// Listed so far: etags and S3 targets by id (explicit connections' id
    /// chunks, or discovered ones), and connections found by rules on a
    /// page (to add, with their etags and targets).
    Found {
        /// Connections the rules found on this page.
        added: Vec<ConnectionConfig>,
        /// Etags by connection id.
        etags: HashMap<String, String>,
        /// S3 targets by connection id.
        targets: HashMap<String, crate::s3probe::S3Target>,
    },
    /// The start's listing is over: whatever is still held goes now (it
    /// will `GET` its etag).
    Done,
}

/// Builds the remote clients for `config`, keeping from `previous` (the
/// clients of the running config `old`) every part whose settings did not
/// change: the IMS token cache, the STS answer cache, the request gate.
pub async fn build_rotator(
    config: &Config,
    options: &Options,
    telemetry: &Arc<Telemetry>,
    previous: Option<(&Config, &Rotator)>,
) -> anyhow::Result<Rotator> {
    let rotation = &config.rotation;
    let http = crate::http::client(rotation).context("building the HTTP client")?;
    let same_http = |old: &Config| old.rotation.request_timeout == rotation.request_timeout;
    let gate = match previous {
        Some((old, rotator))
            if old.rotation.concurrency == rotation.concurrency
                && old.rotation.max_requests_per_second == rotation.max_requests_per_second
                && old.rotation.retry_max == rotation.retry_max =>
        {
            rotator.flow.gate()
        }
        _ => Arc::new(RequestGate::new(
            rotation.concurrency,
            rotation.max_requests_per_second,
            rotation.retry_max,
        )),
    };
    let ims = match previous {
        Some((old, rotator)) if same_http(old) && same_adobe(old, config) => {
            Arc::clone(&rotator.ims)
        }
        _ => Arc::new(ImsClient::new(
            http.clone(),
            &config.adobe,
            Arc::clone(telemetry),
        )),
    };
    let credentials = match previous {
        Some((old, rotator))
            if same_http(old)
                && old.aws.region == config.aws.region
                && old.aws.sts_endpoint == config.aws.sts_endpoint =>
        {
            Arc::clone(&rotator.credentials)
        }
        _ => {
            let sts = AwsSts::new(
                &config.aws,
                &options.identity,
                rotation.request_timeout,
                Arc::clone(telemetry),
            )
            .await;
            Arc::new(CredentialCache::new(Arc::new(sts)))
        }
    };
    Ok(Rotator {
        flow: FlowClient::new(
            http,
            &config.adobe,
            gate,
            Arc::clone(telemetry),
            rotation.retry_min,
        ),
        ims,
        credentials,
        telemetry: Arc::clone(telemetry),
        refresh_before: rotation.refresh_before,
        verify: rotation.verify,
        dry_run: options.dry_run,
        prepush: crate::s3probe::from_config(config)?,
        fence: options.fence.clone(),
    })
}

fn same_adobe(a: &Config, b: &Config) -> bool {
    use secrecy::ExposeSecret;
    let (a, b) = (&a.adobe, &b.adobe);
    a.client_id == b.client_id
        && a.client_secret.expose_secret() == b.client_secret.expose_secret()
        && a.org_id == b.org_id
        && a.scopes == b.scopes
        && a.ims_url == b.ims_url
        && a.platform_url == b.platform_url
}

/// The clients jobs run with: the real ones (rebuilt on reload), or a fixed
/// runner (tests).
#[derive(Debug, Clone)]
enum Runner {
    Real(Arc<Rotator>),
    Fixed(Arc<dyn JobRunner>),
}

impl Runner {
    fn job_runner(&self) -> Arc<dyn JobRunner> {
        match self {
            Self::Real(rotator) => Arc::clone(rotator) as Arc<dyn JobRunner>,
            Self::Fixed(runner) => Arc::clone(runner),
        }
    }
}

/// A reload whose clients are ready.
struct Prepared {
    config: Config,
    runner: Runner,
}

/// What is known of a connection before it is added.
#[derive(Debug, Default, Clone, Copy)]
struct Listed<'a> {
    /// Its state file record.
    saved: Option<&'a crate::state::PersistedConnection>,
    /// The etag and S3 target its list item carried.
    etag: Option<&'a str>,
    target: Option<&'a crate::s3probe::S3Target>,
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
    unclaimed: std::collections::BTreeMap<String, crate::state::PersistedConnection>,
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

    /// Etags read in bulk (list pages) before the first pass: see
    /// [`Connection::seed_etag`].
    pub fn seed_etags(&mut self, etags: &HashMap<String, String>) {
        let now = self.clock.now();
        let ids: Vec<String> = self
            .connections
            .keys()
            .filter(|id| etags.contains_key(*id))
            .cloned()
            .collect();
        for id in ids {
            let (Some(connection), Some(listed)) = (self.connections.get_mut(&id), etags.get(&id))
            else {
                continue;
            };
            let action = connection.seed_etag(listed, now, &self.policy, rand::random());
            self.follow(&id, action);
        }
    }

    /// S3 targets read in bulk (list pages), by connection id; seed them
    /// before [`Self::seed_etags`] so the first job holds both.
    pub fn seed_s3_targets(&mut self, targets: &HashMap<String, crate::s3probe::S3Target>) {
        for (id, target) in targets {
            if let Some(connection) = self.connections.get_mut(id) {
                connection.seed_s3(target);
            }
        }
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

    /// Starts with every connection known so far (the explicit ones)
    /// **held**: in `/status`, telemetry and restored from the state file
    /// as usual, but not dispatched until `intake` seeds its etag with an
    /// [`Intake::Found`] or says [`Intake::Done`] (a closed channel counts
    /// as `Done`: nothing is held forever). Connections a `Found` adds
    /// start at once with the etag it carries. `READY=1` (first pass
    /// complete) waits for `Done`: before it, most connections may not even
    /// be known yet.
    pub fn hold_until_listed(&mut self, intake: mpsc::UnboundedReceiver<Intake>) {
        self.held = self.connections.keys().cloned().collect();
        self.intake = Some(intake);
        self.plan_hold();
    }

    /// The latest time a held connection may wait for its page: [`MAX_HOLD`]
    /// past its due time, and never later than [`EXPIRY_MARGIN`] before its
    /// credentials expire. `None` when it is not waiting at all.
    fn hold_limit(&self, id: &str) -> Option<SystemTime> {
        let connection = self.connections.get(id)?;
        let Phase::Waiting(due) = connection.phase() else {
            return None;
        };
        let by_due = crate::clock::later(due, MAX_HOLD);
        Some(match connection.credentials_expire_at() {
            Some(expires_at) => by_due.min(earlier(expires_at, EXPIRY_MARGIN)),
            None => by_due,
        })
    }

    /// Sets when the hold is looked at next (see `hold_until`).
    fn plan_hold(&mut self) {
        self.hold_until = self
            .held
            .iter()
            .filter_map(|id| self.hold_limit(id))
            .min()
            .map(|at| self.clock.instant_at(at));
    }

    /// Schedules one held connection at its own due time: it reads its own
    /// etag (a later page no longer seeds it).
    fn release(&mut self, id: &str) {
        self.held.remove(id);
        if let Some(Phase::Waiting(at)) = self.connections.get(id).map(|c| c.phase()) {
            self.follow(id, Action::WaitUntil(at));
        }
    }

    /// Schedules every held connection at its own due time (each will GET
    /// its etag).
    fn release_held(&mut self) {
        self.hold_until = None;
        let held: Vec<String> = self.held.iter().cloned().collect();
        for id in held {
            self.release(&id);
        }
    }

    /// The hold's time came: the held connections past their
    /// [`Self::hold_limit`] go now and read their own etag (later pages
    /// still add connections and seed the others).
    fn hold_expired(&mut self) {
        // Decided on the wall clock, which `plan_hold` converts from: a
        // connection not due to go now has a limit strictly in the future,
        // so this never turns into a loop that fires at once.
        let now = self.clock.now();
        let late: Vec<String> = self
            .held
            .iter()
            .filter(|id| self.hold_limit(id).is_none_or(|limit| limit <= now))
            .cloned()
            .collect();
        if !late.is_empty() {
            tracing::warn!(
                released = late.len(),
                still_held = self.held.len() - late.len(),
                "the start's listing is slow; connections it has not reached read their own etag"
            );
        }
        for id in late {
            self.release(&id);
        }
        self.plan_hold();
    }

    /// One message of the start's listing (`None`: the channel closed).
    fn on_intake(&mut self, intake: Option<Intake>) {
        let now = self.clock.now();
        let Some(Intake::Found {
            added,
            etags,
            targets,
        }) = intake
        else {
            // Done, or the listing is gone: release the rest as they are
            // (they will GET their etag), at their own due time.
            self.intake = None;
            self.unclaimed = std::collections::BTreeMap::new();
            self.release_held();
            return;
        };
        for config in added {
            if self.connections.contains_key(&config.id)
                || !(self.options.only.is_empty() || self.options.only.contains(&config.id))
            {
                continue;
            }
            let sts = StsRequest::for_connection(&self.config, &config);
            let id = config.id.clone();
            self.config.connections.push(config.clone());
            let saved = self.unclaimed.remove(&id);
            let listed = Listed {
                saved: saved.as_ref(),
                etag: etags.get(&id).map(String::as_str),
                target: targets.get(&id),
            };
            self.add_connection(config, sts, now, listed);
        }
        for (id, etag) in &etags {
            if !self.held.remove(id) {
                continue;
            }
            let Some(connection) = self.connections.get_mut(id) else {
                continue;
            };
            if let Some(target) = targets.get(id) {
                connection.seed_s3(target);
            }
            let action = connection.seed_etag(etag, now, &self.policy, rand::random());
            self.follow(id, action);
        }
    }

    /// A connection the daemon did not know (a reload's, or one the start's
    /// listing found): restored from its state file record when there is
    /// one, seeded with what its list item said, then due.
    fn add_connection(
        &mut self,
        config: ConnectionConfig,
        sts: StsRequest,
        now: SystemTime,
        listed: Listed<'_>,
    ) {
        let id = config.id.clone();
        let mut connection = match listed.saved {
            Some(saved) => Connection::restored(config, sts, saved, now, &self.policy),
            None => Connection::new(config, sts, now),
        };
        if let Some(target) = listed.target {
            connection.seed_s3(target);
        }
        let action = match listed.etag {
            Some(etag) => connection.seed_etag(etag, now, &self.policy, rand::random()),
            None => Action::WaitUntil(now),
        };
        self.connections.insert(id.clone(), Box::new(connection));
        self.follow(&id, action);
    }

    /// Runs as one of several replicas: dispatches only while `leadership`
    /// says this replica leads (and its fence is open), adopts the shared
    /// state of each new term, and sends changed connections to `shared`.
    pub fn coordinate(&mut self, leadership: watch::Receiver<Leadership>, shared: StateSink) {
        self.leadership = Some(leadership);
        self.leading = false;
        self.shared = Some(shared);
    }

    /// Whether the fence (coordination) lets jobs write now.
    fn fence_open(&self) -> bool {
        self.options
            .fence
            .as_ref()
            .is_none_or(crate::coordination::Fence::is_open)
    }

    /// The elector changed its word: a new term adopts the shared state and
    /// starts dispatching; anything else stops it (jobs in flight stop at
    /// their next fence check).
    fn on_leadership(&mut self, open: bool) {
        if !open {
            // The elector has ended (shutdown): nothing more is written.
            self.leading = false;
            return;
        }
        let Some(receiver) = self.leadership.as_mut() else {
            return;
        };
        let current = receiver.borrow_and_update().clone();
        match current.role {
            Role::Leader if current.term != self.term => {
                self.term = current.term;
                self.adopt(current.view.as_deref());
                self.leading = true;
            }
            Role::Leader => {}
            Role::Standby | Role::Starting => {
                self.leading = false;
                self.adopt(current.view.as_deref());
            }
        }
        // The role shows in `STATUS=` at once.
        self.last_status = None;
    }

    /// Takes up the shared state (see [`Connection::adopt`]); `None` keeps
    /// this replica's own view.
    fn adopt(&mut self, view: Option<&StateSnapshot>) {
        let Some(view) = view else {
            return;
        };
        let now = self.clock.now();
        for (id, connection) in &mut self.connections {
            connection.adopt(view.connections.get(id), now, &self.policy, rand::random());
            self.telemetry
                .sync(id, |status| connection.write_status(status));
        }
        // Every due time may have moved: the heap is rebuilt rather than
        // grown (a standby adopts a view every half minute).
        self.heap = DueQueue::default();
        for (id, connection) in &self.connections {
            if let Phase::Waiting(at) = connection.phase() {
                self.heap.push(at, id);
            }
        }
    }

    /// The role as `STATUS=` shows it when this replica is not the leader.
    fn standby_line(&self) -> Option<String> {
        let leadership = self.leadership.as_ref()?.borrow();
        (leadership.role != Role::Leader).then(|| leadership.status_line())
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
        mut reloads: mpsc::Receiver<Config>,
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
                reload = reloads.recv(), if reloads_open => match reload {
                    Some(config) => self.prepare_reload(config, prepared_tx.clone()),
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
        while let Some((at, id)) = self.heap.peek() {
            let current = self
                .connections
                .get(id)
                .is_some_and(|c| c.phase() == Phase::Waiting(at));
            if current {
                return Some(at);
            }
            self.heap.pop();
        }
        None
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
            let Some(id) = self.heap.pop() else {
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
            Action::WaitUntil(at) => self.heap.push(at, id),
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

    /// Pings the watchdog if the loop made progress since the last ping, or
    /// had nothing it could do; a wedged or spinning loop stops feeding it.
    fn watchdog(&mut self) {
        let turns = self.turns - self.turns_at_ping;
        self.turns_at_ping = self.turns;
        let now = self.clock.now();
        // A standby's due connections wait for leadership, not for the loop.
        let overdue = self.leading && self.next_deadline().is_some_and(|at| at <= now);
        let idle = self.jobs.is_empty() && !overdue;
        let spinning = !self.progressed && turns > SPIN_TURNS;
        if (self.progressed || idle) && !spinning {
            match self.notifier.watchdog_interval() {
                // Before READY=1 (the first pass is still going): three
                // ping intervals more to start, asked again at each ping.
                Some(interval) if !self.ready_sent => self
                    .notifier
                    .watchdog_extending_start(interval.saturating_mul(3)),
                _ => self.notifier.watchdog(),
            }
        } else {
            tracing::warn!(
                in_flight = self.jobs.len(),
                loop_turns = turns,
                "scheduler made no progress since the last watchdog ping; not pinging"
            );
        }
        self.progressed = false;
    }

    /// Readiness and `STATUS=` after something happened.
    fn after_progress(&mut self) {
        let now = crate::clock::mono_now();
        let standby = self
            .leadership
            .as_ref()
            .is_some_and(|l| l.borrow().role == Role::Standby);
        if !self.ready_sent && standby {
            // A healthy standby is ready: ready to take over.
            self.ready_sent = true;
            self.last_status = Some(now);
            let line = self.status_line();
            tracing::info!(status = %line, "ready as a standby");
            self.notifier.ready(&line);
        } else if !self.ready_sent
            && self.leading
            && self.intake.is_none()
            && self.connections.values().all(|c| c.had_outcome())
        {
            self.ready_sent = true;
            self.last_status = Some(now);
            let line = self.status_line();
            tracing::info!(status = %line, "first pass complete");
            self.notifier.ready(&line);
        } else if self.ready_sent
            && self
                .last_status
                .is_none_or(|at| now.duration_since(at) >= STATUS_INTERVAL)
        {
            self.last_status = Some(now);
            self.notifier.status(&self.status_line());
        }
    }

    fn status_line(&self) -> String {
        if let Some(line) = self.standby_line() {
            return line;
        }
        let now = self.clock.now();
        let summary = self.telemetry.summary(now);
        let next = summary
            .next_rotation_at
            .map(|at| {
                let wait = crate::clock::until(now, at);
                format!(
                    ", next rotation in {}",
                    humantime::format_duration(Duration::from_secs(wait.as_secs()))
                )
            })
            .unwrap_or_default();
        let role = if self.leadership.is_some() {
            "leader: "
        } else {
            ""
        };
        let mut line = format!(
            "{role}{}/{} connections fresh",
            summary.fresh, summary.total
        );
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
                .map_or_else(crate::clock::mono_now, |at| at + STATE_WRITE_INTERVAL),
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
        self.last_state_write = Some(crate::clock::mono_now());
        let snapshot = StateSnapshot {
            connections: self
                .connections
                .iter()
                .filter_map(|(id, c)| Some((id.clone(), c.persisted()?)))
                .collect(),
        };
        let error = match tokio::task::spawn_blocking(move || store.save(&snapshot)).await {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        tracing::warn!(error = %error, "state file not written; will retry");
        self.state_dirty = true;
    }

    /// Sends one changed connection to the shared state writer at once
    /// (it batches, and writes only while this replica holds the lease):
    /// the sooner it is in the table, the smaller the window in which a
    /// new leader would read an older record. A connection that is gone is
    /// deleted there; one never pushed is left alone.
    fn share(&self, id: &str) {
        let Some(sink) = &self.shared else {
            return;
        };
        match self.connections.get(id) {
            None => sink.send(vec![(id.to_owned(), None)]),
            Some(c) => {
                if let Some(record) = c.persisted() {
                    sink.send(vec![(id.to_owned(), Some(record))]);
                }
            }
        }
    }

    /// Builds the clients for a new config off the loop (loading AWS config
    /// can take seconds); the result comes back through `done`.
    fn prepare_reload(&self, config: Config, done: mpsc::Sender<anyhow::Result<Prepared>>) {
        self.notifier.reloading();
        for (key, changed) in [
            (
                "[admin] listen",
                config.admin.listen != self.config.admin.listen,
            ),
            ("[state] path", config.state.path != self.config.state.path),
            (
                "[coordination]",
                config.coordination != self.config.coordination,
            ),
        ] {
            if changed {
                tracing::warn!(
                    key,
                    "this setting changes only on restart; the running value stays"
                );
            }
        }
        match &self.runner {
            Runner::Fixed(runner) => {
                let runner = Runner::Fixed(Arc::clone(runner));
                tokio::spawn(async move { done.send(Ok(Prepared { config, runner })).await });
            }
            Runner::Real(rotator) => {
                let (old, rotator) = (self.config.clone(), Arc::clone(rotator));
                let (options, telemetry) = (self.options.clone(), Arc::clone(&self.telemetry));
                tokio::spawn(async move {
                    let built =
                        build_rotator(&config, &options, &telemetry, Some((&old, &rotator))).await;
                    let prepared = built.map(|rotator| Prepared {
                        config,
                        runner: Runner::Real(Arc::new(rotator)),
                    });
                    done.send(prepared).await
                });
            }
        }
    }

    /// Applies a validated config as a diff: new connections start now,
    /// removed ones go once their job ends, changed ones (sandbox or STS
    /// identity) rotate with the new settings once their job ends, unchanged
    /// ones keep their state and schedule.
    fn apply_reload(&mut self, prepared: anyhow::Result<Prepared>) {
        let Prepared { mut config, runner } = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "config reload failed, keeping the running config");
                self.notifier.reloaded(&self.status_line());
                return;
            }
        };
        // Keys that need a restart keep their running values.
        config.admin.listen = self.config.admin.listen;
        config.state.path = self.config.state.path.clone();
        config.coordination = self.config.coordination.clone();
        let now = self.clock.now();
        let wanted: HashMap<String, ConnectionConfig> = self
            .selected(&config)
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect();
        let removed: Vec<String> = self
            .connections
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in &removed {
            self.event(id, Event::Removed);
        }
        let (mut added, mut changed) = (0usize, 0usize);
        for connection in self.selected(&config) {
            let sts = StsRequest::for_connection(&config, &connection);
            let id = connection.id.clone();
            match self.connections.get(&id) {
                Some(current) => {
                    if current.config().sandbox != connection.sandbox || *current.sts() != sts {
                        changed += 1;
                    }
                    self.event(&id, Event::Changed(Box::new(connection), sts));
                }
                None => {
                    added += 1;
                    self.add_connection(connection, sts, now, Listed::default());
                }
            }
        }
        self.policy = Policy::new(&config.rotation, self.options.mode == Mode::Once);
        self.telemetry
            .set_refresh_before(config.rotation.refresh_before);
        self.config = config;
        self.runner = runner;
        let in_use: HashSet<StsRequest> =
            self.connections.values().map(|c| c.sts().clone()).collect();
        self.runner.job_runner().retain(&in_use);
        self.state_dirty = true;
        tracing::info!(
            added,
            removed = removed.len(),
            changed,
            connections = self.connections.len(),
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

    fn report(&self) -> Report {
        let connections = self
            .config
            .connections
            .iter()
            .filter_map(|c| self.connections.get(&c.id))
            .map(|c| {
                let counts = c.counts();
                ConnectionReport {
                    id: c.config().id.clone(),
                    name: c.config().name.clone(),
                    sandbox: c.config().sandbox.clone(),
                    rotations: counts.rotations,
                    conflicts: counts.conflicts,
                    failures: counts.failures,
                    access_key_id: c.pushed().map(|p| p.access_key_id.clone()),
                    expires_at: c.pushed().map(|p| p.expires_at),
                    last_error: c.last_error().map(str::to_owned),
                }
            })
            .collect();
        Report {
            connections,
            loop_turns: self.turns,
        }
    }
}

/// The start's next listing message (`None` once: the channel closed);
/// never once the listing is over.
async fn next_intake(intake: &mut Option<mpsc::UnboundedReceiver<Intake>>) -> Option<Intake> {
    match intake {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the elector publishes (`true`), or when it has ended
/// (`false`, once); never without coordination.
async fn leadership_changed(leadership: &mut Option<watch::Receiver<Leadership>>) -> bool {
    match leadership {
        Some(receiver) => {
            let open = receiver.changed().await.is_ok();
            if !open {
                // Ended: later calls wait forever instead of spinning.
                *leadership = None;
            }
            open
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "daemon_tests.rs"]
mod tests;
