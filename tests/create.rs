//! Black-box tests of `create`: the real binary against the simulator's
//! strict `POST /connections`, then `once` rotating what it made.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use aep_s3_simulator::{ScriptedFault, SimConnection, SimEvent, SimService};
use common::{Harness, assert_no_secret};

const BUCKET: &str = "created-bucket-1";

/// `create` of a connection named `n` on [`BUCKET`] in `prod`: the plain
/// invocation the tests vary.
const CREATE: [&str; 7] = [
    "create",
    "--sandbox",
    "prod",
    "--name",
    "n",
    "--bucket",
    BUCKET,
];

/// [`CREATE`] followed by `extra`.
fn create_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    CREATE
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}

/// [`CREATE`] with `flag` set to `value`: its value replaced when
/// [`CREATE`] has the flag (clap refuses a flag twice), else appended.
fn create_with<'a>(flag: &'a str, value: &'a str) -> Vec<&'a str> {
    let mut args = create_args(&[]);
    match args.iter().position(|a| *a == flag) {
        Some(at) => args[at + 1] = value,
        None => args.extend_from_slice(&[flag, value]),
    }
    args
}

/// One pre-existing connection (a config needs one) and a bucket that exists
/// in S3 before any connection names it.
async fn harness() -> Harness {
    let h = Harness::start(1, Duration::from_secs(900)).await;
    h.sim.s3_add_bucket(BUCKET);
    h
}

/// Runs the binary to completion: exit code, stdout, stderr.
fn run(h: &Harness, config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut process = h.spawn(config, args);
    let code = process.wait(Duration::from_secs(30)).code().unwrap_or(-1);
    (code, process.stdout_text(), process.stderr_text())
}

fn created(h: &Harness) -> Vec<String> {
    h.sim
        .events()
        .into_iter()
        .filter_map(|e| match e {
            SimEvent::ConnectionAdded { connection, .. } => Some(connection),
            _ => None,
        })
        .collect()
}

fn line_value<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} line in:\n{stdout}"))
        .trim()
}

