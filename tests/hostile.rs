//! Hostile peers and curious eyes, black box (issue 14, docs/SECURITY.md):
//! the real binary against the strict simulator answering badly on purpose,
//! and a flood of idle sockets against the admin port under a low
//! descriptor limit. Each test names the probe it repeats.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use aep_s3_simulator::{ScriptedFault, SecretTrap, SimEvent, SimService};
use common::*;

/// [`Rotation::quick`] with a 2 s request timeout.
fn quick(h: &Harness) -> TestConfig {
    h.config().rotation(Rotation::quick().request_timeout("2s"))
}

/// Answers the next request normally (a scripted no-op, to aim the fault
/// after it at the following request).
fn pass() -> ScriptedFault {
    ScriptedFault::Delay(Duration::ZERO)
}

async fn rotated(h: &Harness, ids: &[String], n: u64, daemon: &DaemonProcess) {
    let done = h.rotated_at_least(ids, n, Duration::from_secs(30)).await;
    assert!(
        done,
        "not every connection rotated {n} times; stderr:\n{}",
        daemon.stderr_text()
    );
}

fn assert_strict_clean(h: &Harness) {
    assert!(
        h.sim.violations().is_empty(),
        "protocol violations: {:?}",
        h.sim.violations()
    );
}

/// Peak resident set of a live process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

async fn get(url: &str) -> (u16, String) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    match client.get(url).send().await {
        Ok(response) => (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        ),
        Err(_) => (0, String::new()),
    }
}

// 1. Redirects --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_is_refused_and_no_secret_reaches_another_origin() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    let trap = SecretTrap::start().await.unwrap();
    let to = |path: &str| ScriptedFault::Redirect {
        location: format!("{}{path}", trap.url()),
    };
    // IMS redirects the token request (its form carries the client secret);
    // Flow answers the GET, then redirects the PATCH (its body carries the
    // new secret key and session token); STS redirects once too.
    // The first IMS token is for the bulk etag read: redirected too, which
    // leaves the etag unknown, so the job GETs; its own token is redirected
    // once more.
    h.sim.script(SimService::Ims, to("/ims/token/v3"));
    h.sim.script(SimService::Ims, to("/ims/token/v3"));
    h.sim.script_for(&ids[0], pass());
    h.sim.script_for(&ids[0], to("/steal"));
    h.sim.script(SimService::Sts, to("/"));
    let config = quick(&h).write();
    let mut daemon = h.spawn(&config, &["run"]);
    rotated(&h, &ids, 1, &daemon).await;
    daemon.terminate();

    assert!(
        trap.requests().is_empty(),
        "a redirect was followed: {} request(s) reached the other origin",
        trap.requests().len()
    );
    assert!(!trap.received_any(&h.secrets()));
    let failures = daemon.events("rotation failed, retrying");
    let errors: Vec<&str> = failures
        .iter()
        .filter_map(|e| e["error"].as_str())
        .collect();
    let named = errors
        .iter()
        .filter(|e| e.contains(&trap.url()) && e.contains("no redirect is followed"))
        .count();
    assert!(
        named >= 3,
        "each redirect is an error naming its Location: {errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("STS refused HTTP 307")),
        "{errors:#?}"
    );
    // One success logged per real PATCH, none for the redirected one.
    let patches = h.sim.connection(&ids[0]).unwrap().patches;
    assert_eq!(daemon.events("credentials rotated").len() as u64, patches);
    assert_no_secret(&daemon.stderr_text(), &h.secrets());
    assert_strict_clean(&h);
}

