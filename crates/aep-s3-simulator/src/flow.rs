//! Simulated Flow Service: `GET`/`PATCH /connections/{id}`,
//! `GET /connections/{id}/test`, and `GET /_sim/stats` and `GET /_sim/patches`
//! for scripts.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::body::to_bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::net::ConnCtl;
use super::state::{Conn, RandomFault, RequestKind, Shared, State as SimState, TokenStatus};
use super::wire::{
    self, MAX_BODY, contains_bytes, has_content_type, header, request_id, retry_after_value,
    unix_millis, with_retry_after,
};
use super::{ScriptedFault, SimEvent, SimService};

/// Where base connections live.
const CONNECTIONS_PREFIX: &str = "/data/foundation/flowservice/connections/";
/// The figures endpoint for scripts (no auth).
const STATS_PATH: &str = "/_sim/stats";
/// Who PATCHed what, for scripts (no auth).
const PATCHES_PATH: &str = "/_sim/patches";
/// The three credential fields a PATCH must replace, together.
const CREDENTIAL_PATHS: [&str; 3] = [
    "/auth/params/s3AccessKey",
    "/auth/params/s3SecretKey",
    "/auth/params/s3SessionToken",
];

/// The Flow Service router (everything goes through one handler, so every
/// answer, even to a wrong path, is the documented shape).
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// Which endpoint a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    /// `/connections` (list)
    List,
    /// `/connections/{id}`
    Connection(&'a str),
    /// `/connections/{id}/test`
    Test(&'a str),
    /// `/connections/{id}/` (the OpenAPI spec's mistake)
    TrailingSlash(&'a str),
    /// `/_sim/stats`
    Stats,
    /// `/_sim/patches`
    Patches,
    /// Anything else.
    Unknown,
}

impl<'a> Route<'a> {
    fn parse(path: &'a str) -> Self {
        if path == STATS_PATH {
            return Route::Stats;
        }
        if path == PATCHES_PATH {
            return Route::Patches;
        }
        if Some(path) == CONNECTIONS_PREFIX.strip_suffix('/') {
            return Route::List;
        }
        let Some(rest) = path.strip_prefix(CONNECTIONS_PREFIX) else {
            return Route::Unknown;
        };
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(id), None, None) if !id.is_empty() => Route::Connection(id),
            (Some(id), Some(""), None) if !id.is_empty() => Route::TrailingSlash(id),
            (Some(id), Some("test"), None) if !id.is_empty() => Route::Test(id),
            _ => Route::Unknown,
        }
    }

    fn connection(self) -> Option<&'a str> {
        match self {
            Route::Connection(id) | Route::Test(id) | Route::TrailingSlash(id) => Some(id),
            Route::List | Route::Stats | Route::Patches | Route::Unknown => None,
        }
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(ctl): ConnectInfo<ConnCtl>,
    request: Request,
) -> Response {
    let route = Route::parse(request.uri().path());
    if request.method() == Method::GET {
        match route {
            Route::Stats => return wire::json(200, &json!(shared.stats())),
            Route::Patches => return wire::json(200, &json!(shared.patches())),
            _ => {}
        }
    }
    // A PATCH of a connection that does not end in a stored credential is
    // counted against the client that made it (accepted ones are logged by
    // `patch` itself, with the key stored).
    let is_patch = request.method() == Method::PATCH && matches!(route, Route::Connection(_));
    let bearer = is_patch
        .then(|| header(request.headers(), "authorization"))
        .flatten()
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::to_owned);
    let response = serve(&shared, &ctl, request).await;
    if is_patch {
        let status = if ctl.was_reset() {
            Some("reset".to_owned())
        } else {
            let status = response.status();
            (!status.is_success()).then(|| status.as_u16().to_string())
        };
        if let Some(status) = status {
            shared
                .lock()
                .record_patch_refused(bearer.as_deref(), &status);
        }
    }
    response
}

