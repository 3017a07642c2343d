//! The checker: defaults and limits, and the readers of one value each
//! (strings, durations, URLs, ARNs, session names); every problem is
//! recorded with its key path and checking carries on.

use super::*;

/// Shows up in CloudTrail as who assumed the role.
pub(super) const DEFAULT_SESSION_NAME: &str = "aep-s3-rotator";
/// STS's own default, and the cap under role chaining (IRSA, ECS task roles).
pub(super) const DEFAULT_SESSION_DURATION: Duration = Duration::from_secs(60 * 60);
/// STS refuses shorter sessions (AssumeRole and GetSessionToken alike).
pub(super) const MIN_SESSION_DURATION: Duration = Duration::from_secs(15 * 60);
/// AssumeRole's ceiling (a role's MaxSessionDuration is at most 12 h).
pub(super) const MAX_SESSION_DURATION: Duration = Duration::from_secs(12 * 60 * 60);
/// A third of the default session: room for a long run of retries before expiry.
pub(super) const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(20 * 60);
/// Spreads rotations so a fleet does not hit STS and Flow Service at once.
pub(super) const DEFAULT_JITTER: Duration = Duration::from_secs(60);
/// Quick for a large fleet, well under Flow Service's throttling threshold.
pub(super) const DEFAULT_CONCURRENCY: NonZeroUsize = match NonZeroUsize::new(8) {
    Some(n) => n,
    // Evaluated at compile time: this arm cannot be reached at run time.
    None => panic!("8 is not zero"),
};
/// Quick enough for a blip, slow enough not to hammer a struggling service.
pub(super) const DEFAULT_RETRY_MIN: Duration = Duration::from_secs(1);
/// Many retries still fit in the default `refresh_before`.
pub(super) const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(2 * 60);
/// The services answer in well under a second; 30 s only cuts off hangs.
pub(super) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A request hanging longer than this is better abandoned and retried.
pub(super) const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Enough for a PATCH in flight; far under systemd's 90 s stop timeout.
pub(super) const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Longest retry wait: it is also the slow cadence after a refusal, and a
/// fixed remote or IAM policy should be noticed within the hour; credentials
/// live at most 12 h, so longer waits only risk letting them run out (and a
/// huge value like "100000y" overflows time arithmetic downstream).
pub(super) const MAX_RETRY_MAX: Duration = Duration::from_secs(60 * 60);
/// Longest shutdown grace: a PATCH in flight ends within `request_timeout`,
/// itself at most 5 minutes, so waiting longer cannot save anything.
pub(super) const MAX_SHUTDOWN_GRACE: Duration = MAX_REQUEST_TIMEOUT;
/// STS's limit on `RoleSessionName`.
pub(super) const SESSION_NAME_CHARS: std::ops::RangeInclusive<usize> = 2..=64;
/// STS's limit on `ExternalId`.
pub(super) const EXTERNAL_ID_CHARS: std::ops::RangeInclusive<usize> = 2..=1224;
/// STS's limit on the plain-text inline session policy.
pub(super) const MAX_SESSION_POLICY_CHARS: usize = 2048;
/// STS's limit on `PolicyArns`.
pub(super) const MAX_POLICY_ARNS: usize = 10;
/// A new connection waits at most this long for its first credentials, and
/// each re-list costs one request per 100 connections per sandbox: cheap.
pub(super) const DEFAULT_DISCOVER_EVERY: Duration = Duration::from_secs(5 * 60);
/// Below a second, listing would be most of the Flow Service traffic; 1 s
/// lets tests and demos see a new connection at once.
pub(super) const MIN_DISCOVER_EVERY: Duration = Duration::from_secs(1);
/// Beyond a day a new connection could sit unrotated for longer than any
/// STS session lives; nobody means that.
pub(super) const MAX_DISCOVER_EVERY: Duration = Duration::from_secs(24 * 60 * 60);
/// The Lock Client's and cert-manager's order of magnitude: a dead leader is
/// replaced within seconds, and a leader survives a renewal or two failing.
pub(super) const DEFAULT_LEASE: Duration = Duration::from_secs(15);
/// A lease shorter than a second cannot survive one slow DynamoDB call.
pub(super) const MIN_LEASE: Duration = Duration::from_secs(1);
/// Beyond this, a dead leader leaves every connection unattended too long.
pub(super) const MAX_LEASE: Duration = Duration::from_secs(10 * 60);
/// Renewals faster than this only cost DynamoDB writes.
pub(super) const MIN_RENEW_EVERY: Duration = Duration::from_millis(100);
/// DynamoDB's own limits on table names.
pub(super) const TABLE_NAME_CHARS: std::ops::RangeInclusive<usize> = 3..=255;
/// Holder names go into every lease write and into logs.
pub(super) const MAX_HOLDER_CHARS: usize = 128;

