//! `demo`: the real daemon (the same scheduler, clients and `aws-sdk-sts`)
//! against the embedded loopback simulator (`aep_s3_simulator`), with
//! credentials that live 30 s, one etag conflict and one throttled request,
//! and a summary table at exit. Needs no AWS or Adobe account.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::DemoArgs;
use crate::config::Config;
use crate::exit::Exit;
use crate::observe::notify::Notifier;
use crate::observe::telemetry::Telemetry;
use crate::remote::sts::SourceIdentity;
use crate::scheduler::{Daemon, Mode, Options, Parts, Report, build_rotator};
use aep_s3_simulator::{
    RetryAfter, ScriptedFault, SimConfig, SimConnection, SimService, SimStats, Simulator,
};

/// How long the simulator's STS credentials live: long enough to watch, short
/// enough to see several rotations a minute.
const CREDENTIAL_LIFETIME: Duration = Duration::from_secs(30);
const SANDBOXES: [&str; 2] = ["prod", "dev"];

/// Runs the demo; exits 0 when every connection was rotated and the
/// simulator saw no protocol violation.
pub async fn run(args: DemoArgs) -> Exit {
    let client_secret = format!("demo-secret-{}", uuid::Uuid::new_v4().simple());
    let mut sim_config = SimConfig::new(
        "aep-s3-rotator-demo",
        &client_secret,
        "DEMO0123456789ABCDEF0123@AdobeOrg",
    );
    sim_config.credential_lifetime = CREDENTIAL_LIFETIME;
    sim_config.connections = (0..args.connections)
        .map(|i| {
            let sandbox = SANDBOXES[usize::from(i) % SANDBOXES.len()];
            SimConnection::s3(
                uuid::Uuid::new_v4().to_string(),
                sandbox,
                format!("bucket-{}", i + 1),
            )
        })
        .collect();
    let simulator = match Simulator::start(sim_config.clone()).await {
        Ok(simulator) => simulator,
        Err(error) => {
            tracing::error!(error = %error, "cannot start the simulator on 127.0.0.1");
            return Exit::Failure;
        }
    };
    // Trouble to watch being handled: another writer changes the first
    // connection between our GET and PATCH (412), and the first Flow Service
    // request is throttled with Retry-After.
    if let Some(first) = sim_config.connections.first() {
        simulator.script_for(&first.id, ScriptedFault::EtagChurn);
    }
    simulator.script(
        SimService::Flow,
        ScriptedFault::Status {
            status: 429,
            retry_after: Some(RetryAfter::Seconds(1)),
            body: None,
        },
    );
    let toml = demo_config(&simulator, &sim_config);
    let config = match Config::from_toml_str(
        &toml,
        std::iter::once((
            "AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET".to_owned(),
            client_secret.clone(),
        )),
    ) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(error = %error, "the demo config is invalid (a bug)");
            return Exit::Failure;
        }
    };
    tracing::info!(
        connections = config.connections.len(),
        ims = %simulator.ims_url(),
        flow = %simulator.platform_url(),
        sts = %simulator.sts_url(),
        credential_lifetime = "30s",
        "demo: simulator started; rotating until Ctrl-C or --for"
    );
    let cancel = CancellationToken::new();
    if let Err(error) = crate::shutdown::listen(cancel.clone()) {
        tracing::error!(error = %error, "cannot install signal handlers");
        return Exit::Failure;
    }
    if let Some(run_for) = args.run_for {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(run_for).await;
            cancel.cancel();
        });
    }
    let options = Options {
        mode: Mode::Run,
        dry_run: false,
        only: Vec::new(),
        identity: SourceIdentity::Static {
            access_key_id: "AKIADEMOSOURCEIDENTY".to_owned(),
            secret_access_key: SecretString::from("demo-source-identity-secret".to_owned()),
        },
        fence: None,
    };
    let telemetry = Arc::new(Telemetry::new());
    let rotator = match build_rotator(&config, &options, &telemetry, None).await {
        Ok(rotator) => Arc::new(rotator),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "cannot start");
            return Exit::Failure;
        }
    };
    let daemon = Daemon::new(Parts::real(
        config,
        options,
        telemetry,
        Notifier::default(),
        rotator,
    ));
    let (_no_reloads, reloads) = mpsc::channel(1);
    let report = match daemon.run(cancel, reloads).await {
        Ok(report) => report,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "stopped on an error");
            return Exit::Failure;
        }
    };
    let stats = simulator.stats();
    let violations = simulator.violations();
    simulator.stop();
    print!("{}", summary(&report, &stats, &violations));
    let all_rotated = report.connections.iter().all(|c| c.counters.successes > 0);
    if violations.is_empty() && all_rotated {
        Exit::Ok
    } else {
        Exit::Failure
    }
}

