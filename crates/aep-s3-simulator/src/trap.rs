//! A second origin for redirect tests: it records every request it gets
//! (method, path, headers, body) and answers `200` with a body that would
//! satisfy a careless client of any of the three APIs (a token, an etag),
//! as an attacker's server would. A correct client never reaches it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::response::Response;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::wire::{self, MAX_BODY};

/// A listener on `127.0.0.1:0` that records whatever arrives.
#[derive(Clone)]
pub struct SecretTrap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    _stop_on_drop: Arc<DropGuard>,
}

impl std::fmt::Debug for SecretTrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretTrap")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SecretTrap {
    /// Binds and starts serving. Must be called inside a Tokio runtime.
    pub async fn start() -> std::io::Result<SecretTrap> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let app = Router::new().fallback(record).with_state(Arc::clone(&seen));
        let signal = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await;
        });
        Ok(SecretTrap {
            addr,
            seen,
            _stop_on_drop: Arc::new(stop.drop_guard()),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received, as text (request line, headers, body).
    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether any request carried one of `secrets` (raw, or form-encoded).
    pub fn received_any(&self, secrets: &[String]) -> bool {
        let seen = self.requests();
        secrets.iter().filter(|s| s.len() >= 8).any(|secret| {
            let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
            seen.iter()
                .any(|r| r.contains(secret.as_str()) || r.contains(&encoded))
        })
    }
}

async fn record(State(seen): State<Arc<Mutex<Vec<String>>>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = to_bytes(body, MAX_BODY).await.unwrap_or_default();
    let mut text = format!("{} {}\n", parts.method, parts.uri);
    for (name, value) in &parts.headers {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text.push('\n');
    text.push_str(&String::from_utf8_lossy(&body));
    seen.lock().unwrap_or_else(|e| e.into_inner()).push(text);
    wire::json(
        200,
        &serde_json::json!({
            "access_token": "trap-token-0000000000000000",
            "token_type": "bearer",
            "expires_in": 86_399,
            "etag": "\"trap-etag\"",
            "id": "trap",
        }),
    )
}
