//! The last warnings and errors the gateway logged, for the status page: a `tracing`
//! layer that keeps a few of them in a bounded ring.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// Warnings kept.
const KEEP: usize = 20;
/// Longest message kept, in bytes; a longer one is cut.
const MAX_MESSAGE: usize = 400;

static RECENT: Mutex<VecDeque<Warning>> = Mutex::new(VecDeque::new());

/// One logged warning or error.
#[derive(Debug, Clone, Serialize)]
pub struct Warning {
    /// When (unix milliseconds).
    pub time_ms: i64,
    /// WARN or ERROR.
    pub level: &'static str,
    /// The module that logged it.
    pub target: String,
    /// The message and its fields.
    pub message: String,
    /// How many times it was logged in a row (a reconnect loop repeats itself).
    pub repeated: u32,
}

/// The last warnings, oldest first.
pub fn recent() -> Vec<Warning> {
    RECENT
        .lock()
        .map(|r| r.iter().cloned().collect())
        .unwrap_or_default()
}

/// The layer to add to the subscriber.
pub struct Layer;

impl<S: Subscriber> tracing_subscriber::Layer<S> for Layer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let mut v = Fields::default();
        event.record(&mut v);
        let mut message = v.message;
        message.push_str(&v.rest);
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let w = Warning {
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            level: if level == Level::ERROR {
                "ERROR"
            } else {
                "WARN"
            },
            target: event.metadata().target().to_owned(),
            message,
            repeated: 1,
        };
        if let Ok(mut r) = RECENT.lock() {
            if let Some(last) = r.back_mut()
                && last.message == w.message
                && last.target == w.target
            {
                last.time_ms = w.time_ms;
                last.repeated = last.repeated.saturating_add(1);
                return;
            }
            if r.len() >= KEEP {
                r.pop_front();
            }
            r.push_back(w);
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else if self.rest.len() < MAX_MESSAGE {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else if self.rest.len() < MAX_MESSAGE {
            let _ = write!(self.rest, " {}={value}", field.name());
        }
    }
}
