//! Known byte sequences (from the specifications' examples and captured clients) decode
//! to the expected packets and encode back to the same bytes.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

use super::{decode_one, encode_vec, framed, s};
use crate::codec::{decode, encode, encode_publish};
use crate::error::EncodeError;
use crate::packet::*;
use crate::properties::Properties;
use crate::reason::ReasonCode;

fn both_ways(bytes: &[u8], packet: &Packet, protocol: Protocol) {
    assert_eq!(&decode_one(bytes, protocol).expect("decodes"), packet);
    assert_eq!(encode_vec(packet, protocol), bytes);
}

fn connect(protocol: Protocol) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        properties: Properties::default(),
        client_id: String::new(),
        will: None,
        username: None,
        password: None,
    }
}

// What mosquitto_pub -V mqttv311 sends with no client id: "MQTT", level 4, clean session.
#[test]
fn connect_v311_minimal() {
    let bytes = [
        0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 0,
    ];
    both_ways(
        &bytes,
        &Packet::Connect(Box::new(connect(Protocol::V3_1_1))),
        Protocol::V3_1_1,
    );
}

// 3.1 uses protocol name "MQIsdp" and level 3; the negotiated protocol argument is ignored.
#[test]
fn connect_v31_is_recognised_by_name_and_level() {
    let mut body = s("MQIsdp");
    body.extend([3, 0x02, 0, 60]);
    body.extend(s("abc"));
    let bytes = framed(0x10, &body);
    let mut c = connect(Protocol::V3_1);
    c.client_id = "abc".into();
    assert_eq!(
        decode_one(&bytes, Protocol::V5).unwrap(),
        Packet::Connect(Box::new(c.clone()))
    );
    assert_eq!(
        encode_vec(&Packet::Connect(Box::new(c)), Protocol::V5),
        bytes
    );
}

// 3.1.1 section 3.1.2.10 example variable header: flags 0xCE (user name, password,
// will QoS 1, will, clean session), keep alive 10.
#[test]
fn connect_v311_spec_example_flags_with_will_and_credentials() {
    let mut body = s("MQTT");
    body.extend([4, 0xCE, 0, 10]);
    body.extend(s("client"));
    body.extend(s("will/t"));
    body.extend(s("bye"));
    body.extend(s("user"));
    body.extend(s("pw"));
    let c = Connect {
        keep_alive: 10,
        client_id: "client".into(),
        will: Some(Will {
            topic: ByteString::from_static("will/t"),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        }),
        username: Some("user".into()),
        password: Some(Bytes::from_static(b"pw")),
        ..connect(Protocol::V3_1_1)
    };
    both_ways(
        &framed(0x10, &body),
        &Packet::Connect(Box::new(c)),
        Protocol::V3_1_1,
    );
}

// 5.0 section 3.1.2.11 example: properties carry a Session Expiry Interval of 10.
#[test]
fn connect_v5_with_session_expiry() {
    let mut body = s("MQTT");
    body.extend([5, 0x02, 0, 60, 5, 0x11, 0, 0, 0, 10]);
    body.extend(s(""));
    let mut c = connect(Protocol::V5);
    c.properties.session_expiry_interval = Some(10);
    both_ways(
        &framed(0x10, &body),
        &Packet::Connect(Box::new(c)),
        Protocol::V5,
    );
}

// 5.0 allows a password without a user name (section 3.1.2.9).
#[test]
fn connect_v5_password_without_username_is_allowed() {
    let mut body = s("MQTT");
    body.extend([5, 0x42, 0, 60, 0]);
    body.extend(s("id"));
    body.extend(s("secret"));
    let c = Connect {
        client_id: "id".into(),
        password: Some(Bytes::from_static(b"secret")),
        ..connect(Protocol::V5)
    };
    both_ways(
        &framed(0x10, &body),
        &Packet::Connect(Box::new(c)),
        Protocol::V5,
    );
}

