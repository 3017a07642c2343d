//! What travels on the control socket (and, for a standby, in the
//! coordination table): one JSON request line, one JSON answer line.
//!
//! The request is hostile input until [`WireRequest::validate`] says
//! otherwise: its size is capped by the reader, unknown fields are refused,
//! every id and sandbox has the shape `crate::ident` allows, and the reason
//! is escaped and bounded before anything logs it.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::scheduler::{RotateOutcome, Selection};

/// The protocol version; a request of another is refused with a message.
pub const VERSION: u32 = 1;

/// The most bytes of a request line: 10,000 ids of 36 characters fit in
/// half of it; anything longer is not a request this client sends.
pub const MAX_REQUEST: usize = 1024 * 1024;

/// The most ids plus sandboxes in one request: far more than any config
/// holds by hand, small enough that checking them costs nothing.
pub const MAX_NAMES: usize = 20_000;

/// The most characters of the reason that are kept (escaped): a sentence
/// for the log, not a document.
pub const MAX_REASON_CHARS: usize = 200;

/// The longest wait a request may ask for: a rotation that takes longer
/// is stuck, and the client should say so rather than hang.
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 60);

/// The shortest: less cannot see even one PATCH through.
pub const MIN_WAIT: Duration = Duration::from_secs(1);

/// `rotate`'s request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WireRequest {
    /// [`VERSION`].
    pub version: u32,
    /// Every connection (`--all`).
    #[serde(default)]
    pub all: bool,
    /// Connection ids or names (`--connection`).
    #[serde(default)]
    pub connections: Vec<String>,
    /// Sandbox names (`--sandbox`).
    #[serde(default)]
    pub sandboxes: Vec<String>,
    /// Why (`--reason`), for the log.
    #[serde(default)]
    pub reason: String,
    /// How long the client waits for the results, in milliseconds.
    pub timeout_ms: u64,
}

/// A request that passed [`WireRequest::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Valid {
    /// Which connections.
    pub selection: Selection,
    /// The reason, escaped and bounded: safe to log.
    pub reason: String,
    /// How long to wait for the results.
    pub wait: Duration,
}

impl WireRequest {
    /// Checks the request; the error is a message for the client.
    pub fn validate(&self) -> Result<Valid, String> {
        if self.version != VERSION {
            return Err(format!(
                "protocol version {} is not spoken here (this daemon speaks {VERSION}); use the aep-s3-rotator binary of the running daemon",
                self.version
            ));
        }
        let named = self.connections.len().saturating_add(self.sandboxes.len());
        if self.all == (named > 0) {
            return Err("name the connections: --all, or --connection / --sandbox".to_owned());
        }
        if named > MAX_NAMES {
            return Err(format!("too many names ({named}; at most {MAX_NAMES})"));
        }
        for (what, name) in self
            .connections
            .iter()
            .map(|c| ("connection", c))
            .chain(self.sandboxes.iter().map(|s| ("sandbox", s)))
        {
            if let Some(problem) = name_problem(name) {
                return Err(format!(
                    "{what} \"{}\" cannot be one: {problem}",
                    crate::scrub::bounded(name, 200)
                ));
            }
        }
        let selection = if self.all {
            Selection::All
        } else {
            Selection::Only {
                connections: self.connections.clone(),
                sandboxes: self.sandboxes.clone(),
            }
        };
        Ok(Valid {
            selection,
            reason: crate::scrub::bounded(self.reason.trim(), MAX_REASON_CHARS),
            wait: Duration::from_millis(self.timeout_ms).clamp(MIN_WAIT, MAX_WAIT),
        })
    }
}

/// Why `name` cannot be a connection id, connection name or sandbox (the
/// shapes of `crate::ident`; a name may hold spaces, nothing else more).
fn name_problem(name: &str) -> Option<&'static str> {
    if name.chars().any(char::is_control) {
        return Some("it contains control characters");
    }
    if name.len() > 4 * crate::ident::MAX_NAME_CHARS {
        return Some("it is too long");
    }
    if name.trim().is_empty() {
        return Some("it is empty");
    }
    None
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireAnswer {
    /// [`VERSION`].
    pub version: u32,
    /// With `[coordination]`: the replica that carried the request out.
    #[serde(default)]
    pub replica: Option<String>,
    /// What happened.
    pub result: WireResult,
}

/// What happened to a request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireResult {
    /// It was carried out: one entry per connection, sorted by id.
    Done {
        /// Each connection's result.
        connections: Vec<WireConnection>,
        /// Connections pushed but not in the list: a forwarded answer too
        /// long for the coordination table lists only the others.
        #[serde(default)]
        pushed_not_listed: usize,
        /// Connections not pushed (refused or pending) and not in the
        /// list: an answer too long for the table even so lists the first
        /// ones only.
        #[serde(default)]
        others_not_listed: usize,
    },
    /// Names the daemon does not rotate; nothing was started.
    Unknown {
        /// Connection ids (or names) not known.
        connections: Vec<String>,
        /// Sandboxes with no connection.
        sandboxes: Vec<String>,
    },
    /// Refused as a whole; the message says why and what to do.
    Refused {
        /// For the operator.
        message: String,
    },
}

