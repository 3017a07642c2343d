//! Non-secret state kept across restarts. INTERFACE STUB (operations work).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

/// What is remembered of one connection. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistedConnection {
    /// Sandbox the connection was rotated in.
    pub sandbox: String,
    /// The etag returned by our last successful PATCH.
    pub etag: String,
    /// Access key id of the credentials we pushed.
    pub access_key_id: String,
    /// When those credentials expire.
    pub expires_at: SystemTime,
    /// When we last rotated it.
    pub last_success_at: Option<SystemTime>,
}

/// The whole state file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateSnapshot {
    /// By connection id.
    pub connections: BTreeMap<String, PersistedConnection>,
}

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Placeholder.
    #[error("state: {0}")]
    Io(String),
}

/// Reads and atomically writes the state file.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    /// A store at `path` (nothing is read yet).
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }
    /// Reads the file; a missing file is an empty snapshot.
    pub fn load(&self) -> Result<StateSnapshot, StateError> {
        let _ = &self.path;
        todo!()
    }
    /// Writes atomically (temp file, fsync, rename). Blocking: call from `spawn_blocking`.
    pub fn save(&self, snapshot: &StateSnapshot) -> Result<(), StateError> {
        let _ = snapshot;
        todo!()
    }
}
