//! An acknowledgement of the wrong kind for the message in flight is a protocol
//! violation (3.1.1 MQTT-4.8.0-1; 5.0 section 4.13, reason 0x82): the connection closes,
//! and the message is not taken as acknowledged. Acknowledgements were matched by packet
//! id alone: a PUBCOMP completed a QoS 1 message, a PUBACK a QoS 2 one, and a PUBREC for
//! a QoS 1 message made the broker send PUBREL.

use outpost_mqtt::{Packet, Properties, Protocol, PubResponse, QoS, ReasonCode};
use outpost_tests::raw::{connect_packet, publish, sub_opts};
use outpost_tests::{Broker, RawClient, WAIT, outpost_only};

/// Subscribes at `sub_qos`, has a message of `qos` delivered, answers it with `wrong`,
/// and checks the close; then checks the message is still owed (resent on resume).
async fn wrong_ack(protocol: Protocol, qos: QoS, wrong: fn(u16) -> Packet, name: &str) {
    let broker = Broker::start("");
    let port = broker.port();
    let id = format!("wk-{}-{name}", protocol as u8);
    let mut connect = connect_packet(protocol, &id, false);
    if protocol == Protocol::V5 {
        connect.properties.session_expiry_interval = Some(600);
    }
    let (mut sub, _) = RawClient::connect(port, connect.clone()).await;
    sub.subscribe(1, "wk/t", sub_opts(qos), Properties::default())
        .await;
    let (mut publ, _) =
        RawClient::connect(port, connect_packet(protocol, &format!("{id}-p"), true)).await;
    publ.send(&Packet::Publish(publish("wk/t", qos, Some(1), b"m")))
        .await;
    let got = sub.expect_publish(WAIT).await;
    let pid = got.packet_id.expect("QoS 1/2");
    sub.send(&wrong(pid)).await;
    let reason = sub.expect_closed_with_disconnect(WAIT).await;
    if protocol == Protocol::V5 {
        assert_eq!(reason, Some(ReasonCode::PROTOCOL_ERROR), "{name}: 0x82");
    }
    // Not acknowledged by the wrong packet: the message is resent on resume
    // (MQTT-4.4.0-1).
    let (mut sub, ack) = RawClient::connect(port, connect).await;
    assert!(ack.session_present);
    let again = sub.expect_publish(WAIT).await;
    assert_eq!(again.packet_id, Some(pid), "{name}: still owed");
    assert!(again.dup);
}

fn puback(id: u16) -> Packet {
    Packet::PubAck(PubResponse::new(id))
}
fn pubrec(id: u16) -> Packet {
    Packet::PubRec(PubResponse::new(id))
}
fn pubcomp(id: u16) -> Packet {
    Packet::PubComp(PubResponse::new(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubcomp_does_not_complete_a_qos1_message() {
    outpost_only!();
    wrong_ack(Protocol::V3_1_1, QoS::AtLeastOnce, pubcomp, "pubcomp").await;
    wrong_ack(Protocol::V5, QoS::AtLeastOnce, pubcomp, "pubcomp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubrec_for_a_qos1_message_is_refused_not_answered_with_pubrel() {
    outpost_only!();
    wrong_ack(Protocol::V3_1_1, QoS::AtLeastOnce, pubrec, "pubrec").await;
    wrong_ack(Protocol::V5, QoS::AtLeastOnce, pubrec, "pubrec").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puback_does_not_complete_a_qos2_message() {
    outpost_only!();
    wrong_ack(Protocol::V3_1_1, QoS::ExactlyOnce, puback, "puback").await;
    wrong_ack(Protocol::V5, QoS::ExactlyOnce, puback, "puback").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubcomp_before_pubrec_is_refused() {
    outpost_only!();
    wrong_ack(Protocol::V5, QoS::ExactlyOnce, pubcomp, "early-pubcomp").await;
}