/// Answers one Flow request (every fault, script and check applied).
async fn serve(shared: &Arc<Shared>, ctl: &ConnCtl, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let route = Route::parse(parts.uri.path());
    if shared.refuses(SimService::Flow) {
        return ctl.reset();
    }
    let _in_flight = shared.enter_flow();
    let connection = route.connection().map(str::to_owned);
    let connection = connection.as_deref();
    let kind = match (route, &parts.method) {
        (Route::Connection(_), &Method::GET) => RequestKind::FlowGet,
        (Route::List, &Method::GET) => RequestKind::FlowList,
        _ => RequestKind::FlowOther,
    };
    let plan = shared.plan(SimService::Flow, connection, kind);
    crate::pace::wait(plan.latency, plan.arrived).await;
    let Ok(body) = to_bytes(body, MAX_BODY).await else {
        // The client went away or sent more than any real request: drop it.
        return ctl.reset();
    };
    let mut churn = plan.churn;
    let mut invalid_etag = false;
    let mut etag_in_header = false;
    let delay = match plan.script {
        Some(ScriptedFault::Redirect { location }) => {
            return shared.finish(connection, wire::redirect(&location));
        }
        Some(ScriptedFault::EndlessBody) => return wire::endless_body(),
        Some(ScriptedFault::EchoSecrets) => {
            let bearer = wire::header(&parts.headers, "authorization").unwrap_or_default();
            let session = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|ops| {
                    ops.as_array()?.iter().find_map(|op| {
                        (op.get("path")?.as_str()? == "/auth/params/s3SessionToken")
                            .then(|| op.get("value")?.as_str().map(str::to_owned))?
                    })
                })
                .unwrap_or_default();
            let text = format!(
                "{}upstream rejected {{\"authorization\":\"{bearer}\",\"s3SessionToken\":\"{}\"}}",
                "p".repeat(290),
                wire::json_escaped(&session)
            );
            return shared.finish(connection, wire::response(502, "text/plain", text));
        }
        Some(ScriptedFault::HostileText { len }) => {
            let response = wire::json(
                400,
                &json!({
                    "type": "https://ns.adobe.com/aep/errors/FLOW-1400-400",
                    "title": "Bad Request",
                    "status": 400,
                    "report": { "detailed-message": wire::hostile_text(len, false) },
                }),
            );
            return shared.finish(connection, response);
        }
        Some(ScriptedFault::InvalidEtag) => {
            invalid_etag = true;
            None
        }
        Some(ScriptedFault::EtagInHeader) => {
            etag_in_header = true;
            None
        }
        Some(ScriptedFault::Reset) => return shared.reset(ctl, connection),
        Some(ScriptedFault::Status {
            status,
            retry_after,
            body,
        }) => {
            let response = match body {
                Some(body) => wire::response(status, "application/json", body),
                None => default_error(status, connection, parts.headers.get("x-sandbox-name")),
            };
            let response = with_retry_after(response, retry_after.map(retry_after_value));
            return shared.finish(connection, response);
        }
        Some(ScriptedFault::StsError { status, .. }) => {
            let response = default_error(status, connection, parts.headers.get("x-sandbox-name"));
            return shared.finish(connection, response);
        }
        Some(ScriptedFault::Raw {
            status,
            content_type,
            body,
        }) => return shared.finish(connection, wire::response(status, &content_type, body)),
        Some(ScriptedFault::Delay(delay)) => Some(delay),
        Some(ScriptedFault::EtagChurn) => {
            churn = true;
            None
        }
        // Never taken for Flow (see `take_matching`); answer normally.
        Some(ScriptedFault::ShortCredentials(_) | ScriptedFault::PartialCredentials { .. })
        | None => match plan.random {
            RandomFault::None => None,
            RandomFault::Slow(delay) => Some(delay),
            RandomFault::Reset => return shared.reset(ctl, connection),
            RandomFault::Throttle => {
                let response = default_error(429, connection, None);
                let retry_after = plan.retry_after_secs.map(|s| s.to_string());
                return shared.finish(connection, with_retry_after(response, retry_after));
            }
            RandomFault::ServerError(status) => {
                let response = default_error(status, connection, None);
                let retry_after = plan
                    .retry_after_secs
                    .filter(|_| status == 503)
                    .map(|s| s.to_string());
                return shared.finish(connection, with_retry_after(response, retry_after));
            }
        },
    };
    if let Some(delay) = delay {
        shared.lock().event(SimEvent::Delayed {
            service: SimService::Flow,
            connection: connection.map(str::to_owned),
            delay,
            at: SystemTime::now(),
        });
        tokio::time::sleep(delay).await;
    }
    let mut response = shared.flow_answer(&parts, route, &body);
    if invalid_etag && response.status().is_success() {
        response = with_invalid_etag(response).await;
    }
    if etag_in_header && response.status().is_success() {
        response = with_etag_in_header(response).await;
    }
    if churn
        && kind == RequestKind::FlowGet
        && response.status().is_success()
        && let Some(id) = connection
    {
        shared.bump_etag(id);
    }
    shared.finish(connection, response)
}

