//! `config/example.toml` stays valid and says what it is documented to say.

// Helpers outside #[test] functions may unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use aep_s3_rotator::config::{Config, DEFAULT_IMS_URL, DEFAULT_PLATFORM_URL, DEFAULT_SCOPES};
use secrecy::ExposeSecret;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");

/// Loads the example with its `client_secret_file` (a systemd credential path
/// that does not exist here) replaced through the environment, the way an
/// operator would override it.
fn load_example() -> (Config, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("adobe-client-secret");
    std::fs::write(&secret, "example-client-secret\n").unwrap();
    // 0600, as the example's comments ask (a readable one is warned about).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let config = Config::load_with_env(
        Path::new(EXAMPLE),
        [(
            "AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET_FILE".to_owned(),
            secret.display().to_string(),
        )],
    )
    .unwrap_or_else(|error| panic!("config/example.toml is invalid:\n{error}"));
    (config, dir)
}

#[test]
fn the_example_is_valid_and_says_what_it_documents() {
    let (config, _dir) = load_example();
    assert_eq!(
        config.adobe.client_secret.expose_secret(),
        "example-client-secret"
    );
    assert!(config.adobe.org_id.ends_with("@AdobeOrg"));
    assert_eq!(config.adobe.scopes, DEFAULT_SCOPES);
    assert_eq!(
        config.adobe.ims_url.as_str().trim_end_matches('/'),
        DEFAULT_IMS_URL
    );
    assert_eq!(
        config.adobe.platform_url.as_str().trim_end_matches('/'),
        DEFAULT_PLATFORM_URL
    );

    assert_eq!(config.aws.region.as_deref(), Some("us-east-1"));
    assert_eq!(config.aws.sts_endpoint, None);
    assert_eq!(
        config.aws.role_arn.as_ref().map(|r| r.as_str()),
        Some("arn:aws:iam::123456789012:role/aep-s3-ingest")
    );
    assert_eq!(config.aws.session_name, "aep-s3-rotator");

    let r = &config.rotation;
    assert_eq!(r.session_duration, Duration::from_secs(3600));
    assert_eq!(r.refresh_before, Duration::from_secs(20 * 60));
    assert_eq!(r.jitter, Duration::from_secs(60));
    assert_eq!(r.concurrency.get(), 8);
    assert_eq!(r.max_requests_per_second, None);
    assert_eq!(
        (r.retry_min, r.retry_max),
        (Duration::from_secs(1), Duration::from_secs(120))
    );
    assert!(!r.verify);
    assert!(
        r.prepush_check,
        "the example keeps the pre-push S3 check on"
    );
    assert_eq!(r.request_timeout, Duration::from_secs(30));
    assert_eq!(r.shutdown_grace, Duration::from_secs(10));

    let names: Vec<(&str, &str)> = config
        .connections
        .iter()
        .map(|c| (c.name.as_str(), c.sandbox.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("sales-bucket", "prod"),
            ("clickstream-bucket", "prod"),
            ("sales-bucket-dev", "dev")
        ]
    );
    let clickstream = &config.connections[1];
    assert_eq!(
        clickstream.role_arn.as_ref().map(|r| r.as_str()),
        Some("arn:aws:iam::210987654321:role/aep-clickstream-read")
    );
    assert_eq!(clickstream.external_id.as_deref(), Some("aep-clickstream"));
    let policy: serde_json::Value =
        serde_json::from_str(clickstream.session_policy.as_deref().unwrap()).unwrap();
    assert_eq!(policy["Version"], "2012-10-17");
    assert_eq!(
        config.connections[2].policy_arns,
        ["arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"]
    );

    assert_eq!(config.discover.len(), 1);
    let rule = &config.discover[0];
    assert_eq!(rule.sandboxes, ["prod", "dev"]);
    assert_eq!(rule.description_tag.as_deref(), Some("rotate:aep-s3"));
    assert_eq!(rule.every, Duration::from_secs(5 * 60));

    assert_eq!(config.admin.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(config.state.path, None);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn the_example_as_shipped_only_lacks_its_secret_file() {
    // Without the override, the one problem is the credential file that only
    // exists under systemd.
    let error = Config::load_with_env(Path::new(EXAMPLE), Vec::new()).unwrap_err();
    let paths: Vec<&str> = error.issues.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(paths, ["adobe.client_secret_file"], "{error}");
}

#[test]
fn every_commented_default_in_the_example_is_valid() {
    // Uncomment every `# key = value` line (not the prose): the result must
    // still load, so the documented defaults are real values. Only
    // `client_secret` is left out, as it is the documented alternative.
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let mut uncommented = 0;
    let opened: String = text
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(key, _)| {
                    key.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                        && key != "client_secret"
                }) =>
            {
                uncommented += 1;
                format!("{rest}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect();
    assert_eq!(uncommented, 22, "commented defaults found in the example");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s\n").unwrap();
    let config = Config::from_toml_str(
        &opened,
        [(
            "AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET_FILE".to_owned(),
            secret.display().to_string(),
        )],
    )
    .unwrap_or_else(|error| panic!("uncommented example is invalid:\n{error}\n{opened}"));
    assert_eq!(
        config.rotation.max_requests_per_second.map(|n| n.get()),
        Some(10)
    );
    assert_eq!(config.aws.external_id.as_deref(), Some("aep-ingest"));
    assert_eq!(
        config.state.path.as_deref(),
        Some(Path::new("/var/lib/aep-s3-rotator/state.json"))
    );
}

#[test]
fn the_commented_coordination_block_in_the_example_is_valid() {
    // Removing the leading "#" of the [coordination] block, as its comment
    // says, gives a valid config with the documented defaults.
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let start = text
        .find("#[coordination]")
        .expect("the block is in the example");
    let (head, block) = text.split_at(start);
    let opened: String = block
        .lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if !rest.starts_with(' ') => format!("{rest}\n"),
            _ => format!("{line}\n"),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s\n").unwrap();
    let config = Config::from_toml_str(
        &format!("{head}{opened}"),
        [(
            "AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET_FILE".to_owned(),
            secret.display().to_string(),
        )],
    )
    .unwrap_or_else(|error| panic!("uncommented [coordination] is invalid:\n{error}\n{opened}"));
    let c = config.coordination.expect("coordination on");
    assert_eq!(c.table, "aep-s3-rotator");
    assert_eq!(c.lease, Duration::from_secs(15));
    assert_eq!(c.renew_every, Duration::from_secs(5));
    assert_eq!(c.holder.as_deref(), Some("rotator-a"));
    assert_eq!(
        c.endpoint.map(|u| u.to_string()),
        Some("https://dynamodb.us-east-1.amazonaws.com/".to_owned())
    );
    // As shipped, the block is off.
    let (shipped, _dir) = load_example();
    assert!(shipped.coordination.is_none());
}
