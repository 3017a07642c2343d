// Black-box tests drive the real binaries in real time: they read the real clocks.
#![allow(clippy::disallowed_methods)]
//! `rotate`, black box (issue 30): the real daemon against the simulator,
//! the real client over the control socket. Credentials live an hour, so
//! after the first pass nothing rotates unless asked: every PATCH after the
//! request is the request's.
//!
//! The peer check runs the client as `nobody` (`setpriv`): these tests run
//! as root (scripts/test.sh in CI and here); as another user the test FAILS
//! with a message, never skips.

// Helpers outside #[test] functions may unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/ha.rs"]
mod ha;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// Hour-long credentials (the simulator's), rotated 20 minutes ahead: no
/// scheduled rotation during a test.
fn quiet_rotation() -> Rotation {
    Rotation::fast()
        .session_duration("1h")
        .refresh_before("20m")
        .jitter("1s")
}

const PATIENCE: Duration = Duration::from_secs(30);

/// A daemon with `n` connections and a control socket in `<dir>/run/`,
/// after its first pass.
async fn running(n: usize) -> (Harness, PathBuf, PathBuf, DaemonProcess) {
    let h = Harness::start(n, Duration::from_secs(3600)).await;
    let run = h.dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let socket = run.join("control.sock");
    let config = h
        .config()
        .rotation(quiet_rotation())
        .admin()
        .control_socket(&socket)
        .write();
    let daemon = h.spawn(&config, &["run"]);
    let ids = h.connection_ids();
    let first_pass = h.rotated_at_least(&ids, 1, PATIENCE).await;
    assert!(first_pass, "first pass: {}", daemon.stderr_text());
    assert_eq!(
        daemon.events("control socket listening").len(),
        1,
        "{}",
        daemon.stderr_text()
    );
    (h, config, socket, daemon)
}

/// Runs the client (off the async runtime) and returns its output.
async fn client(command: Command) -> Output {
    let mut command = command;
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn rotate(config: &Path, args: &[&str]) -> Command {
    let mut command = clean_command(binary());
    command.arg("--config").arg(config).arg("rotate").args(args);
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn keys_seen(h: &Harness) -> BTreeSet<String> {
    h.sim
        .patches()
        .accepted
        .iter()
        .map(|p| p.access_key_id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_all_pushes_never_seen_keys_to_every_connection_within_seconds() {
    let (h, config, _socket, mut daemon) = running(4).await;
    let before = keys_seen(&h);
    let patched_before = h.sim.patches().accepted.len();
    let asked = Instant::now();
    let out = client(rotate(
        &config,
        &[
            "--all",
            "--reason",
            "INC-42: key leaked\nin a paste",
            "--timeout",
            "30s",
        ],
    ))
    .await;
    let took = asked.elapsed();
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}\ndaemon:\n{}",
        text(&out.stderr),
        daemon.stderr_text()
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // One line per connection: pushed, with a key nobody had seen.
    for id in h.connection_ids() {
        let line = stdout
            .lines()
            .find(|l| l.contains(&id))
            .unwrap_or_else(|| panic!("no line for {id}:\n{stdout}"));
        assert!(line.starts_with("pushed "), "{line}");
        let key = line
            .split_whitespace()
            .find(|w| w.starts_with("ASIA"))
            .unwrap_or_else(|| panic!("no key in {line}"));
        assert!(!before.contains(key), "{key} was pushed before the request");
        let on = h.sim.connection(&id).unwrap();
        assert_eq!(on.access_key_id.as_deref(), Some(key), "{id}");
    }
    assert!(
        stdout.ends_with("4 connections: 4 pushed, 0 refused, 0 pending\n"),
        "{stdout}"
    );
    // Exactly one PATCH per connection for the request.
    assert_eq!(h.sim.patches().accepted.len(), patched_before + 4);
    // Logged with the reason, escaped (one line, no forged line break).
    let requested = daemon.events("rotation requested");
    assert_eq!(requested.len(), 1, "{}", daemon.stderr_text());
    let reason = requested[0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("INC-42: key leaked"), "{reason}");
    assert!(!reason.contains('\n'), "{reason}");
    // Counted.
    let admin = daemon.events("admin endpoint listening")[0]["listen"]
        .as_str()
        .unwrap()
        .to_owned();
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("aep_s3_rotator_rotate_requests_total{result=\"pushed\"} 1"),
        "{metrics}"
    );
    assert_no_secret(&stdout, &h.secrets());
    assert_no_secret(&daemon.stderr_text(), &h.secrets());
    assert_eq!(daemon.terminate().code(), Some(0));
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_of_an_unknown_connection_names_it_and_rotates_nothing() {
    let (h, config, _socket, _daemon) = running(2).await;
    let known = h.connection_ids()[0].clone();
    let patched = h.sim.patches().accepted.len();
    let out = client(rotate(
        &config,
        &[
            "--connection",
            &known,
            "--connection",
            "no-such-connection-id",
        ],
    ))
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no-such-connection-id"), "{stderr}");
    assert!(
        !stderr.contains(&known),
        "only the unknown one is named: {stderr}"
    );
    // By name, the known one alone: after its answer exactly one more
    // PATCH exists (the refused request started nothing, and a job it had
    // started would have ended before this one, its successor, was answered).
    let name = h.sim_config.connections[0].name.clone();
    let out = client(rotate(&config, &["--connection", &name])).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        h.sim.patches().accepted.len(),
        patched + 1,
        "the refused request rotated something"
    );
    assert_eq!(
        text(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("pushed "))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_daemon_the_client_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let mut command = clean_command(binary());
    command
        .arg("--config")
        .arg(dir.path().join("absent.toml"))
        .args(["rotate", "--all", "--socket"])
        .arg(&socket);
    let out = client(command).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no control socket at") && stderr.contains("systemctl start"),
        "{stderr}"
    );
    // A socket left by a daemon that died: refused, said so.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let mut command = clean_command(binary());
    command.args(["rotate", "--all", "--socket"]).arg(&socket);
    let stderr = text(&client(command).await.stderr);
    assert!(stderr.contains("no daemon answers"), "{stderr}");
}

fn uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// The client as `nobody`, straight at the socket.
fn as_nobody(socket: &Path) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            binary(),
        ])
        .args(["--log-format", "json", "rotate", "--all", "--socket"])
        .arg(socket)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

