//! The config pipeline end to end: good and bad files, the environment,
//! defaults, suggestions.

use super::*;
use secrecy::ExposeSecret;

const FILE_SECRET: &str = "file-secret-value";
const INLINE_SECRET: &str = "inline-secret-value";

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

/// A temp dir with a secret file, an empty file, and the good config
/// pointing at the secret.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), format!("  {FILE_SECRET}\n")).unwrap();
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        // As an operator should keep it; the mode warning has its own test.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                dir.path().join("secret"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        Self { dir }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    fn good(&self) -> String {
        GOOD.replace("SECRET_FILE", &self.path("secret"))
    }
}

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn replace(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "case edit does not apply: {from:?}");
    text.replacen(from, to, 1)
}

fn issues(text: &str, env: Vec<(String, String)>) -> Vec<ConfigIssue> {
    match Config::from_toml_str(text, env) {
        Ok(_) => panic!("expected the config to be rejected:\n{text}"),
        Err(error) => {
            let shown = error.to_string();
            assert!(
                !shown.contains(FILE_SECRET) && !shown.contains(INLINE_SECRET),
                "a secret was printed: {shown}"
            );
            error.issues
        }
    }
}

#[test]
fn the_good_config_loads() {
    let fx = Fixture::new();
    let config = Config::from_toml_str(&fx.good(), no_env()).unwrap();
    assert_eq!(config.adobe.client_secret.expose_secret(), FILE_SECRET);
    assert_eq!(config.connections.len(), 2);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn every_bad_input_names_its_key() {
    let fx = Fixture::new();
    let good = fx.good();
    let g = good.as_str();
    let no_role = replace(g, "role_arn = \"arn:aws:iam::123456789012:role/aep\"\n", "");
    let many_arns = format!(
        "[{}]",
        ["\"arn:aws:iam::aws:policy/ReadOnlyAccess\""; 11].join(", ")
    );
    let long_policy = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:GetObject","Resource":"{}"}}]}}"#,
        "x".repeat(2100)
    );
    // (name, config text, key path that must be named, a word of the message)
    // One case per line, so the table reads as a table.
    #[rustfmt::skip]
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("missing client_id", replace(g, "client_id = \"cid\"\n", ""), "adobe.client_id", "missing"),
        ("empty client_id", replace(g, "client_id = \"cid\"", "client_id = \"\""), "adobe.client_id", "empty"),
        ("missing org_id", replace(g, "org_id = \"0123456789ABCDEF01234567@AdobeOrg\"\n", ""), "adobe.org_id", "missing"),
        ("org_id without @AdobeOrg", replace(g, "01234567@AdobeOrg", "01234567"), "adobe.org_id", "@AdobeOrg"),
        ("unknown top-level key", format!("{g}\n[bogus]\nx = 1\n"), "bogus", "unknown key"),
        ("unknown top-level scalar", format!("verbose = true\n{g}"), "verbose", "unknown key"),
        // A structural error is the message alone: the file's line (here a
        // secret) is never quoted.
        ("a table written as a string", format!("coordination = \"{INLINE_SECRET}\"\n{g}"), "coordination", "wrong type"),
        ("unknown key in a section", replace(g, "[aws]\n", "[aws]\nrole = \"x\"\n"), "aws.role", "unknown key"),
        ("unknown key in a connection", replace(g, "sandbox = \"dev\"", "sandbox = \"dev\"\nsandbx = \"dev\""), "connections[1].sandbx", "did you mean connections[1].sandbox?"),
        ("unknown key, nothing close", replace(g, "[aws]\n", "[aws]\ncolour = \"x\"\n"), "aws.colour", "this table takes region, sts_endpoint"),
        ("bad duration", replace(g, "session_duration = \"1h\"", "session_duration = \"an hour\""), "rotation.session_duration", "not a duration"),
        ("duration without quotes", replace(g, "refresh_before = \"20m\"", "refresh_before = 1200"), "rotation.refresh_before", "not a duration"),
        ("duration too short", replace(g, "session_duration = \"1h\"", "session_duration = \"5m\""), "rotation.session_duration", "15m..12h"),
        ("duration too long", replace(g, "session_duration = \"1h\"", "session_duration = \"13h\""), "rotation.session_duration", "15m..12h"),
        ("duration not whole seconds", replace(g, "session_duration = \"1h\"", "session_duration = \"1h 500ms\""), "rotation.session_duration", "whole seconds"),
        ("refresh_before >= session_duration", replace(g, "refresh_before = \"20m\"", "refresh_before = \"1h\""), "rotation.refresh_before", "less than session_duration"),
        ("refresh_before zero", replace(g, "refresh_before = \"20m\"", "refresh_before = \"0s\""), "rotation.refresh_before", "more than 0s"),
        ("jitter too large", replace(g, "[rotation]\n", "[rotation]\njitter = \"40m\"\n"), "rotation.jitter", "session_duration - refresh_before"),
        ("retry_min above retry_max", replace(g, "[rotation]\n", "[rotation]\nretry_min = \"5m\"\n"), "rotation.retry_min", "retry_max"),
        ("retry_max too long", replace(g, "[rotation]\n", "[rotation]\nretry_max = \"100000y\"\n"), "rotation.retry_max", "at most 1h"),
        ("shutdown_grace zero", replace(g, "[rotation]\n", "[rotation]\nshutdown_grace = \"0s\"\n"), "rotation.shutdown_grace", "more than 0s"),
        ("shutdown_grace too long", replace(g, "[rotation]\n", "[rotation]\nshutdown_grace = \"1h\"\n"), "rotation.shutdown_grace", "at most 5m"),
        ("duplicate name in a sandbox", replace(&replace(g, "sandbox = \"dev\"", "sandbox = \"prod\"\nname = \"orders\""), "sandbox = \"prod\"\n\n", "sandbox = \"prod\"\nname = \"orders\"\n\n"), "connections[1].name", "duplicate name \"orders\" in sandbox \"prod\""),
        ("secret file is /dev/zero", replace(g, &fx.path("secret"), "/dev/zero"), "adobe.client_secret_file", "character device"),
        ("request_timeout too long", replace(g, "[rotation]\n", "[rotation]\nrequest_timeout = \"10m\"\n"), "rotation.request_timeout", "at most 5m"),
        ("concurrency 0", replace(g, "[rotation]\n", "[rotation]\nconcurrency = 0\n"), "rotation.concurrency", "at least 1"),
        ("concurrency negative", replace(g, "[rotation]\n", "[rotation]\nconcurrency = -2\n"), "rotation.concurrency", "negative"),
        ("type error", replace(g, "[rotation]\n", "[rotation]\nconcurrency = \"eight\"\n"), "rotation.concurrency", "whole number"),
        ("type error on a string key", replace(g, "client_id = \"cid\"", "client_id = 5"), "adobe.client_id", "a string"),
        ("max_requests_per_second 0", replace(g, "[rotation]\n", "[rotation]\nmax_requests_per_second = 0\n"), "rotation.max_requests_per_second", "at least 1"),
        ("verify not a boolean", replace(g, "[rotation]\n", "[rotation]\nverify = \"maybe\"\n"), "rotation.verify", "true or false"),
        ("prepush_check not a boolean", replace(g, "[rotation]\n", "[rotation]\nprepush_check = \"yes\"\n"), "rotation.prepush_check", "true or false"),
        ("plain http to a remote S3", replace(g, "[aws]\n", "[aws]\ns3_endpoint = \"http://s3.example.com\"\n"), "aws.s3_endpoint", "loopback"),
        ("plain http to a remote S3 in s3_endpoints", replace(g, "[aws]\n", "[aws]\ns3_endpoints = [\"https://minio.example.com\", \"http://s3.example.com\"]\n"), "aws.s3_endpoints[1]", "loopback"),
        ("bad role ARN", replace(g, "arn:aws:iam::123456789012:role/aep", "arn:aws:s3:::bucket"), "aws.role_arn", "not an IAM role ARN"),
        ("role ARN with a short account", replace(g, "arn:aws:iam::123456789012:role/aep", "arn:aws:iam::1234:role/aep"), "aws.role_arn", "12 digits"),
        ("bad connection role ARN", replace(g, "sandbox = \"prod\"", "sandbox = \"prod\"\nrole_arn = \"aep-role\""), "connections[0].role_arn", "not an IAM role ARN"),
        ("duplicate connection id", replace(g, "id = \"c-2\"", "id = \"c-1\""), "connections[1].id", "connections[0]"),
        ("empty connection id", replace(g, "id = \"c-1\"", "id = \"\""), "connections[0].id", "empty"),
        ("missing connection id", replace(g, "id = \"c-1\"\n", ""), "connections[0].id", "missing"),
        ("connection id with a slash", replace(g, "id = \"c-1\"", "id = \"c/1\""), "connections[0].id", "URL"),
        ("connection id dot-dot", replace(g, "id = \"c-1\"", "id = \"..\""), "connections[0].id", "relative path segment"),
        ("connection id dot", replace(g, "id = \"c-1\"", "id = \".\""), "connections[0].id", "relative path segment"),
        ("overlong connection id", replace(g, "id = \"c-1\"", &format!("id = \"{}\"", "x".repeat(3000))), "connections[0].id", "longer than 128"),
        ("empty sandbox", replace(g, "sandbox = \"dev\"", "sandbox = \"\""), "connections[1].sandbox", "empty"),
        ("upper-case sandbox", replace(g, "sandbox = \"dev\"", "sandbox = \"Dev\""), "connections[1].sandbox", "lower-case"),
        ("bad URL", replace(g, "[adobe]\n", "[adobe]\nims_url = \"not a url\"\n"), "adobe.ims_url", "not a URL"),
        ("plain http to a remote host", replace(g, "[adobe]\n", "[adobe]\nplatform_url = \"http://platform.adobe.io\"\n"), "adobe.platform_url", "loopback"),
        ("plain http to a remote STS", replace(g, "[aws]\n", "[aws]\nsts_endpoint = \"http://10.0.0.1:4566\"\n"), "aws.sts_endpoint", "loopback"),
        ("unsupported scheme", replace(g, "[aws]\n", "[aws]\nsts_endpoint = \"ftp://127.0.0.1\"\n"), "aws.sts_endpoint", "use https"),
        ("URL with credentials", replace(g, "[adobe]\n", "[adobe]\nims_url = \"https://u:p@ims.example.com\"\n"), "adobe.ims_url", "password"),
        ("unreadable secret file", replace(g, &fx.path("secret"), "/nonexistent/secret"), "adobe.client_secret_file", "/nonexistent/secret"),
        ("secret file is a directory", replace(g, &fx.path("secret"), &fx.path("")), "adobe.client_secret_file", "cannot read"),
        ("empty secret file", replace(g, &fx.path("secret"), &fx.path("empty")), "adobe.client_secret_file", "empty"),
        ("both secret sources", replace(g, "[adobe]\n", &format!("[adobe]\nclient_secret = \"{INLINE_SECRET}\"\n")), "adobe.client_secret", "both"),
        ("no secret source", replace(g, &format!("client_secret_file = \"{}\"\n", fx.path("secret")), ""), "adobe.client_secret", "no client secret"),
        ("empty inline secret", replace(g, &format!("client_secret_file = \"{}\"", fx.path("secret")), "client_secret = \" \""), "adobe.client_secret", "empty"),
        ("secret of the wrong type", replace(g, &format!("client_secret_file = \"{}\"", fx.path("secret")), "client_secret = [\"x\"]"), "adobe.client_secret", "a string"),
        ("session_policy not JSON", replace(g, "sandbox = \"prod\"", "sandbox = \"prod\"\nsession_policy = \"{not json\""), "connections[0].session_policy", "JSON"),
        ("session_policy not an object", replace(g, "sandbox = \"prod\"", "sandbox = \"prod\"\nsession_policy = \"[1]\""), "connections[0].session_policy", "JSON object"),
        ("session_policy too long", replace(g, "sandbox = \"prod\"", &format!("sandbox = \"prod\"\nsession_policy = '{long_policy}'")), "connections[0].session_policy", "2048"),
        ("bad policy ARN", replace(g, "sandbox = \"prod\"", "sandbox = \"prod\"\npolicy_arns = [\"arn:aws:iam::aws:role/x\"]"), "connections[0].policy_arns[0]", "not an IAM policy ARN"),
        ("too many policy ARNs", replace(g, "sandbox = \"prod\"", &format!("sandbox = \"prod\"\npolicy_arns = {many_arns}")), "connections[0].policy_arns", "at most 10"),
        ("policy without a role", replace(&no_role, "sandbox = \"dev\"", "sandbox = \"dev\"\nsession_policy = '{\"Version\":\"2012-10-17\",\"Statement\":[]}'"), "connections[1].session_policy", "GetSessionToken"),
        ("policy ARNs without a role", replace(&no_role, "sandbox = \"dev\"", "sandbox = \"dev\"\npolicy_arns = [\"arn:aws:iam::aws:policy/ReadOnlyAccess\"]"), "connections[1].policy_arns", "needs a role"),
        ("bad session name", replace(g, "[aws]\n", "[aws]\nsession_name = \"has space\"\n"), "aws.session_name", "letters, digits"),
        ("session name too short", replace(g, "sandbox = \"prod\"", "sandbox = \"prod\"\nsession_name = \"x\""), "connections[0].session_name", "2 to 64"),
        ("external id too short", replace(g, "sandbox = \"prod\"", "sandbox = \"prod\"\nexternal_id = \"x\""), "connections[0].external_id", "2 to 1224"),
        ("empty region", replace(g, "[aws]\n", "[aws]\nregion = \"\"\n"), "aws.region", "empty"),
        ("bad admin.listen", format!("{g}\n[admin]\nlisten = \"localhost\"\n"), "admin.listen", "socket address"),
        ("empty state.path", format!("{g}\n[state]\npath = \"\"\n"), "state.path", "empty"),
        ("empty scopes", replace(g, "[adobe]\n", "[adobe]\nscopes = []\n"), "adobe.scopes", "empty"),
        ("scope of the wrong type", replace(g, "[adobe]\n", "[adobe]\nscopes = [\"openid\", 3]\n"), "adobe.scopes[1]", "a string"),
        ("not TOML", "this is [not toml".to_owned(), "config", "not valid TOML"),
        ("no connections", g.split("[[connections]]").next().unwrap().to_owned(), "connections", "no connections"),
        ("connections as a single table", format!("{}\n[connections]\nid = \"c-1\"\nsandbox = \"prod\"\n", g.split("[[connections]]").next().unwrap()), "connections", "[[connections]]"),
        ("a coordination key without a backend", format!("{g}\n[coordination]\ntable = \"t-1\"\n"), "coordination.backend", "dynamodb"),
        ("an unknown backend", format!("{g}\n[coordination]\nbackend = \"etcd\"\ntable = \"t-1\"\n"), "coordination.backend", "unknown backend"),
        ("no table", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\n"), "coordination.table", "coordination init"),
        ("a bad table name", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"a b\"\n"), "coordination.table", "not a DynamoDB table name"),
        ("a lease out of range", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nlease = \"500ms\"\n"), "coordination.lease", "1s to 10m"),
        ("a lease over 10m", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nlease = \"10m 1s\"\n"), "coordination.lease", "out of range"),
        ("a lease longer than refresh_before / 2", replace(&format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nlease = \"6m\"\n"), "refresh_before = \"20m\"", "refresh_before = \"10m\""), "coordination.lease", "half of rotation.refresh_before"),
        ("renew_every not under lease / 2", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nlease = \"10s\"\nrenew_every = \"5s\"\n"), "coordination.renew_every", "less than half"),
        ("a holder with a space", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nholder = \"a b\"\n"), "coordination.holder", "unique per replica"),
        ("a plain-http endpoint off loopback", format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nendpoint = \"http://dynamodb.example.com\"\n"), "coordination.endpoint", "loopback"),
        ("a section that is not a table", format!("admin = \"{INLINE_SECRET}\"\n{g}"), "admin", "expected an [admin] table"),
    ];
    assert!(cases.len() >= 20, "the table lost cases");
    let mut ran = 0;
    for (name, text, key, word) in &cases {
        let found = issues(text, no_env());
        let issue = found
            .iter()
            .find(|i| i.path == *key)
            .unwrap_or_else(|| panic!("{name}: no issue for {key}; found {found:?}"));
        assert!(
            issue.message.contains(word),
            "{name}: the message for {key} lacks {word:?}: {:?}",
            issue.message
        );
        ran += 1;
    }
    assert_eq!(ran, cases.len());
    assert_eq!(ran, 87, "update this count when adding cases");
}