#[test]
fn connack_v311_return_codes_map_to_reason_codes() {
    let cases = [
        (0u8, ReasonCode::SUCCESS),
        (1, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
        (2, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID),
        (3, ReasonCode::SERVER_UNAVAILABLE),
        (4, ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        (5, ReasonCode::NOT_AUTHORIZED),
    ];
    for (code, reason) in cases {
        let ack = ConnAck {
            session_present: false,
            reason,
            properties: Properties::default(),
        };
        both_ways(&[0x20, 2, 0, code], &Packet::ConnAck(ack), Protocol::V3_1_1);
    }
}

#[test]
fn connack_v311_maps_other_failures_to_server_unavailable_or_nearest() {
    let code = |reason| {
        let ack = ConnAck {
            session_present: false,
            reason,
            properties: Properties::default(),
        };
        encode_vec(&Packet::ConnAck(ack), Protocol::V3_1_1)[3]
    };
    assert_eq!(code(ReasonCode::SERVER_BUSY), 3);
    assert_eq!(code(ReasonCode::SERVER_SHUTTING_DOWN), 3);
    assert_eq!(code(ReasonCode::BANNED), 5);
    assert_eq!(code(ReasonCode::BAD_AUTHENTICATION_METHOD), 4);
    assert_eq!(code(ReasonCode::MALFORMED_PACKET), 3);
}

// MQTT-3.2.2-4: a server refusing the connection sends Session Present 0.
#[test]
fn connack_refusal_never_claims_a_session_mqtt_3_2_2_4() {
    let ack = ConnAck {
        session_present: true,
        reason: ReasonCode::NOT_AUTHORIZED,
        properties: Properties::default(),
    };
    assert_eq!(
        encode_vec(&Packet::ConnAck(ack.clone()), Protocol::V3_1_1),
        [0x20, 2, 0, 5]
    );
    assert_eq!(
        encode_vec(&Packet::ConnAck(ack), Protocol::V5),
        [0x20, 3, 0, 0x87, 0]
    );
}

#[test]
fn connack_session_present_and_v5_properties() {
    let ack = ConnAck {
        session_present: true,
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    };
    both_ways(
        &[0x20, 2, 1, 0],
        &Packet::ConnAck(ack.clone()),
        Protocol::V3_1_1,
    );
    let mut ack5 = ack;
    ack5.properties.receive_maximum = Some(20);
    ack5.properties.assigned_client_identifier = Some("x".into());
    both_ways(
        &[0x20, 10, 1, 0, 7, 0x12, 0, 1, b'x', 0x21, 0, 20],
        &Packet::ConnAck(ack5),
        Protocol::V5,
    );
}

// 3.1.1 section 3.3.2.3 example: topic "a/b", packet identifier 10.
#[test]
fn publish_spec_example_qos1() {
    let p = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: ByteString::from_static("a/b"),
        packet_id: Some(10),
        properties: Properties::default(),
        payload: Bytes::from_static(b"hi"),
    };
    let bytes = [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i'];
    both_ways(&bytes, &Packet::Publish(p.clone()), Protocol::V3_1_1);
    let mut v5 = vec![0x32, 10, 0, 3, b'a', b'/', b'b', 0, 10, 0];
    v5.extend(b"hi");
    both_ways(&v5, &Packet::Publish(p), Protocol::V5);
}

#[test]
fn publish_qos0_retain_empty_payload() {
    let p = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: true,
        topic: ByteString::from_static("t"),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::new(),
    };
    both_ways(
        &[0x31, 3, 0, 1, b't'],
        &Packet::Publish(p),
        Protocol::V3_1_1,
    );
}

#[test]
fn publish_dup_qos2_flags() {
    let p = Publish {
        dup: true,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: ByteString::from_static("t"),
        packet_id: Some(0x0102),
        properties: Properties::default(),
        payload: Bytes::from_static(b"x"),
    };
    both_ways(
        &[0x3C, 6, 0, 1, b't', 1, 2, b'x'],
        &Packet::Publish(p),
        Protocol::V3_1_1,
    );
}

// 5.0 MQTT-3.3.2-8 etc.: an empty topic name with a Topic Alias property.
#[test]
fn publish_v5_topic_alias_with_empty_topic() {
    let mut p = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: ByteString::new(),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from_static(b"1"),
    };
    p.properties.topic_alias = Some(3);
    both_ways(
        &[0x30, 7, 0, 0, 3, 0x23, 0, 3, b'1'],
        &Packet::Publish(p),
        Protocol::V5,
    );
}

