//! A strict, embedded loopback simulator of the three remote APIs the daemon
//! talks to: Adobe IMS (`POST /ims/token/v3`), the Flow Service base
//! connection endpoints and AWS STS (query protocol, `AssumeRole` and
//! `GetSessionToken`).
//!
//! It is a *test peer that enforces the protocol*: every deviation by the
//! client is recorded as a violation (see [`Simulator::violations`]) **and**
//! answered with the error the real API would give. It never fakes success:
//! a PATCH only succeeds with the current etag, exactly the three credential
//! ops, and a complete, unexpired credential set that its own STS issued.
//!
//! Each service listens on its own `127.0.0.1:0` socket ([`Simulator::start`]).
//! State lives behind one synchronous mutex with short critical sections
//! (never held across an `.await`); latency and delays are async sleeps, so
//! thousands of connections at tens of concurrent requests are cheap (the
//! latency's last two milliseconds are timed by one thread, to a tenth of
//! a millisecond: see `pace.rs`).
//!
//! What counts as a *violation* (a correct, correctly configured client never
//! does it): missing or malformed headers and bodies, secrets in a query
//! string, an `x-api-key` other than the client id the token was issued to,
//! a bearer token the simulator never issued, a trailing slash, a PATCH body
//! that is not exactly the three credential ops, credentials that were not
//! issued together by STS or are already expired, a missing `If-Match`, the
//! client secret sent to Flow Service. What does *not* count (answered with
//! the real error only): a wrong client secret, a wrong org, a wrong sandbox
//! or deleted connection (404), an expired or revoked token (401), a stale
//! etag (412): those happen to correct clients too.
//!
//! The module depends on nothing else in the crate: it speaks HTTP only.

mod flow;
mod ims;
mod list;
mod net;
mod pace;
mod s3;
mod state;
mod sts;
mod trap;
mod wire;

pub use trap::SecretTrap;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_util::sync::DropGuard;

use state::Shared;

/// The Flow Service connection spec id of the Amazon S3 source.
pub const S3_CONNECTION_SPEC_ID: &str = "ecadc60c-7455-4d87-84dc-2a0e293d997b";

/// The auth spec of an S3 connection that stores an access key pair.
pub const ACCESS_KEY_AUTH_SPEC: &str = "Access Key";

/// How the simulator starts: the IMS client it accepts, the org, the
/// connections it holds and how it behaves.
#[derive(Clone)]
pub struct SimConfig {
    /// IMS client id; Flow Service requires it as `x-api-key`.
    pub client_id: String,
    /// IMS client secret.
    pub client_secret: String,
    /// More IMS clients `(client id, client secret)` of the same org, each
    /// accepted on its own (several replicas of the daemon, each with its
    /// own credential, so the PATCH log tells them apart). A token is bound
    /// to the client it was issued to: Flow Service wants that client's id
    /// as `x-api-key`.
    pub extra_clients: Vec<(String, String)>,
    /// IMS org id; Flow Service requires it as `x-gw-ims-org-id`.
    pub org_id: String,
    /// The base connections that exist at start.
    pub connections: Vec<SimConnection>,
    /// Lifetime of every STS credential issued, whatever `DurationSeconds`
    /// asked for (e.g. 30 s for the demo, so rotation is visible).
    pub credential_lifetime: Duration,
    /// `expires_in` of IMS tokens.
    pub ims_token_lifetime: Duration,
    /// Initial random-fault rates.
    pub faults: Faults,
    /// Seed of the RNG that draws random faults, for reproducible runs;
    /// `None` = seeded from the OS.
    pub seed: Option<u64>,
    /// Accept PATCHed credentials this simulator's STS did not issue (the
    /// end-to-end test with `moto` as STS); they must still look like STS
    /// credentials (an upper-case key id of 16+ characters, non-empty secret and token). Their expiry is
    /// unknown here, so they are taken to live `credential_lifetime`.
    pub accept_foreign_credentials: bool,
}

