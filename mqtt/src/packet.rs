//! The MQTT control packets of 3.1, 3.1.1 and 5.0 as plain data.
//!
//! One set of types serves every protocol version: fields that only exist in 5.0
//! (properties, most reason codes) are ignored when encoding for 3.x and come back
//! as defaults when decoding 3.x. That keeps the broker and the bridge free of
//! per-version branches everywhere but the codec.

use bytes::Bytes;
use bytestring::ByteString;

use crate::properties::Properties;
use crate::reason::ReasonCode;

/// Quality of service of a message or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum QoS {
    /// Fire and forget.
    #[default]
    AtMostOnce = 0,
    /// Acknowledged delivery, duplicates possible.
    AtLeastOnce = 1,
    /// Exactly-once delivery with the PUBREC/PUBREL/PUBCOMP exchange.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a wire value, `None` for 3 and above.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// A QoS in a configuration file is the integer 0, 1 or 2; anything else is refused
/// where it is read, so no later code needs a fallback.
#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for QoS {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<QoS, D::Error> {
        use serde::de::{Error, Unexpected, Visitor};

        struct Qos;
        impl Visitor<'_> for Qos {
            type Value = QoS;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a QoS of 0, 1 or 2")
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<QoS, E> {
                u8::try_from(v)
                    .ok()
                    .and_then(QoS::from_u8)
                    .ok_or_else(|| E::invalid_value(Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<QoS, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
                }
            }
        }
        d.deserialize_u8(Qos)
    }
}

/// The protocol version a connection speaks, from the CONNECT protocol level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// MQTT 3.1 (protocol name "MQIsdp", level 3).
    V3_1 = 3,
    /// MQTT 3.1.1 (protocol name "MQTT", level 4).
    V3_1_1 = 4,
    /// MQTT 5.0 (protocol name "MQTT", level 5).
    V5 = 5,
}

impl Protocol {
    /// True for 5.0, the only version with properties and reason codes everywhere.
    pub fn is_v5(self) -> bool {
        self == Protocol::V5
    }

    /// The version as people write it: "3.1", "3.1.1" or "5.0".
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V3_1 => "3.1",
            Protocol::V3_1_1 => "3.1.1",
            Protocol::V5 => "5.0",
        }
    }
}

/// Any MQTT control packet.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    /// CONNECT (client to server). Boxed: it is large and rare.
    Connect(Box<Connect>),
    /// CONNACK (server to client).
    ConnAck(ConnAck),
    /// PUBLISH (both directions).
    Publish(Publish),
    /// PUBACK (both directions).
    PubAck(PubResponse),
    /// PUBREC (both directions).
    PubRec(PubResponse),
    /// PUBREL (both directions).
    PubRel(PubResponse),
    /// PUBCOMP (both directions).
    PubComp(PubResponse),
    /// SUBSCRIBE (client to server).
    Subscribe(Subscribe),
    /// SUBACK (server to client).
    SubAck(SubAck),
    /// UNSUBSCRIBE (client to server).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK (server to client).
    UnsubAck(UnsubAck),
    /// PINGREQ (client to server).
    PingReq,
    /// PINGRESP (server to client).
    PingResp,
    /// DISCONNECT (client to server; also server to client in 5.0).
    Disconnect(Disconnect),
    /// AUTH (5.0 only, both directions).
    Auth(Auth),
}

/// CONNECT: the first packet a client sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Connect {
    /// Protocol version from the protocol name and level.
    pub protocol: Protocol,
    /// Clean Session (3.x) or Clean Start (5.0).
    pub clean_start: bool,
    /// Keep alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// CONNECT properties (5.0).
    pub properties: Properties,
    /// Client identifier; may be empty (the server then assigns one, or refuses on 3.x
    /// with clean session off).
    pub client_id: String,
    /// The will message, when the will flag is set.
    pub will: Option<Will>,
    /// User name, when the flag is set.
    pub username: Option<String>,
    /// Password, when the flag is set (binary data in 5.0).
    pub password: Option<Bytes>,
}

