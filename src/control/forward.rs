//! `rotate` on a standby (`[coordination]`): the request goes to the
//! leader through the coordination table, and the leader's answer comes
//! back the same way.
//!
//! | item | `pk` | `sk` | attributes |
//! |---|---|---|---|
//! | one forwarded request | `rotate` | random id | `request` (the request line, JSON), `from`, `state` (`queued` → `taken` → `done`), `taken_by`, `answer` (JSON), `created_at` (unix seconds), `expires_at` (unix seconds, for a TTL if the table has one), `format` |
//!
//! - The standby writes the item (`queued`) and reads it until it is `done`
//!   or its wait is over ([`TableForward`]).
//! - The leader looks for queued items every poll ([`serve_forwarded`]),
//!   claims each with a conditional update (`queued` → `taken`: carried
//!   out once, whatever replicas race), carries it out through its own
//!   scheduler exactly as a request on its own socket, and writes the
//!   answer (`done`), naming itself.
//! - A standby whose wait ends before the leader took the request
//!   withdraws it (conditional delete); the leader deletes items older
//!   than [`KEEP`] (answered or abandoned).
//!
//! Nothing secret is written: ids, names, access key ids, times, reasons.
//! Everything read back is hostile input: the request is validated again,
//! the answer's size is capped and its text escaped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::wire::{WireAnswer, WireOutcome, WireRequest, WireResult};
use super::{Forward, carry_out, to_answer};
use crate::coordination::dynamo::{DynamoStore, classify};
use crate::coordination::{Leadership, Role, StoreError};
use crate::counters::RotateRequests;
use crate::scheduler::RotateRequest;

/// The partition of forwarded requests.
const PK: &str = "rotate";
/// The item format this version writes and reads.
const FORMAT: &str = "1";
/// How long the leader may take to notice a request, on top of the wait
/// the client asked for: a few polls, and a leader change in between.
const PICKUP: Duration = Duration::from_secs(10);
/// How long an item is kept before the leader deletes it: longer than
/// any wait ([`super::wire::MAX_WAIT`]) plus [`PICKUP`].
const KEEP: Duration = Duration::from_secs(60 * 60);
/// A DynamoDB item holds at most 400 KB: an answer longer than this lists
/// only the connections that were not pushed (with a count of the rest).
const MAX_ANSWER: usize = 300 * 1024;
/// How often the standby reads the item while it waits.
const STANDBY_POLL: Duration = Duration::from_millis(250);

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn unix_now() -> u64 {
    crate::clock::wall_now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

type Item = HashMap<String, AttributeValue>;

fn text<'a>(item: &'a Item, key: &str) -> Option<&'a str> {
    item.get(key)?.as_s().ok().map(String::as_str)
}

/// A standby's way to the leader.
#[derive(Debug)]
pub struct TableForward {
    table: DynamoStore,
    holder: String,
}

impl TableForward {
    /// Forwards through `table`, as replica `holder`.
    pub fn new(table: DynamoStore, holder: String) -> Self {
        Self { table, holder }
    }

