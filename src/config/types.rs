//! The validated configuration: every value here has been checked.

use super::*;

/// The default IMS host (North America; IMS is global behind it).
pub const DEFAULT_IMS_URL: &str = "https://ims-na1.adobelogin.com";
/// The default Experience Platform gateway.
pub const DEFAULT_PLATFORM_URL: &str = "https://platform.adobe.io";
/// The scopes an OAuth Server-to-Server credential for Experience Platform gets.
pub const DEFAULT_SCOPES: &[&str] = &[
    "openid",
    "AdobeID",
    "read_organizations",
    "additional_info.projectedProductContext",
    "session",
];

/// A validated configuration: every value here has been checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[adobe]`
    pub adobe: AdobeConfig,
    /// `[aws]`
    pub aws: AwsConfig,
    /// `[rotation]`
    pub rotation: RotationConfig,
    /// `[[connections]]`, in file order; ids are unique.
    pub connections: Vec<Arc<ConnectionConfig>>,
    /// `[[discover]]` rules, in file order (their index is their origin label).
    pub discover: Vec<DiscoverRule>,
    /// `[admin]`
    pub admin: AdminConfig,
    /// `[state]`
    pub state: StateConfig,
    /// `[coordination]`; `None` = a single instance (no lease, no shared state).
    pub coordination: Option<CoordinationConfig>,
    /// Non-fatal findings (e.g. a config file holding `client_secret` that is
    /// readable by group or others); logged at `warn` by the caller.
    pub warnings: Vec<String>,
}

/// `[adobe]`: the OAuth Server-to-Server credential and the endpoints.
#[derive(Debug, Clone)]
pub struct AdobeConfig {
    /// Sent to IMS and as `x-api-key`.
    pub client_id: String,
    /// From `client_secret`, `client_secret_file` or the environment override.
    pub client_secret: SecretString,
    /// `client_secret_file`, when the secret came from it: watched for
    /// changes, and re-read once when IMS answers `invalid_client`.
    pub client_secret_file: Option<PathBuf>,
    /// `check` outside the service: `client_secret_file` is a systemd
    /// credential (`/run/credentials/UNIT/NAME`), which exists only inside
    /// the running unit, so `client_secret` is empty and every check that
    /// needs it is skipped. Always false for the daemon itself.
    pub client_secret_deferred: bool,
    /// Sent as `x-gw-ims-org-id`.
    pub org_id: String,
    /// Joined with `,` in the token request.
    pub scopes: Vec<String>,
    /// Base URL of IMS; the token endpoint is `{ims_url}/ims/token/v3`.
    pub ims_url: Url,
    /// Base URL of the Platform gateway; Flow Service lives under
    /// `{platform_url}/data/foundation/flowservice`.
    pub platform_url: Url,
}

/// `[aws]`: how credentials are obtained from STS.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    /// Region for the STS client; `None` = the AWS default chain's region.
    pub region: Option<String>,
    /// Explicit STS endpoint; `None` = the SDK default (`AWS_ENDPOINT_URL_STS` honoured).
    pub sts_endpoint: Option<Url>,
    /// Endpoint of the pre-push S3 check for connections without a
    /// `serviceUrl`; `None` = `AWS_ENDPOINT_URL_S3`, else AWS's regional endpoint.
    pub s3_endpoint: Option<Url>,
    /// Further destinations the pre-push S3 check may send a connection's
    /// new credentials to when its `serviceUrl` names them (a VPC endpoint,
    /// an S3-compatible store). Without them a `serviceUrl` must be an AWS
    /// S3 endpoint of the configured region's partition, or `s3_endpoint`
    /// (docs/SECURITY.md, issue 26).
    pub s3_endpoints: Vec<Url>,
    /// Default role; `None` (and none on a connection) = `GetSessionToken`.
    pub role_arn: Option<RoleArn>,
    /// Default `ExternalId` for `AssumeRole`.
    pub external_id: Option<String>,
    /// Default `RoleSessionName` (2..=64 chars of `[\w+=,.@-]`).
    pub session_name: String,
    /// Default `session_tags` and `source_identity` (templates).
    pub attribution: Attribution,
}