impl SimConfig {
    /// A configuration with no connections, 1 h STS credentials (the STS
    /// default), 24 h IMS tokens (what IMS issues), no faults and no seed.
    pub fn new(
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        org_id: impl Into<String>,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            extra_clients: Vec::new(),
            org_id: org_id.into(),
            connections: Vec::new(),
            credential_lifetime: Duration::from_secs(3600),
            ims_token_lifetime: Duration::from_secs(24 * 3600),
            faults: Faults::default(),
            seed: None,
            accept_foreign_credentials: false,
        }
    }
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field(
                "extra_clients",
                &self
                    .extra_clients
                    .iter()
                    .map(|(id, _)| (id.as_str(), "[redacted]"))
                    .collect::<Vec<_>>(),
            )
            .field("org_id", &self.org_id)
            .field("connections", &self.connections.len())
            .field("credential_lifetime", &self.credential_lifetime)
            .field("ims_token_lifetime", &self.ims_token_lifetime)
            .field("faults", &self.faults)
            .field("seed", &self.seed)
            .field(
                "accept_foreign_credentials",
                &self.accept_foreign_credentials,
            )
            .finish()
    }
}

/// One base connection held by the simulated Flow Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConnection {
    /// The connection id (usually a UUID).
    pub id: String,
    /// The sandbox it lives in; requests must name it in `x-sandbox-name`.
    pub sandbox: String,
    /// Display name.
    pub name: String,
    /// Connection spec id; [`S3_CONNECTION_SPEC_ID`] for S3.
    pub connection_spec_id: String,
    /// Auth spec name; [`ACCESS_KEY_AUTH_SPEC`] for S3 key pairs.
    pub auth_spec: String,
    /// Free-text description (operators tag connections here).
    pub description: String,
    /// `enabled` or `disabled`.
    pub state: String,
}

impl SimConnection {
    /// An S3 connection with the `Access Key` auth spec.
    pub fn s3(id: impl Into<String>, sandbox: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            sandbox: sandbox.into(),
            name: name.into(),
            connection_spec_id: S3_CONNECTION_SPEC_ID.to_owned(),
            auth_spec: ACCESS_KEY_AUTH_SPEC.to_owned(),
            description: String::new(),
            state: "enabled".to_owned(),
        }
    }

    /// The same connection with this description.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }
}

/// One of the three simulated services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimService {
    /// Adobe IMS (token endpoint).
    Ims,
    /// Flow Service (base connections).
    Flow,
    /// AWS STS.
    Sts,
    /// Amazon S3 (the daemon's pre-push check).
    S3,
}

impl SimService {
    fn index(self) -> usize {
        match self {
            SimService::Ims => 0,
            SimService::Flow => 1,
            SimService::Sts => 2,
            SimService::S3 => 3,
        }
    }
}

