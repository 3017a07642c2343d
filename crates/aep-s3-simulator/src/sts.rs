//! Simulated AWS STS: the query protocol at `POST /` (`AssumeRole`,
//! `GetSessionToken`), answering in the real XML wire format.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::to_bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::Method;
use axum::http::request::Parts;
use axum::response::Response;

use super::net::ConnCtl;
use super::state::{Issuance, RandomFault, RequestKind, Shared};
use super::wire::{
    self, ALNUM_UPPER, BASE64, MAX_BODY, floor_to_second, form_pairs, has_content_type, header,
    random_from, request_id, retry_after_value, with_retry_after,
};
use super::{ScriptedFault, SimEvent, SimService};

/// The STS XML namespace.
const XMLNS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";
/// The only API version of STS.
const VERSION: &str = "2011-06-15";

/// The STS router.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(ctl): ConnectInfo<ConnCtl>,
    request: Request,
) -> Response {
    if shared.refuses(SimService::Sts) {
        return ctl.reset();
    }
    let (parts, body) = request.into_parts();
    let plan = shared.plan(SimService::Sts, None, RequestKind::Sts);
    crate::pace::wait(plan.latency, plan.arrived).await;
    // The SDK may send the form chunked or with a length: read it all.
    let Ok(body) = to_bytes(body, MAX_BODY).await else {
        return ctl.reset();
    };
    let mut lifetime = shared.credential_lifetime;
    match plan.script {
        Some(ScriptedFault::Reset) => {
            shared.lock().event(SimEvent::Reset {
                service: SimService::Sts,
                connection: None,
                at: SystemTime::now(),
            });
            return ctl.reset();
        }
        Some(ScriptedFault::Status {
            status,
            retry_after,
            body,
        }) => {
            let response = match body {
                Some(body) => {
                    shared.sts_failed("Scripted", status);
                    wire::response(status, "text/xml", body)
                }
                None => {
                    let (code, message) = default_error(status);
                    shared.sts_error(status, code, message)
                }
            };
            return with_retry_after(response, retry_after.map(retry_after_value));
        }
        Some(ScriptedFault::StsError {
            code,
            message,
            status,
        }) => return shared.sts_error(status, &code, &message),
        Some(ScriptedFault::Raw {
            status,
            content_type,
            body,
        }) => {
            shared.sts_failed("Raw", status);
            return wire::response(status, &content_type, body);
        }
        Some(ScriptedFault::Delay(delay)) => {
            shared.lock().event(SimEvent::Delayed {
                service: SimService::Sts,
                connection: None,
                delay,
                at: SystemTime::now(),
            });
            tokio::time::sleep(delay).await;
        }
        Some(ScriptedFault::ShortCredentials(short)) => lifetime = short,
        Some(ScriptedFault::Redirect { location }) => {
            shared.sts_failed("Redirect", 307);
            return wire::redirect(&location);
        }
        Some(ScriptedFault::EndlessBody) => return wire::endless_body(),
        Some(ScriptedFault::EchoSecrets) => {
            let (code, message) = default_error(500);
            return shared.sts_error(500, code, message);
        }
        Some(ScriptedFault::HostileText { len }) => {
            return shared.sts_error(400, "ValidationError", &wire::hostile_text(len, true));
        }
        Some(ScriptedFault::PartialCredentials {
            omit_secret,
            omit_token,
        }) => {
            let response = shared.sts_answer(&parts, &body, lifetime);
            return without_fields(response, omit_secret, omit_token).await;
        }
        // Never taken for STS (see `take_matching`).
        Some(
            ScriptedFault::EtagChurn | ScriptedFault::InvalidEtag | ScriptedFault::EtagInHeader,
        )
        | None => {
            if plan.random == RandomFault::Throttle {
                return shared.sts_error(400, "Throttling", "Rate exceeded");
            }
        }
    }
    shared.sts_answer(&parts, &body, lifetime)
}

