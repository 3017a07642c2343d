//! Simulated Adobe IMS: `POST /ims/token/v3` (OAuth Server-to-Server,
//! `client_credentials`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::to_bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::Method;
use axum::http::request::Parts;
use axum::response::Response;
use serde_json::json;

use super::net::ConnCtl;
use super::state::{RequestKind, Shared, Token};
use super::wire::{
    self, BASE64_URL, MAX_BODY, form_pairs, form_value, has_content_type, random_from,
    retry_after_value, with_retry_after,
};
use super::{ScriptedFault, SimEvent, SimService};

/// The token endpoint.
const TOKEN_PATH: &str = "/ims/token/v3";
/// Fields that belong in the form body, never in the URL.
const BODY_ONLY: [&str; 4] = ["client_secret", "client_id", "grant_type", "scope"];

/// The IMS router.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(ctl): ConnectInfo<ConnCtl>,
    request: Request,
) -> Response {
    if shared.refuses(SimService::Ims) {
        return ctl.reset();
    }
    let (parts, body) = request.into_parts();
    let plan = shared.plan(SimService::Ims, None, RequestKind::Ims);
    crate::pace::wait(plan.latency, plan.arrived).await;
    let Ok(body) = to_bytes(body, MAX_BODY).await else {
        return ctl.reset();
    };
    match plan.script {
        Some(ScriptedFault::Reset) => {
            shared.lock().event(SimEvent::Reset {
                service: SimService::Ims,
                connection: None,
                at: SystemTime::now(),
            });
            return ctl.reset();
        }
        Some(ScriptedFault::Status {
            status,
            retry_after,
            body,
        }) => {
            let response = match body {
                Some(body) => wire::response(status, "application/json", body),
                None => default_error(status),
            };
            return shared.ims_finish(with_retry_after(
                response,
                retry_after.map(retry_after_value),
            ));
        }
        Some(ScriptedFault::StsError { status, .. }) => {
            return shared.ims_finish(default_error(status));
        }
        Some(ScriptedFault::Raw {
            status,
            content_type,
            body,
        }) => return shared.ims_finish(wire::response(status, &content_type, body)),
        Some(ScriptedFault::Delay(delay)) => {
            shared.lock().event(SimEvent::Delayed {
                service: SimService::Ims,
                connection: None,
                delay,
                at: SystemTime::now(),
            });
            tokio::time::sleep(delay).await;
        }
        Some(ScriptedFault::Redirect { location }) => {
            return shared.ims_finish(wire::redirect(&location));
        }
        Some(ScriptedFault::EndlessBody) => return wire::endless_body(),
        Some(ScriptedFault::EchoSecrets) => {
            let form = form_pairs(&body);
            let secret = form_value(&form, "client_secret").unwrap_or_default();
            return shared.ims_finish(ims_error(
                400,
                "invalid_client",
                &format!("client_secret {secret} is not valid for this client_id"),
            ));
        }
        Some(ScriptedFault::HostileText { len }) => {
            return shared.ims_finish(ims_error(
                400,
                "invalid_scope",
                &wire::hostile_text(len, false),
            ));
        }
        // Never taken for IMS (see `take_matching`).
        Some(
            ScriptedFault::EtagChurn
            | ScriptedFault::ShortCredentials(_)
            | ScriptedFault::PartialCredentials { .. }
            | ScriptedFault::InvalidEtag
            | ScriptedFault::EtagInHeader,
        )
        | None => {}
    }
    shared.ims_answer(&parts, &body)
}

/// IMS's error shape.
fn ims_error(status: u16, error: &str, description: &str) -> Response {
    wire::json(
        status,
        &json!({ "error": error, "error_description": description }),
    )
}

/// The documented answer for a scripted status.
fn default_error(status: u16) -> Response {
    match status {
        400 => ims_error(
            400,
            "invalid_client",
            "invalid client_id or client_secret parameter",
        ),
        401 => ims_error(401, "unauthorized_client", "client is not authorized"),
        403 => ims_error(403, "access_denied", "access denied"),
        429 => ims_error(429, "too_many_requests", "too many requests, slow down"),
        500..=599 => ims_error(status, "server_error", "the server encountered an error"),
        other => ims_error(other, "invalid_request", "the request was refused"),
    }
}

