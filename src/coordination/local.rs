//! Non-secret state kept across restarts, so that a restart does not re-push
//! connections whose credentials are still good.
//!
//! The file is JSON with a format `version`; times are whole unix seconds:
//!
//! ```json
//! {
//!   "version": 1,
//!   "connections": {
//!     "4cb0c374-d3bb-4557-b139-5712880adc55": {
//!       "sandbox": "prod",
//!       "etag": "\"2a00b6c3-0000-0200-0000-65f1c0a70000\"",
//!       "access_key_id": "ASIAEXAMPLE",
//!       "expires_at": 1714564800,
//!       "last_success_at": 1714561200
//!     }
//!   }
//! }
//! ```
//!
//! It is written atomically (temp file in the same directory, `fsync`,
//! rename, `fsync` of the directory), mode 0600, from the scheduler's
//! snapshots by [`crate::persist::StateFile`]. Losing it is harmless: the
//! daemon then rotates every connection at once.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The format written by this version, and the only one read.
pub const STATE_VERSION: u64 = 1;

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
    ///
    /// Stored in whole seconds, rounded down, so a loaded value is never
    /// later than the real expiry.
    pub expires_at: SystemTime,
    /// When we last rotated it (whole seconds, rounded down).
    pub last_success_at: Option<SystemTime>,
}

/// The whole state file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateSnapshot {
    /// By connection id.
    pub connections: BTreeMap<String, PersistedConnection>,
}

/// Why the state file could not be read or written.
///
/// None of these is fatal: on a load error the caller logs it and starts
/// with an empty snapshot (every connection is rotated at once); on a save
/// error it logs it and keeps running (the previous file, if any, is intact,
/// and the next save tries again).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file exists but could not be read (permissions, I/O error).
    /// The caller logs it and starts from empty state.
    #[error("cannot read state file {path}: {source}")]
    Read {
        /// The state file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file is not JSON, or not the shape of a state file (a truncated
    /// or hand-edited file). The caller logs it and starts from empty state;
    /// the next save replaces the file.
    #[error("state file {path} is not valid: {source}")]
    Parse {
        /// The state file.
        path: PathBuf,
        /// What the JSON parser said, with line and column.
        source: serde_json::Error,
    },
    /// The file was written by another version of the daemon in a format
    /// this one does not read. The caller logs it and starts from empty
    /// state; the next save replaces the file.
    #[error("state file {path} has format version {found}, this daemon reads version {expected}")]
    UnsupportedVersion {
        /// The state file.
        path: PathBuf,
        /// The version in the file (0 when it has none).
        found: u64,
        /// The version this daemon reads and writes.
        expected: u64,
    },
    /// The directory meant to hold the file does not exist. It is not
    /// created: under systemd, `StateDirectory=` makes it, so its absence
    /// means a wrong `[state] path`. The caller logs it and keeps running
    /// without persisting.
    #[error(
        "state directory {dir} does not exist (create it, or set StateDirectory= in the systemd unit)"
    )]
    MissingDirectory {
        /// The directory.
        dir: PathBuf,
    },
    /// Writing, syncing or renaming the new file failed; the previous file,
    /// if any, is unchanged. The caller logs it and tries again at the next save.
    #[error("cannot write state file {path}: {source}")]
    Write {
        /// The file being written (the temp file or the target).
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Reads and atomically writes the state file.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
}

/// On-disk shape, version 1.
#[derive(Debug, Serialize, Deserialize)]
struct FileV1 {
    version: u64,
    #[serde(default)]
    connections: BTreeMap<String, ConnectionV1>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ConnectionV1 {
    sandbox: String,
    etag: String,
    access_key_id: String,
    /// Unix seconds.
    expires_at: u64,
    /// Unix seconds.
    #[serde(default)]
    last_success_at: Option<u64>,
}

/// Distinguishes temp files of concurrent saves within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl StateStore {
    /// A store at `path` (nothing is read yet).
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file; a missing file is an empty snapshot.
    pub fn load(&self) -> Result<StateSnapshot, StateError> {
        let bytes = match crate::fsguard::read(&self.path, crate::fsguard::MAX_STATE_FILE) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(StateSnapshot::default()),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let parse_error = |source| StateError::Parse {
            path: self.path.clone(),
            source,
        };
        // The version is read first, so that a file in another format is
        // reported as such rather than as whatever field fails to parse.
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(parse_error)?;
        let Some(object) = value.as_object() else {
            return Err(parse_error(serde::de::Error::custom(
                "expected a JSON object with a \"version\" field",
            )));
        };
        let version = match object.get("version") {
            None => 0,
            Some(v) => v.as_u64().ok_or_else(|| {
                parse_error(serde::de::Error::custom("\"version\" is not a number"))
            })?,
        };
        if version != STATE_VERSION {
            return Err(StateError::UnsupportedVersion {
                path: self.path.clone(),
                found: version,
                expected: STATE_VERSION,
            });
        }
        let file: FileV1 = serde_json::from_slice(&bytes).map_err(parse_error)?;
        Ok(StateSnapshot {
            connections: file
                .connections
                .into_iter()
                .filter_map(|(id, c)| {
                    // A record with an id, etag or access key id this daemon
                    // could not have written is not believed (issue 26): that
                    // connection rotates now; the others are kept.
                    if !crate::ident::is_connection_id(&id)
                        || !crate::ident::is_valid_etag(&c.etag)
                        || !crate::ident::is_access_key_id(&c.access_key_id)
                    {
                        tracing::warn!(
                            connection = %crate::remote::http::bounded(&id, 80),
                            "state file record has an id, etag or access key id of the wrong shape; ignoring it"
                        );
                        return None;
                    }
                    // A time no clock can hold is a corrupt record: that
                    // connection rotates now; the others are kept.
                    let times = from_unix(c.expires_at).zip(match c.last_success_at {
                        Some(at) => from_unix(at).map(Some),
                        None => Some(None),
                    });
                    let Some((expires_at, last_success_at)) = times else {
                        tracing::warn!(connection = %id, "state file record has times out of range; ignoring it");
                        return None;
                    };
                    Some((
                        id,
                        PersistedConnection {
                            sandbox: c.sandbox,
                            etag: c.etag,
                            access_key_id: c.access_key_id,
                            expires_at,
                            last_success_at,
                        },
                    ))
                })
                .collect(),
        })
    }

