//! The simulator's shared state: connections, tokens, STS issuances, scripts,
//! counters and logs, behind one synchronous mutex held only for short,
//! non-async critical sections.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::wire::{ALNUM_UPPER, BASE64, random_from, unix_millis};
use super::{
    ConnectionView, Faults, PatchRecord, ScriptedFault, SimConfig, SimConnection, SimEvent,
    SimPatches, SimService, SimStats,
};

/// How many events and violations are kept: enough for any test or soak
/// report, small enough (tens of MB at most) for a long soak.
const LOG_CAP: usize = 100_000;

/// What a request is, for matching scripted faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RequestKind {
    /// Flow `GET /connections/{id}`.
    FlowGet,
    /// Flow `GET /connections` (list).
    FlowList,
    /// Any other Flow request.
    FlowOther,
    /// An IMS request.
    Ims,
    /// An STS request.
    Sts,
    /// An S3 request (the pre-push check).
    S3,
}

/// A random fault drawn for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RandomFault {
    /// Answer normally.
    None,
    /// Close the connection without an answer.
    Reset,
    /// 429.
    Throttle,
    /// This 5xx status.
    ServerError(u16),
    /// Sleep this long, then answer normally.
    Slow(Duration),
}

/// What to do with one request, decided under the lock when it arrives.
#[derive(Debug)]
pub(super) struct Plan {
    /// When the request was planned (it had just arrived): the latency is
    /// counted from here.
    pub arrived: tokio::time::Instant,
    /// Injected latency before answering.
    pub latency: Duration,
    /// A scripted answer, taken from a queue (wins over random faults).
    pub script: Option<ScriptedFault>,
    /// A random fault (only when no script applies).
    pub random: RandomFault,
    /// After a successful GET, bump the etag (random churn).
    pub churn: bool,
    /// `Retry-After` seconds for random 429/503.
    pub retry_after_secs: Option<u64>,
}

/// An IMS token the simulator issued.
#[derive(Debug)]
pub(super) struct Token {
    /// Revocation generation it belongs to.
    pub generation: u64,
    /// The IMS client it was issued to.
    pub client_id: String,
    /// When it expires.
    pub expires_at: Instant,
}

/// Whether a bearer token is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokenStatus {
    /// Issued, unexpired, not revoked.
    Valid,
    /// Never issued by this simulator.
    Unknown,
    /// Past its `expires_in`.
    Expired,
    /// Revoked by `revoke_tokens` or a random revocation.
    Revoked,
}

/// One credential set issued by STS.
#[derive(Debug)]
pub(super) struct Issuance {
    /// `SecretAccessKey`.
    pub secret: String,
    /// `SessionToken`.
    pub token: String,
    /// `Expiration` (whole seconds).
    pub expires_at: SystemTime,
    /// When STS issued them (the session's `aws:TokenIssueTime`).
    pub issued_at: SystemTime,
    /// The role assumed (`None`: `GetSessionToken`).
    pub role_arn: Option<String>,
    /// `RoleSessionName` (empty for `GetSessionToken`).
    pub session_name: String,
    /// `Tags.member.N`, in the order sent.
    pub session_tags: Vec<(String, String)>,
    /// `SourceIdentity`, if sent.
    pub source_identity: Option<String>,
}

impl Issuance {
    /// Whether "revoke active sessions" on its role came after it was
    /// issued: AWS then denies every request signed with it.
    pub fn revoked(&self, revocations: &HashMap<String, SystemTime>) -> bool {
        self.role_arn
            .as_ref()
            .and_then(|role| revocations.get(role))
            .is_some_and(|revoked_at| self.issued_at < *revoked_at)
    }
}

/// The credentials stored on a connection.
#[derive(Debug)]
pub(super) struct StoredCredentials {
    /// `s3AccessKey`.
    pub access_key_id: String,
    /// `s3SecretKey`.
    pub secret: String,
    /// `s3SessionToken`, if any.
    pub token: Option<String>,
    /// Expiry, for STS credentials; `None` for the long-term placeholder.
    pub expires_at: Option<SystemTime>,
}

