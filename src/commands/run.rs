//! `run`: the daemon until SIGTERM/SIGINT. Signals and the file watch
//! become reloads; the start's listing feeds the daemon page by page; the
//! discovery supervisor keeps the connection set current and is the one
//! place a reload builds clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::app::{log_config_error, start_coordination};
use crate::config::Config;
use crate::discovery::{self, FlowLister, Membership};
use crate::exit::Exit;
use crate::observe::notify::Notifier;
use crate::observe::status::snapshot_channel;
use crate::observe::telemetry::Telemetry;
use crate::observe::views::Views;
use crate::remote::sts::SourceIdentity;
use crate::scheduler::{Daemon, Intake, Mode, Options, Parts, Reload, build_rotator};

/// Health check answers waiting for the daemon: it sends one per tested
/// connection and waits when the daemon is behind.
const HEALTH_ANSWERS: usize = 1024;

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

pub(crate) async fn run(config: Config, path: &Path, dry_run: bool) -> Exit {
    let telemetry = Arc::new(Telemetry::new());
    // What the views read: the scheduler's snapshots, and with
    // `[coordination]` the role ("starting" until the elector says more).
    let (snapshots_tx, snapshots) = snapshot_channel(config.rotation.refresh_before);
    let role = config
        .coordination
        .as_ref()
        .map(|_| watch::channel(crate::coordination::Leadership::starting()));
    let views = Views {
        telemetry: Arc::clone(&telemetry),
        snapshots: snapshots.clone(),
        leadership: role.as_ref().map(|(_, rx)| rx.clone()),
    };
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
                tokio::spawn(crate::observe::admin::serve(
                    listener,
                    views,
                    cancel.clone(),
                    crate::observe::admin::reserved_descriptors(&config),
                ));
            }
            Err(error) => {
                tracing::error!(listen = %addr, error = %error, "cannot listen on [admin] listen; free the port or change the address");
                return Exit::Failure;
            }
        }
    }
    let control_socket = match crate::control::bind_for(&config.admin.control_socket).await {
        Ok(server) => server,
        Err(error) => {
            tracing::error!(error = %error, "cannot serve [admin] control_socket");
            return Exit::Failure;
        }
    };
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
    if let (Some(started), Some((role_tx, _))) = (&coordination, role) {
        started.publish_role_to(role_tx);
    }
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
    // The health check tests with the clients rotation uses, as of the
    // last reload (the discovery supervisor sends them), and asks the
    // daemon for rotations through one channel.
    let (health_tx, health_rx) = tokio::sync::watch::channel(crate::health::HealthSettings::new(
        &config,
        Arc::clone(&rotator),
    ));
    let (health_answers_tx, health_answers) = mpsc::channel(HEALTH_ANSWERS);
    tokio::spawn(crate::health::run(
        health_rx,
        snapshots,
        health_answers_tx,
        cancel.clone(),
    ));
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
            health: health_tx,
            leading: coordination.as_ref().map(|c| c.leading()),
        },
        cancel.clone(),
    ));
    // A task spawned from a worker waits in that worker's LIFO slot, which
    // no other worker may steal from: without this yield the listing would
    // not start before the daemon is built.
    tokio::task::yield_now().await;
    let rotate_requests = telemetry.rotate_requests().clone();
    let forward_poll = config.coordination.as_ref().map(|c| c.renew_every);
    let mut daemon = Daemon::new(Parts {
        snapshots: Some(snapshots_tx),
        ..Parts::real(
            config,
            options,
            telemetry,
            Notifier::from_env(),
            Arc::clone(&rotator),
        )
    });
    daemon.hold_until_listed(intake);
    let control = serve_control(
        &mut daemon,
        control_socket,
        coordination.as_ref(),
        forward_poll,
        rotate_requests,
        &cancel,
    );
    daemon.take_health_answers(health_answers);
    let coordination = coordination.map(|c| c.attach(&mut daemon, &rotator));
    let result = daemon.run(cancel, daemon_reloads).await;
    if let Some(running) = coordination {
        running.stop().await;
    }
    // The socket file goes with the server.
    if let Some(control) = control {
        let _ = control.await;
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

/// `rotate` requests: from the control socket (if any), and with
/// `[coordination]` from standbys through the table (taken up while this
/// replica leads, whether or not it has a socket of its own).
fn serve_control(
    daemon: &mut Daemon,
    server: Option<crate::control::ControlServer>,
    coordination: Option<&crate::app::Coordination>,
    forward_poll: Option<Duration>,
    rotate_requests: crate::counters::RotateRequests,
    cancel: &CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    use crate::control::{Control, Forward, forward};
    // The loop takes one request per turn; a few queued are plenty.
    let (requests, rx) = mpsc::channel(8);
    daemon.serve_rotate_requests(rx);
    let mut forwarder: Option<Arc<dyn Forward>> = None;
    if let Some(c) = coordination {
        // Every lease renewal period, within bounds: a standby's request is
        // taken up about as fast as a takeover would be noticed.
        let poll = forward_poll
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(250), Duration::from_secs(2));
        tokio::spawn(forward::serve_forwarded(
            c.table.clone(),
            c.holder.clone(),
            c.leadership(),
            requests.clone(),
            rotate_requests.clone(),
            poll,
            cancel.clone(),
        ));
        forwarder = Some(Arc::new(forward::TableForward::new(
            c.table.clone(),
            c.holder.clone(),
        )));
    }
    let server = server?;
    let control = Control {
        requests,
        rotate_requests,
        replica: coordination.map(|c| c.holder.clone()),
        forward: forwarder,
    };
    Some(tokio::spawn(server.serve(control, cancel.clone())))
}

