//! Reloads: a new config is taken in off the loop (its clients built by
//! [`super::clients`], keeping what did not change), then applied to the
//! running daemon as a diff of the connections.

use std::collections::HashSet;
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
        self.notifier.reloading();
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

    /// Applies a validated config as a diff: new connections start now,
    /// removed ones go once their job ends, changed ones (sandbox or STS
    /// identity) rotate with the new settings once their job ends, unchanged
    /// ones keep their state and schedule.
    pub(super) fn apply_reload(&mut self, prepared: anyhow::Result<Prepared>) {
        let Prepared { mut config, runner } = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "config reload failed, keeping the running config");
                self.notifier.reloaded(&self.status_line());
                return;
            }
        };
        // Keys that need a restart keep their running values.
        config.admin.listen = self.config.admin.listen;
        config.state.path = self.config.state.path.clone();
        config.coordination = self.config.coordination.clone();
        let now = self.clock.now();
        let wanted: Vec<Arc<ConnectionConfig>> =
            self.selected(std::mem::take(&mut config.connections));
        let wanted_ids: HashSet<&str> = wanted.iter().map(|c| c.id.as_str()).collect();
        let removed: Vec<String> = self
            .connections
            .keys()
            .filter(|id| !wanted_ids.contains(id.as_str()))
            .cloned()
            .collect();
        for id in &removed {
            self.event(id, Event::Removed);
        }
        let (mut added, mut changed) = (0usize, 0usize);
        drop(wanted_ids);
        for connection in wanted {
            let sts = self
                .identities
                .intern(StsRequest::for_connection(&config, &connection));
            let id = connection.id.clone();
            match self.connections.get(&id) {
                Some(current) => {
                    if current.config().sandbox != connection.sandbox || *current.sts() != *sts {
                        changed += 1;
                    }
                    self.event(&id, Event::Changed(connection, sts));
                }
                None => {
                    added += 1;
                    self.add_connection(connection, sts, now, Listed::default());
                }
            }
        }
        self.policy = Policy::new(&config.rotation, self.options.mode == Mode::Once);
        self.config = config;
        self.runner = runner;
        self.identities.prune();
        let in_use: HashSet<StsRequest> =
            self.connections.values().map(|c| c.sts().clone()).collect();
        self.runner.job_runner().retain(&in_use);
        // `refresh_before` may have changed what every view says.
        self.publisher.changed();
        tracing::info!(
            added,
            removed = removed.len(),
            changed,
            connections = self.connections.len(),
            "config reloaded"
        );
        self.notifier.reloaded(&self.status_line());
    }
}