/// The same answer with `<SecretAccessKey>` and/or `<SessionToken>` left out.
async fn without_fields(response: Response, omit_secret: bool, omit_token: bool) -> Response {
    let (parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_BODY).await else {
        return error_xml(500, "InternalFailure", "simulator: unreadable answer");
    };
    let mut xml = String::from_utf8_lossy(&bytes).into_owned();
    for (omit, tag) in [
        (omit_secret, "SecretAccessKey"),
        (omit_token, "SessionToken"),
    ] {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        if let (true, Some(start), Some(end)) = (omit, xml.find(&open), xml.find(&close)) {
            xml.replace_range(start..end + close.len(), "");
        }
    }
    let mut response = wire::response(parts.status.as_u16(), "text/xml", xml);
    *response.headers_mut() = parts.headers;
    response
        .headers_mut()
        .remove(axum::http::header::CONTENT_LENGTH);
    response
}

/// Code and message of the documented error for a scripted status.
fn default_error(status: u16) -> (&'static str, &'static str) {
    match status {
        400 | 429 => ("Throttling", "Rate exceeded"),
        403 => (
            "AccessDenied",
            "User is not authorized to perform: sts:AssumeRole",
        ),
        500 => (
            "InternalFailure",
            "The request processing has failed because of an unknown error.",
        ),
        503 => (
            "ServiceUnavailable",
            "Service is unavailable. Try again later.",
        ),
        _ => ("InternalFailure", "The request could not be processed."),
    }
}

/// Escapes text for XML character data.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The STS error document.
fn error_xml(status: u16, code: &str, message: &str) -> Response {
    let kind = if status >= 500 { "Receiver" } else { "Sender" };
    let request_id = request_id();
    let body = format!(
        "<ErrorResponse xmlns=\"{XMLNS}\">\n  <Error>\n    <Type>{kind}</Type>\n    <Code>{}</Code>\n    <Message>{}</Message>\n  </Error>\n  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n",
        xml_escape(code),
        xml_escape(message),
    );
    with_request_id(wire::response(status, "text/xml", body), &request_id)
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(value) = request_id.parse() {
        response.headers_mut().insert("x-amzn-requestid", value);
    }
    response
}

