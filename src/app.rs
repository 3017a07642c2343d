//! The commands, wired from library parts. `main` calls [`main`] and maps the
//! [`Exit`] it returns to the process exit code.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command, OnceArgs, RunArgs};
use crate::clock::rfc3339;
use crate::config::{Config, ConfigError};
use crate::daemon::{Daemon, Intake, Mode, Options, Report, build_rotator};
use crate::discovery::{self, FlowLister, Membership};
use crate::notify::Notifier;
use crate::sts::{CredentialSource, SourceIdentity, StsError, StsRequest};
use crate::telemetry::Telemetry;

/// How the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Ok,
    /// 1: a runtime failure (for `once`/`check`: something failed).
    Failure,
    /// 2: bad command line.
    Usage,
    /// 78 (EX_CONFIG): invalid configuration; systemd does not restart on it.
    Config,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::Failure => 1,
            Self::Usage => 2,
            Self::Config => 78,
        }
    }
}

/// Runs the command the command line names.
pub async fn main(cli: Cli) -> Exit {
    let command = cli.command.unwrap_or(Command::Run(RunArgs::default()));
    if let Command::Demo(args) = command {
        return demo(args).await;
    }
    let config = match load_config(&cli.config) {
        Ok(config) => config,
        Err(exit) => return exit,
    };
    if matches!(
        command,
        Command::Run(_) | Command::Once(_) | Command::Create(_) | Command::Coordination(_)
    ) && let Err(exit) = ca_roots()
    {
        return exit;
    }
    match command {
        Command::Run(args) => run(config, &cli.config, args.dry_run).await,
        Command::Once(args) => once(config, args).await,
        Command::Check => check(config, &cli.config).await,
        Command::Status => status(&config).await,
        Command::Demo(_) => Exit::Usage,
        Command::Create(args) => crate::create::run(&config, &args).await,
        Command::Coordination(crate::cli::CoordinationCommand::Init) => {
            crate::coordination::table::init_command(&config).await
        }
    }
}

#[cfg(feature = "demo")]
async fn demo(args: crate::cli::DemoArgs) -> Exit {
    crate::demo::run(args).await
}

/// A build without the `demo` feature carries no simulator: say so plainly.
#[cfg(not(feature = "demo"))]
async fn demo(_args: crate::cli::DemoArgs) -> Exit {
    eprintln!(
        "aep-s3-rotator: this build has no demo (it was built without the `demo` feature); \
         build with default features to run it"
    );
    Exit::Usage
}

/// The CA roots for every HTTPS client (see [`crate::tls`]): logged once at
/// start; an operator-named store without certificates stops the start with
/// one message (exit 78: systemd does not restart into the same failure).
fn ca_roots() -> Result<(), Exit> {
    match crate::tls::roots() {
        Ok(roots) if matches!(roots.source(), crate::tls::CaSource::Builtin { .. }) => {
            tracing::warn!(roots = roots.len(), "CA roots: {}", roots.describe());
            Ok(())
        }
        Ok(roots) => {
            tracing::info!(roots = roots.len(), "CA roots: {}", roots.describe());
            Ok(())
        }
        Err(error) => {
            tracing::error!("{error}");
            Err(Exit::Config)
        }
    }
}

/// Loads and validates the config; logs every problem with its key path.
fn load_config(path: &Path) -> Result<Config, Exit> {
    match Config::load(path) {
        Ok(config) => {
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            Ok(config)
        }
        Err(error) => {
            log_config_error(path, &error);
            tracing::error!(path = %path.display(), problems = error.issues.len(), "invalid configuration; fix the problems above and start again");
            Err(Exit::Config)
        }
    }
}

fn log_config_error(path: &Path, error: &ConfigError) {
    for issue in &error.issues {
        tracing::error!(path = %path.display(), key = %issue.path, error = %issue.message, "invalid configuration");
    }
}

/// How long the watched files must stay quiet before a change is reloaded:
/// editors and Kubernetes write in several steps (temp file, rename, symlink
/// swap), and one reload per change is enough.
const WATCH_DEBOUNCE: Duration = Duration::from_millis(500);

