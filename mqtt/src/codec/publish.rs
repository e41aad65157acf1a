//! PUBLISH and its acknowledgements (PUBACK, PUBREC, PUBREL, PUBCOMP).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use super::properties::{self, Ctx};
use super::reader::Reader;
use super::reason_codes::{self, Kind};
use super::varint;
use super::writer::put_str;
use crate::error::{DecodeError, EncodeError};
use crate::packet::{Packet, Protocol, PubResponse, Publish, QoS};
use crate::properties::Properties;
use crate::reason::ReasonCode;

/// Is a topic name free of wildcards and U+0000 (MQTT-3.3.2-2, MQTT-1.5.3-2)?
#[inline]
fn topic_chars_ok(topic: &str) -> bool {
    // Three word-at-a-time memchr scans beat one byte loop with three comparisons.
    let bytes = topic.as_bytes();
    !(bytes.contains(&b'+') || bytes.contains(&b'#') || bytes.contains(&0))
}

/// Take `n` bytes off the front of `frame`, or fail as truncated.
#[inline]
fn split(frame: &mut BytesMut, n: usize) -> Result<BytesMut, DecodeError> {
    if frame.len() < n {
        return Err(DecodeError::Truncated);
    }
    Ok(frame.split_to(n))
}

/// Take a big-endian u16 off the front of `frame`.
#[inline]
fn take_u16(frame: &mut BytesMut) -> Result<u16, DecodeError> {
    let [a, b, ..] = frame[..] else {
        return Err(DecodeError::Truncated);
    };
    frame.advance(2);
    Ok(u16::from_be_bytes([a, b]))
}

/// Decode a PUBLISH body into the packet `decode` returns; `flags` are the fixed
/// header's low nibble, already checked.
///
/// The hot path of the broker: it works on the owned frame and splits topic and payload
/// off it, so each costs one reference count and no copy. Inlined so the 400-byte
/// packet is built where the caller wants it instead of being copied through wrappers.
#[inline(always)]
pub(crate) fn decode_publish(
    flags: u8,
    mut frame: BytesMut,
    protocol: Protocol,
) -> Result<Option<Packet>, DecodeError> {
    let qos_bits = (flags >> 1) & 0x03;
    let qos = QoS::from_u8(qos_bits).ok_or(DecodeError::InvalidQoS(qos_bits))?;
    let topic_len = usize::from(take_u16(&mut frame)?);
    let topic = split(&mut frame, topic_len)?.freeze();
    let topic = ByteString::try_from(topic).map_err(|_| DecodeError::InvalidUtf8)?;
    if !topic_chars_ok(&topic) {
        // MQTT-1.5.3-2: U+0000 is a UTF-8 error; wildcards make the name invalid.
        return Err(if topic.as_bytes().contains(&0) {
            DecodeError::InvalidUtf8
        } else {
            DecodeError::InvalidTopicName
        });
    }
    let packet_id = match qos {
        QoS::AtMostOnce => None,
        _ => match take_u16(&mut frame)? {
            0 => return Err(DecodeError::ZeroPacketId),
            id => Some(id),
        },
    };
    // Most messages carry no properties: then the defaults are written straight into the
    // returned packet, and only a real property block is decoded and moved in.
    let properties = if !protocol.is_v5() {
        None
    } else if frame.first() == Some(&0) {
        frame.advance(1);
        None
    } else {
        let (len, len_bytes) = match varint::read(&frame) {
            Ok(Some(v)) => v,
            Ok(None) => return Err(DecodeError::Truncated),
            Err(_) => return Err(DecodeError::MalformedVarInt),
        };
        let block = split(&mut frame, len_bytes + len as usize)?.freeze();
        Some(properties::decode(&mut Reader::new(&block), Ctx::PUBLISH)?)
    };
    // MQTT-3.3.2-1 / 5.0 MQTT-3.3.2-1: only a 5.0 topic alias may stand in for the name.
    if topic.is_empty() && properties.as_ref().is_none_or(|p| p.topic_alias.is_none()) {
        return Err(if protocol.is_v5() {
            // 5.0 section 3.3.2.3.4 calls this a Protocol Error (0x82, as Mosquitto
            // answers), not a bad topic name.
            DecodeError::ProtocolError("empty topic name without a topic alias")
        } else {
            DecodeError::InvalidTopicName
        });
    }
    let payload = frame.freeze();
    // Built in the caller's return type: wrapping afterwards copies 400 bytes per layer.
    let mut packet = Ok(Some(Packet::Publish(Publish {
        // 3.1 lets a QoS 0 PUBLISH arrive with DUP set; it means nothing there.
        dup: flags & 0x08 != 0 && qos != QoS::AtMostOnce,
        qos,
        retain: flags & 0x01 != 0,
        topic,
        packet_id,
        properties: Properties::default(),
        payload,
    })));
    if let (Some(props), Ok(Some(Packet::Publish(publish)))) = (properties, &mut packet) {
        publish.properties = props;
    }
    packet
}

