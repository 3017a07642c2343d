//! Flow Service: read a base connection (for its etag) and PATCH its S3
//! credentials with `If-Match`, replacing all three values in one JSON Patch.
//!
//! The traps (see API-NOTES.md): `GET` answers a list (`items[0]`); the etag
//! carries literal double quotes and goes back in `If-Match` exactly as
//! received; the PATCH body is an array of lower-case ops on
//! `/auth/params/...` (never `/auth/params` whole, which would drop
//! `bucketName` and `folderPath`); a session token alone is useless without
//! the key pair it was issued with.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{
    AUTHORIZATION, CONTENT_TYPE, ETAG, HeaderMap, HeaderValue, IF_MATCH, RETRY_AFTER,
};
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Value, json};
use url::Url;

use crate::config::AdobeConfig;
use crate::counters::{Requests, Service};
use crate::policy::backoff::parse_retry_after;
use crate::remote::ims::{AccessToken, describe_reqwest_error, error_class};
use crate::remote::s3probe::S3Target;
use crate::remote::shaping::RequestGate;
use crate::remote::sts::AwsCredentials;

mod wire;
pub use wire::*;

#[cfg(test)]
mod tests;

/// The Flow Service connection spec of Amazon S3.
pub const S3_CONNECTION_SPEC_ID: &str = "ecadc60c-7455-4d87-84dc-2a0e293d997b";
/// The auth spec that holds an access key pair (and optional session token).
pub const ACCESS_KEY_AUTH_SPEC: &str = "Access Key";

/// The JSON Patch paths of the three credential values, replaced together.
pub const CREDENTIAL_PATHS: [&str; 3] = [
    "/auth/params/s3AccessKey",
    "/auth/params/s3SecretKey",
    "/auth/params/s3SessionToken",
];

/// Why a Flow Service call failed, by what the caller does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlowError {
    /// 412: someone else changed the connection; re-read it (`GET`) and PATCH
    /// again at once (a bounded number of times).
    #[error("etag conflict (412): the connection changed since it was read")]
    PreconditionFailed,
    /// 401: drop the IMS token, fetch a new one and retry once.
    #[error("Flow Service refused the IMS token (401): {0}")]
    Unauthorized(String),
    /// 429 or 503: wait `Retry-After` when given, else back off. Every other
    /// request pauses too.
    #[error("Flow Service throttled the request ({status}){}", retry_after.map(|d| format!(", retry after {}s", d.as_secs())).unwrap_or_default())]
    Throttled {
        /// 429 or 503.
        status: u16,
        /// The `Retry-After` hint.
        retry_after: Option<Duration>,
    },
    /// Other 5xx, timeouts, connection resets: back off and retry.
    #[error("Flow Service unavailable: {0}")]
    Unavailable(String),
    /// 400/403/404 and other 4xx: a retry will not help soon; logged with the
    /// remote's detail and retried on the slow cadence.
    #[error("Flow Service rejected the request ({status}): {detail}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The remote's explanation, plus advice.
        detail: String,
    },
    /// A 2xx whose body is not what the API documents: back off and retry.
    #[error("Flow Service answer unusable: {0}")]
    Malformed(String),
    /// The connection exists but is not an S3 access-key connection: fix the
    /// config; retried on the slow cadence.
    #[error("connection is not an S3 access-key connection: {0}")]
    Unsuitable(String),
}

/// What a `GET /connections/{id}` told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConnection {
    /// The etag, with its literal quotes, for `If-Match`.
    pub etag: String,
    /// The connection's display name in AEP.
    pub name: Option<String>,
    /// The non-secret S3 parameters (`bucketName`, `folderPath`,
    /// `serviceUrl`) the pre-push check needs; `None` without a `bucketName`.
    pub s3: Option<S3Target>,
}