#[tokio::test(flavor = "multi_thread")]
async fn the_socket_refuses_another_user() {
    assert_eq!(
        uid(),
        0,
        "this test runs the client as `nobody` and so must run as root (as scripts/test.sh does here and in CI)"
    );
    let (h, _config, socket, daemon) = running(1).await;
    let patched = h.sim.patches().accepted.len();
    // nobody may walk to the socket, but the socket itself is 0600.
    use std::os::unix::fs::PermissionsExt;
    for dir in [h.dir.path(), socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = client(as_nobody(&socket)).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    // Even with the file opened up by mistake, the daemon asks the kernel
    // who is calling and refuses.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = client(as_nobody(&socket)).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("only root and the daemon's user") && stderr.contains("uid 65534"),
        "{stderr}"
    );
    let refused = wait_until(Duration::from_secs(5), || {
        !daemon
            .events("control socket: refused a client of another user (only root and the daemon's own user may ask)")
            .is_empty()
    })
    .await;
    assert!(refused, "{}", daemon.stderr_text());
    // A refused client never reaches the scheduler: no request was logged
    // (the daemon logs one before any job starts), so nothing rotated.
    assert!(daemon.events("rotation requested").is_empty());
    assert_eq!(h.sim.patches().accepted.len(), patched, "nothing rotated");
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_sent_to_a_standby_is_carried_out_once_by_the_leader() {
    let cluster = ha::Cluster::start(3, Duration::from_secs(3600), 3, ha::Timings::FAST).await;
    let leader = cluster.wait_for_leader(PATIENCE).await;
    let ids = cluster.h.connection_ids();
    let first_pass = cluster.h.rotated_at_least(&ids, 1, PATIENCE).await;
    assert!(first_pass, "{}", cluster.all_logs());
    let standby = cluster.replicas.iter().find(|r| r.name != leader).unwrap();
    let before = cluster.h.sim.patches().accepted.len();
    let out = client(rotate(
        &standby.config,
        &["--all", "--reason", "ha test", "--timeout", "30s"],
    ))
    .await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}\nlogs:\n{}",
        text(&out.stderr),
        cluster.all_logs()
    );
    assert!(
        stdout.ends_with(&format!(
            "3 connections: 3 pushed, 0 refused, 0 pending by replica {leader}\n"
        )),
        "{stdout}"
    );
    // The PATCHes since the request: one per connection, all by the leader
    // (each replica is its own IMS client), with the keys printed.
    let patches = cluster.h.sim.patches();
    let after: Vec<_> = patches.accepted[before..].iter().collect();
    assert_eq!(after.len(), 3, "{after:?}");
    for p in &after {
        assert_eq!(p.client_id, leader, "{p:?}");
        assert!(stdout.contains(&p.access_key_id), "{stdout}");
    }
    // Carried out once: the leader took it once; no standby rotated.
    for replica in &cluster.replicas {
        let taken = replica
            .process
            .events("rotation requested (forwarded by a standby)")
            .len();
        assert_eq!(
            taken,
            usize::from(replica.name == leader),
            "{}",
            replica.name
        );
    }
    assert_eq!(
        standby
            .process
            .events("standing by: forwarding the rotation request to the leader")
            .len(),
        1
    );
    // The request item is gone from the table.
    let left = cluster
        .dynamo
        .query()
        .table_name(ha::TABLE)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(
            ":pk",
            aws_sdk_dynamodb::types::AttributeValue::S("rotate".into()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(left.count(), 0);
    assert_no_secret(&stdout, &cluster.secrets());
}

#[tokio::test(flavor = "multi_thread")]
async fn what_the_daemon_would_refuse_is_a_bad_command_line_said_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    // No daemon anywhere: the command line is judged first.
    let socket = dir.path().join("control.sock");
    let many: Vec<String> = (0..20_001).map(|i| format!("c{i}")).collect();
    let many: Vec<&str> = many
        .iter()
        .flat_map(|id| ["--connection", id.as_str()])
        .collect();
    for (args, says) in [
        (vec!["--connection", ""], "it is empty"),
        (vec!["--connection", "a\u{1b}[31m"], "control characters"),
        (many, "too many names"),
    ] {
        let mut command = clean_command(binary());
        command
            .args(["rotate", "--socket"])
            .arg(&socket)
            .args(&args);
        let out = client(command).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(!stderr.contains('\u{1b}'), "{stderr}");
    }
}
