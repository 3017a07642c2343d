//! Logs, in one of three shapes chosen at start:
//!
//! - **journal**: when stderr is connected to the journal (systemd sets
//!   `JOURNAL_STREAM` to its device and inode), every event is sent to
//!   journald natively: `PRIORITY` from the level, `MESSAGE` plain text
//!   that says which connection (`bucket-1 (prod): rotation failed,
//!   retrying error=...`), the bare message as `EVENT`, every field its own
//!   journal field (`CONNECTION_ID`, `CONNECTION_NAME`, `SANDBOX`,
//!   `ACCESS_KEY_ID`, `ERROR`, ...), so `journalctl -p warning` and
//!   `journalctl CONNECTION_NAME=...` work. See [`journal_fields`].
//! - **text**: on a terminal, one short line for people: local time, level,
//!   the connection as `name (sandbox)`, the message, a few `key=value`
//!   ([`terminal_line`]). Colour only on a terminal and without `NO_COLOR`.
//! - **json**: anywhere else (a container, a pipe), or when asked for with
//!   `--log-format json` / `AEP_S3_ROTATOR_LOG_FORMAT=json`: one JSON
//!   object per line on stderr with `timestamp`, `level`, `message`, and the
//!   fields of the spans it happened in (`connection`, `sandbox`, `name`) at
//!   the top level, so log shippers can filter on them directly.
//!
//! An explicit `--log-format` always wins over the journal.
//!
//! Third-party crates (HTTP, TLS, the AWS SDK) are held at `info` whatever
//! the filter says: at `debug`/`trace` they print request headers, signing
//! material and bodies, which carry secrets. The three shapes carry the same
//! fields, so no secret reaches one that the others leave out.

use std::fmt;
use std::io::{IsTerminal, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{LevelFilter, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// `--log-format`, defined with the rest of the command line.
pub use crate::cli::LogFormat;

/// journald's socket for native messages (`man systemd.journal-fields`).
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// `SYSLOG_IDENTIFIER` of every journal entry: the name `journalctl -t`
/// filters on, the same for every instance of the template unit (those
/// differ in `_SYSTEMD_UNIT`).
const SYSLOG_IDENTIFIER: &str = "aep-s3-rotator";

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid log level or filter {filter:?}: {reason} (use e.g. info, debug, or aep_s3_rotator=debug)"
)]
pub struct LogFilterError {
    filter: String,
    reason: String,
}

/// Crates whose events are kept at `info` or above, whatever the filter.
fn is_ours(target: &str) -> bool {
    target == "aep_s3_rotator" || target.starts_with("aep_s3_rotator::")
}

/// The most verbose level shown for another crate's event. The SDK's region
/// lookup warns, with a dump of IMDS's answer, on every host that is not an
/// EC2 instance; the daemon says in one line of its own which region it
/// uses (`no AWS region configured, using STS in us-east-1`), so only its
/// errors show.
///
/// The same for the rest of `aws_config`, the default credential chain
/// above all: each provider that fails warns with a dump of its error (1,000
/// characters of HTTP headers from IMDS); the daemon's own line says that
/// the chain gave no identity, with the last provider's reason.
fn third_party_level(target: &str) -> Level {
    if target.starts_with("aws_config::") {
        Level::ERROR
    } else {
        Level::INFO
    }
}

/// Where the lines go, decided once by [`init`].
enum Shape {
    Json,
    Text { colour: bool },
    Journal(Journal),
}

impl Shape {
    /// An explicit format wins; else the journal when stderr is connected to
    /// it (and its socket is there), text on a terminal, JSON elsewhere.
    fn choose(format: Option<LogFormat>) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let colour = colour_wanted(terminal, std::env::var_os("NO_COLOR"));
        match format {
            Some(LogFormat::Json) => Self::Json,
            Some(LogFormat::Text) => Self::Text { colour },
            None if stderr_is_journal() => Journal::open().map_or(Self::Json, Self::Journal),
            None if terminal => Self::Text { colour },
            None => Self::Json,
        }
    }
}

/// Colour on a terminal unless `NO_COLOR` is set to anything but the empty
/// string (no-color.org).
fn colour_wanted(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Whether stderr is the journal stream systemd connected: `JOURNAL_STREAM`
/// names its `device:inode`. Comparing them (not only the variable's
/// presence) keeps a child whose stderr was redirected, such as a test
/// harness run from a unit, on its own format.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    stream
        .to_str()
        .is_some_and(|s| journal_stream_is(s, meta.dev(), meta.ino()))
}

/// `JOURNAL_STREAM`'s `DEVICE:INODE` (both decimal) is `dev`, `ino`.
fn journal_stream_is(value: &str, dev: u64, ino: u64) -> bool {
    value.split_once(':').is_some_and(|(d, i)| {
        d.parse::<u64>().is_ok_and(|d| d == dev) && i.parse::<u64>().is_ok_and(|i| i == ino)
    })
}