// The decoded topic and payload share the receive buffer: no copy.
#[test]
fn publish_decode_shares_memory() {
    let mut buf = BytesMut::from(&[0x30, 8, 0, 3, b'a', b'/', b'b', b'x', b'y', b'z'][..]);
    let base = buf.as_ptr() as usize;
    let Some(Packet::Publish(p)) = decode(&mut buf, Protocol::V3_1_1, 1024).unwrap() else {
        panic!("publish")
    };
    assert_eq!(p.topic.as_bytes().as_ptr() as usize, base + 4);
    assert_eq!(p.payload.as_ptr() as usize, base + 7);
}

#[test]
fn encode_publish_matches_encode() {
    let p = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: ByteString::from_static("sensors/temp"),
        packet_id: Some(7),
        properties: Properties::default(),
        payload: Bytes::from(vec![0xAB; 300]),
    };
    for protocol in [Protocol::V3_1, Protocol::V3_1_1, Protocol::V5] {
        let mut fast = BytesMut::new();
        encode_publish(&p, protocol, &mut fast).unwrap();
        assert_eq!(
            fast.to_vec(),
            encode_vec(&Packet::Publish(p.clone()), protocol)
        );
        // 300-byte payload: the remaining length takes two bytes.
        assert_eq!(fast[1] & 0x80, 0x80);
    }
}

#[test]
fn pub_responses_v311() {
    for (first, make) in [
        (0x40, Packet::PubAck as fn(PubResponse) -> Packet),
        (0x50, Packet::PubRec),
        (0x62, Packet::PubRel),
        (0x70, Packet::PubComp),
    ] {
        both_ways(
            &[first, 2, 0x12, 0x34],
            &make(PubResponse::new(0x1234)),
            Protocol::V3_1_1,
        );
    }
}

// 5.0 section 3.4.2.1: success without properties uses remaining length 2; a reason
// without properties, 3.
#[test]
fn pub_responses_v5_short_forms() {
    both_ways(
        &[0x40, 2, 0, 1],
        &Packet::PubAck(PubResponse::new(1)),
        Protocol::V5,
    );
    let mut r = PubResponse::new(1);
    r.reason = ReasonCode::NO_MATCHING_SUBSCRIBERS;
    both_ways(
        &[0x40, 3, 0, 1, 0x10],
        &Packet::PubAck(r.clone()),
        Protocol::V5,
    );
    r.properties.reason_string = Some("no".into());
    both_ways(
        &[0x40, 9, 0, 1, 0x10, 5, 0x1F, 0, 2, b'n', b'o'],
        &Packet::PubAck(r),
        Protocol::V5,
    );
    // The long forms of a plain success are accepted too.
    assert_eq!(
        decode_one(&[0x50, 3, 0, 1, 0], Protocol::V5).unwrap(),
        Packet::PubRec(PubResponse::new(1))
    );
    assert_eq!(
        decode_one(&[0x70, 4, 0, 1, 0, 0], Protocol::V5).unwrap(),
        Packet::PubComp(PubResponse::new(1))
    );
}

// 3.1.1 section 3.8.3 example: "a/b" QoS 1 and "c/d" QoS 2 with packet identifier 10.
#[test]
fn subscribe_spec_example() {
    let mut body = vec![0, 10];
    body.extend(s("a/b"));
    body.push(1);
    body.extend(s("c/d"));
    body.push(2);
    let filter = |f: &str, qos| SubscribeFilter {
        filter: f.into(),
        options: SubscriptionOptions {
            qos,
            ..Default::default()
        },
    };
    let sub = Subscribe {
        packet_id: 10,
        filters: vec![
            filter("a/b", QoS::AtLeastOnce),
            filter("c/d", QoS::ExactlyOnce),
        ],
        properties: Properties::default(),
    };
    both_ways(
        &framed(0x82, &body),
        &Packet::Subscribe(sub),
        Protocol::V3_1_1,
    );
}