/// The same GET answer with `items[0].etag` replaced by
/// [`wire::INVALID_ETAG`].
async fn with_invalid_etag(response: Response) -> Response {
    let (parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_BODY).await else {
        return wire::json(500, &json!({"title": "simulator: unreadable answer"}));
    };
    let mut value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if let Some(item) = value.pointer_mut("/items/0") {
        item["etag"] = Value::String(wire::INVALID_ETAG.to_owned());
    }
    let mut response = wire::json(parts.status.as_u16(), &value);
    *response.headers_mut() = parts.headers;
    response
        .headers_mut()
        .remove(axum::http::header::CONTENT_LENGTH);
    response
}

/// The same successful answer as `204 No Content`, its body's `etag` moved
/// to an `ETag` header.
async fn with_etag_in_header(response: Response) -> Response {
    let Ok(bytes) = to_bytes(response.into_body(), MAX_BODY).await else {
        return wire::json(500, &json!({"title": "simulator: unreadable answer"}));
    };
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let mut response =
        axum::response::IntoResponse::into_response(axum::http::StatusCode::NO_CONTENT);
    if let Some(etag) = value["etag"]
        .as_str()
        .and_then(|etag| axum::http::HeaderValue::from_str(etag).ok())
    {
        response
            .headers_mut()
            .insert(axum::http::header::ETAG, etag);
    }
    response
}

impl Shared {
    /// Resets a Flow connection and records it.
    fn reset(&self, ctl: &ConnCtl, connection: Option<&str>) -> Response {
        let mut st = self.lock();
        st.counters.flow_resets += 1;
        st.event(SimEvent::Reset {
            service: SimService::Flow,
            connection: connection.map(str::to_owned),
            at: SystemTime::now(),
        });
        ctl.reset()
    }

    /// Counts a Flow answer by status and records the notable ones.
    fn finish(&self, connection: Option<&str>, response: Response) -> Response {
        let status = response.status().as_u16();
        let connection = connection.map(str::to_owned);
        let at = SystemTime::now();
        let mut st = self.lock();
        match status {
            401 => {
                st.counters.flow_401 += 1;
                st.event(SimEvent::Unauthorized { connection, at });
            }
            412 => {
                st.counters.flow_412 += 1;
                if let Some(connection) = connection {
                    st.event(SimEvent::Conflict { connection, at });
                }
            }
            429 => {
                st.counters.flow_429 += 1;
                let retry_after =
                    header(response.headers(), RETRY_AFTER.as_str()).map(str::to_owned);
                st.event(SimEvent::Throttled {
                    service: SimService::Flow,
                    connection,
                    retry_after,
                    at,
                });
            }
            500..=599 => {
                st.counters.flow_5xx += 1;
                st.event(SimEvent::ServerError {
                    service: SimService::Flow,
                    connection,
                    status,
                    at,
                });
            }
            400..=499 => st.event(SimEvent::Rejected {
                service: SimService::Flow,
                connection,
                status,
                at,
            }),
            _ => {}
        }
        response
    }

