//! Simulated Amazon S3, just enough for the daemon's pre-push check:
//! `ListObjectsV2` (`GET /{bucket}?list-type=2&...`) and `HeadBucket`
//! (`HEAD /{bucket}`), path-style, signed with SigV4.
//!
//! Strict like the other services: the `Authorization` header must be a
//! well-formed SigV4 header whose signature verifies (computed here, from the
//! secret key this simulator's STS issued); the access key must have been
//! issued by its own STS and be unexpired; `x-amz-security-token` must be the
//! token issued with that key. Buckets are those of the connections
//! (`bucketName`). Knobs ([`crate::Simulator::s3_deny_bucket`] and friends)
//! deny a bucket or a key, deny the first N checks (eventual consistency),
//! put a bucket in another region (301); scripted faults (500, reset, delay)
//! work as for the other services.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::Method;
use axum::http::request::Parts;
use axum::response::Response;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::net::ConnCtl;
use super::state::{RequestKind, Shared};
use super::wire::{self, header, request_id};
use super::{ScriptedFault, SimEvent, SimService};

/// The region buckets live in unless [`crate::Simulator::s3_set_bucket_region`] says otherwise.
pub(super) const DEFAULT_REGION: &str = "us-east-1";

/// The largest clock difference S3 accepts between `x-amz-date` and now.
const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// SHA-256 of the empty body.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The S3 router.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(ctl): ConnectInfo<ConnCtl>,
    request: Request,
) -> Response {
    if shared.refuses(SimService::S3) {
        return ctl.reset();
    }
    let (parts, _body) = request.into_parts();
    let plan = shared.plan(SimService::S3, None, RequestKind::S3);
    crate::pace::wait(plan.latency, plan.arrived).await;
    match plan.script {
        Some(ScriptedFault::Reset) => {
            shared.lock().event(SimEvent::Reset {
                service: SimService::S3,
                connection: None,
                at: SystemTime::now(),
            });
            return ctl.reset();
        }
        Some(ScriptedFault::Status { status, body, .. }) => {
            shared.s3_outcome(&parts, None, false, "Scripted");
            return match body {
                Some(body) => wire::response(status, "application/xml", body),
                None if status == 503 => {
                    error_xml(status, "SlowDown", "Please reduce your request rate.")
                }
                None if status >= 500 => error_xml(
                    status,
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                ),
                None => error_xml(status, "AccessDenied", "Access Denied"),
            };
        }
        Some(ScriptedFault::StsError {
            code,
            message,
            status,
        }) => {
            shared.s3_outcome(&parts, None, false, &code);
            return error_xml(status, &code, &message);
        }
        Some(ScriptedFault::Raw {
            status,
            content_type,
            body,
        }) => {
            shared.s3_outcome(&parts, None, false, "Raw");
            return wire::response(status, &content_type, body);
        }
        Some(ScriptedFault::Delay(delay)) => {
            shared.lock().event(SimEvent::Delayed {
                service: SimService::S3,
                connection: None,
                delay,
                at: SystemTime::now(),
            });
            tokio::time::sleep(delay).await;
        }
        // The hostile-peer faults are about IMS, STS and Flow Service
        // answers; S3 answers normally to them.
        Some(
            ScriptedFault::EtagChurn
            | ScriptedFault::ShortCredentials(_)
            | ScriptedFault::Redirect { .. }
            | ScriptedFault::EndlessBody
            | ScriptedFault::PartialCredentials { .. }
            | ScriptedFault::EchoSecrets
            | ScriptedFault::HostileText { .. }
            | ScriptedFault::InvalidEtag
            | ScriptedFault::EtagInHeader,
        )
        | None => {}
    }
    shared.s3_answer(&parts)
}

/// Escapes text for XML character data.
fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// S3's error document.
fn error_xml(status: u16, code: &str, message: &str) -> Response {
    error_xml_with(status, code, message, "")
}

fn error_xml_with(status: u16, code: &str, message: &str, extra: &str) -> Response {
    let id = request_id();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message>{extra}<RequestId>{id}</RequestId></Error>",
        xml_escape(code),
        xml_escape(message)
    );
    let mut response = wire::response(status, "application/xml", body);
    if let Ok(value) = id.parse() {
        response.headers_mut().insert("x-amz-request-id", value);
    }
    response
}

/// A HEAD answer carries no body, only the status (and headers).
fn head_status(status: u16) -> Response {
    wire::response(status, "application/xml", String::new())
}

