//! The lease and the shared state in one DynamoDB table.
//!
//! Key schema: partition key `pk` (S), sort key `sk` (S).
//!
//! | item | `pk` | `sk` | attributes |
//! |---|---|---|---|
//! | the lease | `lease` | `leader` | `holder`, `rvn` (record version number), `lease_ms`, `format` |
//! | one connection | `state` | connection id | `sandbox`, `etag`, `access_key_id`, `expires_at`, `last_success_at` (unix seconds), `updated_by`, `format` |
//!
//! Nothing secret is ever written: the state items hold what the state file
//! holds (etag, access key id, times), never a secret key or session token.
//! Every value read back is checked; an item this version cannot read is
//! treated as absent (for the lease: as held by someone, until it is seen
//! unchanged for a full lease).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, PutRequest, WriteRequest};
use futures::future::BoxFuture;

use super::{Expect, LeaseRecord, Store, StoreError};
use crate::config::{AwsConfig, CoordinationConfig};
use crate::coordination::local::{PersistedConnection, StateSnapshot};
use crate::remote::sts::SourceIdentity;

/// The partition of the lease item.
const LEASE_PK: &str = "lease";
/// Its sort key.
const LEASE_SK: &str = "leader";
/// The partition of the per-connection state items.
const STATE_PK: &str = "state";
/// The item format this version writes and reads.
const FORMAT: &str = "1";
/// `BatchWriteItem` takes at most 25 requests.
pub const BATCH_LIMIT: usize = 25;
/// The most a DynamoDB answer needs: a `Query` page is at most 1 MB of data.
const MAX_BODY: u64 = 4 * 1024 * 1024;
/// Clamp of a lease duration read from the table: a record from another
/// version or a hostile writer cannot make standbys wait for days.
const MAX_RECORD_LEASE: Duration = Duration::from_secs(10 * 60);
/// And the shortest one honoured: no standby steals within a blink.
const MIN_RECORD_LEASE: Duration = Duration::from_secs(1);

/// The table behind the [`Store`] trait.
#[derive(Debug, Clone)]
pub struct DynamoStore {
    /// Lease calls: short timeouts, so a slow DynamoDB shows as a failed
    /// renewal in time, not as a call that outlives the lease.
    lease_client: Client,
    /// State calls (pages of up to 1 MB): the ordinary request timeout.
    state_client: Client,
    table: String,
}

/// The SDK clients for `coordination`: region from `[aws] region` or the
/// default chain, credentials from the default chain (or `identity`),
/// endpoint from `coordination.endpoint` (else the SDK honours
/// `AWS_ENDPOINT_URL_DYNAMODB`). The SDK's retries are off: the lease loop
/// retries on its own cadence, and every failure is seen.
pub async fn clients(
    aws: &AwsConfig,
    coordination: &CoordinationConfig,
    identity: &SourceIdentity,
    request_timeout: Duration,
) -> (Client, Client) {
    let shared = crate::remote::sts::sdk_config(aws, coordination.endpoint.as_ref(), identity)
        .load()
        .await;
    let build = |timeout: Duration| {
        let mut builder = aws_sdk_dynamodb::config::Builder::from(&shared)
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(timeout)
                    .build(),
            )
            .interceptor(crate::remote::sts::BodyLimit {
                cap: MAX_BODY,
                service: "DynamoDB",
            });
        if shared.region().is_none() {
            builder = builder.region(aws_config::Region::new("us-east-1"));
        }
        Client::from_conf(builder.build())
    };
    // A lease call gets one renewal period, but never under a second (a
    // real DynamoDB answers in milliseconds; a second absorbs a slow TLS
    // handshake) and never over the request timeout.
    let lease_timeout = coordination
        .renew_every
        .max(Duration::from_secs(1))
        .min(request_timeout);
    (build(lease_timeout), build(request_timeout))
}

impl DynamoStore {
    /// A store on `table` through clients built by [`clients`].
    pub fn new(lease_client: Client, state_client: Client, table: &str) -> Self {
        Self {
            lease_client,
            state_client,
            table: table.to_owned(),
        }
    }

