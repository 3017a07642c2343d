//! Admin HTTP endpoint (`/healthz`, `/readyz`, `/metrics`, `/status`) and the
//! client behind `aep-s3-rotator status`.
//!
//! Every handler answers from the scheduler's latest snapshot (an `Arc`
//! taken from a `watch`), never from a lock the scheduler holds: nothing
//! here can slow the scheduler down.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::observe::metrics::{METRICS_CONTENT_TYPE, Metrics};
use crate::observe::status::{NotReady, StatusEntry, compact_duration};
use crate::observe::views::Views;

/// How long `status` waits for the daemon: it answers from memory, so
/// anything slower than this means it is wedged or unreachable.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest `/status` answer `status` reads: ~400 bytes per connection, so
/// 16 MiB is 40 000 connections, and a hostile endpoint costs at most that.
const STATUS_MAX_BODY: usize = 16 << 20;

/// Body of `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// Whether every connection holds unexpired credentials pushed by this daemon.
    pub ready: bool,
    /// The connections that are not, with the reason (absent when ready).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ready: Vec<NotReady>,
    /// With `[coordination]`: `leader`, `standby` or `starting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// With `[coordination]`: the lease holder as last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Why a replica that is not the leader is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Response headers of `/status` that name this replica's role and the
/// lease holder (with `[coordination]`); the body stays the SPEC's list.
pub const ROLE_HEADER: &str = "x-aep-s3-rotator-role";
/// See [`ROLE_HEADER`].
pub const LEADER_HEADER: &str = "x-aep-s3-rotator-leader";

/// What the handlers read: the views, and the metrics registry over them
/// (built once).
#[derive(Debug, Clone)]
struct Admin {
    views: Views,
    metrics: Arc<Metrics>,
}

/// The admin routes over `views`, without a listener (for embedding and tests).
pub fn router(views: Views) -> Router {
    let metrics = Arc::new(Metrics::new(views.clone()));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route("/status", get(status))
        .with_state(Admin { views, metrics })
}

/// Serves `/healthz`, `/readyz`, `/metrics`, `/status` until `cancel`.
///
/// On cancel it stops accepting, lets requests in flight finish (they answer
/// from memory, so at once) and returns `Ok`.
///
/// `reserved`: the descriptors kept for the rest of the daemon
/// ([`reserved_descriptors`]).
pub async fn serve(
    listener: TcpListener,
    views: Views,
    cancel: CancellationToken,
    reserved: u64,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "admin endpoint listening");
    }
    let cap = connection_cap(open_file_limit(), reserved);
    tracing::debug!(max_connections = cap, "admin endpoint connection cap");
    serve_bounded(listener, views, cancel, cap).await
}

