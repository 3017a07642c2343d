//! Reloads: a new config is taken in off the loop (its clients built by
//! [`super::clients`], keeping what did not change), then applied to the
//! running daemon as a diff of the connections: [`diff`] decides, a pure
//! function of the running connections and the wanted ones, and
//! [`Daemon::apply_reload`] carries the diff out, in its order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::clients::{Runner, build_rotator};
use super::{Daemon, Listed, Mode};
use crate::config::{Config, ConnectionConfig};
use crate::connection::{Event, Policy};
use crate::remote::sts::StsRequest;
use crate::rotation::Rotator;

/// A new config for the running daemon: after a SIGHUP, or a re-listing
/// that changed the set of connections.
#[derive(Debug)]
pub struct Reload {
    /// The config, its connections the resolved set.
    pub config: Config,
    /// The clients built for it by whoever sent it (`run`'s discovery
    /// supervisor, which lists with them): rotation then shares its request
    /// gate and IMS token instead of building a second set. `None` (tests,
    /// fixed runners): the daemon builds them itself.
    pub rotator: Option<Arc<Rotator>>,
}

impl From<Config> for Reload {
    fn from(config: Config) -> Self {
        Self {
            config,
            rotator: None,
        }
    }
}

/// A reload whose clients are ready.
pub(super) struct Prepared {
    config: Config,
    runner: Runner,
}

/// What a reload does to the running connections, in the order it is done:
/// the removed ones go first, then each wanted one in the new config's order.
#[derive(Debug, Default)]
pub(super) struct ReloadDiff {
    /// Running connections the new config does not have (in the order they
    /// were handed to [`diff`]).
    pub(super) removed: Vec<String>,
    /// Every connection of the new config, in its order, with what it is to
    /// the running daemon.
    pub(super) wanted: Vec<Wanted>,
}

/// A connection of the new config.
#[derive(Debug)]
pub(super) struct Wanted {
    /// Its settings in the new config.
    pub(super) config: Arc<ConnectionConfig>,
    /// Its STS identity in the new config (the interned copy).
    pub(super) sts: Arc<StsRequest>,
    /// What it is to the running daemon.
    pub(super) change: Change,
}

/// What a wanted connection is to the running daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    /// Not running: it starts now.
    Added,
    /// Running with another sandbox or another STS identity: it rotates with
    /// the new settings once its job (if any) ends.
    Changed,
    /// Running with the same sandbox and STS identity: it keeps its state and
    /// schedule. Its other settings (a new name) may still differ, so it is
    /// handed the new settings all the same.
    Unchanged,
}

impl ReloadDiff {
    /// How many wanted connections are `change`.
    pub(super) fn count(&self, change: Change) -> usize {
        self.wanted.iter().filter(|w| w.change == change).count()
    }
}

/// The diff from the `running` connections (id, settings, STS identity) to
/// the `wanted` ones. Only a sandbox or an STS identity makes a running
/// connection [`Change::Changed`]: those are what decide where the
/// credentials go and whose they are.
///
/// Ids in `wanted` are unique (the config's check refuses a repeated id); a
/// repeated one would be compared with the entry before it, as the running
/// connection the first one left.
pub(super) fn diff<'a>(
    running: impl IntoIterator<Item = (&'a str, &'a ConnectionConfig, &'a StsRequest)>,
    wanted: Vec<(Arc<ConnectionConfig>, Arc<StsRequest>)>,
) -> ReloadDiff {
    let wanted_ids: HashSet<&str> = wanted.iter().map(|(c, _)| c.id.as_str()).collect();
    let mut present: HashMap<&str, (&ConnectionConfig, &StsRequest)> = HashMap::new();
    let mut removed = Vec::new();
    for (id, config, sts) in running {
        if wanted_ids.contains(id) {
            present.insert(id, (config, sts));
        } else {
            removed.push(id.to_owned());
        }
    }
    let changes: Vec<Change> = wanted
        .iter()
        .map(
            |(config, sts)| match present.insert(&config.id, (config, sts)) {
                None => Change::Added,
                Some((before, before_sts)) => {
                    if before.sandbox != config.sandbox || *before_sts != **sts {
                        Change::Changed
                    } else {
                        Change::Unchanged
                    }
                }
            },
        )
        .collect();
    drop((present, wanted_ids));
    let wanted = wanted
        .into_iter()
        .zip(changes)
        .map(|((config, sts), change)| Wanted {
            config,
            sts,
            change,
        })
        .collect();
    ReloadDiff { removed, wanted }
}

