//! Adobe IMS: the OAuth Server-to-Server access token, cached and shared.
//!
//! One token serves every connection. It is fetched once (single flight: the
//! callers that arrive meanwhile wait for the same answer), reused until well
//! before `expires_in`, and dropped when Flow Service answers 401.
//!
//! A failure is shared too: while IMS fails, it is asked at most once per
//! `[rotation] retry_min` (or its `Retry-After`, up to `retry_max` and 30 s),
//! and every caller meanwhile gets that answer at once ([`ImsError::Shared`]),
//! except a job whose credentials need replacing now. Without this, every
//! connection due asked IMS on its own: at 10,000 connections an outage
//! turned into thousands of token requests a second, against a service that
//! may be throttling exactly because it is asked too often.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;
use url::Url;

use crate::config::AdobeConfig;
use crate::counters::{Requests, Service};
use crate::policy::backoff::{BackoffPolicy, parse_retry_after};

/// An IMS access token. `Debug` redacts it.
#[derive(Debug)]
pub struct AccessToken {
    value: SecretString,
    /// Which fetch produced it, so a 401 only drops the token it concerns.
    generation: u64,
}

impl AccessToken {
    /// The bearer value, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        self.value.expose_secret()
    }

    /// A token as a fetch numbered `generation` would give it (tests of
    /// code that holds tokens, with no IMS).
    #[cfg(test)]
    pub(crate) fn for_tests(value: &str, generation: u64) -> Self {
        Self {
            value: SecretString::from(value.to_owned()),
            generation,
        }
    }
}

/// Why no token could be had, by what the caller does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ImsError {
    /// IMS refused the credential (`invalid_client`, wrong scope): fix
    /// `[adobe]`; retried on the slow cadence.
    #[error("IMS refused the client credentials ({status} {error}): {description}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The OAuth `error` code.
        error: String,
        /// The OAuth `error_description`, plus advice.
        description: String,
    },
    /// IMS unreachable, slow, throttling or failing: back off and retry.
    #[error("IMS unavailable: {0}")]
    Unavailable(String),
    /// IMS answered 200 without a usable token: back off and retry.
    #[error("IMS answer unusable: {0}")]
    Malformed(String),
    /// The last token request's failure, answered without a request while
    /// IMS is being given time (see the module docs). Displays as it.
    #[error(transparent)]
    Shared(Box<ImsError>),
}

impl ImsError {
    /// True for errors a quick retry may cure.
    pub fn is_transient(&self) -> bool {
        !matches!(self.cause(), Self::Rejected { .. })
    }

    /// What IMS answered, whether to this caller or to the request whose
    /// answer this caller was given.
    pub fn cause(&self) -> &ImsError {
        match self {
            Self::Shared(cause) => cause.cause(),
            other => other,
        }
    }

    /// True when this caller made no request: the failure is another
    /// request's, already logged (`ims token request failed`).
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Shared(_))
    }
}

#[derive(Debug)]
struct Cached {
    token: Arc<AccessToken>,
    refresh_at: Instant,
}

/// The last fetch failed: until `retry_at` callers get `error` without a
/// request.
#[derive(Debug)]
struct Outage {
    error: ImsError,
    retry_at: Instant,
    /// Failed fetches in a row.
    failures: u32,
}

/// What the token lock guards.
#[derive(Debug, Default)]
struct Cache {
    /// Fetches that succeeded (see [`AccessToken::generation`]).
    generation: u64,
    token: Option<Cached>,
    outage: Option<Outage>,
}

/// A failed fetch, with how long IMS asked us to wait (`Retry-After`).
struct Failed {
    error: ImsError,
    retry_after: Option<Duration>,
}

impl From<ImsError> for Failed {
    fn from(error: ImsError) -> Self {
        Self {
            error,
            retry_after: None,
        }
    }
}