/// One base connection.
#[derive(Debug)]
pub(super) struct Conn {
    /// As configured.
    pub spec: SimConnection,
    /// The sandbox's id (one per sandbox name).
    pub sandbox_id: String,
    /// Epoch milliseconds.
    pub created_at_ms: u64,
    /// Epoch milliseconds.
    pub updated_at_ms: u64,
    /// Current etag, with literal quotes.
    pub etag: String,
    /// What `auth.params` holds besides the credentials.
    pub other_params: Map<String, Value>,
    /// The stored credentials.
    pub credentials: StoredCredentials,
    /// Successful PATCHes.
    pub patches: u64,
    /// First successful PATCH.
    pub first_patch_at: Option<SystemTime>,
    /// Seconds of expired credentials accumulated at PATCH times.
    pub expired_seconds: f64,
}

impl Conn {
    /// Seconds the credentials stored by PATCH have been expired, up to `now`,
    /// counting only from the first successful PATCH on.
    fn expired_seconds_at(&self, now: SystemTime) -> f64 {
        let current = match (self.patches, self.credentials.expires_at) {
            (1.., Some(expiry)) => now.duration_since(expiry).map_or(0.0, |d| d.as_secs_f64()),
            _ => 0.0,
        };
        self.expired_seconds + current
    }
}

/// Everything mutable, behind [`Shared::lock`].
pub(super) struct State {
    /// Current random-fault rates.
    pub faults: Faults,
    /// Draws random faults (seeded for reproducible runs).
    pub rng: StdRng,
    /// Base connections by id.
    pub connections: HashMap<String, Conn>,
    /// Sandbox name → sandbox id.
    pub sandbox_ids: HashMap<String, String>,
    /// Every IMS token issued, by value.
    pub tokens: HashMap<String, Token>,
    /// Generation of tokens issued now.
    pub token_generation: u64,
    /// Tokens of a generation below this are revoked.
    pub revoked_below: u64,
    /// Every STS issuance, by access key id.
    pub issuances: HashMap<String, Issuance>,
    /// Role ARN → when its sessions were revoked: every session of it
    /// issued before then is refused by S3 and by the connection test.
    pub session_revocations: HashMap<String, SystemTime>,
    /// Scripted answers per service (indexed by `SimService::index`).
    pub scripts: [VecDeque<ScriptedFault>; 4],
    /// Scripted answers per connection (Flow only).
    pub connection_scripts: HashMap<String, VecDeque<ScriptedFault>>,
    /// Scripted answers for Flow list requests only.
    pub list_scripts: VecDeque<ScriptedFault>,
    /// Counters; the derived figures are filled in by [`Shared::stats`].
    pub counters: SimStats,
    /// The last [`LOG_CAP`] events.
    pub events: VecDeque<SimEvent>,
    /// The last [`LOG_CAP`] violations.
    pub violations: VecDeque<String>,
    /// Expired seconds of connections deleted since.
    pub retired_expired_seconds: f64,
    /// Placeholder secret keys connections started with.
    pub placeholder_secrets: Vec<String>,
    /// How the simulated S3 answers the pre-push check.
    pub s3: S3Knobs,
    /// The last [`LOG_CAP`] accepted PATCHes, with who made them.
    pub patch_log: VecDeque<PatchRecord>,
    /// Sequence number of the last accepted PATCH.
    pub patch_seq: u64,
    /// Refused PATCHes per client, per status.
    pub patch_rejected: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// Answered list pages (`GET /connections`) per IMS client.
    pub lists_by_client: std::collections::BTreeMap<String, u64>,
    /// `bucketName` → how many connections name it, built on first use and
    /// dropped ([`State::connections_changed`]) whenever a connection is
    /// added, removed or has its parameters edited: without it every S3
    /// request scanned all connections under the lock (at 10,000
    /// connections the simulator, not the daemon, set the pace).
    bucket_index: Option<HashMap<String, usize>>,
    /// Sandbox → its connections' (`created_at_ms`, id), sorted: the order
    /// a listing pages through by default. Built on first use and dropped
    /// with the bucket index: without it each page of a rule's listing
    /// scanned every connection under the lock (100 pages at 10,000).
    creation_index: Option<HashMap<String, Vec<(u64, String)>>>,
}