/// Installs the global subscriber. `format` is `--log-format` (or its
/// variable); `None` chooses as the module doc says. `filter` is a tracing
/// filter (`--log-level`, else `RUST_LOG`, else `info`).
pub fn init(format: Option<LogFormat>, filter: Option<&str>) -> Result<(), LogFilterError> {
    let directives = filter
        .map(str::to_owned)
        .or_else(|| {
            std::env::var("RUST_LOG")
                .ok()
                .filter(|s| !s.trim().is_empty())
        })
        .unwrap_or_else(|| "info".to_owned());
    let env_filter = EnvFilter::builder()
        .parse(&directives)
        .map_err(|e| LogFilterError {
            filter: directives.clone(),
            reason: e.to_string(),
        })?;
    // Connection UUIDs are noise for a person at `info`; at `debug` they
    // are what one is looking for.
    let show_ids = env_filter
        .max_level_hint()
        .is_none_or(|max| max >= LevelFilter::DEBUG);
    let cap_third_party = filter_fn(|meta| {
        is_ours(meta.target()) || *meta.level() <= third_party_level(meta.target())
    });
    let registry = tracing_subscriber::registry().with(env_filter);
    match Shape::choose(format) {
        Shape::Json => registry
            .with(
                FieldsLayer {
                    out: JsonLines {
                        writer: std::io::stderr,
                    },
                }
                .with_filter(cap_third_party),
            )
            .try_init(),
        Shape::Text { colour } => registry
            .with(
                FieldsLayer {
                    out: Terminal {
                        colour,
                        show_ids,
                        writer: std::io::stderr,
                    },
                }
                .with_filter(cap_third_party),
            )
            .try_init(),
        Shape::Journal(journal) => registry
            .with(FieldsLayer { out: journal }.with_filter(cap_third_party))
            .try_init(),
    }
    // A second init (tests) keeps the first subscriber; that is fine.
    .or(Ok(()))
}

// ---------------------------------------------------------------------------
// Fields as (name, value) pairs, each value kept the way its sink writes it.

/// A span's or an event's own fields, each name once, as its sink keeps
/// them ([`PairsOut::JSON`]).
pub type Pairs = Vec<(&'static str, String)>;

/// An event's fields with those of its spans, each name once, borrowed from
/// where they were recorded: what a sink writes.
pub type Fields<'a> = [(&'static str, &'a str)];

/// Sets `name` to `value`, in place when already there: an event field wins
/// over a span field of the same name, an inner span's over an outer one's.
fn put<V>(pairs: &mut Vec<(&'static str, V)>, name: &'static str, value: V) {
    match pairs.iter_mut().find(|(n, _)| *n == name) {
        Some((_, slot)) => *slot = value,
        None => pairs.push((name, value)),
    }
}

/// Records fields as text, or with `json` as their JSON encoding (strings
/// quoted and escaped, numbers and booleans bare).
struct PairVisitor<'a> {
    pairs: &'a mut Pairs,
    json: bool,
}

impl PairVisitor<'_> {
    fn text(&mut self, field: &Field, value: &str) {
        let value = if self.json {
            json_string(value)
        } else {
            value.to_owned()
        };
        put(self.pairs, field.name(), value);
    }

    /// A number or a boolean: bare in JSON as in text.
    fn bare(&mut self, field: &Field, value: impl fmt::Display) {
        put(self.pairs, field.name(), value.to_string());
    }
}