    /// Builds the clients and the store in one go.
    pub async fn connect(
        aws: &AwsConfig,
        coordination: &CoordinationConfig,
        identity: &SourceIdentity,
        request_timeout: Duration,
    ) -> Self {
        let (lease, state) = clients(aws, coordination, identity, request_timeout).await;
        Self::new(lease, state, &coordination.table)
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The client for one-off administrative calls (`coordination init`, `check`).
    pub fn client(&self) -> &Client {
        &self.state_client
    }

    fn error<E>(
        &self,
        action: &'static str,
        error: SdkError<E, aws_smithy_runtime_api::http::Response>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        classify(&self.table, action, &error)
    }

    async fn get_lease(&self) -> Result<Option<LeaseRecord>, StoreError> {
        let output = self
            .lease_client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(LEASE_PK))
            .key("sk", s(LEASE_SK))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.error("dynamodb:GetItem", e))?;
        Ok(output.item.as_ref().map(lease_from_item))
    }

    async fn write_lease(&self, record: &LeaseRecord, expect: &Expect) -> Result<(), StoreError> {
        let lease_ms = u64::try_from(record.lease.as_millis()).unwrap_or(u64::MAX);
        match expect {
            Expect::Absent => {
                self.lease_client
                    .put_item()
                    .table_name(&self.table)
                    .item("pk", s(LEASE_PK))
                    .item("sk", s(LEASE_SK))
                    .item("holder", s(&record.holder))
                    .item("rvn", s(&record.rvn))
                    .item("lease_ms", n(lease_ms))
                    .item("format", s(FORMAT))
                    .condition_expression("attribute_not_exists(#pk)")
                    .expression_attribute_names("#pk", "pk")
                    .send()
                    .await
                    .map_err(|e| self.error("dynamodb:PutItem", e))?;
            }
            Expect::Rvn(old) => {
                // A record without a readable version (another version's,
                // or damaged) is replaced on that same condition.
                let condition = if old.is_empty() {
                    "attribute_not_exists(#rvn) OR NOT attribute_type(#rvn, :string)"
                } else {
                    "#rvn = :old"
                };
                let mut call = self
                    .lease_client
                    .update_item()
                    .table_name(&self.table)
                    .key("pk", s(LEASE_PK))
                    .key("sk", s(LEASE_SK))
                    .update_expression(
                        "SET #holder = :holder, #rvn = :rvn, #lease = :lease, #format = :format",
                    )
                    .condition_expression(condition)
                    // Every name aliased: FORMAT is a DynamoDB reserved
                    // word, and aliases keep the others safe from the list.
                    .expression_attribute_names("#format", "format")
                    .expression_attribute_names("#holder", "holder")
                    .expression_attribute_names("#rvn", "rvn")
                    .expression_attribute_names("#lease", "lease_ms")
                    .expression_attribute_values(":holder", s(&record.holder))
                    .expression_attribute_values(":rvn", s(&record.rvn))
                    .expression_attribute_values(":lease", n(lease_ms))
                    .expression_attribute_values(":format", s(FORMAT));
                call = if old.is_empty() {
                    call.expression_attribute_values(":string", s("S"))
                } else {
                    call.expression_attribute_values(":old", s(old))
                };
                call.send()
                    .await
                    .map_err(|e| self.error("dynamodb:UpdateItem", e))?;
            }
        }
        Ok(())
    }

    async fn remove_lease(&self, rvn: &str) -> Result<(), StoreError> {
        self.lease_client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(LEASE_PK))
            .key("sk", s(LEASE_SK))
            .condition_expression("#rvn = :rvn")
            .expression_attribute_names("#rvn", "rvn")
            .expression_attribute_values(":rvn", s(rvn))
            .send()
            .await
            .map_err(|e| self.error("dynamodb:DeleteItem", e))?;
        Ok(())
    }

    async fn query_state(&self) -> Result<StateSnapshot, StoreError> {
        let mut snapshot = StateSnapshot::default();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        let mut unreadable = 0usize;
        loop {
            let output = self
                .state_client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_values(":pk", s(STATE_PK))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.error("dynamodb:Query", e))?;
            for item in output.items() {
                match state_from_item(item) {
                    Some((id, record)) => {
                        snapshot.connections.insert(id, record);
                    }
                    None => unreadable += 1,
                }
            }
            match output.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        if unreadable > 0 {
            tracing::warn!(
                table = %self.table,
                items = unreadable,
                "shared state items this version cannot read were ignored; those connections rotate when due"
            );
        }
        Ok(snapshot)
    }

    async fn batch_state(
        &self,
        items: &[(String, Option<PersistedConnection>)],
        holder: &str,
    ) -> Result<Vec<String>, StoreError> {
        let requests: Vec<WriteRequest> = items
            .iter()
            .filter_map(|(id, record)| write_request(id, record.as_ref(), holder))
            .collect();
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let output = self
            .state_client
            .batch_write_item()
            .request_items(&self.table, requests)
            .send()
            .await
            .map_err(|e| self.error("dynamodb:BatchWriteItem", e))?;
        // What DynamoDB did not process is written again later.
        let left = output
            .unprocessed_items
            .unwrap_or_default()
            .remove(&self.table)
            .unwrap_or_default()
            .iter()
            .filter_map(|request| {
                let key = request
                    .put_request()
                    .map(PutRequest::item)
                    .or_else(|| request.delete_request().map(DeleteRequest::key))?;
                key.get("sk")?.as_s().ok().cloned()
            })
            .collect();
        Ok(left)
    }
}