    /// The real answer to a Flow request, checked strictly.
    fn flow_answer(&self, parts: &Parts, route: Route<'_>, body: &[u8]) -> Response {
        let now = SystemTime::now();
        let what = format!("Flow {} {}", parts.method, parts.uri.path());
        let mut guard = self.lock();
        let st = &mut *guard;

        let leaks = |secret: &[u8]| {
            contains_bytes(body, secret)
                || parts
                    .headers
                    .values()
                    .any(|v| contains_bytes(v.as_bytes(), secret))
                || parts
                    .uri
                    .query()
                    .is_some_and(|q| contains_bytes(q.as_bytes(), secret))
        };
        if self
            .clients()
            .iter()
            .any(|(_, secret)| leaks(secret.as_bytes()))
        {
            st.violation(format!(
                "{what}: the IMS client secret was sent to Flow Service"
            ));
        }

        if let Some(answer) = self.check_gateway(st, &parts.headers, &what) {
            return answer;
        }
        let Some(sandbox) = header(&parts.headers, "x-sandbox-name").filter(|s| !s.is_empty())
        else {
            st.violation(format!("{what}: no x-sandbox-name header"));
            return flow_error(400, "Bad Request", "The header x-sandbox-name is required");
        };

        let (id, is_test) = match route {
            Route::List if parts.method == Method::GET => {
                let page = super::list::answer(st, parts, sandbox, &self.client_id, &self.org_id);
                if page.is_ok() {
                    let client = header(&parts.headers, "authorization")
                        .and_then(|a| a.strip_prefix("Bearer "))
                        .and_then(|token| st.token_client(token))
                        .unwrap_or("?")
                        .to_owned();
                    *st.lists_by_client.entry(client).or_default() += 1;
                }
                drop(guard);
                return page.map_or_else(|error| *error, |page| wire::json(200, &page));
            }
            Route::List if parts.method == Method::POST => {
                return self.create(st, parts, body, sandbox, &what, now);
            }
            Route::List => {
                st.violation(format!("{what}: method not allowed"));
                return flow_error(
                    405,
                    "Method Not Allowed",
                    &format!("{} is not allowed here", parts.method),
                );
            }
            Route::Connection(id) => (id, false),
            Route::Test(id) => (id, true),
            Route::TrailingSlash(id) => {
                st.violation(format!(
                    "{what}: trailing slash after the connection id (the path is /connections/{{id}})"
                ));
                return not_found(id, sandbox);
            }
            Route::Stats | Route::Patches | Route::Unknown => {
                st.violation(format!("{what}: no such Flow Service endpoint"));
                return flow_error(
                    404,
                    "Not Found",
                    &format!("No endpoint {}", parts.uri.path()),
                );
            }
        };
        let allowed = if is_test {
            parts.method == Method::GET
        } else {
            parts.method == Method::GET || parts.method == Method::PATCH
        };
        if !allowed {
            st.violation(format!("{what}: method not allowed"));
            return flow_error(
                405,
                "Method Not Allowed",
                &format!("{} is not allowed here", parts.method),
            );
        }
        let exists = st
            .connections
            .get(id)
            .is_some_and(|c| c.spec.sandbox == sandbox);
        if !exists {
            return not_found(id, sandbox);
        }

        if is_test {
            let Some(conn) = st.connections.get(id) else {
                return not_found(id, sandbox);
            };
            // STS credentials were stored by a PATCH or by the POST that
            // created the connection (a placeholder key pair has no token).
            // A revoked session fails like an expired one: S3 refuses it.
            let valid = conn.credentials.token.is_some()
                && conn.credentials.expires_at.is_some_and(|e| e > now)
                && st
                    .issuances
                    .get(&conn.credentials.access_key_id)
                    .is_some_and(|i| {
                        Some(&i.token) == conn.credentials.token.as_ref()
                            && !i.revoked(&st.session_revocations)
                    });
            return wire::json(200, &json!({ "result": valid }));
        }
        if parts.method == Method::GET {
            let Some(conn) = st.connections.get(id) else {
                return not_found(id, sandbox);
            };
            let item = connection_item(conn, &self.client_id, &self.org_id);
            st.counters.flow_gets += 1;
            return wire::json(200, &json!({ "items": [item] }));
        }
        self.patch(st, parts, body, (id, sandbox), &what, now)
    }

    /// Checks the gateway headers; `Some(answer)` when they fail.
    fn check_gateway(
        &self,
        st: &mut SimState,
        headers: &HeaderMap,
        what: &str,
    ) -> Option<Response> {
        let unauthorized = || gateway_error(401, "401013", "Oauth token is not valid");
        let Some(authorization) = header(headers, "authorization") else {
            st.violation(format!("{what}: no Authorization header"));
            return Some(unauthorized());
        };
        let Some(token) = authorization
            .strip_prefix("Bearer ")
            .filter(|t| !t.is_empty())
        else {
            st.violation(format!("{what}: Authorization is not \"Bearer <token>\""));
            return Some(unauthorized());
        };
        match st.token_status(token) {
            TokenStatus::Valid => {}
            TokenStatus::Expired | TokenStatus::Revoked => return Some(unauthorized()),
            TokenStatus::Unknown => {
                st.violation(format!("{what}: bearer token was never issued by IMS"));
                return Some(unauthorized());
            }
        }
        match header(headers, "x-api-key") {
            Some(key) if st.token_client(token) == Some(key) => {}
            Some(_) => {
                st.violation(format!(
                    "{what}: x-api-key is not the client id the token was issued to"
                ));
                return Some(gateway_error(403, "403003", "Api Key is invalid"));
            }
            None => {
                st.violation(format!("{what}: no x-api-key header"));
                return Some(gateway_error(403, "403003", "Api Key is invalid"));
            }
        }
        match header(headers, "x-gw-ims-org-id") {
            Some(org) if org == self.org_id => None,
            // A wrong org is a configuration error, not a protocol error.
            Some(_) => Some(gateway_error(
                403,
                "403027",
                "User is not part of the IMS Org",
            )),
            None => {
                st.violation(format!("{what}: no x-gw-ims-org-id header"));
                Some(gateway_error(
                    403,
                    "403027",
                    "User is not part of the IMS Org",
                ))
            }
        }
    }

