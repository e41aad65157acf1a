//! Malformed and forbidden input: only the offending connection is closed (5.0 with a
//! DISCONNECT reason code first), and the broker keeps serving everyone else.

use std::time::Duration;

use outpost_mqtt::{Packet, Protocol, ReasonCode};
use outpost_tests::raw::{bytes_of, connect_packet};
use outpost_tests::{Broker, RawClient, V4Client, WAIT, assert_broker_serves, mosquitto_mode};

/// Send `bad` after a successful CONNECT and check the connection ends; on 5.0 the
/// DISCONNECT sent before the close must carry one of `v5_reasons`.
async fn bad_bytes_close_only_that_connection(tag: &str, protocol: Protocol, bad: &[u8], v5_reasons: &[ReasonCode]) {
    let broker = Broker::start("");
    let port = broker.port();
    // A bystander connected before the bad client must survive it.
    let (mut bystander, _) = V4Client::connect(port, &format!("{tag}-bystander"), |_| {}).await;
    bystander.client.subscribe("m/bystander", rumqttc::QoS::AtLeastOnce).await.unwrap();
    bystander.expect_suback().await;

    let (mut raw, _) = RawClient::connect(port, connect_packet(protocol, &format!("{tag}-bad"), true)).await;
    raw.send_bytes(bad).await;
    let got = raw.expect_closed(WAIT).await;
    if protocol == Protocol::V5 {
        let reason = got.iter().find_map(|p| match p {
            Packet::Disconnect(d) => Some(d.reason),
            _ => None,
        });
        match reason {
            Some(reason) => assert!(
                v5_reasons.contains(&reason),
                "DISCONNECT reason {reason:?}, expected one of {v5_reasons:?}"
            ),
            // The reason code is a SHOULD in the spec (MQTT 5.0 section 4.13.1) but a
            // contract of outpost (DESIGN.md); Mosquitto 2.0.11 sometimes omits it.
            None if mosquitto_mode() => {}
            None => panic!("5.0 connection closed without DISCONNECT: {got:?}"),
        }
    } else {
        assert!(
            got.iter().all(|p| !matches!(p, Packet::PubAck(_) | Packet::SubAck(_))),
            "bad packet was acknowledged: {got:?}"
        );
    }
    bystander.client.publish("m/bystander", rumqttc::QoS::AtLeastOnce, false, "ok").await.unwrap();
    assert_eq!(&bystander.expect_publish(WAIT).await.payload[..], b"ok", "bystander affected");
    assert_broker_serves(port, tag).await;
}

const MALFORMED: &[ReasonCode] = &[ReasonCode::MALFORMED_PACKET];
const MALFORMED_OR_PROTOCOL: &[ReasonCode] = &[ReasonCode::MALFORMED_PACKET, ReasonCode::PROTOCOL_ERROR];

/// A PUBLISH whose topic length runs past the end of the packet.
fn truncated_publish() -> Vec<u8> {
    vec![0x30, 0x04, 0x00, 0x20, b'a', b'b']
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_garbage_after_connect_closes_only_that_connection() {
    bad_bytes_close_only_that_connection("m-garb4", Protocol::V3_1_1, &truncated_publish(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_garbage_after_connect_gets_disconnect_0x81_mqtt_4_13_1_1() {
    bad_bytes_close_only_that_connection("m-garb5", Protocol::V5, &truncated_publish(), MALFORMED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_reserved_packet_type_0_closes() {
    bad_bytes_close_only_that_connection("m-type0", Protocol::V3_1_1, &[0x00, 0x00], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_remaining_length_over_four_bytes_is_malformed_mqtt_1_5_5() {
    let bad = [0x30, 0xff, 0xff, 0xff, 0xff, 0x7f];
    bad_bytes_close_only_that_connection("m-rl5", Protocol::V5, &bad, MALFORMED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_invalid_utf8_topic_closes_mqtt_1_5_3_1() {
    let bad = bytes_of::publish(0, &[b'm', b'/', 0xc3, 0x28], None, false, b"x");
    bad_bytes_close_only_that_connection("m-utf4", Protocol::V3_1_1, &bad, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_invalid_utf8_topic_is_malformed_mqtt_1_5_4_1() {
    let bad = bytes_of::publish(0, &[b'm', b'/', 0xc3, 0x28], None, true, b"x");
    bad_bytes_close_only_that_connection("m-utf5", Protocol::V5, &bad, MALFORMED_OR_PROTOCOL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_topic_with_null_character_is_malformed_mqtt_1_5_4_2() {
    let bad = bytes_of::publish(0, b"m/\0x", None, true, b"x");
    bad_bytes_close_only_that_connection("m-nul5", Protocol::V5, &bad, MALFORMED_OR_PROTOCOL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_publish_qos_3_closes_mqtt_3_3_1_4() {
    let bad = bytes_of::publish(0x06, b"m/q3", Some(1), false, b"x");
    bad_bytes_close_only_that_connection("m-q3-4", Protocol::V3_1_1, &bad, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publish_qos_3_is_malformed_mqtt_3_3_1_4() {
    let bad = bytes_of::publish(0x06, b"m/q3", Some(1), true, b"x");
    bad_bytes_close_only_that_connection("m-q3-5", Protocol::V5, &bad, MALFORMED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_publish_to_wildcard_topic_closes_mqtt_3_3_2_2() {
    let bad = bytes_of::publish(0x02, b"m/+/x", Some(1), false, b"x");
    bad_bytes_close_only_that_connection("m-wild4", Protocol::V3_1_1, &bad, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publish_to_wildcard_topic_is_refused_mqtt_3_3_2_2() {
    let bad = bytes_of::publish(0x02, b"m/#", Some(1), true, b"x");
    let reasons = [ReasonCode::MALFORMED_PACKET, ReasonCode::PROTOCOL_ERROR, ReasonCode::TOPIC_NAME_INVALID];
    bad_bytes_close_only_that_connection("m-wild5", Protocol::V5, &bad, &reasons).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_subscribe_with_reserved_flags_closes_mqtt_3_8_1_1() {
    let mut body = vec![0x00, 0x01];
    body.extend(bytes_of::string(b"m/flags"));
    body.push(0x01);
    // SUBSCRIBE must have fixed header flags 0b0010; 0b0000 is malformed.
    let bad = bytes_of::packet(0x80, &body);
    bad_bytes_close_only_that_connection("m-subflags", Protocol::V3_1_1, &bad, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_subscribe_without_filters_is_a_protocol_error_mqtt_3_8_3_2() {
    // Packet id 1, empty properties, no payload.
    let bad = bytes_of::packet(0x82, &[0x00, 0x01, 0x00]);
    bad_bytes_close_only_that_connection("m-subempty", Protocol::V5, &bad, MALFORMED_OR_PROTOCOL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_bad_connections_do_not_hurt_the_broker() {
    let broker = Broker::start("");
    let port = broker.port();
    for i in 0..20u8 {
        let mut raw = RawClient::tcp(port, Protocol::V3_1_1).await;
        raw.send_bytes(&[0x10, 0x80 | i, 0xff, 0xff, 0xff, 0xff, i]).await;
        assert!(raw.closed_within(Duration::from_secs(2)).await, "bad CONNECT {i} left open");
    }
    assert_broker_serves(port, "m-many").await;
}