#[test]
fn coordination_is_off_without_its_table_and_has_defaults_with_it() {
    let fx = Fixture::new();
    let g = fx.good();
    let off = Config::from_toml_str(&g, no_env()).unwrap();
    assert_eq!(off.coordination, None);
    let on = Config::from_toml_str(
        &format!("{g}\n[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\n"),
        no_env(),
    )
    .unwrap();
    let c = on.coordination.unwrap();
    assert_eq!(c.table, "aep-s3-rotator");
    assert_eq!(c.lease, Duration::from_secs(15));
    assert_eq!(c.renew_every, Duration::from_secs(5), "lease / 3");
    assert_eq!((c.holder, c.endpoint), (None, None));
}

#[test]
fn every_problem_is_reported_together() {
    let fx = Fixture::new();
    let text = fx
        .good()
        .replace("session_duration = \"1h\"", "session_duration = \"5m\"")
        .replace("arn:aws:iam::123456789012:role/aep", "not-an-arn")
        .replace("sandbox = \"dev\"", "sandbox = \"\"\nbogus = 1")
        .replace(
            "[rotation]\n",
            "[rotation]\nconcurrency = 0\nverify = \"maybe\"\n",
        )
        .replace("client_id = \"cid\"\n", "");
    let found = issues(&text, no_env());
    let mut paths: Vec<&str> = found.iter().map(|i| i.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "adobe.client_id",
            "aws.role_arn",
            "connections[1].bogus",
            "connections[1].sandbox",
            "rotation.concurrency",
            "rotation.session_duration",
            "rotation.verify",
        ],
        "{found:?}"
    );
}

