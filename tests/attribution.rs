//! Session tags and source identity on `AssumeRole`, black box: what the
//! simulator's STS and moto's STS receive, the one-call-per-tagged-identity
//! economy, a discovered name that expands to a value AWS refuses, and bad
//! values in the config (exit 78, with the key path).

// Black-box tests drive the real binary in real time: they read the real clocks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use aep_s3_simulator::SimConnection;
use common::*;

const HOUR: Duration = Duration::from_secs(3600);

/// The daemon's config with `aws` lines added to `[aws]`.
fn with_aws(
    h: &Harness,
    aws: &str,
    extra: &str,
    connections: &[SimConnection],
) -> std::path::PathBuf {
    let path = h.config().connections(connections).table(extra).write();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[aws]\n", &format!("[aws]\n{aws}\n"));
    std::fs::write(&path, text).unwrap();
    path
}

fn sorted(mut tags: Vec<(String, String)>) -> Vec<(String, String)> {
    tags.sort();
    tags
}

#[tokio::test(flavor = "multi_thread")]
async fn each_connection_gets_its_expanded_tags_in_a_call_of_its_own() {
    let h = Harness::start(3, HOUR).await;
    let config = with_aws(
        &h,
        r#"session_tags = { connection = "{id}", sandbox = "{sandbox}", name = "{name}", team = "data" }
source_identity = "aep-{sandbox}""#,
        "",
        &h.sim_config.connections,
    );
    let mut daemon = h.spawn(&config, &["once"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        daemon.stderr_text()
    );
    let connections = &h.sim_config.connections;
    assert_eq!(connections.len(), 3);
    for c in connections {
        let key = h.sim.connection(&c.id).unwrap().access_key_id.unwrap();
        let session = h.sim.sts_session(&key).unwrap();
        assert_eq!(
            sorted(session.session_tags),
            sorted(vec![
                ("connection".to_owned(), c.id.clone()),
                ("name".to_owned(), c.name.clone()),
                ("sandbox".to_owned(), c.sandbox.clone()),
                ("team".to_owned(), "data".to_owned()),
            ])
        );
        assert_eq!(
            session.source_identity.as_deref(),
            Some(format!("aep-{}", c.sandbox).as_str())
        );
        assert_eq!(session.role_arn.as_deref(), Some(ROLE_ARN));
    }
    // One role, but tags that differ per connection: one call each.
    assert_eq!(h.sim.stats().sts_assume_role, 3);
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_without_placeholders_keep_one_call_per_role() {
    let h = Harness::start(3, HOUR).await;
    let config = with_aws(
        &h,
        r#"session_tags = { team = "data" }"#,
        "",
        &h.sim_config.connections,
    );
    let mut daemon = h.spawn(&config, &["once"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        daemon.stderr_text()
    );
    assert_eq!(h.sim.stats().sts_assume_role, 1);
    let key = h
        .sim
        .connection(&h.sim_config.connections[0].id)
        .unwrap()
        .access_key_id
        .unwrap();
    assert_eq!(
        h.sim.sts_session(&key).unwrap().session_tags,
        [("team".to_owned(), "data".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_discovered_name_that_expands_to_a_refused_value_fails_that_connection_only() {
    let tag = "rotate:aep-s3";
    let good = SimConnection::s3("good", "prod", "ingest-good").with_description(tag);
    // Flow Service allows parentheses in names; AWS allows none in tag values.
    let odd = SimConnection::s3("odd", "prod", "ingest-(odd)").with_description(tag);
    let h = Harness::start_with(0, HOUR, |sim| sim.connections = vec![good, odd]).await;
    let rule = format!(
        "[[discover]]\nsandboxes = [\"prod\"]\nname = \"ingest-*\"\ndescription_tag = \"{tag}\"\nsession_tags = {{ name = \"{{name}}\" }}\n"
    );
    let config = with_aws(&h, "", &rule, &[]);
    let mut daemon = h.spawn(&config, &["once"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(30)).code(),
        Some(1),
        "{}",
        daemon.stderr_text()
    );
    assert_eq!(h.sim.connection("good").unwrap().patches, 1);
    assert_eq!(h.sim.connection("odd").unwrap().patches, 0);
    let failed: Vec<_> = daemon
        .events("rotation failed")
        .into_iter()
        .filter(|e| e["connection"] == "odd")
        .collect();
    assert_eq!(failed.len(), 1, "{}", daemon.stderr_text());
    let error = failed[0]["error"].as_str().unwrap();
    assert!(
        error.contains("not sent to STS")
            && error.contains("session_tags.name")
            && error.contains("'('"),
        "{error}"
    );
    // Refused before any call: the good connection's was the only one.
    assert_eq!(h.sim.stats().sts_assume_role, 1);
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
}

#[test]
fn invalid_tags_or_source_identity_exit_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "a-client-secret-value\n").unwrap();
    let base = format!(
        r#"[adobe]
client_id = "cid"
client_secret_file = "{}"
org_id = "0123456789ABCDEF01234567@AdobeOrg"

[aws]
role_arn = "arn:aws:iam::123456789012:role/aep"
AWS

[[connections]]
id = "c-1"
sandbox = "prod"
CONNECTION

[[discover]]
sandboxes = ["dev"]
name = "ingest-*"
RULE
"#,
        dir.path().join("secret").display()
    );
    let cases = [
        (
            "AWS",
            "session_tags = { \"aws:team\" = \"x\" }",
            "aws.session_tags.aws:team",
        ),
        ("AWS", "source_identity = \"a b\"", "aws.source_identity"),
        (
            "CONNECTION",
            "session_tags = { team = \"{owner}\" }",
            "connections[0].session_tags.team",
        ),
        (
            "RULE",
            "session_tags = { Team = \"a\", team = \"b\" }",
            "discover[0].session_tags.team",
        ),
        (
            "RULE",
            "source_identity = \"x\"",
            "discover[0].source_identity",
        ),
    ];
    let mut ran = 0;
    for (slot, line, key) in cases {
        let text = base
            .replace(slot, line)
            .replace("AWS\n", "\n")
            .replace("CONNECTION\n", "\n")
            .replace("RULE\n", "\n");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let mut process = DaemonProcess::spawn({
            let mut command = clean_command(binary());
            command.arg("--config").arg(&path).arg("check");
            command
        });
        let status = process.wait(Duration::from_secs(30));
        let stderr = process.stderr_text();
        assert_eq!(status.code(), Some(78), "{line}: {stderr}");
        assert!(
            stderr.contains(&format!("\"key\":\"{key}\"")),
            "{line}: {key} not named:\n{stderr}"
        );
        ran += 1;
    }
    assert_eq!(ran, 5);
}

fn recording_moto(log: &std::path::Path) -> Moto {
    Moto::start_with_env(&[
        ("MOTO_ENABLE_RECORDING", std::path::Path::new("true")),
        ("MOTO_RECORDER_FILEPATH", log),
    ])
}

/// The form parameters of every `AssumeRole` in moto's request log.
fn assume_role_requests(log: &std::path::Path) -> Vec<Vec<(String, String)>> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|entry| {
            let body = entry["body"].as_str()?.to_owned();
            let body = if entry["body_encoded"] == true {
                base64::engine::general_purpose::STANDARD
                    .decode(body)
                    .ok()?
            } else {
                body.into_bytes()
            };
            let params: Vec<(String, String)> = url::form_urlencoded::parse(&body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            params
                .iter()
                .any(|(k, v)| k == "Action" && v == "AssumeRole")
                .then_some(params)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn moto_receives_the_session_tags_and_the_source_identity() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("moto-requests.jsonl");
    let moto = recording_moto(&log);
    let h = Harness::start_with(2, HOUR, |sim| sim.accept_foreign_credentials = true).await;
    let config = with_aws(
        &h,
        r#"session_tags = { connection = "{id}", "cost center" = "data/ingest" }
source_identity = "aep-s3-rotator""#,
        "",
        &h.sim_config.connections,
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&h.sim.sts_url(), &moto.url());
    std::fs::write(&config, text).unwrap();
    let mut daemon = h.spawn(&config, &["once"]);
    assert_eq!(
        daemon.wait(Duration::from_secs(60)).code(),
        Some(0),
        "{}",
        daemon.stderr_text()
    );
    let requests = assume_role_requests(&log);
    assert_eq!(requests.len(), 2, "one AssumeRole per tagged connection");
    let mut tagged_ids = Vec::new();
    for params in &requests {
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("SourceIdentity").as_deref(), Some("aep-s3-rotator"));
        let mut tags = Vec::new();
        for n in 1..=2 {
            tags.push((
                get(&format!("Tags.member.{n}.Key")).unwrap(),
                get(&format!("Tags.member.{n}.Value")).unwrap(),
            ));
        }
        assert!(get("Tags.member.3.Key").is_none());
        let tags = sorted(tags);
        assert_eq!(tags[0], ("connection".to_owned(), tags[0].1.clone()));
        assert_eq!(
            tags[1],
            ("cost center".to_owned(), "data/ingest".to_owned())
        );
        tagged_ids.push(tags[0].1.clone());
    }
    tagged_ids.sort();
    let mut ids = h.connection_ids();
    ids.sort();
    assert_eq!(tagged_ids, ids);
    // And each connection holds the key moto issued for its own call.
    for id in &ids {
        assert!(h.sim.connection(id).unwrap().access_key_id.is_some());
    }
}