    /// `PATCH /connections/{id}` on an existing connection in the right sandbox.
    fn patch(
        &self,
        st: &mut SimState,
        parts: &Parts,
        body: &[u8],
        (id, sandbox): (&str, &str),
        what: &str,
        now: SystemTime,
    ) -> Response {
        let bad = |detail: &str| flow_error(400, "Bad Request", detail);
        let Some(if_match) = header(&parts.headers, "if-match") else {
            st.violation(format!("{what}: no If-Match header"));
            return bad("The header If-Match is required");
        };
        if !has_content_type(&parts.headers, "application/json") {
            st.violation(format!("{what}: Content-Type is not application/json"));
            return flow_error(
                415,
                "Unsupported Media Type",
                "Content-Type must be application/json",
            );
        }
        let ops = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Array(ops)) => ops,
            Ok(other) => {
                let kind = match other {
                    Value::Object(_) => "an object",
                    _ => "not an array",
                };
                st.violation(format!("{what}: body is {kind}, not a JSON Patch array"));
                return bad("The request body must be a JSON Patch array");
            }
            Err(_) => {
                st.violation(format!("{what}: body is not JSON"));
                return bad("The request body is not valid JSON");
            }
        };
        let mut values: [Option<&str>; 3] = [None; 3];
        let mut problems = Vec::new();
        for (n, op) in ops.iter().enumerate() {
            let name = op.get("op").and_then(Value::as_str);
            if !matches!(name, Some("replace" | "add")) {
                problems.push(format!(
                    "op {n}: \"op\" must be \"replace\" or \"add\", got {}",
                    name.map_or_else(|| "nothing".to_owned(), |s| format!("{s:?}"))
                ));
            }
            let path = op.get("path").and_then(Value::as_str).unwrap_or_default();
            let Some(slot) = CREDENTIAL_PATHS.iter().position(|p| *p == path) else {
                problems.push(format!(
                    "op {n}: path {path:?} is not one of the three credential paths"
                ));
                continue;
            };
            match op
                .get("value")
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
            {
                None => problems.push(format!("op {n}: {path} needs a non-empty string value")),
                Some(_) if values[slot].is_some() => {
                    problems.push(format!("op {n}: {path} is set twice"));
                }
                Some(value) => values[slot] = Some(value),
            }
        }
        for (slot, path) in CREDENTIAL_PATHS.iter().enumerate() {
            if values[slot].is_none() && !problems.iter().any(|p| p.contains(path)) {
                problems.push(format!(
                    "{path} is not set (all three credentials must change together)"
                ));
            }
        }
        let [Some(access_key_id), Some(secret), Some(token)] = values else {
            problems.sort();
            st.violation(format!("{what}: bad JSON Patch: {}", problems.join("; ")));
            return bad("The JSON Patch must replace s3AccessKey, s3SecretKey and s3SessionToken");
        };
        if !problems.is_empty() {
            st.violation(format!("{what}: bad JSON Patch: {}", problems.join("; ")));
            return bad("The JSON Patch must replace s3AccessKey, s3SecretKey and s3SessionToken");
        }

        let Some(conn) = st.connections.get(id) else {
            return not_found(id, sandbox);
        };
        if if_match != conn.etag {
            return flow_error_with(
                412,
                "Precondition Failed",
                &format!(
                    "Supplied version=[{if_match}] does not match the current version on entity=[{id}]"
                ),
                "FLOW-1412-412",
            );
        }

        let expires_at = match st.issuances.get(access_key_id) {
            None if self.accept_foreign_credentials
                && access_key_id.len() >= 16
                && access_key_id
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()) =>
            {
                now + self.credential_lifetime
            }
            None => {
                st.violation(format!(
                    "{what}: mismatched credentials: access key {access_key_id} was not issued by STS"
                ));
                return bad("The credentials are not valid");
            }
            Some(issuance) if issuance.secret != secret || issuance.token != token => {
                let which = match (issuance.secret == secret, issuance.token == token) {
                    (false, false) => "secret key and session token",
                    (false, true) => "secret key",
                    _ => "session token",
                };
                st.violation(format!(
                    "{what}: mismatched credentials: the {which} was not issued together with access key {access_key_id}"
                ));
                return bad("The credentials are not valid");
            }
            Some(issuance) if issuance.expires_at <= now => {
                let ago = now
                    .duration_since(issuance.expires_at)
                    .map_or(0.0, |d| d.as_secs_f64());
                st.violation(format!(
                    "{what}: credentials {access_key_id} pushed {ago:.1}s after they expired"
                ));
                return bad("The credentials have expired");
            }
            Some(issuance) => issuance.expires_at,
        };
        if st
            .issuances
            .get(access_key_id)
            .is_some_and(|i| i.revoked(&st.session_revocations))
        {
            // Flow Service stores anything; the daemon should not send it.
            st.counters.flow_patches_revoked += 1;
        }

        let Some(conn) = st.connections.get_mut(id) else {
            return not_found(id, sandbox);
        };
        if conn.patches > 0
            && let Some(previous) = conn.credentials.expires_at
            && let Ok(gap) = now.duration_since(previous)
        {
            conn.expired_seconds += gap.as_secs_f64();
        }
        conn.credentials.access_key_id = access_key_id.to_owned();
        conn.credentials.secret = secret.to_owned();
        conn.credentials.token = Some(token.to_owned());
        conn.credentials.expires_at = Some(expires_at);
        conn.patches += 1;
        conn.first_patch_at.get_or_insert(now);
        conn.etag = super::state::new_etag(&conn.etag);
        conn.updated_at_ms = unix_millis(now);
        let etag = conn.etag.clone();
        st.counters.flow_patches_ok += 1;
        // The gateway check let this token through: it was issued here.
        let client = header(&parts.headers, "authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .and_then(|t| st.token_client(t))
            .unwrap_or("?")
            .to_owned();
        st.record_patch(id, &client, access_key_id, now);
        st.event(SimEvent::PatchApplied {
            connection: id.to_owned(),
            access_key_id: access_key_id.to_owned(),
            expires_at,
            at: now,
        });
        wire::json(200, &json!({ "id": id, "etag": etag }))
    }
}

