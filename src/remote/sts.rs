//! AWS STS: where fresh credentials come from.
//!
//! [`AwsSts`] calls `AssumeRole` (or `GetSessionToken` when no role is
//! configured) with the real `aws-sdk-sts` client, using the AWS default
//! credential chain as the source identity. [`CredentialCache`] makes
//! connections that ask for the same thing share one STS call per cycle.

use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_sts::config::http::HttpResponse;
use aws_sdk_sts::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use futures::future::BoxFuture;
use secrecy::SecretString;

use crate::config::{
    AttributionProblem, AwsConfig, Config, ConnectionConfig, ExpandedAttribution, RoleArn,
};
use crate::counters::{Requests, Service};

/// Everything that decides which credentials STS hands out. Connections whose
/// requests are equal share one STS call per cycle.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StsRequest {
    /// `None` = `GetSessionToken`.
    pub role_arn: Option<RoleArn>,
    /// `ExternalId` for `AssumeRole`.
    pub external_id: Option<String>,
    /// `RoleSessionName`.
    pub session_name: String,
    /// Inline session policy.
    pub session_policy: Option<String>,
    /// Managed session policies.
    pub policy_arns: Vec<String>,
    /// `DurationSeconds`.
    pub duration: Duration,
    /// Session tags and source identity for `AssumeRole`, expanded for the
    /// connection: connections whose tags differ (`{id}`) do not share a call.
    pub attribution: Result<ExpandedAttribution, AttributionProblem>,
}

impl StsRequest {
    /// The effective request for `connection`: its own role, external id,
    /// session name, session tags and source identity where set, else those
    /// of `[aws]` (tags and source identity expanded for it).
    pub fn for_connection(config: &Config, connection: &ConnectionConfig) -> Self {
        let aws = &config.aws;
        let role_arn = connection.role_arn.clone().or_else(|| aws.role_arn.clone());
        // GetSessionToken takes neither (the config warns): nothing to expand.
        let attribution = match role_arn {
            Some(_) => connection.attribution.over(&aws.attribution).expand(
                &connection.id,
                &connection.name,
                &connection.sandbox,
            ),
            None => Ok(ExpandedAttribution::default()),
        };
        Self {
            attribution,
            role_arn,
            external_id: connection
                .external_id
                .clone()
                .or_else(|| aws.external_id.clone()),
            session_name: connection
                .session_name
                .clone()
                .unwrap_or_else(|| aws.session_name.clone()),
            session_policy: connection.session_policy.clone(),
            policy_arns: connection.policy_arns.clone(),
            duration: config.rotation.session_duration,
        }
    }

    /// A short description for logs: the role, or `GetSessionToken`.
    pub fn describe(&self) -> String {
        match &self.role_arn {
            Some(role) => role.to_string(),
            None => "GetSessionToken".to_owned(),
        }
    }
}

/// One set of temporary credentials. The three secrets belong together.
/// `Debug` redacts the secret key and the session token.
#[derive(Debug, Clone)]
pub struct AwsCredentials {
    /// `ASIA...`: not secret; logged so it can be joined with CloudTrail.
    pub access_key_id: String,
    /// Secret.
    pub secret_access_key: SecretString,
    /// Secret.
    pub session_token: SecretString,
    /// The `Expiration` STS returned.
    pub expiration: SystemTime,
}

/// Why STS gave no credentials, by what the caller does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StsError {
    /// Throttling, a 5xx, a timeout or a network error: back off and retry.
    #[error("STS unavailable: {0}")]
    Unavailable(String),
    /// STS refused (`AccessDenied`, `ValidationError`, expired or invalid
    /// source credentials): fix IAM or the config; retried on the slow cadence.
    #[error("STS refused {code}: {message}")]
    Rejected {
        /// The AWS error code.
        code: String,
        /// The AWS message plus advice.
        message: String,
    },
    /// The default credential chain found no source identity: set one up
    /// (env, profile, web identity, ECS, IMDS); retried on the slow cadence.
    #[error(
        "no AWS credentials found by the default chain (env, profile, web identity, ECS, IMDS; last: {0})"
    )]
    NoCredentials(String),
    /// STS answered without the credentials we need: back off and retry.
    #[error("STS answer unusable: {0}")]
    Malformed(String),
    /// The connection's session tags or source identity expand to a value
    /// AWS refuses (a name found by discovery): STS is not asked; fix the
    /// template or the name; retried on the slow cadence.
    #[error("not sent to STS: {0}")]
    Unsendable(String),
    /// Another connection's call failed with this a moment ago, and it is
    /// the answer for a while (see [`CredentialCache`]). Displays as it.
    #[error(transparent)]
    Shared(Box<StsError>),
}

impl StsError {
    /// True for errors a quick retry may cure.
    pub fn is_transient(&self) -> bool {
        matches!(self.cause(), Self::Unavailable(_) | Self::Malformed(_))
    }

    /// What STS answered, to this caller or to the call whose answer this
    /// caller was given.
    pub fn cause(&self) -> &StsError {
        match self {
            Self::Shared(cause) => cause.cause(),
            other => other,
        }
    }

    /// True when this caller made no call: the failure is another
    /// connection's, already logged by it.
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Shared(_))
    }
}

/// Anything that can issue credentials for an [`StsRequest`].
pub trait CredentialSource: Send + Sync + std::fmt::Debug {
    /// Calls STS once.
    fn issue<'a>(
        &'a self,
        request: &'a StsRequest,
    ) -> BoxFuture<'a, Result<AwsCredentials, StsError>>;
}

/// How the STS client finds the identity it signs with.
#[derive(Debug, Clone)]
pub enum SourceIdentity {
    /// The AWS default credential chain (env, profile, web identity / IRSA, ECS, IMDS).
    DefaultChain,
    /// Fixed credentials: only for `demo`, which talks to the embedded simulator.
    Static {
        /// Access key id.
        access_key_id: String,
        /// Secret access key.
        secret_access_key: SecretString,
    },
}

