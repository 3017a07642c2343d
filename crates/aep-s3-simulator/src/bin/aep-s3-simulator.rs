//! `aep-s3-simulator`: the strict loopback simulator of IMS, STS and Flow
//! Service as a standalone process, for soak and benchmark scripts.
//!
//! It prints one JSON line with the endpoints on start, optionally writes a
//! complete daemon config pointing at itself (`--config-out`), serves until
//! SIGTERM/SIGINT, then prints the final figures as one JSON line. Figures
//! are also readable while it runs at `GET {platform_url}/_sim/stats`.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use aep_s3_simulator::{Faults, SimConfig, SimConnection, Simulator};
use anyhow::Context as _;
use clap::Parser;

/// The IMS client id the simulator accepts (not secret; printed).
const CLIENT_ID: &str = "aep-s3-simulator-client";
/// The IMS client secret the simulator accepts: only written to the secret
/// file next to `--config-out`, never printed.
const CLIENT_SECRET: &str = "p8e-SIMULATOR-client-secret-0f3a9c7e5b1d";
/// The IMS org the simulator accepts.
const ORG_ID: &str = "5C1328435BF324E90A49402A@AdobeOrg";
/// The role the generated config assumes (any well-formed ARN works).
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/aep-s3-ingest";

/// Command line of the standalone simulator.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "Strict loopback simulator of Adobe IMS, AWS STS and Flow Service"
)]
struct Args {
    /// Number of S3 base connections.
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Number of sandboxes (`sandbox-1..K`) the connections are spread over, round-robin.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    sandboxes: u64,
    /// Latency of every request of every service: the answer is built this
    /// long after the request arrived (to about 0.1 ms).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Lifetime of every STS credential issued, whatever was asked for.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    credential_lifetime: Duration,
    /// `expires_in` of IMS tokens.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ims_token_lifetime: Duration,
    /// Seed of the random-fault RNG (reproducible runs).
    #[arg(long)]
    seed: Option<u64>,
    /// Probability of a Flow Service 429.
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    flow_429: f64,
    /// Probability of a Flow Service 5xx (mostly 503).
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    flow_5xx: f64,
    /// Probability of a Flow Service connection reset.
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    flow_reset: f64,
    /// Probability of a slow Flow Service answer (2 x --flow-slow-delay).
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    flow_slow: f64,
    /// Base of the slow answer's delay; the generated config's request_timeout is set to it.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    flow_slow_delay: Duration,
    /// Probability that another writer bumps the etag right after a GET.
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    etag_churn: f64,
    /// Probability, per Flow Service request, that all IMS tokens are revoked.
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    ims_revoke: f64,
    /// Probability of an STS Throttling error.
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    sts_throttle: f64,
    /// Retry-After seconds sent with random 429 and 503 answers.
    #[arg(long)]
    retry_after_secs: Option<u64>,
    /// Description of every connection (e.g. a `[[discover]] description_tag`
    /// for the discovery benchmark).
    #[arg(long, default_value = "")]
    description: String,
    /// Another IMS client the simulator accepts, as `ID:SECRET` (repeatable):
    /// one per daemon replica, so `GET {platform_url}/_sim/patches` tells
    /// who wrote what. Test credentials only: the secret is on the command line.
    #[arg(long = "extra-client", value_name = "ID:SECRET", value_parser = extra_client)]
    extra_clients: Vec<(String, String)>,
    /// Write a daemon config pointing at the simulator here (and the client
    /// secret, mode 0600, to PATH.secret).
    #[arg(long, value_name = "PATH")]
    config_out: Option<PathBuf>,
}

/// Parses a probability in `0.0..=1.0`.
fn probability(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{p} is not a probability (0.0..=1.0)"))
    }
}