/// Signals, plus a task that turns SIGHUP, or a change of the config file or
/// of the client secret file, into validated configs.
fn reload_channel(
    path: &Path,
    secret_file: Option<&Path>,
    cancel: &CancellationToken,
) -> std::io::Result<mpsc::Receiver<Config>> {
    let mut hups = crate::shutdown::listen(cancel.clone())?;
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    // Kept alive by the task below; dropping it stops the watch.
    let watcher = watch_files(path, secret_file, changed_tx);
    let (tx, rx) = mpsc::channel(1);
    let path = path.to_owned();
    let cancel = cancel.clone();
    tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                hup = hups.recv() => if hup.is_none() { return },
                Some(()) = changed.recv() => {
                    // Debounce: wait until the files stay quiet.
                    while let Ok(Some(())) =
                        tokio::time::timeout(WATCH_DEBOUNCE, changed.recv()).await
                    {}
                    tracing::info!("config or client secret file changed, reloading config");
                }
                () = cancel.cancelled() => return,
            }
            match Config::load(&path) {
                Ok(config) => {
                    for warning in &config.warnings {
                        tracing::warn!("{warning}");
                    }
                    if tx.send(config).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    log_config_error(&path, &error);
                    tracing::error!(
                        problems = error.issues.len(),
                        "config reload failed, keeping the running config"
                    );
                }
            }
        }
    });
    Ok(rx)
}

/// Watches the directories of the config file and the secret file (not the
/// files themselves: editors replace files, and Kubernetes swaps a `..data`
/// symlink in the directory) and signals `changed` when one of those files,
/// or a `..`-named Kubernetes entry, changes. Without inotify the daemon
/// still reloads on SIGHUP; the reason is logged.
fn watch_files(
    config: &Path,
    secret: Option<&Path>,
    changed: mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let files: Vec<PathBuf> = std::iter::once(config)
        .chain(secret)
        .map(Path::to_owned)
        .collect();
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(ToOwned::to_owned))
        .collect();
    let relevant = move |event: &notify::Event| {
        use notify::EventKind::{Access, Other};
        !matches!(event.kind, Access(_) | Other)
            && event.paths.iter().any(|p| {
                p.file_name().is_some_and(|name| {
                    names.iter().any(|n| n == name) || name.to_string_lossy().starts_with("..")
                })
            })
    };
    let handler = move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| relevant(&e)) {
            // Full means a reload is already pending: nothing is lost.
            let _ = changed.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::warn!(error = %error, "cannot watch the config files; reload with SIGHUP");
            return None;
        }
    };
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .map(|f| match f.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.dedup();
    for dir in dirs {
        if let Err(error) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %error, "cannot watch the config directory; reload with SIGHUP");
        }
    }
    Some(watcher)
}

async fn run(config: Config, path: &Path, dry_run: bool) -> Exit {
    let telemetry = Arc::new(Telemetry::new(config.rotation.refresh_before));
    let cancel = CancellationToken::new();
    let reloads = match reload_channel(path, config.adobe.client_secret_file.as_deref(), &cancel) {
        Ok(rx) => rx,
        Err(error) => {
            tracing::error!(error = %error, "cannot install signal handlers");
            return Exit::Failure;
        }
    };
    if let Some(addr) = config.admin.listen {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                // admin::serve logs "admin endpoint listening" with the
                // address actually bound (the one that matters for port 0).
                tokio::spawn(crate::admin::serve(
                    listener,
                    Arc::clone(&telemetry),
                    cancel.clone(),
                    crate::admin::reserved_descriptors(&config),
                ));
            }
            Err(error) => {
                tracing::error!(listen = %addr, error = %error, "cannot listen on [admin] listen; free the port or change the address");
                return Exit::Failure;
            }
        }
    }
    let mut options = Options {
        mode: Mode::Run,
        dry_run,
        only: Vec::new(),
        identity: SourceIdentity::DefaultChain,
        fence: None,
    };
    let coordination = match &config.coordination {
        Some(settings) => {
            match start_coordination(&config, settings, &options.identity, &telemetry).await {
                Ok(started) => Some(started),
                Err(exit) => return exit,
            }
        }
        None => None,
    };
    options.fence = coordination.as_ref().map(|c| c.fence.clone());
    let rotator = match build_rotator(&config, &options, &telemetry, None).await {
        Ok(rotator) => Arc::new(rotator),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "cannot start");
            return Exit::Failure;
        }
    };
    tracing::info!(
        connections = config.connections.len(),
        rules = config.discover.len(),
        dry_run,
        version = env!("CARGO_PKG_VERSION"),
        "starting"
    );
    // The daemon runs at once, its explicit connections held until the
    // start's listing seeds their etag: the first PATCHes go out while the
    // later list pages are still on their way, and no connection GETs an
    // etag a list page is about to bring. The listing starts first: its IMS
    // token and first pages are on their way while the daemon builds its
    // connections (at 10,000, ~0.1 s of work); what it sends waits in the
    // channels until the daemon reads them.
    let (intake_tx, intake) = mpsc::unbounded_channel();
    // SIGHUP configs and re-listed memberships both reach the daemon as
    // configs whose connections are the resolved set.
    let (to_daemon, daemon_reloads) = mpsc::channel(1);
    tokio::spawn(start_listing(
        StartListing {
            config: config.clone(),
            options: options.clone(),
            telemetry: Arc::clone(&telemetry),
            rotator: Arc::clone(&rotator),
            intake: intake_tx,
            reloads,
            to_daemon,
        },
        cancel.clone(),
    ));
    // A task spawned from a worker waits in that worker's LIFO slot, which
    // no other worker may steal from: without this yield the listing would
    // not start before the daemon is built.
    tokio::task::yield_now().await;
    let mut daemon = Daemon::with_rotator(
        config,
        options,
        telemetry,
        Notifier::from_env(),
        Arc::clone(&rotator),
    );
    daemon.hold_until_listed(intake);
    let coordination = coordination.map(|c| c.attach(&mut daemon, &rotator));
    let result = daemon.run(cancel, daemon_reloads).await;
    if let Some(running) = coordination {
        running.stop().await;
    }
    match result {
        Ok(report) => {
            tracing::info!(loop_turns = report.loop_turns, "stopped");
            Exit::Ok
        }
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "stopped on an error");
            Exit::Failure
        }
    }
}

