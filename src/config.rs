//! Configuration: one TOML file layered with `AEP_S3_ROTATOR__SECTION__KEY`
//! environment overrides, parsed into raw serde structs, then validated into
//! the types below. Validation collects *every* problem with its key path.
//!
//! The pipeline, in order:
//!
//! 1. the file is read and checked to be TOML (our own parse, so that a syntax
//!    error is reported without echoing the offending line, which may hold a
//!    secret);
//! 2. the `config` crate layers the environment over it
//!    (`AEP_S3_ROTATOR__ROTATION__CONCURRENCY=3` → `rotation.concurrency`);
//! 3. the layered tree is deserialized into permissive raw structs whose leaves
//!    accept any value (`Raw`), with `serde_ignored` collecting every unknown
//!    key and `serde_path_to_error` naming the key of a structural type error;
//! 4. `Checker` turns the raw structs into [`Config`], recording one
//!    [`ConfigIssue`] per problem and carrying on, so an operator fixes the
//!    whole file in one go.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use secrecy::zeroize::Zeroize;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use url::{Host, Url};

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
    pub connections: Vec<ConnectionConfig>,
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
}

/// One `[[connections]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
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
            origin: Origin::Rule(self.index),
        }
    }
}

/// A compiled `name` glob of a `[[discover]]` rule (`globset` syntax: `*`,
/// `?`, `[a-z]`, `{a,b}`), matched against the whole connection name.
#[derive(Debug, Clone)]
pub struct NameGlob {
    pattern: String,
    matcher: globset::GlobMatcher,
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
const PARTITIONS: &[&str] = &[
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
const MAX_ROLE_NAME_CHARS: usize = 64;
/// IAM's limit on a managed policy name.
const MAX_POLICY_NAME_CHARS: usize = 128;
/// IAM's limit on a path (`/division/team/`).
const MAX_IAM_PATH_CHARS: usize = 512;

/// What is wrong with an IAM ARN of `kind` (`role` or `policy`), if anything.
/// `aws_account` allows the account `aws` (AWS managed policies).
fn iam_arn_problem(s: &str, kind: &str, max_name: usize, aws_account: bool) -> Option<String> {
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
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
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

/// Environment variables starting with this override `[section] key`.
const ENV_PREFIX: &str = "AEP_S3_ROTATOR__";
/// What the advice in messages points at.
const EXAMPLE: &str = "config/example.toml";

impl Config {
    /// Reads the TOML file at `path`, layered with `AEP_S3_ROTATOR__SECTION__KEY`
    /// variables from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut env = Vec::new();
        let mut issues = Vec::new();
        for (name, value) in std::env::vars_os() {
            // Names that are not Unicode cannot carry our prefix.
            let Some(name) = name.to_str().filter(|n| n.starts_with(ENV_PREFIX)) else {
                continue;
            };
            match value.into_string() {
                Ok(value) => env.push((name.to_owned(), value)),
                Err(_) => issues.push(ConfigIssue::new(
                    env_key(name),
                    format!("the environment variable {name} is not valid UTF-8; set it to plain text or unset it"),
                )),
            }
        }
        load_file(path, env, issues)
    }

    /// Same as [`Config::load`], with the environment given explicitly
    /// (tests): pairs of (NAME, value); only names starting with
    /// `AEP_S3_ROTATOR__` are used.
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        load_file(path, env.into_iter().collect(), Vec::new())
    }

    /// Same, from TOML text. Relative paths in it (`client_secret_file`,
    /// `state.path`) are kept as written, i.e. relative to the working directory.
    pub fn from_toml_str(
        toml: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        from_text(toml, "config", None, env.into_iter().collect(), Vec::new())
    }
}

fn load_file(
    path: &Path,
    env: Vec<(String, String)>,
    issues: Vec<ConfigIssue>,
) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = match crate::fsguard::read_to_string(path, crate::fsguard::MAX_CONFIG_FILE) {
        Ok(text) => text,
        Err(error) => {
            let message = match error.kind() {
                std::io::ErrorKind::NotFound => "no such file; pass --config PATH or set AEP_S3_ROTATOR_CONFIG (the default is /etc/aep-s3-rotator/config.toml)".to_owned(),
                std::io::ErrorKind::PermissionDenied => "permission denied; make the file readable by the daemon's user".to_owned(),
                std::io::ErrorKind::InvalidData => "not UTF-8 text; save the file as UTF-8".to_owned(),
                std::io::ErrorKind::InvalidInput => error.to_string(),
                _ => format!("cannot be read ({error}); check that --config names a readable file"),
            };
            let mut all = issues;
            all.push(ConfigIssue::new(origin, message));
            return Err(ConfigError { issues: all });
        }
    };
    from_text(&text, &origin, Some(path), env, issues)
}

/// The key an environment variable overrides, as the `config` crate sees it:
/// `AEP_S3_ROTATOR__ROTATION__SESSION_DURATION` → `rotation.session_duration`.
fn env_key(name: &str) -> String {
    name.get(ENV_PREFIX.len()..)
        .unwrap_or_default()
        .to_lowercase()
        .replace("__", ".")
}

/// Parses, layers, deserializes and validates. `origin` names the text in
/// issues about it as a whole; `file` is where it came from, if anywhere.
fn from_text(
    text: &str,
    origin: &str,
    file: Option<&Path>,
    env: Vec<(String, String)>,
    mut issues: Vec<ConfigIssue>,
) -> Result<Config, ConfigError> {
    // Our own parse first: its error is reported by position, without the
    // source line that `toml`'s Display would quote (it may be a secret).
    let table = match toml::from_str::<toml::Table>(text) {
        Ok(table) => table,
        Err(error) => {
            issues.push(toml_issue(origin, text, &error));
            return Err(ConfigError { issues });
        }
    };
    // Only our prefix, and an empty value counts as unset (what an unset
    // `${VAR}` in a compose file or unit turns into).
    let env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, value)| {
            name.len() > ENV_PREFIX.len() && name.starts_with(ENV_PREFIX) && !value.is_empty()
        })
        .collect();
    let env_names: BTreeMap<String, String> = env
        .iter()
        .map(|(name, _)| (env_key(name), name.clone()))
        .collect();
    let client_secret_in_file = table
        .get("adobe")
        .and_then(toml::Value::as_table)
        .is_some_and(|adobe| adobe.contains_key("client_secret"));
    let layered = config::Config::builder()
        .add_source(ParsedToml::from(table))
        .add_source(
            config::Environment::with_prefix("AEP_S3_ROTATOR")
                .prefix_separator("__")
                .separator("__")
                // No `try_parsing`: values stay strings (a client secret of
                // digits keeps its leading zeros) and validation converts
                // numbers and booleans where a key wants them.
                .source(Some(env.into_iter().collect())),
        )
        .build();
    let layered = match layered {
        Ok(layered) => layered,
        Err(error) => {
            let message = match error {
                // Only reachable if the `config` crate's TOML parser disagrees
                // with ours; its message would quote the source line.
                config::ConfigError::FileParse { .. } => {
                    format!("not valid TOML; compare it with {EXAMPLE}")
                }
                other => format!("cannot be layered with the environment: {other}"),
            };
            issues.push(ConfigIssue::new(origin, message));
            return Err(ConfigError { issues });
        }
    };

    // Not `#[serde(deny_unknown_fields)]`: it stops at the first unknown key
    // and hides everything else. `serde_ignored` reports each one with its
    // path while deserialization carries on.
    let mut unknown = Vec::new();
    let raw: Result<RawConfig, _> = {
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(ignored_path(&path));
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(layered, &mut record))
    };
    unknown.sort();
    unknown.dedup();
    for path in unknown {
        let message = with_env_origin(
            &env_names,
            &path,
            format!("unknown key; check the spelling against {EXAMPLE}"),
        );
        issues.push(ConfigIssue::new(path, message));
    }
    let raw = match raw {
        Ok(raw) => raw,
        Err(error) => {
            let path = error.path().to_string();
            let message =
                with_env_origin(&env_names, &path, structural_message(&path, error.inner()));
            issues.push(ConfigIssue::new(path, message));
            return Err(ConfigError { issues });
        }
    };

    let mut checker = Checker {
        issues,
        warnings: Vec::new(),
        env_names: &env_names,
    };
    let config = checker.config(raw);
    if let Some(file) = file
        && client_secret_in_file
        && readable_by_others(file)
    {
        checker.warnings.push(format!(
            "config file {} holds adobe.client_secret and is readable by group/others; chmod 600 it or use client_secret_file",
            file.display()
        ));
    }
    match config {
        Ok(mut config) if checker.issues.is_empty() => {
            config.warnings = checker.warnings;
            Ok(config)
        }
        _ => Err(ConfigError {
            issues: checker.issues,
        }),
    }
}

/// The file's TOML, already parsed, as the layering's first source: what
/// `config::File::from_str` would give (it converts the same way), without
/// parsing the text a second time. A config of 10,000 connections is 1 MB;
/// its second parse took ~50 ms of the daemon's start, and a copy of the
/// table as long, so `collect` hands the table over instead of copying it:
/// `ConfigBuilder::build` collects each source once, and a second `collect`
/// (which nothing makes) is an error rather than an empty file.
#[derive(Debug)]
struct ParsedToml(std::sync::Mutex<Option<config::Map<String, config::Value>>>);

impl ParsedToml {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<config::Map<String, config::Value>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl From<toml::Table> for ParsedToml {
    fn from(table: toml::Table) -> Self {
        fn convert(v: toml::Value) -> config::Value {
            match v {
                toml::Value::String(s) => config::Value::new(None, s),
                toml::Value::Integer(n) => config::Value::new(None, n),
                toml::Value::Float(x) => config::Value::new(None, x),
                toml::Value::Boolean(b) => config::Value::new(None, b),
                toml::Value::Datetime(d) => config::Value::new(None, d.to_string()),
                toml::Value::Array(items) => {
                    config::Value::new(None, items.into_iter().map(convert).collect::<Vec<_>>())
                }
                toml::Value::Table(table) => config::Value::new(None, map(table)),
            }
        }
        fn map(table: toml::Table) -> config::Map<String, config::Value> {
            table.into_iter().map(|(k, v)| (k, convert(v))).collect()
        }
        Self(std::sync::Mutex::new(Some(map(table))))
    }
}

impl config::Source for ParsedToml {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(Self(std::sync::Mutex::new(self.lock().clone())))
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        self.lock().take().ok_or_else(|| {
            config::ConfigError::Message("the config file's table was already collected".into())
        })
    }
}

/// Adds which environment variable set the key (or a key under it), since
/// the file alone would not explain the problem.
fn with_env_origin(env_names: &BTreeMap<String, String>, path: &str, message: String) -> String {
    let nested = format!("{path}.");
    match env_names
        .iter()
        .find(|(key, _)| *key == path || key.starts_with(&nested))
    {
        Some((_, name)) if !message.contains(name.as_str()) => {
            format!("{message} (set by the environment variable {name})")
        }
        _ => message,
    }
}

/// A TOML syntax error as an issue: position and reason, never the line.
fn toml_issue(origin: &str, text: &str, error: &toml::de::Error) -> ConfigIssue {
    let position = error.span().map(|span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before
            .rsplit('\n')
            .next()
            .unwrap_or_default()
            .chars()
            .count()
            + 1;
        format!(" at line {line}, column {column}")
    });
    let reason = error.message().trim_end();
    ConfigIssue::new(
        origin,
        format!(
            "not valid TOML{}: {reason}; fix the syntax (compare with {EXAMPLE})",
            position.unwrap_or_default()
        ),
    )
}

/// `serde_ignored`'s path in our notation: `connections[1].bogus`.
fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => match ignored_path(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

/// The message for a type error serde had to stop at (a section that is not
/// a table, say). Values are left out: they could be secrets in the wrong place.
fn structural_message(path: &str, error: &config::ConfigError) -> String {
    if path == "connections" {
        return "must be a list of tables: write each connection as a [[connections]] table (double brackets)".to_owned();
    }
    let text = match error {
        config::ConfigError::Type { expected, .. } => {
            return format!("wrong type: expected {expected}");
        }
        other => other.to_string(),
    };
    match text.split_once(", expected ") {
        Some((_, expected)) => {
            // `config` may append " for key `…`" and " in <origin>": the path says it.
            let expected = expected.split(" for key `").next().unwrap_or(expected);
            format!("wrong type: expected {expected}")
        }
        None => format!("cannot be read; compare it with {EXAMPLE}"),
    }
}

/// Whether the file's mode lets group or others read it.
#[cfg(unix)]
fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
}

#[cfg(not(unix))]
fn readable_by_others(_path: &Path) -> bool {
    false
}

// ---------------------------------------------------------------------------
// Raw structs: the shape of the file, every leaf permissive
// ---------------------------------------------------------------------------

