//! Inputs the specifications call malformed or a protocol error are rejected with the
//! right error and reason code.

use bytes::BytesMut;

use super::{decode_one, framed, s};
use crate::codec::decode;
use crate::error::DecodeError;
use crate::packet::{Packet, Protocol, QoS};
use crate::reason::ReasonCode;

use Protocol::{V3_1, V3_1_1, V5};

fn err(bytes: &[u8], protocol: Protocol) -> DecodeError {
    decode_one(bytes, protocol).expect_err("must be rejected")
}

fn connect_body(name: &str, level: u8, flags: u8) -> Vec<u8> {
    let mut b = s(name);
    b.extend([level, flags, 0, 60]);
    if level == 5 {
        b.push(0);
    }
    b
}

#[test]
fn remaining_length_with_fifth_byte_is_malformed() {
    let e = err(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], V3_1_1);
    assert_eq!(e, DecodeError::MalformedRemainingLength);
    assert_eq!(e.reason_code(), ReasonCode::MALFORMED_PACKET);
}

#[test]
fn packet_type_zero_is_malformed() {
    assert_eq!(err(&[0x00, 0], V3_1_1), DecodeError::InvalidPacketType(0));
}

// MQTT-3.3.1-4: QoS 3 in PUBLISH is malformed.
#[test]
fn publish_qos3_is_malformed_mqtt_3_3_1_4() {
    let e = err(&[0x36, 5, 0, 1, b't', 0, 1], V3_1_1);
    assert_eq!(e, DecodeError::InvalidQoS(3));
    assert_eq!(e.reason_code(), ReasonCode::MALFORMED_PACKET);
}

// MQTT-3.3.1-2: DUP must be 0 for QoS 0.
#[test]
fn publish_qos0_with_dup_is_malformed_mqtt_3_3_1_2() {
    assert!(matches!(
        err(&[0x38, 3, 0, 1, b't'], V3_1_1),
        DecodeError::InvalidFlags { packet_type: 3, .. }
    ));
}

// MQTT-2.2.2-2 (3.1.1): reserved flags must carry the listed values.
#[test]
fn reserved_fixed_header_flags_are_checked_mqtt_2_2_2_2() {
    assert!(matches!(
        err(&[0x60, 2, 0, 1], V3_1_1),
        DecodeError::InvalidFlags {
            packet_type: 6,
            flags: 0
        }
    ));
    assert!(matches!(
        err(&[0x80, 6, 0, 1, 0, 1, b'a', 0], V3_1_1),
        DecodeError::InvalidFlags { .. }
    ));
    assert!(matches!(
        err(&[0xA0, 5, 0, 1, 0, 1, b'a'], V3_1_1),
        DecodeError::InvalidFlags { .. }
    ));
    assert!(matches!(
        err(&[0x41, 2, 0, 1], V5),
        DecodeError::InvalidFlags { .. }
    ));
    assert!(matches!(
        err(&[0xC1, 0], V3_1_1),
        DecodeError::InvalidFlags { .. }
    ));
    // 3.1 allowed DUP on a retried PUBREL, SUBSCRIBE or UNSUBSCRIBE, and has no rule on
    // the bits it calls "not used": they are ignored there, as Mosquitto does.
    for bytes in [
        &[0x6A, 2, 0, 1][..],
        &[0x60, 2, 0, 1],
        &[0x80, 6, 0, 1, 0, 1, b'a', 0],
        &[0xA0, 5, 0, 1, 0, 1, b'a'],
        &[0x42, 2, 0, 1],
        &[0xC1, 0],
    ] {
        assert!(decode_one(bytes, V3_1).is_ok(), "{bytes:02x?}");
    }
    match decode_one(&[0x38, 3, 0, 1, b't'], V3_1) {
        Ok(Packet::Publish(p)) => assert!(!p.dup && p.qos == QoS::AtMostOnce, "{p:?}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        err(&[0x6A, 2, 0, 1], V3_1_1),
        DecodeError::InvalidFlags { .. }
    ));
}

