//! 5.0 property blocks: which property each packet may carry, value checks, encoding.

use bytes::{BufMut, BytesMut};

use super::reader::Reader;
use super::varint::{self, MAX_VARINT};
use super::writer::{prefixed_len, put_prefixed, put_str};
use crate::error::{DecodeError, EncodeError};
use crate::properties::Properties;
use crate::topic::validate_topic_name;

/// The packet (or will) a property block belongs to, as a bit for the allowed-set table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx {
    bit: u16,
    name: &'static str,
}

#[allow(missing_docs)]
impl Ctx {
    pub(crate) const CONNECT: Ctx = Ctx {
        bit: 1,
        name: "CONNECT",
    };
    pub(crate) const CONNACK: Ctx = Ctx {
        bit: 1 << 1,
        name: "CONNACK",
    };
    pub(crate) const PUBLISH: Ctx = Ctx {
        bit: 1 << 2,
        name: "PUBLISH",
    };
    pub(crate) const WILL: Ctx = Ctx {
        bit: 1 << 3,
        name: "will",
    };
    pub(crate) const PUBACK: Ctx = Ctx {
        bit: 1 << 4,
        name: "PUBACK",
    };
    pub(crate) const PUBREC: Ctx = Ctx {
        bit: 1 << 4,
        name: "PUBREC",
    };
    pub(crate) const PUBREL: Ctx = Ctx {
        bit: 1 << 4,
        name: "PUBREL",
    };
    pub(crate) const PUBCOMP: Ctx = Ctx {
        bit: 1 << 4,
        name: "PUBCOMP",
    };
    pub(crate) const SUBSCRIBE: Ctx = Ctx {
        bit: 1 << 5,
        name: "SUBSCRIBE",
    };
    pub(crate) const SUBACK: Ctx = Ctx {
        bit: 1 << 6,
        name: "SUBACK",
    };
    pub(crate) const UNSUBSCRIBE: Ctx = Ctx {
        bit: 1 << 7,
        name: "UNSUBSCRIBE",
    };
    pub(crate) const UNSUBACK: Ctx = Ctx {
        bit: 1 << 8,
        name: "UNSUBACK",
    };
    pub(crate) const DISCONNECT: Ctx = Ctx {
        bit: 1 << 9,
        name: "DISCONNECT",
    };
    pub(crate) const AUTH: Ctx = Ctx {
        bit: 1 << 10,
        name: "AUTH",
    };
}

const CONNECT: u16 = Ctx::CONNECT.bit;
const CONNACK: u16 = Ctx::CONNACK.bit;
const PUBLISH: u16 = Ctx::PUBLISH.bit;
const WILL: u16 = Ctx::WILL.bit;
const PUB_RESPONSE: u16 = Ctx::PUBACK.bit;
const SUBSCRIBE: u16 = Ctx::SUBSCRIBE.bit;
const SUBACK: u16 = Ctx::SUBACK.bit;
const UNSUBACK: u16 = Ctx::UNSUBACK.bit;
const DISCONNECT: u16 = Ctx::DISCONNECT.bit;
const AUTH: u16 = Ctx::AUTH.bit;
const ALL: u16 = (1 << 11) - 1;

/// Where each property may appear: table 2-4 of the 5.0 specification. `None`: no such id.
fn allowed_in(id: u8) -> Option<u16> {
    Some(match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => PUBLISH | WILL,
        0x0B => PUBLISH | SUBSCRIBE,
        0x11 => CONNECT | CONNACK | DISCONNECT,
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => CONNACK,
        0x15 | 0x16 => CONNECT | CONNACK | AUTH,
        0x17 | 0x19 => CONNECT,
        0x18 => WILL,
        0x1C => CONNACK | DISCONNECT,
        0x1F => CONNACK | PUB_RESPONSE | SUBACK | UNSUBACK | DISCONNECT | AUTH,
        0x21 | 0x22 | 0x27 => CONNECT | CONNACK,
        0x23 => PUBLISH,
        0x26 => ALL,
        _ => return None,
    })
}

