//! Operations, black box: admin endpoint, readiness, state across restarts,
//! SIGHUP reload, the systemd notify protocol.

// Helpers outside #[test] functions may unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use aep_s3_simulator::SimService;
use common::*;

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(response) => (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        ),
        Err(_) => (0, String::new()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_serve_metrics_readiness_and_status() {
    let h = Harness::start(2, Duration::from_secs(4)).await;
    let ids = h.connection_ids();
    let config = h.config().admin().write();
    let mut daemon = h.spawn(&config, &["run"]);
    let admin = daemon.admin_addr().await;
    let base = format!("http://{admin}");
    assert!(
        h.rotated_at_least(&ids, 1, Duration::from_secs(20)).await,
        "stderr:\n{}",
        daemon.stderr_text()
    );
    // Ready once every connection holds credentials we pushed.
    let mut ready = (0, String::new());
    wait_until_async(Duration::from_secs(4), async || {
        ready = get(&format!("{base}/readyz")).await;
        ready.0 == 200
    })
    .await;
    // The endpoint answered, so both places that ever logged its start have
    // run: it is logged once, with the address bound.
    let listening = daemon.events("admin endpoint listening");
    assert_eq!(listening.len(), 1, "stderr:\n{}", daemon.stderr_text());
    assert_eq!(ready.0, 200, "{}", ready.1);
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);

    let (code, metrics) = get(&format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    for name in [
        "aep_s3_rotator_rotations_total",
        "aep_s3_rotator_credentials_expiry_timestamp_seconds",
        "aep_s3_rotator_next_rotation_timestamp_seconds",
        "aep_s3_rotator_last_success_timestamp_seconds",
        "aep_s3_rotator_etag_conflicts_total",
        "aep_s3_rotator_requests_total",
        "aep_s3_rotator_connections",
    ] {
        assert!(
            metrics.contains(&format!("\n{name}")),
            "metric {name} missing:\n{metrics}"
        );
    }
    assert!(metrics.contains("aep_s3_rotator_rotations_total{connection=\"conn-0\",sandbox=\"prod\",outcome=\"success\"}"), "{metrics}");
    assert!(
        metrics.contains("aep_s3_rotator_requests_total{service=\"flow\",status=\"200\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("aep_s3_rotator_requests_total{service=\"sts\",status=\"200\"}"),
        "{metrics}"
    );

    assert!(
        metrics.contains("aep_s3_rotator_connection_info{")
            && metrics.contains("origin=\"explicit\"} 1"),
        "{metrics}"
    );
    let (code, status) = get(&format!("{base}/status")).await;
    assert_eq!(code, 200);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&status).unwrap();
    assert_eq!(entries.len(), 2);
    assert!(
        entries.iter().all(|e| e["access_key_id"]
            .as_str()
            .is_some_and(|k| k.starts_with("ASIA"))),
        "{status}"
    );
    // Both are `[[connections]]` entries: their origin says so.
    assert!(
        entries.iter().all(|e| e["origin"] == "explicit"),
        "{status}"
    );

    // `status` renders the same from the command line.
    let mut cli = DaemonProcess::spawn(status_command(&config, admin));
    assert_eq!(
        cli.wait(Duration::from_secs(20)).code(),
        Some(0),
        "{}",
        cli.stderr_text()
    );
    let table = cli.stdout_text();
    assert!(
        table.contains("conn-0") && table.contains("conn-1") && table.contains("ASIA"),
        "{table}"
    );

    // STS goes away: credentials on the connections expire, readiness says which.
    h.sim.set_service_down(SimService::Sts, true);
    let mut not_ready = (0, String::new());
    wait_until_async(Duration::from_secs(15), async || {
        not_ready = get(&format!("{base}/readyz")).await;
        not_ready.0 == 503 && not_ready.1.contains("expired")
    })
    .await;
    assert_eq!(not_ready.0, 503, "{}", not_ready.1);
    assert!(
        not_ready.1.contains("conn-0") && not_ready.1.contains("expired"),
        "{}",
        not_ready.1
    );
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    assert!(
        metrics.contains("aep_s3_rotator_connections{state=\"expired\"} 2"),
        "{metrics}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !daemon
            .events("credentials expired")
            .is_empty())
        .await,
        "the expiry is escalated in the logs"
    );
    let escalation = &daemon.events("credentials expired")[0];
    assert_eq!(escalation["level"], "error");
    assert!(
        escalation["expired_ago"].is_string() && escalation["connection"].is_string(),
        "{escalation}"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_no_secret(&daemon.stderr_text(), &h.secrets());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_with_state_does_not_re_push_but_an_edited_connection_is() {
    let h = Harness::start(2, Duration::from_secs(3600)).await;
    let ids = h.connection_ids();
    let state = h.dir.path().join("state.json");
    let config = h
        .config()
        .rotation(Rotation::fast().refresh_before("10m"))
        .state(&state)
        .write();

    let mut first = h.spawn(&config, &["run"]);
    assert!(
        wait_until(Duration::from_secs(20), || ids
            .iter()
            .all(|id| h.sim.connection(id).is_some_and(|c| c.patches == 1)))
        .await,
        "stderr:\n{}",
        first.stderr_text()
    );
    assert_eq!(first.terminate().code(), Some(0));
    let saved = std::fs::read_to_string(&state).expect("state written at shutdown");
    assert_no_secret(&saved, &h.secrets());

    // Someone edits the second connection while the daemon is down.
    h.sim.bump_etag(&ids[1]);
    let mut second = h.spawn(&config, &["run"]);
    assert!(
        wait_until(Duration::from_secs(20), || h
            .sim
            .connection(&ids[1])
            .is_some_and(|c| c.patches == 2))
        .await,
        "the edited connection was not re-pushed; stderr:\n{}",
        second.stderr_text()
    );
    assert!(
        wait_until(Duration::from_secs(5), || !second
            .events("connection unchanged since restart, credentials kept")
            .is_empty())
        .await
    );
    assert_eq!(second.terminate().code(), Some(0));
    assert_eq!(
        h.sim.connection(&ids[0]).unwrap().patches,
        1,
        "an unchanged connection was re-pushed"
    );

    // A corrupt state file is logged and ignored, never fatal.
    std::fs::write(&state, "{ not json").unwrap();
    let mut third = h.spawn(&config, &["run"]);
    assert!(
        wait_until(Duration::from_secs(20), || h
            .sim
            .connection(&ids[0])
            .is_some_and(|c| c.patches == 2))
        .await,
        "stderr:\n{}",
        third.stderr_text()
    );
    assert_eq!(third.terminate().code(), Some(0));
    assert!(third.stderr_text().contains("state file ignored"));
}

/// Two simulated connections, a config naming only the first, the daemon
/// running and that first one rotated: the start of the reload tests.
async fn running_with_the_first_of_two() -> (Harness, Vec<String>, Rotation, PathBuf, DaemonProcess)
{
    let h = Harness::start(2, Duration::from_secs(3600)).await;
    let ids = h.connection_ids();
    let rotation = Rotation::fast().refresh_before("10m");
    let first_only = &h.sim_config.connections[..1];
    let config = h
        .config()
        .rotation(rotation.clone())
        .connections(first_only)
        .write();
    let daemon = h.spawn(&config, &["run"]);
    assert!(
        wait_until(Duration::from_secs(20), || h
            .sim
            .connection(&ids[0])
            .is_some_and(|c| c.patches == 1))
        .await
    );
    (h, ids, rotation, config, daemon)
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_adds_a_connection_and_survives_an_invalid_config() {
    let (h, ids, rotation, config, mut daemon) = running_with_the_first_of_two().await;

    // An invalid config is refused; the running one stays.
    std::fs::write(&config, "[adobe]\nclient_id = \"\"\n").unwrap();
    daemon.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(10), || !daemon
            .events("config reload failed, keeping the running config")
            .is_empty())
        .await,
        "stderr:\n{}",
        daemon.stderr_text()
    );

    // A valid config with one more connection: it is rotated within seconds,
    // and the first one is not re-pushed.
    h.config().rotation(rotation).write();
    daemon.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(10), || h
            .sim
            .connection(&ids[1])
            .is_some_and(|c| c.patches == 1))
        .await,
        "the added connection was not rotated; stderr:\n{}",
        daemon.stderr_text()
    );
    // The file watch may reload the same file too: the first applied
    // reload adds the connection, any second one finds nothing to do.
    let reloaded = daemon.events("config reloaded");
    assert!(!reloaded.is_empty() && reloaded.len() <= 2, "{reloaded:?}");
    assert_eq!(reloaded[0]["added"], 1);
    assert!(
        reloaded[1..]
            .iter()
            .all(|r| r["added"] == 0 && r["changed"] == 0)
    );
    assert_eq!(h.sim.connection(&ids[0]).unwrap().patches, 1);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn editing_the_config_file_reloads_without_a_signal() {
    let (h, ids, rotation, config, mut daemon) = running_with_the_first_of_two().await;
    // A ConfigMap-style update: a new file renamed over the old one.
    let staged = config.with_extension("new");
    std::fs::copy(&config, &staged).unwrap();
    let all = h.config().rotation(rotation).write();
    std::fs::rename(&all, &staged).unwrap();
    std::fs::rename(&staged, &config).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || h
            .sim
            .connection(&ids[1])
            .is_some_and(|c| c.patches == 1))
        .await,
        "the file change was not applied; stderr:\n{}",
        daemon.stderr_text()
    );
    assert!(
        !daemon
            .events("config or client secret file changed, reloading config")
            .is_empty()
    );
    // Debounced: one reload for the burst of writes, and the first
    // connection kept its credentials.
    assert_eq!(
        daemon.events("config reloaded").len(),
        1,
        "{}",
        daemon.stderr_text()
    );
    assert_eq!(h.sim.connection(&ids[0]).unwrap().patches, 1);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_notify_ready_status_and_watchdog() {
    let h = Harness::start(2, Duration::from_secs(3600)).await;
    let socket_path = h.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let config = h
        .config()
        .rotation(Rotation::fast().refresh_before("10m"))
        .write();
    let mut command = clean_command(binary());
    command
        .env("AWS_ACCESS_KEY_ID", SOURCE_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SOURCE_SECRET)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .arg("--config")
        .arg(&config)
        .arg("run");
    let mut daemon = DaemonProcess::spawn(command);
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    let mut watchdogs = 0;
    while watchdogs < 3 {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification ({e}); got {messages:?}"));
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        watchdogs += usize::from(text.contains("WATCHDOG=1"));
        messages.push(text);
    }
    let ready = messages
        .iter()
        .position(|m| m.contains("READY=1"))
        .expect("READY=1 sent");
    assert!(
        messages[ready].contains("STATUS=2/2 connections fresh"),
        "{messages:?}"
    );
    let first_watchdog = messages
        .iter()
        .position(|m| m.contains("WATCHDOG=1"))
        .unwrap();
    assert!(
        h.sim.stats().flow_patches_ok >= 2,
        "READY=1 came after the first pass"
    );
    assert!(first_watchdog < messages.len());
    daemon.signal("TERM");
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 not sent");
    assert_eq!(daemon.wait(Duration::from_secs(15)).code(), Some(0));
}

