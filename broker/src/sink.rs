//! Durable sinks: what must commit a message (the bridge spool) before its publisher is
//! acknowledged, the receipt it hands back, and how it refuses.

use crate::message::Message;

/// Why a durable sink refused a message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct Rejected {
    /// Human-readable reason, logged and sent as a 5.0 reason string.
    pub reason: String,
    /// The 5.0 PUBACK/PUBREC reason code to answer with (0x97 Quota exceeded for a full
    /// spool, 0x80 for a failure); 3.x publishers get no acknowledgement at all.
    pub code: outpost_mqtt::ReasonCode,
}

impl Rejected {
    /// A refusal for a reason other than a full store.
    pub fn failure(reason: impl Into<String>) -> Rejected {
        Rejected {
            reason: reason.into(),
            code: outpost_mqtt::ReasonCode::UNSPECIFIED_ERROR,
        }
    }
}

/// What a durable sink hands back for a message it took: resolves once the message is
/// committed, or with the reason it was refused.
pub type DurableReceipt = futures_util::future::BoxFuture<'static, Result<(), Rejected>>;

/// Something that must make a message durable before its publisher is acknowledged
/// (the bridge spool). `offer` is called on the core task for every accepted message,
/// so it must be cheap and must not block: return `None` when the sink does not want
/// the message, so messages it does not match are not slowed at all.
pub trait DurableSink: Send + Sync + 'static {
    /// Offers a message; `Some` resolves once it is committed or refused.
    fn offer(&self, msg: &Message) -> Option<DurableReceipt>;

    /// Whether the sink takes messages on `topic` at all, durably or not; asked only for
    /// messages no subscription matched, to tell a 5.0 publisher 0x10 (No matching
    /// subscribers) truthfully.
    fn wants(&self, topic: &str) -> bool;
}

/// Identifies a registered durable sink, so a sink's own downlink publishes can skip it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkId(pub(crate) usize);