/// `[coordination]` before the daemon starts: the table is checked (a
/// missing table or permission stops the start with one message, exit 78:
/// restarting would not cure it), the elector is built.
struct Coordination {
    elector: crate::coordination::Elector,
    leadership: tokio::sync::watch::Receiver<crate::coordination::Leadership>,
    fence: crate::coordination::Fence,
    writer: crate::coordination::StateWriter,
    sink: crate::coordination::StateSink,
}

/// The coordination tasks while the daemon runs.
struct RunningCoordination {
    stop: CancellationToken,
    elector: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
    keeper: tokio::task::JoinHandle<()>,
}

/// How often a standby makes sure it holds a valid IMS token (the cache
/// only asks IMS when the token nears its end): a wrong or revoked client
/// secret shows up in a standby's log long before it has to take over.
const STANDBY_TOKEN_CHECK: Duration = Duration::from_secs(5 * 60);

async fn start_coordination(
    config: &Config,
    settings: &crate::config::CoordinationConfig,
    identity: &SourceIdentity,
    telemetry: &Arc<Telemetry>,
) -> Result<Coordination, Exit> {
    use crate::coordination::{Elector, StateWriter, Store, StoreError, dynamo::DynamoStore};
    let store = DynamoStore::connect(
        &config.aws,
        settings,
        identity,
        config.rotation.request_timeout,
    )
    .await;
    // Every permission the daemon needs, proven without changing data.
    match crate::coordination::table::verify(&store).await {
        Ok(summary) => tracing::info!("coordination table: {summary}"),
        Err(
            error @ (StoreError::NoTable { .. }
            | StoreError::Denied { .. }
            | StoreError::NotOurs { .. }),
        ) => {
            tracing::error!(table = %settings.table, "{error}");
            return Err(Exit::Config);
        }
        // Credentials and reachability can recover: the elector retries.
        Err(error) => {
            tracing::warn!(table = %settings.table, table_error = %error, "coordination table not reachable yet; standing by until it is");
        }
    }
    let store: Arc<dyn Store> = Arc::new(store);
    let holder = settings
        .holder
        .clone()
        .unwrap_or_else(crate::coordination::default_holder);
    let (elector, leadership, fence) = Elector::new(
        Arc::clone(&store),
        holder.clone(),
        settings.lease,
        settings.renew_every,
        Arc::clone(telemetry),
    );
    let (writer, sink) = StateWriter::new(store, fence.clone(), holder);
    Ok(Coordination {
        elector,
        leadership,
        fence,
        writer,
        sink,
    })
}