/// The knobs of the simulated S3.
#[derive(Debug, Default)]
pub(super) struct S3Knobs {
    /// Buckets every check is denied on (`AccessDenied`).
    pub deny_buckets: std::collections::HashSet<String>,
    /// Access key ids every check is denied for.
    pub deny_keys: std::collections::HashSet<String>,
    /// The next this many well-signed checks are denied (IAM eventual consistency).
    pub deny_next: u32,
    /// Buckets that live outside `us-east-1`, with their region.
    pub bucket_regions: HashMap<String, String>,
    /// Buckets that exist although no connection names them yet (a new
    /// connection's bucket, checked before it is created).
    pub buckets: std::collections::HashSet<String>,
}

impl State {
    /// Whether some connection names `bucket` as its `bucketName`.
    pub fn bucket_in_use(&mut self, bucket: &str) -> bool {
        let connections = &self.connections;
        let index = self.bucket_index.get_or_insert_with(|| {
            let mut index = HashMap::new();
            for c in connections.values() {
                if let Some(name) = c.other_params.get("bucketName").and_then(|v| v.as_str()) {
                    *index.entry(name.to_owned()).or_insert(0) += 1;
                }
            }
            index
        });
        index.contains_key(bucket)
    }

    /// `sandbox`'s connections as (`created_at_ms`, id), oldest first (ids
    /// break ties), with the connections they name.
    pub fn by_creation(&mut self, sandbox: &str) -> (&[(u64, String)], &HashMap<String, Conn>) {
        let connections = &self.connections;
        let index = self.creation_index.get_or_insert_with(|| {
            let mut index: HashMap<String, Vec<(u64, String)>> = HashMap::new();
            for c in connections.values() {
                index
                    .entry(c.spec.sandbox.clone())
                    .or_default()
                    .push((c.created_at_ms, c.spec.id.clone()));
            }
            for members in index.values_mut() {
                members.sort_unstable();
            }
            index
        });
        (index.get(sandbox).map_or(&[], Vec::as_slice), connections)
    }

    /// Call after adding or removing a connection or editing its
    /// `auth.params` or sandbox: the indexes are rebuilt on next use.
    pub fn connections_changed(&mut self) {
        self.bucket_index = None;
        self.creation_index = None;
    }

