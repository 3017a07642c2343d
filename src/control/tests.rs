//! The control socket on a temp dir: binding (stale, live, foreign files),
//! permissions, framing and limits, with a stand-in for the scheduler loop.

use std::time::SystemTime;

use tokio::io::AsyncWriteExt;

use super::*;
use crate::scheduler::RotateOutcome;

#[test]
fn the_default_is_the_runtime_directory_else_the_fixed_path() {
    assert_eq!(default_path(None), PathBuf::from(DEFAULT_SOCKET));
    assert_eq!(
        default_path(Some("/run/aep-s3-rotator-acme".into())),
        PathBuf::from("/run/aep-s3-rotator-acme/control.sock")
    );
    // systemd lists several directories with colons: the first one.
    assert_eq!(
        default_path(Some("/run/a:/run/b".into())),
        PathBuf::from("/run/a/control.sock")
    );
    assert_eq!(default_path(Some("".into())), PathBuf::from(DEFAULT_SOCKET));
    assert_eq!(socket_path(&ControlSocket::Off), None);
    assert_eq!(
        socket_path(&ControlSocket::At("/x/y.sock".into())),
        Some(PathBuf::from("/x/y.sock"))
    );
}

#[tokio::test]
async fn binding_replaces_a_stale_socket_but_never_a_live_one_or_another_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    // A socket file nobody answers on (its daemon died).
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let server = ControlServer::bind(&path).await.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second daemon on the same path is refused while the first lives.
    assert!(matches!(
        ControlServer::bind(&path).await,
        Err(BindError::InUse(_))
    ));
    drop(server);
    assert!(!path.exists(), "the socket file goes with the server");
    std::fs::write(&path, "not a socket").unwrap();
    assert!(matches!(
        ControlServer::bind(&path).await,
        Err(BindError::NotASocket(_))
    ));
    assert!(matches!(
        ControlServer::bind(&dir.path().join("missing/control.sock")).await,
        Err(BindError::NoDirectory(_))
    ));
}

/// A stand-in scheduler: every named connection is pushed at once.
fn fake_loop() -> mpsc::Sender<RotateRequest> {
    let (tx, mut rx) = mpsc::channel::<RotateRequest>(4);
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            let ids = match request.selection {
                Selection::All => vec!["c1".to_owned(), "c2".to_owned()],
                Selection::Only { connections, .. } => connections,
            };
            let pending = ids
                .into_iter()
                .map(|id| {
                    let (done, outcome) = oneshot::channel();
                    let _ = done.send(RotateOutcome::Pushed {
                        access_key_id: format!("ASIA{}", id.to_uppercase()),
                        expires_at: SystemTime::UNIX_EPOCH,
                    });
                    Pending {
                        id,
                        sandbox: "prod".to_owned(),
                        name: "n".to_owned(),
                        outcome,
                    }
                })
                .collect();
            let _ = request.reply.send(Ok(pending));
        }
    });
    tx
}

async fn serving() -> (
    tempfile::TempDir,
    PathBuf,
    RotateRequests,
    CancellationToken,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let server = ControlServer::bind(&path).await.unwrap();
    let counter = RotateRequests::default();
    let control = Control {
        requests: fake_loop(),
        rotate_requests: counter.clone(),
        replica: None,
        forward: None,
    };
    let cancel = CancellationToken::new();
    tokio::spawn(server.serve(control, cancel.clone()));
    (dir, path, counter, cancel)
}

