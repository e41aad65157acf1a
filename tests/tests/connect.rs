//! CONNECT / CONNACK behaviour: session present, client identifiers, protocol levels,
//! the first-packet rule, second CONNECT, connect timeout and session takeover.

use std::time::{Duration, Instant};

use outpost_mqtt::{Packet, Protocol, ReasonCode};
use outpost_tests::raw::{bytes_of, connect_packet};
use outpost_tests::{
    Broker, QUIET, RawClient, V4Client, V5Client, WAIT, mosquitto_mode, outpost_only,
};
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as V5Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_clean_session_connack_accepted_without_session_mqtt_3_2_2_1() {
    let broker = Broker::start("");
    let (_c, ack) = V4Client::connect(broker.port(), "c-v4-clean", |o| {
        o.set_clean_session(true);
    })
    .await;
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
    assert!(
        !ack.session_present,
        "clean session must not report a session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_clean_start_connack_success_without_session_mqtt_3_2_2_2() {
    let broker = Broker::start("");
    let (_c, ack) = V5Client::connect(broker.port(), "c-v5-clean", |o| {
        o.set_clean_start(true);
    })
    .await;
    assert_eq!(ack.code, V5Code::Success);
    assert!(!ack.session_present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_connack_bytes_are_exact_mqtt_3_2() {
    let broker = Broker::start("");
    let mut raw = RawClient::tcp(broker.port(), Protocol::V3_1_1).await;
    raw.send_bytes(&bytes_of::connect(b"MQTT", 4, "c-bytes"))
        .await;
    // CONNACK: type 2, remaining length 2, session present 0, return code 0.
    assert_eq!(raw.read_bytes(4, WAIT).await, vec![0x20, 0x02, 0x00, 0x00]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v31_mqisdp_client_is_accepted() {
    let broker = Broker::start("");
    let mut raw = RawClient::tcp(broker.port(), Protocol::V3_1).await;
    raw.send_bytes(&bytes_of::connect(b"MQIsdp", 3, "c-v31"))
        .await;
    assert_eq!(raw.read_bytes(4, WAIT).await, vec![0x20, 0x02, 0x00, 0x00]);
}

/// MQTT 3.1 calls the fixed-header bits of most packets "not used" and has no rule
/// that closes on them; old 3.1 firmware sets them loosely. They are ignored there (as
/// Mosquitto does), while 3.1.1 closes on them (MQTT-2.2.2-2, tested elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v31_ignores_the_fixed_header_bits_it_does_not_use() {
    let broker = Broker::start("");
    let mut raw = RawClient::tcp(broker.port(), Protocol::V3_1).await;
    raw.send_bytes(&bytes_of::connect(b"MQIsdp", 3, "c-v31-bits"))
        .await;
    assert_eq!(raw.read_bytes(4, WAIT).await, vec![0x20, 0x02, 0x00, 0x00]);
    // PINGREQ with a flag set, then a SUBSCRIBE whose header says QoS 0.
    raw.send_bytes(&[0xC1, 0x00]).await;
    assert_eq!(raw.read_bytes(2, WAIT).await, vec![0xD0, 0x00]);
    let mut sub = vec![0x80, 0x00, 0x00, 0x07];
    sub.extend(bytes_of::string(b"v31/b"));
    sub.push(0x01);
    sub[1] = (sub.len() - 2) as u8;
    raw.send_bytes(&sub).await;
    assert_eq!(
        raw.read_bytes(5, WAIT).await,
        vec![0x90, 0x03, 0x00, 0x07, 0x01]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_empty_client_id_with_clean_session_0_refused_rc2_mqtt_3_1_3_8() {
    let broker = Broker::start("");
    let mut raw = RawClient::tcp(broker.port(), Protocol::V3_1_1).await;
    let mut connect = bytes_of::connect(b"MQTT", 4, "");
    // Clear the Clean Session bit (connect flags are the 10th byte: 0x10 len 00 04 MQTT 04 flags).
    connect[9] = 0x00;
    raw.send_bytes(&connect).await;
    assert_eq!(
        raw.read_bytes(4, WAIT).await,
        vec![0x20, 0x02, 0x00, 0x02],
        "expected CONNACK return code 2 (identifier rejected)"
    );
    assert!(
        raw.closed_within(WAIT).await,
        "connection must be closed after rc 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_empty_client_id_with_clean_session_1_is_accepted_mqtt_3_1_3_6() {
    let broker = Broker::start("");
    let mut raw = RawClient::tcp(broker.port(), Protocol::V3_1_1).await;
    raw.send_bytes(&bytes_of::connect(b"MQTT", 4, "")).await;
    assert_eq!(raw.read_bytes(4, WAIT).await, vec![0x20, 0x02, 0x00, 0x00]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_empty_client_id_gets_assigned_client_identifier_mqtt_3_2_2_16() {
    let broker = Broker::start("");
    let (_a, ack_a) =
        RawClient::connect(broker.port(), connect_packet(Protocol::V5, "", true)).await;
    let (_b, ack_b) =
        RawClient::connect(broker.port(), connect_packet(Protocol::V5, "", true)).await;
    assert_eq!(ack_a.reason, ReasonCode::SUCCESS);
    let id_a = ack_a
        .properties
        .assigned_client_identifier
        .expect("CONNACK must carry an Assigned Client Identifier");
    let id_b = ack_b
        .properties
        .assigned_client_identifier
        .expect("CONNACK must carry an Assigned Client Identifier");
    assert!(!id_a.is_empty());
    assert_ne!(
        id_a, id_b,
        "assigned identifiers must be unique (MQTT-3.1.3-6)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_level_refused_and_closed_mqtt_3_1_2_2() {
    let broker = Broker::start("");
    let mut raw = RawClient::tcp(broker.port(), Protocol::V3_1_1).await;
    raw.send_bytes(&bytes_of::connect(b"MQTT", 6, "c-level6"))
        .await;
    let reply = raw.read_bytes(4, WAIT).await;
    // 3.1.1 form: return code 0x01; 5.0 form: reason 0x84 followed by properties.
    let ok = reply == [0x20, 0x02, 0x00, 0x01]
        || (reply.len() == 4 && reply[0] == 0x20 && reply[3] == 0x84);
    assert!(ok, "expected CONNACK 0x01 (or 5.0 0x84), got {reply:02x?}");
    assert!(raw.closed_within(WAIT).await, "connection must be closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_packet_not_connect_closes_connection_mqtt_3_1_0_1() {
    let broker = Broker::start("");
    let mut raw = RawClient::tcp(broker.port(), Protocol::V3_1_1).await;
    raw.send_bytes(&[0xC0, 0x00]).await; // PINGREQ
    let mut got = Vec::new();
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            let b = raw.read_bytes(1, WAIT).await;
            if b.is_empty() {
                return;
            }
            got.extend(b);
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "connection still open after a PINGREQ before CONNECT"
    );
    assert!(
        got.is_empty(),
        "nothing may be answered before CONNECT, got {got:02x?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_before_connect_is_not_routed_mqtt_3_1_0_1() {
    let broker = Broker::start("");
    let (mut sub, _) = V4Client::connect(broker.port(), "c-prec-sub", |_| {}).await;
    sub.client
        .subscribe("c/prec", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    let mut raw = RawClient::tcp(broker.port(), Protocol::V3_1_1).await;
    raw.send_bytes(&bytes_of::publish(0, b"c/prec", None, false, b"sneaky"))
        .await;
    assert!(raw.closed_within(WAIT).await, "connection must be closed");
    assert!(
        sub.next_publish(QUIET).await.is_none(),
        "a PUBLISH before CONNECT was routed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_second_connect_is_a_protocol_violation_mqtt_3_1_0_2() {
    let broker = Broker::start("");
    let (mut raw, ack) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "c-twice4", true),
    )
    .await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    raw.send(&Packet::Connect(Box::new(connect_packet(
        Protocol::V3_1_1,
        "c-twice4",
        true,
    ))))
    .await;
    let got = raw.expect_closed(WAIT).await;
    assert!(
        !got.iter().any(|p| matches!(p, Packet::ConnAck(_))),
        "second CONNECT must not be acknowledged: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_second_connect_is_a_protocol_error_mqtt_3_1_0_2() {
    let broker = Broker::start("");
    let (mut raw, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "c-twice5", true),
    )
    .await;
    raw.send(&Packet::Connect(Box::new(connect_packet(
        Protocol::V5,
        "c-twice5",
        true,
    ))))
    .await;
    let got = raw.expect_closed(WAIT).await;
    for p in &got {
        match p {
            Packet::Disconnect(d) => assert_eq!(d.reason, ReasonCode::PROTOCOL_ERROR, "{got:?}"),
            other => panic!("unexpected packet after second CONNECT: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connect_within_connect_timeout_closes_connection() {
    outpost_only!();
    let broker = Broker::start("connect_timeout = \"1s\"");
    let started = Instant::now();
    let mut raw = RawClient::tcp(broker.port(), Protocol::V3_1_1).await;
    assert!(
        raw.closed_within(Duration::from_secs(4)).await,
        "idle connection without CONNECT not closed"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "closed too early ({took:?}) for a 1 s connect timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_takeover_closes_the_first_connection_mqtt_3_1_4_2() {
    let broker = Broker::start("");
    let (mut first, _) = V4Client::connect(broker.port(), "c-take4", |_| {}).await;
    let (mut second, _) = V4Client::connect(broker.port(), "c-take4", |_| {}).await;
    assert!(
        first.wait_closed(WAIT).await.is_some(),
        "the first connection must be closed when the client id reconnects"
    );
    // The new connection is fully functional.
    second
        .client
        .subscribe("c/take4", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    second.expect_suback().await;
    second
        .client
        .publish("c/take4", rumqttc::QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let p = second.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"x");
    assert!(second.closed.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_takeover_sends_disconnect_0x8e_to_the_first_connection_mqtt_3_1_4_3() {
    let broker = Broker::start("");
    let (mut first, _) =
        RawClient::connect(broker.port(), connect_packet(Protocol::V5, "c-take5", true)).await;
    let (mut second, ack) =
        RawClient::connect(broker.port(), connect_packet(Protocol::V5, "c-take5", true)).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    let reason = first.expect_closed_with_disconnect(WAIT).await;
    // Mosquitto 2.0.11 only closes the socket; outpost must say why.
    if !mosquitto_mode() {
        assert_eq!(
            reason,
            Some(ReasonCode::SESSION_TAKEN_OVER),
            "first connection must get DISCONNECT 0x8E"
        );
    }
    second.send(&Packet::PingReq).await;
    assert_eq!(second.expect_packet_raw(WAIT).await, Packet::PingResp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pingreq_gets_pingresp_mqtt_3_12_4_1() {
    let broker = Broker::start("");
    let (mut raw, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "c-ping", true),
    )
    .await;
    raw.send(&Packet::PingReq).await;
    assert_eq!(raw.expect_packet_raw(WAIT).await, Packet::PingResp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_disables_the_timeout_mqtt_3_1_2_10() {
    let broker = Broker::start("");
    let mut c = connect_packet(Protocol::V3_1_1, "c-ka0", true);
    c.keep_alive = 0;
    let (mut raw, _) = RawClient::connect(broker.port(), c).await;
    raw.expect_silence(Duration::from_millis(2500)).await;
    raw.send(&Packet::PingReq).await;
    assert_eq!(raw.expect_packet_raw(WAIT).await, Packet::PingResp);
}
