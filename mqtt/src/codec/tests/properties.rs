//! 5.0 property rules (section 2.2.2): known identifiers, no duplicates, only where
//! allowed, values in range.

use super::{decode_one, framed, s};
use crate::error::DecodeError;
use crate::packet::{Packet, Protocol};
use crate::reason::ReasonCode;

/// A QoS 0 PUBLISH on topic "t" with the given property bytes.
fn publish_with(props: &[u8]) -> Result<Packet, DecodeError> {
    let mut body = s("t");
    body.push(props.len() as u8);
    body.extend(props);
    decode_one(&framed(0x30, &body), Protocol::V5)
}

/// A 5.0 CONNECT with the given property bytes.
fn connect_with(props: &[u8]) -> Result<Packet, DecodeError> {
    let mut body = s("MQTT");
    body.extend([5, 0x02, 0, 60, props.len() as u8]);
    body.extend(props);
    body.extend(s("id"));
    decode_one(&framed(0x10, &body), Protocol::V5)
}

/// A SUBSCRIBE to "a" with the given property bytes.
fn subscribe_with(props: &[u8]) -> Result<Packet, DecodeError> {
    let mut body = vec![0, 1, props.len() as u8];
    body.extend(props);
    body.extend(s("a"));
    body.push(1);
    decode_one(&framed(0x82, &body), Protocol::V5)
}

#[test]
fn unknown_property_identifier_is_malformed() {
    let e = publish_with(&[0x05, 0]).unwrap_err();
    assert_eq!(e, DecodeError::InvalidProperty { id: 0x05 });
    assert_eq!(e.reason_code(), ReasonCode::MALFORMED_PACKET);
}

#[test]
fn duplicate_single_valued_property_is_a_protocol_error() {
    let e = connect_with(&[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2]).unwrap_err();
    assert_eq!(e, DecodeError::DuplicateProperty { id: 0x11 });
    assert_eq!(e.reason_code(), ReasonCode::PROTOCOL_ERROR);
    assert_eq!(
        publish_with(&[0x23, 0, 1, 0x23, 0, 2]).unwrap_err(),
        DecodeError::DuplicateProperty { id: 0x23 }
    );
}

#[test]
fn property_not_allowed_in_packet_is_a_malformed_packet() {
    // 5.0 section 2.2.2.2: "A Control Packet which contains an Identifier which is not
    // valid for its packet type ... is a Malformed Packet" (0x81), in every packet.
    // Topic Alias belongs to PUBLISH, not CONNECT.
    let e = connect_with(&[0x23, 0, 1]).unwrap_err();
    assert_eq!(
        e,
        DecodeError::PropertyNotAllowed {
            id: 0x23,
            packet: "CONNECT"
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::MALFORMED_PACKET);
    // Will Delay Interval belongs to the will properties, not PUBLISH.
    assert!(matches!(
        publish_with(&[0x18, 0, 0, 0, 1]),
        Err(DecodeError::PropertyNotAllowed { id: 0x18, .. })
    ));
    // Reason String is not allowed in SUBSCRIBE.
    assert!(matches!(
        subscribe_with(&[0x1F, 0, 0]),
        Err(DecodeError::PropertyNotAllowed { id: 0x1F, .. })
    ));
}

#[test]
fn user_properties_repeat_in_order() {
    let props = [0x26, 0, 1, b'k', 0, 1, b'1', 0x26, 0, 1, b'k', 0, 1, b'2'];
    let Packet::Publish(p) = publish_with(&props).unwrap() else {
        panic!("publish")
    };
    assert_eq!(
        p.properties.user_properties,
        vec![("k".into(), "1".into()), ("k".into(), "2".into())]
    );
}

// 5.0 MQTT-3.3.4-4: a PUBLISH to a subscriber may carry several subscription identifiers;
// a SUBSCRIBE carries at most one (section 3.8.2.1.2).
#[test]
fn subscription_identifier_repeats_only_in_publish() {
    let Packet::Publish(p) = publish_with(&[0x0B, 1, 0x0B, 0xFF, 0x7F]).unwrap() else {
        panic!("publish")
    };
    assert_eq!(p.properties.subscription_identifiers, vec![1, 16_383]);
    assert_eq!(
        subscribe_with(&[0x0B, 1, 0x0B, 2]).unwrap_err(),
        DecodeError::DuplicateProperty { id: 0x0B }
    );
}

#[test]
fn zero_values_that_the_spec_forbids_are_protocol_errors() {
    let cases: [(&[u8], u8); 3] = [
        (&[0x0B, 0], 0x0B),
        (&[0x23, 0, 0], 0x23),
        (&[0x01, 2], 0x01),
    ];
    for (props, id) in cases {
        let e = publish_with(props).unwrap_err();
        assert_eq!(e, DecodeError::InvalidPropertyValue { id });
        assert_eq!(e.reason_code(), ReasonCode::PROTOCOL_ERROR);
    }
    assert_eq!(
        subscribe_with(&[0x0B, 0]).unwrap_err(),
        DecodeError::InvalidPropertyValue { id: 0x0B }
    );
    for (props, id) in [
        (&[0x21, 0, 0][..], 0x21),       // Receive Maximum 0
        (&[0x27, 0, 0, 0, 0][..], 0x27), // Maximum Packet Size 0
        (&[0x17, 2][..], 0x17),          // Request Problem Information 2
        (&[0x19, 7][..], 0x19),          // Request Response Information 7
    ] {
        assert_eq!(
            connect_with(props).unwrap_err(),
            DecodeError::InvalidPropertyValue { id }
        );
    }
}

// 5.0 MQTT-3.3.2-14: the Response Topic is a topic name, so no wildcards.
#[test]
fn response_topic_must_not_hold_wildcards() {
    let e = publish_with(&[0x08, 0, 3, b'a', b'/', b'#']).unwrap_err();
    assert_eq!(e, DecodeError::InvalidPropertyValue { id: 0x08 });
}

#[test]
fn property_length_beyond_the_packet_is_truncated() {
    let body = [0, 1, b't', 9, 0x23, 0];
    assert_eq!(
        decode_one(&framed(0x30, &body), Protocol::V5).unwrap_err(),
        DecodeError::Truncated
    );
    // A property whose value runs past the property block is truncated too.
    assert_eq!(
        publish_with(&[0x02, 0, 0]).unwrap_err(),
        DecodeError::Truncated
    );
}

#[test]
fn property_strings_follow_utf8_rules() {
    assert_eq!(
        publish_with(&[0x03, 0, 1, 0]).unwrap_err(),
        DecodeError::InvalidUtf8
    );
    assert_eq!(
        publish_with(&[0x26, 0, 1, b'k', 0, 1, 0xFF]).unwrap_err(),
        DecodeError::InvalidUtf8
    );
}