/// The `auth.params` an S3 `Access Key` connection accepts.
const S3_PARAMS: [&str; 6] = [
    "s3AccessKey",
    "s3SecretKey",
    "s3SessionToken",
    "bucketName",
    "folderPath",
    "serviceUrl",
];

/// Why `bucket` breaks Adobe's bucket name rules (3–63 characters, lower-case
/// letters, digits and hyphens, starting and ending with a letter or digit,
/// not an IP address); `None` when it is fine.
pub(super) fn bucket_problem(bucket: &str) -> Option<&'static str> {
    if !(3..=63).contains(&bucket.len()) {
        return Some("must be 3 to 63 characters long");
    }
    if !bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Some("may contain only lower-case letters, digits and hyphens");
    }
    if bucket.parse::<std::net::Ipv4Addr>().is_ok() {
        return Some("must not be an IP address");
    }
    if bucket.contains('.') {
        return Some("may contain only lower-case letters, digits and hyphens");
    }
    let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !alnum(bucket.bytes().next()) || !alnum(bucket.bytes().last()) {
        return Some("must start and end with a letter or digit");
    }
    None
}

impl Shared {
    /// `POST /connections`: a new S3 `Access Key` base connection holding
    /// credentials this STS issued together and that have not expired.
    fn create(
        &self,
        st: &mut SimState,
        parts: &Parts,
        body: &[u8],
        sandbox: &str,
        what: &str,
        now: SystemTime,
    ) -> Response {
        let bad = |detail: &str| flow_error(400, "Bad Request", detail);
        if !has_content_type(&parts.headers, "application/json") {
            st.violation(format!("{what}: Content-Type is not application/json"));
            return flow_error(
                415,
                "Unsupported Media Type",
                "Content-Type must be application/json",
            );
        }
        let request = match serde_json::from_slice::<Value>(body) {
            Ok(request @ Value::Object(_)) => request,
            _ => {
                st.violation(format!("{what}: body is not a JSON object"));
                return bad("The request body must be a JSON object");
            }
        };
        let keys: Vec<&String> = request
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        let mut problems = Vec::new();
        for key in keys {
            if !matches!(
                key.as_str(),
                "name" | "description" | "auth" | "connectionSpec"
            ) {
                problems.push(format!("unknown property {key:?}"));
            }
        }
        let name = request
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.trim().is_empty());
        if name.is_none() {
            problems.push("name must be a non-empty string".to_owned());
        }
        let description = match request.get("description") {
            None => Some(""),
            Some(Value::String(d)) => Some(d.as_str()),
            Some(_) => {
                problems.push("description must be a string".to_owned());
                None
            }
        };
        let spec_id = request
            .pointer("/connectionSpec/id")
            .and_then(Value::as_str);
        if spec_id != Some(super::S3_CONNECTION_SPEC_ID) {
            problems.push(format!(
                "connectionSpec.id must be the Amazon S3 spec {}",
                super::S3_CONNECTION_SPEC_ID
            ));
        }
        if request
            .pointer("/connectionSpec/version")
            .and_then(Value::as_str)
            != Some("1.0")
        {
            problems.push("connectionSpec.version must be \"1.0\"".to_owned());
        }
        if request.pointer("/auth/specName").and_then(Value::as_str)
            != Some(super::ACCESS_KEY_AUTH_SPEC)
        {
            problems.push("auth.specName must be \"Access Key\"".to_owned());
        }
        let empty = Map::new();
        let params = match request.pointer("/auth/params") {
            Some(Value::Object(params)) => params,
            _ => {
                problems.push("auth.params must be an object".to_owned());
                &empty
            }
        };
        let mut other_params = Map::new();
        for (key, value) in params {
            if !S3_PARAMS.contains(&key.as_str()) {
                problems.push(format!("auth.params.{key} is not a parameter of Amazon S3"));
                continue;
            }
            match value.as_str().filter(|v| !v.is_empty()) {
                None => problems.push(format!("auth.params.{key} must be a non-empty string")),
                Some(v) if !key.starts_with("s3") => {
                    other_params.insert(key.clone(), Value::String(v.to_owned()));
                }
                Some(_) => {}
            }
        }
        let text = |key: &str| {
            params
                .get(key)
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
        };
        let (Some(access_key_id), Some(secret), Some(token)) = (
            text("s3AccessKey"),
            text("s3SecretKey"),
            text("s3SessionToken"),
        ) else {
            problems.push(
                "auth.params must hold s3AccessKey, s3SecretKey and s3SessionToken".to_owned(),
            );
            problems.sort();
            st.violation(format!(
                "{what}: bad create request: {}",
                problems.join("; ")
            ));
            return bad(&format!("Invalid request: {}", problems.join("; ")));
        };
        if !problems.is_empty() {
            problems.sort();
            st.violation(format!(
                "{what}: bad create request: {}",
                problems.join("; ")
            ));
            return bad(&format!("Invalid request: {}", problems.join("; ")));
        }
        // A value the user chose, not a protocol error: 400, no violation.
        if let Some(bucket) = text("bucketName")
            && let Some(why) = bucket_problem(bucket)
        {
            return bad(&format!(
                "Invalid bucketName {bucket:?}: the bucket name {why}"
            ));
        }
        if let Some(url) = text("serviceUrl")
            && !url.starts_with("https://")
        {
            return bad(&format!(
                "Invalid serviceUrl {url:?}: it must be an https URL"
            ));
        }
        let expires_at = match st.issuances.get(access_key_id) {
            None => {
                st.violation(format!(
                    "{what}: mismatched credentials: access key {access_key_id} was not issued by STS"
                ));
                return bad("The credentials are not valid");
            }
            Some(issuance) if issuance.secret != secret || issuance.token != token => {
                st.violation(format!(
                    "{what}: mismatched credentials: the secret key or session token was not issued together with access key {access_key_id}"
                ));
                return bad("The credentials are not valid");
            }
            Some(issuance) if issuance.expires_at <= now => {
                st.violation(format!(
                    "{what}: credentials {access_key_id} sent after they expired"
                ));
                return bad("The credentials have expired");
            }
            Some(issuance) => issuance.expires_at,
        };
        let id = uuid::Uuid::new_v4().to_string();
        let spec = super::SimConnection::s3(&id, sandbox, name.unwrap_or_default())
            .with_description(description.unwrap_or_default());
        let etag = st.create_connection(
            spec,
            other_params,
            super::state::StoredCredentials {
                access_key_id: access_key_id.to_owned(),
                secret: secret.to_owned(),
                token: Some(token.to_owned()),
                expires_at: Some(expires_at),
            },
        );
        st.event(SimEvent::ConnectionAdded {
            connection: id.clone(),
            at: now,
        });
        let mut response = wire::json(201, &json!({ "id": id, "etag": etag }));
        if let Ok(location) =
            axum::http::HeaderValue::from_str(&format!("{CONNECTIONS_PREFIX}{id}"))
        {
            response
                .headers_mut()
                .insert(axum::http::header::LOCATION, location);
        }
        response
    }
}

