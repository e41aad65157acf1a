//! Quiet plain-TCP clients are parked: their task ends and their socket waits in the
//! broker's parked-socket set until a byte, an item from the core or the keep-alive
//! deadline brings them back (`broker/src/net/park.rs`). A client that says nothing after
//! its CONNACK is parked at once, so each test below pauses after connecting and then
//! checks that what wakes a parked client still works: its own packets, the core's
//! deliveries and takeovers, and keep alive.

use std::time::Duration;

use outpost_mqtt::{Packet, Properties, Protocol, QoS, ReasonCode};
use outpost_tests::raw::{connect_packet, publish, sub_opts};
use outpost_tests::{Broker, RawClient, WAIT, mosquitto_mode};

/// Long enough for the broker to have parked a silent client after its CONNACK.
const PARKED: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_answers_ping_subscribes_and_receives() {
    let broker = Broker::start("");
    let (mut c, ack) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "park-ping", true),
    )
    .await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    tokio::time::sleep(PARKED).await;
    // MQTT-3.12.4-1: a PINGREQ gets a PINGRESP, parked or not.
    c.send(&Packet::PingReq).await;
    assert_eq!(c.expect_packet_raw(WAIT).await, Packet::PingResp);
    tokio::time::sleep(PARKED).await;
    c.subscribe(
        1,
        "park/t",
        sub_opts(QoS::AtLeastOnce),
        Properties::default(),
    )
    .await;
    let (mut p, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "park-pub", true),
    )
    .await;
    p.send(&Packet::Publish(publish(
        "park/t",
        QoS::AtMostOnce,
        None,
        b"one",
    )))
    .await;
    let got = c.expect_publish(WAIT).await;
    assert_eq!(&got.payload[..], b"one");
}

/// A persistent session's subscriber that reconnects and stays silent is parked right
/// after its CONNACK; a message published to it then has to wake it from the core side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_subscriber_is_woken_by_a_delivery() {
    let broker = Broker::start("");
    let (mut s, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "park-sub", false),
    )
    .await;
    s.subscribe(
        1,
        "park/d",
        sub_opts(QoS::AtLeastOnce),
        Properties::default(),
    )
    .await;
    s.disconnect().await;
    let (mut s, ack) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "park-sub", false),
    )
    .await;
    assert!(ack.session_present, "MQTT-3.2.2-2: the session was kept");
    tokio::time::sleep(PARKED).await;
    let (mut p, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "park-pub2", true),
    )
    .await;
    for (i, body) in [b"a", b"b", b"c"].iter().enumerate() {
        let id = u16::try_from(i + 1).unwrap();
        p.send(&Packet::Publish(publish(
            "park/d",
            QoS::AtLeastOnce,
            Some(id),
            &body[..],
        )))
        .await;
        assert!(matches!(p.expect_packet_raw(WAIT).await, Packet::PubAck(_)));
    }
    // In order (MQTT-4.6.0-6), each acknowledged so the next can come.
    for body in [b"a", b"b", b"c"] {
        let got = s.expect_publish(WAIT).await;
        assert_eq!(&got.payload[..], &body[..]);
        s.puback(got.packet_id.expect("QoS 1 has a packet id"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_is_told_of_a_takeover() {
    let broker = Broker::start("");
    let (mut first, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "park-take", true),
    )
    .await;
    tokio::time::sleep(PARKED).await;
    let (mut second, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "park-take", true),
    )
    .await;
    let reason = first.expect_closed_with_disconnect(WAIT).await;
    if !mosquitto_mode() {
        assert_eq!(reason, Some(ReasonCode::SESSION_TAKEN_OVER));
    }
    second.send(&Packet::PingReq).await;
    assert_eq!(second.expect_packet_raw(WAIT).await, Packet::PingResp);
}

/// MQTT-3.1.2-24: one and a half keep-alive periods without a packet end the
/// connection, also for a client that is parked the whole time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_expires_while_parked_mqtt_3_1_2_24() {
    let broker = Broker::start("");
    let mut c = connect_packet(Protocol::V3_1_1, "park-ka", true);
    c.keep_alive = 1;
    let (mut c, _) = RawClient::connect(broker.port(), c).await;
    // 1.5 s, plus slack: Mosquitto 2.0 checks keep alives coarsely (see will.rs).
    c.expect_closed(Duration::from_secs(10)).await;
}

/// MQTT-3.1.2-24 counts from the last packet: a client parked for a third of its
/// keep-alive window is still connected and answered when it speaks, and one and a half
/// keep-alive periods of silence after that end it. (A parked client's deadline sits in
/// the broker's parked-socket set; this checks it neither fires early nor lingers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_that_speaks_within_its_keep_alive_stays_connected() {
    let broker = Broker::start("");
    let mut c = connect_packet(Protocol::V3_1_1, "park-ka-alive", true);
    c.keep_alive = 4;
    let (mut c, _) = RawClient::connect(broker.port(), c).await;
    // Parked right after the CONNACK; 2 s of the 6 s window pass.
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.send(&Packet::PingReq).await;
    assert_eq!(c.expect_packet_raw(WAIT).await, Packet::PingResp);
    c.expect_closed(Duration::from_secs(20)).await;
}

/// A client that closes its socket while parked is seen to be gone: its will is
/// published (MQTT-3.1.2-8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_that_vanishes_leaves_its_will() {
    let broker = Broker::start("");
    let (mut w, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "park-watch", true),
    )
    .await;
    w.subscribe(
        1,
        "park/will",
        sub_opts(QoS::AtLeastOnce),
        Properties::default(),
    )
    .await;
    let mut c = connect_packet(Protocol::V3_1_1, "park-will", true);
    c.will = Some(outpost_tests::raw::will(
        "park/will",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let (c, _) = RawClient::connect(broker.port(), c).await;
    tokio::time::sleep(PARKED).await;
    c.drop_abruptly();
    let got = w.expect_publish(WAIT).await;
    assert_eq!(&got.payload[..], b"gone");
}
