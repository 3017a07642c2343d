//! The periodic connection test (`[rotation] health_check_every`): every
//! period, Flow Service is asked to test each connection with the
//! credentials on it (`GET /connections/{id}/test`, as `verify` does after a
//! PATCH). A connection whose test fails (`result: false`: Flow Service
//! cannot reach S3 with them, e.g. after "revoke active sessions" on the
//! role) and that holds credentials this daemon pushed is rotated at once,
//! with credentials from an STS call started after the failure was seen, so
//! a cached (revoked) answer is never pushed. Every answer goes to the
//! scheduler as a [`Tested`]: the connection records it
//! (`aep_s3_rotator_connection_test_failing`).
//!
//! A task of its own beside the scheduler, which it reaches through one
//! channel ([`crate::scheduler::Daemon::take_health_answers`]). It reads the
//! connections from the scheduler's snapshots and gets the current clients
//! and settings through a `watch` (a reload may change both). With `[coordination]` only the leader tests (a standby's fence is
//! closed). One pass tests at most half of `concurrency` connections at
//! once ([`pass_width`]), and its requests go through the same request gate
//! as rotations: a test endpoint that hangs holds at most half the gate's
//! slots, and rotations keep the rest. A test that could not run because
//! another request failed (no IMS token) logs at `debug`, as a rotation
//! does: an IMS outage is one warning, not one per connection.
//!
//! Imports: `rotation` (the clients, [`Tested`]), `observe::status`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::observe::status::Snapshots;
use crate::remote::flow::FlowError;
use crate::rotation::{RotationError, Rotator, Tested, TokenSource};

/// Something that can test a connection: [`Rotator`]'s Flow and IMS
/// clients in the daemon, a script in tests.
pub trait ConnectionTester: Send + Sync + std::fmt::Debug {
    /// `GET /connections/{id}/test`: `Ok(true)` = Flow Service reached S3.
    fn test<'a>(
        &'a self,
        id: &'a str,
        sandbox: &'a str,
    ) -> BoxFuture<'a, Result<bool, RotationError>>;
    /// Whether this replica may act now (`[coordination]`: holds the lease).
    fn may_act(&self) -> bool;
}

impl ConnectionTester for Rotator {
    fn test<'a>(
        &'a self,
        id: &'a str,
        sandbox: &'a str,
    ) -> BoxFuture<'a, Result<bool, RotationError>> {
        Box::pin(async move {
            let mut refreshed = false;
            loop {
                let token = TokenSource::token(&*self.ims).await?;
                match self.flow.test_connection(id, sandbox, &token).await {
                    // An IMS token Flow Service refused: a new one, once.
                    Err(FlowError::Unauthorized(_)) if !refreshed => {
                        refreshed = true;
                        TokenSource::invalidate(&*self.ims, &token).await;
                    }
                    other => return other.map_err(RotationError::from),
                }
            }
        })
    }

    fn may_act(&self) -> bool {
        self.fence.as_ref().is_none_or(|fence| fence.is_open())
    }
}

/// What the health check runs with; sent again on every reload.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// `[rotation] health_check_every` (`None`: off).
    pub every: Option<Duration>,
    /// Tests in flight at most ([`pass_width`] of `[rotation] concurrency`).
    pub concurrency: usize,
    /// The clients.
    pub tester: Arc<dyn ConnectionTester>,
}

impl HealthSettings {
    /// The settings of `config`, testing with `rotator`'s clients.
    pub fn new(config: &crate::config::Config, rotator: Arc<Rotator>) -> Self {
        Self {
            every: config.rotation.health_check_every,
            concurrency: pass_width(config.rotation.concurrency.get()),
            tester: rotator,
        }
    }
}

/// How many connections a pass tests at once: half the request gate's
/// `concurrency` slots (at least one), so that tests which hang (each for up
/// to `request_timeout`) never hold the slots rotations need.
pub fn pass_width(concurrency: usize) -> usize {
    (concurrency / 2).max(1)
}

