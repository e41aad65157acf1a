//! Every acknowledgement leaves only after what it promises is on disk: the broker is made
//! to abort the instant one packet of each kind has been handed to the kernel (a debug
//! build's fault point, `broker/src/fault.rs`), restarted on the same state, and
//! the promise is checked.
//!
//! Outpost's own guarantee (the suite runs Mosquitto with persistence off): outpost only.

use std::time::Duration;

use outpost_mqtt::{
    Connect, Disconnect, Packet, Properties, Protocol, PubResponse, QoS, ReasonCode, Subscribe,
    SubscribeFilter, Unsubscribe,
};
use outpost_tests::raw::{connect_packet, publish, sub_opts};
use outpost_tests::{Broker, QUIET, RawClient, WAIT, outpost_only};

/// How long a fault point may take to fire once its packet is due.
const ABORT_WAIT: Duration = Duration::from_secs(5);

fn persistent(protocol: Protocol, client_id: &str) -> Connect {
    let mut c = connect_packet(protocol, client_id, false);
    if protocol == Protocol::V5 {
        c.properties.session_expiry_interval = Some(3600);
    }
    c
}

/// Starts outpost armed to abort right after its first `packet`.
fn armed(packet: &str) -> Broker {
    Broker::outpost_with_fault("", &format!("abort-after:{packet}"))
}

/// Asserts the broker died at its fault point, and starts it again on the same state.
fn crashed_and_restarted(broker: &mut Broker, packet: &str) {
    assert!(
        broker.wait_exit(ABORT_WAIT),
        "the broker did not abort after {packet} (fault points need a debug build); log:\n{}",
        broker.log()
    );
    broker.restart();
}

async fn expect_ack(c: &mut RawClient, what: &str) -> PubResponse {
    match c.expect_packet(WAIT).await {
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubComp(r) | Packet::PubRel(r) => r,
        other => panic!("expected {what}, got {other:?}"),
    }
}

/// One QoS 2 exchange as a publisher, up to and including PUBCOMP.
async fn publish_qos2(c: &mut RawClient, topic: &str, id: u16, payload: &[u8]) {
    c.send(&Packet::Publish(publish(
        topic,
        QoS::ExactlyOnce,
        Some(id),
        payload,
    )))
    .await;
    let rec = expect_ack(c, "PUBREC").await;
    assert_eq!(rec.packet_id, id);
    // 0x00, or on 5.0 0x10 while nobody subscribes: accepted either way.
    assert!(!rec.reason.is_error(), "PUBREC accepts: {:?}", rec.reason);
    c.send(&Packet::PubRel(PubResponse::new(id))).await;
    let comp = expect_ack(c, "PUBCOMP").await;
    assert_eq!(comp.packet_id, id);
}

