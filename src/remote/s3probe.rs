//! The pre-push S3 check: before new credentials replace the ones on a
//! connection, prove with the *new* credentials that they can do what
//! Experience Platform will do with them, list the connection's bucket and
//! folder.
//!
//! The check is the cheapest call that proves that read path:
//! `ListObjectsV2` (`GET /{bucket}?list-type=2&max-keys=1&prefix={folder}/`),
//! or `HeadBucket` (`HEAD /{bucket}`) when the connection names no folder.
//! Both need `s3:ListBucket` on the bucket (limited by `s3:prefix`), which
//! Experience Platform needs anyway.
//!
//! ## Choices, and why
//!
//! - **`aws-sigv4` over the existing reqwest stack, not `aws-sdk-s3`.** Two
//!   small requests do not justify a second HTTP client path (the SDK's own
//!   hyper client, its retries and timeouts) and the SDK's compile cost; the
//!   signer is the SDK's own, maintained crate, already in the tree through
//!   `aws-sdk-sts`. Redirects are handled here (the client follows none), so a
//!   signed request with a session token is never sent to a host named by an
//!   answer.
//! - **Path-style addressing** (`https://s3.{region}.amazonaws.com/{bucket}`):
//!   it works for bucket names with dots (virtual-hosted names break TLS
//!   wildcard certificates there), for Flow Service's `serviceUrl`, for
//!   private endpoints and for S3 implementations used in tests (moto).
//! - **Where the request goes**: the connection's `serviceUrl` when it has one
//!   (that is where Experience Platform goes); else `[aws] s3_endpoint`, else
//!   `AWS_ENDPOINT_URL_S3` (as `AWS_ENDPOINT_URL_STS` for STS), else AWS's
//!   regional endpoint in `[aws] region` (or `AWS_REGION`, else us-east-1).
//!   A bucket in another region answers `301 PermanentRedirect` (or `400
//!   AuthorizationHeaderMalformed`) naming its region; the check is signed
//!   again for that region and retried once.
//! - **Outcomes**: `AccessDenied`, `NoSuchBucket`, `InvalidAccessKeyId`,
//!   `SignatureDoesNotMatch` (and the token variants) are a *denial*, but only
//!   after a few retries over a few seconds, because new credentials can take
//!   that long to be usable (IAM eventual consistency); `NoSuchBucket` does
//!   not depend on the credentials and is believed at once. 5xx, `SlowDown`,
//!   timeouts and resets are *transient* (the scheduler backs off). Anything
//!   else that does not prove access is *unusable* (slow cadence). In every
//!   case but "allowed" the credentials are not pushed.
//! - **Hostile answers**: bodies are read up to [`MAX_BODY`]; only `Code`,
//!   `Message`, `Region` and `Endpoint` are taken from them, cut short and
//!   scrubbed of the credentials (a `SignatureDoesNotMatch` body echoes the
//!   canonical request, session token included).

use std::sync::Arc;
use std::time::Duration;

use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use futures::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use url::Url;

use super::s3dest::{region_of_host, valid_region};

use crate::config::{Config, is_loopback};
use crate::remote::ims::describe_reqwest_error;
use crate::remote::sts::AwsCredentials;

/// The environment variable that overrides the S3 endpoint, as the AWS SDKs
/// name it (the STS client honours `AWS_ENDPOINT_URL_STS` the same way).
pub const ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL_S3";

/// The largest part of an S3 answer that is read: error documents are a few
/// hundred bytes, a one-key listing about one KiB.
pub const MAX_BODY: usize = 8 * 1024;

/// The waits between retries of a denied check: new credentials can take a
/// few seconds to be accepted everywhere (IAM eventual consistency), so a
/// denial is only believed after about 7 s.
pub const DENIAL_RETRY_DELAYS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// Where to check: the non-secret S3 parameters of a connection, as its
/// `GET` answered them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Target {
    /// `bucketName`.
    pub bucket: String,
    /// `folderPath`, as stored (`/landing`, `landing/`, ...).
    pub folder: Option<String>,
    /// `serviceUrl`: the (regional) endpoint Experience Platform uses.
    pub service_url: Option<String>,
}

