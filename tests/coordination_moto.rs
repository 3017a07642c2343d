// Real moto, real sockets, real time: these tests read the real clocks.
#![allow(clippy::disallowed_methods)]
//! The coordination table against `moto`: a real, independent implementation
//! of the DynamoDB wire protocol (conditional writes, batch writes, queries,
//! IAM enforcement), reached by the real `aws-sdk-dynamodb` client.
//!
//! `coordination init`, the lease item's conditional writes, the shared
//! state items, `verify`/`check` with IAM enforcement on, and two electors
//! sharing one table.
//!
//! `scripts/test.sh` installs moto into `.venv` and exports
//! `AEP_S3_ROTATOR_MOTO_SERVER`. Without it these tests FAIL: they never skip.
//!

// Helpers outside #[test] functions may unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aep_s3_rotator::config::{AwsConfig, CoordinationConfig};
use aep_s3_rotator::coordination::dynamo::{BATCH_LIMIT, DynamoStore};
use aep_s3_rotator::coordination::local::PersistedConnection;
use aep_s3_rotator::coordination::local::StateSnapshot;
use aep_s3_rotator::coordination::table::{self, InitOutcome};
use aep_s3_rotator::coordination::{Elector, Expect, LeaseRecord, Role, Store, StoreError};
use aep_s3_rotator::observe::status::{ConnectionStatus, Snapshot};
use aep_s3_rotator::observe::telemetry::Telemetry;
use aep_s3_rotator::persist::SharedTable;
use aep_s3_rotator::remote::sts::SourceIdentity;
use aws_sdk_dynamodb::types::AttributeValue;
use common::*;
use tokio_util::sync::CancellationToken;

/// A DynamoDB to test against: our own moto_server, or (for the protocol
/// tests) one named by `AEP_S3_ROTATOR_TEST_DYNAMODB_URL`, e.g. real AWS.
struct Dynamo {
    /// Our own moto (killed on drop); `None` for an external endpoint.
    moto: Option<Moto>,
    url: String,
}

impl Dynamo {
    fn external(&self) -> bool {
        self.moto.is_none()
    }
}

/// The DynamoDB of the protocol tests (lease, state, election): by default
/// a fresh moto; with `AEP_S3_ROTATOR_TEST_DYNAMODB_URL` set (e.g.
/// `https://dynamodb.us-east-1.amazonaws.com`), that endpoint, with the
/// AWS default credential chain of the test process, on tables named
/// `aep-s3-rotator-test-<name>-<random>` that each test deletes at its end.
fn dynamodb() -> Dynamo {
    match std::env::var("AEP_S3_ROTATOR_TEST_DYNAMODB_URL") {
        Ok(url) if !url.is_empty() => Dynamo { moto: None, url },
        _ => start_moto(),
    }
}