    async fn put(&self, id: &str, request: &WireRequest) -> Result<(), StoreError> {
        let line = serde_json::to_string(request).unwrap_or_default();
        let now = unix_now();
        self.table
            .client()
            .put_item()
            .table_name(self.table.table())
            .item("pk", s(PK))
            .item("sk", s(id))
            .item("request", s(&line))
            .item("from", s(&self.holder))
            .item("state", s("queued"))
            .item("created_at", n(now))
            .item("expires_at", n(now + KEEP.as_secs()))
            .item("format", s(FORMAT))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", "pk")
            .send()
            .await
            .map_err(|e| classify(self.table.table(), "dynamodb:PutItem", &e))?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<Item>, StoreError> {
        let output = self
            .table
            .client()
            .get_item()
            .table_name(self.table.table())
            .key("pk", s(PK))
            .key("sk", s(id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(self.table.table(), "dynamodb:GetItem", &e))?;
        Ok(output.item)
    }

    /// Deletes the item; with `only_queued`, only if no leader took it.
    async fn delete(&self, id: &str, only_queued: bool) -> Result<(), StoreError> {
        delete_item(&self.table, id, only_queued).await
    }

    async fn run(&self, request: &WireRequest, wait: Duration) -> WireAnswer {
        let id = format!("{:032x}", rand::random::<u128>());
        if let Err(error) = self.put(&id, request).await {
            return WireAnswer::refused(format!(
                "this replica stands by and could not hand the request to the leader: {error}"
            ));
        }
        let deadline = crate::clock::mono_now() + wait + PICKUP;
        let mut taken_by = None;
        loop {
            tokio::time::sleep(STANDBY_POLL).await;
            match self.get(&id).await {
                Ok(Some(item)) => {
                    if let Some(answer) = done(&item) {
                        let _ = self.delete(&id, false).await;
                        return answer;
                    }
                    if text(&item, "state") == Some("taken") {
                        taken_by = text(&item, "taken_by").map(|t| crate::scrub::bounded(t, 200));
                    }
                }
                Ok(None) => {
                    return WireAnswer::refused(
                        "the forwarded request disappeared from the coordination table before the leader answered",
                    );
                }
                Err(error) => {
                    tracing::debug!(table_error = %error, "forwarded rotate request not read; will retry");
                }
            }
            if crate::clock::mono_now() >= deadline {
                break;
            }
        }
        match taken_by {
            Some(leader) => WireAnswer::refused(format!(
                "the leader ({leader}) took the request but did not answer within the wait; it carries on: check `status`"
            )),
            None => match self.delete(&id, true).await {
                Ok(()) => WireAnswer::refused(
                    "no leader took the request up within the wait; it was withdrawn (is there a leader? check `status` on any replica)",
                ),
                // Taken just now: the leader carries it out.
                Err(_) => WireAnswer::refused(
                    "the leader took the request just as the wait ended; it carries on: check `status`",
                ),
            },
        }
    }
}

impl Forward for TableForward {
    fn forward<'a>(
        &'a self,
        request: &'a WireRequest,
        wait: Duration,
    ) -> BoxFuture<'a, WireAnswer> {
        Box::pin(self.run(request, wait))
    }
}

/// The leader's answer in a `done` item (capped, escaped), else `None`.
fn done(item: &Item) -> Option<WireAnswer> {
    if text(item, "state") != Some("done") {
        return None;
    }
    let raw = text(item, "answer").unwrap_or_default();
    if raw.len() > MAX_ANSWER * 2 {
        return Some(WireAnswer::refused(
            "the leader's answer in the coordination table is too long to read",
        ));
    }
    let Ok(mut answer) = serde_json::from_str::<WireAnswer>(raw) else {
        return Some(WireAnswer::refused(
            "the leader's answer in the coordination table cannot be read (another version?)",
        ));
    };
    answer.replica = answer
        .replica
        .as_deref()
        .map(|r| crate::scrub::bounded(r, 200));
    if let WireResult::Done { connections, .. } = &mut answer.result {
        for c in connections.iter_mut() {
            c.reason = c.reason.as_deref().map(crate::scrub::remote_text);
            c.name = crate::ident::remote_name(&c.name);
        }
    }
    Some(answer)
}

/// The leader's side: while this replica leads, takes queued requests up
/// every `poll`, carries each out through `requests` (its own scheduler)
/// and writes the answer back. Stops at `cancel`.
pub async fn serve_forwarded(
    table: DynamoStore,
    holder: String,
    mut leadership: watch::Receiver<Leadership>,
    requests: mpsc::Sender<RotateRequest>,
    rotate_requests: RotateRequests,
    poll: Duration,
    cancel: CancellationToken,
) {
    let leader = Arc::new(Leader {
        table,
        holder,
        requests,
        rotate_requests,
    });
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(poll) => {}
            changed = leadership.changed() => if changed.is_err() { return },
        }
        if leadership.borrow().role != Role::Leader {
            continue;
        }
        match leader.queued().await {
            Ok(items) => {
                for item in items {
                    let leader = Arc::clone(&leader);
                    tokio::spawn(async move { leader.take(item).await });
                }
            }
            Err(error) => {
                tracing::debug!(table_error = %error, "forwarded rotate requests not read; will retry");
            }
        }
    }
}

#[derive(Debug)]
struct Leader {
    table: DynamoStore,
    holder: String,
    requests: mpsc::Sender<RotateRequest>,
    rotate_requests: RotateRequests,
}