// 2. Endless bodies ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn endless_bodies_are_cut_at_the_cap_and_memory_stays_bounded() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    // The first IMS token is for the bulk etag read (cut, so the etag is
    // unknown and the job GETs): the job's own token gets an endless body too.
    h.sim.script(SimService::Ims, ScriptedFault::EndlessBody);
    h.sim.script(SimService::Ims, ScriptedFault::EndlessBody);
    h.sim.script(SimService::Flow, ScriptedFault::EndlessBody);
    h.sim.script(SimService::Sts, ScriptedFault::EndlessBody);
    let config = quick(&h).write();
    let mut daemon = h.spawn(&config, &["run"]);
    rotated(&h, &ids, 1, &daemon).await;
    // Before the cap each endless body was read for the whole request
    // timeout: gigabytes on loopback. Now at most 1 MiB per request.
    let peak = peak_rss_kib(daemon.child.id());
    daemon.terminate();
    eprintln!("peak RSS under endless IMS, Flow and STS bodies: {peak} KiB");
    assert!(
        peak < 150 * 1024,
        "peak RSS {peak} KiB under endless bodies"
    );
    let errors = daemon.errors("rotation failed, retrying");
    assert!(
        errors.iter().filter(|e| e.contains("larger than")).count() >= 2,
        "IMS and Flow bodies over the cap are named: {errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with("STS")),
        "the STS body was cut too: {errors:#?}"
    );
    assert_strict_clean(&h);
}

// 3. Partial STS answers ----------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn an_sts_answer_without_secret_or_token_is_never_pushed() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    h.sim.script(
        SimService::Sts,
        ScriptedFault::PartialCredentials {
            omit_secret: true,
            omit_token: false,
        },
    );
    h.sim.script(
        SimService::Sts,
        ScriptedFault::PartialCredentials {
            omit_secret: false,
            omit_token: true,
        },
    );
    let config = quick(&h).write();
    let mut daemon = h.spawn(&config, &["run"]);
    rotated(&h, &ids, 1, &daemon).await;
    daemon.terminate();

    // The first two issuances were partial: neither key id was PATCHed.
    let events = h.sim.events();
    let issued: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            SimEvent::StsIssued { access_key_id, .. } => Some(access_key_id.clone()),
            _ => None,
        })
        .collect();
    assert!(issued.len() >= 3, "{issued:?}");
    let pushed: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            SimEvent::PatchApplied { access_key_id, .. } => Some(access_key_id.clone()),
            _ => None,
        })
        .collect();
    assert!(!pushed.contains(&issued[0]) && !pushed.contains(&issued[1]));
    let errors = daemon.errors("rotation failed, retrying");
    assert!(
        errors.iter().any(|e| e.contains("SecretAccessKey")),
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("SessionToken")),
        "{errors:#?}"
    );
    assert_eq!(
        daemon.events("credentials rotated").len(),
        1,
        "only the complete answer is reported rotated"
    );
    // A PATCH of a partial set would have been refused as a violation.
    assert_strict_clean(&h);
}

// 4. Admin port starvation --------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_socket_flood_on_the_admin_port_does_not_stop_rotations() {
    // Credentials of 4 s: a rotation every 2 s, each needing descriptors
    // (connections, the state file).
    let h = Harness::start(2, Duration::from_secs(4)).await;
    let ids = h.connection_ids();
    let state = h.dir.path().join("state.json");
    let config = h.config().admin().state(&state).write();
    const NOFILE: usize = 64;
    let mut command = clean_command("prlimit");
    command
        .env("AWS_ACCESS_KEY_ID", SOURCE_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SOURCE_SECRET)
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .arg("--")
        .arg(binary())
        .arg("--config")
        .arg(&config)
        .arg("run");
    let mut daemon = DaemonProcess::spawn(command);
    rotated(&h, &ids, 1, &daemon).await;

    // Three times the daemon's descriptor limit, all silent.
    let mut flood = Vec::new();
    let admin = daemon.admin_addr().await;
    for _ in 0..3 * NOFILE {
        // Bounded: a full accept queue must not block the test.
        match std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)) {
            Ok(socket) => flood.push(socket),
            Err(_) => break,
        }
    }
    assert!(flood.len() > NOFILE, "only {} sockets opened", flood.len());
    let before: Vec<u64> = ids
        .iter()
        .map(|id| h.sim.connection(id).unwrap().patches)
        .collect();
    let (code, body) = get(&format!("http://{admin}/healthz")).await;
    assert_eq!(code, 200, "/healthz under the flood: {body}");
    // Rotations continue: two more for each connection while the flood stays.
    let continued = wait_until(Duration::from_secs(30), || {
        ids.iter()
            .zip(&before)
            .all(|(id, n)| h.sim.connection(id).is_some_and(|c| c.patches >= n + 2))
    })
    .await;
    let (code, _) = get(&format!("http://{admin}/healthz")).await;
    drop(flood);
    daemon.terminate();
    assert!(
        continued,
        "rotations stopped under the admin flood; stderr:\n{}",
        daemon.stderr_text()
    );
    assert_eq!(code, 200, "/healthz after the flood");
    let stderr = daemon.stderr_text();
    assert!(
        !stderr.contains("Too many open files"),
        "the rotation path ran out of descriptors:\n{stderr}"
    );
    assert_strict_clean(&h);
}