impl Coordination {
    /// Hands the daemon its leadership and sink; starts the elector, the
    /// state writer and the standby's token check.
    fn attach(
        self,
        daemon: &mut Daemon,
        rotator: &Arc<crate::rotation::Rotator>,
    ) -> RunningCoordination {
        daemon.coordinate(self.leadership.clone(), self.sink);
        let stop = CancellationToken::new();
        let elector = tokio::spawn(self.elector.run(stop.clone()));
        let writer = tokio::spawn(self.writer.run());
        let ims = Arc::clone(&rotator.ims);
        let leadership = self.leadership;
        let keeper_stop = stop.clone();
        let keeper = tokio::spawn(async move {
            loop {
                let standby = leadership.borrow().role != crate::coordination::Role::Leader;
                if standby && let Err(error) = ims.token().await {
                    tracing::warn!(error = %error, "standby cannot get an IMS access token; it could not rotate if it became the leader");
                }
                tokio::select! {
                    () = keeper_stop.cancelled() => return,
                    () = tokio::time::sleep(STANDBY_TOKEN_CHECK) => {}
                }
            }
        });
        RunningCoordination {
            stop,
            elector,
            writer,
            keeper,
        }
    }
}

impl RunningCoordination {
    /// After the daemon has drained its jobs: the queued shared state is
    /// written (bounded), then the lease is released so a standby takes
    /// over at its next look.
    async fn stop(self) {
        let flush = crate::coordination::FLUSH_GRACE;
        if tokio::time::timeout(flush, self.writer).await.is_err() {
            tracing::warn!(grace = %humantime::format_duration(flush), "shared state not fully written before shutdown");
        }
        self.stop.cancel();
        let _ = self.keeper.await;
        let _ = self.elector.await;
    }
}

/// Builds the clients, resolves the `[[discover]]` rules and reads etags in
/// bulk: the config the daemon starts with (its connections = the resolved
/// set), the clients, and the membership. `None` (logged) when the clients
/// cannot be built.
async fn start_membership(
    config: &Config,
    options: &Options,
    telemetry: &Arc<Telemetry>,
) -> Option<(Config, Arc<crate::rotation::Rotator>, Membership)> {
    let rotator = match build_rotator(config, options, telemetry, None).await {
        Ok(rotator) => Arc::new(rotator),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "cannot start");
            return None;
        }
    };
    // Explicit-only configs list too: their etags (and S3 targets) come
    // by id in pages, so a healthy first rotation is one PATCH. A failed
    // listing only means that connection does its own GET.
    let lister = FlowLister::new(Arc::clone(&rotator));
    let membership = discovery::resolve(config, &lister, None, None).await;
    discovery::log_changes(&Membership::default(), &membership);
    telemetry.set_discovery_conflicts(membership.conflicts.len());
    Some((membership.apply_to(config), rotator, membership))
}

/// What the start's listing task needs.
struct StartListing {
    config: Config,
    options: Options,
    telemetry: Arc<Telemetry>,
    rotator: Arc<crate::rotation::Rotator>,
    intake: mpsc::UnboundedSender<Intake>,
    reloads: mpsc::Receiver<Config>,
    to_daemon: mpsc::Sender<Config>,
}

/// `run`'s start: resolves the rules and reads etags in bulk, feeding the
/// daemon page by page ([`discovery::resolve_streaming`]), tells it the
/// listing is done, sends it the resolved set as a config only when that
/// differs from what the pages added, then keeps the set current
/// ([`discovery_supervisor`]; SIGHUPs wait until then).
async fn start_listing(start: StartListing, cancel: CancellationToken) {
    let StartListing {
        config,
        options,
        telemetry,
        rotator,
        intake,
        reloads,
        to_daemon,
    } = start;
    let lister = FlowLister::new(Arc::clone(&rotator));
    let streamed = tokio::select! {
        () = cancel.cancelled() => return,
        streamed = discovery::resolve_streaming(&config, &lister, &intake) => streamed,
    };
    // What is still held goes now (it GETs its etag). A daemon already gone
    // is shutting down.
    let _ = intake.send(Intake::Done);
    drop(intake);
    // `Done` woke the daemon into this worker's LIFO slot (the other worker
    // cannot take it from there): let it run before what follows.
    tokio::task::yield_now().await;
    let exact = streamed.exact();
    let membership = Arc::new(streamed.membership);
    // Each discovered connection was logged as its page came.
    discovery::log_changes(&streamed.announced, &membership);
    telemetry.set_discovery_conflicts(membership.conflicts.len());
    tracing::info!(
        connections = membership.connections.len(),
        discovered = membership.discovered().count(),
        etags = membership.etags.len(),
        "connections listed"
    );
    if !exact && to_daemon.send(membership.apply_to(&config)).await.is_err() {
        return;
    }
    discovery_supervisor(
        config, options, telemetry, rotator, membership, reloads, to_daemon, cancel,
    )
    .await;
}

