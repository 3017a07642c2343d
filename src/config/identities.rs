//! The checker's `[[connections]]` and `[[discover]]` rules, with the STS
//! identity settings both carry (role, external id, session name and
//! policies).

use super::*;

impl Checker<'_> {
    pub(super) fn connections(
        &mut self,
        raw: Option<Vec<RawConnection>>,
        aws_role: bool,
        has_rules: bool,
    ) -> Checked<Vec<ConnectionConfig>> {
        let raw = raw.unwrap_or_default();
        // With [[discover]] rules the connections may all be found remotely.
        if raw.is_empty() && !has_rules {
            return Err(self.report(
                "connections",
                format!("no connections configured; add a [[connections]] table with id and sandbox for each base connection, or a [[discover]] rule (see {EXAMPLE})"),
            ));
        }
        let mut first_index: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        let mut bad = false;
        for (i, connection) in raw.into_iter().enumerate() {
            match self.connection(i, connection, aws_role, &mut first_index) {
                Ok(connection) => out.push(connection),
                Err(Reported) => bad = true,
            }
        }
        // Metrics and the expiry gauge are labelled by sandbox and name: two
        // connections sharing both would merge into one series.
        let mut first_name: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, connection) in out.iter().enumerate() {
            let label = (connection.sandbox.as_str(), connection.name.as_str());
            if let Some(first) = first_name.get(&label) {
                self.issues.push(ConfigIssue::new(
                    format!("connections[{i}].name"),
                    format!(
                        "duplicate name {:?} in sandbox {:?}: {} has it already; names label metrics and logs, give each connection its own",
                        connection.name, connection.sandbox, out[*first].id
                    ),
                ));
                bad = true;
            } else {
                first_name.insert(label, i);
            }
        }
        if bad { Err(Reported) } else { Ok(out) }
    }

    pub(super) fn connection(
        &mut self,
        i: usize,
        raw: RawConnection,
        aws_role: bool,
        first_index: &mut HashMap<String, usize>,
    ) -> Checked<ConnectionConfig> {
        let key = |name: &str| format!("connections[{i}].{name}");
        let has_role = aws_role || present(&raw.role_arn);

        let id = self
            .header_text(&key("id"), raw.id, "give the base connection id (from the Sources UI or GET /connections)")
            .and_then(|id| {
                if let Some(problem) = crate::ident::connection_id_problem(&id) {
                    return Err(self.report(key("id"), format!("{:?} cannot be a base connection id ({problem}); copy the id from the Sources UI", crate::scrub::bounded(&id, 80))));
                }
                if let Some(first) = first_index.get(&id) {
                    return Err(self.report(key("id"), format!("duplicate id {id:?}: connections[{first}] has it already; list each base connection once")));
                }
                first_index.insert(id.clone(), i);
                Ok(id)
            });
        let sandbox = self
            .header_text(
                &key("sandbox"),
                raw.sandbox,
                "give the sandbox the connection lives in, e.g. \"prod\"",
            )
            .and_then(|sandbox| {
                if sandbox.chars().any(char::is_uppercase) {
                    Err(self.report(
                        key("sandbox"),
                        format!(
                            "sandbox names are lower-case in AEP; write {:?}",
                            sandbox.to_lowercase()
                        ),
                    ))
                } else {
                    Ok(sandbox)
                }
            });
        let name = self.optional_text(&key("name"), raw.name);
        let identity = self.identity(
            &key,
            has_role,
            RawIdentity {
                role_arn: raw.role_arn,
                external_id: raw.external_id,
                session_name: raw.session_name,
                session_policy: raw.session_policy,
                policy_arns: raw.policy_arns,
                session_tags: raw.session_tags,
                source_identity: raw.source_identity,
            },
        );
        let id = id?;
        let identity = identity?;
        Ok(ConnectionConfig {
            name: name?.unwrap_or_else(|| id.clone()),
            id,
            sandbox: sandbox?,
            role_arn: identity.role_arn,
            external_id: identity.external_id,
            session_name: identity.session_name,
            session_policy: identity.session_policy,
            policy_arns: identity.policy_arns,
            attribution: identity.attribution,
            origin: Origin::Explicit,
        })
    }

    pub(super) fn discover(
        &mut self,
        raw: Option<Vec<RawDiscover>>,
        aws_role: bool,
    ) -> Checked<Vec<DiscoverRule>> {
        let mut out = Vec::new();
        let mut bad = false;
        for (i, rule) in raw.unwrap_or_default().into_iter().enumerate() {
            match self.discover_rule(i, rule, aws_role) {
                Ok(rule) => out.push(rule),
                Err(Reported) => bad = true,
            }
        }
        if bad { Err(Reported) } else { Ok(out) }
    }

    pub(super) fn discover_sandboxes(
        &mut self,
        path: &str,
        raw: Option<Raw>,
    ) -> Checked<Vec<String>> {
        let list = self.string_list(path, raw)?.unwrap_or_default();
        if list.is_empty() {
            return Err(self.report(
                path,
                "missing or empty; list the sandboxes to search, e.g. sandboxes = [\"prod\"]",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let mut bad = false;
        for (n, sandbox) in list.iter().enumerate() {
            let at = format!("{path}[{n}]");
            if sandbox.trim().is_empty()
                || sandbox.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                self.report(at, "must be a sandbox name without spaces, e.g. \"prod\"");
                bad = true;
            } else if sandbox.chars().any(char::is_uppercase) {
                self.report(
                    at,
                    format!(
                        "sandbox names are lower-case in AEP; write {:?}",
                        sandbox.to_lowercase()
                    ),
                );
                bad = true;
            } else if !seen.insert(sandbox.clone()) {
                self.report(
                    at,
                    format!("{sandbox:?} is listed twice; list each sandbox once"),
                );
                bad = true;
            }
        }
        if bad { Err(Reported) } else { Ok(list) }
    }

    pub(super) fn discover_rule(
        &mut self,
        i: usize,
        raw: RawDiscover,
        aws_role: bool,
    ) -> Checked<DiscoverRule> {
        let key = |name: &str| format!("discover[{i}].{name}");
        let has_role = aws_role || present(&raw.role_arn);
        let sandboxes = self.discover_sandboxes(&key("sandboxes"), raw.sandboxes);
        let has_condition = present(&raw.name) || present(&raw.description_tag);
        let name = match self.optional_text(&key("name"), raw.name) {
            Ok(Some(pattern)) => NameGlob::new(&pattern).map(Some).map_err(|why| {
                self.report(
                    key("name"),
                    format!("not a valid glob: {pattern:?} ({why}); use e.g. \"ingest-*\""),
                )
            }),
            Ok(None) => Ok(None),
            Err(reported) => Err(reported),
        };
        let description_tag = self.optional_text(&key("description_tag"), raw.description_tag);
        if !has_condition {
            self.report(
                format!("discover[{i}]"),
                "has no condition besides the sandboxes, so it would rotate every S3 connection there; add name = \"glob\" and/or description_tag = \"text\"",
            );
        }
        let identity = self.identity(
            &key,
            has_role,
            RawIdentity {
                role_arn: raw.role_arn,
                external_id: raw.external_id,
                session_name: raw.session_name,
                session_policy: raw.session_policy,
                policy_arns: raw.policy_arns,
                session_tags: raw.session_tags,
                source_identity: raw.source_identity,
            },
        );
        let every = match self.duration(&key("every"), raw.every, DEFAULT_DISCOVER_EVERY) {
            Ok(every) if (MIN_DISCOVER_EVERY..=MAX_DISCOVER_EVERY).contains(&every) => Ok(every),
            Ok(every) => Err(self.report(
                key("every"),
                format!(
                    "{} is out of range; use 1s..24h (e.g. \"5m\")",
                    humantime::format_duration(every)
                ),
            )),
            Err(reported) => Err(reported),
        };
        if !has_condition {
            return Err(Reported);
        }
        let identity = identity?;
        Ok(DiscoverRule {
            index: i,
            sandboxes: sandboxes?,
            name: name?,
            description_tag: description_tag?,
            role_arn: identity.role_arn,
            external_id: identity.external_id,
            session_name: identity.session_name,
            session_policy: identity.session_policy,
            policy_arns: identity.policy_arns,
            attribution: identity.attribution,
            every: every?,
        })
    }

    /// The STS identity a `[[connections]]` table and a `[[discover]]` rule
    /// both carry, checked one way for both: each field's shape, a policy
    /// only with a role, and a warning for what GetSessionToken ignores.
    /// `has_role`: a role here or in `[aws]`.
    fn identity(
        &mut self,
        key: &dyn Fn(&str) -> String,
        has_role: bool,
        raw: RawIdentity,
    ) -> Checked<Identity> {
        if raw.is_empty() {
            // Nothing to check, and no key path to format: most connections
            // take their identity from [aws] (ten paths each were about 2 %
            // of the start of a daemon with 10,000 connections).
            return Ok(Identity::default());
        }
        let external_given = present(&raw.external_id);
        let session_name_given = present(&raw.session_name);
        let policy_given = present(&raw.session_policy);
        let arns_given = present(&raw.policy_arns);
        let role_arn = self.role_arn(&key("role_arn"), raw.role_arn);
        let external_id = self.external_id(&key("external_id"), raw.external_id);
        let session_name = self.session_name(&key("session_name"), raw.session_name);
        let session_policy = self.session_policy(&key("session_policy"), raw.session_policy);
        let policy_arns = self.policy_arns(&key("policy_arns"), raw.policy_arns);
        let attribution_given = present(&raw.session_tags) || present(&raw.source_identity);
        // `key("")` is `connections[2].`: the table's own path.
        let table = key("");
        let attribution = self.attribution(
            table.trim_end_matches('.'),
            raw.session_tags,
            raw.source_identity,
        );
        if !has_role && attribution_given {
            self.warnings.push(format!(
                "{} and source_identity are ignored: with no role_arn here or in [aws], GetSessionToken is used, and it takes neither",
                key("session_tags")
            ));
        }
        if !has_role && (policy_given || arns_given) {
            let which = if policy_given {
                "session_policy"
            } else {
                "policy_arns"
            };
            self.report(
                key(which),
                "needs a role: with no role_arn here or in [aws], GetSessionToken is used, and it takes no policy; set role_arn or remove the policy",
            );
        }
        if !has_role && (external_given || session_name_given) {
            self.warnings.push(format!(
                "{} and session_name are ignored: with no role_arn here or in [aws], GetSessionToken is used",
                key("external_id")
            ));
        }
        Ok(Identity {
            role_arn: role_arn?,
            external_id: external_id?,
            session_name: session_name?,
            session_policy: session_policy?,
            policy_arns: policy_arns?,
            attribution: attribution?,
        })
    }

    pub(super) fn session_policy(
        &mut self,
        path: &str,
        raw: Option<Raw>,
    ) -> Checked<Option<String>> {
        let Some(policy) = self.string(path, raw)? else {
            return Ok(None);
        };
        let count = policy.chars().count();
        if count > MAX_SESSION_POLICY_CHARS {
            return Err(self.report(
                path,
                format!(
                    "is {count} characters; STS takes at most 2048, so narrow it or use policy_arns"
                ),
            ));
        }
        match serde_json::from_str::<serde_json::Value>(&policy) {
            Ok(serde_json::Value::Object(_)) => Ok(Some(policy)),
            Ok(_) => Err(self.report(path, "must be a JSON object ({\"Version\":\"2012-10-17\",\"Statement\":[...]})")),
            Err(error) => Err(self.report(path, format!("not valid JSON ({error}); write the IAM policy document as JSON in single quotes"))),
        }
    }

    pub(super) fn policy_arns(&mut self, path: &str, raw: Option<Raw>) -> Checked<Vec<String>> {
        let Some(arns) = self.string_list(path, raw)? else {
            return Ok(Vec::new());
        };
        if arns.len() > MAX_POLICY_ARNS {
            return Err(self.report(
                path,
                format!("lists {} policies; STS takes at most 10", arns.len()),
            ));
        }
        let mut bad = false;
        for (i, arn) in arns.iter().enumerate() {
            if let Some(why) = iam_arn_problem(arn, "policy", MAX_POLICY_NAME_CHARS, true) {
                self.report(
                    format!("{path}[{i}]"),
                    format!("not an IAM policy ARN: {arn:?} ({why}; expected e.g. arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess)"),
                );
                bad = true;
            }
        }
        if bad { Err(Reported) } else { Ok(arns) }
    }
}

/// The raw STS identity fields of a `[[connections]]` table or a
/// `[[discover]]` rule.
pub(super) struct RawIdentity {
    role_arn: Option<Raw>,
    external_id: Option<Raw>,
    session_name: Option<Raw>,
    session_policy: Option<Raw>,
    policy_arns: Option<Raw>,
    session_tags: Option<Raw>,
    source_identity: Option<Raw>,
}

impl RawIdentity {
    /// No identity key written at all.
    fn is_empty(&self) -> bool {
        let RawIdentity {
            role_arn,
            external_id,
            session_name,
            session_policy,
            policy_arns,
            session_tags,
            source_identity,
        } = self;
        [
            role_arn,
            external_id,
            session_name,
            session_policy,
            policy_arns,
            session_tags,
            source_identity,
        ]
        .iter()
        .all(|raw| raw.is_none())
    }
}

/// The checked STS identity fields.
#[derive(Default)]
pub(super) struct Identity {
    role_arn: Option<RoleArn>,
    external_id: Option<String>,
    session_name: Option<String>,
    session_policy: Option<String>,
    policy_arns: Vec<String>,
    attribution: Attribution,
}