#[test]
fn subscribe_v5_options_and_subscription_identifier() {
    let mut body = vec![0, 1, 3, 0x0B, 0x80, 0x01];
    body.extend(s("$share/g/a/+"));
    body.push(0b0010_1010);
    let sub = Subscribe {
        packet_id: 1,
        filters: vec![SubscribeFilter {
            filter: "$share/g/a/+".into(),
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: false,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            },
        }],
        properties: Properties {
            subscription_identifiers: vec![128],
            ..Default::default()
        },
    };
    both_ways(&framed(0x82, &body), &Packet::Subscribe(sub), Protocol::V5);
}

// 3.1.1 section 3.9.3 example: granted QoS 0, granted QoS 2, failure.
#[test]
fn suback_spec_example_and_v311_failure_mapping() {
    let ack = SubAck {
        packet_id: 10,
        reason_codes: vec![
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::GRANTED_QOS_2,
            ReasonCode::UNSPECIFIED_ERROR,
        ],
        properties: Properties::default(),
    };
    both_ways(
        &[0x90, 5, 0, 10, 0, 2, 0x80],
        &Packet::SubAck(ack),
        Protocol::V3_1_1,
    );
    let refused = SubAck {
        packet_id: 10,
        reason_codes: vec![ReasonCode::NOT_AUTHORIZED, ReasonCode::TOPIC_FILTER_INVALID],
        properties: Properties::default(),
    };
    assert_eq!(
        encode_vec(&Packet::SubAck(refused.clone()), Protocol::V3_1_1),
        [0x90, 4, 0, 10, 0x80, 0x80]
    );
    both_ways(
        &[0x90, 5, 0, 10, 0, 0x87, 0x8F],
        &Packet::SubAck(refused),
        Protocol::V5,
    );
}

#[test]
fn unsubscribe_and_unsuback() {
    let mut body = vec![0, 10];
    body.extend(s("a/b"));
    body.extend(s("c/#"));
    let unsub = Unsubscribe {
        packet_id: 10,
        filters: vec!["a/b".into(), "c/#".into()],
        properties: Properties::default(),
    };
    both_ways(
        &framed(0xA2, &body),
        &Packet::Unsubscribe(unsub),
        Protocol::V3_1_1,
    );
    let ack = UnsubAck {
        packet_id: 10,
        reason_codes: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
        properties: Properties::default(),
    };
    both_ways(
        &[0xB0, 5, 0, 10, 0, 0, 0x11],
        &Packet::UnsubAck(ack.clone()),
        Protocol::V5,
    );
    // 3.x UNSUBACK is the packet identifier alone.
    assert_eq!(
        encode_vec(&Packet::UnsubAck(ack), Protocol::V3_1_1),
        [0xB0, 2, 0, 10]
    );
    let plain = UnsubAck {
        packet_id: 10,
        reason_codes: vec![],
        properties: Properties::default(),
    };
    both_ways(&[0xB0, 2, 0, 10], &Packet::UnsubAck(plain), Protocol::V3_1);
}

#[test]
fn ping_and_disconnect() {
    both_ways(&[0xC0, 0], &Packet::PingReq, Protocol::V3_1_1);
    both_ways(&[0xD0, 0], &Packet::PingResp, Protocol::V5);
    let normal = Disconnect {
        reason: ReasonCode::NORMAL_DISCONNECTION,
        properties: Properties::default(),
    };
    both_ways(
        &[0xE0, 0],
        &Packet::Disconnect(normal.clone()),
        Protocol::V3_1_1,
    );
    both_ways(&[0xE0, 0], &Packet::Disconnect(normal), Protocol::V5);
    let taken = Disconnect {
        reason: ReasonCode::SESSION_TAKEN_OVER,
        properties: Properties::default(),
    };
    both_ways(
        &[0xE0, 1, 0x8E],
        &Packet::Disconnect(taken.clone()),
        Protocol::V5,
    );
    // 3.x has no reason code: the body is dropped.
    assert_eq!(
        encode_vec(&Packet::Disconnect(taken), Protocol::V3_1_1),
        [0xE0, 0]
    );
    let mut expiry = Disconnect {
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    };
    expiry.properties.session_expiry_interval = Some(0);
    both_ways(
        &[0xE0, 7, 0, 5, 0x11, 0, 0, 0, 0],
        &Packet::Disconnect(expiry),
        Protocol::V5,
    );
}