impl S3Target {
    /// The key prefix listed: the folder without leading slashes, ending in
    /// one slash (so a policy limited to `s3:prefix` `folder/*` allows it);
    /// `None` when there is no folder (the bucket's root).
    pub fn prefix(&self) -> Option<String> {
        let folder = self.folder.as_deref()?.trim().trim_matches('/');
        (!folder.is_empty()).then(|| format!("{folder}/"))
    }

    /// `s3://bucket/prefix`, for logs.
    pub fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix().unwrap_or_default())
    }
}

/// The check passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// `ListObjectsV2` or `HeadBucket`.
    pub operation: &'static str,
    /// The region the successful request was signed for.
    pub region: String,
    /// Requests made, retries of denials included.
    pub attempts: u32,
}

/// Why the check did not prove access, by what the caller does next. In
/// every case the new credentials are not pushed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProbeError {
    /// S3 refused the new credentials (after the eventual-consistency
    /// retries): fix the role, its session policy or the bucket policy; the
    /// connection keeps its current credentials; retried on the slow cadence.
    #[error("S3 answered {code} ({status}) to {operation} on {target} with the new credentials: {message}{advice}", advice = denial_advice(code))]
    Denied {
        /// The S3 error code (`AccessDenied`, `NoSuchBucket`, ...).
        code: String,
        /// S3's message, scrubbed.
        message: String,
        /// HTTP status.
        status: u16,
        /// `ListObjectsV2` or `HeadBucket`.
        operation: &'static str,
        /// `s3://bucket/prefix`.
        target: String,
    },
    /// 5xx, `SlowDown`, a timeout, a reset, an answer that is not S3's:
    /// back off and retry.
    #[error("S3 check could not complete: {0}")]
    Unavailable(String),
    /// The check cannot prove anything as things are (a `serviceUrl` or
    /// bucket name that cannot be used, an unexpected 4xx, a clock S3
    /// rejects): fix it; retried on the slow cadence.
    #[error("S3 check not possible: {0}")]
    Unusable(String),
}

fn denial_advice(code: &str) -> &'static str {
    match code {
        "AccessDenied" => {
            "; allow s3:ListBucket on the bucket (with s3:prefix for the folder) in the role and any session policy, and check the bucket policy"
        }
        "NoSuchBucket" => "; check the connection's bucketName",
        _ => "",
    }
}

impl ProbeError {
    /// True for errors a quick retry may cure.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// The S3 error code of a denial.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Denied { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The `result` label of `aep_s3_rotator_prepush_checks_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Self::Denied { .. } => "denied",
            _ => "error",
        }
    }
}

/// Anything that can check credentials against a bucket; the rotation job
/// only knows this trait, so it can be tested without sockets.
pub trait S3Probe: Send + Sync + std::fmt::Debug {
    /// Checks that `credentials` may list `target` (retrying denials for
    /// eventual consistency).
    fn check<'a>(
        &'a self,
        target: &'a S3Target,
        credentials: &'a AwsCredentials,
    ) -> BoxFuture<'a, Result<Allowed, ProbeError>>;
}

/// Builds the probe `[rotation] prepush_check` asks for (`None` when off).
pub fn from_config(config: &Config) -> anyhow::Result<Option<Arc<dyn S3Probe>>> {
    if !config.rotation.prepush_check {
        return Ok(None);
    }
    Ok(Some(Arc::new(HttpProbe::from_config(config)?)))
}

/// How the HTTP probe behaves; tests shorten the waits.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    /// The endpoint for connections without a `serviceUrl`; `None` = AWS's
    /// regional endpoint.
    pub endpoint: Option<Url>,
    /// The region signed for when nothing else names one.
    pub region: String,
    /// Waits between retries of a denied check (its length = the retries).
    pub denial_retry_delays: Vec<Duration>,
    /// Timeout of each request.
    pub timeout: Duration,
    /// Where a connection's `serviceUrl` may send the check besides AWS S3
    /// endpoints of the region's partition ([`crate::remote::s3dest`]).
    pub destinations: crate::remote::s3dest::Destinations,
}

/// The real probe: SigV4-signed requests over reqwest.
#[derive(Debug, Clone)]
pub struct HttpProbe {
    http: reqwest::Client,
    settings: ProbeSettings,
}