/// Tests faster than this are most of the Flow Service traffic; 1 s lets
/// tests see a revoked session healed at once.
pub(super) const MIN_HEALTH_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Beyond a day a refused connection would wait longer than any STS
/// session lives: its next rotation comes sooner anyway.
pub(super) const MAX_HEALTH_CHECK_EVERY: Duration = Duration::from_secs(24 * 60 * 60);

/// Marks a value as invalid; the issue saying why is already recorded.
pub(super) struct Reported;

pub(super) type Checked<T> = Result<T, Reported>;

/// Collects issues and warnings while turning raw structs into [`Config`].
/// Every check runs, whatever failed before it.
pub(super) struct Checker<'e> {
    pub(super) issues: Vec<ConfigIssue>,
    pub(super) warnings: Vec<String>,
    /// Key (`adobe.client_secret`) → the environment variable that set it.
    pub(super) env_names: &'e BTreeMap<String, String>,
    pub(super) loading: &'e Loading,
    /// See [`AdobeConfig::client_secret_deferred`].
    pub(super) secret_deferred: bool,
    /// Where the secret was read when that is not `client_secret_file`
    /// itself (the credential found in `$CREDENTIALS_DIRECTORY`).
    pub(super) secret_file_read: Option<PathBuf>,
}

impl Checker<'_> {
    pub(super) fn report(
        &mut self,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Reported {
        let path = path.into();
        let message = with_env_origin(self.env_names, &path, message.into());
        self.issues.push(ConfigIssue::new(path, message));
        Reported
    }

    pub(super) fn wrong_type(&mut self, path: &str, expected: &str, found: &Raw) -> Reported {
        self.report(path, format!("expected {expected}, found {}", found.kind()))
    }

    pub(super) fn config(&mut self, raw: RawConfig) -> Checked<Config> {
        let aws_role = present(&raw.aws.role_arn);
        let any_role = aws_role
            || raw
                .connections
                .iter()
                .flatten()
                .any(|c| present(&c.role_arn))
            || raw.discover.iter().flatten().any(|r| present(&r.role_arn));
        if !any_role && present(&raw.aws.external_id) {
            self.warnings.push(
                "aws.external_id is ignored: no role_arn anywhere, so GetSessionToken is used"
                    .to_owned(),
            );
        }
        if !any_role && (present(&raw.aws.session_tags) || present(&raw.aws.source_identity)) {
            self.warnings.push(
                "aws.session_tags and aws.source_identity are ignored: no role_arn anywhere, so GetSessionToken is used, and it takes neither"
                    .to_owned(),
            );
        }
        let adobe = self.adobe(raw.adobe);
        let aws = self.aws(raw.aws);
        let rotation = self.rotation(raw.rotation);
        let has_rules = raw.discover.as_ref().is_some_and(|r| !r.is_empty());
        let connections = self.connections(raw.connections, aws_role, has_rules);
        if let (Ok(aws), Ok(connections)) = (&aws, &connections) {
            self.expanded_attribution(&aws.attribution, connections);
        }
        let discover = self.discover(raw.discover, aws_role);
        let admin = self.admin(raw.admin);
        let state = self.state(raw.state);
        let coordination = self.coordination(raw.coordination);
        let coordination = match (coordination, &rotation) {
            (Ok(Some(c)), Ok(rotation)) if c.lease.saturating_mul(2) > rotation.refresh_before => {
                Err(self.report(
                    "coordination.lease",
                    format!(
                        "must be at most half of rotation.refresh_before ({}) so a standby takes over well before credentials need replacing; shorten the lease",
                        humantime::format_duration(rotation.refresh_before)
                    ),
                ))
            }
            (other, _) => other,
        };
        Ok(Config {
            adobe: adobe?,
            aws: aws?,
            rotation: rotation?,
            connections: connections?.into_iter().map(Arc::new).collect(),
            discover: discover?,
            admin: admin?,
            state: state?,
            coordination: coordination?,
            warnings: Vec::new(),
        })
    }

    // -- typed leaves -------------------------------------------------------

    /// A string; `None` when absent.
    pub(super) fn string(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<String>> {
        match raw {
            None | Some(Raw::Nil) => Ok(None),
            Some(Raw::Str(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(path, "a string (in quotes)", &other)),
        }
    }

    /// A string that must be present and non-empty; `what` says where to get it.
    pub(super) fn required(&mut self, path: &str, raw: Option<Raw>, what: &str) -> Checked<String> {
        match self.string(path, raw)? {
            None => Err(self.report(path, format!("missing; {what}"))),
            Some(s) if s.trim().is_empty() => Err(self.report(path, format!("is empty; {what}"))),
            Some(s) => Ok(s),
        }
    }

    /// A required string that goes into an HTTP header or a URL path: no
    /// spaces or control characters.
    pub(super) fn header_text(
        &mut self,
        path: &str,
        raw: Option<Raw>,
        what: &str,
    ) -> Checked<String> {
        let s = self.required(path, raw, what)?;
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.report(
                path,
                format!("must not contain spaces or control characters; {what}"),
            ));
        }
        Ok(s)
    }

    /// A non-empty string if present.
    pub(super) fn optional_text(
        &mut self,
        path: &str,
        raw: Option<Raw>,
    ) -> Checked<Option<String>> {
        match self.string(path, raw)? {
            Some(s) if s.trim().is_empty() => {
                Err(self.report(path, "is empty; give a value or leave the key out"))
            }
            other => Ok(other),
        }
    }

    pub(super) fn duration(
        &mut self,
        path: &str,
        raw: Option<Raw>,
        default: Duration,
    ) -> Checked<Duration> {
        match raw {
            None | Some(Raw::Nil) => Ok(default),
            Some(Raw::Str(s)) => humantime::parse_duration(s.trim()).map_err(|_| {
                self.report(path, format!("not a duration: {s:?} (use e.g. \"90s\", \"20m\", \"1h\")"))
            }),
            Some(Raw::Int(n)) => Err(self.report(
                path,
                format!("not a duration: {n} (a duration is a quoted string with a unit, e.g. \"{n}s\", \"20m\", \"1h\")"),
            )),
            Some(other) => Err(self.wrong_type(path, "a duration such as \"20m\"", &other)),
        }
    }

    /// A non-negative whole number; strings (from the environment) are parsed.
    pub(super) fn whole(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<u64>> {
        match raw {
            None | Some(Raw::Nil) => Ok(None),
            Some(Raw::Int(n)) => u64::try_from(n)
                .map(Some)
                .map_err(|_| self.report(path, format!("must not be negative (found {n})"))),
            Some(Raw::Str(s)) => s.trim().parse::<u64>().map(Some).map_err(|_| {
                self.report(
                    path,
                    format!("expected a whole number, found the string {s:?}"),
                )
            }),
            Some(other) => Err(self.wrong_type(path, "a whole number", &other)),
        }
    }

    /// A boolean; "true"/"false" strings (from the environment) are parsed.
    pub(super) fn boolean(&mut self, path: &str, raw: Option<Raw>, default: bool) -> Checked<bool> {
        match raw {
            None | Some(Raw::Nil) => Ok(default),
            Some(Raw::Bool(b)) => Ok(b),
            Some(Raw::Str(s)) if s.trim().eq_ignore_ascii_case("true") => Ok(true),
            Some(Raw::Str(s)) if s.trim().eq_ignore_ascii_case("false") => Ok(false),
            Some(Raw::Str(s)) => Err(self.report(
                path,
                format!("expected true or false, found the string {s:?}"),
            )),
            Some(other) => Err(self.wrong_type(path, "true or false", &other)),
        }
    }

    /// A list of strings; a single string (as the environment gives) is
    /// split at commas.
    pub(super) fn string_list(
        &mut self,
        path: &str,
        raw: Option<Raw>,
    ) -> Checked<Option<Vec<String>>> {
        match raw {
            None | Some(Raw::Nil) => Ok(None),
            Some(Raw::Str(s)) => Ok(Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            )),
            Some(Raw::List(items)) => {
                let mut out = Vec::with_capacity(items.len());
                let mut bad = false;
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        Raw::Str(s) => out.push(s),
                        other => {
                            self.wrong_type(
                                &format!("{path}[{i}]"),
                                "a string (in quotes)",
                                &other,
                            );
                            bad = true;
                        }
                    }
                }
                if bad { Err(Reported) } else { Ok(Some(out)) }
            }
            Some(other) => Err(self.wrong_type(path, "a list of strings", &other)),
        }
    }

    /// A list of [`Self::url`]s (absent = empty), each checked under
    /// `path[i]`.
    pub(super) fn url_list(&mut self, path: &str, raw: Option<Raw>) -> Checked<Vec<Url>> {
        let Some(items) = self.string_list(path, raw)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(items.len());
        let mut bad = false;
        for (i, item) in items.into_iter().enumerate() {
            match self.url(&format!("{path}[{i}]"), Some(Raw::Str(item))) {
                Ok(Some(url)) => out.push(url),
                Ok(None) => {}
                Err(Reported) => bad = true,
            }
        }
        if bad { Err(Reported) } else { Ok(out) }
    }

    /// An `https` URL, or `http` to a loopback host (tests, the simulator, a
    /// local proxy).
    pub(super) fn url(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<Url>> {
        let Some(s) = self.string(path, raw)? else {
            return Ok(None);
        };
        let url = Url::parse(s.trim()).map_err(|error| {
            self.report(
                path,
                format!("not a URL: {s:?} ({error}); write e.g. \"https://host.example.com\""),
            )
        })?;
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&url) => {}
            "http" => {
                return Err(self.report(
                    path,
                    "plain http is only allowed to loopback hosts; use https",
                ));
            }
            other => {
                return Err(self.report(
                    path,
                    format!("the scheme {other:?} is not supported; use https"),
                ));
            }
        }
        if url.host().is_none() {
            return Err(self.report(path, "has no host; write e.g. \"https://host.example.com\""));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.report(
                path,
                "must not contain a user name or password; remove them from the URL",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(self.report(
                path,
                "must not have a query or fragment; give the base URL only",
            ));
        }
        Ok(Some(url))
    }

    /// A URL with a default; the default goes through the same checks.
    pub(super) fn url_or(&mut self, path: &str, raw: Option<Raw>, default: &str) -> Checked<Url> {
        let raw = if present(&raw) {
            raw
        } else {
            Some(Raw::Str(default.to_owned()))
        };
        match self.url(path, raw)? {
            Some(url) => Ok(url),
            None => Err(self.report(path, "missing")),
        }
    }

    pub(super) fn role_arn(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<RoleArn>> {
        match self.string(path, raw)? {
            None => Ok(None),
            Some(s) => RoleArn::parse(s.trim())
                .map(Some)
                .map_err(|why| self.report(path, why)),
        }
    }

    pub(super) fn session_name(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<String>> {
        let Some(name) = self.string(path, raw)? else {
            return Ok(None);
        };
        let count = name.chars().count();
        if !SESSION_NAME_CHARS.contains(&count) {
            return Err(self.report(
                path,
                format!("must be 2 to 64 characters (found {count}); STS rejects anything else"),
            ));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "+=,.@_-".contains(*c)))
        {
            return Err(self.report(
                path,
                format!("contains {c:?}; a session name may only hold letters, digits and +=,.@_-"),
            ));
        }
        Ok(Some(name))
    }

    /// Not echoed in messages: some treat the external id as a shared secret.
    pub(super) fn external_id(&mut self, path: &str, raw: Option<Raw>) -> Checked<Option<String>> {
        let Some(id) = self.string(path, raw)? else {
            return Ok(None);
        };
        let count = id.chars().count();
        if !EXTERNAL_ID_CHARS.contains(&count) {
            return Err(self.report(
                path,
                format!("must be 2 to 1224 characters (found {count}); STS rejects anything else"),
            ));
        }
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c))
        {
            return Err(self.report(
                path,
                "may only hold letters, digits and _+=,.@:/-; STS rejects anything else",
            ));
        }
        Ok(Some(id))
    }

    // -- sections -----------------------------------------------------------
}

/// `localhost`, 127.0.0.0/8 or `::1` (also as an IPv4-mapped address).
pub(crate) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(domain)) => {
            domain.eq_ignore_ascii_case("localhost") || domain.eq_ignore_ascii_case("localhost.")
        }
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        None => false,
    }
}
