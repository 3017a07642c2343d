//! Logs on stderr: one JSON object per line (`json`), or human-readable
//! (`text`). In JSON every line carries `timestamp`, `level`, `message`, and
//! the fields of the spans it happened in (`connection`, `sandbox`, `name`)
//! at the top level, so operators can filter on them directly.
//!
//! Third-party crates (HTTP, TLS, the AWS SDK) are held at `info` whatever
//! the filter says: at `debug`/`trace` they print request headers, signing
//! material and bodies, which carry secrets.

use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Text,
}

impl LogFormat {
    /// `json` when stderr is not a terminal (journald, containers), else `text`.
    pub fn detect() -> Self {
        if std::io::stderr().is_terminal() {
            Self::Text
        } else {
            Self::Json
        }
    }
}

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

/// Installs the global subscriber. `filter` is a tracing filter (`--log-level`,
/// else `RUST_LOG`, else `info`).
pub fn init(format: LogFormat, filter: Option<&str>) -> Result<(), LogFilterError> {
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
    let cap_third_party = filter_fn(|meta| {
        is_ours(meta.target()) || *meta.level() <= third_party_level(meta.target())
    });
    let registry = tracing_subscriber::registry().with(env_filter);
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(JsonFields::new())
                    .event_format(FlatJson)
                    .with_writer(std::io::stderr)
                    .with_filter(cap_third_party),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_filter(cap_third_party),
            )
            .try_init(),
    }
    // A second init (tests) keeps the first subscriber; that is fine.
    .or(Ok(()))
}

use tracing_subscriber::Layer as _;

/// The JSON line format: event fields and span fields flattened to the top.
///
/// Keys come out sorted, each once: an event field wins over a span field of
/// the same name, an inner span's over an outer one's. The line is built in
/// one buffer and written with one call; a span's fields are parsed from
/// their JSON once and kept with the span ([`SpanFields`]), since a rotation
/// job logs more than one line in its span.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlatJson;

/// A span's fields as parsed from its formatted JSON, cached in the span's
/// extensions by [`FlatJson`].
struct SpanFields {
    /// Length of the formatted text parsed: `Span::record` changes it.
    source_len: usize,
    fields: Vec<(String, Value)>,
}

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields::default();
        fields.insert(
            "timestamp",
            Value::String(humantime::format_rfc3339_millis(crate::clock::wall_now()).to_string()),
        );
        fields.insert(
            "level",
            Value::String(meta.level().as_str().to_ascii_lowercase()),
        );
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let source_len = span
                    .extensions()
                    .get::<FormattedFields<N>>()
                    .map_or(0, |f| f.as_str().len());
                // Re-parsed when `Span::record` changed the text since.
                let stale = span
                    .extensions()
                    .get::<SpanFields>()
                    .is_none_or(|cached| cached.source_len != source_len);
                if stale {
                    let parsed = span
                        .extensions()
                        .get::<FormattedFields<N>>()
                        .and_then(|f| serde_json::from_str::<Map<String, Value>>(f.as_str()).ok())
                        .map(|map| map.into_iter().collect())
                        .unwrap_or_default();
                    let mut extensions = span.extensions_mut();
                    extensions.remove::<SpanFields>();
                    extensions.insert(SpanFields {
                        source_len,
                        fields: parsed,
                    });
                }
                if let Some(SpanFields { fields: cached, .. }) =
                    span.extensions().get::<SpanFields>()
                {
                    for (key, value) in cached {
                        fields.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        event.record(&mut JsonVisitor(&mut fields));
        if !is_ours(meta.target()) {
            fields.insert("target", Value::String(meta.target().to_owned()));
        }
        writer.write_str(&fields.into_line())
    }
}

/// A line's fields, each key once (the last insert wins), in insertion order
/// until [`Fields::into_line`] sorts them. A log line has a dozen fields at
/// most, so a vector beats a map.
#[derive(Default)]
struct Fields<'a>(Vec<(std::borrow::Cow<'a, str>, Value)>);

impl<'a> Fields<'a> {
    fn insert(&mut self, key: impl Into<std::borrow::Cow<'a, str>>, value: Value) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, slot)) => *slot = value,
            None => self.0.push((key, value)),
        }
    }

    /// `{"key":value,...}` with sorted keys, and a newline.
    fn into_line(mut self) -> String {
        self.0.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::with_capacity(256);
        out.push(b'{');
        for (n, (key, value)) in self.0.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            // Writing a str or a Value into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, key.as_ref());
            out.push(b':');
            let _ = serde_json::to_writer(&mut out, value);
        }
        out.extend_from_slice(b"}\n");
        // serde_json writes UTF-8 only.
        String::from_utf8(out).unwrap_or_default()
    }
}

struct JsonVisitor<'f, 'a>(&'f mut Fields<'a>);

impl Visit for JsonVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name(), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name(), Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name(), Value::String(format!("{value:?}")));
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
        tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(FlatJson)
                .with_writer(move || writer.clone()),
        )
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
        let line: Value = serde_json::from_str(text.trim()).unwrap();
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
        let first: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["sandbox"], "event-wins");
        assert_eq!(first["connection"], "c-1");
        let keys: Vec<&String> = first.as_object().unwrap().keys().collect();
        let text_order: Vec<usize> = keys
            .iter()
            .map(|k| lines[0].find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(text_order.windows(2).all(|w| w[0] < w[1]), "{}", lines[0]);
        let second: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["sandbox"], "prod");
        assert_eq!(second["attempt"], 3, "a recorded span field shows");
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