/// Keeps the daemon's connection set current: every changed membership from
/// [`discovery::run_discovery`], and every SIGHUP config (resolved at once,
/// then discovery restarts with its rules), go to the daemon as a config.
#[allow(clippy::too_many_arguments)]
async fn discovery_supervisor(
    mut base: Config,
    options: Options,
    telemetry: Arc<Telemetry>,
    mut rotator: Arc<crate::rotation::Rotator>,
    mut membership: Arc<Membership>,
    mut hups: mpsc::Receiver<Config>,
    to_daemon: mpsc::Sender<Config>,
    cancel: CancellationToken,
) {
    loop {
        let round = cancel.child_token();
        let (tx, mut found) = mpsc::channel(1);
        tokio::spawn(discovery::run_discovery(
            base.clone(),
            FlowLister::new(Arc::clone(&rotator)),
            Arc::clone(&membership),
            tx,
            round.clone(),
        ));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                Some(next) = found.recv() => {
                    membership = next;
                    telemetry.set_discovery_conflicts(membership.conflicts.len());
                    if to_daemon.send(membership.apply_to(&base)).await.is_err() {
                        return;
                    }
                }
                Some(config) = hups.recv() => {
                    round.cancel();
                    // Clients whose settings did not change are kept (IMS
                    // token, request gate): the same rule as the daemon's.
                    if let Ok(fresh) =
                        build_rotator(&config, &options, &telemetry, Some((&base, &rotator))).await
                    {
                        rotator = Arc::new(fresh);
                    }
                    base = config;
                    let next = if base.discover.is_empty() {
                        Membership { connections: base.connections.clone(), ..Membership::default() }
                    } else {
                        let lister = FlowLister::new(Arc::clone(&rotator));
                        discovery::resolve(&base, &lister, Some(&membership), None).await
                    };
                    discovery::log_changes(&membership, &next);
                    membership = Arc::new(next);
                    telemetry.set_discovery_conflicts(membership.conflicts.len());
                    if to_daemon.send(membership.apply_to(&base)).await.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

async fn once(config: Config, args: OnceArgs) -> Exit {
    let telemetry = Arc::new(Telemetry::new(config.rotation.refresh_before));
    let options = Options {
        mode: Mode::Once,
        dry_run: args.dry_run,
        only: args.connections.clone(),
        identity: SourceIdentity::DefaultChain,
        fence: None,
    };
    // Without rules a wrong --connection is known before any request.
    if config.discover.is_empty()
        && let Err(exit) = known_connections(&config, &args.connections)
    {
        return exit;
    }
    if config.coordination.is_some() {
        tracing::warn!(
            "`once` does not take the [coordination] lease: it writes even while a leader runs. \
             The etag (If-Match) keeps the two from mixing credentials, but run `once` only \
             where you mean to override the leader"
        );
    }
    // `once` honours the rules: the connections they match now are rotated too.
    let Some((config, rotator, membership)) = start_membership(&config, &options, &telemetry).await
    else {
        return Exit::Failure;
    };
    if let Err(exit) = known_connections(&config, &args.connections) {
        return exit;
    }
    let cancel = CancellationToken::new();
    // SIGTERM/SIGINT stop `once` too; it never reloads.
    if let Err(error) = crate::shutdown::listen(cancel.clone()) {
        tracing::error!(error = %error, "cannot install signal handlers");
        return Exit::Failure;
    }
    let (_no_reloads, reloads) = mpsc::channel(1);
    let mut daemon = Daemon::with_rotator(config, options, telemetry, Notifier::default(), rotator);
    daemon.seed_s3_targets(&membership.targets);
    daemon.seed_etags(&membership.etags);
    match daemon.run(cancel.clone(), reloads).await {
        Ok(report) => {
            print!("{}", once_report(&report, args.dry_run));
            if cancel.is_cancelled() || !report.all_ok() {
                Exit::Failure
            } else {
                Exit::Ok
            }
        }
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "stopped on an error");
            Exit::Failure
        }
    }
}

/// `once --connection ID`: every id must be a configured (or discovered) one.
fn known_connections(config: &Config, ids: &[String]) -> Result<(), Exit> {
    let known: BTreeSet<&str> = config.connections.iter().map(|c| c.id.as_str()).collect();
    let unknown: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| !known.contains(id))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    eprintln!(
        "aep-s3-rotator: --connection {} is not in the config; known ids: {}",
        unknown.join(", "),
        known.into_iter().collect::<Vec<_>>().join(", ")
    );
    Err(Exit::Usage)
}