/// Store a single-valued property, refusing a second occurrence.
fn set_once<T>(slot: &mut Option<T>, id: u8, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty { id });
    }
    *slot = Some(value);
    Ok(())
}

/// A byte property that may only be 0 or 1.
fn flag(r: &mut Reader<'_>, id: u8) -> Result<u8, DecodeError> {
    match r.u8()? {
        v @ (0 | 1) => Ok(v),
        _ => Err(DecodeError::InvalidPropertyValue { id }),
    }
}

fn non_zero_u16(r: &mut Reader<'_>, id: u8) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::InvalidPropertyValue { id }),
        v => Ok(v),
    }
}

/// Read a property block (its length, then the properties) for the packet `ctx`.
pub(crate) fn decode(r: &mut Reader<'_>, ctx: Ctx) -> Result<Properties, DecodeError> {
    let len = r.varint()? as usize;
    let mut r = r.sub(len)?;
    let mut p = Properties::default();
    while !r.is_empty() {
        let raw_id = r.varint()?;
        let id = u8::try_from(raw_id).unwrap_or(u8::MAX);
        let allowed = allowed_in(id).ok_or(DecodeError::InvalidProperty { id })?;
        if allowed & ctx.bit == 0 {
            return Err(DecodeError::PropertyNotAllowed {
                id,
                packet: ctx.name,
            });
        }
        match id {
            0x01 => set_once(&mut p.payload_format_indicator, id, flag(&mut r, id)?)?,
            0x02 => set_once(&mut p.message_expiry_interval, id, r.u32()?)?,
            0x03 => set_once(&mut p.content_type, id, r.string()?)?,
            0x08 => {
                let topic = r.string()?;
                // MQTT-3.3.2-14: a response topic is a topic name, without wildcards.
                validate_topic_name(&topic)
                    .map_err(|_| DecodeError::InvalidPropertyValue { id })?;
                set_once(&mut p.response_topic, id, topic)?
            }
            0x09 => set_once(&mut p.correlation_data, id, r.binary()?)?,
            0x0B => {
                let sub_id = r.varint()?;
                if sub_id == 0 {
                    return Err(DecodeError::InvalidPropertyValue { id });
                }
                // SUBSCRIBE carries at most one (MQTT-3.8.2.1.2); PUBLISH one per match.
                if ctx.bit == SUBSCRIBE && !p.subscription_identifiers.is_empty() {
                    return Err(DecodeError::DuplicateProperty { id });
                }
                p.subscription_identifiers.push(sub_id);
            }
            0x11 => set_once(&mut p.session_expiry_interval, id, r.u32()?)?,
            0x12 => set_once(&mut p.assigned_client_identifier, id, r.string()?)?,
            0x13 => set_once(&mut p.server_keep_alive, id, r.u16()?)?,
            0x15 => set_once(&mut p.authentication_method, id, r.string()?)?,
            0x16 => set_once(&mut p.authentication_data, id, r.binary()?)?,
            0x17 => set_once(&mut p.request_problem_information, id, flag(&mut r, id)?)?,
            0x18 => set_once(&mut p.will_delay_interval, id, r.u32()?)?,
            0x19 => set_once(&mut p.request_response_information, id, flag(&mut r, id)?)?,
            0x1A => set_once(&mut p.response_information, id, r.string()?)?,
            0x1C => set_once(&mut p.server_reference, id, r.string()?)?,
            0x1F => set_once(&mut p.reason_string, id, r.string()?)?,
            0x21 => set_once(&mut p.receive_maximum, id, non_zero_u16(&mut r, id)?)?,
            0x22 => set_once(&mut p.topic_alias_maximum, id, r.u16()?)?,
            0x23 => set_once(&mut p.topic_alias, id, non_zero_u16(&mut r, id)?)?,
            0x24 => set_once(&mut p.maximum_qos, id, flag(&mut r, id)?)?,
            0x25 => set_once(&mut p.retain_available, id, flag(&mut r, id)?)?,
            0x26 => {
                let name = r.string()?;
                let value = r.string()?;
                p.user_properties.push((name, value));
            }
            0x27 => {
                let max = r.u32()?;
                if max == 0 {
                    return Err(DecodeError::InvalidPropertyValue { id });
                }
                set_once(&mut p.maximum_packet_size, id, max)?
            }
            0x28 => set_once(
                &mut p.wildcard_subscription_available,
                id,
                flag(&mut r, id)?,
            )?,
            0x29 => set_once(
                &mut p.subscription_identifier_available,
                id,
                flag(&mut r, id)?,
            )?,
            0x2A => set_once(&mut p.shared_subscription_available, id, flag(&mut r, id)?)?,
            _ => return Err(DecodeError::InvalidProperty { id }),
        }
    }
    Ok(p)
}