#[test]
fn one_misspelt_key_is_one_message_with_a_suggestion() {
    let fx = Fixture::new();
    // The typo leaves refresh_before at its default (20m), longer than
    // the 15m session: that follows from the typo, not from the file.
    let text = fx.good().replace(
        "[rotation]\n",
        "[rotation]\nsession_duration = \"15m\"\nrefesh_before = \"5m\"\n",
    );
    let text = text
        .replacen("session_duration = \"1h\"\n", "", 1)
        .replacen("refresh_before = \"20m\"\n", "", 1);
    let found = issues(&text, no_env());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "rotation.refesh_before");
    assert_eq!(
        found[0].message,
        "unknown key; did you mean rotation.refresh_before?"
    );
    // A key that is set keeps its own problems beside the typo's.
    let both = text.replace("[rotation]\n", "[rotation]\nrefresh_before = \"30m\"\n");
    let found = issues(&both, no_env());
    assert_eq!(found.len(), 2, "{found:?}");
    // A misspelt table is suggested too.
    let table = fx.good().replace("[rotation]\n", "[rotaton]\n");
    let found = issues(&table, no_env());
    assert!(
        found
            .iter()
            .any(|i| i.path == "rotaton" && i.message.contains("did you mean rotation?")),
        "{found:?}"
    );
}