/// The fixed header's first byte for a PUBLISH (DUP is never set on QoS 0, MQTT-3.3.1-2).
#[inline]
pub(crate) fn publish_first_byte(p: &Publish) -> u8 {
    let mut b = 0x30 | ((p.qos as u8) << 1);
    if p.dup && p.qos != QoS::AtMostOnce {
        b |= 0x08;
    }
    if p.retain {
        b |= 0x01;
    }
    b
}

/// Body size of a PUBLISH.
#[inline]
pub(crate) fn publish_len(p: &Publish, protocol: Protocol) -> usize {
    let mut n = 2 + p.topic.len() + p.payload.len();
    if p.qos != QoS::AtMostOnce {
        n += 2;
    }
    if protocol.is_v5() {
        n += properties::block_len(&p.properties);
    }
    n
}

/// Check what the encoder needs of a PUBLISH before writing anything.
#[inline]
pub(crate) fn check_publish(p: &Publish, protocol: Protocol) -> Result<(), EncodeError> {
    if p.qos != QoS::AtMostOnce && matches!(p.packet_id, None | Some(0)) {
        return Err(EncodeError::MissingPacketId);
    }
    if p.topic.is_empty() && !(protocol.is_v5() && p.properties.topic_alias.is_some()) {
        return Err(EncodeError::EmptyTopic);
    }
    Ok(())
}

/// Append a PUBLISH body.
#[inline]
pub(crate) fn write_publish(
    p: &Publish,
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    put_str(buf, &p.topic)?;
    if p.qos != QoS::AtMostOnce {
        buf.put_u16(p.packet_id.unwrap_or_default());
    }
    if protocol.is_v5() {
        if properties::is_empty(&p.properties) {
            buf.put_u8(0);
        } else {
            properties::write(buf, &p.properties)?;
        }
    }
    buf.put_slice(&p.payload);
    Ok(())
}

fn response_kind(packet_type: u8) -> (Kind, Ctx) {
    match packet_type {
        4 => (Kind::PubAckRec, Ctx::PUBACK),
        5 => (Kind::PubAckRec, Ctx::PUBREC),
        6 => (Kind::PubRelComp, Ctx::PUBREL),
        _ => (Kind::PubRelComp, Ctx::PUBCOMP),
    }
}

/// Decode a PUBACK, PUBREC, PUBREL or PUBCOMP body (`packet_type` 4 to 7).
pub(crate) fn decode_response(
    packet_type: u8,
    body: &Bytes,
    protocol: Protocol,
) -> Result<PubResponse, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.packet_id()?;
    let mut response = PubResponse::new(packet_id);
    // 5.0 section 3.4.2.1: reason code and properties may be left out (remaining length 2
    // or 3); 3.x has only the packet identifier.
    if protocol.is_v5() && !r.is_empty() {
        let (kind, ctx) = response_kind(packet_type);
        response.reason = reason_codes::check(kind, r.u8()?)?;
        if !r.is_empty() {
            response.properties = properties::decode(&mut r, ctx)?;
        }
    }
    r.finish()?;
    Ok(response)
}

/// Body size of a publish response, using the short forms 5.0 allows.
pub(crate) fn response_len(p: &PubResponse, protocol: Protocol) -> usize {
    if !protocol.is_v5() {
        2
    } else if !properties::is_empty(&p.properties) {
        3 + properties::block_len(&p.properties)
    } else if p.reason != ReasonCode::SUCCESS {
        3
    } else {
        2
    }
}

/// Append a publish response body.
pub(crate) fn write_response(
    p: &PubResponse,
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    if p.packet_id == 0 {
        return Err(EncodeError::MissingPacketId);
    }
    buf.put_u16(p.packet_id);
    if !protocol.is_v5() {
        return Ok(());
    }
    if !properties::is_empty(&p.properties) {
        buf.put_u8(p.reason.0);
        properties::write(buf, &p.properties)?;
    } else if p.reason != ReasonCode::SUCCESS {
        buf.put_u8(p.reason.0);
    }
    Ok(())
}
