//! Hostile peers, second round (issue 26, docs/SECURITY.md): the surfaces
//! added after the first round (discovery listings, the pre-push S3 check,
//! the health check's connection test) against peers answering legally but
//! extremely, black box. Each test names the item of the issue it repeats.

// Black-box tests drive the real binary in real time: they read the real clocks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aep_s3_simulator::{ScriptedFault, SecretTrap};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs the binary with text logs (where a raw control character would
/// reach the operator's terminal).
fn spawn_text(config: &std::path::Path, args: &[&str]) -> DaemonProcess {
    let mut command = clean_command(binary());
    command
        .env("AWS_ACCESS_KEY_ID", SOURCE_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SOURCE_SECRET)
        .env("AEP_S3_ROTATOR_LOG_FORMAT", "text")
        .arg("--config")
        .arg(config)
        .args(args);
    DaemonProcess::spawn(command)
}

async fn get(url: &str) -> String {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn raw_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|c| c.is_control() && *c != '\n')
        .collect()
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

/// Discovery rules over both sandboxes, re-listing every `every`.
fn rule(name: &str, every: &str) -> String {
    format!(
        "[[discover]]\nsandboxes = [\"prod\", \"dev\"]\nname = \"{name}\"\nevery = \"{every}\"\n"
    )
}

// 2 and 7. Listed names: bounded, escaped in every sink; alike names keep
// their own metric series. ------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn listed_names_reach_no_sink_raw_and_alike_names_keep_their_own_series() {
    let hostile = format!(
        "evil\n{{\"message\":\"credentials rotated\",\"forged\":true}}\u{1b}]0;owned\u{7}\r\u{1b}[2J{}",
        "p".repeat(300_000)
    );
    // 0 and 2 are in prod, both named "dup"; 1 (dev) is the hostile one.
    let h = Harness::start_with(3, Duration::from_secs(3600), |c| {
        c.connections[0].name = "dup".to_owned();
        c.connections[1].name = hostile.clone();
        c.connections[2].name = "dup".to_owned();
    })
    .await;
    let ids = h.connection_ids();
    // The simulator derives bucket names from connection names: the
    // hostile one has none, so the S3 check is off here (it has its own
    // tests); names are what is tested.
    let config = h
        .config()
        .rotation(Rotation::fast().prepush_check(false))
        .table(&rule("*", "1m"))
        .admin()
        .connections(&[])
        .write();
    let mut daemon = spawn_text(&config, &["run"]);
    let rotated = h.rotated_at_least(&ids, 1, Duration::from_secs(30)).await;
    let admin = daemon.admin_addr().await;
    let metrics = get(&format!("http://{admin}/metrics")).await;
    let status = get(&format!("http://{admin}/status")).await;
    daemon.terminate();
    let stderr = daemon.stderr_text();
    assert!(rotated, "not every connection rotated:\n{stderr:.4000}");

    assert!(
        raw_controls(&stderr).is_empty(),
        "text logs carry raw control characters: {:?}",
        raw_controls(&stderr)
    );
    assert!(
        !stderr.lines().any(|l| l.starts_with("{\"message\"")),
        "a name forged a log line"
    );
    assert!(stderr.len() < 2 << 20, "logs of {} bytes", stderr.len());
    for (what, text) in [("/metrics", &metrics), ("/status", &status)] {
        assert!(
            raw_controls(text).is_empty(),
            "{what} carries raw control characters"
        );
        assert!(text.len() < 100 << 10, "{what} is {} bytes", text.len());
    }
    let expiries: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("aep_s3_rotator_credentials_expiry_timestamp_seconds{"))
        .collect();
    assert_eq!(
        expiries.len(),
        3,
        "one series per connection: {expiries:#?}"
    );
    for id in [&ids[0], &ids[2]] {
        assert!(
            expiries.iter().any(|l| l.contains(&format!("dup ({id})"))),
            "{expiries:#?}"
        );
    }
}