#[tokio::test(flavor = "multi_thread")]
async fn create_makes_a_connection_that_once_then_rotates() {
    let h = harness().await;
    let config = h.config().write();
    let (code, stdout, stderr) = run(
        &h,
        &config,
        &[
            "create",
            "--sandbox",
            "prod",
            "--name",
            "sales-created",
            "--bucket",
            BUCKET,
            "--folder",
            "landing/",
            "--description",
            "made by create",
        ],
    );
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let id = line_value(&stdout, "id:").to_owned();
    let etag = line_value(&stdout, "etag:").to_owned();
    assert_eq!(created(&h), vec![id.clone()]);
    let view = h.sim.connection(&id).expect("the connection exists");
    assert_eq!(view.sandbox, "prod");
    assert_eq!(view.etag, etag);
    assert_eq!(view.params_other_than_credentials["bucketName"], BUCKET);
    assert_eq!(view.params_other_than_credentials["folderPath"], "landing/");
    assert!(
        view.params_other_than_credentials
            .get("serviceUrl")
            .is_none()
    );
    // The block to paste names it; the pre-push check ran before the POST.
    assert!(stdout.contains("[[connections]]"), "{stdout}");
    assert!(stdout.contains(&format!("id = \"{id}\"")), "{stdout}");
    assert!(stdout.contains("ListObjectsV2"), "{stdout}");
    assert_eq!(h.sim.stats().s3_checks_allowed, 1);

    // The daemon takes it over.
    let mut connections = h.sim_config.connections.clone();
    connections.push(SimConnection::s3(&id, "prod", "sales-created"));
    let config = h.config().connections(&connections).write();
    let (code, once_out, once_err) = run(&h, &config, &["once", "--connection", &id]);
    assert_eq!(code, 0, "stdout:\n{once_out}\nstderr:\n{once_err}");
    let view = h.sim.connection(&id).unwrap();
    assert_eq!(view.patches, 1, "once rotated the created connection");
    assert_eq!(
        view.params_other_than_credentials["folderPath"], "landing/",
        "the rotation kept the parameters create set"
    );
    assert!(h.sim.violations().is_empty(), "{:?}", h.sim.violations());
    let secrets = h.secrets();
    for text in [&stdout, &stderr, &once_out, &once_err] {
        assert_no_secret(text, &secrets);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_matching_discover_rule_is_named_instead_of_a_block() {
    let h = harness().await;
    let rule = "[[discover]]\nsandboxes = [\"prod\"]\ndescription_tag = \"rotate:aep-s3\"\nevery = \"1m\"\n";
    let config = h.config().table(rule).write();
    let (code, stdout, stderr) = run(
        &h,
        &config,
        &[
            "create",
            "--sandbox",
            "prod",
            "--name",
            "tagged",
            "--bucket",
            BUCKET,
            "--description",
            "team data; rotate:aep-s3",
        ],
    );
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("discover[0] will pick it up"), "{stdout}");
    assert!(!stdout.contains("[[connections]]"), "{stdout}");
    assert_no_secret(&format!("{stdout}{stderr}"), &h.secrets());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_flags_exit_78_naming_the_flag_and_create_nothing() {
    let h = harness().await;
    let config = h.config().write();
    let cases: [(&[&str], &str); 7] = [
        (&["--bucket", "Bad_Bucket"], "--bucket"),
        (&["--bucket", "10.0.0.1"], "--bucket"),
        (&["--sandbox", "Prod"], "--sandbox"),
        (&["--name", " "], "--name"),
        (&["--service-url", "http://s3.example.com"], "--service-url"),
        (&["--service-url", "ftp://s3.example.com"], "--service-url"),
        (&["--role-arn", "arn:aws:s3:::bucket"], "--role-arn"),
    ];
    for (extra, flag) in cases {
        let (code, stdout, stderr) = run(&h, &config, &create_with(extra[0], extra[1]));
        assert_eq!(code, 78, "{extra:?}: stdout:\n{stdout}\nstderr:\n{stderr}");
        assert!(
            stderr.contains(flag),
            "{extra:?} should name {flag}: {stderr}"
        );
    }
    assert!(created(&h).is_empty());
    // Nothing reached STS or Flow Service.
    assert_eq!(h.sim.stats().sts_assume_role, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_post_exits_1_with_the_remotes_detail() {
    let h = harness().await;
    let config = h.config().write();
    let args = CREATE;
    h.sim.script(
        SimService::Flow,
        ScriptedFault::Status {
            status: 403,
            retry_after: None,
            body: None,
        },
    );
    let (code, stdout, stderr) = run(&h, &config, &args);
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("Api Key is invalid"), "{stderr}");
    assert!(!stdout.contains("id:"), "{stdout}");

    // A 400 whose detail echoes the session token it was sent: shown, scrubbed.
    h.sim.script(
        SimService::Flow,
        ScriptedFault::Status {
            status: 400,
            retry_after: None,
            body: Some(
                r#"{"type":"https://ns.adobe.com/aep/errors/FLOW-1400-400","title":"Bad Request","status":400,"report":{"detailed-message":"The bucket policy of created-bucket-1 forbids this org"}}"#
                    .to_owned(),
            ),
        },
    );
    let (code, stdout2, stderr2) = run(&h, &config, &args);
    assert_eq!(code, 1, "stdout:\n{stdout2}\nstderr:\n{stderr2}");
    assert!(stderr2.contains("forbids this org"), "{stderr2}");

    // A gateway that echoes the request's Authorization header back: the
    // failure is reported, the IMS token is not.
    h.sim.script(SimService::Flow, ScriptedFault::EchoSecrets);
    let (code, stdout3, stderr3) = run(&h, &config, &args);
    assert_eq!(code, 1, "stdout:\n{stdout3}\nstderr:\n{stderr3}");
    assert!(stderr3.contains("502"), "{stderr3}");
    assert!(stderr3.contains("may have been created"), "{stderr3}");
    assert!(created(&h).is_empty());
    assert_no_secret(
        &format!("{stdout}{stderr}{stdout2}{stderr2}{stdout3}{stderr3}"),
        &h.secrets(),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_that_cannot_list_the_bucket_are_refused_before_the_post() {
    let h = harness().await;
    let config = h.config().write();
    let (code, stdout, stderr) = run(&h, &config, &create_with("--bucket", "no-such-bucket"));
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("refusing to create"), "{stderr}");
    assert!(created(&h).is_empty());
    assert_no_secret(&format!("{stdout}{stderr}"), &h.secrets());
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_dead_on_arrival_are_refused_before_the_post() {
    let h = harness().await;
    // STS answers credentials that expire as they are issued: checked as a
    // rotation's, they never reach a new connection.
    h.sim.script(
        SimService::Sts,
        ScriptedFault::ShortCredentials(Duration::ZERO),
    );
    let config = h.config().write();
    let (code, stdout, stderr) = run(&h, &config, &CREATE);
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains("nothing was created") && stderr.contains("already past"),
        "{stderr}"
    );
    assert!(created(&h).is_empty());
    assert_eq!(h.sim.stats().s3_checks_allowed, 0);
    assert_no_secret(&format!("{stdout}{stderr}"), &h.secrets());
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_prints_the_request_redacted_and_sends_nothing() {
    let h = harness().await;
    let config = h.config().write();
    // The pre-push check goes to `--service-url`: the simulator's S3.
    let s3 = h.sim.s3_url();
    let (code, stdout, stderr) = run(
        &h,
        &config,
        &create_args(&["--service-url", &s3, "--dry-run"]),
    );
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("[redacted]"), "{stdout}");
    assert!(stdout.contains("\"serviceUrl\""), "{stdout}");
    assert!(
        stdout.contains("nothing was sent to Flow Service"),
        "{stdout}"
    );
    assert!(created(&h).is_empty());
    assert_eq!(h.sim.stats().flow_requests, 0);
    assert_no_secret(&format!("{stdout}{stderr}"), &h.secrets());
}

/// Issue 26 #5 and #2: a 201 with a usable id but no etag means created
/// (exit 0, the id printed: a script retrying on exit 1 made a second
/// connection); an id that cannot be a connection id is refused, never
/// printed raw.
#[tokio::test(flavor = "multi_thread")]
async fn a_201_with_an_id_and_no_etag_is_created_and_a_hostile_id_is_refused() {
    let h = harness().await;
    let config = h.config().write();
    let answer = |body: &str| ScriptedFault::Status {
        status: 201,
        retry_after: None,
        body: Some(body.to_owned()),
    };
    h.sim
        .script(SimService::Flow, answer(r#"{"id":"6a1d-created-no-etag"}"#));
    let (code, stdout, stderr) = run(&h, &config, &CREATE);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(line_value(&stdout, "id:"), "6a1d-created-no-etag");
    assert!(line_value(&stdout, "etag:").contains("GET"), "{stdout}");

    for id in ["..", "a\u{1b}]0;pwned\u{7}b"] {
        let body = serde_json::json!({ "id": id, "etag": "\"e\"" }).to_string();
        h.sim.script(SimService::Flow, answer(&body));
        let (code, stdout, stderr) = run(&h, &config, &CREATE);
        assert_eq!(code, 1, "{id:?}: stdout:\n{stdout}\nstderr:\n{stderr}");
        assert!(stderr.contains("no usable"), "{stderr}");
        assert!(!format!("{stdout}{stderr}").contains('\u{1b}'), "{stderr}");
    }
}
