//! DISCONNECT and AUTH, whose 5.0 bodies may shrink to nothing.

use bytes::{BufMut, Bytes, BytesMut};

use super::properties::{self, Ctx};
use super::reader::Reader;
use super::reason_codes::{self, Kind};
use crate::error::{DecodeError, EncodeError};
use crate::packet::{Auth, Disconnect, Protocol};
use crate::properties::Properties;
use crate::reason::ReasonCode;

/// Reason code and properties, either of which 5.0 lets the sender leave out
/// (sections 3.14.2.1 and 3.15.2.1: remaining length 0 means success, no properties).
fn decode_reason_props(
    body: &Bytes,
    kind: Kind,
    ctx: Ctx,
) -> Result<(ReasonCode, Properties), DecodeError> {
    let mut r = Reader::new(body);
    if r.is_empty() {
        return Ok((ReasonCode::SUCCESS, Properties::default()));
    }
    let reason = reason_codes::check(kind, r.u8()?)?;
    let props = if r.is_empty() {
        Properties::default()
    } else {
        properties::decode(&mut r, ctx)?
    };
    r.finish()?;
    Ok((reason, props))
}

fn reason_props_len(reason: ReasonCode, props: &Properties) -> usize {
    if !properties::is_empty(props) {
        1 + properties::block_len(props)
    } else if reason != ReasonCode::SUCCESS {
        1
    } else {
        0
    }
}

fn write_reason_props(
    reason: ReasonCode,
    props: &Properties,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    if !properties::is_empty(props) {
        buf.put_u8(reason.0);
        properties::write(buf, props)?;
    } else if reason != ReasonCode::SUCCESS {
        buf.put_u8(reason.0);
    }
    Ok(())
}

/// Decode a DISCONNECT body; 3.x DISCONNECT has none.
pub(crate) fn decode_disconnect(
    body: &Bytes,
    protocol: Protocol,
) -> Result<Disconnect, DecodeError> {
    if !protocol.is_v5() {
        if !body.is_empty() {
            return Err(DecodeError::TrailingBytes);
        }
        return Ok(Disconnect {
            reason: ReasonCode::NORMAL_DISCONNECTION,
            properties: Properties::default(),
        });
    }
    let (reason, properties) = decode_reason_props(body, Kind::Disconnect, Ctx::DISCONNECT)?;
    Ok(Disconnect { reason, properties })
}

/// Body size of a DISCONNECT.
pub(crate) fn disconnect_len(d: &Disconnect, protocol: Protocol) -> usize {
    if protocol.is_v5() {
        reason_props_len(d.reason, &d.properties)
    } else {
        0
    }
}

/// Append a DISCONNECT body (nothing on 3.x).
pub(crate) fn write_disconnect(
    d: &Disconnect,
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    if protocol.is_v5() {
        write_reason_props(d.reason, &d.properties, buf)
    } else {
        Ok(())
    }
}

/// Decode an AUTH body (5.0 only; the caller rejects AUTH on 3.x).
pub(crate) fn decode_auth(body: &Bytes) -> Result<Auth, DecodeError> {
    let (reason, properties) = decode_reason_props(body, Kind::Auth, Ctx::AUTH)?;
    Ok(Auth { reason, properties })
}

/// Body size of an AUTH.
pub(crate) fn auth_len(a: &Auth) -> usize {
    reason_props_len(a.reason, &a.properties)
}

/// Append an AUTH body.
pub(crate) fn write_auth(a: &Auth, buf: &mut BytesMut) -> Result<(), EncodeError> {
    write_reason_props(a.reason, &a.properties, buf)
}
