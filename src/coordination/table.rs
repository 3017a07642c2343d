//! The coordination table itself: `coordination init` creates it, and
//! [`verify`] proves (for `check`, and for the daemon at start) that this
//! AWS identity may make every call the daemon makes, without changing any
//! data.
//!
//! Key schema (see [`super::dynamo`]): partition key `pk` (S), sort key
//! `sk` (S), on-demand capacity: a handful of small items, written every
//! few seconds, so provisioned capacity would only be a way to get throttled.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, DeleteRequest, KeySchemaElement, KeyType,
    ScalarAttributeType, TableDescription, TableStatus, WriteRequest,
};

use super::dynamo::{DynamoStore, classify};
use super::{Store, StoreError};
use crate::clock::mono_now;
use crate::config::Config;
use crate::exit::Exit;
use crate::remote::sts::SourceIdentity;

/// The probe item [`verify`] aims its writes at. Every write carries a
/// condition that can never hold, so it is never created; the daemon
/// never reads or writes it otherwise.
pub const PROBE_PK: &str = "probe";
/// Its sort key.
pub const PROBE_SK: &str = "check";

/// A condition no item satisfies: DynamoDB evaluates it (so the call is
/// authorized and the table exists) and refuses the write with
/// `ConditionalCheckFailedException`.
const IMPOSSIBLE: &str = "attribute_exists(pk) AND attribute_not_exists(pk)";

/// How long `coordination init` waits for a new table to become ACTIVE. An
/// on-demand table with two key attributes is ACTIVE within seconds on AWS;
/// two minutes covers a slow region without hanging a deploy script forever.
pub const INIT_WAIT: Duration = Duration::from_secs(120);

/// How often `coordination init` asks whether the table is ACTIVE
/// (`DescribeTable` is free, and AWS's own waiter polls every 20 s; one
/// second answers sooner at no cost).
const INIT_POLL: Duration = Duration::from_secs(1);

/// The key schema the daemon needs, as `coordination init` writes it and
/// every message shows it.
pub const KEY_SCHEMA: &str = "partition key pk (S), sort key sk (S)";

/// What `coordination init` found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitOutcome {
    /// The table was created and is ACTIVE.
    Created,
    /// A table of that name with the right key schema was already there
    /// (and is ACTIVE); nothing was changed.
    Existed,
}

/// Why `coordination init` failed. Every message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitError {
    /// A DynamoDB call failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A table of that name exists with another key schema.
    #[error(
        "DynamoDB table {table:?} exists but its key schema is {found}; the daemon needs {KEY_SCHEMA}: set coordination.table to a new name (init creates it) or delete that table"
    )]
    WrongSchema {
        /// The table name.
        table: String,
        /// What its key schema is, described.
        found: String,
    },
    /// The table did not become ACTIVE in time (or is being deleted).
    #[error(
        "DynamoDB table {table:?} is {status} after {waited}; run `aep-s3-rotator coordination init` again once it is ACTIVE (`aws dynamodb describe-table --table-name {table}` shows its status)"
    )]
    NotActive {
        /// The table name.
        table: String,
        /// Its last status.
        status: String,
        /// How long init waited.
        waited: String,
    },
}

/// `aep-s3-rotator coordination init`: creates the `[coordination]` table
/// and waits until it is ACTIVE. Prints one line on stdout on success, one
/// message on stderr on failure. Exit 0 (created, or already right), 1 (a
/// call failed, or a table of that name has another key schema), 78 (no
/// `[coordination]` in the config).
pub async fn init_command(config: &Config) -> Exit {
    let Some(coordination) = &config.coordination else {
        eprintln!(
            "aep-s3-rotator: coordination init creates the table named in [coordination], but the config has none; add [coordination] with backend = \"dynamodb\" and table = \"aep-s3-rotator\" (see config/example.toml), then run it again"
        );
        return Exit::Config;
    };
    let store = DynamoStore::connect(
        &config.aws,
        coordination,
        &SourceIdentity::DefaultChain,
        config.rotation.request_timeout,
    )
    .await;
    match init(store.client(), store.table(), INIT_WAIT, INIT_POLL).await {
        Ok(InitOutcome::Created) => {
            println!(
                "created DynamoDB table {:?} ({KEY_SCHEMA}, on-demand capacity); it is ACTIVE",
                store.table()
            );
            Exit::Ok
        }
        Ok(InitOutcome::Existed) => {
            println!(
                "DynamoDB table {:?} already exists with the key schema the daemon needs ({KEY_SCHEMA}); nothing changed",
                store.table()
            );
            Exit::Ok
        }
        Err(error) => {
            eprintln!("aep-s3-rotator: coordination init: {error}");
            Exit::Failure
        }
    }
}

