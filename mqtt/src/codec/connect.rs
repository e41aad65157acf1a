//! CONNECT and CONNACK.

use bytes::{BufMut, Bytes, BytesMut};

use super::properties::{self, Ctx};
use super::reader::Reader;
use super::reason_codes::{self, Kind};
use super::writer::{prefixed_len, put_prefixed, put_str};
use crate::error::{DecodeError, EncodeError};
use crate::packet::{ConnAck, Connect, Protocol, QoS, Will};
use crate::properties::Properties;
use crate::topic::validate_topic_name;

const FLAG_RESERVED: u8 = 0x01;
const FLAG_CLEAN: u8 = 0x02;
const FLAG_WILL: u8 = 0x04;
const FLAG_WILL_QOS: u8 = 0x18;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_USERNAME: u8 = 0x80;

/// Protocol name and level of each version (3.1 used "MQIsdp").
fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::V3_1 => "MQIsdp",
        Protocol::V3_1_1 | Protocol::V5 => "MQTT",
    }
}

fn protocol_of(name: &[u8], level: u8) -> Result<Protocol, DecodeError> {
    match (name, level) {
        (b"MQIsdp", 3) => Ok(Protocol::V3_1),
        (b"MQTT", 4) => Ok(Protocol::V3_1_1),
        (b"MQTT", 5) => Ok(Protocol::V5),
        _ => Err(DecodeError::UnsupportedProtocol {
            level,
            name: String::from_utf8_lossy(name).into_owned(),
        }),
    }
}