/// One base connection of a `GET /connections` page: what discovery and the
/// bulk etag read use, checked; everything else in the item is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedConnection {
    /// Base connection id (non-empty).
    pub id: String,
    /// Etag with its literal quotes, for `If-Match` (non-empty).
    pub etag: String,
    /// Display name, if the item had one.
    pub name: Option<String>,
    /// Description, if the item had one.
    pub description: Option<String>,
    /// `auth.specName`, if present.
    pub auth_spec: Option<String>,
    /// `state` (`enabled`, `disabled`, ...), if present.
    pub state: Option<String>,
    /// `connectionSpec.id`, if present.
    pub connection_spec_id: Option<String>,
    /// The non-secret S3 parameters, read as from a `GET` (list items have
    /// the same shape): the pre-push check then needs no `GET` either.
    pub s3: Option<S3Target>,
}

impl ListedConnection {
    /// The bytes its strings hold: what a listing keeps of it.
    pub fn footprint(&self) -> usize {
        let opt = |v: &Option<String>| v.as_ref().map_or(0, String::len);
        self.id.len()
            + self.etag.len()
            + opt(&self.name)
            + opt(&self.description)
            + opt(&self.auth_spec)
            + opt(&self.state)
            + opt(&self.connection_spec_id)
            + self
                .s3
                .as_ref()
                .map_or(0, |t| t.bucket.len() + opt(&t.folder) + opt(&t.service_url))
    }

    /// An S3 connection with the `Access Key` auth spec: the only kind that
    /// holds temporary credentials this daemon can rotate.
    pub fn is_s3_access_key(&self) -> bool {
        is_s3_spec(self.connection_spec_id.as_deref())
            && is_access_key_auth(self.auth_spec.as_deref())
    }

    /// [`Self::is_s3_access_key`], and enabled (what a rule may rotate).
    pub fn is_rotatable_s3(&self) -> bool {
        self.is_s3_access_key()
            && self
                .state
                .as_deref()
                .is_some_and(|state| state.trim().eq_ignore_ascii_case("enabled"))
    }
}

/// Whether `spec` is the Amazon S3 connection spec id (a UUID: compared
/// without regard to case or surrounding space).
pub fn is_s3_spec(spec: Option<&str>) -> bool {
    spec.is_some_and(|spec| spec.trim().eq_ignore_ascii_case(S3_CONNECTION_SPEC_ID))
}

/// Whether `auth` names the `Access Key` auth spec (without regard to case
/// or surrounding space).
pub fn is_access_key_auth(auth: Option<&str>) -> bool {
    auth.is_some_and(|auth| auth.trim().eq_ignore_ascii_case(ACCESS_KEY_AUTH_SPEC))
}

/// One `property=PATH==V1,V2` filter of `GET /connections`: the property at
/// the dotted `path` equals any of `values`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyFilter {
    /// Dotted path, e.g. `connectionSpec.id`.
    pub path: String,
    /// Any-of values; none may contain a comma (it separates them).
    pub values: Vec<String>,
}

impl PropertyFilter {
    /// `path==value`.
    pub fn eq(path: &str, value: &str) -> Self {
        Self {
            path: path.to_owned(),
            values: vec![value.to_owned()],
        }
    }

    /// `property=connectionSpec.id==<S3>`: only S3 base connections.
    pub fn s3() -> Self {
        Self::eq("connectionSpec.id", S3_CONNECTION_SPEC_ID)
    }

    /// `property=id==a,b,c`.
    pub fn ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            path: "id".to_owned(),
            values: ids.into_iter().map(str::to_owned).collect(),
        }
    }

    fn render(&self) -> Result<String, FlowError> {
        if self.path.is_empty()
            || self.values.is_empty()
            || self.values.iter().any(|v| v.is_empty() || v.contains(','))
        {
            return Err(FlowError::Rejected {
                status: 0,
                detail: format!(
                    "filter on {:?} cannot be expressed (empty, or a value with a comma)",
                    self.path
                ),
            });
        }
        Ok(format!("{}=={}", self.path, self.values.join(",")))
    }
}