#[test]
fn the_error_displays_one_line_per_issue() {
    let fx = Fixture::new();
    let text = fx
        .good()
        .replace("sandbox = \"prod\"", "sandbox = \"\"")
        .replace("client_id = \"cid\"\n", "");
    let error = Config::from_toml_str(&text, no_env()).unwrap_err();
    let shown = error.to_string();
    assert_eq!(shown.lines().count(), 2, "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("adobe.client_id: missing")),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("connections[0].sandbox: is empty")),
        "{shown}"
    );
}

#[test]
fn a_toml_syntax_error_gives_the_position_but_not_the_line() {
    let text = format!("[adobe]\nclient_secret = \"{INLINE_SECRET}\nclient_id = \"x\"\n");
    let found = issues(&text, no_env());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "config");
    assert!(
        found[0].message.contains("line 2"),
        "{:?}",
        found[0].message
    );
}

#[test]
fn the_environment_overrides_the_file() {
    let fx = Fixture::new();
    let text = fx.good().replace(
        &format!("client_secret_file = \"{}\"\n", fx.path("secret")),
        "",
    );
    let config = Config::from_toml_str(
        &text,
        env(&[
            ("AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET", INLINE_SECRET),
            ("AEP_S3_ROTATOR__ROTATION__CONCURRENCY", "3"),
            ("AEP_S3_ROTATOR__ROTATION__VERIFY", "true"),
            ("AEP_S3_ROTATOR__ROTATION__SESSION_DURATION", "2h"),
            ("AEP_S3_ROTATOR__ADOBE__SCOPES", "openid,AdobeID"),
            // Not ours: ignored.
            ("AEP_S3_ROTATOR_CONFIG", "/elsewhere.toml"),
            ("AEP_S3_ROTATOR_LOG_FORMAT", "yaml"),
            ("OTHER__ROTATION__CONCURRENCY", "5"),
            // Empty counts as unset.
            ("AEP_S3_ROTATOR__ROTATION__JITTER", ""),
        ]),
    )
    .unwrap();
    assert_eq!(config.adobe.client_secret.expose_secret(), INLINE_SECRET);
    assert_eq!(config.rotation.concurrency.get(), 3);
    assert!(config.rotation.verify);
    assert_eq!(config.rotation.session_duration, Duration::from_secs(7200));
    assert_eq!(config.rotation.jitter, DEFAULT_JITTER);
    assert_eq!(config.adobe.scopes, ["openid", "AdobeID"]);
}

#[test]
fn a_secret_of_digits_stays_a_string() {
    let fx = Fixture::new();
    let text = fx.good().replace(
        &format!("client_secret_file = \"{}\"\n", fx.path("secret")),
        "",
    );
    for secret in ["0012345", "1e5", "true", "12345678901234567890123"] {
        let config = Config::from_toml_str(
            &text,
            env(&[("AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET", secret)]),
        )
        .unwrap();
        assert_eq!(config.adobe.client_secret.expose_secret(), secret);
    }
    let inline = fx.good().replace(
        &format!("client_secret_file = \"{}\"", fx.path("secret")),
        "client_secret = \"007\"",
    );
    let config = Config::from_toml_str(&inline, no_env()).unwrap();
    assert_eq!(config.adobe.client_secret.expose_secret(), "007");
}

#[test]
fn an_unknown_environment_key_is_an_issue() {
    let fx = Fixture::new();
    let found = issues(&fx.good(), env(&[("AEP_S3_ROTATOR__ROTATION__BOGUS", "1")]));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "rotation.bogus");
    assert!(
        found[0].message.contains("AEP_S3_ROTATOR__ROTATION__BOGUS"),
        "{:?}",
        found[0]
    );
}

