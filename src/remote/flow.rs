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
use crate::observe::telemetry::{Service, Telemetry};
use crate::policy::backoff::parse_retry_after;
use crate::remote::ims::{AccessToken, describe_reqwest_error, error_class};
use crate::remote::s3probe::S3Target;
use crate::remote::shaping::RequestGate;
use crate::remote::sts::AwsCredentials;

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
    telemetry: Arc<Telemetry>,
    /// How long everyone pauses after a 429 that carried no `Retry-After`.
    default_pause: Duration,
}

impl FlowClient {
    /// A client for `{platform_url}/data/foundation/flowservice`.
    pub fn new(
        http: reqwest::Client,
        adobe: &AdobeConfig,
        gate: Arc<RequestGate>,
        telemetry: Arc<Telemetry>,
        default_pause: Duration,
    ) -> Self {
        Self {
            http,
            base: adobe.platform_url.clone(),
            client_id: adobe.client_id.clone(),
            org_id: adobe.org_id.clone(),
            gate,
            telemetry,
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
            self.telemetry.request(Service::Flow, error_class(&e));
            FlowError::Unavailable(describe_reqwest_error(&e, url))
        })?;
        let status = response.status();
        self.telemetry.request(Service::Flow, status.as_str());
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
        let url = self.url(id, test);
        let request = self
            .http
            .get(url.clone())
            .headers(self.headers(sandbox, token)?);
        let Answer {
            status,
            retry_after,
            body,
            ..
        } = self.send(request, &url).await?;
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
            let request = self
                .http
                .get(page_url.clone())
                .headers(self.headers(sandbox, token)?);
            let Answer {
                status,
                retry_after,
                body,
                ..
            } = self.send(request, &page_url).await?;
            if !status.is_success() {
                return Err(self.error_for(status, retry_after.as_ref(), &body, "", sandbox, &[]));
            }
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

/// Reads `items[0]` of a `GET /connections/{id}` answer and checks it is an S3
/// connection with the `Access Key` auth spec.
pub fn parse_connection(body: &[u8]) -> Result<RemoteConnection, FlowError> {
    let wrapper: ListWrapper = serde_json::from_slice(body).map_err(|e| {
        // serde's message may quote a value from the body: scrub and bound it.
        FlowError::Malformed(crate::remote::http::remote_text(&format!(
            "GET answer is not {{\"items\": [...]}} JSON: {e}"
        )))
    })?;
    let item = wrapper.items.into_iter().next().ok_or_else(|| {
        FlowError::Malformed("GET answered an empty items list; check the connection id".to_owned())
    })?;
    let etag = item
        .get("etag")
        .and_then(Value::as_str)
        .filter(|etag| !etag.is_empty())
        .ok_or_else(|| FlowError::Malformed("GET answer has no etag".to_owned()))?;
    // It goes back in `If-Match`: one that cannot be sent is never kept.
    if !crate::ident::is_valid_etag(etag) {
        return Err(FlowError::Malformed(format!(
            "GET answer has an etag that is not a valid header value ({}); it is not kept",
            crate::remote::http::bounded(etag, 80)
        )));
    }
    let spec = item.pointer("/connectionSpec/id").and_then(Value::as_str);
    if !is_s3_spec(spec) {
        let spec = spec.unwrap_or("(none)");
        return Err(FlowError::Unsuitable(format!(
            "its connection spec is {}, not Amazon S3 ({S3_CONNECTION_SPEC_ID}); check the id",
            crate::remote::http::bounded(spec, 80)
        )));
    }
    let auth = item.pointer("/auth/specName").and_then(Value::as_str);
    if !is_access_key_auth(auth) {
        let auth = auth.unwrap_or("(none)");
        return Err(FlowError::Unsuitable(format!(
            "its auth spec is \"{}\", not \"Access Key\"; only access-key connections hold temporary credentials",
            crate::remote::http::bounded(auth, 80)
        )));
    }
    Ok(RemoteConnection {
        etag: etag.to_owned(),
        name: item
            .get("name")
            .and_then(Value::as_str)
            .map(crate::ident::remote_name),
        s3: s3_target(&item),
    })
}

/// `auth.params` `bucketName` / `folderPath` / `serviceUrl` of a connection
/// `GET` answer; `None` without a `bucketName`.
fn s3_target(item: &Value) -> Option<S3Target> {
    let params = item.pointer("/auth/params")?;
    let param = |name: &str| params.get(name).and_then(Value::as_str);
    s3_target_of(
        param("bucketName"),
        param("folderPath"),
        param("serviceUrl"),
    )
}

/// The S3 target of a connection's parameters, each trimmed (blank =
/// absent); `None` without a bucket.
fn s3_target_of(
    bucket: Option<&str>,
    folder: Option<&str>,
    service_url: Option<&str>,
) -> Option<S3Target> {
    let given = |v: Option<&str>| {
        v.map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    given(bucket).map(|bucket| S3Target {
        bucket,
        folder: given(folder),
        service_url: given(service_url),
    })
}

/// What `POST /connections` creates besides the credentials: the non-secret
/// parts of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConnection {
    /// `name` (non-empty).
    pub name: String,
    /// `description`, sent only when given.
    pub description: Option<String>,
    /// `auth.params.bucketName`.
    pub bucket: String,
    /// `auth.params.folderPath`, sent only when given.
    pub folder: Option<String>,
    /// `auth.params.serviceUrl`, sent only when given.
    pub service_url: Option<String>,
}

/// The answer to `POST /connections`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedConnection {
    /// The new base connection id.
    pub id: String,
    /// Its etag, with literal quotes, for the first `If-Match`: the body's
    /// `etag`, else the `ETag` header; `None` when neither is usable (the
    /// connection exists all the same; the daemon reads it with `GET`).
    pub etag: Option<String>,
}