/// Fetches and caches the IMS token.
#[derive(Debug)]
pub struct ImsClient {
    http: reqwest::Client,
    token_url: Url,
    client_id: String,
    /// Replaced when the secret file changed (see [`ImsClient::reread_secret`]).
    client_secret: std::sync::Mutex<SecretString>,
    client_secret_file: Option<std::path::PathBuf>,
    scopes: String,
    cache: Mutex<Cache>,
    /// `[rotation] retry_min` / `retry_max`: how long a failure is shared.
    retry: BackoffPolicy,
    requests: Requests,
}

/// The longest access token taken. IMS tokens are JWTs of 1–2 KiB; a
/// header much longer than this is refused by most servers anyway.
const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Whether `token` can go in `Authorization: Bearer ...` as is: visible
/// ASCII (a JWT's base64url and dots; no space, no control character), at
/// most [`MAX_TOKEN_LEN`] bytes.
fn is_sendable_token(token: &str) -> bool {
    token.len() <= MAX_TOKEN_LEN && token.bytes().all(|b| b.is_ascii_graphic())
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(deserialize_with = "lifetime_seconds")]
    expires_in: u64,
}

/// `expires_in` as whole seconds, read leniently: RFC 6749 says a number of
/// seconds, and servers write it as an integer, a fraction or a string of
/// either. A value that is not a positive, finite number of seconds reads
/// as 0 (refused by the caller); anything huge saturates, and is capped
/// later at [`MAX_TOKEN_LIFETIME`].
fn lifetime_seconds<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct Seconds;
    impl serde::de::Visitor<'_> for Seconds {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a number of seconds")
        }
        fn visit_u64<E>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E>(self, v: i64) -> Result<u64, E> {
            Ok(u64::try_from(v).unwrap_or(0))
        }
        fn visit_f64<E>(self, v: f64) -> Result<u64, E> {
            Ok(whole(v))
        }
        fn visit_str<E>(self, v: &str) -> Result<u64, E> {
            let v = v.trim();
            Ok(v.parse::<u64>()
                .unwrap_or_else(|_| v.parse::<f64>().map_or(0, whole)))
        }
    }
    /// `as` saturates (infinity is u64::MAX); NaN and negatives read as 0.
    fn whole(v: f64) -> u64 {
        if v > 0.0 { v as u64 } else { 0 }
    }
    deserializer.deserialize_any(Seconds)
}

#[derive(Deserialize, Default)]
struct OAuthError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// The longest token lifetime believed: IMS issues 24 h tokens; a larger
/// `expires_in` (up to `u64::MAX` is a legal JSON number) is cut to this, so
/// the cache is refreshed in time and no deadline overflows.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(48 * 3600);

/// How long before `expires_in` runs out the token is refreshed: a tenth of its
/// life, at least a minute (clock skew, slow requests) and at most an hour (a
/// 24 h token is renewed at 23 h, long before any dataflow could notice).
fn refresh_margin(lifetime: Duration) -> Duration {
    let margin = (lifetime / 10).clamp(Duration::from_secs(60), Duration::from_secs(3600));
    margin.min(lifetime / 2)
}

impl ImsClient {
    /// A client for `{ims_url}/ims/token/v3`; while IMS fails it is asked
    /// at most once per `retry.min` (see the module docs).
    pub fn new(
        http: reqwest::Client,
        adobe: &AdobeConfig,
        retry: BackoffPolicy,
        requests: Requests,
    ) -> Self {
        let mut token_url = adobe.ims_url.clone();
        token_url.set_path("/ims/token/v3");
        crate::remote::http::register_secret(adobe.client_secret.expose_secret());
        Self {
            http,
            token_url,
            client_id: adobe.client_id.clone(),
            client_secret: std::sync::Mutex::new(adobe.client_secret.clone()),
            client_secret_file: adobe.client_secret_file.clone(),
            scopes: adobe.scopes.join(","),
            cache: Mutex::new(Cache::default()),
            retry,
            requests,
        }
    }