/// Creates `table` (pk S HASH, sk S RANGE, PAY_PER_REQUEST) unless a table
/// of that name exists, then waits up to `wait` (asking every `poll`) until
/// it is ACTIVE. An existing table must have exactly that key schema.
pub async fn init(
    client: &Client,
    table: &str,
    wait: Duration,
    poll: Duration,
) -> Result<InitOutcome, InitError> {
    let outcome = match describe(client, table).await? {
        Some(existing) => {
            check_schema(table, &existing)?;
            InitOutcome::Existed
        }
        None => match create(client, table).await {
            Ok(()) => InitOutcome::Created,
            // Someone else (another replica's init, a pipeline) created it
            // between our look and our call: check what they made.
            Err(StoreError::Unavailable(detail))
                if detail.starts_with("ResourceInUseException") =>
            {
                let Some(existing) = describe(client, table).await? else {
                    return Err(StoreError::NoTable {
                        table: table.to_owned(),
                    }
                    .into());
                };
                check_schema(table, &existing)?;
                InitOutcome::Existed
            }
            Err(error) => return Err(error.into()),
        },
    };
    wait_active(client, table, wait, poll).await?;
    Ok(outcome)
}

async fn describe(client: &Client, table: &str) -> Result<Option<TableDescription>, StoreError> {
    match client.describe_table().table_name(table).send().await {
        Ok(output) => Ok(output.table),
        Err(error) => match classify(table, "dynamodb:DescribeTable", &error) {
            StoreError::NoTable { .. } => Ok(None),
            other => Err(other),
        },
    }
}

