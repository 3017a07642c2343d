//! Reading the file and the environment, layering them, and turning
//! serde's and toml's errors into issues with key paths; suggestions for
//! misspelt keys; `[admin]` alone for `status`.

use std::borrow::Cow;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::*;

/// Environment variables starting with this override `[section] key`.
pub(super) const ENV_PREFIX: &str = "AEP_S3_ROTATOR__";
/// What the advice in messages points at: the source tree's example, and
/// where the Debian package installs it (a host has no source tree).
pub(super) const EXAMPLE: &str = "the example config (config/example.toml; /usr/share/doc/aep-s3-rotator/examples/config.toml when installed)";

impl Config {
    /// Reads the TOML file at `path`, layered with `AEP_S3_ROTATOR__SECTION__KEY`
    /// variables from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_as(path, Scope::Daemon)
    }

    /// [`Config::load`] for `check`, run by an operator outside the service:
    /// a `client_secret_file` that is a systemd credential of a unit this
    /// process is not ([`AdobeConfig::client_secret_deferred`]) is no error.
    pub fn load_for_check(path: &Path) -> Result<Config, ConfigError> {
        Self::load_as(path, Scope::Check)
    }

    pub(super) fn load_as(path: &Path, scope: Scope) -> Result<Config, ConfigError> {
        let mut env = Vec::new();
        let mut issues = Vec::new();
        for (name, value) in std::env::vars_os() {
            // Names that are not Unicode cannot carry our prefix.
            let Some(name) = name.to_str().filter(|n| n.starts_with(ENV_PREFIX)) else {
                continue;
            };
            match value.into_string() {
                Ok(value) => env.push((name.to_owned(), value)),
                Err(_) => issues.push(ConfigIssue::new(
                    env_key(name),
                    format!("the environment variable {name} is not valid UTF-8; set it to plain text or unset it"),
                )),
            }
        }
        let loading = Loading {
            scope,
            credentials_directory: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        };
        load_file(path, env, issues, &loading)
    }

    /// Same as [`Config::load`], with the environment given explicitly
    /// (tests): pairs of (NAME, value); only names starting with
    /// `AEP_S3_ROTATOR__` are used.
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        load_file(
            path,
            env.into_iter().collect(),
            Vec::new(),
            &Loading::default(),
        )
    }

    /// Same, from TOML text. Relative paths in it (`client_secret_file`,
    /// `state.path`) are kept as written, i.e. relative to the working directory.
    pub fn from_toml_str(
        toml: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        from_text(
            toml,
            "config",
            None,
            env.into_iter().collect(),
            Vec::new(),
            &Loading::default(),
        )
    }
}

/// Who loads the config, and so what a missing systemd credential means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Scope {
    /// The daemon (and every command but `check`): everything must be there.
    #[default]
    Daemon,
    /// `check`, usually run by an operator outside the service.
    Check,
}

/// How a load goes: its scope, and `$CREDENTIALS_DIRECTORY` (systemd's
/// credentials of the unit this process runs in, if any).
#[derive(Debug, Default)]
pub(super) struct Loading {
    pub(super) scope: Scope,
    pub(super) credentials_directory: Option<PathBuf>,
}

