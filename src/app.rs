//! The composition root: what every command that talks to the remotes is
//! wired from. The CA roots, the config as loaded and validated, the clients
//! with the start's membership (`start_membership`), and `[coordination]`
//! (the elector, the fence, the shared table's writer) around a daemon.
//!
//! Imported by `commands`; imports the layers below it, never `commands`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::discovery::{self, FlowLister, Membership};
use crate::exit::Exit;
use crate::observe::telemetry::Telemetry;
use crate::remote::sts::SourceIdentity;
use crate::scheduler::{Daemon, Options, build_rotator};

/// The CA roots for every HTTPS client (see [`crate::remote::tls`]): logged once at
/// start; an operator-named store without certificates stops the start with
/// one message (exit 78: systemd does not restart into the same failure).
pub(crate) fn ca_roots() -> Result<(), Exit> {
    match crate::remote::tls::roots() {
        Ok(roots) if matches!(roots.source(), crate::remote::tls::CaSource::Builtin { .. }) => {
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
pub(crate) fn load_config(
    path: &Path,
    load: impl FnOnce(&Path) -> Result<Config, ConfigError>,
) -> Result<Config, Exit> {
    match load(path) {
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

pub(crate) fn log_config_error(path: &Path, error: &ConfigError) {
    for issue in &error.issues {
        tracing::error!(path = %path.display(), key = %issue.path, error = %issue.message, "invalid configuration");
    }
}

/// `[coordination]` before the daemon starts: the table is checked (a
/// missing table or permission stops the start with one message, exit 78:
/// restarting would not cure it), the elector is built.
pub(crate) struct Coordination {
    elector: crate::coordination::Elector,
    leadership: tokio::sync::watch::Receiver<crate::coordination::Leadership>,
    pub(crate) fence: crate::coordination::Fence,
    /// The table as the elector and the shared state's writer use it.
    store: Arc<dyn crate::coordination::Store>,
    /// The table itself, for `rotate` requests a standby forwards (`crate::control::forward`).
    pub(crate) table: crate::coordination::dynamo::DynamoStore,
    /// This replica's holder name.
    pub(crate) holder: String,
}

impl Coordination {
    /// This replica's role as the elector publishes it.
    pub(crate) fn leadership(
        &self,
    ) -> tokio::sync::watch::Receiver<crate::coordination::Leadership> {
        self.leadership.clone()
    }
}

/// The coordination tasks while the daemon runs.
pub(crate) struct RunningCoordination {
    stop: CancellationToken,
    elector: tokio::task::JoinHandle<()>,
    /// Stops the shared state's writer (before the elector: it flushes first).
    stop_writer: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
    keeper: tokio::task::JoinHandle<()>,
}

/// How often a standby makes sure it holds a valid IMS token (the cache
/// only asks IMS when the token nears its end): a wrong or revoked client
/// secret shows up in a standby's log long before it has to take over.
pub(crate) const STANDBY_TOKEN_CHECK: Duration = Duration::from_secs(5 * 60);

pub(crate) async fn start_coordination(
    config: &Config,
    settings: &crate::config::CoordinationConfig,
    identity: &SourceIdentity,
    telemetry: &Arc<Telemetry>,
) -> Result<Coordination, Exit> {
    use crate::coordination::{Elector, Store, StoreError, dynamo::DynamoStore};
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
    let table = store.clone();
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
    Ok(Coordination {
        elector,
        leadership,
        fence,
        store,
        table,
        holder,
    })
}

impl Coordination {
    /// Forwards every word of the elector to `tx` (the views' copy of the
    /// role), until the elector ends.
    pub(crate) fn publish_role_to(
        &self,
        tx: tokio::sync::watch::Sender<crate::coordination::Leadership>,
    ) {
        mirror(self.leadership.clone(), tx, |leadership, copy| {
            copy.clone_from(leadership);
            true
        });
    }

    /// Whether this replica leads, as a flag that follows the elector
    /// (discovery lists only while it is `true`; it changes only when the
    /// role does).
    pub(crate) fn leading(&self) -> tokio::sync::watch::Receiver<bool> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        mirror(self.leadership.clone(), tx, |leadership, leads| {
            let now = leadership.role == crate::coordination::Role::Leader;
            std::mem::replace(leads, now) != now
        });
        rx
    }

    /// Hands the daemon its leadership; starts the elector, the shared
    /// state's writer (following the daemon's snapshots) and the standby's
    /// token check.
    pub(crate) fn attach(
        self,
        daemon: &mut Daemon,
        rotator: &Arc<crate::rotation::Rotator>,
    ) -> RunningCoordination {
        daemon.coordinate(self.leadership.clone());
        let stop = CancellationToken::new();
        let elector = tokio::spawn(self.elector.run(stop.clone()));
        let stop_writer = CancellationToken::new();
        let target = crate::persist::SharedTable::new(
            self.store,
            self.fence.clone(),
            self.holder.clone(),
            self.leadership.clone(),
        );
        // The table's records before the first term are unknown: the
        // writer starts from the view each term brings.
        let writer = tokio::spawn(crate::persist::run(
            target,
            daemon.snapshots(),
            crate::coordination::local::StateSnapshot::default(),
            stop_writer.clone(),
        ));
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
            stop_writer,
            writer,
            keeper,
        }
    }
}

impl RunningCoordination {
    /// After the daemon has drained its jobs and published its last
    /// snapshot: the shared state not yet written is flushed (bounded),
    /// then the lease is released so a standby takes over at its next look.
    pub(crate) async fn stop(self) {
        let flush = crate::coordination::FLUSH_GRACE;
        self.stop_writer.cancel();
        // The writer bounds its flush itself; this bounds a hung request.
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
pub(crate) async fn start_membership(
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

/// Follows the elector's word into `tx` until the elector ends: `update`
/// writes what `tx` holds from it and says whether that changed (receivers
/// are told only then).
fn mirror<T: Send + Sync + 'static>(
    mut from: tokio::sync::watch::Receiver<crate::coordination::Leadership>,
    tx: tokio::sync::watch::Sender<T>,
    update: impl Fn(&crate::coordination::Leadership, &mut T) -> bool + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            {
                let leadership = from.borrow_and_update();
                tx.send_if_modified(|held| update(&leadership, held));
            }
            if from.changed().await.is_err() {
                return;
            }
        }
    });
}