/// The region STS is called in when neither the config nor the AWS default
/// chain names one: STS's global endpoint lives in us-east-1.
const FALLBACK_REGION: &str = "us-east-1";

/// The real STS, through `aws-sdk-sts`.
#[derive(Debug, Clone)]
pub struct AwsSts {
    client: aws_sdk_sts::Client,
    requests: Requests,
}

impl AwsSts {
    /// Builds the client: region from `[aws] region` or the default chain,
    /// endpoint from `[aws] sts_endpoint` (else the SDK honours
    /// `AWS_ENDPOINT_URL_STS`), every call bounded by `timeout`. The SDK's own
    /// retries are off: the scheduler retries with its own backoff so that
    /// every attempt is logged, counted and bounded by the credentials' expiry.
    pub async fn new(
        aws: &AwsConfig,
        identity: &SourceIdentity,
        timeout: Duration,
        requests: Requests,
    ) -> Self {
        let shared = sdk_config(aws, aws.sts_endpoint.as_ref(), identity)
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(timeout)
                    .build(),
            )
            .load()
            .await;
        let mut builder = aws_sdk_sts::config::Builder::from(&shared).interceptor(BodyLimit {
            cap: crate::remote::http::MAX_BODY as u64,
            service: "STS",
        });
        if shared.region().is_none() {
            tracing::info!(
                region = FALLBACK_REGION,
                "no AWS region configured, using STS in us-east-1"
            );
            builder = builder.region(aws_config::Region::new(FALLBACK_REGION));
        }
        Self {
            client: aws_sdk_sts::Client::from_conf(builder.build()),
            requests,
        }
    }

    async fn call(&self, request: &StsRequest) -> Result<AwsCredentials, StsError> {
        let duration = i32::try_from(request.duration.as_secs()).unwrap_or(i32::MAX);
        let credentials = match &request.role_arn {
            Some(role) => {
                let mut call = self
                    .client
                    .assume_role()
                    .role_arn(role.as_str())
                    .role_session_name(&request.session_name)
                    .duration_seconds(duration)
                    .set_external_id(request.external_id.clone())
                    .set_policy(request.session_policy.clone());
                let attribution = request
                    .attribution
                    .as_ref()
                    .map_err(|problem| StsError::Unsendable(problem.to_string()))?;
                call = call.set_source_identity(attribution.source_identity.clone());
                for (key, value) in &attribution.session_tags {
                    let tag = aws_sdk_sts::types::Tag::builder()
                        .key(key)
                        .value(value)
                        .build()
                        // Both fields are set: the builder cannot refuse.
                        .map_err(|e| StsError::Unsendable(e.to_string()))?;
                    call = call.tags(tag);
                }
                for arn in &request.policy_arns {
                    call = call.policy_arns(
                        aws_sdk_sts::types::PolicyDescriptorType::builder()
                            .arn(arn)
                            .build(),
                    );
                }
                let output = call.send().await.map_err(|e| self.classify(e))?;
                output.credentials
            }
            None => {
                let output = self
                    .client
                    .get_session_token()
                    .duration_seconds(duration)
                    .send()
                    .await
                    .map_err(|e| self.classify(e))?;
                output.credentials
            }
        };
        self.requests.count(Service::Sts, "200");
        let credentials = credentials
            .ok_or_else(|| StsError::Malformed("response has no Credentials".to_owned()))?;
        let expiration = SystemTime::try_from(*credentials.expiration())
            .map_err(|_| StsError::Malformed("Expiration out of range".to_owned()))?;
        Ok(AwsCredentials {
            access_key_id: credentials.access_key_id().to_owned(),
            secret_access_key: SecretString::from(credentials.secret_access_key().to_owned()),
            session_token: SecretString::from(credentials.session_token().to_owned()),
            expiration,
        })
    }

    fn classify<E>(&self, error: SdkError<E, HttpResponse>) -> StsError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let sts_error = classify_sdk_error(&error);
        let status = match sts_error.cause() {
            StsError::Rejected { code, .. } => code.as_str(),
            StsError::Unavailable(_) => match &error {
                SdkError::ServiceError(e) => e.err().code().unwrap_or("error"),
                SdkError::ResponseError(_) => "malformed",
                SdkError::TimeoutError(_) => "timeout",
                _ => "connect",
            },
            StsError::NoCredentials(_) => "no_credentials",
            // `cause` never is Shared; a classified SDK error never was,
            // nor is it Unsendable (no call is made then).
            StsError::Malformed(_) | StsError::Shared(_) | StsError::Unsendable(_) => "malformed",
        };
        self.requests.count(Service::Sts, status);
        sts_error
    }
}

/// The AWS SDK settings every client of ours starts from (STS, DynamoDB):
/// the CA roots [`crate::remote::tls`] chose (for the service and the credential
/// chain), the SDK's retries off (our loops retry, log and count every
/// attempt), the region of `[aws] region` (else the default chain's), an
/// explicit endpoint if given (else the SDK honours `AWS_ENDPOINT_URL_*`),
/// and the static identity of `demo` and the tests if one is given (else
/// the default credential chain).
pub(crate) fn sdk_config(
    aws: &AwsConfig,
    endpoint: Option<&url::Url>,
    identity: &SourceIdentity,
) -> aws_config::ConfigLoader {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(crate::remote::tls::aws_http_client())
        .retry_config(RetryConfig::disabled());
    if let Some(region) = &aws.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint.as_str().trim_end_matches('/'));
    }
    if let SourceIdentity::Static {
        access_key_id,
        secret_access_key,
    } = identity
    {
        use secrecy::ExposeSecret;
        crate::remote::http::register_secret(secret_access_key.expose_secret());
        loader = loader.credentials_provider(aws_credential_types::Credentials::new(
            access_key_id.clone(),
            secret_access_key.expose_secret().to_owned(),
            None,
            None,
            "aep-s3-rotator-static",
        ));
    }
    loader
}

