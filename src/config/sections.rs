//! The checker's sections: `[adobe]` (and the client secret), `[aws]`,
//! `[rotation]`, `[admin]`, `[coordination]`, `[state]`.

use super::*;

impl Checker<'_> {
    pub(super) fn adobe(&mut self, raw: RawAdobe) -> Checked<AdobeConfig> {
        let client_id = self.header_text(
            "adobe.client_id",
            raw.client_id,
            "copy the client id of the OAuth Server-to-Server credential from the Adobe Developer Console",
        );
        let org_id = self
            .header_text(
                "adobe.org_id",
                raw.org_id,
                "copy the organization id (…@AdobeOrg) from the Adobe Developer Console",
            )
            .and_then(|org| {
                if org.ends_with("@AdobeOrg") {
                    Ok(org)
                } else {
                    Err(self.report("adobe.org_id", format!("{org:?} does not end with @AdobeOrg; copy the organization id from the Adobe Developer Console")))
                }
            });
        let client_secret_file = match &raw.client_secret_file {
            Some(Raw::Str(path)) if !path.trim().is_empty() => Some(PathBuf::from(path)),
            _ => None,
        };
        let client_secret = self.client_secret(raw.client_secret, raw.client_secret_file);
        let client_secret_file = self.secret_file_read.take().or(client_secret_file);
        let scopes = self.scopes(raw.scopes);
        let ims_url = self.url_or("adobe.ims_url", raw.ims_url, DEFAULT_IMS_URL);
        let platform_url =
            self.url_or("adobe.platform_url", raw.platform_url, DEFAULT_PLATFORM_URL);
        Ok(AdobeConfig {
            client_id: client_id?,
            client_secret: client_secret?,
            client_secret_file,
            client_secret_deferred: self.secret_deferred,
            org_id: org_id?,
            scopes: scopes?,
            ims_url: ims_url?,
            platform_url: platform_url?,
        })
    }

    /// Exactly one of `client_secret` (possibly from the environment) and
    /// `client_secret_file`. No message here ever holds the secret.
    pub(super) fn client_secret(
        &mut self,
        inline: Option<Raw>,
        file: Option<Raw>,
    ) -> Checked<SecretString> {
        const INLINE: &str = "adobe.client_secret";
        const FILE: &str = "adobe.client_secret_file";
        let from_env = self.env_names.get(INLINE).cloned();
        let inline_given = present(&inline);
        let file_given = present(&file);
        let inline = self.string(INLINE, inline);
        let from_file = match self.string(FILE, file) {
            Ok(Some(path)) => self.read_secret_file(FILE, &path).map(Some),
            Ok(None) => Ok(None),
            Err(reported) => Err(reported),
        };
        if inline_given && file_given {
            let origin = match &from_env {
                Some(name) => {
                    format!(" (client_secret comes from the environment variable {name})")
                }
                None => String::new(),
            };
            return Err(self.report(
                INLINE,
                format!("both client_secret and client_secret_file are set{origin}; keep exactly one (client_secret_file is preferred)"),
            ));
        }
        if !inline_given && !file_given {
            return Err(self.report(
                INLINE,
                "no client secret; set adobe.client_secret_file (preferred), adobe.client_secret, or the environment variable AEP_S3_ROTATOR__ADOBE__CLIENT_SECRET",
            ));
        }
        match (inline?, from_file?) {
            (Some(mut secret), None) => {
                if secret.trim().is_empty() {
                    return Err(self.report(
                        INLINE,
                        "is empty; give the client secret of the OAuth Server-to-Server credential",
                    ));
                }
                let trimmed = secret.trim().to_owned();
                secret.zeroize();
                Ok(SecretString::from(trimmed))
            }
            (None, Some(secret)) => Ok(secret),
            // Both or neither present was reported above.
            _ => Err(Reported),
        }
    }

    /// Reads the secret, trimming surrounding whitespace (the trailing
    /// newline editors and `echo` add).
    pub(super) fn read_secret_file(&mut self, path: &str, file: &str) -> Checked<SecretString> {
        if file.trim().is_empty() {
            return Err(self.report(
                path,
                "is empty; give the path of a file holding the client secret",
            ));
        }
        let credential = systemd_credential(file);
        let mut read = crate::fsguard::read(Path::new(file), crate::fsguard::MAX_SECRET_FILE);
        if let (Err(error), Some((unit, name))) = (&read, credential)
            && error.kind() == std::io::ErrorKind::NotFound
        {
            // Under another unit (`systemd-run -p LoadCredential=... check`,
            // a template instance) the same credential is in this
            // process's own credentials directory.
            if let Some(dir) = &self.loading.credentials_directory {
                let here = dir.join(name);
                read = crate::fsguard::read(&here, crate::fsguard::MAX_SECRET_FILE);
                if read.is_ok() {
                    self.secret_file_read = Some(here);
                }
            }
            if read.is_err() && self.loading.scope == Scope::Check {
                self.secret_deferred = true;
                self.warnings.push(format!(
                    "{path} {file} is a systemd credential, present only inside the running {unit}; \
                     the checks that need the client secret are skipped. To run them too: \
                     systemd-run --pipe --wait --quiet -p LoadCredential={name}:SOURCE aep-s3-rotator --config CONFIG check \
                     (SOURCE: the file the unit's LoadCredential= names)"
                ));
                return Ok(SecretString::from(String::new()));
            }
            if read.is_err() {
                return Err(self.report(
                    path,
                    format!(
                        "cannot read {file}: it is a systemd credential, which exists only inside the running {unit} \
                         (LoadCredential=); start the daemon through that unit (systemctl start {unit}), \
                         or point client_secret_file at a file the daemon's user can read"
                    ),
                ));
            }
        }
        let mut text = match read {
            Ok(bytes) => {
                match String::from_utf8(bytes) {
                    Ok(text) => text,
                    Err(error) => {
                        error.into_bytes().zeroize();
                        return Err(self.report(path, format!("{file} is not UTF-8 text; put the client secret in it as plain text")));
                    }
                }
            }
            Err(error) => {
                let advice = match error.kind() {
                    std::io::ErrorKind::NotFound => {
                        "no such file; create it or point client_secret_file at the right file"
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        "permission denied; make it readable by the daemon's user (e.g. with systemd LoadCredential=)"
                    }
                    std::io::ErrorKind::InvalidInput => {
                        return Err(self.report(path, format!("cannot read {file}: {error}")));
                    }
                    _ => "check that it is a readable file",
                };
                return Err(self.report(path, format!("cannot read {file}: {advice} ({error})")));
            }
        };
        let secret = text.trim().to_owned();
        text.zeroize();
        if readable_by_others(Path::new(file)) {
            self.warnings.push(format!(
                "{path} {file} is readable by group/others; chmod 600 it (or use systemd LoadCredential=)"
            ));
        }
        if secret.is_empty() {
            return Err(self.report(
                path,
                format!("{file} is empty; put the client secret in it"),
            ));
        }
        Ok(SecretString::from(secret))
    }

    pub(super) fn scopes(&mut self, raw: Option<Raw>) -> Checked<Vec<String>> {
        const PATH: &str = "adobe.scopes";
        let Some(scopes) = self.string_list(PATH, raw)? else {
            return Ok(DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect());
        };
        if scopes.is_empty() {
            return Err(self.report(PATH, "is empty; leave the key out for the default scopes, or list the credential's scopes"));
        }
        let mut bad = false;
        for (i, scope) in scopes.iter().enumerate() {
            if scope.is_empty() || scope.contains(|c: char| c == ',' || c.is_whitespace()) {
                self.report(format!("{PATH}[{i}]"), "a scope is one non-empty word without commas or spaces; list each scope separately");
                bad = true;
            }
        }
        if bad { Err(Reported) } else { Ok(scopes) }
    }

    pub(super) fn aws(&mut self, raw: RawAws) -> Checked<AwsConfig> {
        let region = self
            .optional_text("aws.region", raw.region)
            .and_then(|region| match region {
                Some(r)
                    if !r
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
                {
                    Err(self.report(
                        "aws.region",
                        format!("not an AWS region name: {r:?} (write e.g. \"us-east-1\")"),
                    ))
                }
                other => Ok(other),
            });
        let sts_endpoint = self.url("aws.sts_endpoint", raw.sts_endpoint);
        let s3_endpoint = self.url("aws.s3_endpoint", raw.s3_endpoint);
        let s3_endpoints = self.url_list("aws.s3_endpoints", raw.s3_endpoints);
        let role_arn = self.role_arn("aws.role_arn", raw.role_arn);
        let external_id = self.external_id("aws.external_id", raw.external_id);
        let session_name = self.session_name("aws.session_name", raw.session_name);
        let attribution = self.attribution("aws", raw.session_tags, raw.source_identity);
        Ok(AwsConfig {
            region: region?,
            sts_endpoint: sts_endpoint?,
            s3_endpoint: s3_endpoint?,
            s3_endpoints: s3_endpoints?,
            role_arn: role_arn?,
            external_id: external_id?,
            session_name: session_name?.unwrap_or_else(|| DEFAULT_SESSION_NAME.to_owned()),
            attribution: attribution?,
        })
    }

    pub(super) fn rotation(&mut self, raw: RawRotation) -> Checked<RotationConfig> {
        const SESSION: &str = "rotation.session_duration";
        const REFRESH: &str = "rotation.refresh_before";
        const JITTER: &str = "rotation.jitter";
        const HEALTH: &str = "rotation.health_check_every";
        let show = |d: Duration| humantime::format_duration(d).to_string();

        let session_duration = self
            .duration(SESSION, raw.session_duration, DEFAULT_SESSION_DURATION)
            .and_then(|d| {
                if !(MIN_SESSION_DURATION..=MAX_SESSION_DURATION).contains(&d) {
                    Err(self.report(
                        SESSION,
                        format!(
                            "must be within 15m..12h (found {}); STS accepts nothing else",
                            show(d)
                        ),
                    ))
                } else if d.subsec_nanos() != 0 {
                    Err(self.report(
                        SESSION,
                        format!(
                            "must be whole seconds (found {}); STS takes DurationSeconds",
                            show(d)
                        ),
                    ))
                } else {
                    Ok(d)
                }
            });
        let refresh_before = self
            .duration(REFRESH, raw.refresh_before, DEFAULT_REFRESH_BEFORE)
            .and_then(|d| {
                if d.is_zero() {
                    Err(self.report(REFRESH, "must be more than 0s: credentials would be replaced only once expired; use e.g. \"20m\""))
                } else {
                    Ok(d)
                }
            });
        let refresh_before = match (refresh_before, &session_duration) {
            (Ok(refresh), Ok(session)) if refresh >= *session => Err(self.report(
                REFRESH,
                format!("must be less than session_duration ({}), or credentials are due for rotation the moment they are pushed; lower it", show(*session)),
            )),
            (other, _) => other,
        };
        let jitter = self.duration(JITTER, raw.jitter, DEFAULT_JITTER);
        let jitter = match (jitter, &session_duration, &refresh_before) {
            (Ok(jitter), Ok(session), Ok(refresh)) if jitter >= *session - *refresh => Err(self.report(
                JITTER,
                format!(
                    "must be less than session_duration - refresh_before ({}), or a rotation could fall before the credentials are even pushed; lower it (default 1m)",
                    show(*session - *refresh)
                ),
            )),
            (other, ..) => other,
        };

        let concurrency = self.whole("rotation.concurrency", raw.concurrency).and_then(|n| match n {
            None => Ok(DEFAULT_CONCURRENCY),
            Some(n) => usize::try_from(n).ok().and_then(NonZeroUsize::new).ok_or_else(|| {
                self.report("rotation.concurrency", format!("must be at least 1 (found {n}); it is how many Flow Service requests run at once"))
            }),
        });
        let max_rps = self
            .whole(
                "rotation.max_requests_per_second",
                raw.max_requests_per_second,
            )
            .and_then(|n| match n {
                None => Ok(None),
                Some(0) => Err(self.report(
                    "rotation.max_requests_per_second",
                    "must be at least 1; leave the key out for no ceiling",
                )),
                Some(n) => u32::try_from(n)
                    .ok()
                    .and_then(NonZeroU32::new)
                    .map(Some)
                    .ok_or_else(|| {
                        self.report(
                            "rotation.max_requests_per_second",
                            format!("is too large (found {n}); leave the key out for no ceiling"),
                        )
                    }),
            });

        let retry_min = self
            .duration("rotation.retry_min", raw.retry_min, DEFAULT_RETRY_MIN)
            .and_then(|d| {
                if d.is_zero() {
                    Err(self.report(
                        "rotation.retry_min",
                        "must be more than 0s; use e.g. \"1s\"",
                    ))
                } else {
                    Ok(d)
                }
            });
        let retry_max = self
            .duration("rotation.retry_max", raw.retry_max, DEFAULT_RETRY_MAX)
            .and_then(|d| {
                if d.is_zero() {
                    Err(self.report(
                        "rotation.retry_max",
                        "must be more than 0s; use e.g. \"2m\"",
                    ))
                } else if d > MAX_RETRY_MAX {
                    Err(self.report(
                        "rotation.retry_max",
                        format!("must be at most 1h (found {}); it is also the cadence after a refusal, and credentials live at most 12h", show(d)),
                    ))
                } else {
                    Ok(d)
                }
            });
        let retry_min = match (retry_min, &retry_max) {
            (Ok(min), Ok(max)) if min > *max => Err(self.report(
                "rotation.retry_min",
                format!(
                    "must not exceed retry_max ({}); lower it or raise retry_max",
                    show(*max)
                ),
            )),
            (other, _) => other,
        };
        let verify = self.boolean("rotation.verify", raw.verify, false);
        // On by default: pushing credentials that cannot read the bucket
        // breaks every dataflow on the connection.
        let prepush_check = self.boolean("rotation.prepush_check", raw.prepush_check, true);
        let request_timeout = self
            .duration("rotation.request_timeout", raw.request_timeout, DEFAULT_REQUEST_TIMEOUT)
            .and_then(|d| {
                if d.is_zero() {
                    Err(self.report("rotation.request_timeout", "must be more than 0s; use e.g. \"30s\""))
                } else if d > MAX_REQUEST_TIMEOUT {
                    Err(self.report("rotation.request_timeout", format!("must be at most 5m (found {}); a request that hangs longer is better retried", show(d))))
                } else {
                    Ok(d)
                }
            });
        let shutdown_grace = self
            .duration(
                "rotation.shutdown_grace",
                raw.shutdown_grace,
                DEFAULT_SHUTDOWN_GRACE,
            )
            .and_then(|d| {
                if d.is_zero() {
                    Err(self.report("rotation.shutdown_grace", "must be more than 0s (0s would abandon PATCHes in flight, leaving connections in an unknown state); use e.g. \"10s\""))
                } else if d > MAX_SHUTDOWN_GRACE {
                    Err(self.report("rotation.shutdown_grace", format!("must be at most 5m (found {}); a PATCH in flight ends within request_timeout (at most 5m)", show(d))))
                } else {
                    Ok(d)
                }
            });
        // Off by default: each test is one Flow Service request per
        // connection per period.
        let health_check_every = match raw.health_check_every {
            None | Some(Raw::Nil) => Ok(None),
            raw => self
                .duration(HEALTH, raw, Duration::ZERO)
                .and_then(|d| {
                    if d < MIN_HEALTH_CHECK_EVERY {
                        Err(self.report(HEALTH, format!("must be at least 1s (found {}); it is how often every connection is tested, leave the key out for never", show(d))))
                    } else if d > MAX_HEALTH_CHECK_EVERY {
                        Err(self.report(HEALTH, format!("must be at most 24h (found {}); leave the key out for never", show(d))))
                    } else {
                        Ok(Some(d))
                    }
                }),
        };
        Ok(RotationConfig {
            session_duration: session_duration?,
            refresh_before: refresh_before?,
            jitter: jitter?,
            concurrency: concurrency?,
            max_requests_per_second: max_rps?,
            retry_min: retry_min?,
            retry_max: retry_max?,
            verify: verify?,
            prepush_check: prepush_check?,
            request_timeout: request_timeout?,
            shutdown_grace: shutdown_grace?,
            health_check_every: health_check_every?,
        })
    }

    pub(super) fn admin(&mut self, raw: RawAdmin) -> Checked<AdminConfig> {
        const PATH: &str = "admin.listen";
        let listen = match self.string(PATH, raw.listen)? {
            None => None,
            Some(s) => Some(parse_listen(&s).map_err(|message| self.report(PATH, message))?),
        };
        const SOCKET: &str = "admin.control_socket";
        let control_socket = match self.string(SOCKET, raw.control_socket)? {
            None => ControlSocket::Default,
            Some(s) => ControlSocket::parse(&s).map_err(|message| self.report(SOCKET, message))?,
        };
        Ok(AdminConfig {
            listen,
            control_socket,
        })
    }

    pub(super) fn coordination(
        &mut self,
        raw: RawCoordination,
    ) -> Checked<Option<CoordinationConfig>> {
        let others = [
            &raw.table,
            &raw.lease,
            &raw.renew_every,
            &raw.holder,
            &raw.endpoint,
        ]
        .into_iter()
        .any(present);
        match self.optional_text("coordination.backend", raw.backend)? {
            None if others => {
                return Err(self.report(
                    "coordination.backend",
                    "missing; set backend = \"dynamodb\" to run replicas with one writer, or remove the [coordination] table",
                ));
            }
            None => return Ok(None),
            Some(backend) if backend.trim() == "dynamodb" => {}
            Some(backend) => {
                return Err(self.report(
                    "coordination.backend",
                    format!("unknown backend {backend:?}; the only one is \"dynamodb\""),
                ));
            }
        }
        let table = self.required(
            "coordination.table",
            raw.table,
            "name the DynamoDB table (create it with `aep-s3-rotator coordination init`)",
        );
        let table = table.and_then(|t| {
            let t = t.trim().to_owned();
            let ok = TABLE_NAME_CHARS.contains(&t.chars().count())
                && t.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if ok {
                Ok(t)
            } else {
                Err(self.report(
                    "coordination.table",
                    format!("not a DynamoDB table name: {t:?} (3 to 255 characters of A-Z, a-z, 0-9, _ . -)"),
                ))
            }
        });
        let lease = self
            .duration("coordination.lease", raw.lease, DEFAULT_LEASE)
            .and_then(|lease| {
                if (MIN_LEASE..=MAX_LEASE).contains(&lease) {
                    Ok(lease)
                } else {
                    Err(self.report(
                        "coordination.lease",
                        format!(
                            "{} is out of range; use 1s to 10m (default 15s)",
                            humantime::format_duration(lease)
                        ),
                    ))
                }
            });
        let renew_every = match &lease {
            Ok(lease) => {
                let default = *lease / 3;
                self.duration("coordination.renew_every", raw.renew_every, default)
                    .and_then(|every| {
                        if every >= MIN_RENEW_EVERY && every.saturating_mul(2) < *lease {
                            Ok(every)
                        } else {
                            Err(self.report(
                                "coordination.renew_every",
                                format!(
                                    "{} must be at least 100ms and less than half of coordination.lease ({}), so one failed renewal does not lose the lease",
                                    humantime::format_duration(every),
                                    humantime::format_duration(*lease)
                                ),
                            ))
                        }
                    })
            }
            Err(Reported) => Err(Reported),
        };
        let holder = self
            .optional_text("coordination.holder", raw.holder)
            .and_then(|holder| match holder {
                Some(h)
                    if h.chars().count() > MAX_HOLDER_CHARS
                        || h.chars().any(|c| c.is_control() || c.is_whitespace()) =>
                {
                    Err(self.report(
                        "coordination.holder",
                        "must be at most 128 characters without spaces or control characters; it must be unique per replica (default: hostname, pid and a random suffix)",
                    ))
                }
                other => Ok(other),
            });
        let endpoint = self.url("coordination.endpoint", raw.endpoint);
        Ok(Some(CoordinationConfig {
            table: table?,
            lease: lease?,
            renew_every: renew_every?,
            holder: holder?,
            endpoint: endpoint?,
        }))
    }

    pub(super) fn state(&mut self, raw: RawState) -> Checked<StateConfig> {
        let path = self.optional_text("state.path", raw.path)?;
        Ok(StateConfig {
            path: path.map(PathBuf::from),
        })
    }
}
