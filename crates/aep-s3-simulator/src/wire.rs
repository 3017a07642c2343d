//! Small wire helpers shared by the three simulated services: responses,
//! headers, forms, random values, time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use rand::Rng;

use super::RetryAfter;

/// Upper-case letters and digits (access key ids, role ids).
pub(super) const ALNUM_UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
/// The base64 alphabet (secret keys, session tokens).
pub(super) const BASE64: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
/// The base64url alphabet (IMS tokens).
pub(super) const BASE64_URL: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The largest request body read: the real bodies are a few hundred bytes.
pub(super) const MAX_BODY: usize = 1 << 20;

/// `len` characters drawn from `alphabet` by the thread-local CSPRNG (not
/// the seeded fault RNG: secrets must stay unpredictable).
pub(super) fn random_from(alphabet: &[u8], len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
        .collect()
}

/// A request id as the real services send (a UUID).
pub(super) fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Epoch milliseconds (0 before 1970, which cannot happen on a sane clock).
pub(super) fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `t` rounded down to whole seconds.
pub(super) fn floor_to_second(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// A status code; an out-of-range scripted status becomes 500.
pub(super) fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A response with this status, content type and body.
pub(super) fn response(code: u16, content_type: &str, body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status(code);
    if let Ok(value) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

/// A JSON response.
pub(super) fn json(code: u16, body: &serde_json::Value) -> Response {
    response(code, "application/json", body.to_string())
}

/// Adds a `Retry-After` header.
pub(super) fn with_retry_after(mut response: Response, value: Option<String>) -> Response {
    if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    response
}

/// The header value of a [`RetryAfter`], as of now.
pub(super) fn retry_after_value(retry_after: RetryAfter) -> String {
    match retry_after {
        RetryAfter::Seconds(secs) => secs.to_string(),
        RetryAfter::HttpDate(from_now) => httpdate::fmt_http_date(SystemTime::now() + from_now),
    }
}

/// A header as text, if present and valid UTF-8.
pub(super) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether the request's `Content-Type` is `media_type` (parameters such as
/// `charset` allowed).
pub(super) fn has_content_type(headers: &HeaderMap, media_type: &str) -> bool {
    header(headers, CONTENT_TYPE.as_str())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(media_type))
}

/// The pairs of a `application/x-www-form-urlencoded` body or query.
pub(super) fn form_pairs(bytes: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(bytes)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The first value of `key` among form pairs.
pub(super) fn form_value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Whether `haystack` contains `needle` (an empty needle never matches).
pub(super) fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The etag [`super::ScriptedFault::InvalidEtag`] hands out: a control
/// character makes it an invalid header value.
pub(super) const INVALID_ETAG: &str = "\"0a00\u{1}bad-etag\"";

/// `307 Temporary Redirect` to `location`.
pub(super) fn redirect(location: &str) -> Response {
    let mut response = response(307, "text/plain", String::new());
    if let Ok(value) = HeaderValue::from_str(location) {
        response
            .headers_mut()
            .insert(axum::http::header::LOCATION, value);
    }
    response
}

/// `200` with a chunked body of JSON whitespace that ends only after 4 GiB
/// or when the client hangs up.
pub(super) fn endless_body() -> Response {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 64 * 1024;
    let chunk = axum::body::Bytes::from(vec![b' '; CHUNK]);
    let stream = futures::stream::iter(
        std::iter::repeat_n(chunk, CHUNKS).map(Ok::<_, std::convert::Infallible>),
    );
    let mut response = Response::new(Body::from_stream(stream));
    if let Ok(value) = HeaderValue::from_str("application/json") {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

/// A message with a newline, a forged JSON log line, ESC/OSC sequences and a
/// bell, padded with `x` to `len` bytes.
pub(super) fn hostile_text(len: usize, xml_safe: bool) -> String {
    let mut text = if xml_safe {
        "refused\n{\"level\":\"INFO\",\"message\":\"credentials rotated\"}\n".to_owned()
    } else {
        "refused\n{\"level\":\"INFO\",\"message\":\"credentials rotated\"}\r\n\u{1b}[2J\u{1b}]0;pwned\u{7}\u{202e}".to_owned()
    };
    if text.len() < len {
        text.extend(std::iter::repeat_n('x', len - text.len()));
    }
    text
}

/// `secret` as a JSON encoder that escapes `/` writes it (no quotes).
pub(super) fn json_escaped(secret: &str) -> String {
    let quoted = serde_json::to_string(secret).unwrap_or_default();
    quoted.trim_matches('"').replace('/', "\\/")
}