impl Leader {
    /// The queued items; older ones (answered or abandoned) are deleted on the way.
    async fn queued(&self) -> Result<Vec<Item>, StoreError> {
        let output = self
            .table
            .client()
            .query()
            .table_name(self.table.table())
            .key_condition_expression("#pk = :pk")
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_values(":pk", s(PK))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(self.table.table(), "dynamodb:Query", &e))?;
        let now = unix_now();
        let mut queued = Vec::new();
        for item in output.items.unwrap_or_default() {
            let created = item
                .get("created_at")
                .and_then(|v| v.as_n().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let old = now.saturating_sub(created) > KEEP.as_secs();
            if old {
                if let Some(id) = text(&item, "sk") {
                    let _ = delete_item(&self.table, id, false).await;
                }
            } else if text(&item, "state") == Some("queued")
                && text(&item, "format") == Some(FORMAT)
            {
                queued.push(item);
            }
        }
        Ok(queued)
    }

    /// Claims one item (once, by condition), carries it out, answers.
    async fn take(&self, item: Item) {
        let Some(id) = text(&item, "sk")
            .filter(|id| id.len() <= 64)
            .map(str::to_owned)
        else {
            return;
        };
        let claimed = update_item(&self.table, &id)
            .update_expression("SET #state = :taken, taken_by = :me")
            .condition_expression("#state = :queued")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":taken", s("taken"))
            .expression_attribute_values(":queued", s("queued"))
            .expression_attribute_values(":me", s(&self.holder))
            .send()
            .await;
        if claimed.is_err() {
            return; // someone else took it, or the standby withdrew it
        }
        let from = crate::scrub::bounded(text(&item, "from").unwrap_or("?"), 200);
        let raw = text(&item, "request").unwrap_or_default();
        let request = if raw.len() > super::wire::MAX_REQUEST {
            Err("the forwarded request is too long".to_owned())
        } else {
            serde_json::from_str::<WireRequest>(raw)
                .map_err(|e| {
                    format!(
                        "not a rotate request: {}",
                        crate::scrub::bounded(&e.to_string(), 200)
                    )
                })
                .and_then(|r| r.validate())
        };
        let mut answer = match request {
            Err(message) => {
                tracing::warn!(from = %from, error = %message, "forwarded rotation request refused");
                WireAnswer::refused(message)
            }
            Ok(valid) => {
                tracing::info!(
                    reason = %valid.reason,
                    from = %from,
                    "rotation requested (forwarded by a standby)"
                );
                let answer = to_answer(carry_out(&self.requests, &valid).await);
                super::log_answer(&answer, &valid.reason);
                answer
            }
        };
        answer.replica = Some(self.holder.clone());
        self.rotate_requests.count(answer.metric_result());
        let line = fit(&answer);
        let written = update_item(&self.table, &id)
            .update_expression("SET #state = :done, answer = :answer")
            .condition_expression("attribute_exists(#pk)")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_values(":done", s("done"))
            .expression_attribute_values(":answer", s(&line))
            .send()
            .await;
        if let Err(error) = written {
            let error = classify(self.table.table(), "dynamodb:UpdateItem", &error);
            tracing::warn!(table_error = %error, from = %from, "the answer to a forwarded rotation request was not written; the standby reports a timeout");
        }
    }
}

/// The answer as JSON that fits in an item ([`MAX_ANSWER`]). When the
/// full list is too long, only the connections not pushed are listed, with
/// a count of the rest, and of those the first ones that fit, with a count
/// of the others; names a request did not know, the first ones that fit.
fn fit(answer: &WireAnswer) -> String {
    let line = serde_json::to_string(answer).unwrap_or_default();
    if line.len() <= MAX_ANSWER {
        return line;
    }
    let result = match &answer.result {
        WireResult::Done {
            connections,
            pushed_not_listed,
            others_not_listed,
        } => {
            let (mut pushed, mut others) = (*pushed_not_listed, *others_not_listed);
            // Room for the envelope with the longest counts.
            let mut used = size(&with_result(
                answer,
                WireResult::Done {
                    connections: Vec::new(),
                    pushed_not_listed: usize::MAX,
                    others_not_listed: usize::MAX,
                },
            ));
            let mut kept = Vec::new();
            for entry in connections {
                if entry.outcome == WireOutcome::Pushed {
                    pushed += 1;
                    continue;
                }
                let bytes = size(entry);
                if used + bytes > MAX_ANSWER {
                    others += 1;
                    continue;
                }
                used += bytes;
                kept.push(entry.clone());
            }
            WireResult::Done {
                connections: kept,
                pushed_not_listed: pushed,
                others_not_listed: others,
            }
        }
        WireResult::Unknown {
            connections,
            sandboxes,
        } => {
            let mut used = 256;
            let mut first = |names: &[String]| {
                let mut kept: Vec<String> = Vec::new();
                for name in names {
                    let bytes = size(name);
                    if used + bytes > MAX_ANSWER - 256 {
                        kept.push(format!("… and {} more", names.len() - kept.len()));
                        break;
                    }
                    used += bytes;
                    kept.push(name.clone());
                }
                kept
            };
            WireResult::Unknown {
                connections: first(connections),
                sandboxes: first(sandboxes),
            }
        }
        WireResult::Refused { message } => WireResult::Refused {
            message: crate::scrub::bounded(message, crate::scrub::MAX_REMOTE_TEXT),
        },
    };
    serde_json::to_string(&with_result(answer, result)).unwrap_or_default()
}