/// What the start's listing task needs.
struct StartListing {
    config: Config,
    options: Options,
    telemetry: Arc<Telemetry>,
    rotator: Arc<crate::rotation::Rotator>,
    intake: mpsc::UnboundedSender<Intake>,
    reloads: mpsc::Receiver<Config>,
    to_daemon: mpsc::Sender<Reload>,
    health: tokio::sync::watch::Sender<crate::health::HealthSettings>,
    /// `[coordination]`: whether this replica leads (only the leader
    /// re-lists).
    leading: Option<watch::Receiver<bool>>,
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
        health,
        leading,
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
    let etags = streamed.etags;
    let membership = Arc::new(streamed.membership);
    // Each discovered connection was logged as its page came.
    discovery::log_changes(&streamed.announced, &membership);
    telemetry.set_discovery_conflicts(membership.conflicts.len());
    tracing::info!(
        connections = membership.connections.len(),
        discovered = membership.discovered().count(),
        etags,
        "connections listed"
    );
    if !exact {
        // Built only when sent: at 10,000 connections the config is MBs.
        let reload = Reload {
            config: membership.apply_to(&config),
            rotator: Some(Arc::clone(&rotator)),
        };
        if to_daemon.send(reload).await.is_err() {
            return;
        }
    }
    discovery_supervisor(
        config, options, telemetry, rotator, membership, reloads, to_daemon, health, leading,
        cancel,
    )
    .await;
}

/// Keeps the daemon's connection set current: every changed membership from
/// [`discovery::run_discovery`], and every SIGHUP config (resolved at once,
/// then discovery restarts with its rules), go to the daemon as a config.
#[allow(clippy::too_many_arguments)]
async fn discovery_supervisor(
    base: Config,
    options: Options,
    telemetry: Arc<Telemetry>,
    mut rotator: Arc<crate::rotation::Rotator>,
    mut membership: Arc<Membership>,
    mut hups: mpsc::Receiver<Config>,
    to_daemon: mpsc::Sender<Reload>,
    health: tokio::sync::watch::Sender<crate::health::HealthSettings>,
    leading: Option<watch::Receiver<bool>>,
    cancel: CancellationToken,
) {
    // Shared with each round of discovery: one copy of a config that may
    // hold 10,000 connections.
    let mut base = Arc::new(base);
    loop {
        let round = cancel.child_token();
        let (tx, mut found) = mpsc::channel(1);
        tokio::spawn(discovery::run_discovery(
            Arc::clone(&base),
            FlowLister::new(Arc::clone(&rotator)),
            Arc::clone(&membership),
            tx,
            leading.clone(),
            round.clone(),
        ));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                Some(next) = found.recv() => {
                    membership = next;
                    telemetry.set_discovery_conflicts(membership.conflicts.len());
                    let reload = Reload { config: membership.apply_to(&base), rotator: Some(Arc::clone(&rotator)) };
                    if to_daemon.send(reload).await.is_err() {
                        return;
                    }
                }
                Some(config) = hups.recv() => {
                    round.cancel();
                    // The one place a reload builds clients: the daemon
                    // rotates with the ones sent along below, so listing and
                    // rotation share one request gate and one IMS token.
                    // Clients whose settings did not change are kept.
                    match build_rotator(&config, &options, &telemetry, Some((&base, &rotator))).await {
                        Ok(fresh) => rotator = Arc::new(fresh),
                        Err(error) => {
                            // The running config stays, for listing and
                            // rotation alike; listing starts a new round.
                            tracing::error!(error = %format!("{error:#}"), "config reload failed, keeping the running config");
                            break;
                        }
                    }
                    base = Arc::new(config);
                    health.send_replace(crate::health::HealthSettings::new(&base, Arc::clone(&rotator)));
                    let next = if base.discover.is_empty() {
                        Membership { connections: base.connections.clone(), ..Membership::default() }
                    } else {
                        let lister = FlowLister::new(Arc::clone(&rotator));
                        discovery::resolve(&base, &lister, Some(&membership), None).await
                    };
                    discovery::log_changes(&membership, &next);
                    membership = Arc::new(next);
                    telemetry.set_discovery_conflicts(membership.conflicts.len());
                    let reload = Reload { config: membership.apply_to(&base), rotator: Some(Arc::clone(&rotator)) };
                    if to_daemon.send(reload).await.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
    }
}
