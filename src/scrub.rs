//! Remote text made safe to show: every secret the daemon holds is replaced
//! (raw, JSON-escaped and form-encoded) *before* the text is cut, then the
//! text is bounded and its control characters escaped, so a remote can
//! neither make the daemon print a secret nor forge a log line or a row of
//! the `status` table (docs/SECURITY.md).
//!
//! A leaf: any layer may use it (the config and the identifier checks too),
//! and it uses no other module of the crate.

use std::collections::VecDeque;
use std::sync::{LazyLock, Mutex};

use secrecy::{ExposeSecret, SecretString};

/// How many characters of remote text are shown (logs, `/status`,
/// `last_error`, the `status` table): a real error message fits in a line;
/// anything longer is noise or an attack.
pub const MAX_REMOTE_TEXT: usize = 300;

/// How many secrets the scrubber remembers (oldest forgotten first). The
/// daemon holds one client secret, one or two IMS tokens and one secret key
/// and session token per distinct STS request and cycle; 512 covers a couple
/// of hundred roles with the previous cycle's values still remembered.
const MAX_REMEMBERED_SECRETS: usize = 512;

/// Secrets shorter than this are not scrubbed: replacing every `ab` in every
/// message would garble it, and no real secret (40-character AWS secret keys,
/// long IMS tokens and session tokens) is that short.
const MIN_SECRET_LEN: usize = 8;

/// What replaces a secret in remote text.
pub const REDACTED: &str = "[redacted]";

/// The secrets the daemon holds, in every form a remote may echo them.
/// Process-wide because remote text is shown from many places (errors of
/// three clients, the status board) and every one must scrub all of them.
static SECRETS: LazyLock<Mutex<VecDeque<SecretString>>> =
    LazyLock::new(|| Mutex::new(VecDeque::new()));

/// Remembers `secret` so that [`remote_text`] scrubs it (raw, JSON-escaped
/// with and without `\/`, and form-encoded) from any remote text. Called for
/// the client secret, every IMS token and every STS secret key and session
/// token as they are obtained.
pub fn register_secret(secret: &str) {
    if secret.len() < MIN_SECRET_LEN {
        return;
    }
    let json = serde_json::to_string(secret).unwrap_or_default();
    let json = json
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(secret)
        .to_owned();
    let forms = [
        secret.to_owned(),
        json.replace('/', "\\/"),
        json,
        url::form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>(),
    ];
    let mut secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    for form in forms {
        if secrets.iter().any(|s| s.expose_secret() == form) {
            continue;
        }
        if secrets.len() >= MAX_REMEMBERED_SECRETS * 4 {
            secrets.pop_front();
        }
        secrets.push_back(SecretString::from(form));
    }
}

/// Remote text made safe to show: every registered secret and every one of
/// `extra` replaced by `[redacted]` (before anything is cut, so a secret
/// crossing the cut cannot leak its prefix), control characters escaped
/// (`\n`, `\u{1b}`: one line, no terminal escapes, no forged log lines), and
/// at most `max` characters kept, with a note of how much was cut.
pub fn remote_text_with(text: &str, extra: &[&str], max: usize) -> String {
    let registered = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    let mut secrets: Vec<&str> = registered.iter().map(|s| s.expose_secret()).collect();
    secrets.extend(extra.iter().copied().filter(|s| s.len() >= MIN_SECRET_LEN));
    // Longest first, so a form containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = String::with_capacity(text.len().min(max) + 16);
    let mut shown = 0usize;
    let mut rest = text;
    while !rest.is_empty() {
        if shown >= max {
            let _ =
                std::fmt::Write::write_fmt(&mut out, format_args!("… ({} more bytes)", rest.len()));
            break;
        }
        // A secret starting here is replaced whole: scanning the original
        // text left to right means nothing of it is shown, whatever the cut.
        if let Some(secret) = secrets.iter().find(|s| rest.starts_with(**s)) {
            out.push_str(REDACTED);
            shown += REDACTED.len();
            rest = &rest[secret.len()..];
            continue;
        }
        let mut chars = rest.chars();
        let Some(c) = chars.next() else { break };
        rest = chars.as_str();
        shown += push_neutral(&mut out, c);
    }
    out
}

/// [`remote_text_with`] with no extra secrets and [`MAX_REMOTE_TEXT`].
pub fn remote_text(text: &str) -> String {
    remote_text_with(text, &[], MAX_REMOTE_TEXT)
}

/// [`remote_text_with`] with no extra secrets.
pub fn bounded(text: &str, max: usize) -> String {
    remote_text_with(text, &[], max)
}

/// Appends `c`, escaped if it could change how the line is read: C0 and C1
/// controls (newline, carriage return, ESC, DEL), and the Unicode bidi
/// overrides and isolates that reorder what a terminal shows. Answers how
/// many characters were appended.
fn push_neutral(out: &mut String, c: char) -> usize {
    let escape = c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !escape {
        out.push(c);
        return 1;
    }
    let before = out.len();
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        other => {
            let _ = std::fmt::Write::write_fmt(out, format_args!("\\u{{{:x}}}", u32::from(other)));
        }
    }
    out.len() - before
}
