//! `session_tags` and `source_identity`: what `AssumeRole` is told about the
//! connection a session is for, so that CloudTrail names it and a role's
//! policy can scope each connection to its own data (`${aws:PrincipalTag/...}`).
//!
//! Both are templates: `{id}`, `{name}` and `{sandbox}` expand per
//! connection, in one pass (a name holding `{sandbox}` stays that text).
//! AWS's limits are checked twice: on the templates when the config is
//! loaded (every problem with its key path), and on the values a
//! connection expands them to ([`Attribution::expand`]), because a name
//! found by discovery is only known at run time.

use super::*;

/// AWS's limit on the session tags of one `AssumeRole`.
pub const MAX_SESSION_TAGS: usize = 50;
/// AWS's limits on a tag key, in characters.
const TAG_KEY_CHARS: std::ops::RangeInclusive<usize> = 1..=128;
/// AWS's limit on a tag value, in characters (empty is allowed).
const MAX_TAG_VALUE_CHARS: usize = 256;
/// AWS's limits on `SourceIdentity`, in characters.
const SOURCE_IDENTITY_CHARS: std::ops::RangeInclusive<usize> = 2..=64;
/// The placeholders a value may hold.
pub const PLACEHOLDERS: [&str; 3] = ["{id}", "{name}", "{sandbox}"];

/// `session_tags` and `source_identity` as configured at one level
/// (`[aws]`, a `[[connections]]` table, a `[[discover]]` rule). Values are
/// templates (see [`PLACEHOLDERS`]). Holds nothing secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Attribution {
    /// `session_tags`: (key, value template), sorted by key; `None` = not
    /// set at this level (the level below applies). Replaces the level
    /// below as a whole, like every other key.
    pub session_tags: Option<Vec<(String, String)>>,
    /// `SourceIdentity` template; `None` = not set at this level.
    pub source_identity: Option<String>,
}

/// What one connection sends: the templates expanded and checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ExpandedAttribution {
    /// Session tags, sorted by key (empty = none sent).
    pub session_tags: Vec<(String, String)>,
    /// `SourceIdentity`, if any.
    pub source_identity: Option<String>,
}

impl Attribution {
    /// This level where it sets a key, else `below` (`[aws]`).
    pub fn over(&self, below: &Attribution) -> Attribution {
        Attribution {
            session_tags: self
                .session_tags
                .clone()
                .or_else(|| below.session_tags.clone()),
            source_identity: self
                .source_identity
                .clone()
                .or_else(|| below.source_identity.clone()),
        }
    }

    /// Whether anything is set.
    pub fn is_empty(&self) -> bool {
        self.session_tags.is_none() && self.source_identity.is_none()
    }

    /// The values for the connection `id` named `name` in `sandbox`; `Err`
    /// says which expanded value AWS would refuse, and why (the connection
    /// is then refused before any STS call).
    pub fn expand(
        &self,
        id: &str,
        name: &str,
        sandbox: &str,
    ) -> Result<ExpandedAttribution, AttributionProblem> {
        let fill = |template: &str| fill(template, id, name, sandbox);
        let refused = |key: String, value: &str, problem: String| AttributionProblem {
            message: format!(
                "{key} expands to {:?} for connection {id}, which AWS refuses: {problem}",
                crate::scrub::bounded(value, 80)
            ),
            key,
        };
        let mut session_tags = Vec::new();
        for (key, template) in self.session_tags.iter().flatten() {
            let value = fill(template);
            if let Some(problem) = tag_value_problem(&value) {
                return Err(refused(format!("session_tags.{key}"), &value, problem));
            }
            session_tags.push((key.clone(), value));
        }
        let source_identity = match &self.source_identity {
            None => None,
            Some(template) => {
                let value = fill(template);
                if let Some(problem) = source_identity_problem(&value) {
                    return Err(refused("source_identity".to_owned(), &value, problem));
                }
                Some(value)
            }
        };
        Ok(ExpandedAttribution {
            session_tags,
            source_identity,
        })
    }
}