/// `[admin]` alone, for `status`: it only needs the address of the running
/// daemon's admin endpoint, not the secret or anything else the daemon
/// checks (an operator runs it outside the service, where a systemd
/// credential does not exist). `AEP_S3_ROTATOR__ADMIN__LISTEN` overrides the file.
pub fn load_admin(path: &Path) -> Result<AdminConfig, ConfigError> {
    const PATH: &str = "admin.listen";
    let fail = |path: &str, message: String| ConfigError {
        issues: vec![ConfigIssue::new(path, message)],
    };
    let from_env = std::env::var(format!("{ENV_PREFIX}ADMIN__LISTEN"))
        .ok()
        .filter(|v| !v.is_empty());
    let listen = match from_env {
        Some(value) => Some(value),
        None => {
            let origin = path.display().to_string();
            let text = crate::fsguard::read_to_string(path, crate::fsguard::MAX_CONFIG_FILE)
                .map_err(|e| {
                    fail(
                        &origin,
                        format!(
                            "cannot be read ({e}); pass --config PATH or set AEP_S3_ROTATOR_CONFIG"
                        ),
                    )
                })?;
            let table = toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError {
                issues: vec![toml_issue(&origin, &text, &e)],
            })?;
            match table.get("admin").and_then(|a| a.get("listen")) {
                None => None,
                Some(toml::Value::String(listen)) => Some(listen.clone()),
                Some(_) => return Err(fail(PATH, "wrong type: expected a string".to_owned())),
            }
        }
    };
    let listen = match listen {
        None => None,
        Some(text) => Some(parse_listen(&text).map_err(|message| fail(PATH, message))?),
    };
    Ok(AdminConfig {
        listen,
        control_socket: ControlSocket::Default,
    })
}

/// `[admin] control_socket` alone, for `rotate`: like [`load_admin`], it
/// runs outside the service (as root on a VM, under `kubectl exec` in a
/// container). `AEP_S3_ROTATOR__ADMIN__CONTROL_SOCKET` overrides the file;
/// a config file that does not exist means the default socket.
pub fn load_control_socket(path: &Path) -> Result<ControlSocket, ConfigError> {
    const PATH: &str = "admin.control_socket";
    let fail = |path: &str, message: String| ConfigError {
        issues: vec![ConfigIssue::new(path, message)],
    };
    if let Ok(value) = std::env::var(format!("{ENV_PREFIX}ADMIN__CONTROL_SOCKET")) {
        return ControlSocket::parse(&value).map_err(|message| fail(PATH, message));
    }
    let origin = path.display().to_string();
    let text = match crate::fsguard::read_to_string(path, crate::fsguard::MAX_CONFIG_FILE) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ControlSocket::Default),
        Err(e) => {
            return Err(fail(
                &origin,
                format!("cannot be read ({e}); pass --config PATH, or --socket PATH"),
            ));
        }
    };
    let table = toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError {
        issues: vec![toml_issue(&origin, &text, &e)],
    })?;
    match table.get("admin").and_then(|a| a.get("control_socket")) {
        None => Ok(ControlSocket::Default),
        Some(toml::Value::String(text)) => {
            ControlSocket::parse(text).map_err(|message| fail(PATH, message))
        }
        Some(_) => Err(fail(PATH, "wrong type: expected a string".to_owned())),
    }
}

/// `/run/credentials/UNIT/NAME` → (`UNIT`, `NAME`): a credential systemd
/// hands to the unit (`LoadCredential=`), in a directory that exists only
/// while the unit runs and only for it.
pub(super) fn systemd_credential(file: &str) -> Option<(&str, &str)> {
    let rest = file.strip_prefix("/run/credentials/")?;
    let (unit, name) = rest.split_once('/')?;
    (!unit.is_empty() && !name.is_empty() && !name.contains('/')).then_some((unit, name))
}

/// `[admin] listen`: an IP address and port.
pub(super) fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse::<SocketAddr>().map_err(|_| {
        format!("not a socket address: {text:?} (use e.g. \"127.0.0.1:9464\"; host names are not accepted)")
    })
}

pub(super) fn load_file(
    path: &Path,
    env: Vec<(String, String)>,
    issues: Vec<ConfigIssue>,
    loading: &Loading,
) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = match crate::fsguard::read_to_string(path, crate::fsguard::MAX_CONFIG_FILE) {
        Ok(text) => text,
        Err(error) => {
            let message = match error.kind() {
                std::io::ErrorKind::NotFound => "no such file; pass --config PATH or set AEP_S3_ROTATOR_CONFIG (the default is /etc/aep-s3-rotator/config.toml)".to_owned(),
                std::io::ErrorKind::PermissionDenied => "permission denied; make the file readable by the daemon's user".to_owned(),
                std::io::ErrorKind::InvalidData => "not UTF-8 text; save the file as UTF-8".to_owned(),
                std::io::ErrorKind::InvalidInput => error.to_string(),
                _ => format!("cannot be read ({error}); check that --config names a readable file"),
            };
            let mut all = issues;
            all.push(ConfigIssue::new(origin, message));
            return Err(ConfigError { issues: all });
        }
    };
    from_text(&text, &origin, Some(path), env, issues, loading)
}

