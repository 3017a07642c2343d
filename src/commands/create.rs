//! `create`: the first half of the S3 tutorial the daemon grew from. Makes a
//! new S3 base connection (`POST /connections`, auth spec `Access Key`)
//! holding temporary credentials minted exactly as a rotation would mint them
//! (same role, external id, session name and policies), so the daemon can
//! rotate it from then on.
//!
//! Flags are validated like the config (exit 78 naming the flag); a refusal
//! by STS, S3 (the pre-push check), IMS or Flow Service exits 1 with the
//! remote's detail, scrubbed. Nothing secret reaches stdout or the logs: only
//! the access key id (not secret; it joins CloudTrail) is printed.

use std::sync::Arc;

use serde_json::Value;
use url::Url;

use crate::cli::CreateArgs;
use crate::config::{Config, ConnectionConfig, Origin, RoleArn};
use crate::exit::Exit;
use crate::observe::telemetry::Telemetry;
use crate::remote::flow::{
    ACCESS_KEY_AUTH_SPEC, ListedConnection, NewConnection, S3_CONNECTION_SPEC_ID, create_body,
};
use crate::remote::s3probe::S3Target;
use crate::remote::sts::{AwsCredentials, SourceIdentity, StsRequest};
use crate::scheduler::{Mode, Options, build_rotator};

/// What replaces a secret in the `--dry-run` request.
const REDACTED: &str = "[redacted]";

/// A flag that failed validation: which one, and why (with what to do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagError {
    /// `--bucket`, `--service-url`, ...
    pub flag: &'static str,
    /// The problem and the fix.
    pub message: String,
}

/// The checked flags of `create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePlan {
    /// `x-sandbox-name`.
    pub sandbox: String,
    /// The request's non-secret part.
    pub new: NewConnection,
    /// `--role-arn`, if given (else the config's).
    pub role_arn: Option<RoleArn>,
}

/// Why `bucket` breaks Adobe's bucket name rules: 3–63 characters,
/// lower-case letters, digits and hyphens, starting and ending with a letter
/// or digit, not an IP address. `None` when it is fine.
pub fn bucket_problem(bucket: &str) -> Option<String> {
    if bucket.parse::<std::net::Ipv4Addr>().is_ok() {
        return Some("must not be an IP address".to_owned());
    }
    if !(3..=63).contains(&bucket.chars().count()) {
        return Some(format!(
            "must be 3 to 63 characters long (it has {})",
            bucket.chars().count()
        ));
    }
    if let Some(c) = bucket
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!(
            "may contain only lower-case letters, digits and hyphens, not {c:?}"
        ));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !alnum(bucket.chars().next()) || !alnum(bucket.chars().last()) {
        return Some("must start and end with a letter or digit".to_owned());
    }
    None
}

/// Checks every flag; all problems are reported, each naming its flag.
pub fn plan(args: &CreateArgs) -> Result<CreatePlan, Vec<FlagError>> {
    let mut problems = Vec::new();
    let mut fail = |flag: &'static str, message: String| {
        problems.push(FlagError { flag, message });
    };
    let sandbox = args.sandbox.trim();
    if sandbox.is_empty() {
        fail(
            "--sandbox",
            "is empty; give the sandbox to create the connection in, e.g. --sandbox prod"
                .to_owned(),
        );
    } else if sandbox.chars().any(char::is_uppercase) {
        fail(
            "--sandbox",
            format!(
                "sandbox names are lower-case in AEP; write --sandbox {}",
                sandbox.to_lowercase()
            ),
        );
    } else if sandbox.chars().any(|c| c.is_control() || c.is_whitespace()) {
        fail(
            "--sandbox",
            format!("{sandbox:?} cannot be sent as a header; give the sandbox name only"),
        );
    }
    let name = args.name.trim();
    if name.is_empty() {
        fail(
            "--name",
            "is empty; give the connection a name, e.g. --name sales-bucket".to_owned(),
        );
    } else if name.chars().any(char::is_control) {
        fail("--name", "must not contain control characters".to_owned());
    }
    let bucket = args.bucket.trim();
    if let Some(why) = bucket_problem(bucket) {
        fail(
            "--bucket",
            format!("{bucket:?} is not a valid bucket name: it {why}"),
        );
    }
    let folder = args
        .folder
        .as_deref()
        .map(str::trim)
        .filter(|f| !f.is_empty());
    if folder.is_some_and(|f| f.chars().any(char::is_control)) {
        fail("--folder", "must not contain control characters".to_owned());
    }
    let service_url = match args.service_url.as_deref().map(str::trim) {
        None => None,
        Some(text) => match service_url_problem(text) {
            None => Some(text.to_owned()),
            Some(why) => {
                fail("--service-url", why);
                None
            }
        },
    };
    let description = args.description.as_deref().filter(|d| !d.is_empty());
    if description.is_some_and(|d| d.chars().any(|c| c.is_control() && c != '\n')) {
        fail(
            "--description",
            "must not contain control characters".to_owned(),
        );
    }
    let role_arn = match args.role_arn.as_deref().map(str::trim) {
        None => None,
        Some(text) => match RoleArn::parse(text) {
            Ok(arn) => Some(arn),
            Err(why) => {
                fail("--role-arn", why);
                None
            }
        },
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(CreatePlan {
        sandbox: sandbox.to_owned(),
        new: NewConnection {
            name: name.to_owned(),
            description: description.map(str::to_owned),
            bucket: bucket.to_owned(),
            folder: folder.map(str::to_owned),
            service_url,
        },
        role_arn,
    })
}