/// One set of clients after a reload: discovery's listing and the rotations
/// share one request gate and one IMS token. A SIGHUP lowers concurrency
/// from 4 to 2 and changes `[adobe]` while discovery lists every second and
/// rotations keep every slot busy; from then on the simulator never sees
/// more than 2 Flow Service requests at once, and one IMS token is issued
/// for the new `[adobe]`, not one per set of clients.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_gives_listing_and_rotation_one_request_gate_and_one_ims_token() {
    const RULE: &str = r#"
[[discover]]
sandboxes = ["prod", "dev"]
description_tag = "rotate:aep-s3"
every = "1s"
"#;
    // 20 connections whose credentials live 3 s, rotated 2 s ahead: about
    // 20 rotations a second, each PATCH 200 ms at the simulator, so there
    // is always more work than the gate lets through (10 a second at
    // concurrency 2).
    let h = Harness::start_with(20, Duration::from_secs(3), |sim| {
        for c in &mut sim.connections {
            c.description = "rotate:aep-s3".to_owned();
        }
        sim.faults.latency = Duration::from_millis(200);
    })
    .await;
    let ids = h.connection_ids();
    let config = h.config().table(RULE).connections(&[]).write();
    let mut daemon = h.spawn(&config, &["run"]);
    assert!(
        wait_until(Duration::from_secs(30), || !daemon
            .events("ready")
            .is_empty()
            || h.sim.stats().flow_patches_ok >= 20)
        .await,
        "no first pass; stderr:\n{}",
        daemon.stderr_text()
    );
    h.config()
        .rotation(Rotation::fast().concurrency(2))
        .adobe_line(r#"scopes = ["openid", "AdobeID", "read_organizations"]"#)
        .table(RULE)
        .connections(&[])
        .write();
    let tokens_before = h.sim.stats().ims_tokens_issued;
    daemon.reload().await;
    // Jobs dispatched before the reload finish with the clients they
    // started with, those waiting at the old gate included: measure from
    // when they are done. A connection has one job at a time, so once it
    // has two PATCHes applied after the reload, the second came from a job
    // dispatched after it, and the job it had at the reload is over.
    let reloaded_at = unix_ms(log_time(&daemon.events("config reloaded")[0]));
    assert!(
        wait_until(Duration::from_secs(30), || {
            let patches = h.sim.patches();
            ids.iter().all(|id| {
                patches
                    .on_connection(id)
                    .iter()
                    .filter(|p| p.at_unix_ms > reloaded_at)
                    .count()
                    >= 2
            })
        })
        .await,
        "not every connection was rotated twice after the reload; stderr:\n{}",
        daemon.stderr_text()
    );
    h.sim.reset_max_in_flight();
    let patches = h.sim.stats().flow_patches_ok;
    let lists = h.sim.stats().flow_lists;
    // Then rotation and listing both go on under the one gate, which stays
    // full: more than ten PATCHes and two listings.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let stats = h.sim.stats();
            stats.flow_patches_ok > patches + 10 && stats.flow_lists > lists + 1
        })
        .await,
        "rotation and listing did not both go on: {:?}",
        h.sim.stats()
    );
    let stats = h.sim.stats();
    assert!(
        stats.max_in_flight <= 2,
        "{} Flow Service requests at once under concurrency = 2",
        stats.max_in_flight
    );
    assert_eq!(
        stats.ims_tokens_issued - tokens_before,
        1,
        "one IMS token for the new [adobe], shared by listing and rotation"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// A reload that changes only `client_secret_file` (to a file holding the
/// same secret) gives the daemon an IMS client that reads the new file: when
/// the secret is later rotated in that file and IMS refuses the old one, the
/// next IMS request uses the new secret and rotation goes on.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_reload_to_another_secret_file_ims_reads_that_file() {
    // 3 s credentials, rotated with 2 s left: a rotation about every second.
    let h = Harness::start(2, Duration::from_secs(3)).await;
    let ids = h.connection_ids();
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["run"]);
    let patched = |h: &Harness| -> u64 {
        ids.iter()
            .map(|id| h.sim.connection(id).map_or(0, |c| c.patches))
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(20), || patched(&h) >= 2).await,
        "no first pass; stderr:\n{}",
        daemon.stderr_text()
    );
    // The same secret, in another file; only the path changes.
    let old_file = h.dir.path().join("client-secret");
    let new_file = h.dir.path().join("client-secret-rotated");
    std::fs::copy(&old_file, &new_file).unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &old_file.display().to_string(),
        &new_file.display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    daemon.reload().await;
    // The secret is rotated: IMS accepts only the new one, which is in the
    // new file alone; every token issued so far is revoked.
    let rotated = "rotated-client-secret-0002-abcdefghijkl";
    std::fs::write(&new_file, rotated).unwrap();
    h.sim.set_client_secret(rotated);
    h.sim.revoke_tokens();
    let before = patched(&h);
    assert!(
        wait_until(Duration::from_secs(20), || patched(&h) >= before + 2).await,
        "rotation stopped after the secret was rotated in the new file; stderr:\n{}",
        daemon.stderr_text()
    );
    let mut secrets = h.secrets();
    secrets.push(rotated.to_owned());
    assert_no_secret(&daemon.stderr_text(), &secrets);
    assert_eq!(daemon.terminate().code(), Some(0));
}
