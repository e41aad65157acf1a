//! SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK.

use bytes::{BufMut, Bytes, BytesMut};

use super::properties::{self, Ctx};
use super::reader::Reader;
use super::reason_codes::{self, Kind};
use super::writer::{prefixed_len, put_str};
use crate::error::{DecodeError, EncodeError};
use crate::packet::{
    Protocol, QoS, RetainHandling, SubAck, Subscribe, SubscribeFilter, SubscriptionOptions,
    UnsubAck, Unsubscribe,
};
use crate::properties::Properties;
use crate::reason::ReasonCode;
use crate::topic::{parse_shared, validate_topic_filter};

fn decode_filter(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let filter = r.str()?;
    validate_topic_filter(filter).map_err(|_| DecodeError::InvalidTopicFilter)?;
    Ok(filter.to_owned())
}

fn decode_options(byte: u8, protocol: Protocol) -> Result<SubscriptionOptions, DecodeError> {
    // MQTT-3.8.3-4 (3.1.1): the upper six bits are reserved; 5.0 MQTT-3.8.3-5: bits 6-7.
    let reserved = if protocol.is_v5() { 0xC0 } else { 0xFC };
    if byte & reserved != 0 {
        return Err(DecodeError::Malformed(
            "reserved subscription option bits set",
        ));
    }
    let qos_bits = byte & 0x03;
    let qos = QoS::from_u8(qos_bits).ok_or(DecodeError::InvalidQoS(qos_bits))?;
    let retain_handling = match (byte >> 4) & 0x03 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::Malformed("retain handling 3")),
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: byte & 0x04 != 0,
        retain_as_published: byte & 0x08 != 0,
        retain_handling,
    })
}

fn options_byte(o: &SubscriptionOptions, protocol: Protocol) -> u8 {
    let mut b = o.qos as u8;
    if protocol.is_v5() {
        b |= u8::from(o.no_local) << 2;
        b |= u8::from(o.retain_as_published) << 3;
        b |= (o.retain_handling as u8) << 4;
    }
    b
}

fn props_or_default(
    r: &mut Reader<'_>,
    protocol: Protocol,
    ctx: Ctx,
) -> Result<Properties, DecodeError> {
    if protocol.is_v5() {
        properties::decode(r, ctx)
    } else {
        Ok(Properties::default())
    }
}

fn props_len(p: &Properties, protocol: Protocol) -> usize {
    if protocol.is_v5() {
        properties::block_len(p)
    } else {
        0
    }
}

fn write_props(p: &Properties, protocol: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
    if protocol.is_v5() {
        properties::write(buf, p)
    } else {
        Ok(())
    }
}

fn check_id(packet_id: u16) -> Result<(), EncodeError> {
    if packet_id == 0 {
        Err(EncodeError::MissingPacketId)
    } else {
        Ok(())
    }
}

/// Decode a SUBSCRIBE body.
pub(crate) fn decode_subscribe(body: &Bytes, protocol: Protocol) -> Result<Subscribe, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.packet_id()?;
    let properties = props_or_default(&mut r, protocol, Ctx::SUBSCRIBE)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = decode_filter(&mut r)?;
        let options = decode_options(r.u8()?, protocol)?;
        // 5.0 MQTT-3.8.3-4: No Local on a shared subscription is a protocol error.
        if options.no_local && parse_shared(&filter).is_some() {
            return Err(DecodeError::ProtocolError(
                "no local on a shared subscription",
            ));
        }
        filters.push(SubscribeFilter { filter, options });
    }
    if filters.is_empty() {
        return Err(DecodeError::EmptySubscribe);
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

/// Body size of a SUBSCRIBE.
pub(crate) fn subscribe_len(s: &Subscribe, protocol: Protocol) -> usize {
    2 + props_len(&s.properties, protocol)
        + s.filters
            .iter()
            .map(|f| prefixed_len(f.filter.as_bytes()) + 1)
            .sum::<usize>()
}

/// Append a SUBSCRIBE body; 3.x keeps only the QoS of each filter's options.
pub(crate) fn write_subscribe(
    s: &Subscribe,
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_id(s.packet_id)?;
    buf.put_u16(s.packet_id);
    write_props(&s.properties, protocol, buf)?;
    for f in &s.filters {
        put_str(buf, &f.filter)?;
        buf.put_u8(options_byte(&f.options, protocol));
    }
    Ok(())
}

/// Decode a SUBACK body.
pub(crate) fn decode_suback(body: &Bytes, protocol: Protocol) -> Result<SubAck, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.packet_id()?;
    let properties = props_or_default(&mut r, protocol, Ctx::SUBACK)?;
    let mut reason_codes = Vec::new();
    while !r.is_empty() {
        let code = r.u8()?;
        let reason = if protocol.is_v5() {
            reason_codes::check(Kind::SubAck, code)?
        } else if matches!(code, 0..=2 | 0x80) {
            ReasonCode(code)
        } else {
            return Err(DecodeError::InvalidReasonCode(code));
        };
        reason_codes.push(reason);
    }
    if reason_codes.is_empty() {
        return Err(DecodeError::ProtocolError("SUBACK without reason codes"));
    }
    Ok(SubAck {
        packet_id,
        reason_codes,
        properties,
    })
}

