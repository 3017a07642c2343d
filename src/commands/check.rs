//! `check`: validate the config and every remote dependency without
//! changing anything; one line per check on stdout.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::once::plural;
use crate::config::Config;
use crate::exit::Exit;
use crate::observe::telemetry::Telemetry;
use crate::remote::sts::{CredentialSource, SourceIdentity, StsError, StsRequest};
use crate::scheduler::{Mode, Options, build_rotator};

/// `check`: one line per check on stdout, nothing changed anywhere.
pub(crate) async fn check(config: Config, path: &Path) -> Exit {
    let mut lines = CheckReport::default();
    let sandboxes: BTreeSet<&str> = config
        .connections
        .iter()
        .map(|c| c.sandbox.as_str())
        .collect();
    lines.ok(
        "config",
        &format!(
            "{}: {} in {}{}",
            path.display(),
            plural(config.connections.len(), "connection"),
            plural(sandboxes.len(), "sandbox"),
            match config.discover.len() {
                0 => String::new(),
                n => format!(", {}", plural(n, "discover rule")),
            }
        ),
    );
    for warning in &config.warnings {
        lines.warn("config", warning);
    }
    // The trust store every HTTPS check below depends on: its own line.
    match crate::remote::tls::roots() {
        // The built-in set works, but the operator should know it is in use.
        Ok(roots) if matches!(roots.source(), crate::remote::tls::CaSource::Builtin { .. }) => {
            lines.warn("ca", &roots.describe());
        }
        Ok(roots) => lines.ok("ca", &roots.describe()),
        Err(error) => {
            lines.fail("ca", &error.to_string());
            lines.summary();
            print!("{}", lines.text);
            return Exit::Config;
        }
    }
    // The coordination table: every call the daemon makes, proven allowed
    // without changing data (it needs no IMS token, so it comes first).
    match crate::coordination::table::check_line(&config).await {
        Some(Ok(summary)) => lines.ok("coordination", &summary),
        Some(Err(message)) => lines.fail("coordination", &message),
        None => {}
    }
    let telemetry = Arc::new(Telemetry::new());
    let options = Options {
        mode: Mode::Once,
        dry_run: true,
        only: Vec::new(),
        identity: SourceIdentity::DefaultChain,
        fence: None,
    };
    let rotator = match build_rotator(&config, &options, &telemetry, None).await {
        Ok(rotator) => Arc::new(rotator),
        Err(error) => {
            lines.fail("setup", &format!("{error:#}"));
            print!("{}", lines.text);
            return Exit::Failure;
        }
    };
    // IMS; skipped where the secret exists only inside the service.
    let deferred = config.adobe.client_secret_deferred;
    let token = if deferred {
        lines.skip(
            "ims",
            "the client secret is a systemd credential (see the warning above)",
        );
        None
    } else {
        match rotator.ims.token().await {
            Ok(token) => {
                lines.ok(
                    "ims",
                    &format!(
                        "token obtained from {} for client {}",
                        config.adobe.ims_url, config.adobe.client_id
                    ),
                );
                Some(token)
            }
            Err(error) => {
                lines.fail("ims", &error.to_string());
                None
            }
        }
    };
    // Flow Service, each connection; its S3 parameters for the pre-push check.
    let mut targets = std::collections::HashMap::new();
    for connection in &config.connections {
        let label = format!("{} ({})", connection.name, connection.sandbox);
        let Some(token) = &token else {
            lines.fail_or_skip(
                deferred,
                "connection",
                &format!("{label}: not checked, no IMS token"),
            );
            continue;
        };
        match rotator
            .flow
            .get_connection(&connection.id, &connection.sandbox, token)
            .await
        {
            Ok(remote) => {
                lines.ok(
                    "connection",
                    &format!("{label}: S3 access-key connection, etag {}", remote.etag),
                );
                targets.insert(connection.id.clone(), remote.s3);
            }
            Err(error) => lines.fail("connection", &format!("{label}: {error}")),
        }
    }
    // Discovery rules: what each one matches now, so a rule can be tried
    // before it is turned on. STS is then checked for the found ones too.
    let config = if config.discover.is_empty() {
        config
    } else if token.is_none() {
        lines.fail_or_skip(deferred, "discover", "rules not checked, no IMS token");
        config
    } else {
        let lister = crate::discovery::FlowLister::new(Arc::clone(&rotator));
        let membership = crate::discovery::resolve(&config, &lister, None, None).await;
        check_rules(&config, &membership, &mut lines);
        // The pre-push check below needs each found connection's bucket.
        if let Some(token) = &token {
            for found in membership.discovered() {
                match rotator
                    .flow
                    .get_connection(&found.id, &found.sandbox, token)
                    .await
                {
                    Ok(remote) => {
                        targets.insert(found.id.clone(), remote.s3);
                    }
                    Err(error) => lines.fail(
                        "connection",
                        &format!("{} ({}): {error}", found.name, found.sandbox),
                    ),
                }
            }
        }
        membership.apply_to(&config)
    };
    // STS, once per distinct request.
    let source = crate::remote::sts::AwsSts::new(
        &config.aws,
        &SourceIdentity::DefaultChain,
        config.rotation.request_timeout,
        telemetry.requests(),
    )
    .await;
    let mut issued = std::collections::HashMap::new();
    for connection in &config.connections {
        let request = StsRequest::for_connection(&config, connection);
        if issued.contains_key(&request) {
            continue;
        }
        let outcome = source.issue(&request).await;
        issued.insert(request.clone(), outcome.as_ref().ok().cloned());
        match outcome {
            Ok(credentials) => {
                let left = credentials.expiration.duration_since(crate::clock::wall_now()).unwrap_or_default();
                let operation = if request.role_arn.is_some() { "AssumeRole" } else { "GetSessionToken" };
                lines.ok(
                    "sts",
                    &format!(
                        "{}: {operation} gave {} valid for {}",
                        request.describe(),
                        credentials.access_key_id,
                        humantime::format_duration(Duration::from_secs(left.as_secs()))
                    ),
                );
                if left <= config.rotation.refresh_before {
                    lines.warn("sts", &format!("{}: credentials live shorter than refresh_before; lower refresh_before or raise the role's maximum session duration", request.describe()));
                }
            }
            Err(StsError::NoCredentials(reason)) => lines.fail(
                "sts",
                &format!("{}: no AWS credentials found by the default chain; give the daemon an identity (AWS_* env, profile, IRSA web identity, ECS or an instance role); last: {reason}", request.describe()),
            ),
            Err(error) => lines.fail("sts", &format!("{}: {error}", request.describe())),
        }
    }
    // The pre-push S3 check, as a rotation would run it, per connection.
    prepush_lines(&config, &rotator, &targets, &issued, &mut lines).await;
    lines.summary();
    print!("{}", lines.text);
    if lines.failed == 0 {
        Exit::Ok
    } else {
        Exit::Failure
    }
}