    /// Writes atomically (temp file, fsync, rename). Blocking: call from `spawn_blocking`.
    pub fn save(&self, snapshot: &StateSnapshot) -> Result<(), StateError> {
        let file = FileV1 {
            version: STATE_VERSION,
            connections: snapshot
                .connections
                .iter()
                .map(|(id, c)| {
                    (
                        id.clone(),
                        ConnectionV1 {
                            sandbox: c.sandbox.clone(),
                            etag: c.etag.clone(),
                            access_key_id: c.access_key_id.clone(),
                            expires_at: to_unix(c.expires_at),
                            last_success_at: c.last_success_at.map(to_unix),
                        },
                    )
                })
                .collect(),
        };
        let mut json = serde_json::to_vec_pretty(&file).map_err(|e| StateError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        json.push(b'\n');

        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(StateError::MissingDirectory { dir });
        }
        let file_name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state".to_owned());
        let temp = dir.join(format!(
            ".{file_name}.tmp.{}.{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));

        if let Err(source) = write_synced(&temp, &json) {
            let _ = fs::remove_file(&temp);
            return Err(StateError::Write { path: temp, source });
        }
        if let Err(source) = fs::rename(&temp, &self.path) {
            let _ = fs::remove_file(&temp);
            return Err(StateError::Write {
                path: self.path.clone(),
                source,
            });
        }
        // Makes the rename itself durable. Best effort: some filesystems
        // refuse to fsync a directory, and the data is already safe in the
        // renamed file.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Creates `path` (which must not exist) with mode 0600, writes `bytes`, fsyncs.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Not secret, but nobody else has any business reading it.
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Whole unix seconds, rounded down (0 before 1970).
fn to_unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn from_unix(secs: u64) -> Option<SystemTime> {
    crate::clock::from_unix_seconds(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn sample() -> StateSnapshot {
        let mut connections = BTreeMap::new();
        connections.insert(
            "4cb0c374-d3bb-4557-b139-5712880adc55".to_owned(),
            PersistedConnection {
                sandbox: "prod".into(),
                etag: "\"2a00b6c3-0000-0200-0000-65f1c0a70000\"".into(),
                access_key_id: "ASIAEXAMPLE".into(),
                expires_at: t(1_714_564_800),
                last_success_at: Some(t(1_714_561_200)),
            },
        );
        connections.insert(
            "second".to_owned(),
            PersistedConnection {
                sandbox: "dev".into(),
                etag: "e2".into(),
                access_key_id: "ASIASECOND".into(),
                expires_at: t(1_714_564_900),
                last_success_at: None,
            },
        );
        StateSnapshot { connections }
    }

    #[test]
    fn times_out_of_range_drop_only_that_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let good = r#"{"sandbox":"prod","etag":"\"e\"","access_key_id":"ASIAGOOD","expires_at":1700003600}"#;
        let bad = format!(
            r#"{{"sandbox":"prod","etag":"\"e\"","access_key_id":"ASIABAD","expires_at":{}}}"#,
            u64::MAX
        );
        let text = format!(r#"{{"version":1,"connections":{{"good":{good},"bad":{bad}}}}}"#);
        std::fs::write(&path, text).unwrap();
        let loaded = StateStore::new(path).load().unwrap();
        assert_eq!(loaded.connections.len(), 1, "{loaded:?}");
        assert!(loaded.connections.contains_key("good"));
    }

    #[test]
    fn records_of_the_wrong_shape_drop_only_that_record() {
        // Issue 26 #3 and #6: an id `..`, an overlong id, an access key id
        // of 300 KB with control characters were believed and served.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let record = |key: &str| {
            format!(
                r#"{{"sandbox":"prod","etag":"\"e\"","access_key_id":{},"expires_at":1700003600}}"#,
                serde_json::to_string(key).unwrap()
            )
        };
        let huge = format!("ASIA\u{1b}[2J{}", "A".repeat(300_000));
        let text = format!(
            r#"{{"version":1,"connections":{{"good":{},"..":{},"{}":{},"key":{}}}}}"#,
            record("ASIAGOOD"),
            record("ASIADOTS"),
            "x".repeat(3000),
            record("ASIALONG"),
            record(&huge),
        );
        std::fs::write(&path, text).unwrap();
        let loaded = StateStore::new(path).load().unwrap();
        assert_eq!(
            loaded.connections.keys().collect::<Vec<_>>(),
            ["good"],
            "{:?}",
            loaded
                .connections
                .keys()
                .map(|k| k.len())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        store.save(&sample()).unwrap();
        assert_eq!(store.load().unwrap(), sample());
        // Overwrite with less.
        store.save(&StateSnapshot::default()).unwrap();
        assert_eq!(store.load().unwrap(), StateSnapshot::default());
    }

    #[test]
    fn sub_second_times_round_down() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let mut snapshot = sample();
        for c in snapshot.connections.values_mut() {
            c.expires_at += Duration::from_millis(999);
        }
        store.save(&snapshot).unwrap();
        assert_eq!(store.load().unwrap(), sample());
    }

    #[test]
    fn missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("absent.json"));
        assert_eq!(store.load().unwrap(), StateSnapshot::default());
    }

    #[test]
    fn corrupt_file_is_a_parse_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = StateStore::new(path.clone());
        for bad in [
            "",
            "{not json",
            "[]",
            r#"{"version":1,"connections":{"x":{"sandbox":1}}}"#,
        ] {
            fs::write(&path, bad).unwrap();
            let error = store.load().unwrap_err();
            assert!(
                matches!(error, StateError::Parse { .. }),
                "{bad}: {error:?}"
            );
            assert!(error.to_string().contains("state.json"), "{error}");
        }
    }

    #[test]
    fn other_version_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = StateStore::new(path.clone());
        fs::write(&path, r#"{"version":2,"connections":{"x":"new shape"}}"#).unwrap();
        let error = store.load().unwrap_err();
        assert!(
            matches!(
                error,
                StateError::UnsupportedVersion {
                    found: 2,
                    expected: 1,
                    ..
                }
            ),
            "{error:?}"
        );
        fs::write(&path, r#"{"connections":{}}"#).unwrap();
        assert!(matches!(
            store.load().unwrap_err(),
            StateError::UnsupportedVersion { found: 0, .. }
        ));
    }

    #[cfg(unix)]
    #[test]
    fn unreadable_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading it fails, not NotFound.
        let path = dir.path().join("state.json");
        fs::create_dir(&path).unwrap();
        let error = StateStore::new(path).load().unwrap_err();
        assert!(matches!(error, StateError::Read { .. }), "{error:?}");
    }

    #[test]
    fn missing_directory_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let store = StateStore::new(missing.join("state.json"));
        let error = store.save(&sample()).unwrap_err();
        assert!(
            matches!(&error, StateError::MissingDirectory { dir } if *dir == missing),
            "{error:?}"
        );
        assert!(!missing.exists());
    }

