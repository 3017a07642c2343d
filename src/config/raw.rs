//! The permissive raw shape serde reads: every leaf a [`Raw`] value of any
//! type, every table's keys known (unknown ones are reported, not fatal).

use super::*;

/// A value as written, whatever its type. Typing happens in validation, so
/// every wrong type is reported with its key, not just the first one serde
/// would stop at. No `Debug`: it may hold the client secret.
pub(super) enum Raw {
    Str(String),
    Int(i128),
    Float,
    Bool(bool),
    List(Vec<Raw>),
    /// Its entries, in the order read (`session_tags`).
    Table(Vec<(String, Raw)>),
    Nil,
}

impl Raw {
    /// What it is, for "expected X, found Y" (never the value itself).
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Raw::Str(_) => "a string",
            Raw::Int(_) => "an integer",
            Raw::Float => "a float",
            Raw::Bool(_) => "a boolean",
            Raw::List(_) => "a list",
            Raw::Table(_) => "a table",
            Raw::Nil => "nothing",
        }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RawVisitor;

        impl<'de> Visitor<'de> for RawVisitor {
            type Value = Raw;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Raw, E> {
                Ok(Raw::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Raw, E> {
                Ok(Raw::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
                Ok(Raw::Int(v.into()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Raw, E> {
                Ok(Raw::Int(v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Raw, E> {
                // Beyond i128 it is out of every range we check anyway.
                Ok(Raw::Int(i128::try_from(v).unwrap_or(i128::MAX)))
            }
            fn visit_f64<E: de::Error>(self, _v: f64) -> Result<Raw, E> {
                Ok(Raw::Float)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Raw, E> {
                Ok(Raw::Str(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Raw, E> {
                Ok(Raw::Nil)
            }
            fn visit_none<E: de::Error>(self) -> Result<Raw, E> {
                Ok(Raw::Nil)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
                Raw::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Raw::List(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
                // Read as `Raw`, not `IgnoredAny`: serde_ignored would report
                // the entries of a misplaced table as unknown keys. Kept:
                // `session_tags` is a table of the operator's own keys.
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Raw>()? {
                    entries.push(entry);
                }
                Ok(Raw::Table(entries))
            }
        }

        deserializer.deserialize_any(RawVisitor)
    }
}

pub(super) fn present(raw: &Option<Raw>) -> bool {
    !matches!(raw, None | Some(Raw::Nil))
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "a TOML document")]
pub(super) struct RawConfig {
    pub(super) adobe: RawAdobe,
    pub(super) aws: RawAws,
    pub(super) rotation: RawRotation,
    pub(super) connections: Option<Vec<RawConnection>>,
    pub(super) discover: Option<Vec<RawDiscover>>,
    pub(super) admin: RawAdmin,
    pub(super) state: RawState,
    pub(super) coordination: RawCoordination,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "an [adobe] table")]
pub(super) struct RawAdobe {
    pub(super) client_id: Option<Raw>,
    pub(super) client_secret: Option<Raw>,
    pub(super) client_secret_file: Option<Raw>,
    pub(super) org_id: Option<Raw>,
    pub(super) scopes: Option<Raw>,
    pub(super) ims_url: Option<Raw>,
    pub(super) platform_url: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "an [aws] table")]
pub(super) struct RawAws {
    pub(super) region: Option<Raw>,
    pub(super) sts_endpoint: Option<Raw>,
    pub(super) s3_endpoint: Option<Raw>,
    pub(super) s3_endpoints: Option<Raw>,
    pub(super) role_arn: Option<Raw>,
    pub(super) external_id: Option<Raw>,
    pub(super) session_name: Option<Raw>,
    pub(super) session_tags: Option<Raw>,
    pub(super) source_identity: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "a [rotation] table")]
pub(super) struct RawRotation {
    pub(super) session_duration: Option<Raw>,
    pub(super) refresh_before: Option<Raw>,
    pub(super) jitter: Option<Raw>,
    pub(super) concurrency: Option<Raw>,
    pub(super) max_requests_per_second: Option<Raw>,
    pub(super) retry_min: Option<Raw>,
    pub(super) retry_max: Option<Raw>,
    pub(super) verify: Option<Raw>,
    pub(super) prepush_check: Option<Raw>,
    pub(super) request_timeout: Option<Raw>,
    pub(super) shutdown_grace: Option<Raw>,
    pub(super) health_check_every: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "a [[connections]] table")]
pub(super) struct RawConnection {
    pub(super) id: Option<Raw>,
    pub(super) sandbox: Option<Raw>,
    pub(super) name: Option<Raw>,
    pub(super) role_arn: Option<Raw>,
    pub(super) external_id: Option<Raw>,
    pub(super) session_name: Option<Raw>,
    pub(super) session_policy: Option<Raw>,
    pub(super) policy_arns: Option<Raw>,
    pub(super) session_tags: Option<Raw>,
    pub(super) source_identity: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "a [[discover]] table")]
pub(super) struct RawDiscover {
    pub(super) sandboxes: Option<Raw>,
    pub(super) name: Option<Raw>,
    pub(super) description_tag: Option<Raw>,
    pub(super) role_arn: Option<Raw>,
    pub(super) external_id: Option<Raw>,
    pub(super) session_name: Option<Raw>,
    pub(super) session_policy: Option<Raw>,
    pub(super) policy_arns: Option<Raw>,
    pub(super) session_tags: Option<Raw>,
    pub(super) source_identity: Option<Raw>,
    pub(super) every: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "an [admin] table")]
pub(super) struct RawAdmin {
    pub(super) listen: Option<Raw>,
    pub(super) control_socket: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "a [state] table")]
pub(super) struct RawState {
    pub(super) path: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(default, expecting = "a [coordination] table")]
pub(super) struct RawCoordination {
    pub(super) backend: Option<Raw>,
    pub(super) table: Option<Raw>,
    pub(super) lease: Option<Raw>,
    pub(super) renew_every: Option<Raw>,
    pub(super) holder: Option<Raw>,
    pub(super) endpoint: Option<Raw>,
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------