/// The `POST /connections` body of the S3 tutorial: the three credentials,
/// the bucket, and only the optional values that were given.
pub fn create_body(new: &NewConnection, credentials: &AwsCredentials) -> Value {
    let mut params = serde_json::Map::new();
    params.insert("s3AccessKey".into(), json!(credentials.access_key_id));
    params.insert(
        "s3SecretKey".into(),
        json!(credentials.secret_access_key.expose_secret()),
    );
    params.insert(
        "s3SessionToken".into(),
        json!(credentials.session_token.expose_secret()),
    );
    params.insert("bucketName".into(), json!(new.bucket));
    if let Some(folder) = &new.folder {
        params.insert("folderPath".into(), json!(folder));
    }
    if let Some(url) = &new.service_url {
        params.insert("serviceUrl".into(), json!(url));
    }
    let mut body = serde_json::Map::new();
    body.insert("name".into(), json!(new.name));
    if let Some(description) = &new.description {
        body.insert("description".into(), json!(description));
    }
    body.insert(
        "auth".into(),
        json!({"specName": ACCESS_KEY_AUTH_SPEC, "params": params}),
    );
    body.insert(
        "connectionSpec".into(),
        json!({"id": S3_CONNECTION_SPEC_ID, "version": "1.0"}),
    );
    Value::Object(body)
}

/// Reads `{"id", "etag"}` of a `POST /connections` answer, checked: an id
/// that can go in a path, an etag that can go back in `If-Match` (from the
/// body, else `etag_header`). A 2xx with a usable id means created: a
/// missing etag is not a failure (a script that retried `create` on it
/// would make a second connection).
pub fn parse_created(
    body: &[u8],
    etag_header: Option<&str>,
) -> Result<CreatedConnection, FlowError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        FlowError::Malformed(crate::remote::http::remote_text(&format!(
            "create answer is not JSON: {e}"
        )))
    })?;
    let id = value
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| crate::ident::is_connection_id(id))
        .ok_or_else(|| {
            FlowError::Malformed(
                "create answer has no usable \"id\"; look for the connection in the Platform UI before creating it again".to_owned(),
            )
        })?;
    let etag = value
        .get("etag")
        .and_then(Value::as_str)
        .filter(|etag| crate::ident::is_valid_etag(etag))
        .or_else(|| etag_header.filter(|etag| crate::ident::is_valid_etag(etag)))
        .map(str::to_owned);
    Ok(CreatedConnection {
        id: id.to_owned(),
        etag,
    })
}

