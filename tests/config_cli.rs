//! Bad configuration, black box: every case exits 78 and names the key.

// Helpers outside #[test] functions may unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

const GOOD: &str = r#"[adobe]
client_id = "cid"
client_secret_file = "SECRET_FILE"
org_id = "0123456789ABCDEF01234567@AdobeOrg"

[aws]
role_arn = "arn:aws:iam::123456789012:role/aep"

[rotation]
session_duration = "1h"
refresh_before = "20m"

[[connections]]
id = "c-1"
sandbox = "prod"

[[connections]]
id = "c-2"
sandbox = "dev"
"#;

/// Turns the good config into a bad one.
type Edit = Box<dyn Fn(&str) -> String>;

/// (name, edit of the good config, key path that must be named)
fn cases() -> Vec<(&'static str, Edit, &'static str)> {
    fn replace(from: &'static str, to: &'static str) -> Edit {
        Box::new(move |c: &str| {
            assert!(c.contains(from), "case edit does not apply: {from}");
            c.replacen(from, to, 1)
        })
    }
    fn append(text: &'static str) -> Edit {
        Box::new(move |c: &str| format!("{c}\n{text}\n"))
    }
    vec![
        (
            "missing client_id",
            replace("client_id = \"cid\"\n", ""),
            "adobe.client_id",
        ),
        (
            "missing org_id",
            replace("org_id = \"0123456789ABCDEF01234567@AdobeOrg\"\n", ""),
            "adobe.org_id",
        ),
        ("unknown top-level key", append("[bogus]\nx = 1"), "bogus"),
        (
            "unknown key in a section",
            replace("[aws]\n", "[aws]\nrole = \"x\"\n"),
            "aws.role",
        ),
        (
            "bad duration",
            replace(
                "session_duration = \"1h\"",
                "session_duration = \"an hour\"",
            ),
            "rotation.session_duration",
        ),
        (
            "duration too short",
            replace("session_duration = \"1h\"", "session_duration = \"5m\""),
            "rotation.session_duration",
        ),
        (
            "duration too long",
            replace("session_duration = \"1h\"", "session_duration = \"13h\""),
            "rotation.session_duration",
        ),
        (
            "refresh_before >= session_duration",
            replace("refresh_before = \"20m\"", "refresh_before = \"1h\""),
            "rotation.refresh_before",
        ),
        (
            "bad role ARN",
            replace("arn:aws:iam::123456789012:role/aep", "arn:aws:s3:::bucket"),
            "aws.role_arn",
        ),
        (
            "duplicate connection id",
            replace("id = \"c-2\"", "id = \"c-1\""),
            "connections[1].id",
        ),
        (
            "empty sandbox",
            replace("sandbox = \"dev\"", "sandbox = \"\""),
            "connections[1].sandbox",
        ),
        (
            "bad URL",
            replace("[adobe]\n", "[adobe]\nims_url = \"not a url\"\n"),
            "adobe.ims_url",
        ),
        (
            "plain http to a remote host",
            replace(
                "[adobe]\n",
                "[adobe]\nplatform_url = \"http://platform.adobe.io\"\n",
            ),
            "adobe.platform_url",
        ),
        (
            "unreadable secret file",
            replace("SECRET_FILE", "/nonexistent/secret"),
            "adobe.client_secret_file",
        ),
        (
            "both secret sources",
            replace("[adobe]\n", "[adobe]\nclient_secret = \"inline-secret\"\n"),
            "adobe.client_secret",
        ),
        (
            "no secret source",
            replace("client_secret_file = \"SECRET_FILE\"\n", ""),
            "adobe.client_secret",
        ),
        (
            "session_policy not JSON",
            replace(
                "sandbox = \"prod\"",
                "sandbox = \"prod\"\nsession_policy = \"{not json\"",
            ),
            "connections[0].session_policy",
        ),
        (
            "concurrency 0",
            replace("[rotation]\n", "[rotation]\nconcurrency = 0\n"),
            "rotation.concurrency",
        ),
        (
            "not TOML",
            Box::new(|_| "this is [not toml".to_owned()),
            "config",
        ),
        (
            "type error",
            replace("[rotation]\n", "[rotation]\nconcurrency = \"eight\"\n"),
            "rotation.concurrency",
        ),
        (
            "no connections",
            Box::new(|c: &str| c.split("[[connections]]").next().unwrap().to_owned()),
            "connections",
        ),
    ]
}