    /// The current token, fetching a new one when there is none or it is due
    /// for refresh. While IMS fails, the last failure is answered without a
    /// request until its retry time.
    pub async fn token(&self) -> Result<Arc<AccessToken>, ImsError> {
        let mut cache = self.cache.lock().await;
        let now = crate::clock::mono_now();
        if let Some(entry) = cache.token.as_ref()
            && now < entry.refresh_at
        {
            return Ok(Arc::clone(&entry.token));
        }
        // A connection whose credentials need replacing now asks anyway: a
        // shared wait slows the others, it never holds one past its expiry.
        if let Some(outage) = cache.outage.as_ref()
            && now < crate::remote::shaping::shared_until(outage.retry_at)
        {
            return Err(ImsError::Shared(Box::new(outage.error.clone())));
        }
        let (value, lifetime) = match self.fetch_once_more().await {
            Ok(fetched) => fetched,
            Err(failed) => return Err(self.failed(&mut cache, failed)),
        };
        cache.generation += 1;
        let token = Arc::new(AccessToken {
            value,
            generation: cache.generation,
        });
        let now = crate::clock::mono_now();
        cache.token = Some(Cached {
            token: Arc::clone(&token),
            refresh_at: now
                .checked_add(lifetime.saturating_sub(refresh_margin(lifetime)))
                .unwrap_or(now),
        });
        match cache.outage.take() {
            Some(outage) => tracing::info!(
                expires_in = lifetime.as_secs(),
                failed_before = outage.failures,
                "ims token refreshed"
            ),
            None => tracing::info!(expires_in = lifetime.as_secs(), "ims token refreshed"),
        }
        Ok(token)
    }

    /// One fetch, and a second one with a rotated client secret: the file
    /// may already hold the new one (a Kubernetes Secret update, a new
    /// `LoadCredential`). The file is re-read once before the refusal is
    /// reported.
    async fn fetch_once_more(&self) -> Result<(SecretString, Duration), Failed> {
        match self.fetch().await {
            Err(Failed {
                error: ImsError::Rejected { error, .. },
                ..
            }) if error == "invalid_client" && self.reread_secret() => self.fetch().await,
            other => other,
        }
    }

    /// Records a failed fetch: callers get its error without a request
    /// for `retry_min`, or for IMS's `Retry-After` up to `retry_max` and
    /// [`SHARED_PAUSE_CAP`](crate::remote::shaping::SHARED_PAUSE_CAP), as Flow
    /// Service's shared pause (a connection's own retry is never sooner
    /// than `retry_min` anyway).
    fn failed(&self, cache: &mut Cache, failed: Failed) -> ImsError {
        let cap = self
            .retry
            .max
            .min(crate::remote::shaping::SHARED_PAUSE_CAP)
            .max(self.retry.min);
        let wait = failed
            .retry_after
            .map_or(self.retry.min, |asked| asked.max(self.retry.min).min(cap));
        let failures = cache
            .outage
            .as_ref()
            .map_or(1, |outage| outage.failures.saturating_add(1));
        let now = crate::clock::mono_now();
        tracing::warn!(
            error = %failed.error,
            failures,
            retry_in = %humantime::format_duration(wait),
            "ims token request failed"
        );
        cache.outage = Some(Outage {
            error: failed.error.clone(),
            retry_at: now.checked_add(wait).unwrap_or(now),
            failures,
        });
        failed.error
    }

    /// Drops `token` after Flow Service refused it (401); the next
    /// [`token`](Self::token) call fetches a new one. A token that was already
    /// replaced by another caller is left alone.
    pub async fn invalidate(&self, token: &AccessToken) {
        let mut cache = self.cache.lock().await;
        if cache
            .token
            .as_ref()
            .is_some_and(|entry| entry.token.generation == token.generation)
        {
            cache.token = None;
        }
    }