/// `check`: the pre-push S3 check of each connection with its fresh
/// credentials; one line each (`s3`).
async fn prepush_lines(
    config: &Config,
    rotator: &crate::rotation::Rotator,
    targets: &std::collections::HashMap<String, Option<crate::remote::s3probe::S3Target>>,
    issued: &std::collections::HashMap<StsRequest, Option<crate::remote::sts::AwsCredentials>>,
    lines: &mut CheckReport,
) {
    let Some(probe) = &rotator.prepush else {
        lines.warn(
            "s3",
            "[rotation] prepush_check = false: new credentials are pushed without checking they can list the bucket",
        );
        return;
    };
    for connection in &config.connections {
        let label = format!("{} ({})", connection.name, connection.sandbox);
        let request = StsRequest::for_connection(config, connection);
        let (Some(target), Some(Some(credentials))) =
            (targets.get(&connection.id), issued.get(&request))
        else {
            lines.fail_or_skip(
                config.adobe.client_secret_deferred,
                "s3",
                &format!("{label}: not checked (no connection or no credentials above)"),
            );
            continue;
        };
        let Some(target) = target else {
            lines.warn(
                "s3",
                &format!("{label}: the connection names no bucketName; nothing to check"),
            );
            continue;
        };
        match probe.check(target, credentials).await {
            Ok(allowed) => lines.ok(
                "s3",
                &format!(
                    "{label}: {} {} allowed for {} in {}",
                    allowed.operation,
                    target.describe(),
                    credentials.access_key_id,
                    allowed.region
                ),
            ),
            Err(error) => lines.fail(
                "s3",
                &format!("{label}: {error} (role {})", request.describe()),
            ),
        }
    }
}