// 5. Echoed secrets ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn secrets_echoed_by_a_remote_never_reach_any_output() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    // IMS echoes the client secret in error_description; Flow echoes the
    // bearer token and the JSON-escaped session token in a plain-text 502
    // whose first 300 characters end inside the token.
    h.sim.script(SimService::Ims, ScriptedFault::EchoSecrets);
    h.sim.script_for(&ids[0], pass());
    h.sim.script_for(&ids[0], ScriptedFault::EchoSecrets);
    h.sim.script_for(&ids[0], pass());
    h.sim.script_for(&ids[0], ScriptedFault::EchoSecrets);
    let config = quick(&h).admin().write();
    let mut daemon = h.spawn(&config, &["run"]);
    let admin = daemon.admin_addr().await;
    // Catch /status while last_error holds the echo, until the rotation is done.
    let mut statuses = Vec::new();
    let done = wait_until_async(Duration::from_secs(30), async || {
        let (code, body) = get(&format!("http://{admin}/status")).await;
        if code == 200 && body.contains("last_error\":\"") {
            statuses.push(body);
        }
        h.sim.connection(&ids[0]).is_some_and(|c| c.patches >= 1)
    })
    .await;
    assert!(done, "stderr:\n{}", daemon.stderr_text());
    let table = status_command(&config, admin).output().unwrap();
    daemon.terminate();

    let stderr = daemon.stderr_text();
    assert!(
        stderr.contains("[redacted]"),
        "the echoes were seen and scrubbed:\n{stderr}"
    );
    let secrets = h.secrets();
    assert_no_secret(&stderr, &secrets);
    assert_no_secret(&daemon.stdout_text(), &secrets);
    assert_no_secret(&statuses.join("\n"), &secrets);
    assert_no_secret(&String::from_utf8_lossy(&table.stdout), &secrets);
    assert_no_secret(&String::from_utf8_lossy(&table.stderr), &secrets);
    // No prefix of a token cut at 300 characters either: the echo puts the
    // bearer token at characters 290+.
    for secret in &secrets {
        let prefix = &secret[..secret.len().min(10)];
        assert!(
            !stderr.contains(&format!("Bearer {prefix}")),
            "a token prefix leaked"
        );
    }
    assert_strict_clean(&h);
}

// 6. Hostile text -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn remote_text_is_bounded_and_cannot_forge_a_log_line() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    h.sim
        .script(SimService::Ims, ScriptedFault::HostileText { len: 200_000 });
    h.sim.script(
        SimService::Flow,
        ScriptedFault::HostileText { len: 200_000 },
    );
    h.sim
        .script(SimService::Sts, ScriptedFault::HostileText { len: 2_000 });
    let config = quick(&h).admin().write();
    let mut command = clean_command(binary());
    command
        .env("AWS_ACCESS_KEY_ID", SOURCE_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SOURCE_SECRET)
        // Text logs: where a raw newline from a remote forged a line.
        .env("AEP_S3_ROTATOR_LOG_FORMAT", "text")
        .arg("--config")
        .arg(&config)
        .arg("run");
    let mut daemon = DaemonProcess::spawn(command);
    let done = wait_until(Duration::from_secs(30), || {
        h.sim.connection(&ids[0]).is_some_and(|c| c.patches >= 1)
    })
    .await;
    let table = status_command(&config, daemon.admin_addr().await)
        .output()
        .unwrap();
    daemon.terminate();
    let stderr = daemon.stderr_text();
    assert!(done, "stderr:\n{stderr}");
    assert!(
        stderr.contains("refused\\n"),
        "the hostile text was shown, escaped:\n{stderr}"
    );
    for line in stderr.lines() {
        assert!(
            !line.contains('\u{1b}') && !line.contains('\u{7}'),
            "raw escape: {line:?}"
        );
        assert!(!line.starts_with("{\"level\""), "forged line: {line}");
        assert!(
            line.len() < 4_000,
            "unbounded remote text: {} bytes",
            line.len()
        );
    }
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(!table.contains('\u{1b}'), "{table:?}");
    assert_strict_clean(&h);
}