/// STS error codes that a retry after a short wait may cure.
const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalError",
    "IDPCommunicationError",
];

fn classify_sdk_error<E>(error: &SdkError<E, HttpResponse>) -> StsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match error {
        SdkError::ServiceError(service) => {
            let err = service.err();
            let Some(code) = err.code() else {
                // Not an AWS error document (an HTML 502 of a proxy, an
                // empty 503, a redirect): keep the HTTP status.
                return classify_http(service.raw());
            };
            let code = crate::remote::http::bounded(code, 64);
            let message = crate::remote::http::remote_text(err.message().unwrap_or("no message"));
            if TRANSIENT_CODES.contains(&code.as_str()) {
                return StsError::Unavailable(format!("{code}: {message}"));
            }
            let advice = match code.as_str() {
                "AccessDenied" => {
                    "; check the role's trust policy allows the daemon's identity (and the external id)"
                }
                "ValidationError" => {
                    "; check role_arn, session_name, session_duration and policies"
                }
                "ExpiredToken"
                | "ExpiredTokenException"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch" => {
                    "; the daemon's own AWS identity is invalid or expired"
                }
                "RegionDisabledException" => "; activate STS in this region or set [aws] region",
                _ => "",
            };
            StsError::Rejected {
                code,
                message: format!("{message}{advice}"),
            }
        }
        SdkError::TimeoutError(_) => StsError::Unavailable("request timed out".to_owned()),
        // A 2xx that could not be parsed (an unparseable Expiration, a
        // truncated document): transient, like any malformed answer.
        SdkError::ResponseError(response) => StsError::Malformed(format!(
            "HTTP {}: the answer could not be parsed ({})",
            response.raw().status().as_u16(),
            crate::remote::http::remote_text(&DisplayErrorContext(error).to_string())
        )),
        other => {
            let text = crate::remote::http::remote_text(&DisplayErrorContext(other).to_string());
            if is_credential_chain_failure(other, &text) {
                StsError::NoCredentials(chain_reason(other))
            } else {
                StsError::Unavailable(text)
            }
        }
    }
}

/// True when an AWS SDK call failed because the default credential chain
/// gave no identity: no source at all, a broken profile, or a provider that
/// refused (IMDS with tokens blocked, a failing `credential_process`). The
/// operator must act. A provider that timed out may answer next time: not
/// this. `text` is the error's display, read when the SDK kept no typed
/// error.
pub(crate) fn is_credential_chain_failure(
    error: &(dyn std::error::Error + 'static),
    text: &str,
) -> bool {
    match credentials_error(error) {
        Some(CredentialsError::ProviderTimedOut(_)) => false,
        Some(_) => true,
        None => {
            text.contains("credentials") && text.contains("provider")
                || text.contains("no credentials")
        }
    }
}

/// Why the default chain gave no identity, in one short sentence: the
/// innermost error of the chain whose text is a sentence rather than a
/// debug dump (the SDK's outer errors print `ProviderError(ProviderError {
/// source: ...` with every HTTP header of IMDS's answer). At most
/// [`CHAIN_REASON_MAX`] characters, escaped like any remote text.
pub(crate) fn chain_reason(error: &(dyn std::error::Error + 'static)) -> String {
    let mut reason = None;
    let mut current = Some(error);
    while let Some(error) = current {
        let text = error.to_string();
        // A dump ends a sentence at its first " (" or "{"; keep the sentence.
        let sentence = text
            .split(" (")
            .next()
            .unwrap_or_default()
            .split('{')
            .next()
            .unwrap_or_default()
            .trim()
            .trim_end_matches(':')
            .to_owned();
        if !sentence.is_empty() && !sentence.contains("dispatch failure") && sentence != "other" {
            reason = Some(sentence);
        }
        current = error.source();
    }
    crate::remote::http::bounded(
        reason.as_deref().unwrap_or("the chain gave no reason"),
        CHAIN_REASON_MAX,
    )
}

/// Room for the reason a provider gives; the daemon's own advice comes first.
const CHAIN_REASON_MAX: usize = 160;

/// The default chain's own error, wherever the SDK wrapped it (a dispatch
/// failure's connector error carries it as its source).
fn credentials_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a CredentialsError> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<CredentialsError>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

/// An STS answer that is not an AWS error document, by its HTTP status: a
/// 5xx is transient (back off), a 3xx is refused (no redirect is followed:
/// check `[aws] sts_endpoint`), any other status is a refusal.
fn classify_http(raw: &HttpResponse) -> StsError {
    let status = raw.status().as_u16();
    let body = raw
        .body()
        .bytes()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .filter(|b| !b.trim().is_empty())
        .map_or_else(
            || "empty body".to_owned(),
            |b| crate::remote::http::remote_text(&b),
        );
    match status {
        300..=399 => {
            let location = raw.headers().get("location").map_or_else(
                || "(no Location)".to_owned(),
                |l| crate::remote::http::bounded(l, 200),
            );
            StsError::Rejected {
                code: format!("HTTP {status}"),
                message: format!(
                    "STS redirected to {location}; no redirect is followed, check [aws] sts_endpoint"
                ),
            }
        }
        // A success the SDK could not parse (an unparseable Expiration):
        // transient. Its body is not shown: it may hold credentials.
        200..=299 => StsError::Malformed(format!(
            "HTTP {status}: the answer is not a parseable STS result (e.g. an unparseable Expiration)"
        )),
        500..=599 => StsError::Unavailable(format!("HTTP {status}: {body}")),
        _ => StsError::Rejected {
            code: format!("HTTP {status}"),
            message: format!("not an AWS error document: {body}"),
        },
    }
}

/// Caps the STS answer body, which the SDK would otherwise read whole: a
/// `Content-Length` over the cap is refused before reading, and the body is
/// wrapped so that reading stops (with an error) once the cap is passed.
/// The SDK follows no redirects (its hyper client has no such policy), so a
/// 3xx arrives here as an answer and is classified by [`classify_http`].
#[derive(Debug)]
pub(crate) struct BodyLimit {
    /// Largest body accepted, in bytes.
    pub(crate) cap: u64,
    /// Named in the refusal ("STS", "DynamoDB").
    pub(crate) service: &'static str,
}

impl aws_sdk_sts::config::Intercept for BodyLimit {
    fn name(&self) -> &'static str {
        "aep-s3-rotator body limit"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut aws_sdk_sts::config::interceptors::BeforeDeserializationInterceptorContextMut<
            '_,
        >,
        _runtime_components: &aws_sdk_sts::config::RuntimeComponents,
        _cfg: &mut aws_sdk_sts::config::ConfigBag,
    ) -> Result<(), aws_sdk_sts::error::BoxError> {
        let response = context.response_mut();
        let declared = response
            .headers()
            .get("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .or_else(|| response.body().content_length());
        match declared {
            Some(n) if n > self.cap => Err(format!(
                "the {} answer is {n} bytes, more than the {} bytes any such answer needs; refused",
                self.service, self.cap
            )
            .into()),
            _ => {
                let body = response.take_body();
                let cap = usize::try_from(self.cap).unwrap_or(usize::MAX);
                *response.body_mut() = aws_smithy_types::body::SdkBody::from_body_1_x(
                    http_body_util::Limited::new(body, cap),
                );
                Ok(())
            }
        }
    }
}

impl CredentialSource for AwsSts {
    fn issue<'a>(
        &'a self,
        request: &'a StsRequest,
    ) -> BoxFuture<'a, Result<AwsCredentials, StsError>> {
        Box::pin(self.call(request))
    }
}

