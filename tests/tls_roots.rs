//! CA roots, black box: the real binary with `SSL_CERT_FILE` / `SSL_CERT_DIR`
//! pointed at an empty store must refuse with one clear message (never the
//! TLS library's `builder error`), and with a real bundle must report where
//! its roots come from as `check`'s own `ca` line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn command(config: &Path, var: &str, value: &Path, args: &[&str]) -> Command {
    let mut command = clean_command(binary());
    command
        .env("AWS_ACCESS_KEY_ID", SOURCE_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SOURCE_SECRET)
        .env(var, value)
        .arg("--config")
        .arg(config)
        .args(args);
    command
}

/// An empty operator-named store: exit 78 and one message naming the variable
/// and what to do, for `check` (its `ca` line) and for `once` (its log).
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_operator_store_is_refused_with_one_clear_message() {
    let h = Harness::start(1, Duration::from_secs(60)).await;
    let config = h.config().write();
    let empty_file = h.dir.path().join("empty.pem");
    std::fs::write(&empty_file, "").unwrap();
    let empty_dir = h.dir.path().join("empty-certs");
    std::fs::create_dir(&empty_dir).unwrap();

    for (var, value) in [("SSL_CERT_FILE", &empty_file), ("SSL_CERT_DIR", &empty_dir)] {
        let mut check = DaemonProcess::spawn(command(&config, var, value, &["check"]));
        let status = check.wait(Duration::from_secs(30));
        let out = check.stdout_text();
        assert_eq!(
            status.code(),
            Some(78),
            "{var}: stdout:\n{out}\nstderr:\n{}",
            check.stderr_text()
        );
        let ca: Vec<&str> = out.lines().filter(|l| l.contains(" ca ")).collect();
        assert_eq!(ca.len(), 1, "{var}: one ca line:\n{out}");
        assert!(ca[0].starts_with("FAIL"), "{}", ca[0]);
        assert!(
            ca[0].contains(&format!("{var}={}", value.display())),
            "{}",
            ca[0]
        );
        assert!(ca[0].contains("point it at a PEM bundle"), "{}", ca[0]);
        assert!(!out.contains("builder error"), "{out}");
        // Nothing else was tried with a store that trusts nothing.
        assert!(!out.contains(" ims "), "{out}");
        assert!(out.ends_with("2 checks, 1 failed"), "{out}");

        let mut once = DaemonProcess::spawn(command(&config, var, value, &["once"]));
        let status = once.wait(Duration::from_secs(30));
        assert_eq!(
            status.code(),
            Some(78),
            "{var}: stderr:\n{}",
            once.stderr_text()
        );
        let errors: Vec<_> = once
            .logs()
            .into_iter()
            .filter(|l| l["level"] == "error")
            .collect();
        assert_eq!(errors.len(), 1, "{var}: one error:\n{}", once.stderr_text());
        let message = errors[0]["message"].as_str().unwrap();
        assert!(message.starts_with("no CA certificates"), "{message}");
        assert!(message.contains(var), "{message}");
        assert!(!once.stderr_text().contains("builder error"));
    }
    // Nothing reached the peers.
    assert_eq!(h.sim.stats().ims_tokens_issued, 0);
}

/// A real bundle named by `SSL_CERT_FILE`: `check` says how many roots came
/// from it, on its own line, and goes on to check the peers.
#[tokio::test(flavor = "multi_thread")]
async fn check_reports_the_ca_source_on_its_own_line() {
    let h = Harness::start(1, Duration::from_secs(3600)).await;
    let config = h.config().write();
    let bundle = h.dir.path().join("bundle.pem");
    let roots = &webpki_root_certs::TLS_SERVER_ROOT_CERTS[..3];
    let mut pem = String::new();
    for cert in roots {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in body.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(chunk).unwrap());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    std::fs::write(&bundle, pem).unwrap();

    let mut check = DaemonProcess::spawn(command(&config, "SSL_CERT_FILE", &bundle, &["check"]));
    let status = check.wait(Duration::from_secs(30));
    let out = check.stdout_text();
    assert_eq!(
        status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        check.stderr_text()
    );
    let ca: Vec<&str> = out.lines().filter(|l| l.contains(" ca ")).collect();
    assert_eq!(
        ca,
        [format!(
            "ok    ca         3 roots from SSL_CERT_FILE={}",
            bundle.display()
        )],
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("ok    ims")), "{out}");
}