async fn send(path: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(path).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn a_request_line_gets_one_answer_line_per_connection() {
    let (_dir, path, _, cancel) = serving().await;
    let answer = send(
        &path,
        b"{\"version\":1,\"all\":true,\"reason\":\"leak\",\"timeout_ms\":5000}\n",
    )
    .await;
    assert!(
        answer.ends_with('\n') && answer.lines().count() == 1,
        "{answer}"
    );
    let answer: WireAnswer = serde_json::from_str(&answer).unwrap();
    let WireResult::Done { connections, .. } = answer.result else {
        panic!("{answer:?}");
    };
    let keys: Vec<_> = connections
        .iter()
        .map(|c| c.access_key_id.clone().unwrap())
        .collect();
    assert_eq!(keys, ["ASIAC1", "ASIAC2"]);
    cancel.cancel();
}

#[tokio::test]
async fn malformed_oversized_and_silent_clients_are_refused() {
    let (_dir, path, counter, cancel) = serving().await;
    for bad in [
        &b"not json\n"[..],
        b"{\"version\":1,\"all\":true,\"timeout_ms\":1,\"extra\":1}\n",
        b"{\"version\":1,\"connections\":[\"a/../b\\u0007\"],\"timeout_ms\":1}\n",
    ] {
        let answer: WireAnswer = serde_json::from_str(&send(&path, bad).await).unwrap();
        assert!(
            matches!(answer.result, WireResult::Refused { .. }),
            "{answer:?}"
        );
    }
    // Longer than the cap: refused without reading it all.
    let mut huge = vec![b'x'; wire::MAX_REQUEST + 10];
    huge.push(b'\n');
    let (mut reader, mut writer) = UnixStream::connect(&path).await.unwrap().into_split();
    // Written beside the read: the daemon stops reading at the cap.
    let sent = tokio::spawn(async move { writer.write_all(&huge).await });
    let mut answer = String::new();
    let read = reader.read_to_string(&mut answer).await;
    assert!(answer.contains("longer than"), "{read:?} {answer}");
    let _ = sent.await;
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("rotate_requests", "", counter.family());
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("rotate_requests_total{result=\"rejected\"} 4"),
        "{text}"
    );
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_client_that_sends_nothing_is_dropped_after_the_read_timeout() {
    let (_dir, path, _, cancel) = serving().await;
    let mut stream = UnixStream::connect(&path).await.unwrap();
    stream.write_all(b"{\"version\":1,").await.unwrap();
    let mut answer = String::new();
    // Paused time: the five seconds pass at once.
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.contains("no complete request line"), "{answer}");
    cancel.cancel();
}

#[tokio::test]
async fn a_request_cut_short_by_the_client_is_told_so() {
    let (_dir, path, _, cancel) = serving().await;
    let mut stream = UnixStream::connect(&path).await.unwrap();
    stream.write_all(b"{\"version\":1,").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.contains("without a newline"), "{answer:?}");
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_clients_is_answered_a_bounded_number_at_a_time() {
    let (_dir, path, counter, cancel) = serving().await;
    // Every served slot taken by a client that sends nothing (yet).
    let mut silent = Vec::new();
    for _ in 0..MAX_CLIENTS {
        silent.push(UnixStream::connect(&path).await.unwrap());
    }
    // A flood that neither sends nor reads: each refusal held open would
    // hold a descriptor of the daemon's.
    let flood_size = 100;
    let mut flood = Vec::new();
    for _ in 0..flood_size {
        flood.push(UnixStream::connect(&path).await.unwrap());
    }
    let mut answered = 0;
    for mut stream in flood {
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer).await;
        if !answer.is_empty() {
            assert!(answer.contains("try again"), "{answer}");
            answered += 1;
        }
    }
    assert!(
        answered <= MAX_REFUSING,
        "{answered} of {flood_size} refusals held at once"
    );
    assert!(answered > 0, "some are told why");
    // The served clients still get their answers.
    for mut stream in silent {
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.contains("no complete request line"), "{answer}");
    }
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("rotate_requests", "", counter.family());
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(&format!(
            "rotate_requests_total{{result=\"rejected\"}} {}",
            flood_size + MAX_CLIENTS
        )),
        "every client is counted: {text}"
    );
    cancel.cancel();
}

/// The loop takes the request on and answers only when told (the daemon
/// stopping drops what it still holds).
fn holding_loop() -> (
    mpsc::Sender<RotateRequest>,
    oneshot::Receiver<Vec<oneshot::Sender<RotateOutcome>>>,
) {
    let (tx, mut rx) = mpsc::channel::<RotateRequest>(4);
    let (held_tx, held_rx) = oneshot::channel();
    tokio::spawn(async move {
        let Some(request) = rx.recv().await else {
            return;
        };
        let mut held = Vec::new();
        let pending = ["c1", "c2"]
            .into_iter()
            .map(|id| {
                let (done, outcome) = oneshot::channel();
                held.push(done);
                Pending {
                    id: id.to_owned(),
                    sandbox: "prod".to_owned(),
                    name: "n".to_owned(),
                    outcome,
                }
            })
            .collect();
        let _ = request.reply.send(Ok(pending));
        let _ = held_tx.send(held);
    });
    (tx, held_rx)
}