    /// Records an event, keeping only the last [`LOG_CAP`].
    pub fn event(&mut self, event: SimEvent) {
        if self.events.len() >= LOG_CAP {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Records a protocol violation by the client. `message` must not hold
    /// any secret.
    pub fn violation(&mut self, message: String) {
        tracing::warn!(violation = %message, "simulator: protocol violation");
        self.counters.violations += 1;
        if self.violations.len() >= LOG_CAP {
            self.violations.pop_front();
        }
        self.violations.push_back(message.clone());
        self.event(SimEvent::Violation {
            message,
            at: SystemTime::now(),
        });
    }

    /// Records an accepted PATCH by `client_id`, keeping the last [`LOG_CAP`].
    pub fn record_patch(
        &mut self,
        connection: &str,
        client_id: &str,
        access_key_id: &str,
        at: SystemTime,
    ) {
        self.patch_seq += 1;
        if self.patch_log.len() >= LOG_CAP {
            self.patch_log.pop_front();
        }
        self.patch_log.push_back(PatchRecord {
            seq: self.patch_seq,
            connection: connection.to_owned(),
            client_id: client_id.to_owned(),
            at_unix_ms: unix_millis(at),
            access_key_id: access_key_id.to_owned(),
        });
    }

    /// Counts a refused PATCH by the client that holds `bearer` (`"?"` when
    /// the token is unknown) under `status`.
    pub fn record_patch_refused(&mut self, bearer: Option<&str>, status: &str) {
        let client = bearer
            .and_then(|t| self.tokens.get(t))
            .map_or_else(|| "?".to_owned(), |t| t.client_id.clone());
        *self
            .patch_rejected
            .entry(client)
            .or_default()
            .entry(status.to_owned())
            .or_default() += 1;
    }

    /// The IMS client a token was issued to (`None`: never issued here).
    pub fn token_client(&self, token: &str) -> Option<&str> {
        self.tokens.get(token).map(|t| t.client_id.as_str())
    }

    /// Whether a bearer token is good now.
    pub fn token_status(&self, token: &str) -> TokenStatus {
        match self.tokens.get(token) {
            None => TokenStatus::Unknown,
            Some(t) if t.generation < self.revoked_below => TokenStatus::Revoked,
            Some(t) if Instant::now() >= t.expires_at => TokenStatus::Expired,
            Some(_) => TokenStatus::Valid,
        }
    }

    /// Revokes every token issued so far.
    pub fn revoke_tokens(&mut self) {
        self.token_generation += 1;
        self.revoked_below = self.token_generation;
        self.event(SimEvent::TokensRevoked {
            at: SystemTime::now(),
        });
    }

    /// Another writer changes the connection; `false` if it does not exist.
    pub fn bump_etag(&mut self, id: &str) -> bool {
        let Some(conn) = self.connections.get_mut(id) else {
            return false;
        };
        let now = SystemTime::now();
        conn.etag = new_etag(&conn.etag);
        conn.updated_at_ms = unix_millis(now);
        self.event(SimEvent::EtagBumped {
            connection: id.to_owned(),
            at: now,
        });
        true
    }

    /// Takes the first scripted answer that matches this request: the
    /// connection's own queue first, then the service's.
    fn take_script(
        &mut self,
        service: SimService,
        connection: Option<&str>,
        kind: RequestKind,
    ) -> Option<ScriptedFault> {
        if kind == RequestKind::FlowList
            && let Some(fault) = take_matching(&mut self.list_scripts, kind)
        {
            return Some(fault);
        }
        if let Some(id) = connection
            && let Some(queue) = self.connection_scripts.get_mut(id)
        {
            let fault = take_matching(queue, kind);
            if queue.is_empty() {
                self.connection_scripts.remove(id);
            }
            if fault.is_some() {
                return fault;
            }
        }
        take_matching(&mut self.scripts[service.index()], kind)
    }
}

/// Removes and answers the first fault in `queue` that applies to `kind`.
fn take_matching(queue: &mut VecDeque<ScriptedFault>, kind: RequestKind) -> Option<ScriptedFault> {
    let position = queue.iter().position(|fault| match fault {
        ScriptedFault::EtagChurn => kind == RequestKind::FlowGet,
        ScriptedFault::ShortCredentials(_) | ScriptedFault::PartialCredentials { .. } => {
            kind == RequestKind::Sts
        }
        ScriptedFault::InvalidEtag => kind == RequestKind::FlowGet,
        ScriptedFault::EtagInHeader => kind == RequestKind::FlowOther,
        _ => true,
    })?;
    queue.remove(position)
}

/// A fresh etag in Flow Service's format (a quoted UUID-like string whose
/// last group carries the time), guaranteed to differ from `old`.
pub(super) fn new_etag(old: &str) -> String {
    let secs = unix_millis(SystemTime::now()) / 1000;
    loop {
        let etag = format!(
            "\"{:08x}-0000-0200-0000-{:08x}0000\"",
            rand::rng().random::<u32>(),
            secs & 0xffff_ffff
        );
        if etag != old {
            return etag;
        }
    }
}

/// Builds a connection's initial state: a long-term placeholder key pair
/// (as if pasted by hand), the bucket and folder, a fresh etag.
fn new_conn(spec: SimConnection, sandbox_id: String) -> Conn {
    let now = unix_millis(SystemTime::now());
    let mut other_params = Map::new();
    other_params.insert(
        "bucketName".to_owned(),
        Value::String(format!("aep-ingest-{}", spec.name.to_ascii_lowercase())),
    );
    other_params.insert(
        "folderPath".to_owned(),
        Value::String("/landing".to_owned()),
    );
    Conn {
        spec,
        sandbox_id,
        created_at_ms: now,
        updated_at_ms: now,
        etag: new_etag(""),
        other_params,
        credentials: StoredCredentials {
            access_key_id: format!("AKIA{}", random_from(ALNUM_UPPER, 16)),
            secret: random_from(BASE64, 40),
            token: None,
            expires_at: None,
        },
        patches: 0,
        first_patch_at: None,
        expired_seconds: 0.0,
    }
}

/// State shared by the three servers and every [`super::Simulator`] handle.
pub(super) struct Shared {
    /// IMS client id (`x-api-key`).
    pub client_id: String,
    /// Every IMS client accepted, `(id, secret)`: `SimConfig::client_id` first, then
    /// `SimConfig::extra_clients`.
    /// A lock only so that a test can rotate the primary client's secret
    /// ([`Shared::set_client_secret`]); read on every token request.
    clients: std::sync::RwLock<Vec<(String, String)>>,
    /// IMS org (`x-gw-ims-org-id`).
    pub org_id: String,
    /// Lifetime of STS credentials.
    pub credential_lifetime: Duration,
    /// Lifetime of IMS tokens.
    pub ims_token_lifetime: Duration,
    /// See `SimConfig::accept_foreign_credentials`.
    pub accept_foreign_credentials: bool,
    /// Listener addresses, indexed by `SimService::index`.
    pub addrs: [SocketAddr; 4],
    /// Services taken down.
    down: [AtomicBool; 4],
    /// Set by `stop()`: everything refuses.
    stopped: AtomicBool,
    /// Cancels the three servers.
    shutdown: CancellationToken,
    /// Flow requests being handled.
    in_flight: AtomicU64,
    /// Peak of `in_flight`.
    max_in_flight: AtomicU64,
    /// Microseconds Flow requests spent being handled, summed.
    flow_busy_us: AtomicU64,
    state: Mutex<State>,
}

impl Shared {
    /// The shared state for `config`, served on `addrs`.
    pub fn new(config: SimConfig, addrs: [SocketAddr; 4], shutdown: CancellationToken) -> Self {
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let mut state = State {
            faults: config.faults,
            rng,
            connections: HashMap::with_capacity(config.connections.len()),
            sandbox_ids: HashMap::new(),
            tokens: HashMap::new(),
            token_generation: 0,
            revoked_below: 0,
            issuances: HashMap::new(),
            session_revocations: HashMap::new(),
            scripts: Default::default(),
            connection_scripts: HashMap::new(),
            list_scripts: VecDeque::new(),
            counters: SimStats::default(),
            events: VecDeque::new(),
            violations: VecDeque::new(),
            retired_expired_seconds: 0.0,
            placeholder_secrets: Vec::new(),
            s3: S3Knobs::default(),
            patch_log: VecDeque::new(),
            patch_seq: 0,
            patch_rejected: Default::default(),
            lists_by_client: Default::default(),
            bucket_index: None,
            creation_index: None,
        };
        for c in config.connections {
            insert_connection(&mut state, c);
        }
        let mut clients = vec![(config.client_id.clone(), config.client_secret.clone())];
        clients.extend(config.extra_clients);
        Self {
            clients: std::sync::RwLock::new(clients),
            client_id: config.client_id,
            org_id: config.org_id,
            credential_lifetime: config.credential_lifetime,
            ims_token_lifetime: config.ims_token_lifetime,
            accept_foreign_credentials: config.accept_foreign_credentials,
            addrs,
            down: Default::default(),
            stopped: AtomicBool::new(false),
            shutdown,
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            flow_busy_us: AtomicU64::new(0),
            state: Mutex::new(state),
        }
    }

    /// Locks the state. A panic while holding the lock (a bug) does not make
    /// the simulator unusable: the state is still consistent enough to serve.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether requests to `service` are refused (down or stopped).
    pub fn refuses(&self, service: SimService) -> bool {
        self.stopped.load(Ordering::Relaxed) || self.down[service.index()].load(Ordering::Relaxed)
    }

    /// Takes a service down or brings it back.
    pub fn set_down(&self, service: SimService, down: bool) {
        self.down[service.index()].store(down, Ordering::Relaxed);
        self.lock().event(SimEvent::ServiceDown {
            service,
            down,
            at: SystemTime::now(),
        });
    }

    /// Stops the servers.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.shutdown.cancel();
    }

    /// Starts the peak of Flow requests in flight again from those in
    /// flight now: a test measures a limit from a moment on.
    pub fn reset_max_in_flight(&self) {
        self.max_in_flight
            .store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Every IMS client accepted now, `(id, secret)`.
    pub fn clients(&self) -> Vec<(String, String)> {
        self.clients
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The primary client's secret is rotated (as in the Adobe Developer
    /// Console): from now on only `secret` is accepted for it.
    pub fn set_client_secret(&self, secret: &str) {
        let mut clients = self
            .clients
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(primary) = clients.first_mut() {
            primary.1 = secret.to_owned();
        }
    }

    /// Counts one Flow request in flight until the guard is dropped.
    pub fn enter_flow(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(self, std::time::Instant::now())
    }

    /// Decides what to do with one request: latency, a scripted answer, or a
    /// random fault; applies a random token revocation (Flow).
    pub fn plan(&self, service: SimService, connection: Option<&str>, kind: RequestKind) -> Plan {
        let arrived = tokio::time::Instant::now();
        let mut st = self.lock();
        let st = &mut *st;
        if service == SimService::Flow {
            st.counters.flow_requests += 1;
        }
        let faults = st.faults.clone();
        let script = st.take_script(service, connection, kind);
        // Always draw the same number of values per request, so a seed gives
        // the same sequence whatever the scripts did.
        let (fault_draw, kind_draw, churn_draw, revoke_draw) = (
            st.rng.random::<f64>(),
            st.rng.random::<f64>(),
            st.rng.random::<f64>(),
            st.rng.random::<f64>(),
        );
        let mut random = RandomFault::None;
        let mut churn = false;
        match service {
            SimService::Flow => {
                if revoke_draw < faults.ims_revoke {
                    st.revoke_tokens();
                }
                churn = kind == RequestKind::FlowGet && churn_draw < faults.etag_churn;
                // One draw against cumulative edges, so each rate is exact.
                let reset_edge = faults.flow_reset;
                let throttle_edge = reset_edge + faults.flow_429;
                let error_edge = throttle_edge + faults.flow_5xx;
                let slow_edge = error_edge + faults.flow_slow;
                random = if fault_draw < reset_edge {
                    RandomFault::Reset
                } else if fault_draw < throttle_edge {
                    RandomFault::Throttle
                } else if fault_draw < error_edge {
                    // Mostly 503 (the documented overload answer), some 500/502.
                    RandomFault::ServerError(match kind_draw {
                        x if x < 0.5 => 503,
                        x if x < 0.75 => 500,
                        _ => 502,
                    })
                } else if fault_draw < slow_edge {
                    RandomFault::Slow(faults.flow_slow_delay.saturating_mul(2))
                } else {
                    RandomFault::None
                };
            }
            SimService::Sts if fault_draw < faults.sts_throttle => random = RandomFault::Throttle,
            SimService::Sts | SimService::Ims | SimService::S3 => {}
        }
        if script.is_some() {
            random = RandomFault::None;
        }
        Plan {
            arrived,
            latency: faults.latency,
            script,
            random,
            churn,
            retry_after_secs: faults.retry_after_secs,
        }
    }

    /// Adds or replaces a connection.
    pub fn add_connection(&self, c: SimConnection) {
        let mut st = self.lock();
        let id = c.id.clone();
        insert_connection(&mut st, c);
        st.event(SimEvent::ConnectionAdded {
            connection: id,
            at: SystemTime::now(),
        });
    }

    /// Changes a connection's metadata as another writer would: a new etag
    /// and `updatedAt`. `false` if it does not exist.
    pub fn edit_connection(&self, id: &str, edit: impl FnOnce(&mut SimConnection)) -> bool {
        let mut st = self.lock();
        let Some(conn) = st.connections.get_mut(id) else {
            return false;
        };
        let sandbox = conn.spec.sandbox.clone();
        edit(&mut conn.spec);
        if conn.spec.sandbox != sandbox {
            st.connections_changed();
        }
        st.bump_etag(id)
    }

    /// Deletes a connection, keeping its expired seconds in the total.
    pub fn delete_connection(&self, id: &str) {
        let mut st = self.lock();
        if let Some(conn) = st.connections.remove(id) {
            st.connections_changed();
            let now = SystemTime::now();
            st.retired_expired_seconds += conn.expired_seconds_at(now);
            st.event(SimEvent::ConnectionDeleted {
                connection: id.to_owned(),
                at: now,
            });
        }
    }

    /// Another writer changes the connection.
    pub fn bump_etag(&self, id: &str) {
        self.lock().bump_etag(id);
    }

    /// Revokes every IMS token issued so far.
    pub fn revoke_tokens(&self) {
        self.lock().revoke_tokens();
    }

    /// Current figures; O(connections), meant for reports, not per request.
    pub fn stats(&self) -> SimStats {
        let now = SystemTime::now();
        let st = self.lock();
        let mut stats = st.counters.clone();
        stats.max_in_flight = self.max_in_flight.load(Ordering::Relaxed);
        stats.flow_busy_seconds = self.flow_busy_us.load(Ordering::Relaxed) as f64 / 1e6;
        // One pass under the lock: the benchmark asks 20 times a second
        // while 10,000 connections are being rotated.
        let (mut expired, mut never_rotated) = (st.retired_expired_seconds, 0u64);
        let mut last_first_patch: Option<SystemTime> = None;
        for c in st.connections.values() {
            expired += c.expired_seconds_at(now);
            never_rotated += u64::from(c.patches == 0);
            last_first_patch = last_first_patch.max(c.first_patch_at);
        }
        stats.expired_seconds = expired;
        stats.connections_never_rotated = never_rotated;
        stats.first_pass_done_unix_ms = last_first_patch
            .filter(|_| never_rotated == 0)
            .and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
        stats
    }

    /// The PATCH log.
    pub fn patches(&self) -> SimPatches {
        let st = self.lock();
        let dropped = st
            .patch_seq
            .saturating_sub(u64::try_from(st.patch_log.len()).unwrap_or(u64::MAX));
        SimPatches {
            accepted: st.patch_log.iter().cloned().collect(),
            dropped,
            rejected: st.patch_rejected.clone(),
        }
    }

    /// What one connection holds now.
    pub fn connection_view(&self, id: &str) -> Option<ConnectionView> {
        let st = self.lock();
        let conn = st.connections.get(id)?;
        let patched = conn.patches > 0;
        Some(ConnectionView {
            id: conn.spec.id.clone(),
            sandbox: conn.spec.sandbox.clone(),
            etag: conn.etag.clone(),
            access_key_id: patched.then(|| conn.credentials.access_key_id.clone()),
            expires_at: if patched {
                conn.credentials.expires_at
            } else {
                None
            },
            patches: conn.patches,
            first_patch_at: conn.first_patch_at,
            params_other_than_credentials: Value::Object(conn.other_params.clone()),
        })
    }

    /// Every secret the simulator knows or issued.
    pub fn issued_secrets(&self) -> Vec<String> {
        let st = self.lock();
        let mut secrets = Vec::with_capacity(1 + st.tokens.len() + 2 * st.issuances.len());
        secrets.extend(self.clients().into_iter().map(|(_, secret)| secret));
        secrets.extend(st.tokens.keys().cloned());
        for issuance in st.issuances.values() {
            secrets.push(issuance.secret.clone());
            secrets.push(issuance.token.clone());
        }
        secrets.extend(st.placeholder_secrets.iter().cloned());
        secrets
    }
}

/// Inserts (or replaces) a connection with its initial state.
impl State {
    /// Stores a connection made by `POST /connections`: its own parameters
    /// and the STS credentials it was created with. Answers its etag.
    pub(super) fn create_connection(
        &mut self,
        spec: SimConnection,
        other_params: Map<String, Value>,
        credentials: StoredCredentials,
    ) -> String {
        let sandbox_id = self
            .sandbox_ids
            .entry(spec.sandbox.clone())
            .or_insert_with(|| uuid::Uuid::new_v4().to_string())
            .clone();
        let id = spec.id.clone();
        let mut conn = new_conn(spec, sandbox_id);
        conn.other_params = other_params;
        conn.credentials = credentials;
        let etag = conn.etag.clone();
        self.connections.insert(id, conn);
        self.connections_changed();
        etag
    }
}

fn insert_connection(st: &mut State, c: SimConnection) {
    let sandbox_id = st
        .sandbox_ids
        .entry(c.sandbox.clone())
        .or_insert_with(|| uuid::Uuid::new_v4().to_string())
        .clone();
    let id = c.id.clone();
    let conn = new_conn(c, sandbox_id);
    st.placeholder_secrets.push(conn.credentials.secret.clone());
    st.connections.insert(id, conn);
    st.connections_changed();
}

/// A Flow request in flight since the instant it holds; decrements the
/// count and adds its time to the busy total when dropped.
pub(super) struct InFlight<'a>(&'a Shared, std::time::Instant);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        let us = u64::try_from(self.1.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.0.flow_busy_us.fetch_add(us, Ordering::Relaxed);
    }
}