/// One page of `GET /connections`: its usable items and the next page's
/// continuation token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// Items with an id and an etag.
    pub items: Vec<ListedConnection>,
    /// From `_links.next.href`; `None` = last page.
    pub next: Option<String>,
}

/// Parses a `GET /connections` page leniently (unknown fields skipped, a
/// field of the wrong type read as absent, unusable items skipped) but
/// checks what is used. Typed, not through `serde_json::Value`: only the
/// fields used are built.
pub fn parse_list_page(body: &[u8]) -> Result<ListPage, FlowError> {
    use crate::remote::lenient::{Array, Object, Text};

    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Page {
        items: Array<Object<Item>>,
        #[serde(rename = "_links")]
        links: Object<Links>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Links {
        next: Object<Next>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Next {
        href: Option<Value>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Item {
        id: Text,
        etag: Text,
        name: Text,
        description: Text,
        state: Text,
        auth: Object<Auth>,
        #[serde(rename = "connectionSpec")]
        connection_spec: Object<Spec>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Auth {
        #[serde(rename = "specName")]
        spec_name: Text,
        params: Object<Params>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Params {
        #[serde(rename = "bucketName")]
        bucket_name: Text,
        #[serde(rename = "folderPath")]
        folder_path: Text,
        #[serde(rename = "serviceUrl")]
        service_url: Text,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Spec {
        id: Text,
    }

    let Object(page) = serde_json::from_slice::<Object<Page>>(body)
        .map_err(|e| FlowError::Malformed(format!("list answer is not JSON: {e}")))?;
    let Some(Page {
        items: Array(Some(items)),
        links,
    }) = page
    else {
        return Err(FlowError::Malformed(
            "list answer has no \"items\" array".to_owned(),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for Object(item) in items {
        let Some(item) = item else {
            tracing::debug!("list item that is not an object skipped");
            continue;
        };
        // Only what matching and the job need is kept, each part checked or
        // bounded (issue 26): a page is 1 MiB, a listing up to
        // `MAX_LISTED_ITEMS` of these.
        let id = item.id.0.filter(|id| crate::ident::is_connection_id(id));
        let etag = item.etag.0.filter(|etag| crate::ident::is_valid_etag(etag));
        let (Some(id), Some(etag)) = (id, etag) else {
            tracing::debug!("list item without a usable id or etag skipped");
            continue;
        };
        let auth = item.auth.0.unwrap_or_default();
        out.push(ListedConnection {
            id,
            etag,
            name: item.name.0.as_deref().map(crate::ident::remote_name),
            description: item.description.0.map(|d| cut(d, MAX_LISTED_DESCRIPTION)),
            auth_spec: auth.spec_name.0.map(|s| cut(s, MAX_LISTED_WORD)),
            state: item.state.0.map(|s| cut(s, MAX_LISTED_WORD)),
            connection_spec_id: item
                .connection_spec
                .0
                .and_then(|spec| spec.id.0)
                .map(|s| cut(s, MAX_LISTED_WORD)),
            s3: auth.params.0.and_then(|params| {
                let fits =
                    |v: &Option<String>, max: usize| v.as_ref().is_none_or(|v| v.len() <= max);
                // A target that cannot be real is not kept: the job GETs.
                (fits(&params.bucket_name.0, MAX_LISTED_BUCKET)
                    && fits(&params.folder_path.0, MAX_LISTED_FOLDER)
                    && fits(&params.service_url.0, MAX_LISTED_URL))
                .then(|| {
                    s3_target_of(
                        params.bucket_name.0.as_deref(),
                        params.folder_path.0.as_deref(),
                        params.service_url.0.as_deref(),
                    )
                })
                .flatten()
            }),
        });
    }
    let href = links
        .0
        .and_then(|links| links.next.0)
        .and_then(|next| next.href);
    let next = match href {
        None | Some(Value::Null) => None,
        // An empty link is no link: some servers keep the key on the last page.
        Some(Value::String(href)) if href.trim().is_empty() => None,
        Some(Value::String(href)) => Some(continuation_token(&href)?),
        Some(_) => {
            return Err(FlowError::Malformed(
                "list answer's _links.next.href is not a string".to_owned(),
            ));
        }
    };
    Ok(ListPage { items: out, next })
}

/// The most bytes of a listed description that are kept: it is only
/// searched for a rule's `description_tag` (never shown), and a tag is a
/// word near the start; 1 KiB keeps a listing's memory bounded.
pub const MAX_LISTED_DESCRIPTION: usize = 1024;
/// The most bytes kept of a listed `state`, `auth.specName` or
/// `connectionSpec.id`: only compared with short known values.
const MAX_LISTED_WORD: usize = 64;
/// S3's longest bucket name (legacy us-east-1 names).
const MAX_LISTED_BUCKET: usize = 255;
/// S3's longest key is 1,024 bytes; a folder is a prefix of one.
const MAX_LISTED_FOLDER: usize = 1024;
/// A `serviceUrl` is a host and a scheme; 2 KiB is far beyond any real one.
const MAX_LISTED_URL: usize = 2048;

/// The connections one listing may keep: 20,000 is twice the largest
/// deployment this daemon is built for (10,000 connections); more means a
/// server looping or padding. Beyond it the listing fails and the
/// sandbox keeps its last known set.
pub const MAX_LISTED_ITEMS: usize = 20_000;
/// The bytes one listing may keep (the strings of its items, see
/// [`ListedConnection::footprint`]): 10,000 real items are about 1.5 MiB;
/// 4 MiB leaves room for long names and descriptions and keeps a sandbox
/// listing, alive or as its last known set, well inside a small container
/// (sandboxes list side by side).
pub const MAX_LISTED_BYTES: usize = 4 << 20;
/// The bytes of answers one listing may read (kept or not): 200 full pages.
/// A padded or endless listing fails here instead of reading 1,000 MiB.
pub const MAX_LISTING_READ: usize = 200 << 20;

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.shrink_to_fit();
    }
    text
}

/// The longest continuation token followed: every token of a listing is
/// remembered (to catch a loop), so its size is bounded; real ones are a
/// few hundred bytes.
const MAX_CONTINUATION_TOKEN: usize = 4096;

/// The `continuationToken` query parameter of a next-page href (relative,
/// like `/connections?continuationToken=...`, or absolute).
fn continuation_token(href: &str) -> Result<String, FlowError> {
    let base = Url::parse("http://flowservice.invalid/")
        .map_err(|e| FlowError::Malformed(format!("cannot build a base URL: {e}")))?;
    let url = base.join(href).map_err(|e| {
        FlowError::Malformed(format!(
            "next-page href {} is not a URL: {e}",
            crate::remote::http::bounded(href, 80)
        ))
    })?;
    url.query_pairs()
        .find(|(k, _)| k == "continuationToken")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty() && v.len() <= MAX_CONTINUATION_TOKEN)
        .ok_or_else(|| {
            FlowError::Malformed(format!(
                "next-page href {} has no usable continuationToken",
                crate::remote::http::bounded(href, 80)
            ))
        })
}

/// The most useful line of an error body: Flow Service's `detailed-message`
/// or `title`, the gateway's `error_code`/`message`, or the start of the body.
fn remote_detail(body: &[u8]) -> String {
    // Not cut here: the caller scrubs secrets first, then bounds the text
    // (cutting first could leave the prefix of an echoed secret).
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        let text = String::from_utf8_lossy(body).into_owned();
        return if text.trim().is_empty() {
            "empty body".to_owned()
        } else {
            text
        };
    };
    let text = |pointer: &str| {
        value
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    if let Some(message) = text("/report/detailed-message").or_else(|| text("/title")) {
        return message;
    }
    if let Some(message) = text("/message") {
        return match text("/error_code") {
            Some(code) => format!("{message} (error_code {code})"),
            None => message,
        };
    }
    text("/errorMessage").unwrap_or_else(|| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(spec: &str, auth: &str) -> String {
        json!({"items": [{
            "id": "c1", "name": "S3", "etag": "\"1700d77b-0000\"",
            "connectionSpec": {"id": spec, "version": "1.0"},
            "auth": {"specName": auth, "params": {"bucketName": "b"}}
        }]})
        .to_string()
    }

    #[test]
    fn reads_items_0_and_keeps_the_etag_quotes() {
        let parsed =
            parse_connection(item(S3_CONNECTION_SPEC_ID, "Access Key").as_bytes()).unwrap();
        assert_eq!(parsed.etag, "\"1700d77b-0000\"");
        assert_eq!(
            parsed.s3,
            Some(S3Target {
                bucket: "b".into(),
                folder: None,
                service_url: None
            })
        );
    }

    #[test]
    fn keeps_the_non_secret_s3_parameters_only() {
        let body = json!({"items": [{
            "etag": "\"e\"",
            "connectionSpec": {"id": S3_CONNECTION_SPEC_ID},
            "auth": {"specName": "Access Key", "params": {
                "bucketName": "sales", "folderPath": "/landing", "serviceUrl": "https://s3.eu-west-1.amazonaws.com",
                "s3AccessKey": "AKIAEXAMPLE", "s3SecretKey": "never-kept-secret"
            }}
        }]});
        let parsed = parse_connection(body.to_string().as_bytes()).unwrap();
        let target = parsed.s3.unwrap();
        assert_eq!(target.bucket, "sales");
        assert_eq!(target.folder.as_deref(), Some("/landing"));
        assert_eq!(
            target.service_url.as_deref(),
            Some("https://s3.eu-west-1.amazonaws.com")
        );
        assert!(!format!("{target:?}").contains("never-kept-secret"));
        // No bucket: nothing to check against.
        let body = item(S3_CONNECTION_SPEC_ID, "Access Key").replace("\"bucketName\":\"b\"", "");
        assert_eq!(parse_connection(body.as_bytes()).unwrap().s3, None);
    }

    #[test]
    fn refuses_non_s3_and_non_access_key_connections() {
        let err = parse_connection(item("other-spec", "Access Key").as_bytes()).unwrap_err();
        assert!(
            matches!(err, FlowError::Unsuitable(ref m) if m.contains("other-spec")),
            "{err}"
        );
        let err =
            parse_connection(item(S3_CONNECTION_SPEC_ID, "IAMRole Based").as_bytes()).unwrap_err();
        assert!(
            matches!(err, FlowError::Unsuitable(ref m) if m.contains("IAMRole Based")),
            "{err}"
        );
    }

    #[test]
    fn spec_auth_and_state_are_compared_without_regard_to_case() {
        let upper = S3_CONNECTION_SPEC_ID.to_ascii_uppercase();
        for (spec, auth) in [
            (upper.as_str(), "access key"),
            (S3_CONNECTION_SPEC_ID, " ACCESS KEY "),
        ] {
            parse_connection(item(spec, auth).as_bytes()).unwrap();
        }
        let listed = |spec: &str, auth: &str, state: Option<&str>| ListedConnection {
            id: "a".to_owned(),
            etag: "\"e\"".to_owned(),
            name: None,
            description: None,
            auth_spec: Some(auth.to_owned()),
            state: state.map(str::to_owned),
            connection_spec_id: Some(spec.to_owned()),
            s3: None,
        };
        assert!(listed(&upper, "Access key", Some("Enabled")).is_rotatable_s3());
        assert!(listed(S3_CONNECTION_SPEC_ID, "Access Key", Some("ENABLED")).is_rotatable_s3());
        for (spec, auth, state) in [
            (S3_CONNECTION_SPEC_ID, "Access Key", Some("disabled")),
            (S3_CONNECTION_SPEC_ID, "Access Key", None),
            (S3_CONNECTION_SPEC_ID, "Access Keys", Some("enabled")),
            ("ecadc60c", "Access Key", Some("enabled")),
        ] {
            assert!(
                !listed(spec, auth, state).is_rotatable_s3(),
                "{spec} {auth} {state:?}"
            );
        }
        assert!(listed(S3_CONNECTION_SPEC_ID, "Access Key", None).is_s3_access_key());
    }

    #[test]
    fn unexpected_shapes_are_malformed() {
        for body in [
            "not json",
            "{\"items\": []}",
            "{\"items\": [{\"id\": \"x\"}]}",
            "{\"id\": \"x\"}",
        ] {
            let err = parse_connection(body.as_bytes()).unwrap_err();
            assert!(matches!(err, FlowError::Malformed(_)), "{body}: {err}");
        }
    }

    #[test]
    fn listed_items_keep_only_bounded_checked_parts() {
        // Issue 26 #1, #2, #3: ids `.`/`..` and of 3,000 characters were
        // kept; names and descriptions were kept whole and raw.
        let huge = "p".repeat(300_000);
        let body = serde_json::json!({"items": [
            {"id": ".", "etag": "\"e\""},
            {"id": "..", "etag": "\"e\""},
            {"id": "x".repeat(3000), "etag": "\"e\""},
            {"id": "ok", "etag": "bad\netag"},
            {"id": "kept", "etag": "\"e\"",
             "name": format!("n\n{{\"message\":\"credentials rotated\"}}\u{1b}]0;t\u{7}{huge}"),
             "description": format!("rotate:aep-s3 {huge}"),
             "state": huge.clone(),
             "auth": {"specName": "Access Key", "params": {"bucketName": huge.clone()}}}
        ]})
        .to_string();
        let page = parse_list_page(body.as_bytes()).unwrap();
        assert_eq!(
            page.items.len(),
            1,
            "{:?}",
            page.items.iter().map(|i| i.id.len()).collect::<Vec<_>>()
        );
        let item = &page.items[0];
        let name = item.name.as_deref().unwrap();
        assert!(!name.chars().any(char::is_control), "{name}");
        assert!(name.len() < 300, "{}", name.len());
        assert!(
            item.description
                .as_deref()
                .unwrap()
                .starts_with("rotate:aep-s3 ")
        );
        assert!(item.footprint() < 4096, "{}", item.footprint());
        assert_eq!(
            item.s3, None,
            "a bucket name no bucket can have is not kept"
        );
    }

    #[test]
    fn list_pages_parse_leniently_and_keep_what_is_used() {
        let body = json!({
            "items": [
                {"id": "a", "etag": "\"e1\"", "name": "ingest-a", "description": "rotate:aep-s3",
                 "state": "enabled", "connectionSpec": {"id": S3_CONNECTION_SPEC_ID},
                 "auth": {"specName": "Access Key"}, "extra": [1, 2]},
                {"id": "", "etag": "\"x\""},
                {"id": "no-etag"},
                {"id": "b/../c", "etag": "\"x\""},
                {"id": "d", "etag": "\"e2\"", "state": "disabled"},
                "not an object"
            ],
            "_links": {"next": {"href": "/connections?continuationToken=tok%3D1&limit=2"}}
        });
        let page = parse_list_page(body.to_string().as_bytes()).unwrap();
        assert_eq!(page.next.as_deref(), Some("tok=1"));
        assert_eq!(page.items.len(), 2);
        assert!(page.items[0].is_rotatable_s3());
        assert_eq!(page.items[0].etag, "\"e1\"");
        assert!(!page.items[1].is_rotatable_s3());
        for last in [
            r#"{"items": [], "_links": {}}"#,
            r#"{"items": [], "_links": {"next": null}}"#,
            r#"{"items": [], "_links": {"next": {"href": null}}}"#,
            r#"{"items": [], "_links": {"next": {"href": ""}}}"#,
            r#"{"items": []}"#,
        ] {
            assert_eq!(
                parse_list_page(last.as_bytes()).unwrap().next,
                None,
                "{last}"
            );
        }
        for bad in [
            r#"{"items": {}}"#,
            "[]",
            r#"{"items": [], "_links": {"next": {"href": "/connections?limit=2"}}}"#,
            r#"{"items": [], "_links": {"next": {"href": 5}}}"#,
            // A key given twice is ambiguous: the page is refused (the
            // listing then counts as failed and drops nothing).
            r#"{"items": [{"id": "a", "id": "b", "etag": "\"e\""}]}"#,
        ] {
            assert!(
                matches!(
                    parse_list_page(bad.as_bytes()),
                    Err(FlowError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn create_body_is_the_tutorials_with_only_the_given_options() {
        let credentials = AwsCredentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "sk".to_owned().into(),
            session_token: "st".to_owned().into(),
            expiration: std::time::SystemTime::UNIX_EPOCH,
        };
        let mut new = NewConnection {
            name: "n".into(),
            description: None,
            bucket: "b-1".into(),
            folder: None,
            service_url: None,
        };
        assert_eq!(
            create_body(&new, &credentials),
            json!({"name": "n",
                "auth": {"specName": "Access Key", "params": {
                    "s3AccessKey": "ASIAEXAMPLE", "s3SecretKey": "sk", "s3SessionToken": "st",
                    "bucketName": "b-1"}},
                "connectionSpec": {"id": S3_CONNECTION_SPEC_ID, "version": "1.0"}})
        );
        new.description = Some("d".into());
        new.folder = Some("in/".into());
        new.service_url = Some("https://s3.eu-west-1.amazonaws.com".into());
        let body = create_body(&new, &credentials);
        assert_eq!(body["description"], "d");
        assert_eq!(body["auth"]["params"]["folderPath"], "in/");
        assert_eq!(
            body["auth"]["params"]["serviceUrl"],
            "https://s3.eu-west-1.amazonaws.com"
        );
    }

    #[test]
    fn created_answers_are_checked() {
        let ok =
            parse_created(br#"{"id": "69f188b6", "etag": "\"6802064a-0000\""}"#, None).unwrap();
        assert_eq!(ok.id, "69f188b6");
        assert_eq!(ok.etag.as_deref(), Some("\"6802064a-0000\""));
        for bad in [
            "nope",
            "{}",
            r#"{"id": "", "etag": "\"e\""}"#,
            r#"{"id": "a/../b", "etag": "\"e\""}"#,
            r#"{"id": "..", "etag": "\"e\""}"#,
            r#"{"id": "a\u001b[2J", "etag": "\"e\""}"#,
        ] {
            assert!(
                matches!(
                    parse_created(bad.as_bytes(), None),
                    Err(FlowError::Malformed(_))
                ),
                "{bad}"
            );
        }
        let long = format!(r#"{{"id": "{}"}}"#, "x".repeat(3000));
        assert!(parse_created(long.as_bytes(), None).is_err());
    }

    #[test]
    fn a_created_answer_with_an_id_is_created_whatever_its_etag() {
        // Issue 26 #5: a 201 with an id but no body etag was a failure.
        let header = parse_created(br#"{"id": "a"}"#, Some("\"h\"")).unwrap();
        assert_eq!(header.etag.as_deref(), Some("\"h\""));
        let none = parse_created(br#"{"id": "a"}"#, None).unwrap();
        assert_eq!((none.id.as_str(), none.etag), ("a", None));
        let bad = parse_created(br#"{"id": "a", "etag": "bad\netag"}"#, None).unwrap();
        assert_eq!(bad.etag, None);
    }

    #[test]
    fn filters_render_as_documented() {
        assert_eq!(
            PropertyFilter::s3().render().unwrap(),
            format!("connectionSpec.id=={S3_CONNECTION_SPEC_ID}")
        );
        assert_eq!(PropertyFilter::ids(["a", "b"]).render().unwrap(), "id==a,b");
        assert!(PropertyFilter::ids(["a,b"]).render().is_err());
        assert!(PropertyFilter::ids([]).render().is_err());
    }

    #[test]
    fn remote_detail_prefers_the_documented_fields() {
        let flow = br#"{"type":"x","title":"Not Found","status":404,"report":{"detailed-message":"Connection c1 not found"}}"#;
        assert_eq!(remote_detail(flow), "Connection c1 not found");
        let gateway = br#"{"error_code":"401013","message":"Oauth token is not valid"}"#;
        assert_eq!(
            remote_detail(gateway),
            "Oauth token is not valid (error_code 401013)"
        );
        assert_eq!(remote_detail(b""), "empty body");
    }

    #[test]
    fn echoed_secrets_are_scrubbed() {
        assert_eq!(
            crate::remote::http::remote_text_with(
                "bad value s3cr3t-value!",
                &["s3cr3t-value", ""],
                300
            ),
            "bad value [redacted]!"
        );
    }
}