/// Parses `ID:SECRET` (the id cannot hold `:`; the secret may).
fn extra_client(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((id, secret)) if !id.is_empty() && !secret.is_empty() => {
            if id == CLIENT_ID {
                return Err(format!("{id} is already the simulator's own client id"));
            }
            Ok((id.to_owned(), secret.to_owned()))
        }
        _ => Err("expected ID:SECRET, both non-empty".to_owned()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Violations and server trouble are logged at warn, on stderr (stdout
    // carries the two JSON lines scripts read).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aep-s3-simulator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let connections: Vec<SimConnection> = make_connections(args.connections, args.sandboxes)
        .into_iter()
        .map(|c| c.with_description(args.description.clone()))
        .collect();
    let mut config = SimConfig::new(CLIENT_ID, CLIENT_SECRET, ORG_ID);
    config.connections = connections.clone();
    config.credential_lifetime = args.credential_lifetime;
    config.ims_token_lifetime = args.ims_token_lifetime;
    config.seed = args.seed;
    config.extra_clients = args.extra_clients.clone();
    config.faults = Faults {
        latency: args.latency,
        flow_429: args.flow_429,
        flow_5xx: args.flow_5xx,
        flow_reset: args.flow_reset,
        flow_slow: args.flow_slow,
        flow_slow_delay: args.flow_slow_delay,
        etag_churn: args.etag_churn,
        ims_revoke: args.ims_revoke,
        sts_throttle: args.sts_throttle,
        retry_after_secs: args.retry_after_secs,
    };
    let sim = Simulator::start(config)
        .await
        .context("starting the simulator")?;

    if let Some(path) = &args.config_out {
        write_daemon_config(path, &sim, &args, &connections)?;
    }
    let endpoints = serde_json::json!({
        "ims_url": sim.ims_url(),
        "platform_url": sim.platform_url(),
        "sts_url": sim.sts_url(),
        "s3_url": sim.s3_url(),
        "client_id": CLIENT_ID,
        "extra_client_ids": args.extra_clients.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        "org_id": ORG_ID,
    });
    println!("{endpoints}");

    wait_for_signal().await?;
    sim.stop();
    let stats = sim.stats();
    println!("{}", serde_json::to_string(&stats)?);
    for violation in sim.violations().iter().take(20) {
        eprintln!("aep-s3-simulator: violation: {violation}");
    }
    Ok(())
}

/// `n` S3 connections with UUID ids, named `conn-0001`..., spread round-robin
/// over `sandbox-1..=k`.
fn make_connections(n: usize, sandboxes: u64) -> Vec<SimConnection> {
    let width = n.to_string().len().max(4);
    (0..n)
        .map(|i| {
            let sandbox = (i as u64) % sandboxes + 1;
            SimConnection::s3(
                uuid::Uuid::new_v4().to_string(),
                format!("sandbox-{sandbox}"),
                format!("conn-{:0width$}", i + 1),
            )
        })
        .collect()
}

/// A TOML basic string (JSON string escapes are valid TOML escapes).
fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// A humantime string, rounded to milliseconds (so it reads `10s`, not
/// `10s 333us`), never zero.
fn human(d: Duration) -> String {
    let millis = d.as_millis().max(1);
    let d = Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX));
    toml_str(&humantime::format_duration(d).to_string())
}

/// Writes the client secret to `PATH.secret` (0600) and a daemon config to `PATH`.
fn write_daemon_config(
    path: &Path,
    sim: &Simulator,
    args: &Args,
    connections: &[SimConnection],
) -> anyhow::Result<()> {
    let mut secret_path = path.as_os_str().to_owned();
    secret_path.push(".secret");
    let secret_path = PathBuf::from(secret_path);
    write_secret(&secret_path, CLIENT_SECRET)
        .with_context(|| format!("writing {}", secret_path.display()))?;

    let lifetime = args.credential_lifetime;
    // What is asked of STS: the simulator ignores it, but the daemon's
    // validation wants 15m..=12h and more than refresh_before.
    let session_duration =
        lifetime.clamp(Duration::from_secs(15 * 60), Duration::from_secs(12 * 3600));
    let session_duration = Duration::from_secs(session_duration.as_secs());
    let mut toml = String::new();
    toml.push_str("# Written by aep-s3-simulator: a daemon config pointing at the simulator.\n");
    toml.push_str("[adobe]\n");
    toml.push_str(&format!("client_id = {}\n", toml_str(CLIENT_ID)));
    toml.push_str(&format!(
        "client_secret_file = {}\n",
        toml_str(&secret_path.to_string_lossy())
    ));
    toml.push_str(&format!("org_id = {}\n", toml_str(ORG_ID)));
    toml.push_str(&format!("ims_url = {}\n", toml_str(&sim.ims_url())));
    toml.push_str(&format!(
        "platform_url = {}\n\n",
        toml_str(&sim.platform_url())
    ));
    toml.push_str("[aws]\n");
    toml.push_str("region = \"us-east-1\"\n");
    toml.push_str(&format!("sts_endpoint = {}\n", toml_str(&sim.sts_url())));
    // The daemon's pre-push S3 check goes to the simulated S3.
    toml.push_str(&format!("s3_endpoint = {}\n", toml_str(&sim.s3_url())));
    toml.push_str(&format!("role_arn = {}\n\n", toml_str(ROLE_ARN)));
    toml.push_str("[rotation]\n");
    toml.push_str(&format!("session_duration = {}\n", human(session_duration)));
    // Rotate with a third of the lifetime left, up to a tenth earlier at random.
    toml.push_str(&format!("refresh_before = {}\n", human(lifetime / 3)));
    toml.push_str(&format!("jitter = {}\n", human(lifetime / 10)));
    toml.push_str("concurrency = 8\n");
    toml.push_str("retry_min = \"100ms\"\n");
    toml.push_str("retry_max = \"5s\"\n");
    if args.flow_slow > 0.0 {
        // Slow answers take twice this: the daemon must time out on them.
        toml.push_str(&format!(
            "request_timeout = {}\n",
            human(args.flow_slow_delay)
        ));
    }
    for c in connections {
        toml.push_str("\n[[connections]]\n");
        toml.push_str(&format!("id = {}\n", toml_str(&c.id)));
        toml.push_str(&format!("sandbox = {}\n", toml_str(&c.sandbox)));
        toml.push_str(&format!("name = {}\n", toml_str(&c.name)));
    }
    // Write then rename, so a script polling for the file never reads half of it.
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    fs::write(&partial, toml).with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Writes a secret file readable by its owner only.
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        options.mode(0o600);
        let mut file = options.open(path)?;
        // The mode above only applies to a new file: tighten an existing one.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(secret.as_bytes())?;
        Ok(())
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(path)?;
        file.write_all(secret.as_bytes())
    }
}

