//! The command line, as SPEC.md defines it.
//!
//! This file is also compiled by `build.rs` (the man page and the shell
//! completions are generated from it), so it depends on nothing but `clap`,
//! `humantime` and `std`: no `crate::` imports.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The log line format (`--log-format`); `crate::observe::logging` says what each
/// looks like and which is chosen when none is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Text,
}

/// Where the config file is looked for when neither `--config` nor
/// `$AEP_S3_ROTATOR_CONFIG` says.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/aep-s3-rotator/config.toml";

/// Keeps Adobe Experience Platform S3 base connections supplied with fresh,
/// temporary AWS credentials.
#[derive(Debug, Parser)]
#[command(name = "aep-s3-rotator", version, about, long_about = None)]
pub struct Cli {
    /// Config file.
    #[arg(long, global = true, env = "AEP_S3_ROTATOR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log line format [default: native journal fields when stderr is the journal, text on a
    /// terminal, else json].
    #[arg(long, global = true, env = "AEP_S3_ROTATOR_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// A tracing filter, e.g. `info` or `aep_s3_rotator=debug` [default: $RUST_LOG, else info].
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// What to do [default: run].
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon until SIGTERM/SIGINT.
    Run(RunArgs),
    /// Rotate every configured connection now (or only --connection ID), then exit.
    Once(OnceArgs),
    /// Validate the config and every remote dependency without changing anything.
    Check,
    /// Print each connection's state from a running daemon's admin endpoint.
    Status,
    /// Run the real daemon against an embedded loopback simulator of IMS, STS and Flow Service.
    Demo(DemoArgs),
    /// Create a new S3 base connection holding fresh temporary credentials, ready to be rotated.
    Create(CreateArgs),
    /// Ask the running daemon to mint fresh credentials and push them now (e.g. after a leak).
    Rotate(RotateArgs),
    /// Set up the DynamoDB table that replicas share (`[coordination]`).
    #[command(subcommand)]
    Coordination(CoordinationCommand),
}

/// `coordination`
#[derive(Debug, Subcommand)]
pub enum CoordinationCommand {
    /// Create the [coordination] table (partition key pk, sort key sk, both
    /// strings; on-demand capacity) and wait until it is ACTIVE. An existing
    /// table with that key schema is left as it is. Needs
    /// dynamodb:CreateTable and dynamodb:DescribeTable.
    Init,
}

/// `run`
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// Do everything (IMS, STS, GET) except the PATCH; log what would change.
    #[arg(long)]
    pub dry_run: bool,
}

/// `once`
#[derive(Debug, Args)]
pub struct OnceArgs {
    /// Do everything (IMS, STS, GET) except the PATCH; log what would change.
    #[arg(long)]
    pub dry_run: bool,
    /// Only this connection id (repeatable).
    #[arg(long = "connection", value_name = "ID")]
    pub connections: Vec<String>,
}

/// `rotate`: talks to the running daemon over its control socket
/// (`[admin] control_socket`); run it as root or as the daemon's user.
/// Exits 0 when every connection was pushed, 1 when any was not (or the
/// daemon cannot be reached), 2 when a name is malformed or not one the
/// daemon rotates.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["all", "connections", "sandboxes"])))]
pub struct RotateArgs {
    /// Every connection the daemon rotates.
    #[arg(long, conflicts_with_all = ["connections", "sandboxes"])]
    pub all: bool,
    /// This connection: its id, or a name only one connection has (repeatable).
    #[arg(long = "connection", value_name = "ID")]
    pub connections: Vec<String>,
    /// Every connection in this sandbox (repeatable).
    #[arg(long = "sandbox", value_name = "NAME")]
    pub sandboxes: Vec<String>,
    /// Why, for the daemon's log (an incident number, "leaked key").
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub reason: String,
    /// How long to wait for the connections' results, e.g. `5m`.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The daemon's control socket [default: `[admin] control_socket` of the config, else
    /// $RUNTIME_DIRECTORY/control.sock, else /run/aep-s3-rotator/control.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// `create`
#[derive(Debug, Args, Clone)]
pub struct CreateArgs {
    /// The sandbox to create the connection in (lower-case, e.g. `prod`).
    #[arg(long)]
    pub sandbox: String,
    /// The connection's display name.
    #[arg(long)]
    pub name: String,
    /// The S3 bucket (`bucketName`).
    #[arg(long)]
    pub bucket: String,
    /// A folder inside the bucket (`folderPath`).
    #[arg(long)]
    pub folder: Option<String>,
    /// The S3 endpoint (`serviceUrl`), an https URL.
    #[arg(long, value_name = "URL")]
    pub service_url: Option<String>,
    /// The connection's description (a `[[discover]]` rule's `description_tag` can match it).
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// The role to assume for the credentials [default: the config's `[aws] role_arn`].
    #[arg(long, value_name = "ARN")]
    pub role_arn: Option<String>,
    /// Mint the credentials (and run the pre-push S3 check) but send nothing to
    /// Flow Service; print the request with its secrets redacted.
    #[arg(long)]
    pub dry_run: bool,
}

/// `demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many simulated connections.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub connections: u16,
    /// How long to run, e.g. `25s` [default: until Ctrl-C].
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    pub run_for: Option<Duration>,
    /// Shadows the global `--config` so that `demo --help` does not offer
    /// it: the demo writes a config of its own and reads none (a global
    /// argument is not propagated to a subcommand that defines its id).
    #[arg(long, hide = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (use e.g. 25s, 2m, 1h)"))
}