/// `[rotation]`: timing and request shaping.
#[derive(Debug, Clone)]
pub struct RotationConfig {
    /// `DurationSeconds` asked of STS (15m..=12h).
    pub session_duration: Duration,
    /// Rotate when the pushed credentials have this long left (< session_duration).
    pub refresh_before: Duration,
    /// Rotate up to this much earlier, at random.
    pub jitter: Duration,
    /// Flow Service requests in flight at once.
    pub concurrency: NonZeroUsize,
    /// Optional ceiling on all Flow Service requests per second.
    pub max_requests_per_second: Option<NonZeroU32>,
    /// Smallest retry wait.
    pub retry_min: Duration,
    /// Largest retry wait (also the slow cadence for non-retryable errors).
    pub retry_max: Duration,
    /// After a PATCH, `GET /connections/{id}/test` and log the result.
    pub verify: bool,
    /// Before each PATCH, prove the new credentials can list the connection's
    /// bucket and folder (see `s3probe`); `false` for buckets this host cannot reach.
    pub prepush_check: bool,
    /// Timeout of every single HTTP request (IMS, Flow Service, STS).
    pub request_timeout: Duration,
    /// On shutdown, how long PATCHes in flight may take to finish.
    pub shutdown_grace: Duration,
    /// How often each connection is tested (`GET /connections/{id}/test`),
    /// and rotated at once with new credentials when S3 refuses the ones on
    /// it; `None` = never.
    pub health_check_every: Option<Duration>,
}

/// One `[[connections]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionConfig {
    /// The base connection id (non-empty, unique).
    pub id: String,
    /// Sent as `x-sandbox-name` (non-empty).
    pub sandbox: String,
    /// Label for logs and metrics; defaults to the id.
    pub name: String,
    /// Overrides `[aws] role_arn`.
    pub role_arn: Option<RoleArn>,
    /// Overrides `[aws] external_id`.
    pub external_id: Option<String>,
    /// Overrides `[aws] session_name`.
    pub session_name: Option<String>,
    /// Inline session policy (valid JSON, kept as written).
    pub session_policy: Option<String>,
    /// Managed policy ARNs that narrow the session.
    pub policy_arns: Vec<String>,
    /// Overrides `[aws] session_tags` / `source_identity`, key by key.
    pub attribution: Attribution,
    /// How the entry came to be: written in `[[connections]]`, or found by a
    /// `[[discover]]` rule. Labels metrics and `/status`.
    pub origin: Origin,
}

/// Where a connection's entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Origin {
    /// A `[[connections]]` table.
    #[default]
    Explicit,
    /// Found by `discover[N]` (the index in file order).
    Rule(usize),
}

impl fmt::Display for Origin {
    /// `explicit` or `discover[N]`: the label value in metrics and `/status`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Explicit => f.write_str("explicit"),
            Origin::Rule(i) => write!(f, "discover[{i}]"),
        }
    }
}

/// One `[[discover]]` rule: which connections of which sandboxes are rotated
/// without being listed by hand, and with which STS identity.
///
/// A connection matches when it is an S3 connection (`connectionSpec.id`)
/// with the `Access Key` auth spec, is `enabled`, lives in one of
/// `sandboxes`, and meets *every* condition given (`name`,
/// `description_tag`). Validation makes sure at least one condition is given,
/// so nothing is rotated that an operator did not mark.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoverRule {
    /// Position in the file: `discover[index]`.
    pub index: usize,
    /// Sandboxes to list (non-empty, lower-case, unique).
    pub sandboxes: Vec<String>,
    /// Glob the connection name must match (whole name, case-sensitive).
    pub name: Option<NameGlob>,
    /// Text the connection description must contain.
    pub description_tag: Option<String>,
    /// As for `[[connections]]`: overrides `[aws] role_arn`.
    pub role_arn: Option<RoleArn>,
    /// Overrides `[aws] external_id`.
    pub external_id: Option<String>,
    /// Overrides `[aws] session_name`.
    pub session_name: Option<String>,
    /// Inline session policy (valid JSON).
    pub session_policy: Option<String>,
    /// Managed policy ARNs that narrow the session.
    pub policy_arns: Vec<String>,
    /// As for `[[connections]]`: overrides `[aws] session_tags` /
    /// `source_identity`; expanded per connection found.
    pub attribution: Attribution,
    /// How often the sandboxes are re-listed.
    pub every: Duration,
}

