//! The codec: bytes to packets and back for MQTT 3.1, 3.1.1 and 5.0.
//!
//! [`decode`] takes one packet off the front of a receive buffer, checking every rule of
//! the specifications that can be checked on a single packet; [`encode`] appends a packet,
//! dropping what the target version cannot carry. Both are sans-I/O.

mod connect;
mod control;
mod properties;
mod publish;
mod reader;
mod reason_codes;
mod subscribe;
mod varint;
mod writer;

#[cfg(test)]
mod tests;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::packet::{Packet, Protocol, Publish};

pub use reason_codes::{connack_reason, connack_return_code, suback_return_code};
pub use varint::MAX_VARINT;

/// Largest remaining length a packet can announce (four-byte variable byte integer).
pub const MAX_REMAINING_LENGTH: usize = MAX_VARINT as usize;

/// Check the first byte of the fixed header: packet type and its reserved flags.
fn check_first_byte(first: u8, protocol: Protocol) -> Result<(), DecodeError> {
    let packet_type = first >> 4;
    let flags = first & 0x0F;
    // MQTT 3.1 has no rule on these bits outside PUBLISH (it calls them "not used") and
    // old 3.1 firmware sets them loosely; Mosquitto ignores them there, and so do we.
    let v3_1 = protocol == Protocol::V3_1;
    let ok = match packet_type {
        0 => return Err(DecodeError::InvalidPacketType(0)),
        3 => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return Err(DecodeError::InvalidQoS(3));
            }
            // MQTT-3.3.1-2: DUP must be 0 on QoS 0.
            v3_1 || !(qos == 0 && flags & 0x08 != 0)
        }
        15 if !protocol.is_v5() => return Err(DecodeError::InvalidPacketType(15)),
        _ if v3_1 => true,
        // MQTT-3.6.1-1, MQTT-3.8.1-1, MQTT-3.10.1-1 (MQTT-2.2.2-2 for the rest).
        6 | 8 | 10 => flags == 0x02,
        _ => flags == 0,
    };
    if ok {
        Ok(())
    } else {
        Err(DecodeError::InvalidFlags { packet_type, flags })
    }
}

/// Decode one packet from the front of `buf`.
///
/// `Ok(None)` while the packet is incomplete, leaving `buf` untouched; a packet whose
/// announced size already exceeds `max_packet_size` (fixed header included) fails at once.
/// On success the packet's bytes are consumed, and topic, payload and binary fields share
/// them without copying. `protocol` is the connection's negotiated version; CONNECT is
/// decoded by the protocol name and level inside it. Nothing is allocated on the strength
/// of a length read from the wire before the bytes it announces are in `buf`.
///
/// After an error the connection is beyond repair (the spec closes it): the offending
/// packet may or may not have been consumed, so `buf` should be discarded.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(first, protocol)?;
    let (remaining, len_bytes) = match varint::read(&buf[1..]) {
        Ok(Some(v)) => v,
        Ok(None) => return Ok(None),
        Err(_) => return Err(DecodeError::MalformedRemainingLength),
    };
    let header_len = 1 + len_bytes;
    let total = header_len + remaining as usize;
    if total > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(header_len);
    if first >> 4 == 3 {
        return publish::decode_publish(first & 0x0F, frame, protocol);
    }
    decode_body(first, &frame.freeze(), protocol).map(Some)
}

fn decode_body(first: u8, body: &Bytes, protocol: Protocol) -> Result<Packet, DecodeError> {
    let packet_type = first >> 4;
    Ok(match packet_type {
        1 => Packet::Connect(Box::new(connect::decode_connect(body)?)),
        2 => Packet::ConnAck(connect::decode_connack(body, protocol)?),
        4 => Packet::PubAck(publish::decode_response(4, body, protocol)?),
        5 => Packet::PubRec(publish::decode_response(5, body, protocol)?),
        6 => Packet::PubRel(publish::decode_response(6, body, protocol)?),
        7 => Packet::PubComp(publish::decode_response(7, body, protocol)?),
        8 => Packet::Subscribe(subscribe::decode_subscribe(body, protocol)?),
        9 => Packet::SubAck(subscribe::decode_suback(body, protocol)?),
        10 => Packet::Unsubscribe(subscribe::decode_unsubscribe(body, protocol)?),
        11 => Packet::UnsubAck(subscribe::decode_unsuback(body, protocol)?),
        12 | 13 => {
            if !body.is_empty() {
                return Err(DecodeError::TrailingBytes);
            }
            if packet_type == 12 {
                Packet::PingReq
            } else {
                Packet::PingResp
            }
        }
        14 => Packet::Disconnect(control::decode_disconnect(body, protocol)?),
        15 => Packet::Auth(control::decode_auth(body)?),
        other => return Err(DecodeError::InvalidPacketType(other)),
    })
}