#[test]
fn auth_v5_forms_and_absent_from_v3() {
    let ok = Auth {
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    };
    both_ways(&[0xF0, 0], &Packet::Auth(ok.clone()), Protocol::V5);
    let mut cont = Auth {
        reason: ReasonCode::CONTINUE_AUTHENTICATION,
        properties: Properties::default(),
    };
    cont.properties.authentication_method = Some("M".into());
    cont.properties.authentication_data = Some(Bytes::from_static(&[1]));
    both_ways(
        &[0xF0, 10, 0x18, 8, 0x15, 0, 1, b'M', 0x16, 0, 1, 1],
        &Packet::Auth(cont),
        Protocol::V5,
    );

    let mut buf = BytesMut::from(&b"keep"[..]);
    assert_eq!(
        encode(&Packet::Auth(ok.clone()), Protocol::V3_1_1, &mut buf),
        Err(EncodeError::NotInProtocol)
    );
    assert_eq!(&buf[..], b"keep");
    assert_eq!(
        crate::codec::encoded_len(&Packet::Auth(ok), Protocol::V3_1_1),
        0
    );
}

// Found by fuzzing: 3.1 has no session present flag, so it neither decodes nor encodes one.
#[test]
fn connack_v31_has_no_session_present() {
    let ack = ConnAck {
        session_present: false,
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    };
    assert_eq!(
        decode_one(&[0x20, 2, 1, 0], Protocol::V3_1).unwrap(),
        Packet::ConnAck(ack.clone())
    );
    let present = ConnAck {
        session_present: true,
        ..ack
    };
    assert_eq!(
        encode_vec(&Packet::ConnAck(present), Protocol::V3_1),
        [0x20, 2, 0, 0]
    );
}

// Found by fuzzing: a refusal claiming a session decodes as no session, as it encodes.
#[test]
fn connack_refusal_with_session_flag_decodes_without_session() {
    let Packet::ConnAck(ack) = decode_one(&[0x20, 2, 1, 1], Protocol::V3_1_1).unwrap() else {
        panic!("connack")
    };
    assert!(!ack.session_present);
    assert_eq!(ack.reason, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
}

#[test]
fn publish_encode_refusals_leave_the_buffer_alone() {
    let mut p = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: ByteString::from_static("t"),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::new(),
    };
    let mut buf = BytesMut::from(&b"x"[..]);
    assert_eq!(
        encode_publish(&p, Protocol::V5, &mut buf),
        Err(EncodeError::MissingPacketId)
    );
    assert_eq!(
        crate::codec::encoded_len(&Packet::Publish(p.clone()), Protocol::V5),
        0
    );
    p.packet_id = Some(1);
    p.topic = ByteString::new();
    assert_eq!(
        encode_publish(&p, Protocol::V3_1_1, &mut buf),
        Err(EncodeError::EmptyTopic)
    );
    p.topic = ByteString::from("x".repeat(70_000));
    assert_eq!(
        encode_publish(&p, Protocol::V3_1_1, &mut buf),
        Err(EncodeError::StringTooLong)
    );
    let mut c = connect(Protocol::V5);
    c.properties
        .user_properties
        .push(("k".repeat(65_536), String::new()));
    assert_eq!(
        encode(&Packet::Connect(Box::new(c)), Protocol::V5, &mut buf),
        Err(EncodeError::StringTooLong)
    );
    assert_eq!(&buf[..], b"x");
}