impl Shared {
    /// Records a non-200 IMS answer.
    fn ims_finish(&self, response: Response) -> Response {
        let status = response.status().as_u16();
        if status != 200 {
            let mut st = self.lock();
            st.event(SimEvent::ImsRejected {
                error: format!("status {status}"),
                at: SystemTime::now(),
            });
            if status == 429 {
                st.event(SimEvent::Throttled {
                    service: SimService::Ims,
                    connection: None,
                    retry_after: None,
                    at: SystemTime::now(),
                });
            }
        }
        response
    }

    /// The real answer to a token request, checked strictly.
    fn ims_answer(&self, parts: &Parts, body: &[u8]) -> Response {
        let what = format!("IMS {} {}", parts.method, parts.uri.path());
        let mut st = self.lock();
        let refuse = |st: &mut super::state::State,
                      error: &str,
                      description: &str,
                      violation: Option<String>| {
            if let Some(v) = violation {
                st.violation(format!("{what}: {v}"));
            }
            st.event(SimEvent::ImsRejected {
                error: error.to_owned(),
                at: SystemTime::now(),
            });
            ims_error(400, error, description)
        };
        if parts.uri.path() != TOKEN_PATH {
            st.violation(format!(
                "{what}: no such IMS endpoint (the token endpoint is {TOKEN_PATH})"
            ));
            return ims_error(404, "not_found", "no such endpoint");
        }
        if parts.method != Method::POST {
            st.violation(format!("{what}: the token endpoint takes POST"));
            return ims_error(405, "invalid_request", "method not allowed");
        }
        let query = parts
            .uri
            .query()
            .map(|q| form_pairs(q.as_bytes()))
            .unwrap_or_default();
        let in_query: Vec<&str> = BODY_ONLY
            .iter()
            .copied()
            .filter(|k| form_value(&query, k).is_some())
            .collect();
        if !in_query.is_empty() {
            return refuse(
                &mut st,
                "invalid_request",
                "credentials must be sent in the request body",
                Some(format!(
                    "{} sent in the query string (secrets belong in the form body)",
                    in_query.join(", ")
                )),
            );
        }
        if !has_content_type(&parts.headers, "application/x-www-form-urlencoded") {
            return refuse(
                &mut st,
                "invalid_request",
                "Content-Type must be application/x-www-form-urlencoded",
                Some("Content-Type is not application/x-www-form-urlencoded".to_owned()),
            );
        }
        let form = form_pairs(body);
        match form_value(&form, "grant_type") {
            Some("client_credentials") => {}
            Some(other) => {
                return refuse(
                    &mut st,
                    "unsupported_grant_type",
                    "unsupported grant_type",
                    Some(format!(
                        "grant_type is {other:?}, not \"client_credentials\""
                    )),
                );
            }
            None => {
                return refuse(
                    &mut st,
                    "invalid_request",
                    "missing grant_type parameter",
                    Some("no grant_type".to_owned()),
                );
            }
        }
        let (Some(client_id), Some(client_secret)) = (
            form_value(&form, "client_id"),
            form_value(&form, "client_secret"),
        ) else {
            return refuse(
                &mut st,
                "invalid_request",
                "missing client_id or client_secret parameter",
                Some("no client_id or no client_secret in the form".to_owned()),
            );
        };
        if !self
            .clients()
            .iter()
            .any(|(id, secret)| id == client_id && secret == client_secret)
        {
            // A wrong credential is a configuration error, not a protocol error.
            return refuse(
                &mut st,
                "invalid_client",
                "invalid client_id or client_secret parameter",
                None,
            );
        }
        let scope = form_value(&form, "scope").unwrap_or_default();
        if scope.is_empty()
            || scope
                .split(',')
                .any(|s| s.is_empty() || s.chars().any(char::is_whitespace))
        {
            return refuse(
                &mut st,
                "invalid_scope",
                "invalid scope",
                Some(format!(
                    "scope {scope:?} is not a non-empty comma-separated list"
                )),
            );
        }

        // Opaque and long, like the real JWT-shaped tokens.
        let token = format!("eyJ{}", random_from(BASE64_URL, 300));
        let generation = st.token_generation;
        st.tokens.insert(
            token.clone(),
            Token {
                generation,
                client_id: client_id.to_owned(),
                expires_at: Instant::now()
                    .checked_add(self.ims_token_lifetime)
                    // Absurd lifetimes: a century is forever for a test.
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86400)),
            },
        );
        st.counters.ims_tokens_issued += 1;
        st.event(SimEvent::ImsTokenIssued {
            at: SystemTime::now(),
        });
        wire::json(
            200,
            &json!({
                "access_token": token,
                "token_type": "bearer",
                "expires_in": self.ims_token_lifetime.as_secs(),
            }),
        )
    }
}