/// Where one request goes and what it is signed for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    base: Url,
    region: String,
    /// AWS's own endpoint (may be replaced by the bucket's regional one).
    aws_default: bool,
}

/// A bucket name that can go in a path unencoded: S3's rules (lower case,
/// digits, dots, hyphens) plus the upper case and underscores of legacy
/// us-east-1 buckets.
fn valid_bucket(bucket: &str) -> bool {
    (3..=255).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `https`, or `http` to a loopback host (tests, a local proxy), with a host.
fn usable_endpoint(url: &Url) -> bool {
    let scheme_ok = match url.scheme() {
        "https" => true,
        "http" => is_loopback(url),
        _ => false,
    };
    scheme_ok && url.host().is_some() && url.query().is_none()
}

/// Percent-encodes a query value as SigV4 canonicalises it (RFC 3986
/// unreserved characters kept, everything else `%XX`).
fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Codes that mean "these credentials may not list this bucket".
const DENIAL_CODES: &[&str] = &[
    "AccessDenied",
    "NoSuchBucket",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
];

/// Codes a retry after a pause may cure.
const TRANSIENT_CODES: &[&str] = &[
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "OperationAborted",
    // The new credentials expired before the check: the next attempt gets
    // fresh ones from STS.
    "ExpiredToken",
];

/// One answer, read and bounded.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    bucket_region: Option<String>,
    body: String,
}

/// What one request showed.
#[derive(Debug)]
enum Step {
    Allowed,
    /// The bucket lives in this region.
    Redirect(Option<String>),
    Failed(ProbeError),
}