/// Runs until `cancel`: a pass every `every` (the first one `every` after
/// the start or after the period changed), nothing while it is off.
pub async fn run(
    mut settings: watch::Receiver<HealthSettings>,
    snapshots: Snapshots,
    rotate: mpsc::Sender<Tested>,
    cancel: CancellationToken,
) {
    let mut next: Option<tokio::time::Instant> = None;
    let mut period = settings.borrow().every;
    loop {
        let current = settings.borrow_and_update().clone();
        if current.every != period {
            period = current.every;
            next = None;
        }
        let Some(every) = period else {
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = settings.changed() => if changed.is_err() { return },
            }
            continue;
        };
        let due = *next.get_or_insert_with(|| crate::clock::mono_now() + every);
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = settings.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            () = tokio::time::sleep_until(due) => {}
        }
        let started = crate::clock::mono_now();
        pass(&current, &snapshots, &rotate, &cancel).await;
        // Passes start `every` apart; one that took longer is followed at once.
        next = Some(started + every);
    }
}

/// One pass over the connections of the last snapshot.
pub async fn pass(
    settings: &HealthSettings,
    snapshots: &Snapshots,
    rotate: &mpsc::Sender<Tested>,
    cancel: &CancellationToken,
) {
    if !settings.tester.may_act() {
        tracing::debug!("connection tests skipped: this replica does not lead");
        return;
    }
    let snapshot = Arc::clone(&snapshots.borrow());
    let connections = snapshot.connections.clone();
    let tester = &settings.tester;
    let mut answers = futures::stream::iter(connections.into_iter().map(|status| async move {
        let answer = tester.test(status.id(), status.sandbox()).await;
        (status, answer, crate::clock::mono_now())
    }))
    .buffer_unordered(settings.concurrency.max(1));
    // Credentials asked for after the first failure of the pass was seen:
    // one moment for the whole pass, so connections sharing an STS identity
    // share one new call (each answer's own moment would force one call per
    // connection). A revocation between that moment and a later failure of
    // the same pass is caught by the pre-push check's eviction, or by the
    // next pass.
    let mut first_failure: Option<tokio::time::Instant> = None;
    let (mut passed, mut failed, mut unknown) = (0u64, 0u64, 0u64);
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => return,
            next = answers.next() => next,
        };
        let Some((status, answer, answered_at)) = next else {
            break;
        };
        let span = tracing::info_span!(
            "connection",
            connection = %status.id(),
            sandbox = %status.sandbox(),
            name = %status.name()
        );
        // Logged in the connection's span; the span is not held across the
        // send below (an entered span must not live across an await).
        let request = span.in_scope(|| match answer {
            Ok(true) => {
                passed += 1;
                Some(Tested {
                    id: status.id().to_owned(),
                    passed: true,
                    rotate_after: None,
                })
            }
            Ok(false) => {
                failed += 1;
                let Some(access_key_id) = &status.access_key_id else {
                    // Not this daemon's credentials: its own rotation of the
                    // connection is pending or retrying already.
                    tracing::warn!(
                        "connection test failed: Flow Service cannot reach S3 with the connection's credentials (not pushed by this daemon yet)"
                    );
                    return Some(Tested {
                        id: status.id().to_owned(),
                        passed: false,
                        rotate_after: None,
                    });
                };
                tracing::warn!(
                    access_key_id = %access_key_id,
                    "connection test failed: Flow Service cannot reach S3 with the credentials on the connection; rotating now with new credentials"
                );
                Some(Tested {
                    id: status.id().to_owned(),
                    passed: false,
                    rotate_after: Some(*first_failure.get_or_insert(answered_at)),
                })
            }
            Err(error) => {
                unknown += 1;
                if error.is_shared() {
                    // Another request's failure (no IMS token: every test of
                    // the pass gets the same answer), logged once where it
                    // happened: during an IMS outage a pass over 10,000
                    // connections would otherwise write 10,000 warnings.
                    tracing::debug!(error = %error, "connection test could not run");
                } else {
                    tracing::warn!(error = %error, "connection test could not run");
                }
                None
            }
        });
        if let Some(request) = request {
            tokio::select! {
                () = cancel.cancelled() => return,
                sent = rotate.send(request) => if sent.is_err() { return },
            }
        }
    }
    tracing::info!(passed, failed, unknown, "connection tests done");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    use crate::observe::status::{ConnectionStatus, Snapshot, snapshot_channel};

    /// Answers from a map (id → result; absent = an error: IMS's shared
    /// failure when `ims_down`, else a Flow 503); counts tests.
    #[derive(Debug, Default)]
    struct Script {
        answers: Mutex<HashMap<String, bool>>,
        tested: Mutex<Vec<String>>,
        standby: bool,
        ims_down: bool,
    }

    impl ConnectionTester for Script {
        fn test<'a>(
            &'a self,
            id: &'a str,
            _sandbox: &'a str,
        ) -> BoxFuture<'a, Result<bool, RotationError>> {
            self.tested.lock().unwrap().push(id.to_owned());
            let answer = self.answers.lock().unwrap().get(id).copied();
            let ims_down = self.ims_down;
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                answer.ok_or_else(|| {
                    if ims_down {
                        RotationError::Ims(crate::remote::ims::ImsError::Shared(Box::new(
                            crate::remote::ims::ImsError::Unavailable(
                                "connection refused".to_owned(),
                            ),
                        )))
                    } else {
                        RotationError::Flow(FlowError::Unavailable("HTTP 503".to_owned()))
                    }
                })
            })
        }

        fn may_act(&self) -> bool {
            !self.standby
        }
    }

    /// The scheduler's snapshot of these connections (id, key pushed).
    fn board(entries: &[(&str, Option<&str>)]) -> Snapshots {
        let (publish, snapshots) = snapshot_channel(Duration::from_secs(1200));
        let connections = entries
            .iter()
            .map(|(id, key)| {
                Arc::new(ConnectionStatus {
                    access_key_id: key.map(str::to_owned),
                    ..ConnectionStatus::named(id, &format!("name-{id}"), "prod")
                })
            })
            .collect();
        publish.send_replace(Arc::new(Snapshot {
            connections,
            refresh_before: Duration::from_secs(1200),
            term: 0,
        }));
        snapshots
    }

    fn settings(script: Arc<Script>, every: Option<Duration>) -> HealthSettings {
        HealthSettings {
            every,
            concurrency: 2,
            tester: script,
        }
    }

    #[test]
    fn a_pass_takes_half_the_request_slots_at_most() {
        assert_eq!(pass_width(32), 16);
        assert_eq!(pass_width(5), 2);
        assert_eq!(pass_width(2), 1);
        assert_eq!(pass_width(1), 1);
    }

    /// Tests that take a slot of the request gate and then hang (Flow
    /// Service's test endpoint stuck).
    #[derive(Debug)]
    struct Hanging {
        gate: Arc<crate::remote::shaping::RequestGate>,
        entered: std::sync::atomic::AtomicUsize,
    }

    impl ConnectionTester for Hanging {
        fn test<'a>(
            &'a self,
            _id: &'a str,
            _sandbox: &'a str,
        ) -> BoxFuture<'a, Result<bool, RotationError>> {
            Box::pin(async move {
                let _slot = self.gate.enter().await;
                self.entered
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::future::pending().await
            })
        }

        fn may_act(&self) -> bool {
            true
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tests_that_hang_leave_rotations_half_the_request_gate() {
        let concurrency = 8;
        let gate = Arc::new(crate::remote::shaping::RequestGate::new(
            std::num::NonZeroUsize::new(concurrency).unwrap(),
            None,
            Duration::from_secs(60),
        ));
        let ids: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
        let entries: Vec<(&str, Option<&str>)> = ids
            .iter()
            .map(|id| (id.as_str(), Some("ASIAOLD")))
            .collect();
        let snapshots = board(&entries);
        let tester = Arc::new(Hanging {
            gate: Arc::clone(&gate),
            entered: std::sync::atomic::AtomicUsize::new(0),
        });
        let settings = HealthSettings {
            every: Some(Duration::from_secs(60)),
            concurrency: pass_width(concurrency),
            tester: tester.clone(),
        };
        let (tx, _rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let running = tokio::spawn(async move { pass(&settings, &snapshots, &tx, &cancel).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            tester.entered.load(std::sync::atomic::Ordering::Relaxed),
            concurrency / 2
        );
        // Rotations still get the other half of the slots, at once.
        let mut held = Vec::new();
        for n in 0..concurrency / 2 {
            let slot = tokio::time::timeout(Duration::from_millis(1), gate.enter()).await;
            held.push(slot.unwrap_or_else(|_| panic!("rotation {n} found no free slot")));
        }
        running.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_test_of_pushed_credentials_asks_for_a_rotation_now() {
        let snapshots = board(&[
            ("c1", Some("ASIAOLD1")),
            ("c2", Some("ASIAOLD2")),
            ("c3", None),
            ("c4", Some("ASIAOLD4")),
            ("c5", Some("ASIAOLD5")),
        ]);
        let script = Arc::new(Script::default());
        script.answers.lock().unwrap().extend([
            ("c1".to_owned(), true),
            ("c2".to_owned(), false),
            ("c3".to_owned(), false),
            ("c5".to_owned(), false),
        ]);
        let (tx, mut rx) = mpsc::channel(16);
        let before = crate::clock::mono_now();
        pass(
            &settings(script.clone(), Some(Duration::from_secs(60))),
            &snapshots,
            &tx,
            &CancellationToken::new(),
        )
        .await;
        drop(tx);
        let mut answers = HashMap::new();
        let mut asked = Vec::new();
        while let Some(answer) = rx.recv().await {
            if let Some(after) = answer.rotate_after {
                assert!(after >= before);
                asked.push((answer.id.clone(), after));
            }
            answers.insert(answer.id.clone(), answer.passed);
        }
        // c3 holds no credentials of ours; c4's test could not run.
        let ids: Vec<&str> = asked.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(ids.contains(&"c2") && ids.contains(&"c5"), "{ids:?}");
        // One moment for the pass: connections sharing an identity share a call.
        assert_eq!(asked[0].1, asked[1].1);
        assert_eq!(script.tested.lock().unwrap().len(), 5);
        // Every answer reaches the scheduler (the connection keeps it: the
        // gauge); an error is no answer.
        assert_eq!(answers.get("c1"), Some(&true));
        assert_eq!(answers.get("c2"), Some(&false));
        assert_eq!(answers.get("c3"), Some(&false));
        assert_eq!(answers.get("c4"), None, "never answered");
    }

    /// The levels of the `connection test could not run` lines a pass
    /// writes, and its summary's `unknown`.
    async fn could_not_run_levels(script: Script) -> (Vec<tracing::Level>, String) {
        let recorder = crate::observe::recorded::record();
        let snapshots = board(&[("c1", Some("K1")), ("c2", Some("K2")), ("c3", None)]);
        let (tx, _rx) = mpsc::channel(16);
        pass(
            &settings(Arc::new(script), Some(Duration::from_secs(60))),
            &snapshots,
            &tx,
            &CancellationToken::new(),
        )
        .await;
        let events = recorder.events();
        let levels = events
            .iter()
            .filter(|e| e.message() == "connection test could not run")
            .map(|e| e.level)
            .collect();
        let unknown = events
            .iter()
            .find(|e| e.message() == "connection tests done")
            .and_then(|e| e.field("unknown"))
            .unwrap_or_default()
            .to_owned();
        (levels, unknown)
    }

    #[tokio::test(start_paused = true)]
    async fn tests_refused_for_want_of_an_ims_token_are_one_warning_not_one_each() {
        // IMS down: every test gets the one failed token request's answer,
        // which the IMS client logged; the pass adds none at warn.
        let (levels, unknown) = could_not_run_levels(Script {
            ims_down: true,
            ..Script::default()
        })
        .await;
        assert_eq!(levels, [tracing::Level::DEBUG; 3]);
        assert_eq!(unknown, "3");
        // A test Flow Service itself failed is each connection's own news.
        let (levels, unknown) = could_not_run_levels(Script::default()).await;
        assert_eq!(levels, [tracing::Level::WARN; 3]);
        assert_eq!(unknown, "3");
    }

    #[tokio::test(start_paused = true)]
    async fn passes_come_every_period_and_only_while_leading_and_on() {
        let snapshots = board(&[("c1", Some("ASIAOLD1"))]);
        let script = Arc::new(Script::default());
        script
            .answers
            .lock()
            .unwrap()
            .insert("c1".to_owned(), false);
        let (settings_tx, settings_rx) =
            watch::channel(settings(script.clone(), Some(Duration::from_secs(60))));
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(settings_rx, snapshots, tx, cancel.clone()));
        let tested = || script.tested.lock().unwrap().len();
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(
            tested(),
            0,
            "the first pass comes one period after the start"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(tested(), 1);
        assert_eq!(rx.recv().await.unwrap().id, "c1");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(tested(), 2);
        // A standby tests nothing.
        let standby = Arc::new(Script {
            standby: true,
            ..Script::default()
        });
        settings_tx
            .send(settings(standby.clone(), Some(Duration::from_secs(60))))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(180)).await;
        assert!(standby.tested.lock().unwrap().is_empty());
        // Off: nothing, until it is on again.
        settings_tx.send(settings(script.clone(), None)).unwrap();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(tested(), 2);
        settings_tx
            .send(settings(script.clone(), Some(Duration::from_secs(10))))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(tested(), 3);
        cancel.cancel();
        task.await.unwrap();
    }
}