/// One connection's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireConnection {
    /// Connection id.
    pub id: String,
    /// Its display name.
    pub name: String,
    /// Its sandbox.
    pub sandbox: String,
    /// What happened.
    pub outcome: WireOutcome,
    /// The access key id pushed (or that would be, in a dry run).
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// When the pushed credentials expire (RFC 3339).
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Why nothing was pushed.
    #[serde(default)]
    pub reason: Option<String>,
}

/// How one connection's requested job ended, as the client prints it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WireOutcome {
    /// New credentials are on the connection.
    Pushed,
    /// Nothing was pushed; `reason` says why.
    Refused,
    /// The daemon runs with `--dry-run`.
    DryRun,
    /// Not finished when the wait ran out (the daemon carries on).
    Pending,
}

impl WireConnection {
    /// The entry for `outcome` (`None`: not finished in time).
    pub fn new(id: String, name: String, sandbox: String, outcome: Option<RotateOutcome>) -> Self {
        let mut entry = Self {
            id,
            name,
            sandbox,
            outcome: WireOutcome::Pending,
            access_key_id: None,
            expires_at: None,
            reason: None,
        };
        match outcome {
            None => {}
            Some(RotateOutcome::Pushed {
                access_key_id,
                expires_at,
            }) => {
                entry.outcome = WireOutcome::Pushed;
                entry.access_key_id = Some(access_key_id);
                entry.expires_at = Some(rfc3339(expires_at));
            }
            Some(RotateOutcome::DryRun { access_key_id }) => {
                entry.outcome = WireOutcome::DryRun;
                entry.access_key_id = Some(access_key_id);
            }
            Some(RotateOutcome::Refused(reason)) => {
                entry.outcome = WireOutcome::Refused;
                entry.reason = Some(reason);
            }
        }
        entry
    }
}

fn rfc3339(at: SystemTime) -> String {
    crate::clock::rfc3339(at)
}

impl WireAnswer {
    /// An answer with no replica named.
    pub fn new(result: WireResult) -> Self {
        Self {
            version: VERSION,
            replica: None,
            result,
        }
    }

    /// A refusal.
    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(WireResult::Refused {
            message: message.into(),
        })
    }

    /// The `rotate_requests_total` result this answer counts as.
    pub fn metric_result(&self) -> &'static str {
        match &self.result {
            WireResult::Done {
                connections,
                others_not_listed: 0,
                ..
            } if connections.iter().all(|c| c.outcome == WireOutcome::Pushed) => "pushed",
            WireResult::Done { .. } => "failed",
            WireResult::Unknown { .. } | WireResult::Refused { .. } => "rejected",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Result<Valid, String> {
        serde_json::from_str::<WireRequest>(text)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn a_request_names_connections_one_way_only() {
        let all = request(r#"{"version":1,"all":true,"timeout_ms":5000}"#).unwrap();
        assert_eq!(all.selection, Selection::All);
        assert_eq!(all.wait, Duration::from_secs(5));
        assert!(request(r#"{"version":1,"timeout_ms":5000}"#).is_err());
        assert!(
            request(r#"{"version":1,"all":true,"connections":["a"],"timeout_ms":5000}"#).is_err()
        );
        let some =
            request(r#"{"version":1,"connections":["a"],"sandboxes":["prod"],"timeout_ms":0}"#)
                .unwrap();
        assert_eq!(some.wait, MIN_WAIT);
    }

    #[test]
    fn hostile_requests_are_refused_or_defused() {
        // Unknown fields, another version, control characters in an id.
        assert!(request(r#"{"version":1,"all":true,"timeout_ms":1,"sudo":true}"#).is_err());
        assert!(request(r#"{"version":2,"all":true,"timeout_ms":1}"#).is_err());
        let error = request(r#"{"version":1,"connections":["a\nb"],"timeout_ms":1}"#).unwrap_err();
        assert!(error.contains("control characters"), "{error}");
        assert!(!error.contains('\n'), "{error}");
        // A reason that would forge a log line is escaped and bounded.
        let reason = format!("leak\n{{\"level\":\"ERROR\"}}{}", "x".repeat(5000));
        let valid = serde_json::to_string(&WireRequest {
            version: 1,
            all: true,
            connections: vec![],
            sandboxes: vec![],
            reason,
            timeout_ms: u64::MAX,
        })
        .unwrap();
        let valid = request(&valid).unwrap();
        assert!(!valid.reason.contains('\n'));
        assert!(
            valid.reason.len() < MAX_REASON_CHARS + 40,
            "{}",
            valid.reason
        );
        assert_eq!(valid.wait, MAX_WAIT);
    }

    #[test]
    fn an_answer_counts_as_pushed_only_when_every_connection_was() {
        let pushed = WireConnection::new(
            "c1".into(),
            "n".into(),
            "prod".into(),
            Some(RotateOutcome::Pushed {
                access_key_id: "ASIA1".into(),
                expires_at: SystemTime::UNIX_EPOCH,
            }),
        );
        let pending = WireConnection::new("c2".into(), "n".into(), "prod".into(), None);
        let done = |connections| {
            WireAnswer::new(WireResult::Done {
                connections,
                pushed_not_listed: 0,
                others_not_listed: 0,
            })
        };
        assert_eq!(done(vec![pushed.clone()]).metric_result(), "pushed");
        assert_eq!(done(vec![pushed, pending]).metric_result(), "failed");
        assert_eq!(WireAnswer::refused("no").metric_result(), "rejected");
    }
}