async fn pubcomp_frees_the_packet_id_for_good(protocol: Protocol) {
    let mut broker = armed("pubcomp");
    let topic = format!("crash/pubcomp/{}", protocol as u8);
    let (mut publ, _) = RawClient::connect(broker.port(), persistent(protocol, "pc-pub")).await;
    // MQTT-4.3.3-12 (3.1.1: 4.3.3-2): after PUBCOMP the packet id is free; the client may
    // use it for its next message straight away.
    publish_qos2(&mut publ, &topic, 7, b"first").await;
    crashed_and_restarted(&mut broker, "PUBCOMP");

    let port = broker.port();
    let (mut sub, _) = RawClient::connect(port, connect_packet(protocol, "pc-sub", true)).await;
    sub.subscribe(1, &topic, sub_opts(QoS::ExactlyOnce), Properties::default())
        .await;
    let (mut publ, ack) = RawClient::connect(port, persistent(protocol, "pc-pub")).await;
    assert!(ack.session_present, "the publisher's session survived");
    publish_qos2(&mut publ, &topic, 7, b"second").await;
    let got = sub.expect_publish(WAIT).await;
    assert_eq!(
        &got.payload[..],
        b"second",
        "a new message reusing a completed packet id is delivered, not taken for a duplicate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubcomp_frees_the_packet_id_for_good_v311() {
    outpost_only!();
    pubcomp_frees_the_packet_id_for_good(Protocol::V3_1_1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubcomp_frees_the_packet_id_for_good_v5() {
    outpost_only!();
    pubcomp_frees_the_packet_id_for_good(Protocol::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubrec_means_the_message_survives_and_is_delivered_once() {
    outpost_only!();
    let mut broker = armed("pubrec");
    let port = broker.port();
    let topic = "crash/pubrec/x";
    let sub_connect = persistent(Protocol::V3_1_1, "rec-sub");
    let (mut sub, _) = RawClient::connect(port, sub_connect.clone()).await;
    sub.subscribe(1, topic, sub_opts(QoS::ExactlyOnce), Properties::default())
        .await;
    sub.send(&Packet::Disconnect(Disconnect {
        reason: ReasonCode::NORMAL_DISCONNECTION,
        properties: Properties::default(),
    }))
    .await;
    let (mut publ, _) = RawClient::connect(port, persistent(Protocol::V3_1_1, "rec-pub")).await;
    publ.send(&Packet::Publish(publish(
        topic,
        QoS::ExactlyOnce,
        Some(3),
        b"once",
    )))
    .await;
    crashed_and_restarted(&mut broker, "PUBREC");

    let port = broker.port();
    // MQTT-4.4.0-1: the publisher resends the unacknowledged PUBLISH with DUP; the broker
    // knows it (MQTT-4.3.3-9) and does not route it again.
    let (mut publ, ack) = RawClient::connect(port, persistent(Protocol::V3_1_1, "rec-pub")).await;
    assert!(ack.session_present);
    let mut again = publish(topic, QoS::ExactlyOnce, Some(3), b"once");
    again.dup = true;
    publ.send(&Packet::Publish(again)).await;
    assert_eq!(expect_ack(&mut publ, "PUBREC").await.packet_id, 3);
    publ.send(&Packet::PubRel(PubResponse::new(3))).await;
    assert_eq!(expect_ack(&mut publ, "PUBCOMP").await.packet_id, 3);

    let (mut sub, ack) = RawClient::connect(port, sub_connect).await;
    assert!(ack.session_present);
    let got = sub.expect_publish(WAIT).await;
    assert_eq!(&got.payload[..], b"once");
    let id = got.packet_id.expect("QoS 2");
    sub.send(&Packet::PubRec(PubResponse::new(id))).await;
    assert_eq!(expect_ack(&mut sub, "PUBREL").await.packet_id, id);
    sub.send(&Packet::PubComp(PubResponse::new(id))).await;
    sub.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubrel_to_a_subscriber_is_resent_after_a_crash_never_the_publish() {
    outpost_only!();
    let mut broker = armed("pubrel");
    let port = broker.port();
    let topic = "crash/pubrel/x";
    let sub_connect = persistent(Protocol::V3_1_1, "rel-sub");
    let (mut sub, _) = RawClient::connect(port, sub_connect.clone()).await;
    sub.subscribe(1, topic, sub_opts(QoS::ExactlyOnce), Properties::default())
        .await;
    let (mut publ, _) =
        RawClient::connect(port, connect_packet(Protocol::V3_1_1, "rel-pub", true)).await;
    publ.send(&Packet::Publish(publish(
        topic,
        QoS::ExactlyOnce,
        Some(1),
        b"m",
    )))
    .await;
    let got = sub.expect_publish(WAIT).await;
    let id = got.packet_id.expect("QoS 2");
    // Acknowledged at once, well inside the broker's write grace for deliveries.
    sub.send(&Packet::PubRec(PubResponse::new(id))).await;
    assert_eq!(expect_ack(&mut sub, "PUBREL").await.packet_id, id);
    crashed_and_restarted(&mut broker, "PUBREL");

    // The subscriber holds the packet id until PUBREL (MQTT-4.3.3-9 as the receiver): a
    // resumed session must finish the exchange with PUBREL (MQTT-4.4.0-1), and must not
    // send the PUBLISH again (MQTT-4.3.3-5).
    let (mut sub, ack) = RawClient::connect(broker.port(), sub_connect).await;
    assert!(ack.session_present);
    match sub.expect_packet(WAIT).await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, id),
        other => panic!("expected the PUBREL again, got {other:?}"),
    }
    sub.send(&Packet::PubComp(PubResponse::new(id))).await;
    sub.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suback_means_the_subscription_survives_a_crash() {
    outpost_only!();
    let mut broker = armed("suback");
    let topic = "crash/suback/x";
    let sub_connect = persistent(Protocol::V3_1_1, "sa-sub");
    let (mut sub, _) = RawClient::connect(broker.port(), sub_connect.clone()).await;
    sub.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![SubscribeFilter {
            filter: topic.into(),
            options: sub_opts(QoS::AtLeastOnce),
        }],
        properties: Properties::default(),
    }))
    .await;
    crashed_and_restarted(&mut broker, "SUBACK");

    let port = broker.port();
    let (mut publ, _) =
        RawClient::connect(port, connect_packet(Protocol::V3_1_1, "sa-pub", true)).await;
    publ.send(&Packet::Publish(publish(
        topic,
        QoS::AtLeastOnce,
        Some(1),
        b"kept",
    )))
    .await;
    expect_ack(&mut publ, "PUBACK").await;
    let (mut sub, ack) = RawClient::connect(port, sub_connect).await;
    assert!(ack.session_present);
    let got = sub.expect_publish(WAIT).await;
    assert_eq!(
        &got.payload[..],
        b"kept",
        "the acknowledged subscription held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsuback_means_the_subscription_is_gone_after_a_crash() {
    outpost_only!();
    let mut broker = armed("unsuback");
    let topic = "crash/unsuback/x";
    let sub_connect = persistent(Protocol::V3_1_1, "ua-sub");
    let (mut sub, _) = RawClient::connect(broker.port(), sub_connect.clone()).await;
    sub.subscribe(1, topic, sub_opts(QoS::AtLeastOnce), Properties::default())
        .await;
    sub.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 2,
        filters: vec![topic.into()],
        properties: Properties::default(),
    }))
    .await;
    crashed_and_restarted(&mut broker, "UNSUBACK");

    let port = broker.port();
    let (mut publ, _) =
        RawClient::connect(port, connect_packet(Protocol::V3_1_1, "ua-pub", true)).await;
    publ.send(&Packet::Publish(publish(
        topic,
        QoS::AtLeastOnce,
        Some(1),
        b"not-for-you",
    )))
    .await;
    expect_ack(&mut publ, "PUBACK").await;
    let (mut sub, ack) = RawClient::connect(port, sub_connect).await;
    assert!(ack.session_present);
    sub.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puback_for_a_retained_message_means_it_survives_a_crash() {
    outpost_only!();
    let mut broker = armed("puback");
    let topic = "crash/puback/x";
    let (mut publ, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "pa-pub", true),
    )
    .await;
    let mut p = publish(topic, QoS::AtLeastOnce, Some(1), b"retained");
    p.retain = true;
    publ.send(&Packet::Publish(p)).await;
    crashed_and_restarted(&mut broker, "PUBACK");

    let (mut sub, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "pa-sub", true),
    )
    .await;
    sub.subscribe(1, topic, sub_opts(QoS::AtLeastOnce), Properties::default())
        .await;
    let got = sub.expect_publish(WAIT).await;
    assert_eq!(&got.payload[..], b"retained");
    assert!(got.retain, "MQTT-3.3.1-8");
}