impl Daemon {
    /// Builds the clients for a new config off the loop (loading AWS config
    /// can take seconds); the result comes back through `done`.
    pub(super) fn prepare_reload(
        &self,
        reload: Reload,
        done: mpsc::Sender<anyhow::Result<Prepared>>,
    ) {
        let Reload {
            config,
            rotator: built,
        } = reload;
        // Before the start's own READY=1 systemd would ignore RELOADING=1
        // (and take the READY=1 after it for the end of the start).
        if self.readiness.ready_sent() {
            self.notifier.reloading();
        }
        for (key, changed) in [
            (
                "[admin] listen",
                config.admin.listen != self.config.admin.listen,
            ),
            ("[state] path", config.state.path != self.config.state.path),
            (
                "[coordination]",
                config.coordination != self.config.coordination,
            ),
        ] {
            if changed {
                tracing::warn!(
                    key,
                    "this setting changes only on restart; the running value stays"
                );
            }
        }
        match (&self.runner, built) {
            (Runner::Fixed(runner), _) => {
                let runner = Runner::Fixed(Arc::clone(runner));
                tokio::spawn(async move { done.send(Ok(Prepared { config, runner })).await });
            }
            (Runner::Real(_), Some(built)) => {
                let runner = Runner::Real(built);
                tokio::spawn(async move { done.send(Ok(Prepared { config, runner })).await });
            }
            (Runner::Real(rotator), None) => {
                let (old, rotator) = (self.config.clone(), Arc::clone(rotator));
                let (options, telemetry) = (self.options.clone(), Arc::clone(&self.telemetry));
                tokio::spawn(async move {
                    let built =
                        build_rotator(&config, &options, &telemetry, Some((&old, &rotator))).await;
                    let prepared = built.map(|rotator| Prepared {
                        config,
                        runner: Runner::Real(Arc::new(rotator)),
                    });
                    done.send(prepared).await
                });
            }
        }
    }

    /// Tells systemd the reload is over: `READY=1` with the status, as its
    /// reload protocol asks, but only once the start's own `READY=1` (the
    /// first pass) went out. Before that a `READY=1` would end the start
    /// early, so the status alone goes.
    fn reload_done(&self) {
        let line = self.status_line();
        if self.readiness.ready_sent() {
            self.notifier.reloaded(&line);
        } else {
            self.notifier.status(&line);
        }
    }

