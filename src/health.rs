//! The periodic connection test (`[rotation] health_check_every`): every
//! period, Flow Service is asked to test each connection with the
//! credentials on it (`GET /connections/{id}/test`, as `verify` does after a
//! PATCH). A connection whose test fails (`result: false`: Flow Service
//! cannot reach S3 with them, e.g. after "revoke active sessions" on the
//! role) and that holds credentials this daemon pushed is sent to the
//! scheduler as a [`RotateNow`]: rotated at once, with credentials from an
//! STS call started after the failure was seen, so a cached (revoked)
//! answer is never pushed. Each answer sets
//! `aep_s3_rotator_connection_test_failing`.
//!
//! A task of its own beside the scheduler, which it reaches through one
//! channel ([`crate::scheduler::Daemon::rotate_on_request`]). It reads the
//! connections from the status board ([`Telemetry::snapshot`]) and gets the
//! current clients and settings through a `watch` (a reload may change
//! both). With `[coordination]` only the leader tests (a standby's fence is
//! closed). One pass tests at most `concurrency` connections at once, and
//! its requests go through the same request gate as rotations.
//!
//! Imports: `rotation` (the clients, [`RotateNow`]), `observe::telemetry`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::observe::telemetry::Telemetry;
use crate::remote::flow::FlowError;
use crate::rotation::{RotateNow, RotationError, Rotator, TokenSource};

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
    /// Tests in flight at most (`[rotation] concurrency`).
    pub concurrency: usize,
    /// The clients.
    pub tester: Arc<dyn ConnectionTester>,
}

impl HealthSettings {
    /// The settings of `config`, testing with `rotator`'s clients.
    pub fn new(config: &crate::config::Config, rotator: Arc<Rotator>) -> Self {
        Self {
            every: config.rotation.health_check_every,
            concurrency: config.rotation.concurrency.get(),
            tester: rotator,
        }
    }
}

/// Runs until `cancel`: a pass every `every` (the first one `every` after
/// the start or after the period changed), nothing while it is off.
pub async fn run(
    mut settings: watch::Receiver<HealthSettings>,
    telemetry: Arc<Telemetry>,
    rotate: mpsc::Sender<RotateNow>,
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
        pass(&current, &telemetry, &rotate, &cancel).await;
        // Passes start `every` apart; one that took longer is followed at once.
        next = Some(started + every);
    }
}

/// One pass over the connections on the board.
pub async fn pass(
    settings: &HealthSettings,
    telemetry: &Telemetry,
    rotate: &mpsc::Sender<RotateNow>,
    cancel: &CancellationToken,
) {
    if !settings.tester.may_act() {
        tracing::debug!("connection tests skipped: this replica does not lead");
        return;
    }
    let connections = telemetry.snapshot();
    let tester = &settings.tester;
    let mut answers = futures::stream::iter(connections.into_iter().map(|status| async move {
        let answer = tester.test(&status.id, &status.sandbox).await;
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
            connection = %status.id,
            sandbox = %status.sandbox,
            name = %status.name
        );
        // Logged in the connection's span; the span is not held across the
        // send below (an entered span must not live across an await).
        let request = span.in_scope(|| match answer {
            Ok(true) => {
                passed += 1;
                telemetry.connection_test(&status.id, true);
                None
            }
            Ok(false) => {
                failed += 1;
                telemetry.connection_test(&status.id, false);
                let Some(access_key_id) = &status.access_key_id else {
                    // Not this daemon's credentials: its own rotation of the
                    // connection is pending or retrying already.
                    tracing::warn!(
                        "connection test failed: Flow Service cannot reach S3 with the connection's credentials (not pushed by this daemon yet)"
                    );
                    return None;
                };
                tracing::warn!(
                    access_key_id = %access_key_id,
                    "connection test failed: Flow Service cannot reach S3 with the credentials on the connection; rotating now with new credentials"
                );
                Some(RotateNow {
                    id: status.id.clone(),
                    fresh_after: *first_failure.get_or_insert(answered_at),
                })
            }
            Err(error) => {
                unknown += 1;
                tracing::warn!(error = %error, "connection test could not run");
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

    use crate::observe::telemetry::ConnectionStatus;

    /// Answers from a map (id → result; absent = an error); counts tests.
    #[derive(Debug, Default)]
    struct Script {
        answers: Mutex<HashMap<String, bool>>,
        tested: Mutex<Vec<String>>,
        standby: bool,
    }

    impl ConnectionTester for Script {
        fn test<'a>(
            &'a self,
            id: &'a str,
            _sandbox: &'a str,
        ) -> BoxFuture<'a, Result<bool, RotationError>> {
            self.tested.lock().unwrap().push(id.to_owned());
            let answer = self.answers.lock().unwrap().get(id).copied();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                answer.ok_or_else(|| {
                    RotationError::Flow(FlowError::Unavailable("HTTP 503".to_owned()))
                })
            })
        }

        fn may_act(&self) -> bool {
            !self.standby
        }
    }

    fn board(entries: &[(&str, Option<&str>)]) -> Arc<Telemetry> {
        let telemetry = Arc::new(Telemetry::new(Duration::from_secs(1200)));
        for (id, key) in entries {
            telemetry.upsert(ConnectionStatus {
                id: (*id).to_owned(),
                name: format!("name-{id}"),
                sandbox: "prod".to_owned(),
                access_key_id: key.map(str::to_owned),
                ..ConnectionStatus::default()
            });
        }
        telemetry
    }

    fn settings(script: Arc<Script>, every: Option<Duration>) -> HealthSettings {
        HealthSettings {
            every,
            concurrency: 2,
            tester: script,
        }
    }

    fn gauge(telemetry: &Telemetry, name: &str) -> Option<String> {
        telemetry
            .render_metrics(crate::clock::wall_now())
            .lines()
            .find(|l| {
                l.starts_with("aep_s3_rotator_connection_test_failing{")
                    && l.contains(&format!("connection=\"{name}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_test_of_pushed_credentials_asks_for_a_rotation_now() {
        let telemetry = board(&[
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
            &telemetry,
            &tx,
            &CancellationToken::new(),
        )
        .await;
        drop(tx);
        let mut asked = Vec::new();
        while let Some(request) = rx.recv().await {
            assert!(request.fresh_after >= before);
            asked.push(request);
        }
        // c3 holds no credentials of ours; c4's test could not run.
        let ids: Vec<&str> = asked.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(ids.contains(&"c2") && ids.contains(&"c5"), "{ids:?}");
        // One moment for the pass: connections sharing an identity share a call.
        assert_eq!(asked[0].fresh_after, asked[1].fresh_after);
        assert_eq!(script.tested.lock().unwrap().len(), 5);
        assert_eq!(gauge(&telemetry, "name-c1").as_deref(), Some("0"));
        assert_eq!(gauge(&telemetry, "name-c2").as_deref(), Some("1"));
        assert_eq!(gauge(&telemetry, "name-c3").as_deref(), Some("1"));
        assert_eq!(gauge(&telemetry, "name-c4"), None, "never answered");
    }

    #[tokio::test(start_paused = true)]
    async fn passes_come_every_period_and_only_while_leading_and_on() {
        let telemetry = board(&[("c1", Some("ASIAOLD1"))]);
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
        let task = tokio::spawn(run(settings_rx, telemetry, tx, cancel.clone()));
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