fn run_check(config_text: &str, dir: &std::path::Path) -> (Option<i32>, String) {
    let secret = dir.join("secret");
    std::fs::write(&secret, "a-client-secret-value\n").unwrap();
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        config_text.replace("SECRET_FILE", &secret.display().to_string()),
    )
    .unwrap();
    let mut process = DaemonProcess::spawn({
        let mut command = clean_command(binary());
        command.arg("--config").arg(&path).arg("check");
        command
    });
    let status = process.wait(Duration::from_secs(30));
    (status.code(), process.stderr_text())
}

#[test]
fn every_bad_config_exits_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    assert!(cases.len() >= 20, "the table lost cases");
    let mut ran = 0;
    for (name, edit, key) in &cases {
        let (code, stderr) = run_check(&edit(GOOD), dir.path());
        assert_eq!(
            code,
            Some(78),
            "{name}: expected exit 78; stderr:\n{stderr}"
        );
        let keys: Vec<String> = stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["message"] == "invalid configuration")
            .filter_map(|l| l["key"].as_str().map(str::to_owned))
            .collect();
        assert!(
            keys.iter()
                .any(|k| k == key || (*key == "config" && !k.is_empty())),
            "{name}: no problem reported for {key}; reported: {keys:?}"
        );
        assert!(
            !stderr.contains("a-client-secret-value") && !stderr.contains("inline-secret"),
            "{name}: secret printed"
        );
        ran += 1;
    }
    assert_eq!(ran, cases.len());
}

#[test]
fn every_problem_of_a_file_is_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let text = GOOD
        .replace("session_duration = \"1h\"", "session_duration = \"5m\"")
        .replace("arn:aws:iam::123456789012:role/aep", "not-an-arn")
        .replace("sandbox = \"dev\"", "sandbox = \"\"")
        .replace("[rotation]\n", "[rotation]\nconcurrency = 0\n");
    let (code, stderr) = run_check(&text, dir.path());
    assert_eq!(code, Some(78));
    for key in [
        "rotation.session_duration",
        "aws.role_arn",
        "connections[1].sandbox",
        "rotation.concurrency",
    ] {
        assert!(
            stderr.contains(&format!("\"key\":\"{key}\"")),
            "{key} not reported:\n{stderr}"
        );
    }
}

#[test]
fn a_missing_config_file_exits_78_and_says_where_it_looked() {
    let mut process = DaemonProcess::spawn({
        let mut command = clean_command(binary());
        command.args(["--config", "/nonexistent/aep.toml", "run"]);
        command
    });
    assert_eq!(process.wait(Duration::from_secs(30)).code(), Some(78));
    assert!(process.stderr_text().contains("/nonexistent/aep.toml"));
}

#[test]
fn a_bad_command_line_exits_2() {
    let mut process = DaemonProcess::spawn({
        let mut command = clean_command(binary());
        command.args(["rotate-everything"]);
        command
    });
    assert_eq!(process.wait(Duration::from_secs(30)).code(), Some(2));
    let mut process = DaemonProcess::spawn({
        let mut command = clean_command(binary());
        command.args(["--log-format", "yaml", "check"]);
        command
    });
    assert_eq!(process.wait(Duration::from_secs(30)).code(), Some(2));
}

#[test]
fn the_example_config_passes_validation() {
    // `check` on the example gets past validation (exit 1 = a remote failed,
    // not 78): the example stays loadable.
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"))
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "example-secret\n").unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, example).unwrap();
    let mut process = DaemonProcess::spawn({
        let mut command = clean_command(binary());
        command
            .env("AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET_FILE", &secret)
            // Remote endpoints of the example are not reachable here; keep
            // every request on loopback so the test sends nothing outside.
            .env("AEP_S3_ROTATOR__ADOBE__IMS_URL", "http://127.0.0.1:9")
            .env("AEP_S3_ROTATOR__ADOBE__PLATFORM_URL", "http://127.0.0.1:9")
            .env("AEP_S3_ROTATOR__AWS__STS_ENDPOINT", "http://127.0.0.1:9")
            .env("AEP_S3_ROTATOR__ROTATION__REQUEST_TIMEOUT", "2s")
            .env("AWS_ACCESS_KEY_ID", SOURCE_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SOURCE_SECRET)
            .arg("--config")
            .arg(&path)
            .arg("check");
        command
    });
    let status = process.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "stderr:\n{}", process.stderr_text());
    let report = process.stdout_text();
    assert!(report.contains("ok    config"), "{report}");
    assert!(report.contains("FAIL  ims"), "{report}");
}