impl HttpProbe {
    /// A probe with these settings; its own client follows no redirects.
    pub fn new(settings: ProbeSettings) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("aep-s3-rotator/", env!("CARGO_PKG_VERSION")))
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| anyhow::anyhow!("building the S3 check's HTTP client: {e}"))?;
        Ok(Self { http, settings })
    }

    /// The probe for `config`: endpoint from `[aws] s3_endpoint`, else
    /// `AWS_ENDPOINT_URL_S3`; region from `[aws] region`, else `AWS_REGION` /
    /// `AWS_DEFAULT_REGION`, else us-east-1.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let endpoint = match &config.aws.s3_endpoint {
            Some(url) => Some(url.clone()),
            None => match std::env::var(ENDPOINT_ENV) {
                Ok(value) if !value.trim().is_empty() => {
                    let url = Url::parse(value.trim()).map_err(|e| {
                        anyhow::anyhow!("{ENDPOINT_ENV}={value:?} is not a URL ({e}); write e.g. https://s3.eu-west-1.amazonaws.com or unset it")
                    })?;
                    if !usable_endpoint(&url) {
                        anyhow::bail!(
                            "{ENDPOINT_ENV}={value:?}: use an https URL (plain http only to loopback hosts) without a query"
                        );
                    }
                    Some(url)
                }
                _ => None,
            },
        };
        let region = config
            .aws
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .filter(|r| valid_region(r))
            .unwrap_or_else(|| "us-east-1".to_owned());
        let config_urls = [&config.adobe.ims_url, &config.adobe.platform_url]
            .into_iter()
            .chain(config.aws.sts_endpoint.as_ref());
        let destinations = crate::remote::s3dest::Destinations::new(
            &region,
            endpoint.iter().chain(&config.aws.s3_endpoints),
            config_urls,
        );
        Self::new(ProbeSettings {
            destinations,
            endpoint,
            region,
            denial_retry_delays: DENIAL_RETRY_DELAYS.to_vec(),
            timeout: config.rotation.request_timeout,
        })
    }

    /// The first route for `target`.
    fn route(&self, target: &S3Target) -> Result<Route, ProbeError> {
        if let Some(service_url) = &target.service_url {
            // Remote text: shown bounded and escaped only.
            let shown = crate::remote::http::bounded(service_url, 120);
            let mut url = Url::parse(service_url).map_err(|e| {
                ProbeError::Unusable(format!(
                    "the connection's serviceUrl {shown} is not a URL ({e}); fix it in Experience Platform or set [rotation] prepush_check = false"
                ))
            })?;
            if !usable_endpoint(&url) {
                return Err(ProbeError::Unusable(format!(
                    "the connection's serviceUrl {shown} is not an https URL (plain http only to loopback hosts); the check does not send credentials there"
                )));
            }
            if let Some(why) = self.settings.destinations.refusal(&url) {
                return Err(ProbeError::Unusable(format!(
                    "the connection's serviceUrl {shown} is not used: {why}; nothing was sent there"
                )));
            }
            let host = url.host_str().unwrap_or_default().to_owned();
            // A virtual-hosted serviceUrl (`bucket.s3.region.amazonaws.com`):
            // address the service host path-style instead.
            if let Some(service_host) = host.strip_prefix(&format!("{}.", target.bucket))
                && service_host.ends_with(".amazonaws.com")
            {
                let _ = url.set_host(Some(service_host));
            }
            let region = region_of_host(&host).unwrap_or_else(|| self.settings.region.clone());
            return Ok(Route {
                base: url,
                region,
                aws_default: false,
            });
        }
        if let Some(endpoint) = &self.settings.endpoint {
            return Ok(Route {
                base: endpoint.clone(),
                region: self.settings.region.clone(),
                aws_default: false,
            });
        }
        Ok(Route {
            base: aws_endpoint(&self.settings.region)?,
            region: self.settings.region.clone(),
            aws_default: true,
        })
    }

    /// One check, with one retry in the bucket's own region after a redirect.
    async fn check_once(
        &self,
        target: &S3Target,
        credentials: &AwsCredentials,
    ) -> Result<Allowed, ProbeError> {
        let mut route = self.route(target)?;
        let operation = operation(target);
        for redirected in [false, true] {
            match self.request(&route, target, credentials).await {
                Step::Allowed => {
                    return Ok(Allowed {
                        operation,
                        region: route.region,
                        attempts: 1,
                    });
                }
                Step::Failed(error) => return Err(error),
                Step::Redirect(region) => {
                    let Some(region) = region.filter(|r| valid_region(r) && *r != route.region)
                    else {
                        return Err(ProbeError::Unusable(format!(
                            "S3 redirected {operation} on {} without naming another region; set the connection's serviceUrl or [aws] region",
                            target.describe()
                        )));
                    };
                    if redirected {
                        break;
                    }
                    tracing::debug!(bucket = %target.bucket, region = %region, "bucket lives in another region, checking there");
                    if route.aws_default {
                        route.base = aws_endpoint(&region)?;
                    }
                    route.region = region;
                }
            }
        }
        Err(ProbeError::Unusable(format!(
            "S3 redirected {operation} on {} twice; set the connection's serviceUrl",
            target.describe()
        )))
    }

    /// Signs and sends one request; reads and classifies the answer.
    async fn request(
        &self,
        route: &Route,
        target: &S3Target,
        credentials: &AwsCredentials,
    ) -> Step {
        if !valid_bucket(&target.bucket) {
            return Step::Failed(ProbeError::Unusable(format!(
                "the connection's bucketName {} is not an S3 bucket name",
                crate::remote::http::bounded(&target.bucket, 80)
            )));
        }
        let prefix = target.prefix();
        let method = if prefix.is_some() {
            Method::GET
        } else {
            Method::HEAD
        };
        let mut url = route.base.as_str().trim_end_matches('/').to_owned();
        url.push('/');
        url.push_str(&target.bucket);
        if let Some(prefix) = &prefix {
            // Sorted by name, as the canonical query string wants them.
            url.push_str(&format!(
                "?list-type=2&max-keys=1&prefix={}",
                encode_query_value(prefix)
            ));
        }
        let headers = match sign_request(method.as_str(), &url, &route.region, credentials) {
            Ok(headers) => headers,
            Err(error) => return Step::Failed(ProbeError::Unusable(error)),
        };
        let answer = match self.send(method.clone(), &url, headers).await {
            Ok(answer) => answer,
            Err(error) => return Step::Failed(error),
        };
        classify(&answer, operation(target), target, credentials)
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
    ) -> Result<Answer, ProbeError> {
        let parsed = Url::parse(url)
            .map_err(|e| ProbeError::Unusable(format!("cannot build the S3 URL {url:?}: {e}")))?;
        let mut response = self
            .http
            .request(method, parsed.clone())
            .headers(headers)
            .send()
            .await
            .map_err(|e| ProbeError::Unavailable(describe_reqwest_error(&e, &parsed)))?;
        let status = response.status();
        let bucket_region = response
            .headers()
            .get("x-amz-bucket-region")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        while body.len() < MAX_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_BODY - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(ProbeError::Unavailable(format!(
                        "reading the answer from {}: {e}",
                        parsed.host_str().unwrap_or_default()
                    )));
                }
            }
        }
        Ok(Answer {
            status,
            bucket_region,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

impl S3Probe for HttpProbe {
    fn check<'a>(
        &'a self,
        target: &'a S3Target,
        credentials: &'a AwsCredentials,
    ) -> BoxFuture<'a, Result<Allowed, ProbeError>> {
        Box::pin(async move {
            let mut attempts = 0u32;
            let mut delays = self.settings.denial_retry_delays.iter();
            loop {
                attempts = attempts.saturating_add(1);
                match self.check_once(target, credentials).await {
                    Ok(allowed) => {
                        return Ok(Allowed {
                            attempts,
                            ..allowed
                        });
                    }
                    // A missing bucket does not depend on the credentials:
                    // no waiting for them to propagate.
                    Err(error @ ProbeError::Denied { .. })
                        if error.code() != Some("NoSuchBucket") =>
                    {
                        let Some(delay) = delays.next() else {
                            return Err(error);
                        };
                        tracing::debug!(
                            s3_code = error.code().unwrap_or_default(),
                            attempt = attempts,
                            retry_in = %humantime::format_duration(*delay),
                            "pre-push check denied, retrying (new credentials may not be usable everywhere yet)"
                        );
                        tokio::time::sleep(*delay).await;
                    }
                    Err(other) => return Err(other),
                }
            }
        })
    }
}