impl DiscoverRule {
    /// The `[[connections]]`-equivalent entry for a connection this rule found.
    pub fn connection(&self, id: &str, sandbox: &str, name: Option<&str>) -> ConnectionConfig {
        ConnectionConfig {
            id: id.to_owned(),
            sandbox: sandbox.to_owned(),
            name: name
                .filter(|n| !n.trim().is_empty())
                .unwrap_or(id)
                .to_owned(),
            role_arn: self.role_arn.clone(),
            external_id: self.external_id.clone(),
            session_name: self.session_name.clone(),
            session_policy: self.session_policy.clone(),
            policy_arns: self.policy_arns.clone(),
            attribution: self.attribution.clone(),
            origin: Origin::Rule(self.index),
        }
    }
}

/// A compiled `name` glob of a `[[discover]]` rule (`globset` syntax: `*`,
/// `?`, `[a-z]`, `{a,b}`), matched against the whole connection name.
#[derive(Debug, Clone)]
pub struct NameGlob {
    pub(super) pattern: String,
    pub(super) matcher: globset::GlobMatcher,
}

impl NameGlob {
    /// Compiles `pattern`; the error says what is wrong with it.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let glob = globset::GlobBuilder::new(pattern)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map_err(|e| e.kind().to_string())?;
        Ok(Self {
            pattern: pattern.to_owned(),
            matcher: glob.compile_matcher(),
        })
    }

    /// Whether `name` matches, as a whole.
    pub fn is_match(&self, name: &str) -> bool {
        self.matcher.is_match(name)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }
}

impl PartialEq for NameGlob {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}

/// `[admin]`
#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    /// Where `/healthz`, `/readyz`, `/metrics` and `/status` are served; `None` = nowhere.
    pub listen: Option<SocketAddr>,
    /// `control_socket`: where the daemon takes `rotate` requests.
    pub control_socket: ControlSocket,
}

/// `[admin] control_socket`: the Unix socket `rotate` talks to (never the
/// admin HTTP listener, which has no authentication).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ControlSocket {
    /// Not set: `$RUNTIME_DIRECTORY/control.sock` under systemd, else
    /// `/run/aep-s3-rotator/control.sock` (see `crate::control`).
    #[default]
    Default,
    /// `control_socket = ""`: no control socket; `rotate` cannot reach the daemon.
    Off,
    /// This path.
    At(PathBuf),
}

/// The longest socket path: `sun_path` holds 108 bytes with its NUL.
pub const MAX_SOCKET_PATH: usize = 107;

impl ControlSocket {
    /// Parses the key's value; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(Self::Off);
        }
        let path = Path::new(text);
        if !path.is_absolute() {
            return Err(format!(
                "{text:?} is not an absolute path (use e.g. \"/run/aep-s3-rotator/control.sock\", or \"\" for none)"
            ));
        }
        if text.len() > MAX_SOCKET_PATH {
            return Err(format!(
                "is {} bytes long; a Unix socket path may have at most {MAX_SOCKET_PATH}",
                text.len()
            ));
        }
        if text.chars().any(char::is_control) {
            return Err("contains control characters".to_owned());
        }
        Ok(Self::At(path.to_owned()))
    }
}

/// `[state]`
#[derive(Debug, Clone, Default)]
pub struct StateConfig {
    /// Where non-secret state is kept across restarts; `None` = not kept.
    pub path: Option<PathBuf>,
}

/// `[coordination]`: several replicas, one writer, through a lease item in a
/// DynamoDB table (see `coordination`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinationConfig {
    /// The DynamoDB table (created by `coordination init`).
    pub table: String,
    /// How long a lease holds without renewal.
    pub lease: Duration,
    /// How often the leader renews (and a standby looks at the lease); < lease / 2.
    pub renew_every: Duration,
    /// This replica's name in the lease; `None` = hostname, pid and a random suffix.
    pub holder: Option<String>,
    /// Explicit DynamoDB endpoint; `None` = the SDK default (`AWS_ENDPOINT_URL_DYNAMODB` honoured).
    pub endpoint: Option<Url>,
}