#[test]
fn an_answer_in_flight_at_shutdown_is_written_before_the_server_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = runtime.block_on(async {
        let server = ControlServer::bind(&path).await.unwrap();
        let (requests, held) = holding_loop();
        let control = Control {
            requests,
            rotate_requests: RotateRequests::default(),
            replica: None,
            forward: None,
        };
        let cancel = CancellationToken::new();
        let serving = tokio::spawn(server.serve(control, cancel.clone()));
        let mut client = UnixStream::connect(&path).await.unwrap();
        client
            .write_all(b"{\"version\":1,\"all\":true,\"timeout_ms\":60000}\n")
            .await
            .unwrap();
        let held = held.await.unwrap();
        // SIGTERM: the server stops, then the scheduler ends and drops
        // the jobs it did not run; `run` awaits the server, then exits.
        cancel.cancel();
        // The server has stopped accepting (its file is gone) before the
        // scheduler's end answers the request.
        while path.exists() {
            tokio::task::yield_now().await;
        }
        let mut held = held.into_iter();
        let first = held.next().unwrap();
        let _ = first.send(RotateOutcome::Refused("the daemon is shutting down".into()));
        drop(held);
        serving.await.unwrap();
        client.into_std().unwrap()
    });
    // The process exits: whatever the server did not write is lost.
    drop(runtime);
    let mut client = client;
    client.set_nonblocking(false).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut client, &mut answer).unwrap();
    assert!(answer.ends_with('\n'), "cut: {answer:?}");
    let answer: WireAnswer = serde_json::from_str(&answer).unwrap();
    let WireResult::Done { connections, .. } = answer.result else {
        panic!("{answer:?}");
    };
    assert_eq!(connections.len(), 2);
    assert!(
        connections
            .iter()
            .all(|c| c.outcome == wire::WireOutcome::Refused),
        "{connections:?}"
    );
}

/// One logged event's fields, as (name, text).
type Event = Vec<(String, String)>;

/// The fields of every event logged while `f` runs, as text.
fn logged(f: impl FnOnce()) -> Vec<Event> {
    crate::observe::recorded::logged(f)
        .into_iter()
        .map(|event| event.fields)
        .collect()
}

#[test]
fn unknown_names_are_logged_bounded_and_escaped() {
    // As many names as a request may hold, one with a bidi override.
    let mut names: Vec<String> = (0..wire::MAX_NAMES)
        .map(|i| format!("not-a-connection-{i:08}"))
        .collect();
    names[0] = "evil\u{202e}txt.exe".to_owned();
    let answer = WireAnswer::new(WireResult::Unknown {
        connections: names.clone(),
        sandboxes: names,
    });
    let events = logged(|| log_answer(&answer, "INC-1"));
    assert_eq!(events.len(), 1);
    for (field, value) in &events[0] {
        assert!(value.len() < 1000, "{field}: {} bytes", value.len());
        assert!(!value.contains('\u{202e}'), "{field}: {value}");
    }
    let connections = &events[0]
        .iter()
        .find(|(f, _)| f == "unknown_connections")
        .unwrap()
        .1;
    assert!(connections.contains("20000 names"), "{connections}");
}

/// A leader that never answers a forwarded request (it went away); says
/// when a request reached it.
#[derive(Debug)]
struct SilentLeader(Arc<tokio::sync::Notify>);

impl Forward for SilentLeader {
    fn forward<'a>(
        &'a self,
        _request: &'a WireRequest,
        _wait: Duration,
    ) -> futures::future::BoxFuture<'a, WireAnswer> {
        self.0.notify_one();
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn a_standby_stopping_mid_forward_tells_the_client_and_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let server = ControlServer::bind(&path).await.unwrap();
    // The scheduler of a standby: not the leader.
    let (requests, mut rx) = mpsc::channel::<RotateRequest>(4);
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            let _ = request.reply.send(Err(RotateRefusal::NotLeader));
        }
    });
    let reached = Arc::new(tokio::sync::Notify::new());
    let control = Control {
        requests,
        rotate_requests: RotateRequests::default(),
        replica: Some("standby-1".to_owned()),
        forward: Some(Arc::new(SilentLeader(Arc::clone(&reached)))),
    };
    let cancel = CancellationToken::new();
    let serving = tokio::spawn(server.serve(control, cancel.clone()));
    let mut client = UnixStream::connect(&path).await.unwrap();
    client
        .write_all(b"{\"version\":1,\"all\":true,\"timeout_ms\":600000}\n")
        .await
        .unwrap();
    reached.notified().await;
    cancel.cancel();
    // Without the stop the server would wait out the forward (10 min here)
    // and its drain (6 min): a stuck test, not a slow one.
    tokio::time::timeout(Duration::from_secs(60), serving)
        .await
        .expect("the server returned")
        .unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    let answer: WireAnswer = serde_json::from_str(&answer).unwrap();
    let WireResult::Refused { message } = answer.result else {
        panic!("{answer:?}");
    };
    assert!(message.contains("shutting down"), "{message}");
}