/// A scripted answer, queued with [`Simulator::script`] or
/// [`Simulator::script_for`] and consumed by the next matching request.
#[derive(Debug, Clone, PartialEq)]
pub enum ScriptedFault {
    /// Answer this status instead of the real answer. `body: None` = the
    /// documented error shape of that status and service.
    Status {
        /// HTTP status.
        status: u16,
        /// Optional `Retry-After` header.
        retry_after: Option<RetryAfter>,
        /// Body; `None` = the documented error body.
        body: Option<String>,
    },
    /// Close the TCP connection (with a reset) without an HTTP response.
    Reset,
    /// Sleep this long, then answer normally (to be slower than the client's
    /// request timeout).
    Delay(Duration),
    /// Flow `GET /connections/{id}` only: answer normally, then another
    /// writer changes the connection at once, so the following PATCH gets 412.
    EtagChurn,
    /// An STS XML error (`Throttling`/400, `AccessDenied`/403,
    /// `ValidationError`/400 ...). Queued for IMS or Flow it is answered as
    /// `Status { status }` with that service's documented body.
    StsError {
        /// The `<Code>`.
        code: String,
        /// The `<Message>`.
        message: String,
        /// HTTP status.
        status: u16,
    },
    /// STS only: the next issuance lives only this long (zero = already
    /// expired when issued). Never matches an IMS or Flow request.
    ShortCredentials(Duration),
    /// Answer `307 Temporary Redirect` to `location` (another origin, such
    /// as a [`SecretTrap`]). None of the real APIs redirects; a client that
    /// follows re-sends its secrets there.
    Redirect {
        /// The `Location` header.
        location: String,
    },
    /// Answer `200` with a chunked body that never ends (64 KiB chunks of
    /// JSON whitespace, up to 4 GiB, until the client hangs up).
    EndlessBody,
    /// STS only: issue credentials but leave fields out of the answer (the
    /// issuance is recorded with all of them, so a PATCH of what the client
    /// got is refused as credentials that were not issued together).
    PartialCredentials {
        /// Leave out `<SecretAccessKey>`.
        omit_secret: bool,
        /// Leave out `<SessionToken>`.
        omit_token: bool,
    },
    /// Answer an error whose body echoes the secrets the request carried:
    /// IMS puts the client secret in `error_description` (400); Flow answers
    /// a plain-text 502 that repeats the bearer token and, for a PATCH, the
    /// JSON-escaped (`\/`) session token, after 290 characters of padding so
    /// a cut at 300 characters would split the token. STS: a 500.
    EchoSecrets,
    /// Answer an error whose message carries a newline, a forged JSON log
    /// line, ESC and OSC sequences and a bell, padded to `len` bytes (IMS
    /// `error_description`, Flow `detailed-message`, both 400; STS 400
    /// `<Message>` with the newline and the forged line only, since XML
    /// cannot carry ESC).
    HostileText {
        /// Total length of the message.
        len: usize,
    },
    /// Flow `GET /connections/{id}` only: answer normally, but with an etag
    /// that is not a valid HTTP header value (it carries a control
    /// character).
    InvalidEtag,
    /// Flow `PATCH` (or `POST`) only: apply it, but answer `204 No Content`
    /// with the new etag in an `ETag` header instead of Flow Service's
    /// documented `{"id", "etag"}` body.
    EtagInHeader,
    /// An arbitrary answer (malformed JSON, empty items, missing etag ...).
    Raw {
        /// HTTP status.
        status: u16,
        /// `Content-Type` header.
        content_type: String,
        /// The body, sent as is.
        body: String,
    },
}

/// A `Retry-After` header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// `Retry-After: <seconds>`.
    Seconds(u64),
    /// `Retry-After: <HTTP date>`, this far from the moment of the answer.
    HttpDate(Duration),
}

/// Random-fault rates, drawn per request from a seeded RNG. `Default` = no
/// faults and no latency.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Every request of every service is answered this long after it
    /// arrived (the answer is built then; timed to about 0.1 ms).
    pub latency: Duration,
    /// Probability of a Flow 429.
    pub flow_429: f64,
    /// Probability of a Flow 503 (alternating with 500/502 at random).
    pub flow_5xx: f64,
    /// Probability of a Flow connection reset without answer.
    pub flow_reset: f64,
    /// Probability of a slow Flow answer (sleeps `2 * flow_slow_delay`).
    pub flow_slow: f64,
    /// Base of the slow answer's delay; set the client's timeout below twice this.
    pub flow_slow_delay: Duration,
    /// Probability that, after a Flow GET, another writer bumps the etag.
    pub etag_churn: f64,
    /// Probability, per Flow request, that every IMS token issued so far is
    /// revoked before the request is checked.
    pub ims_revoke: f64,
    /// Probability of an STS `Throttling` error.
    pub sts_throttle: f64,
    /// `Retry-After` seconds sent with random 429 and 503 answers.
    pub retry_after_secs: Option<u64>,
}