fn operation(target: &S3Target) -> &'static str {
    if target.prefix().is_some() {
        "ListObjectsV2"
    } else {
        "HeadBucket"
    }
}

fn aws_endpoint(region: &str) -> Result<Url, ProbeError> {
    Url::parse(&format!("https://s3.{region}.amazonaws.com"))
        .map_err(|e| ProbeError::Unusable(format!("no S3 endpoint for region {region:?}: {e}")))
}

/// SigV4 headers (`authorization`, `x-amz-date`, `x-amz-content-sha256`,
/// `x-amz-security-token`) for an empty-bodied request to `url`.
fn sign_request(
    method: &str,
    url: &str,
    region: &str,
    credentials: &AwsCredentials,
) -> Result<HeaderMap, String> {
    let identity: Identity = aws_credential_types::Credentials::new(
        credentials.access_key_id.clone(),
        credentials.secret_access_key.expose_secret().to_owned(),
        Some(credentials.session_token.expose_secret().to_owned()),
        Some(credentials.expiration),
        "aep-s3-rotator-prepush",
    )
    .into();
    let mut settings = SigningSettings::default();
    // S3's own canonicalisation: the path as sent, the payload hash in a header.
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("s3")
        .time(crate::clock::wall_now())
        .settings(settings)
        .build()
        .map_err(|e| format!("cannot sign the S3 request: {e}"))?
        .into();
    let signable = SignableRequest::new(method, url, std::iter::empty(), SignableBody::Bytes(&[]))
        .map_err(|e| format!("cannot sign the S3 request to {url}: {e}"))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| format!("cannot sign the S3 request: {e}"))?
        .into_parts();
    let mut headers = HeaderMap::new();
    for (name, value) in instructions.headers() {
        let name = HeaderName::try_from(name).map_err(|e| format!("signing header: {e}"))?;
        let mut value =
            HeaderValue::try_from(value).map_err(|_| "a signing header is not valid".to_owned())?;
        if name == "authorization" || name == "x-amz-security-token" {
            value.set_sensitive(true);
        }
        headers.insert(name, value);
    }
    Ok(headers)
}