#[test]
fn odd_environment_names_are_reported_not_fatal() {
    let fx = Fixture::new();
    for (name, key) in [
        ("AEP_S3_ROTATOR__ADOBE", "adobe"),
        ("AEP_S3_ROTATOR__CONNECTIONS", "connections"),
        ("AEP_S3_ROTATOR__CONNECTIONS__0__ID", "connections"),
        ("AEP_S3_ROTATOR__NEW_SECTION__KEY", "new_section"),
        ("AEP_S3_ROTATOR__ADOBE__CLIENT_ID__X", "adobe.client_id"),
    ] {
        let found = issues(&fx.good(), env(&[(name, INLINE_SECRET)]));
        assert!(
            found
                .iter()
                .any(|i| i.path == key && i.message.contains(name)),
            "{name}: {found:?}"
        );
    }
    // Odd names end in an issue or a valid config, never a panic.
    for name in ["AEP_S3_ROTATOR____X", "AEP_S3_ROTATOR__"] {
        let _ = Config::from_toml_str(&fx.good(), env(&[(name, "x")]));
    }
}

#[test]
fn an_environment_secret_next_to_a_secret_file_is_both() {
    let fx = Fixture::new();
    let found = issues(
        &fx.good(),
        env(&[("AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET", INLINE_SECRET)]),
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "adobe.client_secret");
    assert!(
        found[0]
            .message
            .contains("AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET"),
        "{:?}",
        found[0]
    );
}

#[test]
fn a_bad_environment_value_names_the_key() {
    let fx = Fixture::new();
    let found = issues(
        &fx.good(),
        env(&[("AEP_S3_ROTATOR__ROTATION__CONCURRENCY", "eight")]),
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "rotation.concurrency");
    assert!(
        found[0]
            .message
            .contains("AEP_S3_ROTATOR__ROTATION__CONCURRENCY"),
        "{found:?}"
    );
}

#[test]
fn defaults_are_applied() {
    let fx = Fixture::new();
    let minimal = format!(
        "[adobe]\nclient_id = \"cid\"\nclient_secret_file = \"{}\"\norg_id = \"X@AdobeOrg\"\n\n[[connections]]\nid = \"c-1\"\nsandbox = \"prod\"\n",
        fx.path("secret")
    );
    let config = Config::from_toml_str(&minimal, no_env()).unwrap();
    let adobe = &config.adobe;
    assert_eq!(adobe.scopes, DEFAULT_SCOPES);
    assert_eq!(adobe.ims_url.as_str(), "https://ims-na1.adobelogin.com/");
    assert_eq!(adobe.platform_url.as_str(), "https://platform.adobe.io/");
    let aws = &config.aws;
    assert_eq!(aws.region, None);
    assert_eq!(aws.sts_endpoint, None);
    assert_eq!(aws.s3_endpoint, None);
    assert_eq!(aws.role_arn, None);
    assert_eq!(aws.external_id, None);
    assert_eq!(aws.session_name, "aep-s3-rotator");
    let r = &config.rotation;
    assert_eq!(r.session_duration, Duration::from_secs(3600));
    assert_eq!(r.refresh_before, Duration::from_secs(20 * 60));
    assert_eq!(r.jitter, Duration::from_secs(60));
    assert_eq!(r.concurrency.get(), 8);
    assert_eq!(r.max_requests_per_second, None);
    assert_eq!(r.retry_min, Duration::from_secs(1));
    assert_eq!(r.retry_max, Duration::from_secs(120));
    assert!(!r.verify);
    assert!(r.prepush_check, "the pre-push check is on by default");
    assert_eq!(r.request_timeout, Duration::from_secs(30));
    assert_eq!(r.shutdown_grace, Duration::from_secs(10));
    let c = &config.connections[0];
    assert_eq!(
        **c,
        ConnectionConfig {
            id: "c-1".into(),
            sandbox: "prod".into(),
            name: "c-1".into(),
            role_arn: None,
            external_id: None,
            session_name: None,
            session_policy: None,
            policy_arns: Vec::new(),
            attribution: Attribution::default(),
            origin: Origin::Explicit,
        }
    );
    assert_eq!(config.admin.listen, None);
    assert_eq!(config.state.path, None);
    assert!(config.warnings.is_empty());
}