/// The parts of a SigV4 `Authorization` header.
#[derive(Debug)]
struct Authorization {
    access_key_id: String,
    date: String,
    region: String,
    signed_headers: Vec<String>,
    signature: String,
}

/// Parses `AWS4-HMAC-SHA256 Credential=AKID/YYYYMMDD/region/s3/aws4_request,
/// SignedHeaders=a;b;c, Signature=<64 hex>`.
fn parse_authorization(value: &str) -> Result<Authorization, String> {
    let rest = value
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not AWS4-HMAC-SHA256")?;
    let mut fields = BTreeMap::new();
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=').ok_or("a part without '='")?;
        fields.insert(k.trim(), v.trim());
    }
    let credential = fields.get("Credential").ok_or("no Credential")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [akid, date, region, "s3", "aws4_request"] = scope.as_slice() else {
        return Err(format!(
            "Credential scope {credential:?} is not AKID/YYYYMMDD/region/s3/aws4_request"
        ));
    };
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("Credential date {date:?} is not YYYYMMDD"));
    }
    let signed: Vec<String> = fields
        .get("SignedHeaders")
        .ok_or("no SignedHeaders")?
        .split(';')
        .map(str::to_owned)
        .collect();
    let mut sorted = signed.clone();
    sorted.sort();
    if sorted != signed
        || signed
            .iter()
            .any(|h| h.is_empty() || *h != h.to_ascii_lowercase())
    {
        return Err("SignedHeaders are not lower-case and sorted".to_owned());
    }
    let signature = fields.get("Signature").ok_or("no Signature")?;
    if signature.len() != 64
        || !signature
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err("Signature is not 64 lower-case hex digits".to_owned());
    }
    Ok(Authorization {
        access_key_id: (*akid).to_owned(),
        date: (*date).to_owned(),
        region: (*region).to_owned(),
        signed_headers: signed,
        signature: (*signature).to_owned(),
    })
}