/// True when no property is set: a field-by-field check, far cheaper on the per-message
/// path than comparing with a freshly built default. The exhaustive pattern makes a new
/// field a compile error here rather than a silently dropped property.
#[inline]
pub(crate) fn is_empty(p: &Properties) -> bool {
    let Properties {
        payload_format_indicator,
        message_expiry_interval,
        content_type,
        response_topic,
        correlation_data,
        subscription_identifiers,
        session_expiry_interval,
        assigned_client_identifier,
        server_keep_alive,
        authentication_method,
        authentication_data,
        request_problem_information,
        will_delay_interval,
        request_response_information,
        response_information,
        server_reference,
        reason_string,
        receive_maximum,
        topic_alias_maximum,
        topic_alias,
        maximum_qos,
        retain_available,
        user_properties,
        maximum_packet_size,
        wildcard_subscription_available,
        subscription_identifier_available,
        shared_subscription_available,
    } = p;
    payload_format_indicator.is_none()
        && message_expiry_interval.is_none()
        && content_type.is_none()
        && response_topic.is_none()
        && correlation_data.is_none()
        && subscription_identifiers.is_empty()
        && session_expiry_interval.is_none()
        && assigned_client_identifier.is_none()
        && server_keep_alive.is_none()
        && authentication_method.is_none()
        && authentication_data.is_none()
        && request_problem_information.is_none()
        && will_delay_interval.is_none()
        && request_response_information.is_none()
        && response_information.is_none()
        && server_reference.is_none()
        && reason_string.is_none()
        && receive_maximum.is_none()
        && topic_alias_maximum.is_none()
        && topic_alias.is_none()
        && maximum_qos.is_none()
        && retain_available.is_none()
        && user_properties.is_empty()
        && maximum_packet_size.is_none()
        && wildcard_subscription_available.is_none()
        && subscription_identifier_available.is_none()
        && shared_subscription_available.is_none()
}

fn opt_len<T>(v: &Option<T>, size: impl Fn(&T) -> usize) -> usize {
    v.as_ref().map_or(0, |v| 1 + size(v))
}

/// Bytes of the properties themselves, without the length prefix.
pub(crate) fn body_len(p: &Properties) -> usize {
    if is_empty(p) {
        return 0;
    }
    let s = |v: &String| prefixed_len(v.as_bytes());
    let b = |v: &bytes::Bytes| prefixed_len(v);
    opt_len(&p.payload_format_indicator, |_| 1)
        + opt_len(&p.message_expiry_interval, |_| 4)
        + opt_len(&p.content_type, s)
        + opt_len(&p.response_topic, s)
        + opt_len(&p.correlation_data, b)
        + p.subscription_identifiers
            .iter()
            .map(|&v| 1 + varint::len(v as usize))
            .sum::<usize>()
        + opt_len(&p.session_expiry_interval, |_| 4)
        + opt_len(&p.assigned_client_identifier, s)
        + opt_len(&p.server_keep_alive, |_| 2)
        + opt_len(&p.authentication_method, s)
        + opt_len(&p.authentication_data, b)
        + opt_len(&p.request_problem_information, |_| 1)
        + opt_len(&p.will_delay_interval, |_| 4)
        + opt_len(&p.request_response_information, |_| 1)
        + opt_len(&p.response_information, s)
        + opt_len(&p.server_reference, s)
        + opt_len(&p.reason_string, s)
        + opt_len(&p.receive_maximum, |_| 2)
        + opt_len(&p.topic_alias_maximum, |_| 2)
        + opt_len(&p.topic_alias, |_| 2)
        + opt_len(&p.maximum_qos, |_| 1)
        + opt_len(&p.retain_available, |_| 1)
        + p.user_properties
            .iter()
            .map(|(k, v)| 1 + s(k) + s(v))
            .sum::<usize>()
        + opt_len(&p.maximum_packet_size, |_| 4)
        + opt_len(&p.wildcard_subscription_available, |_| 1)
        + opt_len(&p.subscription_identifier_available, |_| 1)
        + opt_len(&p.shared_subscription_available, |_| 1)
}

