//! The control socket: where `aep-s3-rotator rotate` asks the running
//! daemon to mint fresh credentials and push them now.
//!
//! A Unix socket, never the admin HTTP listener (which has no
//! authentication). Two locks on it: the file is `0600`, owned by the
//! daemon's user, in a directory only that user may enter (systemd's
//! `RuntimeDirectory=`, mode `0700`); and every client's uid is read from
//! the kernel (`SO_PEERCRED`): only the daemon's own uid and root are
//! served, anyone else is told so and counted (`result="denied"`).
//!
//! One request line, one answer line ([`wire`]), both JSON; the request is
//! capped in size and time, checked field by field, and its reason (and any
//! name it holds) escaped and bounded before it is logged. Clients are
//! bounded too: [`MAX_CLIENTS`] served, [`MAX_REFUSING`] being told "busy"
//! or "permission denied", any more closed at once, so a flood holds a
//! fixed number of descriptors. At shutdown the socket closes first and the
//! answers in flight are written before the server returns. A request becomes a
//! [`RotateRequest`](crate::scheduler::RotateRequest) for the scheduler
//! loop, which runs each named connection's ordinary job (pre-push check,
//! request gate, etag, fence) with credentials minted for it; the answer
//! lists each connection's result. With `[coordination]` a standby cannot
//! rotate: it hands the request to the leader through the coordination
//! table ([`forward`]) and relays the leader's answer.
//!
//! Where the socket is ([`socket_path`]): `[admin] control_socket`; by
//! default `$RUNTIME_DIRECTORY/control.sock` when systemd sets that
//! variable, else [`DEFAULT_SOCKET`]. The client reads the same key from
//! the same config file, so both agree wherever the config says; the
//! default is the same for both except under a unit whose
//! `RuntimeDirectory=` is not `aep-s3-rotator` (the daemon warns then).
//!
//! Imports the scheduler's request types, the coordination table (for
//! forwarding), telemetry (the counter), config; nothing imports it but
//! the commands.

pub mod forward;
pub mod wire;

use std::ffi::OsString;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ControlSocket;
use crate::counters::RotateRequests;
use crate::scheduler::{Pending, RotateRefusal, RotateRequest, Selection};
use wire::{Valid, WireAnswer, WireConnection, WireOutcome, WireRequest, WireResult};

/// Where the socket is when neither the config nor systemd says: the
/// directory the packaged unit's `RuntimeDirectory=aep-s3-rotator` makes,
/// and the one the container image ships (owned by its user).
pub const DEFAULT_SOCKET: &str = "/run/aep-s3-rotator/control.sock";

/// The socket's file name inside `$RUNTIME_DIRECTORY`.
const SOCKET_NAME: &str = "control.sock";

/// Clients served at once; more are told the daemon is busy. An operator
/// runs one `rotate` at a time; four leave room for a retry and a script.
const MAX_CLIENTS: usize = 4;

/// Clients being told "busy" or "permission denied" at once. Beyond these
/// (a flood), a client is closed at once without an answer: every open
/// client holds a descriptor, and descriptors are what rotations need.
const MAX_REFUSING: usize = 16;

/// How long the server waits at shutdown for the answers still being
/// written: longer than the longest `shutdown_grace` (5 min) plus a write,
/// only a safety net (an answer is due as soon as the scheduler stops).
const DRAIN: Duration = Duration::from_secs(6 * 60);

/// How long a client may take to send its request line: it writes it at
/// once, so a client still silent after this is stuck or hostile.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long writing the answer may take (a client that stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long handing a request to the scheduler loop may take: the loop
/// takes one per turn, so only a wedged loop waits this long.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket path for `setting`, or `None` when it is off.
pub fn socket_path(setting: &ControlSocket) -> Option<PathBuf> {
    match setting {
        ControlSocket::Off => None,
        ControlSocket::At(path) => Some(path.clone()),
        ControlSocket::Default => Some(default_path(std::env::var_os("RUNTIME_DIRECTORY"))),
    }
}