/// Body size of a SUBACK.
pub(crate) fn suback_len(s: &SubAck, protocol: Protocol) -> usize {
    2 + props_len(&s.properties, protocol) + s.reason_codes.len()
}

/// Append a SUBACK body; 3.x reports every failure as 0x80.
pub(crate) fn write_suback(
    s: &SubAck,
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_id(s.packet_id)?;
    buf.put_u16(s.packet_id);
    write_props(&s.properties, protocol, buf)?;
    for &code in &s.reason_codes {
        let byte = if protocol.is_v5() {
            code.0
        } else {
            reason_codes::suback_return_code(code)
        };
        buf.put_u8(byte);
    }
    Ok(())
}

/// Decode an UNSUBSCRIBE body.
pub(crate) fn decode_unsubscribe(
    body: &Bytes,
    protocol: Protocol,
) -> Result<Unsubscribe, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.packet_id()?;
    let properties = props_or_default(&mut r, protocol, Ctx::UNSUBSCRIBE)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(decode_filter(&mut r)?);
    }
    // MQTT-3.10.3-2: at least one topic filter.
    if filters.is_empty() {
        return Err(DecodeError::EmptySubscribe);
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

/// Body size of an UNSUBSCRIBE.
pub(crate) fn unsubscribe_len(u: &Unsubscribe, protocol: Protocol) -> usize {
    2 + props_len(&u.properties, protocol)
        + u.filters
            .iter()
            .map(|f| prefixed_len(f.as_bytes()))
            .sum::<usize>()
}

/// Append an UNSUBSCRIBE body.
pub(crate) fn write_unsubscribe(
    u: &Unsubscribe,
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_id(u.packet_id)?;
    buf.put_u16(u.packet_id);
    write_props(&u.properties, protocol, buf)?;
    for f in &u.filters {
        put_str(buf, f)?;
    }
    Ok(())
}

/// Decode an UNSUBACK body (3.x: the packet identifier only).
pub(crate) fn decode_unsuback(body: &Bytes, protocol: Protocol) -> Result<UnsubAck, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.packet_id()?;
    let properties = props_or_default(&mut r, protocol, Ctx::UNSUBACK)?;
    let mut reason_codes = Vec::new();
    if protocol.is_v5() {
        while !r.is_empty() {
            reason_codes.push(reason_codes::check(Kind::UnsubAck, r.u8()?)?);
        }
        if reason_codes.is_empty() {
            return Err(DecodeError::ProtocolError("UNSUBACK without reason codes"));
        }
    }
    r.finish()?;
    Ok(UnsubAck {
        packet_id,
        reason_codes,
        properties,
    })
}

/// Body size of an UNSUBACK.
pub(crate) fn unsuback_len(u: &UnsubAck, protocol: Protocol) -> usize {
    if protocol.is_v5() {
        2 + properties::block_len(&u.properties) + u.reason_codes.len()
    } else {
        2
    }
}

/// Append an UNSUBACK body.
pub(crate) fn write_unsuback(
    u: &UnsubAck,
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_id(u.packet_id)?;
    buf.put_u16(u.packet_id);
    if protocol.is_v5() {
        properties::write(buf, &u.properties)?;
        buf.extend(u.reason_codes.iter().map(|c| c.0));
    }
    Ok(())
}