/// `items[0]` of `GET /connections/{id}`, with the secrets masked (they are
/// write-only).
pub(super) fn connection_item(conn: &Conn, client_id: &str, org_id: &str) -> Value {
    let mut params = conn.other_params.clone();
    params.insert(
        "s3AccessKey".to_owned(),
        Value::String(conn.credentials.access_key_id.clone()),
    );
    params.insert("s3SecretKey".to_owned(), Value::String("***".to_owned()));
    if conn.credentials.token.is_some() {
        params.insert("s3SessionToken".to_owned(), Value::String("***".to_owned()));
    }
    json!({
        "id": conn.spec.id,
        "createdAt": conn.created_at_ms,
        "updatedAt": conn.updated_at_ms,
        "createdBy": "acp_foundation_connectors@AdobeID",
        "updatedBy": "acp_foundation_connectors@AdobeID",
        "createdClient": client_id,
        "updatedClient": client_id,
        "sandboxId": conn.sandbox_id,
        "sandboxName": conn.spec.sandbox,
        "imsOrgId": org_id,
        "name": conn.spec.name,
        "description": conn.spec.description,
        "connectionSpec": { "id": conn.spec.connection_spec_id, "version": "1.0" },
        "state": conn.spec.state,
        "auth": { "specName": conn.spec.auth_spec, "params": params },
        "version": conn.etag,
        "etag": conn.etag,
    })
}