#[test]
fn every_key_is_read() {
    let fx = Fixture::new();
    let full = format!(
        r#"[adobe]
client_id = "cid"
client_secret_file = "{secret}"
org_id = "X@AdobeOrg"
scopes = ["openid", "session"]
ims_url = "http://localhost:8081"
platform_url = "http://[::1]:8082/base"

[aws]
region = "eu-west-1"
sts_endpoint = "http://127.0.0.2:4566"
role_arn = "arn:aws:iam::123456789012:role/team/aep"
external_id = "ext-id:1"
session_name = "rotator@host"

[rotation]
session_duration = "2h"
refresh_before = "30m"
jitter = "5m"
concurrency = 2
max_requests_per_second = 10
retry_min = "500ms"
retry_max = "1m"
verify = true
request_timeout = "10s"
shutdown_grace = "20s"

[[connections]]
id = "c-1"
sandbox = "prod"
name = "sales"
role_arn = "arn:aws-cn:iam::210987654321:role/other"
external_id = "per-conn"
session_name = "per-conn"
session_policy = '{{"Version":"2012-10-17","Statement":[]}}'
policy_arns = ["arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess", "arn:aws:iam::123456789012:policy/team/mine"]

[admin]
listen = "127.0.0.1:9464"

[state]
path = "state.json"
"#,
        secret = fx.path("secret")
    );
    let config = Config::from_toml_str(&full, no_env()).unwrap();
    assert_eq!(config.adobe.scopes, ["openid", "session"]);
    assert_eq!(config.adobe.ims_url.as_str(), "http://localhost:8081/");
    assert_eq!(config.adobe.platform_url.as_str(), "http://[::1]:8082/base");
    assert_eq!(config.aws.region.as_deref(), Some("eu-west-1"));
    assert_eq!(
        config.aws.sts_endpoint.as_ref().map(Url::as_str),
        Some("http://127.0.0.2:4566/")
    );
    assert_eq!(
        config.aws.role_arn.as_ref().map(RoleArn::as_str),
        Some("arn:aws:iam::123456789012:role/team/aep")
    );
    assert_eq!(config.aws.external_id.as_deref(), Some("ext-id:1"));
    assert_eq!(config.aws.session_name, "rotator@host");
    let r = &config.rotation;
    assert_eq!(
        (r.session_duration, r.refresh_before, r.jitter),
        (
            Duration::from_secs(7200),
            Duration::from_secs(1800),
            Duration::from_secs(300)
        )
    );
    assert_eq!(r.concurrency.get(), 2);
    assert_eq!(r.max_requests_per_second.map(NonZeroU32::get), Some(10));
    assert_eq!(
        (r.retry_min, r.retry_max),
        (Duration::from_millis(500), Duration::from_secs(60))
    );
    assert!(r.verify);
    assert_eq!(
        (r.request_timeout, r.shutdown_grace),
        (Duration::from_secs(10), Duration::from_secs(20))
    );
    let c = &config.connections[0];
    assert_eq!(c.name, "sales");
    assert_eq!(
        c.role_arn.as_ref().map(RoleArn::as_str),
        Some("arn:aws-cn:iam::210987654321:role/other")
    );
    assert_eq!(c.external_id.as_deref(), Some("per-conn"));
    assert_eq!(c.session_name.as_deref(), Some("per-conn"));
    assert_eq!(
        c.session_policy.as_deref(),
        Some(r#"{"Version":"2012-10-17","Statement":[]}"#)
    );
    assert_eq!(c.policy_arns.len(), 2);
    assert_eq!(config.admin.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(config.state.path, Some(PathBuf::from("state.json")));
}

#[test]
fn plain_http_is_accepted_to_loopback_only() {
    let fx = Fixture::new();
    for (url, ok) in [
        ("http://127.0.0.1:9", true),
        ("http://127.8.9.10", true),
        ("http://localhost:8080", true),
        ("http://LOCALHOST", true),
        ("http://[::1]:9", true),
        ("https://platform.adobe.io", true),
        ("http://128.0.0.1", false),
        ("http://localhost.example.com", false),
        ("http://[::2]", false),
        ("http://0.0.0.0:9", false),
    ] {
        let text = replace(
            &fx.good(),
            "[adobe]\n",
            &format!("[adobe]\nplatform_url = \"{url}\"\n"),
        );
        assert_eq!(Config::from_toml_str(&text, no_env()).is_ok(), ok, "{url}");
    }
}

#[test]
fn a_policy_with_a_role_on_the_connection_is_fine_without_a_default_role() {
    let fx = Fixture::new();
    let text = fx
        .good()
        .replace("role_arn = \"arn:aws:iam::123456789012:role/aep\"\n", "")
        .replace(
            "sandbox = \"prod\"",
            "sandbox = \"prod\"\nrole_arn = \"arn:aws:iam::123456789012:role/x\"\nsession_policy = '{\"Version\":\"2012-10-17\",\"Statement\":[]}'",
        );
    let config = Config::from_toml_str(&text, no_env()).unwrap();
    assert!(config.aws.role_arn.is_none());
    assert!(config.connections[0].session_policy.is_some());
}

#[test]
fn role_arns_are_checked_part_by_part() {
    for good in [
        "arn:aws:iam::123456789012:role/aep",
        "arn:aws:iam::123456789012:role/service-role/aep+=,.@_-",
        "arn:aws-us-gov:iam::123456789012:role/a",
    ] {
        assert_eq!(RoleArn::parse(good).unwrap().as_str(), good);
    }
    for (bad, why) in [
        ("", "six parts"),
        ("aep", "six parts"),
        ("arx:aws:iam::123456789012:role/a", "arn:"),
        ("arn:aws-mars:iam::123456789012:role/a", "partition"),
        ("arn:aws:sts::123456789012:role/a", "service"),
        ("arn:aws:iam:us-east-1:123456789012:role/a", "region"),
        ("arn:aws:iam::12345678901a:role/a", "12 digits"),
        ("arn:aws:iam::aws:role/a", "12 digits"),
        ("arn:aws:iam::123456789012:user/a", "role/"),
        ("arn:aws:iam::123456789012:role/", "1 to 64"),
        ("arn:aws:iam::123456789012:role/a/", "1 to 64"),
        ("arn:aws:iam::123456789012:role/a b", "letters"),
        ("arn:aws:iam::123456789012:role//a", "path"),
    ] {
        let error = RoleArn::parse(bad).unwrap_err();
        assert!(error.starts_with("not an IAM role ARN"), "{bad}: {error}");
        assert!(error.contains(why), "{bad}: {error}");
    }
    let long = format!("arn:aws:iam::123456789012:role/{}", "a".repeat(65));
    assert!(RoleArn::parse(&long).is_err());
}

#[test]
fn debug_output_redacts_the_secret() {
    let fx = Fixture::new();
    let config = Config::from_toml_str(&fx.good(), no_env()).unwrap();
    let shown = format!("{config:?}");
    assert!(!shown.contains(FILE_SECRET), "{shown}");
    assert!(shown.contains("client_secret"), "{shown}");
    assert!(shown.contains("cid"), "the rest is still shown: {shown}");
    let pretty = format!("{:#?}", config.adobe);
    assert!(!pretty.contains(FILE_SECRET), "{pretty}");
}

#[test]
fn load_reads_a_file_and_reports_a_missing_one() {
    let fx = Fixture::new();
    let path = fx.dir.path().join("config.toml");
    std::fs::write(&path, fx.good()).unwrap();
    let config = Config::load_with_env(&path, no_env()).unwrap();
    assert_eq!(config.connections.len(), 2);

    let missing = fx.dir.path().join("absent.toml");
    let error = Config::load_with_env(&missing, no_env()).unwrap_err();
    assert_eq!(error.issues.len(), 1);
    assert_eq!(error.issues[0].path, missing.display().to_string());
    assert!(
        error.issues[0].message.contains("AEP_S3_ROTATOR_CONFIG"),
        "{error}"
    );

    std::fs::write(&path, "[adobe\n").unwrap();
    let error = Config::load_with_env(&path, no_env()).unwrap_err();
    assert_eq!(error.issues[0].path, path.display().to_string());
    assert!(
        error.issues[0].message.contains("not valid TOML at line 1"),
        "{error}"
    );
}

#[cfg(unix)]
#[test]
fn an_inline_secret_in_a_readable_file_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    let path = fx.dir.path().join("config.toml");
    let text = fx.good().replace(
        &format!("client_secret_file = \"{}\"", fx.path("secret")),
        &format!("client_secret = \"{INLINE_SECRET}\""),
    );
    std::fs::write(&path, &text).unwrap();

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = Config::load_with_env(&path, no_env()).unwrap();
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    assert!(config.warnings[0].contains("readable by group/others"));
    assert!(config.warnings[0].contains(&path.display().to_string()));
    assert!(!config.warnings[0].contains(INLINE_SECRET));

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = Config::load_with_env(&path, no_env()).unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);

    // A secret file instead: no warning whatever the mode.
    std::fs::write(&path, fx.good()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = Config::load_with_env(&path, no_env()).unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn defaults_pass_their_own_validation() {
    // The default URLs go through the same checks as configured ones.
    assert!(Url::parse(DEFAULT_IMS_URL).is_ok_and(|u| u.scheme() == "https"));
    assert!(Url::parse(DEFAULT_PLATFORM_URL).is_ok_and(|u| u.scheme() == "https"));
    assert!(DEFAULT_REFRESH_BEFORE + DEFAULT_JITTER < DEFAULT_SESSION_DURATION);
    assert!(DEFAULT_RETRY_MIN <= DEFAULT_RETRY_MAX);
}

/// The good config's `[adobe]`, `[aws]` and `[rotation]` with only rules.
fn rules_only(fx: &Fixture, rules: &str) -> String {
    let good = fx.good();
    let head = good.split("[[connections]]").next().unwrap().to_owned();
    format!("{head}{rules}")
}

#[test]
fn discover_rules_load_without_any_connection() {
    let fx = Fixture::new();
    let text = rules_only(
        &fx,
        r#"
[[discover]]
sandboxes = ["prod", "dev"]
name = "ingest-*"
description_tag = "rotate:aep-s3"
role_arn = "arn:aws:iam::123456789012:role/other"
every = "2s"

[[discover]]
sandboxes = ["prod"]
description_tag = "rotate:aep-s3"
"#,
    );
    let config = Config::from_toml_str(&text, no_env()).unwrap();
    assert!(config.connections.is_empty());
    assert_eq!(config.discover.len(), 2);
    let rule = &config.discover[0];
    assert_eq!(rule.sandboxes, ["prod", "dev"]);
    assert!(rule.name.as_ref().unwrap().is_match("ingest-sales"));
    assert!(!rule.name.as_ref().unwrap().is_match("egress-sales"));
    assert_eq!(rule.every, Duration::from_secs(2));
    assert_eq!(config.discover[1].every, Duration::from_secs(300));
    assert_eq!(config.discover[1].index, 1);
    let found = rule.connection("c-9", "dev", Some("ingest-x"));
    assert_eq!(found.origin, Origin::Rule(0));
    assert_eq!(found.origin.to_string(), "discover[0]");
    assert_eq!(Origin::Explicit.to_string(), "explicit");
    assert_eq!(
        found.role_arn.unwrap().as_str(),
        "arn:aws:iam::123456789012:role/other"
    );
}

#[test]
fn bad_discover_rules_name_their_keys() {
    let fx = Fixture::new();
    let cases: &[(&str, &str, &str)] = &[
        (
            "sandboxes = [\"prod\"]\n",
            "discover[0]",
            "no condition besides the sandboxes",
        ),
        (
            "name = \"x-*\"\n",
            "discover[0].sandboxes",
            "missing or empty",
        ),
        (
            "sandboxes = []\nname = \"x\"\n",
            "discover[0].sandboxes",
            "missing or empty",
        ),
        (
            "sandboxes = [\"Prod\"]\nname = \"x\"\n",
            "discover[0].sandboxes[0]",
            "lower-case",
        ),
        (
            "sandboxes = [\"a\", \"a\"]\nname = \"x\"\n",
            "discover[0].sandboxes[1]",
            "twice",
        ),
        (
            "sandboxes = [\"a\"]\nname = \"in[gest\"\n",
            "discover[0].name",
            "not a valid glob",
        ),
        (
            "sandboxes = [\"a\"]\nname = \"\"\n",
            "discover[0].name",
            "is empty",
        ),
        (
            "sandboxes = [\"a\"]\ndescription_tag = \"t\"\nevery = \"500ms\"\n",
            "discover[0].every",
            "out of range",
        ),
        (
            "sandboxes = [\"a\"]\ndescription_tag = \"t\"\nevery = \"2d\"\n",
            "discover[0].every",
            "out of range",
        ),
        (
            "sandboxes = [\"a\"]\ndescription_tag = \"t\"\nrole_arn = \"nope\"\n",
            "discover[0].role_arn",
            "not an IAM role ARN",
        ),
        (
            "sandboxes = [\"a\"]\ndescription_tag = \"t\"\nsession_policy = \"{\"\n",
            "discover[0].session_policy",
            "not valid JSON",
        ),
        (
            "sandboxes = [\"a\"]\ndescription_tag = \"t\"\ncolour = \"red\"\n",
            "discover[0].colour",
            "unknown key",
        ),
    ];
    for (body, key, needle) in cases {
        let text = rules_only(&fx, &format!("[[discover]]\n{body}"));
        let found = issues(&text, no_env());
        assert!(
            found
                .iter()
                .any(|i| i.path == *key && i.message.contains(needle)),
            "{body:?}: expected {key}: ...{needle}..., got {found:?}"
        );
    }
    // Neither connections nor rules: still an error, naming both ways out.
    let none = rules_only(&fx, "");
    let found = issues(&none, no_env());
    assert!(
        found
            .iter()
            .any(|i| i.path == "connections" && i.message.contains("[[discover]]")),
        "{found:?}"
    );
}

#[test]
fn a_world_readable_secret_file_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    let secret = fx.path("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = Config::from_toml_str(&fx.good(), no_env()).unwrap();
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    assert!(config.warnings[0].contains("adobe.client_secret_file"));
    assert!(config.warnings[0].contains("readable by group/others"));
    assert!(!config.warnings[0].contains(FILE_SECRET));
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = Config::from_toml_str(&fx.good(), no_env()).unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn a_fifo_as_the_config_file_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("config.toml");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // Before the type check this open blocked until a writer came.
    let error = Config::load_with_env(&fifo, no_env()).unwrap_err();
    assert_eq!(error.issues.len(), 1, "{error:?}");
    assert!(error.to_string().contains("FIFO"), "{error}");
}

/// The environment is laid over the file as strings, key by key; a path
/// through a value makes a table there, and a path with an empty segment
/// is an issue naming the variable.
#[test]
fn the_environment_is_laid_over_the_file_key_by_key() {
    let mut document = toml::de::DeTable::parse(
        "[rotation]\nconcurrency = 4\nverify = true\n[adobe]\nclient_id = \"x\"\n",
    )
    .unwrap();
    let table = document.get_mut();
    layer(table, "AEP_S3_ROTATOR__ROTATION__CONCURRENCY", "8".into()).unwrap();
    layer(table, "AEP_S3_ROTATOR__ADOBE__CLIENT_ID__X", "y".into()).unwrap();
    layer(table, "AEP_S3_ROTATOR__STATE__PATH", "/s".into()).unwrap();
    let laid = toml::Table::deserialize(toml::de::Deserializer::from(document.clone())).unwrap();
    assert_eq!(
        laid.to_string(),
        "[adobe.client_id]\nx = \"y\"\n\n[rotation]\nconcurrency = \"8\"\nverify = true\n\n[state]\npath = \"/s\"\n"
    );
    for name in [
        "AEP_S3_ROTATOR____X",
        "AEP_S3_ROTATOR__ROTATION__",
        "AEP_S3_ROTATOR__A____B",
    ] {
        let issue = layer(document.get_mut(), name, "v".into()).unwrap_err();
        assert!(issue.message.contains(name), "{issue:?}");
    }
}

#[test]
fn connections_and_rules_check_their_sts_identity_alike() {
    let fx = Fixture::new();
    // No role anywhere: GetSessionToken, which takes no policy and ignores
    // external_id; a connection and a rule are told the same.
    let text = fx
        .good()
        .replace("role_arn = \"arn:aws:iam::123456789012:role/aep\"\n", "")
        .replace(
            "sandbox = \"dev\"",
            "sandbox = \"dev\"\nexternal_id = \"ext-1\"\nsession_policy = \"{}\"",
        )
        + "\n[[discover]]\nsandboxes = [\"prod\"]\nname = \"x-*\"\nexternal_id = \"ext-2\"\nsession_policy = \"{}\"\n";
    let found = issues(&text, no_env());
    let mut paths: Vec<&str> = found.iter().map(|i| i.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "connections[1].session_policy",
            "discover[0].session_policy"
        ],
        "{found:?}"
    );
    let warned = Config::from_toml_str(&text.replace("session_policy = \"{}\"", ""), Vec::new())
        .unwrap()
        .warnings;
    assert!(
        warned
            .iter()
            .any(|w| w.starts_with("connections[1].external_id and session_name are ignored"))
            && warned
                .iter()
                .any(|w| w.starts_with("discover[0].external_id and session_name are ignored")),
        "{warned:?}"
    );
}

#[test]
fn the_health_check_is_off_by_default_and_a_duration_when_on() {
    let fx = Fixture::new();
    let off = Config::from_toml_str(&fx.good(), no_env()).unwrap();
    assert_eq!(off.rotation.health_check_every, None);
    let on = replace(
        &fx.good(),
        "refresh_before = \"20m\"",
        "refresh_before = \"20m\"\nhealth_check_every = \"5m\"",
    );
    let on = Config::from_toml_str(&on, no_env()).unwrap();
    assert_eq!(
        on.rotation.health_check_every,
        Some(Duration::from_secs(300))
    );
    // From the environment, as every duration key.
    let from_env = Config::from_toml_str(
        &fx.good(),
        env(&[("AEP_S3_ROTATOR__ROTATION__HEALTH_CHECK_EVERY", "90s")]),
    )
    .unwrap();
    assert_eq!(
        from_env.rotation.health_check_every,
        Some(Duration::from_secs(90))
    );
    for (value, needle) in [
        ("\"0s\"", "at least 1s"),
        ("\"500ms\"", "at least 1s"),
        ("\"25h\"", "at most 24h"),
        ("\"often\"", "not a duration"),
        ("300", "not a duration"),
    ] {
        let text = replace(
            &fx.good(),
            "refresh_before = \"20m\"",
            &format!("refresh_before = \"20m\"\nhealth_check_every = {value}"),
        );
        let issues = issues(&text, no_env());
        assert_eq!(issues.len(), 1, "{value}: {issues:?}");
        assert_eq!(issues[0].path, "rotation.health_check_every");
        assert!(issues[0].message.contains(needle), "{value}: {issues:?}");
    }
}
