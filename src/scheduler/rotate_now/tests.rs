//! `rotate` requests through the real loop, on paused time, with a
//! scripted job runner: which job answers, and that none runs twice.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::super::{Daemon, Mode, Options, Parts, Runner};
use super::*;
use crate::clock::Clock;
use crate::config::Config;
use crate::observe::notify::Notifier;
use crate::observe::telemetry::Telemetry;
use crate::remote::sts::SourceIdentity;
use crate::rotation::{Job, JobRunner};

const S: fn(u64) -> Duration = Duration::from_secs;

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + S(1_700_000_000)
}

fn config(ids: &[(&str, &str)]) -> Config {
    let mut text = r#"[adobe]
client_id = "cid"
client_secret = "not-a-real-secret"
org_id = "0123456789ABCDEF01234567@AdobeOrg"

[aws]
role_arn = "arn:aws:iam::123456789012:role/aep"

[rotation]
session_duration = "1h"
refresh_before = "20m"
jitter = "0s"
concurrency = 2
"#
    .to_owned();
    for (id, sandbox) in ids {
        text.push_str(&format!(
            "\n[[connections]]\nid = \"{id}\"\nsandbox = \"{sandbox}\"\n"
        ));
    }
    Config::from_toml_str(&text, Vec::new()).unwrap()
}

/// Every job: (id, started at, fresh after). Each takes `took`, then
/// rotates with a key naming its start order.
#[derive(Debug)]
struct Recorder {
    clock: Clock,
    took: Duration,
    jobs: Mutex<Vec<(String, SystemTime, Option<SystemTime>)>>,
}

impl JobRunner for Recorder {
    fn run<'a>(&'a self, job: &'a Job, _: &'a CancellationToken) -> BoxFuture<'a, JobResult> {
        Box::pin(async move {
            let now = self.clock.now();
            let n = {
                let mut jobs = self.jobs.lock().unwrap();
                // The request's moment on the test's wall clock.
                let fresh = job
                    .fresh_after
                    .map(|at| now - crate::clock::mono_now().duration_since(at));
                jobs.push((job.id.clone(), now, fresh));
                jobs.len()
            };
            tokio::time::sleep(self.took).await;
            JobResult::Rotated {
                access_key_id: format!("ASIAJOB{n:04}"),
                expires_at: self.clock.now() + S(3600),
                etag: Some("\"e\"".to_owned()),
                conflicts: 0,
                s3: None,
                verified: None,
            }
        })
    }
}

struct Running {
    requests: mpsc::Sender<RotateRequest>,
    recorder: Arc<Recorder>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<crate::scheduler::Report>>,
}

fn start(ids: &[(&str, &str)], took: Duration) -> Running {
    let clock = Clock::tokio_at(t0());
    let config = config(ids);
    let recorder = Arc::new(Recorder {
        clock,
        took,
        jobs: Mutex::new(Vec::new()),
    });
    let options = Options {
        mode: Mode::Run,
        dry_run: false,
        only: Vec::new(),
        identity: SourceIdentity::DefaultChain,
        fence: None,
    };
    let runner: Arc<dyn JobRunner> = recorder.clone();
    let mut daemon = Daemon::new(Parts {
        config,
        options,
        telemetry: Arc::new(Telemetry::new()),
        notifier: Notifier::default(),
        clock,
        runner: Runner::Fixed(runner),
        snapshots: None,
    });
    let (tx, rx) = mpsc::channel(4);
    daemon.serve_rotate_requests(rx);
    let cancel = CancellationToken::new();
    let (_reloads_tx, reloads) = mpsc::channel(1);
    let task = tokio::spawn(daemon.run(cancel.clone(), reloads));
    Running {
        requests: tx,
        recorder,
        cancel,
        task,
    }
}