/// Size of the whole block: length prefix plus properties.
pub(crate) fn block_len(p: &Properties) -> usize {
    let n = body_len(p);
    varint::len(n) + n
}

fn put_u8(buf: &mut BytesMut, id: u8, v: Option<u8>) {
    if let Some(v) = v {
        buf.put_u8(id);
        buf.put_u8(v);
    }
}

fn put_u16(buf: &mut BytesMut, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        buf.put_u8(id);
        buf.put_u16(v);
    }
}

fn put_u32(buf: &mut BytesMut, id: u8, v: Option<u32>) {
    if let Some(v) = v {
        buf.put_u8(id);
        buf.put_u32(v);
    }
}

fn put_string(buf: &mut BytesMut, id: u8, v: &Option<String>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        buf.put_u8(id);
        put_str(buf, v)?;
    }
    Ok(())
}

fn put_binary(buf: &mut BytesMut, id: u8, v: &Option<bytes::Bytes>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        buf.put_u8(id);
        put_prefixed(buf, v)?;
    }
    Ok(())
}

/// Append the property block (length prefix, then every property that is set).
///
/// The encoder writes what is set; keeping a packet to its allowed properties is the
/// caller's job (the decoder on the other side enforces it).
pub(crate) fn write(buf: &mut BytesMut, p: &Properties) -> Result<(), EncodeError> {
    let n = body_len(p);
    if n > MAX_VARINT as usize {
        return Err(EncodeError::PacketTooLarge { size: n });
    }
    varint::write(buf, n as u32);
    if n == 0 {
        return Ok(());
    }
    put_u8(buf, 0x01, p.payload_format_indicator);
    put_u32(buf, 0x02, p.message_expiry_interval);
    put_string(buf, 0x03, &p.content_type)?;
    put_string(buf, 0x08, &p.response_topic)?;
    put_binary(buf, 0x09, &p.correlation_data)?;
    for &sub_id in &p.subscription_identifiers {
        if sub_id > MAX_VARINT {
            return Err(EncodeError::VarIntOutOfRange);
        }
        buf.put_u8(0x0B);
        varint::write(buf, sub_id);
    }
    put_u32(buf, 0x11, p.session_expiry_interval);
    put_string(buf, 0x12, &p.assigned_client_identifier)?;
    put_u16(buf, 0x13, p.server_keep_alive);
    put_string(buf, 0x15, &p.authentication_method)?;
    put_binary(buf, 0x16, &p.authentication_data)?;
    put_u8(buf, 0x17, p.request_problem_information);
    put_u32(buf, 0x18, p.will_delay_interval);
    put_u8(buf, 0x19, p.request_response_information);
    put_string(buf, 0x1A, &p.response_information)?;
    put_string(buf, 0x1C, &p.server_reference)?;
    put_string(buf, 0x1F, &p.reason_string)?;
    put_u16(buf, 0x21, p.receive_maximum);
    put_u16(buf, 0x22, p.topic_alias_maximum);
    put_u16(buf, 0x23, p.topic_alias);
    put_u8(buf, 0x24, p.maximum_qos);
    put_u8(buf, 0x25, p.retain_available);
    for (k, v) in &p.user_properties {
        buf.put_u8(0x26);
        put_str(buf, k)?;
        put_str(buf, v)?;
    }
    put_u32(buf, 0x27, p.maximum_packet_size);
    put_u8(buf, 0x28, p.wildcard_subscription_available);
    put_u8(buf, 0x29, p.subscription_identifier_available);
    put_u8(buf, 0x2A, p.shared_subscription_available);
    Ok(())
}