/// The key an environment variable overrides:
/// `AEP_S3_ROTATOR__ROTATION__SESSION_DURATION` → `rotation.session_duration`.
pub(super) fn env_key(name: &str) -> String {
    name.get(ENV_PREFIX.len()..)
        .unwrap_or_default()
        .to_lowercase()
        .replace("__", ".")
}

/// Parses, layers, deserializes and validates. `origin` names the text in
/// issues about it as a whole; `file` is where it came from, if anywhere.
pub(super) fn from_text(
    text: &str,
    origin: &str,
    file: Option<&Path>,
    env: Vec<(String, String)>,
    mut issues: Vec<ConfigIssue>,
    loading: &Loading,
) -> Result<Config, ConfigError> {
    // Our own parse first: its error is reported by position, without the
    // source line that `toml`'s Display would quote (it may be a secret).
    // The document's own table, its strings borrowed from `text`: read
    // once into `RawConfig` below, never copied into a `toml::Table` (at
    // 10,000 connections that copy was most of the load).
    let table = match DeTable::parse(text) {
        Ok(table) => table,
        Err(error) => {
            issues.push(toml_issue(origin, text, &error));
            return Err(ConfigError { issues });
        }
    };
    // Only our prefix, and an empty value counts as unset (what an unset
    // `${VAR}` in a compose file or unit turns into).
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, value)| {
            name.len() > ENV_PREFIX.len() && name.starts_with(ENV_PREFIX) && !value.is_empty()
        })
        .collect();
    // Sorted: a table (`AEP_S3_ROTATOR__ADOBE`) is laid before its keys.
    env.sort();
    let env_names: BTreeMap<String, String> = env
        .iter()
        .map(|(name, _)| (env_key(name), name.clone()))
        .collect();
    let client_secret_in_file = table
        .get_ref()
        .get("adobe")
        .and_then(|adobe| adobe.get_ref().as_table())
        .is_some_and(|adobe| adobe.contains_key("client_secret"));
    // The keys of the plain tables ([rotation], [aws], ...: a few dozen),
    // kept to tell later whether a key an unknown one resembles was set.
    let table_keys: BTreeMap<String, Vec<String>> = table
        .get_ref()
        .iter()
        .filter_map(|(name, value)| {
            let keys = value
                .get_ref()
                .as_table()?
                .keys()
                .map(|key| key.get_ref().to_string())
                .collect();
            Some((name.get_ref().to_string(), keys))
        })
        .collect();
    let mut layered = table;
    for (name, value) in env {
        if let Err(issue) = layer(layered.get_mut(), &name, value) {
            issues.push(issue);
        }
    }

    // Not `#[serde(deny_unknown_fields)]`: it stops at the first unknown key
    // and hides everything else. `serde_ignored` reports each one with its
    // path while deserialization carries on.
    let mut unknown = Vec::new();
    let raw: Result<RawConfig, _> = {
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(ignored_path(&path));
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
            toml::de::Deserializer::from(layered),
            &mut record,
        ))
    };
    unknown.sort();
    unknown.dedup();
    // Keys an unknown one was probably meant to be: the checker's complaints
    // about them come from their defaults, not from anything the operator
    // wrote, and are left out (one typo, one message).
    let mut meant = Vec::new();
    for path in unknown {
        let advice = match suggest_key(&path) {
            Suggestion::Key(key) => {
                let advice = format!("unknown key; did you mean {key}?");
                let set = match key.split_once('.') {
                    Some((table, name)) => table_keys
                        .get(table)
                        .is_some_and(|keys| keys.iter().any(|k| k == name)),
                    None => table_keys.contains_key(&key),
                };
                if !set && !env_names.contains_key(&key) {
                    meant.push(key);
                }
                advice
            }
            Suggestion::Keys(keys) => format!("unknown key; this table takes {keys}"),
            Suggestion::None => format!("unknown key; check the spelling against {EXAMPLE}"),
        };
        let message = with_env_origin(&env_names, &path, advice);
        issues.push(ConfigIssue::new(path, message));
    }
    let raw = match raw {
        Ok(raw) => raw,
        Err(error) => {
            let path = error.path().to_string();
            let message =
                with_env_origin(&env_names, &path, structural_message(&path, error.inner()));
            issues.push(ConfigIssue::new(path, message));
            return Err(ConfigError { issues });
        }
    };

    let mut checker = Checker {
        issues,
        warnings: Vec::new(),
        env_names: &env_names,
        loading,
        secret_deferred: false,
        secret_file_read: None,
    };
    let config = checker.config(raw);
    if let Some(file) = file
        && client_secret_in_file
        && readable_by_others(file)
    {
        checker.warnings.push(format!(
            "config file {} holds adobe.client_secret and is readable by group/others; chmod 600 it or use client_secret_file",
            file.display()
        ));
    }
    let derived_from_a_default = |issue: &ConfigIssue| meant.contains(&issue.path);
    checker
        .issues
        .retain(|issue| !derived_from_a_default(issue));
    match config {
        Ok(mut config) if checker.issues.is_empty() => {
            config.warnings = checker.warnings;
            Ok(config)
        }
        _ => Err(ConfigError {
            issues: checker.issues,
        }),
    }
}