// The broker answers an unknown level with CONNACK 0x01 (3.1.1) or 0x84 (5.0).
#[test]
fn connect_unknown_protocol_level_reports_level_mqtt_3_1_2_2() {
    let e = err(&framed(0x10, &connect_body("MQTT", 6, 2)), V3_1_1);
    assert_eq!(
        e,
        DecodeError::UnsupportedProtocol {
            level: 6,
            name: "MQTT".into()
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
    let e = err(&framed(0x10, &connect_body("MQIsdp", 4, 2)), V3_1_1);
    assert_eq!(
        e,
        DecodeError::UnsupportedProtocol {
            level: 4,
            name: "MQIsdp".into()
        }
    );
    // Only the name and level are needed: the rest of the packet may be anything.
    let e = err(&[0x10, 7, 0, 4, b'M', b'Q', b'T', b'T', 7], V5);
    assert!(matches!(
        e,
        DecodeError::UnsupportedProtocol { level: 7, .. }
    ));
}

// MQTT-3.1.2-3: the reserved connect flag must be 0.
#[test]
fn connect_reserved_flag_is_malformed_mqtt_3_1_2_3() {
    let mut body = connect_body("MQTT", 4, 0x03);
    body.extend(s("id"));
    assert!(matches!(
        err(&framed(0x10, &body), V3_1_1),
        DecodeError::Malformed(_)
    ));
    // 3.1 has no such rule (Mosquitto accepts the bit there).
    let mut body = connect_body("MQIsdp", 3, 0x03);
    body.extend(s("id"));
    assert!(decode_one(&framed(0x10, &body), V3_1).is_ok());
}

// MQTT-3.1.2-11/13/15: without the will flag, will QoS and will retain must be 0.
#[test]
fn connect_will_bits_without_will_flag_mqtt_3_1_2_13_and_15() {
    for flags in [0x0A, 0x12, 0x22] {
        let mut body = connect_body("MQTT", 4, flags);
        body.extend(s("id"));
        assert!(
            matches!(err(&framed(0x10, &body), V3_1_1), DecodeError::Malformed(_)),
            "flags {flags:#x}"
        );
    }
}

// MQTT-3.1.2-14: will QoS 3 is malformed.
#[test]
fn connect_will_qos3_mqtt_3_1_2_14() {
    let mut body = connect_body("MQTT", 4, 0x1E);
    body.extend(s("id"));
    body.extend(s("w"));
    body.extend(s("p"));
    assert_eq!(
        err(&framed(0x10, &body), V3_1_1),
        DecodeError::InvalidQoS(3)
    );
}

// MQTT-3.1.2-22: 3.1.1 forbids a password without a user name.
#[test]
fn connect_v311_password_without_username_mqtt_3_1_2_22() {
    let mut body = connect_body("MQTT", 4, 0x42);
    body.extend(s("id"));
    body.extend(s("pw"));
    assert!(matches!(
        err(&framed(0x10, &body), V3_1_1),
        DecodeError::Malformed(_)
    ));
}

// MQTT-1.5.3-1 and MQTT-1.5.3-2: ill-formed UTF-8 and U+0000 are malformed.
#[test]
fn connect_client_id_utf8_rules_mqtt_1_5_3_1_and_2() {
    for bad in [
        &[0xC3, 0x28][..],
        &[0xED, 0xA0, 0x80],
        &[b'a', 0, b'b'],
        &[0xFF],
    ] {
        let mut body = connect_body("MQTT", 4, 0x02);
        body.extend((bad.len() as u16).to_be_bytes());
        body.extend(bad);
        let e = err(&framed(0x10, &body), V3_1_1);
        assert_eq!(e, DecodeError::InvalidUtf8, "{bad:?}");
        assert_eq!(e.reason_code(), ReasonCode::MALFORMED_PACKET);
    }
}

#[test]
fn connect_will_topic_with_wildcard_is_rejected() {
    let mut body = connect_body("MQTT", 4, 0x06);
    body.extend(s("id"));
    body.extend(s("a/#"));
    body.extend(s("p"));
    assert_eq!(
        err(&framed(0x10, &body), V3_1_1),
        DecodeError::InvalidTopicName
    );
}

#[test]
fn connect_truncated_and_trailing() {
    let mut body = connect_body("MQTT", 4, 0x82);
    body.extend(s("id"));
    assert_eq!(err(&framed(0x10, &body), V3_1_1), DecodeError::Truncated);
    body.extend(s("user"));
    body.push(0);
    assert_eq!(
        err(&framed(0x10, &body), V3_1_1),
        DecodeError::TrailingBytes
    );
}

// MQTT-3.2.2-1 (5.0 MQTT-3.2.2-1): CONNACK flag bits 7-1 are reserved.
#[test]
fn connack_reserved_bits_and_unknown_return_code() {
    assert!(matches!(
        err(&[0x20, 2, 0x02, 0], V3_1_1),
        DecodeError::Malformed(_)
    ));
    assert_eq!(
        err(&[0x20, 2, 0, 6], V3_1_1),
        DecodeError::InvalidReasonCode(6)
    );
    assert_eq!(
        err(&[0x20, 3, 0, 0x10, 0], V5),
        DecodeError::InvalidReasonCode(0x10)
    );
    assert_eq!(err(&[0x20, 3, 0, 0, 0], V3_1_1), DecodeError::TrailingBytes);
}

// MQTT-3.3.2-2: a topic name must not contain wildcards.
#[test]
fn publish_wildcard_topic_is_topic_name_invalid_mqtt_3_3_2_2() {
    for topic in ["a/+", "#", "a/#/b"] {
        let mut body = s(topic);
        body.extend(b"x");
        let e = err(&framed(0x30, &body), V5);
        assert_eq!(e, DecodeError::InvalidTopicName);
        assert_eq!(e.reason_code(), ReasonCode::TOPIC_NAME_INVALID);
    }
}

// MQTT-2.3.1-1: QoS > 0 PUBLISH needs a non-zero packet identifier.
#[test]
fn publish_zero_packet_id_mqtt_2_3_1_1() {
    assert_eq!(
        err(&[0x32, 5, 0, 1, b't', 0, 0], V3_1_1),
        DecodeError::ZeroPacketId
    );
    assert_eq!(err(&[0x40, 2, 0, 0], V3_1_1), DecodeError::ZeroPacketId);
}

// MQTT-4.7.3-1: topic names are at least one character; 5.0 allows empty with an alias.
#[test]
fn publish_empty_topic_needs_v5_topic_alias() {
    assert_eq!(
        err(&[0x30, 3, 0, 0, b'x'], V3_1_1),
        DecodeError::InvalidTopicName
    );
    // 5.0 section 3.3.2.3.4: "a Protocol Error if the Topic Name is zero length and
    // there is no Topic Alias".
    let e = err(&[0x30, 4, 0, 0, 0, b'x'], V5);
    assert!(matches!(e, DecodeError::ProtocolError(_)), "{e:?}");
    assert_eq!(e.reason_code(), ReasonCode::PROTOCOL_ERROR);
    assert!(decode_one(&[0x30, 7, 0, 0, 3, 0x23, 0, 1, b'x'], V5).is_ok());
}

#[test]
fn publish_topic_with_null_or_bad_utf8() {
    assert_eq!(
        err(&[0x30, 5, 0, 3, b'a', 0, b'b'], V3_1_1),
        DecodeError::InvalidUtf8
    );
    assert_eq!(
        err(&[0x30, 4, 0, 2, 0xC3, 0x28], V3_1_1),
        DecodeError::InvalidUtf8
    );
}

// MQTT-3.8.3-3 and MQTT-3.10.3-2: at least one topic filter.
#[test]
fn subscribe_and_unsubscribe_need_a_filter_mqtt_3_8_3_3() {
    let e = err(&[0x82, 2, 0, 1], V3_1_1);
    assert_eq!(e, DecodeError::EmptySubscribe);
    assert_eq!(e.reason_code(), ReasonCode::PROTOCOL_ERROR);
    assert_eq!(err(&[0xA2, 3, 0, 1, 0], V5), DecodeError::EmptySubscribe);
}

// MQTT-3-8.3-4 (3.1.1): the upper six bits of the requested QoS byte are reserved.
#[test]
fn subscribe_v311_reserved_option_bits_mqtt_3_8_3_4() {
    for byte in [0x04, 0x10, 0x80] {
        let mut body = vec![0, 1];
        body.extend(s("a"));
        body.push(byte);
        assert!(matches!(
            err(&framed(0x82, &body), V3_1_1),
            DecodeError::Malformed(_)
        ));
    }
}

// 5.0 MQTT-3.8.3-5: bits 6 and 7 reserved; retain handling 3 and QoS 3 malformed.
#[test]
fn subscribe_v5_options_checks_mqtt_3_8_3_5() {
    for (byte, want) in [
        (
            0x40,
            DecodeError::Malformed("reserved subscription option bits set"),
        ),
        (0x30, DecodeError::Malformed("retain handling 3")),
        (0x03, DecodeError::InvalidQoS(3)),
    ] {
        let mut body = vec![0, 1, 0];
        body.extend(s("a"));
        body.push(byte);
        assert_eq!(err(&framed(0x82, &body), V5), want);
    }
}

// 5.0 MQTT-3.8.3-4: No Local on a shared subscription is a protocol error.
#[test]
fn subscribe_v5_no_local_on_shared_mqtt_3_8_3_4() {
    let mut body = vec![0, 1, 0];
    body.extend(s("$share/g/a"));
    body.push(0x04);
    assert_eq!(
        err(&framed(0x82, &body), V5).reason_code(),
        ReasonCode::PROTOCOL_ERROR
    );
}

// MQTT-4.7.1-1/2 (wildcards) and MQTT-4.8.2-1/2 (share names).
#[test]
fn subscribe_invalid_filters_are_topic_filter_invalid() {
    for filter in [
        "a/#/b",
        "a+",
        "",
        "#/a",
        "$share/g",
        "$share//a",
        "$share/g+/a",
        "$share/g/",
    ] {
        let mut body = vec![0, 1];
        body.extend(s(filter));
        body.push(0);
        let e = err(&framed(0x82, &body), V3_1_1);
        assert_eq!(e, DecodeError::InvalidTopicFilter, "{filter:?}");
        assert_eq!(e.reason_code(), ReasonCode::TOPIC_FILTER_INVALID);
        let mut body = vec![0, 1];
        body.extend(s(filter));
        assert_eq!(
            err(&framed(0xA2, &body), V3_1_1),
            DecodeError::InvalidTopicFilter,
            "{filter:?}"
        );
    }
}

#[test]
fn suback_codes_are_checked() {
    assert_eq!(
        err(&[0x90, 3, 0, 1, 3], V3_1_1),
        DecodeError::InvalidReasonCode(3)
    );
    assert_eq!(
        err(&[0x90, 4, 0, 1, 0, 0x8E], V5),
        DecodeError::InvalidReasonCode(0x8E)
    );
    assert!(matches!(
        err(&[0x90, 2, 0, 1], V3_1_1),
        DecodeError::ProtocolError(_)
    ));
}

#[test]
fn v5_reason_codes_must_fit_the_packet() {
    assert_eq!(
        err(&[0x40, 3, 0, 1, 0x92], V5),
        DecodeError::InvalidReasonCode(0x92)
    );
    assert_eq!(
        err(&[0x62, 3, 0, 1, 0x10], V5),
        DecodeError::InvalidReasonCode(0x10)
    );
    assert_eq!(
        err(&[0xE0, 1, 0x91], V5),
        DecodeError::InvalidReasonCode(0x91)
    );
    assert_eq!(
        err(&[0xF0, 1, 0x01], V5),
        DecodeError::InvalidReasonCode(0x01)
    );
}

#[test]
fn v3_acks_have_exactly_a_packet_id() {
    assert_eq!(err(&[0x40, 3, 0, 1, 0], V3_1_1), DecodeError::TrailingBytes);
    assert_eq!(err(&[0x40, 1, 0], V3_1_1), DecodeError::Truncated);
    assert_eq!(err(&[0xB0, 3, 0, 1, 0], V3_1_1), DecodeError::TrailingBytes);
}

#[test]
fn v3_disconnect_and_ping_have_no_body() {
    assert_eq!(err(&[0xE0, 1, 0], V3_1_1), DecodeError::TrailingBytes);
    assert_eq!(err(&[0xC0, 1, 0], V5), DecodeError::TrailingBytes);
}

// AUTH (type 15) only exists in 5.0.
#[test]
fn auth_on_v3_is_malformed() {
    for protocol in [V3_1, V3_1_1] {
        let e = err(&[0xF0, 0], protocol);
        assert_eq!(e, DecodeError::InvalidPacketType(15));
        assert_eq!(e.reason_code(), ReasonCode::MALFORMED_PACKET);
    }
}

#[test]
fn packet_too_large_is_reported_before_the_bytes_arrive() {
    // Announces 2,097,152 bytes of PUBLISH, only the header is here.
    let mut buf = BytesMut::from(&[0x30, 0x80, 0x80, 0x80, 0x01][..]);
    let e = decode(&mut buf, V3_1_1, 1024).unwrap_err();
    assert_eq!(
        e,
        DecodeError::PacketTooLarge {
            size: 2_097_157,
            max: 1024
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::PACKET_TOO_LARGE);
    // The limit counts the fixed header: a 10-byte packet with max 9 is too large.
    let mut buf = BytesMut::from(&[0x30, 8, 0, 1, b't', 1, 2, 3, 4, 5][..]);
    assert!(matches!(
        decode(&mut buf, V3_1_1, 9),
        Err(DecodeError::PacketTooLarge { size: 10, max: 9 })
    ));
    let mut buf = BytesMut::from(&[0x30, 8, 0, 1, b't', 1, 2, 3, 4, 5][..]);
    assert!(decode(&mut buf, V3_1_1, 10).unwrap().is_some());
}

#[test]
fn incomplete_packets_leave_the_buffer_untouched() {
    let full = [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i'];
    for cut in 0..full.len() {
        let mut buf = BytesMut::from(&full[..cut]);
        assert_eq!(
            decode(&mut buf, V3_1_1, usize::MAX),
            Ok(None),
            "cut at {cut}"
        );
        assert_eq!(&buf[..], &full[..cut]);
    }
}

// MQTT-1.5.5-1 (5.0): variable byte integers use the fewest bytes.
#[test]
fn non_minimal_lengths_are_malformed_mqtt_1_5_5_1() {
    assert_eq!(
        err(&[0xC0, 0x80, 0x00], V3_1_1),
        DecodeError::MalformedRemainingLength
    );
    // A property length of 0 written in two bytes.
    assert_eq!(
        err(&[0xE0, 3, 0, 0x80, 0x00], V5),
        DecodeError::MalformedVarInt
    );
}