    /// Re-reads `client_secret_file`; true when it now holds another secret
    /// (which is then used).
    fn reread_secret(&self) -> bool {
        let Some(path) = &self.client_secret_file else {
            return false;
        };
        let Ok(bytes) = crate::fsguard::read(path, crate::fsguard::MAX_SECRET_FILE) else {
            return false;
        };
        let text = String::from_utf8_lossy(&bytes);
        let fresh = text.trim();
        let mut current = self.client_secret.lock().unwrap_or_else(|e| e.into_inner());
        if fresh.is_empty() || fresh == current.expose_secret() {
            return false;
        }
        crate::remote::http::register_secret(fresh);
        *current = SecretString::from(fresh.to_owned());
        tracing::info!(path = %path.display(), "IMS refused the client secret; the secret file holds a new one, retrying with it");
        true
    }

    async fn fetch(&self) -> Result<(SecretString, Duration), Failed> {
        let secret = self
            .client_secret
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Secrets go in the form body, never in the URL.
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", secret.expose_secret()),
            ("scope", self.scopes.as_str()),
        ];
        let response = self
            .http
            .post(self.token_url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                self.requests.count(Service::Ims, error_class(&e));
                ImsError::Unavailable(describe_reqwest_error(&e, &self.token_url))
            })?;
        let status = response.status();
        self.requests.count(Service::Ims, status.as_str());
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, crate::clock::wall_now()));
        // A 3xx is refused here (no redirect is followed: the form carries
        // the client secret), an oversized body is a transient error.
        let body = crate::remote::http::read_body(response)
            .await
            .map_err(|e| {
                ImsError::Unavailable(format!(
                    "reading the token response from {}: {e}",
                    self.token_url
                ))
            })?;
        if status.is_success() {
            let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                // serde's message may quote the value: scrub and bound it.
                ImsError::Malformed(crate::remote::http::remote_text_with(
                    &format!("token response is not the expected JSON: {e}"),
                    &[secret.expose_secret()],
                    crate::remote::http::MAX_REMOTE_TEXT,
                ))
            })?;
            if parsed.access_token.is_empty() || parsed.expires_in == 0 {
                return Err(ImsError::Malformed(
                    "token response has an empty access_token or no positive expires_in".to_owned(),
                )
                .into());
            }
            // Checked here, not at its first use: a token no request can
            // carry would be cached for its whole lifetime and fail every
            // Flow call until then.
            if !is_sendable_token(&parsed.access_token) {
                return Err(ImsError::Malformed(format!(
                    "token response has an access_token that cannot be sent in an Authorization header (over {} bytes, or not visible ASCII)",
                    MAX_TOKEN_LEN
                ))
                .into());
            }
            crate::remote::http::register_secret(&parsed.access_token);
            return Ok((
                SecretString::from(parsed.access_token),
                crate::clock::capped(parsed.expires_in, MAX_TOKEN_LIFETIME),
            ));
        }
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(Failed {
                error: ImsError::Unavailable(format!("HTTP {status}")),
                retry_after,
            });
        }
        let detail: OAuthError = serde_json::from_slice(&body).unwrap_or_default();
        // IMS may echo the form (client secret included) in its description.
        let shown = |text: &str| {
            crate::remote::http::remote_text_with(
                text,
                &[secret.expose_secret()],
                crate::remote::http::MAX_REMOTE_TEXT,
            )
        };
        let advice = match detail.error.as_str() {
            "invalid_client" => {
                "check [adobe] client_id and the client secret in the Adobe Developer Console"
            }
            "invalid_scope" => "check [adobe] scopes against the credential's product profile",
            _ => "check the [adobe] section",
        };
        Err(Failed::from(ImsError::Rejected {
            status: status.as_u16(),
            error: if detail.error.is_empty() {
                "unknown".to_owned()
            } else {
                shown(&detail.error)
            },
            description: format!("{}; {advice}", shown(&detail.error_description)),
        }))
    }
}

/// A short class of a transport error, for the `status` label of
/// `aep_s3_rotator_requests_total`.
pub fn error_class(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else {
        "error"
    }
}