/// First byte of the fixed header and body size of a non-PUBLISH packet.
fn header(packet: &Packet, protocol: Protocol) -> Result<(u8, usize), EncodeError> {
    Ok(match packet {
        Packet::Connect(c) => (0x10, connect::connect_len(c)),
        Packet::ConnAck(c) => (0x20, connect::connack_len(c, protocol)),
        Packet::Publish(p) => {
            publish::check_publish(p, protocol)?;
            (
                publish::publish_first_byte(p),
                publish::publish_len(p, protocol),
            )
        }
        Packet::PubAck(r) => (0x40, publish::response_len(r, protocol)),
        Packet::PubRec(r) => (0x50, publish::response_len(r, protocol)),
        Packet::PubRel(r) => (0x62, publish::response_len(r, protocol)),
        Packet::PubComp(r) => (0x70, publish::response_len(r, protocol)),
        Packet::Subscribe(s) => (0x82, subscribe::subscribe_len(s, protocol)),
        Packet::SubAck(s) => (0x90, subscribe::suback_len(s, protocol)),
        Packet::Unsubscribe(u) => (0xA2, subscribe::unsubscribe_len(u, protocol)),
        Packet::UnsubAck(u) => (0xB0, subscribe::unsuback_len(u, protocol)),
        Packet::PingReq => (0xC0, 0),
        Packet::PingResp => (0xD0, 0),
        Packet::Disconnect(d) => (0xE0, control::disconnect_len(d, protocol)),
        Packet::Auth(a) if protocol.is_v5() => (0xF0, control::auth_len(a)),
        Packet::Auth(_) => return Err(EncodeError::NotInProtocol),
    })
}

fn write_body(packet: &Packet, protocol: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(c) => connect::write_connect(c, buf),
        Packet::ConnAck(c) => connect::write_connack(c, protocol, buf),
        Packet::Publish(p) => publish::write_publish(p, protocol, buf),
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            publish::write_response(r, protocol, buf)
        }
        Packet::Subscribe(s) => subscribe::write_subscribe(s, protocol, buf),
        Packet::SubAck(s) => subscribe::write_suback(s, protocol, buf),
        Packet::Unsubscribe(u) => subscribe::write_unsubscribe(u, protocol, buf),
        Packet::UnsubAck(u) => subscribe::write_unsuback(u, protocol, buf),
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(d) => control::write_disconnect(d, protocol, buf),
        Packet::Auth(a) => control::write_auth(a, buf),
    }
}

/// Write the fixed header, then the body; on failure `buf` is left as it was.
fn write_framed(
    buf: &mut BytesMut,
    first: u8,
    body_len: usize,
    body: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    if body_len > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge { size: body_len });
    }
    let start = buf.len();
    buf.reserve(1 + varint::len(body_len) + body_len);
    buf.put_u8(first);
    varint::write(buf, body_len as u32);
    if let Err(e) = body(buf) {
        buf.truncate(start);
        return Err(e);
    }
    debug_assert_eq!(buf.len() - start, 1 + varint::len(body_len) + body_len);
    Ok(())
}

/// Append the encoding of `packet` for `protocol` to `buf`.
///
/// 3.x drops properties and maps reason codes to its return codes. CONNECT is encoded for
/// the version in its own `protocol` field. On error nothing is appended.
pub fn encode(packet: &Packet, protocol: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
    if let Packet::Publish(p) = packet {
        return encode_publish(p, protocol, buf);
    }
    let (first, body_len) = header(packet, protocol)?;
    write_framed(buf, first, body_len, |buf| {
        write_body(packet, protocol, buf)
    })
}

/// Total encoded size (fixed header included) of `packet` for `protocol`: exactly what
/// [`encode`] appends, and 0 for a packet it refuses outright (AUTH on 3.x, a QoS 1
/// PUBLISH without packet identifier).
pub fn encoded_len(packet: &Packet, protocol: Protocol) -> usize {
    match header(packet, protocol) {
        Ok((_, body_len)) => 1 + varint::len(body_len) + body_len,
        Err(_) => 0,
    }
}

/// Encode a PUBLISH without building a [`Packet`], with a single reservation.
pub fn encode_publish(
    publish: &Publish,
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    publish::check_publish(publish, protocol)?;
    let first = publish::publish_first_byte(publish);
    let body_len = publish::publish_len(publish, protocol);
    write_framed(buf, first, body_len, |buf| {
        publish::write_publish(publish, protocol, buf)
    })
}
