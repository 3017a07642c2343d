//! Adobe IMS: the OAuth Server-to-Server access token, cached and shared.
//!
//! One token serves every connection. It is fetched once (single flight: the
//! callers that arrive meanwhile wait for the same answer), reused until well
//! before `expires_in`, and dropped when Flow Service answers 401.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;
use url::Url;

use crate::config::AdobeConfig;
use crate::telemetry::{Service, Telemetry};

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
}

impl ImsError {
    /// True for errors a quick retry may cure.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Rejected { .. })
    }
}

#[derive(Debug)]
struct Cached {
    token: Arc<AccessToken>,
    refresh_at: Instant,
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
    cache: Mutex<(u64, Option<Cached>)>,
    telemetry: Arc<Telemetry>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
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
    /// A client for `{ims_url}/ims/token/v3`.
    pub fn new(http: reqwest::Client, adobe: &AdobeConfig, telemetry: Arc<Telemetry>) -> Self {
        let mut token_url = adobe.ims_url.clone();
        token_url.set_path("/ims/token/v3");
        crate::http::register_secret(adobe.client_secret.expose_secret());
        Self {
            http,
            token_url,
            client_id: adobe.client_id.clone(),
            client_secret: std::sync::Mutex::new(adobe.client_secret.clone()),
            client_secret_file: adobe.client_secret_file.clone(),
            scopes: adobe.scopes.join(","),
            cache: Mutex::new((0, None)),
            telemetry,
        }
    }

    /// The current token, fetching a new one when there is none or it is due
    /// for refresh.
    pub async fn token(&self) -> Result<Arc<AccessToken>, ImsError> {
        let mut guard = self.cache.lock().await;
        let (generation, cached) = &mut *guard;
        if let Some(entry) = cached.as_ref()
            && crate::clock::mono_now() < entry.refresh_at
        {
            return Ok(Arc::clone(&entry.token));
        }
        let (value, lifetime) = match self.fetch().await {
            // A rotated client secret: the file may already hold the new
            // one (a Kubernetes Secret update, a new LoadCredential). Re-read
            // it once before reporting the refusal.
            Err(ImsError::Rejected { error, .. })
                if error == "invalid_client" && self.reread_secret() =>
            {
                self.fetch().await?
            }
            other => other?,
        };
        *generation += 1;
        let token = Arc::new(AccessToken {
            value,
            generation: *generation,
        });
        *cached = Some(Cached {
            token: Arc::clone(&token),
            refresh_at: {
                let now = crate::clock::mono_now();
                now.checked_add(lifetime.saturating_sub(refresh_margin(lifetime)))
                    .unwrap_or(now)
            },
        });
        tracing::info!(expires_in = lifetime.as_secs(), "ims token refreshed");
        Ok(token)
    }

    /// Drops `token` after Flow Service refused it (401); the next
    /// [`token`](Self::token) call fetches a new one. A token that was already
    /// replaced by another caller is left alone.
    pub async fn invalidate(&self, token: &AccessToken) {
        let mut guard = self.cache.lock().await;
        if guard
            .1
            .as_ref()
            .is_some_and(|entry| entry.token.generation == token.generation)
        {
            guard.1 = None;
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
        crate::http::register_secret(fresh);
        *current = SecretString::from(fresh.to_owned());
        tracing::info!(path = %path.display(), "IMS refused the client secret; the secret file holds a new one, retrying with it");
        true
    }

    async fn fetch(&self) -> Result<(SecretString, Duration), ImsError> {
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
                self.telemetry.request(Service::Ims, error_class(&e));
                ImsError::Unavailable(describe_reqwest_error(&e, &self.token_url))
            })?;
        let status = response.status();
        self.telemetry.request(Service::Ims, status.as_str());
        // A 3xx is refused here (no redirect is followed: the form carries
        // the client secret), an oversized body is a transient error.
        let body = crate::http::read_body(response).await.map_err(|e| {
            ImsError::Unavailable(format!(
                "reading the token response from {}: {e}",
                self.token_url
            ))
        })?;
        if status.is_success() {
            let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                // serde's message may quote the value: scrub and bound it.
                ImsError::Malformed(crate::http::remote_text_with(
                    &format!("token response is not the expected JSON: {e}"),
                    &[secret.expose_secret()],
                    crate::http::MAX_REMOTE_TEXT,
                ))
            })?;
            if parsed.access_token.is_empty() || parsed.expires_in == 0 {
                return Err(ImsError::Malformed(
                    "token response has an empty access_token or expires_in".to_owned(),
                ));
            }
            crate::http::register_secret(&parsed.access_token);
            return Ok((
                SecretString::from(parsed.access_token),
                crate::clock::capped(parsed.expires_in, MAX_TOKEN_LIFETIME),
            ));
        }
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(ImsError::Unavailable(format!("HTTP {status}")));
        }
        let detail: OAuthError = serde_json::from_slice(&body).unwrap_or_default();
        // IMS may echo the form (client secret included) in its description.
        let shown = |text: &str| {
            crate::http::remote_text_with(
                text,
                &[secret.expose_secret()],
                crate::http::MAX_REMOTE_TEXT,
            )
        };
        let advice = match detail.error.as_str() {
            "invalid_client" => {
                "check [adobe] client_id and the client secret in the Adobe Developer Console"
            }
            "invalid_scope" => "check [adobe] scopes against the credential's product profile",
            _ => "check the [adobe] section",
        };
        Err(ImsError::Rejected {
            status: status.as_u16(),
            error: if detail.error.is_empty() {
                "unknown".to_owned()
            } else {
                shown(&detail.error)
            },
            description: format!("{}; {advice}", shown(&detail.error_description)),
        })
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
    crate::http::bounded(&line, 2 * crate::http::MAX_REMOTE_TEXT)
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
    fn debug_redacts_the_token() {
        let token = AccessToken {
            value: SecretString::from("eyJhbGciOiJSUzI1NiJ9.secret".to_owned()),
            generation: 1,
        };
        assert!(!format!("{token:?}").contains("eyJhbGciOiJSUzI1NiJ9"));
        assert_eq!(token.expose(), "eyJhbGciOiJSUzI1NiJ9.secret");
    }

    async fn client_with(
        secret_in_memory: &str,
        file_holds: &str,
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
            org_id: "0123456789ABCDEF01234567@AdobeOrg".into(),
            scopes: vec!["openid".into()],
            ims_url: Url::parse(&sim.ims_url()).unwrap(),
            platform_url: Url::parse(&sim.platform_url()).unwrap(),
        };
        let telemetry = Arc::new(Telemetry::new(Duration::from_secs(60)));
        let client = ImsClient::new(reqwest::Client::new(), &adobe, telemetry);
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
}
