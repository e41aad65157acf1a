//! Which reason codes each 5.0 packet may carry, and the mapping to 3.x return codes.

use crate::error::DecodeError;
use crate::reason::ReasonCode;

/// The packet types that carry reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    ConnAck,
    PubAckRec,
    PubRelComp,
    SubAck,
    UnsubAck,
    Disconnect,
    Auth,
}

/// Is `code` one of the reason codes 5.0 lists for `kind` (sections 3.2.2.2 to 3.15.2.1)?
/// DISCONNECT also accepts 0x8C (bad authentication method), which a failed
/// re-authentication (section 4.12.1) reasonably reports.
pub(crate) fn allowed(kind: Kind, code: u8) -> bool {
    match kind {
        Kind::ConnAck => matches!(
            code,
            0x00 | 0x80..=0x8A | 0x8C | 0x90 | 0x95 | 0x97 | 0x99..=0x9D | 0x9F
        ),
        Kind::PubAckRec => {
            matches!(
                code,
                0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99
            )
        }
        Kind::PubRelComp => matches!(code, 0x00 | 0x92),
        Kind::SubAck => matches!(
            code,
            0x00..=0x02 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91 | 0x97 | 0x9E | 0xA1 | 0xA2
        ),
        Kind::UnsubAck => matches!(code, 0x00 | 0x11 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91),
        Kind::Disconnect => matches!(
            code,
            0x00 | 0x04 | 0x80..=0x83 | 0x87 | 0x89 | 0x8B..=0x90 | 0x93..=0xA2
        ),
        Kind::Auth => matches!(code, 0x00 | 0x18 | 0x19),
    }
}

/// Read one reason code byte and check it belongs to `kind`.
pub(crate) fn check(kind: Kind, code: u8) -> Result<ReasonCode, DecodeError> {
    if allowed(kind, code) {
        Ok(ReasonCode(code))
    } else {
        Err(DecodeError::InvalidReasonCode(code))
    }
}

/// The 3.x CONNACK return code for a reason code: 0 accepted, 1 unacceptable protocol
/// version, 2 identifier rejected, 3 server unavailable, 4 bad user name or password,
/// 5 not authorised. Failures without a 3.x equivalent become 3.
pub fn connack_return_code(reason: ReasonCode) -> u8 {
    match reason.0 {
        0x00 => 0,
        0x84 => 1,
        0x85 => 2,
        0x86 | 0x8C => 4,
        0x87 | 0x8A => 5,
        _ => 3,
    }
}

/// The reason code for a 3.x CONNACK return code, `None` for 6 and above.
pub fn connack_reason(return_code: u8) -> Option<ReasonCode> {
    Some(match return_code {
        0 => ReasonCode::SUCCESS,
        1 => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
        2 => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
        3 => ReasonCode::SERVER_UNAVAILABLE,
        4 => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        5 => ReasonCode::NOT_AUTHORIZED,
        _ => return None,
    })
}

/// The 3.x SUBACK return code: the granted QoS, or 0x80 for any failure.
pub fn suback_return_code(reason: ReasonCode) -> u8 {
    match reason.0 {
        c @ 0..=2 => c,
        _ => 0x80,
    }
}
