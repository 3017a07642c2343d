//! Harness of the high-availability black-box tests: one simulator (each
//! replica its own IMS client, so its PATCH log tells them apart), one
//! `moto_server` serving DynamoDB (table made by `coordination init`), a TCP proxy in front of moto that a test
//! takes down and brings back (DynamoDB "down" without losing moto's data),
//! and N replicas of the real daemon binary, each with its own holder name,
//! config, admin port and collected JSON log.
//!
//! Include it next to `common` in a test file:
//! `mod common; #[path = "common/ha.rs"] mod ha;`.

// Black-box tests drive the real binaries in real time: they read the real clocks.
#![allow(
    dead_code,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::common::{DaemonProcess, Harness, Moto, Rotation, SOURCE_KEY_ID, SOURCE_SECRET};

/// The table every replica of one test shares (each test has its own moto).
pub const TABLE: &str = "aep-s3-rotator";

/// A DynamoDB client straight at moto (not through the proxy): the test's
/// own view of the table.
pub fn dynamo_client(url: &str) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .endpoint_url(url)
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            SOURCE_KEY_ID,
            SOURCE_SECRET,
            None,
            None,
            "ha-test",
        ))
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// The lease holder as the table says now (`None`: no lease item).
pub async fn lease_holder(client: &aws_sdk_dynamodb::Client) -> Option<String> {
    let item = client
        .get_item()
        .table_name(TABLE)
        .key("pk", AttributeValue::S("lease".to_owned()))
        .key("sk", AttributeValue::S("leader".to_owned()))
        .consistent_read(true)
        .send()
        .await
        .expect("moto answers")
        .item?;
    item.get("holder")?.as_s().ok().cloned()
}

/// The shared state as the table holds it now: connection id → access key id.
pub async fn shared_state_keys(
    client: &aws_sdk_dynamodb::Client,
) -> std::collections::BTreeMap<String, String> {
    let answer = client
        .query()
        .table_name(TABLE)
        .key_condition_expression("pk = :p")
        .expression_attribute_values(":p", AttributeValue::S("state".to_owned()))
        .consistent_read(true)
        .send()
        .await
        .expect("moto answers");
    answer
        .items()
        .iter()
        .filter_map(|item| {
            let id = item.get("sk")?.as_s().ok()?.clone();
            let key = item.get("access_key_id")?.as_s().ok()?.clone();
            Some((id, key))
        })
        .collect()
}

/// A TCP proxy on `127.0.0.1:0` in front of `target`. Down: every new
/// connection is accepted and closed at once and every open one is closed,
/// so a client sees DynamoDB as unreachable while moto keeps its data.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Cancelled (and replaced) when the proxy goes down: closes the open
    /// connections.
    open: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let open = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (up2, open2, stop2) = (Arc::clone(&up), Arc::clone(&open), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop2.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let closed = open2.lock().unwrap().clone();
                let stop3 = stop2.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = closed.cancelled() => {}
                        () = stop3.cancelled() => {}
                    }
                });
            }
        });
        Self {
            addr,
            up,
            open,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// DynamoDB unreachable: open connections closed, new ones refused.
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        open.cancel();
        *open = CancellationToken::new();
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Coordination timings of a test cluster.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub lease: Duration,
    pub renew_every: Duration,
}

impl Timings {
    /// The shortest that validates with room: a 2 s lease (the minimum is
    /// 1 s) renewed every 500 ms (< lease / 2); `refresh_before` must then
    /// be at least 4 s.
    pub const FAST: Timings = Timings {
        lease: Duration::from_secs(2),
        renew_every: Duration::from_millis(500),
    };
}

/// `[rotation]` for HA tests: `refresh_before` = 4 s, twice the 2 s lease
/// (the daemon refuses less); with simulator credentials of 6 s each
/// connection rotates about every 2 s.
pub fn ha_rotation() -> Rotation {
    Rotation::fast().refresh_before("4s").retry_max("1s")
}

/// One replica: holder name = IMS client id = `replica-N`.
pub struct Replica {
    pub name: String,
    pub config: PathBuf,
    pub process: DaemonProcess,
}

/// Simulator + moto + proxy + N replicas.
pub struct Cluster {
    pub h: Harness,
    pub moto: Moto,
    pub proxy: Proxy,
    pub dynamo: aws_sdk_dynamodb::Client,
    pub replicas: Vec<Replica>,
    pub timings: Timings,
}

/// The IMS client secret of replica `name` (test value, never printed by the daemon).
fn replica_secret(name: &str) -> String {
    format!("{name}-client-secret-{}", uuid::Uuid::new_v4().simple())
}

impl Cluster {
    /// `connections` S3 connections whose simulator credentials live
    /// `lifetime`; `n` replicas started at once, all standing by until one
    /// takes the lease.
    pub async fn start(connections: usize, lifetime: Duration, n: usize, timings: Timings) -> Self {
        Self::start_with_tables(connections, lifetime, n, timings, &[]).await
    }

