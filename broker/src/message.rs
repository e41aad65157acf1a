//! The application message as the broker keeps it: shared, immutable, cheap to fan out;
//! and a delivery, what one subscriber gets of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;
use outpost_mqtt::{Properties, QoS};

/// One accepted application message. Routed as `Arc<Message>` so fan-out to many
/// subscribers copies a pointer, not the payload.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic name (never empty: inbound aliases are resolved before routing).
    pub topic: ByteString,
    /// Payload, shared with the buffer it was decoded from.
    pub payload: Bytes,
    /// QoS it was published with; each subscription may lower it.
    pub qos: QoS,
    /// RETAIN flag as published.
    pub retain: bool,
    /// 5.0 properties forwarded to subscribers (payload format, content type, response
    /// topic, correlation data, user properties). Topic alias and subscription identifiers
    /// are per-hop and never stored here.
    pub properties: Properties,
    /// When the 5.0 Message Expiry Interval runs out.
    pub expires_at: Option<Instant>,
    /// Session that published it, for No Local; `None` for in-process publishers.
    pub origin: Option<crate::subscriptions::SessionKey>,
    /// A durable sink this message must not be offered to: the bridge whose downlink
    /// published it, so `both` rules do not send a message back where it came from.
    pub skip_sink: Option<usize>,
}

impl Message {
    /// Builds a message, turning a Message Expiry Interval into a deadline counted from
    /// the clock (read only when the message has an expiry).
    pub fn new(
        topic: ByteString,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Properties,
        origin: Option<crate::subscriptions::SessionKey>,
    ) -> Arc<Message> {
        Self::build(
            topic,
            payload,
            qos,
            retain,
            properties,
            origin,
            Instant::now,
        )
    }

    /// Builds a message received at `now`: the core's constructor, which never reads the
    /// clock itself, so that it can be driven with a fake one.
    pub(crate) fn new_at(
        topic: ByteString,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Properties,
        origin: Option<crate::subscriptions::SessionKey>,
        now: Instant,
    ) -> Arc<Message> {
        Self::build(topic, payload, qos, retain, properties, origin, || now)
    }

    fn build(
        topic: ByteString,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        mut properties: Properties,
        origin: Option<crate::subscriptions::SessionKey>,
        now: impl FnOnce() -> Instant,
    ) -> Arc<Message> {
        // An interval of 0 has no meaning in the spec; as Mosquitto does, it is no
        // expiry rather than a message dropped as soon as it is acknowledged.
        let expires_at = properties
            .message_expiry_interval
            .take()
            .filter(|&s| s > 0)
            .map(|s| now() + Duration::from_secs(u64::from(s)));
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        Arc::new(Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            expires_at,
            origin,
            skip_sink: None,
        })
    }

    /// True once the message expiry interval has passed (MQTT-3.3.2-5).
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Remaining expiry in whole seconds, rounded up, for the forwarded PUBLISH
    /// (MQTT-3.3.2-6: the receiver sees the lifetime minus the time spent waiting).
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|t| {
            let left = t.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
        })
    }
}

/// What to send to one subscriber for one message.
#[derive(Clone)]
pub struct Delivery {
    /// The message.
    pub msg: Arc<Message>,
    /// QoS after the subscription's downgrade.
    pub qos: QoS,
    /// RETAIN flag to send (retain-as-published, or a retained message on subscribe).
    pub retain: bool,
    /// 5.0 subscription identifiers of every matching subscription.
    pub sub_ids: Vec<u32>,
}