/// Pages one listing may take: 1,000 pages of 100 is 100,000 connections in
/// one sandbox, far beyond any real org; more means a server looping.
pub const MAX_LIST_PAGES: usize = 1000;

#[derive(Deserialize)]
struct ListWrapper {
    items: Vec<Value>,
}

/// What [`FlowClient::send`] keeps of an answer.
struct Answer {
    status: StatusCode,
    retry_after: Option<HeaderValue>,
    etag: Option<HeaderValue>,
    body: bytes::Bytes,
}

#[derive(Deserialize)]
struct PatchAnswer {
    etag: Option<String>,
}

#[derive(Deserialize)]
struct TestAnswer {
    result: bool,
}

/// The Flow Service client.
#[derive(Debug)]
pub struct FlowClient {
    http: reqwest::Client,
    base: Url,
    client_id: String,
    org_id: String,
    gate: Arc<RequestGate>,
    requests: Requests,
    /// How long everyone pauses after a 429 that carried no `Retry-After`.
    default_pause: Duration,
}

impl FlowClient {
    /// A client for `{platform_url}/data/foundation/flowservice`.
    pub fn new(
        http: reqwest::Client,
        adobe: &AdobeConfig,
        gate: Arc<RequestGate>,
        requests: Requests,
        default_pause: Duration,
    ) -> Self {
        Self {
            http,
            base: adobe.platform_url.clone(),
            client_id: adobe.client_id.clone(),
            org_id: adobe.org_id.clone(),
            gate,
            requests,
            default_pause,
        }
    }

    /// The request gate, shared with a rebuilt client after a reload.
    pub fn gate(&self) -> Arc<RequestGate> {
        Arc::clone(&self.gate)
    }

    /// Refuses an id that cannot name one connection in a URL path (`.`
    /// and `..` would address the collection itself): the last guard, for
    /// ids from any door.
    fn check_id(id: &str) -> Result<(), FlowError> {
        match crate::ident::connection_id_problem(id) {
            None => Ok(()),
            Some(problem) => Err(FlowError::Rejected {
                status: 0,
                detail: format!(
                    "{} is not a base connection id ({problem}); nothing was sent",
                    crate::remote::http::bounded(id, 80)
                ),
            }),
        }
    }