impl Store for DynamoStore {
    fn read_lease(&self) -> BoxFuture<'_, Result<Option<LeaseRecord>, StoreError>> {
        Box::pin(self.get_lease())
    }

    fn write_lease<'a>(
        &'a self,
        record: &'a LeaseRecord,
        expect: &'a Expect,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(DynamoStore::write_lease(self, record, expect))
    }

    fn delete_lease<'a>(&'a self, rvn: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.remove_lease(rvn))
    }

    fn load_state(&self) -> BoxFuture<'_, Result<StateSnapshot, StoreError>> {
        Box::pin(self.query_state())
    }

    fn write_state<'a>(
        &'a self,
        items: &'a [(String, Option<PersistedConnection>)],
        holder: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(self.batch_state(items, holder))
    }
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn text<'a>(item: &'a HashMap<String, AttributeValue>, key: &str) -> Option<&'a str> {
    item.get(key)?.as_s().ok().map(String::as_str)
}

fn number(item: &HashMap<String, AttributeValue>, key: &str) -> Option<u64> {
    item.get(key)?.as_n().ok()?.trim().parse().ok()
}

/// A lease item as read. Any record counts as held (a writer we do not
/// understand still holds it until it stops renewing); a missing or absurd
/// duration becomes the clamp.
fn lease_from_item(item: &HashMap<String, AttributeValue>) -> LeaseRecord {
    // Shown in `/status` headers and the standby line: the one bounded,
    // escaped form of remote text (issue 26), never the raw item.
    let holder = text(item, "holder")
        .map(|h| crate::remote::http::bounded(h, 128))
        .unwrap_or_else(|| "(unreadable holder)".to_owned());
    let rvn = text(item, "rvn")
        .map(str::to_owned)
        // Without a version the record can only be replaced by matching
        // what it holds; an empty string never matches what we compare.
        .unwrap_or_default();
    let lease = number(item, "lease_ms")
        .map(Duration::from_millis)
        .unwrap_or(MAX_RECORD_LEASE)
        .clamp(MIN_RECORD_LEASE, MAX_RECORD_LEASE);
    LeaseRecord { holder, rvn, lease }
}

