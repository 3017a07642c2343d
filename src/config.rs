//! Configuration: one TOML file layered with `AEP_S3_ROTATOR__SECTION__KEY`
//! environment overrides, parsed into raw serde structs, then validated into
//! the types below. Validation collects *every* problem with its key path.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

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
    /// `[admin]`
    pub admin: AdminConfig,
    /// `[state]`
    pub state: StateConfig,
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

/// A well-formed IAM role ARN (`arn:<partition>:iam::<12 digits>:role/<path/name>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleArn(String);

impl RoleArn {
    /// Parses an IAM role ARN; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(6, ':');
        let (arn, partition, service, region, account, resource) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let valid_partition = matches!(partition, "aws" | "aws-cn" | "aws-us-gov" | "aws-iso" | "aws-iso-b" | "aws-iso-e" | "aws-iso-f" | "aws-eusc");
        let role_name = resource.strip_prefix("role/").unwrap_or_default();
        if arn != "arn"
            || !valid_partition
            || service != "iam"
            || region != Some("")
            || account.len() != 12
            || !account.bytes().all(|b| b.is_ascii_digit())
            || role_name.is_empty()
            || role_name.ends_with('/')
            || !role_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b))
        {
            return Err(format!(
                "not an IAM role ARN: {s:?} (expected arn:aws:iam::123456789012:role/NAME)"
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The ARN as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RoleArn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