// 7. Invalid etag -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn an_etag_that_is_not_a_header_value_is_never_cached() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    // The bad etag comes with a GET: start without bulk etags.
    h.without_bulk_etags();
    h.sim.script_for(&ids[0], ScriptedFault::InvalidEtag);
    let config = quick(&h).write();
    let mut daemon = h.spawn(&config, &["run"]);
    // Before: the bad etag was kept, every later job skipped the GET and
    // failed locally, and no request was ever sent again.
    rotated(&h, &ids, 1, &daemon).await;
    daemon.terminate();
    let errors = daemon.errors("rotation failed, retrying");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("not a valid header value")),
        "{errors:#?}"
    );
    assert_strict_clean(&h);
}

// 8. STS errors that are not AWS errors -------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sts_errors_that_are_not_aws_errors_keep_their_status_and_back_off() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let ids = h.connection_ids();
    let raw = |status: u16, content_type: &str, body: &str| ScriptedFault::Raw {
        status,
        content_type: content_type.to_owned(),
        body: body.to_owned(),
    };
    h.sim.script(
        SimService::Sts,
        raw(
            502,
            "text/html",
            "<html><body>502 Bad Gateway</body></html>",
        ),
    );
    h.sim.script(SimService::Sts, raw(503, "text/plain", ""));
    h.sim.script(
        SimService::Sts,
        raw(
            200,
            "text/xml",
            "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult><Credentials><AccessKeyId>ASIAAAAAAAAAAAAAAAAA</AccessKeyId><SecretAccessKey>secretsecretsecretsecret</SecretAccessKey><SessionToken>tokentokentokentokentoken</SessionToken><Expiration>next tuesday</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>",
        ),
    );
    let config = quick(&h).write();
    let mut daemon = h.spawn(&config, &["run"]);
    rotated(&h, &ids, 1, &daemon).await;
    daemon.terminate();
    let errors = daemon.errors("rotation failed, retrying");
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].starts_with("STS unavailable: HTTP 502"),
        "{errors:#?}"
    );
    assert!(
        errors[1].starts_with("STS unavailable: HTTP 503: empty body"),
        "{errors:#?}"
    );
    assert!(errors[2].starts_with("STS answer unusable"), "{errors:#?}");
    assert!(!errors.iter().any(|e| e.contains("Unknown")), "{errors:#?}");
    assert_strict_clean(&h);
}

// 9. Validation gaps --------------------------------------------------------

/// Runs `once` with `config` and answers (exit code, stderr); a hang fails.
fn once(h: &Harness, config: &Path) -> (Option<i32>, String) {
    let mut daemon = h.spawn(config, &["once"]);
    let status = daemon.wait(Duration::from_secs(20));
    (status.code(), daemon.stderr_text())
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_zero_as_secret_file_and_a_fifo_as_state_path_give_one_clear_answer() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let config = quick(&h).write();
    let text = std::fs::read_to_string(&config).unwrap();
    let secret_file = h.dir.path().join("client-secret").display().to_string();
    std::fs::write(&config, text.replace(&secret_file, "/dev/zero")).unwrap();
    let (code, stderr) = once(&h, &config);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("adobe.client_secret_file"), "{stderr}");
    assert!(stderr.contains("character device"), "{stderr}");

    let fifo = h.dir.path().join("state.fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let config = quick(&h).state(&fifo).write();
    // Before: open(2) on the FIFO blocked start-up for good.
    let (code, stderr) = once(&h, &config);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("FIFO"), "{stderr}");
}