/// The daemon's control socket for `setting`, bound; `None` when it is off.
/// The default path is best effort (a warning, and no socket, when it
/// cannot be had); a path the config names must be had.
pub async fn bind_for(setting: &ControlSocket) -> Result<Option<ControlServer>, BindError> {
    let Some(path) = socket_path(setting) else {
        tracing::info!(
            "control socket off ([admin] control_socket = \"\"); rotate cannot reach this daemon"
        );
        return Ok(None);
    };
    match ControlServer::bind(&path).await {
        Ok(server) => {
            if *setting == ControlSocket::Default && path != Path::new(DEFAULT_SOCKET) {
                tracing::warn!(
                    path = %path.display(),
                    "control socket in $RUNTIME_DIRECTORY: `rotate` looks for it there only when the config says so; set [admin] control_socket = \"{}\" in this daemon's config",
                    path.display()
                );
            }
            Ok(Some(server))
        }
        Err(error) if *setting == ControlSocket::Default => {
            tracing::warn!(error = %error, "no control socket; `rotate` cannot reach this daemon");
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// `$RUNTIME_DIRECTORY/control.sock` (its first directory, when systemd
/// lists several), else [`DEFAULT_SOCKET`].
fn default_path(runtime_directory: Option<OsString>) -> PathBuf {
    let first = runtime_directory.and_then(|dirs| {
        let dirs = dirs.to_string_lossy().into_owned();
        dirs.split(':')
            .find(|d| d.starts_with('/'))
            .map(PathBuf::from)
    });
    match first {
        Some(dir) => dir.join(SOCKET_NAME),
        None => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// Why the daemon cannot serve the control socket. Every message says what
/// to do.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process answers on the path.
    #[error(
        "another daemon already answers on the control socket {0}; give each daemon its own [admin] control_socket"
    )]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; remove it or set another [admin] control_socket")]
    NotASocket(PathBuf),
    /// The directory is missing (no `RuntimeDirectory=`, no volume).
    #[error(
        "the directory of the control socket {0} does not exist; create it for the daemon's user (systemd: RuntimeDirectory=), or set [admin] control_socket"
    )]
    NoDirectory(PathBuf),
    /// The daemon's user may not create files in the directory.
    #[error(
        "the daemon's user may not create the control socket {0} (permission denied on its directory); give the directory to that user (systemd: RuntimeDirectory=; a container: a volume it owns), or set [admin] control_socket"
    )]
    NotWritable(PathBuf),
    /// Any other failure to create or secure the socket.
    #[error("cannot create the control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The bound socket; removes its file when dropped (if it is still ours).
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// The daemon's own uid, as the kernel reports it for its own sockets.
    own_uid: u32,
    /// The socket file's (device, inode): only that file is removed at exit.
    file: (u64, u64),
}