impl Visit for PairVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.bare(field, value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.bare(field, value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.bare(field, value);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() || !self.json {
            // `1.0`, not `1`: as serde_json writes it.
            self.bare(field, format_args!("{value:?}"));
        } else {
            // JSON has no NaN or infinity.
            self.bare(field, "null");
        }
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.text(field, &value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%display` fields and the message's format arguments arrive here
        // and print without quotes.
        self.text(field, &format!("{value:?}"));
    }
}

/// `text` as a JSON string: quoted, with quotes, backslashes and control
/// characters escaped.
fn json_string(text: &str) -> String {
    // Encoding a str cannot fail.
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// A span's fields, kept in its extensions, encoded for the sink once.
struct SpanPairs(Pairs);

/// Where a [`FieldsLayer`] puts an event.
trait PairsOut: 'static {
    /// How this sink keeps a field's value: `false`, as text; `true`, as
    /// its JSON encoding (a string quoted and escaped, a number bare), made
    /// once when the field is recorded.
    const JSON: bool = false;

    fn write(&self, meta: &Metadata<'_>, fields: &Fields<'_>);
}

/// Collects span and event fields and hands each event to `out`. A span's
/// fields are encoded when it is made (or recorded into) and only borrowed
/// by each line logged in it.
struct FieldsLayer<O> {
    out: O,
}

impl<S, O> tracing_subscriber::Layer<S> for FieldsLayer<O>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    O: PairsOut,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut pairs = Pairs::new();
            attrs.record(&mut PairVisitor {
                pairs: &mut pairs,
                json: O::JSON,
            });
            span.extensions_mut().insert(SpanPairs(pairs));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(SpanPairs(pairs)) = span.extensions_mut().get_mut::<SpanPairs>()
        {
            values.record(&mut PairVisitor {
                pairs,
                json: O::JSON,
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut own = Pairs::new();
        event.record(&mut PairVisitor {
            pairs: &mut own,
            json: O::JSON,
        });
        let spans: Vec<_> = ctx
            .event_scope(event)
            .map(|scope| scope.from_root().collect())
            .unwrap_or_default();
        let extensions: Vec<_> = spans.iter().map(|span| span.extensions()).collect();
        let mut fields: Vec<(&'static str, &str)> = Vec::with_capacity(own.len() + 4);
        for kept in &extensions {
            if let Some(SpanPairs(pairs)) = kept.get::<SpanPairs>() {
                for (name, value) in pairs {
                    put(&mut fields, name, value.as_str());
                }
            }
        }
        for (name, value) in &own {
            put(&mut fields, name, value.as_str());
        }
        self.out.write(event.metadata(), &fields);
    }
}

// ---------------------------------------------------------------------------
// The journal.

/// Sends entries to journald's native socket.
struct Journal {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Journal {
    /// `None` when journald's socket is not there (then JSON on stderr,
    /// which the journal stream still stores).
    fn open() -> Option<Self> {
        let path = PathBuf::from(JOURNAL_SOCKET);
        if !path.exists() {
            return None;
        }
        // Unconnected, so a journald restart costs nothing: each send
        // addresses the socket anew.
        let socket = UnixDatagram::unbound().ok()?;
        Some(Self { socket, path })
    }
}

impl PairsOut for Journal {
    fn write(&self, meta: &Metadata<'_>, pairs: &Fields<'_>) {
        let now = jiff::ZonedDateTime::now();
        let fields = journal_fields(&now, *meta.level(), meta.target(), pairs);
        if self
            .socket
            .send_to(&encode_journal(&fields), &self.path)
            .is_err()
        {
            // Too large for a datagram (journald's limit is far above any
            // line this daemon writes) or journald gone: keep the line on
            // stderr, which systemd also stores, rather than lose it.
            let line = terminal_line(&now, *meta.level(), meta.target(), pairs, false, true);
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}

/// journald's priority for a level: error 3, warning 4, info 6, debug 7.
fn journal_priority(level: Level) -> &'static str {
    match level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "6",
        Level::DEBUG | Level::TRACE => "7",
    }
}

/// Fields journald sets or reads itself: an event field of such a name is
/// stored with a `FIELD_` prefix so it cannot forge them.
const JOURNAL_RESERVED: &[&str] = &[
    "MESSAGE",
    "EVENT",
    "MESSAGE_ID",
    "PRIORITY",
    "CODE_FILE",
    "CODE_LINE",
    "CODE_FUNC",
    "ERRNO",
    "INVOCATION_ID",
    "USER_INVOCATION_ID",
    "SYSLOG_FACILITY",
    "SYSLOG_IDENTIFIER",
    "SYSLOG_PID",
    "SYSLOG_TIMESTAMP",
    "SYSLOG_RAW",
    "TID",
    "UNIT",
    "USER_UNIT",
    "DOCUMENTATION",
];

/// The journal field name of a tracing field: the span's `connection` and
/// `name` become `CONNECTION_ID` and `CONNECTION_NAME` (plain `NAME` would
/// say nothing in `journalctl -o verbose`), the rest upper-cased with every
/// character journald does not accept (`[A-Z0-9_]` only, no leading `_` or
/// digit; a leading `_` marks trusted fields) made `_`, at most 64
/// characters.
fn journal_name(field: &str) -> String {
    match field {
        "connection" => return "CONNECTION_ID".to_owned(),
        "name" => return "CONNECTION_NAME".to_owned(),
        _ => {}
    }
    let upper: String = field
        .chars()
        .map(|c| match c.to_ascii_uppercase() {
            c @ ('A'..='Z' | '0'..='9') => c,
            _ => '_',
        })
        .collect();
    let mut name = upper
        .trim_start_matches(|c: char| c == '_' || c.is_ascii_digit())
        .to_owned();
    if name.is_empty() {
        name = "FIELD".to_owned();
    }
    if JOURNAL_RESERVED.contains(&name.as_str()) {
        name.insert_str(0, "FIELD_");
    }
    name.truncate(64);
    name
}

/// The journal entry of an event: `MESSAGE` (the line a person reads in
/// `journalctl -u`: [`describe`], times in `now`'s zone), `PRIORITY`,
/// `SYSLOG_IDENTIFIER`, every span and event field ([`journal_name`]) with
/// the bare message as `EVENT` (`journalctl EVENT="credentials rotated"`),
/// and `TARGET` for another crate's event (as `target` in JSON).
pub fn journal_fields(
    now: &jiff::ZonedDateTime,
    level: Level,
    target: &str,
    pairs: &Fields<'_>,
) -> Vec<(String, String)> {
    let mut message = String::with_capacity(160);
    describe(&mut message, now, target, pairs, false, false);
    let mut fields = vec![
        ("MESSAGE".to_owned(), message),
        ("PRIORITY".to_owned(), journal_priority(level).to_owned()),
        ("SYSLOG_IDENTIFIER".to_owned(), SYSLOG_IDENTIFIER.to_owned()),
    ];
    for (name, value) in pairs {
        let name = match *name {
            "message" => "EVENT".to_owned(),
            other => journal_name(other),
        };
        fields.push((name, (*value).to_owned()));
    }
    if !is_ours(target) {
        fields.push(("TARGET".to_owned(), target.to_owned()));
    }
    fields
}

/// journald's native protocol: `NAME=value\n`, or for a value with a
/// newline `NAME\n`, its length as 64-bit little endian, the value, `\n`.
fn encode_journal(fields: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    for (name, value) in fields {
        out.extend_from_slice(name.as_bytes());
        if value.contains('\n') {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            out.push(b'=');
        }
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out
}

// ---------------------------------------------------------------------------
// The terminal.

/// Writes [`terminal_line`]s.
struct Terminal<W> {
    colour: bool,
    show_ids: bool,
    writer: W,
}

impl<W> PairsOut for Terminal<W>
where
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn write(&self, meta: &Metadata<'_>, pairs: &Fields<'_>) {
        let now = jiff::ZonedDateTime::now();
        let line = terminal_line(
            &now,
            *meta.level(),
            meta.target(),
            pairs,
            self.colour,
            self.show_ids,
        );
        // One write per line, so lines from threads never interleave.
        let _ = self.writer.make_writer().write_all(line.as_bytes());
    }
}

/// Shorter names for the fields of the commonest lines, so that `credentials
/// rotated` with a 20-character key id and two times fits 120 columns. JSON
/// and the journal keep the full names.
const TERMINAL_LABELS: &[(&str, &str)] = &[
    ("access_key_id", "key"),
    ("expires_at", "expires"),
    ("next_rotation_at", "next"),
];

/// One line for a person, ending in a newline:
/// `20:14:03 INFO  bucket-1 (prod): credentials rotated key=ASIA... expires=21:14:03`.
///
/// `now` gives the time and the time zone (the local one in the daemon);
/// RFC 3339 field values are shown in that zone too, as a time of day when
/// on the same day. The connection's UUID is shown only with `show_ids`
/// (a `debug` filter), or when the line has no name for it.
pub fn terminal_line(
    now: &jiff::ZonedDateTime,
    level: Level,
    target: &str,
    pairs: &Fields<'_>,
    colour: bool,
    show_ids: bool,
) -> String {
    let mut line = String::with_capacity(160);
    line.push_str(&now.strftime("%H:%M:%S").to_string());
    line.push(' ');
    let (label, paint) = match level {
        Level::ERROR => ("ERROR", "\x1b[1;31m"),
        Level::WARN => ("WARN ", "\x1b[33m"),
        Level::INFO => ("INFO ", "\x1b[32m"),
        Level::DEBUG => ("DEBUG", "\x1b[34m"),
        Level::TRACE => ("TRACE", "\x1b[35m"),
    };
    if colour {
        line.push_str(paint);
        line.push_str(label);
        line.push_str("\x1b[0m");
    } else {
        line.push_str(label);
    }
    line.push(' ');
    describe(&mut line, now, target, pairs, colour, show_ids);
    line.push('\n');
    line
}

/// The words of a line after its time and level: `bucket-1 (prod):
/// credentials rotated key=ASIA... expires=21:14:03`. Both the terminal line
/// and the journal's `MESSAGE` (`journalctl -u` shows nothing else, and a
/// bare `rotation failed, retrying` would not say which connection).
fn describe(
    line: &mut String,
    now: &jiff::ZonedDateTime,
    target: &str,
    pairs: &Fields<'_>,
    colour: bool,
    show_ids: bool,
) {
    let get = |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let id = get("connection");
    let mut shown: Vec<&str> = vec!["message"];
    if let Some(name) = get("name") {
        if colour {
            line.push_str("\x1b[1m");
        }
        push_plain(line, name);
        if let Some(sandbox) = get("sandbox") {
            line.push_str(" (");
            push_plain(line, sandbox);
            line.push(')');
            shown.push("sandbox");
        }
        if colour {
            line.push_str("\x1b[0m");
        }
        line.push_str(": ");
        shown.push("name");
        if !show_ids || id == Some(name) {
            shown.push("connection");
        }
    }
    push_plain(line, get("message").unwrap_or_default());
    for (field, value) in pairs.iter().filter(|(n, _)| !shown.contains(n)) {
        let label = TERMINAL_LABELS
            .iter()
            .find(|(long, _)| long == field)
            .map_or(*field, |(_, short)| short);
        line.push(' ');
        line.push_str(label);
        line.push('=');
        let value = local_time(now, value).unwrap_or_else(|| (*value).to_owned());
        if value.is_empty()
            || value.contains(|c: char| c.is_whitespace() || c == '=' || c == '"' || c.is_control())
        {
            line.push('"');
            for c in value.chars() {
                match c {
                    '"' => line.push_str("\\\""),
                    c if c.is_control() => line.extend(c.escape_debug()),
                    c => line.push(c),
                }
            }
            line.push('"');
        } else {
            line.push_str(&value);
        }
    }
    if !is_ours(target) {
        line.push_str(" target=");
        line.push_str(target);
    }
}

/// Appends `text` with its control characters escaped (`\n`, `\u{1b}`):
/// remote text in a message must not start a line of its own or drive the
/// terminal. Backslashes stay as they are, so text the daemon has already
/// escaped reads the same as in JSON.
fn push_plain(line: &mut String, text: &str) {
    for c in text.chars() {
        if c.is_control() {
            line.extend(c.escape_debug());
        } else {
            line.push(c);
        }
    }
}

/// An RFC 3339 time (`2026-11-23T16:04:05Z`) in `now`'s zone: the time of
/// day on `now`'s day, else date and time (`2026-11-24T01:00:00`). `None`
/// for any other text.
fn local_time(now: &jiff::ZonedDateTime, value: &str) -> Option<String> {
    // Only the shape the daemon writes (`clock::rfc3339`): date, `T`, time, zone.
    if value.len() < 20 || value.as_bytes().get(10) != Some(&b'T') {
        return None;
    }
    let at = value
        .parse::<jiff::Timestamp>()
        .ok()?
        .to_zoned_datetime(now.time_zone().clone());
    // No space in either, so the value needs no quotes.
    let format = if at.date() == now.date() {
        "%H:%M:%S"
    } else {
        "%Y-%m-%dT%H:%M:%S"
    };
    Some(at.strftime(format).to_string())
}

// ---------------------------------------------------------------------------
// JSON.

/// Writes JSON lines: one object per event, `timestamp`, `level`, the
/// event's fields and those of its spans flattened to the top, `target`
/// for another crate's event.
///
/// Keys come out sorted, each once: an event field wins over a span field of
/// the same name, an inner span's over an outer one's. Every value arrives
/// encoded ([`PairsOut::JSON`]): a span's fields were encoded once when it
/// was made, so a line only joins them with the event's, in one buffer
/// written with one call.
struct JsonLines<W> {
    writer: W,
}

impl<W> PairsOut for JsonLines<W>
where
    W: for<'a> MakeWriter<'a> + 'static,
{
    const JSON: bool = true;

    fn write(&self, meta: &Metadata<'_>, fields: &Fields<'_>) {
        let line = json_line(
            &humantime::format_rfc3339_millis(crate::clock::wall_now()).to_string(),
            *meta.level(),
            meta.target(),
            fields,
        );
        // One write per line, so lines from threads never interleave.
        let _ = self.writer.make_writer().write_all(line.as_bytes());
    }
}

/// One JSON object and a newline, of `fields` (each value already JSON)
/// with the time, the level and another crate's target.
fn json_line(timestamp: &str, level: Level, target: &str, fields: &Fields<'_>) -> String {
    let timestamp = json_string(timestamp);
    let level = match level {
        Level::ERROR => "\"error\"",
        Level::WARN => "\"warn\"",
        Level::INFO => "\"info\"",
        Level::DEBUG => "\"debug\"",
        Level::TRACE => "\"trace\"",
    };
    let target = (!is_ours(target)).then(|| json_string(target));
    let mut all: Vec<(&str, &str)> = Vec::with_capacity(fields.len() + 3);
    all.extend([("timestamp", timestamp.as_str()), ("level", level)]);
    for &(name, value) in fields {
        put(&mut all, name, value);
    }
    if let Some(target) = &target {
        put(&mut all, "target", target.as_str());
    }
    all.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut line = String::with_capacity(
        64 + all
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>(),
    );
    line.push('{');
    for (n, (name, value)) in all.iter().enumerate() {
        if n > 0 {
            line.push(',');
        }
        push_json_key(&mut line, name);
        line.push(':');
        line.push_str(value);
    }
    line.push_str("}\n");
    line
}

/// `"name"`: field names are Rust identifiers, written as they are, but
/// one given as a string literal could hold anything, so that is escaped.
fn push_json_key(line: &mut String, name: &str) {
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    {
        line.push('"');
        line.push_str(name);
        line.push('"');
    } else {
        line.push_str(&json_string(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The daemon's JSON format, writing into `buffer`.
    fn json_subscriber(buffer: &Buffer) -> impl tracing::Subscriber + Send + Sync {
        let writer = buffer.clone();
        tracing_subscriber::registry().with(FieldsLayer {
            out: JsonLines {
                writer: move || writer.clone(),
            },
        })
    }

    #[test]
    fn json_lines_carry_span_fields_at_the_top_level() {
        let buffer = Buffer::default();
        tracing::subscriber::with_default(json_subscriber(&buffer), || {
            let span = tracing::info_span!(
                "connection",
                connection = "c-1",
                sandbox = "prod",
                name = "sales"
            );
            let _entered = span.enter();
            tracing::info!(
                access_key_id = "ASIAEXAMPLE",
                attempt = 2u64,
                "credentials rotated"
            );
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["message"], "credentials rotated");
        assert_eq!(line["level"], "info");
        assert_eq!(line["connection"], "c-1");
        assert_eq!(line["sandbox"], "prod");
        assert_eq!(line["name"], "sales");
        assert_eq!(line["access_key_id"], "ASIAEXAMPLE");
        assert_eq!(line["attempt"], 2);
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn keys_are_sorted_once_each_and_follow_span_records() {
        let buffer = Buffer::default();
        tracing::subscriber::with_default(json_subscriber(&buffer), || {
            let span = tracing::info_span!(
                "connection",
                connection = "c-1",
                sandbox = "prod",
                attempt = tracing::field::Empty
            );
            let _entered = span.enter();
            tracing::info!(sandbox = "event-wins", "first");
            span.record("attempt", 3u64);
            tracing::info!("second");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0].matches("\"sandbox\"").count(), 1, "{}", lines[0]);
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["sandbox"], "event-wins");
        assert_eq!(first["connection"], "c-1");
        let keys: Vec<&String> = first.as_object().unwrap().keys().collect();
        let text_order: Vec<usize> = keys
            .iter()
            .map(|k| lines[0].find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(text_order.windows(2).all(|w| w[0] < w[1]), "{}", lines[0]);
        let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["sandbox"], "prod");
        assert_eq!(second["attempt"], 3, "a recorded span field shows");
    }

    #[test]
    fn json_values_keep_their_types_and_text_cannot_break_the_line() {
        let buffer = Buffer::default();
        tracing::subscriber::with_default(json_subscriber(&buffer), || {
            let span = tracing::info_span!("connection", name = "a\"b\\c\n{\"level\":\"error\"}");
            let _entered = span.enter();
            tracing::warn!(
                ratio = 1.0f64,
                nan = f64::NAN,
                ok = true,
                count = -3i64,
                error = %"bad\u{1b}[31m\u{202e}",
                "weird.name" = "x",
                "message with {}",
                "args"
            );
            tracing::info!(target: "hyper::client", "third party");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(line["name"], "a\"b\\c\n{\"level\":\"error\"}");
        assert_eq!(line["level"], "warn");
        assert_eq!(line["ratio"], 1.0);
        assert!(lines[0].contains("\"ratio\":1.0"), "{}", lines[0]);
        assert!(line["nan"].is_null());
        assert_eq!(line["ok"], true);
        assert_eq!(line["count"], -3);
        assert_eq!(line["error"], "bad\u{1b}[31m\u{202e}");
        assert!(!lines[0].contains('\u{1b}'), "escaped: {}", lines[0]);
        assert_eq!(line["weird.name"], "x");
        assert_eq!(line["message"], "message with args");
        assert!(
            line.get("target").is_none(),
            "our own events need no target"
        );
        let third: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(third["target"], "hyper::client");
    }

    /// Events as a [`FieldsLayer`] hands them on.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<(Level, String, Pairs)>>>);

    fn owned(fields: &Fields<'_>) -> Pairs {
        fields.iter().map(|(n, v)| (*n, (*v).to_owned())).collect()
    }

    fn borrowed(pairs: &Pairs) -> Vec<(&'static str, &str)> {
        pairs.iter().map(|(n, v)| (*n, v.as_str())).collect()
    }

    impl PairsOut for Captured {
        fn write(&self, meta: &Metadata<'_>, pairs: &Fields<'_>) {
            self.0
                .lock()
                .unwrap()
                .push((*meta.level(), meta.target().to_owned(), owned(pairs)));
        }
    }

    fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn journal_entries_carry_priority_message_and_every_field() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(FieldsLayer {
            out: captured.clone(),
        });
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "connection",
                connection = "4cb0c374-d3bb-4557-b139-5712880adc55",
                sandbox = "prod",
                name = "sales-bucket",
                attempt = tracing::field::Empty
            );
            let _entered = span.enter();
            tracing::info!(
                access_key_id = "ASIAIOSFODNN7EXAMPLE",
                expires_at = "2026-11-23T16:04:05Z",
                "credentials rotated"
            );
            span.record("attempt", 2u64);
            tracing::warn!(
                error = "HTTP 503",
                status = 503u16,
                "rotation failed, retrying"
            );
            tracing::error!("credentials expired");
        });
        let events = captured.0.lock().unwrap().clone();
        assert_eq!(events.len(), 3);
        let entries: Vec<Vec<(String, String)>> = events
            .iter()
            .map(|(level, target, pairs)| {
                journal_fields(
                    &at("2026-11-23T15:00:00Z"),
                    *level,
                    target,
                    &borrowed(pairs),
                )
            })
            .collect();

        let rotated = &entries[0];
        assert_eq!(
            field(rotated, "MESSAGE"),
            Some(
                "sales-bucket (prod): credentials rotated key=ASIAIOSFODNN7EXAMPLE expires=16:04:05"
            )
        );
        assert_eq!(field(rotated, "EVENT"), Some("credentials rotated"));
        assert_eq!(field(rotated, "PRIORITY"), Some("6"));
        assert_eq!(field(rotated, "SYSLOG_IDENTIFIER"), Some("aep-s3-rotator"));
        assert_eq!(
            field(rotated, "CONNECTION_ID"),
            Some("4cb0c374-d3bb-4557-b139-5712880adc55")
        );
        assert_eq!(field(rotated, "CONNECTION_NAME"), Some("sales-bucket"));
        assert_eq!(field(rotated, "SANDBOX"), Some("prod"));
        assert_eq!(
            field(rotated, "ACCESS_KEY_ID"),
            Some("ASIAIOSFODNN7EXAMPLE")
        );
        assert_eq!(field(rotated, "EXPIRES_AT"), Some("2026-11-23T16:04:05Z"));
        assert_eq!(
            field(rotated, "TARGET"),
            None,
            "our own events need no target"
        );
        let names: Vec<&str> = rotated.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names.iter().filter(|n| **n == "MESSAGE").count(),
            1,
            "{names:?}"
        );

        let failed = &entries[1];
        assert_eq!(field(failed, "PRIORITY"), Some("4"));
        assert_eq!(field(failed, "ERROR"), Some("HTTP 503"));
        assert_eq!(field(failed, "STATUS"), Some("503"));
        assert_eq!(
            field(failed, "ATTEMPT"),
            Some("2"),
            "a recorded span field shows"
        );
        assert_eq!(field(failed, "CONNECTION_NAME"), Some("sales-bucket"));

        assert_eq!(field(&entries[2], "PRIORITY"), Some("3"));
        assert_eq!(
            field(&entries[2], "MESSAGE"),
            Some("sales-bucket (prod): credentials expired attempt=2")
        );
    }

    #[test]
    fn journal_field_names_are_valid_and_cannot_forge_journald_fields() {
        assert_eq!(journal_name("access_key_id"), "ACCESS_KEY_ID");
        assert_eq!(journal_name("retry_in"), "RETRY_IN");
        assert_eq!(journal_name("log.target"), "LOG_TARGET");
        assert_eq!(journal_name("priority"), "FIELD_PRIORITY");
        assert_eq!(journal_name("syslog_identifier"), "FIELD_SYSLOG_IDENTIFIER");
        assert_eq!(
            journal_name("_systemd_unit"),
            "SYSTEMD_UNIT",
            "no trusted field"
        );
        assert_eq!(journal_name("9lives"), "LIVES");
        assert_eq!(journal_name("__"), "FIELD");
        assert_eq!(journal_name(&"x".repeat(100)).len(), 64);
        assert_eq!(journal_name("event"), "FIELD_EVENT");
        let third_party = journal_fields(
            &at("2026-11-23T15:00:00Z"),
            Level::INFO,
            "hyper::client",
            &[],
        );
        assert_eq!(field(&third_party, "TARGET"), Some("hyper::client"));
    }

    #[test]
    fn journal_datagrams_frame_multi_line_values() {
        let fields = vec![
            ("MESSAGE".to_owned(), "one line".to_owned()),
            ("ERROR".to_owned(), "first\nsecond".to_owned()),
        ];
        let mut want = b"MESSAGE=one line\nERROR\n".to_vec();
        want.extend_from_slice(&12u64.to_le_bytes());
        want.extend_from_slice(b"first\nsecond\n");
        assert_eq!(encode_journal(&fields), want);
    }

    #[test]
    fn journal_stream_is_compared_by_device_and_inode() {
        assert!(journal_stream_is("8:1234", 8, 1234));
        assert!(!journal_stream_is("8:1234", 8, 1235));
        assert!(!journal_stream_is("9:1234", 8, 1234));
        assert!(!journal_stream_is("", 8, 1234));
        assert!(!journal_stream_is("8-1234", 8, 1234));
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(
            colour_wanted(true, Some("".into())),
            "an empty NO_COLOR is unset"
        );
        assert!(!colour_wanted(true, Some("1".into())));
        assert!(!colour_wanted(false, None));
    }

    fn at(rfc3339: &str) -> jiff::ZonedDateTime {
        rfc3339
            .parse::<jiff::Timestamp>()
            .unwrap()
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
    }

    fn pairs<'a>(list: &[(&'static str, &'a str)]) -> Vec<(&'static str, &'a str)> {
        list.to_vec()
    }

    #[test]
    fn terminal_line_snapshot() {
        let now = at("2026-12-06T20:14:03.250Z");
        let rotated = pairs(&[
            ("connection", "4cb0c374-d3bb-4557-b139-5712880adc55"),
            ("sandbox", "prod"),
            ("name", "bucket-1"),
            ("message", "credentials rotated"),
            ("access_key_id", "ASIAIOSFODNN7EXAMPLE"),
            ("expires_at", "2026-12-06T21:14:03Z"),
            ("next_rotation_at", "2026-12-06T20:53:40Z"),
        ]);
        let line = terminal_line(
            &now,
            Level::INFO,
            "aep_s3_rotator::connection",
            &rotated,
            false,
            false,
        );
        assert_eq!(
            line,
            "20:14:03 INFO  bucket-1 (prod): credentials rotated key=ASIAIOSFODNN7EXAMPLE expires=21:14:03 next=20:53:40\n"
        );
        assert!(
            line.trim_end().chars().count() <= 120,
            "{} columns",
            line.len()
        );

        // At debug the UUID is there; a value with spaces is quoted; a time
        // on another day keeps its date.
        let failed = pairs(&[
            ("connection", "4cb0c374-d3bb-4557-b139-5712880adc55"),
            ("sandbox", "prod"),
            ("name", "bucket-1"),
            ("message", "rotation failed, retrying"),
            ("error", "HTTP 503 from Flow Service"),
            ("retry_in", "4s"),
            ("expires_at", "2026-12-07T01:00:00Z"),
        ]);
        assert_eq!(
            terminal_line(&now, Level::WARN, "aep_s3_rotator", &failed, false, true),
            "20:14:03 WARN  bucket-1 (prod): rotation failed, retrying connection=4cb0c374-d3bb-4557-b139-5712880adc55 \
             error=\"HTTP 503 from Flow Service\" retry_in=4s expires=2026-12-07T01:00:00\n"
        );
    }

    #[test]
    fn terminal_line_colour_and_other_crates() {
        let now = at("2026-12-06T08:00:00Z");
        let line = terminal_line(
            &now,
            Level::ERROR,
            "aep_s3_rotator",
            &pairs(&[("message", "cannot start")]),
            true,
            false,
        );
        assert_eq!(line, "08:00:00 \x1b[1;31mERROR\x1b[0m cannot start\n");
        let line = terminal_line(
            &now,
            Level::INFO,
            "aws_config::profile",
            &pairs(&[("message", "loaded")]),
            false,
            false,
        );
        assert_eq!(line, "08:00:00 INFO  loaded target=aws_config::profile\n");
        // No name: the id is all there is, so it shows.
        let line = terminal_line(
            &now,
            Level::ERROR,
            "aep_s3_rotator::daemon",
            &pairs(&[("connection", "c-1"), ("message", "rotation task failed")]),
            false,
            false,
        );
        assert_eq!(line, "08:00:00 ERROR rotation task failed connection=c-1\n");
        // Remote text cannot start a line or drive the terminal; text the
        // daemon escaped already (a literal backslash) reads as it is.
        let line = terminal_line(
            &now,
            Level::WARN,
            "aep_s3_rotator",
            &pairs(&[
                ("message", "refused\n{\"level\":\"INFO\"}"),
                ("error", "a\u{1b}[2J\rb \\n \"q\""),
            ]),
            false,
            false,
        );
        assert_eq!(
            line,
            "08:00:00 WARN  refused\\n{\"level\":\"INFO\"} error=\"a\\u{1b}[2J\\rb \\n \\\"q\\\"\"\n"
        );
        assert_eq!(line.lines().count(), 1);
    }

    #[test]
    fn third_party_crates_are_capped_at_info() {
        assert!(is_ours("aep_s3_rotator"));
        assert!(is_ours("aep_s3_rotator::scheduler"));
        assert!(!is_ours("aep_s3_rotator_evil"));
        assert!(!is_ours("aws_sigv4::http_request"));
        assert_eq!(third_party_level("aws_sigv4::http_request"), Level::INFO);
        assert_eq!(third_party_level("aws_config::imds::region"), Level::ERROR);
        assert_eq!(
            third_party_level("aws_config::meta::credentials::chain"),
            Level::ERROR
        );
        assert_eq!(
            third_party_level("aws_config::profile::credentials"),
            Level::ERROR
        );
    }
}