/// The gateway's error shape (`error_code`, `message`).
fn gateway_error(status: u16, code: &str, message: &str) -> Response {
    wire::json(status, &json!({ "error_code": code, "message": message }))
}

/// Flow Service's error shape, with the usual type for the status.
pub(super) fn flow_error(status: u16, title: &str, detail: &str) -> Response {
    // 404 of a connection has its own documented code; the others follow
    // the FLOW-1<status>-<status> pattern of the documented 412.
    let code = match status {
        404 => "FLOW-1439-404".to_owned(),
        other => format!("FLOW-1{other}-{other}"),
    };
    flow_error_with(status, title, detail, &code)
}

/// Flow Service's error shape with an explicit type code.
fn flow_error_with(status: u16, title: &str, detail: &str, code: &str) -> Response {
    wire::json(
        status,
        &json!({
            "type": format!("https://ns.adobe.com/aep/errors/{code}"),
            "title": title,
            "status": status,
            "report": { "detailed-message": detail, "request-id": request_id() },
        }),
    )
}

/// The 404 for a connection that does not exist in this sandbox.
fn not_found(id: &str, sandbox: &str) -> Response {
    flow_error(
        404,
        "Connection not found",
        &format!("Connection with id {id} not found in sandbox {sandbox}"),
    )
}

/// The documented answer for a scripted or random status.
fn default_error(
    status: u16,
    connection: Option<&str>,
    sandbox: Option<&axum::http::HeaderValue>,
) -> Response {
    let id = connection.unwrap_or("");
    let sandbox = sandbox.and_then(|v| v.to_str().ok()).unwrap_or("");
    match status {
        401 => gateway_error(401, "401013", "Oauth token is not valid"),
        403 => gateway_error(403, "403003", "Api Key is invalid"),
        404 => not_found(id, sandbox),
        412 => flow_error(
            412,
            "Precondition Failed",
            &format!("Supplied version=[] does not match the current version on entity=[{id}]"),
        ),
        429 => gateway_error(429, "429001", "Too many requests"),
        400 => flow_error(400, "Bad Request", "Bad request"),
        500 => flow_error(500, "Internal Server Error", "Internal error"),
        502 => gateway_error(502, "502001", "Bad Gateway"),
        503 => gateway_error(503, "503001", "Service Unavailable"),
        504 => gateway_error(504, "504001", "Gateway Timeout"),
        other => flow_error(
            other,
            wire::status(other).canonical_reason().unwrap_or("Error"),
            "Simulated error",
        ),
    }
}