/// Credentials that live shorter than this are refused: they could expire
/// before the PATCH that carries them has landed.
pub const MIN_USABLE_LIFETIME: Duration = Duration::from_secs(1);

/// The longest any STS credentials can live (`GetSessionToken` for an IAM
/// user: 36 h); an `Expiration` further away is not from STS.
pub const MAX_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(36 * 60 * 60);

/// The longest session token pushed. AWS documents no maximum; real ones
/// are a few KiB. A quarter of the STS answer cap ([`crate::remote::http::MAX_BODY`]).
const MAX_SESSION_TOKEN: usize = 256 * 1024;

/// Clock skew tolerated on top of [`MAX_CREDENTIAL_LIFETIME`].
const EXPIRATION_SKEW: Duration = Duration::from_secs(5 * 60);

/// Whether an STS answer can be pushed: a plausible access key id (16..=128
/// letters, digits and underscores), a secret key and a session token that are
/// non-empty visible ASCII of plausible length, and an `Expiration` after
/// [`MIN_USABLE_LIFETIME`] from `now` and within 36 h. Anything else would
/// overwrite working credentials with useless ones: a malformed answer (back
/// off and retry), never a PATCH. The message never holds a secret.
pub fn check_credentials(credentials: &AwsCredentials, now: SystemTime) -> Result<(), StsError> {
    use secrecy::ExposeSecret;
    let key = &credentials.access_key_id;
    // STS's documented shape: 16-128 characters of `[\w]` (real ones are
    // upper-case letters and digits, `ASIA...`).
    if !(16..=128).contains(&key.len())
        || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(StsError::Malformed(format!(
            "the access key id {} is not 16-128 letters, digits and underscores; nothing pushed",
            crate::remote::http::bounded(key, 40)
        )));
    }
    let visible = |s: &str, range: std::ops::RangeInclusive<usize>| {
        range.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
    };
    // AWS secret keys are 40 characters; session tokens hundreds to a few
    // thousand, and AWS asks clients to assume no maximum (session policies
    // and tags make them longer). The bounds are wide, but an empty or
    // one-word value is out.
    if !visible(credentials.secret_access_key.expose_secret(), 16..=1024) {
        return Err(StsError::Malformed(format!(
            "the SecretAccessKey of {key} is missing, empty or implausible; nothing pushed"
        )));
    }
    if !visible(
        credentials.session_token.expose_secret(),
        16..=MAX_SESSION_TOKEN,
    ) {
        return Err(StsError::Malformed(format!(
            "the SessionToken of {key} is missing, empty or implausible; nothing pushed"
        )));
    }
    // Pushing credentials that are already dead (a skewed STS clock, a
    // misbehaving proxy) would break the connection; treat the answer as
    // unusable and back off instead.
    let earliest = now.checked_add(MIN_USABLE_LIFETIME).unwrap_or(now);
    if credentials.expiration <= earliest {
        return Err(StsError::Malformed(format!(
            "STS returned credentials {key} that expire at {}, already past or within {}s; check the clock of this host",
            // humantime panics before 1970: a hostile Expiration must not.
            if credentials.expiration >= SystemTime::UNIX_EPOCH {
                humantime::format_rfc3339_seconds(credentials.expiration).to_string()
            } else {
                "a time before 1970".to_owned()
            },
            MIN_USABLE_LIFETIME.as_secs()
        )));
    }
    let latest = now
        .checked_add(MAX_CREDENTIAL_LIFETIME + EXPIRATION_SKEW)
        .unwrap_or(now);
    if credentials.expiration > latest {
        return Err(StsError::Malformed(format!(
            "STS returned credentials {key} that expire more than 36h from now, longer than STS issues; check the clock of this host and [aws] sts_endpoint"
        )));
    }
    crate::remote::http::register_secret(credentials.secret_access_key.expose_secret());
    crate::remote::http::register_secret(credentials.session_token.expose_secret());
    Ok(())
}

