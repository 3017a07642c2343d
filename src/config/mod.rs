//! Configuration: one TOML file layered with `AEP_S3_ROTATOR__SECTION__KEY`
//! environment overrides, parsed into raw serde structs, then validated into
//! the types below. Validation collects *every* problem with its key path.
//!
//! The pipeline, in order:
//!
//! 1. the file is read and checked to be TOML (our own parse, so that a syntax
//!    error is reported without echoing the offending line, which may hold a
//!    secret);
//! 2. each environment override is laid over that table as a string
//!    (`AEP_S3_ROTATOR__ROTATION__CONCURRENCY=3` → `rotation.concurrency`,
//!    `load::layer`);
//! 3. the layered tree is deserialized into permissive raw structs whose leaves
//!    accept any value (`Raw`), with `serde_ignored` collecting every unknown
//!    key and `serde_path_to_error` naming the key of a structural type error;
//! 4. `Checker` turns the raw structs into [`Config`], recording one
//!    [`ConfigIssue`] per problem and carrying on, so an operator fixes the
//!    whole file in one go.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use secrecy::zeroize::Zeroize;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use url::{Host, Url};

mod attribution;
mod check;
mod identities;
mod load;
mod raw;
mod sections;
mod types;

#[cfg(test)]
mod tests;

pub use attribution::{
    Attribution, AttributionProblem, ExpandedAttribution, MAX_SESSION_TAGS, PLACEHOLDERS,
    source_identity_problem, tag_key_problem, tag_value_problem,
};
pub(crate) use check::is_loopback;
use check::*;
use load::*;
pub use load::{load_admin, load_control_socket};
use raw::*;
pub use types::*;