/// What an answer means.
fn classify(
    answer: &Answer,
    operation: &'static str,
    target: &S3Target,
    credentials: &AwsCredentials,
) -> Step {
    let status = answer.status;
    let body = &answer.body;
    if status.is_success() {
        // A 200 from something that is not S3 (a proxy's page, a body that
        // merely contains `<ListBucketResult`) proves nothing: the document
        // must be a listing of this bucket.
        if operation == "HeadBucket"
            || crate::remote::s3xml::listed_bucket(body).is_some_and(|name| name == target.bucket)
        {
            return Step::Allowed;
        }
        return Step::Failed(ProbeError::Unavailable(format!(
            "{operation} answered {status} without a ListBucketResult of the bucket; is the endpoint S3?"
        )));
    }
    let doc = crate::remote::s3xml::error_doc(body);
    let code = doc.code.clone().unwrap_or_else(|| {
        // HEAD answers carry no body: the status says it.
        match status.as_u16() {
            301 => "PermanentRedirect",
            307 => "TemporaryRedirect",
            403 => "AccessDenied",
            404 => "NoSuchBucket",
            _ => "",
        }
        .to_owned()
    });
    let redirect_region = || {
        answer
            .bucket_region
            .clone()
            .or_else(|| doc.region.clone())
            .or_else(|| doc.endpoint.as_deref().and_then(region_of_host))
    };
    if matches!(status.as_u16(), 301 | 307)
        || code == "PermanentRedirect"
        || code == "AuthorizationHeaderMalformed" && redirect_region().is_some()
        || status == StatusCode::BAD_REQUEST && answer.bucket_region.is_some() && code.is_empty()
    {
        return Step::Redirect(redirect_region());
    }
    let secrets = [
        credentials.secret_access_key.expose_secret(),
        credentials.session_token.expose_secret(),
    ];
    // Scrubbed before it is cut (a cut first kept the first 300 characters
    // of an echoed session token), escaped, bounded: the one form of remote
    // text every sink shows.
    let message = crate::remote::http::remote_text_with(
        doc.message.as_deref().unwrap_or("no message"),
        &secrets,
        crate::remote::http::MAX_REMOTE_TEXT,
    );
    if status.is_server_error()
        || TRANSIENT_CODES.contains(&code.as_str())
        || status.as_u16() == 429
    {
        let code = if code.is_empty() {
            status.as_str().to_owned()
        } else {
            code
        };
        return Step::Failed(ProbeError::Unavailable(format!(
            "{operation} on {} answered {code} ({status}): {message}",
            target.describe()
        )));
    }
    if DENIAL_CODES.contains(&code.as_str()) {
        return Step::Failed(ProbeError::Denied {
            code,
            message,
            status: status.as_u16(),
            operation,
            target: target.describe(),
        });
    }
    let advice = if code == "RequestTimeTooSkewed" {
        "; check this host's clock"
    } else {
        ""
    };
    let code = if code.is_empty() {
        "no error code".to_owned()
    } else {
        code
    };
    Step::Failed(ProbeError::Unusable(format!(
        "{operation} on {} answered {code} ({status}): {message}{advice}",
        target.describe()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn target(folder: Option<&str>) -> S3Target {
        S3Target {
            bucket: "sales-bucket".into(),
            folder: folder.map(str::to_owned),
            service_url: None,
        }
    }

    fn credentials() -> AwsCredentials {
        AwsCredentials {
            access_key_id: "ASIATESTPROBE0000001".into(),
            secret_access_key: SecretString::from("probe-secret-key-never-shown".to_owned()),
            session_token: SecretString::from("probe-session-token-never-shown".to_owned()),
            expiration: crate::clock::wall_now() + Duration::from_secs(3600),
        }
    }

    fn answer(status: u16, region: Option<&str>, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            bucket_region: region.map(str::to_owned),
            body: body.to_owned(),
        }
    }

    fn error_xml(code: &str, extra: &str) -> String {
        format!(
            "<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>m &amp; m</Message>{extra}<RequestId>1</RequestId></Error>"
        )
    }

    #[test]
    fn prefix_is_the_folder_without_leading_and_with_one_trailing_slash() {
        assert_eq!(
            target(Some("/landing")).prefix().as_deref(),
            Some("landing/")
        );
        assert_eq!(
            target(Some("landing/in/")).prefix().as_deref(),
            Some("landing/in/")
        );
        assert_eq!(target(Some("//")).prefix(), None);
        assert_eq!(target(Some("")).prefix(), None);
        assert_eq!(target(None).prefix(), None);
        assert_eq!(target(Some("/a b")).describe(), "s3://sales-bucket/a b/");
    }

    #[test]
    fn query_values_are_encoded_as_sigv4_canonicalises_them() {
        assert_eq!(
            encode_query_value("landing/in 1+é~"),
            "landing%2Fin%201%2B%C3%A9~"
        );
    }

    #[test]
    fn regions_are_read_from_s3_host_names_only() {
        for (host, region) in [
            ("s3.eu-west-1.amazonaws.com", Some("eu-west-1")),
            ("s3-eu-west-1.amazonaws.com", Some("eu-west-1")),
            ("s3.dualstack.ap-south-1.amazonaws.com", Some("ap-south-1")),
            ("my.bucket.s3.us-west-2.amazonaws.com", Some("us-west-2")),
            ("s3.amazonaws.com", Some("us-east-1")),
            ("s3.cn-north-1.amazonaws.com.cn", Some("cn-north-1")),
            ("evil.example.com", None),
            ("s3.eu-west-1.amazonaws.com.evil.example", None),
            ("s3.EVIL_REGION.amazonaws.com", None),
        ] {
            assert_eq!(region_of_host(host).as_deref(), region, "{host}");
        }
    }

    #[test]
    fn answers_are_classified_by_what_the_caller_does_next() {
        let creds = credentials();
        let t = target(Some("landing"));
        let step = |a: Answer| classify(&a, "ListObjectsV2", &t, &creds);
        assert!(matches!(
            step(answer(
                200,
                None,
                "<ListBucketResult><Name>sales-bucket</Name><KeyCount>0</KeyCount></ListBucketResult>"
            )),
            Step::Allowed
        ));
        // Issue 26 #10: a 200 that merely contains the root's name, or
        // lists another bucket, proves nothing.
        for body in [
            "<html>welcome <ListBucketResult</html>",
            "<ListBucketResult><Name>other-bucket</Name></ListBucketResult>",
        ] {
            assert!(
                matches!(
                    step(answer(200, None, body)),
                    Step::Failed(ProbeError::Unavailable(_))
                ),
                "{body}"
            );
        }
        assert!(matches!(
            step(answer(200, None, "<html>captive portal</html>")),
            Step::Failed(ProbeError::Unavailable(_))
        ));
        for code in [
            "AccessDenied",
            "NoSuchBucket",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
        ] {
            let status = if code == "NoSuchBucket" { 404 } else { 403 };
            match step(answer(status, None, &error_xml(code, ""))) {
                Step::Failed(ProbeError::Denied {
                    code: c, message, ..
                }) => {
                    assert_eq!(c, code);
                    assert_eq!(message, "m & m");
                }
                other => panic!("{code}: {other:?}"),
            }
        }
        for (status, code) in [(503, "SlowDown"), (500, "InternalError"), (502, "")] {
            let step = step(answer(status, None, &error_xml(code, "")));
            assert!(
                matches!(step, Step::Failed(ProbeError::Unavailable(_))),
                "{status}: {step:?}"
            );
        }
        assert!(matches!(
            step(answer(403, None, &error_xml("RequestTimeTooSkewed", ""))),
            Step::Failed(ProbeError::Unusable(m)) if m.contains("clock")
        ));
        // Redirects name the region by header, <Region> or <Endpoint>.
        assert!(matches!(
            step(answer(301, Some("eu-west-1"), "")),
            Step::Redirect(Some(r)) if r == "eu-west-1"
        ));
        assert!(matches!(
            step(answer(301, None, &error_xml("PermanentRedirect", "<Endpoint>sales-bucket.s3.eu-central-1.amazonaws.com</Endpoint>"))),
            Step::Redirect(Some(r)) if r == "eu-central-1"
        ));
        assert!(matches!(
            step(answer(400, None, &error_xml("AuthorizationHeaderMalformed", "<Region>ap-south-1</Region>"))),
            Step::Redirect(Some(r)) if r == "ap-south-1"
        ));
        // HEAD: no body, the status speaks.
        let head = |status| {
            classify(
                &answer(status, None, ""),
                "HeadBucket",
                &target(None),
                &creds,
            )
        };
        assert!(matches!(head(200), Step::Allowed));
        assert!(
            matches!(head(403), Step::Failed(ProbeError::Denied { code, .. }) if code == "AccessDenied")
        );
        assert!(
            matches!(head(404), Step::Failed(ProbeError::Denied { code, .. }) if code == "NoSuchBucket")
        );
    }

    #[test]
    fn a_token_echoed_across_the_cut_leaks_no_prefix() {
        // Issue 26 #4: the message was cut to 300 characters, then
        // scrubbed, so a token starting just before the cut kept its prefix.
        let creds = credentials();
        let body = error_xml("AccessDenied", "").replace(
            "m &amp; m",
            &format!(
                "{}x-amz-security-token:probe-session-token-never-shown",
                "p".repeat(255)
            ),
        );
        let Step::Failed(error) = classify(
            &answer(403, None, &body),
            "ListObjectsV2",
            &target(Some("a")),
            &creds,
        ) else {
            panic!("not a failure");
        };
        let text = error.to_string();
        assert!(!text.contains("probe-sess"), "{text}");
    }

    #[test]
    fn echoed_credentials_are_scrubbed_from_messages() {
        let creds = credentials();
        let body = error_xml("SignatureDoesNotMatch", "").replace(
            "m &amp; m",
            "canonical x-amz-security-token:probe-session-token-never-shown",
        );
        let Step::Failed(error) = classify(
            &answer(403, None, &body),
            "ListObjectsV2",
            &target(Some("a")),
            &creds,
        ) else {
            panic!("not a failure");
        };
        let text = error.to_string();
        assert!(!text.contains("probe-session-token-never-shown"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
    }

    #[test]
    fn signing_adds_the_sigv4_headers_and_marks_secrets_sensitive() {
        let headers = sign_request(
            "GET",
            "http://127.0.0.1:9000/sales-bucket?list-type=2&max-keys=1&prefix=landing%2F",
            "eu-west-1",
            &credentials(),
        )
        .unwrap();
        let auth = headers["authorization"].to_str().unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=ASIATESTPROBE0000001/"),
            "{auth}"
        );
        assert!(auth.contains("/eu-west-1/s3/aws4_request"), "{auth}");
        assert!(headers["authorization"].is_sensitive());
        assert!(headers["x-amz-security-token"].is_sensitive());
        assert_eq!(
            headers["x-amz-content-sha256"],
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(headers.contains_key("x-amz-date"));
    }

    fn probe(endpoint: Option<&str>) -> HttpProbe {
        let endpoint = endpoint.map(|e| Url::parse(e).unwrap());
        HttpProbe::new(ProbeSettings {
            destinations: crate::remote::s3dest::Destinations::new(
                "us-east-1",
                endpoint.iter(),
                [],
            ),
            endpoint,
            region: "us-east-1".into(),
            denial_retry_delays: vec![],
            timeout: Duration::from_secs(1),
        })
        .unwrap()
    }

    #[test]
    fn routes_follow_service_url_then_endpoint_then_aws() {
        let mut t = target(Some("x"));
        let aws = probe(None).route(&t).unwrap();
        assert_eq!(aws.base.as_str(), "https://s3.us-east-1.amazonaws.com/");
        assert!(aws.aws_default);
        let custom = probe(Some("http://127.0.0.1:9000")).route(&t).unwrap();
        assert_eq!(custom.base.as_str(), "http://127.0.0.1:9000/");
        assert!(!custom.aws_default);
        t.service_url = Some("https://sales-bucket.s3.eu-west-1.amazonaws.com".into());
        let service = probe(Some("http://127.0.0.1:9000")).route(&t).unwrap();
        assert_eq!(service.base.as_str(), "https://s3.eu-west-1.amazonaws.com/");
        assert_eq!(service.region, "eu-west-1");
        for bad in ["http://s3.example.com", "ftp://127.0.0.1", "not a url"] {
            t.service_url = Some(bad.into());
            assert!(
                matches!(probe(None).route(&t), Err(ProbeError::Unusable(_))),
                "{bad}"
            );
        }
    }
}