/// `answer`'s envelope around `result` (not a clone of the whole answer,
/// whose result is what was too long).
fn with_result(answer: &WireAnswer, result: WireResult) -> WireAnswer {
    WireAnswer {
        version: answer.version,
        replica: answer.replica.clone(),
        result,
    }
}

/// The bytes `value` takes in an answer: its JSON and a comma.
fn size<T: serde::Serialize>(value: &T) -> usize {
    serde_json::to_string(value).map_or(MAX_ANSWER, |line| line.len() + 1)
}

/// Deletes request item `id`; with `only_queued`, only if no leader took it.
async fn delete_item(table: &DynamoStore, id: &str, only_queued: bool) -> Result<(), StoreError> {
    let mut call = table
        .client()
        .delete_item()
        .table_name(table.table())
        .key("pk", s(PK))
        .key("sk", s(id));
    if only_queued {
        call = call
            .condition_expression("#state = :queued")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":queued", s("queued"));
    }
    call.send()
        .await
        .map_err(|e| classify(table.table(), "dynamodb:DeleteItem", &e))?;
    Ok(())
}

/// An update of request item `id` (its condition and values to be added).
fn update_item(
    table: &DynamoStore,
    id: &str,
) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
    table
        .client()
        .update_item()
        .table_name(table.table())
        .key("pk", s(PK))
        .key("sk", s(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::wire::WireConnection;
    use crate::scheduler::RotateOutcome;

    /// Every connection refused with a long reason (a revoked role, say).
    fn refused(n: usize) -> WireAnswer {
        let connections = (0..n)
            .map(|i| {
                WireConnection::new(
                    format!("{i:08}-0000-4000-8000-000000000000"),
                    "n".repeat(200),
                    "prod".to_owned(),
                    Some(RotateOutcome::Refused(format!(
                        "pre-push S3 check denied: AccessDenied {}",
                        "x".repeat(300)
                    ))),
                )
            })
            .collect();
        WireAnswer {
            replica: Some("leader-1".to_owned()),
            ..WireAnswer::new(WireResult::Done {
                connections,
                pushed_not_listed: 0,
                others_not_listed: 0,
            })
        }
    }

    #[test]
    fn an_answer_always_fits_in_an_item_and_counts_what_it_leaves_out() {
        for n in [10, 1000, 5000] {
            let line = fit(&refused(n));
            assert!(line.len() <= MAX_ANSWER, "{n}: {} bytes", line.len());
            let answer: WireAnswer = serde_json::from_str(&line).unwrap();
            assert_ne!(answer.metric_result(), "pushed");
            let WireResult::Done {
                connections,
                pushed_not_listed,
                others_not_listed,
            } = answer.result
            else {
                panic!("{n}");
            };
            assert_eq!(pushed_not_listed, 0);
            assert_eq!(connections.len() + others_not_listed, n, "{n}");
            assert!(!connections.is_empty());
        }
        // Names a request did not know: the first ones, and how many more.
        let names: Vec<String> = (0..20_000).map(|i| format!("{i:040}")).collect();
        let unknown = WireAnswer::new(WireResult::Unknown {
            connections: names.clone(),
            sandboxes: names,
        });
        let line = fit(&unknown);
        assert!(line.len() <= MAX_ANSWER, "{} bytes", line.len());
        assert!(line.contains("more"), "{}", &line[line.len() - 200..]);
    }
}