/// A will message carried in CONNECT.
#[derive(Debug, Clone, PartialEq)]
pub struct Will {
    /// Will topic (a topic name, no wildcards).
    pub topic: ByteString,
    /// Will payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will retain flag.
    pub retain: bool,
    /// Will properties (5.0): delay interval, expiry, content type, ...
    pub properties: Properties,
}

/// CONNACK: the server's answer to CONNECT.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnAck {
    /// Session present flag.
    pub session_present: bool,
    /// 5.0 reason code; for 3.x the codec maps it to and from the CONNACK return code
    /// (0 accepted, 1 protocol version, 2 identifier rejected, 3 server unavailable,
    /// 4 bad user name or password, 5 not authorised).
    pub reason: ReasonCode,
    /// CONNACK properties (5.0).
    pub properties: Properties,
}

/// PUBLISH: an application message.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    /// DUP flag: this may be a re-delivery.
    pub dup: bool,
    /// QoS of this transmission.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name. Empty only in 5.0 when a Topic Alias property stands in for it.
    pub topic: ByteString,
    /// Packet identifier: present for QoS 1 and 2, `None` for QoS 0.
    pub packet_id: Option<u16>,
    /// PUBLISH properties (5.0).
    pub properties: Properties,
    /// Application payload, shared without copying.
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct PubResponse {
    /// Packet identifier of the exchange.
    pub packet_id: u16,
    /// Reason code (5.0); `ReasonCode::SUCCESS` on 3.x.
    pub reason: ReasonCode,
    /// Properties (5.0): reason string, user properties.
    pub properties: Properties,
}

impl PubResponse {
    /// A successful response with no properties.
    pub fn new(packet_id: u16) -> Self {
        PubResponse {
            packet_id,
            reason: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }
    }
}

/// What the server does with retained messages when a subscription is made (5.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// 1: send them only if the subscription did not exist before.
    SendIfNew = 1,
    /// 2: do not send retained messages.
    DoNotSend = 2,
}

/// Subscription options byte of a SUBSCRIBE topic filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS the client will receive on this subscription.
    pub qos: QoS,
    /// No Local (5.0): do not send the client its own publications.
    pub no_local: bool,
    /// Retain As Published (5.0): keep the RETAIN flag on forwarded messages.
    pub retain_as_published: bool,
    /// Retain Handling (5.0).
    pub retain_handling: RetainHandling,
}

/// One topic filter of a SUBSCRIBE with its options.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeFilter {
    /// The topic filter, possibly `$share/{group}/{filter}`.
    pub filter: String,
    /// Its options.
    pub options: SubscriptionOptions,
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribe {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// At least one filter.
    pub filters: Vec<SubscribeFilter>,
    /// Properties (5.0): at most one subscription identifier, user properties.
    pub properties: Properties,
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub packet_id: u16,
    /// One per filter: granted QoS (0, 1, 2) or a failure code (>= 0x80; 3.x sends 0x80).
    pub reason_codes: Vec<ReasonCode>,
    /// Properties (5.0).
    pub properties: Properties,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq)]
pub struct Unsubscribe {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// At least one filter.
    pub filters: Vec<String>,
    /// Properties (5.0).
    pub properties: Properties,
}

/// UNSUBACK.
#[derive(Debug, Clone, PartialEq)]
pub struct UnsubAck {
    /// Packet identifier of the UNSUBSCRIBE.
    pub packet_id: u16,
    /// One per filter (5.0 only; empty on 3.x, which has no payload).
    pub reason_codes: Vec<ReasonCode>,
    /// Properties (5.0).
    pub properties: Properties,
}

/// DISCONNECT.
#[derive(Debug, Clone, PartialEq)]
pub struct Disconnect {
    /// Reason code (5.0); `NORMAL_DISCONNECTION` on 3.x.
    pub reason: ReasonCode,
    /// Properties (5.0): session expiry, reason string, server reference.
    pub properties: Properties,
}

/// AUTH (5.0 enhanced authentication).
#[derive(Debug, Clone, PartialEq)]
pub struct Auth {
    /// Reason code: success, continue authentication, or re-authenticate.
    pub reason: ReasonCode,
    /// Properties: authentication method and data.
    pub properties: Properties,
}