/// Figures about what the simulator has seen (also `GET /_sim/stats` on the
/// Flow listener).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    /// IMS tokens issued.
    pub ims_tokens_issued: u64,
    /// Successful `AssumeRole` calls.
    pub sts_assume_role: u64,
    /// Successful `GetSessionToken` calls.
    pub sts_get_session_token: u64,
    /// Successful `GET /connections/{id}`.
    pub flow_gets: u64,
    /// Successful `GET /connections` list pages.
    #[serde(default)]
    pub flow_lists: u64,
    /// Successful PATCHes.
    pub flow_patches_ok: u64,
    /// 412 answers.
    pub flow_412: u64,
    /// 429 answers.
    pub flow_429: u64,
    /// 5xx answers.
    pub flow_5xx: u64,
    /// Flow connections reset without an answer (scripted or random).
    pub flow_resets: u64,
    /// 401 answers.
    pub flow_401: u64,
    /// Flow requests handled (not counting `/_sim/stats`).
    pub flow_requests: u64,
    /// Peak of Flow requests being handled at once.
    pub max_in_flight: u64,
    /// Seconds Flow requests spent being handled (from arrival to the
    /// answer, injected latency included), summed over requests: divided by
    /// `flow_requests` it is the mean service time, divided by a stretch of
    /// wall time the mean number of Flow requests in flight.
    #[serde(default)]
    pub flow_busy_seconds: f64,
    /// Protocol violations recorded.
    pub violations: u64,
    /// Over all connections, from their first successful PATCH on, the
    /// seconds during which the credentials stored on them were expired.
    pub expired_seconds: f64,
    /// Connections (existing now) that never got a successful PATCH.
    pub connections_never_rotated: u64,
    /// Once every connection existing now has had a successful PATCH: when
    /// the last of them got its first one (Unix milliseconds), i.e. when the
    /// first pass over them ended. `None` while some are still waiting.
    #[serde(default)]
    pub first_pass_done_unix_ms: Option<u64>,
    /// S3 pre-push checks answered 200.
    #[serde(default)]
    pub s3_checks_allowed: u64,
    /// S3 pre-push checks answered with an error (denied, redirected, faults).
    #[serde(default)]
    pub s3_checks_refused: u64,
    /// Accepted PATCHes that stored credentials of a session revoked
    /// before the PATCH ([`Simulator::revoke_sessions`]): useless on arrival.
    #[serde(default)]
    pub flow_patches_revoked: u64,
}

/// One set of credentials this simulator's STS issued, as it recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsSession {
    /// The access key id.
    pub access_key_id: String,
    /// The role assumed (`None`: `GetSessionToken`).
    pub role_arn: Option<String>,
    /// `RoleSessionName` (empty for `GetSessionToken`).
    pub session_name: String,
    /// The session tags sent, in the order sent.
    pub session_tags: Vec<(String, String)>,
    /// The `SourceIdentity` sent, if any.
    pub source_identity: Option<String>,
    /// When they were issued.
    pub issued_at: SystemTime,
    /// Their `Expiration`.
    pub expires_at: SystemTime,
    /// Whether their role's sessions were revoked after they were issued.
    pub revoked: bool,
}

/// One PATCH that stored credentials, in the order they were applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRecord {
    /// 1, 2, 3 ... in the order the simulator applied them (times can tie).
    pub seq: u64,
    /// Connection id.
    pub connection: String,
    /// The IMS client whose token made the PATCH.
    pub client_id: String,
    /// When it was applied, Unix milliseconds.
    pub at_unix_ms: u64,
    /// The access key id stored (not secret).
    pub access_key_id: String,
}

/// Who wrote what (also `GET /_sim/patches` on the Flow listener): every
/// accepted PATCH, and the refused ones counted per client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimPatches {
    /// Accepted PATCHes, oldest first (the last 100 000).
    pub accepted: Vec<PatchRecord>,
    /// Accepted PATCHes dropped from the front of `accepted` (log cap).
    pub dropped: u64,
    /// Refused PATCHes per client id, then per HTTP status (`"412"`, ...;
    /// `"reset"` for a connection closed without an answer). A PATCH whose
    /// bearer token the simulator never issued counts under `"?"`.
    pub rejected: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
}

impl SimPatches {
    /// Accepted PATCHes by this client.
    pub fn by_client(&self, client_id: &str) -> Vec<&PatchRecord> {
        self.accepted
            .iter()
            .filter(|p| p.client_id == client_id)
            .collect()
    }