impl ControlServer {
    /// Binds `path` with mode 0600. A socket file left by a daemon that
    /// died is replaced; one a live daemon answers on is not.
    pub async fn bind(path: &Path) -> Result<Self, BindError> {
        let io = |source| BindError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
                Ok(_) => return Err(BindError::InUse(path.to_owned())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing a stale control socket (no daemon answers on it)");
                    std::fs::remove_file(path).map_err(io)?;
                }
                Err(e) => return Err(io(e)),
            },
            Ok(_) => return Err(BindError::NotASocket(path.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = UnixListener::bind(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BindError::NoDirectory(path.to_owned()),
            std::io::ErrorKind::PermissionDenied => BindError::NotWritable(path.to_owned()),
            _ => io(e),
        })?;
        // The peer check below serves anyone who connects between bind and
        // chmod no further than it would afterwards.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        let meta = std::fs::symlink_metadata(path).map_err(io)?;
        let (mine, _) = UnixStream::pair().map_err(io)?;
        let own_uid = mine.peer_cred().map_err(io)?.uid();
        Ok(Self {
            listener,
            path: path.to_owned(),
            own_uid,
            file: (meta.dev(), meta.ino()),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients until `cancel`; then closes the socket and waits for
    /// the answers still being written (each is due once the scheduler
    /// stops: see [`DRAIN`]).
    ///
    /// Bounded whatever clients do: [`MAX_CLIENTS`] served, [`MAX_REFUSING`]
    /// being refused (another user, or busy), any more closed at once. A
    /// client of another user never takes a served slot.
    pub async fn serve(self, control: Control, cancel: CancellationToken) {
        tracing::info!(path = %self.path.display(), "control socket listening");
        let control = Arc::new(control);
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
        let tasks = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, most likely: let some close.
                    tracing::warn!(error = %error, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let own_uid = self.own_uid;
            let refusal = match stream.peer_cred().map(|cred| cred.uid()) {
                Ok(uid) if uid == 0 || uid == own_uid => {
                    match Arc::clone(&slots).try_acquire_owned() {
                        Ok(permit) => {
                            let control = Arc::clone(&control);
                            let cancel = cancel.clone();
                            tasks.spawn(async move {
                                control.client(stream, uid, &cancel).await;
                                drop(permit);
                            });
                            continue;
                        }
                        Err(_) => {
                            control.rotate_requests.count("rejected");
                            WireAnswer::refused(
                                "the daemon is answering other rotate requests; try again in a moment",
                            )
                        }
                    }
                }
                Ok(uid) => {
                    control.rotate_requests.count("denied");
                    tracing::warn!(
                        uid,
                        "control socket: refused a client of another user (only root and the daemon's own user may ask)"
                    );
                    WireAnswer::refused(format!(
                        "permission denied: only root and the daemon's user (uid {own_uid}) may ask this daemon to rotate; you are uid {uid}"
                    ))
                }
                Err(error) => {
                    control.rotate_requests.count("denied");
                    tracing::warn!(error = %error, "control socket: cannot read the client's credentials; refused");
                    continue;
                }
            };
            match Arc::clone(&refusing).try_acquire_owned() {
                Ok(permit) => {
                    tasks.spawn(async move {
                        write_answer(stream, &refusal).await;
                        drop(permit);
                    });
                }
                // A flood: closed now, its descriptor freed at once.
                Err(_) => {
                    tracing::debug!(
                        "control socket: too many clients at once; closed one unanswered"
                    );
                    drop(stream);
                }
            }
        }
        // No new clients (the file goes too); the answers in flight are
        // written before the process may exit.
        drop(self);
        tasks.close();
        if tokio::time::timeout(DRAIN, tasks.wait()).await.is_err() {
            tracing::warn!("control socket: answers still unwritten at shutdown");
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // Only our own file: a successor may have bound the path meanwhile.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.file
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Hands a validated request to the leader (coordination on, this replica
/// standing by), and answers what the leader did.
pub trait Forward: Send + Sync + std::fmt::Debug + 'static {
    /// Forwards `request`; waits up to `wait` for the leader's answer.
    fn forward<'a>(&'a self, request: &'a WireRequest, wait: Duration)
    -> BoxFuture<'a, WireAnswer>;
}

/// What the socket's clients are served with.
#[derive(Debug)]
pub struct Control {
    /// To the scheduler loop.
    pub requests: mpsc::Sender<RotateRequest>,
    /// `rotate_requests_total`.
    pub rotate_requests: RotateRequests,
    /// This replica's holder name (coordination on), shown to the client.
    pub replica: Option<String>,
    /// With `[coordination]`: how a standby hands requests to the leader.
    pub forward: Option<Arc<dyn Forward>>,
}

impl Control {
    /// One client of an allowed user (root or the daemon's own): its
    /// request, answered.
    async fn client(&self, mut stream: UnixStream, uid: u32, cancel: &CancellationToken) {
        let answer = match read_request(&mut stream).await {
            Ok(request) => self.answer(&request, uid, cancel).await,
            Err(ReadError::Closed) => {
                // A liveness probe (another daemon checking for a stale socket).
                tracing::debug!("control socket: client closed without a request");
                return;
            }
            Err(error) => {
                tracing::warn!(uid, error = %error, "control socket: bad request refused");
                WireAnswer::refused(error.to_string())
            }
        };
        self.rotate_requests.count(answer.metric_result());
        write_answer(stream, &answer).await;
    }

    async fn answer(
        &self,
        request: &WireRequest,
        uid: u32,
        cancel: &CancellationToken,
    ) -> WireAnswer {
        let valid = match request.validate() {
            Ok(valid) => valid,
            Err(message) => {
                tracing::warn!(uid, error = %message, "control socket: bad request refused");
                return WireAnswer::refused(message);
            }
        };
        tracing::info!(
            reason = %valid.reason,
            uid,
            selection = %describe(&valid.selection),
            wait = %humantime::format_duration(valid.wait),
            "rotation requested"
        );
        let answer = match carry_out(&self.requests, &valid).await {
            Err(RotateRefusal::NotLeader) => match &self.forward {
                Some(forward) => {
                    tracing::info!(reason = %valid.reason, "standing by: forwarding the rotation request to the leader");
                    // A standby stopping does not wait for the leader.
                    tokio::select! {
                        answer = forward.forward(request, valid.wait) => answer,
                        () = cancel.cancelled() => WireAnswer::refused(
                            "this replica is shutting down; the leader may still carry the request out: check `aep-s3-rotator status`",
                        ),
                    }
                }
                None => WireAnswer::refused("this daemon is not rotating now (not the leader)"),
            },
            other => {
                let mut answer = to_answer(other);
                answer.replica.clone_from(&self.replica);
                answer
            }
        };
        log_answer(&answer, &valid.reason);
        answer
    }
}

/// Has this replica's scheduler carry `valid` out, and waits for each
/// connection's job up to `valid.wait`. `Err(NotLeader)` on a standby.
pub async fn carry_out(
    requests: &mpsc::Sender<RotateRequest>,
    valid: &Valid,
) -> Result<Vec<WireConnection>, RotateRefusal> {
    let deadline = crate::clock::mono_now() + valid.wait;
    let (reply, taken) = oneshot::channel();
    let request = RotateRequest {
        selection: valid.selection.clone(),
        reply,
    };
    let stopping = || RotateRefusal::Stopping;
    match tokio::time::timeout(HANDOFF_TIMEOUT, requests.send(request)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => return Err(stopping()),
    }
    let pending = taken.await.map_err(|_| stopping())??;
    Ok(collect(pending, deadline).await)
}

/// Each connection's result, or `pending` for those not done by `deadline`.
async fn collect(pending: Vec<Pending>, deadline: tokio::time::Instant) -> Vec<WireConnection> {
    let mut out = Vec::with_capacity(pending.len());
    for p in pending {
        let outcome = match tokio::time::timeout_at(deadline, p.outcome).await {
            Ok(Ok(outcome)) => Some(outcome),
            Ok(Err(_)) => Some(crate::scheduler::RotateOutcome::Refused(
                "the daemon stopped before this connection's job ran".to_owned(),
            )),
            Err(_) => None,
        };
        out.push(WireConnection::new(p.id, p.name, p.sandbox, outcome));
    }
    out
}

/// The answer for what [`carry_out`] returned (no replica named).
pub fn to_answer(result: Result<Vec<WireConnection>, RotateRefusal>) -> WireAnswer {
    match result {
        Ok(connections) => WireAnswer::new(WireResult::Done {
            connections,
            pushed_not_listed: 0,
            others_not_listed: 0,
        }),
        Err(RotateRefusal::Unknown {
            connections,
            sandboxes,
        }) => WireAnswer::new(WireResult::Unknown {
            connections,
            sandboxes,
        }),
        Err(RotateRefusal::NoConnections) => {
            WireAnswer::refused("the daemon has no connections to rotate")
        }
        Err(RotateRefusal::NotLeader) => {
            WireAnswer::refused("this replica is not the leader; the request was not carried out")
        }
        Err(RotateRefusal::Stopping) => {
            WireAnswer::refused("the daemon is shutting down; run rotate again once it is back")
        }
    }
}

pub(crate) fn log_answer(answer: &WireAnswer, reason: &str) {
    match &answer.result {
        WireResult::Done {
            connections,
            pushed_not_listed,
            others_not_listed,
        } => {
            let count = |o: WireOutcome| connections.iter().filter(|c| c.outcome == o).count();
            tracing::info!(
                reason = %reason,
                replica = answer.replica.as_deref().unwrap_or(""),
                pushed = count(WireOutcome::Pushed) + pushed_not_listed,
                refused = count(WireOutcome::Refused),
                not_listed = others_not_listed,
                pending = count(WireOutcome::Pending),
                dry_run = count(WireOutcome::DryRun),
                "rotation request answered"
            );
        }
        WireResult::Unknown {
            connections,
            sandboxes,
        } => tracing::warn!(
            reason = %reason,
            unknown_connections = %names_for_log(connections),
            unknown_sandboxes = %names_for_log(sandboxes),
            "rotation request names unknown connections; nothing started"
        ),
        WireResult::Refused { message } => {
            tracing::warn!(reason = %reason, error = %message, "rotation request refused")
        }
    }
}

/// How many characters of a request's unknown names are logged: the
/// request may hold 20,000 of them (the client is told them all).
const MAX_LOGGED_NAMES: usize = 300;

/// Names a client sent, for one log field: comma-separated, bounded and
/// escaped (a request's names are the client's text, bidi overrides and
/// all).
fn names_for_log(names: &[String]) -> String {
    let mut joined = String::new();
    let mut listed = 0;
    for name in names {
        if joined.len() > MAX_LOGGED_NAMES * 4 {
            break; // cut below anyway
        }
        if listed > 0 {
            joined.push(',');
        }
        joined.push_str(name);
        listed += 1;
    }
    let shown = crate::scrub::bounded(&joined, MAX_LOGGED_NAMES);
    if listed < names.len() {
        format!("{shown} (of {} names)", names.len())
    } else {
        shown
    }
}

/// `all`, or `connections=3 sandboxes=1` (the names are in the results).
fn describe(selection: &Selection) -> String {
    match selection {
        Selection::All => "all".to_owned(),
        Selection::Only {
            connections,
            sandboxes,
        } => format!(
            "connections={} sandboxes={}",
            connections.len(),
            sandboxes.len()
        ),
    }
}

/// Why a request line could not be read. Shown to the client.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("the request line is longer than {} bytes", wire::MAX_REQUEST)]
    TooLong,
    #[error("no complete request line within {}s", READ_TIMEOUT.as_secs())]
    Timeout,
    #[error("the connection closed before a request")]
    Closed,
    #[error("the request line ended without a newline (the client closed its side mid-request)")]
    Incomplete,
    #[error("not a rotate request: {0}")]
    Malformed(String),
    #[error("cannot read the request: {0}")]
    Io(std::io::Error),
}

/// One request line: at most [`wire::MAX_REQUEST`] bytes within [`READ_TIMEOUT`].
async fn read_request(stream: &mut UnixStream) -> Result<WireRequest, ReadError> {
    let mut line = Vec::new();
    let limit = u64::try_from(wire::MAX_REQUEST).unwrap_or(u64::MAX) + 1;
    let mut reader = BufReader::new((&mut *stream).take(limit));
    match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => return Err(ReadError::Timeout),
        Ok(Err(e)) => return Err(ReadError::Io(e)),
        Ok(Ok(0)) => return Err(ReadError::Closed),
        Ok(Ok(_)) => {}
    }
    if line.len() > wire::MAX_REQUEST {
        return Err(ReadError::TooLong);
    }
    if line.last() != Some(&b'\n') {
        return Err(ReadError::Incomplete);
    }
    serde_json::from_slice(&line)
        .map_err(|e| ReadError::Malformed(crate::scrub::bounded(&e.to_string(), 200)))
}

async fn write_answer(mut stream: UnixStream, answer: &WireAnswer) {
    let Ok(mut line) = serde_json::to_vec(answer) else {
        return; // plain data: cannot fail
    };
    line.push(b'\n');
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&line).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::debug!("control socket: the client did not take the answer");
        return;
    }
    // Closing with unread input (a request cut at the cap) resets the
    // connection, and the client would lose the answer with it: discard
    // what it still sends, bounded, until it closes.
    let mut sink = tokio::io::sink();
    let _ = tokio::time::timeout(
        LINGER,
        tokio::io::copy(&mut (&mut stream).take(LINGER_BYTES), &mut sink),
    )
    .await;
}

/// How long, and how much, the server reads after its answer so that the
/// client can read it ([`write_answer`]).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: u64 = 2 * wire::MAX_REQUEST as u64;

#[cfg(test)]
mod tests;