    fn url(&self, id: &str, test: bool) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend([
                "data",
                "foundation",
                "flowservice",
                "connections",
                id,
            ]);
            if test {
                segments.push("test");
            }
        }
        url
    }

    fn headers(&self, sandbox: &str, token: &AccessToken) -> Result<HeaderMap, FlowError> {
        let bad = |what: &str| FlowError::Rejected {
            status: 0,
            detail: format!("{what} cannot be sent as an HTTP header; check the config"),
        };
        let mut headers = HeaderMap::new();
        let mut bearer = HeaderValue::try_from(format!("Bearer {}", token.expose()))
            .map_err(|_| bad("the IMS token"))?;
        bearer.set_sensitive(true);
        headers.insert(AUTHORIZATION, bearer);
        headers.insert(
            "x-api-key",
            HeaderValue::try_from(&self.client_id).map_err(|_| bad("client_id"))?,
        );
        headers.insert(
            "x-gw-ims-org-id",
            HeaderValue::try_from(&self.org_id).map_err(|_| bad("org_id"))?,
        );
        headers.insert(
            "x-sandbox-name",
            HeaderValue::try_from(sandbox).map_err(|_| bad("sandbox"))?,
        );
        Ok(headers)
    }

    /// Sends one request through the gate; answers the status, the
    /// headers used (`Retry-After` for an error, `ETag` for a PATCH whose
    /// body names none) and the body.
    async fn send(&self, request: reqwest::RequestBuilder, url: &Url) -> Result<Answer, FlowError> {
        let _pass = self.gate.enter().await;
        let response = request.send().await.map_err(|e| {
            self.requests.count(Service::Flow, error_class(&e));
            FlowError::Unavailable(describe_reqwest_error(&e, url))
        })?;
        let status = response.status();
        self.requests.count(Service::Flow, status.as_str());
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        let etag = response.headers().get(ETAG).cloned();
        // A 3xx is refused (a redirected PATCH would carry the new secret key
        // and session token elsewhere); an oversized body is transient.
        let body = crate::remote::http::read_body(response)
            .await
            .map_err(|e| FlowError::Unavailable(format!("answer from {url}: {e}")))?;
        Ok(Answer {
            status,
            retry_after,
            etag,
            body,
        })
    }

    /// `GET /connections/{id}` (or `.../test`): the body of a 2xx answer.
    async fn get(
        &self,
        id: &str,
        sandbox: &str,
        token: &AccessToken,
        test: bool,
    ) -> Result<bytes::Bytes, FlowError> {
        Self::check_id(id)?;
        self.get_body(&self.url(id, test), id, sandbox, token).await
    }

    /// A `GET` of `url`: the body of a 2xx answer, else the error it means
    /// (`id`: the connection it is about, `""` for a listing).
    async fn get_body(
        &self,
        url: &Url,
        id: &str,
        sandbox: &str,
        token: &AccessToken,
    ) -> Result<bytes::Bytes, FlowError> {
        let request = self
            .http
            .get(url.clone())
            .headers(self.headers(sandbox, token)?);
        let Answer {
            status,
            retry_after,
            body,
            ..
        } = self.send(request, url).await?;
        if !status.is_success() {
            return Err(self.error_for(status, retry_after.as_ref(), &body, id, sandbox, &[]));
        }
        Ok(body)
    }

    /// `GET /connections?property=...&limit=N` in `sandbox`, following
    /// `_links.next.href`'s `continuationToken` (with the filters sent again,
    /// since whether the token alone keeps them is not documented) until no
    /// next link is given. Every page goes through the request gate and rate
    /// limit like every other Flow call. Bounded: at most [`MAX_LIST_PAGES`]
    /// pages, and a token seen twice is an error (a server looping).
    ///
    /// Items without an id or etag are skipped (they cannot be used), as are
    /// duplicates across pages.
    pub async fn list_connections(
        &self,
        sandbox: &str,
        filters: &[PropertyFilter],
        limit: u32,
        token: &AccessToken,
    ) -> Result<Vec<ListedConnection>, FlowError> {
        self.list_connections_paged(sandbox, filters, limit, token, &mut |_| {})
            .await
    }

    /// [`Self::list_connections`], calling `on_page` with each page's new
    /// items as soon as the page is parsed (the start rotates them while
    /// the next page is on its way). A listing that fails later has still
    /// shown its earlier pages: the caller decides what they are worth.
    pub async fn list_connections_paged(
        &self,
        sandbox: &str,
        filters: &[PropertyFilter],
        limit: u32,
        token: &AccessToken,
        on_page: &mut (dyn FnMut(&[ListedConnection]) + Send),
    ) -> Result<Vec<ListedConnection>, FlowError> {
        let rendered = filters
            .iter()
            .map(PropertyFilter::render)
            .collect::<Result<Vec<_>, _>>()?;
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments
                .pop_if_empty()
                .extend(["data", "foundation", "flowservice", "connections"]);
        }
        let mut out: Vec<ListedConnection> = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let mut seen_tokens = std::collections::HashSet::new();
        let mut continuation: Option<String> = None;
        // What the listing read and what it keeps (see MAX_LISTING_READ,
        // MAX_LISTED_BYTES).
        let (mut read, mut kept) = (0usize, 0usize);
        for _page in 0..MAX_LIST_PAGES {
            let mut page_url = url.clone();
            {
                let mut query = page_url.query_pairs_mut();
                for filter in &rendered {
                    query.append_pair("property", filter);
                }
                query.append_pair("limit", &limit.max(1).to_string());
                if let Some(next) = &continuation {
                    query.append_pair("continuationToken", next);
                }
            }
            let body = self.get_body(&page_url, "", sandbox, token).await?;
            read = read.saturating_add(body.len());
            if read > MAX_LISTING_READ {
                return Err(FlowError::Malformed(format!(
                    "listing sandbox {sandbox:?} read more than {} MiB of answers; the server is padding or looping, the last known listing stays",
                    MAX_LISTING_READ >> 20
                )));
            }
            let page = parse_list_page(&body)?;
            drop(body);
            let before = out.len();
            for item in page.items {
                if ids.insert(item.id.clone()) {
                    kept = kept.saturating_add(item.footprint());
                    out.push(item);
                }
            }
            if out.len() > MAX_LISTED_ITEMS || kept > MAX_LISTED_BYTES {
                return Err(FlowError::Malformed(format!(
                    "listing sandbox {sandbox:?} holds more than {MAX_LISTED_ITEMS} connections or {} MiB; narrow the rule (the last known listing stays)",
                    MAX_LISTED_BYTES >> 20
                )));
            }
            on_page(out.get(before..).unwrap_or_default());
            match page.next {
                None => return Ok(out),
                Some(next) => {
                    if !seen_tokens.insert(next.clone()) {
                        return Err(FlowError::Malformed(format!(
                            "listing sandbox {sandbox:?} returned continuation token {} twice; the server is looping",
                            crate::remote::http::bounded(&next, 80)
                        )));
                    }
                    continuation = Some(next);
                }
            }
        }
        Err(FlowError::Malformed(format!(
            "listing sandbox {sandbox:?} took more than {MAX_LIST_PAGES} pages; narrow the rule or raise the page size"
        )))
    }

    /// `GET /connections/{id}`: the current etag, after checking the connection
    /// is an S3 connection with the `Access Key` auth spec.
    pub async fn get_connection(
        &self,
        id: &str,
        sandbox: &str,
        token: &AccessToken,
    ) -> Result<RemoteConnection, FlowError> {
        parse_connection(&self.get(id, sandbox, token, false).await?)
    }

    /// `PATCH /connections/{id}` with `If-Match: etag`, replacing the access
    /// key id, secret key and session token in one JSON Patch. Answers the new
    /// etag (`None` when the answer did not carry one).
    pub async fn patch_credentials(
        &self,
        id: &str,
        sandbox: &str,
        etag: &str,
        credentials: &AwsCredentials,
        token: &AccessToken,
    ) -> Result<Option<String>, FlowError> {
        Self::check_id(id)?;
        let url = self.url(id, false);
        let secret = credentials.secret_access_key.expose_secret();
        let session = credentials.session_token.expose_secret();
        let values = [credentials.access_key_id.as_str(), secret, session];
        /// One JSON Patch operation, written straight to the body.
        #[derive(serde::Serialize)]
        struct Replace<'a> {
            op: &'static str,
            path: &'static str,
            value: &'a str,
        }
        let ops = CREDENTIAL_PATHS
            .into_iter()
            .zip(values)
            .map(|(path, value)| Replace {
                op: "replace",
                path,
                value,
            });
        let body = serde_json::to_vec(&ops.collect::<Vec<_>>())
            .map_err(|e| FlowError::Malformed(format!("cannot encode the PATCH body: {e}")))?;
        let mut headers = self.headers(sandbox, token)?;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            IF_MATCH,
            HeaderValue::try_from(etag).map_err(|_| {
                FlowError::Malformed(format!(
                    "etag {} is not a valid header value; it is dropped and the connection re-read",
                    crate::remote::http::bounded(etag, 80)
                ))
            })?,
        );
        let request = self
            .http
            .request(Method::PATCH, url.clone())
            .headers(headers)
            .body(body);
        let Answer {
            status,
            retry_after,
            etag: etag_header,
            body: answer,
        } = self.send(request, &url).await?;
        if !status.is_success() {
            return Err(self.error_for(
                status,
                retry_after.as_ref(),
                &answer,
                id,
                sandbox,
                &[secret, session],
            ));
        }
        let parsed: PatchAnswer =
            serde_json::from_slice(&answer).unwrap_or(PatchAnswer { etag: None });
        // The body's etag (Flow Service's documented answer), else an `ETag`
        // header (a 204, or a body without one). One that cannot be sent
        // back is dropped: the next job then re-reads.
        let header = || {
            etag_header
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Ok(parsed
            .etag
            .filter(|etag| crate::ident::is_valid_etag(etag))
            .or_else(|| header().filter(|etag| crate::ident::is_valid_etag(etag))))
    }

    /// `POST /connections`: creates an S3 base connection with the `Access
    /// Key` auth spec holding `credentials` (see [`create_body`]). Through
    /// the request gate like every call; the answer body is read capped, a
    /// redirect is refused, and an error's detail is scrubbed of the secret
    /// key and session token. Answers the new connection's id and etag.
    pub async fn create_connection(
        &self,
        sandbox: &str,
        new: &NewConnection,
        credentials: &AwsCredentials,
        token: &AccessToken,
    ) -> Result<CreatedConnection, FlowError> {
        let url = self.url("", false);
        let mut url = url;
        if let Ok(mut segments) = url.path_segments_mut() {
            // `url("")` ends in `connections/`: the collection has no slash.
            segments.pop_if_empty();
        }
        let secret = credentials.secret_access_key.expose_secret();
        let session = credentials.session_token.expose_secret();
        let body = create_body(new, credentials);
        let mut headers = self.headers(sandbox, token)?;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let request = self
            .http
            .post(url.clone())
            .headers(headers)
            .body(body.to_string());
        let Answer {
            status,
            retry_after,
            etag: etag_header,
            body: answer,
        } = self.send(request, &url).await?;
        if !status.is_success() {
            return Err(self.error_for(
                status,
                retry_after.as_ref(),
                &answer,
                "",
                sandbox,
                &[secret, session],
            ));
        }
        parse_created(&answer, etag_header.as_ref().and_then(|v| v.to_str().ok()))
    }

    /// `GET /connections/{id}/test`: whether Flow Service can reach S3 with the
    /// stored credentials.
    pub async fn test_connection(
        &self,
        id: &str,
        sandbox: &str,
        token: &AccessToken,
    ) -> Result<bool, FlowError> {
        let body = self.get(id, sandbox, token, true).await?;
        serde_json::from_slice::<TestAnswer>(&body)
            .map(|answer| answer.result)
            .map_err(|e| {
                FlowError::Malformed(crate::remote::http::remote_text(&format!(
                    "test answer is not {{\"result\": bool}}: {e}"
                )))
            })
    }

    fn error_for(
        &self,
        status: StatusCode,
        retry_after: Option<&HeaderValue>,
        body: &[u8],
        id: &str,
        sandbox: &str,
        secrets: &[&str],
    ) -> FlowError {
        let detail = crate::remote::http::remote_text_with(
            &remote_detail(body),
            secrets,
            crate::remote::http::MAX_REMOTE_TEXT,
        );
        match status.as_u16() {
            401 => FlowError::Unauthorized(detail),
            412 => FlowError::PreconditionFailed,
            code @ (429 | 503) => {
                let retry_after = retry_after
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, crate::clock::wall_now()));
                self.gate.pause(retry_after.unwrap_or(self.default_pause));
                FlowError::Throttled {
                    status: code,
                    retry_after,
                }
            }
            code if status.is_server_error() => {
                FlowError::Unavailable(format!("HTTP {code}: {detail}"))
            }
            code => {
                let advice = match code {
                    403 => "; check that the Adobe credential has Experience Platform API access and that org_id is right".to_owned(),
                    404 => format!("; check that connection {id} exists in sandbox {sandbox:?}"),
                    _ => String::new(),
                };
                FlowError::Rejected {
                    status: code,
                    detail: format!("{detail}{advice}"),
                }
            }
        }
    }
}