    /// [`Cluster::start`] with more tables in every replica's config
    /// (`[[discover]]` rules, say).
    pub async fn start_with_tables(
        connections: usize,
        lifetime: Duration,
        n: usize,
        timings: Timings,
        tables: &[&str],
    ) -> Self {
        let names: Vec<String> = (1..=n).map(|i| format!("replica-{i}")).collect();
        let secrets: Vec<String> = names.iter().map(|n| replica_secret(n)).collect();
        let clients: Vec<(String, String)> = names.iter().cloned().zip(secrets.clone()).collect();
        let h = Harness::start_with(connections, lifetime, move |sim| {
            sim.extra_clients = clients;
        })
        .await;
        let moto = Moto::start();
        let dynamo = dynamo_client(&moto.url());
        let proxy = Proxy::start(moto.addr).await;

        let human = |d: Duration| humantime::format_duration(d).to_string();
        let mut replicas = Vec::with_capacity(n);
        for (name, secret) in names.iter().zip(&secrets) {
            let secret_file = h.dir.path().join(format!("{name}.secret"));
            std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600))
                    .unwrap();
            }
            let coordination = format!(
                "[coordination]\nbackend = \"dynamodb\"\ntable = \"{TABLE}\"\nlease = \"{}\"\nrenew_every = \"{}\"\nholder = \"{name}\"\nendpoint = \"{}\"\n",
                human(timings.lease),
                human(timings.renew_every),
                proxy.url(),
            );
            let mut builder = h
                .config()
                .rotation(ha_rotation())
                .admin()
                // Each replica its own socket (they would share the default).
                .control_socket(&h.dir.path().join(format!("{name}.sock")))
                .table(&coordination);
            for table in tables {
                builder = builder.table(table);
            }
            let config = builder
                .client(name, &secret_file)
                .named(&format!("{name}.toml"))
                .write();
            if replicas.is_empty() {
                // The operator's way: `coordination init` creates the table.
                let mut init = h.spawn(&config, &["coordination", "init"]);
                let status = init.wait(Duration::from_secs(60));
                assert!(
                    status.success(),
                    "coordination init: {status:?}\n{}",
                    init.stderr_text()
                );
            }
            let process = h.spawn(&config, &["run"]);
            replicas.push(Replica {
                name: name.clone(),
                config,
                process,
            });
        }
        Self {
            h,
            moto,
            proxy,
            dynamo,
            replicas,
            timings,
        }
    }

    pub fn index_of(&self, name: &str) -> usize {
        self.replicas
            .iter()
            .position(|r| r.name == name)
            .unwrap_or_else(|| panic!("no replica {name}"))
    }

    /// Replicas whose last leadership line is "became leader".
    pub fn leaders_by_logs(&self) -> Vec<String> {
        self.replicas
            .iter()
            .filter(|r| {
                r.process
                    .logs()
                    .iter()
                    .rev()
                    .find(|l| {
                        matches!(
                            l["message"].as_str(),
                            Some(
                                "became leader"
                                    | "lost leadership"
                                    | "released leadership"
                                    | "standing by"
                            )
                        )
                    })
                    .is_some_and(|l| l["message"] == "became leader")
            })
            .map(|r| r.name.clone())
            .collect()
    }

    /// Waits until every connection has been PATCHed at least `times` times.
    pub async fn wait_patched(&self, times: u64, timeout: Duration) {
        let ids = self.h.connection_ids();
        assert!(
            crate::common::wait_until(timeout, || ids.iter().all(|id| self
                .h
                .sim
                .connection(id)
                .is_some_and(|v| v.patches >= times)))
            .await,
            "not every connection was PATCHed {times} times\n{}",
            self.all_logs()
        );
    }

    /// Waits for exactly one replica to lead; its name.
    pub async fn wait_for_leader(&self, timeout: Duration) -> String {
        let mut leaders = Vec::new();
        let found = crate::common::wait_until(timeout, || {
            leaders = self.leaders_by_logs();
            leaders.len() == 1
        })
        .await;
        assert!(
            found,
            "no single leader within {timeout:?} (leaders: {leaders:?})\n{}",
            self.all_logs()
        );
        leaders.remove(0)
    }

    /// Waits until a replica other than `except` (any, for `None`) logs
    /// "became leader" at or after `since`: its name and that line.
    pub async fn wait_leader_since(
        &self,
        except: Option<&str>,
        since: SystemTime,
        timeout: Duration,
    ) -> (String, Value) {
        let mut found = None;
        let ok = crate::common::wait_until(timeout, || {
            found = self
                .replicas
                .iter()
                .filter(|r| Some(r.name.as_str()) != except)
                .find_map(|r| {
                    let became = self.became_leader_since(&r.name, since);
                    became.into_iter().next().map(|l| (r.name.clone(), l))
                });
            found.is_some()
        })
        .await;
        assert!(
            ok,
            "no replica (but {except:?}) became leader since {since:?}\n{}",
            self.all_logs()
        );
        found.expect("checked above")
    }

    /// "became leader" lines of `name` at or after `since`.
    pub fn became_leader_since(&self, name: &str, since: SystemTime) -> Vec<Value> {
        self.replicas[self.index_of(name)]
            .process
            .events("became leader")
            .into_iter()
            .filter(|l| log_time(l) >= since)
            .collect()
    }

    /// Every replica's stderr, labelled, for failure messages.
    pub fn all_logs(&self) -> String {
        self.replicas
            .iter()
            .map(|r| format!("--- {} ---\n{}", r.name, r.process.stderr_text()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The admin address a replica bound (its config asks for port 0).
    pub async fn admin_addr(&self, name: &str) -> SocketAddr {
        self.replicas[self.index_of(name)]
            .process
            .admin_addr()
            .await
    }

    /// Every secret that must never be printed: the simulator's (all client
    /// secrets, tokens, issued keys) and the source identity's.
    pub fn secrets(&self) -> Vec<String> {
        self.h.secrets()
    }
}

pub use crate::common::log_time;

/// `b - a` in seconds, negative when `b` is earlier.
pub fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}