/// `check`'s lines about `[[discover]]` rules: per rule what it matches now
/// (id, name, sandbox), then listing failures and conflicts.
fn check_rules(
    config: &Config,
    membership: &crate::discovery::Membership,
    lines: &mut CheckReport,
) {
    for (sandbox, error) in &membership.failures {
        lines.fail(
            "discover",
            &format!("listing sandbox {sandbox:?} failed: {error}"),
        );
    }
    for rule in &config.discover {
        let origin = crate::config::Origin::Rule(rule.index);
        let mut conditions = Vec::new();
        if let Some(glob) = &rule.name {
            conditions.push(format!("name {:?}", glob.as_str()));
        }
        if let Some(tag) = &rule.description_tag {
            conditions.push(format!("description_tag {tag:?}"));
        }
        let found: Vec<_> = membership
            .connections
            .iter()
            .filter(|c| c.origin == origin)
            .collect();
        lines.ok(
            "discover",
            &format!(
                "{origin} ({}; sandboxes {}): matches {} connections now",
                conditions.join(", "),
                rule.sandboxes.join(", "),
                found.len()
            ),
        );
        for c in found {
            lines.detail(&format!("{origin}: {} {:?} ({})", c.id, c.name, c.sandbox));
        }
    }
    for conflict in &membership.conflicts {
        let rules: Vec<String> = conflict
            .rules
            .iter()
            .map(|i| format!("discover[{i}]"))
            .collect();
        lines.fail(
            "discover",
            &format!(
                "{} {:?} ({}): matched by {} with different identities, so it is not rotated; make the rules agree or list it under [[connections]]",
                conflict.id,
                conflict.name.as_deref().unwrap_or(""),
                conflict.sandbox,
                rules.join(", ")
            ),
        );
    }
}

#[derive(Default)]
struct CheckReport {
    text: String,
    total: usize,
    failed: usize,
    skipped: usize,
}

impl CheckReport {
    fn line(&mut self, verdict: &str, what: &str, detail: &str) {
        self.text
            .push_str(&format!("{verdict:<5} {what:<10} {detail}\n"));
    }
    fn ok(&mut self, what: &str, detail: &str) {
        self.total += 1;
        self.line("ok", what, detail);
    }
    fn warn(&mut self, what: &str, detail: &str) {
        self.line("warn", what, detail);
    }
    /// An indented line under the previous one, not a check of its own.
    fn detail(&mut self, detail: &str) {
        self.line("", "", &format!("  {detail}"));
    }
    fn fail(&mut self, what: &str, detail: &str) {
        self.total += 1;
        self.failed += 1;
        self.line("FAIL", what, detail);
    }
    /// A check that could not run here for a reason already given (the
    /// client secret exists only inside the service): not a failure.
    fn skip(&mut self, what: &str, detail: &str) {
        self.skipped += 1;
        self.line("skip", what, detail);
    }
    fn fail_or_skip(&mut self, skip: bool, what: &str, detail: &str) {
        if skip {
            self.skip(what, detail);
        } else {
            self.fail(what, detail);
        }
    }
    /// `N checks, N failed[, N skipped]`.
    fn summary(&mut self) {
        let skipped = match self.skipped {
            0 => String::new(),
            n => format!(", {n} skipped"),
        };
        self.text.push_str(&format!(
            "{} checks, {} failed{skipped}\n",
            self.total, self.failed
        ));
    }
}