impl Running {
    async fn ask(&self, selection: Selection) -> Result<Vec<Pending>, RotateRefusal> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(RotateRequest { selection, reply })
            .await
            .unwrap();
        answer.await.unwrap()
    }

    fn jobs(&self) -> Vec<(String, SystemTime, Option<SystemTime>)> {
        self.recorder.jobs.lock().unwrap().clone()
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn outcomes(pending: Vec<Pending>) -> Vec<(String, RotateOutcome)> {
    let mut out = Vec::new();
    for p in pending {
        out.push((p.id, p.outcome.await.unwrap()));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn rotate_all_runs_one_fresh_job_per_connection_at_once_and_answers_with_it() {
    let daemon = start(&[("c1", "prod"), ("c2", "dev")], S(1));
    // The first pass, then idle until 40 min.
    tokio::time::sleep(S(600)).await;
    assert_eq!(daemon.jobs().len(), 2);
    let asked = t0() + S(600);
    let pending = daemon.ask(Selection::All).await.unwrap();
    let answered = outcomes(pending).await;
    assert_eq!(answered.len(), 2);
    for (id, outcome) in &answered {
        match outcome {
            RotateOutcome::Pushed { access_key_id, .. } => {
                assert!(
                    access_key_id == "ASIAJOB0003" || access_key_id == "ASIAJOB0004",
                    "{id}: {access_key_id}"
                );
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    let jobs = daemon.jobs();
    assert_eq!(jobs.len(), 4);
    for (_, started, fresh) in &jobs[2..] {
        assert_eq!(*started, asked, "requested jobs start at once");
        assert_eq!(*fresh, Some(asked));
    }
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_during_a_job_is_answered_by_the_next_job_not_the_running_one() {
    // Jobs take 10 s: the request at 2 s finds c1's first job in flight.
    let daemon = start(&[("c1", "prod")], S(10));
    tokio::time::sleep(S(2)).await;
    let pending = daemon.ask(Selection::All).await.unwrap();
    let answered = outcomes(pending).await;
    let jobs = daemon.jobs();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert_eq!(jobs[0].2, None);
    // The second job started when the first ended (10 s), not beside it.
    assert_eq!(jobs[1].1, t0() + S(10));
    assert_eq!(jobs[1].2, Some(t0() + S(2)));
    assert_eq!(
        answered[0].1,
        RotateOutcome::Pushed {
            access_key_id: "ASIAJOB0002".to_owned(),
            expires_at: t0() + S(20) + S(3600),
        }
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn unknown_ids_and_empty_sandboxes_are_named_and_nothing_starts() {
    let daemon = start(&[("c1", "prod"), ("c2", "dev")], S(1));
    tokio::time::sleep(S(60)).await;
    let refusal = daemon
        .ask(Selection::Only {
            connections: vec!["c1".to_owned(), "nope".to_owned()],
            sandboxes: vec!["stage".to_owned()],
        })
        .await
        .unwrap_err();
    assert_eq!(
        refusal,
        RotateRefusal::Unknown {
            connections: vec!["nope".to_owned()],
            sandboxes: vec!["stage".to_owned()],
        }
    );
    tokio::time::sleep(S(60)).await;
    assert_eq!(daemon.jobs().len(), 2, "the first pass only");
    // A sandbox selects its connections only.
    let pending = daemon
        .ask(Selection::Only {
            connections: Vec::new(),
            sandboxes: vec!["dev".to_owned()],
        })
        .await
        .unwrap();
    let answered = outcomes(pending).await;
    assert_eq!(answered.len(), 1);
    assert_eq!(answered[0].0, "c2");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_the_daemon_cannot_finish_is_dropped_unanswered_at_shutdown() {
    let daemon = start(&[("c1", "prod")], S(30));
    tokio::time::sleep(S(1)).await;
    let pending = daemon.ask(Selection::All).await.unwrap();
    daemon.stop().await;
    for p in pending {
        // Its job never ran: the receiver sees the sender dropped.
        assert!(p.outcome.await.is_err());
    }
}

#[tokio::test(start_paused = true)]
async fn a_name_selects_the_one_connection_that_has_it_and_a_shared_name_none() {
    // `config` writes the sandbox into a TOML string: the name rides along.
    let daemon = start(
        &[
            ("c1", "prod\"\nname = \"sales"),
            ("c2", "dev\"\nname = \"clicks"),
            ("c3", "stage\"\nname = \"clicks"),
        ],
        S(1),
    );
    tokio::time::sleep(S(60)).await;
    let pending = daemon
        .ask(Selection::Only {
            connections: vec!["sales".to_owned(), "c2".to_owned()],
            sandboxes: Vec::new(),
        })
        .await
        .unwrap();
    let ids: Vec<String> = pending.iter().map(|p| p.id.clone()).collect();
    assert_eq!(ids, ["c1", "c2"]);
    outcomes(pending).await;
    // Thousands of names, none known: every one named back, nothing started.
    let many: Vec<String> = (0..20_000).map(|i| format!("n{i}")).collect();
    let refusal = daemon
        .ask(Selection::Only {
            connections: [vec!["clicks".to_owned()], many.clone()].concat(),
            sandboxes: many.clone(),
        })
        .await
        .unwrap_err();
    let RotateRefusal::Unknown {
        connections,
        sandboxes,
    } = refusal
    else {
        panic!("{refusal:?}");
    };
    assert_eq!(connections.len(), 20_001, "a shared name is no one's");
    assert_eq!(connections[0], "clicks");
    assert_eq!(sandboxes.len(), 20_000);
    let pending = daemon
        .ask(Selection::Only {
            connections: Vec::new(),
            sandboxes: vec!["dev".to_owned(), "stage".to_owned()],
        })
        .await
        .unwrap();
    let ids: Vec<String> = pending.iter().map(|p| p.id.clone()).collect();
    assert_eq!(ids, ["c2", "c3"]);
    daemon.stop().await;
}