async fn create(client: &Client, table: &str) -> Result<(), StoreError> {
    let unbuildable = |e: aws_sdk_dynamodb::error::BuildError| {
        StoreError::Unavailable(format!("request could not be built: {e}"))
    };
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .map_err(unbuildable)
    };
    let attribute = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(unbuildable)
    };
    client
        .create_table()
        .table_name(table)
        .key_schema(key("pk", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .attribute_definitions(attribute("pk")?)
        .attribute_definitions(attribute("sk")?)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .map_err(|e| classify(table, "dynamodb:CreateTable", &e))?;
    Ok(())
}

/// The key schema of `description`, checked against what the daemon needs.
fn check_schema(table: &str, description: &TableDescription) -> Result<(), InitError> {
    let type_of = |name: &str| {
        description
            .attribute_definitions()
            .iter()
            .find(|a| a.attribute_name() == name)
            .map(|a| a.attribute_type().as_str().to_owned())
            .unwrap_or_else(|| "?".to_owned())
    };
    let keys: Vec<(String, String, String)> = description
        .key_schema()
        .iter()
        .map(|k| {
            let name = k.attribute_name();
            (
                k.key_type().as_str().to_owned(),
                crate::remote::http::bounded(name, 64),
                type_of(name),
            )
        })
        .collect();
    let wanted = [
        ("HASH".to_owned(), "pk".to_owned(), "S".to_owned()),
        ("RANGE".to_owned(), "sk".to_owned(), "S".to_owned()),
    ];
    if keys.as_slice() == wanted.as_slice() {
        return Ok(());
    }
    let found = if keys.is_empty() {
        "unknown (DescribeTable named no keys)".to_owned()
    } else {
        keys.iter()
            .map(|(kind, name, ty)| {
                let role = match kind.as_str() {
                    "HASH" => "partition key",
                    "RANGE" => "sort key",
                    _ => "key",
                };
                format!("{role} {name} ({ty})")
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(InitError::WrongSchema {
        table: table.to_owned(),
        found,
    })
}

async fn wait_active(
    client: &Client,
    table: &str,
    wait: Duration,
    poll: Duration,
) -> Result<(), InitError> {
    let started = mono_now();
    let mut told = false;
    loop {
        let status = describe(client, table)
            .await?
            .and_then(|t| t.table_status)
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|| "absent".to_owned());
        if status == TableStatus::Active.as_str() {
            return Ok(());
        }
        let waited = mono_now().duration_since(started);
        let gone = status == TableStatus::Deleting.as_str() || status == "absent";
        if gone || waited >= wait {
            return Err(InitError::NotActive {
                table: table.to_owned(),
                status,
                waited: humantime::format_duration(Duration::from_secs(waited.as_secs()))
                    .to_string(),
            });
        }
        if !told {
            eprintln!(
                "aep-s3-rotator: waiting up to {} for DynamoDB table {table:?} to become ACTIVE (it is {status})",
                humantime::format_duration(wait)
            );
            told = true;
        }
        tokio::time::sleep(poll).await;
    }
}

/// Proves that this identity may make every call the daemon makes on the
/// table, without changing any data, and answers a one-line summary
/// naming the current lease holder:
///
/// - `GetItem` of the lease item (which shows the holder);
/// - `PutItem`, `UpdateItem`, `DeleteItem` on the probe item
///   ([`PROBE_PK`]/[`PROBE_SK`]) on a condition that never holds: DynamoDB
///   checks permission and table first, then refuses the write, so
///   `ConditionalCheckFailedException` means allowed;
/// - `Query` of the state partition with `Limit` 1;
/// - `BatchWriteItem` of one delete of the (absent) probe item.
///
/// A refusal names the action (`StoreError::Denied { action:
/// "dynamodb:PutItem", .. }`); a missing table says to run
/// `coordination init`.
pub async fn verify(store: &DynamoStore) -> Result<String, StoreError> {
    let lease = store.read_lease().await?;
    let client = store.client();
    let table = store.table();
    let probe_key = || {
        [
            ("pk".to_owned(), AttributeValue::S(PROBE_PK.to_owned())),
            ("sk".to_owned(), AttributeValue::S(PROBE_SK.to_owned())),
        ]
        .into_iter()
        .collect::<std::collections::HashMap<_, _>>()
    };

    let put = client
        .put_item()
        .table_name(table)
        .set_item(Some(probe_key()))
        .condition_expression(IMPOSSIBLE)
        .send()
        .await;
    refused_by_condition(table, "dynamodb:PutItem", put)?;

    let update = client
        .update_item()
        .table_name(table)
        .set_key(Some(probe_key()))
        .update_expression("SET probe = :probe")
        .expression_attribute_values(":probe", AttributeValue::S("1".to_owned()))
        .condition_expression(IMPOSSIBLE)
        .send()
        .await;
    refused_by_condition(table, "dynamodb:UpdateItem", update)?;

    let delete = client
        .delete_item()
        .table_name(table)
        .set_key(Some(probe_key()))
        .condition_expression(IMPOSSIBLE)
        .send()
        .await;
    refused_by_condition(table, "dynamodb:DeleteItem", delete)?;

    client
        .query()
        .table_name(table)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", AttributeValue::S("state".to_owned()))
        .limit(1)
        .send()
        .await
        .map_err(|e| classify(table, "dynamodb:Query", &e))?;

    let delete = DeleteRequest::builder()
        .set_key(Some(probe_key()))
        .build()
        .map_err(|e| StoreError::Unavailable(format!("request could not be built: {e}")))?;
    client
        .batch_write_item()
        .request_items(
            table,
            vec![WriteRequest::builder().delete_request(delete).build()],
        )
        .send()
        .await
        .map_err(|e| classify(table, "dynamodb:BatchWriteItem", &e))?;

    let holder = match lease {
        // Remote text: one line, escaped, bounded.
        Some(record) => format!(
            "lease held by {}",
            crate::remote::http::bounded(&record.holder, 128)
        ),
        None => "lease free (no replica holds it)".to_owned(),
    };
    Ok(format!(
        "table {table}, {holder}; GetItem, PutItem, UpdateItem, DeleteItem, Query and BatchWriteItem allowed"
    ))
}

/// A probe write must be refused by its condition: that is the proof the
/// call is allowed. Success would mean the table ignored a condition,
/// which the lease cannot work with.
fn refused_by_condition<T, E>(
    table: &str,
    action: &'static str,
    outcome: Result<T, SdkError<E, aws_smithy_runtime_api::http::Response>>,
) -> Result<(), StoreError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match outcome {
        Err(error) => match classify(table, action, &error) {
            StoreError::Conflict => Ok(()),
            other => Err(other),
        },
        Ok(_) => Err(StoreError::Unavailable(format!(
            "{action} on table {table:?} ignored a condition that can never hold; this DynamoDB implementation cannot keep a lease safe"
        ))),
    }
}

/// `check`'s `coordination` line: `Ok(summary)` or the failure message.
/// `None` when the config has no `[coordination]`.
pub async fn check_line(config: &Config) -> Option<Result<String, String>> {
    let coordination = config.coordination.as_ref()?;
    let store = DynamoStore::connect(
        &config.aws,
        coordination,
        &SourceIdentity::DefaultChain,
        config.rotation.request_timeout,
    )
    .await;
    Some(verify(&store).await.map_err(|e| e.to_string()))
}
