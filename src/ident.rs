//! The shapes of what enters from outside and is then kept, printed or put
//! in a URL or a header: connection ids, access key ids, etags and the display names of
//! connections (issue 26, docs/SECURITY.md).
//!
//! One check per kind, used wherever that kind enters (the config, a list
//! page, a `GET`, `create`'s answer, the state file, the DynamoDB table),
//! so that no door is left with a weaker rule than another. Names are made
//! safe once, where they enter: every sink (text and JSON logs, `check`'s
//! report, metric labels, `/status`) then shows the same bounded, escaped
//! form.

/// The longest connection id accepted. Flow Service ids are UUIDs (36
/// characters); 128 leaves room for any other shape a test or a future API
/// uses while keeping a hostile listing from storing kilobytes per id.
pub const MAX_CONNECTION_ID: usize = 128;

/// The most characters of a connection name that are kept (after escaping):
/// AEP shows about 100 in its UI; a longer name is noise or an attack, and
/// it is repeated in every log line and metric series of the connection.
pub const MAX_NAME_CHARS: usize = 200;

/// The longest access key id accepted. AWS documents 16 to 128 characters
/// (20 in practice).
pub const MAX_ACCESS_KEY_ID: usize = 128;

/// Why `id` cannot be a base connection id, or `None` when it can: non-empty,
/// at most [`MAX_CONNECTION_ID`] bytes, no whitespace or control character,
/// nothing that changes a URL path (`/ ? # % \`), and not `.` or `..` (a URL
/// drops them, so a GET or PATCH would reach the `/connections` collection).
pub fn connection_id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("it is empty")
    } else if id.len() > MAX_CONNECTION_ID {
        Some("it is longer than 128 bytes")
    } else if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("it contains spaces or control characters")
    } else if id.contains(['/', '?', '#', '%', '\\']) {
        Some("it contains a character that would break the request URL")
    } else if id == "." || id == ".." {
        Some("it is a relative path segment")
    } else {
        None
    }
}

/// Whether `id` can be a base connection id ([`connection_id_problem`]).
pub fn is_connection_id(id: &str) -> bool {
    connection_id_problem(id).is_none()
}

/// Whether `key` looks like an AWS access key id: ASCII letters and digits,
/// at most [`MAX_ACCESS_KEY_ID`]. (AWS's are at least 16; a shorter one is
/// harmless to show, so only the shape and the upper bound are enforced.)
pub fn is_access_key_id(key: &str) -> bool {
    (1..=MAX_ACCESS_KEY_ID).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A connection name from a remote (list page, `GET`), in the one form every
/// sink shows: secrets scrubbed, control characters escaped, at most
/// [`MAX_NAME_CHARS`] characters.
pub fn remote_name(name: &str) -> String {
    crate::scrub::bounded(name, MAX_NAME_CHARS)
}

/// Whether `etag` can go back in `If-Match` as received: a non-empty, visible
/// ASCII header value of sane length (Flow Service etags are ~40 characters).
pub fn is_valid_etag(etag: &str) -> bool {
    const MAX_ETAG: usize = 256;
    !etag.is_empty()
        && etag.len() <= MAX_ETAG
        && etag.bytes().all(|b| (0x20..0x7f).contains(&b))
        && reqwest::header::HeaderValue::from_str(etag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_segments_and_overlong_ids_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a\\b",
            "a b",
            "a\u{1b}b",
            "%2e",
            &"x".repeat(129),
        ] {
            assert!(!is_connection_id(bad), "{bad:?}");
        }
        for good in [
            "4cb0c374-d3bb-4557-b139-5712880adc55",
            "c-1",
            "...",
            "a.b",
            &"x".repeat(128),
        ] {
            assert!(is_connection_id(good), "{good:?}");
        }
    }

    #[test]
    fn access_key_ids_have_their_documented_shape() {
        assert!(is_access_key_id("ASIATESTPROBE0000001"));
        assert!(!is_access_key_id(""));
        assert!(!is_access_key_id("ASIA\u{1b}[2JXXXXXXXXXXXXX"));
        assert!(!is_access_key_id(&"A".repeat(129)));
    }

    #[test]
    fn names_are_bounded_and_escaped() {
        let shown = remote_name(&format!(
            "a\n{{\"message\":\"x\"}}\u{1b}]0;t\u{7}{}",
            "p".repeat(300_000)
        ));
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert!(shown.len() < MAX_NAME_CHARS + 40, "{}", shown.len());
    }
}