/// Formats a time as STS's `Expiration`: `2026-11-23T14:41:00Z` (UTC, whole
/// seconds, rounded down).
pub(super) fn format_expiration(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month, day of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

/// Whether `s` is 2..=64 characters of `[\w+=,.@-]` (RoleSessionName).
fn valid_session_name(s: &str) -> bool {
    (2..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
}

/// AWS's session tag characters, `[\p{L}\p{Z}\p{N}_.:/=+\-@]` (std's
/// letter and number predicates: a slight superset, which the daemon's own,
/// stricter check makes moot).
fn tag_char(c: char) -> bool {
    c.is_alphanumeric() || (c.is_whitespace() && !c.is_control()) || "_.:/=+-@".contains(c)
}

/// `Tags.member.N.Key` / `.Value` in N order; `Err` names a malformed entry.
fn session_tags(params: &HashMap<String, String>) -> Result<Vec<(String, String)>, String> {
    let mut members: std::collections::BTreeMap<u32, (Option<String>, Option<String>)> =
        std::collections::BTreeMap::new();
    for (name, value) in params {
        let Some(rest) = name.strip_prefix("Tags.member.") else {
            continue;
        };
        let (n, field) = rest
            .split_once('.')
            .ok_or_else(|| format!("parameter {name} is not Tags.member.N.Key or .Value"))?;
        let n: u32 = n
            .parse()
            .map_err(|_| format!("parameter {name} has no member number"))?;
        let entry = members.entry(n).or_default();
        match field {
            "Key" => entry.0 = Some(value.clone()),
            "Value" => entry.1 = Some(value.clone()),
            _ => {
                return Err(format!(
                    "parameter {name} is not Tags.member.N.Key or .Value"
                ));
            }
        }
    }
    members
        .into_iter()
        .map(|(n, (key, value))| match (key, value) {
            (Some(key), Some(value)) => Ok((key, value)),
            _ => Err(format!("Tags.member.{n} lacks its Key or its Value")),
        })
        .collect()
}

/// AWS's limits on `Tags` and `SourceIdentity`, as ValidationError texts.
fn check_attribution(params: &HashMap<String, String>, errors: &mut Vec<String>) {
    match session_tags(params) {
        Err(e) => errors.push(e),
        Ok(tags) => {
            if tags.len() > 50 {
                errors.push(format!("Value at 'tags' failed to satisfy constraint: Member must have length less than or equal to 50 (found {})", tags.len()));
            }
            let mut seen = std::collections::HashSet::new();
            for (key, value) in &tags {
                let key_ok = (1..=128).contains(&key.chars().count())
                    && key.chars().all(tag_char)
                    && !key.to_ascii_lowercase().starts_with("aws:");
                if !key_ok {
                    errors.push(format!("Value '{key}' at 'tags.key' failed to satisfy constraint: Member must have length between 1 and 128, match [\\p{{L}}\\p{{Z}}\\p{{N}}_.:/=+\\-@]+ and not start with aws:"));
                }
                if value.chars().count() > 256 || !value.chars().all(tag_char) {
                    errors.push(format!("Value '{value}' at 'tags.value' failed to satisfy constraint: Member must have length less than or equal to 256 and match [\\p{{L}}\\p{{Z}}\\p{{N}}_.:/=+\\-@]*"));
                }
                if !seen.insert(key.to_lowercase()) {
                    errors.push(format!(
                        "Duplicate tag keys found: {key} (tag keys are case-insensitive)"
                    ));
                }
            }
        }
    }
    if let Some(identity) = params.get("SourceIdentity") {
        let ok = (2..=64).contains(&identity.len())
            && identity
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
            && !identity.to_ascii_lowercase().starts_with("aws:");
        if !ok {
            errors.push(format!("Value '{identity}' at 'sourceIdentity' failed to satisfy constraint: Member must have length between 2 and 64 and match [\\w+=,.@-]*"));
        }
    }
}

/// The account and the role name of an IAM role ARN
/// (`arn:aws:iam::<12 digits>:role/<path/><name>`), or why not.
fn parse_role_arn(arn: &str) -> Result<(&str, &str, &str), String> {
    let bad = || {
        format!(
            "Value '{arn}' at 'roleArn' failed to satisfy constraint: Member must be an IAM role ARN (arn:aws:iam::123456789012:role/name)"
        )
    };
    let mut fields = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(bad());
    };
    let name_path = resource.strip_prefix("role/").ok_or_else(bad)?;
    let name = name_path.rsplit('/').next().unwrap_or_default();
    let ok = matches!(partition, "aws" | "aws-cn" | "aws-us-gov")
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && (1..=64).contains(&name.len())
        && name_path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-/".contains(&b));
    if ok {
        Ok((partition, account, name))
    } else {
        Err(bad())
    }
}

/// Checks an optional `DurationSeconds` against `range`.
fn check_duration(
    params: &HashMap<String, String>,
    range: std::ops::RangeInclusive<u64>,
    errors: &mut Vec<String>,
) {
    if let Some(value) = params.get("DurationSeconds") {
        match value.parse::<u64>() {
            Ok(secs) if range.contains(&secs) => {}
            _ => errors.push(format!(
                "Value '{value}' at 'durationSeconds' failed to satisfy constraint: Member must have value between {} and {}",
                range.start(),
                range.end()
            )),
        }
    }
}

impl Shared {
    /// Records an STS error answer.
    fn sts_failed(&self, code: &str, status: u16) {
        let mut st = self.lock();
        let at = SystemTime::now();
        if code == "Throttling" {
            st.event(SimEvent::Throttled {
                service: SimService::Sts,
                connection: None,
                retry_after: None,
                at,
            });
        }
        st.event(SimEvent::StsFailed {
            code: code.to_owned(),
            status,
            at,
        });
    }

    /// An STS error answer, recorded.
    fn sts_error(&self, status: u16, code: &str, message: &str) -> Response {
        self.sts_failed(code, status);
        error_xml(status, code, message)
    }

    /// A protocol violation answered with an STS error.
    fn sts_violation(
        &self,
        what: &str,
        violation: &str,
        status: u16,
        code: &str,
        message: &str,
    ) -> Response {
        self.lock().violation(format!("{what}: {violation}"));
        self.sts_error(status, code, message)
    }

    /// The real answer to an STS request, checked strictly.
    fn sts_answer(&self, parts: &Parts, body: &[u8], lifetime: Duration) -> Response {
        let what = format!("STS {} {}", parts.method, parts.uri.path());
        if parts.method != Method::POST || parts.uri.path() != "/" {
            return self.sts_violation(
                &what,
                "the query protocol is POST / with a form body",
                400,
                "InvalidAction",
                "Could not find operation for this request",
            );
        }
        if parts.uri.query().is_some_and(|q| !q.is_empty()) {
            return self.sts_violation(
                &what,
                "parameters in the query string (they belong in the form body)",
                400,
                "InvalidAction",
                "Parameters must be sent in the request body",
            );
        }
        match header(&parts.headers, "authorization") {
            Some(auth) if auth.starts_with("AWS4-HMAC-SHA256") => {}
            Some(_) => {
                return self.sts_violation(
                    &what,
                    "Authorization is not an AWS Signature Version 4",
                    400,
                    "IncompleteSignature",
                    "Authorization header requires a Signature Version 4 signature",
                );
            }
            None => {
                return self.sts_violation(
                    &what,
                    "the request is not signed (no Authorization header)",
                    403,
                    "MissingAuthenticationToken",
                    "Request is missing Authentication Token",
                );
            }
        }
        if !has_content_type(&parts.headers, "application/x-www-form-urlencoded") {
            return self.sts_violation(
                &what,
                "Content-Type is not application/x-www-form-urlencoded",
                400,
                "InvalidAction",
                "The request body must be application/x-www-form-urlencoded",
            );
        }
        let mut params = HashMap::new();
        for (key, value) in form_pairs(body) {
            if params.contains_key(&key) {
                return self.sts_violation(
                    &what,
                    &format!("parameter {key} sent twice"),
                    400,
                    "ValidationError",
                    &format!("Parameter {key} is duplicated"),
                );
            }
            params.insert(key, value);
        }
        match params.get("Version").map(String::as_str) {
            Some(VERSION) => {}
            Some(other) => {
                return self.sts_violation(
                    &what,
                    &format!("Version {other:?} instead of {VERSION}"),
                    400,
                    "InvalidAction",
                    &format!("Could not find operation for version {other}"),
                );
            }
            None => {
                return self.sts_violation(
                    &what,
                    "no Version parameter",
                    400,
                    "MissingParameter",
                    "The request must contain the parameter Version",
                );
            }
        }
        let action = params.get("Action").cloned().unwrap_or_default();
        let mut errors = Vec::new();
        let role = match action.as_str() {
            "AssumeRole" => {
                let role = match params.get("RoleArn").map(|arn| parse_role_arn(arn)) {
                    Some(Ok((partition, account, name))) => {
                        Some((partition.to_owned(), account.to_owned(), name.to_owned()))
                    }
                    Some(Err(e)) => {
                        errors.push(e);
                        None
                    }
                    None => {
                        errors.push("Value null at 'roleArn' failed to satisfy constraint: Member must not be null".to_owned());
                        None
                    }
                };
                match params.get("RoleSessionName") {
                    Some(name) if valid_session_name(name) => {}
                    Some(name) => errors.push(format!(
                        "Value '{name}' at 'roleSessionName' failed to satisfy constraint: Member must have length between 2 and 64 and match [\\w+=,.@-]*"
                    )),
                    None => errors.push("Value null at 'roleSessionName' failed to satisfy constraint: Member must not be null".to_owned()),
                }
                check_duration(&params, 900..=43_200, &mut errors);
                if let Some(id) = params.get("ExternalId") {
                    let ok = (2..=1224).contains(&id.len())
                        && id
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@:/-".contains(&b));
                    if !ok {
                        errors.push("Value at 'externalId' failed to satisfy constraint: Member must have length between 2 and 1224 and match [\\w+=,.@:/-]*".to_owned());
                    }
                }
                check_attribution(&params, &mut errors);
                if let Some(policy) = params.get("Policy")
                    && serde_json::from_str::<serde_json::Value>(policy).is_err()
                {
                    errors.push("Value at 'policy' failed to satisfy constraint: Member must be a JSON policy document".to_owned());
                }
                for (key, value) in &params {
                    if key.starts_with("PolicyArns.member.") {
                        let ok = key.ends_with(".arn")
                            && value.starts_with("arn:")
                            && value.contains(":iam::")
                            && value.contains(":policy/");
                        if !ok {
                            errors.push(format!(
                                "Value '{value}' at '{key}' failed to satisfy constraint: Member must be an IAM policy ARN"
                            ));
                        }
                    }
                }
                role
            }
            "GetSessionToken" => {
                check_duration(&params, 900..=129_600, &mut errors);
                None
            }
            "" => {
                return self.sts_violation(
                    &what,
                    "no Action parameter",
                    400,
                    "MissingAction",
                    "Missing Action",
                );
            }
            other => {
                return self.sts_violation(
                    &what,
                    &format!("unknown Action {other:?}"),
                    400,
                    "InvalidAction",
                    &format!("Could not find operation {other} for version {VERSION}"),
                );
            }
        };
        if !errors.is_empty() {
            errors.sort();
            let message = format!(
                "{} validation error{} detected: {}",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" },
                errors.join("; ")
            );
            return self.sts_violation(
                &format!("{what} {action}"),
                &message,
                400,
                "ValidationError",
                &message,
            );
        }

        let now = SystemTime::now();
        // Whole seconds, rounded down: the true expiry is never later than stated.
        let expires_at = floor_to_second(now.checked_add(lifetime).unwrap_or(now));
        let access_key_id = format!("ASIA{}", random_from(ALNUM_UPPER, 16));
        let secret = random_from(BASE64, 40);
        // Real session tokens are long base64 blobs starting like this one.
        let token = format!("IQoJb3JpZ2luX2VjE{}", random_from(BASE64, 380));
        let request_id = request_id();

        let mut xml = String::with_capacity(1024);
        let result = if action == "AssumeRole" {
            "AssumeRole"
        } else {
            "GetSessionToken"
        };
        let _ = write!(
            xml,
            "<{result}Response xmlns=\"{XMLNS}\">\n  <{result}Result>\n    <Credentials>\n      <AccessKeyId>{access_key_id}</AccessKeyId>\n      <SecretAccessKey>{secret}</SecretAccessKey>\n      <SessionToken>{token}</SessionToken>\n      <Expiration>{}</Expiration>\n    </Credentials>\n",
            format_expiration(expires_at)
        );
        if let Some((partition, account, name)) = &role {
            let session = params
                .get("RoleSessionName")
                .map(String::as_str)
                .unwrap_or_default();
            let role_id = format!("AROA{}", random_from(ALNUM_UPPER, 17));
            let _ = write!(
                xml,
                "    <AssumedRoleUser>\n      <AssumedRoleId>{role_id}:{}</AssumedRoleId>\n      <Arn>arn:{partition}:sts::{account}:assumed-role/{}/{}</Arn>\n    </AssumedRoleUser>\n",
                xml_escape(session),
                xml_escape(name),
                xml_escape(session)
            );
            let policy_size = params.get("Policy").map_or(0, String::len)
                + params
                    .keys()
                    .filter(|k| k.starts_with("PolicyArns.member."))
                    .count()
                    * 100;
            if policy_size > 0 {
                // Percent of the packed policy limit, as STS reports it.
                let _ = writeln!(
                    xml,
                    "    <PackedPolicySize>{}</PackedPolicySize>",
                    (policy_size * 100 / 2048).clamp(1, 100)
                );
            }
        }
        let _ = write!(
            xml,
            "  </{result}Result>\n  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n  </ResponseMetadata>\n</{result}Response>\n"
        );

        let role_arn = role.as_ref().and(params.get("RoleArn").cloned());
        let session_name = params.get("RoleSessionName").cloned().unwrap_or_default();
        // Validated above for AssumeRole; GetSessionToken takes neither.
        let (session_tags, source_identity) = if role.is_some() {
            (
                session_tags(&params).unwrap_or_default(),
                params.get("SourceIdentity").cloned(),
            )
        } else {
            (Vec::new(), None)
        };
        let mut st = self.lock();
        st.issuances.insert(
            access_key_id.clone(),
            Issuance {
                secret,
                token,
                expires_at,
                issued_at: now,
                role_arn: role_arn.clone(),
                session_name: session_name.clone(),
                session_tags: session_tags.clone(),
                source_identity: source_identity.clone(),
            },
        );
        if role.is_some() {
            st.counters.sts_assume_role += 1;
        } else {
            st.counters.sts_get_session_token += 1;
        }
        st.event(SimEvent::StsIssued {
            action,
            access_key_id,
            expires_at,
            at: now,
            role_arn,
            session_name,
            session_tags,
            source_identity,
        });
        drop(st);
        with_request_id(wire::response(200, "text/xml", xml), &request_id)
    }
}