/// Takes what STS issued for `request` at `now`. An `Expiration` later than
/// the `DurationSeconds` asked for (plus [`EXPIRATION_SKEW`]) is believed
/// only up to that duration, with a warning: STS never grants more than it
/// is asked for, so the answer comes from a host clock behind STS's or from
/// a misbehaving endpoint, and the credentials are valid now either way;
/// refusing them would leave the connection to expire, believing them
/// would put off its next rotation. Then [`check_credentials`].
pub(super) fn accept_credentials(
    mut credentials: AwsCredentials,
    request: &StsRequest,
    now: SystemTime,
) -> Result<AwsCredentials, StsError> {
    let asked = now.checked_add(request.duration.saturating_add(EXPIRATION_SKEW));
    if asked.is_some_and(|asked| credentials.expiration > asked) {
        let claimed = credentials
            .expiration
            .duration_since(now)
            .unwrap_or_default();
        tracing::warn!(
            access_key_id = %credentials.access_key_id,
            role = %request.describe(),
            claimed_lifetime_seconds = claimed.as_secs(),
            session_duration_seconds = request.duration.as_secs(),
            "STS credentials claim a longer life than was asked for; treated as expiring at the end of the session duration (check the clock of this host and [aws] sts_endpoint)"
        );
        credentials.expiration = now.checked_add(request.duration).unwrap_or(now);
    }
    check_credentials(&credentials, now)?;
    Ok(credentials)
}