// 9. The S3 check goes only where the operator allows. ----------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_service_url_elsewhere_gets_no_request_and_no_token() {
    let h = Harness::start(1, Duration::from_secs(3600)).await;
    let id = h.connection_ids()[0].clone();
    // Another loopback port (an internal service), not a URL of the config.
    let trap = SecretTrap::start().await.unwrap();
    h.sim
        .set_connection_param(&id, "serviceUrl", Some(&trap.url()));
    let config = h.config().write();
    let mut daemon = h.spawn(&config, &["once"]);
    let code = daemon.wait(Duration::from_secs(30)).code();
    let stderr = daemon.stderr_text();
    assert!(
        trap.requests().is_empty(),
        "the S3 check reached a serviceUrl nobody allowed: {:?}",
        trap.requests()
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("is not used"), "{stderr}");
    assert_eq!(h.sim.connection(&id).unwrap().patches, 0, "nothing pushed");
    assert_no_secret(&stderr, &h.secrets());
}

// 1. A listing of endless padded pages: memory stays bounded. --------------

/// A Flow Service that answers every list request with a page of 100
/// padded items (about 900 KiB) and a next link, forever.
async fn endless_flow() -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let pages = Arc::new(AtomicU64::new(0));
    let served = Arc::clone(&pages);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let served = Arc::clone(&served);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    let Ok(n) = socket.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    if !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    request.clear();
                    let page = served.fetch_add(1, Ordering::SeqCst);
                    let items: Vec<serde_json::Value> = (0..100)
                        .map(|i| {
                            serde_json::json!({
                                "id": format!("{page:08}-{i:04}-pad"),
                                "etag": "\"e\"",
                                "name": format!("pad-{}", "n".repeat(5000)),
                                "description": "d".repeat(4000),
                                "state": "enabled",
                                "auth": {"specName": "Access Key", "params": {"bucketName": "b"}},
                                "connectionSpec": {"id": "ecadc60c-7455-4d87-84dc-2a0e293d997b"},
                            })
                        })
                        .collect();
                    let body = serde_json::json!({
                        "items": items,
                        "_links": {"next": {"href": format!("/connections?continuationToken=t{page}")}},
                    })
                    .to_string();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if socket.write_all(head.as_bytes()).await.is_err()
                        || socket.write_all(body.as_bytes()).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, pages)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_padded_listing_keeps_memory_bounded() {
    let h = Harness::start(0, Duration::from_secs(3600)).await;
    let (flow, pages) = endless_flow().await;
    let config = h
        .config()
        .platform_url(&flow)
        .table(&rule("matches-nothing-*", "2s"))
        .connections(&[])
        .write();
    let mut daemon = h.spawn(&config, &["run"]);
    // Issue 26 #1: 1.14 GB peak in 25 s before the listing was capped. Run
    // until both sandboxes' listings have read to the cap (about 200 MiB of
    // padded pages each) and been given up; VmHWM is the peak of the whole
    // run, read before the process exits.
    let capped = |daemon: &DaemonProcess| {
        daemon
            .events("listing connections failed, keeping the last known set")
            .iter()
            .filter(|l| {
                l["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("last known listing stays"))
            })
            .count()
    };
    let started = Instant::now();
    let run_for = std::env::var("HOSTILE_LISTING_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    let done = wait_until(Duration::from_secs(120), || {
        capped(&daemon) >= 2 && started.elapsed() >= run_for
    })
    .await;
    let peak = peak_rss_kib(daemon.child.id());
    daemon.terminate();
    let served = pages.load(Ordering::SeqCst);
    eprintln!(
        "peak RSS {peak} KiB over {:?} of endless padded pages ({served} pages served)",
        started.elapsed()
    );
    let stderr = daemon.stderr_text();
    assert!(
        done,
        "the listing was never cut at its cap:\n{stderr:.4000}"
    );
    assert!(served > 40, "the listing ran: {served} pages");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
}

// The health check's connection test (issue 30's surface, probed as issue
// 26 probes the others). ----------------------------------------------------