/// [`serve`] with an explicit connection cap.
async fn serve_bounded(
    listener: TcpListener,
    views: Views,
    cancel: CancellationToken,
    cap: usize,
) -> std::io::Result<()> {
    axum::serve(BoundedListener::new(listener, cap), router(views))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

// ---------------------------------------------------------------------------
// A listener that cannot be starved (docs/SECURITY.md)
// ---------------------------------------------------------------------------

/// Most admin connections open at once. Who connects is a probe or two, a
/// Prometheus scraper and an operator's `status`: a handful. Each one is a
/// file descriptor the rotation path may need.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Descriptors kept for everything but the admin endpoint and the
/// per-rotation sockets: the runtime (epoll, eventfds, signal pipe), stdio,
/// the listener, the state file and its temp file, the config watcher, IMS,
/// DNS, and the discovery listings (through the Flow pool, behind the gate).
pub const BASE_RESERVED_DESCRIPTORS: u64 = 32;

/// Descriptors per rotation slot (`[rotation] concurrency`): the Flow
/// Service and STS connections a job holds or leaves pooled.
pub const DESCRIPTORS_PER_SLOT: u64 = 2;

/// Further descriptors per slot with the pre-push S3 check: its own client,
/// whose pool may keep a connection to the bucket's first endpoint and one
/// to the region a redirect named. Left out of the reserve, an idle flood of
/// the admin port made 89 rotations fail with `EMFILE` at `nofile` 256 and
/// `concurrency = 48` (issue 26).
pub const S3_CHECK_DESCRIPTORS_PER_SLOT: u64 = 2;

/// Descriptors of the DynamoDB clients with `[coordination]` (lease and
/// state, a pooled connection or two each).
pub const COORDINATION_DESCRIPTORS: u64 = 8;

/// The descriptors kept for everything but the admin endpoint under
/// `config`: derived from what the rotation path may hold open at once.
pub fn reserved_descriptors(config: &crate::config::Config) -> u64 {
    let slots = u64::try_from(config.rotation.concurrency.get()).unwrap_or(u64::MAX);
    let per_slot = DESCRIPTORS_PER_SLOT
        + if config.rotation.prepush_check {
            S3_CHECK_DESCRIPTORS_PER_SLOT
        } else {
            0
        };
    let coordination = if config.coordination.is_some() {
        COORDINATION_DESCRIPTORS
    } else {
        0
    };
    BASE_RESERVED_DESCRIPTORS
        .saturating_add(slots.saturating_mul(per_slot))
        .saturating_add(coordination)
}

/// A connection that has sent nothing for this long is closed: headers of
/// a real request arrive at once, and a scraper that keeps a connection
/// between scrapes simply opens a new one.
pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long accepting pauses after the process ran out of descriptors
/// (`EMFILE`): a spin would burn a core and the pause lets connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits`
/// (`None` where that file does not exist or says `unlimited`).
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How many admin connections may be open at once under a descriptor limit:
/// what is left after `reserved` ([`reserved_descriptors`]), at most
/// [`MAX_ADMIN_CONNECTIONS`], at least one.
pub fn connection_cap(open_file_limit: Option<u64>, reserved: u64) -> usize {
    let left = open_file_limit.map_or(u64::MAX, |n| n.saturating_sub(reserved));
    usize::try_from(left)
        .unwrap_or(usize::MAX)
        .clamp(1, MAX_ADMIN_CONNECTIONS)
}

/// One open admin connection, as the listener sees it.
#[derive(Debug)]
struct Slot {
    /// Milliseconds since the listener started at the last byte read.
    last_read_ms: std::sync::atomic::AtomicU64,
    /// Set to close the connection to make room for a new one.
    evicted: std::sync::atomic::AtomicBool,
    /// Wakes the connection's task so it notices the eviction.
    waker: futures::task::AtomicWaker,
}

#[derive(Debug)]
struct Slots {
    started: tokio::time::Instant,
    /// Every live connection, evicted ones included until they are dropped
    /// (their descriptor is still open until then).
    open: std::sync::Mutex<std::collections::HashMap<u64, Arc<Slot>>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Signalled when a connection is dropped.
    freed: tokio::sync::Notify,
}

impl Slots {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Accepts at most `cap` connections at once. When a new one arrives at the
/// cap, the connection that has been silent longest is closed to make room:
/// a flood of idle sockets cannot keep a probe out, and the descriptors the
/// rotation path needs are never taken.
struct BoundedListener {
    inner: TcpListener,
    cap: usize,
    slots: Arc<Slots>,
}

impl BoundedListener {
    fn new(inner: TcpListener, cap: usize) -> Self {
        Self {
            inner,
            cap,
            slots: Arc::new(Slots {
                started: crate::clock::mono_now(),
                open: std::sync::Mutex::new(std::collections::HashMap::new()),
                next_id: std::sync::atomic::AtomicU64::new(0),
                freed: tokio::sync::Notify::new(),
            }),
        }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (BoundedStream, SocketAddr) {
        use std::sync::atomic::Ordering;
        loop {
            // While an evicted connection is still closing, wait (briefly,
            // bounded): descriptors held by admin never exceed cap + 1.
            for _ in 0..20 {
                let evicting = {
                    let open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
                    open.len() >= self.cap
                        && open.values().any(|s| s.evicted.load(Ordering::Relaxed))
                };
                if !evicting {
                    break;
                }
                let _ =
                    tokio::time::timeout(Duration::from_millis(10), self.slots.freed.notified())
                        .await;
            }
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::Interrupted
                    ) {
                        tracing::warn!(error = %e, "admin endpoint: accept failed, pausing");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            };
            let slot = Arc::new(Slot {
                last_read_ms: std::sync::atomic::AtomicU64::new(self.slots.now_ms()),
                evicted: std::sync::atomic::AtomicBool::new(false),
                waker: futures::task::AtomicWaker::new(),
            });
            let id = self.slots.next_id.fetch_add(1, Ordering::Relaxed);
            {
                let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
                let live = open
                    .values()
                    .filter(|s| !s.evicted.load(Ordering::Relaxed))
                    .count();
                if live >= self.cap {
                    let oldest = open
                        .values()
                        .filter(|s| !s.evicted.load(Ordering::Relaxed))
                        .min_by_key(|s| s.last_read_ms.load(Ordering::Relaxed));
                    if let Some(oldest) = oldest {
                        oldest.evicted.store(true, Ordering::Relaxed);
                        oldest.waker.wake();
                    }
                }
                open.insert(id, Arc::clone(&slot));
            }
            let _ = stream.set_nodelay(true);
            let idle = Box::pin(tokio::time::sleep(ADMIN_IDLE_TIMEOUT));
            return (
                BoundedStream {
                    inner: stream,
                    slot,
                    id,
                    slots: Arc::clone(&self.slots),
                    idle,
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An admin connection: closed when evicted or silent for
/// [`ADMIN_IDLE_TIMEOUT`]; frees its slot when dropped.
struct BoundedStream {
    inner: tokio::net::TcpStream,
    slot: Arc<Slot>,
    id: u64,
    slots: Arc<Slots>,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl BoundedStream {
    fn evicted(&self, cx: &std::task::Context<'_>) -> bool {
        self.slot.waker.register(cx.waker());
        self.slot.evicted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for BoundedStream {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(&self.id);
        drop(open);
        self.slots.freed.notify_one();
    }
}

fn closed(why: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, why)
}

impl tokio::io::AsyncRead for BoundedStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.evicted(cx) {
            return Poll::Ready(Err(closed(
                "closed to make room for a new admin connection",
            )));
        }
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.slot
                        .last_read_ms
                        .store(this.slots.now_ms(), std::sync::atomic::Ordering::Relaxed);
                    let deadline = crate::clock::mono_now() + ADMIN_IDLE_TIMEOUT;
                    this.idle.as_mut().reset(deadline);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(closed("admin connection idle"))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl tokio::io::AsyncWrite for BoundedStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.evicted(cx) {
            return std::task::Poll::Ready(Err(closed(
                "closed to make room for a new admin connection",
            )));
        }
        std::pin::Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(admin): State<Admin>) -> Response {
    use crate::coordination::Role;
    let role = admin.views.role();
    let mut body = Readiness {
        ready: false,
        not_ready: Vec::new(),
        role: role.as_ref().map(|v| v.role.as_str().to_owned()),
        leader: role.as_ref().and_then(|v| v.leader.clone()),
        reason: None,
    };
    match role {
        // A standby is ready when it can take over: it reaches the table.
        Some(view) if view.role == Role::Standby => match view.trouble {
            None => body.ready = true,
            Some(trouble) => body.reason = Some(format!("coordination table: {trouble}")),
        },
        Some(view) if view.role == Role::Starting => {
            body.reason = Some("the coordination lease has not been read yet".to_owned());
        }
        _ => match admin.views.snapshot().readiness(crate::clock::wall_now()) {
            Ok(()) => body.ready = true,
            Err(not_ready) => body.not_ready = not_ready,
        },
    }
    let code = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics_handler(State(admin): State<Admin>) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        admin.metrics.render(),
    )
        .into_response()
}

async fn status(State(admin): State<Admin>) -> Response {
    let now = crate::clock::wall_now();
    let snapshot = admin.views.snapshot();
    let entries: Vec<StatusEntry> = snapshot
        .by_id()
        .into_iter()
        .map(|s| StatusEntry::from_status(s, now, snapshot.refresh_before))
        .collect();
    let mut response = Json(entries).into_response();
    if let Some(view) = admin.views.role() {
        let headers = response.headers_mut();
        headers.insert(
            ROLE_HEADER,
            header::HeaderValue::from_static(view.role.as_str()),
        );
        // Holder names are validated (no spaces or control characters) or
        // generated; one that is still no header value is left out.
        if let Some(value) = view
            .leader
            .and_then(|l| header::HeaderValue::from_str(&l).ok())
        {
            headers.insert(LEADER_HEADER, value);
        }
    }
    response
}

/// `aep-s3-rotator status`: reads `/status` from `addr` and renders the table
/// printed on stdout. The error is one line an operator can act on.
///
/// A wildcard `addr` (`0.0.0.0`, `[::]`, as in containers) is reached on the
/// loopback address of the same family.
pub async fn status_report(addr: SocketAddr) -> Result<String, String> {
    let target = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    let url = format!("http://{target}/status");
    let client = reqwest::Client::builder()
        .timeout(STATUS_TIMEOUT)
        // The admin endpoint never redirects; whatever does is not it.
        .redirect(reqwest::redirect::Policy::none())
        // The admin endpoint is local plain HTTP; a proxy from the
        // environment would only get in the way.
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| unreachable_message(&url, addr, &e))?;
    let code = response.status();
    if !code.is_success() {
        return Err(format!(
            "the admin endpoint at {url} answered {code}, expected 200 OK"
        ));
    }
    let role_line = role_line(response.headers());
    let body = crate::remote::http::read_capped(response, STATUS_MAX_BODY)
        .await
        .map_err(|e| format!("cannot read the answer of {url}: {e}"))?;
    let entries: Vec<StatusEntry> = serde_json::from_slice(&body).map_err(|e| {
        format!("the admin endpoint at {url} answered something that is not a status list: {e}")
    })?;
    Ok(role_line + &render_status_table(&entries, crate::clock::wall_now()))
}

/// `role: standby (leader: X)` above the table, from the `/status` headers
/// of a replica with `[coordination]`; empty otherwise.
fn role_line(headers: &header::HeaderMap) -> String {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| crate::remote::http::bounded(v, 128))
    };
    match (text(ROLE_HEADER), text(LEADER_HEADER)) {
        (Some(role), Some(leader)) => format!("role: {role} (leader: {leader})\n"),
        (Some(role), None) => format!("role: {role} (leader: unknown)\n"),
        _ => String::new(),
    }
}

/// The one-line error for a request that got no answer.
fn unreachable_message(url: &str, addr: SocketAddr, error: &reqwest::Error) -> String {
    let refused = std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .filter_map(|e| e.downcast_ref::<std::io::Error>())
    .any(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
    let why = if refused {
        "connection refused".to_owned()
    } else if error.is_timeout() {
        format!("no answer within {}s", STATUS_TIMEOUT.as_secs())
    } else {
        error_chain(error)
    };
    format!(
        "cannot reach the admin endpoint at {url}: {why}; is the daemon running with [admin] listen = \"{addr}\"?"
    )
}

/// An error and its sources on one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

/// The `status` table: one row per connection, fixed-width columns, times
/// relative to `now` (`41m 3s`; `expired 12s ago`; an overdue rotation as
/// `-12s`; `-` for none).
pub fn render_status_table(entries: &[StatusEntry], now: SystemTime) -> String {
    const HEADER: [&str; 8] = [
        "NAME",
        "SANDBOX",
        "ORIGIN",
        "STATE",
        "ACCESS KEY ID",
        "EXPIRES IN",
        "NEXT ROTATION IN",
        "LAST ERROR",
    ];
    // By name, then sandbox, then id: the order an operator scans for a
    // connection in (the endpoint answers in its own order).
    let mut sorted: Vec<&StatusEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| (&a.name, &a.sandbox, &a.id).cmp(&(&b.name, &b.sandbox, &b.id)));
    let rows: Vec<[String; 8]> = sorted
        .into_iter()
        .map(|e| {
            // Everything here came over the wire from the admin endpoint:
            // escape control characters and bound each cell.
            [
                crate::remote::http::bounded(&e.name, 100),
                crate::remote::http::bounded(&e.sandbox, 100),
                if e.origin.is_empty() {
                    "-".to_owned()
                } else {
                    crate::remote::http::bounded(&e.origin, 40)
                },
                e.state.to_string(),
                e.access_key_id
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |k| crate::remote::http::bounded(k, 128)),
                relative(e.expires_at.as_deref(), now, |ago| {
                    format!("expired {ago} ago")
                }),
                relative(e.next_rotation_at.as_deref(), now, |ago| format!("-{ago}")),
                e.last_error
                    .as_deref()
                    .map(|text| crate::remote::http::remote_text(&one_line(text)))
                    .unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();

    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push_row = |cells: [&str; 8]| {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                let pad = width - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push_row(HEADER);
    for row in &rows {
        push_row(row.each_ref().map(String::as_str));
    }
    if rows.is_empty() {
        out.push_str("(no connections configured)\n");
    }
    out
}

/// `time` (RFC 3339) relative to `now`: the compact time left, or `past(ago)`.
fn relative(time: Option<&str>, now: SystemTime, past: impl Fn(String) -> String) -> String {
    let Some(text) = time else {
        return "-".to_owned();
    };
    let Ok(time) = humantime::parse_rfc3339_weak(text) else {
        // Shown as given rather than hidden: the daemon is newer than we are.
        return crate::remote::http::bounded(text, 40);
    };
    match time.duration_since(now) {
        Ok(left) => compact_duration(left),
        Err(e) => past(compact_duration(e.duration())),
    }
}

/// Errors may carry newlines (response bodies); a table row may not.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::status::{ConnectionState, ConnectionStatus};
    use crate::observe::telemetry::Service;
    use std::time::UNIX_EPOCH;

    const REFRESH: Duration = Duration::from_secs(20 * 60);

    /// Views over two connections (one fresh, one expired) and one request.
    fn board() -> Views {
        let now = crate::clock::wall_now();
        let telemetry = Arc::new(crate::observe::telemetry::Telemetry::new());
        let mut fresh = ConnectionStatus {
            access_key_id: Some("ASIAFRESH".into()),
            expires_at: Some(now + Duration::from_secs(3600)),
            next_rotation_at: Some(now + Duration::from_secs(2400)),
            last_success_at: Some(now - Duration::from_secs(60)),
            last_error: None,
            ..ConnectionStatus::named("id-fresh", "sales-bucket", "prod")
        };
        fresh.counters.successes = 1;
        let mut expired = ConnectionStatus {
            access_key_id: Some("ASIAOLD".into()),
            expires_at: Some(now - Duration::from_secs(90)),
            next_rotation_at: Some(now + Duration::from_secs(30)),
            last_success_at: None,
            last_error: Some("403 Forbidden: no access".into()),
            ..ConnectionStatus::named("id-expired", "old-bucket", "dev")
        };
        expired.counters.failures = 1;
        telemetry.request(Service::Flow, "403");
        views(telemetry, vec![fresh, expired])
    }

    /// Views over `connections` (no coordination).
    fn views(
        telemetry: Arc<crate::observe::telemetry::Telemetry>,
        connections: Vec<ConnectionStatus>,
    ) -> Views {
        let (publish, snapshots) = crate::observe::status::snapshot_channel(REFRESH);
        publish.send_replace(Arc::new(crate::observe::status::Snapshot {
            connections: connections.into_iter().map(Arc::new).collect(),
            refresh_before: REFRESH,
            term: 0,
        }));
        Views {
            telemetry,
            snapshots,
            leadership: None,
        }
    }

    async fn start(
        views: Views,
    ) -> (
        SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(serve(
            listener,
            views,
            cancel.clone(),
            BASE_RESERVED_DESCRIPTORS,
        ));
        (addr, cancel, handle)
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let (addr, cancel, handle) = start(board()).await;
        let http = reqwest::Client::new();
        let get = |path: &str| http.get(format!("http://{addr}{path}")).send();

        let r = get("/healthz").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");

        let r = get("/readyz").await.unwrap();
        assert_eq!(r.status(), 503);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["ready"], false);
        let not_ready = body["not_ready"].as_array().unwrap();
        assert_eq!(not_ready.len(), 1);
        assert_eq!(not_ready[0]["connection"], "old-bucket");
        let reason = not_ready[0]["reason"].as_str().unwrap();
        assert!(reason.starts_with("credentials expired "), "{reason}");
        assert!(
            reason.ends_with("; last error: 403 Forbidden: no access"),
            "{reason}"
        );

        let r = get("/metrics").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        let text = r.text().await.unwrap();
        for name in [
            "aep_s3_rotator_rotations_total{",
            "aep_s3_rotator_credentials_expiry_timestamp_seconds{",
            "aep_s3_rotator_next_rotation_timestamp_seconds{",
            "aep_s3_rotator_last_success_timestamp_seconds{",
            "# TYPE aep_s3_rotator_etag_conflicts counter",
            "aep_s3_rotator_requests_total{service=\"flow\",status=\"403\"} 1",
            "aep_s3_rotator_connections{state=\"expired\"} 1",
            "aep_s3_rotator_connections{state=\"fresh\"} 1",
            "aep_s3_rotator_connections{state=\"failing\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }

        let r = get("/status").await.unwrap();
        assert_eq!(r.status(), 200);
        let raw: serde_json::Value = r.json().await.unwrap();
        let keys: Vec<&str> = raw[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys.iter()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            [
                "id",
                "name",
                "sandbox",
                "state",
                "access_key_id",
                "expires_at",
                "next_rotation_at",
                "last_success_at",
                "last_error",
                "origin"
            ]
            .into_iter()
            .collect()
        );
        let entries: Vec<StatusEntry> = serde_json::from_value(raw).unwrap();
        assert_eq!(entries.len(), 2);
        // In id order: "id-expired" < "id-fresh".
        assert_eq!(entries[0].name, "old-bucket");
        assert_eq!(entries[0].state, ConnectionState::Expired);
        assert_eq!(entries[0].last_success_at, None);
        assert_eq!(entries[0].origin, "explicit");
        assert_eq!(entries[1].state, ConnectionState::Fresh);
        assert_eq!(entries[1].access_key_id.as_deref(), Some("ASIAFRESH"));
        let expires = entries[1].expires_at.as_deref().unwrap();
        assert!(humantime::parse_rfc3339(expires).is_ok(), "{expires}");

        let r = get("/nope").await.unwrap();
        assert_eq!(r.status(), 404);

        cancel.cancel();
        handle.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn ready_when_every_connection_is_valid_or_none() {
        let telemetry = Arc::new(crate::observe::telemetry::Telemetry::new());
        let (addr, cancel, handle) = start(views(telemetry, Vec::new())).await;
        let url = format!("http://{addr}/readyz");
        let r = reqwest::get(&url).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), r#"{"ready":true}"#);
        // No connections: /status is an empty list and /metrics renders.
        let r = reqwest::get(format!("http://{addr}/status")).await.unwrap();
        assert_eq!(r.text().await.unwrap(), "[]");
        let r = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap();
        assert!(
            r.text()
                .await
                .unwrap()
                .contains("aep_s3_rotator_connections{state=\"fresh\"} 0")
        );
        cancel.cancel();
        handle.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_healthy_standby_is_ready_and_says_whose_lease_it_is() {
        use crate::coordination::{Leadership, Role};
        // board() holds an expired connection: a leader would not be ready.
        let mut views = board();
        let mut leadership = Leadership::starting();
        let (elector, receiver) = tokio::sync::watch::channel(leadership.clone());
        views.leadership = Some(receiver);
        let (addr, cancel, handle) = start(views).await;
        let readyz = || async {
            let r = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
            (r.status().as_u16(), r.json::<Readiness>().await.unwrap())
        };
        let (code, body) = readyz().await;
        assert_eq!((code, body.role.as_deref()), (503, Some("starting")));

        leadership.role = Role::Standby;
        leadership.leader = Some("replica-1".into());
        elector.send_replace(leadership.clone());
        let (code, body) = readyz().await;
        assert_eq!(code, 200, "{body:?}");
        assert_eq!(body.role.as_deref(), Some("standby"));
        assert_eq!(body.leader.as_deref(), Some("replica-1"));
        let r = reqwest::get(format!("http://{addr}/status")).await.unwrap();
        assert_eq!(r.headers()[ROLE_HEADER], "standby");
        assert_eq!(r.headers()[LEADER_HEADER], "replica-1");
        let report = status_report(addr).await.unwrap();
        assert!(
            report.starts_with("role: standby (leader: replica-1)\n"),
            "{report}"
        );

        // A standby that cannot reach the table could not take over.
        leadership.trouble = Some("DynamoDB unavailable: timed out".into());
        elector.send_replace(leadership.clone());
        let (code, body) = readyz().await;
        assert_eq!(code, 503);
        assert!(body.reason.unwrap().contains("timed out"));

        // The leader is ready by its connections, like a single instance.
        leadership.role = Role::Leader;
        leadership.trouble = None;
        elector.send_replace(leadership.clone());
        let (code, body) = readyz().await;
        assert_eq!((code, body.role.as_deref()), (503, Some("leader")));
        assert!(!body.not_ready.is_empty());
        let metrics = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("aep_s3_rotator_leader 1"), "{metrics}");
        cancel.cancel();
        handle.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn status_report_renders_a_table() {
        let (addr, cancel, handle) = start(board()).await;
        let table = status_report(addr).await.unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        for column in [
            "NAME",
            "SANDBOX",
            "ORIGIN",
            "STATE",
            "ACCESS KEY ID",
            "EXPIRES IN",
            "NEXT ROTATION IN",
            "LAST ERROR",
        ] {
            assert!(lines[0].contains(column), "{table}");
        }
        assert!(lines[1].starts_with("old-bucket"), "{table}");
        assert!(lines[1].contains("expired"), "{table}");
        assert!(lines[1].contains("ASIAOLD"), "{table}");
        assert!(
            // Times go over the wire in whole seconds, so allow a few seconds' slack.
            lines[1].contains("expired 1m 3"),
            "{table}"
        );
        assert!(lines[1].ends_with("403 Forbidden: no access"), "{table}");
        assert!(lines[2].starts_with("sales-bucket"), "{table}");
        assert!(lines[2].contains("fresh"), "{table}");
        assert!(lines[2].contains("ASIAFRESH"), "{table}");
        assert!(
            lines[2].contains("  59m 5") || lines[2].contains("  1h  "),
            "{table}"
        );
        assert!(lines[2].ends_with('-'), "{table}");
        // Columns line up: every cell of a column starts at the same offset.
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][col..col + 7], "expired");
        assert_eq!(&lines[2][col..col + 5], "fresh");
        cancel.cancel();
        handle.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn status_report_reaches_a_wildcard_listener_on_loopback() {
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(serve(
            listener,
            board(),
            cancel.clone(),
            BASE_RESERVED_DESCRIPTORS,
        ));
        let table = status_report(SocketAddr::from(([0, 0, 0, 0], port)))
            .await
            .unwrap();
        assert!(table.contains("sales-bucket"), "{table}");
        cancel.cancel();
        handle.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn status_report_advises_when_nothing_listens() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let error = status_report(addr).await.unwrap_err();
        assert_eq!(
            error,
            format!(
                "cannot reach the admin endpoint at http://{addr}/status: connection refused; \
                 is the daemon running with [admin] listen = \"{addr}\"?"
            )
        );
        assert!(!error.contains('\n'));
    }

    #[tokio::test]
    async fn status_report_rejects_bad_answers() {
        let app = Router::new().route("/status", get(|| async { "not json" }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let error = status_report(addr).await.unwrap_err();
        assert!(error.contains("not a status list"), "{error}");
        assert!(!error.contains('\n'));

        let app = Router::new().route(
            "/status",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let error = status_report(addr).await.unwrap_err();
        assert!(
            error.contains("answered 500 Internal Server Error"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn cancel_stops_the_server() {
        let (addr, cancel, handle) = start(board()).await;
        // A kept-alive connection must not hold the shutdown up.
        let http = reqwest::Client::new();
        assert_eq!(
            http.get(format!("http://{addr}/healthz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "still accepting after cancel"
        );
    }

    fn entry(name: &str) -> StatusEntry {
        StatusEntry {
            id: name.into(),
            name: name.into(),
            sandbox: "prod".into(),
            state: ConnectionState::Fresh,
            access_key_id: None,
            expires_at: None,
            next_rotation_at: None,
            last_success_at: None,
            last_error: None,
            origin: "explicit".into(),
        }
    }

    #[test]
    fn table_renders_relative_times_and_dashes() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = |delta: i64| {
            let t = if delta >= 0 {
                now + Duration::from_secs(delta.unsigned_abs())
            } else {
                now - Duration::from_secs(delta.unsigned_abs())
            };
            Some(humantime::format_rfc3339_seconds(t).to_string())
        };
        let mut a = entry("a-very-long-connection-name");
        a.access_key_id = Some("ASIA1".into());
        a.expires_at = at(41 * 60 + 3);
        a.next_rotation_at = at(-12);
        a.state = ConnectionState::Expiring;
        let mut b = entry("b");
        b.state = ConnectionState::Expired;
        b.expires_at = at(-12);
        b.last_error = Some("line one\nline two".into());
        b.origin = "discover[1]".into();
        // Given out of order, shown sorted by name.
        let table = render_status_table(&[b, a], now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "NAME                         SANDBOX  ORIGIN       STATE     ACCESS KEY ID  EXPIRES IN       NEXT ROTATION IN  LAST ERROR"
        );
        assert_eq!(
            lines[1],
            "a-very-long-connection-name  prod     explicit     expiring  ASIA1          41m 3s           -12s              -"
        );
        assert_eq!(
            lines[2],
            "b                            prod     discover[1]  expired   -              expired 12s ago  -                 line one line two"
        );
    }

    #[test]
    fn table_without_connections_says_so() {
        let table = render_status_table(&[], crate::clock::wall_now());
        assert!(table.starts_with("NAME"));
        assert!(table.ends_with("(no connections configured)\n"));
    }

    #[test]
    fn status_entry_round_trips() {
        let mut e = entry("x");
        e.expires_at = Some("2024-05-01T12:00:00Z".into());
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains(r#""state":"fresh""#), "{json}");
        assert!(json.contains(r#""last_error":null"#), "{json}");
        assert!(json.contains(r#""origin":"explicit""#), "{json}");
        assert_eq!(serde_json::from_str::<StatusEntry>(&json).unwrap(), e);
    }

    #[test]
    fn the_reserve_follows_concurrency_and_the_s3_check() {
        // Issue 26 #8: the reserve ignored the S3 check's sockets, so at
        // nofile 256 and concurrency 48 an idle admin flood starved rotations.
        let config = |rotation: &str| {
            crate::config::Config::from_toml_str(
                &format!(
                    "[adobe]\nclient_id = \"cid\"\nclient_secret = \"not-a-real-secret\"\norg_id = \"0123456789ABCDEF01234567@AdobeOrg\"\n[[connections]]\nid = \"c\"\nsandbox = \"prod\"\n[rotation]\n{rotation}\n"
                ),
                Vec::new(),
            )
            .unwrap()
        };
        let checked = reserved_descriptors(&config("concurrency = 48\nprepush_check = true"));
        let unchecked = reserved_descriptors(&config("concurrency = 48\nprepush_check = false"));
        let small = reserved_descriptors(&config("concurrency = 2\nprepush_check = true"));
        assert!(
            checked > unchecked && unchecked > small,
            "{checked} {unchecked} {small}"
        );
        // Every slot's Flow, STS and two S3 sockets are kept from admin.
        assert!(checked >= 48 * 4, "{checked}");
        let cap = connection_cap(Some(256), checked) as u64;
        assert!(
            cap + checked <= 256 || cap == 1,
            "cap {cap} + reserve {checked}"
        );
    }

    #[test]
    fn the_connection_cap_keeps_descriptors_in_reserve() {
        assert_eq!(connection_cap(None, 40), MAX_ADMIN_CONNECTIONS);
        assert_eq!(connection_cap(Some(1024), 40), MAX_ADMIN_CONNECTIONS);
        assert_eq!(connection_cap(Some(64), 40), 64 - 40);
        assert_eq!(connection_cap(Some(10), 40), 1);
        let limits = open_file_limit();
        assert!(limits.is_none_or(|n| n > 0));
    }

    #[tokio::test]
    async fn idle_sockets_beyond_the_cap_do_not_keep_a_probe_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve_bounded(listener, board(), cancel.clone(), 4));
        // Five times the cap, all silent: before the cap each held a task
        // and a descriptor until the client gave up.
        let mut idle = Vec::new();
        for _ in 0..20 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let http = reqwest::Client::new();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            http.get(format!("http://{addr}/healthz")).send(),
        )
        .await
        .expect("/healthz answered while idle sockets held every slot")
        .unwrap();
        assert_eq!(answer.status(), 200);
        // Most idle sockets were closed by the server to make room.
        let mut closed = 0;
        for socket in &mut idle {
            let mut buf = [0u8; 1];
            if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::io::AsyncReadExt::read(socket, &mut buf),
            )
            .await
            {
                closed += 1;
            }
        }
        assert!(
            closed >= 20 - 4,
            "only {closed} of 20 idle sockets were closed"
        );
        cancel.cancel();
        let _ = server.await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_the_idle_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve_bounded(listener, board(), cancel.clone(), 4));
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Half a request line, then silence (a slow-headers client).
        tokio::io::AsyncWriteExt::write_all(&mut socket, b"GET /heal")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        // Paused time jumps to the idle deadline once everything waits.
        let read = tokio::time::timeout(
            ADMIN_IDLE_TIMEOUT * 2,
            tokio::io::AsyncReadExt::read(&mut socket, &mut buf),
        )
        .await
        .expect("the server kept a silent connection open past the idle timeout");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        cancel.cancel();
        let _ = server.await;
    }

    #[test]
    fn remote_text_in_the_table_is_escaped() {
        let mut a = entry("evil\u{1b}[2Jname");
        a.last_error =
            Some("boom\r\n{\"message\":\"credentials rotated\"}\u{1b}]0;title\u{7}".into());
        let table = render_status_table(&[a], crate::clock::wall_now());
        assert!(
            !table.contains('\u{1b}') && !table.contains('\r') && !table.contains('\u{7}'),
            "{table:?}"
        );
        assert_eq!(table.lines().count(), 2, "{table}");
    }

    #[tokio::test]
    async fn status_against_an_endless_body_stops_at_the_cap() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let chunk = format!("10000\r\n{}\r\n", "[".repeat(0x10000));
            // Bounded: 1 GiB at most, stops as soon as the client hangs up.
            let mut sent = 0u64;
            for _ in 0..16_384 {
                if socket.write_all(chunk.as_bytes()).await.is_err() {
                    break;
                }
                sent += 0x10000;
            }
            sent
        });
        let error = status_report(addr).await.unwrap_err();
        assert!(error.contains("larger than"), "{error}");
        let sent = server.await.unwrap();
        assert!(
            sent < 64 << 20,
            "the client read {sent} bytes before giving up"
        );
    }
}