/// Waits for SIGTERM or SIGINT.
async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate =
            signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_spread_round_robin_with_padded_names() {
        let connections = make_connections(5, 2);
        let sandboxes: Vec<_> = connections.iter().map(|c| c.sandbox.as_str()).collect();
        assert_eq!(
            sandboxes,
            [
                "sandbox-1",
                "sandbox-2",
                "sandbox-1",
                "sandbox-2",
                "sandbox-1"
            ]
        );
        assert_eq!(connections[0].name, "conn-0001");
        assert_eq!(connections[4].name, "conn-0005");
        assert!(uuid::Uuid::parse_str(&connections[0].id).is_ok());
        assert_eq!(make_connections(10_000, 1)[9_999].name, "conn-10000");
        assert_eq!(make_connections(12_345, 3)[0].name, "conn-00001");
    }

    #[test]
    fn extra_clients_parse_as_id_colon_secret() {
        let args = Args::parse_from([
            "aep-s3-simulator",
            "--extra-client",
            "replica-1:s3cr:et",
            "--extra-client",
            "replica-2:other",
        ]);
        assert_eq!(
            args.extra_clients,
            [
                ("replica-1".to_owned(), "s3cr:et".to_owned()),
                ("replica-2".to_owned(), "other".to_owned())
            ]
        );
        for bad in ["nocolon", ":secret", "id:", CLIENT_ID] {
            let arg = if bad == CLIENT_ID {
                format!("{CLIENT_ID}:x")
            } else {
                bad.to_owned()
            };
            assert!(
                Args::try_parse_from(["aep-s3-simulator", "--extra-client", &arg]).is_err(),
                "{arg} must be refused"
            );
        }
    }

    #[test]
    fn durations_read_as_humantime() {
        assert_eq!(human(Duration::from_secs(10)), "\"10s\"");
        assert_eq!(human(Duration::from_secs(30) / 3), "\"10s\"");
        assert_eq!(human(Duration::from_secs(1) / 3), "\"333ms\"");
        assert_eq!(human(Duration::ZERO), "\"1ms\"");
        assert_eq!(toml_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[tokio::test]
    async fn config_out_is_a_complete_daemon_config() {
        let dir = std::env::temp_dir().join(format!("aep-s3-sim-test-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        let args = Args::parse_from([
            "aep-s3-simulator",
            "--connections",
            "3",
            "--sandboxes",
            "2",
            "--credential-lifetime",
            "30s",
            "--flow-slow",
            "0.5",
            "--config-out",
            path.to_str().unwrap(),
        ]);
        let connections = make_connections(args.connections, args.sandboxes);
        let mut config = SimConfig::new(CLIENT_ID, CLIENT_SECRET, ORG_ID);
        config.connections = connections.clone();
        let sim = Simulator::start(config).await.unwrap();
        write_daemon_config(&path, &sim, &args, &connections).unwrap();

        let text = fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(CLIENT_SECRET),
            "the secret goes to its own file"
        );
        for line in [
            format!("client_id = \"{CLIENT_ID}\""),
            format!("org_id = \"{ORG_ID}\""),
            format!("ims_url = \"{}\"", sim.ims_url()),
            format!("platform_url = \"{}\"", sim.platform_url()),
            format!("sts_endpoint = \"{}\"", sim.sts_url()),
            format!("s3_endpoint = \"{}\"", sim.s3_url()),
            format!("role_arn = \"{ROLE_ARN}\""),
            "region = \"us-east-1\"".to_owned(),
            "session_duration = \"15m\"".to_owned(),
            "refresh_before = \"10s\"".to_owned(),
            "jitter = \"3s\"".to_owned(),
            "concurrency = 8".to_owned(),
            "retry_min = \"100ms\"".to_owned(),
            "retry_max = \"5s\"".to_owned(),
            "request_timeout = \"2s\"".to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(text.matches("[[connections]]").count(), 3);
        for c in &connections {
            assert!(text.contains(&format!(
                "id = \"{}\"\nsandbox = \"{}\"\nname = \"{}\"",
                c.id, c.sandbox, c.name
            )));
        }

        let secret_path = dir.join("config.toml.secret");
        assert!(text.contains(&format!(
            "client_secret_file = \"{}\"",
            secret_path.display()
        )));
        assert_eq!(fs::read_to_string(&secret_path).unwrap(), CLIENT_SECRET);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&secret_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        sim.stop();
        fs::remove_dir_all(&dir).unwrap();
    }
}