/// One line naming what failed and where, for logs and `check`.
pub fn describe_reqwest_error(error: &reqwest::Error, url: &Url) -> String {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    // The URL never carries a secret (secrets travel in headers and bodies).
    let mut source = std::error::Error::source(error);
    let mut root = String::new();
    while let Some(cause) = source {
        root = cause.to_string();
        source = cause.source();
    }
    let line = if root.is_empty() {
        format!("{what}: {}", url.as_str())
    } else {
        format!("{what}: {} ({root})", url.as_str())
    };
    crate::remote::http::bounded(&line, 2 * crate::remote::http::MAX_REMOTE_TEXT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_margin_is_well_before_expiry() {
        assert_eq!(
            refresh_margin(Duration::from_secs(86_399)),
            Duration::from_secs(3600)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(3600)),
            Duration::from_secs(360)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(100)),
            Duration::from_secs(50)
        );
    }

    #[test]
    fn expires_in_is_read_as_whole_seconds_whatever_its_json_type() {
        let read = |v: &str| {
            serde_json::from_str::<TokenResponse>(&format!(
                r#"{{"access_token": "t", "token_type": "bearer", "expires_in": {v}}}"#
            ))
            .map(|r| r.expires_in)
        };
        for (json, seconds) in [
            ("86399", 86_399),
            ("86399.9", 86_399),
            ("\"86399\"", 86_399),
            ("\" 3600.5 \"", 3600),
            ("18446744073709551615", u64::MAX),
            ("1e300", u64::MAX),
            ("\"1e400\"", u64::MAX),
            // Not a positive number of seconds: 0, which the caller refuses.
            ("0", 0),
            ("-5", 0),
            ("-1.5", 0),
            ("0.4", 0),
            ("\"soon\"", 0),
            ("\"NaN\"", 0),
        ] {
            assert_eq!(read(json).unwrap(), seconds, "{json}");
        }
        for wrong in ["null", "true", "[]", "{}"] {
            assert!(read(wrong).is_err(), "{wrong}");
        }
    }

    #[test]
    fn only_tokens_an_authorization_header_can_carry_are_taken() {
        assert!(is_sendable_token(
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_"
        ));
        assert!(is_sendable_token(&"a".repeat(MAX_TOKEN_LEN)));
        for bad in [
            "eyJ\nInjected: header",
            "two words",
            "tab\there",
            "caf\u{e9}",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(!is_sendable_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn debug_redacts_the_token() {
        let token = AccessToken {
            value: SecretString::from("eyJhbGciOiJSUzI1NiJ9.secret".to_owned()),
            generation: 1,
        };
        assert!(!format!("{token:?}").contains("eyJhbGciOiJSUzI1NiJ9"));
        assert_eq!(token.expose(), "eyJhbGciOiJSUzI1NiJ9.secret");
    }

    const RETRY: BackoffPolicy = BackoffPolicy {
        min: Duration::from_millis(300),
        max: Duration::from_secs(2),
    };

    /// `retry_max` at its largest (1 h).
    const HOUR_MAX: BackoffPolicy = BackoffPolicy {
        min: Duration::from_secs(1),
        max: Duration::from_secs(3600),
    };

    async fn client_with(
        secret_in_memory: &str,
        file_holds: &str,
    ) -> (ImsClient, aep_s3_simulator::Simulator, tempfile::TempDir) {
        client_retrying(secret_in_memory, file_holds, RETRY).await
    }

    async fn client_retrying(
        secret_in_memory: &str,
        file_holds: &str,
        retry: BackoffPolicy,
    ) -> (ImsClient, aep_s3_simulator::Simulator, tempfile::TempDir) {
        let sim_config = aep_s3_simulator::SimConfig::new(
            "cid",
            "the-new-secret",
            "0123456789ABCDEF01234567@AdobeOrg",
        );
        let sim = aep_s3_simulator::Simulator::start(sim_config)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, format!("{file_holds}\n")).unwrap();
        let adobe = AdobeConfig {
            client_id: "cid".into(),
            client_secret: SecretString::from(secret_in_memory.to_owned()),
            client_secret_file: Some(file),
            client_secret_deferred: false,
            org_id: "0123456789ABCDEF01234567@AdobeOrg".into(),
            scopes: vec!["openid".into()],
            ims_url: Url::parse(&sim.ims_url()).unwrap(),
            platform_url: Url::parse(&sim.platform_url()).unwrap(),
        };
        let client = ImsClient::new(reqwest::Client::new(), &adobe, retry, Requests::default());
        (client, sim, dir)
    }

    #[tokio::test]
    async fn invalid_client_rereads_a_rotated_secret_file_once() {
        let (client, sim, _dir) = client_with("the-old-secret", "the-new-secret").await;
        client.token().await.unwrap();
        assert_eq!(sim.stats().ims_tokens_issued, 1);
        // The file is not re-read for every refusal: with the same secret in
        // it, the refusal is reported after one attempt.
        let (client, sim, _dir) = client_with("the-old-secret", "the-old-secret").await;
        let error = client.token().await.unwrap_err();
        assert!(
            matches!(&error, ImsError::Rejected { error, .. } if error == "invalid_client"),
            "{error:?}"
        );
        assert_eq!(sim.stats().ims_tokens_issued, 0);
    }

    fn scripted(status: u16, retry_after: Option<u64>) -> aep_s3_simulator::ScriptedFault {
        aep_s3_simulator::ScriptedFault::Status {
            status,
            retry_after: retry_after.map(aep_s3_simulator::RetryAfter::Seconds),
            body: None,
        }
    }

    /// Token requests this client sent (its `requests_total` counter).
    fn requests_sent(client: &ImsClient) -> u64 {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("aep_s3_rotator_requests", "", client.requests.family());
        let mut metrics = String::new();
        prometheus_client::encoding::text::encode(&mut metrics, &registry).unwrap();
        metrics
            .lines()
            .filter(|line| {
                line.starts_with("aep_s3_rotator_requests_total{")
                    && line.contains("service=\"ims\"")
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// How long from now the shared failure is answered without a request.
    async fn outage_left(client: &ImsClient) -> Option<Duration> {
        let cache = client.cache.lock().await;
        let outage = cache.outage.as_ref()?;
        Some(
            outage
                .retry_at
                .saturating_duration_since(crate::clock::mono_now()),
        )
    }

    #[tokio::test]
    async fn a_failure_is_shared_until_retry_min_then_ims_is_asked_again() {
        let (client, sim, _dir) = client_with("the-new-secret", "the-new-secret").await;
        let client = Arc::new(client);
        sim.script(aep_s3_simulator::SimService::Ims, scripted(503, None));
        // Twenty callers at once: one request. Had any other asked IMS, it
        // would have got a token (only one failure is scripted).
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let client = Arc::clone(&client);
                tokio::spawn(async move { client.token().await })
            })
            .collect();
        let mut shared = 0;
        for caller in callers {
            let error = caller.await.unwrap().unwrap_err();
            assert!(
                matches!(error.cause(), ImsError::Unavailable(m) if m.contains("503")),
                "{error:?}"
            );
            shared += usize::from(error.is_shared());
        }
        // The one that asked reports its own answer; the others were given it.
        assert_eq!(shared, 19);
        assert_eq!(sim.stats().ims_tokens_issued, 0);
        assert_eq!(requests_sent(&client), 1);
        // IMS is healthy again, but the failure still answers until retry_min.
        assert!(client.token().await.is_err());
        assert_eq!(requests_sent(&client), 1);
        let left = outage_left(&client).await.expect("an outage is recorded");
        assert!(left <= RETRY.min, "{left:?}");
        tokio::time::sleep(left + Duration::from_millis(20)).await;
        client.token().await.expect("asked again after retry_min");
        assert_eq!(sim.stats().ims_tokens_issued, 1);
        assert_eq!(requests_sent(&client), 2);
        assert!(
            outage_left(&client).await.is_none(),
            "a success ends the outage"
        );
    }

    #[tokio::test]
    async fn retry_after_from_ims_is_honoured_between_retry_min_and_retry_max() {
        let (client, sim, _dir) = client_with("the-new-secret", "the-new-secret").await;
        for (asked, expected) in [
            // A day is cut to retry_max: IMS recovering is noticed in time.
            (Some(86_400), RETRY.max),
            // Zero is raised to retry_min: no burst of requests.
            (Some(0), RETRY.min),
            // None: retry_min.
            (None, RETRY.min),
        ] {
            sim.script(aep_s3_simulator::SimService::Ims, scripted(429, asked));
            // Past any earlier outage, so this call asks IMS.
            if let Some(left) = outage_left(&client).await {
                tokio::time::sleep(left + Duration::from_millis(20)).await;
            }
            let error = client.token().await.unwrap_err();
            assert!(
                matches!(&error, ImsError::Unavailable(m) if m.contains("429")),
                "{error:?}"
            );
            let left = outage_left(&client).await.unwrap();
            assert!(
                left <= expected && left + Duration::from_millis(500) > expected,
                "Retry-After {asked:?}: shared for {left:?}, expected about {expected:?}"
            );
        }
        assert_eq!(sim.stats().ims_tokens_issued, 0);
        assert_eq!(requests_sent(&client), 3);
    }

    #[tokio::test]
    async fn a_long_retry_after_is_shared_for_at_most_the_shared_pause_cap() {
        let (client, sim, _dir) =
            client_retrying("the-new-secret", "the-new-secret", HOUR_MAX).await;
        sim.script(
            aep_s3_simulator::SimService::Ims,
            scripted(429, Some(86_400)),
        );
        client.token().await.unwrap_err();
        let left = outage_left(&client).await.unwrap();
        let cap = crate::remote::shaping::SHARED_PAUSE_CAP;
        assert!(
            left <= cap && left + Duration::from_secs(1) > cap,
            "shared for {left:?}, expected about {cap:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_at_its_deadline_asks_ims_despite_the_shared_failure() {
        let (client, sim, _dir) =
            client_retrying("the-new-secret", "the-new-secret", HOUR_MAX).await;
        sim.script(aep_s3_simulator::SimService::Ims, scripted(429, Some(3600)));
        client.token().await.unwrap_err();
        // A job whose credentials need replacing later is given the answer ...
        let later = crate::clock::mono_now() + Duration::from_secs(60);
        let error = crate::remote::shaping::start_by(Some(later), client.token())
            .await
            .unwrap_err();
        assert!(error.is_shared(), "{error:?}");
        assert_eq!(requests_sent(&client), 1);
        // ... one whose credentials need replacing now asks IMS itself.
        let now = crate::clock::mono_now();
        crate::remote::shaping::start_by(Some(now), client.token())
            .await
            .expect("IMS answers again");
        assert_eq!(requests_sent(&client), 2);
        assert_eq!(sim.stats().ims_tokens_issued, 1);
    }

    #[tokio::test]
    async fn a_refusal_is_shared_too() {
        let (client, sim, _dir) = client_with("the-old-secret", "the-old-secret").await;
        assert!(matches!(
            client.token().await,
            Err(ImsError::Rejected { .. })
        ));
        let shared = client.token().await.unwrap_err();
        assert!(shared.is_shared(), "{shared:?}");
        assert!(matches!(shared.cause(), ImsError::Rejected { .. }));
        assert!(
            !shared.is_transient(),
            "a shared refusal is still a refusal"
        );
        // Answered from the shared failure: the secret file was not re-read
        // and IMS saw one refused request, not two.
        assert!(outage_left(&client).await.is_some());
        assert_eq!(requests_sent(&client), 1);
        assert_eq!(sim.stats().ims_tokens_issued, 0);
    }
}