/// Why `text` cannot be a `serviceUrl`: an https URL (plain http only to a
/// loopback host, as the config allows for tests), with a host, no user
/// name or password, no query or fragment.
fn service_url_problem(text: &str) -> Option<String> {
    let url = match Url::parse(text) {
        Ok(url) => url,
        Err(error) => {
            return Some(format!(
                "{text:?} is not a URL ({error}); write e.g. https://s3.eu-west-1.amazonaws.com"
            ));
        }
    };
    match url.scheme() {
        "https" => {}
        "http" if crate::config::is_loopback(&url) => {}
        "http" => {
            return Some("plain http is only allowed to loopback hosts; use https".to_owned());
        }
        other => return Some(format!("the scheme {other:?} is not supported; use https")),
    }
    if url.host().is_none() {
        return Some("has no host; write e.g. https://s3.eu-west-1.amazonaws.com".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Some("must not contain a user name or password; remove them".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Some("must not have a query or fragment; give the endpoint only".to_owned());
    }
    None
}

/// The entry the new connection would have in `[[connections]]`, so the
/// STS request is exactly the one a rotation of it would make.
fn synthetic_connection(plan: &CreatePlan) -> ConnectionConfig {
    ConnectionConfig {
        // Not known before the connection exists: `{id}` in session tags
        // expands to this word (a tag value may not hold parentheses).
        id: "new".to_owned(),
        sandbox: plan.sandbox.clone(),
        name: plan.new.name.clone(),
        role_arn: plan.role_arn.clone(),
        external_id: None,
        session_name: None,
        session_policy: None,
        policy_arns: Vec::new(),
        attribution: crate::config::Attribution::default(),
        origin: Origin::Explicit,
    }
}

/// The request body with the secret key and session token replaced by
/// `[redacted]` (the access key id stays: it is not secret).
pub fn redacted_body(new: &NewConnection, credentials: &AwsCredentials) -> Value {
    let mut body = create_body(new, credentials);
    for key in ["s3SecretKey", "s3SessionToken"] {
        if let Some(value) = body.pointer_mut(&format!("/auth/params/{key}")) {
            *value = Value::String(REDACTED.to_owned());
        }
    }
    body
}

/// A TOML basic string (JSON's escaping is a subset TOML reads).
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// What to print after the connection was created: the `[[discover]]` rules
/// that will pick it up, or the `[[connections]]` block to paste.
pub fn next_steps(config: &Config, plan: &CreatePlan, id: &str, etag: &str) -> String {
    let listed = ListedConnection {
        id: id.to_owned(),
        etag: etag.to_owned(),
        name: Some(plan.new.name.clone()),
        description: plan.new.description.clone(),
        auth_spec: Some(ACCESS_KEY_AUTH_SPEC.to_owned()),
        state: Some("enabled".to_owned()),
        connection_spec_id: Some(S3_CONNECTION_SPEC_ID.to_owned()),
        s3: Some(crate::remote::s3probe::S3Target {
            bucket: plan.new.bucket.clone(),
            folder: plan.new.folder.clone(),
            service_url: plan.new.service_url.clone(),
        }),
    };
    let rules: Vec<_> = config
        .discover
        .iter()
        .filter(|rule| crate::discovery::matches(rule, &plan.sandbox, &listed))
        .collect();
    let mut out = String::new();
    if let Some(rule) = rules.first() {
        out.push_str(&format!(
            "discover[{}] will pick it up at its next listing of sandbox {:?} (every {}); nothing to add to the config\n",
            rule.index,
            plan.sandbox,
            humantime::format_duration(rule.every)
        ));
        let rule_role = rule.role_arn.as_ref().or(config.aws.role_arn.as_ref());
        if let Some(role) = &plan.role_arn
            && Some(role) != rule_role
        {
            out.push_str(&format!(
                "note: discover[{}] rotates it as {}, not as --role-arn {role}; list it under [[connections]] to keep this role\n",
                rule.index,
                rule_role.map_or_else(|| "GetSessionToken".to_owned(), ToString::to_string),
            ));
        }
        return out;
    }
    out.push_str("add this to the config, then reload the daemon (SIGHUP):\n\n");
    out.push_str(&format!(
        "[[connections]]\nid = {}\nsandbox = {}\nname = {}\n",
        toml_string(id),
        toml_string(&plan.sandbox),
        toml_string(&plan.new.name)
    ));
    if let Some(role) = &plan.role_arn
        && Some(role) != config.aws.role_arn.as_ref()
    {
        out.push_str(&format!("role_arn = {}\n", toml_string(role.as_str())));
    }
    out
}

/// `create`.
pub async fn run(config: &Config, args: &CreateArgs) -> Exit {
    let plan = match plan(args) {
        Ok(plan) => plan,
        Err(problems) => {
            for problem in &problems {
                tracing::error!(flag = problem.flag, "{} {}", problem.flag, problem.message);
            }
            return Exit::Config;
        }
    };
    let telemetry = Arc::new(Telemetry::new());
    let options = Options {
        mode: Mode::Once,
        dry_run: args.dry_run,
        only: Vec::new(),
        identity: SourceIdentity::DefaultChain,
        fence: None,
    };
    let rotator = match build_rotator(config, &options, &telemetry, None).await {
        Ok(rotator) => rotator,
        Err(error) => {
            tracing::error!("cannot set up the clients: {error:#}");
            return Exit::Failure;
        }
    };
    // STS, exactly as a rotation of the new connection would ask, through
    // the same cache: its answer is checked as a rotation's (never create
    // a connection holding credentials that are dead on arrival).
    let request = StsRequest::for_connection(config, &synthetic_connection(&plan));
    let credentials = match rotator
        .credentials
        .get(&request, None, rotator.refresh_before)
        .await
    {
        Ok(credentials) => credentials,
        Err(error) => {
            tracing::error!(
                role = %request.describe(),
                "STS refused the credentials for the new connection: {error}; nothing was created"
            );
            return Exit::Failure;
        }
    };
    tracing::info!(
        access_key_id = %credentials.access_key_id,
        role = %request.describe(),
        "credentials minted for the new connection"
    );
    // The pre-push check: a connection whose credentials cannot list the
    // bucket would fail every ingestion; refuse to create it.
    let target = S3Target {
        bucket: plan.new.bucket.clone(),
        folder: plan.new.folder.clone(),
        service_url: plan.new.service_url.clone(),
    };
    let checked = match &rotator.prepush {
        None => "not checked ([rotation] prepush_check = false)".to_owned(),
        Some(probe) => match probe.check(&target, &credentials).await {
            Ok(allowed) => format!(
                "{} {} allowed in {}",
                allowed.operation,
                target.describe(),
                allowed.region
            ),
            Err(error) => {
                tracing::error!(
                    bucket = %target.describe(),
                    role = %request.describe(),
                    "refusing to create a connection whose credentials cannot list its bucket: {error}"
                );
                return Exit::Failure;
            }
        },
    };
    if args.dry_run {
        let body = redacted_body(&plan.new, &credentials);
        let body = serde_json::to_string_pretty(&body).unwrap_or_else(|_| body.to_string());
        println!(
            "dry run: credentials {} were minted from STS ({}) and the S3 check ran ({checked}); nothing was sent to Flow Service.\n\
             POST {}data/foundation/flowservice/connections\nx-sandbox-name: {}\n\n{body}",
            credentials.access_key_id,
            request.describe(),
            with_slash(&config.adobe.platform_url),
            plan.sandbox,
        );
        return Exit::Ok;
    }
    let token = match rotator.ims.token().await {
        Ok(token) => token,
        Err(error) => {
            tracing::error!("IMS refused a token: {error}; nothing was created");
            return Exit::Failure;
        }
    };
    let created = match rotator
        .flow
        .create_connection(&plan.sandbox, &plan.new, &credentials, &token)
        .await
    {
        Ok(created) => created,
        Err(error) => {
            // A POST is not idempotent: after a lost answer the connection
            // may exist, and running `create` again would make a second one.
            let advice = match error {
                crate::remote::flow::FlowError::Unavailable(_)
                | crate::remote::flow::FlowError::Malformed(_) => {
                    format!(
                        "; the connection may have been created all the same: look for {:?} in sandbox {:?} before running create again",
                        plan.new.name, plan.sandbox
                    )
                }
                _ => String::new(),
            };
            // The error's detail is scrubbed of the secret key and token.
            tracing::error!(
                sandbox = %plan.sandbox,
                "Flow Service did not create the connection: {error}{advice}"
            );
            return Exit::Failure;
        }
    };
    tracing::info!(
        connection = %created.id,
        sandbox = %plan.sandbox,
        access_key_id = %credentials.access_key_id,
        "connection created"
    );
    let expires = crate::clock::rfc3339(credentials.expiration);
    print!(
        "created S3 base connection {:?} in sandbox {:?}\nid: {}\netag: {}\ncredentials: {} (expire {expires}); S3 check: {checked}\n\n{}",
        plan.new.name,
        plan.sandbox,
        created.id,
        created
            .etag
            .as_deref()
            .unwrap_or("(none in the answer; the daemon reads it with GET)"),
        credentials.access_key_id,
        next_steps(
            config,
            &plan,
            &created.id,
            created.etag.as_deref().unwrap_or("")
        )
    );
    Exit::Ok
}

fn with_slash(url: &Url) -> String {
    let text = url.as_str();
    if text.ends_with('/') {
        text.to_owned()
    } else {
        format!("{text}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> CreateArgs {
        CreateArgs {
            sandbox: "prod".into(),
            name: "sales".into(),
            bucket: "my-bucket".into(),
            folder: None,
            service_url: None,
            description: None,
            role_arn: None,
            dry_run: false,
        }
    }

    #[test]
    fn bucket_names_follow_adobes_rules() {
        for good in ["abc", "my-bucket-1", "0bucket9", &"a".repeat(63)] {
            assert_eq!(bucket_problem(good), None, "{good}");
        }
        for (bad, why) in [
            ("ab", "3 to 63"),
            (&"a".repeat(64) as &str, "3 to 63"),
            ("My-bucket", "lower-case"),
            ("my_bucket", "lower-case"),
            ("my.bucket", "lower-case"),
            ("-bucket", "start and end"),
            ("bucket-", "start and end"),
            ("192.168.1.10", "IP address"),
            ("", "3 to 63"),
        ] {
            let problem = bucket_problem(bad).unwrap_or_default();
            assert!(problem.contains(why), "{bad}: {problem}");
        }
    }

    #[test]
    fn each_bad_flag_is_named() {
        type Edit = Box<dyn Fn(&mut CreateArgs)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("--sandbox", Box::new(|a| a.sandbox = "Prod".into())),
            ("--sandbox", Box::new(|a| a.sandbox = " ".into())),
            ("--name", Box::new(|a| a.name = "".into())),
            ("--bucket", Box::new(|a| a.bucket = "Bad_Bucket".into())),
            (
                "--service-url",
                Box::new(|a| a.service_url = Some("http://s3.example.com".into())),
            ),
            (
                "--service-url",
                Box::new(|a| a.service_url = Some("not a url".into())),
            ),
            (
                "--service-url",
                Box::new(|a| a.service_url = Some("https://u:p@s3.example.com".into())),
            ),
            (
                "--role-arn",
                Box::new(|a| a.role_arn = Some("arn:aws:s3:::bucket".into())),
            ),
            ("--folder", Box::new(|a| a.folder = Some("in\u{0}x".into()))),
        ];
        for (flag, edit) in cases {
            let mut a = args();
            edit(&mut a);
            let problems = plan(&a).unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].flag, flag, "{problems:?}");
        }
        let mut a = args();
        a.service_url = Some("http://127.0.0.1:9000".into());
        a.role_arn = Some("arn:aws:iam::123456789012:role/x".into());
        a.folder = Some("  ".into());
        let plan = plan(&a).unwrap();
        assert_eq!(plan.new.folder, None);
        assert_eq!(
            plan.new.service_url.as_deref(),
            Some("http://127.0.0.1:9000")
        );
    }

    #[test]
    fn dry_run_body_has_no_secret() {
        let credentials = AwsCredentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "the-secret-key-value".to_owned().into(),
            session_token: "the-session-token-value".to_owned().into(),
            expiration: std::time::SystemTime::UNIX_EPOCH,
        };
        let plan = plan(&args()).unwrap();
        let text = redacted_body(&plan.new, &credentials).to_string();
        assert!(!text.contains("the-secret-key-value"), "{text}");
        assert!(!text.contains("the-session-token-value"), "{text}");
        assert!(
            text.contains("ASIAEXAMPLE") && text.contains(REDACTED),
            "{text}"
        );
    }
}