    /// Applies a validated config as a [`diff`] of the selected connections:
    /// new connections start now, removed ones go once their job ends,
    /// changed ones (sandbox or STS identity) rotate with the new settings
    /// once their job ends, unchanged ones keep their state and schedule.
    /// Keys that need a restart keep their running values; identities no
    /// connection uses any more are forgotten, here and in the STS cache.
    pub(super) fn apply_reload(&mut self, prepared: anyhow::Result<Prepared>) {
        let Prepared { mut config, runner } = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "config reload failed, keeping the running config");
                self.reload_done();
                return;
            }
        };
        // Keys that need a restart keep their running values.
        config.admin.listen = self.config.admin.listen;
        config.state.path = self.config.state.path.clone();
        config.coordination = self.config.coordination.clone();
        let now = self.clock.now();
        let wanted: Vec<(Arc<ConnectionConfig>, Arc<StsRequest>)> = self
            .selected(std::mem::take(&mut config.connections))
            .into_iter()
            .map(|connection| {
                let sts = StsRequest::for_connection(&config, &connection);
                (connection, self.identities.intern(sts))
            })
            .collect();
        let running = self
            .connections
            .values()
            .map(|c| (c.config().id.as_str(), &**c.config(), &**c.sts()));
        let diff = diff(running, wanted);
        let (added, changed) = (diff.count(Change::Added), diff.count(Change::Changed));
        let removed = diff.removed.len();
        for id in &diff.removed {
            self.event_for(id, Event::Removed);
        }
        for Wanted {
            config: connection,
            sts,
            change,
        } in diff.wanted
        {
            match change {
                Change::Added => self.add_connection(connection, sts, now, Listed::default()),
                // Unchanged ones too: a new name applies at once.
                Change::Changed | Change::Unchanged => {
                    let id = connection.id.clone();
                    self.event_for(&id, Event::Changed(connection, sts));
                }
            }
        }
        self.policy = Policy::new(&config.rotation, self.options.mode == Mode::Once);
        self.config = config;
        self.runner = runner;
        // The identities still held (by a connection, or a job in flight):
        // one clone each, not one per connection.
        let in_use = self.identities.prune();
        self.runner.job_runner().retain(&in_use);
        // `refresh_before` may have changed what every view says.
        self.publisher.changed();
        tracing::info!(
            added,
            removed,
            changed,
            connections = self.connections.len(),
            "config reloaded"
        );
        self.reload_done();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn connection(id: &str, sandbox: &str, name: &str) -> Arc<ConnectionConfig> {
        Arc::new(ConnectionConfig {
            id: id.to_owned(),
            sandbox: sandbox.to_owned(),
            name: name.to_owned(),
            ..ConnectionConfig::default()
        })
    }

    fn sts(session: &str) -> Arc<StsRequest> {
        Arc::new(StsRequest {
            role_arn: None,
            external_id: None,
            session_name: session.to_owned(),
            session_policy: None,
            policy_arns: Vec::new(),
            duration: Duration::from_secs(3600),
            attribution: Ok(crate::config::ExpandedAttribution::default()),
        })
    }

    type Entry = (Arc<ConnectionConfig>, Arc<StsRequest>);

    /// A connection `id` in `sandbox`, named after its id, on identity `session`.
    fn entry(id: &str, sandbox: &str, session: &str) -> Entry {
        (connection(id, sandbox, id), sts(session))
    }

    fn run(running: &[Entry], wanted: &[Entry]) -> ReloadDiff {
        diff(
            running.iter().map(|(c, s)| (c.id.as_str(), &**c, &**s)),
            wanted.to_vec(),
        )
    }

    /// The wanted ids with what each is, in the diff's order.
    fn steps(diff: &ReloadDiff) -> Vec<(&str, Change)> {
        diff.wanted
            .iter()
            .map(|w| (w.config.id.as_str(), w.change))
            .collect()
    }

    #[test]
    fn a_diff_sorts_the_connections_into_removed_added_changed_and_unchanged() {
        let running = [
            entry("kept", "prod", "a"),
            entry("gone", "prod", "a"),
            entry("moved", "prod", "a"),
        ];
        let wanted = [
            entry("kept", "prod", "a"),
            entry("moved", "dev", "a"),
            entry("new", "prod", "a"),
        ];
        let diff = run(&running, &wanted);
        assert_eq!(diff.removed, ["gone"]);
        assert_eq!(
            steps(&diff),
            [
                ("kept", Change::Unchanged),
                ("moved", Change::Changed),
                ("new", Change::Added),
            ]
        );
        assert_eq!(diff.count(Change::Added), 1);
        assert_eq!(diff.count(Change::Changed), 1);
        assert_eq!(diff.count(Change::Unchanged), 1);
    }

    #[test]
    fn a_move_to_another_sandbox_is_a_change() {
        let diff = run(&[entry("c", "prod", "a")], &[entry("c", "dev", "a")]);
        assert_eq!(steps(&diff), [("c", Change::Changed)]);
        assert_eq!(diff.wanted[0].config.sandbox, "dev");
    }

    #[test]
    fn another_sts_identity_is_a_change() {
        let diff = run(&[entry("c", "prod", "a")], &[entry("c", "prod", "b")]);
        assert_eq!(steps(&diff), [("c", Change::Changed)]);
        assert_eq!(diff.wanted[0].sts.session_name, "b");
    }

    /// An equal identity in another allocation is the same identity: the
    /// comparison is by value, not by pointer.
    #[test]
    fn an_equal_sts_identity_in_another_copy_is_no_change() {
        let running = [entry("c", "prod", "a")];
        let wanted = [entry("c", "prod", "a")];
        assert!(!Arc::ptr_eq(&running[0].1, &wanted[0].1));
        assert_eq!(steps(&run(&running, &wanted)), [("c", Change::Unchanged)]);
    }

    /// A new name is no change of target or identity, but the connection is
    /// still handed its new settings (the apply sends `Event::Changed` for
    /// every running connection that stays), so the name applies at once.
    #[test]
    fn a_rename_alone_is_unchanged_but_carries_the_new_settings() {
        let running = [(connection("c", "prod", "old name"), sts("a"))];
        let wanted = [(connection("c", "prod", "new name"), sts("a"))];
        let diff = run(&running, &wanted);
        assert_eq!(steps(&diff), [("c", Change::Unchanged)]);
        assert_eq!(diff.wanted[0].config.name, "new name");
        assert!(Arc::ptr_eq(&diff.wanted[0].config, &wanted[0].0));
        assert!(Arc::ptr_eq(&diff.wanted[0].sts, &wanted[0].1));
    }

    #[test]
    fn the_diff_keeps_the_wanted_order_and_the_running_order_of_removals() {
        let running = [
            entry("r1", "prod", "a"),
            entry("b", "prod", "a"),
            entry("r2", "prod", "a"),
            entry("a", "prod", "a"),
            entry("r3", "prod", "a"),
        ];
        let wanted = [
            entry("z", "prod", "a"),
            entry("a", "dev", "a"),
            entry("y", "prod", "a"),
            entry("b", "prod", "a"),
        ];
        let diff = run(&running, &wanted);
        assert_eq!(diff.removed, ["r1", "r2", "r3"]);
        assert_eq!(
            steps(&diff),
            [
                ("z", Change::Added),
                ("a", Change::Changed),
                ("y", Change::Added),
                ("b", Change::Unchanged),
            ]
        );
    }

    #[test]
    fn an_empty_side_removes_everything_or_adds_everything() {
        let all = [entry("a", "prod", "a"), entry("b", "prod", "a")];
        let emptied = run(&all, &[]);
        assert_eq!(emptied.removed, ["a", "b"]);
        assert!(emptied.wanted.is_empty());
        let started = run(&[], &all);
        assert!(started.removed.is_empty());
        assert_eq!(
            steps(&started),
            [("a", Change::Added), ("b", Change::Added)]
        );
    }

    /// The config's check refuses a repeated id; should one get through, the
    /// second is compared with the first, which the apply has just started.
    #[test]
    fn a_repeated_id_is_compared_with_the_entry_before_it() {
        let wanted = [
            entry("c", "prod", "a"),
            entry("c", "prod", "a"),
            entry("c", "dev", "a"),
        ];
        assert_eq!(
            steps(&run(&[], &wanted)),
            [
                ("c", Change::Added),
                ("c", Change::Unchanged),
                ("c", Change::Changed),
            ]
        );
    }
}