/// `template` with its placeholders replaced, in one pass: what a value
/// brings (a discovered name `{sandbox}`, say) is text, never expanded in
/// turn.
fn fill(template: &str, id: &str, name: &str, sandbox: &str) -> String {
    let mut out = String::with_capacity(template.len() + name.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        let (value, placeholder) = if tail.starts_with("{id}") {
            (id, "{id}")
        } else if tail.starts_with("{name}") {
            (name, "{name}")
        } else if tail.starts_with("{sandbox}") {
            (sandbox, "{sandbox}")
        } else {
            ("{", "{") // checked at load: unreachable in a loaded config
        };
        out.push_str(value);
        rest = &tail[placeholder.len()..];
    }
    out.push_str(rest);
    out
}

/// A template whose expansion for one connection AWS would refuse.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{message}")]
pub struct AttributionProblem {
    /// The key under the level's table: `session_tags.KEY` or `source_identity`.
    pub key: String,
    /// Which value, for which connection, and why AWS refuses it.
    pub message: String,
}

/// The characters AWS allows in tag keys and values:
/// `[\p{L}\p{Z}\p{N}_.:/=+\-@]`.
fn tag_char(c: char) -> bool {
    static CLASS: std::sync::LazyLock<Option<regex_syntax::hir::ClassUnicode>> =
        std::sync::LazyLock::new(|| {
            let hir = regex_syntax::parse(r"[\p{L}\p{Z}\p{N}_.:/=+\-@]").ok()?;
            match hir.into_kind() {
                regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(class)) => {
                    Some(class)
                }
                _ => None,
            }
        });
    match &*CLASS {
        Some(class) => class
            .ranges()
            .binary_search_by(|range| {
                if range.end() < c {
                    std::cmp::Ordering::Less
                } else if range.start() > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok(),
        // The pattern is a constant the tests parse: unreachable. Should it
        // ever fail, the nearest std predicates (a slight superset) stand in.
        None => {
            c.is_alphanumeric() || (c.is_whitespace() && !c.is_control()) || "_.:/=+-@".contains(c)
        }
    }
}

/// What AWS would refuse in a tag key, if anything.
pub fn tag_key_problem(key: &str) -> Option<String> {
    let count = key.chars().count();
    if !TAG_KEY_CHARS.contains(&count) {
        return Some(format!("a tag key is 1 to 128 characters (found {count})"));
    }
    if let Some(c) = key.chars().find(|c| !tag_char(*c)) {
        return Some(format!(
            "contains {c:?}; tag keys may only hold letters, digits, spaces and _.:/=+-@"
        ));
    }
    if key
        .get(..4)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("aws:"))
    {
        return Some("keys starting with \"aws:\" are reserved by AWS".to_owned());
    }
    None
}

/// What AWS would refuse in a tag value, if anything.
pub fn tag_value_problem(value: &str) -> Option<String> {
    let count = value.chars().count();
    if count > MAX_TAG_VALUE_CHARS {
        return Some(format!(
            "a tag value is at most 256 characters (found {count})"
        ));
    }
    value.chars().find(|c| !tag_char(*c)).map(|c| {
        format!("contains {c:?}; tag values may only hold letters, digits, spaces and _.:/=+-@")
    })
}

