//! Errors of the codec: what went wrong decoding or encoding a packet, and which 5.0
//! reason code a server should answer with.

use crate::reason::ReasonCode;

/// Why bytes from the wire could not be decoded into a packet.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum DecodeError {
    /// Remaining length longer than four bytes (MQTT-1.5.5).
    #[error("malformed remaining length")]
    MalformedRemainingLength,
    /// A variable byte integer inside the packet is longer than four bytes.
    #[error("malformed variable byte integer")]
    MalformedVarInt,
    /// The packet exceeds the negotiated maximum packet size.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge {
        /// Total size of the packet (fixed header included).
        size: usize,
        /// The limit in force.
        max: usize,
    },
    /// Packet type 0, or AUTH on a 3.x connection.
    #[error("invalid packet type {0}")]
    InvalidPacketType(u8),
    /// Reserved fixed header flags carry the wrong value.
    #[error("invalid fixed header flags {flags:#06b} for packet type {packet_type}")]
    InvalidFlags {
        /// The packet type (upper nibble).
        packet_type: u8,
        /// The flags (lower nibble).
        flags: u8,
    },
    /// CONNECT with a protocol name or level this codec does not speak.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol {
        /// The protocol level byte.
        level: u8,
        /// The protocol name.
        name: String,
    },
    /// A string is not well-formed UTF-8 or contains U+0000 (MQTT-1.5.3-1/2).
    #[error("invalid UTF-8 string")]
    InvalidUtf8,
    /// QoS 3 (in PUBLISH, a will, or a subscription).
    #[error("invalid QoS {0}")]
    InvalidQoS(u8),
    /// A packet identifier of 0 where a non-zero one is required.
    #[error("packet identifier 0")]
    ZeroPacketId,
    /// A PUBLISH or will topic name that is empty or holds wildcards.
    #[error("invalid topic name")]
    InvalidTopicName,
    /// A SUBSCRIBE or UNSUBSCRIBE topic filter that breaks the wildcard rules.
    #[error("invalid topic filter")]
    InvalidTopicFilter,
    /// SUBSCRIBE or UNSUBSCRIBE without any filter (MQTT-3.8.3-3, MQTT-3.10.3-2).
    #[error("subscribe or unsubscribe without topic filters")]
    EmptySubscribe,
    /// A property identifier that does not exist, or a property value out of range.
    #[error("invalid property {id:#04x}")]
    InvalidProperty {
        /// The property identifier.
        id: u8,
    },
    /// A property that may appear once appears twice.
    #[error("duplicate property {id:#04x}")]
    DuplicateProperty {
        /// The property identifier.
        id: u8,
    },
    /// A property that the packet type may not carry.
    #[error("property {id:#04x} not allowed in {packet}")]
    PropertyNotAllowed {
        /// The property identifier.
        id: u8,
        /// The packet type name.
        packet: &'static str,
    },
    /// A reason code the packet type may not carry.
    #[error("invalid reason code {0:#04x}")]
    InvalidReasonCode(u8),
    /// The packet ends before a field it announces.
    #[error("packet truncated")]
    Truncated,
    /// Bytes left over after the last field of the packet.
    #[error("trailing bytes in packet")]
    TrailingBytes,
    /// Malformed in a way no other variant names.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Well-formed but forbidden by the protocol.
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
    /// A property value out of its allowed range (a zero Receive Maximum, Topic Alias or
    /// Subscription Identifier, a flag other than 0 or 1, ...).
    #[error("invalid value for property {id:#04x}")]
    InvalidPropertyValue {
        /// The property identifier.
        id: u8,
    },
}

impl DecodeError {
    /// The 5.0 reason code a server sends (CONNACK or DISCONNECT) before closing.
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            UnsupportedProtocol { .. } => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            InvalidTopicName => ReasonCode::TOPIC_NAME_INVALID,
            InvalidTopicFilter => ReasonCode::TOPIC_FILTER_INVALID,
            ZeroPacketId
            | DuplicateProperty { .. }
            | InvalidPropertyValue { .. }
            | ProtocolError(_)
            | EmptySubscribe => ReasonCode::PROTOCOL_ERROR,
            MalformedRemainingLength
            | MalformedVarInt
            | InvalidPacketType(_)
            | InvalidFlags { .. }
            | InvalidUtf8
            | InvalidQoS(_)
            | InvalidProperty { .. }
            // 2.2.2.2: a property identifier not valid for the packet type makes the
            // packet malformed, in every packet alike.
            | PropertyNotAllowed { .. }
            | InvalidReasonCode(_)
            | Truncated
            | TrailingBytes
            | Malformed(_) => ReasonCode::MALFORMED_PACKET,
        }
    }
}

/// Why a packet could not be encoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum EncodeError {
    /// The encoding would exceed the 268,435,455-byte remaining length limit.
    #[error("packet of {size} bytes exceeds the remaining length limit")]
    PacketTooLarge {
        /// Remaining length the packet would need.
        size: usize,
    },
    /// A string or binary field is longer than 65,535 bytes.
    #[error("string or binary field longer than 65535 bytes")]
    StringTooLong,
    /// QoS 1 or 2 PUBLISH without a packet identifier, or identifier 0.
    #[error("missing or zero packet identifier")]
    MissingPacketId,
    /// A PUBLISH with an empty topic and no 5.0 topic alias to stand in for it.
    #[error("PUBLISH without a topic name or topic alias")]
    EmptyTopic,
    /// A packet that does not exist in the target protocol (AUTH on 3.x).
    #[error("packet not available in this protocol version")]
    NotInProtocol,
    /// A subscription identifier or other variable byte integer above 268,435,455.
    #[error("variable byte integer out of range")]
    VarIntOutOfRange,
}