    /// Accepted PATCHes on this connection.
    pub fn on_connection(&self, connection: &str) -> Vec<&PatchRecord> {
        self.accepted
            .iter()
            .filter(|p| p.connection == connection)
            .collect()
    }

    /// The distinct clients that made at least one accepted PATCH, sorted.
    pub fn writers(&self) -> Vec<String> {
        let set: std::collections::BTreeSet<&str> =
            self.accepted.iter().map(|p| p.client_id.as_str()).collect();
        set.into_iter().map(str::to_owned).collect()
    }

    /// Refused PATCHes by this client with this status (`"412"`, `"reset"` ...).
    pub fn rejected_count(&self, client_id: &str, status: &str) -> u64 {
        self.rejected
            .get(client_id)
            .and_then(|m| m.get(status))
            .copied()
            .unwrap_or(0)
    }
}

/// What a base connection holds now.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionView {
    /// Connection id.
    pub id: String,
    /// Sandbox name.
    pub sandbox: String,
    /// Current etag, with its literal quotes.
    pub etag: String,
    /// Access key id of the credentials last stored by a successful PATCH
    /// (`None` before the first one, although the connection holds a
    /// long-term placeholder key then).
    pub access_key_id: Option<String>,
    /// When the credentials last stored by a PATCH expire.
    pub expires_at: Option<SystemTime>,
    /// Successful PATCHes.
    pub patches: u64,
    /// When the first successful PATCH happened.
    pub first_patch_at: Option<SystemTime>,
    /// `auth.params` without the three credential fields (`bucketName`,
    /// `folderPath`), to check that PATCHes leave them alone.
    pub params_other_than_credentials: serde_json::Value,
}

/// A notable thing that happened, in chronological order.
#[derive(Debug, Clone, PartialEq)]
pub enum SimEvent {
    /// IMS issued a token.
    ImsTokenIssued {
        /// When.
        at: SystemTime,
    },
    /// IMS refused a token request (wrong client, bad request ...).
    ImsRejected {
        /// The OAuth `error` code.
        error: String,
        /// When.
        at: SystemTime,
    },
    /// Every IMS token issued so far was revoked.
    TokensRevoked {
        /// When.
        at: SystemTime,
    },
    /// Every session of this role issued so far was revoked.
    SessionsRevoked {
        /// The role.
        role_arn: String,
        /// When.
        at: SystemTime,
    },
    /// STS issued credentials.
    StsIssued {
        /// `AssumeRole` or `GetSessionToken`.
        action: String,
        /// The access key id (not secret).
        access_key_id: String,
        /// Their `Expiration`.
        expires_at: SystemTime,
        /// When.
        at: SystemTime,
        /// The role assumed (`None`: `GetSessionToken`).
        role_arn: Option<String>,
        /// `RoleSessionName` (empty for `GetSessionToken`).
        session_name: String,
        /// The session tags sent, in the order sent.
        session_tags: Vec<(String, String)>,
        /// The `SourceIdentity` sent, if any.
        source_identity: Option<String>,
    },
    /// STS answered an error.
    StsFailed {
        /// The `<Code>`.
        code: String,
        /// HTTP status.
        status: u16,
        /// When.
        at: SystemTime,
    },
    /// A PATCH stored new credentials on a connection.
    PatchApplied {
        /// Connection id.
        connection: String,
        /// The access key id stored.
        access_key_id: String,
        /// Their expiry.
        expires_at: SystemTime,
        /// When.
        at: SystemTime,
    },
    /// A PATCH was answered 412 (stale `If-Match`).
    Conflict {
        /// Connection id.
        connection: String,
        /// When.
        at: SystemTime,
    },
    /// A request was answered 429.
    Throttled {
        /// Which service.
        service: SimService,
        /// Connection id, for Flow requests about one.
        connection: Option<String>,
        /// The `Retry-After` header sent, if any.
        retry_after: Option<String>,
        /// When.
        at: SystemTime,
    },
    /// A request was answered with a 5xx.
    ServerError {
        /// Which service.
        service: SimService,
        /// Connection id, for Flow requests about one.
        connection: Option<String>,
        /// HTTP status.
        status: u16,
        /// When.
        at: SystemTime,
    },
    /// A Flow request was answered 401.
    Unauthorized {
        /// Connection id, for requests about one.
        connection: Option<String>,
        /// When.
        at: SystemTime,
    },
    /// A request was answered with another 4xx (400, 403, 404, ...).
    Rejected {
        /// Which service.
        service: SimService,
        /// Connection id, for Flow requests about one.
        connection: Option<String>,
        /// HTTP status.
        status: u16,
        /// When.
        at: SystemTime,
    },
    /// A connection was closed without an answer (scripted or random reset).
    Reset {
        /// Which service.
        service: SimService,
        /// Connection id, for Flow requests about one.
        connection: Option<String>,
        /// When.
        at: SystemTime,
    },
    /// An answer was delayed on purpose (scripted delay or random slow answer).
    Delayed {
        /// Which service.
        service: SimService,
        /// Connection id, for Flow requests about one.
        connection: Option<String>,
        /// How long.
        delay: Duration,
        /// When the delay started.
        at: SystemTime,
    },
    /// Another writer changed a connection (new etag).
    EtagBumped {
        /// Connection id.
        connection: String,
        /// When.
        at: SystemTime,
    },
    /// A connection was added at run time.
    ConnectionAdded {
        /// Connection id.
        connection: String,
        /// When.
        at: SystemTime,
    },
    /// A connection was deleted.
    ConnectionDeleted {
        /// Connection id.
        connection: String,
        /// When.
        at: SystemTime,
    },
    /// A service was taken down or brought back.
    ServiceDown {
        /// Which service.
        service: SimService,
        /// `true` = down.
        down: bool,
        /// When.
        at: SystemTime,
    },
    /// The simulated S3 answered a pre-push check.
    S3Checked {
        /// The bucket (the request path).
        bucket: String,
        /// The access key id it was signed with (empty if unknown).
        access_key_id: String,
        /// Answered 200.
        allowed: bool,
        /// The S3 error code otherwise.
        code: String,
        /// When.
        at: SystemTime,
    },
    /// The client violated the protocol.
    Violation {
        /// What it did, human readable (never a secret).
        message: String,
        /// When.
        at: SystemTime,
    },
}