/// One line per connection: `ok`/`FAIL`, name, sandbox, access key id and
/// expiry or the error.
pub fn once_report(report: &Report, dry_run: bool) -> String {
    let mut out = String::new();
    for c in &report.connections {
        match &c.last_error {
            None if dry_run => out.push_str(&format!(
                "ok    {} ({}): dry run, nothing changed\n",
                c.name, c.sandbox
            )),
            None => out.push_str(&format!(
                "ok    {} ({}): {} until {}\n",
                c.name,
                c.sandbox,
                c.access_key_id.as_deref().unwrap_or("-"),
                c.expires_at.map(rfc3339).unwrap_or_else(|| "-".to_owned())
            )),
            Some(error) => out.push_str(&format!("FAIL  {} ({}): {error}\n", c.name, c.sandbox)),
        }
    }
    let failed = report
        .connections
        .iter()
        .filter(|c| c.last_error.is_some())
        .count();
    out.push_str(&format!(
        "{} connections, {} ok, {failed} failed\n",
        report.connections.len(),
        report.connections.len() - failed
    ));
    out
}

async fn status(config: &Config) -> Exit {
    let Some(addr) = config.admin.listen else {
        eprintln!(
            "aep-s3-rotator: status reads the running daemon's admin endpoint, but the config has no [admin] listen; add one (e.g. listen = \"127.0.0.1:9464\") and restart the daemon"
        );
        return Exit::Config;
    };
    match crate::admin::status_report(addr).await {
        Ok(table) => {
            print!("{table}");
            Exit::Ok
        }
        Err(error) => {
            eprintln!("aep-s3-rotator: {error}");
            Exit::Failure
        }
    }
}

/// `check`: one line per check on stdout, nothing changed anywhere.
async fn check(config: Config, path: &Path) -> Exit {
    let mut lines = CheckReport::default();
    let sandboxes: BTreeSet<&str> = config
        .connections
        .iter()
        .map(|c| c.sandbox.as_str())
        .collect();
    lines.ok(
        "config",
        &format!(
            "{}: {} connections in {} sandboxes{}",
            path.display(),
            config.connections.len(),
            sandboxes.len(),
            match config.discover.len() {
                0 => String::new(),
                n => format!(", {n} discover rules"),
            }
        ),
    );
    for warning in &config.warnings {
        lines.warn("config", warning);
    }
    // The trust store every HTTPS check below depends on: its own line.
    match crate::tls::roots() {
        // The built-in set works, but the operator should know it is in use.
        Ok(roots) if matches!(roots.source(), crate::tls::CaSource::Builtin { .. }) => {
            lines.warn("ca", &roots.describe());
        }
        Ok(roots) => lines.ok("ca", &roots.describe()),
        Err(error) => {
            lines.fail("ca", &error.to_string());
            lines.text.push_str(&format!(
                "{} checks, {} failed\n",
                lines.total, lines.failed
            ));
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
    let telemetry = Arc::new(Telemetry::new(config.rotation.refresh_before));
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
    // IMS.
    let token = match rotator.ims.token().await {
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
    };
    // Flow Service, each connection; its S3 parameters for the pre-push check.
    let mut targets = std::collections::HashMap::new();
    for connection in &config.connections {
        let label = format!("{} ({})", connection.name, connection.sandbox);
        let Some(token) = &token else {
            lines.fail("connection", &format!("{label}: not checked, no IMS token"));
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
        lines.fail("discover", "rules not checked, no IMS token");
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
    let source = crate::sts::AwsSts::new(
        &config.aws,
        &SourceIdentity::DefaultChain,
        config.rotation.request_timeout,
        telemetry,
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
            Err(StsError::NoCredentials(detail)) => lines.fail(
                "sts",
                &format!("{}: no AWS credentials found by the default chain; give the daemon an identity (AWS_* env, profile, IRSA web identity, ECS or an instance role): {detail}", request.describe()),
            ),
            Err(error) => lines.fail("sts", &format!("{}: {error}", request.describe())),
        }
    }
    // The pre-push S3 check, as a rotation would run it, per connection.
    prepush_lines(&config, &rotator, &targets, &issued, &mut lines).await;
    lines.text.push_str(&format!(
        "{} checks, {} failed\n",
        lines.total, lines.failed
    ));
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
    targets: &std::collections::HashMap<String, Option<crate::s3probe::S3Target>>,
    issued: &std::collections::HashMap<StsRequest, Option<crate::sts::AwsCredentials>>,
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
            lines.fail(
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
}