/// What AWS would refuse in a `SourceIdentity`, if anything.
pub fn source_identity_problem(value: &str) -> Option<String> {
    let count = value.chars().count();
    if !SOURCE_IDENTITY_CHARS.contains(&count) {
        return Some(format!(
            "a source identity is 2 to 64 characters (found {count})"
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_+=,.@-".contains(*c)))
    {
        return Some(format!(
            "contains {c:?}; a source identity may only hold letters, digits and _+=,.@-"
        ));
    }
    if value
        .get(..4)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("aws:"))
    {
        return Some("values starting with \"aws:\" are reserved by AWS".to_owned());
    }
    None
}

/// A template with its placeholders replaced by a stand-in that meets every
/// limit (`x`), so the literal text can be checked; `Err` names a brace
/// that opens no known placeholder.
fn literal_part(template: &str) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        match PLACEHOLDERS.iter().find(|p| tail.starts_with(**p)) {
            Some(placeholder) => {
                out.push('x');
                rest = &tail[placeholder.len()..];
            }
            None => {
                let shown: String = tail.chars().take(12).collect();
                return Err(format!(
                    "{shown:?} is not a placeholder; values may use {{id}}, {{name}} and {{sandbox}}, and no other braces"
                ));
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

impl Checker<'_> {
    /// `session_tags` and `source_identity` of one level; `prefix` is the
    /// key path of the table they are in (`aws`, `connections[2]`).
    pub(super) fn attribution(
        &mut self,
        prefix: &str,
        session_tags: Option<Raw>,
        source_identity: Option<Raw>,
    ) -> Checked<Attribution> {
        let tags = self.session_tags(&format!("{prefix}.session_tags"), session_tags);
        let identity = self.source_identity(&format!("{prefix}.source_identity"), source_identity);
        Ok(Attribution {
            session_tags: tags?,
            source_identity: identity?,
        })
    }

    fn session_tags(
        &mut self,
        path: &str,
        raw: Option<Raw>,
    ) -> Checked<Option<Vec<(String, String)>>> {
        let mut entries = match raw {
            None | Some(Raw::Nil) => return Ok(None),
            Some(Raw::Table(entries)) => entries,
            Some(other) => {
                return Err(self.wrong_type(
                    path,
                    "a table of tag names and values, e.g. { connection = \"{id}\" }",
                    &other,
                ));
            }
        };
        if entries.len() > MAX_SESSION_TAGS {
            return Err(self.report(
                path,
                format!(
                    "has {} tags; AWS takes at most 50 session tags",
                    entries.len()
                ),
            ));
        }
        // The layering keeps no file order: sorted, the issues come in one order.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tags = Vec::with_capacity(entries.len());
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut bad = false;
        for (key, value) in entries {
            let at = format!("{path}.{key}");
            if let Some(problem) = tag_key_problem(&key) {
                self.report(at, problem);
                bad = true;
                continue;
            }
            if let Some(first) = seen.insert(key.to_lowercase(), key.clone()) {
                self.report(
                    at,
                    format!(
                        "tag keys are unique regardless of case, and {first:?} is set too; keep one"
                    ),
                );
                bad = true;
                continue;
            }
            let value = match value {
                Raw::Str(value) => value,
                other => {
                    self.wrong_type(&at, "a string (in quotes)", &other);
                    bad = true;
                    continue;
                }
            };
            let problem = literal_part(&value).err().or_else(|| {
                literal_part(&value)
                    .ok()
                    .and_then(|l| tag_value_problem(&l))
            });
            if let Some(problem) = problem {
                self.report(at, problem);
                bad = true;
                continue;
            }
            tags.push((key, value));
        }
        tags.sort();
        if bad { Err(Reported) } else { Ok(Some(tags)) }
    }

    fn source_identity(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<String>> {
        let Some(value) = self.string(path, raw)? else {
            return Ok(None);
        };
        let problem = match literal_part(&value) {
            Err(problem) => Some(problem),
            // A placeholder expands to at least one character, so the
            // stand-ins make the literal part as short as any expansion:
            // too long is final, too short only without placeholders
            // (padded, only its characters are judged).
            Ok(literal)
                if literal.chars().count() < 2
                    && PLACEHOLDERS.iter().any(|p| value.contains(p)) =>
            {
                source_identity_problem(&format!("{literal}xx"))
            }
            Ok(literal) => source_identity_problem(&literal),
        };
        match problem {
            Some(problem) => Err(self.report(path, problem)),
            None => Ok(Some(value)),
        }
    }

    /// Checks what each explicit connection expands its tags and source
    /// identity to (its id, name and sandbox are known now; a discovered
    /// connection's are checked when it is found). The issue's path is the
    /// key that set the template: the connection's own, or `[aws]`'s.
    pub(super) fn expanded_attribution(
        &mut self,
        aws: &Attribution,
        connections: &[ConnectionConfig],
    ) {
        for (i, connection) in connections.iter().enumerate() {
            let own = &connection.attribution;
            let effective = own.over(aws);
            if let Err(problem) =
                effective.expand(&connection.id, &connection.name, &connection.sandbox)
            {
                let own_key = if problem.key == "source_identity" {
                    own.source_identity.is_some()
                } else {
                    own.session_tags.is_some()
                };
                let level = if own_key {
                    format!("connections[{i}]")
                } else {
                    "aws".to_owned()
                };
                self.report(
                    format!("{level}.{}", problem.key),
                    format!(
                        "{}; change the template or the connection's name",
                        problem.message
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config with an inline secret, `[aws]` extra lines, and one
    /// connection with extra lines.
    fn config(aws: &str, connection: &str) -> Result<Config, ConfigError> {
        let text = format!(
            r#"[adobe]
client_id = "cid"
client_secret = "inline-secret-value"
org_id = "0123456789ABCDEF01234567@AdobeOrg"

[aws]
role_arn = "arn:aws:iam::123456789012:role/aep"
{aws}

[[connections]]
id = "4cb0c374-d3bb-4557-b139-5712880adc55"
sandbox = "prod"
name = "sales bucket"
{connection}

[[discover]]
sandboxes = ["dev"]
name = "ingest-*"
session_tags = {{ Team = "data" }}
"#
        );
        Config::from_toml_str(&text, std::iter::empty())
    }

    fn paths(error: &ConfigError) -> Vec<&str> {
        error.issues.iter().map(|i| i.path.as_str()).collect()
    }

    #[test]
    fn tags_keep_their_case_and_layer_like_the_other_identity_keys() {
        let config = config(
            r#"session_tags = { Connection = "{id}", Sandbox = "{sandbox}" }
source_identity = "aep-{sandbox}""#,
            "",
        )
        .unwrap();
        assert_eq!(
            config.aws.attribution.session_tags,
            Some(vec![
                ("Connection".to_owned(), "{id}".to_owned()),
                ("Sandbox".to_owned(), "{sandbox}".to_owned()),
            ])
        );
        let connection = &config.connections[0];
        let expanded = connection
            .attribution
            .over(&config.aws.attribution)
            .expand(&connection.id, &connection.name, &connection.sandbox)
            .unwrap();
        assert_eq!(
            expanded,
            ExpandedAttribution {
                session_tags: vec![
                    (
                        "Connection".to_owned(),
                        "4cb0c374-d3bb-4557-b139-5712880adc55".to_owned()
                    ),
                    ("Sandbox".to_owned(), "prod".to_owned()),
                ],
                source_identity: Some("aep-prod".to_owned()),
            }
        );
        // A rule's table replaces [aws]'s as a whole; its source identity
        // is [aws]'s (not set on the rule).
        let rule = config.discover[0].connection("c-9", "dev", Some("ingest-9"));
        let effective = rule.attribution.over(&config.aws.attribution);
        assert_eq!(
            effective.session_tags,
            Some(vec![("Team".to_owned(), "data".to_owned())])
        );
        assert_eq!(effective.source_identity.as_deref(), Some("aep-{sandbox}"));
    }

    #[test]
    fn every_limit_of_aws_is_an_issue_with_its_key_path() {
        let fifty_one: Vec<String> = (0..51).map(|i| format!("k{i} = \"v\"")).collect();
        let cases = [
            (
                format!("session_tags = {{ {} }}", fifty_one.join(", ")),
                "aws.session_tags",
                "at most 50",
            ),
            (
                "session_tags = { \"aws:team\" = \"x\" }".to_owned(),
                "aws.session_tags.aws:team",
                "reserved",
            ),
            (
                "session_tags = { \"AWS:Team\" = \"x\" }".to_owned(),
                "aws.session_tags.AWS:Team",
                "reserved",
            ),
            (
                format!("session_tags = {{ {} = \"x\" }}", "k".repeat(129)),
                &*format!("aws.session_tags.{}", "k".repeat(129)),
                "1 to 128",
            ),
            (
                "session_tags = { \"\" = \"x\" }".to_owned(),
                "aws.session_tags.",
                "1 to 128",
            ),
            (
                "session_tags = { \"team!\" = \"x\" }".to_owned(),
                "aws.session_tags.team!",
                "'!'",
            ),
            (
                format!("session_tags = {{ team = \"{}\" }}", "v".repeat(257)),
                "aws.session_tags.team",
                "at most 256",
            ),
            (
                "session_tags = { team = \"a;b\" }".to_owned(),
                "aws.session_tags.team",
                "';'",
            ),
            (
                "session_tags = { team = \"{owner}\" }".to_owned(),
                "aws.session_tags.team",
                "not a placeholder",
            ),
            (
                "session_tags = { Team = \"a\", team = \"b\" }".to_owned(),
                "aws.session_tags.team",
                "regardless of case",
            ),
            (
                "session_tags = { team = 3 }".to_owned(),
                "aws.session_tags.team",
                "a string",
            ),
            (
                "session_tags = \"team=x\"".to_owned(),
                "aws.session_tags",
                "a table",
            ),
            (
                "source_identity = \"a\"".to_owned(),
                "aws.source_identity",
                "2 to 64",
            ),
            (
                format!("source_identity = \"{}\"", "a".repeat(65)),
                "aws.source_identity",
                "2 to 64",
            ),
            (
                "source_identity = \"aep rotator\"".to_owned(),
                "aws.source_identity",
                "' '",
            ),
            (
                "source_identity = \"aws:me\"".to_owned(),
                "aws.source_identity",
                "':'",
            ),
        ];
        for (aws, path, needle) in cases {
            let error = config(&aws, "").unwrap_err();
            let issue = error
                .issues
                .iter()
                .find(|i| i.path == path)
                .unwrap_or_else(|| panic!("{aws}: no issue at {path}: {error}"));
            assert!(issue.message.contains(needle), "{aws}: {issue}");
        }
        // Per connection and per rule, under their own paths.
        let error = config(
            "",
            "session_tags = { \"aws:x\" = \"1\" }\nsource_identity = \"x\"",
        )
        .unwrap_err();
        assert_eq!(
            paths(&error),
            [
                "connections[0].session_tags.aws:x",
                "connections[0].source_identity"
            ]
        );
    }

    #[test]
    fn values_within_the_limits_pass_placeholders_included() {
        let config = config(
            r#"session_tags = { "team name" = "Daten und Ströme", "cost:center" = "", "a/b=c+d-e@f_g.h" = "{name}" }
source_identity = "{id}""#,
            "",
        )
        .unwrap();
        assert_eq!(
            config.aws.attribution.session_tags.as_ref().unwrap().len(),
            3
        );
        // Fifty is the limit, not over it.
        let fifty: Vec<String> = (0..50).map(|i| format!("k{i} = \"v\"")).collect();
        config_ok(&format!("session_tags = {{ {} }}", fifty.join(", ")));
    }

    fn config_ok(aws: &str) {
        if let Err(error) = config(aws, "") {
            panic!("{aws}: {error}");
        }
    }

    #[test]
    fn an_explicit_connection_whose_expansion_is_refused_is_named() {
        // The name holds a '(' that no tag value may hold.
        let error = config("session_tags = { name = \"{name}\" }", "")
            .map(|_| ())
            .err();
        // "sales bucket" is fine (spaces are allowed) ...
        assert!(error.is_none(), "{error:?}");
        // ... "sales (eu)" is not, and the issue names the key that set it.
        let text = r#"[adobe]
client_id = "cid"
client_secret = "inline-secret-value"
org_id = "0123456789ABCDEF01234567@AdobeOrg"

[aws]
role_arn = "arn:aws:iam::123456789012:role/aep"
session_tags = { name = "{name}" }

[[connections]]
id = "c-1"
sandbox = "prod"
name = "sales (eu)"

[[connections]]
id = "c-2"
sandbox = "prod"
name = "other"
source_identity = "{name}-{name}-{name}-{name}-{name}-{name}-{name}-{name}-{name}-{name}-{name}"
"#;
        let error = Config::from_toml_str(text, std::iter::empty()).unwrap_err();
        assert_eq!(
            paths(&error),
            ["aws.session_tags.name", "connections[1].source_identity"],
            "{error}"
        );
        assert!(error.issues[0].message.contains("c-1"), "{error}");
        assert!(error.issues[0].message.contains("'('"), "{error}");
    }

    #[test]
    fn a_discovered_name_that_expands_badly_is_a_problem_of_that_connection_only() {
        let attribution = Attribution {
            session_tags: Some(vec![("name".to_owned(), "{name}".to_owned())]),
            source_identity: None,
        };
        assert!(attribution.expand("c-1", "fine name", "prod").is_ok());
        let problem = attribution.expand("c-2", "odd <name>", "prod").unwrap_err();
        assert_eq!(problem.key, "session_tags.name");
        assert!(problem.message.contains("c-2"), "{problem}");
        let long = "n".repeat(300);
        let problem = attribution.expand("c-3", &long, "prod").unwrap_err();
        assert!(problem.message.contains("at most 256"), "{problem}");
    }

    #[test]
    fn a_remote_name_is_inserted_as_text_never_expanded_again() {
        // A discovered connection named "{sandbox}" (or an id holding a
        // placeholder) must not turn into another field's value.
        let attribution = Attribution {
            session_tags: Some(vec![("conn".to_owned(), "{name}/{id}".to_owned())]),
            source_identity: Some("aep-{id}".to_owned()),
        };
        let problem = attribution
            .expand("c-1", "{sandbox}", "prod")
            .expect_err("braces are no tag characters");
        assert!(problem.message.contains("{sandbox}/c-1"), "{problem}");
        let problem = attribution
            .expand("{name}", "sales", "prod")
            .expect_err("braces are no tag characters");
        assert!(problem.message.contains("{name}"), "{problem}");
        let ok = attribution.expand("c-1", "sales", "prod").unwrap();
        assert_eq!(
            ok.session_tags,
            [("conn".to_owned(), "sales/c-1".to_owned())]
        );
        assert_eq!(ok.source_identity.as_deref(), Some("aep-c-1"));
    }

    #[test]
    fn the_character_class_is_unicodes() {
        // Letters, marks-free; numbers of every script; space separators.
        for c in [
            'a', 'Z', 'é', 'ж', '中', '٣', '\u{a0}', ' ', '_', '.', ':', '/', '=', '+', '-', '@',
        ] {
            assert!(tag_char(c), "{c:?}");
        }
        // Not letters, numbers or separators: punctuation, symbols, controls,
        // a combining mark (Mn) and a circled letter (So), which a plain
        // `is_alphabetic` would let through.
        for c in ['!', '(', '{', ';', '\t', '\n', '\u{301}', 'Ⓐ', '€'] {
            assert!(!tag_char(c), "{c:?}");
        }
    }

    #[test]
    fn without_a_role_the_keys_are_ignored_with_a_warning() {
        let text = r#"[adobe]
client_id = "cid"
client_secret = "inline-secret-value"
org_id = "0123456789ABCDEF01234567@AdobeOrg"

[aws]
session_tags = { team = "data" }

[[connections]]
id = "c-1"
sandbox = "prod"
source_identity = "aep"
"#;
        let config = Config::from_toml_str(text, std::iter::empty()).unwrap();
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.starts_with("aws.session_tags")),
            "{:?}",
            config.warnings
        );
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.starts_with("connections[0].session_tags")),
            "{:?}",
            config.warnings
        );
    }
}