/// A running simulator: a cheap, cloneable handle.
///
/// The three servers run until [`Simulator::stop`] is called or the last
/// handle is dropped.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
    /// Cancels the servers when the last handle goes away, so a test that
    /// forgets `stop()` does not leak listeners.
    _stop_on_drop: Arc<DropGuard>,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("ims_url", &self.ims_url())
            .field("platform_url", &self.platform_url())
            .field("sts_url", &self.sts_url())
            .field("s3_url", &self.s3_url())
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Binds the three listeners on `127.0.0.1:0` and starts serving.
    /// Must be called inside a Tokio runtime.
    pub async fn start(config: SimConfig) -> std::io::Result<Simulator> {
        let (shared, guard) = net::start(config).await?;
        Ok(Simulator {
            shared,
            _stop_on_drop: Arc::new(guard),
        })
    }

    fn url(addr: SocketAddr) -> String {
        format!("http://{addr}")
    }

    /// Base URL of IMS, e.g. `http://127.0.0.1:PORT`; the token endpoint is
    /// `/ims/token/v3` under it.
    pub fn ims_url(&self) -> String {
        Self::url(self.shared.addrs[SimService::Ims.index()])
    }

    /// Base URL of the Platform gateway; Flow Service is under
    /// `/data/foundation/flowservice`, figures under `/_sim/stats`.
    pub fn platform_url(&self) -> String {
        Self::url(self.shared.addrs[SimService::Flow.index()])
    }

    /// Endpoint of S3 (path-style: `/{bucket}`), for the daemon's pre-push check.
    pub fn s3_url(&self) -> String {
        Self::url(self.shared.addrs[SimService::S3.index()])
    }

    /// S3 denies (or stops denying) every check on `bucket` with
    /// `AccessDenied`; `bucket/prefix` denies only listings of that prefix.
    pub fn s3_deny_bucket(&self, bucket: &str, deny: bool) {
        let mut st = self.shared.lock();
        if deny {
            st.s3.deny_buckets.insert(bucket.to_owned());
        } else {
            st.s3.deny_buckets.remove(bucket);
        }
    }

    /// S3 denies every check signed with this access key id.
    pub fn s3_deny_key(&self, access_key_id: &str) {
        self.shared
            .lock()
            .s3
            .deny_keys
            .insert(access_key_id.to_owned());
    }

    /// S3 denies the next `n` well-signed checks, then answers normally: new
    /// credentials that take a moment to be usable (IAM eventual consistency).
    pub fn s3_deny_next(&self, n: u32) {
        self.shared.lock().s3.deny_next = n;
    }

    /// Makes `bucket` exist in S3 although no connection names it yet (the
    /// bucket of a connection about to be created, for the pre-push check).
    pub fn s3_add_bucket(&self, bucket: &str) {
        self.shared.lock().s3.buckets.insert(bucket.to_owned());
    }

    /// Puts `bucket` in `region`: checks signed for another region get
    /// `301 PermanentRedirect` naming it.
    pub fn s3_set_bucket_region(&self, bucket: &str, region: &str) {
        self.shared
            .lock()
            .s3
            .bucket_regions
            .insert(bucket.to_owned(), region.to_owned());
    }

    /// Sets (or, with `None`, removes) a non-credential `auth.params` value
    /// of a connection (`bucketName`, `folderPath`, `serviceUrl`), as an edit
    /// in the UI would: the connection gets a new etag.
    pub fn set_connection_param(&self, id: &str, key: &str, value: Option<&str>) {
        let mut st = self.shared.lock();
        let Some(conn) = st.connections.get_mut(id) else {
            return;
        };
        match value {
            Some(v) => {
                conn.other_params
                    .insert(key.to_owned(), serde_json::Value::String(v.to_owned()));
            }
            None => {
                conn.other_params.remove(key);
            }
        }
        st.connections_changed();
        st.bump_etag(id);
    }

    /// Endpoint of STS (query protocol at `POST /`).
    pub fn sts_url(&self) -> String {
        Self::url(self.shared.addrs[SimService::Sts.index()])
    }

    /// Stops all three servers: no new connections are accepted, requests
    /// on open connections are reset, answers in flight may still finish.
    pub fn stop(&self) {
        self.shared.stop();
    }

    /// Replaces the random-fault rates.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().faults = faults;
    }

    /// Queues one scripted answer for `service` (FIFO), consumed by the next
    /// request it matches (see [`ScriptedFault`]).
    pub fn script(&self, service: SimService, fault: ScriptedFault) {
        self.shared.lock().scripts[service.index()].push_back(fault);
    }

    /// Queues one scripted answer for the next Flow request about this
    /// connection only (taken before the service-wide queue).
    pub fn script_for(&self, connection_id: &str, fault: ScriptedFault) {
        self.shared
            .lock()
            .connection_scripts
            .entry(connection_id.to_owned())
            .or_default()
            .push_back(fault);
    }

    /// Takes a service down (`true`: new connections are reset at once and
    /// requests on open connections are reset) or brings it back.
    pub fn set_service_down(&self, service: SimService, down: bool) {
        self.shared.set_down(service, down);
    }

    /// Adds (or replaces) a connection.
    pub fn add_connection(&self, c: SimConnection) {
        self.shared.add_connection(c);
    }

    /// Queues one scripted answer for the next Flow *list* request
    /// (`GET /connections`) only, taken before the service-wide queue.
    pub fn script_list(&self, fault: ScriptedFault) {
        self.shared.lock().list_scripts.push_back(fault);
    }

    /// Renames a connection (a new etag, as any update); `false` if it does
    /// not exist.
    pub fn rename_connection(&self, id: &str, name: &str) -> bool {
        self.shared
            .edit_connection(id, |spec| spec.name = name.to_owned())
    }

    /// Replaces a connection's description (a new etag); `false` if it does
    /// not exist.
    pub fn set_description(&self, id: &str, description: &str) -> bool {
        self.shared
            .edit_connection(id, |spec| spec.description = description.to_owned())
    }

    /// Sets a connection's `state` (`"enabled"`, `"disabled"`; a new etag);
    /// `false` if it does not exist.
    pub fn set_state(&self, id: &str, state: &str) -> bool {
        self.shared
            .edit_connection(id, |spec| spec.state = state.to_owned())
    }

    /// Deletes a connection; afterwards GET and PATCH answer 404.
    pub fn delete_connection(&self, id: &str) {
        self.shared.delete_connection(id);
    }

    /// Another writer changes the connection: it gets a new etag.
    pub fn bump_etag(&self, id: &str) {
        self.shared.bump_etag(id);
    }

    /// Every IMS token issued so far becomes invalid (401 at Flow Service).
    pub fn revoke_tokens(&self) {
        self.shared.revoke_tokens();
    }

    /// "Revoke active sessions" on `role_arn`, as the IAM console does it:
    /// every session of the role issued before now is denied from now on,
    /// by S3 (`403 AccessDenied`, explicit deny) and so by Flow Service's
    /// connection test (`result: false`); PATCHes storing such credentials
    /// are counted in [`SimStats::flow_patches_revoked`]. New `AssumeRole`
    /// calls work as before. Answers the revocation time.
    pub fn revoke_sessions(&self, role_arn: &str) -> SystemTime {
        let at = SystemTime::now();
        let mut st = self.shared.lock();
        st.session_revocations.insert(role_arn.to_owned(), at);
        st.event(SimEvent::SessionsRevoked {
            role_arn: role_arn.to_owned(),
            at,
        });
        at
    }

    /// What STS recorded about the credentials with this access key id.
    pub fn sts_session(&self, access_key_id: &str) -> Option<StsSession> {
        let st = self.shared.lock();
        st.issuances.get(access_key_id).map(|i| StsSession {
            access_key_id: access_key_id.to_owned(),
            role_arn: i.role_arn.clone(),
            session_name: i.session_name.clone(),
            session_tags: i.session_tags.clone(),
            source_identity: i.source_identity.clone(),
            issued_at: i.issued_at,
            expires_at: i.expires_at,
            revoked: i.revoked(&st.session_revocations),
        })
    }

    /// Rotates the IMS client secret: from now on only `secret` is accepted
    /// for [`SimConfig::client_id`].
    pub fn set_client_secret(&self, secret: &str) {
        self.shared.set_client_secret(secret);
    }

    /// Restarts [`SimStats::max_in_flight`] from the Flow requests in
    /// flight now.
    pub fn reset_max_in_flight(&self) {
        self.shared.reset_max_in_flight();
    }

    /// Current figures.
    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// What the connection holds now; `None` if it does not exist.
    pub fn connection(&self, id: &str) -> Option<ConnectionView> {
        self.shared.connection_view(id)
    }

    /// Protocol violations by the client, human readable, oldest first
    /// (the last 100 000).
    pub fn violations(&self) -> Vec<String> {
        self.shared.lock().violations.iter().cloned().collect()
    }

    /// Every secret value the simulator knows or issued: the client secret,
    /// every IMS token, every secret access key and session token (and the
    /// placeholder secret keys connections start with). For leak checks.
    pub fn issued_secrets(&self) -> Vec<String> {
        self.shared.issued_secrets()
    }

    /// Answered list pages (`GET /connections`) per IMS client id.
    pub fn lists_by_client(&self) -> std::collections::BTreeMap<String, u64> {
        self.shared.lock().lists_by_client.clone()
    }

    /// Who PATCHed what: accepted PATCHes with their client, refused ones
    /// counted per client.
    pub fn patches(&self) -> SimPatches {
        self.shared.patches()
    }

    /// Notable events, oldest first (the last 100 000).
    pub fn events(&self) -> Vec<SimEvent> {
        self.shared.lock().events.iter().cloned().collect()
    }
}