/// The table name a test uses: as given on moto, unique on a shared DynamoDB.
fn table_name(moto: &Dynamo, name: &str) -> String {
    if moto.external() {
        format!(
            "aep-s3-rotator-test-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    } else {
        name.to_owned()
    }
}

/// Deletes a test table on a shared DynamoDB (moto is thrown away whole).
async fn drop_table(moto: &Dynamo, store: &DynamoStore) {
    if moto.external() {
        store
            .client()
            .delete_table()
            .table_name(store.table())
            .send()
            .await
            .unwrap();
    }
}

fn start_moto() -> Dynamo {
    let moto = Moto::start();
    Dynamo {
        url: moto.url(),
        moto: Some(moto),
    }
}

fn aws() -> AwsConfig {
    AwsConfig {
        region: Some("us-east-1".to_owned()),
        sts_endpoint: None,
        s3_endpoint: None,
        s3_endpoints: Vec::new(),
        role_arn: None,
        external_id: None,
        session_name: "aep-s3-rotator".to_owned(),
        attribution: Default::default(),
    }
}

fn coordination(moto: &Dynamo, table: &str) -> CoordinationConfig {
    CoordinationConfig {
        table: table.to_owned(),
        lease: Duration::from_secs(2),
        renew_every: Duration::from_millis(500),
        holder: None,
        endpoint: Some(moto.url.parse().unwrap()),
    }
}

/// A store on `table` signed with these keys (moto without enforcement
/// takes any).
async fn store_as(moto: &Dynamo, table: &str, key: &str, secret: &str) -> DynamoStore {
    DynamoStore::connect(
        &aws(),
        &coordination(moto, table),
        &SourceIdentity::Static {
            access_key_id: key.to_owned(),
            secret_access_key: secret.to_owned().into(),
        },
        Duration::from_secs(5),
    )
    .await
}

async fn store(moto: &Dynamo, table: &str) -> DynamoStore {
    if moto.external() {
        return DynamoStore::connect(
            &aws(),
            &coordination(moto, table),
            &SourceIdentity::DefaultChain,
            Duration::from_secs(5),
        )
        .await;
    }
    store_as(moto, table, SOURCE_KEY_ID, SOURCE_SECRET).await
}

/// A table named after `name` (see [`table_name`]), created as
/// `coordination init` creates it.
async fn created(moto: &Dynamo, name: &str) -> DynamoStore {
    let table = table_name(moto, name);
    let store = store(moto, &table).await;
    let outcome = table::init(
        store.client(),
        &table,
        Duration::from_secs(120),
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    assert_eq!(outcome, InitOutcome::Created);
    store
}

/// Every item in the table, as DynamoDB holds it.
async fn scan(store: &DynamoStore) -> Vec<HashMap<String, AttributeValue>> {
    store
        .client()
        .scan()
        .table_name(store.table())
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .items
        .unwrap_or_default()
}

/// A config the binary loads: one connection, `[coordination]` on moto.
/// Nothing but the table is contacted by `coordination init`.
fn write_config(dir: &Path, coordination_block: &str) -> PathBuf {
    let secret = dir.join("client-secret");
    std::fs::write(&secret, "client-secret-never-printed\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    TestConfig::without_simulator(dir, &secret)
        .connections(&[aep_s3_simulator::SimConnection::s3(
            "4cb0c374-d3bb-4557-b139-5712880adc55",
            "prod",
            "conn-0",
        )])
        .table(coordination_block)
        .write()
}

fn init_process(config: &Path) -> DaemonProcess {
    spawn_daemon(config, &["coordination", "init"])
}

#[tokio::test(flavor = "multi_thread")]
async fn init_creates_the_table_is_idempotent_and_refuses_a_wrong_key_schema() {
    let moto = start_moto();
    let dir = tempfile::tempdir().unwrap();
    let block = |table: &str| {
        format!(
            "[coordination]\nbackend = \"dynamodb\"\ntable = \"{table}\"\nendpoint = \"{}\"\n",
            moto.url
        )
    };
    let config = write_config(dir.path(), &block("aep-s3-rotator"));

    // 1. Created, with the key schema and capacity mode the daemon needs.
    let mut init = init_process(&config);
    let status = init.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", init.stderr_text());
    assert!(
        init.stdout_text().contains(
            "created DynamoDB table \"aep-s3-rotator\" (partition key pk (S), sort key sk (S), on-demand capacity); it is ACTIVE"
        ),
        "{}",
        init.stdout_text()
    );
    let store = store(&moto, "aep-s3-rotator").await;
    let described = store
        .client()
        .describe_table()
        .table_name("aep-s3-rotator")
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    let keys: Vec<(String, String)> = described
        .key_schema()
        .iter()
        .map(|k| {
            (
                k.attribute_name().to_owned(),
                k.key_type().as_str().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        [
            ("pk".to_owned(), "HASH".to_owned()),
            ("sk".to_owned(), "RANGE".to_owned())
        ]
    );
    assert_eq!(
        described
            .billing_mode_summary()
            .and_then(|b| b.billing_mode())
            .map(|m| m.as_str()),
        Some("PAY_PER_REQUEST")
    );
    // The new table passes the daemon's own check.
    let summary = table::verify(&store).await.unwrap();
    assert!(
        summary.starts_with("table aep-s3-rotator, lease free"),
        "{summary}"
    );

    // 2. Again: nothing to do, exit 0, and a lease in it is kept.
    let record = LeaseRecord {
        holder: "replica-a".to_owned(),
        rvn: "r1".to_owned(),
        lease: Duration::from_secs(15),
    };
    store.write_lease(&record, &Expect::Absent).await.unwrap();
    let mut again = init_process(&config);
    assert_eq!(
        again.wait(Duration::from_secs(60)).code(),
        Some(0),
        "stderr:\n{}",
        again.stderr_text()
    );
    assert!(
        again
            .stdout_text()
            .contains("already exists with the key schema the daemon needs"),
        "{}",
        again.stdout_text()
    );
    assert_eq!(store.read_lease().await.unwrap(), Some(record));

    // 3. A table of that name with another key schema: one message, exit 1.
    store
        .client()
        .create_table()
        .table_name("someone-elses")
        .key_schema(
            aws_sdk_dynamodb::types::KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(aws_sdk_dynamodb::types::KeyType::Hash)
                .build()
                .unwrap(),
        )
        .attribute_definitions(
            aws_sdk_dynamodb::types::AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(aws_sdk_dynamodb::types::ScalarAttributeType::N)
                .build()
                .unwrap(),
        )
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .send()
        .await
        .unwrap();
    let wrong = write_config(dir.path(), &block("someone-elses"));
    let mut refused = init_process(&wrong);
    assert_eq!(
        refused.wait(Duration::from_secs(60)).code(),
        Some(1),
        "stderr:\n{}",
        refused.stderr_text()
    );
    // One message (the rest of stderr is JSON log lines).
    let messages: Vec<String> = refused
        .stderr_text()
        .lines()
        .filter(|l| !l.starts_with('{'))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        messages,
        [
            "aep-s3-rotator: coordination init: DynamoDB table \"someone-elses\" exists but its key schema is partition key id (N); the daemon needs partition key pk (S), sort key sk (S): set coordination.table to a new name (init creates it) or delete that table"
        ]
    );

    // The daemon meets such a table at start: one message naming the
    // mismatch, not an endless "unavailable" (start exits 78 on it).
    let foreign = self::store(&moto, "someone-elses").await;
    match table::verify(&foreign).await {
        Err(error @ StoreError::NotOurs { .. }) => {
            assert!(error.to_string().contains("coordination init"), "{error}")
        }
        other => panic!("a table with another key schema gave {other:?}"),
    }

    // 4. No [coordination]: a config problem, exit 78, saying what to add.
    let none = write_config(dir.path(), "");
    let mut missing = init_process(&none);
    assert_eq!(missing.wait(Duration::from_secs(60)).code(), Some(78));
    assert!(
        missing.stderr_text().contains("add [coordination]"),
        "{}",
        missing.stderr_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_writes_are_conditional_and_a_missing_table_says_init() {
    let moto = dynamodb();
    let store = created(&moto, "lease-table").await;
    let record = |holder: &str, rvn: &str| LeaseRecord {
        holder: holder.to_owned(),
        rvn: rvn.to_owned(),
        lease: Duration::from_secs(2),
    };

    assert_eq!(store.read_lease().await.unwrap(), None);
    // Acquire when absent; a second acquire-when-absent loses.
    store
        .write_lease(&record("a", "a1"), &Expect::Absent)
        .await
        .unwrap();
    assert_eq!(
        store.write_lease(&record("b", "b1"), &Expect::Absent).await,
        Err(StoreError::Conflict)
    );
    assert_eq!(store.read_lease().await.unwrap(), Some(record("a", "a1")));
    // Renew on our rvn; a writer holding an old rvn loses.
    store
        .write_lease(&record("a", "a2"), &Expect::Rvn("a1".to_owned()))
        .await
        .unwrap();
    assert_eq!(
        store
            .write_lease(&record("b", "b1"), &Expect::Rvn("a1".to_owned()))
            .await,
        Err(StoreError::Conflict)
    );
    assert_eq!(store.read_lease().await.unwrap(), Some(record("a", "a2")));
    // Release only what we hold.
    assert_eq!(store.delete_lease("a1").await, Err(StoreError::Conflict));
    assert_eq!(store.read_lease().await.unwrap(), Some(record("a", "a2")));
    store.delete_lease("a2").await.unwrap();
    assert_eq!(store.read_lease().await.unwrap(), None);

    // A damaged lease item (no rvn, no duration): held by someone until
    // replaced on the "no readable rvn" condition, which holds once.
    store
        .client()
        .put_item()
        .table_name(store.table())
        .item("pk", AttributeValue::S("lease".to_owned()))
        .item("sk", AttributeValue::S("leader".to_owned()))
        .item("holder", AttributeValue::S("old-version".to_owned()))
        .send()
        .await
        .unwrap();
    let damaged = store.read_lease().await.unwrap().unwrap();
    assert_eq!(damaged.holder, "old-version");
    assert_eq!(damaged.rvn, "");
    assert_eq!(damaged.lease, Duration::from_secs(600), "clamped maximum");
    store
        .write_lease(&record("c", "c1"), &Expect::Rvn(String::new()))
        .await
        .unwrap();
    assert_eq!(store.read_lease().await.unwrap(), Some(record("c", "c1")));
    assert_eq!(
        store
            .write_lease(&record("d", "d1"), &Expect::Rvn(String::new()))
            .await,
        Err(StoreError::Conflict)
    );
    let summary = table::verify(&store).await.unwrap();
    assert_eq!(
        summary,
        format!(
            "table {}, lease held by c; GetItem, PutItem, UpdateItem, DeleteItem, Query and BatchWriteItem allowed",
            store.table()
        )
    );
    // verify changed nothing: the lease and no probe item.
    assert_eq!(store.read_lease().await.unwrap(), Some(record("c", "c1")));
    assert_eq!(scan(&store).await.len(), 1);

    // A table that does not exist: the message says how to create it.
    let missing = table_name(&moto, "no-such-table");
    let absent = self::store(&moto, &missing).await;
    let error = table::verify(&absent).await.unwrap_err();
    assert_eq!(error, StoreError::NoTable { table: missing });
    assert!(
        error
            .to_string()
            .contains("create it with `aep-s3-rotator coordination init`"),
        "{error}"
    );
    drop_table(&moto, &store).await;
}

fn connection(i: u64) -> PersistedConnection {
    PersistedConnection {
        sandbox: if i.is_multiple_of(2) { "prod" } else { "dev" }.to_owned(),
        etag: format!("\"{:08x}-0000-0000-0000-000000000000\"", i),
        access_key_id: format!("ASIAMOTOTEST{i:08}"),
        expires_at: UNIX_EPOCH + Duration::from_secs(1_900_000_000 + i),
        last_success_at: (!i.is_multiple_of(3))
            .then(|| UNIX_EPOCH + Duration::from_secs(1_800_000_000 + i)),
    }
}

/// Writes as the state writer does: `BATCH_LIMIT` requests per call, again
/// for whatever DynamoDB left unprocessed.
async fn write_all(store: &DynamoStore, items: Vec<(String, Option<PersistedConnection>)>) {
    let mut pending = items;
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        assert!(
            rounds < 50,
            "DynamoDB never processed {} items",
            pending.len()
        );
        let mut left = Vec::new();
        for chunk in pending.chunks(BATCH_LIMIT) {
            let unprocessed = store.write_state(chunk, "replica-a").await.unwrap();
            left.extend(
                chunk
                    .iter()
                    .filter(|(id, _)| unprocessed.contains(id))
                    .cloned(),
            );
        }
        pending = left;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_state_round_trips_in_batches_without_secrets() {
    let moto = dynamodb();
    let store = created(&moto, "state-table").await;
    // 60 connections: three BatchWriteItem calls (25 + 25 + 10).
    let all: BTreeMap<String, PersistedConnection> = (0..60)
        .map(|i| (format!("conn-{i:03}"), connection(i)))
        .collect();
    write_all(
        &store,
        all.iter()
            .map(|(id, c)| (id.clone(), Some(c.clone())))
            .collect(),
    )
    .await;
    assert_eq!(store.load_state().await.unwrap().connections, all);

    // Deletes (None) and an update in one batch.
    let mut expected = all.clone();
    let mut changes: Vec<(String, Option<PersistedConnection>)> = Vec::new();
    for i in 0..10 {
        let id = format!("conn-{i:03}");
        expected.remove(&id);
        changes.push((id, None));
    }
    let mut updated = connection(59);
    updated.etag = "\"ffffffff-0000-0000-0000-000000000000\"".to_owned();
    expected.insert("conn-059".to_owned(), updated.clone());
    changes.push(("conn-059".to_owned(), Some(updated)));
    write_all(&store, changes).await;
    assert_eq!(store.load_state().await.unwrap().connections, expected);

    // An item of another format (a newer version's) is ignored, not misread.
    store
        .client()
        .put_item()
        .table_name(store.table())
        .item("pk", AttributeValue::S("state".to_owned()))
        .item("sk", AttributeValue::S("conn-from-v2".to_owned()))
        .item("format", AttributeValue::S("2".to_owned()))
        .item("etag", AttributeValue::S("\"e\"".to_owned()))
        .send()
        .await
        .unwrap();
    let loaded = store.load_state().await.unwrap().connections;
    assert_eq!(loaded, expected);
    assert!(!loaded.contains_key("conn-from-v2"));

    // What DynamoDB holds: only the documented, non-secret attributes.
    let allowed: BTreeSet<&str> = [
        "pk",
        "sk",
        "format",
        "sandbox",
        "etag",
        "access_key_id",
        "expires_at",
        "last_success_at",
        "updated_by",
    ]
    .into();
    let items = scan(&store).await;
    assert_eq!(items.len(), 51, "50 of ours and the v2 item");
    for item in &items {
        for (name, value) in item {
            assert!(
                allowed.contains(name.as_str()),
                "unexpected attribute {name}"
            );
            let text = format!("{value:?}").to_lowercase();
            for word in ["secret", "session_token", "sessiontoken", "password"] {
                assert!(!text.contains(word), "{name} = {text}");
            }
        }
        if item["format"].as_s().unwrap() == "1" {
            assert_eq!(item["updated_by"].as_s().unwrap(), "replica-a");
            assert!(item["expires_at"].as_n().is_ok(), "expires_at is a number");
        }
    }
    drop_table(&moto, &store).await;
}

/// What `tests/support/moto_dynamodb_iam_setup.py` created.
#[derive(serde::Deserialize)]
struct Keys {
    access_key_id: String,
    secret_access_key: String,
}

#[derive(serde::Deserialize)]
struct IamSetup {
    full: Keys,
    noput: Keys,
}

fn setup_iam(moto: &Dynamo, table: &str) -> IamSetup {
    run_moto_setup("moto_dynamodb_iam_setup.py", &[&moto.url, table])
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_and_check_name_the_missing_permission_under_moto_iam() {
    let moto = start_moto();
    let setup = setup_iam(&moto, "aep-s3-rotator");
    let full = store_as(
        &moto,
        "aep-s3-rotator",
        &setup.full.access_key_id,
        &setup.full.secret_access_key,
    )
    .await;
    // Enforcement is on: an unknown key is refused (moto checks signatures).
    let stranger = store(&moto, "aep-s3-rotator").await;
    assert!(
        matches!(
            table::verify(&stranger).await,
            Err(StoreError::Credentials { .. })
        ),
        "{:?}",
        table::verify(&stranger).await
    );
    // The identity with the README's policy may make every call.
    full.write_lease(
        &LeaseRecord {
            holder: "replica-a".to_owned(),
            rvn: "r1".to_owned(),
            lease: Duration::from_secs(15),
        },
        &Expect::Absent,
    )
    .await
    .unwrap();
    let summary = table::verify(&full).await.unwrap();
    assert!(
        summary.starts_with("table aep-s3-rotator, lease held by replica-a;"),
        "{summary}"
    );

    // Without dynamodb:PutItem: the message names it.
    let noput = store_as(
        &moto,
        "aep-s3-rotator",
        &setup.noput.access_key_id,
        &setup.noput.secret_access_key,
    )
    .await;
    let error = table::verify(&noput).await.unwrap_err();
    assert!(
        matches!(
            &error,
            StoreError::Denied {
                action: "dynamodb:PutItem",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with("access denied: this AWS identity may not call dynamodb:PutItem on table \"aep-s3-rotator\""),
        "{error}"
    );

    // `check` says the same on its coordination line, and fails.
    let h = Harness::start_with(1, Duration::from_secs(3600), |sim| {
        sim.accept_foreign_credentials = true
    })
    .await;
    let config = h
        .config()
        .table(&format!(
            "[coordination]\nbackend = \"dynamodb\"\ntable = \"aep-s3-rotator\"\nlease = \"1s\"\nrenew_every = \"300ms\"\nendpoint = \"{}\"\n",
            moto.url
        ))
        .write();
    let run_check = |keys: &Keys| {
        let mut command = clean_command(binary());
        command
            .env("AWS_ACCESS_KEY_ID", &keys.access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", &keys.secret_access_key)
            .arg("--config")
            .arg(&config)
            .arg("check");
        DaemonProcess::spawn(command)
    };
    let mut check = run_check(&setup.noput);
    assert_eq!(
        check.wait(Duration::from_secs(60)).code(),
        Some(1),
        "{}",
        check.stdout_text()
    );
    let report = check.stdout_text();
    assert!(
        report.contains(
            "FAIL  coordination access denied: this AWS identity may not call dynamodb:PutItem on table \"aep-s3-rotator\""
        ),
        "{report}"
    );
    let mut check = run_check(&setup.full);
    let status = check.wait(Duration::from_secs(60));
    let report = check.stdout_text();
    assert!(
        report.contains("ok    coordination table aep-s3-rotator, lease held by replica-a;"),
        "{report}"
    );
    assert_eq!(status.code(), Some(0), "{report}");
    let mut secrets = h.secrets();
    secrets.push(setup.full.secret_access_key.clone());
    secrets.push(setup.noput.secret_access_key.clone());
    assert_no_secret(&check.stderr_text(), &secrets);
    assert_no_secret(&report, &secrets);
}

/// One elector and what the test watches of it.
struct Replica {
    name: &'static str,
    store: Arc<dyn Store>,
    rx: tokio::sync::watch::Receiver<aep_s3_rotator::coordination::Leadership>,
    fence: aep_s3_rotator::coordination::Fence,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

#[tokio::test(flavor = "multi_thread")]
async fn two_electors_one_leader_and_a_release_hands_over_at_once() {
    let moto = dynamodb();
    let admin = created(&moto, "election").await;
    let lease = Duration::from_secs(2);
    let renew_every = Duration::from_millis(500);
    let mut replicas: Vec<Replica> = Vec::new();
    for name in ["replica-a", "replica-b"] {
        let store: Arc<dyn Store> = Arc::new(store(&moto, admin.table()).await);
        let telemetry = Arc::new(Telemetry::new());
        let (elector, rx, fence) = Elector::new(
            Arc::clone(&store),
            name.to_owned(),
            lease,
            renew_every,
            telemetry,
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(elector.run(stop.clone()));
        replicas.push(Replica {
            name,
            store,
            rx,
            fence,
            stop,
            task,
        });
    }
    let leaders = |replicas: &[Replica]| {
        replicas
            .iter()
            .filter(|r| r.rx.borrow().role == Role::Leader)
            .map(|r| r.name)
            .collect::<Vec<&str>>()
    };

    // Exactly one leader, and the other standing by.
    assert!(
        wait_until(Duration::from_secs(10), || {
            leaders(&replicas).len() == 1
                && replicas
                    .iter()
                    .all(|r| r.rx.borrow().role != Role::Starting)
        })
        .await,
        "no leader within 10 s"
    );
    let first = leaders(&replicas)[0];
    // For six renewals (six record versions seen in the table): the same
    // single leader, one open fence, the other standing by and naming it.
    let mut versions = BTreeSet::new();
    let renewed = wait_until_async(Duration::from_secs(20), async || {
        assert_eq!(leaders(&replicas), [first]);
        let open: Vec<&str> = replicas
            .iter()
            .filter(|r| r.fence.is_open())
            .map(|r| r.name)
            .collect();
        assert!(open.len() <= 1, "two fences open: {open:?}");
        for r in &replicas {
            if r.name != first {
                let seen = r.rx.borrow().clone();
                assert_eq!(seen.role, Role::Standby);
                assert_eq!(seen.leader.as_deref(), Some(first));
            }
        }
        let record = admin.read_lease().await.unwrap().unwrap();
        assert_eq!(record.holder, first);
        versions.insert(record.rvn);
        versions.len() > 6
    })
    .await;
    assert!(renewed, "fewer than six renewals seen: {versions:?}");

    // The leader's shared state writer, following a snapshot of 30
    // connections that adopted its term, writes them through its fence
    // (two batches).
    let leader_index = replicas.iter().position(|r| r.name == first).unwrap();
    let leader = &replicas[leader_index];
    let (snapshots_tx, snapshots) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let stop_writer = CancellationToken::new();
    let writer = tokio::spawn(aep_s3_rotator::persist::run(
        SharedTable::new(
            Arc::clone(&leader.store),
            leader.fence.clone(),
            first.to_owned(),
            leader.rx.clone(),
        ),
        snapshots,
        StateSnapshot::default(),
        stop_writer.clone(),
    ));
    let views = (0..30)
        .map(|i| {
            let record = connection(i);
            Arc::new(ConnectionStatus {
                config: Arc::new(aep_s3_rotator::config::ConnectionConfig {
                    id: format!("conn-{i:03}"),
                    sandbox: record.sandbox,
                    ..Default::default()
                }),
                etag: Some(record.etag),
                access_key_id: Some(record.access_key_id),
                expires_at: Some(record.expires_at),
                last_success_at: record.last_success_at,
                ..ConnectionStatus::default()
            })
        })
        .collect();
    let term = leader.rx.borrow().term;
    snapshots_tx.send_replace(Arc::new(Snapshot {
        connections: views,
        term,
        ..Snapshot::default()
    }));
    assert!(
        wait_until_async(Duration::from_secs(20), async || {
            admin.load_state().await.unwrap().connections.len() == 30
        })
        .await,
        "state not written"
    );
    stop_writer.cancel();
    writer.await.unwrap();
    let state = admin.load_state().await.unwrap();
    assert_eq!(state.connections["conn-007"], connection(7));

    // Stop the leader: it releases (deletes) the lease, and the other takes
    // over at its next look, within renew_every, not a lease later.
    let leader = replicas.remove(leader_index);
    leader.stop.cancel();
    leader.task.await.unwrap();
    let released = Instant::now();
    assert!(!leader.fence.is_open());
    match admin.read_lease().await.unwrap() {
        None => {}
        Some(record) => assert_ne!(record.holder, first, "the lease was not released"),
    }
    assert!(
        wait_until(Duration::from_secs(10), || leaders(&replicas).len() == 1).await,
        "no takeover within 10 s"
    );
    let takeover = released.elapsed();
    let second = replicas[0].name;
    assert_ne!(second, first);
    assert!(replicas[0].fence.is_open());
    eprintln!("takeover after release: {takeover:?}");
    // Without the release the standby would wait a full lease (2 s) of an
    // unchanged rvn; the release lets it take over at its next look.
    assert!(
        takeover < lease,
        "takeover took {takeover:?}: the standby waited for expiry, not the release"
    );
    assert_eq!(admin.read_lease().await.unwrap().unwrap().holder, second);
    let last = replicas.remove(0);
    last.stop.cancel();
    last.task.await.unwrap();
    assert_eq!(admin.read_lease().await.unwrap(), None, "released at stop");
    drop_table(&moto, &admin).await;
}

#[test]
fn the_connection_fixture_holds_no_secret_and_is_whole_seconds() {
    // The state items store whole seconds; the fixture must not depend on
    // sub-second rounding for the round trip above to mean anything.
    for i in 0..3 {
        let c = connection(i);
        assert_eq!(
            c.expires_at
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .subsec_nanos(),
            0
        );
        assert!(c.expires_at > SystemTime::UNIX_EPOCH);
    }
}