/// A well-formed IAM role ARN (`arn:<partition>:iam::<12 digits>:role/<path/name>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleArn(String);

impl RoleArn {
    /// Parses an IAM role ARN; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<Self, String> {
        match iam_arn_problem(s, "role", MAX_ROLE_NAME_CHARS, false) {
            None => Ok(Self(s.to_owned())),
            Some(why) => Err(format!(
                "not an IAM role ARN: {s:?} ({why}; expected arn:aws:iam::123456789012:role/NAME)"
            )),
        }
    }

    /// The ARN as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The AWS partitions an IAM ARN can name.
pub(super) const PARTITIONS: &[&str] = &[
    "aws",
    "aws-cn",
    "aws-us-gov",
    "aws-iso",
    "aws-iso-b",
    "aws-iso-e",
    "aws-iso-f",
    "aws-eusc",
];
/// IAM's limit on a role name.
pub(super) const MAX_ROLE_NAME_CHARS: usize = 64;
/// IAM's limit on a managed policy name.
pub(super) const MAX_POLICY_NAME_CHARS: usize = 128;
/// IAM's limit on a path (`/division/team/`).
pub(super) const MAX_IAM_PATH_CHARS: usize = 512;

/// What is wrong with an IAM ARN of `kind` (`role` or `policy`), if anything.
/// `aws_account` allows the account `aws` (AWS managed policies).
pub(super) fn iam_arn_problem(
    s: &str,
    kind: &str,
    max_name: usize,
    aws_account: bool,
) -> Option<String> {
    let parts: Vec<&str> = s.splitn(6, ':').collect();
    let [arn, partition, service, region, account, resource] = parts[..] else {
        return Some("an ARN has six parts separated by ':'".to_owned());
    };
    if arn != "arn" {
        return Some("it does not start with \"arn:\"".to_owned());
    }
    if !PARTITIONS.contains(&partition) {
        return Some(format!("unknown partition {partition:?}"));
    }
    if service != "iam" {
        return Some(format!("the service is {service:?}, not \"iam\""));
    }
    if !region.is_empty() {
        return Some("IAM ARNs have no region: the fourth part must be empty".to_owned());
    }
    let account_ok = (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()))
        || (aws_account && account == "aws");
    if !account_ok {
        return Some(if aws_account {
            "the account must be 12 digits or \"aws\"".to_owned()
        } else {
            "the account must be 12 digits".to_owned()
        });
    }
    let Some(path_and_name) = resource
        .strip_prefix(kind)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return Some(format!("the resource must start with \"{kind}/\""));
    };
    let (path, name) = match path_and_name.rsplit_once('/') {
        Some((path, name)) => (Some(path), name),
        None => (None, path_and_name),
    };
    if name.is_empty() || name.len() > max_name {
        return Some(format!(
            "the {kind} name must be 1 to {max_name} characters"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
    {
        return Some(format!(
            "the {kind} name may only hold letters, digits and +=,.@_-"
        ));
    }
    // An IAM path is `/` + segments of printable ASCII, each followed by `/`.
    if path.is_some_and(|path| {
        path.len() > MAX_IAM_PATH_CHARS
            || path.split('/').any(str::is_empty)
            || !path.bytes().all(|b| (0x21..=0x7e).contains(&b))
    }) {
        return Some(format!("the {kind} path is not a valid IAM path"));
    }
    None
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// One problem, with the key path it concerns, e.g. `connections[2].role_arn`
/// and "not an IAM role ARN: ...". Never holds a secret value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The key path (`adobe.client_id`, `connections[1].sandbox`), or the
    /// file path (or `config`) for a problem with the file as a whole.
    pub path: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl ConfigIssue {
    pub(super) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a configuration; the caller reports them all and
/// exits 78 (EX_CONFIG), or on reload keeps the running configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// At least one issue, in the order found (file, then sections in order).
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    /// One line per issue: `path: message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------