pub use super::sts_cache::{CredentialCache, Issued};

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// How the SDK hands over a failure of the default credential chain: a
    /// dispatch failure whose connector error carries it.
    fn chain_failure(error: CredentialsError) -> StsError {
        use aws_sdk_sts::error::ConnectorError;
        use aws_sdk_sts::operation::assume_role::AssumeRoleError;
        let error: SdkError<AssumeRoleError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::other(Box::new(error), None));
        classify_sdk_error(&error)
    }

    #[test]
    fn a_credential_chain_that_fails_is_named_as_such_whatever_its_text() {
        // IMDS reachable but refusing its token (IMDSv2 blocked, a proxy):
        // the text says neither "provider" nor "no credentials".
        let refused = chain_failure(CredentialsError::provider_error(
            "failed to load IMDS session token: request forbidden",
        ));
        assert!(matches!(refused, StsError::NoCredentials(_)), "{refused:?}");
        assert!(!refused.is_transient());
        assert!(
            refused
                .to_string()
                .starts_with("no AWS credentials found by the default chain"),
            "{refused}"
        );
        // The reason is the provider's sentence, not the SDK's debug dump.
        let StsError::NoCredentials(reason) = &refused else {
            unreachable!()
        };
        assert_eq!(
            reason,
            "failed to load IMDS session token: request forbidden"
        );
        let none = chain_failure(CredentialsError::not_loaded("no providers in chain"));
        assert!(matches!(none, StsError::NoCredentials(_)), "{none:?}");
        let broken = chain_failure(CredentialsError::invalid_configuration("bad profile"));
        assert!(matches!(broken, StsError::NoCredentials(_)), "{broken:?}");
        // A slow provider may answer next time: backed off, not the slow cadence.
        let slow = chain_failure(CredentialsError::provider_timed_out(Duration::from_secs(5)));
        assert!(matches!(slow, StsError::Unavailable(_)), "{slow:?}");
        assert!(slow.is_transient());
    }

    #[derive(Debug)]
    struct CountingSource {
        calls: AtomicU32,
        lifetime: Duration,
        /// Calls numbered below this fail (STS throttling).
        fail_below: AtomicU32,
    }

    impl CountingSource {
        fn new(lifetime: Duration) -> Arc<Self> {
            Arc::new(Self {
                calls: AtomicU32::new(0),
                lifetime,
                fail_below: AtomicU32::new(0),
            })
        }

        /// Fails the next `n` calls.
        fn failures_left(&self, n: u32) {
            let made = self.calls.load(Ordering::SeqCst);
            self.fail_below.store(made + n, Ordering::SeqCst);
        }
    }

    impl CredentialSource for CountingSource {
        fn issue<'a>(
            &'a self,
            _request: &'a StsRequest,
        ) -> BoxFuture<'a, Result<AwsCredentials, StsError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                if n < self.fail_below.load(Ordering::SeqCst) {
                    return Err(StsError::Unavailable("Throttling: Rate exceeded".into()));
                }
                Ok(AwsCredentials {
                    access_key_id: format!("ASIATEST{n:08}"),
                    secret_access_key: SecretString::from(format!("secret-key-{n:032}")),
                    session_token: SecretString::from(format!("session-token-{n:032}")),
                    expiration: crate::clock::wall_now() + self.lifetime,
                })
            })
        }
    }

    const SHARE: Duration = Duration::from_millis(500);

    fn request(role: &str) -> StsRequest {
        StsRequest {
            role_arn: Some(RoleArn::parse(role).unwrap()),
            external_id: None,
            session_name: "aep-s3-rotator".into(),
            session_policy: None,
            policy_arns: vec![],
            duration: Duration::from_secs(3600),
            attribution: Ok(ExpandedAttribution::default()),
        }
    }

    #[test]
    fn debug_redacts_the_secrets() {
        let creds = AwsCredentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: SecretString::from("wJalrXUtnFEMI-very-secret".to_owned()),
            session_token: SecretString::from("FwoGZXIvYXdzEJr-session".to_owned()),
            expiration: SystemTime::UNIX_EPOCH,
        };
        let shown = format!("{creds:?}");
        assert!(shown.contains("ASIAEXAMPLE"));
        assert!(!shown.contains("very-secret"));
        assert!(!shown.contains("FwoGZXIvYXdzEJr"));
        assert_eq!(
            creds.secret_access_key.expose_secret(),
            "wJalrXUtnFEMI-very-secret"
        );
    }

    /// Twenty connections due at once asking for `req`, their answers.
    async fn twenty_at_once(
        cache: &Arc<CredentialCache>,
        req: &StsRequest,
        refresh: Duration,
    ) -> Vec<Result<Arc<AwsCredentials>, StsError>> {
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (cache, req) = (Arc::clone(cache), req.clone());
                tokio::spawn(async move { cache.get(&req, None, refresh).await })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        answers
    }

    #[tokio::test]
    async fn connections_sharing_a_request_share_one_call() {
        let source = CountingSource::new(Duration::from_secs(3600));
        let cache = Arc::new(CredentialCache::new(source.clone(), SHARE));
        let refresh = Duration::from_secs(1200);
        let req = request("arn:aws:iam::123456789012:role/a");
        let keys: Vec<String> = twenty_at_once(&cache, &req, refresh)
            .await
            .into_iter()
            .map(|answer| answer.unwrap().access_key_id.clone())
            .collect();
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        assert!(keys.iter().all(|k| k == &keys[0]));
        // Another role is another call.
        cache
            .get(&request("arn:aws:iam::123456789012:role/b"), None, refresh)
            .await
            .unwrap();
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_answers_the_waiting_callers_then_sts_is_asked_again() {
        let source = CountingSource::new(Duration::from_secs(3600));
        source.failures_left(1);
        let cache = Arc::new(CredentialCache::new(source.clone(), SHARE));
        let refresh = Duration::from_secs(1200);
        let req = request("arn:aws:iam::123456789012:role/a");
        // Twenty connections due at once behind one throttled call: one
        // call, twenty errors (not twenty calls in a row to a throttled STS).
        let mut shared = 0;
        for answer in twenty_at_once(&cache, &req, refresh).await {
            let error = answer.unwrap_err();
            assert!(error.to_string().contains("Throttling"), "{error}");
            assert!(error.is_transient(), "{error}");
            shared += usize::from(error.is_shared());
        }
        // The one that called reports its own failure; the others were given it.
        assert_eq!(shared, 19);
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        // Still the answer just before the window ends ...
        tokio::time::advance(SHARE - Duration::from_millis(1)).await;
        assert!(cache.get(&req, None, refresh).await.is_err());
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        // ... and STS is asked again once it has.
        tokio::time::advance(Duration::from_millis(1)).await;
        let credentials = cache.get(&req, None, refresh).await.unwrap();
        assert_eq!(credentials.access_key_id, "ASIATEST00000001");
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        // A connection holding that answer needs another: it fails, and is
        // shared with the next holder ...
        let key = credentials.access_key_id.clone();
        source.failures_left(1);
        assert!(
            !cache
                .get(&req, Some(&key), refresh)
                .await
                .unwrap_err()
                .is_shared()
        );
        assert!(
            cache
                .get(&req, Some(&key), refresh)
                .await
                .unwrap_err()
                .is_shared()
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 3);
        // ... but not with one whose credentials need replacing now: it asks.
        let now = crate::clock::mono_now();
        let asked =
            crate::remote::shaping::start_by(Some(now), cache.get(&req, Some(&key), refresh)).await;
        assert!(asked.is_ok(), "{asked:?}");
        assert_eq!(source.calls.load(Ordering::SeqCst), 4);
        // Another identity has its own slot: not answered by this failure.
        let other = request("arn:aws:iam::123456789012:role/b");
        source.calls.store(0, Ordering::SeqCst);
        assert!(cache.get(&other, None, refresh).await.is_err());
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_holder_of_the_cached_answer_gets_a_new_one() {
        let source = CountingSource::new(Duration::from_secs(3600));
        let cache = CredentialCache::new(source.clone(), SHARE);
        let refresh = Duration::from_secs(1200);
        let req = request("arn:aws:iam::123456789012:role/a");
        let first = cache.get(&req, None, refresh).await.unwrap();
        let second = cache
            .get(&req, Some(&first.access_key_id), refresh)
            .await
            .unwrap();
        assert_ne!(first.access_key_id, second.access_key_id);
        // A connection still on the first answer now gets the second, without a call.
        let third = cache
            .get(&req, Some(&first.access_key_id), refresh)
            .await
            .unwrap();
        assert_eq!(third.access_key_id, second.access_key_id);
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    /// Issues an hour-long answer by `clock`, counting calls.
    #[derive(Debug)]
    struct ClockedSource {
        clock: crate::clock::Clock,
        calls: AtomicU32,
    }

    impl CredentialSource for ClockedSource {
        fn issue<'a>(
            &'a self,
            _request: &'a StsRequest,
        ) -> BoxFuture<'a, Result<AwsCredentials, StsError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let expiration = self.clock.now() + Duration::from_secs(3600);
            Box::pin(async move {
                Ok(AwsCredentials {
                    access_key_id: format!("ASIATEST{n:08}"),
                    secret_access_key: SecretString::from(format!("secret-key-{n:032}")),
                    session_token: SecretString::from(format!("session-token-{n:032}")),
                    expiration,
                })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_reused_until_its_refresh_point_by_the_cache_clock() {
        // A wall-clock anchor far from now: only the injected clock moves.
        let clock = crate::clock::Clock::tokio_at(
            SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000),
        );
        let source = Arc::new(ClockedSource {
            clock,
            calls: AtomicU32::new(0),
        });
        let cache = CredentialCache::new(source.clone(), SHARE).with_clock(clock);
        let (req, refresh) = (
            request("arn:aws:iam::123456789012:role/a"),
            Duration::from_secs(1200),
        );
        let first = cache.get(&req, None, refresh).await.unwrap();
        // 39 minutes on: before the refresh point (60 − 20), reused.
        tokio::time::advance(Duration::from_secs(39 * 60)).await;
        let again = cache.get(&req, None, refresh).await.unwrap();
        assert_eq!(again.access_key_id, first.access_key_id);
        // 41 minutes on: past it, STS is asked again.
        tokio::time::advance(Duration::from_secs(2 * 60)).await;
        let fresh = cache.get(&req, None, refresh).await.unwrap();
        assert_ne!(fresh.access_key_id, first.access_key_id);
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_cached_credentials_are_evicted_and_the_next_caller_mints() {
        let source = CountingSource::new(Duration::from_secs(3600));
        let cache = CredentialCache::new(source.clone(), SHARE);
        let (req, refresh) = (
            request("arn:aws:iam::123456789012:role/a"),
            Duration::from_secs(1200),
        );
        let first = cache.issue(&req, None, refresh, None).await.unwrap();
        assert!(first.minted);
        let cached = cache.issue(&req, None, refresh, None).await.unwrap();
        assert!(!cached.minted, "handed the cached answer");
        assert_eq!(
            cached.credentials.access_key_id,
            first.credentials.access_key_id
        );
        // S3 refuses them (a revoked session): evicted, and the retry mints.
        let refused = cached.credentials.access_key_id.clone();
        assert!(cache.evict(&req, &refused).await);
        let again = cache.issue(&req, None, refresh, None).await.unwrap();
        assert!(again.minted);
        assert_ne!(again.credentials.access_key_id, refused);
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        // Another caller that was handed the refused key evicts nothing:
        // the slot holds a newer answer (no ABA), which it then gets.
        assert!(cache.evict(&req, &refused).await);
        let newer = cache.issue(&req, None, refresh, None).await.unwrap();
        assert!(!newer.minted);
        assert_eq!(
            newer.credentials.access_key_id,
            again.credentials.access_key_id
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn credentials_refused_when_fresh_are_not_evicted_again() {
        let source = CountingSource::new(Duration::from_secs(3600));
        let cache = CredentialCache::new(source.clone(), SHARE);
        let (req, refresh) = (
            request("arn:aws:iam::123456789012:role/a"),
            Duration::from_secs(1200),
        );
        let minted = cache.issue(&req, None, refresh, None).await.unwrap();
        // The bucket or the role refuses even new credentials: a
        // permissions problem. Marked, they stay cached for everyone ...
        cache
            .refused_fresh(&req, &minted.credentials.access_key_id)
            .await;
        assert!(!cache.evict(&req, &minted.credentials.access_key_id).await);
        // ... so a thousand connections refused for the same reason do
        // not cost a thousand STS calls.
        for _ in 0..1000 {
            let cached = cache.issue(&req, None, refresh, None).await.unwrap();
            assert!(!cached.minted);
            assert!(!cache.evict(&req, &cached.credentials.access_key_id).await);
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn asked_after_reuses_only_answers_of_calls_started_since() {
        let source = CountingSource::new(Duration::from_secs(3600));
        let cache = CredentialCache::new(source.clone(), SHARE);
        let (req, refresh) = (
            request("arn:aws:iam::123456789012:role/a"),
            Duration::from_secs(1200),
        );
        let before = cache.issue(&req, None, refresh, None).await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        // A test found the connection's credentials refused now: whatever
        // was issued before is not wanted.
        let refused_at = crate::clock::mono_now();
        let fresh = cache
            .issue(&req, None, refresh, Some(refused_at))
            .await
            .unwrap();
        assert!(fresh.minted);
        assert_ne!(
            fresh.credentials.access_key_id,
            before.credentials.access_key_id
        );
        // Other connections refused at the same moment share that one call.
        let shared = cache
            .issue(&req, None, refresh, Some(refused_at))
            .await
            .unwrap();
        assert!(!shared.minted);
        assert_eq!(
            shared.credentials.access_key_id,
            fresh.credentials.access_key_id
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_whose_tags_expand_badly_is_refused_without_a_call() {
        let source = CountingSource::new(Duration::from_secs(3600));
        let cache = CredentialCache::new(source.clone(), SHARE);
        let mut req = request("arn:aws:iam::123456789012:role/a");
        req.attribution = Err(crate::config::AttributionProblem {
            key: "session_tags.name".to_owned(),
            message: "session_tags.name expands to \"a<b\" for connection c-1, which AWS refuses"
                .to_owned(),
        });
        let error = cache
            .get(&req, None, Duration::from_secs(1200))
            .await
            .unwrap_err();
        assert!(matches!(error, StsError::Unsendable(_)), "{error:?}");
        assert!(!error.is_transient());
        assert!(error.to_string().contains("c-1"), "{error}");
        assert_eq!(source.calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn for_connection_expands_the_tags_so_each_tagged_connection_is_its_own_request() {
        let text = r#"[adobe]
client_id = "cid"
client_secret = "inline-secret-value"
org_id = "0123456789ABCDEF01234567@AdobeOrg"

[aws]
role_arn = "arn:aws:iam::123456789012:role/aep"
session_tags = { connection = "{id}" }

[[connections]]
id = "c-1"
sandbox = "prod"

[[connections]]
id = "c-2"
sandbox = "prod"

[[connections]]
id = "c-3"
sandbox = "prod"
session_tags = { team = "data" }

[[connections]]
id = "c-4"
sandbox = "prod"
session_tags = { team = "data" }
source_identity = "aep-rotator"
"#;
        let config = Config::from_toml_str(text, std::iter::empty()).unwrap();
        let requests: Vec<StsRequest> = config
            .connections
            .iter()
            .map(|c| StsRequest::for_connection(&config, c))
            .collect();
        let tags = |r: &StsRequest| r.attribution.clone().unwrap().session_tags;
        assert_eq!(
            tags(&requests[0]),
            [("connection".to_owned(), "c-1".to_owned())]
        );
        assert_ne!(requests[0], requests[1], "one call per tagged identity");
        assert_eq!(tags(&requests[2]), [("team".to_owned(), "data".to_owned())]);
        assert_ne!(
            requests[2], requests[3],
            "the source identity is part of it"
        );
        assert_eq!(
            requests[3]
                .attribution
                .clone()
                .unwrap()
                .source_identity
                .as_deref(),
            Some("aep-rotator")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_from_before_a_fresh_request_is_not_its_answer() {
        let source = CountingSource::new(Duration::from_secs(3600));
        let cache = CredentialCache::new(source.clone(), SHARE);
        let (req, refresh) = (
            request("arn:aws:iam::123456789012:role/a"),
            Duration::from_secs(1200),
        );
        source.failures_left(1);
        assert!(cache.get(&req, None, refresh).await.is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        // Still shared with a scheduled rotation, not with a `rotate`
        // request made after it.
        assert!(
            cache
                .get(&req, None, refresh)
                .await
                .unwrap_err()
                .is_shared()
        );
        let asked = crate::clock::mono_now();
        let fresh = cache.issue(&req, None, refresh, Some(asked)).await.unwrap();
        assert!(fresh.minted);
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn credentials_that_are_already_expired_are_refused() {
        let source = CountingSource::new(Duration::ZERO);
        let cache = CredentialCache::new(source.clone(), SHARE);
        let error = cache
            .get(
                &request("arn:aws:iam::123456789012:role/a"),
                None,
                Duration::from_secs(1200),
            )
            .await
            .unwrap_err();
        assert!(error.is_transient(), "{error}");
        assert!(error.to_string().contains("already past"), "{error}");
    }

    fn creds(key: &str, secret: &str, token: &str, expiration: SystemTime) -> AwsCredentials {
        AwsCredentials {
            access_key_id: key.into(),
            secret_access_key: SecretString::from(secret.to_owned()),
            session_token: SecretString::from(token.to_owned()),
            expiration,
        }
    }

    #[test]
    fn empty_or_implausible_credentials_are_malformed() {
        let now = crate::clock::wall_now();
        let hour = now + Duration::from_secs(3600);
        let key = "ASIAABCDEFGHIJKLMNOP";
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY";
        let token = "IQoJb3JpZ2luX2VjEXAMPLEsessiontoken0123456789";
        check_credentials(&creds(key, secret, token, hour), now).unwrap();
        // STS's documented shapes, however unusual: `[\w]{16,128}` keys and
        // session tokens of any plausible length.
        for (key, token) in [
            ("asia_lower_case_key_0123", token.to_owned()),
            (key, "IQoJ".repeat(5_000)),
        ] {
            check_credentials(&creds(key, secret, &token, hour), now).unwrap();
        }
        let cases = [
            ("empty key", creds("", secret, token, hour), "access key id"),
            (
                "key with a dash",
                creds("asia-not-a-key-at-all", secret, token, hour),
                "access key id",
            ),
            (
                "short key",
                creds("ASIA123", secret, token, hour),
                "access key id",
            ),
            (
                "huge token",
                creds(key, secret, &"T".repeat(MAX_SESSION_TOKEN + 1), hour),
                "SessionToken",
            ),
            (
                "empty secret",
                creds(key, "", token, hour),
                "SecretAccessKey",
            ),
            (
                "short secret",
                creds(key, "x", token, hour),
                "SecretAccessKey",
            ),
            ("empty token", creds(key, secret, "", hour), "SessionToken"),
            (
                "token with a space",
                creds(key, secret, "IQoJb3JpZ2luX2 VjEXAMPLE", hour),
                "SessionToken",
            ),
            (
                "expired",
                creds(key, secret, token, now - Duration::from_secs(60)),
                "already past",
            ),
            (
                "before 1970",
                creds(
                    key,
                    secret,
                    token,
                    SystemTime::UNIX_EPOCH - Duration::from_secs(60),
                ),
                "before 1970",
            ),
            (
                "too far away",
                creds(key, secret, token, now + Duration::from_secs(37 * 3600)),
                "36h",
            ),
        ];
        for (what, c, needle) in cases {
            let error = check_credentials(&c, now).unwrap_err();
            assert!(error.is_transient(), "{what}: {error}");
            let text = error.to_string();
            assert!(text.contains(needle), "{what}: {text}");
            assert!(
                !text.contains("wJalrXUtnFEMI") && !text.contains("IQoJb3JpZ2luX2"),
                "{what}: {text}"
            );
        }
    }

    #[test]
    fn an_expiration_past_the_session_asked_for_is_believed_only_that_far() {
        let now = crate::clock::wall_now();
        let request = StsRequest {
            role_arn: None,
            external_id: None,
            session_name: "aep-s3-rotator".to_owned(),
            session_policy: None,
            policy_arns: Vec::new(),
            duration: Duration::from_secs(3600),
            attribution: Ok(ExpandedAttribution::default()),
        };
        let key = "ASIAABCDEFGHIJKLMNOP";
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY";
        let token = "IQoJb3JpZ2luX2VjEXAMPLEsessiontoken0123456789";
        let ten_years = now + Duration::from_secs(10 * 365 * 86_400);
        for claimed in [ten_years, now + Duration::from_secs(2 * 3600)] {
            let accepted =
                accept_credentials(creds(key, secret, token, claimed), &request, now).unwrap();
            assert_eq!(accepted.expiration, now + Duration::from_secs(3600));
        }
        // As asked (or a little more, clock skew): believed as given.
        for given in [
            now + Duration::from_secs(3600),
            now + Duration::from_secs(3600 + 240),
            now + Duration::from_secs(900),
        ] {
            let accepted =
                accept_credentials(creds(key, secret, token, given), &request, now).unwrap();
            assert_eq!(accepted.expiration, given);
        }
        // Dead on arrival is still refused.
        let past = now - Duration::from_secs(60);
        let error = accept_credentials(creds(key, secret, token, past), &request, now).unwrap_err();
        assert!(error.to_string().contains("already past"), "{error}");
    }
}