fn state_from_item(
    item: &HashMap<String, AttributeValue>,
) -> Option<(String, PersistedConnection)> {
    if text(item, "format")? != FORMAT {
        return None;
    }
    let id = text(item, "sk")?;
    if !crate::ident::is_connection_id(id) {
        return None;
    }
    let seconds = |key: &str| {
        number(item, key)
            .map(|s| UNIX_EPOCH + Duration::from_secs(s.min(crate::clock::HORIZON.as_secs())))
    };
    let etag = text(item, "etag")?;
    if !crate::ident::is_valid_etag(etag) {
        return None;
    }
    Some((
        id.to_owned(),
        PersistedConnection {
            sandbox: text(item, "sandbox")?.to_owned(),
            etag: etag.to_owned(),
            access_key_id: text(item, "access_key_id")
                .filter(|key| crate::ident::is_access_key_id(key))?
                .to_owned(),
            expires_at: seconds("expires_at")?,
            last_success_at: seconds("last_success_at"),
        },
    ))
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn write_request(
    id: &str,
    record: Option<&PersistedConnection>,
    holder: &str,
) -> Option<WriteRequest> {
    let Some(record) = record else {
        let delete = DeleteRequest::builder()
            .key("pk", s(STATE_PK))
            .key("sk", s(id))
            .build()
            .ok()?;
        return Some(WriteRequest::builder().delete_request(delete).build());
    };
    let mut put = PutRequest::builder()
        .item("pk", s(STATE_PK))
        .item("sk", s(id))
        .item("format", s(FORMAT))
        .item("sandbox", s(&record.sandbox))
        .item("etag", s(&record.etag))
        .item("access_key_id", s(&record.access_key_id))
        .item("expires_at", n(unix_seconds(record.expires_at)))
        .item("updated_by", s(holder));
    if let Some(at) = record.last_success_at {
        put = put.item("last_success_at", n(unix_seconds(at)));
    }
    Some(
        WriteRequest::builder()
            .put_request(put.build().ok()?)
            .build(),
    )
}

/// One DynamoDB failure as a [`StoreError`] whose message says what to do.
pub(crate) fn classify<E>(
    table: &str,
    action: &'static str,
    error: &SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match error {
        SdkError::ServiceError(service) => {
            let err = service.err();
            // Without a JSON error document, the XML one of AWS's query
            // protocol (what moto's IAM enforcement and some gateways
            // answer with): its code is classified the same way.
            let (code, message) = match err.code() {
                Some(code) => (code, err.message().unwrap_or("")),
                None => xml_error(service.raw()).unwrap_or(("", "")),
            };
            let message = crate::remote::http::remote_text(message);
            match code {
                "ConditionalCheckFailedException" => StoreError::Conflict,
                "ResourceNotFoundException" => StoreError::NoTable {
                    table: table.to_owned(),
                },
                "AccessDeniedException" | "AccessDenied" => StoreError::Denied {
                    action,
                    table: table.to_owned(),
                    detail: message,
                },
                "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "MissingAuthenticationTokenException"
                | "IncompleteSignatureException"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "AuthFailure" => StoreError::Credentials {
                    code: code.to_owned(),
                    detail: message,
                },
                // The table exists but is not ours (another key schema):
                // no retry cures that.
                "ValidationException" => StoreError::NotOurs {
                    table: table.to_owned(),
                    detail: message,
                },
                "" => StoreError::Unavailable(format!(
                    "HTTP {} without a DynamoDB error document",
                    service.raw().status().as_u16()
                )),
                other => StoreError::Unavailable(format!("{other}: {message}")),
            }
        }
        SdkError::TimeoutError(_) => StoreError::Unavailable("timed out".to_owned()),
        SdkError::ResponseError(_) => StoreError::Unavailable("unreadable answer".to_owned()),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => {
            StoreError::Unavailable("timed out".to_owned())
        }
        other => {
            // Dispatch and construction failures: the chain says whether
            // the credential chain found nothing (the common case).
            let text = crate::remote::http::remote_text(
                &aws_smithy_types::error::display::DisplayErrorContext(other).to_string(),
            );
            if crate::remote::sts::is_credential_chain_failure(other, &text) {
                StoreError::Credentials {
                    code: "NoCredentials".to_owned(),
                    detail: format!(
                        "the AWS default credential chain found no credentials (last: {})",
                        crate::remote::sts::chain_reason(other)
                    ),
                }
            } else {
                StoreError::Unavailable(text)
            }
        }
    }
}

/// The `<Code>` and `<Message>` of an XML error document
/// (`<ErrorResponse><Error><Code>AccessDenied</Code>...`), if the body is
/// one. Only a plain identifier is taken as a code.
fn xml_error(response: &aws_smithy_runtime_api::http::Response) -> Option<(&str, &str)> {
    let body = std::str::from_utf8(response.body().bytes()?).ok()?;
    let element = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = start + body.get(start..)?.find(&format!("</{name}>"))?;
        body.get(start..end)
    };
    let code = element("Code").filter(|c| {
        !c.is_empty() && c.len() <= 64 && c.chars().all(|c| c.is_ascii_alphanumeric())
    })?;
    Some((code, element("Message").unwrap_or("")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(pairs: &[(&str, AttributeValue)]) -> HashMap<String, AttributeValue> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn a_lease_record_with_an_absurd_duration_is_clamped() {
        let rec = lease_from_item(&item(&[
            ("holder", s("a")),
            ("rvn", s("1")),
            ("lease_ms", n(u64::MAX)),
        ]));
        assert_eq!(rec.lease, MAX_RECORD_LEASE);
        let rec = lease_from_item(&item(&[
            ("holder", s("a")),
            ("rvn", s("1")),
            ("lease_ms", n(0)),
        ]));
        assert_eq!(rec.lease, MIN_RECORD_LEASE);
        let rec = lease_from_item(&item(&[("lease_ms", s("not a number"))]));
        assert_eq!(rec.lease, MAX_RECORD_LEASE);
        assert_eq!(rec.rvn, "");
    }

    #[test]
    fn state_items_from_another_format_or_with_bad_values_are_ignored() {
        let good = item(&[
            ("sk", s("conn-1")),
            ("format", s(FORMAT)),
            ("sandbox", s("prod")),
            ("etag", s("\"e1\"")),
            ("access_key_id", s("ASIAEXAMPLE")),
            ("expires_at", n(1_900_000_000)),
        ]);
        let (id, record) = state_from_item(&good).unwrap();
        assert_eq!(id, "conn-1");
        assert_eq!(
            record.expires_at,
            UNIX_EPOCH + Duration::from_secs(1_900_000_000)
        );
        assert_eq!(record.last_success_at, None);
        let mut other = good.clone();
        other.insert("format".to_owned(), s("2"));
        assert!(state_from_item(&other).is_none());
        let mut far = good.clone();
        far.insert("expires_at".to_owned(), n(u64::MAX));
        let (_, record) = state_from_item(&far).unwrap();
        assert!(record.expires_at <= UNIX_EPOCH + crate::clock::HORIZON);
        let mut bad_etag = good.clone();
        bad_etag.insert("etag".to_owned(), s("\"a\r\nb\""));
        assert!(state_from_item(&bad_etag).is_none());
        // Issue 26 #3 and #6: ids `..` and 3,000 characters, and an access
        // key id of 300 KB with control characters, were believed.
        for (key, value) in [
            ("sk", "..".to_owned()),
            ("sk", "x".repeat(3000)),
            (
                "access_key_id",
                format!("ASIA\u{1b}[2J{}", "A".repeat(300_000)),
            ),
        ] {
            let mut bad = good.clone();
            bad.insert(key.to_owned(), s(&value));
            assert!(
                state_from_item(&bad).is_none(),
                "{key} of {} bytes",
                value.len()
            );
        }
    }

    #[test]
    fn a_lease_holder_is_shown_bounded_and_escaped() {
        // Issue 26 #2: the holder reached the text-mode standby line raw.
        let rec = lease_from_item(&item(&[
            (
                "holder",
                s(&format!("evil\n\u{1b}]0;t\u{7}{}", "h".repeat(10_000))),
            ),
            ("rvn", s("1")),
        ]));
        assert!(!rec.holder.chars().any(char::is_control), "{}", rec.holder);
        assert!(rec.holder.len() < 200, "{}", rec.holder.len());
    }
}