/// A value as written, whatever its type. Typing happens in validation, so
/// every wrong type is reported with its key, not just the first one serde
/// would stop at. No `Debug`: it may hold the client secret.
enum Raw {
    Str(String),
    Int(i128),
    Float,
    Bool(bool),
    List(Vec<Raw>),
    Table,
    Nil,
}

impl Raw {
    /// What it is, for "expected X, found Y" (never the value itself).
    fn kind(&self) -> &'static str {
        match self {
            Raw::Str(_) => "a string",
            Raw::Int(_) => "an integer",
            Raw::Float => "a float",
            Raw::Bool(_) => "a boolean",
            Raw::List(_) => "a list",
            Raw::Table => "a table",
            Raw::Nil => "nothing",
        }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RawVisitor;

        impl<'de> Visitor<'de> for RawVisitor {
            type Value = Raw;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Raw, E> {
                Ok(Raw::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Raw, E> {
                Ok(Raw::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
                Ok(Raw::Int(v.into()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Raw, E> {
                Ok(Raw::Int(v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Raw, E> {
                // Beyond i128 it is out of every range we check anyway.
                Ok(Raw::Int(i128::try_from(v).unwrap_or(i128::MAX)))
            }
            fn visit_f64<E: de::Error>(self, _v: f64) -> Result<Raw, E> {
                Ok(Raw::Float)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Raw, E> {
                Ok(Raw::Str(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Raw, E> {
                Ok(Raw::Nil)
            }
            fn visit_none<E: de::Error>(self) -> Result<Raw, E> {
                Ok(Raw::Nil)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
                Raw::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Raw::List(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
                // Read as `Raw`, not `IgnoredAny`: serde_ignored would report
                // the entries of a misplaced table as unknown keys.
                while map.next_entry::<String, Raw>()?.is_some() {}
                Ok(Raw::Table)
            }
        }

        deserializer.deserialize_any(RawVisitor)
    }
}

fn present(raw: &Option<Raw>) -> bool {
    !matches!(raw, None | Some(Raw::Nil))
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "a TOML document")]
struct RawConfig {
    adobe: RawAdobe,
    aws: RawAws,
    rotation: RawRotation,
    connections: Option<Vec<RawConnection>>,
    discover: Option<Vec<RawDiscover>>,
    admin: RawAdmin,
    state: RawState,
    coordination: RawCoordination,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "an [adobe] table")]
struct RawAdobe {
    client_id: Option<Raw>,
    client_secret: Option<Raw>,
    client_secret_file: Option<Raw>,
    org_id: Option<Raw>,
    scopes: Option<Raw>,
    ims_url: Option<Raw>,
    platform_url: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "an [aws] table")]
struct RawAws {
    region: Option<Raw>,
    sts_endpoint: Option<Raw>,
    s3_endpoint: Option<Raw>,
    s3_endpoints: Option<Raw>,
    role_arn: Option<Raw>,
    external_id: Option<Raw>,
    session_name: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "a [rotation] table")]
struct RawRotation {
    session_duration: Option<Raw>,
    refresh_before: Option<Raw>,
    jitter: Option<Raw>,
    concurrency: Option<Raw>,
    max_requests_per_second: Option<Raw>,
    retry_min: Option<Raw>,
    retry_max: Option<Raw>,
    verify: Option<Raw>,
    prepush_check: Option<Raw>,
    request_timeout: Option<Raw>,
    shutdown_grace: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "a [[connections]] table")]
struct RawConnection {
    id: Option<Raw>,
    sandbox: Option<Raw>,
    name: Option<Raw>,
    role_arn: Option<Raw>,
    external_id: Option<Raw>,
    session_name: Option<Raw>,
    session_policy: Option<Raw>,
    policy_arns: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "a [[discover]] table")]
struct RawDiscover {
    sandboxes: Option<Raw>,
    name: Option<Raw>,
    description_tag: Option<Raw>,
    role_arn: Option<Raw>,
    external_id: Option<Raw>,
    session_name: Option<Raw>,
    session_policy: Option<Raw>,
    policy_arns: Option<Raw>,
    every: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "an [admin] table")]
struct RawAdmin {
    listen: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "a [state] table")]
struct RawState {
    path: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "a [coordination] table")]
struct RawCoordination {
    backend: Option<Raw>,
    table: Option<Raw>,
    lease: Option<Raw>,
    renew_every: Option<Raw>,
    holder: Option<Raw>,
    endpoint: Option<Raw>,
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// Shows up in CloudTrail as who assumed the role.
const DEFAULT_SESSION_NAME: &str = "aep-s3-rotator";
/// STS's own default, and the cap under role chaining (IRSA, ECS task roles).
const DEFAULT_SESSION_DURATION: Duration = Duration::from_secs(60 * 60);
/// STS refuses shorter sessions (AssumeRole and GetSessionToken alike).
const MIN_SESSION_DURATION: Duration = Duration::from_secs(15 * 60);
/// AssumeRole's ceiling (a role's MaxSessionDuration is at most 12 h).
const MAX_SESSION_DURATION: Duration = Duration::from_secs(12 * 60 * 60);
/// A third of the default session: room for a long run of retries before expiry.
const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(20 * 60);
/// Spreads rotations so a fleet does not hit STS and Flow Service at once.
const DEFAULT_JITTER: Duration = Duration::from_secs(60);
/// Quick for a large fleet, well under Flow Service's throttling threshold.
const DEFAULT_CONCURRENCY: NonZeroUsize = match NonZeroUsize::new(8) {
    Some(n) => n,
    // Evaluated at compile time: this arm cannot be reached at run time.
    None => panic!("8 is not zero"),
};
/// Quick enough for a blip, slow enough not to hammer a struggling service.
const DEFAULT_RETRY_MIN: Duration = Duration::from_secs(1);
/// Many retries still fit in the default `refresh_before`.
const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(2 * 60);
/// The services answer in well under a second; 30 s only cuts off hangs.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A request hanging longer than this is better abandoned and retried.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Enough for a PATCH in flight; far under systemd's 90 s stop timeout.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Longest retry wait: it is also the slow cadence after a refusal, and a
/// fixed remote or IAM policy should be noticed within the hour; credentials
/// live at most 12 h, so longer waits only risk letting them run out (and a
/// huge value like "100000y" overflows time arithmetic downstream).
const MAX_RETRY_MAX: Duration = Duration::from_secs(60 * 60);
/// Longest shutdown grace: a PATCH in flight ends within `request_timeout`,
/// itself at most 5 minutes, so waiting longer cannot save anything.
const MAX_SHUTDOWN_GRACE: Duration = MAX_REQUEST_TIMEOUT;
/// STS's limit on `RoleSessionName`.
const SESSION_NAME_CHARS: std::ops::RangeInclusive<usize> = 2..=64;
/// STS's limit on `ExternalId`.
const EXTERNAL_ID_CHARS: std::ops::RangeInclusive<usize> = 2..=1224;
/// STS's limit on the plain-text inline session policy.
const MAX_SESSION_POLICY_CHARS: usize = 2048;
/// STS's limit on `PolicyArns`.
const MAX_POLICY_ARNS: usize = 10;
/// A new connection waits at most this long for its first credentials, and
/// each re-list costs one request per 100 connections per sandbox: cheap.
const DEFAULT_DISCOVER_EVERY: Duration = Duration::from_secs(5 * 60);
/// Below a second, listing would be most of the Flow Service traffic; 1 s
/// lets tests and demos see a new connection at once.
const MIN_DISCOVER_EVERY: Duration = Duration::from_secs(1);
/// Beyond a day a new connection could sit unrotated for longer than any
/// STS session lives; nobody means that.
const MAX_DISCOVER_EVERY: Duration = Duration::from_secs(24 * 60 * 60);
/// The Lock Client's and cert-manager's order of magnitude: a dead leader is
/// replaced within seconds, and a leader survives a renewal or two failing.
const DEFAULT_LEASE: Duration = Duration::from_secs(15);
/// A lease shorter than a second cannot survive one slow DynamoDB call.
const MIN_LEASE: Duration = Duration::from_secs(1);
/// Beyond this, a dead leader leaves every connection unattended too long.
const MAX_LEASE: Duration = Duration::from_secs(10 * 60);
/// Renewals faster than this only cost DynamoDB writes.
const MIN_RENEW_EVERY: Duration = Duration::from_millis(100);
/// DynamoDB's own limits on table names.
const TABLE_NAME_CHARS: std::ops::RangeInclusive<usize> = 3..=255;
/// Holder names go into every lease write and into logs.
const MAX_HOLDER_CHARS: usize = 128;

/// Marks a value as invalid; the issue saying why is already recorded.
struct Reported;

type Checked<T> = Result<T, Reported>;

/// Collects issues and warnings while turning raw structs into [`Config`].
/// Every check runs, whatever failed before it.
struct Checker<'e> {
    issues: Vec<ConfigIssue>,
    warnings: Vec<String>,
    /// Key (`adobe.client_secret`) → the environment variable that set it.
    env_names: &'e BTreeMap<String, String>,
}

impl Checker<'_> {
    fn report(&mut self, path: impl Into<String>, message: impl Into<String>) -> Reported {
        let path = path.into();
        let message = with_env_origin(self.env_names, &path, message.into());
        self.issues.push(ConfigIssue::new(path, message));
        Reported
    }

    fn wrong_type(&mut self, path: &str, expected: &str, found: &Raw) -> Reported {
        self.report(path, format!("expected {expected}, found {}", found.kind()))
    }

    fn config(&mut self, raw: RawConfig) -> Checked<Config> {
        let aws_role = present(&raw.aws.role_arn);
        let any_role = aws_role
            || raw
                .connections
                .iter()
                .flatten()
                .any(|c| present(&c.role_arn))
            || raw.discover.iter().flatten().any(|r| present(&r.role_arn));
        if !any_role && present(&raw.aws.external_id) {
            self.warnings.push(
                "aws.external_id is ignored: no role_arn anywhere, so GetSessionToken is used"
                    .to_owned(),
            );
        }
        let adobe = self.adobe(raw.adobe);
        let aws = self.aws(raw.aws);
        let rotation = self.rotation(raw.rotation);
        let has_rules = raw.discover.as_ref().is_some_and(|r| !r.is_empty());
        let connections = self.connections(raw.connections, aws_role, has_rules);
        let discover = self.discover(raw.discover, aws_role);
        let admin = self.admin(raw.admin);
        let state = self.state(raw.state);
        let coordination = self.coordination(raw.coordination);
        let coordination = match (coordination, &rotation) {
            (Ok(Some(c)), Ok(rotation)) if c.lease.saturating_mul(2) > rotation.refresh_before => {
                Err(self.report(
                    "coordination.lease",
                    format!(
                        "must be at most half of rotation.refresh_before ({}) so a standby takes over well before credentials need replacing; shorten the lease",
                        humantime::format_duration(rotation.refresh_before)
                    ),
                ))
            }
            (other, _) => other,
        };
        Ok(Config {
            adobe: adobe?,
            aws: aws?,
            rotation: rotation?,
            connections: connections?,
            discover: discover?,
            admin: admin?,
            state: state?,
            coordination: coordination?,
            warnings: Vec::new(),
        })
    }

    // -- typed leaves -------------------------------------------------------

    /// A string; `None` when absent.
    fn string(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<String>> {
        match raw {
            None | Some(Raw::Nil) => Ok(None),
            Some(Raw::Str(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(path, "a string (in quotes)", &other)),
        }
    }

    /// A string that must be present and non-empty; `what` says where to get it.
    fn required(&mut self, path: &str, raw: Option<Raw>, what: &str) -> Checked<String> {
        match self.string(path, raw)? {
            None => Err(self.report(path, format!("missing; {what}"))),
            Some(s) if s.trim().is_empty() => Err(self.report(path, format!("is empty; {what}"))),
            Some(s) => Ok(s),
        }
    }

    /// A required string that goes into an HTTP header or a URL path: no
    /// spaces or control characters.
    fn header_text(&mut self, path: &str, raw: Option<Raw>, what: &str) -> Checked<String> {
        let s = self.required(path, raw, what)?;
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.report(
                path,
                format!("must not contain spaces or control characters; {what}"),
            ));
        }
        Ok(s)
    }

    /// A non-empty string if present.
    fn optional_text(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<String>> {
        match self.string(path, raw)? {
            Some(s) if s.trim().is_empty() => {
                Err(self.report(path, "is empty; give a value or leave the key out"))
            }
            other => Ok(other),
        }
    }

    fn duration(&mut self, path: &str, raw: Option<Raw>, default: Duration) -> Checked<Duration> {
        match raw {
            None | Some(Raw::Nil) => Ok(default),
            Some(Raw::Str(s)) => humantime::parse_duration(s.trim()).map_err(|_| {
                self.report(path, format!("not a duration: {s:?} (use e.g. \"90s\", \"20m\", \"1h\")"))
            }),
            Some(Raw::Int(n)) => Err(self.report(
                path,
                format!("not a duration: {n} (a duration is a quoted string with a unit, e.g. \"{n}s\", \"20m\", \"1h\")"),
            )),
            Some(other) => Err(self.wrong_type(path, "a duration such as \"20m\"", &other)),
        }
    }

    /// A non-negative whole number; strings (from the environment) are parsed.
    fn whole(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<u64>> {
        match raw {
            None | Some(Raw::Nil) => Ok(None),
            Some(Raw::Int(n)) => u64::try_from(n)
                .map(Some)
                .map_err(|_| self.report(path, format!("must not be negative (found {n})"))),
            Some(Raw::Str(s)) => s.trim().parse::<u64>().map(Some).map_err(|_| {
                self.report(
                    path,
                    format!("expected a whole number, found the string {s:?}"),
                )
            }),
            Some(other) => Err(self.wrong_type(path, "a whole number", &other)),
        }
    }

    /// A boolean; "true"/"false" strings (from the environment) are parsed.
    fn boolean(&mut self, path: &str, raw: Option<Raw>, default: bool) -> Checked<bool> {
        match raw {
            None | Some(Raw::Nil) => Ok(default),
            Some(Raw::Bool(b)) => Ok(b),
            Some(Raw::Str(s)) if s.trim().eq_ignore_ascii_case("true") => Ok(true),
            Some(Raw::Str(s)) if s.trim().eq_ignore_ascii_case("false") => Ok(false),
            Some(Raw::Str(s)) => Err(self.report(
                path,
                format!("expected true or false, found the string {s:?}"),
            )),
            Some(other) => Err(self.wrong_type(path, "true or false", &other)),
        }
    }

    /// A list of strings; a single string (as the environment gives) is
    /// split at commas.
    fn string_list(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<Vec<String>>> {
        match raw {
            None | Some(Raw::Nil) => Ok(None),
            Some(Raw::Str(s)) => Ok(Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            )),
            Some(Raw::List(items)) => {
                let mut out = Vec::with_capacity(items.len());
                let mut bad = false;
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        Raw::Str(s) => out.push(s),
                        other => {
                            self.wrong_type(
                                &format!("{path}[{i}]"),
                                "a string (in quotes)",
                                &other,
                            );
                            bad = true;
                        }
                    }
                }
                if bad { Err(Reported) } else { Ok(Some(out)) }
            }
            Some(other) => Err(self.wrong_type(path, "a list of strings", &other)),
        }
    }

    /// A list of [`Self::url`]s (absent = empty), each checked under
    /// `path[i]`.
    fn url_list(&mut self, path: &str, raw: Option<Raw>) -> Checked<Vec<Url>> {
        let Some(items) = self.string_list(path, raw)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(items.len());
        let mut bad = false;
        for (i, item) in items.into_iter().enumerate() {
            match self.url(&format!("{path}[{i}]"), Some(Raw::Str(item))) {
                Ok(Some(url)) => out.push(url),
                Ok(None) => {}
                Err(Reported) => bad = true,
            }
        }
        if bad { Err(Reported) } else { Ok(out) }
    }

    /// An `https` URL, or `http` to a loopback host (tests, the simulator, a
    /// local proxy).
    fn url(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<Url>> {
        let Some(s) = self.string(path, raw)? else {
            return Ok(None);
        };
        let url = Url::parse(s.trim()).map_err(|error| {
            self.report(
                path,
                format!("not a URL: {s:?} ({error}); write e.g. \"https://host.example.com\""),
            )
        })?;
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&url) => {}
            "http" => {
                return Err(self.report(
                    path,
                    "plain http is only allowed to loopback hosts; use https",
                ));
            }
            other => {
                return Err(self.report(
                    path,
                    format!("the scheme {other:?} is not supported; use https"),
                ));
            }
        }
        if url.host().is_none() {
            return Err(self.report(path, "has no host; write e.g. \"https://host.example.com\""));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.report(
                path,
                "must not contain a user name or password; remove them from the URL",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(self.report(
                path,
                "must not have a query or fragment; give the base URL only",
            ));
        }
        Ok(Some(url))
    }

    /// A URL with a default; the default goes through the same checks.
    fn url_or(&mut self, path: &str, raw: Option<Raw>, default: &str) -> Checked<Url> {
        let raw = if present(&raw) {
            raw
        } else {
            Some(Raw::Str(default.to_owned()))
        };
        match self.url(path, raw)? {
            Some(url) => Ok(url),
            None => Err(self.report(path, "missing")),
        }
    }

    fn role_arn(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<RoleArn>> {
        match self.string(path, raw)? {
            None => Ok(None),
            Some(s) => RoleArn::parse(s.trim())
                .map(Some)
                .map_err(|why| self.report(path, why)),
        }
    }

    fn session_name(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<String>> {
        let Some(name) = self.string(path, raw)? else {
            return Ok(None);
        };
        let count = name.chars().count();
        if !SESSION_NAME_CHARS.contains(&count) {
            return Err(self.report(
                path,
                format!("must be 2 to 64 characters (found {count}); STS rejects anything else"),
            ));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "+=,.@_-".contains(*c)))
        {
            return Err(self.report(
                path,
                format!("contains {c:?}; a session name may only hold letters, digits and +=,.@_-"),
            ));
        }
        Ok(Some(name))
    }

    /// Not echoed in messages: some treat the external id as a shared secret.
    fn external_id(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<String>> {
        let Some(id) = self.string(path, raw)? else {
            return Ok(None);
        };
        let count = id.chars().count();
        if !EXTERNAL_ID_CHARS.contains(&count) {
            return Err(self.report(
                path,
                format!("must be 2 to 1224 characters (found {count}); STS rejects anything else"),
            ));
        }
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c))
        {
            return Err(self.report(
                path,
                "may only hold letters, digits and _+=,.@:/-; STS rejects anything else",
            ));
        }
        Ok(Some(id))
    }

    // -- sections -----------------------------------------------------------

    fn adobe(&mut self, raw: RawAdobe) -> Checked<AdobeConfig> {
        let client_id = self.header_text(
            "adobe.client_id",
            raw.client_id,
            "copy the client id of the OAuth Server-to-Server credential from the Adobe Developer Console",
        );
        let org_id = self
            .header_text(
                "adobe.org_id",
                raw.org_id,
                "copy the organization id (…@AdobeOrg) from the Adobe Developer Console",
            )
            .and_then(|org| {
                if org.ends_with("@AdobeOrg") {
                    Ok(org)
                } else {
                    Err(self.report("adobe.org_id", format!("{org:?} does not end with @AdobeOrg; copy the organization id from the Adobe Developer Console")))
                }
            });
        let client_secret_file = match &raw.client_secret_file {
            Some(Raw::Str(path)) if !path.trim().is_empty() => Some(PathBuf::from(path)),
            _ => None,
        };
        let client_secret = self.client_secret(raw.client_secret, raw.client_secret_file);
        let scopes = self.scopes(raw.scopes);
        let ims_url = self.url_or("adobe.ims_url", raw.ims_url, DEFAULT_IMS_URL);
        let platform_url =
            self.url_or("adobe.platform_url", raw.platform_url, DEFAULT_PLATFORM_URL);
        Ok(AdobeConfig {
            client_id: client_id?,
            client_secret: client_secret?,
            client_secret_file,
            org_id: org_id?,
            scopes: scopes?,
            ims_url: ims_url?,
            platform_url: platform_url?,
        })
    }

    /// Exactly one of `client_secret` (possibly from the environment) and
    /// `client_secret_file`. No message here ever holds the secret.
    fn client_secret(&mut self, inline: Option<Raw>, file: Option<Raw>) -> Checked<SecretString> {
        const INLINE: &str = "adobe.client_secret";
        const FILE: &str = "adobe.client_secret_file";
        let from_env = self.env_names.get(INLINE).cloned();
        let inline_given = present(&inline);
        let file_given = present(&file);
        let inline = self.string(INLINE, inline);
        let from_file = match self.string(FILE, file) {
            Ok(Some(path)) => self.read_secret_file(FILE, &path).map(Some),
            Ok(None) => Ok(None),
            Err(reported) => Err(reported),
        };
        if inline_given && file_given {
            let origin = match &from_env {
                Some(name) => {
                    format!(" (client_secret comes from the environment variable {name})")
                }
                None => String::new(),
            };
            return Err(self.report(
                INLINE,
                format!("both client_secret and client_secret_file are set{origin}; keep exactly one (client_secret_file is preferred)"),
            ));
        }
        if !inline_given && !file_given {
            return Err(self.report(
                INLINE,
                "no client secret; set adobe.client_secret_file (preferred), adobe.client_secret, or the environment variable AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET",
            ));
        }
        match (inline?, from_file?) {
            (Some(mut secret), None) => {
                if secret.trim().is_empty() {
                    return Err(self.report(
                        INLINE,
                        "is empty; give the client secret of the OAuth Server-to-Server credential",
                    ));
                }
                let trimmed = secret.trim().to_owned();
                secret.zeroize();
                Ok(SecretString::from(trimmed))
            }
            (None, Some(secret)) => Ok(secret),
            // Both or neither present was reported above.
            _ => Err(Reported),
        }
    }

    /// Reads the secret, trimming surrounding whitespace (the trailing
    /// newline editors and `echo` add).
    fn read_secret_file(&mut self, path: &str, file: &str) -> Checked<SecretString> {
        if file.trim().is_empty() {
            return Err(self.report(
                path,
                "is empty; give the path of a file holding the client secret",
            ));
        }
        let mut text = match crate::fsguard::read(Path::new(file), crate::fsguard::MAX_SECRET_FILE)
        {
            Ok(bytes) => {
                match String::from_utf8(bytes) {
                    Ok(text) => text,
                    Err(error) => {
                        error.into_bytes().zeroize();
                        return Err(self.report(path, format!("{file} is not UTF-8 text; put the client secret in it as plain text")));
                    }
                }
            }
            Err(error) => {
                let advice = match error.kind() {
                    std::io::ErrorKind::NotFound => {
                        "no such file; create it or point client_secret_file at the right file"
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        "permission denied; make it readable by the daemon's user (e.g. with systemd LoadCredential=)"
                    }
                    std::io::ErrorKind::InvalidInput => {
                        return Err(self.report(path, format!("cannot read {file}: {error}")));
                    }
                    _ => "check that it is a readable file",
                };
                return Err(self.report(path, format!("cannot read {file}: {advice} ({error})")));
            }
        };
        let secret = text.trim().to_owned();
        text.zeroize();
        if readable_by_others(Path::new(file)) {
            self.warnings.push(format!(
                "{path} {file} is readable by group/others; chmod 600 it (or use systemd LoadCredential=)"
            ));
        }
        if secret.is_empty() {
            return Err(self.report(
                path,
                format!("{file} is empty; put the client secret in it"),
            ));
        }
        Ok(SecretString::from(secret))
    }

    fn scopes(&mut self, raw: Option<Raw>) -> Checked<Vec<String>> {
        const PATH: &str = "adobe.scopes";
        let Some(scopes) = self.string_list(PATH, raw)? else {
            return Ok(DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect());
        };
        if scopes.is_empty() {
            return Err(self.report(PATH, "is empty; leave the key out for the default scopes, or list the credential's scopes"));
        }
        let mut bad = false;
        for (i, scope) in scopes.iter().enumerate() {
            if scope.is_empty() || scope.contains(|c: char| c == ',' || c.is_whitespace()) {
                self.report(format!("{PATH}[{i}]"), "a scope is one non-empty word without commas or spaces; list each scope separately");
                bad = true;
            }
        }
        if bad { Err(Reported) } else { Ok(scopes) }
    }

    fn aws(&mut self, raw: RawAws) -> Checked<AwsConfig> {
        let region = self
            .optional_text("aws.region", raw.region)
            .and_then(|region| match region {
                Some(r)
                    if !r
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
                {
                    Err(self.report(
                        "aws.region",
                        format!("not an AWS region name: {r:?} (write e.g. \"us-east-1\")"),
                    ))
                }
                other => Ok(other),
            });
        let sts_endpoint = self.url("aws.sts_endpoint", raw.sts_endpoint);
        let s3_endpoint = self.url("aws.s3_endpoint", raw.s3_endpoint);
        let s3_endpoints = self.url_list("aws.s3_endpoints", raw.s3_endpoints);
        let role_arn = self.role_arn("aws.role_arn", raw.role_arn);
        let external_id = self.external_id("aws.external_id", raw.external_id);
        let session_name = self.session_name("aws.session_name", raw.session_name);
        Ok(AwsConfig {
            region: region?,
            sts_endpoint: sts_endpoint?,
            s3_endpoint: s3_endpoint?,
            s3_endpoints: s3_endpoints?,
            role_arn: role_arn?,
            external_id: external_id?,
            session_name: session_name?.unwrap_or_else(|| DEFAULT_SESSION_NAME.to_owned()),
        })
    }

    fn rotation(&mut self, raw: RawRotation) -> Checked<RotationConfig> {
        const SESSION: &str = "rotation.session_duration";
        const REFRESH: &str = "rotation.refresh_before";
        const JITTER: &str = "rotation.jitter";
        let show = |d: Duration| humantime::format_duration(d).to_string();

        let session_duration = self
            .duration(SESSION, raw.session_duration, DEFAULT_SESSION_DURATION)
            .and_then(|d| {
                if !(MIN_SESSION_DURATION..=MAX_SESSION_DURATION).contains(&d) {
                    Err(self.report(
                        SESSION,
                        format!(
                            "must be within 15m..12h (found {}); STS accepts nothing else",
                            show(d)
                        ),
                    ))
                } else if d.subsec_nanos() != 0 {
                    Err(self.report(
                        SESSION,
                        format!(
                            "must be whole seconds (found {}); STS takes DurationSeconds",
                            show(d)
                        ),
                    ))
                } else {
                    Ok(d)
                }
            });
        let refresh_before = self
            .duration(REFRESH, raw.refresh_before, DEFAULT_REFRESH_BEFORE)
            .and_then(|d| {
                if d.is_zero() {
                    Err(self.report(REFRESH, "must be more than 0s: credentials would be replaced only once expired; use e.g. \"20m\""))
                } else {
                    Ok(d)
                }
            });
        let refresh_before = match (refresh_before, &session_duration) {
            (Ok(refresh), Ok(session)) if refresh >= *session => Err(self.report(
                REFRESH,
                format!("must be less than session_duration ({}), or credentials are due for rotation the moment they are pushed; lower it", show(*session)),
            )),
            (other, _) => other,
        };
        let jitter = self.duration(JITTER, raw.jitter, DEFAULT_JITTER);
        let jitter = match (jitter, &session_duration, &refresh_before) {
            (Ok(jitter), Ok(session), Ok(refresh)) if jitter >= *session - *refresh => Err(self.report(
                JITTER,
                format!(
                    "must be less than session_duration - refresh_before ({}), or a rotation could fall before the credentials are even pushed; lower it (default 1m)",
                    show(*session - *refresh)
                ),
            )),
            (other, ..) => other,
        };

        let concurrency = self.whole("rotation.concurrency", raw.concurrency).and_then(|n| match n {
            None => Ok(DEFAULT_CONCURRENCY),
            Some(n) => usize::try_from(n).ok().and_then(NonZeroUsize::new).ok_or_else(|| {
                self.report("rotation.concurrency", format!("must be at least 1 (found {n}); it is how many Flow Service requests run at once"))
            }),
        });
        let max_rps = self
            .whole(
                "rotation.max_requests_per_second",
                raw.max_requests_per_second,
            )
            .and_then(|n| match n {
                None => Ok(None),
                Some(0) => Err(self.report(
                    "rotation.max_requests_per_second",
                    "must be at least 1; leave the key out for no ceiling",
                )),
                Some(n) => u32::try_from(n)
                    .ok()
                    .and_then(NonZeroU32::new)
                    .map(Some)
                    .ok_or_else(|| {
                        self.report(
                            "rotation.max_requests_per_second",
                            format!("is too large (found {n}); leave the key out for no ceiling"),
                        )
                    }),
            });

        let retry_min = self
            .duration("rotation.retry_min", raw.retry_min, DEFAULT_RETRY_MIN)
            .and_then(|d| {
                if d.is_zero() {
                    Err(self.report(
                        "rotation.retry_min",
                        "must be more than 0s; use e.g. \"1s\"",
                    ))
                } else {
                    Ok(d)
                }
            });
        let retry_max = self
            .duration("rotation.retry_max", raw.retry_max, DEFAULT_RETRY_MAX)
            .and_then(|d| {
                if d.is_zero() {
                    Err(self.report(
                        "rotation.retry_max",
                        "must be more than 0s; use e.g. \"2m\"",
                    ))
                } else if d > MAX_RETRY_MAX {
                    Err(self.report(
                        "rotation.retry_max",
                        format!("must be at most 1h (found {}); it is also the cadence after a refusal, and credentials live at most 12h", show(d)),
                    ))
                } else {
                    Ok(d)
                }
            });
        let retry_min = match (retry_min, &retry_max) {
            (Ok(min), Ok(max)) if min > *max => Err(self.report(
                "rotation.retry_min",
                format!(
                    "must not exceed retry_max ({}); lower it or raise retry_max",
                    show(*max)
                ),
            )),
            (other, _) => other,
        };
        let verify = self.boolean("rotation.verify", raw.verify, false);
        // On by default: pushing credentials that cannot read the bucket
        // breaks every dataflow on the connection.
        let prepush_check = self.boolean("rotation.prepush_check", raw.prepush_check, true);
        let request_timeout = self
            .duration("rotation.request_timeout", raw.request_timeout, DEFAULT_REQUEST_TIMEOUT)
            .and_then(|d| {
                if d.is_zero() {
                    Err(self.report("rotation.request_timeout", "must be more than 0s; use e.g. \"30s\""))
                } else if d > MAX_REQUEST_TIMEOUT {
                    Err(self.report("rotation.request_timeout", format!("must be at most 5m (found {}); a request that hangs longer is better retried", show(d))))
                } else {
                    Ok(d)
                }
            });
        let shutdown_grace = self
            .duration(
                "rotation.shutdown_grace",
                raw.shutdown_grace,
                DEFAULT_SHUTDOWN_GRACE,
            )
            .and_then(|d| {
                if d.is_zero() {
                    Err(self.report("rotation.shutdown_grace", "must be more than 0s (0s would abandon PATCHes in flight, leaving connections in an unknown state); use e.g. \"10s\""))
                } else if d > MAX_SHUTDOWN_GRACE {
                    Err(self.report("rotation.shutdown_grace", format!("must be at most 5m (found {}); a PATCH in flight ends within request_timeout (at most 5m)", show(d))))
                } else {
                    Ok(d)
                }
            });
        Ok(RotationConfig {
            session_duration: session_duration?,
            refresh_before: refresh_before?,
            jitter: jitter?,
            concurrency: concurrency?,
            max_requests_per_second: max_rps?,
            retry_min: retry_min?,
            retry_max: retry_max?,
            verify: verify?,
            prepush_check: prepush_check?,
            request_timeout: request_timeout?,
            shutdown_grace: shutdown_grace?,
        })
    }

    fn connections(
        &mut self,
        raw: Option<Vec<RawConnection>>,
        aws_role: bool,
        has_rules: bool,
    ) -> Checked<Vec<ConnectionConfig>> {
        let raw = raw.unwrap_or_default();
        // With [[discover]] rules the connections may all be found remotely.
        if raw.is_empty() && !has_rules {
            return Err(self.report(
                "connections",
                format!("no connections configured; add a [[connections]] table with id and sandbox for each base connection, or a [[discover]] rule (see {EXAMPLE})"),
            ));
        }
        let mut first_index: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        let mut bad = false;
        for (i, connection) in raw.into_iter().enumerate() {
            match self.connection(i, connection, aws_role, &mut first_index) {
                Ok(connection) => out.push(connection),
                Err(Reported) => bad = true,
            }
        }
        // Metrics and the expiry gauge are labelled by sandbox and name: two
        // connections sharing both would merge into one series.
        let mut first_name: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, connection) in out.iter().enumerate() {
            let label = (connection.sandbox.as_str(), connection.name.as_str());
            if let Some(first) = first_name.get(&label) {
                self.issues.push(ConfigIssue::new(
                    format!("connections[{i}].name"),
                    format!(
                        "duplicate name {:?} in sandbox {:?}: {} has it already; names label metrics and logs, give each connection its own",
                        connection.name, connection.sandbox, out[*first].id
                    ),
                ));
                bad = true;
            } else {
                first_name.insert(label, i);
            }
        }
        if bad { Err(Reported) } else { Ok(out) }
    }

    fn connection(
        &mut self,
        i: usize,
        raw: RawConnection,
        aws_role: bool,
        first_index: &mut HashMap<String, usize>,
    ) -> Checked<ConnectionConfig> {
        let key = |name: &str| format!("connections[{i}].{name}");
        let has_role = aws_role || present(&raw.role_arn);

        let id = self
            .header_text(&key("id"), raw.id, "give the base connection id (from the Sources UI or GET /connections)")
            .and_then(|id| {
                if let Some(problem) = crate::ident::connection_id_problem(&id) {
                    return Err(self.report(key("id"), format!("{:?} cannot be a base connection id ({problem}); copy the id from the Sources UI", crate::http::bounded(&id, 80))));
                }
                if let Some(first) = first_index.get(&id) {
                    return Err(self.report(key("id"), format!("duplicate id {id:?}: connections[{first}] has it already; list each base connection once")));
                }
                first_index.insert(id.clone(), i);
                Ok(id)
            });
        let sandbox = self
            .header_text(
                &key("sandbox"),
                raw.sandbox,
                "give the sandbox the connection lives in, e.g. \"prod\"",
            )
            .and_then(|sandbox| {
                if sandbox.chars().any(char::is_uppercase) {
                    Err(self.report(
                        key("sandbox"),
                        format!(
                            "sandbox names are lower-case in AEP; write {:?}",
                            sandbox.to_lowercase()
                        ),
                    ))
                } else {
                    Ok(sandbox)
                }
            });
        let name = self.optional_text(&key("name"), raw.name);
        let role_arn = self.role_arn(&key("role_arn"), raw.role_arn);
        let external_given = present(&raw.external_id);
        let session_name_given = present(&raw.session_name);
        let external_id = self.external_id(&key("external_id"), raw.external_id);
        let session_name = self.session_name(&key("session_name"), raw.session_name);
        let policy_given = present(&raw.session_policy);
        let arns_given = present(&raw.policy_arns);
        let session_policy = self.session_policy(&key("session_policy"), raw.session_policy);
        let policy_arns = self.policy_arns(&key("policy_arns"), raw.policy_arns);

        if !has_role && (policy_given || arns_given) {
            let which = if policy_given {
                "session_policy"
            } else {
                "policy_arns"
            };
            self.report(
                key(which),
                "needs a role: with no role_arn here or in [aws], GetSessionToken is used, and it takes no policy; set role_arn or remove the policy",
            );
        }
        if !has_role && (external_given || session_name_given) {
            self.warnings.push(format!(
                "{} and session_name are ignored: with no role_arn here or in [aws], GetSessionToken is used",
                key("external_id")
            ));
        }
        let id = id?;
        Ok(ConnectionConfig {
            name: name?.unwrap_or_else(|| id.clone()),
            id,
            sandbox: sandbox?,
            role_arn: role_arn?,
            external_id: external_id?,
            session_name: session_name?,
            session_policy: session_policy?,
            policy_arns: policy_arns?,
            origin: Origin::Explicit,
        })
    }

    fn discover(
        &mut self,
        raw: Option<Vec<RawDiscover>>,
        aws_role: bool,
    ) -> Checked<Vec<DiscoverRule>> {
        let mut out = Vec::new();
        let mut bad = false;
        for (i, rule) in raw.unwrap_or_default().into_iter().enumerate() {
            match self.discover_rule(i, rule, aws_role) {
                Ok(rule) => out.push(rule),
                Err(Reported) => bad = true,
            }
        }
        if bad { Err(Reported) } else { Ok(out) }
    }

    fn discover_sandboxes(&mut self, path: &str, raw: Option<Raw>) -> Checked<Vec<String>> {
        let list = self.string_list(path, raw)?.unwrap_or_default();
        if list.is_empty() {
            return Err(self.report(
                path,
                "missing or empty; list the sandboxes to search, e.g. sandboxes = [\"prod\"]",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let mut bad = false;
        for (n, sandbox) in list.iter().enumerate() {
            let at = format!("{path}[{n}]");
            if sandbox.trim().is_empty()
                || sandbox.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                self.report(at, "must be a sandbox name without spaces, e.g. \"prod\"");
                bad = true;
            } else if sandbox.chars().any(char::is_uppercase) {
                self.report(
                    at,
                    format!(
                        "sandbox names are lower-case in AEP; write {:?}",
                        sandbox.to_lowercase()
                    ),
                );
                bad = true;
            } else if !seen.insert(sandbox.clone()) {
                self.report(
                    at,
                    format!("{sandbox:?} is listed twice; list each sandbox once"),
                );
                bad = true;
            }
        }
        if bad { Err(Reported) } else { Ok(list) }
    }

    fn discover_rule(
        &mut self,
        i: usize,
        raw: RawDiscover,
        aws_role: bool,
    ) -> Checked<DiscoverRule> {
        let key = |name: &str| format!("discover[{i}].{name}");
        let has_role = aws_role || present(&raw.role_arn);
        let sandboxes = self.discover_sandboxes(&key("sandboxes"), raw.sandboxes);
        let has_condition = present(&raw.name) || present(&raw.description_tag);
        let name = match self.optional_text(&key("name"), raw.name) {
            Ok(Some(pattern)) => NameGlob::new(&pattern).map(Some).map_err(|why| {
                self.report(
                    key("name"),
                    format!("not a valid glob: {pattern:?} ({why}); use e.g. \"ingest-*\""),
                )
            }),
            Ok(None) => Ok(None),
            Err(reported) => Err(reported),
        };
        let description_tag = self.optional_text(&key("description_tag"), raw.description_tag);
        if !has_condition {
            self.report(
                format!("discover[{i}]"),
                "has no condition besides the sandboxes, so it would rotate every S3 connection there; add name = \"glob\" and/or description_tag = \"text\"",
            );
        }
        let role_arn = self.role_arn(&key("role_arn"), raw.role_arn);
        let external_id = self.external_id(&key("external_id"), raw.external_id);
        let session_name = self.session_name(&key("session_name"), raw.session_name);
        let policy_given = present(&raw.session_policy);
        let arns_given = present(&raw.policy_arns);
        let session_policy = self.session_policy(&key("session_policy"), raw.session_policy);
        let policy_arns = self.policy_arns(&key("policy_arns"), raw.policy_arns);
        if !has_role && (policy_given || arns_given) {
            let which = if policy_given {
                "session_policy"
            } else {
                "policy_arns"
            };
            self.report(
                key(which),
                "needs a role: with no role_arn here or in [aws], GetSessionToken is used, and it takes no policy; set role_arn or remove the policy",
            );
        }
        let every = match self.duration(&key("every"), raw.every, DEFAULT_DISCOVER_EVERY) {
            Ok(every) if (MIN_DISCOVER_EVERY..=MAX_DISCOVER_EVERY).contains(&every) => Ok(every),
            Ok(every) => Err(self.report(
                key("every"),
                format!(
                    "{} is out of range; use 1s..24h (e.g. \"5m\")",
                    humantime::format_duration(every)
                ),
            )),
            Err(reported) => Err(reported),
        };
        if !has_condition {
            return Err(Reported);
        }
        Ok(DiscoverRule {
            index: i,
            sandboxes: sandboxes?,
            name: name?,
            description_tag: description_tag?,
            role_arn: role_arn?,
            external_id: external_id?,
            session_name: session_name?,
            session_policy: session_policy?,
            policy_arns: policy_arns?,
            every: every?,
        })
    }

    fn session_policy(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<String>> {
        let Some(policy) = self.string(path, raw)? else {
            return Ok(None);
        };
        let count = policy.chars().count();
        if count > MAX_SESSION_POLICY_CHARS {
            return Err(self.report(
                path,
                format!(
                    "is {count} characters; STS takes at most 2048, so narrow it or use policy_arns"
                ),
            ));
        }
        match serde_json::from_str::<serde_json::Value>(&policy) {
            Ok(serde_json::Value::Object(_)) => Ok(Some(policy)),
            Ok(_) => Err(self.report(path, "must be a JSON object ({\"Version\":\"2012-10-17\",\"Statement\":[...]})")),
            Err(error) => Err(self.report(path, format!("not valid JSON ({error}); write the IAM policy document as JSON in single quotes"))),
        }
    }

    fn policy_arns(&mut self, path: &str, raw: Option<Raw>) -> Checked<Vec<String>> {
        let Some(arns) = self.string_list(path, raw)? else {
            return Ok(Vec::new());
        };
        if arns.len() > MAX_POLICY_ARNS {
            return Err(self.report(
                path,
                format!("lists {} policies; STS takes at most 10", arns.len()),
            ));
        }
        let mut bad = false;
        for (i, arn) in arns.iter().enumerate() {
            if let Some(why) = iam_arn_problem(arn, "policy", MAX_POLICY_NAME_CHARS, true) {
                self.report(
                    format!("{path}[{i}]"),
                    format!("not an IAM policy ARN: {arn:?} ({why}; expected e.g. arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess)"),
                );
                bad = true;
            }
        }
        if bad { Err(Reported) } else { Ok(arns) }
    }

    fn admin(&mut self, raw: RawAdmin) -> Checked<AdminConfig> {
        const PATH: &str = "admin.listen";
        let listen = match self.string(PATH, raw.listen)? {
            None => None,
            Some(s) => Some(s.trim().parse::<SocketAddr>().map_err(|_| {
                self.report(PATH, format!("not a socket address: {s:?} (use e.g. \"127.0.0.1:9464\"; host names are not accepted)"))
            })?),
        };
        Ok(AdminConfig { listen })
    }

    fn coordination(&mut self, raw: RawCoordination) -> Checked<Option<CoordinationConfig>> {
        let others = [
            &raw.table,
            &raw.lease,
            &raw.renew_every,
            &raw.holder,
            &raw.endpoint,
        ]
        .into_iter()
        .any(present);
        match self.optional_text("coordination.backend", raw.backend)? {
            None if others => {
                return Err(self.report(
                    "coordination.backend",
                    "missing; set backend = \"dynamodb\" to run replicas with one writer, or remove the [coordination] table",
                ));
            }
            None => return Ok(None),
            Some(backend) if backend.trim() == "dynamodb" => {}
            Some(backend) => {
                return Err(self.report(
                    "coordination.backend",
                    format!("unknown backend {backend:?}; the only one is \"dynamodb\""),
                ));
            }
        }
        let table = self.required(
            "coordination.table",
            raw.table,
            "name the DynamoDB table (create it with `aep-s3-rotator coordination init`)",
        );
        let table = table.and_then(|t| {
            let t = t.trim().to_owned();
            let ok = TABLE_NAME_CHARS.contains(&t.chars().count())
                && t.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if ok {
                Ok(t)
            } else {
                Err(self.report(
                    "coordination.table",
                    format!("not a DynamoDB table name: {t:?} (3 to 255 characters of A-Z, a-z, 0-9, _ . -)"),
                ))
            }
        });
        let lease = self
            .duration("coordination.lease", raw.lease, DEFAULT_LEASE)
            .and_then(|lease| {
                if (MIN_LEASE..=MAX_LEASE).contains(&lease) {
                    Ok(lease)
                } else {
                    Err(self.report(
                        "coordination.lease",
                        format!(
                            "{} is out of range; use 1s to 10m (default 15s)",
                            humantime::format_duration(lease)
                        ),
                    ))
                }
            });
        let renew_every = match &lease {
            Ok(lease) => {
                let default = *lease / 3;
                self.duration("coordination.renew_every", raw.renew_every, default)
                    .and_then(|every| {
                        if every >= MIN_RENEW_EVERY && every.saturating_mul(2) < *lease {
                            Ok(every)
                        } else {
                            Err(self.report(
                                "coordination.renew_every",
                                format!(
                                    "{} must be at least 100ms and less than half of coordination.lease ({}), so one failed renewal does not lose the lease",
                                    humantime::format_duration(every),
                                    humantime::format_duration(*lease)
                                ),
                            ))
                        }
                    })
            }
            Err(Reported) => Err(Reported),
        };
        let holder = self
            .optional_text("coordination.holder", raw.holder)
            .and_then(|holder| match holder {
                Some(h)
                    if h.chars().count() > MAX_HOLDER_CHARS
                        || h.chars().any(|c| c.is_control() || c.is_whitespace()) =>
                {
                    Err(self.report(
                        "coordination.holder",
                        "must be at most 128 characters without spaces or control characters; it must be unique per replica (default: hostname, pid and a random suffix)",
                    ))
                }
                other => Ok(other),
            });
        let endpoint = self.url("coordination.endpoint", raw.endpoint);
        Ok(Some(CoordinationConfig {
            table: table?,
            lease: lease?,
            renew_every: renew_every?,
            holder: holder?,
            endpoint: endpoint?,
        }))
    }

    fn state(&mut self, raw: RawState) -> Checked<StateConfig> {
        let path = self.optional_text("state.path", raw.path)?;
        Ok(StateConfig {
            path: path.map(PathBuf::from),
        })
    }
}

/// `localhost`, 127.0.0.0/8 or `::1` (also as an IPv4-mapped address).
pub(crate) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(domain)) => {
            domain.eq_ignore_ascii_case("localhost") || domain.eq_ignore_ascii_case("localhost.")
        }
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const FILE_SECRET: &str = "file-secret-value";
    const INLINE_SECRET: &str = "inline-secret-value";

    const GOOD: &str = r#"[adobe]
client_id = "cid"
client_secret_file = "SECRET_FILE"
org_id = "0123456789ABCDEF01234567@AdobeOrg"

[aws]
role_arn = "arn:aws:iam::123456789012:role/aep"

[rotation]
session_duration = "1h"
refresh_before = "20m"

[[connections]]
id = "c-1"
sandbox = "prod"

[[connections]]
id = "c-2"
sandbox = "dev"
"#;

    /// A temp dir with a secret file, an empty file, and the good config
    /// pointing at the secret.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("secret"), format!("  {FILE_SECRET}\n")).unwrap();
            std::fs::write(dir.path().join("empty"), "\n").unwrap();
            // As an operator should keep it; the mode warning has its own test.
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(
                    dir.path().join("secret"),
                    std::fs::Permissions::from_mode(0o600),
                )
                .unwrap();
            }
            Self { dir }
        }
        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }
        fn good(&self) -> String {
            GOOD.replace("SECRET_FILE", &self.path("secret"))
        }
    }

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn replace(text: &str, from: &str, to: &str) -> String {
        assert!(text.contains(from), "case edit does not apply: {from:?}");
        text.replacen(from, to, 1)
    }

    fn issues(text: &str, env: Vec<(String, String)>) -> Vec<ConfigIssue> {
        match Config::from_toml_str(text, env) {
            Ok(_) => panic!("expected the config to be rejected:\n{text}"),
            Err(error) => {
                let shown = error.to_string();
                assert!(
                    !shown.contains(FILE_SECRET) && !shown.contains(INLINE_SECRET),
                    "a secret was printed: {shown}"
                );
                error.issues
            }
        }
    }

    #[test]
    fn the_good_config_loads() {
        let fx = Fixture::new();
        let config = Config::from_toml_str(&fx.good(), no_env()).unwrap();
        assert_eq!(config.adobe.client_secret.expose_secret(), FILE_SECRET);
        assert_eq!(config.connections.len(), 2);
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    }

    #[test]
    fn every_bad_input_names_its_key() {
        let fx = Fixture::new();
        let good = fx.good();
        let g = good.as_str();
        let no_role = replace(g, "role_arn = \"arn:aws:iam::123456789012:role/aep\"\n", "");
        let many_arns = format!(
            "[{}]",
            ["\"arn:aws:iam::aws:policy/ReadOnlyAccess\""; 11].join(", ")
        );
        let long_policy = format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:GetObject","Resource":"{}"}}]}}"#,
            "x".repeat(2100)
        );
        // (name, config text, key path that must be named, a word of the message)
        // One case per line, so the table reads as a table.
        #[rustfmt::skip]
        let cases: Vec<(&str, String, &str, &str)> = vec![
            ("missing client_id", replace(g, "client_id = \"cid\"\n", ""), "adobe.client_id", "missing"),
            ("empty client_id", replace(g, "client_id = \"cid\"", "client_id = \"\""), "adobe.client_id", "empty"),
            ("missing org_id", replace(g, "org_id = \"0123456789ABCDEF01234567@AdobeOrg\"\n", ""), "adobe.org_id", "missing"),
            ("org_id without @AdobeOrg", replace(g, "01234567@AdobeOrg", "01234567"), "adobe.org_id", "@AdobeOrg"),
            ("unknown top-level key", format!("{g}\n[bogus]\nx = 1\n"), "bogus", "unknown key"),
            ("unknown top-level scalar", format!("verbose = true\n{g}"), "verbose", "unknown key"),
            ("unknown key in a section", replace(g, "[aws]\n", "[aws]\nrole = \"x\"\n"), "aws.role", "unknown key"),
            ("unknown key in a connection", replace(g, "sandbox = \"dev\"", "sandbox = \"dev\"\nsandbx = \"dev\""), "connections[1].sandbx", "spelling"),
            ("bad duration", replace(g, "session_duration = \"1h\"", "session_duration = \"an hour\""), "rotation.session_duration", "not a duration"),
            ("duration without quotes", replace(g, "refresh_before = \"20m\"", "refresh_before = 1200"), "rotation.refresh_before", "not a duration"),
            ("duration too short", replace(g, "session_duration = \"1h\"", "session_duration = \"5m\""), "rotation.session_duration", "15m..12h"),
            ("duration too long", replace(g, "session_duration = \"1h\"", "session_duration = \"13h\""), "rotation.session_duration", "15m..12h"),
            ("duration not whole seconds", replace(g, "session_duration = \"1h\"", "session_duration = \"1h 500ms\""), "rotation.session_duration", "whole seconds"),
            ("refresh_before >= session_duration", replace(g, "refresh_before = \"20m\"", "refresh_before = \"1h\""), "rotation.refresh_before", "less than session_duration"),
            ("refresh_before zero", replace(g, "refresh_before = \"20m\"", "refresh_before = \"0s\""), "rotation.refresh_before", "more than 0s"),
            ("jitter too large", replace(g, "[rotation]\n", "[rotation]\njitter = \"40m\"\n"), "rotation.jitter", "session_duration - refresh_before"),
            ("retry_min above retry_max", replace(g, "[rotation]\n", "[rotation]\nretry_min = \"5m\"\n"), "rotation.retry_min", "retry_max"),
            ("retry_max too long", replace(g, "[rotation]\n", "[rotation]\nretry_max = \"100000y\"\n"), "rotation.retry_max", "at most 1h"),
            ("shutdown_grace zero", replace(g, "[rotation]\n", "[rotation]\nshutdown_grace = \"0s\"\n"), "rotation.shutdown_grace", "more than 0s"),
            ("shutdown_grace too long", replace(g, "[rotation]\n", "[rotation]\nshutdown_grace = \"1h\"\n"), "rotation.shutdown_grace", "at most 5m"),
            ("duplicate name in a sandbox", replace(&replace(g, "sandbox = \"dev\"", "sandbox = \"prod\"\nname = \"orders\""), "sandbox = \"prod\"\n\n", "sandbox = \"prod\"\nname = \"orders\"\n\n"), "connections[1].name", "duplicate name \"orders\" in sandbox \"prod\""),
            ("secret file is /dev/zero", replace(g, &fx.path("secret"), "/dev/zero"), "adobe.client_secret_file", "character device"),
            ("request_timeout too long", replace(g, "[rotation]\n", "[rotation]\nrequest_timeout = \"10m\"\n"), "rotation.request_timeout", "at most 5m"),
            ("concurrency 0", replace(g, "[rotation]\n", "[rotation]\nconcurrency = 0\n"), "rotation.concurrency", "at least 1"),
            ("concurrency negative", replace(g, "[rotation]\n", "[rotation]\nconcurrency = -2\n"), "rotation.concurrency", "negative"),
            ("type error", replace(g, "[rotation]\n", "[rotation]\nconcurrency = \"eight\"\n"), "rotation.concurrency", "whole number"),
            ("type error on a string key", replace(g, "client_id = \"cid\"", "client_id = 5"), "adobe.client_id", "a string"),
            ("max_requests_per_second 0", replace(g, "[rotation]\n", "[rotation]\nmax_requests_per_second = 0\n"), "rotation.max_requests_per_second", "at least 1"),
            ("verify not a boolean", replace(g, "[rotation]\n", "[rotation]\nverify = \"maybe\"\n"), "rotation.verify", "true or false"),
            ("prepush_check not a boolean", replace(g, "[rotation]\n", "[rotation]\nprepush_check = \"yes\"\n"), "rotation.prepush_check", "true or false"),
            ("plain http to a remote S3", replace(g, "[aws]\n", "[aws]\ns3_endpoint = \"http://s3.example.com\"\n"), "aws.s3_endpoint", "loopback"),
            ("plain http to a remote S3 in s3_endpoints", replace(g, "[aws]\n", "[aws]\ns3_endpoints = [\"https://minio.example.com\", \"http://s3.example.com\"]\n"), "aws.s3_endpoints[1]", "loopback"),
            ("bad role ARN", replace(g, "arn:aws:iam::123456789012:role/aep", "arn:aws:s3:::bucket"), "aws.role_arn", "not an IAM role ARN"),
            ("role ARN with a short account", replace(g, "arn:aws:iam::123456789012:role/aep", "arn:aws:iam::1234:role/aep"), "aws.role_arn", "12 digits"),
            ("bad connection role ARN", replace(g, "sandbox = \"prod\"", "sandbox = \"prod\"\nrole_arn = \"aep-role\""), "connections[0].role_arn", "not an IAM role ARN"),
            ("duplicate connection id", replace(g, "id = \"c-2\"", "id = \"c-1\""), "connections[1].id", "connections[0]"),
            ("empty connection id", replace(g, "id = \"c-1\"", "id = \"\""), "connections[0].id", "empty"),
            ("missing connection id", replace(g, "id = \"c-1\"\n", ""), "connections[0].id", "missing"),
            ("connection id with a slash", replace(g, "id = \"c-1\"", "id = \"c/1\""), "connections[0].id", "URL"),
            ("connection id dot-dot", replace(g, "id = \"c-1\"", "id = \"..\""), "connections[0].id", "relative path segment"),
            ("connection id dot", replace(g, "id = \"c-1\"", "id = \".\""), "connections[0].id", "relative path segment"),
            ("overlong connection id", replace(g, "id = \"c-1\"", &format!("id = \"{}\"", "x".repeat(3000))), "connections[0].id", "longer than 128"),
            ("empty sandbox", replace(g, "sandbox = \"dev\"", "sandbox = \"\""), "connections[1].sandbox", "empty"),
            ("upper-case sandbox", replace(g, "sandbox = \"dev\"", "sandbox = \"Dev\""), "connections[1].sandbox", "lower-case"),
            ("bad URL", replace(g, "[adobe]\n", "[adobe]\nims_url = \"not a url\"\n"), "adobe.ims_url", "not a URL"),
            ("plain http to a remote host", replace(g, "[adobe]\n", "[adobe]\nplatform_url = \"http://platform.adobe.io\"\n"), "adobe.platform_url", "loopback"),
            ("plain http to a remote STS", replace(g, "[aws]\n", "[aws]\nsts_endpoint = \"http://10.0.0.1:4566\"\n"), "aws.sts_endpoint", "loopback"),
            ("unsupported scheme", replace(g, "[aws]\n", "[aws]\nsts_endpoint = \"ftp://127.0.0.1\"\n"), "aws.sts_endpoint", "use https"),
            ("URL with credentials", replace(g, "[adobe]\n", "[adobe]\nims_url = \"https://u:p@ims.example.com\"\n"), "adobe.ims_url", "password"),
            ("unreadable secret file", replace(g, &fx.path("secret"), "/nonexistent/secret"), "adobe.client_secret_file", "/nonexistent/secret"),
            ("secret file is a directory", replace(g, &fx.path("secret"), &fx.path("")), "adobe.client_secret_file", "cannot read"),
            ("empty secret file", replace(g, &fx.path("secret"), &fx.path("empty")), "adobe.client_secret_file", "empty"),
            ("both secret sources", replace(g, "[adobe]\n", &format!("[adobe]\nclient_secret = \"{INLINE_SECRET}\"\n")), "adobe.client_secret", "both"),
            ("no secret source", replace(g, &format!("client_secret_file = \"{}\"\n", fx.path("secret")), ""), "adobe.client_secret", "no client secret"),
            ("empty inline secret", replace(g, &format!("client_secret_file = \"{}\"", fx.path("secret")), "client_secret = \" \""), "adobe.client_secret", "empty"),
            ("secret of the wrong type", replace(g, &format!("client_secret_file = \"{}\"", fx.path("secret")), "client_secret = [\"x\"]"), "adobe.client_secret", "a string"),
            ("session_policy not JSON", replace(g, "sandbox = \"prod\"", "sandbox = \"prod\"\nsession_policy = \"{not json\""), "connections[0].session_policy", "JSON"),
            ("session_policy not an object", replace(g, "sandbox = \"prod\"", "sandbox = \"prod\"\nsession_policy = \"[1]\""), "connections[0].session_policy", "JSON object"),
            ("session_policy too long", replace(g, "sandbox = \"prod\"", &format!("sandbox = \"prod\"\nsession_policy = '{long_policy}'")), "connections[0].session_policy", "2048"),
            ("bad policy ARN", replace(g, "sandbox = \"prod\"", "sandbox = \"prod\"\npolicy_arns = [\"arn:aws:iam::aws:role/x\"]"), "connections[0].policy_arns[0]", "not an IAM policy ARN"),
            ("too many policy ARNs", replace(g, "sandbox = \"prod\"", &format!("sandbox = \"prod\"\npolicy_arns = {many_arns}")), "connections[0].policy_arns", "at most 10"),
            ("policy without a role", replace(&no_role, "sandbox = \"dev\"", "sandbox = \"dev\"\nsession_policy = '{\"Version\":\"2012-10-17\",\"Statement\":[]}'"), "connections[1].session_policy", "GetSessionToken"),
            ("policy ARNs without a role", replace(&no_role, "sandbox = \"dev\"", "sandbox = \"dev\"\npolicy_arns = [\"arn:aws:iam::aws:policy/ReadOnlyAccess\"]"), "connections[1].policy_arns", "needs a role"),
            ("bad session name", replace(g, "[aws]\n", "[aws]\nsession_name = \"has space\"\n"), "aws.session_name", "letters, digits"),
            ("session name too short", replace(g, "sandbox = \"prod\"", "sandbox = \"prod\"\nsession_name = \"x\""), "connections[0].session_name", "2 to 64"),
            ("external id too short", replace(g, "sandbox = \"prod\"", "sandbox = \"prod\"\nexternal_id = \"x\""), "connections[0].external_id", "2 to 1224"),
            ("empty region", replace(g, "[aws]\n", "[aws]\nregion = \"\"\n"), "aws.region", "empty"),
            ("bad admin.listen", format!("{g}\n[admin]\nlisten = \"localhost\"\n"), "admin.listen", "socket address"),
            ("empty state.path", format!("{g}\n[state]\npath = \"\"\n"), "state.path", "empty"),
            ("empty scopes", replace(g, "[adobe]\n", "[adobe]\nscopes = []\n"), "adobe.scopes", "empty"),
            ("scope of the wrong type", replace(g, "[adobe]\n", "[adobe]\nscopes = [\"openid\", 3]\n"), "adobe.scopes[1]", "a string"),
            ("not TOML", "this is [not toml".to_owned(), "config", "not valid TOML"),
            ("no connections", g.split("[[connections]]").next().unwrap().to_owned(), "connections", "no connections"),
            ("connections as a single table", format!("{}\n[connections]\nid = \"c-1\"\nsandbox = \"prod\"\n", g.split("[[connections]]").next().unwrap()), "connections", "[[connections]]"),
            ("a coordination key without a backend", format!("{g}\n[coordination]\ntable = \"t-1\"\n"), "coordination.backend", "dynamodb"),
            ("an unknown backend", format!("{g}\n[coordination]\nbackend = \"etcd\"\ntable = \"t-1\"\n"), "coordination.backend", "unknown backend"),
            ("no table", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\n"), "coordination.table", "coordination init"),
            ("a bad table name", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"a b\"\n"), "coordination.table", "not a DynamoDB table name"),
            ("a lease out of range", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nlease = \"500ms\"\n"), "coordination.lease", "1s to 10m"),
            ("a lease over 10m", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nlease = \"10m 1s\"\n"), "coordination.lease", "out of range"),
            ("a lease longer than refresh_before / 2", replace(&format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nlease = \"6m\"\n"), "refresh_before = \"20m\"", "refresh_before = \"10m\""), "coordination.lease", "half of rotation.refresh_before"),
            ("renew_every not under lease / 2", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nlease = \"10s\"\nrenew_every = \"5s\"\n"), "coordination.renew_every", "less than half"),
            ("a holder with a space", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nholder = \"a b\"\n"), "coordination.holder", "unique per replica"),
            ("a plain-http endpoint off loopback", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nendpoint = \"http://dynamodb.example.com\"\n"), "coordination.endpoint", "loopback"),
            ("a section that is not a table", format!("admin = \"{INLINE_SECRET}\"\n{g}"), "admin", "expected an [admin] table"),
        ];
        assert!(cases.len() >= 20, "the table lost cases");
        let mut ran = 0;
        for (name, text, key, word) in &cases {
            let found = issues(text, no_env());
            let issue = found
                .iter()
                .find(|i| i.path == *key)
                .unwrap_or_else(|| panic!("{name}: no issue for {key}; found {found:?}"));
            assert!(
                issue.message.contains(word),
                "{name}: the message for {key} lacks {word:?}: {:?}",
                issue.message
            );
            ran += 1;
        }
        assert_eq!(ran, cases.len());
        assert_eq!(ran, 85, "update this count when adding cases");
    }

    #[test]
    fn coordination_is_off_without_its_table_and_has_defaults_with_it() {
        let fx = Fixture::new();
        let g = fx.good();
        let off = Config::from_toml_str(&g, no_env()).unwrap();
        assert_eq!(off.coordination, None);
        let on = Config::from_toml_str(
            &format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\n"),
            no_env(),
        )
        .unwrap();
        let c = on.coordination.unwrap();
        assert_eq!(c.table, "aep-s3-rotator");
        assert_eq!(c.lease, Duration::from_secs(15));
        assert_eq!(c.renew_every, Duration::from_secs(5), "lease / 3");
        assert_eq!((c.holder, c.endpoint), (None, None));
    }

    #[test]
    fn every_problem_is_reported_together() {
        let fx = Fixture::new();
        let text = fx
            .good()
            .replace("session_duration = \"1h\"", "session_duration = \"5m\"")
            .replace("arn:aws:iam::123456789012:role/aep", "not-an-arn")
            .replace("sandbox = \"dev\"", "sandbox = \"\"\nbogus = 1")
            .replace(
                "[rotation]\n",
                "[rotation]\nconcurrency = 0\nverify = \"maybe\"\n",
            )
            .replace("client_id = \"cid\"\n", "");
        let found = issues(&text, no_env());
        let mut paths: Vec<&str> = found.iter().map(|i| i.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "adobe.client_id",
                "aws.role_arn",
                "connections[1].bogus",
                "connections[1].sandbox",
                "rotation.concurrency",
                "rotation.session_duration",
                "rotation.verify",
            ],
            "{found:?}"
        );
    }

    #[test]
    fn the_error_displays_one_line_per_issue() {
        let fx = Fixture::new();
        let text = fx
            .good()
            .replace("sandbox = \"prod\"", "sandbox = \"\"")
            .replace("client_id = \"cid\"\n", "");
        let error = Config::from_toml_str(&text, no_env()).unwrap_err();
        let shown = error.to_string();
        assert_eq!(shown.lines().count(), 2, "{shown}");
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with("adobe.client_id: missing")),
            "{shown}"
        );
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with("connections[0].sandbox: is empty")),
            "{shown}"
        );
    }

    #[test]
    fn a_toml_syntax_error_gives_the_position_but_not_the_line() {
        let text = format!("[adobe]\nclient_secret = \"{INLINE_SECRET}\nclient_id = \"x\"\n");
        let found = issues(&text, no_env());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, "config");
        assert!(
            found[0].message.contains("line 2"),
            "{:?}",
            found[0].message
        );
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let fx = Fixture::new();
        let text = fx.good().replace(
            &format!("client_secret_file = \"{}\"\n", fx.path("secret")),
            "",
        );
        let config = Config::from_toml_str(
            &text,
            env(&[
                ("AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET", INLINE_SECRET),
                ("AEP_S3_ROTATOR__ROTATION__CONCURRENCY", "3"),
                ("AEP_S3_ROTATOR__ROTATION__VERIFY", "true"),
                ("AEP_S3_ROTATOR__ROTATION__SESSION_DURATION", "2h"),
                ("AEP_S3_ROTATOR__ADOBE__SCOPES", "openid,AdobeID"),
                // Not ours: ignored.
                ("AEP_S3_ROTATOR_CONFIG", "/elsewhere.toml"),
                ("AEP_S3_ROTATOR_LOG_FORMAT", "yaml"),
                ("OTHER__ROTATION__CONCURRENCY", "5"),
                // Empty counts as unset.
                ("AEP_S3_ROTATOR__ROTATION__JITTER", ""),
            ]),
        )
        .unwrap();
        assert_eq!(config.adobe.client_secret.expose_secret(), INLINE_SECRET);
        assert_eq!(config.rotation.concurrency.get(), 3);
        assert!(config.rotation.verify);
        assert_eq!(config.rotation.session_duration, Duration::from_secs(7200));
        assert_eq!(config.rotation.jitter, DEFAULT_JITTER);
        assert_eq!(config.adobe.scopes, ["openid", "AdobeID"]);
    }

    #[test]
    fn a_secret_of_digits_stays_a_string() {
        let fx = Fixture::new();
        let text = fx.good().replace(
            &format!("client_secret_file = \"{}\"\n", fx.path("secret")),
            "",
        );
        for secret in ["0012345", "1e5", "true", "12345678901234567890123"] {
            let config = Config::from_toml_str(
                &text,
                env(&[("AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET", secret)]),
            )
            .unwrap();
            assert_eq!(config.adobe.client_secret.expose_secret(), secret);
        }
        let inline = fx.good().replace(
            &format!("client_secret_file = \"{}\"", fx.path("secret")),
            "client_secret = \"007\"",
        );
        let config = Config::from_toml_str(&inline, no_env()).unwrap();
        assert_eq!(config.adobe.client_secret.expose_secret(), "007");
    }

    #[test]
    fn an_unknown_environment_key_is_an_issue() {
        let fx = Fixture::new();
        let found = issues(&fx.good(), env(&[("AEP_S3_ROTATOR__ROTATION__BOGUS", "1")]));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, "rotation.bogus");
        assert!(
            found[0].message.contains("AEP_S3_ROTATOR__ROTATION__BOGUS"),
            "{:?}",
            found[0]
        );
    }

    #[test]
    fn odd_environment_names_are_reported_not_fatal() {
        let fx = Fixture::new();
        for (name, key) in [
            ("AEP_S3_ROTATOR__ADOBE", "adobe"),
            ("AEP_S3_ROTATOR__CONNECTIONS", "connections"),
            ("AEP_S3_ROTATOR__CONNECTIONS__0__ID", "connections"),
            ("AEP_S3_ROTATOR__NEW_SECTION__KEY", "new_section"),
            ("AEP_S3_ROTATOR__ADOBE__CLIENT_ID__X", "adobe.client_id"),
        ] {
            let found = issues(&fx.good(), env(&[(name, INLINE_SECRET)]));
            assert!(
                found
                    .iter()
                    .any(|i| i.path == key && i.message.contains(name)),
                "{name}: {found:?}"
            );
        }
        // Odd names end in an issue or a valid config, never a panic.
        for name in ["AEP_S3_ROTATOR____X", "AEP_S3_ROTATOR__"] {
            let _ = Config::from_toml_str(&fx.good(), env(&[(name, "x")]));
        }
    }

    #[test]
    fn an_environment_secret_next_to_a_secret_file_is_both() {
        let fx = Fixture::new();
        let found = issues(
            &fx.good(),
            env(&[("AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET", INLINE_SECRET)]),
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, "adobe.client_secret");
        assert!(
            found[0]
                .message
                .contains("AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET"),
            "{:?}",
            found[0]
        );
    }

    #[test]
    fn a_bad_environment_value_names_the_key() {
        let fx = Fixture::new();
        let found = issues(
            &fx.good(),
            env(&[("AEP_S3_ROTATOR__ROTATION__CONCURRENCY", "eight")]),
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, "rotation.concurrency");
        assert!(
            found[0]
                .message
                .contains("AEP_S3_ROTATOR__ROTATION__CONCURRENCY"),
            "{found:?}"
        );
    }

    #[test]
    fn defaults_are_applied() {
        let fx = Fixture::new();
        let minimal = format!(
            "[adobe]\nclient_id = \"cid\"\nclient_secret_file = \"{}\"\norg_id = \"X@AdobeOrg\"\n\n[[connections]]\nid = \"c-1\"\nsandbox = \"prod\"\n",
            fx.path("secret")
        );
        let config = Config::from_toml_str(&minimal, no_env()).unwrap();
        let adobe = &config.adobe;
        assert_eq!(adobe.scopes, DEFAULT_SCOPES);
        assert_eq!(adobe.ims_url.as_str(), "https://ims-na1.adobelogin.com/");
        assert_eq!(adobe.platform_url.as_str(), "https://platform.adobe.io/");
        let aws = &config.aws;
        assert_eq!(aws.region, None);
        assert_eq!(aws.sts_endpoint, None);
        assert_eq!(aws.s3_endpoint, None);
        assert_eq!(aws.role_arn, None);
        assert_eq!(aws.external_id, None);
        assert_eq!(aws.session_name, "aep-s3-rotator");
        let r = &config.rotation;
        assert_eq!(r.session_duration, Duration::from_secs(3600));
        assert_eq!(r.refresh_before, Duration::from_secs(20 * 60));
        assert_eq!(r.jitter, Duration::from_secs(60));
        assert_eq!(r.concurrency.get(), 8);
        assert_eq!(r.max_requests_per_second, None);
        assert_eq!(r.retry_min, Duration::from_secs(1));
        assert_eq!(r.retry_max, Duration::from_secs(120));
        assert!(!r.verify);
        assert!(r.prepush_check, "the pre-push check is on by default");
        assert_eq!(r.request_timeout, Duration::from_secs(30));
        assert_eq!(r.shutdown_grace, Duration::from_secs(10));
        let c = &config.connections[0];
        assert_eq!(
            *c,
            ConnectionConfig {
                id: "c-1".into(),
                sandbox: "prod".into(),
                name: "c-1".into(),
                role_arn: None,
                external_id: None,
                session_name: None,
                session_policy: None,
                policy_arns: Vec::new(),
                origin: Origin::Explicit,
            }
        );
        assert_eq!(config.admin.listen, None);
        assert_eq!(config.state.path, None);
        assert!(config.warnings.is_empty());
    }

    #[test]
    fn every_key_is_read() {
        let fx = Fixture::new();
        let full = format!(
            r#"[adobe]
client_id = "cid"
client_secret_file = "{secret}"
org_id = "X@AdobeOrg"
scopes = ["openid", "session"]
ims_url = "http://localhost:8081"
platform_url = "http://[::1]:8082/base"

[aws]
region = "eu-west-1"
sts_endpoint = "http://127.0.0.2:4566"
role_arn = "arn:aws:iam::123456789012:role/team/aep"
external_id = "ext-id:1"
session_name = "rotator@host"

[rotation]
session_duration = "2h"
refresh_before = "30m"
jitter = "5m"
concurrency = 2
max_requests_per_second = 10
retry_min = "500ms"
retry_max = "1m"
verify = true
request_timeout = "10s"
shutdown_grace = "20s"

[[connections]]
id = "c-1"
sandbox = "prod"
name = "sales"
role_arn = "arn:aws-cn:iam::210987654321:role/other"
external_id = "per-conn"
session_name = "per-conn"
session_policy = '{{"Version":"2012-10-17","Statement":[]}}'
policy_arns = ["arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess", "arn:aws:iam::123456789012:policy/team/mine"]

[admin]
listen = "127.0.0.1:9464"

[state]
path = "state.json"
"#,
            secret = fx.path("secret")
        );
        let config = Config::from_toml_str(&full, no_env()).unwrap();
        assert_eq!(config.adobe.scopes, ["openid", "session"]);
        assert_eq!(config.adobe.ims_url.as_str(), "http://localhost:8081/");
        assert_eq!(config.adobe.platform_url.as_str(), "http://[::1]:8082/base");
        assert_eq!(config.aws.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            config.aws.sts_endpoint.as_ref().map(Url::as_str),
            Some("http://127.0.0.2:4566/")
        );
        assert_eq!(
            config.aws.role_arn.as_ref().map(RoleArn::as_str),
            Some("arn:aws:iam::123456789012:role/team/aep")
        );
        assert_eq!(config.aws.external_id.as_deref(), Some("ext-id:1"));
        assert_eq!(config.aws.session_name, "rotator@host");
        let r = &config.rotation;
        assert_eq!(
            (r.session_duration, r.refresh_before, r.jitter),
            (
                Duration::from_secs(7200),
                Duration::from_secs(1800),
                Duration::from_secs(300)
            )
        );
        assert_eq!(r.concurrency.get(), 2);
        assert_eq!(r.max_requests_per_second.map(NonZeroU32::get), Some(10));
        assert_eq!(
            (r.retry_min, r.retry_max),
            (Duration::from_millis(500), Duration::from_secs(60))
        );
        assert!(r.verify);
        assert_eq!(
            (r.request_timeout, r.shutdown_grace),
            (Duration::from_secs(10), Duration::from_secs(20))
        );
        let c = &config.connections[0];
        assert_eq!(c.name, "sales");
        assert_eq!(
            c.role_arn.as_ref().map(RoleArn::as_str),
            Some("arn:aws-cn:iam::210987654321:role/other")
        );
        assert_eq!(c.external_id.as_deref(), Some("per-conn"));
        assert_eq!(c.session_name.as_deref(), Some("per-conn"));
        assert_eq!(
            c.session_policy.as_deref(),
            Some(r#"{"Version":"2012-10-17","Statement":[]}"#)
        );
        assert_eq!(c.policy_arns.len(), 2);
        assert_eq!(config.admin.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(config.state.path, Some(PathBuf::from("state.json")));
    }

    #[test]
    fn plain_http_is_accepted_to_loopback_only() {
        let fx = Fixture::new();
        for (url, ok) in [
            ("http://127.0.0.1:9", true),
            ("http://127.8.9.10", true),
            ("http://localhost:8080", true),
            ("http://LOCALHOST", true),
            ("http://[::1]:9", true),
            ("https://platform.adobe.io", true),
            ("http://128.0.0.1", false),
            ("http://localhost.example.com", false),
            ("http://[::2]", false),
            ("http://0.0.0.0:9", false),
        ] {
            let text = replace(
                &fx.good(),
                "[adobe]\n",
                &format!("[adobe]\nplatform_url = \"{url}\"\n"),
            );
            assert_eq!(Config::from_toml_str(&text, no_env()).is_ok(), ok, "{url}");
        }
    }

    #[test]
    fn a_policy_with_a_role_on_the_connection_is_fine_without_a_default_role() {
        let fx = Fixture::new();
        let text = fx
            .good()
            .replace("role_arn = \"arn:aws:iam::123456789012:role/aep\"\n", "")
            .replace(
                "sandbox = \"prod\"",
                "sandbox = \"prod\"\nrole_arn = \"arn:aws:iam::123456789012:role/x\"\nsession_policy = '{\"Version\":\"2012-10-17\",\"Statement\":[]}'",
            );
        let config = Config::from_toml_str(&text, no_env()).unwrap();
        assert!(config.aws.role_arn.is_none());
        assert!(config.connections[0].session_policy.is_some());
    }

    #[test]
    fn role_arns_are_checked_part_by_part() {
        for good in [
            "arn:aws:iam::123456789012:role/aep",
            "arn:aws:iam::123456789012:role/service-role/aep+=,.@_-",
            "arn:aws-us-gov:iam::123456789012:role/a",
        ] {
            assert_eq!(RoleArn::parse(good).unwrap().as_str(), good);
        }
        for (bad, why) in [
            ("", "six parts"),
            ("aep", "six parts"),
            ("arx:aws:iam::123456789012:role/a", "arn:"),
            ("arn:aws-mars:iam::123456789012:role/a", "partition"),
            ("arn:aws:sts::123456789012:role/a", "service"),
            ("arn:aws:iam:us-east-1:123456789012:role/a", "region"),
            ("arn:aws:iam::12345678901a:role/a", "12 digits"),
            ("arn:aws:iam::aws:role/a", "12 digits"),
            ("arn:aws:iam::123456789012:user/a", "role/"),
            ("arn:aws:iam::123456789012:role/", "1 to 64"),
            ("arn:aws:iam::123456789012:role/a/", "1 to 64"),
            ("arn:aws:iam::123456789012:role/a b", "letters"),
            ("arn:aws:iam::123456789012:role//a", "path"),
        ] {
            let error = RoleArn::parse(bad).unwrap_err();
            assert!(error.starts_with("not an IAM role ARN"), "{bad}: {error}");
            assert!(error.contains(why), "{bad}: {error}");
        }
        let long = format!("arn:aws:iam::123456789012:role/{}", "a".repeat(65));
        assert!(RoleArn::parse(&long).is_err());
    }

    #[test]
    fn debug_output_redacts_the_secret() {
        let fx = Fixture::new();
        let config = Config::from_toml_str(&fx.good(), no_env()).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains(FILE_SECRET), "{shown}");
        assert!(shown.contains("client_secret"), "{shown}");
        assert!(shown.contains("cid"), "the rest is still shown: {shown}");
        let pretty = format!("{:#?}", config.adobe);
        assert!(!pretty.contains(FILE_SECRET), "{pretty}");
    }

    #[test]
    fn load_reads_a_file_and_reports_a_missing_one() {
        let fx = Fixture::new();
        let path = fx.dir.path().join("config.toml");
        std::fs::write(&path, fx.good()).unwrap();
        let config = Config::load_with_env(&path, no_env()).unwrap();
        assert_eq!(config.connections.len(), 2);

        let missing = fx.dir.path().join("absent.toml");
        let error = Config::load_with_env(&missing, no_env()).unwrap_err();
        assert_eq!(error.issues.len(), 1);
        assert_eq!(error.issues[0].path, missing.display().to_string());
        assert!(
            error.issues[0].message.contains("AEP_S3_ROTATOR_CONFIG"),
            "{error}"
        );

        std::fs::write(&path, "[adobe\n").unwrap();
        let error = Config::load_with_env(&path, no_env()).unwrap_err();
        assert_eq!(error.issues[0].path, path.display().to_string());
        assert!(
            error.issues[0].message.contains("not valid TOML at line 1"),
            "{error}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn an_inline_secret_in_a_readable_file_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let fx = Fixture::new();
        let path = fx.dir.path().join("config.toml");
        let text = fx.good().replace(
            &format!("client_secret_file = \"{}\"", fx.path("secret")),
            &format!("client_secret = \"{INLINE_SECRET}\""),
        );
        std::fs::write(&path, &text).unwrap();

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = Config::load_with_env(&path, no_env()).unwrap();
        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        assert!(config.warnings[0].contains("readable by group/others"));
        assert!(config.warnings[0].contains(&path.display().to_string()));
        assert!(!config.warnings[0].contains(INLINE_SECRET));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = Config::load_with_env(&path, no_env()).unwrap();
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);

        // A secret file instead: no warning whatever the mode.
        std::fs::write(&path, fx.good()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = Config::load_with_env(&path, no_env()).unwrap();
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    }

    #[test]
    fn defaults_pass_their_own_validation() {
        // The default URLs go through the same checks as configured ones.
        assert!(Url::parse(DEFAULT_IMS_URL).is_ok_and(|u| u.scheme() == "https"));
        assert!(Url::parse(DEFAULT_PLATFORM_URL).is_ok_and(|u| u.scheme() == "https"));
        assert!(DEFAULT_REFRESH_BEFORE + DEFAULT_JITTER < DEFAULT_SESSION_DURATION);
        assert!(DEFAULT_RETRY_MIN <= DEFAULT_RETRY_MAX);
    }

    /// The good config's `[adobe]`, `[aws]` and `[rotation]` with only rules.
    fn rules_only(fx: &Fixture, rules: &str) -> String {
        let good = fx.good();
        let head = good.split("[[connections]]").next().unwrap().to_owned();
        format!("{head}{rules}")
    }

    #[test]
    fn discover_rules_load_without_any_connection() {
        let fx = Fixture::new();
        let text = rules_only(
            &fx,
            r#"
[[discover]]
sandboxes = ["prod", "dev"]
name = "ingest-*"
description_tag = "rotate:aep-s3"
role_arn = "arn:aws:iam::123456789012:role/other"
every = "2s"

[[discover]]
sandboxes = ["prod"]
description_tag = "rotate:aep-s3"
"#,
        );
        let config = Config::from_toml_str(&text, no_env()).unwrap();
        assert!(config.connections.is_empty());
        assert_eq!(config.discover.len(), 2);
        let rule = &config.discover[0];
        assert_eq!(rule.sandboxes, ["prod", "dev"]);
        assert!(rule.name.as_ref().unwrap().is_match("ingest-sales"));
        assert!(!rule.name.as_ref().unwrap().is_match("egress-sales"));
        assert_eq!(rule.every, Duration::from_secs(2));
        assert_eq!(config.discover[1].every, Duration::from_secs(300));
        assert_eq!(config.discover[1].index, 1);
        let found = rule.connection("c-9", "dev", Some("ingest-x"));
        assert_eq!(found.origin, Origin::Rule(0));
        assert_eq!(found.origin.to_string(), "discover[0]");
        assert_eq!(Origin::Explicit.to_string(), "explicit");
        assert_eq!(
            found.role_arn.unwrap().as_str(),
            "arn:aws:iam::123456789012:role/other"
        );
    }

    #[test]
    fn bad_discover_rules_name_their_keys() {
        let fx = Fixture::new();
        let cases: &[(&str, &str, &str)] = &[
            (
                "sandboxes = [\"prod\"]\n",
                "discover[0]",
                "no condition besides the sandboxes",
            ),
            (
                "name = \"x-*\"\n",
                "discover[0].sandboxes",
                "missing or empty",
            ),
            (
                "sandboxes = []\nname = \"x\"\n",
                "discover[0].sandboxes",
                "missing or empty",
            ),
            (
                "sandboxes = [\"Prod\"]\nname = \"x\"\n",
                "discover[0].sandboxes[0]",
                "lower-case",
            ),
            (
                "sandboxes = [\"a\", \"a\"]\nname = \"x\"\n",
                "discover[0].sandboxes[1]",
                "twice",
            ),
            (
                "sandboxes = [\"a\"]\nname = \"in[gest\"\n",
                "discover[0].name",
                "not a valid glob",
            ),
            (
                "sandboxes = [\"a\"]\nname = \"\"\n",
                "discover[0].name",
                "is empty",
            ),
            (
                "sandboxes = [\"a\"]\ndescription_tag = \"t\"\nevery = \"500ms\"\n",
                "discover[0].every",
                "out of range",
            ),
            (
                "sandboxes = [\"a\"]\ndescription_tag = \"t\"\nevery = \"2d\"\n",
                "discover[0].every",
                "out of range",
            ),
            (
                "sandboxes = [\"a\"]\ndescription_tag = \"t\"\nrole_arn = \"nope\"\n",
                "discover[0].role_arn",
                "not an IAM role ARN",
            ),
            (
                "sandboxes = [\"a\"]\ndescription_tag = \"t\"\nsession_policy = \"{\"\n",
                "discover[0].session_policy",
                "not valid JSON",
            ),
            (
                "sandboxes = [\"a\"]\ndescription_tag = \"t\"\ncolour = \"red\"\n",
                "discover[0].colour",
                "unknown key",
            ),
        ];
        for (body, key, needle) in cases {
            let text = rules_only(&fx, &format!("[[discover]]\n{body}"));
            let found = issues(&text, no_env());
            assert!(
                found
                    .iter()
                    .any(|i| i.path == *key && i.message.contains(needle)),
                "{body:?}: expected {key}: ...{needle}..., got {found:?}"
            );
        }
        // Neither connections nor rules: still an error, naming both ways out.
        let none = rules_only(&fx, "");
        let found = issues(&none, no_env());
        assert!(
            found
                .iter()
                .any(|i| i.path == "connections" && i.message.contains("[[discover]]")),
            "{found:?}"
        );
    }

    #[test]
    fn a_world_readable_secret_file_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let fx = Fixture::new();
        let secret = fx.path("secret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = Config::from_toml_str(&fx.good(), no_env()).unwrap();
        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        assert!(config.warnings[0].contains("adobe.client_secret_file"));
        assert!(config.warnings[0].contains("readable by group/others"));
        assert!(!config.warnings[0].contains(FILE_SECRET));
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = Config::from_toml_str(&fx.good(), no_env()).unwrap();
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    }

    #[test]
    fn a_fifo_as_the_config_file_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("config.toml");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        // Before the type check this open blocked until a writer came.
        let error = Config::load_with_env(&fifo, no_env()).unwrap_err();
        assert_eq!(error.issues.len(), 1, "{error:?}");
        assert!(error.to_string().contains("FIFO"), "{error}");
    }

    /// The layering's file source converts as `config::File` does, and hands
    /// its table over once (the builder collects each source once).
    #[test]
    fn the_parsed_file_converts_like_config_file_and_is_collected_once() {
        use config::Source;
        let text = "a = 1\nb = 2.5\nc = true\nd = 1979-05-27T07:32:00Z\n[t]\nl = [\"x\", 3]\n";
        let ours = ParsedToml::from(toml::from_str::<toml::Table>(text).unwrap())
            .collect()
            .unwrap();
        let theirs = config::File::from_str(text, config::FileFormat::Toml)
            .collect()
            .unwrap();
        assert_eq!(
            format!("{:?}", sorted(&ours)),
            format!("{:?}", sorted(&theirs))
        );
        let source = ParsedToml::from(toml::from_str::<toml::Table>(text).unwrap());
        assert!(source.collect().is_ok());
        assert!(source.collect().is_err(), "a second collect is refused");

        fn sorted(map: &config::Map<String, config::Value>) -> Vec<(String, String)> {
            let mut pairs: Vec<(String, String)> = map
                .iter()
                .map(|(k, v)| (k.clone(), format!("{v:?}")))
                .collect();
            pairs.sort();
            pairs
        }
    }
}