/// Lays one `AEP_S3_ROTATOR__SECTION__KEY` variable over the file's table:
/// its value, always a string (a client secret of digits keeps its leading
/// zeros; validation converts numbers and booleans where a key wants them),
/// replaces whatever the path held, and a path through a non-table makes a
/// table there. A wrong shape is then reported by deserialization and the
/// checks, with the variable's name ([`with_env_origin`]).
pub(super) fn layer(table: &mut DeTable<'_>, name: &str, value: String) -> Result<(), ConfigIssue> {
    let key = env_key(name);
    let mut segments: Vec<&str> = key.split('.').collect();
    if segments.iter().any(|segment| segment.is_empty()) {
        return Err(ConfigIssue::new(
            key.clone(),
            format!(
                "the environment variable {name} names no key; write AEP_S3_ROTATOR__SECTION__KEY (e.g. {ENV_PREFIX}ROTATION__CONCURRENCY) or unset it"
            ),
        ));
    }
    // Not from the file, so no position in it (errors never quote the file).
    fn unplaced<T>(value: T) -> Spanned<T> {
        Spanned::new(0..0, value)
    }
    let last = segments.pop().unwrap_or_default();
    let mut at = table;
    for segment in segments {
        let entry = at
            .entry(unplaced(Cow::Owned(segment.to_owned())))
            .or_insert_with(|| unplaced(DeValue::Table(DeTable::new())));
        if !entry.get_ref().is_table() {
            *entry = unplaced(DeValue::Table(DeTable::new()));
        }
        match entry.get_mut() {
            DeValue::Table(inner) => at = inner,
            // Made a table just above.
            _ => return Ok(()),
        }
    }
    at.insert(
        unplaced(Cow::Owned(last.to_owned())),
        unplaced(DeValue::String(Cow::Owned(value))),
    );
    Ok(())
}

/// Adds which environment variable set the key (or a key under it), since
/// the file alone would not explain the problem.
pub(super) fn with_env_origin(
    env_names: &BTreeMap<String, String>,
    path: &str,
    message: String,
) -> String {
    let nested = format!("{path}.");
    match env_names
        .iter()
        .find(|(key, _)| *key == path || key.starts_with(&nested))
    {
        Some((_, name)) if !message.contains(name.as_str()) => {
            format!("{message} (set by the environment variable {name})")
        }
        _ => message,
    }
}

