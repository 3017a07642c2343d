//! Tests only: the events logged while a test runs, each with its level and
//! fields as `Debug` prints them, for asserting what a sink would be given
//! (levels, escaping, bounds) without parsing a log format.

use std::sync::{Arc, Mutex};

use tracing::Level;
use tracing::subscriber::DefaultGuard;
use tracing_subscriber::layer::SubscriberExt;

/// One logged event.
#[derive(Debug, Clone)]
pub(crate) struct Logged {
    /// Its level.
    pub level: Level,
    /// Its fields, in order, as (name, `Debug` text).
    pub fields: Vec<(String, String)>,
}

impl Logged {
    /// The value of field `name`, if the event has it.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Its message (empty when it has none).
    pub fn message(&self) -> &str {
        self.field("message").unwrap_or_default()
    }
}

/// Records the events of this thread while it lives (`record`).
pub(crate) struct Recorder {
    events: Arc<Mutex<Vec<Logged>>>,
    _guard: DefaultGuard,
}

impl Recorder {
    /// What was logged so far.
    pub fn events(&self) -> Vec<Logged> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Starts recording this thread's events (a paused-time test runs on one
/// thread) until the recorder is dropped.
pub(crate) fn record() -> Recorder {
    let events = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Record(Arc::clone(&events)));
    Recorder {
        events,
        _guard: tracing::subscriber::set_default(subscriber),
    }
}

/// The events `f` logs.
pub(crate) fn logged(f: impl FnOnce()) -> Vec<Logged> {
    let recorder = record();
    f();
    recorder.events()
}

struct Record(Arc<Mutex<Vec<Logged>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Record {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Logged {
                level: *event.metadata().level(),
                fields: fields.0,
            });
    }
}

#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}