/// RFC 3986 encoding of one query component, as SigV4 canonicalises it.
fn uri_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (a `+` stays a `+`: SigV4 clients never send it for a space).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = value.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The decoded query pairs, in order.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail here.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return Vec::new(),
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// The SigV4 signature of this request, computed independently of the
/// client's signer.
fn expected_signature(parts: &Parts, auth: &Authorization, amz_date: &str, secret: &str) -> String {
    let mut pairs: Vec<(String, String)> = query_pairs(parts.uri.query().unwrap_or_default())
        .into_iter()
        .map(|(k, v)| (uri_encode(&k), uri_encode(&v)))
        .collect();
    pairs.sort();
    let query = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut canonical_headers = String::new();
    for name in &auth.signed_headers {
        let values: Vec<String> = parts
            .headers
            .get_all(name.as_str())
            .iter()
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let payload = header(&parts.headers, "x-amz-content-sha256").unwrap_or(EMPTY_SHA256);
    let canonical_request = format!(
        "{}\n{}\n{query}\n{canonical_headers}\n{}\n{payload}",
        parts.method,
        parts.uri.path(),
        auth.signed_headers.join(";"),
    );
    let scope = format!("{}/{}/s3/aws4_request", auth.date, auth.region);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let key = [
        auth.date.as_str(),
        auth.region.as_str(),
        "s3",
        "aws4_request",
    ]
    .iter()
    .fold(format!("AWS4{secret}").into_bytes(), |key, part| {
        hmac(&key, part.as_bytes())
    });
    hex(&hmac(&key, string_to_sign.as_bytes()))
}

/// `20261125T183000Z` → the time it names.
fn parse_amz_date(value: &str) -> Option<SystemTime> {
    let iso = format!(
        "{}-{}-{}T{}:{}:{}Z",
        value.get(0..4)?,
        value.get(4..6)?,
        value.get(6..8)?,
        value.get(9..11)?,
        value.get(11..13)?,
        value.get(13..15)?
    );
    (value.len() == 16 && value.as_bytes().get(8) == Some(&b'T') && value.ends_with('Z'))
        .then(|| humantime::parse_rfc3339(&iso).ok())
        .flatten()
}

impl Shared {
    /// Counts and records one check's outcome.
    fn s3_outcome(&self, parts: &Parts, access_key_id: Option<&str>, allowed: bool, code: &str) {
        let mut st = self.lock();
        if allowed {
            st.counters.s3_checks_allowed += 1;
        } else {
            st.counters.s3_checks_refused += 1;
        }
        let bucket = parts.uri.path().trim_start_matches('/').to_owned();
        st.event(SimEvent::S3Checked {
            bucket,
            access_key_id: access_key_id.unwrap_or_default().to_owned(),
            allowed,
            code: code.to_owned(),
            at: SystemTime::now(),
        });
    }

    /// A protocol violation, answered with S3's error.
    fn s3_violation(&self, parts: &Parts, violation: &str, status: u16, code: &str) -> Response {
        self.lock().violation(format!(
            "S3 {} {}: {violation}",
            parts.method,
            parts.uri.path()
        ));
        self.s3_outcome(parts, None, false, code);
        if parts.method == Method::HEAD {
            head_status(status)
        } else {
            error_xml(status, code, violation)
        }
    }

    /// The real answer to an S3 request, checked strictly.
    fn s3_answer(&self, parts: &Parts) -> Response {
        let path = parts.uri.path();
        let bucket = path.strip_prefix('/').unwrap_or_default();
        let head = parts.method == Method::HEAD;
        let pairs = query_pairs(parts.uri.query().unwrap_or_default());
        let value = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let list = parts.method == Method::GET && value("list-type") == Some("2");
        if bucket.is_empty() || bucket.contains('/') || !(head || list) {
            return self.s3_violation(
                parts,
                "only ListObjectsV2 (GET /bucket?list-type=2) and HeadBucket (HEAD /bucket), path-style, are expected",
                400,
                "InvalidRequest",
            );
        }
        if head && !pairs.is_empty() {
            return self.s3_violation(parts, "HeadBucket takes no query", 400, "InvalidRequest");
        }
        if list
            && value("max-keys")
                .and_then(|v| v.parse::<u32>().ok())
                .is_none_or(|n| n > 1)
        {
            return self.s3_violation(
                parts,
                "a pre-push check lists at most one key (max-keys=1)",
                400,
                "InvalidRequest",
            );
        }
        let Some(authorization) = header(&parts.headers, "authorization") else {
            return self.s3_violation(parts, "no Authorization header", 403, "AccessDenied");
        };
        let auth = match parse_authorization(authorization) {
            Ok(auth) => auth,
            Err(problem) => {
                return self.s3_violation(
                    parts,
                    &format!("malformed SigV4 Authorization: {problem}"),
                    400,
                    "AuthorizationHeaderMalformed",
                );
            }
        };
        for required in [
            "host",
            "x-amz-content-sha256",
            "x-amz-date",
            "x-amz-security-token",
        ] {
            if !auth.signed_headers.iter().any(|h| h == required) {
                return self.s3_violation(
                    parts,
                    &format!("{required} is not among the SignedHeaders"),
                    400,
                    "AuthorizationHeaderMalformed",
                );
            }
        }
        let amz_date = header(&parts.headers, "x-amz-date")
            .unwrap_or_default()
            .to_owned();
        let Some(signed_at) = parse_amz_date(&amz_date) else {
            return self.s3_violation(
                parts,
                "x-amz-date is not YYYYMMDDTHHMMSSZ",
                400,
                "AccessDenied",
            );
        };
        if !amz_date.starts_with(&auth.date) {
            return self.s3_violation(
                parts,
                "the Credential scope date is not the date of x-amz-date",
                400,
                "AuthorizationHeaderMalformed",
            );
        }
        let now = SystemTime::now();
        let skew = now
            .duration_since(signed_at)
            .or_else(|e| Ok::<_, ()>(e.duration()))
            .unwrap_or_default();
        if skew > MAX_SKEW {
            self.s3_outcome(
                parts,
                Some(&auth.access_key_id),
                false,
                "RequestTimeTooSkewed",
            );
            return error_xml(
                403,
                "RequestTimeTooSkewed",
                "The difference between the request time and the current time is too large.",
            );
        }
        if header(&parts.headers, "x-amz-content-sha256") != Some(EMPTY_SHA256) {
            return self.s3_violation(
                parts,
                "x-amz-content-sha256 is not the SHA-256 of the empty body",
                400,
                "XAmzContentSHA256Mismatch",
            );
        }
        let key = auth.access_key_id.clone();
        let token = header(&parts.headers, "x-amz-security-token").unwrap_or_default();
        let deny = |code: &str, status: u16, message: &str, extra: &str| {
            self.s3_outcome(parts, Some(&key), false, code);
            if head {
                head_status(status)
            } else {
                error_xml_with(status, code, message, extra)
            }
        };
        // Credentials: issued by this STS, unexpired, with their own token.
        let (secret, region, bucket_known, deny_first, revoked) = {
            let mut st = self.lock();
            let secret = match st.issuances.get(&key) {
                Some(issuance) if issuance.token != token => {
                    st.violation(format!(
                        "S3 {} {path}: x-amz-security-token is not the token issued with access key {key}",
                        parts.method
                    ));
                    drop(st);
                    return deny(
                        "InvalidToken",
                        400,
                        "The provided token is malformed or otherwise invalid.",
                        "",
                    );
                }
                Some(issuance) if issuance.expires_at <= now => {
                    drop(st);
                    return deny("ExpiredToken", 400, "The provided token has expired.", "");
                }
                Some(issuance) => Some(issuance.secret.clone()),
                // moto as STS: the signature cannot be verified without its secret.
                None if self.accept_foreign_credentials && !token.is_empty() => None,
                None => {
                    drop(st);
                    return deny(
                        "InvalidAccessKeyId",
                        403,
                        "The AWS Access Key Id you provided does not exist in our records.",
                        "",
                    );
                }
            };
            let bucket_known = st.s3.buckets.contains(bucket) || st.bucket_in_use(bucket);
            let region = st
                .s3
                .bucket_regions
                .get(bucket)
                .cloned()
                .unwrap_or_else(|| DEFAULT_REGION.to_owned());
            let deny_first = if st.s3.deny_next > 0 && secret.is_some() {
                st.s3.deny_next -= 1;
                true
            } else {
                false
            };
            // "Revoke active sessions": an explicit deny on sessions of the
            // role issued before the revocation.
            let revoked = st
                .issuances
                .get(&key)
                .filter(|issuance| issuance.revoked(&st.session_revocations))
                .and_then(|issuance| {
                    let role = issuance.role_arn.as_deref()?;
                    let (prefix, name) = role.split_once(":role/")?;
                    let account = prefix.rsplit(':').next()?;
                    let partition = prefix.split(':').nth(1)?;
                    let name = name.rsplit('/').next()?;
                    Some(format!(
                        "arn:{partition}:sts::{account}:assumed-role/{name}/{}",
                        issuance.session_name
                    ))
                });
            (secret, region, bucket_known, deny_first, revoked)
        };
        if let Some(secret) = &secret {
            let expected = expected_signature(parts, &auth, &amz_date, secret);
            if expected != auth.signature {
                self.lock().violation(format!(
                    "S3 {} {path}: the SigV4 signature does not verify (access key {key})",
                    parts.method
                ));
                return deny(
                    "SignatureDoesNotMatch",
                    403,
                    "The request signature we calculated does not match the signature you provided.",
                    "",
                );
            }
        }
        if !bucket_known {
            return deny(
                "NoSuchBucket",
                404,
                "The specified bucket does not exist",
                &format!("<BucketName>{}</BucketName>", xml_escape(bucket)),
            );
        }
        if auth.region != region {
            self.s3_outcome(parts, Some(&key), false, "PermanentRedirect");
            let mut response = if head {
                head_status(301)
            } else {
                error_xml_with(
                    301,
                    "PermanentRedirect",
                    "The bucket you are attempting to access must be addressed using the specified endpoint.",
                    &format!(
                        "<Endpoint>s3.{region}.amazonaws.com</Endpoint><Bucket>{}</Bucket>",
                        xml_escape(bucket)
                    ),
                )
            };
            if let Ok(value) = region.parse() {
                response.headers_mut().insert("x-amz-bucket-region", value);
            }
            return response;
        }
        if let Some(principal) = revoked {
            return deny(
                "AccessDenied",
                403,
                &format!(
                    "User: {principal} is not authorized to perform: s3:ListBucket on resource: \"arn:aws:s3:::{bucket}\" with an explicit deny in an identity-based policy"
                ),
                "",
            );
        }
        let denied = {
            let st = self.lock();
            let folder = format!("{bucket}/{}", value("prefix").unwrap_or_default());
            deny_first
                || st.s3.deny_buckets.contains(bucket)
                || st.s3.deny_buckets.contains(&folder)
                || st.s3.deny_keys.contains(&key)
        };
        if denied {
            return deny("AccessDenied", 403, "Access Denied", "");
        }
        self.s3_outcome(parts, Some(&key), true, "");
        if head {
            let mut response = head_status(200);
            if let Ok(value) = region.parse() {
                response.headers_mut().insert("x-amz-bucket-region", value);
            }
            return response;
        }
        let prefix = xml_escape(value("prefix").unwrap_or_default());
        wire::response(
            200,
            "application/xml",
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>{}</Name><Prefix>{prefix}</Prefix><KeyCount>0</KeyCount><MaxKeys>1</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>",
                xml_escape(bucket)
            ),
        )
    }
}