    #[test]
    fn no_temp_file_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        store.save(&sample()).unwrap();
        store.save(&sample()).unwrap();
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["state.json".to_owned()]);
    }

    #[test]
    fn failed_rename_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a non-empty directory, so the rename fails.
        let path = dir.path().join("state.json");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), "x").unwrap();
        let error = StateStore::new(path.clone()).save(&sample()).unwrap_err();
        assert!(matches!(error, StateError::Write { .. }), "{error:?}");
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["state.json".to_owned()]);
    }

    #[cfg(unix)]
    #[test]
    fn file_mode_is_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        StateStore::new(path.clone()).save(&sample()).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn file_holds_only_known_non_secret_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        StateStore::new(path.clone()).save(&sample()).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let mut top: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        top.sort_unstable();
        assert_eq!(top, ["connections", "version"]);
        assert_eq!(json["version"], 1);
        let connections = json["connections"].as_object().unwrap();
        assert_eq!(connections.len(), 2);
        for connection in connections.values() {
            for key in connection.as_object().unwrap().keys() {
                assert!(
                    [
                        "sandbox",
                        "etag",
                        "access_key_id",
                        "expires_at",
                        "last_success_at"
                    ]
                    .contains(&key.as_str()),
                    "unexpected key {key}"
                );
                let lower = key.to_lowercase();
                for secret in ["secret", "token", "password"] {
                    assert!(!lower.contains(secret), "secret-like key {key}");
                }
            }
        }
        let c = &json["connections"]["4cb0c374-d3bb-4557-b139-5712880adc55"];
        assert_eq!(c["expires_at"], 1_714_564_800);
        assert_eq!(c["last_success_at"], 1_714_561_200);
    }
}
