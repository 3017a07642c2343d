//! The one HTTP client policy for IMS, Flow Service and the `status` command,
//! and the treatment of every piece of remote text before anyone sees it.
//!
//! Every remote is hostile until checked (docs/SECURITY.md):
//! - **No redirect is followed.** None of these APIs redirects in normal
//!   operation; following one would re-send the client secret (IMS form) or
//!   the new AWS secret key and session token (PATCH body) to whatever origin
//!   and scheme the `Location` names. A 3xx is an error naming the `Location`.
//! - **Bodies are read with a cap** ([`MAX_BODY`]): `Content-Length` is
//!   checked first, then chunks are counted, so an endless body costs at most
//!   the cap in memory; an oversized body is a transient error.
//! - **Remote text is scrubbed, then bounded and neutralised**
//!   ([`remote_text`]): every secret the daemon holds ([`register_secret`]),
//!   raw and in its JSON-escaped and form-encoded forms, is replaced *before*
//!   the text is cut, and control characters (newlines, ESC) are escaped, so
//!   a remote can neither make the daemon print a secret nor forge a log line
//!   or a row of the `status` table.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::LOCATION;

use crate::config::RotationConfig;
pub use crate::scrub::{
    MAX_REMOTE_TEXT, REDACTED, bounded, register_secret, remote_text, remote_text_with,
};

/// The largest response body read from IMS, Flow Service or the admin
/// endpoint. The largest legitimate answer is a Flow Service list page of 100
/// connections: an item is about 1.5 KiB of JSON (ids, names, auth spec with
/// masked params, connection spec, timestamps, etag), so a page is ~150 KiB;
/// 1 MiB leaves room for items with long descriptions (~10 KiB each) and for
/// a `status` table of a few thousand connections (~300 bytes each), while
/// keeping a hostile endless body to 1 MiB of memory per request in flight.
pub const MAX_BODY: usize = 1 << 20;

/// How many characters of a redirect's `Location` are shown.
const MAX_LOCATION: usize = 200;

/// The HTTP client for IMS and Flow Service: no redirects, the request
/// timeout from `[rotation]`, a shorter connect timeout, rustls with the
/// system's verification (there is deliberately no switch to turn it off).
pub fn client(rotation: &RotationConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("aep-s3-rotator/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(rotation.request_timeout)
        // A connect that takes 10 s is a dead route; fail it early and retry.
        .connect_timeout(rotation.request_timeout.min(Duration::from_secs(10)))
        // Certificates are always verified (there is deliberately no
        // switch), against the one root set chosen in `tls`.
        .tls_certs_only(crate::remote::tls::reqwest_roots())
        .build()
}

/// Why an answer could not be taken, before its status is interpreted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// A 3xx: the remote tried to send us elsewhere; nothing was followed.
    #[error(
        "the server answered {status} redirecting to {location}; no redirect is followed (none of these APIs redirects: check the configured URL)"
    )]
    Redirect {
        /// HTTP status.
        status: u16,
        /// The `Location`, scrubbed and bounded.
        location: String,
    },
    /// The body is larger than [`MAX_BODY`].
    #[error("the answer is larger than {cap} bytes{}; refused", declared.map(|n| format!(" (Content-Length {n})")).unwrap_or_default())]
    TooLarge {
        /// The cap.
        cap: usize,
        /// The `Content-Length`, if it gave the size away.
        declared: Option<u64>,
    },
    /// The body could not be read (reset, timeout).
    #[error("reading the answer failed: {0}")]
    Read(String),
}

/// Refuses a 3xx answer, naming its `Location` (scrubbed, bounded).
pub fn refuse_redirect(response: &reqwest::Response) -> Result<(), BodyError> {
    let status = response.status();
    if !status.is_redirection() {
        return Ok(());
    }
    let location = response
        .headers()
        .get(LOCATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .map_or_else(|| "(no Location)".to_owned(), |l| bounded(&l, MAX_LOCATION));
    Err(BodyError::Redirect {
        status: status.as_u16(),
        location,
    })
}

/// Reads the body of `response`, at most `cap` bytes: a declared
/// `Content-Length` above the cap is refused before reading, and the read
/// stops as soon as the cap is passed.
pub async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Bytes, BodyError> {
    let declared = response.content_length();
    if declared.is_some_and(|n| n > cap as u64) {
        return Err(BodyError::TooLarge { cap, declared });
    }
    let initial = declared.map_or(8 * 1024, |n| usize::try_from(n).unwrap_or(cap).min(cap));
    let mut body = BytesMut::with_capacity(initial);
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len().saturating_add(chunk.len()) > cap {
                    return Err(BodyError::TooLarge { cap, declared });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => return Err(BodyError::Read(bounded(&error_chain(&e), MAX_REMOTE_TEXT))),
        }
    }
}

/// [`refuse_redirect`], then [`read_capped`] with [`MAX_BODY`].
pub async fn read_body(response: reqwest::Response) -> Result<Bytes, BodyError> {
    refuse_redirect(&response)?;
    read_capped(response, MAX_BODY).await
}

/// An error and its sources on one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_crossing_the_cut_leaks_nothing() {
        let secret = "tok-0123456789abcdefghijklmnopqrstuvwxyz";
        // The secret starts 5 characters before the cut.
        let text = format!("{}{secret} and more", "x".repeat(295));
        let shown = remote_text_with(&text, &[secret], 300);
        assert!(!shown.contains("tok-0"), "{shown}");
        assert!(shown.contains(REDACTED), "{shown}");
    }

    #[test]
    fn registered_secrets_are_scrubbed_in_every_form() {
        let secret = "wJalr/XUtnFEMI+K7MDENG=bPxRfiCYEXAMPLEKEY-registered";
        register_secret(secret);
        let json = r"wJalr\/XUtnFEMI+K7MDENG=bPxRfiCYEXAMPLEKEY-registered";
        let form = "wJalr%2FXUtnFEMI%2BK7MDENG%3DbPxRfiCYEXAMPLEKEY-registered";
        for text in [
            format!("echo {secret} end"),
            format!("{{\"x\":\"{json}\"}}"),
            format!("client_secret={form}&x=1"),
        ] {
            let shown = remote_text(&text);
            assert!(!shown.contains("XUtnFEMI"), "{shown}");
            assert!(shown.contains(REDACTED), "{shown}");
        }
    }

    #[test]
    fn control_characters_are_escaped_and_text_bounded() {
        let shown = remote_text("bad\n{\"message\":\"credentials rotated\"}\u{1b}[2J\u{202e}");
        assert!(
            !shown.contains('\n') && !shown.contains('\u{1b}'),
            "{shown}"
        );
        assert!(
            shown.contains("\\n") && shown.contains("\\u{1b}"),
            "{shown}"
        );
        assert!(shown.contains("\\u{202e}"), "{shown}");
        let long = remote_text(&"a".repeat(5 << 20));
        assert!(long.len() < MAX_REMOTE_TEXT + 40, "{}", long.len());
        assert!(long.ends_with("more bytes)"), "{long}");
    }

    #[test]
    fn short_values_are_not_treated_as_secrets() {
        register_secret("abc");
        assert_eq!(remote_text("abc abc"), "abc abc");
    }
}