/// A TOML syntax error as an issue: position and reason, never the line.
pub(super) fn toml_issue(origin: &str, text: &str, error: &toml::de::Error) -> ConfigIssue {
    let position = error.span().map(|span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before
            .rsplit('\n')
            .next()
            .unwrap_or_default()
            .chars()
            .count()
            + 1;
        format!(" at line {line}, column {column}")
    });
    let reason = error.message().trim_end();
    ConfigIssue::new(
        origin,
        format!(
            "not valid TOML{}: {reason}; fix the syntax (compare with {EXAMPLE})",
            position.unwrap_or_default()
        ),
    )
}

/// `serde_ignored`'s path in our notation: `connections[1].bogus`.
pub(super) fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => match ignored_path(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

/// What an unknown key was probably meant to be.
#[derive(Debug, PartialEq)]
pub(super) enum Suggestion {
    /// The full path of a known key a small edit away (`rotation.refresh_before`).
    Key(String),
    /// No close key: the keys the table takes, comma-separated.
    Keys(String),
    /// The table itself is unknown (or the key is not in a table we know).
    None,
}

/// Finds the known key an unknown `path` (`rotation.refesh_before`,
/// `connections[2].nmae`) is closest to, by edit distance: at most a third of
/// the key's length, and at least 1. The known keys are the raw structs'
/// own field names (read from serde), so a new key is suggested without a
/// list to keep.
pub(super) fn suggest_key(path: &str) -> Suggestion {
    let (table, key) = match path.rsplit_once('.') {
        Some((table, key)) => (table, key),
        None => ("", path),
    };
    // `connections[2]` → `connections`: every item of a list takes the same keys.
    let table_name = table.split('[').next().unwrap_or_default();
    let known: &[&str] = match table_name {
        "" => field_names::<RawConfig>(),
        "adobe" => field_names::<RawAdobe>(),
        "aws" => field_names::<RawAws>(),
        "rotation" => field_names::<RawRotation>(),
        "connections" => field_names::<RawConnection>(),
        "discover" => field_names::<RawDiscover>(),
        "admin" => field_names::<RawAdmin>(),
        "state" => field_names::<RawState>(),
        "coordination" => field_names::<RawCoordination>(),
        _ => return Suggestion::None,
    };
    let limit = (key.chars().count() / 3).max(1);
    let closest = known
        .iter()
        .map(|candidate| (strsim::damerau_levenshtein(key, candidate), *candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min();
    match closest {
        Some((_, candidate)) if table.is_empty() => Suggestion::Key(candidate.to_owned()),
        Some((_, candidate)) => Suggestion::Key(format!("{table}.{candidate}")),
        None if known.is_empty() => Suggestion::None,
        None => Suggestion::Keys(known.join(", ")),
    }
}

/// The field names serde's derive gives a struct: a deserializer that
/// records the `fields` argument of `deserialize_struct` and stops there.
pub(super) fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields recorded"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    // The probe always errs, by design: only the recorded names matter.
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// The message for a type error serde had to stop at (a section that is not
/// a table, say). Values are left out: they could be secrets in the wrong place.
pub(super) fn structural_message(path: &str, error: &toml::de::Error) -> String {
    if path == "connections" {
        return "must be a list of tables: write each connection as a [[connections]] table (double brackets)".to_owned();
    }
    // The message alone: `Display` may quote the file's line (a secret).
    let text = error.message();
    match text.split_once(", expected ") {
        Some((_, expected)) => {
            // `config` may append " for key `…`" and " in <origin>": the path says it.
            let expected = expected.split(" for key `").next().unwrap_or(expected);
            format!("wrong type: expected {expected}")
        }
        None => format!("cannot be read; compare it with {EXAMPLE}"),
    }
}

/// Whether the file's mode lets group or others read it.
#[cfg(unix)]
pub(super) fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
}

#[cfg(not(unix))]
pub(super) fn readable_by_others(_path: &Path) -> bool {
    false
}

// ---------------------------------------------------------------------------
// Raw structs: the shape of the file, every leaf permissive
// ---------------------------------------------------------------------------
