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
    let cap_third_party = filter_fn(|meta| is_ours(meta.target()) || *meta.level() <= Level::INFO);
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
#[derive(Debug, Clone, Copy, Default)]
pub struct FlatJson;

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
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(humantime::format_rfc3339_millis(crate::clock::wall_now()).to_string()),
        );
        line.insert(
            "level".into(),
            Value::String(meta.level().as_str().to_ascii_lowercase()),
        );
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(fields)) =
                        serde_json::from_str::<Value>(fields.as_str())
                {
                    line.extend(fields);
                }
            }
        }
        let mut visitor = JsonVisitor(&mut line);
        event.record(&mut visitor);
        if !is_ours(meta.target()) {
            line.insert("target".into(), Value::String(meta.target().to_owned()));
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
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

    #[test]
    fn json_lines_carry_span_fields_at_the_top_level() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(FlatJson)
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
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
    fn third_party_crates_are_capped_at_info() {
        assert!(is_ours("aep_s3_rotator"));
        assert!(is_ours("aep_s3_rotator::daemon"));
        assert!(!is_ours("aep_s3_rotator_evil"));
        assert!(!is_ours("aws_sigv4::http_request"));
    }
}