fn demo_config(simulator: &Simulator, sim: &SimConfig) -> String {
    let mut toml = format!(
        r#"
[adobe]
client_id = "{client_id}"
org_id = "{org_id}"
ims_url = "{ims}"
platform_url = "{flow}"

[aws]
region = "us-east-1"
sts_endpoint = "{sts}"
s3_endpoint = "{s3}"        # the pre-push check lists each bucket in the simulated S3
role_arn = "arn:aws:iam::123456789012:role/aep-s3-demo"

[rotation]
session_duration = "15m"   # asked of STS; the simulator answers 30 s credentials
refresh_before = "18s"     # so each connection rotates every 10-12 s
jitter = "2s"
concurrency = 4
retry_min = "200ms"
retry_max = "5s"
request_timeout = "5s"
"#,
        client_id = sim.client_id,
        org_id = sim.org_id,
        ims = simulator.ims_url(),
        flow = simulator.platform_url(),
        sts = simulator.sts_url(),
        s3 = simulator.s3_url(),
    );
    for c in &sim.connections {
        toml.push_str(&format!(
            "\n[[connections]]\nid = \"{}\"\nsandbox = \"{}\"\nname = \"{}\"\n",
            c.id, c.sandbox, c.name
        ));
    }
    toml
}

/// The table printed at exit.
fn summary(report: &Report, stats: &SimStats, violations: &[String]) -> String {
    let now = crate::clock::wall_now();
    let mut out = format!(
        "\n{:<12} {:<8} {:>9} {:>9} {:>8}  {:<20} {:>10}\n",
        "CONNECTION",
        "SANDBOX",
        "ROTATIONS",
        "CONFLICTS",
        "FAILURES",
        "ACCESS KEY ID",
        "EXPIRES IN"
    );
    for c in &report.connections {
        let expires_in = c
            .expires_at
            .map(|at| match at.duration_since(now) {
                Ok(left) => format!("{}s", left.as_secs()),
                Err(_) => "expired".to_owned(),
            })
            .unwrap_or_else(|| "-".to_owned());
        out.push_str(&format!(
            "{:<12} {:<8} {:>9} {:>9} {:>8}  {:<20} {:>10}\n",
            c.name(),
            c.sandbox(),
            c.counters.successes,
            c.counters.etag_conflicts,
            c.counters.failures,
            c.access_key_id.as_deref().unwrap_or("-"),
            expires_in
        ));
    }
    out.push_str(&format!(
        "\nsimulator: {} PATCHes accepted, {} etag conflicts, {} throttled, {} STS calls, {} S3 pre-push checks passed, {} IMS tokens, {} protocol violations, {:.1} s with expired credentials\n",
        stats.flow_patches_ok,
        stats.flow_412,
        stats.flow_429,
        stats.sts_assume_role + stats.sts_get_session_token,
        stats.s3_checks_allowed,
        stats.ims_tokens_issued,
        violations.len(),
        stats.expired_seconds,
    ));
    for violation in violations {
        out.push_str(&format!("violation: {violation}\n"));
    }
    out
}