/// Decode a CONNECT body; the version comes from its own protocol name and level.
pub(crate) fn decode_connect(body: &Bytes) -> Result<Connect, DecodeError> {
    let mut r = Reader::new(body);
    // Read the name raw: an unknown protocol should be reported as such, not as bad UTF-8.
    let name = r.prefixed()?;
    let level = r.u8()?;
    let protocol = protocol_of(name, level)?;
    let flags = r.u8()?;
    // 3.1 has no such rule; Mosquitto accepts the bit there.
    if flags & FLAG_RESERVED != 0 && protocol != Protocol::V3_1 {
        return Err(DecodeError::Malformed(
            "CONNECT reserved flag set (MQTT-3.1.2-3)",
        ));
    }
    let will_flag = flags & FLAG_WILL != 0;
    let will_qos_bits = (flags & FLAG_WILL_QOS) >> 3;
    let will_retain = flags & FLAG_WILL_RETAIN != 0;
    let will_qos = QoS::from_u8(will_qos_bits).ok_or(DecodeError::InvalidQoS(will_qos_bits))?;
    if !will_flag && (will_qos_bits != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS or retain set without will flag (MQTT-3.1.2-11/13/15)",
        ));
    }
    let has_username = flags & FLAG_USERNAME != 0;
    let has_password = flags & FLAG_PASSWORD != 0;
    if protocol == Protocol::V3_1_1 && has_password && !has_username {
        return Err(DecodeError::Malformed(
            "password flag without user name flag (MQTT-3.1.2-22)",
        ));
    }
    let keep_alive = r.u16()?;
    let properties = if protocol.is_v5() {
        properties::decode(&mut r, Ctx::CONNECT)?
    } else {
        Properties::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = if protocol.is_v5() {
            properties::decode(&mut r, Ctx::WILL)?
        } else {
            Properties::default()
        };
        let topic = r.byte_string()?;
        validate_topic_name(&topic).map_err(|_| DecodeError::InvalidTopicName)?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    r.finish()?;
    Ok(Connect {
        protocol,
        clean_start: flags & FLAG_CLEAN != 0,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

/// Body size of a CONNECT, for the version in `c.protocol`.
pub(crate) fn connect_len(c: &Connect) -> usize {
    let v5 = c.protocol.is_v5();
    let props = |p: &Properties| if v5 { properties::block_len(p) } else { 0 };
    let mut n = prefixed_len(protocol_name(c.protocol).as_bytes()) + 1 + 1 + 2;
    n += props(&c.properties);
    n += prefixed_len(c.client_id.as_bytes());
    if let Some(w) = &c.will {
        n += props(&w.properties) + prefixed_len(w.topic.as_bytes()) + prefixed_len(&w.payload);
    }
    n += c
        .username
        .as_ref()
        .map_or(0, |u| prefixed_len(u.as_bytes()));
    n += c.password.as_ref().map_or(0, |p| prefixed_len(p));
    n
}

/// Append a CONNECT body for the version in `c.protocol`.
pub(crate) fn write_connect(c: &Connect, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let v5 = c.protocol.is_v5();
    put_str(buf, protocol_name(c.protocol))?;
    buf.put_u8(c.protocol as u8);
    let mut flags = 0u8;
    if c.clean_start {
        flags |= FLAG_CLEAN;
    }
    if let Some(w) = &c.will {
        flags |= FLAG_WILL | ((w.qos as u8) << 3);
        if w.retain {
            flags |= FLAG_WILL_RETAIN;
        }
    }
    if c.username.is_some() {
        flags |= FLAG_USERNAME;
    }
    if c.password.is_some() {
        flags |= FLAG_PASSWORD;
    }
    buf.put_u8(flags);
    buf.put_u16(c.keep_alive);
    if v5 {
        properties::write(buf, &c.properties)?;
    }
    put_str(buf, &c.client_id)?;
    if let Some(w) = &c.will {
        if v5 {
            properties::write(buf, &w.properties)?;
        }
        put_str(buf, &w.topic)?;
        put_prefixed(buf, &w.payload)?;
    }
    if let Some(u) = &c.username {
        put_str(buf, u)?;
    }
    if let Some(p) = &c.password {
        put_prefixed(buf, p)?;
    }
    Ok(())
}

/// Decode a CONNACK body.
pub(crate) fn decode_connack(body: &Bytes, protocol: Protocol) -> Result<ConnAck, DecodeError> {
    let mut r = Reader::new(body);
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::Malformed(
            "CONNACK reserved flags set (MQTT-3.2.2-1)",
        ));
    }
    let code = r.u8()?;
    let (reason, properties) = if protocol.is_v5() {
        let reason = reason_codes::check(Kind::ConnAck, code)?;
        (reason, properties::decode(&mut r, Ctx::CONNACK)?)
    } else {
        let reason =
            reason_codes::connack_reason(code).ok_or(DecodeError::InvalidReasonCode(code))?;
        (reason, Properties::default())
    };
    r.finish()?;
    // 3.1 has no session present flag: that byte was reserved and unused. A refusal has no
    // session (MQTT-3.2.2-4, 5.0 MQTT-3.2.2-6); a server that says otherwise is ignored on
    // that point so the client still learns why it was refused.
    let session_present = flags & 1 != 0 && protocol != Protocol::V3_1 && !reason.is_error();
    Ok(ConnAck {
        session_present,
        reason,
        properties,
    })
}

/// Body size of a CONNACK.
pub(crate) fn connack_len(c: &ConnAck, protocol: Protocol) -> usize {
    2 + if protocol.is_v5() {
        properties::block_len(&c.properties)
    } else {
        0
    }
}

/// Append a CONNACK body; 3.x gets the mapped return code and no properties.
pub(crate) fn write_connack(
    c: &ConnAck,
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    // MQTT-3.2.2-4 (3.1.1) / MQTT-3.2.2-6 (5.0): a refusal never has a session; 3.1 has
    // no session present flag at all.
    if protocol.is_v5() {
        buf.put_u8(u8::from(c.session_present && !c.reason.is_error()));
        buf.put_u8(c.reason.0);
        properties::write(buf, &c.properties)
    } else {
        let code = reason_codes::connack_return_code(c.reason);
        let present = c.session_present && code == 0 && protocol != Protocol::V3_1;
        buf.put_u8(u8::from(present));
        buf.put_u8(code);
        Ok(())
    }
}