/// `GET /connections/{id}/test` answered with an endless body, a hang past
/// the request timeout, a 500 with a 2 MiB detail, and a `result` of forged
/// text: each test is counted unknown and named in one bounded, escaped
/// line; none asks for a rotation; memory stays bounded; the next honest
/// answer passes.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_answers_to_the_connection_test_are_unknown_bounded_and_escaped() {
    let h = Harness::start(1, Duration::from_secs(3600)).await;
    let id = h.connection_ids().remove(0);
    let config = h
        .config()
        .rotation(
            Rotation::quick()
                .request_timeout("2s")
                .health_check_every("1s"),
        )
        .write();
    let mut daemon = h.spawn(&config, &["run"]);
    assert!(
        h.rotated_at_least(std::slice::from_ref(&id), 1, Duration::from_secs(30))
            .await,
        "never rotated:\n{}",
        daemon.stderr_text()
    );
    let forged =
        "\u{202e}txt.exe\n{\"level\":\"error\",\"message\":\"credentials rotated\"}\u{1b}[31m";
    let huge = "x".repeat(2 << 20);
    let faults = [
        ScriptedFault::EndlessBody,
        ScriptedFault::Delay(Duration::from_secs(5)),
        ScriptedFault::Status {
            status: 500,
            retry_after: None,
            body: Some(serde_json::json!({ "message": huge }).to_string()),
        },
        ScriptedFault::Status {
            status: 200,
            retry_after: None,
            body: Some(serde_json::json!({ "result": forged }).to_string()),
        },
    ];
    let scripted = faults.len();
    for fault in faults {
        h.sim.script_for(&id, fault);
    }
    let unknown = |daemon: &DaemonProcess| {
        daemon
            .events("connection tests done")
            .iter()
            .filter(|e| e["unknown"] == 1)
            .count()
    };
    // Passes start a period apart, or at once after one that took longer
    // (the hang holds one for the 2 s timeout).
    assert!(
        wait_until(Duration::from_secs(60), || unknown(&daemon) >= scripted).await,
        "not every hostile answer was a pass's unknown test:\n{}",
        daemon.stderr_text()
    );
    let passed_after = || {
        daemon
            .events("connection tests done")
            .iter()
            .skip_while(|e| e["unknown"] != 1)
            .any(|e| e["passed"] == 1)
    };
    assert!(
        wait_until(Duration::from_secs(20), passed_after).await,
        "the honest answer after them did not pass:\n{}",
        daemon.stderr_text()
    );
    let peak = peak_rss_kib(daemon.child.id());
    daemon.terminate();
    let errors = daemon.errors("connection test could not run");
    eprintln!("peak RSS {peak} KiB; the tests' errors: {errors:#?}");
    assert_eq!(errors.len(), scripted, "{errors:#?}");
    for named in ["larger than", "timed out", "not {\"result\": bool}"] {
        assert!(
            errors.iter().any(|e| e.contains(named)),
            "no error names {named:?}: {errors:#?}"
        );
    }
    for error in &errors {
        assert!(
            error.len() < 2048,
            "one bounded line: {} bytes",
            error.len()
        );
        assert!(
            !error.contains('\u{202e}') && !error.contains('\u{1b}') && !error.contains('\n'),
            "escaped: {error:?}"
        );
    }
    let stderr = daemon.stderr_text();
    assert!(
        raw_controls(&stderr).is_empty(),
        "raw controls reached the log"
    );
    assert!(
        !stderr.contains('\u{202e}'),
        "a bidi override reached the log"
    );
    // Every line is the daemon's own: the forged one is text inside a field.
    for line in stderr.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line:.300}"));
        assert!(
            !(event["message"] == "credentials rotated" && event["level"] == "error"),
            "a forged line: {line:.300}"
        );
    }
    // An unknown test is no failure: no rotation was asked for.
    let failed = daemon
        .logs()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("connection test failed"))
        })
        .count();
    assert_eq!(failed, 0, "a test that did not run is no failed test");
    assert_eq!(
        h.sim.connection(&id).unwrap().patches,
        1,
        "no rotation from a test that did not run"
    );
    assert!(peak < 150 * 1024, "peak RSS {peak} KiB");
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
    assert_no_secret(&stderr, &h.secrets());
}
